"""Latency budgets in a deployment runtime (`budget.runtime`: ONNX Runtime, OpenVINO): the recipe field, the
preflight's one-line errors, the lookup table's units and cache key, paired timing of compiled networks, and a
latency prune measured in ONNX Runtime end to end. No test asserts a time; one asserts an ordering that a 16x
difference in multiply-adds cannot reverse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import yaml
from engine_utils import INPUT

from kpid_zoo.budget import latency as lat
from kpid_zoo.budget import timing
from kpid_zoo.budget._table_layers import fuse_following, narrowed_unit, record_shapes, timed_layers
from kpid_zoo.budget.prune import latency_knapsack_prune
from kpid_zoo.budget.report import summary_table
from kpid_zoo.budget.timing import LatencySetting, Timing
from kpid_zoo.cli import main
from kpid_zoo.core.files import CACHE_ENV
from kpid_zoo.core.recipe import RUNTIME_NAMES, BudgetSpec, Recipe, RecipeError
from kpid_zoo.deploy import runtimes
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import magnitude_importance

pytest.importorskip('onnxruntime')
pytest.importorskip('openvino')

ORT = LatencySetting('cpu', 1, 1, 'onnxruntime')
FAST_GRID = (0.5, 1.0)
# A process in which OpenVINO's CPU plugin compiled and timed whole networks crashed (SIGSEGV, no Python frame at
# fault) minutes later in unrelated tests, when it forked a DataLoader worker and then started a subprocess. A
# pytest worker runs hundreds of tests, so the test that times networks in OpenVINO runs in a process of its own.
OPENVINO_CHILD = 'KPID_TEST_OPENVINO_CHILD'


def test_the_recipe_names_the_runtimes_the_deploy_layer_has():
    assert set(RUNTIME_NAMES) == set(runtimes.RUNTIMES)  # core may not import deploy: kept equal here


@pytest.mark.parametrize(
    'section, message',
    [
        (
            {'latency_ms': 4.0, 'runtime': 'tensorrt'},
            "budget.runtime: expected one of 'torch', 'onnxruntime', 'openvino', got 'tensorrt'",
        ),
        (
            {'latency_ms': 4.0, 'runtime': 'onnxruntime', 'device': 'cuda'},
            'budget.runtime: onnxruntime is timed on the CPU (device: cpu); device: cuda needs runtime: torch',
        ),
    ],
)
def test_runtime_field_errors_name_the_field(section, message):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({'name': 'x', 'parent': {'model': 'resnet18'}, 'budget': section}, source='r.yaml')
    assert str(e.value) == f'r.yaml: {message}'


def test_the_default_runtime_leaves_a_recipes_hash_as_it_was():
    base = {'name': 'x', 'parent': {'model': 'resnet18'}}
    torch_budget = Recipe.from_dict({**base, 'budget': {'latency_ms': 4.0}})
    assert torch_budget.budget.runtime == 'torch' and 'runtime' not in torch_budget.to_dict()['budget']
    ort = Recipe.from_dict({**base, 'budget': {'latency_ms': 4.0, 'runtime': 'onnxruntime'}})
    assert ort.to_dict()['budget']['runtime'] == 'onnxruntime' and ort.sha256() != torch_budget.sha256()
    assert Recipe.from_dict(ort.to_dict()) == ort and Recipe.from_dict(torch_budget.to_dict()) == torch_budget


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


def _one_line_before_any_work(tmp_path, capsys, args) -> str:
    assert main(args) == 2
    out, err = capsys.readouterr()
    err = err.strip()
    assert len(err.splitlines()) == 1 and 'r.yaml' in err and 'Traceback' not in err and not out.strip(), err
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'cache').exists()  # no table, no pruning
    return err


@pytest.mark.parametrize('runtime, package', [('onnxruntime', 'onnxruntime'), ('openvino', 'openvino')])
def test_a_runtime_that_is_not_installed_is_one_line_naming_its_package(
    tmp_path, capsys, monkeypatch, runtime, package
):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    # the runtime's own check (importlib's find_spec) looks for a module that no environment has
    monkeypatch.setattr(runtimes.RUNTIMES[runtime], 'module', 'kpid_zoo_no_such_module')
    created = []
    monkeypatch.setattr(timm, 'create_model', lambda *a, **k: created.append(a) or pytest.fail('made a model'))
    err = _one_line_before_any_work(tmp_path, capsys, _prune(tmp_path, {'latency_ratio': 0.7, 'runtime': runtime}))
    assert f'budget.runtime: runtime {runtime!r} needs the {package} package' in err
    assert "pip install 'kpid-zoo[deploy]'" in err and not created  # before the parent is made


def test_an_op_the_runtime_cannot_run_is_one_line_naming_the_layer_before_any_work(tmp_path, capsys, monkeypatch):
    """ONNX Runtime refusing one layer's graph (as it refuses an op it has no kernel for): the preflight compiles
    every unit the table will time, so the build stops there, naming the layer, the runtime and its reason."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    ort = runtimes.RUNTIMES['onnxruntime']
    real = type(ort).compile_onnx

    def refuse_one(self, data, shape, threads, *, what=''):
        if what == 'layer2.0.conv1+bn1+act1':
            raise self.unsupported(what, RuntimeError('NOT_IMPLEMENTED : Could not find an implementation for Conv'))
        return real(self, data, shape, threads, what=what)

    monkeypatch.setattr(type(ort), 'compile_onnx', refuse_one)
    err = _one_line_before_any_work(
        tmp_path, capsys, _prune(tmp_path, {'latency_ratio': 0.7, 'runtime': 'onnxruntime'})
    )
    assert 'resnet10t: layer2.0.conv1+bn1+act1: onnxruntime ' in err and 'cannot run it: NOT_IMPLEMENTED' in err


