"""The prune step to a FLOPs target: each round's network is recounted with fvcore, and what the count finds beyond
the cost model (ops it does not price) corrects the next round's aim (`_rounds.knapsack_rounds`).
"""

from __future__ import annotations

import torch.nn as nn

from ..engine.flops import FlopsReport, count_flops
from ..engine.groups import GroupGraph
from ..engine.importance import Importance
from ..engine.knapsack import CostModel, KnapsackSolution
from ..errors import UserError
from ._result import PruneResult, prune_result
from ._rounds import check_prunable, group_width_choices, knapsack_rounds


def knapsack_prune(
    parent: nn.Module,
    graph: GroupGraph,
    importance: Importance,
    target_gmacs: float,
    *,
    arch: str,
    input_size: tuple[int, int, int] = (3, 224, 224),
    min_channels: int = 8,
    round_to: int = 8,
    tolerance: float = 0.01,
    max_rounds: int = 6,
    progress: bool = True,
) -> PruneResult:
    """Prune `parent` to at most `target_gmacs`, keeping the most important channels (KPID)."""
    parent_flops, cost, choices = check_target(
        parent, graph, target_gmacs, arch=arch, input_size=input_size, min_channels=min_channels, round_to=round_to
    )
    target = target_gmacs * 1e9

    def recount(model: nn.Module, sol: KnapsackSolution) -> tuple[float, dict]:
        achieved = count_flops(model, input_size).total
        return achieved, {'predicted_gmacs': cost.flops(sol.widths) / 1e9, 'achieved_gmacs': achieved / 1e9}

    best, _, rounds = knapsack_rounds(
        parent,
        graph,
        importance,
        cost,
        choices,
        target * (1 - tolerance),
        target,
        recount,
        max_rounds=max_rounds,
        progress=progress,
        shown=lambda v: f'{v / 1e9:.4f}',
    )
    if best is None:
        raise UserError(
            f'{arch}: no width assignment under {target_gmacs:.4g} GMACs was found in '
            f'{max_rounds} rounds (last: {rounds[-1]["achieved_gmacs"]:.4g}); try round_to: 1'
        )
    sol, model, keep, achieved, _ = best
    return prune_result(
        parent, graph, arch, input_size, parent_flops, target_gmacs, achieved / 1e9, sol, model, keep, rounds
    )


def check_target(
    parent: nn.Module,
    graph: GroupGraph,
    target_gmacs: float,
    *,
    arch: str,
    input_size: tuple[int, int, int],
    min_channels: int = 8,
    round_to: int = 8,
) -> tuple[FlopsReport, CostModel, dict[str, list[int]]]:
    """Fail unless `target_gmacs` lies between the smallest reachable FLOPs and the parent's (no training needed).

    Returns the parent's FLOPs, the cost model and the width choices per group, which the knapsack goes on with.
    """
    check_prunable(graph, arch)
    parent_flops = count_flops(parent, input_size)
    target = target_gmacs * 1e9
    if target >= parent_flops.total:
        raise UserError(
            f"{arch}: FLOPs target {target_gmacs:.4g} GMACs is not below the parent's "
            f'{parent_flops.gmacs:.4g} GMACs at {input_size}'
        )
    cost = CostModel.from_flops(parent, graph, parent_flops)
    choices = group_width_choices(graph, min_channels, round_to)
    floor = cost.flops({g: ch[0] for g, ch in choices.items()})
    if target < floor:
        raise UserError(
            f'{arch}: FLOPs target {target_gmacs:.4g} GMACs is below the smallest reachable '
            f'{floor / 1e9:.4g} GMACs (every group at {min_channels} channels)'
        )
    return parent_flops, cost, choices


__all__ = ['knapsack_prune', 'check_target']
