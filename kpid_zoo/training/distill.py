"""Inner knowledge distillation (KPID, Aflalo et al. 2020, sec. 3.3).

The frozen parent (teacher) runs beside the pruned network (student). At every distillation point -- the stem and
the output of every stage of a CNN, every block of a ViT -- the student's feature is lifted to the parent's width by
a learned, bias-free projection over the channels (a 1x1 conv of an NCHW map; a linear map of the last dimension of
a ViT's (B, N, C) tokens or an NHWC map) and matched to the parent's feature with MSE. Loss:

    CE(y, student; label_smoothing) + gamma / K * sum_k MSE(P_k(s_k), t_k) + w_kl * T^2 * KL(t/T || s/T)

P_k is initialised as the scatter of the kept channels (P_k[kept[i], i] = 1): at step 0 student channel i is
compared with exactly the parent channel it was cut from, which is what the pruned weights were copied from (an
unpruned student starts at an inner loss of exactly 0).

`DistillationWrapper` holds student + projections; it is the module Accelerate prepares, syncs and checkpoints.
Its `.student` is what gets exported: the projections are training-only and are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models import FeatureInfo

KeptChannels = Mapping[str, torch.Tensor | None]


def distill_points(model: nn.Module) -> list[str]:
    """Stem + every stage output of a CNN, every block output of a ViT: module names whose forward outputs are
    matched.

    ResNet family: `maxpool` (or `act1` when the stem has no pool) + `layer1..layerN`.
    EfficientNet / MobileNet family (MobileNetV4 too): `bn1` (stem BN+act) + each stage `blocks.i`.
    These two are named by timm's conventions, as they were before any other parent was taken: the zoo's builds
    resume and reproduce bit for bit with them.
    Any other timm model: the modules of its `feature_info`, which are the modules whose outputs timm's
    `forward_intermediates` returns: a ConvNeXt's, RegNet's, FastViT's or EfficientViT's stages (NCHW maps), a
    ViT's or DeiT's blocks ((B, N, C) tokens, the class and distillation tokens included: the hook takes the
    block's output as the next block reads it, before `forward_intermediates` would drop those tokens and fold
    the rest into a map).
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
    points = _feature_info_modules(model)
    if points:
        return points
    raise ValueError(
        f'cannot find inner-distillation points in {type(model).__name__}: it has no timm feature_info naming its '
        f'stage outputs, nor a ResNet (act1/maxpool + layer1..4) or EfficientNet/MobileNet (conv_stem, bn1, '
        f'blocks.N) layout (build_distillation takes points=[module names])'
    )


def _feature_info_modules(model: nn.Module) -> list[str]:
    """The module names of timm's `feature_info` (a list of dicts, or a `FeatureInfo`), in order; [] without one.
    A name no module carries is an error naming it: a point that does not exist would silently distil nothing."""
    info = getattr(model, 'feature_info', None)
    if isinstance(info, FeatureInfo):
        info = info.info
    if not isinstance(info, (list, tuple)):
        return []
    names = [entry['module'] for entry in info if isinstance(entry, Mapping) and entry.get('module')]
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f'{type(model).__name__}.feature_info names {missing}, which are not modules of it')
    return list(dict.fromkeys(names))


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


def scatter_projection(
    student_ch: int, teacher_ch: int, kept: torch.Tensor | None, point: str, channels_last: bool = False
) -> nn.Conv2d | nn.Linear:
    """Bias-free student_ch -> teacher_ch map of the channels with weight[kept[i], i] = 1, all else 0: a 1x1 conv
    for an NCHW map, a linear map of the last dimension for tokens (B, N, C) or an NHWC map (`channels_last`)."""
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
    proj = (
        nn.Linear(student_ch, teacher_ch, bias=False)
        if channels_last
        else nn.Conv2d(student_ch, teacher_ch, kernel_size=1, bias=False)
    )
    with torch.no_grad():
        proj.weight.zero_()
        proj.weight.view(teacher_ch, student_ch)[kept, torch.arange(student_ch)] = 1.0
    return proj


def _key(point: str) -> str:
    return point.replace('.', '__')  # ModuleDict keys may not contain '.'


class DistillationWrapper(nn.Module):
    """Student + per-point projections. forward(x) -> (logits, {point: projected student feature})."""

    def __init__(self, student: nn.Module, points: Sequence[str], projections: Mapping[str, nn.Module]):
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
    """Each point's output shape for one dummy image (eval mode, so BN statistics are untouched), channels first:
    (C, H, W) of an NCHW map, (C, H, W) of an NHWC map too (timm's `output_fmt`), (C, N) of a ViT's (1, N, C)
    tokens. `channels_last_points` says which points hold their channels last."""
    return {p: shape for p, (shape, _) in _probe(model, points, input_size).items()}


def channels_last_points(model: nn.Module, points: Sequence[str], input_size: Sequence[int]) -> set[str]:
    """The points whose outputs hold their channels in the last dimension (tokens, NHWC maps)."""
    return {p for p, (_, last) in _probe(model, points, input_size).items() if last}


@torch.no_grad()
def _probe(model: nn.Module, points: Sequence[str], input_size: Sequence[int]) -> dict[str, tuple[tuple, bool]]:
    was_training = model.training
    device = next(model.parameters()).device
    model.eval()
    try:
        with capture_outputs(model, points) as feats:
            model(torch.zeros(1, *input_size, device=device))
    finally:
        model.train(was_training)
    nhwc = getattr(model, 'output_fmt', None) == 'NHWC'  # timm's marker of stages that return NHWC maps
    shapes = {}
    for p in points:
        f = feats.get(p)
        if not isinstance(f, torch.Tensor) or f.dim() not in (3, 4):
            raise ValueError(
                f'distillation point {p!r} of {type(model).__name__} must output an NCHW map or (B, N, C) tokens'
            )
        last = f.dim() == 3 or nhwc
        shape = tuple(f.shape[1:])
        shapes[p] = ((shape[-1], *shape[:-1]) if last else shape), last
    return shapes


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
    s_shapes = _probe(student, points, input_size)
    t_shapes = _probe(teacher, points, input_size)
    projections = {}
    for p in points:
        (s_shape, s_last), (t_shape, t_last) = s_shapes[p], t_shapes[p]
        if s_shape[1:] != t_shape[1:] or s_last != t_last:
            raise ValueError(f'point {p!r}: student spatial size {s_shape[1:]} != parent {t_shape[1:]}')
        projections[p] = scatter_projection(s_shape[0], t_shape[0], kept.get(p), p, channels_last=t_last)
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
