"""Latency as the pruning budget: measured on the device the build runs on, as a lookup table the knapsack reads.

HALP's idea (Shen et al., 2022): a layer's latency is a function of the widths it depends on, sampled once on a
grid and interpolated, so the knapsack can price a channel in milliseconds instead of FLOPs. Here the function of
each timed layer has the same terms as the FLOPs cost model (`knapsack.CostModel`): a dense conv depends on its
input group and its output group (the producer/consumer coupling), a BN, activation or depthwise conv on its own
group. Each is timed alone, on the input shape it sees in the network, at every combination of a few widths of
its groups; `LatencyCostModel` interpolates multilinearly between them (bilinear for a conv). The whole network,
timed at full and at narrowest widths, fixes the rest (`calibrate`): a fixed part no layer accounts for (Python
dispatch, residual adds, gates) and a scale from layers timed alone to layers in the network. The table is cached
on disk per (device, processor, torch, parent, input size, batch, threads).

Measurement (`time_callable`): warm-up calls first, then many timed calls under `torch.inference_mode` with the
thread count fixed, reported as median and quartiles. The pruning loop never compares timings taken apart:
`measure_paired` times a candidate in alternation with a reference network (the parent, or a budget's
`latency_of`) and keeps the per-call ratio, so both see the same machine (other jobs, clock, caches); a candidate's
milliseconds are that ratio times the reference's time at the start. `measure_noise` is the A/A test: the
reference paired with itself several times, the spread of those ratios is what a difference must exceed before
the loop trusts it.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.files import atomic_write_text, default_cache_dir, json_sha256
from ..core.logs import get_logger
from ..core.threads import fixed_threads as fixed_thread_count
from ..engine.groups import ROLE_DW, ROLE_IN, ROLE_NORM, ROLE_PARAM, ChannelMap, GroupGraph, Member
from ..engine.handlers import handler_for
from ..engine.surgery import prune_model
from ..errors import UserError

logger = get_logger(__name__)

TABLE_VERSION = 1
# Width fractions each group is sampled at; the interpolation is linear between them (and beyond the ends).
GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)
DEVICES = ('cpu', 'cuda')


@dataclass(frozen=True)
class LatencySetting:
    """Where and how a network is timed: the device, the batch, the CPU threads (fixed while timing)."""

    device: str = 'cpu'
    batch_size: int = 1
    threads: int = 1

    def describe(self) -> str:
        threads = f', {self.threads} thread{"s" if self.threads != 1 else ""}' if self.device == 'cpu' else ''
        return f'{self.device} (batch {self.batch_size}{threads})'


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median, quartiles and extremes over `repeats` timed calls."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    min_ms: float
    max_ms: float
    repeats: int

    @classmethod
    def of(cls, samples_ms: list[float]) -> Timing:
        q1, _, q3 = (
            statistics.quantiles(samples_ms, n=4, method='inclusive') if len(samples_ms) > 1 else (samples_ms[0],) * 3
        )
        return cls(statistics.median(samples_ms), q1, q3, min(samples_ms), max(samples_ms), len(samples_ms))

    @property
    def relative_iqr(self) -> float:
        return (self.q3_ms - self.q1_ms) / self.median_ms if self.median_ms > 0 else 0.0

    def scaled(self, factor: float) -> Timing:
        """Every figure times `factor`: a ratio to a reference, scaled by the reference's milliseconds."""
        return Timing(
            self.median_ms * factor,
            self.q1_ms * factor,
            self.q3_ms * factor,
            self.min_ms * factor,
            self.max_ms * factor,
            self.repeats,
        )


@dataclass(frozen=True)
class Paired:
    """Two networks timed in alternation: each one's timing and the per-round ratio model / reference."""

    model: Timing
    reference: Timing
    ratio: Timing


