"""The main job's training step on a busy machine: idle, and beside 1 and 2 CPU-bound processes at normal priority,
with 1 torch thread, 2 threads (OpenMP's default wait, and PASSIVE), and the build's default (`kpid_zoo.core.threads`:
the cores the other processes leave free, re-checked every few seconds; `kpid_zoo.core._openmp`: idle OpenMP threads
sleep instead of spinning).

The step is the parent stage's of the README's main job (recipes/kpid_effnet_lite0_cifar10.yaml):
tf_efficientnet_lite0 at 64 px, channels_last, batch 64 of real CIFAR-10 JPEGs through the build's own loader
(`kpid_zoo.training.data.create_loaders`, one loader worker), SGD with momentum, cross-entropy. The weights are random:
the speed does not depend on them.

Each configuration is a worker process, started once (its model and loader ready) and told to run a fixed number
of steps at a time (a run stops early after --max-seconds and 2 steps, so a configuration that collapses costs
seconds, not minutes); the runs are interleaved (every repeat runs each competitor count, and within it each
configuration, in a rotated order), so that a change in the machine's state during the benchmark touches every
configuration alike.
A competitor is a pure-Python busy loop at normal priority in a session of its own (a job started from another
terminal). A run of the adaptive default starts as a build stage does, with its 0.3 s look at the machine.
Reported: the median steps/s over the repeats, its range, and the slowdown against the same configuration idle
and against the best idle figure. About 6 minutes on 2 cores.

    PYTHONPATH=. python benchmarks/busy_machine.py                 # writes docs/busy_machine.md (+ .json)
    PYTHONPATH=. python benchmarks/busy_machine.py --repeats 5 --steps 20
    PYTHONPATH=. python benchmarks/busy_machine.py --configs 2 2-spin10000 auto auto-spin --out -   # other waits

Run it on an otherwise idle machine: other work on the cores is a competitor the table does not list.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPE = REPO / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml'
WARMUP_STEPS = 2  # untimed, each run: the first batches were prefetched while the worker waited
# a pure-Python busy loop that ends with the benchmark (its parent) even when that is killed
BUSY_LOOP = (
    'import os\nparent = os.getppid()\nwhile os.getppid() == parent:\n    for _ in range(10_000_000):\n        pass\n'
)


# ---------------------------------------------------------------------------------------------------------------
# worker: one configuration, model and loader ready, runs `steps` training steps per request on stdin


def worker(config: str) -> None:
    import timm
    import torch
    import torch.nn.functional as F

    from kpid_zoo.core import threads as kthreads
    from kpid_zoo.core.recipe import load_recipe
    from kpid_zoo.training.data import create_loaders

    recipe = load_recipe(RECIPE)
    if config.startswith('auto'):
        kthreads.configure()
    torch.manual_seed(0)
    model = timm.create_model(recipe.parent.model, num_classes=recipe.data.num_classes)
    data = create_loaders(recipe.data, model=model, input_size=recipe.input_size, seed=0)
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    epoch, batches = 0, iter(data.train_loader)

    def step() -> None:
        nonlocal epoch, batches
        try:
            images, target = next(batches)
        except StopIteration:
            epoch += 1
            data.train_loader.dataset.set_epoch(epoch)
            batches = iter(data.train_loader)
            images, target = next(batches)
        loss = F.cross_entropy(model(images.contiguous(memory_format=torch.channels_last)), target, label_smoothing=0.1)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the loader worker starts, the first step allocates
    print(json.dumps({'ready': True, 'threads': torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        steps, cap = int(request['steps']), float(request['max_seconds'])
        if kthreads._GOVERNOR is not None:
            kthreads._GOVERNOR.last = None  # a fresh look, as at the start of a build stage
        seen = []
        for _ in range(WARMUP_STEPS):
            kthreads.tick()
            step()
        start, done = time.perf_counter(), 0
        while done < steps and (done < 2 or time.perf_counter() - start < cap):
            kthreads.tick()
            seen.append(torch.get_num_threads())
            step()
            done += 1
        elapsed = time.perf_counter() - start
        print(json.dumps({'rate': done / elapsed, 'steps': done, 'threads': sorted(set(seen))}), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# parent: workers, competitors, the interleaved schedule, the report


def config_env(config: str) -> dict:
    """`1`, `2`: OMP_NUM_THREADS, OpenMP's default wait (what torch does unless told); `auto`: the build's default
    (adaptive count, and the wait the kpid-zoo command sets: `kpid_zoo.core._openmp`). A suffix sets the wait:
    `-passive` OMP_WAIT_POLICY=PASSIVE (sleep at once), `-spin` OpenMP's default (spin ~3 ms), `-spinN`
    GOMP_SPINCOUNT=N."""
    from kpid_zoo.core._openmp import WAIT_ENV

    env = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}
    env['PYTHONPATH'] = str(REPO)
    base, _, wait = config.partition('-')
    if base != 'auto':
        env['OMP_NUM_THREADS'] = base
    elif not wait:
        env.update(WAIT_ENV)
    if wait == 'passive':
        env['OMP_WAIT_POLICY'] = 'PASSIVE'
    elif wait.startswith('spin') and wait[4:]:
        env['GOMP_SPINCOUNT'] = wait[4:]
    elif wait not in ('', 'spin'):
        raise SystemExit(f'unknown configuration {config!r}')
    return env


class Worker:
    def __init__(self, config: str):
        self.config = config
        self.proc = subprocess.Popen(
            [sys.executable, __file__, '--worker', config],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=config_env(config),
        )
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f'worker {self.config} exited (code {self.proc.wait()})')
        return json.loads(line)

    def run(self, steps: int, max_seconds: float) -> dict:
        self.proc.stdin.write(json.dumps({'steps': steps, 'max_seconds': max_seconds}) + '\n')
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):  # stopped in the middle of a run
            self.proc.kill()
            self.proc.wait()


def start_competitors(n: int) -> list[subprocess.Popen]:
    # each in a session of its own, like a job started from another terminal: where the kernel groups a session's
    # processes for scheduling (autogroup), it is a competitor of the build's group, not a member of it
    return [subprocess.Popen([sys.executable, '-c', BUSY_LOOP], start_new_session=True) for _ in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


def measure(configs: list[str], competitors: list[int], repeats: int, steps: int, max_seconds: float) -> dict:
    workers = {}
    try:
        for config in configs:  # one at a time: the first one may unpack CIFAR-10 into the cache
            workers[config] = Worker(config)
            print(f'worker {config} ready ({workers[config].ready["threads"]} threads at start)', flush=True)
        runs = {(c, n): [] for c in configs for n in competitors}
        for r in range(repeats):
            for i in range(len(competitors)):
                n = competitors[(i + r) % len(competitors)]
                busy = start_competitors(n)
                try:
                    time.sleep(0.5)  # the competitors are running before the first step
                    for j in range(len(configs)):
                        config = configs[(j + r) % len(configs)]
                        out = workers[config].run(steps, max_seconds)
                        runs[(config, n)].append(out)
                        print(
                            f'repeat {r + 1}/{repeats}, {n} competitor(s), {config}: {out["rate"]:.2f} steps/s '
                            f'(threads {out["threads"]})',
                            flush=True,
                        )
                finally:
                    stop(busy)
    finally:
        for w in workers.values():
            w.close()
    return runs


def table(configs: list[str], competitors: list[int], runs: dict) -> list[str]:
    med = {key: statistics.median(o['rate'] for o in outs) for key, outs in runs.items()}
    best_idle = max(med[(c, 0)] for c in configs) if 0 in competitors else None
    head = '| torch threads | ' + ' | '.join(f'{n} competitor{"s" if n != 1 else ""}' for n in competitors) + ' |'
    lines = [head, '|---' * (len(competitors) + 1) + '|']
    for c in configs:
        cells = []
        for n in competitors:
            rates = [o['rate'] for o in runs[(c, n)]]
            cell = f'{med[(c, n)]:.2f} ({min(rates):.2f}-{max(rates):.2f})'
            if n and 0 in competitors:
                cell += f', {med[(c, 0)] / med[(c, n)]:.2f}x / {best_idle / med[(c, n)]:.2f}x'
            used = sorted({t for o in runs[(c, n)] for t in o['threads']})
            if c.startswith('auto'):
                cell += f' [{"/".join(map(str, used))} thr]'
            cells.append(cell)
        lines.append(f'| {LABELS.get(c, c)} | ' + ' | '.join(cells) + ' |')
    return lines


LABELS = {
    '1': '1',
    '2': "2 (torch's default on 2 cores)",
    '2-passive': '2, OMP_WAIT_POLICY=PASSIVE',
    'auto': '**build default**: adaptive, PASSIVE',
    'auto-spin': "adaptive, OpenMP's default wait",
    '1-passive': '1, OMP_WAIT_POLICY=PASSIVE',
}


def report(args, runs: dict, seconds: float, load: tuple[float, float]) -> str:
    import torch

    from kpid_zoo.budget.timing import cpu_model

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    lines = [
        '# The main job on a busy machine',
        '',
        f'`{" ".join(["PYTHONPATH=. python benchmarks/busy_machine.py"] + sys.argv[1:])}` on '
        f'{cpu_model()}, {cpus} CPUs, torch {torch.__version__}; {seconds / 60:.1f} min; load average before / '
        f"after: {load[0]:.1f} / {load[1]:.1f} (the benchmark's own processes count in the second).",
        '',
        "Training steps per second of the main job's parent stage (tf_efficientnet_lite0, 64 px, channels_last, "
        'batch 64 of CIFAR-10 JPEGs, one loader worker), idle and beside CPU-bound busy loops at normal priority. '
        f'Each cell: the median over {args.repeats} interleaved runs of {args.steps} steps, (min-max), and for a '
        'busy machine the slowdown against the same row idle / against the best idle figure; the adaptive rows '
        'also list the thread counts their runs used.',
        '',
    ]
    lines += table(args.configs, args.competitors, runs)
    med = {key: statistics.median(o['rate'] for o in outs) for key, outs in runs.items()}
    if ('auto', 0) in med and ('2', 0) in med:
        lines += [
            '',
            f"The build default against torch's default idle ({med[('2', 0)]:.2f} steps/s): "
            + ', '.join(
                f'{med[("2", 0)] / med[("auto", n)]:.2f}x slower with {n} competitor{"s" if n != 1 else ""}'
                if med[('auto', n)] < med[('2', 0)]
                else f'{med[("auto", n)] / med[("2", 0)]:.2f}x as fast idle'
                for n in args.competitors
                if ('auto', n) in med
            )
            + '.',
        ]
    lines += [
        '',
        "Rows: `OMP_NUM_THREADS=1` / `2` with OpenMP's default wait (an idle thread spins about 3 ms "
        "before it sleeps), 2 with `OMP_WAIT_POLICY=PASSIVE` (it sleeps at once), and the build's default "
        'as `kpid-zoo build` runs it: torch on the CPUs the other processes leave free (their busy time over '
        'the last seconds, niced processes not counted; `kpid_zoo.core.threads`), re-checked every 5 s in every '
        'long loop, with `OMP_WAIT_POLICY=PASSIVE` (`kpid_zoo.core._openmp`). `OMP_NUM_THREADS=N` or '
        '`kpid-zoo build --threads N` fixes the count; an `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT` in the '
        'environment sets the wait.',
        '',
    ]
    return '\n'.join(lines)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == '--worker':
        worker(sys.argv[2])
        return
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument(
        '--configs',
        nargs='+',
        default=['1', '2', '2-passive', 'auto'],
        help="1, 2 (OMP_NUM_THREADS), auto (the build's default); suffixes: see config_env",
    )
    ap.add_argument('--competitors', type=int, nargs='+', default=[0, 1, 2])
    ap.add_argument('--repeats', type=int, default=3)
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument(
        '--max-seconds',
        type=float,
        default=8.0,
        help='a run stops after this long even short of --steps (a collapsed configuration would '
        'otherwise take minutes a run)',
    )
    ap.add_argument('--out', default=str(REPO / 'docs' / 'busy_machine.md'), help="'-': print only")
    ap.add_argument('--from-json', metavar='JSON', help='write the report of an earlier run (its .json) again')
    args = ap.parse_args()
    rerender = bool(args.from_json)
    if rerender:
        saved = json.loads(Path(args.from_json).read_text())
        args = argparse.Namespace(**{**saved['args'], 'out': args.out})
        runs = {(k.split('|')[0], int(k.split('|')[1])): v for k, v in saved['runs'].items()}
        sys.argv[1:] = saved['argv']
        text = report(args, runs, saved['seconds'], tuple(saved['load']))
    else:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the workers and competitors
        start, load_before = time.time(), os.getloadavg()[0]
        runs = measure(args.configs, args.competitors, args.repeats, args.steps, args.max_seconds)
        seconds, load = time.time() - start, (load_before, os.getloadavg()[0])
        text = report(args, runs, seconds, load)
        saved = {
            'argv': sys.argv[1:],
            'args': vars(args),
            'seconds': seconds,
            'load': load,
            'runs': {f'{c}|{n}': v for (c, n), v in runs.items()},
        }
    print(text)
    if args.out != '-':
        out = Path(args.out)
        out.write_text(text)
        if not rerender:
            out.with_suffix('.json').write_text(json.dumps(saved, indent=2) + '\n')


if __name__ == '__main__':
    main()
