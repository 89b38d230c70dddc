"""Stage 5: choose how many channels each group keeps, maximising summed importance under a FLOPs budget.

The FLOPs of a network are a polynomial in its group widths: a dense conv costs (in/IN) * (out/OUT) times its
full-width count, a BN or depthwise conv (w/W) times it. `CostModel` holds those terms, built from fvcore's
per-module counts of the parent, so it counts what fvcore counts. Removing a channel also shrinks the next layer's
input (the coupled cost), so the knapsack is solved on the cost linearised at the current widths; the pruning
loop (prune.py) re-linearises, rebuilds and recounts with fvcore until the target is met.

Within a group the best k channels are the k most important ones, so the problem is a multiple-choice knapsack
over one width per group. It is solved exactly by dynamic programming on a discretised budget (costs rounded up,
so the answer is always feasible); the LP relaxation gives the upper bound against which the gap is reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from ..errors import UserError
from .flops import FlopsReport
from .groups import GroupGraph

# One dimension of a layer as a function of the group widths: const + sum of weight * width over its groups,
# scaled so that the parent's widths give 1 (a concatenation holds several groups side by side).
Factor = tuple[float, tuple[tuple[str, float], ...]]


@dataclass
class CostModel:
    """FLOPs as a function of group widths: fixed + sum of coef * prod(factor) over each term's factors, one factor
    per dimension of a layer that holds prunable channels (a dense conv's input and output, a BN's features)."""

    terms: list[tuple[float, tuple[Factor, ...]]]
    fixed: float
    sizes: dict[str, int]

    @classmethod
    def from_flops(cls, model: nn.Module, graph: GroupGraph, flops: FlopsReport) -> CostModel:
        own = _own_flops(model, flops.by_module)
        prunable = {g.name for g in graph.prunable}
        factors_of: dict[str, list[Factor]] = {}
        for member, channels in graph.layouts.items():
            factors_of.setdefault(member.module, []).append(_factor(graph, channels, prunable))
        terms, fixed = [], 0.0
        for module, count in own.items():
            if count == 0:
                continue
            factors = factors_of.get(module, [])
            if not factors and not _has_children(model, module):
                out = _output_channels(graph, module)  # channel-wise ops such as the global pool
                factors = [_factor(graph, out, prunable)] if out is not None else []
            factors = [f for f in factors if f[1]]
            if factors:
                terms.append((float(count), tuple(factors)))
            else:
                fixed += count
        return cls(terms, fixed, {g.name: g.size for g in graph.prunable})

    def flops(self, widths: dict[str, int]) -> float:
        return self.fixed + sum(c * math.prod(_value(f, widths) for f in fs) for c, fs in self.terms)

    at = flops  # what `solve_for_budget` asks of any cost model (`latency.LatencyCostModel` answers it in ms)

    @staticmethod
    def describe(value: float) -> str:
        return f'{value / 1e9:.4g} GMACs'

    def marginal(self, widths: dict[str, float]) -> dict[str, float]:
        """dFLOPs / d(width of g) at `widths`: the cost of one more channel of g with the others held."""
        grad = dict.fromkeys(self.sizes, 0.0)
        for c, fs in self.terms:
            values = [_value(f, widths) for f in fs]
            for i, (_, weights) in enumerate(fs):
                others = math.prod(v for j, v in enumerate(values) if j != i)
                for g, w in weights:
                    grad[g] += c * others * w
        return grad


def _value(factor: Factor, widths: dict[str, float]) -> float:
    const, weights = factor
    return const + sum(w * widths[g] for g, w in weights)


def _factor(graph: GroupGraph, channels, prunable: set[str]) -> Factor:
    """A dimension's share of its parent size, as const + sum of weight * width over the prunable groups in it."""
    n = len(channels)
    const, weights = 0.0, []
    for gi in np.unique(channels.group):
        at = int((channels.group == gi).sum())
        name = graph.groups[gi].name if gi >= 0 else None
        if name in prunable:
            weights.append((name, channels.multiplicity(int(gi)) / n))
        else:
            const += at / n
    return const, tuple(weights)


