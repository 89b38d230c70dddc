"""Stage 4: how much each channel of each group matters.

KPID scores a channel with the first-order Taylor term of removing it: the sum over everything the channel owns
(the filters producing it, its BN scale and shift, the depthwise filter, the consumers' input slices) of
|w * dL/dw|, accumulated over N batches. Magnitude (L1 of the producing filters) is the data-free baseline.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .groups import ROLE_DW, ROLE_IN, ROLE_NORM, ROLE_OUT, GroupGraph

Importance = dict[str, torch.Tensor]  # group name -> one score per channel of the parent


def _member_tensors(module: nn.Module, role: str) -> list[tuple[torch.Tensor, int]]:
    """(tensor, channel dim) pairs that a member's channels own."""
    if role == ROLE_IN:
        return [(module.weight, 1)]
    if role == ROLE_NORM:
        return [(t, 0) for t in (module.weight, module.bias) if t is not None]
    return [(t, 0) for t in (module.weight, getattr(module, "bias", None)) if t is not None]


def _per_channel(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t.transpose(0, dim).reshape(t.shape[dim], -1).sum(1)


def taylor_importance(model: nn.Module, graph: GroupGraph, batches: Iterable, num_batches: int,
                      loss_fn: Callable | None = None, device: str | torch.device = "cpu",
                      progress: bool = True) -> Importance:
    """Sum over `num_batches` batches of |w * dL/dw|, per channel, summed over each prunable group's members.

    The model runs in eval mode (BN uses its running statistics and they are not updated) and its `.grad`
    fields are left untouched.
    """
    if num_batches < 1:
        raise ValueError(f"importance.batches must be >= 1, got {num_batches}")
    loss_fn = loss_fn or F.cross_entropy
    was_training = model.training
    model.eval().to(device)
    owned = [(g.name, model.get_submodule(m.module), m.role) for g in graph.prunable for m in g.members]
    tensors = [(name, t, dim) for name, mod, role in owned for t, dim in _member_tensors(mod, role)]
    unique = list({id(t): t for _, t, _ in tensors}.values())
    scores = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in graph.prunable}
    seen = 0
    it = iter(batches)
    for _ in tqdm(range(num_batches), desc="importance (taylor)", disable=not progress, leave=False):
        try:
            x, y = next(it)
        except StopIteration:
            break
        with torch.enable_grad():
            loss = loss_fn(model(x.to(device)), y.to(device))
            grads = dict(zip(map(id, unique), torch.autograd.grad(loss, unique, allow_unused=True)))
        for name, t, dim in tensors:
            g = grads[id(t)]
            if g is not None:
                scores[name] += _per_channel((t.detach() * g).abs(), dim).double().cpu()
        seen += 1
    model.train(was_training)
    if seen == 0:
        raise ValueError("importance: the data loader yielded no batch")
    return scores


def magnitude_importance(model: nn.Module, graph: GroupGraph) -> Importance:
    """L1 norm of the filters that produce each channel (conv/linear outputs and depthwise filters)."""
    scores = {}
    for g in graph.prunable:
        s = torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            if m.role in (ROLE_OUT, ROLE_DW):
                w = model.get_submodule(m.module).weight.detach()
                s += _per_channel(w.abs(), 0).double().cpu()
        scores[g.name] = s
    return scores
