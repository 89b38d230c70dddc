"""The package's layers (docs/architecture.md): imports point down (errors/_version < core < deploy < engine < budget <
training < zoo < build/dry_run/cli), no two modules import each other round a cycle, every module sits in a layer,
and the picture of the layers in the docs is the one the code draws."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import architecture  # noqa: E402
from architecture import Edge, cycles, import_graph, problems, upward  # noqa: E402


def test_imports_point_down_and_form_no_cycle():
    found = problems()
    assert not found, 'kpid_zoo breaks its layering (docs/architecture.md):\n  ' + '\n  '.join(found)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The reader finds imports in functions, relative ones at any depth, `from . import module`, and absolute
    ones; an import under TYPE_CHECKING is an edge for the layers but not for cycles."""
    pkg = tmp_path / 'kpid_zoo'
    for sub in ('core', 'engine', 'zoo'):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / '__init__.py').write_text('')
    (pkg / '__init__.py').write_text('from .zoo import records\n')
    (pkg / 'errors.py').write_text('')
    (pkg / 'core' / 'files.py').write_text('def f():\n    from ..engine import groups\n')
    (pkg / 'engine' / 'groups.py').write_text('from ..core.files import f\nfrom . import tracing\n')
    (pkg / 'engine' / 'tracing.py').write_text(
        'from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .groups import f\n'
    )
    (pkg / 'zoo' / 'records.py').write_text('import kpid_zoo.errors\nfrom kpid_zoo.core import files as fs\n')
    edges = {(e.src, e.dst, e.type_only) for e in import_graph(pkg)}
    assert edges == {
        ('kpid_zoo', 'kpid_zoo.zoo.records', False),
        ('kpid_zoo.core.files', 'kpid_zoo.engine.groups', False),
        ('kpid_zoo.engine.groups', 'kpid_zoo.core.files', False),
        ('kpid_zoo.engine.groups', 'kpid_zoo.engine.tracing', False),
        ('kpid_zoo.engine.tracing', 'kpid_zoo.engine.groups', True),
        ('kpid_zoo.zoo.records', 'kpid_zoo.errors', False),
        ('kpid_zoo.zoo.records', 'kpid_zoo.core.files', False),
    }
    graph = import_graph(pkg)
    assert [(e.src, e.dst) for e in upward(graph)] == [('kpid_zoo.core.files', 'kpid_zoo.engine.groups')]
    assert cycles(graph) == [['kpid_zoo.core.files', 'kpid_zoo.engine.groups']]  # not groups <-> tracing
    lines = problems(pkg)
    assert any('core.files (core) imports engine.groups (engine) at line 2: an upward import' in s for s in lines)
    assert 'import cycle: core.files <-> engine.groups' in lines


def test_a_module_outside_the_layers_is_named(tmp_path):
    pkg = tmp_path / 'kpid_zoo'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'threads.py').write_text('')
    assert problems(pkg) == [
        'kpid_zoo.threads: in no layer (move it into a subpackage, or name it in benchmarks/architecture.py)'
    ]


def test_subpackage_inits_import_nothing():
    """`import kpid_zoo.engine` stays cheap: a layer's __init__ is its docstring."""
    for sub in sorted(architecture.SUBPACKAGES):
        tree = ast.parse((architecture.PACKAGE / sub / '__init__.py').read_text(encoding='utf-8'))
        assert ast.get_docstring(tree), f'kpid_zoo/{sub}/__init__.py: no docstring saying what the layer is'
        assert len(tree.body) == 1, f'kpid_zoo/{sub}/__init__.py: holds more than its docstring'


def test_the_docs_picture_is_the_codes():
    doc = architecture.DOC.read_text(encoding='utf-8')
    assert architecture.render(doc) == doc, (
        'docs/architecture.md is out of date with the imports: run python benchmarks/architecture.py'
    )


@pytest.mark.parametrize('edge', [Edge('kpid_zoo.zoo.export', 'kpid_zoo.budget.report', 1, False)])
def test_a_downward_import_is_allowed(edge):
    assert upward([edge]) == []
