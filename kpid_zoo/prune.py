"""Stages 3-6 together: groups -> importance -> knapsack -> surgery, repeated until fvcore agrees with the target.

Each round linearises the FLOPs at the current widths, finds the knapsack budget whose solution the exact cost
model puts inside [target * (1 - tolerance), target], cuts the network and recounts it with fvcore. Re-linearising
at the new widths prices the coupled cost better; rounds go on while they raise the kept importance.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .flops import FlopsReport, count_flops, count_params
from .groups import ROLE_OUT, GroupGraph, discover_groups
from .importance import Importance, magnitude_importance, taylor_importance
from .knapsack import CostModel, KnapsackSolution, solve_for_flops, width_choices
from .recipe import Recipe
from .surgery import ArchSpec, prune_model


@dataclass
class PruneReport:
    parent: str
    input_size: tuple[int, int, int]
    parent_gmacs: float
    target_gmacs: float
    achieved_gmacs: float
    parent_params: int
    params: int
    value: float                 # summed importance kept
    lp_bound: float              # LP upper bound on that value
    gap: float                   # (lp_bound - value) / lp_bound
    rounds: list[dict] = field(default_factory=list)               # aim / predicted / achieved per round
    layer_widths: list[tuple[str, int, int]] = field(default_factory=list)  # (module, parent out, pruned out)

    @property
    def flops_error(self) -> float:
        """(achieved - target) / target: negative means under budget."""
        return (self.achieved_gmacs - self.target_gmacs) / self.target_gmacs

    def to_dict(self) -> dict:
        d = asdict(self)
        d["flops_error"] = self.flops_error
        return d


@dataclass
class PruneResult:
    model: nn.Module
    spec: ArchSpec
    keep: dict[str, torch.Tensor]     # group name -> parent channel indices kept (sorted)
    graph: GroupGraph
    report: PruneReport

    def kept_channels(self, module: str) -> torch.Tensor | None:
        """Indices of the parent's channels kept in `module`'s output; None when its channels are all kept."""
        group = self.graph.module_out_group.get(module)
        return self.keep.get(group) if group is not None else None


def knapsack_prune(parent: nn.Module, graph: GroupGraph, importance: Importance, target_gmacs: float, *,
                   arch: str, input_size: tuple[int, int, int] = (3, 224, 224), min_channels: int = 8,
                   round_to: int = 8, tolerance: float = 0.01, max_rounds: int = 6,
                   progress: bool = True) -> PruneResult:
    """Prune `parent` to at most `target_gmacs`, keeping the most important channels (KPID)."""
    parent_flops, cost, choices = check_target(parent, graph, target_gmacs, arch=arch, input_size=input_size,
                                               min_channels=min_channels, round_to=round_to)
    target = target_gmacs * 1e9
    low = target * (1 - tolerance)
    blocks = {g.name: g.block_index() for g in graph.prunable if g.parts > 1}
    residual = 0.0  # what fvcore counts beyond the cost model (nothing, for the supported families)
    widths = dict(cost.sizes)
    best: tuple[tuple, KnapsackSolution, nn.Module, dict, int] | None = None
    rounds = []
    bar = tqdm(range(max_rounds), desc="knapsack", disable=not progress, leave=False)
    for _ in bar:
        sol = solve_for_flops(importance, cost, widths, choices, low - residual, target - residual, blocks=blocks)
        keep = {g: _top_k(importance[g], k, blocks.get(g)) for g, k in sol.widths.items() if k < cost.sizes[g]}
        model = prune_model(parent, graph, keep)
        achieved = count_flops(model, input_size).total
        residual = achieved - cost.flops(sol.widths)
        rounds.append({"predicted_gmacs": cost.flops(sol.widths) / 1e9, "achieved_gmacs": achieved / 1e9,
                       "value": sol.value})
        bar.set_postfix(achieved=f"{achieved / 1e9:.4f}", target=f"{target_gmacs:.4f}")
        rank = (low <= achieved <= target, sol.value, achieved)
        improved = best is None or rank > best[0]
        if achieved <= target and improved:
            best = (rank, sol, model, keep, achieved)
        if sol.widths == widths or (best is not None and best[0][0] and not improved):
            break  # the linearisation has settled, or re-linearising stopped paying off
        widths = sol.widths
    if best is None:
        raise ValueError(f"{arch}: no width assignment under {target_gmacs:.4g} GMACs was found in "
                         f"{max_rounds} rounds (last: {rounds[-1]['achieved_gmacs']:.4g}); try round_to: 1")
    _, sol, model, keep, achieved = best
    spec = ArchSpec(arch, {g: len(idx) for g, idx in keep.items()}, tuple(input_size))
    report = PruneReport(
        parent=arch, input_size=tuple(input_size), parent_gmacs=parent_flops.gmacs, target_gmacs=target_gmacs,
        achieved_gmacs=achieved / 1e9, parent_params=count_params(parent), params=count_params(model),
        value=sol.value, lp_bound=sol.lp_bound, gap=sol.gap, rounds=rounds,
        layer_widths=layer_widths(parent, model, graph))
    return PruneResult(model, spec, keep, graph, report)


def check_target(parent: nn.Module, graph: GroupGraph, target_gmacs: float, *, arch: str,
                 input_size: tuple[int, int, int], min_channels: int = 8, round_to: int = 8
                 ) -> tuple[FlopsReport, CostModel, dict[str, list[int]]]:
    """Fail unless `target_gmacs` lies between the smallest reachable FLOPs and the parent's (no training needed).

    Returns the parent's FLOPs, the cost model and the width choices per group, which the knapsack goes on with.
    """
    if not graph.prunable:
        raise ValueError(f"{arch}: no prunable channel group was found "
                         f"({', '.join(sorted({g.reason for g in graph.groups if g.reason})) or 'no conv layers'})")
    parent_flops = count_flops(parent, input_size)
    target = target_gmacs * 1e9
    if target >= parent_flops.total:
        raise ValueError(f"{arch}: FLOPs target {target_gmacs:.4g} GMACs is not below the parent's "
                         f"{parent_flops.gmacs:.4g} GMACs at {input_size}")
    cost = CostModel.from_flops(parent, graph, parent_flops)
    choices = {g.name: width_choices(g.size, min_channels, round_to, g.parts) for g in graph.prunable}
    floor = cost.flops({g: ch[0] for g, ch in choices.items()})
    if target < floor:
        raise ValueError(f"{arch}: FLOPs target {target_gmacs:.4g} GMACs is below the smallest reachable "
                         f"{floor / 1e9:.4g} GMACs (every group at {min_channels} channels)")
    return parent_flops, cost, choices


def layer_widths(parent: nn.Module, pruned: nn.Module, graph: GroupGraph) -> list[tuple[str, int, int]]:
    """(module, parent width, pruned width) for every conv / linear output, in the model's module order."""
    rows = {}
    for member in graph.layouts:
        if member.role == ROLE_OUT:
            (handler, before), (_, after) = graph.resolve(parent, member), graph.resolve(pruned, member)
            rows[member.module] = (member.module, handler.width(before, ROLE_OUT), handler.width(after, ROLE_OUT))
    return [rows[name] for name, _ in parent.named_modules() if name in rows]


