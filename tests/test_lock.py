"""The build lock under a multi-process launch: the ranks of one launch are one build."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_ranks_of_one_launch_share_the_lock_and_are_refused_together(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "scripts" / "lock_run.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert sorted(lines[:2]) == ["rank 0 inside", "rank 1 inside"], proc.stdout
    assert sorted(x[:16] for x in lines[2:]) == ["rank 0 refused: ", "rank 1 refused: "], proc.stdout
    assert all(f"{tmp_path} is being built by process" in x for x in lines[2:])
