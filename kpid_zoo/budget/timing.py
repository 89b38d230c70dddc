"""Timing a network on the device a build runs on: one call, many calls, and two networks in alternation.

Measurement (`time_callable`): warm-up calls first, then many timed calls under `torch.inference_mode` with the
thread count fixed (and, for eager PyTorch on the CPU, malloc's thresholds: `kpid_zoo.core.allocator`), reported
as median and quartiles. The pruning loop never compares timings taken apart:
`measure_paired` times a candidate in alternation with a reference network (the parent, or a budget's
`latency_of`) and keeps the per-call ratio, so both see the same machine (other jobs, clock, caches); a candidate's
milliseconds are that ratio times the reference's time at the start. `measure_noise` is the A/A test: the
reference paired with itself several times, the spread of those ratios is what a difference must exceed before
the loop trusts it. `measure_paired_afresh` takes a paired measurement in a new process: what a user's process
sees, without what the pruning process holds (its memory, its threads, the runtimes it has loaded).

Runtimes (`LatencySetting.runtime`): in 'torch' the networks run eagerly, as they are. In a deployment runtime
('onnxruntime', 'openvino': `kpid_zoo.deploy.runtimes`) each network is exported to ONNX and compiled for the input
shape once (`compiled`), and the same calls, in the same order, time the compiled network.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import platform
import statistics
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..core.threads import fixed_threads as fixed_thread_count
from ..deploy.runtimes import RUNTIMES, Compiled, bind, get_runtime
from ..errors import UserError

DEVICES = ('cpu', 'cuda')


@dataclass(frozen=True)
class LatencySetting:
    """Where and how a network is timed: the device, the batch, the CPU threads (fixed while timing), and the
    runtime that runs it (`kpid_zoo.deploy.runtimes`: eager 'torch', or 'onnxruntime' / 'openvino' on the CPU)."""

    device: str = 'cpu'
    batch_size: int = 1
    threads: int = 1
    runtime: str = 'torch'

    def describe(self) -> str:
        threads = f', {self.threads} thread{"s" if self.threads != 1 else ""}' if self.device == 'cpu' else ''
        runtime = '' if self.runtime == 'torch' else f' in {self.runtime}'
        return f'{self.device} (batch {self.batch_size}{threads}){runtime}'


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


def check_runtime(runtime: str) -> None:
    """Fail in one line unless `runtime` is known and its package installed (`runtimes.get_runtime`)."""
    get_runtime(runtime)


def check_setting(setting: LatencySetting) -> None:
    """Fail in one line unless `setting` can be timed here: the device present, the runtime known and installed
    (`runtimes.get_runtime`), and a deployment runtime on the CPU (their [deploy] packages are CPU builds)."""
    check_device(setting.device)
    get_runtime(setting.runtime)
    if setting.runtime != 'torch' and setting.device != 'cpu':
        raise UserError(f'{setting.runtime} is timed on the CPU here: device {setting.device!r} needs runtime torch')


def cpu_model() -> str:
    """The processor's model name (Linux /proc/cpuinfo), else what `platform` knows of it."""
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def device_name(device: str, runtime: str = 'torch') -> str:
    """What the timings depend on beyond the settings: the processor (or GPU), the torch build, and a deployment
    runtime's version (e.g. '... / torch 2.9.1 / onnxruntime 1.32.0')."""
    if device == 'cuda':
        name = f'{torch.cuda.get_device_name()} / torch {torch.__version__} / cuda {torch.version.cuda}'
    else:
        name = f'{cpu_model()} ({os.cpu_count()} cpus) / torch {torch.__version__}'
    return name if runtime == 'torch' else f'{name} / {RUNTIMES[runtime].describe()}'


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


@contextlib.contextmanager
def timing_conditions(setting: LatencySetting) -> Iterator[None]:
    """What every timing runs under: the runtime's process set-up on the CPU (`Runtime.prepare`: eager PyTorch's
    allocator thresholds fixed), the thread count fixed, inference mode."""
    if setting.device == 'cpu':
        get_runtime(setting.runtime).prepare()
    with fixed_threads(setting), torch.inference_mode():
        yield


def time_callable(fn: Callable[[], object], setting: LatencySetting, *, warmup: int = 3, repeats: int = 15) -> Timing:
    """Time `fn()` `repeats` times after `warmup` untimed calls, under `timing_conditions`."""
    with timing_conditions(setting):
        for _ in range(warmup):
            fn()
        return Timing.of([time_once(fn, setting) for _ in range(repeats)])


