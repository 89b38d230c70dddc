"""Shared fixtures, and the default skips for the `network`, `gpu` and `slow` markers (see pyproject)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

_OPT_IN = {'network': 'KPID_TEST_NETWORK', 'slow': 'KPID_TEST_SLOW'}


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist workers (pyproject's `-n 2`) share the cores: each torch thread pool sized to the whole
    # machine would spin against the others'
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
    if workers > 1:
        # the cores this process may run on (a CI container can see more than it is given)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // workers))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for marker, env in _OPT_IN.items():
            if marker in item.keywords and os.environ.get(env) != '1':
                item.add_marker(pytest.mark.skip(reason=f'{marker} test: set {env}=1 to run'))
        if 'gpu' in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason='gpu test: no CUDA device'))


@pytest.fixture(scope='session')
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope='session')
def cifar10_tarball() -> Path:
    """The shared CIFAR-10 JPEG tarball (../shared/data or $KPID_CIFAR10_TAR); skips the test where it is absent."""
    from kpid_zoo.training.cifar10 import find_cifar10_tarball

    try:
        return find_cifar10_tarball()
    except FileNotFoundError as e:
        pytest.skip(str(e))


@pytest.fixture(scope='session')
def real_jpeg_folder(cifar10_tarball, tmp_path_factory) -> Path:
    """An ImageFolder of real CIFAR-10 JPEGs (4 classes; 24 train and 9 val images each), taken from the start of
    the shared tarball (its test split), so reading it is quick."""
    import tarfile

    classes, wanted = ('airplane', 'bird', 'cat', 'ship'), {'train': 24, 'val': 9}
    root = tmp_path_factory.mktemp('real-jpegs')
    counts = {c: 0 for c in classes}
    with tarfile.open(cifar10_tarball) as tf:
        for member in tf:
            parts = member.name.split('/')
            if len(parts) != 4 or parts[1] != 'test' or parts[2] not in counts or not member.isfile():
                continue
            index = counts[parts[2]]
            if index >= sum(wanted.values()):
                if all(n >= sum(wanted.values()) for n in counts.values()):
                    break
                continue
            split = 'train' if index < wanted['train'] else 'val'
            folder = root / split / parts[2]
            folder.mkdir(parents=True, exist_ok=True)
            (folder / parts[3]).write_bytes(tf.extractfile(member).read())
            counts[parts[2]] += 1
    return root


@pytest.fixture
def hf_env(monkeypatch, tmp_path):
    """huggingface_hub pointed at tmp dirs, xet off, online; `set_endpoint(url)` / `set_offline()` switch it.

    huggingface_hub reads HF_* env vars once, at import, into `constants`: patch those (timm calls
    hf_hub_download without an endpoint, so HUGGINGFACE_CO_URL_TEMPLATE must follow ENDPOINT).
    """
    from export_utils import TOKEN
    from huggingface_hub import constants

    cache = tmp_path / 'hf-home' / 'hub'
    monkeypatch.setenv('HF_HOME', str(tmp_path / 'hf-home'))
    monkeypatch.setenv('HF_TOKEN', TOKEN)
    monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(cache))
    monkeypatch.setattr(constants, 'HF_TOKEN_PATH', str(tmp_path / 'hf-home' / 'token'))
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_XET', True)
    monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', False)
    monkeypatch.setattr(constants, 'HF_HUB_DISABLE_TELEMETRY', True)

    class Env:
        cache_dir = cache

        @staticmethod
        def set_endpoint(url: str) -> None:
            monkeypatch.setattr(constants, 'ENDPOINT', url)
            monkeypatch.setattr(
                constants, 'HUGGINGFACE_CO_URL_TEMPLATE', url + '/{repo_id}/resolve/{revision}/{filename}'
            )

        @staticmethod
        def set_offline(offline: bool = True) -> None:
            monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', offline)

    # nothing may reach the real Hub from a test: an unset endpoint points at a closed loopback port
    Env.set_endpoint('http://127.0.0.1:9')
    return Env
