"""WebDataset streams (`wds/<name>`): shards written from real CIFAR-10 JPEGs, the epoch contract of
`kpid_zoo.training.streams` (exactly once, equal batch counts, stated repeats/drops, seeded order and augmentation,
exact skip), recipe-level errors, fine-tune + resume on a stream, and torchrun x2 (gloo) sharding and evaluation."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.utils.data as tud
from torchvision.transforms.functional import pil_to_tensor

from kpid_zoo.core.files import remove_staging
from kpid_zoo.core.recipe import DataSpec, FinetuneSpec
from kpid_zoo.core.threads import fixed_threads
from kpid_zoo.training.data import (
    SeededTransformDataset,
    build_transforms,
    create_loaders,
    folder_samples,
    load_image_folder,
    resolve_data_settings,
)
from kpid_zoo.training.shards import write_shards
from kpid_zoo.training.streams import INFO_FILE, ShardStream, round_robin_position, split_shards
from kpid_zoo.training.train import finetune, list_checkpoints

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _numbered_shards(folder: Path, out: Path, split: str, shard_size: int) -> int:
    """Shards of `folder/split` whose class index is the sample's number: a target then names its sample."""
    samples, _ = folder_samples(folder / split)
    write_shards([(path, i) for i, (path, _) in enumerate(samples)], out, split, shard_size)
    return len(samples)


def _stream(
    out: Path, split: str = 'train', batch_size: int = 4, training: bool = True, seed: int = 0, transform=pil_to_tensor
) -> ShardStream:
    shards, total = split_shards('wds/test', str(out), split, count_field='data.train_samples')
    return ShardStream(shards, total, batch_size, transform, training, seed, shuffle_buffer=16)


def _epoch(stream: ShardStream, workers: int, epoch: int = 0) -> list[list[int]]:
    """The targets of each batch the process's DataLoader delivers in `epoch`."""
    stream.set_epoch(epoch)
    loader = tud.DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, drop_last=stream.training)
    return [y.tolist() for _, y in loader]


@pytest.fixture(scope='module')
def numbered(real_jpeg_folder, tmp_path_factory) -> tuple[Path, int]:
    """96 train images (4 classes x 24) in 8 shards of 12, each target the sample's number."""
    out = tmp_path_factory.mktemp('numbered')
    return out, _numbered_shards(real_jpeg_folder, out, 'train', 12)


def test_shards_are_timm_readable_and_recorded(real_jpeg_folder, tmp_path):
    samples, classes = folder_samples(real_jpeg_folder / 'train')
    written = write_shards(samples, tmp_path, 'train', shard_size=40, class_names=classes)
    assert [p.name for p in written] == ['train-000000.tar', 'train-000001.tar', 'train-000002.tar']
    info = json.loads((tmp_path / INFO_FILE).read_text())['splits']['train']
    assert info['num_samples'] == 96 and info['shard_lengths'] == [40, 40, 16]
    again = tmp_path / 'again'
    write_shards(samples, again, 'train', shard_size=40, class_names=classes)
    assert (again / written[0].name).read_bytes() == written[0].read_bytes()  # fixed metadata: reproducible bytes
    shards, total = split_shards('wds/cifar', str(tmp_path), 'train')
    assert total == 96 and [s.samples for s in shards] == [40, 40, 16]
    # timm's brace pattern with a |count works too (no shard lengths: the count is spread evenly)
    shards, total = split_shards('wds/cifar', str(tmp_path), 'train-{000000..000001}.tar|80')
    assert total == 80 and [s.samples for s in shards] == [40, 40]
    # the images and labels come back: the classes of a validation pass are the folder's
    stream = ShardStream(
        *split_shards('wds/cifar', str(tmp_path), 'train'), batch_size=8, transform=None, training=False
    )
    labels = sorted(int(t) for _, t in stream)
    assert labels == sorted(t for _, t in samples)


