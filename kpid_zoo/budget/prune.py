"""Stages 3-6 together: groups -> importance -> knapsack -> surgery, repeated until the measured cost meets the target.

Each round linearises the cost at the current widths, finds the knapsack budget whose solution the cost model puts
inside [target * (1 - tolerance), target], cuts the network and measures it: FLOPs are recounted with fvcore, a
latency budget (`recipe.BudgetSpec`) is timed on this machine against a lookup table (`kpid_zoo.budget.latency`).
What the measurement finds beyond the cost model corrects the next round's aim; re-linearising at the new widths
prices the coupled cost better; rounds go on while they raise the kept importance.

The loop is `_rounds.knapsack_rounds`; `flops_loop` drives it to a FLOPs target, `latency_loop` to a latency budget.
This module picks one from a recipe (`prune_from_recipe`) and holds the prune step's public names.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.recipe import Recipe
from ..engine.flops import count_flops
from ..engine.groups import discover_groups
from ..engine.importance import magnitude_importance, taylor_importance
from ..errors import UserError
from ._result import LatencyOutcome, PruneReport, PruneResult
from .flops_loop import check_target, knapsack_prune
from .latency_loop import check_latency_budget, latency_knapsack_prune


def prune_from_recipe(
    recipe: Recipe, parent: nn.Module, train_loader=None, device: str | torch.device = 'cpu', progress: bool = True
) -> PruneResult:
    """Groups -> importance -> knapsack -> surgery with the settings of a recipe (`recipe.Recipe`).

    Taylor importance reads `importance.batches` batches of `importance.batch_size` images from the training
    set behind `train_loader`; magnitude needs no data.
    """
    arch, input_size = recipe.parent.model, tuple(recipe.input_size)
    settings = recipe.importance
    graph = discover_groups(parent, input_size)
    if not settings.allow_inexact:
        graph = graph.exact_only()
    if settings.method == 'taylor':
        if train_loader is None:
            raise UserError(f"{recipe.source}: importance.method 'taylor' needs training data")
        if hasattr(train_loader.dataset, 'set_epoch'):
            # the training stages before this one leave the shared dataset at their last epoch: a build resumed
            # after them would see other augmentations, hence other scores and other kept channels
            train_loader.dataset.set_epoch(0)
        if isinstance(train_loader.dataset, torch.utils.data.IterableDataset):  # a stream orders itself
            batches = torch.utils.data.DataLoader(
                train_loader.dataset, batch_size=settings.batch_size, num_workers=train_loader.num_workers
            )
        else:
            batches = torch.utils.data.DataLoader(
                train_loader.dataset,
                batch_size=settings.batch_size,
                shuffle=True,
                num_workers=train_loader.num_workers,
                generator=torch.Generator().manual_seed(recipe.finetune.seed),
            )
        importance = taylor_importance(parent, graph, batches, settings.batches, device=device, progress=progress)
        parent.cpu()
    else:
        importance = magnitude_importance(parent, graph)
    if recipe.budget is not None:
        return latency_knapsack_prune(
            parent,
            graph,
            importance,
            recipe.budget,
            arch=arch,
            input_size=input_size,
            min_channels=settings.min_channels,
            round_to=settings.round_to,
            progress=progress,
        )
    target = recipe.flops.resolve_target(count_flops(parent, input_size).gmacs)
    return knapsack_prune(
        parent,
        graph,
        importance,
        target,
        arch=arch,
        input_size=input_size,
        min_channels=settings.min_channels,
        round_to=settings.round_to,
        tolerance=recipe.flops.tolerance,
        progress=progress,
    )


__all__ = [
    'LatencyOutcome',
    'PruneReport',
    'PruneResult',
    'check_latency_budget',
    'check_target',
    'knapsack_prune',
    'latency_knapsack_prune',
    'prune_from_recipe',
]
