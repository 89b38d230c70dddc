"""Latency budgets: the lookup table's interpolation, its structure against the FLOPs cost model, its cache, the
recipe's budget section, and the correction loop. No test asserts a speed: timings come from injected functions,
except the one end-to-end run, which checks only what it records."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import timm
import torch
import yaml
from engine_utils import INPUT, HomeProcessGuard

from kpid_zoo.budget import latency as lat
from kpid_zoo.budget import timing
from kpid_zoo.budget._rounds import bracketed_aim
from kpid_zoo.budget.latency import LatencyCostModel, LatencyTerm, sample_widths
from kpid_zoo.budget.prune import latency_knapsack_prune
from kpid_zoo.budget.timing import LatencySetting, Paired, Timing
from kpid_zoo.cli import main
from kpid_zoo.core.files import CACHE_ENV
from kpid_zoo.core.recipe import BudgetSpec, Recipe, RecipeError
from kpid_zoo.engine.flops import count_flops
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import magnitude_importance
from kpid_zoo.engine.knapsack import CostModel, solve_for_budget, width_choices

SETTING = LatencySetting('cpu', 1, 1)


def group_widths(net, graph) -> dict[str, int]:
    """Each prunable group's width in `net`: its first producer's output channels (no concatenations here)."""

    def out(m):
        return m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features

    return {g.name: out(net.get_submodule(g.modules('out')[0])) for g in graph.prunable}


FAST_GRID = (0.5, 1.0)  # tables whose values are not measured need not be sampled finely


def paired_by(measure):
    """A pair timing from a per-network one: what a device that never drifts would give `measure_paired`."""

    def compare(model, reference, input_size, setting, **_):
        a, b = measure(model, input_size, setting), measure(reference, input_size, setting)
        return Paired(a, b, Timing.of([a.median_ms / b.median_ms]))

    return compare


def _term() -> LatencyTerm:
    values = np.random.default_rng(0).uniform(0.1, 2.0, size=(3, 4))
    return LatencyTerm('conv', ('a', 'b'), ((8, 16, 32), (4, 8, 12, 24)), values)


def test_interpolation_is_exact_on_the_grid_and_linear_between():
    term = _term()
    for (i, wa), (j, wb) in itertools.product(enumerate(term.points[0]), enumerate(term.points[1])):
        assert term.at({'a': wa, 'b': wb}) == pytest.approx(term.values[i, j], rel=1e-12)
    v = term.values
    # halfway along one axis: the mean of the two grid values; the cell's centre: the mean of its four corners
    assert term.at({'a': 12, 'b': 8}) == pytest.approx((v[0, 1] + v[1, 1]) / 2, rel=1e-12)
    assert term.at({'a': 24, 'b': 10}) == pytest.approx(v[1:3, 1:3].mean(), rel=1e-12)
    # linear in each width within a cell: equal steps give equal differences, and the gradient is that step
    steps = [term.at({'a': 17 + k, 'b': 9.5}) for k in range(4)]
    assert np.diff(steps) == pytest.approx([np.diff(steps)[0]] * 3, rel=1e-9)
    assert term.gradient({'a': 17, 'b': 9.5})[0] == pytest.approx(steps[1] - steps[0], rel=1e-9)
    # beyond the sampled range it extends the first / last cell's line
    below = term.at({'a': 4, 'b': 4})
    assert below == pytest.approx(v[0, 0] - (v[1, 0] - v[0, 0]) * 4 / 8, rel=1e-12)


def _flops_table(cost: CostModel) -> LatencyCostModel:
    """A 'latency' table whose every layer costs its FLOPs: sampled on the latency grid like a measured one."""
    terms = []
    for i, (coef, factors) in enumerate(cost.terms):
        # one axis per factor (a dimension of the layer: width / full of one group, no concatenations in these
        # nets); a conv whose input and output are one group (a residual around it) has that group on two axes,
        # which multilinear interpolation evaluates exactly on the diagonal
        assert all(c == 0 and len(weights) == 1 for c, weights in factors)
        groups = tuple(weights[0][0] for _, weights in factors)
        points = tuple(sample_widths(cost.sizes[g]) for g in groups)
        values = np.zeros([len(p) for p in points])
        for index in itertools.product(*(range(len(p)) for p in points)):
            values[index] = coef * math.prod(p[k] / cost.sizes[g] for g, p, k in zip(groups, points, index))
        terms.append(LatencyTerm(f'layer{i}', groups, points, values))
    return LatencyCostModel(terms, cost.fixed, dict(cost.sizes))


@pytest.mark.parametrize('name', ['resnet18', 'efficientnet_b0', 'mobilenetv3_large_100'])
def test_a_table_of_flops_reproduces_the_flops_knapsack(name):
    model = timm.create_model(name).eval()
    graph = discover_groups(model, INPUT)
    flops = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    table = _flops_table(flops)
    gen = torch.Generator().manual_seed(0)
    widths = {g: int(torch.randint(1, n + 1, (1,), generator=gen)) for g, n in flops.sizes.items()}
    # every layer's FLOPs are (multi)linear in its widths, which the interpolation reproduces exactly; the sums
    # differ by float rounding only (relative 1e-12 of each term, far below 1e-9)
    assert table.at(widths) == pytest.approx(flops.flops(widths), rel=1e-9)
    grad_t, grad_f = table.marginal(widths), flops.marginal(widths)
    assert all(grad_t[g] == pytest.approx(grad_f[g], rel=1e-9, abs=1e-6) for g in flops.sizes)
    importance = magnitude_importance(model, graph)
    choices = {g.name: width_choices(g.size, 8, 8) for g in graph.prunable}
    target = 0.4 * flops.flops(flops.sizes)
    by_flops = solve_for_budget(importance, flops, dict(flops.sizes), choices, 0.99 * target, target)
    by_table = solve_for_budget(importance, table, dict(table.sizes), choices, 0.99 * target, target)
    assert by_table.widths == by_flops.widths and by_flops.widths != flops.sizes
    # and re-linearised where the first solution landed, as the pruning loop does next
    again_flops = solve_for_budget(importance, flops, by_flops.widths, choices, 0.99 * target, target)
    again_table = solve_for_budget(importance, table, by_table.widths, choices, 0.99 * target, target)
    assert again_table.widths == again_flops.widths


class _CountingTimer:
    """A deterministic stand-in for `time_callable`: counts calls, never runs the layer."""

    def __init__(self):
        self.calls = 0

    def __call__(self, fn, setting, *, warmup, repeats):
        self.calls += 1
        return Timing.of([1.0 + (self.calls % 7) * 0.1])


@pytest.fixture(scope='module')
def tiny():
    model = timm.create_model('resnet10t').eval()
    return model, discover_groups(model, INPUT)


def test_table_cache_hits_misses_and_invalidation(tmp_path, tiny):
    model, graph = tiny
    timer = _CountingTimer()

    def table(setting=SETTING):
        return lat.latency_table(
            model,
            graph,
            'resnet10t',
            INPUT,
            setting,
            cache_dir=tmp_path,
            progress=False,
            timer=timer,
            fractions=FAST_GRID,
        )

    first = table()
    built = timer.calls
    assert built > len(first.terms)  # every grid point of every layer, then the whole net twice
    path = lat.cache_path(first.key, tmp_path)
    assert path.is_file() and [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing staged left behind
    again = table()
    assert timer.calls == built  # a hit measures nothing
    assert again.to_dict() == first.to_dict()

    other = table(LatencySetting('cpu', 1, 2))  # another thread count is another key, another file
    assert timer.calls > built and lat.cache_path(other.key, tmp_path) != path
    assert other.key['threads'] == 2 and first.key['threads'] == 1
    # so are another input size, batch, parent layout (a 10-class head) and processor or torch build
    assert lat.table_key(model, 'resnet10t', (3, 64, 64), SETTING) != first.key
    assert lat.table_key(model, 'resnet10t', INPUT, LatencySetting('cpu', 8, 1)) != first.key
    assert lat.table_key(timm.create_model('resnet10t', num_classes=10), 'resnet10t', INPUT, SETTING) != first.key
    assert first.key['device_name'] == timing.device_name('cpu') and torch.__version__ in first.key['device_name']

    # a file whose key is not the one asked for, or no table at all, is a miss and is measured again
    data = json.loads(path.read_text())
    data['key']['batch_size'] = 64
    path.write_text(json.dumps(data))
    calls = timer.calls
    table()
    assert timer.calls > calls
    path.write_text('{"truncated": ')
    calls = timer.calls
    table()
    assert timer.calls > calls and lat.load_cached(first.key, tmp_path) is not None


def test_cache_write_is_atomic(tmp_path, tiny, monkeypatch):
    model, graph = tiny
    good = lat.build_table(
        model, graph, 'resnet10t', INPUT, SETTING, timer=_CountingTimer(), progress=False, fractions=FAST_GRID
    )
    path = lat.save_cached(good, tmp_path)
    before = path.read_bytes()
    changed = LatencyCostModel(
        good.terms, good.fixed + 1.0, good.sizes, good.layer_scale, good.key, good.full_ms, good.narrow_ms
    )

    def fail(*_):
        raise OSError('disk full')

    import kpid_zoo.core.files as files

    monkeypatch.setattr(files.os, 'replace', fail)
    with pytest.raises(OSError, match='disk full'):
        lat.save_cached(changed, tmp_path)
    assert path.read_bytes() == before  # the old table, whole
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # the staged copy is gone


def test_table_calibration_goes_through_both_measured_ends(tiny):
    model, graph = tiny
    table = lat.build_table(
        model, graph, 'resnet10t', INPUT, SETTING, timer=_CountingTimer(), progress=False, fractions=FAST_GRID
    )
    narrowest = {g: sample_widths(n, FAST_GRID)[0] for g, n in table.sizes.items()}
    # the network takes twice its layers' sum plus 1 ms: the fit recovers both (float rounding only)
    table.full_ms, table.narrow_ms = 2 * table.layers(table.sizes) + 1, 2 * table.layers(narrowest) + 1
    lat.calibrate(table, narrowest)
    assert table.layer_scale == pytest.approx(2, rel=1e-9) and table.fixed == pytest.approx(1, rel=1e-9)
    assert table.at(narrowest) == pytest.approx(table.narrow_ms, rel=1e-9)
    # a narrow net measured slower than the full one (noise) gives no usable slope: scale 1, network minus layers
    table.narrow_ms = table.full_ms + 1
    lat.calibrate(table, narrowest)
    assert table.layer_scale == 1 and table.at(table.sizes) == pytest.approx(table.full_ms, rel=1e-9)


class _TwoBranches(torch.nn.Module):
    """Two convs concatenated, then a BN and a conv that read both groups side by side; the second branch is a
    grouped conv (4 conv-groups), whose group takes widths in multiples of 4."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.b1 = torch.nn.Conv2d(3, 16, 1)
        self.b2 = torch.nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn = torch.nn.BatchNorm2d(24)
        self.head = torch.nn.Conv2d(24, 8, 1)

    def forward(self, x):
        return self.head(self.bn(torch.cat([self.a(x), self.b2(self.b1(x))], 1)))


