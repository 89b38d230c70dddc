"""Torch's intra-op thread count from the cores other processes leave free, re-checked while a build runs.

Why: torch runs each operator on a team of OpenMP threads that meet at a barrier when it ends. When another
CPU-bound process holds one of the cores, one of the team waits for a scheduler slice at every operator, while
its teammate spins (OpenMP's default: about 3 ms before it sleeps) on the core the others need: on 2 cores, one
competing busy loop at normal priority made a 2-thread training step of the main job 2.9x slower, and a machine
full of other jobs made it 25x slower, while a 1-thread step barely moved (benchmarks/busy_machine.py,
docs/busy_machine.md). A competitor at a lower priority (nice) costs nothing: the kernel gives way to us.

Two defaults of the `kpid-zoo` commands answer it. Idle OpenMP threads sleep instead of spinning
(OMP_WAIT_POLICY=PASSIVE, set before torch loads: `kpid_zoo.core._openmp`). And the build asks how much CPU the other
processes took over the last few seconds (the machine's busy time from /proc/stat's counters, less this process's
and its children's, such as the loader workers; niced processes left out when this one is not niced itself) and
runs on the cores that leaves, rounded: `choose_threads`. The count is re-checked every few seconds (`tick`,
called by every long loop: training steps, evaluation batches, the importance pass), so a build that started
beside a busy job takes the second core back when that job ends.

An explicit thread count wins: OMP_NUM_THREADS in the environment (torch already follows it) or `kpid-zoo build
--threads N`. Only the command line turns the adaptive count on (`thread_policy`); a library caller keeps torch's
own setting and `tick` does nothing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import psutil
import torch

from ..errors import UserError
from ._openmp import describe_wait

logger = logging.getLogger(__name__)

THREADS_ENV = 'OMP_NUM_THREADS'
CHECK_EVERY_S = 5.0  # seconds between re-checks: a few training steps, long enough for 100 Hz CPU counters
PROBE_S = 0.3  # the first look, before any step has run: 30 clock ticks a core


@dataclass(frozen=True)
class CpuSample:
    """Cumulative CPU seconds at one moment: of the machine's CPUs this process may use (busy = not idle, counted
    the way `busy_seconds` says), and of this process with its live children ({pid: seconds})."""

    time: float
    busy: float
    ours: dict


def choose_threads(max_threads: int, cpus: int, others: float) -> int:
    """Intra-op threads for the CPU that other processes leave: `others` is how many of the `cpus` CPUs they kept
    busy (e.g. 1.0 for one busy loop), `max_threads` the count for an idle machine (torch's default: one per
    physical core). A CPU counts as free when at least half of it is; always at least one thread."""
    if max_threads < 1 or cpus < 1:
        raise ValueError(f'max_threads and cpus must be >= 1, got {max_threads} and {cpus}')
    free = min(max(cpus - max(others, 0.0), 0.0), cpus)
    # round half up, not to even: 1.5 free CPUs of 2 is a free core
    return max(1, min(max_threads, math.floor(free * max_threads / cpus + 0.5)))


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """How many CPUs' worth of time the other processes were busy between two samples: the machine's busy time
    less ours (a child alive in both samples counts its growth; one born in between counts all of its time)."""
    wall = after.time - before.time
    if wall <= 0:
        raise ValueError(f'samples out of order ({before.time} then {after.time})')
    ours = sum(seconds - before.ours.get(pid, 0.0) for pid, seconds in after.ours.items())
    return max(0.0, (after.busy - before.busy) - ours) / wall


def busy_seconds(times, count_nice: bool) -> float:
    """Non-idle CPU seconds of one /proc/stat line. Niced processes' user time (`nice`) is left out unless this
    process is niced itself: the scheduler gives way to us over them, so they do not slow us down."""
    busy = (
        times.user
        + times.system
        + getattr(times, 'irq', 0.0)
        + getattr(times, 'softirq', 0.0)
        + getattr(times, 'steal', 0.0)
    )
    return busy + (getattr(times, 'nice', 0.0) if count_nice else 0.0)


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (a container can be given fewer than the machine has)."""
    if hasattr(os, 'sched_getaffinity'):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def sample_cpu(cpus: list[int] | None = None) -> CpuSample:
    """Now's counters (psutil: /proc/stat and /proc/<pid>/stat on Linux)."""
    me = psutil.Process()
    count_nice = me.nice() > 0
    per_cpu = psutil.cpu_times(percpu=True)
    cpus = cpus if cpus is not None else usable_cpus()
    busy = sum(busy_seconds(per_cpu[i], count_nice) for i in cpus if i < len(per_cpu))
    ours = {}
    for proc in [me] + me.children(recursive=True):
        try:
            t = proc.cpu_times()
        except psutil.Error:  # a loader worker that exited just now
            continue
        ours[proc.pid] = t.user + t.system
    return CpuSample(time.monotonic(), busy, ours)


