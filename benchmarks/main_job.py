"""The README's main job, timed: `kpid-zoo build recipes/kpid_effnet_lite0_cifar10.yaml`, stage by stage.

Runs the build in a subprocess (or, with --report-only, reads a finished one), then writes docs/main_job.md: the
parent's and the pruned net's top-1/top-5 on the full CIFAR-10 test set, their fvcore GMACs and params, the wall time
of each stage (from the commit time of each stage's manifest in runs/<name>/stages/), the CPU time of the whole
build (user + sys of the process and its loader workers) and the machine, with its load average.

    PYTHONPATH=. python benchmarks/main_job.py                          # builds into runs/main_job/ (fresh)
    PYTHONPATH=. python benchmarks/main_job.py --report-only --work W --out-dir O   # a build already done
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cifar10 import _atomic_write  # noqa: E402

from kpid_zoo.budget.timing import cpu_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ('parent', 'pruned', 'finetune', 'eval', 'export')  # the order kpid_zoo.build runs them in
WHAT = {
    'parent': 'adapt the ImageNet parent to CIFAR-10 (CE)',
    'pruned': 'Taylor importance + knapsack + surgery',
    'finetune': 'inner-KD fine-tune of the pruned net (+ its test-set score)',
    'eval': 'score the parent on the test set',
    'export': 'safetensors + config + model card',
}


def stage_times(work: Path, start: float) -> dict:
    """Seconds per stage: each manifest is rewritten when its stage commits, so stage i ran from the commit of
    stage i-1 (or the build's start) to its own commit."""
    times, previous = {}, start
    for stage in STAGES:
        manifest = work / 'stages' / f'{stage}.json'
        if manifest.is_file():
            done = manifest.stat().st_mtime
            times[stage] = done - previous
            previous = done
    return times


def write_report(
    args, work: Path, out_dir: Path, wall: float, cpu: float | None, load: tuple | None, threads: str
) -> str:
    import timm
    import torch

    metrics = json.loads((out_dir / 'config.json').read_text())['kpid']['metrics']
    report = json.loads((work / 'pruned' / 'report.json').read_text())
    end = max((work / 'stages' / f'{s}.json').stat().st_mtime for s in STAGES)  # the export's commit
    times = stage_times(work, end - wall)
    parent_g, pruned_g = report['parent_gmacs'], report['achieved_gmacs']
    lines = [
        "# The README's main job, measured",
        '',
        f'`{args.command}`; machine: {cpu_model()}, {os.cpu_count()} cores, '
        f'torch {torch.__version__}, timm {timm.__version__}, torch intra-op threads: {threads}'
        + (f'; load average before / after: {load[0]:.1f} / {load[1]:.1f}.' if load else '.'),
        '',
        '| net | top-1 | top-5 | GMACs | params (M) |',
        '|---|---|---|---|---|',
        f'| parent (tf_efficientnet_lite0, 64 px) | {metrics["parent_top1"]:.2f} | {metrics["parent_top5"]:.2f} | '
        f'{parent_g:.4f} | {report["parent_params"] / 1e6:.2f} |',
        f'| pruned + inner KD | {metrics["top1"]:.2f} | {metrics["top5"]:.2f} | {pruned_g:.4f} '
        f'({100 * pruned_g / parent_g:.1f}%) | {report["params"] / 1e6:.2f} |',
        '',
        f'Scored on the full CIFAR-10 test split ({metrics["n"]} images).',
        '',
        '| stage | what | wall (s) |',
        '|---|---|---|',
    ]
    lines += [f'| {s} | {WHAT[s]} | {t:.0f} |' for s, t in times.items()]
    lines += [f'| total | | {wall:.0f} |', '']
    if cpu is not None:
        lines += [f'CPU time of the build (user + sys, loader workers included): {cpu:.0f} s.', '']
    text = '\n'.join(lines)
    _atomic_write(Path(args.out), text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--recipe', default=str(ROOT / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml'))
    ap.add_argument('--work', default=str(ROOT / 'runs' / 'main_job'))
    ap.add_argument('--out-dir', default=str(ROOT / 'outputs' / 'main_job'))
    ap.add_argument('--out', default=str(ROOT / 'docs' / 'main_job.md'))
    ap.add_argument('--report-only', action='store_true', help='report the build already in --work / --out-dir')
    ap.add_argument(
        '--wall-seconds',
        type=float,
        default=None,
        help='--report-only: the wall time the build took (as `time` measured it)',
    )
    ap.add_argument('--cpu-seconds', type=float, default=None, help='--report-only: its user + sys time')
    args = ap.parse_args()
    work, out_dir = Path(args.work), Path(args.out_dir)
    threads = os.environ.get(
        'OMP_NUM_THREADS',
        "the build's default (one per core that other processes leave free, "
        're-checked as it runs; docs/busy_machine.md)',
    )
    args.command = f'kpid-zoo build {os.path.relpath(args.recipe, ROOT)}'
    if args.report_only:
        if args.wall_seconds is None:
            ap.error("--report-only needs --wall-seconds (the build's wall time)")
        print(write_report(args, work, out_dir, args.wall_seconds, args.cpu_seconds, None, threads))
        return
    for path in (work, out_dir):
        shutil.rmtree(path, ignore_errors=True)  # a fresh build: nothing reused
    load_before = os.getloadavg()[0]
    start = time.time()
    subprocess.run(
        [sys.executable, '-m', 'kpid_zoo.cli', 'build', args.recipe, '--work', str(work), '--out', str(out_dir)],
        check=True,
        env={**os.environ, 'PYTHONPATH': str(ROOT)},
    )
    wall = time.time() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(
        write_report(
            args, work, out_dir, wall, usage.ru_utime + usage.ru_stime, (load_before, os.getloadavg()[0]), threads
        )
    )


if __name__ == '__main__':
    main()