def test_a_table_times_concatenated_inputs_and_grouped_convs_at_their_narrowed_widths():
    net = _TwoBranches().eval()
    graph = discover_groups(net, (3, 16, 16))
    shapes = []

    def run_once(fn, setting, *, warmup, repeats):  # runs the narrowed layer on the input it was given, once
        shapes.append(tuple(fn().shape))
        return Timing.of([1.0])

    table = lat.build_table(
        net,
        graph,
        'two_branches',
        (3, 16, 16),
        SETTING,
        fractions=(0.5, 1.0),
        warmup=0,
        repeats=1,
        timer=run_once,
        progress=False,
    )
    terms = {t.module: t for t in table.terms}
    # the BN and the head read the concatenation: their terms depend on both branches' groups
    assert set(terms['bn'].groups) == set(terms['head'].groups) == {'a', 'b2'}
    parts = {g.name: g.parts for g in graph.prunable}
    assert parts == {'a': 1, 'b1': 4, 'b2': 4}
    assert all(w % parts[g] == 0 for t in table.terms for g, p in zip(t.groups, t.points) for w in p)
    assert len(shapes) == sum(t.values.size for t in table.terms) + 2  # every grid point ran, and both whole nets


def test_a_layer_reading_too_many_groups_is_one_line_naming_it():
    net = timm.create_model('densenet121').eval()
    with pytest.raises(
        ValueError,
        match=r"layer 'features\.denseblock1\.denselayer\d\.\w+' holds channels of \d "
        r'prunable groups \(a concatenation\).*FLOPs budget',
    ):
        lat.check_timeable(net, discover_groups(net, (3, 32, 32)))