@dataclass
class KnapsackSolution:
    widths: dict[str, int]
    value: float  # summed importance of the kept channels
    cost: float  # linearised cost of the solution (same units as the budget)
    lp_bound: float  # value of the LP relaxation: no integer solution does better

    @property
    def gap(self) -> float:
        """Relative optimality gap against the LP bound (0 = provably optimal)."""
        return (self.lp_bound - self.value) / self.lp_bound if self.lp_bound > 0 else 0.0


def width_choices(size: int, min_channels: int, round_to: int, parts: int = 1) -> list[int]:
    """Widths a group may take: multiples of `round_to` from `min_channels` up, plus the full width.

    A group split in `parts` conv-groups takes multiples of `parts` instead (as many channels in each conv-group;
    the conv-group count already sets the granularity), from `min_channels` up, or one per conv-group."""
    if parts > 1:
        return [k for k in range(parts, size + 1, parts) if k >= min_channels] or [size]
    if size <= min_channels:
        return [size]
    start = min(size, round_to * math.ceil(min_channels / round_to))
    return sorted(set(range(start, size + 1, round_to)) | {size})


def value_curve(scores: torch.Tensor, blocks: list[torch.Tensor] | None = None) -> np.ndarray:
    """Importance kept at each width (index k: the best k channels); with blocks, the best k / len(blocks) of each
    block (defined at multiples of the block count, the widths such a group may take)."""
    if not blocks or len(blocks) == 1:
        return np.concatenate([[0.0], np.cumsum(np.sort(scores.double().numpy())[::-1])])
    per_block = sum(np.concatenate([[0.0], np.cumsum(np.sort(scores[b].double().numpy())[::-1])]) for b in blocks)
    return np.repeat(per_block, len(blocks))[: len(scores) + 1]


def solve_knapsack(
    importance: dict[str, torch.Tensor],
    unit_cost: dict[str, float],
    budget: float,
    choices: dict[str, list[int]],
    resolution: int = 20000,
    blocks: dict[str, list[torch.Tensor]] | None = None,
    floor: float = 0.0,
) -> KnapsackSolution:
    """Pick one width per group maximising sum(top-k importance) s.t. sum(unit_cost * width) <= budget (and
    >= `floor`, when one is given: the best of what costs at least that much, not the best overall).

    A group in `blocks` keeps the top width / len(blocks) channels of each of its blocks (grouped convs)."""
    names = list(choices)
    if budget <= 0:
        raise UserError(
            f'knapsack: the budget left for prunable channels is {budget:.4g} FLOPs; '
            f'the target is below what the unprunable layers alone cost'
        )
    blocks = blocks or {}
    cum = {g: value_curve(importance[g], blocks.get(g)) for g in names}
    # Channels with equal (often zero) importance leave many optima; among them prefer keeping channels, so the
    # budget is spent rather than left idle. The nudge is far below any real difference in importance.
    total = sum(float(c[-1]) for c in cum.values())
    channels = sum(len(c) - 1 for c in cum.values())
    nudge = 1e-9 * (total / channels if total > 0 else 1.0)
    ranked = {g: c + nudge * np.arange(len(c)) for g, c in cum.items()}
    unit = budget / resolution
    # dp[i]: the best value costing at most i units; with a floor, costing exactly i units (so the answer can be
    # taken among the costs at or above the floor)
    dp = np.zeros(resolution + 1) if floor <= 0 else np.r_[0.0, np.full(resolution, -np.inf)]
    picks = np.zeros((len(names), resolution + 1), dtype=np.int32)
    for gi, g in enumerate(names):
        best = np.full(resolution + 1, -np.inf)
        for ci, k in enumerate(choices[g]):
            c = math.ceil(unit_cost[g] * k / unit - 1e-9)
            if c > resolution:
                break
            cand = np.full(resolution + 1, -np.inf)
            cand[c:] = dp[: resolution + 1 - c] + ranked[g][k]
            better = cand > best
            best[better], picks[gi][better] = cand[better], ci
        dp = best
    b = resolution
    if floor > 0:
        first = min(resolution, math.ceil(floor / unit - 1e-9))
        b = first + int(np.argmax(dp[first:]))
        if not np.isfinite(dp[b]):
            raise ValueError(f'knapsack: no width assignment costs between {floor:.4g} and {budget:.4g}')
    if not np.isfinite(dp[b]):
        narrowest = sum(unit_cost[g] * choices[g][0] for g in names)
        raise UserError(
            f'knapsack: even the narrowest widths cost {narrowest:.4g} FLOPs, over the budget of '
            f'{budget:.4g}: the target is below the smallest reachable'
        )
    widths = {}
    for gi in reversed(range(len(names))):
        g = names[gi]
        k = choices[g][picks[gi][b]]
        widths[g] = k
        b -= math.ceil(unit_cost[g] * k / unit - 1e-9)
    value = float(sum(cum[g][widths[g]] for g in names))
    cost = sum(unit_cost[g] * widths[g] for g in names)
    return KnapsackSolution(widths, value, cost, _lp_bound(cum, unit_cost, budget, choices))