class _Bessel(nn.Module):
    """An activation made of an op neither of torch's ONNX exporters translates (the modified Bessel function)."""

    def forward(self, x):
        return torch.special.i0(x.clamp(-3, 3)) - 1


def test_an_op_the_exporter_cannot_translate_is_one_line_naming_the_layer(tmp_path, capsys, monkeypatch):
    """A real exporter failure, nothing simulated: resnet10t with one activation the exporters cannot translate.
    The preflight compiles each unit the table times and stops there, naming that layer and the op, before any
    table or pruning; nothing of the network's graph is printed."""
    import kpid_zoo.build as build

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / 'cache'))
    create = timm.create_model

    def with_bessel(*args, **kwargs):
        model = create(*args, **kwargs)
        model.layer2[0].act1 = _Bessel()
        return model

    monkeypatch.setattr(build.timm, 'create_model', with_bessel)
    err = _one_line_before_any_work(tmp_path, capsys, _prune(tmp_path, {'latency_ratio': 0.7, 'runtime': 'openvino'}))
    op = "No ONNX function found for <OpOverload(op='prims.bessel_i0'"  # torch.export's exporter names the op
    assert f'resnet10t: layer2.0.act1: torch.onnx (dynamo) cannot export it: {op}' in err


@pytest.fixture(scope='module')
def tiny():
    model = timm.create_model('resnet10t').eval()
    return model, discover_groups(model, INPUT)