@pytest.mark.parametrize(
    'section, message',
    [
        (
            {'latency_ms': 4.0, 'latency_ratio': 0.5},
            'budget: expected exactly one of latency_ms / latency_ratio / latency_of, got latency_ms and latency_ratio',
        ),
        ({'latency_of': 'resnet1B'}, "budget.latency_of: 'resnet1B' is not a timm model"),
        ({'device': 'tpu', 'latency_ms': 4.0}, "budget.device: expected one of 'cpu', 'cuda', got 'tpu'"),
        ({'latency_ms': -1}, 'budget.latency_ms: expected a positive number, got -1.0'),
        ({'latency_ms': 4.0, 'batch_size': 0}, 'budget.batch_size: expected a positive integer, got 0'),
        ({'latency_ms': 4.0, 'tolerance': 1.5}, 'budget.tolerance: expected a number in [0, 1), got 1.5'),
    ],
)
def test_budget_section_errors_name_the_field(section, message):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({'name': 'x', 'parent': {'model': 'resnet18'}, 'budget': section}, source='r.yaml')
    assert str(e.value).startswith(f'r.yaml: {message}')


def test_exactly_one_budget_kind():
    base = {'name': 'x', 'parent': {'model': 'resnet18'}}
    with pytest.raises(RecipeError, match='expected exactly one of flops .* or budget .*, got both'):
        Recipe.from_dict({**base, 'flops': {'target_ratio': 0.5}, 'budget': {'latency_ms': 4}})
    with pytest.raises(RecipeError, match='flops: expected exactly one of flops .* got neither'):
        Recipe.from_dict(base)
    recipe = Recipe.from_dict({**base, 'budget': {'latency_ms': 4}})
    assert recipe.flops is None and recipe.budget == BudgetSpec(latency_ms=4.0)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    # a FLOPs recipe's dict (and so its hash) has no budget entry: recipes written before it keep their sha256
    assert 'budget' not in Recipe.from_dict({**base, 'flops': {'target_ratio': 0.5}}).to_dict()


