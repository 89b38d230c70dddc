"""Latency benchmark: pruned nets against the stock timm nets of equal FLOPs, on this CPU, side by side in one run.

For each (parent, stock) pair -- resnet50 -> resnet18, efficientnet_b1 -> efficientnet_b0, mobilenetv3_large_100 ->
mobilenetv3_large_075 -- three nets are timed beside the stock one: the parent pruned by the FLOPs knapsack to the
stock net's GMACs, the parent pruned by the latency knapsack (`kpid_zoo.budget.latency`) to the stock net's measured
latency, and the parent itself; plus timm's efficientnet_b1_pruned (the KPID authors' widths) beside
efficientnet_b0. Weights are random (latency does not depend on them; no Hub here); importance is magnitude (no
data needed). Two settings: batch 1 on 1 thread at 224 px, and batch 32 on all threads at 64 px (224 px would
take about an hour of lookup tables on 2 cores; its table samples 3 widths per group instead of 5). Every
comparison is a pair timed in alternation (`kpid_zoo.budget.timing.measure_paired`, ABBA): the latency budget is
`latency_of: <stock net>`, so the loop times each candidate beside the stock net, and so does the final table;
the ratio is taken call pair by call pair and reported as median and interquartile range, so what the machine
does meanwhile hits both nets of a pair alike.

    python benchmarks/latency.py            # ~10 minutes on 2 quiet cores; writes docs/latency_benchmark.{md,png}
    python benchmarks/latency.py --quick    # smaller inputs and fewer repeats, for a smoke run (no docs written)

Run it on a quiet machine: `echo "latency benchmark $(date)" > /work/QUIET` first, `rm /work/QUIET` after.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from _figures import save_figure  # noqa: E402

from kpid_zoo.budget.latency import GRID_FRACTIONS
from kpid_zoo.budget.prune import knapsack_prune, latency_knapsack_prune
from kpid_zoo.budget.timing import LatencySetting, device_name, measure_paired
from kpid_zoo.core.recipe import BudgetSpec
from kpid_zoo.engine.flops import count_flops, count_params
from kpid_zoo.engine.groups import discover_groups
from kpid_zoo.engine.importance import magnitude_importance

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results' / 'latency'  # one JSON per run: the doc details the latest, lists all
CASES = [
    ('resnet50', 'resnet18'),
    ('efficientnet_b1', 'efficientnet_b0'),
    ('mobilenetv3_large_100', 'mobilenetv3_large_075'),
]
EXTRA = [('efficientnet_b1_pruned', 'efficientnet_b0')]  # timm's KPID release beside the stock net of its FLOPs


@dataclass
class Setting:
    label: str
    latency: LatencySetting
    px: int
    repeats: int  # call pairs of each final comparison with the stock net
    measure_repeats: int  # call pairs per measurement inside the pruning loop
    table_repeats: int  # timed calls per grid point of the lookup table
    fractions: tuple[float, ...] = GRID_FRACTIONS  # the table's width grid


def create(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kwargs = {'zero_init_last': False} if name.startswith('resnet') else {}
    return timm.create_model(name, **kwargs).eval()


def load_avg() -> str:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())


def prune_arms(parent_name: str, stock_name: str, settings: list[Setting], log) -> dict:
    """The FLOPs-knapsack net (one architecture, pruned at 224 px) and one latency-knapsack net per setting."""
    parent = create(parent_name)
    size = (3, 224, 224)
    graph = discover_groups(parent, size)
    importance = magnitude_importance(parent, graph)
    stock_gmacs = count_flops(create(stock_name), size).gmacs
    t0 = time.time()
    flops_net = knapsack_prune(
        parent, graph, importance, stock_gmacs, arch=parent_name, input_size=size, progress=False
    )
    log(
        f'  {parent_name}: FLOPs knapsack -> {flops_net.report.achieved_gmacs:.3f} GMACs '
        f'(stock {stock_name} {stock_gmacs:.3f}) in {time.time() - t0:.0f}s'
    )
    arms = {'flops': flops_net.model, 'latency': {}, 'latency_reports': {}}
    for s in settings:
        input_size = (3, s.px, s.px)

        def compare(model, reference, input_size, setting, _s=s):
            return measure_paired(model, reference, input_size, setting, warmup=2, repeats=_s.measure_repeats)

        t0 = time.time()
        graph_s = discover_groups(parent, input_size)
        budget = BudgetSpec(
            latency_of=stock_name,
            device='cpu',
            batch_size=s.latency.batch_size,
            threads=s.latency.threads,
            tolerance=0.05,
        )
        try:
            result = latency_knapsack_prune(
                parent,
                graph_s,
                importance,
                budget,
                arch=parent_name,
                input_size=input_size,
                compare=compare,
                progress=False,
                log=log,
                table_kwargs={'warmup': 1, 'repeats': s.table_repeats, 'fractions': s.fractions},
            )
        except ValueError as e:  # the stock net is faster than anything the parent can be pruned to
            log(f'  {parent_name} [{s.label}]: no latency-knapsack net: {e}')
            arms['latency'][s.label] = None
            arms['latency_reports'][s.label] = {'unreachable': str(e)}
            continue
        out = result.report.latency
        log(
            f"  {parent_name} [{s.label}]: latency knapsack to {stock_name}'s {out.budget_ms:.2f} ms -> measured "
            f'{out.measured_ms:.2f} ms beside it, {result.report.achieved_gmacs:.3f} GMACs, '
            f'{len(result.report.rounds)} rounds in {time.time() - t0:.0f}s{" (" + out.note + ")" if out.note else ""}'
        )
        arms['latency'][s.label] = result.model
        arms['latency_reports'][s.label] = {
            'budget_ms': out.budget_ms,
            'parent_ms': out.parent_ms,
            'rounds': result.report.rounds,
            'measured_ms': out.measured_ms,
            'within_budget': out.within_budget,
            'noise': out.noise,
            'note': out.note,
            'gmacs': result.report.achieved_gmacs,
        }
    arms['flops_gmacs'] = flops_net.report.achieved_gmacs
    return arms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='small inputs and few repeats; writes no docs')
    parser.add_argument('--note', default='', help='what else ran on the machine (goes into the doc)')
    parser.add_argument(
        '--docs-only',
        action='store_true',
        help='rewrite docs/latency_benchmark.{md,png} from benchmarks/results/latency.json',
    )
    args = parser.parse_args()
    if args.docs_only:
        write_doc(saved_runs())
        return
    cores = os.cpu_count() or 1
    if args.quick:
        settings = [Setting('batch 1, 1 thread, 96 px', LatencySetting('cpu', 1, 1), 96, 5, 5, 3)]
    else:
        settings = [
            Setting('batch 1, 1 thread, 224 px', LatencySetting('cpu', 1, 1), 224, 40, 12, 5),
            # batch 32 at 224 px would take an hour of tables on 2 cores: 64 px, a coarser grid
            Setting(
                f'batch 32, {cores} threads, 64 px', LatencySetting('cpu', 32, cores), 64, 24, 10, 2, (0.25, 0.5, 1.0)
            ),
        ]
    started, load_before = time.time(), load_avg()
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f'load average before: {load_before}; {device_name("cpu")}')
    arms = {parent: prune_arms(parent, stock, settings, log) for parent, stock in CASES}
    results = {}
    for s in settings:
        pairs = []  # (name, net, stock name): each timed in alternation with its stock net
        for parent, stock in CASES:
            pairs.append((f'{parent} FLOPs-knapsack', arms[parent]['flops'], stock))
            if arms[parent]['latency'][s.label] is not None:
                pairs.append((f'{parent} latency-knapsack', arms[parent]['latency'][s.label], stock))
            pairs.append((parent, create(parent), stock))
        pairs += [(extra, create(extra), stock) for extra, stock in EXTRA]
        stocks = {stock: create(stock) for _, stock in CASES + EXTRA}
        size = (3, s.px, s.px)
        log(f'timing {len(pairs)} nets, each beside its stock net, {s.repeats} call pairs [{s.label}]')
        rows = []
        for name, net, stock in pairs:
            measure_paired(net, stocks[stock], size, s.latency, warmup=2, repeats=2)  # cold calls, discarded
            p = measure_paired(net, stocks[stock], size, s.latency, warmup=2, repeats=s.repeats)
            rows.append(
                {
                    'net': name,
                    'stock': stock,
                    'gmacs': count_flops(net, size).gmacs,
                    'stock_gmacs': count_flops(stocks[stock], size).gmacs,
                    'params_m': count_params(net) / 1e6,
                    **paired_fields(p),
                }
            )
            log(
                f'  {name:<42} {rows[-1]["gmacs"]:6.3f} GMACs {p.model.median_ms:9.2f} ms  x{p.ratio.median_ms:.3f} '
                f'[{p.ratio.q1_ms:.3f}-{p.ratio.q3_ms:.3f}] of {stock} ({p.reference.median_ms:.2f} ms)'
            )
        results[s.label] = {
            'rows': rows,
            'px': s.px,
            'batch_size': s.latency.batch_size,
            'threads': s.latency.threads,
            'repeats': s.repeats,
            'loops': {p: arms[p]['latency_reports'][s.label] for p, _ in CASES},
        }
    load_after = load_avg()
    minutes = (time.time() - started) / 60
    log(f'load average after: {load_after}; {minutes:.1f} min')
    if args.quick:
        return
    meta = {
        'device': device_name('cpu'),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'load_before': load_before,
        'load_after': load_after,
        'minutes': minutes,
        'note': args.note,
        'commit': subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT
        ).stdout.strip(),
        'flops_gmacs': {p: arms[p]['flops_gmacs'] for p, _ in CASES},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / time.strftime('%Y%m%d-%H%M.json')).write_text(
        json.dumps({'meta': meta, 'results': results}, indent=2) + '\n'
    )
    write_doc(saved_runs())


def runs_summary(runs: list[dict]) -> list[str]:
    """Each pruned net's ratio to its stock net in every run (its own loop, its own nets): how well a figure repeats."""
    from_paired = [r for r in runs if all('stock_ms' in row for res in r['results'].values() for row in res['rows'])]
    if len(from_paired) < 2:
        return []
    lines = [
        '## Every run (each its own pruning loops and timings)',
        '',
        'Ratio to the stock net, median [IQR] of call pairs, per run (commit, load average before):',
        '',
        '| setting | net | '
        + ' | '.join(f'{r["meta"]["commit"]} ({r["meta"]["load_before"].split()[0]})' for r in from_paired)
        + ' |',
        '|---|---|' + '---|' * len(from_paired),
    ]
    for label in from_paired[-1]['results']:
        for row in from_paired[-1]['results'][label]['rows']:
            if 'knapsack' not in row['net'] and not row['net'].endswith('_pruned'):
                continue
            cells = []
            for r in from_paired:
                match = [x for x in r['results'].get(label, {}).get('rows', []) if x['net'] == row['net']]
                cells.append(
                    f'{match[0]["ratio"]:.3f} [{match[0]["ratio_q1"]:.3f}-{match[0]["ratio_q3"]:.3f}]' if match else '-'
                )
            lines.append(f'| {label} | {row["net"]} | ' + ' | '.join(cells) + ' |')
    return lines + ['']