def check_device(device: str) -> None:
    """Fail unless `device` is present here (a latency budget is measured where the build runs)."""
    if device not in DEVICES:
        raise UserError(f'expected one of {", ".join(map(repr, DEVICES))}, got {device!r}')
    if device == 'cuda' and not torch.cuda.is_available():
        raise UserError(
            "'cuda' is not present on this machine (torch.cuda.is_available() is False): time the "
            'network on the device it is for, or set budget.device: cpu'
        )


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what `platform` knows of it."""
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    """What the timings depend on beyond the settings: the processor (or GPU) and the torch build."""
    if device == 'cuda':
        return f'{torch.cuda.get_device_name()} / torch {torch.__version__} / cuda {torch.version.cuda}'
    return f'{cpu_model()} ({os.cpu_count()} cpus) / torch {torch.__version__}'


def fixed_threads(setting: LatencySetting) -> contextlib.AbstractContextManager:
    """The block runs with torch's intra-op thread count at `setting.threads` (CPU), restored after."""
    return fixed_thread_count(setting.threads if setting.device == 'cpu' else None)


def time_once(fn: Callable[[], object], setting: LatencySetting) -> float:
    """Milliseconds of one call (inside `time_callable` / `measure_paired`: threads fixed, inference mode)."""
    if setting.device == 'cuda':  # untested here (no GPU was lent): CUDA events around the call
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_callable(fn: Callable[[], object], setting: LatencySetting, *, warmup: int = 3, repeats: int = 15) -> Timing:
    """Time `fn()` `repeats` times after `warmup` untimed calls, in inference mode with the threads fixed."""
    with fixed_threads(setting), torch.inference_mode():
        for _ in range(warmup):
            fn()
        return Timing.of([time_once(fn, setting) for _ in range(repeats)])


def example_input(input_size: tuple[int, ...], setting: LatencySetting) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(setting.batch_size, *input_size, generator=gen).to(setting.device)


def measure_paired(
    model: nn.Module,
    reference: nn.Module,
    input_size: tuple[int, int, int],
    setting: LatencySetting,
    *,
    warmup: int = 3,
    repeats: int = 15,
) -> Paired:
    """`model` and `reference` timed in alternation, `repeats` calls each, in ABBA order (neither always runs right
    after the other), and their ratio taken call pair by call pair.

    Why pairs: timings taken minutes apart differ by what the machine did in between (other jobs, clocks), and a
    network timed back to back keeps its weights in the caches while one deployed beside others does not; two
    networks timed in turn share both, so their ratio holds where separate medians do not. Measured: a net the
    old loop timed alone at its budget ran 5-39% above it beside the stock net (docs/latency_benchmark.md)."""
    model, reference = model.to(setting.device).eval(), reference.to(setting.device).eval()
    x = example_input(input_size, setting)
    ours: list[float] = []
    theirs: list[float] = []
    with fixed_threads(setting), torch.inference_mode():
        for _ in range(warmup):
            model(x), reference(x)
        for i in range(repeats):
            pair = ((model, ours), (reference, theirs))
            for net, samples in pair if i % 2 == 0 else pair[::-1]:
                samples.append(time_once(lambda: net(x), setting))
    return Paired(Timing.of(ours), Timing.of(theirs), Timing.of([a / b for a, b in zip(ours, theirs)]))


@dataclass(frozen=True)
class Noise:
    """How far apart repeated A/A ratios of one network land: `relative` = max - min of the ratio medians."""

    ratios: tuple[float, ...]

    @property
    def relative(self) -> float:
        return max(self.ratios) - min(self.ratios)