def test_a_killed_shard_write_leaves_names_remove_staging_knows(real_jpeg_folder, tmp_path, monkeypatch):
    samples, classes = folder_samples(real_jpeg_folder / 'train')
    real_replace = os.replace

    def killed(src, dst):  # the writer dies after its first shard is complete, before the rename
        raise KeyboardInterrupt

    monkeypatch.setattr(os, 'replace', killed)
    with pytest.raises(KeyboardInterrupt):
        write_shards(samples, tmp_path, 'train', shard_size=40, class_names=classes)
    monkeypatch.setattr(os, 'replace', real_replace)
    # what a SIGKILL leaves (no `finally` runs): a shard and an _info.json under their temp names
    leftovers = [tmp_path / '.train-000000.tar.tmp-0123abcd', tmp_path / f'.{INFO_FILE}.tmp-89abcdef']
    for path in leftovers:
        path.write_bytes(b'half')
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in leftovers)  # no shard in place
    assert sorted(remove_staging(tmp_path)) == sorted(leftovers)
    for path in leftovers:
        path.write_bytes(b'half')
    write_shards(samples, tmp_path, 'train', shard_size=40, class_names=classes)  # the next write cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ['train-000000.tar', 'train-000001.tar', 'train-000002.tar', INFO_FILE]
    )


@pytest.mark.parametrize(
    'change, message',
    [
        (dict(split='test'), "data: split 'test' of wds/x in "),
        (dict(root='missing'), 'data.root: '),
        (dict(split='train-{000000..000009}.tar'), 'data.root: 2 of the 10 shards of split'),
        (dict(split='train-{000000..000000}.tar'), 'data.train_samples: the sample count of split'),
    ],
)
def test_split_errors_name_the_field(numbered, tmp_path, change, message):
    out, _ = numbered
    args = {'root': str(out), 'split': 'train', **change}
    if args['root'] == 'missing':
        args['root'] = str(tmp_path / 'missing')
    with pytest.raises((ValueError, FileNotFoundError), match=re.escape(message)):
        split_shards('wds/x', args['root'], args['split'], count_field='data.train_samples')


def test_too_few_shards_for_the_workers_is_a_clear_error(numbered):
    stream = _stream(numbered[0]).for_process(2, 0)
    with pytest.raises(ValueError, match='data.workers: .* 8 shards, too few for 2 processes x 5 loader workers'):
        stream.epoch_plan(0, num_workers=5)


@pytest.mark.parametrize('processes, workers', [(1, 0), (2, 0), (2, 2)])
def test_each_sample_once_per_epoch_and_equal_batches(numbered, processes, workers):
    out, n = numbered
    stream = _stream(out)
    epochs = {}
    for epoch in (0, 1):
        per_process = [_epoch(stream.for_process(processes, r), workers, epoch) for r in range(processes)]
        assert [len(b) for b in per_process] == [n // (processes * 4)] * processes  # equal optimizer steps
        seen = [t for batches in per_process for b in batches for t in b]
        assert sorted(seen) == list(range(n))  # disjoint, and their union is the epoch
        epochs[epoch] = per_process
    assert epochs[0] != epochs[1]  # shards and samples are reshuffled every epoch
    assert _epoch(stream.for_process(processes, 0), workers, 1) == epochs[1][0]  # a rerun sees the same order


def test_uneven_shards_repeat_and_drop_exactly_what_the_plan_says(real_jpeg_folder, tmp_path):
    """96 samples in shards of 10 (the last has 6) on 2 processes x 1 worker, batch 4: 12 batches each; a process
    with 40 or 56 samples repeats 8 or drops 8 of them, which `epoch_plan` states beforehand."""
    n = _numbered_shards(real_jpeg_folder, tmp_path, 'train', 10)
    stream = _stream(tmp_path)
    plans = [stream.for_process(2, r).epoch_plan(0, 0) for r in range(2)]
    seen = [t for r in range(2) for b in _epoch(stream.for_process(2, r), 0) for t in b]
    assert len(seen) == 2 * 12 * 4
    assert len(seen) - len(set(seen)) == sum(p.repeated for p in plans) > 0
    assert n - len(set(seen)) == sum(p.dropped for p in plans) > 0
    assert 'epoch 0 repeats' in stream.for_process(2, 0).describe(0)


def test_round_robin_position():
    # workers give 3 and 1 batches: delivered 0, 1, 0, 0
    assert round_robin_position([3, 1], 0) == ([0, 0], 0)
    assert round_robin_position([3, 1], 1) == ([1, 0], 1)
    assert round_robin_position([3, 1], 3) == ([2, 1], 1)  # worker 1 is done: worker 0 is next, its turn is passed
    with pytest.raises(ValueError, match='cannot skip 5 batches of an epoch of 4'):
        round_robin_position([3, 1], 5)


def test_skip_resumes_the_same_batches_and_pixels_with_persistent_workers(numbered):
    """3 persistent workers with unequal quotas (8 shards of 12: 36, 36 and 24 samples -> 9, 9 and 6 batches):
    after skipping k batches the loader delivers exactly batches k.. of the uninterrupted epoch, same images,
    same augmentation; the next epoch starts from its first batch, and differs (the epoch reached the workers)."""
    config = resolve_data_settings(None, DataSpec(), (3, 32, 32))
    train_tf, _ = build_transforms(config, 'cifar10')
    stream = _stream(numbered[0], transform=train_tf)
    loader = tud.DataLoader(stream, batch_size=4, num_workers=3, persistent_workers=True, drop_last=True)
    assert [w.batches for w in stream.epoch_plan(0, 3).workers] == [9, 9, 6]

    def run(epoch, skip=0):
        stream.set_epoch(epoch)
        stream.skip_batches(skip)
        return [(x, y) for x, y in loader]

    full = run(0)
    assert len(full) == 24
    for skip in (4, 20):  # 4: mid round robin; 20: past the last batch of the shortest worker
        resumed = run(0, skip)
        assert [y.tolist() for _, y in resumed] == [y.tolist() for _, y in full[skip:]]
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(resumed, full[skip:]))
    next_epoch = run(1)
    assert len(next_epoch) == 24 and [y.tolist() for _, y in next_epoch] != [y.tolist() for _, y in full]


