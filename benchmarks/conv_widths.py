"""Which channel widths does this CPU reward? Dense 1x1 and 3x3 conv latency against width, for `round_to`.

Each conv maps C channels to C channels (the shape a pruned layer has between two pruned groups), for C from 32 to
256 in steps of 4 plus every width from 60 to 68 and from 124 to 132. All widths are timed round-robin within each
repeat (machine noise hits every width alike), median over repeats. A least-squares fit,
ms = a + b * C + c * C^2 per conv kind (fixed overhead, memory traffic, multiply-adds), gives the trend; a width's
*excess* is its median over the fit: below 1 means faster than its neighbours predict. The table groups widths
from 48 up (below, per-call overhead dominates) by the largest power of two (up to 32) dividing them.

    python benchmarks/conv_widths.py    # about a minute on 2 cores; writes docs/conv_width_benchmark.{md,png}
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from _figures import save_figure  # noqa: E402

from kpid_zoo.budget.timing import LatencySetting, device_name, fixed_threads, time_once

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = sorted(set(range(32, 257, 4)) | set(range(60, 69)) | set(range(124, 133)))
# (label, kernel, spatial size) per setting: the spatial sizes are those of a mid-network stage at 224 px input
KINDS = [('1x1', 1, 28), ('3x3', 3, 14)]
MIN_SUMMARY = 48


def multiple_class(width: int) -> int:
    """The largest of 32, 16, 8, 4, 2, 1 that divides `width`."""
    return next(m for m in (32, 16, 8, 4, 2, 1) if width % m == 0)


def run(setting: LatencySetting, repeats: int, scale: int = 1) -> dict:
    torch.manual_seed(0)
    cases = {}
    for label, k, hw in KINDS:
        for w in WIDTHS:
            conv = nn.Conv2d(w, w, k, padding=k // 2, bias=False).eval()
            cases[(label, w)] = (conv, torch.randn(setting.batch_size, w, hw // scale, hw // scale))
    samples = {key: [] for key in cases}
    with fixed_threads(setting), torch.inference_mode():
        for conv, x in cases.values():
            conv(x), conv(x)
        for _ in range(repeats):
            for key, (conv, x) in cases.items():
                samples[key].append(time_once(lambda: conv(x), setting))
    out = {}
    for label, _, _ in KINDS:
        widths = np.array(WIDTHS, dtype=float)
        med = np.array([statistics.median(samples[(label, w)]) for w in WIDTHS])
        design = np.stack([np.ones_like(widths), widths, widths**2], axis=1)
        coef, *_ = np.linalg.lstsq(design, med, rcond=None)
        excess = med / (design @ coef)
        out[label] = {'widths': WIDTHS, 'median_ms': med.tolist(), 'excess': excess.tolist()}
    return out


def main() -> None:
    cores = os.cpu_count() or 1
    settings = [
        ('batch 1, 1 thread', LatencySetting('cpu', 1, 1), 15, 1),
        (f'batch 32, {cores} threads (spatial size halved)', LatencySetting('cpu', 32, cores), 5, 2),
    ]
    load_before = ' '.join(f'{x:.2f}' for x in os.getloadavg())
    started = time.time()
    results = {label: run(s, repeats, scale) for label, s, repeats, scale in settings}
    load_after = ' '.join(f'{x:.2f}' for x in os.getloadavg())

    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    lines = [
        '# Conv latency against channel width (for `round_to`)',
        '',
        f'`python benchmarks/conv_widths.py` on {device_name("cpu")}, {(time.time() - started) / 60:.1f} '
        f'minutes; load average before {load_before}, after {load_after}. Dense C->C convs, 1x1 at 28x28 and '
        f'3x3 at 14x14 (halved at batch 32), widths {WIDTHS[0]}-{WIDTHS[-1]}, all timed round-robin per repeat. '
        'Excess = median latency / the fit a + b*C + c*C^2 over all widths (below 1: faster than the '
        f'trend). Mean excess of the widths from {MIN_SUMMARY} up, by the largest power of two dividing the '
        'width:',
        '',
        '| setting | conv | x32 | x16 | x8 | x4 | x2 | odd |',
        '|---|---|---|---|---|---|---|---|',
    ]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    for (label, _, _, _), res in zip(settings, results.values()):
        for kind, r in res.items():
            by = {
                m: [e for w, e in zip(r['widths'], r['excess']) if w >= MIN_SUMMARY and multiple_class(w) == m]
                for m in (32, 16, 8, 4, 2, 1)
            }
            cells = [f'{statistics.mean(v):.3f} ({len(v)})' if v else '-' for v in by.values()]
            lines.append(f'| {label} | {kind} | ' + ' | '.join(cells) + ' |')
            ax.plot(r['widths'], r['excess'], marker='.', lw=0.8, label=f'{kind}, {label}')
    lines += ['', '(n) is how many widths fall in the class. ![excess vs width](conv_width_benchmark.png)', '']
    for w in (64, 128, 256):
        ax.axvline(w, color='grey', lw=0.5, ls=':')
    save_figure(fig, ROOT / 'docs' / 'conv_width_benchmark.png', 'latency / trend fit', 'channels (in = out)')
    (ROOT / 'benchmarks' / 'results').mkdir(exist_ok=True)
    (ROOT / 'benchmarks' / 'results' / 'conv_widths.json').write_text(json.dumps(results, indent=1) + '\n')
    plt.close(fig)
    (ROOT / 'docs' / 'conv_width_benchmark.md').write_text('\n'.join(lines) + '\n')
    print('\n'.join(lines))


if __name__ == '__main__':
    main()
