"""Where `dataset: cifar10` gets its images: the explicit locations, the JPEG tarball beside the checkout, else the
official CIFAR-10 downloaded into the cache and checked by its md5 (here from a local HTTP server holding a small
archive of the official layout, so the real download, check and unpack run); offline, one line and exit 2.
Tarballs are hostile input: a member aimed outside the target, a file that is not a .tar.gz, a partial or corrupted
download, a killed unpack never leave anything that a later run uses."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import pickle
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.datasets import CIFAR10

from kpid_zoo.cli import main
from kpid_zoo.core.recipe import DataSpec
from kpid_zoo.errors import DataUnavailableError
from kpid_zoo.training import cifar10 as kcifar10
from kpid_zoo.training.cifar10 import CIFAR10_CLASSES, prepare_cifar10, resolve_cifar10, unpack_tarball
from kpid_zoo.training.data import create_loaders

OFFICIAL_FILES = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
PER_BATCH = 4  # images per pickled batch: 20 train images, 4 test images


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _official_archive() -> tuple[bytes, dict[str, bytes]]:
    """A .tar.gz of the official layout (cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta: the
    pickled dicts torchvision reads), with PER_BATCH random 32x32 images a batch."""
    rng = np.random.default_rng(0)
    files = {}
    for b, name in enumerate(OFFICIAL_FILES):
        files[name] = pickle.dumps(
            {
                'batch_label': name,
                'labels': [(b * PER_BATCH + i) % 10 for i in range(PER_BATCH)],
                'data': rng.integers(0, 256, (PER_BATCH, 3072), dtype=np.uint8),
                'filenames': [f'{name}_{i}.png' for i in range(PER_BATCH)],
            }
        )
    files['batches.meta'] = pickle.dumps(
        {'label_names': list(CIFAR10_CLASSES), 'num_cases_per_batch': PER_BATCH, 'num_vis': 3072}
    )
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode='w:gz') as tf:
        for name, payload in files.items():
            info = tarfile.TarInfo(f'cifar-10-batches-py/{name}')
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return buf.getvalue(), files


ARCHIVE, FILES = _official_archive()


class _Server:
    """A local HTTP server: `payload` at /cifar-10-python.tar.gz; counts the requests for it."""

    def __init__(self):
        self.payload, self.requests = ARCHIVE, 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802  (http.server's name)
                owner.requests += 1
                self.send_response(200)
                self.send_header('Content-Length', str(len(owner.payload)))
                self.end_headers()
                self.wfile.write(owner.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.url = f'http://127.0.0.1:{self.httpd.server_port}/cifar-10-python.tar.gz'
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def no_local_copy(tmp_path, monkeypatch) -> Path:
    """Nothing beside the checkout, no $KPID_CIFAR10_TAR, an empty cache (returned); the official set's published
    checksums are those of the small stand-in archive."""
    monkeypatch.setattr(kcifar10, '_REPO_ROOT', tmp_path / 'clone' / 'repo')
    (tmp_path / 'clone' / 'repo').mkdir(parents=True)
    monkeypatch.chdir(tmp_path / 'clone' / 'repo')
    monkeypatch.delenv('KPID_CIFAR10_TAR', raising=False)
    monkeypatch.setenv('KPID_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setattr(kcifar10, 'CIFAR10_MD5', _md5(ARCHIVE))
    monkeypatch.setattr(CIFAR10, 'train_list', [[n, _md5(FILES[n])] for n in OFFICIAL_FILES[:5]])
    monkeypatch.setattr(CIFAR10, 'test_list', [['test_batch', _md5(FILES['test_batch'])]])
    monkeypatch.setattr(CIFAR10, 'meta', {**CIFAR10.meta, 'md5': _md5(FILES['batches.meta'])})
    return tmp_path / 'cache'


@pytest.fixture
def server(monkeypatch):
    srv = _Server()
    monkeypatch.setattr(kcifar10, 'CIFAR10_URL', srv.url)
    yield srv
    srv.close()


def _jpeg_tarball(path: Path, extra: dict[str, bytes] | None = None) -> Path:
    """The JPEG tarball's layout, cifar10-jpg/{train,test}/<class>/0.jpg, one image a class, plus `extra`."""
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(buf, format='JPEG')
    members = {f'cifar10-jpg/{split}/{c}/0.jpg': buf.getvalue() for split in ('train', 'test') for c in CIFAR10_CLASSES}
    with tarfile.open(path, 'w:gz') as tf:
        for name, payload in {**members, **(extra or {})}.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    return path


