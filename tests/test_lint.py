"""Lint: `ruff check` with the rules in pyproject.toml ([tool.ruff.lint]) passes over the package, the tests and the
benchmarks, and the tree is formatted as `ruff format` writes it (one quote style, 120 columns)."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
from export_utils import REPO_ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('ruff') is None, reason="ruff is not installed: pip install -e '.[test]'"
)

LINTED = ('kpid_zoo', 'tests', 'benchmarks')


def _ruff(*args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    # the ruff binary itself (a native program, not another Python interpreter): well under a second
    from ruff.__main__ import find_ruff_bin

    return subprocess.run([find_ruff_bin(), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_ruff_check_passes():
    result = _ruff('check', '--no-cache', '--config', str(REPO_ROOT / 'pyproject.toml'), *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_check_passes():
    result = _ruff('format', '--check', '--no-cache', '--config', str(REPO_ROOT / 'pyproject.toml'), *LINTED)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_config_reports_a_violation(tmp_path):
    # the configuration is live: an unused import and a `print(x)` on an undefined name are reported, so the
    # passing check above is not a check that selected nothing
    bad = tmp_path / 'bad.py'
    bad.write_text('from __future__ import annotations\n\nimport os\n\nprint(undefined_name)\n')
    result = _ruff(
        'check', '--no-cache', '--config', str(REPO_ROOT / 'pyproject.toml'), '--output-format', 'concise', str(bad)
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert 'F401' in result.stdout and 'F821' in result.stdout, result.stdout
