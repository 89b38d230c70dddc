"""glibc malloc's thresholds, fixed before eager PyTorch is timed (kpid_zoo.core.allocator).

What fixing them changes is observed in a new Python process. Its moving thresholds depend on what it freed
before (importing torch is enough to raise them), but the trim threshold stays at twice the mmap threshold, at most
64 MiB: 200 MiB allocated in 1 MiB blocks and freed again is either served by mapped pages or handed back to the
system, and glibc's mallinfo2 shows less than 64 MiB kept at the heap's top (`keepcost`). Under the fixed
thresholds (mmap 32 MiB, trim 1 GiB) the blocks come from the heap and stay there for the next forward pass.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kpid_zoo.budget import latency as lat
from kpid_zoo.budget import timing
from kpid_zoo.budget._result import LatencyOutcome
from kpid_zoo.budget.report import runtime_in_words
from kpid_zoo.budget.timing import LatencySetting
from kpid_zoo.core import allocator

pytestmark = pytest.mark.skipif(not allocator.is_glibc(), reason='the thresholds are glibc malloc’s')

MIB = 1 << 20
MOVING_TRIM_CEILING = 64 * MIB  # twice the moving mmap threshold's ceiling (32 MiB on 64-bit)

KEPT_PROBE = textwrap.dedent(
    """
    import ctypes, json, sys

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    'arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost'.split()]

    libc = ctypes.CDLL('libc.so.6')
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]

    def kept_after_200_mib():
        blocks = [libc.malloc(1 << 20) for _ in range(200)]
        for block in reversed(blocks):
            libc.free(block)
        return libc.mallinfo2().keepcost

    result = {'before': kept_after_200_mib()}
    {setup}
    result['after'] = kept_after_200_mib()
    print(json.dumps(result))
    """
)


def probe(setup: str, env: dict[str, str] | None = None) -> dict:
    """Run `setup` in a new Python process between two rounds of 200 MiB allocated and freed; the bytes kept at
    the heap's top after each, and what `setup` stored in `result`."""
    code = KEPT_PROBE.replace('{setup}', textwrap.dedent(setup).strip())
    environ = {k: v for k, v in os.environ.items() if k not in allocator.ENV_VARIABLES and k != 'GLIBC_TUNABLES'}
    proc = subprocess.run(
        [sys.executable, '-c', code], env={**environ, **(env or {})}, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fixed_thresholds_keep_freed_memory_in_the_heap():
    result = probe(
        """
        import torch  # moves glibc's thresholds, as any process's history does
        from kpid_zoo.core import allocator
        result['unfixed'] = kept_after_200_mib()
        result['fixed'] = allocator.fix_thresholds()
        """
    )
    assert result['before'] < MOVING_TRIM_CEILING and result['unfixed'] < MOVING_TRIM_CEILING
    assert result['fixed'] is True and result['after'] >= 200 * MIB


@pytest.mark.parametrize(('runtime', 'fixes'), [('torch', True), ('onnxruntime', False), ('openvino', False)])
def test_timing_fixes_them_for_eager_pytorch_only(monkeypatch, runtime, fixes):
    """A deployment runtime's process is left as it is: its tensors come from its own arena."""
    if runtime != 'torch':
        pytest.importorskip(runtime)
    calls = []
    monkeypatch.setattr(allocator, 'fix_thresholds', lambda: calls.append(1))
    with timing.timing_conditions(LatencySetting('cpu', 1, 1, runtime)):
        pass
    assert calls == ([1] if fixes else [])


def test_every_eager_timing_runs_under_them(monkeypatch):
    """The latency table's layers and a model card's throughput (`time_callable`), the loop's pairs
    (`measure_paired`, also in the new process of `measure_paired_afresh`)."""
    calls = []
    monkeypatch.setattr(allocator, 'fix_thresholds', lambda: calls.append(1))
    setting = LatencySetting('cpu', 1, 1)
    timing.time_callable(lambda: None, setting, warmup=0, repeats=1)
    timing.measure_paired(torch.nn.Identity(), torch.nn.Identity(), (3, 4, 4), setting, warmup=0, repeats=1)
    assert calls == [1, 1]


def test_an_environment_that_chose_wins():
    env = {'MALLOC_MMAP_THRESHOLD_': str(MIB)}
    result = probe(
        """
        from kpid_zoo.core import allocator
        result['fixed'] = allocator.fix_thresholds()
        result['settings'] = allocator.settings()
        """,
        env,
    )
    assert result['fixed'] is False and result['after'] < MOVING_TRIM_CEILING  # 1 MiB blocks still mapped
    assert result['settings'] == {'malloc': f'MALLOC_MMAP_THRESHOLD_={MIB}'}


@pytest.mark.parametrize(
    ('environ', 'chosen'),
    [
        ({}, None),
        ({'LD_PRELOAD': '/usr/lib/x86_64-linux-gnu/libjemalloc.so.2'}, 'LD_PRELOAD libjemalloc.so.2'),
        ({'LD_PRELOAD': 'libfoo.so:/opt/libtcmalloc_minimal.so.4'}, 'LD_PRELOAD libtcmalloc_minimal.so.4'),
        ({'LD_PRELOAD': 'libfoo.so'}, None),
        (
            {'GLIBC_TUNABLES': 'glibc.cpu.hwcaps=-AVX512F:glibc.malloc.trim_threshold=0'},
            'glibc.malloc.trim_threshold=0',
        ),
        ({'GLIBC_TUNABLES': 'glibc.cpu.hwcaps=-AVX512F'}, None),
        ({'MALLOC_TRIM_THRESHOLD_': '0', 'MALLOC_MMAP_THRESHOLD_': ''}, 'MALLOC_TRIM_THRESHOLD_=0'),
    ],
)
def test_what_the_environment_chose(environ, chosen):
    assert allocator.chosen_by_environment(environ) == chosen
    expected = {'malloc': chosen} if chosen else {'malloc': allocator.settings({})['malloc']}
    assert allocator.settings(environ) == expected


def test_an_eager_table_on_the_cpu_is_keyed_by_the_allocator(monkeypatch):
    """A table timed under other thresholds is another table; a CUDA table does not depend on them."""
    import timm

    model = timm.create_model('resnet10t', num_classes=10)
    cpu = lat.table_key(model, 'resnet10t', (3, 32, 32), LatencySetting('cpu', 1, 1))
    assert (
        cpu['runtime_settings'] == allocator.settings() and 'glibc mmap_threshold=' in cpu['runtime_settings']['malloc']
    )
    monkeypatch.setenv('MALLOC_MMAP_THRESHOLD_', '131072')
    assert lat.table_key(model, 'resnet10t', (3, 32, 32), LatencySetting('cpu', 1, 1)) != cpu
    monkeypatch.setattr(lat, 'device_name', lambda device, runtime='torch': 'a GPU')
    assert 'runtime_settings' not in lat.table_key(model, 'resnet10t', (3, 32, 32), LatencySetting('cuda', 1, 1))


def test_the_prune_report_names_the_allocator_an_eager_budget_was_timed_under():
    required = [f for f in dataclasses.fields(LatencyOutcome) if dataclasses.MISSING is f.default is f.default_factory]
    fields = {f.name: 0.0 for f in required}
    outcome = LatencyOutcome(**{**fields, 'device': 'cpu', 'device_name': 'a CPU'}, runtime='torch 2.14.1')
    assert runtime_in_words(outcome) == 'torch 2.14.1 (eager)'  # a report written before settings were recorded
    settings = {'malloc': 'glibc mmap_threshold=33554432 trim_threshold=1073741824'}
    outcome = dataclasses.replace(outcome, runtime_settings=settings)
    assert runtime_in_words(outcome) == f'torch 2.14.1 (eager; malloc: {settings["malloc"]})'