def measure_noise(
    model: nn.Module,
    input_size: tuple[int, int, int],
    setting: LatencySetting,
    *,
    series: int = 3,
    compare: Callable[..., Paired] = measure_paired,
) -> tuple[Timing, Noise]:
    """The A/A test: `series` paired measurements of the network against itself. Returns the middle of its
    timings and the spread of the ratios, which for a paired comparison is what a difference must exceed.

    One more series runs first, untimed: the first calls of a network new to the process run cold (the allocator,
    oneDNN's primitive cache), beyond what a few warm-up calls absorb."""
    compare(model, model, input_size, setting)
    runs = [compare(model, model, input_size, setting) for _ in range(series)]
    timings = sorted((r.reference for r in runs), key=lambda t: t.median_ms)
    return timings[len(timings) // 2], Noise(tuple(r.ratio.median_ms for r in runs))


# ---------------------------------------------------------------------------------------------------------------
# The lookup table and its cost model


@dataclass
class LatencyTerm:
    """One timed layer: its latency (ms) at every combination of the sampled widths of the groups it depends on."""

    module: str
    groups: tuple[str, ...]
    points: tuple[tuple[int, ...], ...]  # per group, the sampled widths (ascending)
    values: np.ndarray  # shape (len(points[0]), len(points[1]), ...)

    def _cells(self, widths: dict[str, float]) -> list[tuple[int, float, float]]:
        """Per group: the grid cell holding its width (the upper one on an interior grid point; the first or last
        beyond the ends, where the interpolation extrapolates linearly), the position in it, the cell's width."""
        cells = []
        for g, pts in zip(self.groups, self.points):
            if len(pts) == 1:
                cells.append((0, 0.0, 0.0))
                continue
            i = min(max(int(np.searchsorted(pts, widths[g], side='right')) - 1, 0), len(pts) - 2)
            span = pts[i + 1] - pts[i]
            cells.append((i, (widths[g] - pts[i]) / span, span))
        return cells

    def _corner_sum(self, cells: list[tuple[int, float, float]], derivative: int | None = None) -> float:
        """The multilinear interpolant over the cell's corners, or its derivative along group `derivative`."""
        total = 0.0
        for corner in itertools.product((0, 1), repeat=len(cells)):
            weight, index = 1.0, []
            for k, ((i, t, span), c) in enumerate(zip(cells, corner)):
                if span == 0.0:  # one sampled width: the group's only value, its upper corner absent
                    if c:
                        weight = 0.0
                    index.append(0)
                    continue
                weight *= ((1.0 if c else -1.0) / span) if k == derivative else (t if c else 1.0 - t)
                index.append(i + c)
            if weight:
                total += weight * float(self.values[tuple(index)])
        return total

    def at(self, widths: dict[str, float]) -> float:
        return self._corner_sum(self._cells(widths))

    def gradient(self, widths: dict[str, float]) -> list[float]:
        """d ms / d width of each of the term's groups, at `widths` (exact for the interpolant within a cell)."""
        cells = self._cells(widths)
        return [0.0 if cells[d][2] == 0.0 else self._corner_sum(cells, d) for d in range(len(cells))]

    def to_dict(self) -> dict:
        return {
            'module': self.module,
            'groups': list(self.groups),
            'points': [list(p) for p in self.points],
            'values': self.values.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencyTerm:
        return cls(
            d['module'],
            tuple(d['groups']),
            tuple(tuple(p) for p in d['points']),
            np.asarray(d['values'], dtype=np.float64),
        )


@dataclass
class LatencyCostModel:
    """Latency (ms) as a function of group widths: fixed + the interpolated latency of every timed layer.

    It answers what the knapsack asks of a cost model (`at`, `marginal`, `sizes`, `describe`), like
    `knapsack.CostModel` does for FLOPs.
    """

    terms: list[LatencyTerm]
    fixed: float
    sizes: dict[str, int]
    layer_scale: float = 1.0  # whole network / sum of its layers timed alone (see `build_table`)
    key: dict = field(default_factory=dict)  # what the table was measured for (the cache key)
    full_ms: float = 0.0  # the whole parent, measured when the table was made
    narrow_ms: float = 0.0  # the parent with every group at its narrowest sampled width

    def layers(self, widths: dict[str, float]) -> float:
        """The sum of the timed layers' interpolated latencies, unscaled."""
        return sum(t.at(widths) for t in self.terms)

    def at(self, widths: dict[str, float]) -> float:
        return self.fixed + self.layer_scale * self.layers(widths)

    def marginal(self, widths: dict[str, float]) -> dict[str, float]:
        """d ms / d(width of g) at `widths`: what one more channel of g costs with the others held. Timings that
        fall as a width grows (noise, or a width the kernels favour) would give a negative price, which the
        knapsack cannot take: such a channel is priced at nothing instead."""
        grad = dict.fromkeys(self.sizes, 0.0)
        for t in self.terms:
            for g, d in zip(t.groups, t.gradient(widths)):
                grad[g] += self.layer_scale * d
        return {g: max(d, 0.0) for g, d in grad.items()}

    @staticmethod
    def describe(value: float) -> str:
        return f'{value:.4g} ms'

    def to_dict(self) -> dict:
        return {
            'version': TABLE_VERSION,
            'key': self.key,
            'fixed': self.fixed,
            'layer_scale': self.layer_scale,
            'full_ms': self.full_ms,
            'narrow_ms': self.narrow_ms,
            'sizes': self.sizes,
            'terms': [t.to_dict() for t in self.terms],
        }

    @classmethod
    def from_dict(cls, d: dict) -> LatencyCostModel:
        return cls(
            [LatencyTerm.from_dict(t) for t in d['terms']],
            float(d['fixed']),
            dict(d['sizes']),
            float(d['layer_scale']),
            dict(d['key']),
            float(d['full_ms']),
            float(d['narrow_ms']),
        )


MAX_TERM_GROUPS = 3  # a layer is timed at every combination of its groups' sampled widths: 5 ** 3 calls at most


def sample_widths(size: int, fractions: tuple[float, ...] = GRID_FRACTIONS, parts: int = 1) -> tuple[int, ...]:
    """Widths a group is timed at; a group with `parts` blocks (grouped convs) takes multiples of `parts` only."""
    return tuple(sorted({max(parts, parts * round(size * f / parts)) for f in fractions} | {size}))


@dataclass
class _Timed:
    """A layer the table times: its members' channel layouts, the layout of its input, and its input shape."""

    module: str
    roles: list[tuple[Member, ChannelMap]]  # its dimensions that hold prunable channels
    groups: tuple[str, ...]  # the prunable groups in them, the term's variables
    input_channels: ChannelMap | None  # its input's channel dimension (None: no prunable channel in it)
    shape: tuple[int, ...] = ()


def _prunable_in(graph: GroupGraph, channels: ChannelMap, prunable: set[str]) -> list[str]:
    return [graph.groups[gi].name for gi in np.unique(channels.group) if gi >= 0 and graph.groups[gi].name in prunable]


def _timed_layers(model: nn.Module, graph: GroupGraph) -> list[_Timed]:
    """The layers whose cost depends on a prunable width: every group member (a conv, a BN, a BN+act) and every
    channel-wise leaf on prunable channels (activations, pools), outermost first, none inside another.

    Each dimension is read from the graph's layouts, so a layer whose input concatenates several groups depends
    on all of them; past `MAX_TERM_GROUPS` groups in one layer the grid is too large to time, which is an error
    (a latency budget does not reach such networks; a FLOPs budget does)."""
    prunable = {g.name for g in graph.prunable}
    roles: dict[str, list[tuple[Member, ChannelMap]]] = {}
    for member, channels in graph.layouts.items():
        if member.role != ROLE_PARAM and _prunable_in(graph, channels, prunable):
            roles.setdefault(member.module, []).append((member, channels))
    timed, taken = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + '.') for t in taken):
            continue
        leaf = next(module.children(), None) is None
        if name in roles:
            member = roles[name]
            input_channels = next((c for m, c in member if m.role in (ROLE_IN, ROLE_DW, ROLE_NORM)), None)
        elif leaf and name in graph.outputs and _prunable_in(graph, graph.outputs[name], prunable):
            member, input_channels = [], graph.outputs[name]  # channel-wise: its input has its output's channels
        else:
            continue
        maps = [c for _, c in member] + ([input_channels] if input_channels is not None else [])
        groups = tuple(dict.fromkeys(g for c in maps for g in _prunable_in(graph, c, prunable)))
        if len(groups) > MAX_TERM_GROUPS:
            raise UserError(
                f'latency table: layer {name!r} holds channels of {len(groups)} prunable groups '
                f'(a concatenation); a latency budget times at most {MAX_TERM_GROUPS} per layer; '
                f'use a FLOPs budget (flops.target_gmacs) for this network'
            )
        timed.append(_Timed(name, member, groups, input_channels))
        taken.append(name)
    return timed


