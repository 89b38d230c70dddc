"""Prune-step benchmark: KPID (groups + Taylor importance + knapsack + surgery) vs Torch-Pruning, same targets.

For each (parent, target) pair both methods start from the same timm model and the same 8 batches of real
images (CIFAR-10 JPEGs resized to 224 px: ImageNet itself is not available here). KPID solves for the target
directly; Torch-Pruning has no FLOPs target, so it is run the way its docs suggest: global Taylor pruning in small
iterative steps (fresh gradients from one of the same 8 batches at each step), stopping at the first step whose
FLOPs are at or under the target. Both are counted with fvcore.

    python benchmarks/prune_step.py            # resnet50 -> 2.0/1.0 GMACs, efficientnet_b1 -> 0.39 GMACs
    python benchmarks/prune_step.py --quick    # smaller batches, for a smoke run

Prints a table and writes docs/prune_step_benchmark.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from kpid_zoo.budget.prune import knapsack_prune
from kpid_zoo.budget.timing import cpu_model
from kpid_zoo.core.recipe import DataSpec
from kpid_zoo.engine.flops import count_flops, count_params
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import taylor_importance
from kpid_zoo.training.data import create_loaders

CASES = [('resnet50', 2.0), ('resnet50', 1.0), ('efficientnet_b1', 0.39)]
INPUT = (3, 224, 224)


def parent(name: str):
    """The architecture with random weights (no Hub here). timm zero-inits each ResNet block's last BN, which
    would make most Taylor scores exactly 0 for both methods; a trained network has no such ties."""
    kwargs = {'zero_init_last': False} if name.startswith('resnet') else {}
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs).eval()


def real_batches(model, n: int, batch_size: int) -> list:
    data = DataSpec(
        dataset='cifar10',
        batch_size=batch_size,
        workers=0,
        num_classes=10,
        crop_pct=1.0,
        train_subset=n * batch_size,
        val_subset=batch_size,
    )
    bundle = create_loaders(data, model=model, input_size=INPUT)
    return [(x, y) for x, y in bundle.train_loader][:n]


def kpid(name: str, target: float, batches: list) -> dict:
    model = parent(name)
    start = time.perf_counter()
    graph = discover_groups(model, INPUT)
    importance = taylor_importance(model, graph, batches, len(batches), progress=False)
    result = knapsack_prune(model, graph, importance, target, arch=name, input_size=INPUT, progress=False)
    seconds = time.perf_counter() - start
    gmacs = count_flops(result.model, INPUT).gmacs
    return dict(
        method='KPID knapsack (ours)',
        seconds=seconds,
        gmacs=gmacs,
        params=count_params(result.model),
        rounds=len(result.report.rounds),
        gap=result.report.gap,
    )


def torch_pruning(name: str, target: float, batches: list, steps: int) -> dict:
    import torch_pruning as tp

    model = parent(name)
    start = time.perf_counter()
    pruner = tp.pruner.MetaPruner(
        model,
        torch.randn(1, *INPUT),
        importance=tp.importance.GroupTaylorImportance(),
        global_pruning=True,
        pruning_ratio=0.9,
        iterative_steps=steps,
        ignored_layers=[model.get_classifier()],
        round_to=8,
    )
    gmacs, used = count_flops(model, INPUT).gmacs, 0
    while gmacs > target and used < steps:
        model.zero_grad()
        x, y = batches[used % len(batches)]  # one of KPID's 8 batches per step: fresh gradients for the new shape
        F.cross_entropy(model(x), y).backward()
        pruner.step()
        used += 1
        gmacs = count_flops(model, INPUT).gmacs
    seconds = time.perf_counter() - start
    return dict(
        method=f'Torch-Pruning global Taylor ({steps} steps)',
        seconds=seconds,
        gmacs=gmacs,
        params=count_params(model),
        rounds=used,
        gap=float('nan'),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--quick', action='store_true', help='2 images a batch instead of 16')
    parser.add_argument('--steps', type=int, default=40, help='Torch-Pruning iterative steps to 90%% ratio')
    parser.add_argument('--out', default='docs/prune_step_benchmark.md')
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for name, target in CASES:
        batches = real_batches(parent(name), 8, 2 if args.quick else 16)
        for run in (kpid(name, target, batches), torch_pruning(name, target, batches, args.steps)):
            run.update(parent=name, target=target, error=100 * (run['gmacs'] - target) / target)
            rows.append(run)
            print(
                f'{name:>16} -> {target:<5} {run["method"]:<38} {run["seconds"]:7.1f}s  '
                f'{run["gmacs"]:.4f} GMACs  error {run["error"]:+6.2f}%',
                flush=True,
            )
    write_table(rows, Path(args.out), args)


def write_table(rows: list, path: Path, args) -> None:
    lines = [
        '# Prune step: KPID knapsack vs Torch-Pruning',
        '',
        f'`python benchmarks/prune_step.py{" --quick" if args.quick else ""}` on {torch.get_num_threads()} CPU '
        f'threads ({cpu_model()}), torch {torch.__version__}, timm {timm.__version__}, '
        f'input 224 px, 8 batches of {2 if args.quick else 16} real images (CIFAR-10 JPEGs resized) for the '
        'Taylor scores. Parents have random weights (the benchmark downloads nothing; ResNets without '
        "timm's zero-init of the last BN). "
        'Time covers groups + importance + knapsack rounds + surgery for KPID, and graph + '
        'importance + iterative steps (one batch of gradients each) for Torch-Pruning; both measured side by '
        'side in one run. FLOPs by fvcore '
        '(1 FLOP = 1 multiply-add). Error = (achieved - target) / target.',
        '',
        '| parent | target GMACs | method | achieved GMACs | FLOPs error | params (M) | time (s) | rounds/steps '
        '| knapsack gap |',
        '|---|---|---|---|---|---|---|---|---|',
    ]
    for r in rows:
        gap = '-' if r['gap'] != r['gap'] else f'{100 * r["gap"]:.3f}%'
        lines.append(
            f'| {r["parent"]} | {r["target"]} | {r["method"]} | {r["gmacs"]:.4f} | {r["error"]:+.2f}% | '
            f'{r["params"] / 1e6:.2f} | {r["seconds"]:.1f} | {r["rounds"]} | {gap} |'
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('\n'.join(lines) + '\n')
    print(f'wrote {path}')


if __name__ == '__main__':
    main()