class Cost(Protocol):
    """A cost model the knapsack can solve against: FLOPs (`CostModel`) or latency (`latency.LatencyCostModel`)."""

    sizes: dict[str, int]

    def at(self, widths: dict[str, float]) -> float: ...

    def marginal(self, widths: dict[str, float]) -> dict[str, float]: ...

    def describe(self, value: float) -> str: ...


def solve_for_budget(
    importance: dict[str, torch.Tensor],
    cost: Cost,
    widths: dict[str, int],
    choices: dict[str, list[int]],
    low: float,
    high: float,
    steps: int = 40,
    blocks: dict[str, list[torch.Tensor]] | None = None,
    relinearise: int = 3,
) -> KnapsackSolution:
    """The knapsack on the cost linearised at `widths`, with the budget bisected until the exact cost of the
    solution lies in [low, high]; failing that, the feasible solution closest to `high`.

    A cost that is not linear in the widths can leave the bisection torn between a solution under `low` and one
    over `high`: a ViT's embedding width multiplies the cost of every block, so at 64 px one step of it is 4% of
    the network, and marginal costs taken at full width misprice the blocks' widths beside a narrow embedding.
    Linearised again at the cheapest solution over `high` (up to `relinearise` times), the marginal costs are the
    true ones near the target, and the bisection finds what lies between."""
    best, over = _bisect(importance, cost, widths, choices, low, high, steps, blocks)
    for _ in range(relinearise):
        if over is None or (best is not None and best[0] >= low):
            break
        again, over = _bisect(importance, cost, over[1].widths, choices, low, high, steps, blocks)
        if again is not None and (best is None or again[0] > best[0]):
            best = again
    if over is not None and (best is None or best[0] < low):
        # Still torn: the most important channels under `high` cost less than `low` (one step of a wide group is
        # more than the tolerance, and the knapsack's value prefers the step down). Ask for the best assignment
        # whose cost lies in [low, high] instead, on the cost linearised at the solution just over `high`.
        windowed = _window(importance, cost, over[1].widths, choices, low, high, blocks)
        if windowed is not None:
            best = windowed
    if best is None:
        raise UserError(
            f'knapsack: no width assignment costs at most {cost.describe(high)}; the target is '
            f'below the smallest reachable'
        )
    return best[1]