def check_timeable(model: nn.Module, graph: GroupGraph) -> None:
    """Fail (one line) unless every layer of `model` can be timed for a table: what a preflight checks."""
    _timed_layers(model, graph)


def _record_shapes(model: nn.Module, layers: list[_Timed], x: torch.Tensor) -> list[_Timed]:
    """Each layer's input shape in a forward pass; layers called with anything but one tensor are left out."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    hooks = []
    for layer in layers:

        def hook(_m, args, _out, name=layer.module):
            ok = len(args) == 1 and isinstance(args[0], torch.Tensor) and name not in shapes
            shapes[name] = tuple(args[0].shape) if ok else None

        hooks.append(model.get_submodule(layer.module).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    kept = []
    for layer in layers:
        shape = shapes.get(layer.module)
        if shape is None or len(shape) < 2:
            continue
        layer.shape = shape
        kept.append(layer)
    return kept


def _narrowed(module: nn.Module, layer: _Timed, graph: GroupGraph, widths: dict[str, int]) -> nn.Module:
    """A copy of the layer with each of its groups at `widths`, sliced as `surgery.prune_model` slices it."""
    narrow = copy.deepcopy(module)
    masks = graph.masks({g: graph[g].leading(w) for g, w in widths.items()})
    for member, channels in layer.roles:
        handler_for(narrow).slice(narrow, member.role, torch.from_numpy(channels.kept(masks)))
    for m in narrow.modules():
        handler = handler_for(m)
        if handler is not None:
            handler.refresh(m)
    return narrow


def architecture_sha256(model: nn.Module) -> str:
    """The parent's layers and their shapes (not its weights, on which latency does not depend): another head
    size or another timm version's layout is another table."""
    return json_sha256(
        [
            (name, type(m).__name__, [list(p.shape) for p in m.parameters(recurse=False)])
            for name, m in model.named_modules()
        ]
    )


