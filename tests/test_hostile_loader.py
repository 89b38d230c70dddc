"""Loaded files are untrusted input: config.json is data (never a path), bound to its weights, and checked at load.

Every case here is an export (a real pruned resnet10t, 10 classes) with one thing in its config.json changed the
way a careless edit or a hostile Hub repo would change it, loaded the way a user loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import timm
import torch
from export_utils import TOKEN, make_report, pruned_spec, tiny_recipe
from hub_server import HubServer
from huggingface_hub import HfApi

import kpid_zoo  # noqa: F401  (registers kpid_pruned)
from kpid_zoo.cli import main as cli_main
from kpid_zoo.core.recipe import Recipe
from kpid_zoo.engine.surgery import ArchSpec, build_pruned
from kpid_zoo.training.parent import create_parent
from kpid_zoo.zoo.export import bound_digests, export_model, parse_config
from kpid_zoo.zoo.publish import PublishError, validate_export
from kpid_zoo.zoo.registry import KpidHubError, KpidWeightsError

SIZE = (3, 64, 64)
CLASSES = 10
LABELS = [f'class_{i}' for i in range(CLASSES)]
X = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))
FAST = 5.0  # seconds: the bound on failing against an unreachable Hub


@pytest.fixture(scope='module')
def export(tmp_path_factory):
    """(model, folder): resnet10t at half width, 10 classes with their names, exported."""
    spec = pruned_spec('resnet10t', 0.5, input_size=SIZE)
    torch.manual_seed(0)
    model = build_pruned(spec, num_classes=CLASSES).eval()
    folder = export_model(
        model,
        spec,
        tmp_path_factory.mktemp('hostile') / 'kpid_tiny_test',
        name='kpid_tiny_test',
        pretrained_cfg=dict(
            input_size=SIZE,
            crop_pct=0.875,
            interpolation='bicubic',
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
            label_names=LABELS,
        ),
        metrics=dict(top1=71.25, top5=90.5),
        report=make_report(spec, model, CLASSES),
        recipe=tiny_recipe(),
    )
    return model, folder


def edited(export_dir: Path, tmp_path: Path, edit, *, rebind: bool = False) -> Path:
    """A copy of the export whose config.json `edit` changed; `rebind`: digests recomputed, as a hostile publisher
    would (then only the checks of what the fields say stand in the way)."""
    folder = tmp_path / 'edited'
    shutil.copytree(export_dir, folder)
    config = json.loads((folder / 'config.json').read_text())
    edit(config)
    if rebind:
        config['kpid']['bound'], config['kpid']['bound_sha256'] = bound_digests(
            *parse_config(config), config['kpid']['weights_sha256']
        )
    (folder / 'config.json').write_text(json.dumps(config, indent=2))
    return folder


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert '\n' not in msg and len(msg) < 1000, msg
    return msg


def without_hanging(fn, fifo: Path, seconds: float = 60):
    """fn() in a thread; if it is still running after `seconds` it is blocked on the FIFO: unblock it, and fail."""
    out: dict = {}

    def run():
        try:
            out['value'] = fn()
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            out['error'] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # a writer came and went: the reader sees EOF
        thread.join(10)
        pytest.fail(f'the load blocked reading {fifo}')
    if 'error' in out:
        raise out['error']
    return out.get('value')


def set_path(keys: str, value):
    def edit(config):
        node = config
        *parents, last = keys.split('.')
        for key in parents:
            node = node[key]
        node[last] = value

    return edit


# ---------------------------------------------------------------------------------------------------------------
# config.json is data: never a path, and its model arguments cannot name files


@pytest.mark.parametrize('pretrained', [False, True])
@pytest.mark.parametrize('target', ['spec_file', 'fifo'])
def test_a_spec_given_as_a_path_is_refused_unread(export, tmp_path, target, pretrained):
    model, folder = export
    path = tmp_path / target
    if target == 'fifo':
        os.mkfifo(path)  # reading it blocks until a writer comes: a load that opens it hangs
    else:  # a valid spec: a loader that follows the path builds from a file the export does not hold
        path.write_text(json.dumps(json.loads((folder / 'config.json').read_text())['model_args']['kpid_spec']))
    copy = edited(folder, tmp_path, set_path('model_args.kpid_spec', str(path)), rebind=True)
    with pytest.raises(KpidWeightsError) as err:
        without_hanging(lambda: timm.create_model(f'local-dir:{copy}', pretrained=pretrained), path)
    msg = one_line(err)
    assert msg.startswith(f'{copy / "config.json"}: model_args.kpid_spec: ') and 'never a path' in msg


def test_a_python_caller_names_a_saved_spec_explicitly(export, tmp_path):
    model, folder = export
    spec = json.loads((folder / 'config.json').read_text())['model_args']['kpid_spec']
    ArchSpec.from_dict(spec).save(tmp_path / 'spec.json')
    with pytest.raises(KpidWeightsError, match=r'kpid_spec: .*never a path.*kpid_spec=ArchSpec\.load\(path\)'):
        timm.create_model('kpid_pruned', kpid_spec=str(tmp_path / 'spec.json'))
    built = timm.create_model('kpid_pruned', kpid_spec=ArchSpec.load(tmp_path / 'spec.json'), num_classes=CLASSES)
    assert [p.shape for p in built.parameters()] == [p.shape for p in model.parameters()]
    fifo = tmp_path / 'spec.fifo'
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match='not a regular file'):
        without_hanging(lambda: ArchSpec.load(fifo), fifo)


def test_model_args_cannot_point_timm_at_a_file(export, tmp_path):
    model, folder = export
    other = tmp_path / 'elsewhere.safetensors'  # a loadable checkpoint outside the export
    shutil.copy(folder / 'model.safetensors', other)
    copy = edited(folder, tmp_path, set_path('model_args.checkpoint_path', str(other)), rebind=True)
    with pytest.raises(KpidWeightsError) as err:
        timm.create_model(f'local-dir:{copy}')
    assert one_line(err).startswith(f'{copy / "config.json"}: model_args.checkpoint_path is not allowed')


@pytest.mark.parametrize(
    'field, value',
    [
        ('parent', 'local-dir:/etc'),
        ('parent', ['resnet18']),
        ('parent', 'kpid_pruned'),
        ('widths', {'layer1.0.conv1': True}),
        ('widths', {'../../etc': 4}),
        ('input_size', '224'),
        ('input_size', [3, 100000, 100000]),
        ('parent_kwargs', {'checkpoint_path': '/etc/passwd'}),
        ('parent_kwargs', {'pretrained_cfg_overlay': {'file': '/etc/passwd'}}),
        ('parent_kwargs', {'drop_rate': {'nested': 1}}),
        ('version', True),
    ],
)
def test_every_spec_field_is_checked(field, value):
    spec = dict(parent='resnet18', widths={'layer1.0.conv1': 32}, input_size=[3, 64, 64], parent_kwargs={})
    with pytest.raises(ValueError, match=rf'^config\.json: model_args\.kpid_spec: .*{field}'):
        ArchSpec.from_dict({**spec, field: value}, source='config.json: model_args.kpid_spec')


# ---------------------------------------------------------------------------------------------------------------
# spec, class count and preprocessing are bound to the weights

DIFFERS = 'differs from the value bound to the weights at export'


@pytest.mark.parametrize(
    'keys, value, field',
    [
        ('pretrained_cfg.mean', [0.5, 0.5, 0.5], f'pretrained_cfg.mean {DIFFERS}'),
        ('pretrained_cfg.std', [0.5, 0.5, 0.5], f'pretrained_cfg.std {DIFFERS}'),
        ('pretrained_cfg.input_size', [3, 96, 96], f'pretrained_cfg.input_size {DIFFERS}'),
        ('pretrained_cfg.interpolation', 'nearest', f'pretrained_cfg.interpolation {DIFFERS}'),
        ('pretrained_cfg.crop_pct', 1.0, f'pretrained_cfg.crop_pct {DIFFERS}'),
        ('pretrained_cfg.label_names', LABELS[::-1], f'pretrained_cfg.label_names {DIFFERS}'),
        ('num_classes', 5, f'pretrained_cfg.num_classes {DIFFERS}'),  # timm reads the top-level one into the cfg
        ('model_args.num_classes', 5, f'model_args.num_classes {DIFFERS}'),
        ('model_args.kpid_spec.widths.layer1.0.conv1', 16, f'model_args.kpid_spec.widths {DIFFERS}'),
        ('model_args.kpid_spec.parent', 'resnet14t', f'model_args.kpid_spec.parent {DIFFERS}'),
        ('model_args.global_pool', 'max', f'model_args.global_pool {DIFFERS}'),
        ('model_args.drop_rate', 0.5, 'model_args.drop_rate was not there at export'),
    ],
)
def test_a_tampered_field_is_named(export, tmp_path, keys, value, field):
    _, folder = export
    if keys.startswith('model_args.kpid_spec.widths.'):
        group = keys[len('model_args.kpid_spec.widths.') :]
        edit = lambda c: c['model_args']['kpid_spec']['widths'].__setitem__(group, value)  # noqa: E731
    else:
        edit = set_path(keys, value)
    copy = edited(folder, tmp_path, edit)
    for pretrained in (True, False):  # the preprocessing is used with or without the weights
        with pytest.raises(KpidWeightsError) as err:
            timm.create_model(f'local-dir:{copy}', pretrained=pretrained)
        msg = one_line(err)
        assert msg.startswith(f'{copy / "config.json"}: {field} ('), msg
        assert str(value) not in msg.replace(str(copy), '')  # names the field, does not echo the file


def test_the_cli_names_the_field_and_exits_2(export, tmp_path, capsys):
    _, folder = export
    copy = edited(folder, tmp_path, set_path('pretrained_cfg.mean', [0.5, 0.5, 0.5]))
    assert cli_main(['flops', f'local-dir:{copy}']) == 2
    err = capsys.readouterr().err
    assert err.startswith(f'kpid-zoo flops: error: {copy / "config.json"}: pretrained_cfg.mean differs ')
    assert err.count('\n') == 1 and 'Traceback' not in err


def test_a_tampered_hub_repo_is_named(export, tmp_path, hf_env):
    _, folder = export
    copy = edited(folder, tmp_path, set_path('pretrained_cfg.mean', [0.5, 0.5, 0.5]))
    with HubServer(token=TOKEN) as hub:
        hf_env.set_endpoint(hub.url)
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo('kpid-test/tampered')
        api.upload_folder(repo_id='kpid-test/tampered', folder_path=copy)
        with pytest.raises(KpidWeightsError) as err:
            timm.create_model('hf-hub:kpid-test/tampered', pretrained=True)
    msg = one_line(err)
    assert msg.startswith(str(hf_env.cache_dir))  # the config.json that was downloaded, named
    assert 'config.json: pretrained_cfg.mean differs from the value bound to the weights at export' in msg


def test_the_digest_table_itself_is_bound(export, tmp_path):
    _, folder = export

    def edit(config):  # the mean changed and its digest with it, the overall digest left as it was
        config['pretrained_cfg']['mean'] = [0.5, 0.5, 0.5]
        bound, _ = bound_digests(*parse_config(config), config['kpid']['weights_sha256'])
        config['kpid']['bound'] = bound

    copy = edited(folder, tmp_path, edit)
    with pytest.raises(KpidWeightsError, match=r'kpid\.bound_sha256 does not match kpid\.bound'):
        timm.create_model(f'local-dir:{copy}', pretrained=True)


def test_an_export_without_a_binding_is_refused_with_weights(export, tmp_path, caplog):
    model, folder = export

    def edit(config):  # as kpid-zoo format 1 wrote it
        config['kpid']['format_version'] = 1
        config['kpid'].pop('bound', None), config['kpid'].pop('bound_sha256', None)

    copy = edited(folder, tmp_path, edit)
    with pytest.raises(KpidWeightsError) as err:
        timm.create_model(f'local-dir:{copy}', pretrained=True)
    msg = one_line(err)
    assert 'kpid.bound is missing: exported by an older kpid-zoo (format 1)' in msg
    assert 're-export it' in msg and 'kpid-zoo build <recipe>' in msg
    # the architecture alone: built, with a warning that says what is unchecked
    arch = timm.create_model(f'local-dir:{copy}')
    assert [p.shape for p in arch.parameters()] == [p.shape for p in model.parameters()]
    assert 'kpid.bound is missing' in caplog.text and 'preprocessing unchecked' in caplog.text
    with pytest.raises(PublishError, match='kpid.bound is missing'):
        validate_export(copy)


# ---------------------------------------------------------------------------------------------------------------
# publish: widths that do not fit the weights


def test_publish_refuses_widths_that_do_not_fit_the_weights(export, tmp_path):
    _, folder = export
    validate_export(folder)
    narrower = lambda c: c['model_args']['kpid_spec']['widths'].__setitem__('layer1.0.conv1', 16)  # noqa: E731
    # a consistent config (its digests recomputed) for other weights: the shapes say it
    copy = edited(folder, tmp_path, narrower, rebind=True)
    with pytest.raises(PublishError) as err:
        validate_export(copy)
    msg = one_line(err)
    assert msg.startswith(
        f"{copy / 'model.safetensors'}: tensor 'layer1.0.conv1.weight' has shape (32, 32, 3, 3) "
        f'but the spec in {copy / "config.json"} builds (16, 32, 3, 3)'
    ), msg
    # edited by hand, digests untouched: the field is named
    shutil.rmtree(copy)
    copy = edited(folder, tmp_path, narrower)
    with pytest.raises(PublishError, match=r'config\.json: model_args\.kpid_spec\.widths differs'):
        validate_export(copy)


# ---------------------------------------------------------------------------------------------------------------
# the class count round-trips


def test_the_class_count_round_trips(export, tmp_path):
    model, folder = export
    with torch.no_grad():
        want = model(X)
    config = json.loads((folder / 'config.json').read_text())
    assert config['pretrained_cfg']['num_classes'] == CLASSES and config['pretrained_cfg']['label_names'] == LABELS

    for kwargs in ({}, {'num_classes': CLASSES}):
        loaded = timm.create_model(f'local-dir:{folder}', pretrained=True, **kwargs).eval()
        assert loaded.pretrained_cfg['label_names'] == LABELS
        with torch.no_grad():
            torch.testing.assert_close(loaded(X), want, rtol=0, atol=0)  # same weights, same kernels: exact
    # the generic architecture given the export's spec and its weights file: the trained head is kept
    generic = timm.create_model(
        'kpid_pruned',
        pretrained=True,
        kpid_spec=config['model_args']['kpid_spec'],
        num_classes=CLASSES,
        pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')),
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(generic(X), want, rtol=0, atol=0)

    # another class count: timm replaces the head (a fresh one), the features are the trained ones
    five = timm.create_model(f'local-dir:{folder}', pretrained=True, num_classes=5).eval()
    with torch.no_grad():
        assert five(X).shape == (2, 5)
        torch.testing.assert_close(five.forward_features(X), model.forward_features(X), rtol=0, atol=0)
    assert five.fc.weight.shape == (5, model.fc.in_features)


# ---------------------------------------------------------------------------------------------------------------
# an unreachable Hub fails in seconds, in one line


@pytest.fixture
def silent_endpoint():
    """A port that accepts connections (into the listen backlog) and never answers: the timeout path."""
    sock = socket.socket()
    sock.bind(('127.0.0.1', 0))
    sock.listen(64)
    yield f'http://127.0.0.1:{sock.getsockname()[1]}'
    sock.close()


@pytest.mark.parametrize('endpoint', ['refused', 'silent'])
def test_an_unreachable_hub_fails_fast_in_one_line(hf_env, monkeypatch, silent_endpoint, endpoint):
    monkeypatch.delenv('HF_HUB_ETAG_TIMEOUT', raising=False)
    if endpoint == 'silent':
        hf_env.set_endpoint(silent_endpoint)  # hf_env's default endpoint is a closed port: refused at once
    start = time.monotonic()
    with pytest.raises(KpidHubError) as err:
        timm.create_model('kpid_effnet_b0', pretrained=True)
    assert time.monotonic() - start < FAST
    msg = one_line(err)
    assert msg.startswith(
        'kpid_effnet_b0: cannot get pretrained weights model.safetensors from '
        'timm/efficientnet_b1_pruned.in1k (HubUnreachableError: cannot reach the Hub at '
    )
    assert 'set HF_HUB_OFFLINE=1' in msg and isinstance(err.value, OSError)


def test_an_unreachable_hub_fails_fast_for_exports_parents_and_the_cli(export, hf_env, capsys):
    _, folder = export
    with HubServer(token=TOKEN) as hub:
        hf_env.set_endpoint(hub.url)
        api = HfApi(endpoint=hub.url, token=TOKEN)
        api.create_repo('kpid-test/tiny')
        api.upload_folder(repo_id='kpid-test/tiny', folder_path=folder)
        timm.create_model('hf-hub:kpid-test/tiny')  # config.json cached: the weights are not
    # no Hub at all: a closed port refuses connections at once, as a machine with no network does
    endpoint = 'http://127.0.0.1:9'
    hf_env.set_endpoint(endpoint)
    start = time.monotonic()
    with pytest.raises(KpidHubError) as err:
        timm.create_model('hf-hub:kpid-test/tiny', pretrained=True)
    assert time.monotonic() - start < FAST
    assert one_line(err).startswith(
        f'kpid_pruned: cannot get pretrained weights model.safetensors from kpid-test/tiny '
        f'(HubUnreachableError: cannot reach the Hub at {endpoint}'
    )

    recipe = Recipe.from_dict({**tiny_recipe().to_dict(), 'parent': dict(model='resnet10t', weights='timm')})
    start = time.monotonic()
    with pytest.raises(OSError) as err:
        create_parent(recipe)
    assert time.monotonic() - start < FAST
    assert 'parent.weights: timm pretrained weights of resnet10t are not available' in one_line(err)

    capsys.readouterr()  # the upload's progress bars
    start = time.monotonic()
    assert cli_main(['flops', 'hf-hub:kpid-test/never-downloaded']) == 2
    assert time.monotonic() - start < FAST
    err = capsys.readouterr().err
    assert err.startswith('kpid-zoo flops: error: cannot reach the Hub at http://127.0.0.1:9 ') and err.count('\n') == 1
