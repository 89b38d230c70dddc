"""What a person reads after pruning: a table of the numbers, a plot of the widths, and the files on disk."""

from __future__ import annotations

import json
from pathlib import Path

from ..core.files import WEIGHTS_FILE, save_weights, staged_dir
from ._result import LatencyOutcome
from .prune import PruneResult

SPEC_FILE = 'spec.json'
REPORT_FILE = 'report.json'
PRUNE_PLOT = 'widths.png'  # the export's own plot is zoo.card.WIDTHS_PLOT (another file, in another folder)
PRUNE_FILES = (WEIGHTS_FILE, SPEC_FILE, REPORT_FILE, PRUNE_PLOT)  # all a pruning output folder may hold


def plot_widths(layer_widths: list[tuple[str, int, int]], path: str | Path, title: str = '') -> Path:
    """Per-layer output width of the parent (grey) and of the pruned net (blue), with the kept share on top."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in layer_widths]
    parent = [p for _, p, _ in layer_widths]
    pruned = [k for _, _, k in layer_widths]
    fig, (ax, ax_ratio) = plt.subplots(
        2,
        1,
        figsize=(max(8.0, 0.16 * len(names) + 2), 6.5),
        dpi=110,
        sharex=True,
        gridspec_kw={'height_ratios': [3, 1]},
    )
    x = range(len(names))
    ax.bar(x, parent, color='#c8c8c8', label='parent', width=0.9)
    ax.bar(x, pruned, color='#1f77b4', label='pruned', width=0.9)
    ax.set_yscale('log', base=2)
    ax.set_ylabel('output channels')
    ax.set_title(title or 'per-layer width: parent vs pruned')
    ax.legend(loc='upper left')
    ax_ratio.plot(list(x), [k / p for p, k in zip(parent, pruned)], color='#1f77b4', marker='.', lw=0.8)
    ax_ratio.set_ylim(0, 1.05)
    ax_ratio.set_ylabel('kept')
    ax_ratio.set_xticks(list(x))
    ax_ratio.set_xticklabels(names, rotation=90, fontsize=5)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def runtime_in_words(lat: LatencyOutcome) -> str:
    """The runtime row: 'torch 2.14.1 (eager; malloc: glibc mmap_threshold=...)', 'onnxruntime 1.32.0 (...)'."""
    details = (['eager'] if lat.runtime.split()[0] == 'torch' else []) + [
        f'{k}: {v}' if k == 'malloc' else f'{k}={v}' for k, v in lat.runtime_settings.items()
    ]
    return f'{lat.runtime} ({"; ".join(details)})' if details else lat.runtime


def summary_table(result: PruneResult) -> str:
    r = result.report
    rows = [('parent', r.parent), ('input size', 'x'.join(map(str, r.input_size)))]
    lat = r.latency
    if lat is None:
        rows += [
            (
                'GMACs parent / target / achieved',
                f'{r.parent_gmacs:.4f} / {r.target_gmacs:.4f} / {r.achieved_gmacs:.4f}',
            ),
            ('FLOPs error vs target', f'{100 * r.flops_error:+.2f}%'),
        ]
    else:
        rows += [
            ('latency measured on', f'{lat.device} (batch {lat.batch_size}, {lat.threads} threads): {lat.device_name}'),
            ('runtime', runtime_in_words(lat)),
            (
                'ms parent / budget / measured',
                f'{lat.parent_ms:.3f} / {lat.budget_ms:.3f} / '
                f'{lat.measured_ms:.3f} (IQR {lat.measured_q1_ms:.3f}-'
                f'{lat.measured_q3_ms:.3f})',
            ),
            (
                'within budget',
                f'{"yes" if lat.within_budget else "NO"} (tolerance {100 * lat.tolerance:.1f}%, '
                f'A/A noise {100 * lat.noise:.1f}%)',
            ),
            ('timed beside', 'the parent' if lat.reference == 'parent' else lat.reference),
            ('GMACs parent / achieved', f'{r.parent_gmacs:.4f} / {r.achieved_gmacs:.4f}'),
        ]
    rows += [
        ('params parent / pruned', f'{r.parent_params / 1e6:.2f}M / {r.params / 1e6:.2f}M'),
        ('groups pruned', f'{len(result.keep)} of {len(result.graph.prunable)}'),
        ('knapsack gap vs LP bound', f'{100 * r.gap:.3f}%'),
        ('knapsack rounds', str(len(r.rounds))),
    ]
    if lat is not None:
        rows += [
            (f'  round {i + 1}: predicted / measured ms', f'{row["predicted_ms"]:.3f} / {row["measured_ms"]:.3f}')
            for i, row in enumerate(r.rounds)
        ]
        rows.append(('  the kept net, timed afresh', f'{lat.measured_ms:.3f} ms (its round read {lat.round_ms:.3f})'))
        if lat.note:
            rows.append(('note', lat.note))
    width = max(len(k) for k, _ in rows)
    return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def write_prune_outputs(result: PruneResult, out_dir: str | Path) -> Path:
    """Write weights (safetensors), spec, report and width plot into `out_dir`, all or nothing; an existing
    `out_dir` is replaced only if it holds nothing but those files (the caller proves they are its own)."""
    with staged_dir(out_dir, owned=PRUNE_FILES) as tmp:
        save_weights(result.model, tmp / WEIGHTS_FILE)
        result.spec.save(tmp / SPEC_FILE)
        report = result.report.to_dict()
        report['kept_channels'] = {g: idx.tolist() for g, idx in result.keep.items()}
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + '\n')
        plot_widths(
            result.report.layer_widths,
            tmp / PRUNE_PLOT,
            f'{result.report.parent}: {result.report.parent_gmacs:.3f} -> {result.report.achieved_gmacs:.3f} GMACs',
        )
    return Path(out_dir)
