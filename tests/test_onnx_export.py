"""model.onnx in the export: written with the dynamo exporter and a dynamic batch axis, checked in ONNX Runtime on
real images within a tolerance derived from float32 rounding (kpid_zoo.deploy.rounding), recorded in config.json,
owned and published like the export's other files, added to older exports by `kpid-zoo export-onnx`, and skipped
in one line when the deploy extra is missing or the network cannot be exported."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')
onnx = pytest.importorskip('onnx')

from export_utils import export_pruned, pruned_spec, tiny_recipe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
from onnx_check import randomise_norms  # noqa: E402

from kpid_zoo.cli import main  # noqa: E402
from kpid_zoo.deploy.check import check_onnx  # noqa: E402
from kpid_zoo.deploy.onnx import INPUT_NAME, OPSET, OUTPUT_NAME, onnx_program  # noqa: E402
from kpid_zoo.deploy.rounding import LAMBDA, NoRoundingModel, U, float32_tolerance, gamma  # noqa: E402
from kpid_zoo.engine.surgery import build_pruned  # noqa: E402
from kpid_zoo.zoo._onnx import ONNX_FILE, OnnxSkipped, check_images, make_onnx  # noqa: E402
from kpid_zoo.zoo.export import check_export_folder  # noqa: E402
from kpid_zoo.zoo.publish import validate_export  # noqa: E402

NAME = 'kpid_onnx_test'
SIZE = (3, 64, 64)
CFG = {
    'input_size': SIZE,
    'crop_pct': 1.0,
    'interpolation': 'bicubic',
    'mean': (0.485, 0.456, 0.406),
    'std': (0.229, 0.224, 0.225),
}


@pytest.fixture(scope='module')
def images(cifar10_tarball) -> torch.Tensor:
    """4 real CIFAR-10 JPEGs, preprocessed at 64 px as an export's config.json says."""
    batch, what = check_images(CFG, cifar10_tarball)
    assert batch.shape == (4, *SIZE) and 'cifar10' in what
    return batch


@pytest.fixture(scope='module')
def exported(tmp_path_factory, images) -> Path:
    """A real export of resnet18 pruned by the engine to half its widths, with model.onnx checked on real images."""
    folder = tmp_path_factory.mktemp('onnx') / NAME
    spec = pruned_spec('resnet18', 0.5, input_size=SIZE)
    model = randomise_norms(build_pruned(spec, num_classes=10))
    from export_utils import make_report

    from kpid_zoo.zoo.export import export_model

    export_model(
        model,
        spec,
        folder,
        name=NAME,
        pretrained_cfg=CFG,
        metrics={'top1': 50.0, 'top5': 90.0},
        report=make_report(spec, model, 10),
        recipe=tiny_recipe(NAME, parent='resnet18'),
        images=images,
        images_from='4 CIFAR-10 test images',
    )
    return folder


def _config(folder: Path) -> dict:
    return json.loads((folder / 'config.json').read_text())


# ---------------------------------------------------------------------------------------------------------------
# the tolerance's arithmetic


def test_gamma_is_highams():
    assert gamma(1) == U / (1 - U)
    assert gamma(1000) == pytest.approx(1000 * 2.0**-24, rel=1e-4)
    with pytest.raises(ValueError):
        gamma(2**24)


