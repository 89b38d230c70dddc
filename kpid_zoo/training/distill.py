"""Inner knowledge distillation (KPID, Aflalo et al. 2020, sec. 3.3).

The frozen parent (teacher) runs beside the pruned network (student). At every distillation point -- the stem and
the output of every stage -- the student's feature map is lifted to the parent's width by a learned, bias-free
1x1 projection and matched to the parent's feature map with MSE. Loss:

    CE(y, student; label_smoothing) + gamma / K * sum_k MSE(P_k(s_k), t_k) + w_kl * T^2 * KL(t/T || s/T)

P_k is initialised as the scatter of the kept channels (P_k[kept[i], i] = 1): at step 0 student channel i is
compared with exactly the parent channel it was cut from, which is what the pruned weights were copied from.

`DistillationWrapper` holds student + projections; it is the module Accelerate prepares, syncs and checkpoints.
Its `.student` is what gets exported: the projections are training-only and are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

KeptChannels = Mapping[str, torch.Tensor | None]


def distill_points(model: nn.Module) -> list:
    """Stem + every stage output, found by timm naming conventions.

    ResNet family: `maxpool` (or `act1` when the stem has no pool) + `layer1..layerN`.
    EfficientNet / MobileNet family: `bn1` (stem BN+act) + each stage `blocks.i`.
    """
    if hasattr(model, 'layer1') and hasattr(model, 'act1'):
        stem = (
            'maxpool'
            if isinstance(getattr(model, 'maxpool', None), nn.Module) and not isinstance(model.maxpool, nn.Identity)
            else 'act1'
        )
        stages, i = [], 1
        while isinstance(getattr(model, f'layer{i}', None), nn.Module):
            stages.append(f'layer{i}')
            i += 1
        return [stem] + stages
    blocks = getattr(model, 'blocks', None)
    if hasattr(model, 'conv_stem') and hasattr(model, 'bn1') and isinstance(blocks, nn.Sequential):
        return ['bn1'] + [f'blocks.{i}' for i in range(len(blocks))]
    raise ValueError(
        f'cannot find inner-distillation points in {type(model).__name__}: expected a timm ResNet '
        f'(act1/maxpool + layer1..4) or EfficientNet/MobileNet (conv_stem, bn1, blocks.N) layout; '
        f'pass points=[module names] explicitly'
    )


def _resolve_modules(model: nn.Module, points: Sequence[str]) -> dict[str, nn.Module]:
    modules = dict(model.named_modules())
    missing = [p for p in points if p not in modules]
    if missing:
        raise KeyError(f'distillation point(s) {missing} not found in {type(model).__name__}')
    return {p: modules[p] for p in points}


@contextmanager
def capture_outputs(model: nn.Module, points: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Collect the forward outputs of the named modules while the context is open.

    Hooks live only for the duration of the context so copies/pickles of the model never carry stale hooks.
    """
    feats: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in _resolve_modules(model, points).items():

        def hook(_m, _inp, out, _name=name):
            feats[_name] = out

        handles.append(module.register_forward_hook(hook))
    try:
        yield feats
    finally:
        for h in handles:
            h.remove()


def scatter_projection(student_ch: int, teacher_ch: int, kept: torch.Tensor | None, point: str) -> nn.Conv2d:
    """Bias-free 1x1 conv student_ch -> teacher_ch with weight[kept[i], i] = 1, all else 0."""
    if kept is None:
        if student_ch != teacher_ch:
            raise ValueError(
                f'point {point!r}: no kept channels given but student width {student_ch} != parent width {teacher_ch}'
            )
        kept = torch.arange(teacher_ch)
    kept = torch.as_tensor(kept, dtype=torch.long).flatten()
    if kept.numel() != student_ch:
        raise ValueError(f'point {point!r}: {kept.numel()} kept channel indices but student width is {student_ch}')
    if kept.numel() and (kept.min() < 0 or kept.max() >= teacher_ch or kept.unique().numel() != kept.numel()):
        raise ValueError(f'point {point!r}: kept indices must be unique and in [0, {teacher_ch})')
    proj = nn.Conv2d(student_ch, teacher_ch, kernel_size=1, bias=False)
    with torch.no_grad():
        proj.weight.zero_()
        proj.weight[kept, torch.arange(student_ch), 0, 0] = 1.0
    return proj


