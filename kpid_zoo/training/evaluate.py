"""Evaluation stage: top-1 / top-5 / loss over a loader (multi-process aware) and CPU throughput."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..budget.timing import LatencySetting, time_callable
from ..core import threads
from .accelerator import stage_autocast
from .streams import is_stream


@dataclass
class EvalResult:
    top1: float  # percent
    top5: float  # percent (top-k with k = min(5, num_classes))
    loss: float  # mean cross-entropy
    n: int  # number of samples counted (each sample exactly once across processes)

    def as_dict(self) -> dict:
        return asdict(self)


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict:
    """Per-sample 0/1 correctness for each k (k clipped to the number of classes)."""
    max_k = min(max(ks), logits.shape[-1])
    pred = logits.topk(max_k, dim=-1).indices  # (N, max_k)
    hit = pred.eq(target.unsqueeze(-1))
    return {k: hit[:, : min(k, max_k)].any(dim=-1).float() for k in ks}


def _device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device('cpu')


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader,
    accelerator=None,
    precision: str = 'no',
    channels_last: bool = False,
    progress: bool = False,
    desc: str = 'evaluate',
) -> EvalResult:
    """Top-1/top-5/CE of `model` over `loader`.

    With an `accelerator` the loader is expected to be prepared (sharded) and the model on `accelerator.device`;
    per-sample statistics are gathered with `gather_for_metrics`, which drops the duplicates Accelerate pads the
    last uneven batch with. A stream (`kpid_zoo.training.streams`) pads nothing, but its processes see different numbers
    of batches: each sums its own and they are added up once, after every process has finished. `precision`
    ('no', 'bf16', 'fp16') autocasts the forward pass (fp32 by default: the figures a model card reports).
    `channels_last` feeds the images in NHWC (for a model already converted). `progress`: a bar of batches,
    labelled `desc`, on the main process.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else _device_of(model)
    gather_per_batch = accelerator is not None and not is_stream(loader)
    sums = torch.zeros(3, dtype=torch.float64)  # top1 hits, top5 hits, loss sum
    n = 0
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    try:
        for images, target in tqdm(loader, desc=desc, disable=not show, leave=False, dynamic_ncols=True):
            threads.tick()
            images, target = images.to(device), target.to(device)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with stage_autocast(device, precision):
                logits = model(images)
            logits = logits.float()
            hits = topk_correct(logits, target)
            per_sample = torch.stack([hits[1], hits[5], F.cross_entropy(logits, target, reduction='none')], dim=1)
            if gather_per_batch:
                per_sample = accelerator.gather_for_metrics(per_sample)
            sums += per_sample.sum(dim=0).double().cpu()
            n += per_sample.shape[0]
    finally:
        model.train(was_training)
    if accelerator is not None and not gather_per_batch:
        local = torch.cat([sums, torch.tensor([float(n)], dtype=torch.float64)]).to(device)
        totals = accelerator.reduce(local, 'sum')
        sums, n = totals[:3].cpu(), int(totals[3].item())
    if n == 0:
        raise ValueError('evaluate(): the loader yielded no samples')
    return EvalResult(top1=100.0 * sums[0].item() / n, top5=100.0 * sums[1].item() / n, loss=sums[2].item() / n, n=n)


@torch.inference_mode()
def measure_throughput(
    model: nn.Module,
    input_size: Sequence[int] = (3, 224, 224),
    batch_size: int = 32,
    warmup: int = 3,
    iters: int = 10,
    threads: int | None = None,
    channels_last: bool = False,
) -> float:
    """Images per second of `model` on CPU (eval mode, inference_mode), median over `iters` timed batches.

    threads: torch intra-op threads for the measurement (restored afterwards); None keeps the current setting.
    """
    if iters < 1:
        raise ValueError(f'iters must be >= 1, got {iters}')
    was_training = model.training
    model = model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    params = next(model.parameters(), None)
    dtype = params.dtype if params is not None else torch.float32
    x = torch.randn(batch_size, *input_size, dtype=dtype).to(memory_format=memory_format)
    setting = LatencySetting('cpu', batch_size, threads or torch.get_num_threads())
    try:
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        timing = time_callable(lambda: model(x), setting, warmup=warmup, repeats=iters)
    finally:
        if channels_last:
            model.to(memory_format=torch.contiguous_format)
        model.train(was_training)
    return batch_size / (timing.median_ms / 1e3)