def test_tolerance_of_one_linear_layer_is_its_own_rounding_scale():
    """One op: every run changes output j by exactly +-rho_j, so S_j = rho_j and the tolerance is lambda rho_j,
    rho = sqrt(n + 5) u (|W| |x| + |b|) + n 2^-126 (the module docstring's rule for a dot product of n terms)."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 7).eval()
    x = torch.randn(3, 48)
    program = torch.export.export(layer, (x,))
    tol = float32_tolerance(program, x)
    w, b = layer.weight.detach().double(), layer.bias.detach().double()
    rho = math.sqrt(48 + 5) * U * (x.double().abs() @ w.abs().T + b.abs()) + 48 * 2.0**-126
    torch.testing.assert_close(tol.exact, x.double() @ w.T + b, rtol=0, atol=1e-12)
    # each run measures rho as (y + rho r) - y in float64: that difference carries float64 rounding of |y|,
    # 2^-53 |y| against rho >= sqrt(53) 2^-24 |y|: a relative error below 2^-29 / 7 < 1e-9
    torch.testing.assert_close(tol.tolerance, LAMBDA * rho, rtol=1e-9, atol=0)


def test_tolerance_covers_pytorchs_float32_error_of_real_nets(images):
    """The derivation's own check: eager PyTorch's float32 output of every family lies within it."""
    for parent in ('efficientnet_b0', 'mobilenetv3_large_100', 'tf_efficientnet_lite0'):
        model = randomise_norms(build_pruned(pruned_spec(parent, 0.5, input_size=SIZE), num_classes=10))
        program = torch.export.export(model, (images,)).run_decompositions({})  # functional ops, as exported
        tol = float32_tolerance(program, images)
        with torch.no_grad():
            error = (model(images).double() - tol.exact).abs()
        assert (error <= tol.tolerance).all(), parent
        assert (error > 0).any(), f'{parent}: float32 equal to the exact value everywhere: nothing was measured'


def test_padding_and_clamping_are_exact_only_against_float32_constants():
    """TF-"same" padding and ReLU6 (the tf_ nets, EfficientNet-Lite) copy or compare values: no rounding of their
    own, so where the clamp passes a value on its tolerance is the conv's, and where it clamps there is none; a
    bound float32 cannot hold has no rule."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3).eval()
    x = torch.randn(2, 3, 8, 8)
    padded = F.pad(x, (0, 1, 0, 1))

    class PadConvReLU6(nn.Module):
        def __init__(self, bound: float):
            super().__init__()
            self.conv, self.bound = conv, bound

        def forward(self, x):
            return F.hardtanh(self.conv(F.pad(x, (0, 1, 0, 1))), 0.0, self.bound)

    tol = float32_tolerance(torch.export.export(PadConvReLU6(6.0), (x,)).run_decompositions({}), x)
    y = F.conv2d(padded.double(), conv.weight.double(), conv.bias.double())
    torch.testing.assert_close(tol.exact, y.clamp(0, 6), rtol=0, atol=1e-12)
    plain = float32_tolerance(torch.export.export(conv, (padded,)), padded)
    inside = (y > 0) & (y < 6)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(tol.tolerance[inside], plain.tolerance[inside], rtol=1e-9, atol=0)
    assert (tol.tolerance[~inside] == 0).all()
    with pytest.raises(NoRoundingModel, match='0.1'):
        float32_tolerance(torch.export.export(PadConvReLU6(0.1), (x,)).run_decompositions({}), x)


# ---------------------------------------------------------------------------------------------------------------
# the check


def _perturbed(data: bytes, initializer: str, index: int, delta: float) -> bytes:
    """The ONNX graph with one value of one initializer changed by `delta`."""
    from onnx import numpy_helper

    model = onnx.load_from_string(data)
    for init in model.graph.initializer:
        if init.name == initializer:
            array = numpy_helper.to_array(init).copy()
            array.reshape(-1)[index] += delta
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            return model.SerializeToString()
    raise AssertionError(f'no initializer {initializer}: {[i.name for i in model.graph.initializer]}')


@pytest.mark.parametrize(
    'parent', ['efficientnet_b0', 'mobilenetv3_large_100', 'tf_efficientnet_lite0', 'convnext_atto']
)
def test_check_passes_the_real_graph_and_fails_one_weight_moved_beyond_the_tolerance(parent, images):
    model = randomise_norms(build_pruned(pruned_spec(parent, 0.5, input_size=SIZE), num_classes=10))
    data, program = onnx_program(model, images[:2], what=parent)  # a batch of 2, as make_onnx exports
    tolerance = float32_tolerance(program, images)
    check = check_onnx(data, program, model, images, what=parent, tolerance=tolerance)
    assert check.passed, check.reason
    assert 0 < check.onnxruntime_max_ratio <= 1 and 0 < check.torch_max_ratio <= 1
    assert check.images == 4 and check.outputs == 40
    # the classifier's bias of class 3 moves logit 3 of every image by exactly delta: 3 tolerances is caught,
    # a quarter of the smallest is not (the float32 errors themselves are far below the tolerance)
    tol = tolerance.tolerance
    names = [i.name for i in onnx.load_from_string(data).graph.initializer]
    bias = next(n for n in names if n.endswith(('classifier.bias', 'head.fc.bias')))
    beyond = _perturbed(data, bias, 3, 3 * tol[:, 3].max().item())
    failed = check_onnx(beyond, program, model, images, what=parent, tolerance=tolerance)
    # logit 3 of image i is off by 3 max_k tol[k, 3] (+- the float32 error, 1e-2 tolerances at most): between 3 and
    # 3 max / min tolerances
    spread = (tol[:, 3].max() / tol[:, 3].min()).item()
    assert not failed.passed and 3 - 0.01 < failed.onnxruntime_max_ratio < 3 * spread + 0.01
    assert 'ONNX Runtime output (' in failed.reason and ', 3)' in failed.reason
    within = _perturbed(data, bias, 3, 0.25 * tol[:, 3].min().item())
    assert check_onnx(within, program, model, images, what=parent, tolerance=tolerance).passed