def saved_runs() -> list[dict]:
    """Every run's {meta, results}, oldest first (file names are their start times)."""
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob('*.json'))]


def paired_fields(p) -> dict:
    """A paired measurement (`timing.Paired`) as the figures a table row keeps: the net's median and quartiles, the
    stock net's median beside it, the per-pair ratio with its quartiles, and the ratio of the two fastest calls."""
    return {
        'median_ms': p.model.median_ms,
        'q1_ms': p.model.q1_ms,
        'q3_ms': p.model.q3_ms,
        'stock_ms': p.reference.median_ms,
        'ratio': p.ratio.median_ms,
        'ratio_q1': p.ratio.q1_ms,
        'ratio_q3': p.ratio.q3_ms,
        'min_ratio': p.model.min_ms / p.reference.min_ms,
    }


def verdict(row: dict) -> str:
    """Faster / slower only where the interquartile range of the per-round ratios lies wholly on one side of 1."""
    if row['net'] == row['stock']:
        return ''
    if row['ratio_q3'] < 1:
        return 'faster'
    if row['ratio_q1'] > 1:
        return '**slower**'
    return 'not resolved (IQR spans 1)'


def write_doc(runs: list[dict]) -> None:
    meta, results = runs[-1]['meta'], runs[-1]['results']
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    lines = [
        '# Latency: pruned nets vs stock nets of equal FLOPs (CPU)',
        '',
        f'`python benchmarks/latency.py` on {meta["device"]}, timm {meta["timm"]}, commit {meta["commit"]}, '
        f'{meta["minutes"]:.1f} minutes. Load average (1, 5, 15 min) before: {meta["load_before"]}, after: '
        f"{meta['load_after']} (the benchmark's own threads count: 1-2)."
        + (f' {meta["note"]}' if meta.get('note') else ''),
        '',
        'Every figure is a pair timed in alternation (ABBA, `kpid_zoo.budget.timing.measure_paired`), the way the '
        'pruning loop times its candidates: each net below beside its stock net, after discarded cold calls; '
        'the ratio is taken call pair by call pair and reported as median [IQR]; the ratio of the two '
        'fastest calls (least disturbed on a busy machine) is given too.',
        '',
        'Random-init weights (latency does not depend on them), magnitude importance, `round_to: 8`, '
        "`min_channels: 8`. FLOPs-knapsack: the parent pruned to the stock net's GMACs at 224 px (one "
        "architecture for both settings). Latency-knapsack: the parent pruned to the stock net's latency in "
        'that setting (`budget: {latency_of: <stock net>}`: its own lookup table; 5% tolerance, widened to '
        'twice the A/A noise where that is larger; every candidate timed beside the stock net, the budget '
        "being the stock net's time in its A/A test). Lookup tables are reused from the cache "
        'when one was measured for the same key. Not yet measured on a GPU.',
        '',
    ]
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), dpi=110, squeeze=False)
    for ax, (label, res) in zip(axes[0], results.items()):
        lines += [
            f'## {label}',
            '',
            '| net | GMACs | params (M) | median ms [IQR] | stock net (GMACs, ms beside it) | x stock [IQR] | '
            'vs stock | x stock (fastest calls) |',
            '|---|---|---|---|---|---|---|---|',
        ]
        for r in res['rows']:
            lines.append(
                f'| {r["net"]} | {r["gmacs"]:.3f} | {r["params_m"]:.2f} | {r["median_ms"]:.2f} '
                f'[{r["q1_ms"]:.2f}-{r["q3_ms"]:.2f}] | {r["stock"]} ({r["stock_gmacs"]:.3f}, '
                f'{r["stock_ms"]:.2f}) | {r["ratio"]:.3f} [{r["ratio_q1"]:.3f}-{r["ratio_q3"]:.3f}] | '
                f'{verdict(r)} | {r["min_ratio"]:.3f} |'
            )
        lines += ['', 'Latency-knapsack loop, predicted (table, corrected) vs measured ms per round:', '']
        for parent, loop in res['loops'].items():
            if 'unreachable' in loop:
                lines.append(f'- {parent}: no net: {loop["unreachable"]}')
                continue
            rounds = ', '.join(f'{r["predicted_ms"]:.2f}/{r["measured_ms"]:.2f}' for r in loop['rounds'])
            status = 'within budget' if loop['within_budget'] else 'NOT within budget'
            lines.append(
                f'- {parent}: budget {loop["budget_ms"]:.2f} ms (parent {loop["parent_ms"]:.2f} ms) '
                f'-> {rounds}; the kept net afresh: {loop["measured_ms"]:.2f} ms ({status}, A/A noise '
                f'{100 * loop["noise"]:.1f}%){"; " + loop["note"] if loop["note"] else ""}'
            )
        lines.append('')
        pruned = [r for r in res['rows'] if 'knapsack' in r['net'] or r['net'].endswith('_pruned')]
        for i, r in enumerate(pruned):
            color = '#1f77b4' if 'FLOPs' in r['net'] else '#ff7f0e' if 'latency' in r['net'] else '#2ca02c'
            ax.bar(i, r['ratio'], color=color, label=None)
            ax.errorbar(
                i,
                r['ratio'],
                yerr=[[r['ratio'] - r['ratio_q1']], [r['ratio_q3'] - r['ratio']]],
                color='black',
                capsize=3,
            )
        ax.axhline(1.0, color='grey', lw=1, ls='--', label='stock net of equal FLOPs / latency')
        ax.set_xticks(range(len(pruned)))
        ax.set_xticklabels(
            [
                r['net'].replace('-knapsack', '\n-knapsack').replace('mobilenetv3_large_100', 'mnv3_l_100')
                for r in pruned
            ],
            rotation=60,
            fontsize=7,
            ha='right',
        )
        ax.set_title(label, fontsize=9)
    save_figure(fig, ROOT / 'docs' / 'latency_benchmark.png', "latency / stock net's (median, IQR)", '')
    plt.close(fig)
    lines += runs_summary(runs)
    lines.insert(5, '![ratio to stock](latency_benchmark.png)\n')
    (ROOT / 'docs' / 'latency_benchmark.md').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
    main()
