"""Stage 4: how much each channel of each group matters.

KPID scores a channel with the first-order Taylor term of removing it: the sum over everything the channel owns
(the filters producing it, its BN scale and shift, the depthwise filter, the consumers' input slices) of
|w * dL/dw|, accumulated over N batches. Magnitude (L1 of the producing filters) is the data-free baseline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core import threads
from ..errors import UserError
from .groups import ChannelMap, GroupGraph

Importance = dict[str, torch.Tensor]  # group name -> one score per channel of the parent


def _owned(model: nn.Module, graph: GroupGraph, read) -> list[tuple[ChannelMap, torch.Tensor, Callable]]:
    """(where the positions go, tensor, tensor -> one value per position) for what `read(handler)` lists of every
    member of a prunable group."""
    prunable = {graph.index(g.name) for g in graph.prunable}
    out = []
    for member, channels in graph.layouts.items():
        if prunable.isdisjoint(int(g) for g in np.unique(channels.group)):
            continue
        handler, module = graph.resolve(model, member)
        out += [(channels, t, fn) for t, fn in read(handler)(module, member.role)]
    return out


def _scatter(scores: dict[str, torch.Tensor], graph: GroupGraph, channels: ChannelMap, values: torch.Tensor) -> None:
    """Add one value per position to the channel each position holds."""
    values = values.detach().double().cpu()
    for gi in np.unique(channels.group):
        name = graph.groups[gi].name if gi >= 0 else None
        if name in scores:
            at = torch.from_numpy(channels.group == gi)
            scores[name].index_add_(0, torch.from_numpy(channels.channel)[at], values[at])


def taylor_importance(
    model: nn.Module,
    graph: GroupGraph,
    batches: Iterable,
    num_batches: int,
    loss_fn: Callable | None = None,
    device: str | torch.device = 'cpu',
    progress: bool = True,
) -> Importance:
    """Sum over `num_batches` batches of |w * dL/dw|, per channel, summed over each prunable group's members
    (a ValueError when `batches` holds fewer).

    The model runs in eval mode (BN uses its running statistics and they are not updated) and its `.grad`
    fields are left untouched.
    """
    if num_batches < 1:
        raise UserError(f'importance.batches must be >= 1, got {num_batches}')
    loss_fn = loss_fn or F.cross_entropy
    was_training = model.training
    model.eval().to(device)
    tensors = _owned(model, graph, lambda h: h.importance_tensors)
    unique = list({id(t): t for _, t, _ in tensors}.values())
    scores = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in graph.prunable}
    seen = 0
    it = iter(batches)
    for _ in tqdm(range(num_batches), desc='importance (taylor)', disable=not progress, leave=False):
        try:
            x, y = next(it)
        except StopIteration:
            # scores over fewer batches than asked would be passed off as the recipe's: say so instead
            model.train(was_training)
            raise UserError(
                f'importance.batches: {num_batches} batches asked, but the data loader held {seen}'
            ) from None
        threads.tick()
        with torch.enable_grad():
            loss = loss_fn(model(x.to(device)), y.to(device))
            grads = dict(zip(map(id, unique), torch.autograd.grad(loss, unique, allow_unused=True)))
        for channels, t, per_position in tensors:
            g = grads[id(t)]
            if g is not None:
                _scatter(scores, graph, channels, per_position((t.detach() * g).abs()))
        seen += 1
    model.train(was_training)
    return scores


def magnitude_importance(model: nn.Module, graph: GroupGraph) -> Importance:
    """L1 norm of the filters that produce each channel (conv/linear outputs and depthwise filters)."""
    scores = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in graph.prunable}
    for channels, t, per_position in _owned(model, graph, lambda h: h.filters):
        _scatter(scores, graph, channels, per_position(t.detach().abs()))
    return scores
