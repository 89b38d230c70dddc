"""Latency as the pruning budget: measured on the device the build runs on, as a lookup table the knapsack reads.

HALP's idea (Shen et al., 2022): a layer's latency is a function of the widths it depends on, sampled once on a
grid and interpolated, so the knapsack can price a channel in milliseconds instead of FLOPs. Here the function of
each timed layer has the same terms as the FLOPs cost model (`knapsack.CostModel`): a dense conv depends on its
input group and its output group (the producer/consumer coupling), a BN, activation or depthwise conv on its own
group. Each is timed alone, on the input shape it sees in the network, at every combination of a few widths of
its groups; `LatencyCostModel` interpolates multilinearly between them (bilinear for a conv). The whole network,
timed at full and at narrowest widths, fixes the rest (`calibrate`): a fixed part no layer accounts for (Python
dispatch, residual adds, gates) and a scale from layers timed alone to layers in the network. The table is cached
on disk per (device, processor, torch, parent, input size, batch, threads), and for a deployment runtime per
runtime and its version.

In a deployment runtime (`LatencySetting.runtime`: ONNX Runtime, OpenVINO) each timed layer is exported alone
(torch's TorchScript exporter: fast, and exact for a single layer) and compiled in a session of its own for its
shape; the whole network at full and narrowest widths is compiled as `timing.measure_paired` compiles it. These
runtimes fold a norm into the convolution before it and run the activation after it as part of the convolution,
so there a convolution, its norm and its activation are one timed unit (`_table_layers.fuse_following`): timed
apart, the norm and the activation cost what the deployed network never spends (docs/latency.md, measured).

The timings come from `timing.time_callable`; the layers timed and their narrowed copies from `_table_layers`.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..core.files import atomic_write_text, default_cache_dir, json_sha256
from ..core.logs import get_logger
from ..deploy.runtimes import bind, get_runtime
from ..engine.groups import GroupGraph
from ..engine.surgery import prune_model
from ._table_layers import fuse_following, narrowed_unit, record_shapes, timed_layers
from .timing import (
    LatencySetting,
    Timing,
    check_setting,
    compiled,
    device_name,
    example_input,
    fixed_threads,
    time_callable,
)

logger = get_logger(__name__)

TABLE_VERSION = 1
FUSED_UNITS = 'conv+norm+act'  # a deployment runtime's table key says its layers were timed as fused units
# Width fractions each group is sampled at; the interpolation is linear between them (and beyond the ends).
GRID_FRACTIONS = (0.125, 0.25, 0.5, 0.75, 1.0)


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


def sample_widths(size: int, fractions: tuple[float, ...] = GRID_FRACTIONS, parts: int = 1) -> tuple[int, ...]:
    """Widths a group is timed at; a group with `parts` blocks (grouped convs) takes multiples of `parts` only."""
    return tuple(sorted({max(parts, parts * round(size * f / parts)) for f in fractions} | {size}))


def check_timeable(
    model: nn.Module,
    graph: GroupGraph,
    setting: LatencySetting | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> None:
    """Fail (one line) unless every layer of `model` can be timed for a table: what a preflight checks. In a
    deployment runtime (`setting`), every unit the table times is also exported and compiled there once, at full
    width: an op the exporter or the runtime lacks is one line naming the layer before any training."""
    layers = timed_layers(model, graph)
    if setting is None or input_size is None or not get_runtime(setting.runtime).uses_onnx:
        return
    runtime = get_runtime(setting.runtime)
    model = copy.deepcopy(model).float().eval()
    x = example_input(input_size, setting)
    layers = fuse_following(model, record_shapes(model, layers, x), x)
    full = {g.name: g.size for g in graph.prunable}
    gen = torch.Generator().manual_seed(0)
    for layer in layers:
        unit = narrowed_unit(model, layer, graph, {g: full[g] for g in layer.groups})
        runtime.compile(
            unit, torch.randn(layer.shape, generator=gen), setting.threads, exporter='torchscript', what=layer.name
        )


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
    fuse: bool | None = None,
) -> dict:
    """What a table's timings depend on: a table is reused only for the same key. A deployment runtime's table
    adds the runtime, its version and the timed units (eager PyTorch's key has none of them: the tables cached
    before runtimes stay valid); a table timed on the CPU adds the runtime's settings (`Runtime.settings`: ONNX
    Runtime's session options, eager PyTorch's allocator thresholds); `fuse` as `build_table` takes it."""
    key = {
        'version': TABLE_VERSION,
        'device': setting.device,
        'device_name': device_name(setting.device, setting.runtime),
        'parent': arch,
        'architecture_sha256': architecture_sha256(model),
        'input_size': list(input_size),
        'batch_size': setting.batch_size,
        'threads': setting.threads,
        'fractions': list(fractions),
    }
    runtime = get_runtime(setting.runtime)
    if setting.runtime != 'torch':
        key.update(runtime=setting.runtime, runtime_version=runtime.version(), units=FUSED_UNITS)
    if setting.device == 'cpu' and runtime.settings():  # only where there are any (eager PyTorch's: the allocator)
        key['runtime_settings'] = runtime.settings()
    if fuse is not None and fuse != (setting.runtime != 'torch'):  # not how this runtime's tables are timed
        key['units'] = FUSED_UNITS if fuse else 'layers'
    return key


def latency_cache_dir() -> Path:
    return default_cache_dir() / 'latency'  # beside the unpacked datasets: ~/.cache/kpid_zoo, or $KPID_CACHE


def cache_path(key: dict, cache_dir: Path | None = None) -> Path:
    runtime = f'-{key["runtime"]}' if 'runtime' in key else ''
    return (cache_dir or latency_cache_dir()) / f'{key["parent"]}{runtime}-{json_sha256(key)[:16]}.json'


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
    fuse: bool | None = None,
) -> LatencyCostModel:
    """Time every layer of `model` that a prunable width changes, alone, at each combination of the sampled widths
    of its groups, on the input shape it sees in the network; then the whole network, for the fixed part.

    In a deployment runtime each layer (a conv with its norm and activation: one unit) is exported and compiled
    in a session of its own per shape, and the whole network as `timing.compiled` compiles it. `fuse` (default:
    in a deployment runtime) times a conv with its norm and activation as one unit; off, every layer alone."""
    check_setting(setting)
    runtime = get_runtime(setting.runtime)
    sizes = {g.name: g.size for g in graph.prunable}
    model = copy.deepcopy(model).float().to(setting.device).eval()
    x = example_input(input_size, setting)
    layers = record_shapes(model, timed_layers(model, graph), x)
    fuse = runtime.uses_onnx if fuse is None else fuse
    if fuse:
        layers = fuse_following(model, layers, x)
    points = {g.name: sample_widths(g.size, fractions, g.parts) for g in graph.prunable}
    gen = torch.Generator().manual_seed(0)
    terms = []
    with fixed_threads(setting):
        for layer in tqdm(layers, desc=f'latency table {arch}', disable=not progress, leave=False):
            grid = [points[g] for g in layer.groups]
            values = np.zeros([len(p) for p in grid])
            for index in itertools.product(*(range(len(p)) for p in grid)):
                widths = {g: p[i] for g, p, i in zip(layer.groups, grid, index)}
                shape = list(layer.shape)
                if layer.input_channels is not None:
                    shape[1] = graph.width(layer.input_channels, widths)
                inp = torch.randn(shape, generator=gen).to(setting.device)
                narrow = narrowed_unit(model, layer, graph, widths)
                if runtime.uses_onnx:  # a session of its own for this shape
                    unit = runtime.compile(narrow, inp, setting.threads, exporter='torchscript', what=layer.name)
                    run = bind(unit, inp.numpy())
                else:
                    run = lambda: narrow(inp)  # noqa: E731 (eager: the layer itself, as it always was)
                values[index] = timer(run, setting, warmup=warmup, repeats=repeats).median_ms
            terms.append(LatencyTerm(layer.name, layer.groups, tuple(grid), values))
        narrowest = {g: p[0] for g, p in points.items()}
        narrow_net = prune_model(model, graph, {g: graph[g].leading(w) for g, w in narrowest.items()})
        full = timer(compiled(model, x, setting, what=arch), setting, warmup=warmup, repeats=repeats).median_ms
        narrow = timer(compiled(narrow_net, x, setting, what=arch), setting, warmup=warmup, repeats=repeats).median_ms
    key = table_key(model, arch, input_size, setting, fractions, fuse)
    table = LatencyCostModel(terms, 0.0, sizes, 1.0, key, full, narrow)
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
    """The table for this (device, processor, torch, runtime and its version, parent, input size, batch, threads):
    from the cache when it holds one for exactly that, else measured now and cached."""
    key = table_key(
        model, arch, input_size, setting, build_kwargs.get('fractions', GRID_FRACTIONS), build_kwargs.get('fuse')
    )
    cached = load_cached(key, cache_dir)
    if cached is not None:
        logger.info('latency: reusing the table in %s', cache_path(key, cache_dir))
        return cached
    logger.info('latency: measuring the table of %s on %s (cached for later builds)', arch, setting.describe())
    table = build_table(model, graph, arch, input_size, setting, progress=progress, **build_kwargs)
    save_cached(table, cache_dir)
    return table


__all__ = [
    'TABLE_VERSION',
    'FUSED_UNITS',
    'GRID_FRACTIONS',
    'LatencyTerm',
    'LatencyCostModel',
    'check_timeable',
    'build_table',
    'calibrate',
    'latency_table',
    'table_key',
    'cache_path',
    'load_cached',
    'save_cached',
    'sample_widths',
]
