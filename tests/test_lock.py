"""The build lock under a multi-process launch: the ranks of one launch are one build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.launch  # torchrun starts two Python processes

REPO = Path(__file__).resolve().parents[1]


def test_ranks_of_one_launch_share_the_lock_and_are_refused_together(tmp_path):
    torchrun = Path(sys.executable).parent / 'torchrun'
    folder, out = tmp_path / 'run', tmp_path / 'outcomes'
    folder.mkdir()
    out.mkdir()
    proc = subprocess.run(
        [
            str(torchrun),
            '--standalone',
            '--nproc_per_node',
            '2',
            str(REPO / 'tests' / 'scripts' / 'lock_run.py'),
            str(folder),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONPATH': str(REPO)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for rank in (0, 1):
        first, second = (out / f'rank{rank}.txt').read_text().splitlines()
        assert first == 'inside'  # both ranks of the launch entered together
        assert second.startswith(f'refused: {folder} is being built by process'), second  # and were refused together
