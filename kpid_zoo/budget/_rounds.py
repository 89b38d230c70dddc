"""The loop both budgets drive (`flops_loop`, `latency_loop`): solve the knapsack, cut the network, measure it,
and correct the next round's aim by what the measurement found beyond the cost model; and the width choices
and the prunability check both budgets start from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

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
    trusted, the last is kept. Once `relative` rounds have measured on both sides of [low, high], the next aim is
    interpolated between the nearest two (`bracketed_aim`): where the model's error differs between narrow and wide
    nets, one factor swings from one side to the other (measured: an eager-PyTorch table at batch 32 put nets at
    half and at the whole of what they ran, and six rounds alternated 27, 116, 20, 140, 28, 116 ms around 58).

    Returns the best round under `high` (None if none was), the cheapest round measured, and every round's record.
    """
    offset = 0.0
    blocks = {g.name: g.block_index() for g in graph.prunable if g.parts > 1}  # grouped convs: per-block top-k
    widths = dict(cost.sizes)
    best: tuple[tuple, _Best] | None = None
    cheapest: _Best | None = None
    rounds = []
    points: list[tuple[float, float]] = []  # (model cost, measured) of each round
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
            points.append((predicted, achieved))
            aim = bracketed_aim(points, low, high)
            if aim is not None:
                scale = (low + high) / 2 / aim
            elif abs(achieved / predicted - scale) > noise * scale:
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


def bracketed_aim(points: list[tuple[float, float]], low: float, high: float) -> float | None:
    """The model cost at which the measured cost should reach the middle of [low, high], interpolated linearly
    between the round measured nearest under `low` and the one nearest over `high` (each by model cost); None until
    rounds lie on both sides, or when those two disagree with the model's order (noise larger than the step)."""
    under = [p for p in points if p[1] < low]
    over = [p for p in points if p[1] > high]
    if not under or not over:
        return None
    (p0, m0), (p1, m1) = max(under), min(over)
    if not p0 < p1:
        return None
    return p0 + ((low + high) / 2 - m0) * (p1 - p0) / (m1 - m0)


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


SHOWN_REASONS = 3  # distinct reasons a refusal quotes; `kpid-zoo groups MODEL` lists every one


def check_prunable(graph: GroupGraph, arch: str) -> None:
    """Fail in one line, naming why, unless some channel group can be pruned (any budget needs one): the groups
    left whole only because they are inexact (`GroupGraph.exact_only`) name the field that prunes them."""
    if graph.prunable:
        return
    held = [g for g in graph.groups if g.inexact]  # prunable, but inexact and not opted in
    if held:
        raise UserError(
            f'{arch}: every prunable channel group is inexact ({_reasons((g.inexact for g in held), arch)}): set '
            f'importance.allow_inexact: true to prune {"it" if len(held) == 1 else f"these {len(held)} groups"}'
        )
    reasons = _reasons((g.reason for g in graph.groups), arch) or 'no conv layers'
    raise UserError(f'{arch}: no prunable channel group was found ({reasons})')


def _reasons(reasons: Iterable[str], arch: str) -> str:
    distinct = sorted({r for r in reasons if r})
    shown = ', '.join(distinct[:SHOWN_REASONS])
    more = len(distinct) - SHOWN_REASONS
    return f'{shown} and {more} more: kpid-zoo groups {arch} lists them' if more > 0 else shown


def top_k(scores: torch.Tensor, k: int, blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The k best channels; with blocks, the k / len(blocks) best of each block."""
    if blocks:
        return torch.cat([b[top_k(scores[b], k // len(blocks))] for b in blocks]).sort().values
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


__all__ = ['knapsack_rounds', 'bracketed_aim', 'group_width_choices', 'check_prunable', 'top_k']