BASE = {
    'name': 'lat_resnet10t',
    'parent': {'model': 'resnet10t', 'weights': 'none', 'num_classes': 10},
    'input_size': [3, 32, 32],
    'importance': {'method': 'magnitude'},
    'data': {'dataset': 'imagefolder', 'root': 'unused', 'num_classes': 10},
}


def _prune(tmp_path, budget: dict) -> list[str]:
    path = tmp_path / 'r.yaml'
    path.write_text(yaml.safe_dump({**BASE, 'budget': budget}))
    return ['prune', str(path), '--out', str(tmp_path / 'out'), '--quiet']


@pytest.mark.parametrize(
    'budget, expected',
    [
        ({'latency_ms': 1e6}, "resnet10t: budget.latency_ms: 1e+06 ms is not below the parent's measured"),
        ({'latency_ms': 1e-6}, 'ms that the smallest reachable network (every group at 8 channels) measures on cpu'),
        (
            {'latency_of': 'resnet152'},
            'resnet10t: budget.latency_of: resnet152 measures',
        ),  # 15x the FLOPs, 5x the depth
        pytest.param(
            {'latency_ms': 4.0, 'device': 'cuda'},
            "budget.device: 'cuda' is not present on this machine",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason='CUDA is present here'),
        ),
    ],
)
def test_unreachable_budgets_and_absent_devices_fail_in_one_line(tmp_path, capsys, monkeypatch, budget, expected):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    assert main(_prune(tmp_path, budget)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err and 'r.yaml' in err, err
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'cache').exists()  # before any table is measured


