"""publish(): the real huggingface_hub client uploads an export to a loopback Hub, and it downloads back intact."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from export_utils import TOKEN, export_pruned, pruned_spec, tiny_recipe
from hub_server import HubServer
from huggingface_hub import hf_hub_download

from kpid_zoo.zoo.publish import PublishError, publish, validate_export

REPO = 'kpid-test/kpid_tiny_test'
EXPORTED = ('model.safetensors', 'config.json', 'README.md', 'layer_widths.png')


@pytest.fixture(scope='module')
def export_dir(tmp_path_factory):
    _, folder = export_pruned(
        tmp_path_factory.mktemp('pub') / 'kpid_tiny_test',
        pruned_spec('resnet10t', 0.5),
        tiny_recipe(),
        name='kpid_tiny_test',
        num_classes=10,
    )
    return folder


@pytest.fixture
def hub(hf_env):
    with HubServer(token=TOKEN) as server:
        hf_env.set_endpoint(server.url)
        yield server
    assert not server.unhandled, f'client called endpoints the loopback hub lacks: {server.unhandled}'


def test_publish_then_download_back(hub, hf_env, export_dir, caplog, capsys, tmp_path):
    caplog.set_level(logging.DEBUG)
    url = publish(export_dir, REPO)
    assert url == f'{hub.url}/{REPO}'

    # the files landed on the Hub, weights + plot through LFS, text as regular git files
    for name in EXPORTED:
        stored = hub.file(REPO, name)
        assert stored.content == (export_dir / name).read_bytes(), name
        assert stored.lfs == name.endswith(('.safetensors', '.png')), name
    methods = [(m, p) for m, p, _ in hub.requests]
    assert ('POST', '/api/repos/create') in methods
    assert ('POST', f'/{REPO}.git/info/lfs/objects/batch') in methods
    assert ('POST', f'/api/models/{REPO}/commit/main') in methods
    writes = [h for m, p, h in hub.requests if m in ('POST', 'PUT') and not p.startswith('/_lfs/upload')]
    assert writes and all(h.get('authorization') == f'Bearer {TOKEN}' for h in writes)

    # download back into a fresh cache through hf_hub_download, byte for byte
    for name in EXPORTED:
        path = hf_hub_download(REPO, name, cache_dir=tmp_path / 'cache2')
        assert open(path, 'rb').read() == (export_dir / name).read_bytes(), name

    # the token is sent to the Hub and nowhere else: not logged, printed, or written into the folder
    out = capsys.readouterr()
    assert TOKEN not in caplog.text and TOKEN not in out.out and TOKEN not in out.err
    for p in export_dir.rglob('*'):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p
    for p in hf_env.cache_dir.parent.rglob('*'):
        if p.is_file():
            assert TOKEN.encode() not in p.read_bytes(), p


def test_republish_is_idempotent_and_branches_work(hub, export_dir, tmp_path):
    publish(export_dir, REPO, private=True)
    first = hub.repos[REPO].branches['main']
    publish(export_dir, REPO)  # exist_ok repo, unchanged files: no new commit
    assert hub.repos[REPO].branches['main'] == first
    assert hub.repos[REPO].private

    # a new branch starts from main; the same files make no new commit there either
    publish(export_dir, REPO, revision='v2', commit_message='second')
    assert hub.repos[REPO].branches['v2'] == first
    path = hf_hub_download(REPO, 'config.json', revision='v2', cache_dir=tmp_path / 'c')
    assert open(path, 'rb').read() == (export_dir / 'config.json').read_bytes()


def test_bad_token_is_a_clear_error_without_the_token(hub, export_dir, monkeypatch):
    wrong = 'hf_wrongTOKENwrongTOKENwrong00000000'
    with pytest.raises(PublishError) as err:
        publish(export_dir, REPO, token=wrong)
    assert 'write access' in str(err.value) and wrong not in str(err.value)
    monkeypatch.delenv('HF_TOKEN')
    with pytest.raises(PublishError, match='no Hugging Face token'):
        publish(export_dir, REPO)
    assert REPO not in hub.repos


@pytest.mark.parametrize(
    'damage, message',
    [
        (lambda d: (d / 'README.md').unlink(), r'missing README\.md'),
        (lambda d: (d / 'config.json').write_text('{not json'), r'config\.json: not valid JSON'),
        (
            lambda d: (d / 'config.json').write_text(json.dumps({'architecture': 'x', 'pretrained_cfg': {}})),
            r"config\.json: missing field 'model_args\.kpid_spec'",
        ),
        (
            lambda d: (d / 'model.safetensors').write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{}      '),
            r'model\.safetensors: (holds no tensors|sha256)',
        ),
        (lambda d: (d / 'pytorch_model.bin').write_bytes(b'pickle'), r'pickled checkpoint'),
    ],
)
def test_validate_export_names_the_problem(export_dir, tmp_path, damage, message):
    folder = tmp_path / 'copy'
    shutil.copytree(export_dir, folder)
    validate_export(folder)
    damage(folder)
    with pytest.raises(PublishError, match=message):
        validate_export(folder)


def test_record_keeps_one_architecture_per_name(hub, export_dir, tmp_path, monkeypatch, capsys):
    """`kpid-zoo publish --record`: the first build of a name is its default; the same widths with other weights
    become a new tag of it; other widths under the name are refused before anything is uploaded."""
    from kpid_zoo.cli import main
    from kpid_zoo.zoo import records as zoo

    monkeypatch.setattr(zoo, 'ZOO_DIR', tmp_path / 'zoo')
    (tmp_path / 'zoo').mkdir()
    publish_record = ['publish', '--repo-id', REPO, '--record']
    assert main(publish_record + [str(export_dir)]) == 0
    assert f'recorded kpid_tiny_test.kpid in {tmp_path / "zoo" / "kpid_tiny_test.json"}' in capsys.readouterr().out
    default = (tmp_path / 'zoo' / 'kpid_tiny_test.json').read_bytes()
    assert main(publish_record + [str(export_dir)]) == 0  # the same weights again: the same record
    assert sorted(p.name for p in (tmp_path / 'zoo').iterdir()) == ['kpid_tiny_test.json']

    spec = pruned_spec('resnet10t', 0.5)
    _, again = export_pruned(
        tmp_path / 'again' / 'kpid_tiny_test', spec, tiny_recipe(), name='kpid_tiny_test', num_classes=10
    )  # the same widths, fresh weights
    assert main(publish_record + [str(again)]) == 0
    assert 'recorded kpid_tiny_test.kpid_r2 in ' in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / 'zoo').iterdir()) == [
        'kpid_tiny_test.json',
        'kpid_tiny_test.kpid_r2.json',
    ]
    assert (tmp_path / 'zoo' / 'kpid_tiny_test.json').read_bytes() == default  # the default weights stay

    _, other = export_pruned(
        tmp_path / 'other' / 'kpid_tiny_test',
        pruned_spec('resnet10t', 0.25),
        tiny_recipe(),
        name='kpid_tiny_test',
        num_classes=10,
    )
    requests = len(hub.requests)
    assert main(publish_record + [str(other)]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith(
            'kpid-zoo publish: error: kpid_tiny_test: the zoo already records kpid_tiny_test (kpid-zoo build, '
        )
        and len(err.splitlines()) == 1
    )
    assert 'channel-group widths differ' in err and 'rename the recipe' in err
    assert len(hub.requests) == requests  # refused before the upload
    assert sorted(p.name for p in (tmp_path / 'zoo').iterdir()) == [
        'kpid_tiny_test.json',
        'kpid_tiny_test.kpid_r2.json',
    ]