def test_persistent_workers_augment_each_epoch_anew(real_jpeg_folder):
    """A map-style dataset under a persistent worker: epoch 1 is augmented as epoch 1, as with no worker."""
    config = resolve_data_settings(None, DataSpec(), (3, 32, 32))
    train_tf, _ = build_transforms(config)
    ds = SeededTransformDataset(load_image_folder(real_jpeg_folder, 'val'), train_tf, seed=0)

    def epochs(workers):
        kwargs = dict(num_workers=workers, persistent_workers=True) if workers else {}
        loader = tud.DataLoader(ds, batch_size=12, **kwargs)
        out = []
        for epoch in (0, 1):
            ds.set_epoch(epoch)
            out.append(next(iter(loader))[0])
        return out

    zero, one = epochs(0), epochs(1)
    assert not torch.equal(zero[0], zero[1])
    assert torch.equal(zero[0], one[0]) and torch.equal(zero[1], one[1])


def _wds_spec(root: Path, **kw) -> DataSpec:
    return DataSpec(
        dataset='wds/cifar4',
        root=str(root),
        num_classes=4,
        val_split='val',
        batch_size=8,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.247, 0.2435, 0.2616),
        crop_pct=1.0,
        **kw,
    )


@pytest.fixture(scope='module')
def cifar4_shards(real_jpeg_folder, tmp_path_factory) -> Path:
    """The real JPEG folder as shards with its 4 classes: train 96 in 8 shards of 12, val 36 in 3 of 12."""
    out = tmp_path_factory.mktemp('cifar4')
    for split in ('train', 'val'):
        samples, classes = folder_samples(real_jpeg_folder / split)
        write_shards(samples, out, split, shard_size=12, class_names=classes)
    return out


@pytest.fixture
def one_thread():
    """One intra-op thread: beside loader workers on a small shared machine, more threads spin against them
    (ten times slower here), and one thread keeps the kernels' reduction order fixed."""
    with fixed_threads(1):
        yield


