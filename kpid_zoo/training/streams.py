"""Stream sources: WebDataset tar shards (`wds/<name>`), read in order, sharded by kpid-zoo itself.

timm's `create_dataset('wds/<name>', ...)` reads the split (a name in the shard folder's `_info.json`, or a
brace pattern with an optional `|count`); this module iterates the shards it lists.

Who shards: `ShardStream`, by whole shard files, over processes and then loader workers; Accelerate does not
(`prepare_loader` binds the stream to its process and prepares it as a 1-process loader, for device placement
only). Accelerate's `IterableDatasetShard` would make every process read and decode every sample to keep 1/N of
them, and its `DataLoaderDispatcher` would read everything on process 0; timm's `ReaderWds` iteration splits
shards the same way as here but ends each worker's epoch with `with_epoch(n)`, which cuts or runs short where
shards are uneven, so processes can run different step counts (a DDP hang) and no one can say what was lost.

The training epoch, for N processes, W loader workers (0 counts as 1), batch b, n samples in S shards:
  * the S shards are permuted by (seed, epoch); process r reads shards r, r+N, ... of that order and its worker w
    reads shards w, w+W, ... of those: no shard is opened by two readers;
  * every process yields exactly B = n // (N * b) batches, the map-style count (drop_last), so every process runs
    the same number of optimizer steps;
  * worker w yields q_w whole batches, sum q_w = B, with q_w * b as close to its shards' sample count as whole
    batches allow: a worker whose shards run out reads them again (those samples repeat), one with samples left
    stops (those are dropped). `ShardStream.epoch_plan` states both counts; with shards of equal size and n a
    multiple of N * W * b both are 0, and each sample is seen exactly once per epoch;
  * samples pass a shuffle buffer seeded by (seed, epoch, process, worker), before decoding; augmentation is
    seeded by (seed, epoch, sample key), so a sample looks the same whichever process or worker reads it;
  * resume: skipping k batches reads the skipped samples without decoding them, and turns the workers so that
    the DataLoader's round robin (worker 0, 1, ..., W-1, 0, ...) continues with the worker whose turn it was: a
    resumed epoch delivers the same batches in the same order. The order depends on (N, W): a checkpoint
    records them, and resuming under another layout is refused.
Validation: no shuffle, no quota; each worker reads its shards once, so each image is counted once, but processes
then have different batch counts: `kpid_zoo.training.evaluate` sums per process and all-reduces once at the end.

The epoch and the skip live in shared memory (`SharedCount`): persistent loader workers keep the dataset object
they were started with, and a plain attribute set in the main process would never reach them.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.data as tud
from timm.data.readers.shared_count import SharedCount

from ..core.datasource import UnreadableImageError
from ..core.seeds import stable_seed
from ..errors import MissingDependencyError, MissingFileError

INFO_FILE = '_info.json'  # timm's shard-set description: {"splits": {name: {num_samples, filenames, shard_lengths}}}
IMAGE_KEYS = 'jpg;png;webp'  # timm's ReaderWds default: the first of these a sample has is its image
PIP_HINT = "pip install 'kpid-zoo[wds]'"


def seeded_call(transform: Callable, img, seed: int):
    """`transform(img)` with python's `random` and torch's global RNG seeded by `seed`, both restored after."""
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        random.seed(seed)
        torch.manual_seed(seed)
        out = transform(img)
    random.setstate(py_state)
    return out


def _require_webdataset():
    try:
        import webdataset  # noqa: F401
    except ImportError:
        raise MissingDependencyError(f'data.dataset: wds/ sources need the webdataset package: {PIP_HINT}') from None


@dataclass(frozen=True)
class Shard:
    url: str
    samples: float  # from _info.json when it lists shard lengths, else the split's count spread evenly


@dataclass(frozen=True)
class WorkerPlan:
    shards: tuple[int, ...]  # indices into the stream's shards, in reading order
    samples: float  # in those shards
    batches: int  # this worker's quota for the epoch

    def repeated(self, batch_size: int) -> int:
        return max(0, math.ceil(self.batches * batch_size - self.samples))

    def dropped(self, batch_size: int) -> int:
        return max(0, math.floor(self.samples - self.batches * batch_size))


@dataclass(frozen=True)
class EpochPlan:
    """One process's epoch: its loader workers' shards and quotas."""

    workers: tuple[WorkerPlan, ...]
    batch_size: int

    @property
    def batches(self) -> int:
        return sum(w.batches for w in self.workers)

    @property
    def repeated(self) -> int:
        return sum(w.repeated(self.batch_size) for w in self.workers)

    @property
    def dropped(self) -> int:
        return sum(w.dropped(self.batch_size) for w in self.workers)


def _quotas(samples: Sequence[float], batches: int, batch_size: int) -> list[int]:
    """Whole batches per worker summing to `batches`, each as close to the worker's samples as possible: start
    from the full batches each has, then give (take) one batch to the worker with most (fewest) samples left."""
    quotas = [int(s // batch_size) for s in samples]
    while sum(quotas) < batches:
        left = [s - q * batch_size for s, q in zip(samples, quotas)]
        quotas[max(range(len(left)), key=lambda i: (left[i], -i))] += 1
    while sum(quotas) > batches:
        left = [s - q * batch_size if q > 0 else math.inf for s, q in zip(samples, quotas)]
        quotas[min(range(len(left)), key=lambda i: (left[i], i))] -= 1
    return quotas


def round_robin_position(quotas: Sequence[int], delivered: int) -> tuple[list[int], int]:
    """After a DataLoader has delivered `delivered` batches from workers with these quotas -- worker 0, 1, ...,
    W-1, 0, ..., skipping a worker once it has given all its batches -- how many came from each worker, and
    whose turn it is next."""
    if delivered > sum(quotas):
        raise ValueError(f'cannot skip {delivered} batches of an epoch of {sum(quotas)}')
    taken, turn = [0] * len(quotas), 0
    while delivered:
        if taken[turn] < quotas[turn]:
            taken[turn] += 1
            delivered -= 1
        turn = (turn + 1) % len(quotas)
    return taken, turn


class ShardStream(tud.IterableDataset):
    """(image, target) from WebDataset shards with the epoch contract of this module's docstring.

    `num_processes`/`process_index` are those of the loader it feeds (`for_process`); an unbound stream is a
    1-process one. The loader's batch size must be `batch_size` (the quotas are whole batches).
    """

    def __init__(
        self,
        shards: Sequence[Shard],
        num_samples: int,
        batch_size: int,
        transform: Callable | None,
        training: bool,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        name: str = 'wds',
        num_processes: int = 1,
        process_index: int = 0,
    ):
        self.shards = tuple(shards)
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.transform = transform
        self.training = training
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.name = name
        self.num_processes = num_processes
        self.process_index = process_index
        self._epoch = SharedCount(0)
        self._skip = SharedCount(0)  # batches of the current epoch this process already consumed

    def for_process(self, num_processes: int, process_index: int) -> ShardStream:
        """A copy bound to one process of `num_processes` (with its own epoch and skip counters)."""
        return ShardStream(
            self.shards,
            self.num_samples,
            self.batch_size,
            self.transform,
            self.training,
            self.seed,
            self.shuffle_buffer,
            self.name,
            num_processes,
            process_index,
        )

    # -- epoch and resume ----------------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self._epoch.value

    def set_epoch(self, epoch: int) -> None:
        """A new epoch starts with nothing skipped. Accelerate's loader calls this again with the same epoch at
        the start of each pass: that keeps the skip."""
        if epoch != self._epoch.value:
            self._epoch.value = epoch
            self._skip.value = 0

    def skip_batches(self, batches: int) -> None:
        """The next pass over this epoch starts after its first `batches` batches (a resumed run)."""
        self._skip.value = batches

    def batches_per_process(self) -> int:
        return self.num_samples // (self.num_processes * self.batch_size)

    def __len__(self) -> int:
        """Samples this process yields per epoch (a DataLoader divides by the batch size): all of its shards'
        for validation (known only from shard lengths; else an estimate), B * b for training."""
        if self.training:
            return self.batches_per_process() * self.batch_size
        return round(sum(self.shards[i].samples for i in self._process_shards(0)))

    # -- the plan ------------------------------------------------------------------------------------------------
    def _process_shards(self, epoch: int, process_index: int | None = None) -> list[int]:
        order = list(range(len(self.shards)))
        if self.training:
            random.Random(stable_seed(self.seed, epoch, 'shards')).shuffle(order)
        rank = self.process_index if process_index is None else process_index
        return order[rank :: self.num_processes]

    def epoch_plan(self, epoch: int, num_workers: int, process_index: int | None = None) -> EpochPlan:
        """The shards and batch quota of each of the process's loader workers in `epoch` (`num_workers` 0: one)."""
        workers = max(1, num_workers)
        mine = self._process_shards(epoch, process_index)
        split = [tuple(mine[w::workers]) for w in range(workers)]
        samples = [sum(self.shards[i].samples for i in s) for s in split]
        if self.training:
            if len(self.shards) < self.num_processes * workers:
                raise ValueError(
                    f'data.workers: {self.name} has {len(self.shards)} shards, too few for {self.num_processes} '
                    f'processes x {workers} loader workers (each worker reads whole shards): write at least '
                    f'{self.num_processes * workers} shards or lower data.workers'
                )
            quotas = _quotas(samples, self.batches_per_process(), self.batch_size)
        else:
            quotas = [math.ceil(s / self.batch_size) for s in samples]  # informative: validation reads all
        return EpochPlan(tuple(WorkerPlan(s, n, q) for s, n, q in zip(split, samples, quotas)), self.batch_size)

    def describe(self, num_workers: int) -> str:
        """One line: what an epoch reads on each process, and what it repeats and drops (over all processes)."""
        plans = [self.epoch_plan(0, num_workers, r) for r in range(self.num_processes)]
        return (
            f'{self.name}: {self.num_samples} samples in {len(self.shards)} shards, {self.num_processes} '
            f'process(es) x {max(1, num_workers)} loader worker(s): {plans[0].batches} batches of '
            f'{self.batch_size} per process and epoch; epoch 0 repeats {sum(p.repeated for p in plans)} '
            f'and drops {sum(p.dropped for p in plans)} samples'
        )

    # -- iteration -----------------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator:
        info = tud.get_worker_info()
        num_workers, worker = (info.num_workers, info.id) if info is not None else (0, 0)
        epoch, skip = self._epoch.value, self._skip.value
        plan = self.epoch_plan(epoch, num_workers)
        if not self.training:
            yield from self._decoded(self._samples(plan.workers[worker].shards), epoch)
            return
        taken, turn = round_robin_position([w.batches for w in plan.workers], skip)
        logical = (turn + worker) % len(plan.workers)  # the DataLoader asks worker 0 first: give it the next turn
        mine = plan.workers[logical]
        rng = random.Random(stable_seed(self.seed, epoch, self.process_index, logical, 'samples'))
        samples = self._passes(mine.shards, rng)
        for _ in range(taken[logical] * self.batch_size):
            next(samples)  # read, not decoded: the skipped batches cost I/O only
        count = (mine.batches - taken[logical]) * self.batch_size
        yield from self._decoded((next(samples) for _ in range(count)), epoch)

    def _samples(self, shard_ids: Sequence[int]) -> Iterator[dict]:
        from webdataset.tariterators import tarfile_samples

        yield from tarfile_samples({'url': self.shards[i].url} for i in shard_ids)

    def _passes(self, shard_ids: Sequence[int], rng: random.Random) -> Iterator[dict]:
        """Shuffled passes over the shards, each one flushed before the next starts (so a pass is exactly the
        shards' samples: only a worker whose quota outruns its shards starts a second, repeating pass)."""
        while True:
            count = 0
            for sample in _shuffled(self._samples(shard_ids), self.shuffle_buffer, rng):
                count += 1
                yield sample
            if count == 0:
                raise ValueError(f'{self.name}: shards {[self.shards[i].url for i in shard_ids]} hold no samples')

    def _decoded(self, samples: Iterator[dict], epoch: int) -> Iterator:
        from timm.data.readers.reader_wds import _decode

        for sample in samples:
            try:
                decoded = _decode(sample, image_key=IMAGE_KEYS)
            except Exception as e:
                raise UnreadableImageError(
                    f"{self.name}: sample '{sample.get('__key__')}' of {sample.get('__url__')}: {type(e).__name__}: "
                    f'{e} (expected a .jpg/.png/.webp image and a .cls class index)'
                ) from None
            img, target = decoded['jpg'], decoded['target']
            if self.transform is not None:
                key = sample['__key__']
                img = (
                    seeded_call(self.transform, img, stable_seed(self.seed, epoch, key))
                    if self.training
                    else self.transform(img)
                )
            yield img, target


