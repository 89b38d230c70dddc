"""What reaches a user beyond a clone: the wheel's contents, a plain install, and a quiet, light `import kpid_zoo`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from export_utils import REPO_ROOT

from kpid_zoo.zoo.records import RECIPES_DIR, ZOO_DIR


def _run(*args: str, cwd, env_path=None) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': str(env_path or REPO_ROOT)}
    env.pop('PYTHONWARNINGS', None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_repository_recipes_are_the_packaged_ones():
    """One source: recipes/ is a link to the package's recipes (a copy would drift from what a wheel ships)."""
    top = REPO_ROOT / 'recipes'
    assert top.is_symlink() and top.resolve() == RECIPES_DIR.resolve(), (
        'recipes/ must be a symlink to kpid_zoo/recipes/ (edit the recipes there)'
    )
    assert sorted(p.name for p in top.glob('*.yaml')) == sorted(p.name for p in RECIPES_DIR.glob('*.yaml')) != []


@pytest.mark.launch
def test_import_prints_nothing_and_loads_no_pruning_machinery(tmp_path):
    probe = (
        'import sys, kpid_zoo, timm; assert timm.list_models("kpid_*"); '
        'print(sorted(m for m in sys.modules if m.split(".")[0] in ("fvcore", "matplotlib") '
        'or m in ("kpid_zoo.engine.surgery", "kpid_zoo.engine.groups", "kpid_zoo.budget.prune", '
        '"kpid_zoo.engine.flops")))'
    )
    done = _run('-W', 'error', '-c', probe, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (done.stdout, done.stderr) == ('[]\n', '')
    done = _run('-W', 'error', '-m', 'kpid_zoo.cli', '--help', cwd=tmp_path)
    assert done.returncode == 0 and done.stderr == ''


@pytest.mark.launch
def test_a_plain_wheel_install_has_the_zoo_and_the_recipes(tmp_path):
    """pip wheel -> pip install --target (not editable) -> the CLI from outside the repository."""
    # from a copy of the sources: an in-tree build would leave build/ and *.egg-info in the checkout, and a stale
    # build/lib could slip a deleted file into the wheel
    src = tmp_path / 'src'
    shutil.copytree(
        REPO_ROOT,
        src,
        ignore=shutil.ignore_patterns(
            '.git', '.venv', 'build', 'dist', '*.egg-info', '__pycache__', 'runs', 'outputs', '.pytest_cache', 'docs'
        ),
    )
    done = _run(
        '-m',
        'pip',
        'wheel',
        '--no-deps',
        '--no-build-isolation',
        '-q',
        '-w',
        str(tmp_path / 'dist'),
        str(src),
        cwd=tmp_path,
    )
    if done.returncode != 0 and 'No module named' in done.stderr:
        pytest.skip(f'cannot build a wheel here: {done.stderr[-200:]}')
    assert done.returncode == 0, done.stderr
    wheel = next((tmp_path / 'dist').glob('kpid_zoo-*.whl'))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in list(ZOO_DIR.glob('*.json')) + list(RECIPES_DIR.glob('*.yaml')):
        assert f'kpid_zoo/{path.parent.name}/{path.name}' in names
    assert 'kpid_zoo/py.typed' in names  # PEP 561: type checkers read the package's hints
    # every module of every layer (kpid_zoo/core/, engine/, ...: docs/architecture.md), their __init__s included
    package = REPO_ROOT / 'kpid_zoo'
    modules = {p.relative_to(REPO_ROOT).as_posix() for p in package.rglob('*.py') if '__pycache__' not in p.parts}
    assert len(modules) > 30 and modules <= names, sorted(modules - names)

    site = tmp_path / 'site'
    done = _run(
        '-m', 'pip', 'install', '--no-deps', '--no-compile', '-q', '--target', str(site), str(wheel), cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    work = tmp_path / 'elsewhere'
    work.mkdir()
    # one interpreter for all the checks (each start imports torch): the CLI's main, as the entry point calls it
    probe = (
        'import kpid_zoo; from kpid_zoo.cli import main; from kpid_zoo.zoo.records import find_recipe; '
        'from kpid_zoo.core.recipe import load_recipe; print(kpid_zoo.__file__); '
        'main(["zoo"]); main(["flops", "kpid_ecaresnet50d", "--input-size", "64"]); '
        'print("recipe", load_recipe(find_recipe("kpid_effnet_b0")).name, find_recipe("kpid_effnet_b0"))'
    )
    done = _run('-c', probe, cwd=work, env_path=site)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == str(site / 'kpid_zoo' / '__init__.py')  # the installed copy, not the checkout
    assert any(line.startswith('kpid_effnet_b0.in1k ') for line in lines)
    assert any(line.startswith('kpid_ecaresnet50d at 3x64x64:') for line in lines)
    assert lines[-1].split() == ['recipe', 'kpid_effnet_b0', str(site / 'kpid_zoo' / 'recipes' / 'kpid_effnet_b0.yaml')]
