"""What the prune step returns (`PruneResult`) and reports (`PruneReport`, with a latency budget's
`LatencyOutcome`), assembled the same way after either loop (`flops_loop`, `latency_loop`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..engine.flops import FlopsReport, count_params
from ..engine.groups import ROLE_OUT, GroupGraph
from ..engine.knapsack import KnapsackSolution
from ..engine.surgery import ArchSpec


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
    runtime: str = 'torch'  # what ran every timed network, with its version ('onnxruntime 1.32.0', 'torch 2.9.1')
    runtime_settings: dict = field(default_factory=dict)  # the runtime's settings it was timed under (Runtime.settings)


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


def prune_result(
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


def layer_widths(parent: nn.Module, pruned: nn.Module, graph: GroupGraph) -> list[tuple[str, int, int]]:
    """(module, parent width, pruned width) for every conv / linear output, in the model's module order."""
    rows = {}
    for member in graph.layouts:
        if member.role == ROLE_OUT:
            (handler, before), (_, after) = graph.resolve(parent, member), graph.resolve(pruned, member)
            rows[member.module] = (member.module, handler.width(before, ROLE_OUT), handler.width(after, ROLE_OUT))
    return [rows[name] for name, _ in parent.named_modules() if name in rows]


__all__ = ['LatencyOutcome', 'PruneReport', 'PruneResult', 'prune_result', 'layer_widths']