def _staging(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if '.tmp-' in p.name] if folder.is_dir() else []


# ---------------------------------------------------------------------------------------------------------------
# the official set, downloaded


def test_without_a_local_copy_the_official_set_is_downloaded_checked_and_read(no_local_copy, server):
    source = resolve_cifar10(progress=True)
    assert source.kind == 'official' and source.path == no_local_copy
    assert sorted(p.name for p in (no_local_copy / 'cifar-10-batches-py').iterdir()) == sorted(FILES)
    assert [p.name for p in no_local_copy.iterdir()] == ['cifar-10-batches-py']  # no archive, no staging left
    assert server.requests >= 1
    before = server.requests
    assert resolve_cifar10() == source and server.requests == before  # the cached copy: no second download

    spec = DataSpec(dataset='cifar10', batch_size=4, workers=0, train_subset=None)
    bundle = create_loaders(spec, input_size=(3, 32, 32), train_aug=False)
    # the same classes, in the same order, as the JPEG tree's sorted folders: the rest of the build is unchanged
    assert list(bundle.class_to_idx) == list(CIFAR10_CLASSES) == sorted(CIFAR10_CLASSES)
    assert bundle.source == 'cifar-10-python (official, lossless)'
    assert bundle.source_path == no_local_copy / 'cifar-10-batches-py'
    assert len(bundle.train_loader.dataset) == 5 * PER_BATCH and len(bundle.val_loader.dataset) == PER_BATCH
    # the pixels are the pickled ones (test split, unshuffled; eval transform: to tensor, normalise)
    images, labels = next(iter(bundle.val_loader))
    test = pickle.loads(FILES['test_batch'])
    assert labels.tolist() == test['labels']
    raw = torch.from_numpy(test['data'][0].reshape(3, 32, 32)).float() / 255
    mean, std = (torch.tensor(bundle.data_config[k]).view(3, 1, 1) for k in ('mean', 'std'))
    assert torch.allclose(images[0], (raw - mean) / std, atol=1e-5)