def table_key(
    model: nn.Module,
    arch: str,
    input_size: tuple[int, int, int],
    setting: LatencySetting,
    fractions: tuple[float, ...] = GRID_FRACTIONS,
) -> dict:
    """What a table's timings depend on: a table is reused only for the same key."""
    return {
        'version': TABLE_VERSION,
        'device': setting.device,
        'device_name': device_name(setting.device),
        'parent': arch,
        'architecture_sha256': architecture_sha256(model),
        'input_size': list(input_size),
        'batch_size': setting.batch_size,
        'threads': setting.threads,
        'fractions': list(fractions),
    }


def latency_cache_dir() -> Path:
    return default_cache_dir() / 'latency'  # beside the unpacked datasets: ~/.cache/kpid_zoo, or $KPID_CACHE


def cache_path(key: dict, cache_dir: Path | None = None) -> Path:
    return (cache_dir or latency_cache_dir()) / f'{key["parent"]}-{json_sha256(key)[:16]}.json'


def load_cached(key: dict, cache_dir: Path | None = None) -> LatencyCostModel | None:
    """The cached table for `key`, or None (absent, unreadable, or made for another key)."""
    path = cache_path(key, cache_dir)
    try:
        table = LatencyCostModel.from_dict(json.loads(path.read_text(encoding='utf-8')))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return table if table.key == key else None


def save_cached(table: LatencyCostModel, cache_dir: Path | None = None) -> Path:
    path = cache_path(table.key, cache_dir)
    atomic_write_text(path, json.dumps(table.to_dict()) + '\n')  # staged beside it, then renamed into place
    return path