def test_check_passes_a_vision_transformer(images):
    """Attention (scaled dot-product, softmax), layer norms and GELU have rules of their own (the module
    docstring); a DeiT at the images' 64 px is checked like the convolutional nets, and fails the same way when one
    logit moves by a few tolerances."""
    import timm

    model = randomise_norms(timm.create_model('deit_tiny_patch16_224', img_size=SIZE[1:], num_classes=10))
    data, program = onnx_program(model, torch.zeros(2, *SIZE), what='deit_tiny')
    tolerance = float32_tolerance(program, images)
    check = check_onnx(data, program, model, images, what='deit_tiny', tolerance=tolerance)
    assert check.passed, check.reason
    assert 0 < check.onnxruntime_max_ratio <= 1 and 0 < check.torch_max_ratio <= 1
    names = [i.name for i in onnx.load_from_string(data).graph.initializer]
    bias = next(n for n in names if n.endswith('head.bias'))
    beyond = _perturbed(data, bias, 3, 3 * tolerance.tolerance[:, 3].max().item())
    assert not check_onnx(beyond, program, model, images, what='deit_tiny', tolerance=tolerance).passed


# ---------------------------------------------------------------------------------------------------------------
# the export


def test_export_writes_a_checked_model_onnx_and_records_it(exported, images):
    import onnxruntime as ort

    config = _config(exported)
    kpid = config['kpid']
    record = kpid['onnx']
    data = (exported / ONNX_FILE).read_bytes()
    assert record['file'] == ONNX_FILE and record['opset'] == OPSET == 18
    assert (record['input'], record['output']) == (INPUT_NAME, OUTPUT_NAME) == ('input', 'logits')
    assert record['input_shape'] == ['batch', *SIZE]
    assert record['dynamic_axes'] == {'input': {'0': 'batch'}, 'logits': {'0': 'batch'}}
    assert record['exporter'] == 'torch.onnx.export(dynamo=True)'
    assert record['versions']['torch'] == torch.__version__.split('+')[0]
    assert record['sha256'] == hashlib.sha256(data).hexdigest() == kpid['files'][ONNX_FILE]['sha256']
    assert record['size'] == len(data) == kpid['files'][ONNX_FILE]['size']
    assert record['weights_sha256'] == kpid['weights_sha256']
    check = record['check']
    assert check['passed'] and check['inputs'] == '4 CIFAR-10 test images' and check['images'] == 4
    assert 0 < check['onnxruntime_max_ratio'] <= 1
    # the graph declares what config.json says, and runs any batch size
    graph = onnx.load_from_string(data)
    assert [o.version for o in graph.opset_import if o.domain in ('', 'ai.onnx')] == [18]
    dims = graph.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == list(SIZE)
    import timm

    model = timm.create_model(f'local-dir:{exported}', pretrained=True).eval()
    session = ort.InferenceSession(data, providers=['CPUExecutionProvider'])
    for n in (1, 3):
        got = session.run(None, {'input': images[:n].numpy()})[0]
        assert got.shape == (n, 10)
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(got), model(images[:n]), rtol=1e-4, atol=1e-4)
    card = (exported / 'README.md').read_text()
    assert '## ONNX' in card and 'onnxruntime' in card and record['sha256'] in card
    validate_export(exported)  # publish takes it as it is