def test_a_runtime_times_a_conv_with_its_norm_and_activation_as_one_unit(tiny):
    """conv -> BN -> ReLU is one unit (the runtimes fold the BN into the conv and run the ReLU in it); an activation
    after a residual add reads another value (the add wrote into BN's output in place), so it is not fused."""
    model, graph = tiny
    x = torch.randn(1, *INPUT)
    layers = record_shapes(model, timed_layers(model, graph), x)
    units = {u.name: u for u in fuse_following(model, layers, x)}
    assert 'layer1.0.conv1+bn1+act1' in units and 'conv1.0+1+2' in units  # the stem's Sequential too
    assert 'layer1.0.conv2+bn2' in units and 'layer1.0.act2' in units  # after `x += shortcut`: apart
    assert not any(n.endswith(('drop_block', '.aa')) for n in units)  # identities: no node in an exported graph
    unit = units['layer1.0.conv1+bn1+act1']
    assert unit.groups == tuple(dict.fromkeys(unit.groups)) and len(unit.groups) == 2  # the conv's in and out
    # at full width the unit computes what the block's three layers compute, in that order; narrowed, it is the
    # three narrowed on the same channels (the conv's output group sliced in the conv and in the BN alike)
    full = {g.name: g.size for g in graph.prunable}
    block = model.get_submodule('layer1.0')
    x = torch.randn(unit.shape)
    with torch.no_grad():
        torch.testing.assert_close(
            narrowed_unit(model, unit, graph, {g: full[g] for g in unit.groups})(x),
            block.act1(block.bn1(block.conv1(x))),
        )
    widths = {g: max(8, full[g] // 2) for g in unit.groups}
    narrow = narrowed_unit(model, unit, graph, widths)
    assert isinstance(narrow, nn.Sequential) and [type(m) for m in narrow] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]
    assert narrow[0].in_channels == widths[unit.groups[0]]
    assert narrow[0].out_channels == narrow[1].num_features == widths[unit.groups[1]]


class _CountingTimer:
    def __init__(self):
        self.calls = 0

    def __call__(self, fn, setting, warmup=3, repeats=15):
        fn()  # the compiled unit runs once: its session is real
        self.calls += 1
        return Timing.of([1.0 + 1e-3 * self.calls])


@pytest.mark.parametrize(
    'runtime',
    [
        'onnxruntime',
        pytest.param(
            'openvino',
            marks=pytest.mark.skipif(
                OPENVINO_CHILD not in os.environ, reason='runs in a process of its own (test_openvino_table_alone)'
            ),
        ),
    ],
)
def test_a_runtimes_table_has_a_key_of_its_own_and_is_reused_from_the_cache(tmp_path, tiny, runtime, monkeypatch):
    model, graph = tiny
    setting = LatencySetting('cpu', 1, 1, runtime)
    compiled = []
    rt = runtimes.RUNTIMES[runtime]
    real = type(rt).compile

    def counting(self, model, example, threads, *, exporter='dynamo', what=''):
        compiled.append((what, exporter))
        return real(self, model, example, threads, exporter=exporter, what=what)

    monkeypatch.setattr(type(rt), 'compile', counting)
    timer = _CountingTimer()

    def table(s=setting):
        return lat.latency_table(
            model, graph, 'resnet10t', INPUT, s, cache_dir=tmp_path, progress=False, timer=timer, fractions=FAST_GRID
        )

    first = table()
    built, sessions = timer.calls, len(compiled)
    assert {e for _, e in compiled[:-2]} == {'torchscript'} and [e for _, e in compiled[-2:]] == ['dynamo'] * 2
    assert sessions == built  # a session of its own per layer shape, then the whole network at both ends
    assert any('+' in t.module for t in first.terms)  # fused units
    key = first.key
    assert key['runtime'] == runtime and key['runtime_version'] == rt.version() and key['units'] == lat.FUSED_UNITS
    assert key['device_name'].endswith(f'/ {rt.describe()}')
    path = lat.cache_path(key, tmp_path)
    assert path.is_file() and path.name.startswith(f'resnet10t-{runtime}-')
    again = table()
    assert timer.calls == built and len(compiled) == sessions and again.to_dict() == first.to_dict()  # a hit
    torch_key = lat.table_key(model, 'resnet10t', INPUT, LatencySetting('cpu', 1, 1))
    assert torch_key != key and lat.cache_path(torch_key, tmp_path) != path
    assert 'runtime' not in torch_key  # eager PyTorch's key is as it was: tables cached before stay valid
    assert key.get('runtime_settings', {}) == rt.settings()  # OpenVINO has none: its older tables stay valid
    # another version of the runtime, or other settings, is another table
    monkeypatch.setattr(type(rt), 'settings', lambda self: {'session.some_option': '1'})
    assert lat.table_key(model, 'resnet10t', INPUT, setting) != key
    monkeypatch.setattr(type(rt), 'version', lambda self: '0.0.1')
    assert lat.table_key(model, 'resnet10t', INPUT, setting) != key


def test_onnx_runtime_sessions_stop_spinning_when_a_run_ends():
    """Two sessions timed in turn: the first one's threads must not spin on the cores the second one runs on."""
    pytest.importorskip('onnxruntime')
    options = runtimes.RUNTIMES['onnxruntime'].session_options(2)
    assert options.get_session_config_entry('session.force_spinning_stop') == '1'
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1


@pytest.mark.launch
def test_openvino_table_alone():
    """The OpenVINO case of the table test above, in a fresh Python process (see OPENVINO_CHILD)."""
    case = f'{__file__}::test_a_runtimes_table_has_a_key_of_its_own_and_is_reused_from_the_cache[openvino]'
    proc = subprocess.run(
        [sys.executable, '-m', 'pytest', '-q', '-n', '0', '-p', 'no:cacheprovider', case],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, OPENVINO_CHILD: '1'},
    )
    assert proc.returncode == 0 and '1 passed' in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_paired_timing_in_a_runtime_compiles_each_network_once(monkeypatch):
    """A net paired with itself, and a net paired with one 4x wider (16x the multiply-adds): each compiled once,
    the ratios made of the compiled calls. The only ordering asserted is the one 16x cannot reverse."""

    def net(width):
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU()
        ).eval()

    narrow, wide = net(32), net(128)
    ort = runtimes.RUNTIMES['onnxruntime']
    real = type(ort).compile
    compiled = []

    def counting(self, model, example, threads, *, exporter='dynamo', what=''):
        compiled.append((model, exporter, tuple(example.shape)))
        return real(self, model, example, threads, exporter=exporter, what=what)

    monkeypatch.setattr(type(ort), 'compile', counting)
    same = timing.measure_paired(narrow, narrow, (3, 32, 32), ORT, warmup=2, repeats=8)
    assert [(m, e, s) for m, e, s in compiled] == [(narrow, 'dynamo', (1, 3, 32, 32))]  # once, for both sides
    assert same.ratio.repeats == 8 and same.model.median_ms > 0 and same.reference.median_ms > 0
    paired = timing.measure_paired(narrow, wide, (3, 32, 32), ORT, warmup=2, repeats=8)
    assert [m for m, _, _ in compiled] == [narrow, wide]  # the narrow net's session reused, the wide one's made
    assert paired.ratio.median_ms < 1  # 1/16 of the multiply-adds
    noise_timing, noise = timing.measure_noise(narrow, (3, 32, 32), ORT)
    assert len(noise.ratios) == 3 and len(compiled) == 2 and noise_timing.median_ms > 0


