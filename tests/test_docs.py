"""The documentation: the MkDocs site builds under --strict (every page, link and anchor resolves), and the README
stays a front door whose Quick start runs what CI runs."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from export_utils import REPO_ROOT

README_MAX_LINES = 160

needs_mkdocs = pytest.mark.skipif(
    importlib.util.find_spec('mkdocs') is None or importlib.util.find_spec('material') is None,
    reason="mkdocs and mkdocs-material are not installed: pip install -e '.[docs]'",
)


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    # NO_MKDOCS_2_WARNING: mkdocs-material prints a banner about its successor on every build
    env = {**os.environ, 'NO_MKDOCS_2_WARNING': '1'}
    return subprocess.run(
        [sys.executable, '-m', 'mkdocs', 'build', '--strict', '--config-file', str(config), '--site-dir', str(site)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.launch
@needs_mkdocs
def test_docs_site_builds_strict(tmp_path):
    result = _mkdocs_build(REPO_ROOT / 'mkdocs.yml', tmp_path / 'site')
    assert result.returncode == 0, f'mkdocs build --strict failed:\n{result.stderr[-4000:]}'
    # every page of docs/ is a page of the site (strict also fails on one left out of the nav)
    for page in sorted((REPO_ROOT / 'docs').glob('*.md')):
        built = tmp_path / 'site' / ('index.html' if page.stem == 'index' else f'{page.stem}/index.html')
        assert built.is_file(), f'docs/{page.name} was not built'


@pytest.mark.launch
@needs_mkdocs
def test_strict_build_fails_on_a_broken_anchor(tmp_path):
    """The link checks are on: mkdocs only reports a missing anchor at INFO level unless mkdocs.yml raises it."""
    shutil.copy(REPO_ROOT / 'mkdocs.yml', tmp_path / 'mkdocs.yml')
    shutil.copytree(REPO_ROOT / 'docs', tmp_path / 'docs')
    with open(tmp_path / 'docs' / 'index.md', 'a', encoding='utf-8') as f:
        f.write('\n[a section that is not there](recipes.md#no-such-section)\n')
    result = _mkdocs_build(tmp_path / 'mkdocs.yml', tmp_path / 'site')
    assert result.returncode != 0
    assert "does not contain an anchor '#no-such-section'" in result.stderr


def _readme() -> str:
    return (REPO_ROOT / 'README.md').read_text(encoding='utf-8')


def test_readme_is_a_front_door():
    lines = _readme().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f'README.md has {len(lines)} lines (at most {README_MAX_LINES}): move the detail to a docs/ page'
    )


def _quick_start_commands() -> list[str]:
    section = _readme().split('## Quick start', 1)[1].split('\n## ', 1)[0]
    block = re.search(r'```bash\n(.*?)```', section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith('#')]


def test_readme_quick_start_runs_what_ci_runs():
    setup_and_build, test = _quick_start_commands()
    ci = (REPO_ROOT / '.ci' / 'run').read_text(encoding='utf-8')
    # command 2 is, character for character, the test command .ci/run runs
    ci_tests = [line.split(' || ')[0].strip() for line in ci.splitlines() if '-m pytest' in line]
    assert ci_tests == [test] == ['.venv/bin/python -m pytest -q']
    # command 1 sets up the same venv with the same torch pins and the same extras as .ci/run
    assert 'python3 -m venv .venv' in ci and setup_and_build.startswith('python3 -m venv .venv && ')
    pins = re.search(r'^pip_install (torch==\S+ torchvision==\S+)$', ci, re.M).group(1)
    extras = re.search(r"^pip_install (-e '\.\[test\]')$", ci, re.M).group(1)
    assert f'.venv/bin/pip install {pins} && .venv/bin/pip install {extras} && ' in setup_and_build
    assert setup_and_build.endswith('&& .venv/bin/kpid-zoo build recipes/kpid_effnet_lite0_cifar10.yaml')
    assert (REPO_ROOT / 'recipes' / 'kpid_effnet_lite0_cifar10.yaml').is_file()


def test_readme_links_resolve():
    """Relative links in the README (read on GitHub, not built by mkdocs) point at files of the repository."""
    missing = []
    for target in re.findall(r'\]\(([^)\s]+)\)', _readme()):
        if re.match(r'[a-z]+:', target) or target.startswith('#'):
            continue
        if not (REPO_ROOT / target.split('#', 1)[0]).exists():
            missing.append(target)
    assert not missing, f'README.md links to files that do not exist: {missing}'


def test_no_file_holds_merge_conflict_markers():
    """A merge left unresolved still builds as a site (the markers are plain text): look for them in every tracked
    text file."""

    root = Path(__file__).resolve().parents[1]
    tracked = subprocess.run(['git', 'ls-files'], cwd=root, capture_output=True, text=True, check=True).stdout
    found = []
    for name in tracked.splitlines():
        path = root / name
        if path.suffix not in {'.md', '.py', '.yaml', '.yml', '.toml', '.json', '.txt'} or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors='replace').splitlines(), 1):
            if line.startswith(('<<<<<<< ', '>>>>>>> ')) or line == '=======':
                found.append(f'{name}:{number}')
    assert not found, f'merge conflict markers: {found}'