def _top_k(scores: torch.Tensor, k: int, blocks: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The k best channels; with blocks, the k / len(blocks) best of each block."""
    if blocks:
        return torch.cat([b[_top_k(scores[b], k // len(blocks))] for b in blocks]).sort().values
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def prune_from_recipe(recipe: Recipe, parent: nn.Module, train_loader=None, device: str | torch.device = "cpu",
                      progress: bool = True) -> PruneResult:
    """Groups -> importance -> knapsack -> surgery with the settings of a recipe (`recipe.Recipe`).

    Taylor importance reads `importance.batches` batches of `importance.batch_size` images from the training
    set behind `train_loader`; magnitude needs no data.
    """
    arch, input_size = recipe.parent.model, tuple(recipe.input_size)
    settings = recipe.importance
    graph = discover_groups(parent, input_size)
    if not settings.allow_inexact:
        graph = graph.exact_only()
    if settings.method == "taylor":
        if train_loader is None:
            raise ValueError(f"{recipe.source}: importance.method 'taylor' needs training data")
        if hasattr(train_loader.dataset, "set_epoch"):
            # the training stages before this one leave the shared dataset at their last epoch: a build resumed
            # after them would see other augmentations, hence other scores and other kept channels
            train_loader.dataset.set_epoch(0)
        if isinstance(train_loader.dataset, torch.utils.data.IterableDataset):  # a stream orders itself
            batches = torch.utils.data.DataLoader(train_loader.dataset, batch_size=settings.batch_size,
                                                  num_workers=train_loader.num_workers)
        else:
            batches = torch.utils.data.DataLoader(train_loader.dataset, batch_size=settings.batch_size, shuffle=True,
                                                  num_workers=train_loader.num_workers,
                                                  generator=torch.Generator().manual_seed(recipe.finetune.seed))
        importance = taylor_importance(parent, graph, batches, settings.batches, device=device, progress=progress)
        parent.cpu()
    else:
        importance = magnitude_importance(parent, graph)
    target = recipe.flops.resolve_target(count_flops(parent, input_size).gmacs)
    return knapsack_prune(parent, graph, importance, target, arch=arch, input_size=input_size,
                          min_channels=settings.min_channels, round_to=settings.round_to,
                          tolerance=recipe.flops.tolerance, progress=progress)