def _key(point: str) -> str:
    return point.replace('.', '__')  # ModuleDict keys may not contain '.'


class DistillationWrapper(nn.Module):
    """Student + per-point projections. forward(x) -> (logits, {point: projected student feature})."""

    def __init__(self, student: nn.Module, points: Sequence[str], projections: Mapping[str, nn.Conv2d]):
        super().__init__()
        self.student = student
        self.points = list(points)
        self.projections = nn.ModuleDict({_key(p): projections[p] for p in self.points})

    def forward(self, x: torch.Tensor):
        with capture_outputs(self.student, self.points) as feats:
            logits = self.student(x)
        projected = {p: self.projections[_key(p)](feats[p]) for p in self.points}
        return logits, projected


@torch.no_grad()
def probe_widths(model: nn.Module, points: Sequence[str], input_size: Sequence[int]) -> dict[str, tuple]:
    """(C, H, W) of each point's output for one dummy image (eval mode, so BN statistics are untouched)."""
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with capture_outputs(model, points) as feats:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    for p, f in feats.items():
        if not isinstance(f, torch.Tensor) or f.dim() != 4:
            raise ValueError(f'distillation point {p!r} of {type(model).__name__} must output an NCHW tensor')
    return {p: tuple(f.shape[1:]) for p, f in feats.items()}


def build_distillation(
    student: nn.Module,
    teacher: nn.Module,
    kept: KeptChannels | None = None,
    points: Sequence[str] | None = None,
    input_size: Sequence[int] = (3, 224, 224),
) -> DistillationWrapper:
    """Wrap `student` with scatter-initialised projections to `teacher`'s widths at `points`.

    kept: {point: LongTensor of parent channel indices kept in that point's output, or None when all are kept}.
    """
    points = list(points) if points is not None else distill_points(teacher)
    kept = dict(kept or {})
    unknown = set(kept) - set(points)
    if unknown:
        raise KeyError(f'kept channels given for {sorted(unknown)} which are not distillation points {points}')
    s_shapes = probe_widths(student, points, input_size)
    t_shapes = probe_widths(teacher, points, input_size)
    projections = {}
    for p in points:
        if s_shapes[p][1:] != t_shapes[p][1:]:
            raise ValueError(f'point {p!r}: student spatial size {s_shapes[p][1:]} != parent {t_shapes[p][1:]}')
        projections[p] = scatter_projection(s_shapes[p][0], t_shapes[p][0], kept.get(p), p)
    return DistillationWrapper(student, points, projections)


class InnerDistillLoss(nn.Module):
    """KPID loss; returns (total, parts) where parts holds detached ce / inner / kl for logging."""

    def __init__(
        self, gamma: float = 1.0, kd_logits_weight: float = 0.0, temperature: float = 1.0, label_smoothing: float = 0.0
    ):
        super().__init__()
        self.gamma, self.kd_logits_weight = gamma, kd_logits_weight
        self.temperature, self.label_smoothing = temperature, label_smoothing

    def forward(
        self,
        logits: torch.Tensor,
        projected: Mapping[str, torch.Tensor],
        target: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        teacher_feats: Mapping[str, torch.Tensor] | None = None,
    ):
        ce = F.cross_entropy(logits.float(), target, label_smoothing=self.label_smoothing)
        total, parts = ce, {'ce': ce.detach()}
        if self.gamma and projected:
            if teacher_feats is None:
                raise ValueError('inner distillation needs the teacher features (gamma > 0)')
            # float32: under bf16/fp16 autocast the squared error of large activations loses precision
            mse = [F.mse_loss(projected[p].float(), teacher_feats[p].float()) for p in projected]
            inner = torch.stack(mse).mean()  # = (1/K) sum_k
            total = total + self.gamma * inner
            parts['inner'] = inner.detach()
        if self.kd_logits_weight:
            if teacher_logits is None:
                raise ValueError('logit distillation needs the teacher logits (kd_logits_weight > 0)')
            t = self.temperature
            kl = (
                F.kl_div(
                    F.log_softmax(logits.float() / t, -1),
                    F.log_softmax(teacher_logits.float() / t, -1),
                    log_target=True,
                    reduction='batchmean',
                )
                * t
                * t
            )
            total = total + self.kd_logits_weight * kl
            parts['kl'] = kl.detach()
        return total, parts
