"""The curated public API of `kpid_zoo` (its `__init__.py`, docs/api.md): each name is its module's object, imported
on first use (PEP 562), so a bare `import kpid_zoo` registers the kpid_* models in timm and loads no pruning
machinery."""

from __future__ import annotations

import ast
import importlib
import json
import logging
import os
import subprocess
import sys
from types import ModuleType

import pytest
from export_utils import REPO_ROOT

import kpid_zoo

# What a bare `import kpid_zoo` must not load: the fx tracer of the engine, the FLOP counter, Accelerate, and the
# layers above the engine (their modules import torch.distributed, data loaders, the training loops).
MACHINERY = (
    'kpid_zoo.engine.tracing',
    'kpid_zoo.engine.surgery',
    'kpid_zoo.engine.groups',
    'kpid_zoo.budget',
    'kpid_zoo.training',
    'kpid_zoo.build',
    'kpid_zoo.dry_run',
    'fvcore',
    'accelerate',
)
PUBLIC = [name for name in kpid_zoo.__all__ if name != '__version__']


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, 'PYTHONPATH': str(REPO_ROOT)}
    env.pop('PYTHONWARNINGS', None)
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_all_is_the_curated_names():
    assert kpid_zoo.__all__ == ['__version__', *kpid_zoo._ATTR_TO_MODULE]  # the spelled-out list is the lazy map's
    assert len(set(kpid_zoo.__all__)) == len(kpid_zoo.__all__)
    for name in (
        'load_recipe',
        'Recipe',
        'build_from_recipe',
        'discover_groups',
        'prune_model',
        'ArchSpec',
        'build_pruned',
        'taylor_importance',
        'knapsack_prune',
        'solve_knapsack',
        'count_flops',
        'register_layer_handler',
        'LayerHandler',
        'export_model',
        'publish',
        'KpidError',
        'UserError',
    ):
        assert name in kpid_zoo.__all__


@pytest.mark.parametrize('name', PUBLIC)
def test_each_name_is_the_object_of_its_module(name):
    module, attr = kpid_zoo._ATTR_TO_MODULE[name]
    expected = getattr(importlib.import_module(f'kpid_zoo.{module}'), attr)
    assert getattr(kpid_zoo, name) is expected
    assert name in vars(kpid_zoo)  # kept: the next lookup is a plain attribute, no __getattr__
    namespace: dict = {}
    exec(f'from kpid_zoo import {name}', namespace)
    assert namespace[name] is expected


def test_version_and_dir():
    from kpid_zoo._version import __version__

    assert kpid_zoo.__version__ == __version__
    listed = dir(kpid_zoo)
    assert set(kpid_zoo.__all__) <= set(listed) and listed == sorted(listed)


def test_an_unknown_name_is_the_usual_attribute_error():
    with pytest.raises(AttributeError, match=r"^module 'kpid_zoo' has no attribute 'no_such_name'$"):
        kpid_zoo.no_such_name
    assert not hasattr(kpid_zoo, 'solve')
    with pytest.raises(ImportError, match='no_such_name'):
        exec('from kpid_zoo import no_such_name', {})


def test_no_public_name_is_a_submodule_name():
    """Importing `kpid_zoo.build` binds the module to the package's `build` (the import system does), so a public
    function of that name would be the function or the module depending on what was imported first: build.py's
    `build` is `build_from_recipe`, dry_run.py's `dry_run` is `dry_run_from_recipe`, and the modules keep their
    names (tests and patches reach them as `kpid_zoo.build`)."""
    package = REPO_ROOT / 'kpid_zoo'
    submodules = {p.stem for p in package.glob('*.py')} | {p.name for p in package.iterdir() if p.is_dir()}
    assert not submodules & set(kpid_zoo.__all__)
    assert kpid_zoo.build_from_recipe is importlib.import_module('kpid_zoo.build').build
    assert kpid_zoo.dry_run_from_recipe is importlib.import_module('kpid_zoo.dry_run').dry_run
    import kpid_zoo.build as kbuild

    assert isinstance(kbuild, ModuleType) and isinstance(kpid_zoo.build, ModuleType)


def test_the_type_checking_imports_are_the_lazy_names():
    """The `if TYPE_CHECKING:` block (what type checkers and IDEs read) imports exactly the lazily served names."""
    tree = ast.parse((REPO_ROOT / 'kpid_zoo' / '__init__.py').read_text(encoding='utf-8'))
    block = next(
        node
        for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == 'TYPE_CHECKING'
    )
    imported = {
        (alias.asname or alias.name): ('.' * node.level + (node.module or ''), alias.name)
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert len(imported) == sum(len(node.names) for node in block.body)  # only `from . import`, no duplicates
    lazy = {name: (f'.{module}', attr) for name, (module, attr) in kpid_zoo._ATTR_TO_MODULE.items()}
    assert imported == lazy


def test_the_library_logs_nowhere_until_the_application_configures_logging():
    assert any(isinstance(h, logging.NullHandler) for h in logging.getLogger('kpid_zoo').handlers)


def test_a_bare_import_is_silent():
    done = _python('-W', 'error', '-c', 'import kpid_zoo')
    assert (done.returncode, done.stdout, done.stderr) == (0, '', '')


def test_a_bare_import_registers_the_models_and_loads_no_machinery():
    """`import kpid_zoo, timm; timm.create_model('kpid_effnet_b0')` works, and the engine loads only when a model is
    built or a public name is used."""
    probe = f"""
import json, sys
machinery = lambda: sorted(m for m in sys.modules if m.startswith({MACHINERY!r}))
import kpid_zoo
bare = machinery()
import timm
model = timm.create_model('kpid_effnet_b0')
from kpid_zoo import count_flops
print(json.dumps(dict(bare=bare, kpid=timm.list_models('kpid_*'), arch=model.pretrained_cfg['architecture'],
                      classes=model.get_classifier().out_features, flops='kpid_zoo.engine.flops' in sys.modules,
                      built=machinery())))
"""
    done = _python('-c', probe)
    assert done.returncode == 0, done.stderr[-2000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    assert seen['bare'] == []
    assert 'kpid_effnet_b0' in seen['kpid'] and 'kpid_pruned' in seen['kpid']
    assert (seen['arch'], seen['classes']) == ('kpid_effnet_b0', 1000)
    assert seen['flops'] and 'kpid_zoo.engine.surgery' in seen['built']  # the lazy name and the model build load it
