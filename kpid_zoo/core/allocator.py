"""glibc malloc's two thresholds, fixed in a process that times eager PyTorch on the CPU.

Why: eager PyTorch takes its CPU tensors from the C library's malloc. glibc serves a request above its mmap
threshold with pages mapped for it alone (faulted in when first written, returned when freed) and a smaller one
from its heap, and gives the heap's free top back to the system above its trim threshold. Both move as the process
runs: the mmap threshold starts at 128 KiB and rises to the size of each mapped block freed (up to 32 MiB), the
trim threshold follows at twice it. So whether a network's activations land on fresh pages at every call depends on
what the process allocated and freed before, and two processes time the same pair of networks at different ratios.
Measured (`benchmarks/process_spread.py`, docs/latency.md "Limits"): a latency-budgeted tf_efficientnet_lite1
beside tf_efficientnet_lite0, eager PyTorch at batch 32 on 2 threads, read 0.589-0.774 in new processes with glibc's
moving thresholds and 0.901-0.935 with them fixed.

`fix_thresholds` fixes both where the moving ones end up in a long-running process: the mmap threshold at its
ceiling (32 MiB), and a trim threshold of 1 GiB, so the heap a forward pass freed serves the next one. Timing
(`kpid_zoo.budget.timing`) calls it before it times eager PyTorch on the CPU; the setting stays for the rest of the
process (glibc has no way back to moving thresholds) and goes into a latency table's key (`settings`).

An environment that chose already wins and is left alone: glibc's own variables (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, or glibc.malloc tunables in GLIBC_TUNABLES) or another allocator preloaded (LD_PRELOAD:
jemalloc, tcmalloc, mimalloc). Elsewhere than glibc nothing is changed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for the moving threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30  # mallopt takes an int: 1 GiB, far above what one forward pass frees at the heap's top
ENV_VARIABLES = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
PRELOADED = ('jemalloc', 'tcmalloc', 'mimalloc')

_FIXED = False


def is_glibc() -> bool:
    return platform.system() == 'Linux' and platform.libc_ver()[0] == 'glibc'


def chosen_by_environment(environ: dict[str, str] | None = None) -> str | None:
    """What the environment chose for the allocator, in words, or None when it chose nothing."""
    environ = os.environ if environ is None else environ
    preload = environ.get('LD_PRELOAD', '')
    for library in preload.replace(':', ' ').split():
        if any(name in os.path.basename(library) for name in PRELOADED):
            return f'LD_PRELOAD {os.path.basename(library)}'
    chosen = [f'{name}={environ[name]}' for name in ENV_VARIABLES if environ.get(name)]
    tunables = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t.startswith('glibc.malloc.')]
    return ' '.join(chosen + tunables) or None


def settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allocator an eager-PyTorch timing runs under (after `fix_thresholds`), for a latency table's key."""
    chosen = chosen_by_environment(environ)
    if chosen:
        return {'malloc': chosen}
    if not is_glibc():
        return {}
    return {'malloc': f'glibc mmap_threshold={MMAP_THRESHOLD} trim_threshold={TRIM_THRESHOLD}'}


def fix_thresholds() -> bool:
    """Fix glibc malloc's mmap and trim thresholds in this process (once), unless the environment chose already or
    this is not glibc. Returns whether they are fixed by this call or an earlier one."""
    global _FIXED
    if _FIXED:
        return True
    if chosen_by_environment() or not is_glibc():
        return False
    libc = ctypes.CDLL('libc.so.6')
    if not (libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        logger.warning("glibc's mallopt refused the malloc thresholds: eager PyTorch is timed with moving ones")
        return False
    logger.info('malloc thresholds fixed for timing: %s', settings()['malloc'])
    _FIXED = True
    return True


__all__ = ['settings', 'fix_thresholds', 'chosen_by_environment', 'is_glibc']