def build_table(
    model: nn.Module,
    graph: GroupGraph,
    arch: str,
    input_size: tuple[int, int, int],
    setting: LatencySetting,
    *,
    fractions: tuple[float, ...] = GRID_FRACTIONS,
    warmup: int = 2,
    repeats: int = 7,
    timer: Callable[..., Timing] = time_callable,
    progress: bool = True,
) -> LatencyCostModel:
    """Time every layer of `model` that a prunable width changes, alone, at each combination of the sampled widths
    of its groups, on the input shape it sees in the network; then the whole network, for the fixed part."""
    check_device(setting.device)
    sizes = {g.name: g.size for g in graph.prunable}
    model = copy.deepcopy(model).float().to(setting.device).eval()
    x = example_input(input_size, setting)
    layers = _record_shapes(model, _timed_layers(model, graph), x)
    points = {g.name: sample_widths(g.size, fractions, g.parts) for g in graph.prunable}
    gen = torch.Generator().manual_seed(0)
    terms = []
    with fixed_threads(setting):
        for layer in tqdm(layers, desc=f'latency table {arch}', disable=not progress, leave=False):
            module = model.get_submodule(layer.module)
            grid = [points[g] for g in layer.groups]
            values = np.zeros([len(p) for p in grid])
            for index in itertools.product(*(range(len(p)) for p in grid)):
                widths = {g: p[i] for g, p, i in zip(layer.groups, grid, index)}
                shape = list(layer.shape)
                if layer.input_channels is not None:
                    shape[1] = graph.width(layer.input_channels, widths)
                inp = torch.randn(shape, generator=gen).to(setting.device)
                narrow = _narrowed(module, layer, graph, widths)
                values[index] = timer(lambda: narrow(inp), setting, warmup=warmup, repeats=repeats).median_ms
            terms.append(LatencyTerm(layer.module, layer.groups, tuple(grid), values))
        narrowest = {g: p[0] for g, p in points.items()}
        narrow_net = prune_model(model, graph, {g: graph[g].leading(w) for g, w in narrowest.items()})
        full = timer(lambda: model(x), setting, warmup=warmup, repeats=repeats).median_ms
        narrow = timer(lambda: narrow_net(x), setting, warmup=warmup, repeats=repeats).median_ms
    table = LatencyCostModel(
        terms, 0.0, sizes, 1.0, table_key(model, arch, input_size, setting, fractions), full, narrow
    )
    calibrate(table, narrowest)
    return table


def calibrate(table: LatencyCostModel, narrowest: dict[str, int]) -> None:
    """Fit fixed + layer_scale * layers(widths) through the whole network measured at full and at narrowest width.

    Layers timed alone need not add up to the network: Python dispatch, residual adds and gates are in no layer
    (a fixed part), and a busy machine preempts a long forward pass more often than a short layer call (a scale).
    Fitting both to the two ends of the reachable range keeps the table's predictions on the network's own timings
    there; without a usable slope (noise), the scale stays 1 and the fixed part is the network minus its layers.
    """
    full, narrow = table.layers(table.sizes), table.layers(narrowest)
    slope = (table.full_ms - table.narrow_ms) / (full - narrow) if full > narrow else 0.0
    table.layer_scale = slope if slope > 0 else 1.0
    table.fixed = table.full_ms - table.layer_scale * full


def latency_table(
    model: nn.Module,
    graph: GroupGraph,
    arch: str,
    input_size: tuple[int, int, int],
    setting: LatencySetting,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    **build_kwargs,
) -> LatencyCostModel:
    """The table for this (device, processor, torch, parent, input size, batch, threads): from the cache when it
    holds one for exactly that, else measured now and cached."""
    key = table_key(model, arch, input_size, setting, build_kwargs.get('fractions', GRID_FRACTIONS))
    cached = load_cached(key, cache_dir)
    if cached is not None:
        logger.info('latency: reusing the table in %s', cache_path(key, cache_dir))
        return cached
    logger.info('latency: measuring the table of %s on %s (cached for later builds)', arch, setting.describe())
    table = build_table(model, graph, arch, input_size, setting, progress=progress, **build_kwargs)
    save_cached(table, cache_dir)
    return table


__all__ = [
    'LatencySetting',
    'Timing',
    'Paired',
    'Noise',
    'LatencyTerm',
    'LatencyCostModel',
    'check_device',
    'cpu_model',
    'device_name',
    'check_timeable',
    'time_callable',
    'time_once',
    'measure_paired',
    'measure_noise',
    'build_table',
    'calibrate',
    'latency_table',
    'table_key',
    'cache_path',
    'load_cached',
    'save_cached',
    'sample_widths',
]
