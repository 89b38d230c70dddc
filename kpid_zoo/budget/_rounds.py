"""The loop both budgets drive (`flops_loop`, `latency_loop`): solve the knapsack, cut the network, measure it,
and correct the next round's aim by what the measurement found beyond the cost model; and the width choices
and the prunability check both budgets start from.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..engine.groups import GroupGraph
from ..engine.importance import Importance
from ..engine.knapsack import Cost, KnapsackSolution, solve_for_budget, width_choices
from ..engine.surgery import prune_model
from ..errors import UserError

_Best = tuple[KnapsackSolution, nn.Module, dict, float, dict]  # solution, pruned net, kept, measured cost, record


def knapsack_rounds(
    parent: nn.Module,
    graph: GroupGraph,
    importance: Importance,
    cost: Cost,
    choices: dict[str, list[int]],
    low: float,
    high: float,
    measure: Callable[[nn.Module, KnapsackSolution], tuple[float, dict]],
    *,
    max_rounds: int = 6,
    relative: bool = False,
    noise: float = 0.0,
    scale: float = 1.0,
    progress: bool = True,
    shown: Callable[[float], str] = str,
) -> tuple[_Best | None, _Best, list[dict]]:
    """Solve -> cut -> measure, re-linearising at the new widths and correcting the aim by what the measurement
    found beyond the cost model, until the measured cost lies in [low, high] and rounds stop raising the kept
    importance. The correction is what the measurement adds to the model (FLOPs: ops the model does not count), or
    with `relative` the factor by which it differs from the model (latency: a machine a little faster or slower than
    when the table was timed), starting at `scale`; a correction within `noise` (relative) of the last one is not
    trusted, the last is kept.

    Returns the best round under `high` (None if none was), the cheapest round measured, and every round's record.
    """
    offset = 0.0
    blocks = {g.name: g.block_index() for g in graph.prunable if g.parts > 1}  # grouped convs: per-block top-k
    widths = dict(cost.sizes)
    best: tuple[tuple, _Best] | None = None
    cheapest: _Best | None = None
    rounds = []
    bar = tqdm(range(max_rounds), desc='knapsack', disable=not progress, leave=False)
    for _ in bar:
        try:
            sol = solve_for_budget(
                importance, cost, widths, choices, low / scale - offset, high / scale - offset, blocks=blocks
            )
        except ValueError:
            if not rounds:
                raise
            break  # the correction asks for less than the cost model can reach: keep what was measured
        keep = {g: top_k(importance[g], k, blocks.get(g)) for g, k in sol.widths.items() if k < cost.sizes[g]}
        model = prune_model(parent, graph, keep)
        achieved, record = measure(model, sol)
        predicted = cost.at(sol.widths)
        if relative:
            record = {**record, 'scale': scale}  # the correction this round aimed with
            if abs(achieved / predicted - scale) > noise * scale:
                scale = achieved / predicted
        elif abs(achieved - predicted - offset) > noise * achieved:
            offset = achieved - predicted
        rounds.append({**record, 'value': sol.value})
        bar.set_postfix(measured=shown(achieved), target=shown(high))
        entry = (sol, model, keep, achieved, rounds[-1])
        if cheapest is None or achieved < cheapest[3]:
            cheapest = entry
        rank = (low <= achieved <= high, sol.value, achieved)
        improved = best is None or rank > best[0]
        if achieved <= high and improved:
            best = (rank, entry)
        if sol.widths == widths or (best is not None and best[0][0] and not improved):
            break  # the linearisation has settled, or re-linearising stopped paying off
        widths = sol.widths
    return (best[1] if best else None), cheapest, rounds


def group_width_choices(graph: GroupGraph, min_channels: int, round_to: int) -> dict[str, list[int]]:
    """The widths each prunable group may take (a grouped conv's group: multiples of its conv-group count; an
    attention layer's heads: any number of whole heads from one, since min_channels and round_to count channels
    and a head is already head_dim of them)."""
    return {
        g.name: width_choices(g.size, 1, 1)
        if g.unit == 'heads'
        else width_choices(g.size, min_channels, round_to, g.parts)
        for g in graph.prunable
    }


def check_prunable(graph: GroupGraph, arch: str) -> None:
    """Fail, naming why, unless some channel group can be pruned (any budget needs one)."""
    if not graph.prunable:
        raise UserError(
            f'{arch}: no prunable channel group was found '
            f'({", ".join(sorted({g.reason for g in graph.groups if g.reason})) or "no conv layers"})'
        )


def top_k(scores: torch.Tensor, k: int, blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The k best channels; with blocks, the k / len(blocks) best of each block."""
    if blocks:
        return torch.cat([b[top_k(scores[b], k // len(blocks))] for b in blocks]).sort().values
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


__all__ = ['knapsack_rounds', 'group_width_choices', 'check_prunable', 'top_k']