def test_paired_timing_alternates_abba_and_cancels_a_drift_both_nets_share(monkeypatch):
    """A machine that slows down round after round (another job starting): each net's own median moves with it,
    the per-pair ratio does not. Calls alternate ABBA after warm-up, so neither net always runs second."""
    calls = []

    class Net(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def forward(self, x):
            calls.append(self.name)
            return x

    timed = []

    def fake_time_once(fn, setting):
        fn()
        timed.append(calls[-1])
        slowdown = 1 + (len(timed) - 1) // 2  # one step per call pair
        return {'a': 2.0, 'b': 1.0}[calls[-1]] * slowdown

    monkeypatch.setattr(timing, 'time_once', fake_time_once)
    paired = timing.measure_paired(Net('a'), Net('b'), (3, 8, 8), SETTING, warmup=2, repeats=6)
    assert calls[:4] == ['a', 'b', 'a', 'b'] and timed == list('abbaabbaabba')
    assert paired.ratio.median_ms == 2.0 and paired.ratio.min_ms == paired.ratio.max_ms == 2.0
    assert paired.model.max_ms / paired.model.min_ms > 2  # what a comparison of separate timings would carry


def test_the_loop_converges_on_a_synthetic_measurement(tiny):
    """The table says FLOPs; the 'device' says 0.4 ms + (MMACs / 30)^1.3 ms. Fitted at both ends, the table
    overestimates the middle (the device is convex in FLOPs), so the first round lands under the band and the
    measured/predicted correction must bring the next rounds into it."""
    model, graph = tiny
    flops = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    table = _flops_table(flops)

    def device_ms(widths):
        return 0.4 + (flops.flops(widths) / 30e6) ** 1.3

    def measure(net, input_size, setting, **_):
        return Timing.of([device_ms(group_widths(net, graph))])

    budget = BudgetSpec(latency_ms=0.5 * device_ms(flops.sizes), tolerance=0.02)
    result = latency_knapsack_prune(
        model,
        graph,
        magnitude_importance(model, graph),
        budget,
        arch='resnet10t',
        input_size=INPUT,
        table=table,
        compare=paired_by(measure),
        progress=False,
    )
    out = result.report.latency
    assert out.within_budget and out.noise == 0 and out.tolerance == 0.02 and not out.note
    assert 0.98 * budget.latency_ms <= out.measured_ms <= budget.latency_ms
    assert out.measured_ms == pytest.approx(measure(result.model, INPUT, SETTING).median_ms)
    rounds = result.report.rounds
    assert all({'predicted_ms', 'measured_ms', 'gmacs'} <= set(r) for r in rounds)
    assert len(rounds) >= 2 and rounds[0]['measured_ms'] < 0.98 * budget.latency_ms
    assert rounds[0]['predicted_ms'] > rounds[0]['measured_ms']  # what the correction corrected


def test_the_kept_net_is_timed_afresh_and_a_lucky_round_does_not_pass(tiny):
    """A device whose first look at a net reads 10% fast (a lucky timing) and every later look true: the loop keeps
    a round that read under the budget although the net is 10% over it. The reported time must be a fresh look at
    the kept net, and the loop must aim lower when that look is over the budget."""
    model, graph = tiny
    flops = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    looked_at: list[torch.nn.Module] = []  # the nets themselves: a freed net's id() can come back as another net's

    def true_ms(net):
        return 3e-7 * flops.flops(group_widths(net, graph))

    def compare(net, reference, input_size, setting, **_):
        lucky = 0.9 if net is not reference and not any(net is seen for seen in looked_at) else 1.0
        looked_at.append(net)
        ratio = lucky * true_ms(net) / true_ms(reference)
        return Paired(Timing.of([lucky * true_ms(net)]), Timing.of([true_ms(reference)]), Timing.of([ratio]))

    budget = BudgetSpec(latency_ms=0.6 * 3e-7 * flops.flops(flops.sizes), tolerance=0.02)
    result = latency_knapsack_prune(
        model,
        graph,
        magnitude_importance(model, graph),
        budget,
        arch='resnet10t',
        input_size=INPUT,
        table=_flops_table(flops),
        compare=compare,
        progress=False,
    )
    out = result.report.latency
    assert out.measured_ms == pytest.approx(true_ms(result.model))  # the fresh look, not the lucky one
    assert out.round_ms == pytest.approx(0.9 * out.measured_ms)
    assert 'on a fresh look, over the budget: aimed' in out.note  # the first kept net was over, and the loop said so
    assert out.within_budget and out.measured_ms <= budget.latency_ms  # after aiming lower once
    assert any(r['aim_ms'] < budget.latency_ms for r in result.report.rounds)


def test_a_model_wrong_by_more_for_narrow_nets_than_wide_ones_still_lands_in_the_window(tiny):
    """A device on which a net runs in (its FLOPs cost)^2 / the parent's: the table, fitted at the parent and the
    narrowest net, puts mid-width nets far above what they run. One correction factor swings between the narrow
    nets it overestimates and the wide ones it gets right (the loop alternated far under and far over the budget);
    interpolating between the rounds on either side lands in [budget * (1 - tolerance), budget]."""
    model, graph = tiny
    flops = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    parent_cost = 3e-7 * flops.flops(flops.sizes)

    def true_ms(net, *_):
        return Timing.of([(3e-7 * flops.flops(group_widths(net, graph))) ** 2 / parent_cost])

    budget = BudgetSpec(latency_ms=0.6 * parent_cost, tolerance=0.05)
    result = latency_knapsack_prune(
        model,
        graph,
        magnitude_importance(model, graph),
        budget,
        arch='resnet10t',
        input_size=INPUT,
        table=_flops_table(flops),
        compare=paired_by(true_ms),
        progress=False,
    )
    out = result.report.latency
    measured = [r['measured_ms'] for r in result.report.rounds]
    assert any(m > budget.latency_ms for m in measured) and any(m < 0.95 * budget.latency_ms for m in measured)
    assert out.within_budget and 0.95 * budget.latency_ms <= out.measured_ms <= budget.latency_ms, measured


def test_the_aim_between_two_rounds_is_interpolated_and_refused_when_they_disagree_with_the_model():
    low, high = 57.0, 60.0
    assert bracketed_aim([(60.0, 36.0)], low, high) is None  # one side only: the correction factor decides
    aim = bracketed_aim([(60.0, 36.0), (100.0, 100.0), (50.0, 30.0), (120.0, 130.0)], low, high)
    assert aim == pytest.approx(60.0 + (58.5 - 36.0) * 40.0 / 64.0)  # the nearest round on each side
    assert bracketed_aim([(100.0, 36.0), (60.0, 100.0)], low, high) is None  # wider ran faster: noise, not a slope


def test_a_fresh_look_runs_in_a_new_process_and_times_the_pair_as_in_this_one():
    """`measure_paired_afresh`: the networks run in another process (these two refuse to run in this one), and the
    pair is timed as `measure_paired` times it: 15 call pairs, and the one ordering 16x the multiply-adds cannot
    reverse."""
    narrow, wide = HomeProcessGuard(8), HomeProcessGuard(128)
    with pytest.raises(RuntimeError, match='ran in the process that built it'):
        timing.measure_paired(narrow, wide, INPUT, SETTING)
    paired = timing.measure_paired_afresh(narrow, wide, INPUT, SETTING)
    assert paired.ratio.repeats == paired.model.repeats == 15
    assert paired.ratio.median_ms < 1 and paired.model.median_ms < paired.reference.median_ms


def test_the_loop_takes_its_fresh_look_in_a_new_process_unless_given_a_device(tiny, monkeypatch):
    """With no `compare`, every round is timed by `measure_paired` and the kept net's fresh look by
    `measure_paired_afresh`, whose figure is the one reported; a given `compare` (a simulated device) does both."""
    from kpid_zoo.budget import latency_loop

    model, graph = tiny
    flops = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    true_ms = paired_by(lambda net, *_: Timing.of([3e-7 * flops.flops(group_widths(net, graph))]))
    afresh = []

    def fresh_look(net, reference, input_size, setting, **kwargs):
        afresh.append(net)
        return true_ms(net, reference, input_size, setting)

    monkeypatch.setattr(latency_loop, 'measure_paired', true_ms)
    monkeypatch.setattr(latency_loop, 'measure_paired_afresh', fresh_look)
    budget = BudgetSpec(latency_ms=0.6 * 3e-7 * flops.flops(flops.sizes), tolerance=0.05)
    kwargs = dict(arch='resnet10t', input_size=INPUT, table=_flops_table(flops), progress=False)
    result = latency_knapsack_prune(model, graph, magnitude_importance(model, graph), budget, **kwargs)
    assert afresh and afresh[-1] is result.model  # the kept net's last look was the fresh process's
    assert result.report.latency.within_budget
    given = latency_knapsack_prune(model, graph, magnitude_importance(model, graph), budget, compare=true_ms, **kwargs)
    assert len(afresh) == 1 and given.report.latency.measured_ms == result.report.latency.measured_ms


def test_latency_of_times_every_candidate_beside_that_network(tiny):
    """`latency_of: NAME`: the budget is that network's time, and every net (the A/A test included) is timed beside
    it, never beside the parent, so the result is a ratio to the network the user named."""
    model, graph = tiny
    flops = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    parent_ms = 3e-7 * flops.flops(flops.sizes)
    references = []

    def measure(net, input_size, setting, **_):
        if net.pretrained_cfg['architecture'] == 'mobilenetv3_small_050':
            return Timing.of([0.4 * parent_ms])
        return Timing.of([3e-7 * flops.flops(group_widths(net, graph))])

    def compare(net, reference, input_size, setting, **_):
        references.append(reference.pretrained_cfg['architecture'])
        return paired_by(measure)(net, reference, input_size, setting)

    budget = BudgetSpec(latency_of='mobilenetv3_small_050', tolerance=0.03)
    result = latency_knapsack_prune(
        model,
        graph,
        magnitude_importance(model, graph),
        budget,
        arch='resnet10t',
        input_size=INPUT,
        table=_flops_table(flops),
        compare=compare,
        progress=False,
    )
    out = result.report.latency
    assert out.reference == 'mobilenetv3_small_050' and set(references) == {'mobilenetv3_small_050'}
    assert out.budget_ms == pytest.approx(0.4 * parent_ms) and out.parent_ms == pytest.approx(parent_ms)
    assert out.within_budget and 0.97 * out.budget_ms <= out.measured_ms <= out.budget_ms


def test_prune_with_a_latency_budget_end_to_end(tmp_path, monkeypatch, capsys):
    """Real timings on this machine: only what is recorded is checked, never how fast anything ran."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    assert main(_prune(tmp_path, {'latency_ratio': 0.7, 'tolerance': 0.3})) == 0
    out = capsys.readouterr().out
    assert 'round 1: predicted / measured ms' in out
    report = json.loads((tmp_path / 'out' / 'report.json').read_text())
    latency = report['latency']
    assert report['rounds'] and all(r['predicted_ms'] > 0 and r['measured_ms'] > 0 for r in report['rounds'])
    assert latency['budget_ms'] < latency['parent_ms'] and latency['table'].startswith(str(tmp_path / 'cache'))
    if latency['within_budget']:
        assert latency['measured_ms'] <= latency['budget_ms']
    else:
        assert latency['note'].startswith('stopped after')


def test_a_noisy_measurement_widens_the_tolerance_and_says_so(tiny):
    """Three A/A ratios of the parent 10% apart: a 2% band is narrower than the noise, so the loop aims at 2 x 10%."""
    model, graph = tiny
    flops = CostModel.from_flops(model, graph, count_flops(model, INPUT))
    parent_ms = 3e-7 * flops.flops(flops.sizes)
    aa_ratios = iter([1.0, 1.0, 1.1, 1.05])  # the noise check's discarded and three timed A/A series

    def measure(net, input_size, setting, **_):
        return Timing.of([3e-7 * flops.flops(group_widths(net, graph))])

    def compare(net, reference, input_size, setting, **_):
        if net is reference:
            t = measure(net, input_size, setting)
            return Paired(t, t, Timing.of([next(aa_ratios)]))
        return paired_by(measure)(net, reference, input_size, setting)

    budget = BudgetSpec(latency_ms=0.6 * parent_ms, tolerance=0.02)
    result = latency_knapsack_prune(
        model,
        graph,
        magnitude_importance(model, graph),
        budget,
        arch='resnet10t',
        input_size=INPUT,
        table=_flops_table(flops),
        compare=compare,
        progress=False,
    )
    out = result.report.latency
    assert next(aa_ratios, None) is None  # all three A/A series ran, and only they
    assert out.noise == pytest.approx(0.1) and out.tolerance == pytest.approx(2 * 0.1)
    assert 'below twice the measured noise' in out.note
    assert out.within_budget and (1 - out.tolerance) * budget.latency_ms <= out.measured_ms <= budget.latency_ms


def test_a_changed_budget_reruns_the_prune_stage_only_where_it_reads_it():
    from kpid_zoo._runner import FINETUNE_FIELDS, PRUNE_FIELDS, PRUNE_FIELDS_NO_DATA, recipe_inputs

    base = {'name': 'x', 'parent': {'model': 'resnet18'}}
    a = Recipe.from_dict({**base, 'budget': {'latency_ms': 4.0}})
    b = Recipe.from_dict({**base, 'budget': {'latency_ms': 5.0}})
    for fields in (PRUNE_FIELDS, PRUNE_FIELDS_NO_DATA):
        assert recipe_inputs(a, fields) != recipe_inputs(b, fields)
        assert recipe_inputs(a, fields)['recipe.budget.latency_ms'] == 4.0
    assert recipe_inputs(a, FINETUNE_FIELDS) == recipe_inputs(b, FINETUNE_FIELDS)
