"""The logic behind benchmarks/deploy_latency.py's verdicts: the paired timer's order and ratios, what it calls
meeting the goal, and which cached cells it reports."""

import contextlib
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import deploy_latency as dl  # noqa: E402


def _row(ratio, q1, q3, arm='latency-onnxruntime', net='resnet50 latency-knapsack', stock='resnet18'):
    return {'ratio': ratio, 'ratio_q1': q1, 'ratio_q3': q3, 'arm': arm, 'net': net, 'stock': stock}


def test_paired_calls_alternate_abba_and_pair_each_call_with_its_neighbour(monkeypatch):
    calls = []
    # the clock: each call of `a` takes 2, 4, 6, ... ms and each call of `b` 1, 2, 3, ... ms, so every pair's
    # ratio is exactly 2 while the medians of the two series differ from call to call
    durations = {'a': iter(range(2, 100, 2)), 'b': iter(range(1, 100))}

    def fake_time_once(fn, setting):
        fn()
        return float(next(durations[calls[-1]]))

    monkeypatch.setattr(dl, 'time_once', fake_time_once)
    conditions = []  # the library's own timing conditions (eager PyTorch: the allocator's thresholds fixed)
    monkeypatch.setattr(dl, 'timing_conditions', lambda setting: conditions.append(setting) or contextlib.nullcontext())
    setting = dl.LatencySetting('cpu', 1, 1, 'torch')
    p = dl.paired_calls(lambda: calls.append('a'), lambda: calls.append('b'), setting, warmup=1, repeats=4)
    assert conditions == [setting]
    assert calls == ['a', 'b'] + ['a', 'b', 'b', 'a', 'a', 'b', 'b', 'a']  # warm-up, then ABBA ABBA
    assert p.ratio.median_ms == p.ratio.q1_ms == p.ratio.q3_ms == 2.0
    assert p.model.median_ms == 5.0 and p.reference.median_ms == 2.5  # medians of 2,4,6,8 and 1,2,3,4


@pytest.mark.parametrize(
    'ratio,q1,q3,expected',
    [
        (0.90, 0.85, 0.95, 'met (faster)'),
        (0.98, 0.95, 1.02, 'met within noise (IQR spans 1)'),
        (1.00, 0.97, 1.03, 'met within noise (IQR spans 1)'),  # as fast: the goal asks for no more
        (1.02, 0.99, 1.05, 'missed within noise (IQR spans 1)'),
        (1.10, 1.01, 1.20, '**missed (slower)**'),
    ],
)
def test_goal_is_judged_on_the_iqr_then_the_median(ratio, q1, q3, expected):
    assert dl.goal(_row(ratio, q1, q3)) == expected


def test_ratio_cell_words():
    assert dl.ratio_cell(_row(0.9, 0.85, 0.95)) == '0.900 [0.850-0.950] faster'
    assert dl.ratio_cell(_row(1.1, 1.01, 1.2)) == '1.100 [1.010-1.200] **slower**'
    assert dl.ratio_cell(_row(1.0, 0.95, 1.05)) == '1.000 [0.950-1.050] n.r.'
    assert dl.ratio_cell(_row(1.0, 0.95, 1.05, arm='stock', net='resnet18')) == '1.000 [0.950-1.050]'  # A/A
    assert dl.ratio_cell(None) == '-'


def _timed(arm, sha, setting='b1', runtime='openvino'):
    return {
        **_row(1.0, 0.9, 1.1, arm=arm, net=dl.arm_label(arm, 'resnet50', 'resnet18')),
        'gmacs': 1.8,
        'stock_ms': 50.0,
        'parent': 'resnet50',
        'setting': setting,
        'runtime': runtime,
        'net_sha256': sha,
    }


def test_time_rows_drop_cells_of_a_net_pruned_again_since():
    nets = [
        {'parent': 'resnet50', 'arm': 'flops', 'setting': None, 'fold': 0, 'sha256': 'new-flops'},
        {'parent': 'resnet50', 'arm': 'latency-torch', 'setting': 'b1', 'fold': 0, 'sha256': 'new-lat'},
        {'parent': 'resnet50', 'arm': 'latency-torch', 'setting': 'b1', 'fold': 1, 'sha256': 'fold-1-lat'},
    ]
    timed = [
        _timed('flops', 'new-flops', setting='b32'),  # the FLOPs net is one net for both settings
        _timed('latency-torch', 'old-lat'),  # timed before the net was pruned again: not reported
        _timed('stock', 'stock'),
        _timed('parent', 'parent'),
    ]
    rows = dl.time_rows({'nets': nets, 'time': timed})
    assert set(rows) == {
        ('b32', 'openvino', 'resnet50', 'flops'),
        ('b1', 'openvino', 'resnet50', 'stock'),
        ('b1', 'openvino', 'resnet50', 'parent'),
    }
    timed[1]['net_sha256'] = 'new-lat'
    assert ('b1', 'openvino', 'resnet50', 'latency-torch') in dl.time_rows({'nets': nets, 'time': timed})


def test_a_runtime_budget_this_kpid_zoo_cannot_measure_is_reported_not_measured(monkeypatch):
    monkeypatch.setattr(dl, 'runtime_budgets', lambda: False)
    sets = dl.settings(quick=False)
    rows = {('b1', 'onnxruntime', 'resnet50', 'latency-torch'): _timed('latency-torch', 'x', runtime='onnxruntime')}
    rows[('b1', 'onnxruntime', 'resnet50', 'latency-torch')].update(ratio=1.2, ratio_q1=1.1, ratio_q3=1.3)
    table = dl.latency_table(rows, sets['b1'], {})
    onnx_line = next(line for line in table if 'ONNX Runtime budget' in line)
    assert onnx_line.count(dl.NOT_MEASURED) == 3
    lines = dl.findings(rows, {'nets': []}, sets)
    miss = next(line for line in lines if line.startswith('| batch 1') and 'ONNX Runtime |' in line)
    assert '+20.0%' in miss and dl.NOT_MEASURED in miss
    assert any('resnet50 latency-knapsack (eager PyTorch budget) is slower' in line for line in lines)


def test_fresh_remakes_the_cells_of_the_parts_it_runs_only_once_and_only_those(tmp_path):
    from types import SimpleNamespace

    net, timed = tmp_path / 'net.json', tmp_path / 'time.json'
    net.write_text('{"keep": {}}')
    timed.write_text('{"ratio": 1.0}')
    args = SimpleNamespace(fresh=True, parts=['time'], done=set())
    assert dl.cached(net, args, 'prune') == {'keep': {}}  # --part time --fresh times the cached nets again
    assert dl.cached(timed, args, 'time') is None
    args.done.add(timed)  # made afresh in this run: reused from then on
    assert dl.cached(timed, args, 'time') == {'ratio': 1.0}
    assert dl.cached(tmp_path / 'absent.json', SimpleNamespace(fresh=False, parts=[], done=set()), 'time') is None
