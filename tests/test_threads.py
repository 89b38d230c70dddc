"""The build's torch thread count on a busy machine (`kpid_zoo.core.threads`): the choice from what other processes use,
the measurement it comes from, the re-checks, who may override it; and the progress every long loop shows.
No timing assertions: the decisions are pure functions of the measured CPU use, tested as such."""

from __future__ import annotations

import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.utils.data as tud

from kpid_zoo.cli import main
from kpid_zoo.core import threads
from kpid_zoo.core.threads import CpuSample, ThreadGovernor, busy_seconds, choose_threads, others_busy
from kpid_zoo.errors import UserError
from kpid_zoo.training.evaluate import evaluate


@pytest.mark.parametrize(
    'others, expected',
    [
        (0.0, 2),  # idle
        (0.05, 2),  # an editor, a terminal
        (0.45, 2),  # a core more than half free still counts
        (0.5, 2),  # exactly half: round half up
        (0.67, 1),  # one busy loop as measured while our 2 threads share the cores with it (CFS: 2/3 each)
        (1.0, 1),  # one busy loop as measured while we run 1 thread
        (2.0, 1),  # two: never fewer than one thread
        (5.0, 1),
    ],
)
def test_two_cpus(others, expected):
    assert choose_threads(2, 2, others) == expected


def test_larger_machines_and_torchs_own_cap():
    assert choose_threads(16, 16, 0.0) == 16
    assert choose_threads(16, 16, 3.2) == 13
    # SMT: 16 logical CPUs, torch's default of 8 threads (one per physical core): the free share of those 8
    assert choose_threads(8, 16, 0.0) == 8 and choose_threads(8, 16, 4.0) == 6 and choose_threads(8, 16, 16) == 1
    # a caller that set fewer threads than CPUs (a test worker, a fixed budget) is never given more
    assert choose_threads(1, 2, 0.0) == 1
    assert choose_threads(2, 2, -0.3) == 2  # measurement noise below zero counts as idle, never above max
    with pytest.raises(ValueError):
        choose_threads(0, 2, 0.0)


def _sample(t: float, busy: float, **ours: float) -> CpuSample:
    return CpuSample(t, busy, {int(pid.lstrip('p')): s for pid, s in ours.items()})


def test_others_busy_subtracts_our_process_and_children():
    before = _sample(10.0, 100.0, p1=5.0, p2=1.0)
    # 2 s, 4 CPU-seconds busy: 1.5 ours (main +1.2, loader worker +0.3): the others used 2.5 / 2 s = 1.25 CPUs
    assert others_busy(before, _sample(12.0, 104.0, p1=6.2, p2=1.3)) == pytest.approx(1.25)
    # a child born in between counts all its time as ours; one gone is no longer subtracted
    assert others_busy(before, _sample(12.0, 104.0, p1=6.2, p3=0.5)) == pytest.approx((4.0 - 1.7) / 2)
    assert others_busy(before, _sample(12.0, 100.5, p1=6.0, p2=1.5)) == 0.0  # clock-tick rounding: never < 0
    with pytest.raises(ValueError):
        others_busy(before, before)


def test_niced_processes_do_not_count_unless_we_are_niced():
    line = SimpleNamespace(user=10.0, nice=7.0, system=2.0, idle=50.0, iowait=3.0, irq=0.5, softirq=0.25, steal=1.0)
    assert busy_seconds(line, count_nice=False) == pytest.approx(13.75)
    assert busy_seconds(line, count_nice=True) == pytest.approx(20.75)


class _Fake:
    """CPU counters driven by the test: `others` CPUs busy besides us, time moved by `advance`."""

    def __init__(self, others: float):
        self.t, self.busy, self.others = 0.0, 0.0, others
        self.samples, self.set = 0, []

    def advance(self, seconds: float) -> None:
        self.t += seconds
        self.busy += seconds * self.others

    def sample(self) -> CpuSample:
        self.samples += 1
        return CpuSample(self.t, self.busy, {})


def test_the_governor_probes_first_then_rechecks_every_few_seconds():
    fake = _Fake(others=1.0)
    gov = ThreadGovernor(
        max_threads=2,
        cpus=[0, 1],
        every=5.0,
        probe=0.3,
        sampler=fake.sample,
        set_threads=fake.set.append,
        sleep=fake.advance,
        clock=lambda: fake.t,
    )
    assert gov.tick() == 1 and fake.set == [1] and fake.samples == 2  # a 0.3 s look before the first step
    fake.advance(4.0)
    assert gov.tick() == 1 and fake.samples == 2  # not yet: no sample, no change
    fake.others = 0.0  # the other job ended
    fake.advance(2.0)  # 6 s since the last look, 2 of them idle: 4/6 = 0.67 CPUs busy on average
    assert gov.tick() == 1 and fake.samples == 3
    fake.advance(5.0)
    assert gov.tick() == 2 and fake.set == [1, 2]  # the second core taken back
    fake.advance(5.0)
    assert gov.tick() == 2 and fake.set == [1, 2]  # set_threads only on a change