class ThreadGovernor:
    """Sets torch's intra-op threads from `choose_threads`, re-checked every `every` seconds of `tick` calls."""

    def __init__(
        self,
        max_threads: int,
        cpus: list[int] | None = None,
        every: float = CHECK_EVERY_S,
        probe: float = PROBE_S,
        sampler: Callable[[], CpuSample] | None = None,
        set_threads: Callable[[int], None] = torch.set_num_threads,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.max_threads = max_threads
        self.cpus = cpus if cpus is not None else usable_cpus()
        self.every, self.probe = every, probe
        self.sampler = sampler or (lambda: sample_cpu(self.cpus))
        self.set_threads, self.sleep, self.clock = set_threads, sleep, clock
        self.last: CpuSample | None = None
        self.threads: int | None = None

    def tick(self) -> int:
        """Re-check when `every` seconds have passed since the last look (the first call looks for `probe`
        seconds first); returns the thread count in force."""
        if self.last is None:
            self.last = self.sampler()
            self.sleep(self.probe)
        elif self.clock() - self.last.time < self.every:
            return self.threads
        sample = self.sampler()
        others = others_busy(self.last, sample)
        self.last = sample
        threads = choose_threads(self.max_threads, len(self.cpus), others)
        if threads != self.threads:
            logger.debug('other processes busy on %.2f of %d CPUs: %d torch threads', others, len(self.cpus), threads)
            self.set_threads(threads)
            self.threads = threads
        return threads


_GOVERNOR: ThreadGovernor | None = None
_HELD = 0  # how many `fixed_threads` blocks are open: while any is, `tick` leaves the count alone


def configure(threads: int | None = None) -> str:
    """The process's thread policy, chosen once by the command line: `threads` fixes the count; else an
    OMP_NUM_THREADS in the environment is left to torch; else the count adapts (`tick`). Returns what was chosen,
    in words, for the log."""
    global _GOVERNOR
    _GOVERNOR = None
    wait = describe_wait()
    if threads is not None:
        if threads < 1:
            raise UserError(f'--threads: expected a positive number of threads, got {threads}')
        torch.set_num_threads(threads)
        return f'{threads} torch thread(s) (--threads); {wait}'
    if os.environ.get(THREADS_ENV):
        return f'{torch.get_num_threads()} torch thread(s) ({THREADS_ENV}={os.environ[THREADS_ENV]}); {wait}'
    _GOVERNOR = ThreadGovernor(max_threads=torch.get_num_threads())
    return f'up to {_GOVERNOR.max_threads} torch thread(s), fewer while other processes keep CPUs busy; {wait}'


def tick() -> None:
    """Called from long loops: re-checks the thread count when the command line asked for adaptive threads (not
    inside a `fixed_threads` block)."""
    if _GOVERNOR is not None and not _HELD:
        _GOVERNOR.tick()


@contextlib.contextmanager
def fixed_threads(threads: int | None = None) -> Iterator[None]:
    """The block runs with torch's intra-op thread count at `threads` (None: the count in force), which the
    adaptive governor's re-checks leave alone until the block ends (a timing or a one-image pass must not see its
    count change halfway); afterwards the count is what it was before."""
    global _HELD
    before = torch.get_num_threads()
    _HELD += 1
    try:
        if threads:
            torch.set_num_threads(threads)
        yield
    finally:
        _HELD -= 1
        torch.set_num_threads(before)


@contextlib.contextmanager
def thread_policy(threads: int | None = None) -> Iterator[str]:
    """`configure` for the block; afterwards no adaptive count and torch's thread count as it was before."""
    global _GOVERNOR
    before = torch.get_num_threads()
    try:
        yield configure(threads)
    finally:
        _GOVERNOR = None
        torch.set_num_threads(before)
