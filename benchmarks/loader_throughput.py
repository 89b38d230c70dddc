"""Loader benchmark: train-transform images/s per loader worker at 224 px on real ImageNet JPEGs.

A GPU distilling at N img/s needs N / (img/s per worker) loader workers per GPU, so a recipe's `data.workers`
comes from this figure. The images are the 1000 ImageNet validation-style JPEGs in
../shared/data/imagenet-samples-256.tar.gz (short side 256 px: smaller than ImageNet's originals, so decoding
here is cheaper than on the real training set); the transform is exactly the build's
(`kpid_zoo.training.data.build_transforms`: random resized crop, flip, colour jitter, normalise, to tensor) with the
per-sample seeding of the data stage.

    python benchmarks/loader_throughput.py              # 3 repeats over the 1000 images
    python benchmarks/loader_throughput.py --repeats 5

Measured: (a) one process decoding + transforming image after image (what one worker does), one torch thread;
(b) a DataLoader with 1 and 2 workers at batch 64, to see how it scales on this machine's cores. Each figure is
the median over the repeats, with min and max. Prints a table and writes docs/loader_benchmark.md.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import torch
import torch.utils.data as tud

from kpid_zoo.budget.timing import cpu_model
from kpid_zoo.core.recipe import DataSpec
from kpid_zoo.training.data import SeededTransformDataset, build_transforms, load_image_folder, resolve_data_settings

REPO = Path(__file__).resolve().parents[1]
TARBALL = REPO.parent / 'shared' / 'data' / 'imagenet-samples-256.tar.gz'
INPUT = (3, 224, 224)
GPU_RATES = (1000, 2500, 5000)  # img/s a GPU might consume in distillation (teacher + student)


def unpack(tarball: Path, into: Path) -> Path:
    with tarfile.open(tarball) as tf:
        tf.extractall(into, filter='data')
    return into / 'imagenet-samples'


def per_worker_rate(dataset, repeats: int) -> list[float]:
    torch.set_num_threads(1)  # a loader worker runs with one thread
    rates = []
    for r in range(repeats):
        dataset.set_epoch(r)
        start = time.perf_counter()
        for i in range(len(dataset)):
            dataset[i]
        rates.append(len(dataset) / (time.perf_counter() - start))
    return rates


def loader_rate(dataset, workers: int, repeats: int, batch_size: int = 64) -> list[float]:
    rates = []
    for _ in range(repeats):
        loader = tud.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
        start = time.perf_counter()
        n = sum(len(images) for images, _ in loader)  # includes worker start-up, as every epoch does
        rates.append(n / (time.perf_counter() - start))
    return rates


def spread(rates: list[float]) -> str:
    return f'{statistics.median(rates):7.1f} ({min(rates):.1f}-{max(rates):.1f})'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--tarball', type=Path, default=TARBALL)
    ap.add_argument('--out', type=Path, default=REPO / 'docs' / 'loader_benchmark.md')
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = unpack(args.tarball, Path(tmp))
        config = resolve_data_settings(None, DataSpec(), INPUT)
        train_tf, _ = build_transforms(config, 'imagefolder')
        dataset = SeededTransformDataset(load_image_folder(root, 'val'), train_tf, seed=0)
        one = per_worker_rate(dataset, args.repeats)
        loaders = {w: loader_rate(dataset, w, args.repeats) for w in (1, 2)}

    per_worker = statistics.median(one)
    rows = [('one worker (image after image, 1 thread)', spread(one))] + [
        (f'DataLoader, {w} worker{"s" if w > 1 else ""}, batch 64', spread(r)) for w, r in loaders.items()
    ]
    cpu = cpu_model()
    lines = [
        '# Loader benchmark: train transform at 224 px on real ImageNet JPEGs',
        '',
        f'`python benchmarks/loader_throughput.py --repeats {args.repeats}` on {os.cpu_count()} CPU cores '
        f'({cpu}), torch {torch.__version__}. Images: the 1000 JPEGs of `imagenet-samples-256.tar.gz` '
        "(short side 256). Transform: the build's train transform (random resized crop 0.08-1, flip, colour "
        'jitter 0.4, bilinear, normalise). Figures: median img/s over the repeats (min-max).',
        '',
        '| what | img/s |',
        '|---|---|',
        *[f'| {what} | {rate} |' for what, rate in rows],
        '',
        f'One worker transforms about {per_worker:.0f} img/s. Workers per GPU a recipe needs '
        '(`data.workers`, with headroom of 25% for a busier disk and larger JPEGs than these):',
        '',
        '| GPU img/s (teacher + student) | workers per GPU |',
        '|---|---|',
        *[f'| {rate} | {math.ceil(1.25 * rate / per_worker)} |' for rate in GPU_RATES],
        '',
        f"The zoo's ImageNet recipes ask for 10 workers per process: about {10 * per_worker:.0f} img/s per GPU at "
        'this rate, and 10 cores per GPU for loading alone.',
    ]
    text = '\n'.join(lines) + '\n'
    print(text)
    args.out.write_text(text)


if __name__ == '__main__':
    main()