def _window(
    importance: dict[str, torch.Tensor],
    cost: Cost,
    widths: dict[str, int],
    choices: dict[str, list[int]],
    low: float,
    high: float,
    blocks: dict[str, list[torch.Tensor]] | None,
) -> tuple[float, KnapsackSolution] | None:
    """The best solution whose linearised cost lies in [low, high] shifted to the linearisation at `widths` (near
    there, cost(w) ~ cost(widths) + marginal . (w - widths)); kept only if its exact cost lies in [low, high]."""
    marginal = cost.marginal(widths)
    shift = cost.at(widths) - sum(marginal[g] * widths[g] for g in choices)
    try:
        sol = solve_knapsack(importance, marginal, high - shift, choices, blocks=blocks, floor=low - shift)
    except ValueError:
        return None
    value = cost.at(sol.widths)
    return (value, sol) if low <= value <= high else None


def _bisect(
    importance: dict[str, torch.Tensor],
    cost: Cost,
    widths: dict[str, int],
    choices: dict[str, list[int]],
    low: float,
    high: float,
    steps: int,
    blocks: dict[str, list[torch.Tensor]] | None,
) -> tuple[tuple[float, KnapsackSolution] | None, tuple[float, KnapsackSolution] | None]:
    """The budget bisected on the cost linearised at `widths`: the best solution costing at most `high`, and the
    cheapest one found over it (exact costs beside each)."""
    marginal = cost.marginal(widths)
    lo = sum(marginal[g] * ch[0] for g, ch in choices.items())
    hi = sum(marginal[g] * ch[-1] for g, ch in choices.items())
    best = over = None
    for _ in range(steps):
        budget = (lo + hi) / 2
        try:
            sol = solve_knapsack(importance, marginal, budget, choices, blocks=blocks)
        except ValueError:  # rounding costs up made the narrowest widths not fit: a larger budget is needed
            lo = budget
            continue
        value = cost.at(sol.widths)
        if value <= high and (best is None or value > best[0]):
            best = (value, sol)
        if value > high and (over is None or value < over[0]):
            over = (value, sol)
        if low <= value <= high:
            break
        lo, hi = (budget, hi) if value < low else (lo, budget)
    return best, over


def _lp_bound(
    cum: dict[str, np.ndarray], unit_cost: dict[str, float], budget: float, choices: dict[str, list[int]]
) -> float:
    """Greedy fractional fill of the width increments; exact for the LP because values are concave in width."""
    value = sum(cum[g][ch[0]] for g, ch in choices.items())
    left = budget - sum(unit_cost[g] * ch[0] for g, ch in choices.items())
    steps = []
    for g, ch in choices.items():
        for a, b in zip(ch, ch[1:]):
            steps.append((cum[g][b] - cum[g][a], unit_cost[g] * (b - a)))
    for dv, dc in sorted(steps, key=lambda s: s[0] / s[1] if s[1] > 0 else math.inf, reverse=True):
        if left <= 0:
            break
        take = 1.0 if dc <= left else left / dc
        value += take * dv
        left -= take * dc
    return float(value)


def _output_channels(graph: GroupGraph, module: str):
    """The channels of a module's output; a layer inside a module traced as one leaf shares that module's."""
    while module:
        if module in graph.outputs:
            return graph.outputs[module]
        module = module.rpartition('.')[0]
    return None


def _has_children(model: nn.Module, name: str) -> bool:
    return next(model.get_submodule(name).children(), None) is not None


def _own_flops(model: nn.Module, by_module: dict[str, int]) -> dict[str, int]:
    """fvcore counts a module with all its submodules; keep only what each module computes itself."""
    own = {}
    for name, count in by_module.items():
        if name == '':
            continue
        children = (f'{name}.{c}' for c, _ in model.get_submodule(name).named_children())
        own[name] = count - sum(by_module.get(c, 0) for c in children)
    top_children = sum(by_module.get(c, 0) for c, _ in model.named_children())
    own[''] = by_module.get('', 0) - top_children  # functional ops in the model's own forward
    return own
