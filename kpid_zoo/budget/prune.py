"""Stages 3-6 together: groups -> importance -> knapsack -> surgery, repeated until the measured cost meets the target.

Each round linearises the cost at the current widths, finds the knapsack budget whose solution the cost model puts
inside [target * (1 - tolerance), target], cuts the network and measures it: FLOPs are recounted with fvcore, a
latency budget (`recipe.BudgetSpec`) is timed on this machine against a lookup table (`kpid_zoo.budget.latency`).
What the measurement finds beyond the cost model corrects the next round's aim; re-linearising at the new widths
prices the coupled cost better; rounds go on while they raise the kept importance.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.recipe import BudgetSpec, Recipe
from ..engine.flops import FlopsReport, count_flops, count_params
from ..engine.groups import ROLE_OUT, GroupGraph, discover_groups
from ..engine.importance import Importance, magnitude_importance, taylor_importance
from ..engine.knapsack import Cost, CostModel, KnapsackSolution, solve_for_budget, width_choices
from ..engine.surgery import ArchSpec, prune_model
from ..errors import UserError
from .latency import (
    LatencyCostModel,
    LatencySetting,
    Paired,
    Timing,
    cache_path,
    calibrate,
    check_device,
    check_timeable,
    device_name,
    latency_table,
    measure_noise,
    measure_paired,
)


@dataclass
class LatencyOutcome:
    """What a latency budget led to. Times are medians (ms) with quartiles, on `device` (batch, threads); every net
    was timed in alternation with the `reference` network (the parent, or the budget's `latency_of`), its ms = that
    ratio x the reference's ms at the start."""

    device: str
    device_name: str
    batch_size: int
    threads: int
    budget_ms: float
    parent_ms: float
    smallest_ms: float  # every group at its narrowest width: the fastest the knapsack can reach
    predicted_ms: float  # the table's prediction for the chosen widths, scaled by the measurements before
    measured_ms: float  # a fresh measurement of the kept net, after the loop chose it
    measured_q1_ms: float
    measured_q3_ms: float
    noise: float  # spread of the reference's A/A ratios (paired with itself)
    tolerance: float  # as applied: the recipe's, or twice the noise where that is larger
    within_budget: bool  # measured_ms <= budget_ms
    round_ms: float = 0.0  # what the kept net measured in the round that chose it (biased low: it was chosen)
    table: str = ''  # the lookup table's cache file
    note: str = ''
    reference: str = 'parent'  # what every candidate was timed beside


@dataclass
class PruneReport:
    parent: str
    input_size: tuple[int, int, int]
    parent_gmacs: float
    target_gmacs: float
    achieved_gmacs: float
    parent_params: int
    params: int
    value: float  # summed importance kept
    lp_bound: float  # LP upper bound on that value
    gap: float  # (lp_bound - value) / lp_bound
    rounds: list[dict] = field(default_factory=list)  # aim / predicted / achieved per round
    layer_widths: list[tuple[str, int, int]] = field(default_factory=list)  # (module, parent out, pruned out)
    latency: LatencyOutcome | None = None  # a latency budget's outcome (None: the budget was FLOPs)

    @property
    def flops_error(self) -> float:
        """(achieved - target) / target: negative means under budget."""
        return (self.achieved_gmacs - self.target_gmacs) / self.target_gmacs

    def to_dict(self) -> dict:
        d = asdict(self)
        d['flops_error'] = self.flops_error
        return d


@dataclass
class PruneResult:
    model: nn.Module
    spec: ArchSpec
    keep: dict[str, torch.Tensor]  # group name -> parent channel indices kept (sorted)
    graph: GroupGraph
    report: PruneReport

    def kept_channels(self, module: str) -> torch.Tensor | None:
        """Indices of the parent's channels kept in `module`'s output; None when its channels are all kept."""
        group = self.graph.module_out_group.get(module)
        return self.keep.get(group) if group is not None else None


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
    return _result(
        parent, graph, arch, input_size, parent_flops, target_gmacs, achieved / 1e9, sol, model, keep, rounds
    )


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
        keep = {g: _top_k(importance[g], k, blocks.get(g)) for g, k in sol.widths.items() if k < cost.sizes[g]}
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


def _result(
    parent: nn.Module,
    graph: GroupGraph,
    arch: str,
    input_size: tuple[int, int, int],
    parent_flops: FlopsReport,
    target_gmacs: float,
    achieved_gmacs: float,
    sol: KnapsackSolution,
    model: nn.Module,
    keep: dict,
    rounds: list[dict],
    latency: LatencyOutcome | None = None,
) -> PruneResult:
    spec = ArchSpec(arch, {g: len(idx) for g, idx in keep.items()}, tuple(input_size))
    report = PruneReport(
        parent=arch,
        input_size=tuple(input_size),
        parent_gmacs=parent_flops.gmacs,
        target_gmacs=target_gmacs,
        achieved_gmacs=achieved_gmacs,
        parent_params=count_params(parent),
        params=count_params(model),
        value=sol.value,
        lp_bound=sol.lp_bound,
        gap=sol.gap,
        rounds=rounds,
        layer_widths=layer_widths(parent, model, graph),
        latency=latency,
    )
    return PruneResult(model, spec, keep, graph, report)


def group_width_choices(graph: GroupGraph, min_channels: int, round_to: int) -> dict[str, list[int]]:
    """The widths each prunable group may take (a grouped conv's group: multiples of its conv-group count)."""
    return {g.name: width_choices(g.size, min_channels, round_to, g.parts) for g in graph.prunable}


def check_prunable(graph: GroupGraph, arch: str) -> None:
    """Fail, naming why, unless some channel group can be pruned (any budget needs one)."""
    if not graph.prunable:
        raise UserError(
            f'{arch}: no prunable channel group was found '
            f'({", ".join(sorted({g.reason for g in graph.groups if g.reason})) or "no conv layers"})'
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


MAX_NOISY_TOLERANCE = 0.5  # however noisy the machine, the loop aims at no less than half the budget
MAX_CONFIRMATIONS = 3  # fresh looks at the kept net (each over the budget lowers the aim and reruns the loop)


def latency_setting(budget: BudgetSpec) -> LatencySetting:
    return LatencySetting(budget.device, budget.batch_size, budget.threads or os.cpu_count() or 1)


def latency_reference(parent: nn.Module, budget: BudgetSpec) -> nn.Module:
    """The network every candidate is timed beside: the parent, or the budget's `latency_of` (random weights,
    the parent's class count: latency does not depend on the weights, and the head is the parent's)."""
    if budget.latency_of is None:
        return parent
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(budget.latency_of, num_classes=getattr(parent, 'num_classes', 1000)).eval()


def check_latency_budget(
    parent: nn.Module,
    graph: GroupGraph,
    budget: BudgetSpec,
    *,
    arch: str,
    input_size: tuple[int, int, int],
    min_channels: int = 8,
    round_to: int = 8,
    compare: Callable[..., Paired] = measure_paired,
    reference: nn.Module | None = None,
    reference_timing: Timing | None = None,
) -> tuple[float, Timing, Timing, dict[str, list[int]]]:
    """Fail unless the device is present and the budget lies between what the smallest reachable network and the
    parent measure here (each timed in alternation with the `reference`, default `latency_reference`). Returns
    the budget (ms), the parent's and the smallest network's timings, and the width choices per group."""
    setting = latency_setting(budget)
    check_device(setting.device)
    check_prunable(graph, arch)
    try:
        check_timeable(parent, graph)
    except ValueError as e:
        raise UserError(f'{arch}: {e}') from None
    where = f'on {setting.describe()} at {"x".join(map(str, input_size))}'
    reference = reference if reference is not None else latency_reference(parent, budget)
    reference_timing = reference_timing or compare(reference, reference, input_size, setting).reference

    def beside_reference(net: nn.Module) -> Timing:
        if net is reference:
            return reference_timing
        return compare(net, reference, input_size, setting).ratio.scaled(reference_timing.median_ms)

    parent_timing = beside_reference(parent)
    try:
        target = budget.resolve_target(parent_timing.median_ms, reference_timing.median_ms)
    except ValueError as e:
        raise UserError(f'{arch}: {e} {where}') from None
    choices = group_width_choices(graph, min_channels, round_to)
    smallest = prune_model(parent, graph, {g.name: g.leading(choices[g.name][0]) for g in graph.prunable})
    smallest_timing = beside_reference(smallest)
    if target < smallest_timing.median_ms:
        raise UserError(
            f'{arch}: budget.{budget.stated}: {target:.4g} ms is below the '
            f'{smallest_timing.median_ms:.4g} ms that the smallest reachable network (every group at '
            f'{min_channels} channels) measures {where}'
        )
    return target, parent_timing, smallest_timing, choices


def latency_knapsack_prune(
    parent: nn.Module,
    graph: GroupGraph,
    importance: Importance,
    budget: BudgetSpec,
    *,
    arch: str,
    input_size: tuple[int, int, int] = (3, 224, 224),
    min_channels: int = 8,
    round_to: int = 8,
    max_rounds: int = 6,
    table: LatencyCostModel | None = None,
    compare: Callable[..., Paired] = measure_paired,
    cache_dir: Path | None = None,
    table_kwargs: dict | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune `parent` to a latency budget measured on this machine (`recipe.BudgetSpec`).

    The knapsack solves against the latency lookup table (measured, or read from the cache); each round's net is
    then timed in alternation with the parent (or the budget's `latency_of` network), and the aim is corrected by
    what the timing found beyond the table, until the measured median lies within the tolerance under the budget;
    the kept net is then timed afresh. `compare(model, reference, input_size, setting)` times a pair
    (`latency.measure_paired`); `table_kwargs` go to `latency.build_table` (grid fractions, warm-up, repeats).
    """
    setting = latency_setting(budget)
    check_device(setting.device)
    reference = latency_reference(parent, budget)
    reference_timing, noise = measure_noise(reference, input_size, setting, compare=compare)
    target, parent_timing, smallest_timing, choices = check_latency_budget(
        parent,
        graph,
        budget,
        arch=arch,
        input_size=input_size,
        min_channels=min_channels,
        round_to=round_to,
        compare=compare,
        reference=reference,
        reference_timing=reference_timing,
    )
    if table is None:
        table = latency_table(
            parent, graph, arch, input_size, setting, cache_dir=cache_dir, progress=progress, **(table_kwargs or {})
        )
    # the table (perhaps cached, perhaps timed under another load) is re-fitted to both ends of the reachable range
    # as they measure now: the parent and the smallest network, which the budget was just checked against
    fitted = dataclasses.replace(table, full_ms=parent_timing.median_ms, narrow_ms=smallest_timing.median_ms)
    calibrate(fitted, {g: ch[0] for g, ch in choices.items()})
    parent_flops = count_flops(parent, input_size)
    flops = CostModel.from_flops(parent, graph, parent_flops)
    tolerance = max(budget.tolerance, min(2 * noise.relative, MAX_NOISY_TOLERANCE))
    note = (
        ''
        if tolerance == budget.tolerance
        else (
            f'tolerance {budget.tolerance:.3g} is below twice the measured noise ({noise.relative:.3g}): '
            f'the loop aimed at [budget * (1 - {tolerance:.3g}), budget]'
        )
    )

    def time_it(model: nn.Module, sol: KnapsackSolution) -> tuple[float, dict]:
        paired = compare(model, reference, input_size, setting)
        t = paired.ratio.scaled(reference_timing.median_ms)
        return t.median_ms, {
            'table_ms': fitted.at(sol.widths),
            'measured_ms': t.median_ms,
            'measured_q1_ms': t.q1_ms,
            'measured_q3_ms': t.q3_ms,
            'ratio_to_reference': paired.ratio.median_ms,
            'reference_ms_now': paired.reference.median_ms,
            'gmacs': flops.flops(sol.widths) / 1e9,
        }

    # The loop keeps a round because it measured under the budget, so with noisy timings it favours nets that
    # happened to measure low (measured: 5-15% at batch 32 on 2 busy threads). The kept net is timed once more,
    # afresh; over the budget, the loop aims lower by that excess and runs again.
    rounds: list[dict] = []
    aim, scale, notes = target, 1.0, []
    for _ in range(MAX_CONFIRMATIONS):
        best, cheapest, found = knapsack_rounds(
            parent,
            graph,
            importance,
            fitted,
            choices,
            aim * (1 - tolerance),
            aim,
            time_it,
            max_rounds=max_rounds,
            relative=True,
            noise=noise.relative,
            scale=scale,
            progress=progress,
            shown=lambda v: f'{v:.3g} ms',
        )
        for r in found:  # what the loop expected of each round: the table, corrected by the measurements before it
            r.update(predicted_ms=r['table_ms'] * r['scale'], aim_ms=aim)
        rounds += found
        sol, model, keep, _, chosen = best if best is not None else cheapest
        confirmed_ms, confirmation = time_it(model, sol)
        if best is None or confirmed_ms <= target:
            break
        notes.append(
            f'the kept net measured {chosen["measured_ms"]:.3g} ms in its round and {confirmed_ms:.3g} ms '
            f'on a fresh look, over the budget: aimed {100 * (1 - target / confirmed_ms):.1f}% lower'
        )
        aim *= target / confirmed_ms
        scale = chosen['scale']
    within = best is not None and confirmed_ms <= target
    if best is None:
        notes.append(
            f'stopped after {len(rounds)} rounds with no net measured under the budget; kept the fastest measured'
        )
    elif not within:
        notes.append(f'still over the budget after {MAX_CONFIRMATIONS} fresh looks')
    note = '; '.join(notes + ([note] if note else []))
    achieved = count_flops(model, input_size).gmacs
    outcome = LatencyOutcome(
        device=setting.device,
        device_name=device_name(setting.device),
        batch_size=setting.batch_size,
        threads=setting.threads,
        budget_ms=target,
        parent_ms=parent_timing.median_ms,
        smallest_ms=smallest_timing.median_ms,
        predicted_ms=chosen['predicted_ms'],
        measured_ms=confirmed_ms,
        measured_q1_ms=confirmation['measured_q1_ms'],
        measured_q3_ms=confirmation['measured_q3_ms'],
        round_ms=chosen['measured_ms'],
        noise=noise.relative,
        tolerance=tolerance,
        within_budget=within,
        table=str(cache_path(table.key, cache_dir)) if table.key else '',
        note=note,
        reference=budget.latency_of or 'parent',
    )
    # a latency budget sets no FLOPs target: the report's target is the FLOPs it reached
    return _result(
        parent, graph, arch, input_size, parent_flops, achieved, achieved, sol, model, keep, rounds, latency=outcome
    )


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