def test_the_settings_describe_and_device_name_say_the_runtime():
    assert ORT.describe() == 'cpu (batch 1, 1 thread) in onnxruntime'
    assert LatencySetting().describe() == 'cpu (batch 1, 1 thread)'
    assert timing.device_name('cpu', 'openvino').endswith(f'/ {runtimes.RUNTIMES["openvino"].describe()}')
    assert timing.device_name('cpu') == timing.device_name('cpu', 'torch')


def test_prune_to_a_budget_measured_in_onnx_runtime_end_to_end(tmp_path, tiny):
    """Real timings in ONNX Runtime, table and loop: only what is recorded is checked, never how fast anything ran."""
    model, graph = tiny
    result = latency_knapsack_prune(
        model,
        graph,
        magnitude_importance(model, graph),
        BudgetSpec(latency_ratio=0.7, tolerance=0.3, runtime='onnxruntime'),
        arch='resnet10t',
        input_size=INPUT,
        max_rounds=3,
        cache_dir=tmp_path,
        table_kwargs={'fractions': FAST_GRID, 'warmup': 1, 'repeats': 3},
        progress=False,
    )
    version = runtimes.RUNTIMES['onnxruntime'].describe()
    out = result.report.latency
    assert out.runtime == version and out.device_name.endswith(version)
    assert out.table.startswith(str(tmp_path / 'resnet10t-onnxruntime-'))
    assert any('+' in t['module'] for t in json.loads(Path(out.table).read_text())['terms'])  # fused units
    rounds = result.report.rounds
    assert rounds and all(r['predicted_ms'] > 0 and r['measured_ms'] > 0 for r in rounds)
    assert out.budget_ms < out.parent_ms and result.report.achieved_gmacs < result.report.parent_gmacs
    if out.within_budget:
        assert out.measured_ms <= out.budget_ms
    else:
        assert out.note.startswith('stopped after') or 'still over the budget' in out.note
    assert out.runtime_settings == runtimes.RUNTIMES['onnxruntime'].settings()  # the report says what was timed
    summary = ' '.join(summary_table(result).split())
    assert f'runtime {version} (session.force_spinning_stop=1)' in summary
    assert 'round 1: predicted / measured ms' in summary
