"""Between processes: how far a pruned net's latency ratio to its stock net moves from one fresh Python process to
the next, for the cells of docs/deploy_latency.md.

A latency budget is met in the process that pruned the net (the loop times each candidate beside the stock net and
keeps one under the budget); a user runs the net in another process, on another day. The deploy benchmark times
every net in one run, a third process. Within a process the ABBA pairs agree closely (the A/A IQR is within +-2%
on a quiet machine); this script measures what separates processes: each cell is timed exactly as
deploy_latency.py times it (the same nets, ONNX graphs, settings, cold calls discarded, then the call pairs) in
--processes fresh processes, one after the other, and records each process's median ratio.

Default cells: each latency-budgeted net in the runtime of its own budget (the goal cells), every pair and setting.
The nets come from benchmarks/results/deploy_latency/nets/ (fold 0); each ONNX graph is exported once, by this
process, and every child compiles it. Cells are cached under benchmarks/results/deploy_latency/spread/ (a cell of
another net, or of other runtime settings, is measured again); the deploy benchmark's report shows them.

    PYTHONPATH=. python benchmarks/process_spread.py                       # every goal cell, 5 processes each
    PYTHONPATH=. python benchmarks/process_spread.py --pairs resnet50 --settings b1 --processes 3
    PYTHONPATH=. python benchmarks/deploy_latency.py --part report         # docs/deploy_latency.md with them

Run it on a quiet machine, as deploy_latency.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deploy_latency import (  # noqa: E402
    BUDGET_RUNTIMES,
    PAIRS,
    RESULTS,
    Pair,
    compile_net,
    current_net,
    net_path,
    settings,
    time_path,
    timed_cell,
    versions,
)
from latency import load_avg  # noqa: E402

from kpid_zoo.budget.timing import cpu_model  # noqa: E402
from kpid_zoo.core.files import read_json, write_json  # noqa: E402
from kpid_zoo.deploy.onnx import onnx_bytes  # noqa: E402
from kpid_zoo.deploy.runtimes import RUNTIMES, bind, get_runtime  # noqa: E402


def spread_path(results: Path, setting: str, runtime: str, parent: str, arm: str) -> Path:
    return results / 'spread' / f'{setting}__{runtime}__{parent}__{arm}.json'


def child(spec: dict) -> dict:
    """One process's measurement of one cell: deploy_latency.time_part's calls, on the graphs the parent exported."""
    s = settings(False)[spec['setting']]
    pair = Pair(spec['parent'], argparse.Namespace(quick=False), None)
    x = s.example()
    runtime = get_runtime(spec['runtime'])
    record = read_json(Path(spec['net']))
    nets = {'net': pair.net(record), 'stock': pair.model(pair.stock_name)}
    calls = {}
    for name, net in nets.items():
        graph = Path(spec[name + '_onnx']).read_bytes() if runtime.uses_onnx else None
        calls[name] = bind(compile_net(runtime, net, x, s.threads, 'dynamo', graph), x.numpy())
    p = timed_cell(calls['net'], calls['stock'], s, spec['runtime'])
    return {'ratio': p.ratio.median_ms, 'ratio_q1': p.ratio.q1_ms, 'ratio_q3': p.ratio.q3_ms, 'ms': p.model.median_ms}


def measure(args, setting: str, runtime: str, parent: str, log) -> None:
    arm = f'latency-{runtime}'
    net_file = net_path(args, parent, arm, setting, 0)
    path = spread_path(args.results, setting, runtime, parent, arm)
    if not net_file.is_file():
        log(f'  {parent} {arm} [{setting}]: no net cached (deploy_latency.py --part prune)')
        return
    record = read_json(net_file)
    if 'keep' not in record or not current_net(record, arm):
        log(f'  {parent} {arm} [{setting}]: no current net')
        return
    identity = (record['sha256'], RUNTIMES[runtime].settings(), args.processes)
    cell = read_json(path) if path.is_file() else None
    if (
        cell is not None
        and not args.fresh
        and (cell['net_sha256'], cell['runtime_settings'], cell['processes']) == identity
    ):
        return
    s = settings(False)[setting]
    pair = Pair(parent, argparse.Namespace(quick=False), None)
    x = s.example()
    start, load = time.time(), load_avg()
    with tempfile.TemporaryDirectory(prefix='kpid-spread-') as tmp:
        spec = {'setting': setting, 'runtime': runtime, 'parent': parent, 'net': str(net_file)}
        if RUNTIMES[runtime].uses_onnx:  # one export for every child: the graph deploy_latency.py times
            for name, net in (('net', pair.net(record)), ('stock', pair.model(pair.stock_name))):
                spec[name + '_onnx'] = str(Path(tmp) / f'{name}.onnx')
                Path(spec[name + '_onnx']).write_bytes(onnx_bytes(net, x, dynamic_batch=False, exporter='dynamo'))
        runs = []
        for _ in range(args.processes):
            proc = subprocess.run(
                [sys.executable, __file__, '--child', json.dumps(spec)], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise SystemExit(f'{parent} {arm} [{setting}]: a child failed: {proc.stderr.strip()[-500:]}')
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    in_run = time_path(args, setting, runtime, parent, arm)
    timed = read_json(in_run) if in_run.is_file() else None
    row = {
        'parent': parent,
        'stock': PAIRS[parent],
        'arm': arm,
        'setting': setting,
        'runtime': runtime,
        'net_sha256': record['sha256'],
        'runtime_settings': RUNTIMES[runtime].settings(),
        'processes': args.processes,
        'runs': runs,
        'loop_ratio': record['latency']['measured_ms'] / record['latency']['budget_ms'],
        'benchmark_ratio': timed['ratio'] if timed and timed.get('net_sha256') == record['sha256'] else None,
        'seconds': time.time() - start,
        'load_avg_1m': load,
        'cpu': cpu_model(),
        'versions': versions(),
    }
    write_json(path, row)
    medians = [r['ratio'] for r in runs]
    log(
        f'  [{s.label}] {runtime:<11} {parent:<22} medians {min(medians):.3f}-{max(medians):.3f} '
        f'(middle {statistics.median(medians):.3f}); loop {row["loop_ratio"]:.3f} in {row["seconds"]:.0f}s'
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--pairs', nargs='*', choices=list(PAIRS), help='parents of the pairs; default all')
    ap.add_argument('--settings', nargs='*', choices=('b1', 'b32'), default=['b1', 'b32'])
    ap.add_argument('--runtimes', nargs='*', choices=list(BUDGET_RUNTIMES), default=list(BUDGET_RUNTIMES))
    ap.add_argument('--processes', type=int, default=5, help='fresh processes per cell')
    ap.add_argument('--fresh', action='store_true', help='measure cached cells again')
    ap.add_argument('--results', type=Path, default=RESULTS, help='the deploy benchmark cell folder')
    ap.add_argument('--child', help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        return
    log = lambda m: print(f'[{time.strftime("%H:%M:%S")}] {m}', flush=True)  # noqa: E731
    log(f'load average before: {load_avg()}; {cpu_model()}')
    for setting in args.settings:
        for runtime in args.runtimes:
            for parent in args.pairs or list(PAIRS):
                measure(args, setting, runtime, parent, log)
    log(f'load average after: {load_avg()}')


if __name__ == '__main__':
    main()
