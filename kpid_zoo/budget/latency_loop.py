"""The prune step to a latency budget (`recipe.BudgetSpec`): the knapsack solves against the latency lookup table
(`latency`), each round's network is timed in alternation with a reference network (`timing.measure_paired`), and
the kept network is timed afresh, in a new process (`timing.measure_paired_afresh`), before it is accepted.
Everything is timed in the budget's runtime (`budget.runtime`): eager PyTorch, or each whole network exported and
compiled in ONNX Runtime or OpenVINO.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import timm
import torch
import torch.nn as nn

from ..core.recipe import BudgetSpec
from ..deploy.runtimes import get_runtime
from ..engine.flops import count_flops
from ..engine.groups import GroupGraph
from ..engine.importance import Importance
from ..engine.knapsack import CostModel, KnapsackSolution
from ..engine.surgery import prune_model
from ..errors import UserError
from ._result import LatencyOutcome, PruneResult, prune_result
from ._rounds import check_prunable, group_width_choices, knapsack_rounds
from .latency import LatencyCostModel, cache_path, calibrate, check_timeable, latency_table
from .timing import (
    LatencySetting,
    Paired,
    Timing,
    check_setting,
    device_name,
    measure_noise,
    measure_paired,
    measure_paired_afresh,
)

MAX_NOISY_TOLERANCE = 0.5  # however noisy the machine, the loop aims at no less than half the budget
MAX_CONFIRMATIONS = 3  # fresh looks at the kept net (each over the budget lowers the aim and reruns the loop)


def latency_setting(budget: BudgetSpec) -> LatencySetting:
    return LatencySetting(budget.device, budget.batch_size, budget.threads or os.cpu_count() or 1, budget.runtime)


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
    check_layers: bool = True,
) -> tuple[float, Timing, Timing, dict[str, list[int]]]:
    """Fail unless the device is present, the runtime installed and able to run the parent (in a deployment
    runtime, with `check_layers`, every layer the table times too), and the budget lies between what the smallest
    reachable network and the parent measure here (each timed in alternation with the `reference`, default
    `latency_reference`). Returns the budget (ms), the parent's and the smallest network's timings, and the width
    choices per group."""
    setting = latency_setting(budget)
    check_setting(setting)
    check_prunable(graph, arch)
    try:
        check_timeable(parent, graph, setting if check_layers else None, input_size)
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
    compare: Callable[..., Paired] | None = None,
    confirm: Callable[..., Paired] | None = None,
    cache_dir: Path | None = None,
    table_kwargs: dict | None = None,
    progress: bool = True,
) -> PruneResult:
    """Prune `parent` to a latency budget measured on this machine (`recipe.BudgetSpec`).

    The knapsack solves against the latency lookup table (measured, or read from the cache); each round's net is
    then timed in alternation with the parent (or the budget's `latency_of` network), and the aim is corrected by
    what the timing found beyond the table, until the measured median lies within the tolerance under the budget;
    the kept net is then timed afresh, by `confirm`. `compare(model, reference, input_size, setting)` times a pair
    (default `timing.measure_paired`); `confirm` takes the fresh look (default: `timing.measure_paired_afresh`, in
    a new process, where no `compare` is given; else `compare` itself, a test's simulated device, say);
    `table_kwargs` go to `latency.build_table` (grid fractions, warm-up, repeats).
    """
    if confirm is None:
        confirm = measure_paired_afresh if compare is None else compare
    compare = compare or measure_paired
    setting = latency_setting(budget)
    check_setting(setting)
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
        check_layers=False,  # the table compiles every layer, a cached one was compiled when it was made
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

    def time_it(
        model: nn.Module, sol: KnapsackSolution, measure: Callable[..., Paired] = compare
    ) -> tuple[float, dict]:
        paired = measure(model, reference, input_size, setting)
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
    # afresh, in a new process as a user's would be; over the budget, the loop aims lower by that excess and runs
    # again.
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
        confirmed_ms, confirmation = time_it(model, sol, confirm)
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
        device_name=device_name(setting.device, setting.runtime),
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
        runtime=get_runtime(setting.runtime).describe(),
        runtime_settings=get_runtime(setting.runtime).settings() if setting.device == 'cpu' else {},
    )
    # a latency budget sets no FLOPs target: the report's target is the FLOPs it reached
    return prune_result(
        parent, graph, arch, input_size, parent_flops, achieved, achieved, sol, model, keep, rounds, latency=outcome
    )


__all__ = ['latency_knapsack_prune', 'check_latency_budget', 'latency_setting', 'latency_reference']
