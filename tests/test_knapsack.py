import itertools
import math
import random

import pytest
import torch
from engine_utils import FAMILIES, INPUT, random_model

from kpid_zoo.engine.flops import count_flops
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.knapsack import CostModel, solve_knapsack, width_choices
from kpid_zoo.engine.surgery import prune_model


def _brute_force(importance, unit_cost, budget, choices):
    best = -math.inf
    names = list(choices)
    for combo in itertools.product(*(choices[g] for g in names)):
        if sum(unit_cost[g] * k for g, k in zip(names, combo)) <= budget:
            value = sum(float(importance[g].sort(descending=True).values[:k].sum()) for g, k in zip(names, combo))
            best = max(best, value)
    return best


@pytest.mark.parametrize('seed', range(6))
def test_dp_matches_brute_force_and_respects_the_lp_bound(seed):
    rng = random.Random(seed)
    sizes = {f'g{i}': rng.randint(3, 12) for i in range(4)}
    importance = {
        g: torch.rand(n, generator=torch.Generator().manual_seed(seed * 10 + i)) ** 2
        for i, (g, n) in enumerate(sizes.items())
    }
    unit_cost = {g: rng.uniform(0.5, 5.0) for g in sizes}
    choices = {g: width_choices(n, min_channels=2, round_to=1) for g, n in sizes.items()}
    budget = 0.5 * sum(unit_cost[g] * n for g, n in sizes.items())
    sol = solve_knapsack(importance, unit_cost, budget, choices, resolution=200_000)
    assert sol.cost <= budget + 1e-9
    assert sol.value == pytest.approx(_brute_force(importance, unit_cost, budget, choices), rel=1e-6)
    assert sol.lp_bound >= sol.value - 1e-9 and 0 <= sol.gap < 0.2


def test_width_choices_round_and_respect_the_minimum():
    assert width_choices(64, min_channels=8, round_to=8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert width_choices(20, min_channels=5, round_to=8) == [8, 16, 20]
    assert width_choices(4, min_channels=8, round_to=8) == [4]
    assert width_choices(10, min_channels=3, round_to=1) == list(range(3, 11))


def test_infeasible_budget_is_a_clear_error():
    imp = {'a': torch.ones(8)}
    with pytest.raises(ValueError, match='smallest reachable'):
        solve_knapsack(imp, {'a': 10.0}, 15.0, {'a': [4, 8]})
    with pytest.raises(ValueError, match='below what the unprunable layers alone cost'):
        solve_knapsack(imp, {'a': 10.0}, -1.0, {'a': [4, 8]})


@pytest.mark.parametrize('name', FAMILIES)
def test_cost_model_predicts_fvcore_for_any_widths(name):
    model = random_model(name).float()
    graph = discover_groups(model, INPUT)
    cost = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    gen = torch.Generator().manual_seed(0)
    keep = {
        g.name: torch.randperm(g.size, generator=gen)[: int(torch.randint(1, g.size + 1, (1,), generator=gen))]
        for g in graph.prunable
    }
    widths = {g: len(keep.get(g, range(n))) for g, n in cost.sizes.items()}
    measured = count_flops(prune_model(model, graph, keep), INPUT).total
    assert cost.flops(widths) == pytest.approx(measured, rel=1e-9)
    assert cost.flops(cost.sizes) == pytest.approx(count_flops(model, INPUT).total, rel=1e-9)


def test_marginal_cost_is_the_derivative_of_the_cost_model():
    model = random_model('efficientnet_b0').float()
    graph = discover_groups(model, INPUT)
    cost = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    widths = {g: max(1, n // 2) for g, n in cost.sizes.items()}
    marginal = cost.marginal(widths)
    for g in list(widths)[:10]:
        bumped = dict(widths, **{g: widths[g] + 1})
        # the cost is linear in each single width, so a unit step is the exact derivative
        assert cost.flops(bumped) - cost.flops(widths) == pytest.approx(marginal[g], rel=1e-9)