def test_card_mentions_onnx_only_when_there_is_one(tmp_path):
    _, folder = export_pruned(tmp_path / 'x', pruned_spec('resnet10t', 0.5), tiny_recipe(), name='x', num_classes=10)
    config = _config(folder)
    assert not (folder / ONNX_FILE).exists() and ONNX_FILE not in config['kpid']['files']
    assert config['kpid']['onnx'] == {'file': None, 'skipped': 'not asked for (export_model(onnx=False))'}
    assert 'onnx' not in (folder / 'README.md').read_text().lower()


def test_publish_refuses_a_model_onnx_the_config_does_not_vouch_for(exported, tmp_path):
    from kpid_zoo.errors import PublishError

    out = Path(shutil.copytree(exported, tmp_path / 'out'))
    config = _config(out)
    config['kpid']['onnx']['weights_sha256'] = '0' * 64  # exported from other weights
    (out / 'config.json').write_text(json.dumps(config, indent=2))
    with pytest.raises(PublishError, match='exported from other weights'):
        validate_export(out)
    shutil.rmtree(out)
    out = Path(shutil.copytree(exported, tmp_path / 'out'))
    elsewhere = tmp_path / 'model-elsewhere.onnx'
    shutil.move(out / ONNX_FILE, elsewhere)  # the same bytes, through a link
    (out / ONNX_FILE).symlink_to(elsewhere)
    with pytest.raises(PublishError, match='a symlink to'):
        validate_export(out)
    with pytest.raises(ValueError, match='model.onnx'):
        check_export_folder(out, NAME)


def test_a_new_export_replaces_its_own_model_onnx(exported, tmp_path, images):
    """Ownership: model.onnx is one of the export's files, so the next export of the entry replaces the folder."""
    out = Path(shutil.copytree(exported, tmp_path / 'out'))
    check_export_folder(out, NAME)  # no refusal
    (out / ONNX_FILE).write_bytes(b'a different graph')
    with pytest.raises(ValueError, match='not the bytes kpid-zoo wrote'):
        check_export_folder(out, NAME)


# ---------------------------------------------------------------------------------------------------------------
# export-onnx on an older export