def _shuffled(samples: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """A shuffle buffer of `size` samples: each draw replaces a random slot with the next sample."""
    buffer = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        i = rng.randrange(size)
        yield buffer[i]
        buffer[i] = sample
    rng.shuffle(buffer)
    yield from buffer


def is_stream(loader) -> bool:
    return isinstance(getattr(loader, 'dataset', None), ShardStream)


# ---------------------------------------------------------------------------------------------------------------
# Shards of a split, as timm reads them


def _is_local(url: str) -> bool:
    return '://' not in url and not url.startswith('pipe:')


def split_shards(
    name: str, root: str, split: str, num_samples: int | None = None, count_field: str | None = None
) -> tuple[list, int]:
    """(shards, sample count) of `split` under `root`, parsed by timm's `create_dataset('wds/...')`.

    `num_samples` overrides the recorded count. `count_field` (e.g. `data.train_samples`): the count is needed
    (training), and the error when none is known names that field; without it an unknown count is 0.
    """
    _require_webdataset()
    from timm.data import create_dataset

    if not root:
        raise ValueError(f'data.root: required for {name}: the folder (or URL prefix) holding the shards')
    if _is_local(root) and not Path(root).expanduser().is_dir():
        raise MissingFileError(f'data.root: {root} is not a folder (expected the folder holding the {name} shards)')
    root = str(Path(root).expanduser()) if _is_local(root) else root
    try:
        reader = create_dataset(name, root=root, split=split, is_training=False).reader
    except (RuntimeError, KeyError, ValueError) as e:
        raise ValueError(
            f'data: split {split!r} of {name} in {root}: {e} (expected a split named in '
            f"{root}/{INFO_FILE}, or a shard pattern like '{split}-{{000000..000099}}.tar|COUNT')"
        ) from None
    info = reader.split_info
    urls = [os.path.join(root, f) for f in info.filenames]
    if not urls:
        raise ValueError(f'data: split {split!r} of {name} in {root} lists no shards')
    missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
    if missing:
        raise MissingFileError(
            f'data.root: {len(missing)} of the {len(urls)} shards of split {split!r} are missing, first {missing[0]}'
        )
    total = num_samples or reader.num_samples or 0
    if not total and count_field:
        raise ValueError(
            f'{count_field}: the sample count of split {split!r} of {name} is unknown (no {INFO_FILE} '
            f'in {root} and no |COUNT after the shard pattern): set {count_field}'
        )
    lengths = list(info.shard_lengths) if len(info.shard_lengths) == len(urls) else [total / len(urls)] * len(urls)
    if num_samples and sum(lengths) != num_samples:  # the recipe's count wins: spread it as the lengths go
        lengths = [n * num_samples / sum(lengths) for n in lengths]
    return [Shard(u, n) for u, n in zip(urls, lengths)], int(total)