def example_input(input_size: tuple[int, ...], setting: LatencySetting) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(setting.batch_size, *input_size, generator=gen).to(setting.device)


# Each network compiled in a deployment runtime, kept while the network lives: the loop pairs the same reference
# with every candidate, and a whole network's export takes a second or more. Keyed by what the compiled graph
# depends on: the runtime, threads, input shape and the parameters' shapes (a net narrowed in place is recompiled).
_COMPILED: weakref.WeakKeyDictionary[nn.Module, dict[tuple, Compiled]] = weakref.WeakKeyDictionary()


def compiled(model: nn.Module, x: torch.Tensor, setting: LatencySetting, *, what: str = '') -> Callable[[], object]:
    """`model` as `setting.runtime` runs it on `x`, as a zero-arg call: the model itself under torch; else its ONNX
    graph (the whole network: torch's torch.export-based exporter) compiled once for `x`'s shape."""
    if setting.runtime == 'torch':
        return lambda: model(x)
    key = (
        setting.runtime,
        setting.threads,
        tuple(x.shape),
        tuple(tuple(p.shape) for p in model.parameters()),
    )
    per_model = _COMPILED.setdefault(model, {})
    if key not in per_model:
        runtime = get_runtime(setting.runtime)
        what = what or getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__
        per_model[key] = runtime.compile(model.cpu().eval(), x.cpu(), setting.threads, exporter='dynamo', what=what)
    return bind(per_model[key], x.cpu().numpy())


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
    old loop timed alone at its budget ran 5-39% above it beside the stock net (docs/latency_benchmark.md).

    In a deployment runtime (`setting.runtime`) each network is compiled first (`compiled`), then the same
    alternation times the compiled calls."""
    model, reference = model.to(setting.device).eval(), reference.to(setting.device).eval()
    x = example_input(input_size, setting)
    if setting.runtime == 'torch':  # eager: the networks themselves, called exactly as they always were
        run_model, run_reference = (lambda: model(x)), (lambda: reference(x))
    else:
        run_model, run_reference = compiled(model, x, setting), compiled(reference, x, setting)
    ours: list[float] = []
    theirs: list[float] = []
    with timing_conditions(setting):
        for _ in range(warmup):
            run_model(), run_reference()
        for i in range(repeats):
            pair = ((run_model, ours), (run_reference, theirs))
            for run, samples in pair if i % 2 == 0 else pair[::-1]:
                samples.append(time_once(run, setting))
    return Paired(Timing.of(ours), Timing.of(theirs), Timing.of([a / b for a, b in zip(ours, theirs)]))


def _cold_then_paired(model, reference, input_size, setting, warmup, repeats) -> Paired:
    measure_paired(model, reference, input_size, setting, warmup=warmup, repeats=2)  # a new process's cold calls
    return measure_paired(model, reference, input_size, setting, warmup=warmup, repeats=repeats)


def measure_paired_afresh(
    model: nn.Module,
    reference: nn.Module,
    input_size: tuple[int, int, int],
    setting: LatencySetting,
    *,
    warmup: int = 3,
    repeats: int = 15,
) -> Paired:
    """`measure_paired` in a new Python process (spawned: it holds nothing of this one but the two networks), after
    a discarded series of its cold calls.

    Why: a net kept because it measured under the budget in the process that pruned it can measure over it in
    another. Measured (docs/latency.md, "The budget loop"): five new processes agreed within a point on a net that
    the pruning process had put 2.5 points lower."""
    context = multiprocessing.get_context('spawn')
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        args = (model.cpu(), reference.cpu(), input_size, setting, warmup, repeats)
        try:
            return pool.submit(_cold_then_paired, *args).result()
        except concurrent.futures.process.BrokenProcessPool as e:
            raise RuntimeError(f'the process timing {setting.describe()} ended without a result: {e}') from None


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


__all__ = [
    'DEVICES',
    'LatencySetting',
    'Timing',
    'Paired',
    'Noise',
    'check_device',
    'check_runtime',
    'check_setting',
    'compiled',
    'cpu_model',
    'device_name',
    'fixed_threads',
    'timing_conditions',
    'time_once',
    'time_callable',
    'example_input',
    'measure_paired',
    'measure_paired_afresh',
    'measure_noise',
]