def _older(exported: Path, dest: Path) -> Path:
    """`exported` as kpid-zoo wrote it before exports had model.onnx: no file, no kpid.onnx, the card without it."""
    from kpid_zoo.zoo.card import ONNX_HEADING

    out = Path(shutil.copytree(exported, dest))
    (out / ONNX_FILE).unlink()
    card = (out / 'README.md').read_text()
    start = card.index('\n' + ONNX_HEADING)
    card = card[:start] + card[card.index('\n## ', start + 1) :]
    (out / 'README.md').write_text(card)
    config = _config(out)
    del config['kpid']['onnx'], config['kpid']['files'][ONNX_FILE]
    config['kpid']['files']['README.md'] = {
        'sha256': hashlib.sha256(card.encode()).hexdigest(),
        'size': len(card.encode()),
    }
    (out / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
    validate_export(out)
    return out


def test_export_onnx_adds_it_to_an_older_export_once(exported, tmp_path, cifar10_tarball, capsys):
    out = _older(exported, tmp_path / 'old')
    assert main(['export-onnx', str(out), '--images', str(cifar10_tarball)]) == 0
    said = capsys.readouterr().out
    assert f'{out / ONNX_FILE}: written' in said and 'opset 18' in said
    config = _config(out)
    assert config['kpid']['onnx']['check']['passed']
    assert config['kpid']['onnx']['sha256'] == hashlib.sha256((out / ONNX_FILE).read_bytes()).hexdigest()
    assert '## ONNX' in (out / 'README.md').read_text()
    validate_export(out)  # publish: every file listed, every sha256 right
    check_export_folder(out, NAME)  # ownership: the next build may replace it
    import timm

    timm.create_model(f'local-dir:{out}', pretrained=True)  # the loader's checks: the binding still holds
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(['export-onnx', str(out), '--images', str(cifar10_tarball)]) == 0
    assert 'up to date' in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize('kind', ['user-file', 'symlink'])
def test_export_onnx_never_replaces_a_model_onnx_the_export_did_not_write(exported, tmp_path, capsys, kind):
    out = _older(exported, tmp_path / 'old')
    if kind == 'user-file':
        (out / ONNX_FILE).write_bytes(b'my own graph')
    else:
        (tmp_path / 'mine.onnx').write_bytes(b'my own graph')
        (out / ONNX_FILE).symlink_to(tmp_path / 'mine.onnx')
    before = {p.name: (p.is_symlink(), p.read_bytes()) for p in out.iterdir()}
    assert main(['export-onnx', str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f'{out / ONNX_FILE}' in err and 'did not write' in err, err
    assert {p.name: (p.is_symlink(), p.read_bytes()) for p in out.iterdir()} == before
    assert (tmp_path / 'mine.onnx').read_bytes() == b'my own graph' if kind == 'symlink' else True


def test_export_onnx_refuses_a_folder_that_is_no_export(tmp_path, capsys):
    (tmp_path / 'config.json').write_text('{"mine": true}')
    assert main(['export-onnx', str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'config.json' in err and 'not a kpid-zoo export' in err, err
    assert main(['export-onnx', str(tmp_path / 'missing')]) == 2
    assert 'missing' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# without the deploy extra, and networks that cannot be exported


def test_without_the_deploy_extra_the_export_says_once_what_it_skipped(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setitem(sys.modules, 'onnxruntime', None)  # import onnxruntime fails, find_spec finds nothing
    with caplog.at_level(logging.INFO, logger='kpid_zoo'):
        _, folder = export_pruned(
            tmp_path / 'x', pruned_spec('resnet10t', 0.5), tiny_recipe(), name='x', num_classes=10, onnx=True
        )
    said = [r.getMessage() for r in caplog.records if 'onnx' in r.getMessage().lower()]
    assert len(said) == 1 and "pip install 'kpid-zoo[deploy]'" in said[0] and 'onnxruntime' in said[0], said
    assert sorted(p.name for p in folder.iterdir()) == [
        'README.md',
        'config.json',
        'layer_widths.png',
        'model.safetensors',
    ]
    record = _config(folder)['kpid']['onnx']
    assert record['file'] is None and 'deploy extra is not installed' in record['skipped']
    validate_export(folder)
    assert main(['export-onnx', str(folder)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'kpid-zoo[deploy]'" in err and 'onnxruntime' in err, err


class _Mish(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.Mish()  # an activation the tolerance has no rule for

    def forward(self, x):
        return self.act(self.conv(x)).mean((2, 3))


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:  # control flow on a value: torch.export cannot trace it
            return y.mean((2, 3))
        return y.amax((2, 3))


def test_an_op_the_check_or_the_exporter_cannot_handle_is_one_line_naming_net_and_op(images):
    with pytest.raises(OnnxSkipped) as e:
        make_onnx(_Mish().eval(), SIZE, images, name='mish_net', inputs='4 images')
    text = str(e.value)
    assert '\n' not in text and 'mish_net' in text and 'mish' in text.replace('mish_net', '') and 'no rule' in text
    with pytest.raises(OnnxSkipped) as e:
        make_onnx(_DataDependent().eval(), SIZE, images, name='branchy_net', inputs='4 images')
    text = str(e.value)
    assert '\n' not in text and 'branchy_net' in text and 'cannot export' in text


def test_the_export_stage_commits_and_reuses_a_result_without_model_onnx(tmp_path):
    """A build whose export skipped model.onnx (no deploy extra, an op it cannot run) records what it wrote and
    finds it up to date on the next run; a result that had model.onnx and lost it is redone."""
    from kpid_zoo.core.provenance import Stage

    out = tmp_path / 'out'
    out.mkdir()
    for name in ('model.safetensors', 'config.json'):
        (out / name).write_text(name)
    files = ('model.safetensors', 'config.json', ONNX_FILE)
    stage = Stage('export', tmp_path / 'work', out, files, {'a': 1}, optional=(ONNX_FILE,))
    assert not stage.check()
    stage.begin()
    stage.commit()
    assert Stage('export', tmp_path / 'work', out, files, {'a': 1}, optional=(ONNX_FILE,)).check()
    assert not Stage('export', tmp_path / 'work', out, files, {'a': 1}).check()  # required: not there
    (out / ONNX_FILE).write_text('graph')
    stage.commit()
    (out / ONNX_FILE).unlink()
    assert not Stage('export', tmp_path / 'work', out, files, {'a': 1}, optional=(ONNX_FILE,)).check()