def test_a_fixed_count_holds_off_the_governor_and_is_restored(monkeypatch):
    fake = _Fake(others=0.0)
    gov = ThreadGovernor(
        max_threads=2,
        cpus=[0, 1],
        every=5.0,
        probe=0.3,
        sampler=fake.sample,
        set_threads=fake.set.append,
        sleep=fake.advance,
        clock=lambda: fake.t,
    )
    monkeypatch.setattr(threads, '_GOVERNOR', gov)
    before = torch.get_num_threads()
    with threads.fixed_threads(1):
        assert torch.get_num_threads() == 1
        with threads.fixed_threads():  # nested, no count: the one in force
            threads.tick()
            assert torch.get_num_threads() == 1
        threads.tick()
        assert fake.samples == 0 and fake.set == []  # no re-check while a count is fixed
    assert torch.get_num_threads() == before
    threads.tick()
    assert fake.samples == 2 and fake.set == [2]  # the governor looks again once the block has ended
    with pytest.raises(RuntimeError), threads.fixed_threads(1):
        raise RuntimeError('restored on an error too')
    assert torch.get_num_threads() == before and threads._HELD == 0


def test_an_explicit_count_wins_and_the_policy_ends_with_the_command(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    with threads.thread_policy(None) as chosen:
        assert threads._GOVERNOR is not None and 'fewer while other processes keep CPUs busy' in chosen
    assert threads._GOVERNOR is None and torch.get_num_threads() == before
    with threads.thread_policy(1) as chosen:
        assert threads._GOVERNOR is None and torch.get_num_threads() == 1 and '--threads' in chosen
    assert torch.get_num_threads() == before
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    with threads.thread_policy(None) as chosen:
        assert threads._GOVERNOR is None and 'OMP_NUM_THREADS=1' in chosen
    threads.tick()  # no governor: nothing happens
    with pytest.raises(ValueError, match='--threads'):
        threads.configure(0)


def test_the_command_line_turns_the_adaptive_count_on_for_build(monkeypatch, tmp_path, capsys):
    import kpid_zoo.build as kbuild

    seen = {}

    def fake_build(recipe, **kwargs):
        seen['governor'] = threads._GOVERNOR
        raise UserError('stop here')  # a user's error: the command's one line, exit 2

    monkeypatch.setattr(kbuild, 'build', fake_build)
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    recipe = tmp_path / 'r.yaml'
    recipe.write_text('name: x\n')
    assert main(['build', str(recipe)]) == 2
    assert isinstance(seen['governor'], ThreadGovernor) and threads._GOVERNOR is None
    assert 'build: up to' in capsys.readouterr().out
    assert main(['build', str(recipe), '--threads', '1', '--quiet']) == 2 and seen['governor'] is None
    assert main(['build', str(recipe), '--threads', '0', '--quiet']) == 2
    assert capsys.readouterr().err.strip().endswith('--threads: expected a positive number of threads, got 0')


@pytest.mark.launch
def test_sample_cpu_counts_live_children_as_ours():
    child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])
    try:
        time.sleep(0.2)
        sample = threads.sample_cpu()
        assert child.pid in sample.ours and sample.ours[child.pid] >= 0 and sample.busy > 0
    finally:
        child.kill()
        child.wait()


def test_long_loops_show_progress_and_recheck_threads(capsys, monkeypatch):
    ticks = []
    monkeypatch.setattr(threads, 'tick', lambda: ticks.append(1))
    loader = tud.DataLoader(tud.TensorDataset(torch.randn(12, 4), torch.arange(12) % 3), batch_size=4)
    result = evaluate(nn.Linear(4, 3), loader, progress=True, desc='evaluate (parent)')
    assert result.n == 12 and len(ticks) == 3
    assert 'evaluate (parent)' in capsys.readouterr().err
    evaluate(nn.Linear(4, 3), loader)
    assert 'evaluate' not in capsys.readouterr().err  # quiet by default


@pytest.mark.parametrize(
    'argv, orig_argv, expected',
    [
        (['/venv/bin/kpid-zoo', 'build', 'r.yaml'], ['/venv/bin/python', '/venv/bin/kpid-zoo', 'build'], True),
        (['-m'], ['python', '-m', 'kpid_zoo.cli', 'build'], True),
        (['-m'], ['python', '-u', '-m', 'kpid_zoo.cli', 'build'], True),  # what accelerate launch starts
        (['-m'], ['python', '-m', 'pytest', 'tests'], False),
        (['train.py'], ['python', 'train.py', '-m', 'kpid_zoo'], False),  # a program of the user's
        (['-c'], ['python', '-c', 'import kpid_zoo'], False),
    ],
)
def test_only_kpid_zoo_commands_choose_how_openmp_waits(argv, orig_argv, expected):
    from kpid_zoo.core._openmp import entry_is_cli

    assert entry_is_cli(argv, orig_argv) is expected


def _first_line_of_build(env: dict) -> str:
    """`python -m kpid_zoo.cli build` on a recipe that fails at once; its first stdout line says the policy."""
    proc = subprocess.run(
        [sys.executable, '-m', 'kpid_zoo.cli', 'build', 'no-such-recipe.yaml'],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stdout.splitlines()[0]


@pytest.mark.launch
def test_the_command_sets_passive_waiting_before_torch_loads_unless_told_otherwise(repo_root):
    import os

    base = {k: v for k, v in os.environ.items() if k not in ('OMP_NUM_THREADS', 'OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')}
    base['PYTHONPATH'] = str(repo_root)
    line = _first_line_of_build(base)
    assert line.startswith('build: up to') and line.endswith('OMP_WAIT_POLICY=PASSIVE'), line
    assert _first_line_of_build({**base, 'GOMP_SPINCOUNT': '1000'}).endswith('GOMP_SPINCOUNT=1000')
    line = _first_line_of_build({**base, 'OMP_NUM_THREADS': '1', 'OMP_WAIT_POLICY': 'ACTIVE'})
    assert line == 'build: 1 torch thread(s) (OMP_NUM_THREADS=1); OMP_WAIT_POLICY=ACTIVE', line