@pytest.mark.heavy
def test_finetune_on_a_stream_resumes_to_the_same_weights(cifar4_shards, tmp_path, one_thread):
    """Two persistent loader workers, dropout on, a checkpoint every step; the run stops after step 3 (the
    resume skips 3 batches: mid round robin) and resumes; 18 steps over two epochs end bit-identical to an
    uninterrupted run, and validation counts each of the 36 images once."""
    data = _wds_spec(cifar4_shards, workers=2, persistent_workers=True)
    cfg = FinetuneSpec(epochs=1.5, lr=0.05, warmup_epochs=0.5, checkpoint_every=1, seed=0, kd_gamma=0.0)

    class Stop(Exception):
        pass

    def stop_after_3(step, _metrics):
        if step == 3:
            raise Stop

    def run(out: Path, callback=None):
        torch.manual_seed(0)
        model = timm.create_model('mobilenetv3_small_050', num_classes=4, drop_rate=0.2)
        bundle = create_loaders(data, model, input_size=(3, 32, 32), seed=0)
        return finetune(
            model, None, bundle.train_loader, bundle.val_loader, cfg, out, step_callback=callback, progress=False
        )

    straight = run(tmp_path / 'straight')
    assert straight.steps == straight.total_steps == 18  # 96 // 8 = 12 batches per epoch
    assert straight.val.n == 36
    with pytest.raises(Stop):
        run(tmp_path / 'stopped', stop_after_3)
    assert [p.name for p in list_checkpoints(tmp_path / 'stopped' / 'checkpoints')][-1] == 'step_3'
    resumed = run(tmp_path / 'stopped')
    assert resumed.resumed_from == 3 and resumed.steps == 18
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val.as_dict() == straight.val.as_dict()

    # the checkpoint records the loader layout: another worker count would give another order
    model = timm.create_model('mobilenetv3_small_050', num_classes=4)
    bundle = create_loaders(dataclasses.replace(data, workers=1), model, input_size=(3, 32, 32), seed=0)
    with pytest.raises(ValueError, match=r'1 process\(es\) x 2 loader worker\(s\), this run has 1 x 1'):
        finetune(model, None, bundle.train_loader, None, cfg, tmp_path / 'stopped', progress=False)


@pytest.mark.launch
def test_torchrun_two_processes_shard_the_stream_and_count_validation_once(cifar4_shards, real_jpeg_folder, tmp_path):
    """torchrun x2 (gloo), 2 loader workers each: the two processes' training samples are disjoint, their union
    is the epoch, both run the same number of batches; validation over 3 shards (2 on one process, 1 on the
    other) counts each of the 36 images once and gives the 1-process figures."""
    numbered = tmp_path / 'numbered'
    n = _numbered_shards(real_jpeg_folder, numbered, 'train', 12)
    _numbered_shards(real_jpeg_folder, numbered, 'val', 12)
    script = REPO / 'tests' / 'scripts' / 'stream_run.py'
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)}
    proc = subprocess.run(
        [
            str(BIN / 'torchrun'),
            '--standalone',
            '--nproc_per_node',
            '2',
            str(script),
            '--numbered',
            str(numbered),
            '--classes',
            str(cifar4_shards),
            '--out',
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    ranks = [json.loads((tmp_path / f'rank{r}.json').read_text()) for r in (0, 1)]
    assert [r['world_size'] for r in ranks] == [2, 2]
    for epoch in ('0', '1'):
        batches = [r['epochs'][epoch] for r in ranks]
        assert len(batches[0]) == len(batches[1]) == n // (2 * 8)
        seen = [t for b in batches for batch in b for t in batch]
        assert sorted(seen) == list(range(n))
    assert ranks[0]['epochs']['0'] != ranks[0]['epochs']['1']
    assert sorted(r['val_seen'] for r in ranks) == [12, 24]

    torch.manual_seed(0)
    model = timm.create_model('resnet18', num_classes=4, channels=(8, 16, 32, 64)).eval()
    from kpid_zoo.training.evaluate import evaluate

    one = evaluate(model, create_loaders(_wds_spec(cifar4_shards, workers=0), model, (3, 32, 32)).val_loader)
    for r in ranks:
        assert r['val']['n'] == one.n == 36
        assert r['val']['top1'] == one.top1 and r['val']['top5'] == one.top5  # integer hit counts: exact