def test_a_corrupt_download_is_named_and_removed_and_a_retry_succeeds(no_local_copy, server):
    server.payload = ARCHIVE[: len(ARCHIVE) // 2]  # cut off half-way
    with pytest.raises(ValueError, match=r'partial or corrupted: removed .*cifar-10-python\.tar\.gz') as e:
        resolve_cifar10()
    assert f'expected the published {_md5(ARCHIVE)}' in str(e.value)
    assert list(no_local_copy.iterdir()) == []  # nothing half-downloaded or half-unpacked kept
    server.payload = ARCHIVE
    assert resolve_cifar10().kind == 'official'


def test_offline_stops_at_once_with_one_line_saying_what_was_tried(no_local_copy, monkeypatch, tmp_path, capsys):
    url = f'http://127.0.0.1:{_unused_port()}/cifar-10-python.tar.gz'  # nothing listens: refused, like offline
    monkeypatch.setattr(kcifar10, 'CIFAR10_URL', url)
    start = time.monotonic()
    with pytest.raises(DataUnavailableError) as e:
        resolve_cifar10()
    assert time.monotonic() - start < kcifar10.DOWNLOAD_TIMEOUT_S
    message = str(e.value)
    for tried in (
        'data.root',
        '$KPID_CIFAR10_TAR',
        str(tmp_path / 'clone' / 'shared' / 'data' / 'cifar10-jpg.tar.gz'),
        str(no_local_copy),
        f'downloading {url} failed',
    ):
        assert tried in message, message
    assert 'set data.root or $KPID_CIFAR10_TAR to a copy of cifar-10-python.tar.gz or cifar10-jpg.tar.gz' in message
    assert not _staging(no_local_copy)

    # through the command line: exit 2, one line
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(
        yaml.safe_dump(
            {
                'name': 'offline',
                'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 10},
                'input_size': [3, 32, 32],
                'flops': {'target_ratio': 0.5},
                'importance': {'method': 'magnitude'},
                'data': {'dataset': 'cifar10', 'workers': 0},
            }
        )
    )
    capsys.readouterr()
    assert (
        main(['build', str(recipe), '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'work'), '--quiet']) == 2
    )
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith('kpid-zoo build: error: CIFAR-10 not found'), err
    assert url in err and 'Traceback' not in err


def test_a_server_that_never_answers_times_out(no_local_copy, monkeypatch):
    """torchvision opens its URLs without a timeout: without the one set around it, this would hang for ever."""
    silent = socket.socket()
    silent.bind(('127.0.0.1', 0))
    silent.listen(1)  # connections are queued, never answered
    monkeypatch.setattr(kcifar10, 'CIFAR10_URL', f'http://127.0.0.1:{silent.getsockname()[1]}/x.tar.gz')
    monkeypatch.setattr(kcifar10, 'DOWNLOAD_TIMEOUT_S', 0.5)
    try:
        with pytest.raises(DataUnavailableError, match='timed out'):
            resolve_cifar10()
    finally:
        silent.close()
    assert socket.getdefaulttimeout() is None  # restored for the rest of the process


def test_an_explicit_location_never_falls_back(no_local_copy, server, tmp_path, monkeypatch):
    assert resolve_cifar10().kind == 'official'  # the cache holds the official set now
    with pytest.raises(FileNotFoundError, match=f'data.root: {tmp_path / "typo"} does not exist'):
        resolve_cifar10(tmp_path / 'typo')
    with pytest.raises(FileNotFoundError, match=str(tmp_path / 'cifar-10-python.tar.gz')):
        resolve_cifar10(tmp_path / 'cifar-10-python.tar.gz')
    monkeypatch.setenv('KPID_CIFAR10_TAR', str(tmp_path / 'env.tar.gz'))
    with pytest.raises(FileNotFoundError, match='env.tar.gz.*KPID_CIFAR10_TAR'):
        resolve_cifar10()


def test_the_jpeg_tarball_beside_the_checkout_comes_before_the_official_set(
    no_local_copy, server, tmp_path, monkeypatch
):
    assert resolve_cifar10().kind == 'official'
    shared = tmp_path / 'clone' / 'shared' / 'data'
    shared.mkdir(parents=True)
    _jpeg_tarball(shared / 'cifar10-jpg.tar.gz')
    source = resolve_cifar10()
    assert source.kind == 'jpeg' and source.path == no_local_copy / 'cifar10-jpg'
    assert (
        create_loaders(
            DataSpec(dataset='cifar10', batch_size=2, workers=0),
            input_size=(3, 32, 32),
        ).source
        == 'cifar10-jpg (JPEG quality 75)'
    )
    # $KPID_CIFAR10_TAR and data.root may name the official archive the user downloaded: checked, then unpacked
    official = tmp_path / 'cifar-10-python.tar.gz'
    official.write_bytes(ARCHIVE)
    monkeypatch.setenv('KPID_CIFAR10_TAR', str(official))
    assert resolve_cifar10().kind == 'official'
    official.write_bytes(ARCHIVE[:-10])
    with pytest.raises(ValueError, match=f'{official}: not the official cifar-10-python.tar.gz'):
        resolve_cifar10(official)


def test_a_cached_official_file_that_was_changed_is_refused_by_name(no_local_copy, server):
    source = resolve_cifar10()
    batch = source.folder / 'data_batch_3'
    batch.write_bytes(batch.read_bytes()[:-1] + b'\x00')
    with pytest.raises(ValueError, match=f'{source.folder}: a file is missing or does not have its published md5'):
        create_loaders(DataSpec(dataset='cifar10', batch_size=2, workers=0), input_size=(3, 32, 32))


# ---------------------------------------------------------------------------------------------------------------
# hostile tarballs


def test_a_member_aimed_outside_is_refused_and_nothing_lands_there(tmp_path):
    tarball = _jpeg_tarball(tmp_path / 'cifar10-jpg.tar.gz', {'cifar10-jpg/../../escaped.txt': b'x'})
    cache = tmp_path / 'deep' / 'cache'
    with pytest.raises(ValueError, match=f'{tarball}: refused'):
        prepare_cifar10(tarball, cache_dir=cache)
    assert not (tmp_path / 'deep' / 'escaped.txt').exists() and not (tmp_path / 'escaped.txt').exists()
    assert list(cache.iterdir()) == []


def test_an_absolute_member_lands_inside_the_staging_folder_not_at_its_path(tmp_path):
    """tarfile's 'data' filter strips the leading '/' (as tar does): the member is unpacked below the staging
    folder and goes with it."""
    absolute = tmp_path / 'absolute.txt'
    tarball = _jpeg_tarball(tmp_path / 'cifar10-jpg.tar.gz', {str(absolute): b'x'})
    tree = prepare_cifar10(tarball, cache_dir=tmp_path / 'cache')
    assert not absolute.exists() and [p.name for p in (tmp_path / 'cache').iterdir()] == ['cifar10-jpg']
    assert (tree / 'train' / 'airplane' / '0.jpg').is_file()


def test_a_link_pointing_outside_is_refused(tmp_path):
    tarball = tmp_path / 'cifar10-jpg.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tf:
        link = tarfile.TarInfo('cifar10-jpg/train/evil')
        link.type, link.linkname = tarfile.SYMTYPE, '/etc'
        tf.addfile(link)
    with pytest.raises(ValueError, match=f'{tarball}: refused'):
        prepare_cifar10(tarball, cache_dir=tmp_path / 'cache')
    assert list((tmp_path / 'cache').iterdir()) == []


@pytest.mark.parametrize('content', [b'not a tarball at all', 'plain tar', 'truncated'])
def test_a_file_that_is_not_a_tar_gz_is_one_error_naming_it(tmp_path, content):
    tarball = tmp_path / 'cifar10-jpg.tar.gz'
    if content == 'plain tar':
        _jpeg_tarball(tmp_path / 'real.tar.gz')
        import gzip

        tarball.write_bytes(gzip.decompress((tmp_path / 'real.tar.gz').read_bytes()))
    elif content == 'truncated':
        _jpeg_tarball(tmp_path / 'real.tar.gz')
        tarball.write_bytes((tmp_path / 'real.tar.gz').read_bytes()[:400])
    else:
        tarball.write_bytes(content)
    with pytest.raises(ValueError, match=f'{tarball}: not a readable .tar.gz archive'):
        prepare_cifar10(tarball, cache_dir=tmp_path / 'cache')
    assert list((tmp_path / 'cache').iterdir()) == []


def test_bad_tarballs_exit_2_in_one_line_from_the_command_line(tmp_path, capsys, monkeypatch):
    bad = _jpeg_tarball(tmp_path / 'cifar10-jpg.tar.gz', {'../escaped.txt': b'x'})
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(
        yaml.safe_dump(
            {
                'name': 'bad_tar',
                'parent': {'model': 'resnet18', 'weights': 'none', 'num_classes': 10},
                'input_size': [3, 32, 32],
                'flops': {'target_ratio': 0.5},
                'importance': {'method': 'magnitude'},
                'data': {'dataset': 'cifar10', 'root': str(bad), 'workers': 0},
            }
        )
    )
    monkeypatch.setenv('KPID_CACHE', str(tmp_path / 'cache'))
    for content in (None, b'garbage'):
        if content:
            bad.write_bytes(content)
        capsys.readouterr()
        assert (
            main(['build', str(recipe), '--out', str(tmp_path / 'out'), '--work', str(tmp_path / 'work'), '--quiet'])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f'kpid-zoo build: error: {bad}: '), err
    assert not (tmp_path / 'escaped.txt').exists() and not _staging(tmp_path / 'cache')


@pytest.mark.launch
def test_a_killed_unpack_leaves_nothing_a_later_run_uses(tmp_path):
    """SIGKILL in the middle of an unpack (no `finally` runs): the staging folder stays, the target does not
    exist; the next run unpacks afresh and clears the leftovers."""
    tarball = _jpeg_tarball(tmp_path / 'cifar10-jpg.tar.gz')
    cache = tmp_path / 'cache'
    script = textwrap.dedent(f"""
        import os, signal, tarfile
        from kpid_zoo.training.cifar10 import prepare_cifar10
        seen = []
        def die_at_the_fifth(member, path):
            seen.append(member)
            if len(seen) == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return tarfile.data_filter(member, path)
        original = tarfile.TarFile.extractall
        tarfile.TarFile.extractall = lambda self, path, filter=None: original(self, path, filter=die_at_the_fifth)
        prepare_cifar10({str(tarball)!r}, cache_dir={str(cache)!r})
    """)
    proc = subprocess.run(
        [sys.executable, '-c', script],
        env={**os.environ, 'OMP_NUM_THREADS': '1'},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    leftovers = _staging(cache)
    assert [p.name.split('.tmp-')[0] for p in leftovers] == ['.cifar10-jpg']
    assert any(leftovers[0].rglob('*.jpg')) and not (cache / 'cifar10-jpg').exists()

    tree = prepare_cifar10(tarball, cache_dir=cache)
    assert sorted(p.relative_to(tree).as_posix() for p in tree.rglob('*.jpg')) == sorted(
        f'{s}/{c}/0.jpg' for s in ('train', 'test') for c in CIFAR10_CLASSES
    )
    assert [p.name for p in cache.iterdir()] == ['cifar10-jpg']  # the killed run's staging is gone


def test_unpack_tarball_refuses_an_archive_without_the_expected_folder(tmp_path):
    tarball = tmp_path / 'x.tar.gz'
    with tarfile.open(tarball, 'w:gz') as tf:
        info = tarfile.TarInfo('other/file.txt')
        info.size = 1
        tf.addfile(info, io.BytesIO(b'x'))
    with pytest.raises(ValueError, match=f'{tarball} has no cifar-10-batches-py/ folder'):
        unpack_tarball(tarball, tmp_path / 'into', 'cifar-10-batches-py')
    assert list((tmp_path / 'into').iterdir()) == []


def test_the_export_says_which_copy_its_figures_used(tmp_path):
    """The JPEG copy (quality 75) scores lower than the official images: eval.json's data_source reaches the
    exported config and the model card."""
    import json

    from export_utils import make_report, pruned_spec, tiny_recipe

    from kpid_zoo.engine.surgery import build_pruned
    from kpid_zoo.zoo.export import export_model

    spec = pruned_spec('resnet10t', input_size=(3, 32, 32))
    model = build_pruned(spec, num_classes=10).eval()
    folder = export_model(
        model,
        spec,
        tmp_path / 'out',
        name='kpid_tiny_test',
        pretrained_cfg=dict(input_size=(3, 32, 32), crop_pct=1.0),
        metrics=dict(top1=50.0, top5=90.0, data_source='cifar10-jpg (JPEG quality 75)'),
        report=make_report(spec, model, 10),
        recipe=tiny_recipe(),
    )
    assert (
        json.loads((folder / 'config.json').read_text())['kpid']['metrics']['data_source']
        == 'cifar10-jpg (JPEG quality 75)'
    )
    assert '| Images (train and eval) | cifar10-jpg (JPEG quality 75) |' in (folder / 'README.md').read_text()


def test_an_incomplete_folder_in_the_cache_is_named_not_replaced(no_local_copy, server):
    partial = no_local_copy / 'cifar-10-batches-py'
    partial.mkdir(parents=True)
    (partial / 'data_batch_1').write_bytes(FILES['data_batch_1'])
    with pytest.raises(ValueError, match=f'{partial} exists but is not a complete official CIFAR-10'):
        resolve_cifar10()
    assert server.requests == 0 and [p.name for p in partial.iterdir()] == ['data_batch_1']
