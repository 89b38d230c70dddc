"""The layers of kpid_zoo, read from the code: which module imports which (with `ast`, imports inside functions
included), the layer each module is in, and the rule that imports point down. Writes the picture of the layers
(a Mermaid flowchart of the imports between layers, with counts) into docs/architecture.md between its markers;
tests/test_architecture.py checks the rule and that the page holds what this script writes.

    python benchmarks/architecture.py           # rewrites the block in docs/architecture.md
    python benchmarks/architecture.py --check   # exit 1 when the page is out of date
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / 'kpid_zoo'
DOC = ROOT / 'docs' / 'architecture.md'
BEGIN = '<!-- architecture:begin (written by benchmarks/architecture.py) -->'
END = '<!-- architecture:end -->'

# Bottom to top: a module may import its own layer (acyclically) and the layers below it, never one above.
# The package's __init__ is exempt (it gathers the public names from every layer).
LAYERS = ['base', 'core', 'deploy', 'engine', 'budget', 'training', 'zoo', 'top']
BASE = {'kpid_zoo.errors', 'kpid_zoo._version'}
TOP = {
    'kpid_zoo.build',
    'kpid_zoo._stages',
    'kpid_zoo._runner',
    'kpid_zoo._workdir',
    'kpid_zoo.dry_run',
    'kpid_zoo._commands',
    'kpid_zoo.cli',
}
SUBPACKAGES = {'core', 'deploy', 'engine', 'budget', 'training', 'zoo'}


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`: never runs


def module_files(package: Path = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} of every module of the package (a package's __init__ under the package's name)."""
    out = {}
    for path in sorted(package.rglob('*.py')):
        parts = list(path.relative_to(package.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        out['.'.join(parts)] = path
    return out


def layer_of(module: str) -> str | None:
    """The layer of a module of kpid_zoo; None for the package's __init__ (exempt) and for a module in no layer."""
    if module == 'kpid_zoo':
        return None
    if module in BASE:
        return 'base'
    if module in TOP:
        return 'top'
    parts = module.split('.')
    if parts[1] in SUBPACKAGES:
        return parts[1]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == 'TYPE_CHECKING') or (
        isinstance(test, ast.Attribute) and test.attr == 'TYPE_CHECKING'
    )


def _imports(tree: ast.AST):
    """(node, type_only) for every import statement in the tree, in functions and under ifs too."""

    def walk(node: ast.AST, type_only: bool):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, type_only
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), True)
                for stmt in child.orelse:
                    yield from walk(ast.Module(body=[stmt], type_ignores=[]), type_only)
            else:
                yield from walk(child, type_only)

    yield from walk(tree, False)


def import_graph(package: Path = PACKAGE) -> list[Edge]:
    """Every import of a kpid_zoo module by a kpid_zoo module, relative imports resolved: one edge per import
    statement and module it reads (`from .x import a, b` is one edge to x)."""
    files = module_files(package)
    edges = []
    for module, path in files.items():
        is_pkg = path.name == '__init__.py'
        here = module.split('.') if is_pkg else module.split('.')[:-1]
        for node, type_only in _imports(ast.parse(path.read_text(encoding='utf-8'), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = here[: len(here) - node.level + 1]
                    source = '.'.join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ''
                for alias in node.names:
                    sub = f'{source}.{alias.name}'
                    targets.append(sub if sub in files else source)
            resolved = set()
            for target in targets:
                while target not in files and '.' in target:  # `import kpid_zoo.x.y` of a name: its module
                    target = target.rsplit('.', 1)[0]
                if target in files and target != module:
                    resolved.add(target)
            edges += [Edge(module, target, node.lineno, type_only) for target in sorted(resolved)]
    return edges


def unplaced(package: Path = PACKAGE) -> list[str]:
    """Modules in no layer (a new flat module): each must go into a subpackage or be named in BASE/TOP."""
    return [m for m in module_files(package) if m != 'kpid_zoo' and layer_of(m) is None]


def upward(edges: list[Edge]) -> list[Edge]:
    """Imports that point up the layers (type-only ones too: a layer should not know the types above it)."""
    out = []
    for e in edges:
        a, b = layer_of(e.src), layer_of(e.dst)
        if a is not None and b is not None and LAYERS.index(b) > LAYERS.index(a):
            out.append(e)
    return out


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The import cycles between modules (strongly connected components of more than one module), imports that run
    only under TYPE_CHECKING left out: they never execute, so they cannot make an import order fail."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if not e.type_only:
            graph.setdefault(e.src, set()).add(e.dst)
            graph.setdefault(e.dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str):  # Tarjan; the graph has a few dozen nodes, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _short(module: str) -> str:
    return module.removeprefix('kpid_zoo.')


def problems(package: Path = PACKAGE) -> list[str]:
    """One line per breach of the layering rule; empty when the package keeps it."""
    edges = import_graph(package)
    out = [
        f'{m}: in no layer (move it into a subpackage, or name it in benchmarks/architecture.py)'
        for m in unplaced(package)
    ]
    out += [
        f'{_short(e.src)} ({layer_of(e.src)}) imports {_short(e.dst)} ({layer_of(e.dst)}) at line {e.line}'
        f'{" (under TYPE_CHECKING)" if e.type_only else ""}: an upward import'
        for e in upward(edges)
    ]
    out += ['import cycle: ' + ' <-> '.join(_short(m) for m in c) for c in cycles(edges)]
    return out


def _group(module: str) -> str:
    """The box a module is drawn in: its subpackage, or the top-level module itself."""
    layer = layer_of(module)
    if layer in SUBPACKAGES:
        return layer
    return _short(module) if module != 'kpid_zoo' else '__init__'


def mermaid(package: Path = PACKAGE) -> str:
    """A Mermaid flowchart of the imports between boxes (a subpackage or a top-level module), arrows labelled with
    how many import statements cross; imports within a subpackage are not drawn. Layers are stacked top-down. Only
    the structure is drawn (modules, imports), not line counts, so an edit inside a function leaves it as it is."""
    files = module_files(package)
    counts = Counter((_group(e.src), _group(e.dst)) for e in import_graph(package) if _group(e.src) != _group(e.dst))
    sizes = Counter(_group(m) for m, path in files.items() if path.name != '__init__.py' or m == 'kpid_zoo')
    order = sorted(
        sizes,
        key=lambda g: (
            -LAYERS.index(layer_of(f'kpid_zoo.{g}') or 'top')
            if g in SUBPACKAGES or f'kpid_zoo.{g}' in BASE | TOP
            else 1,
            g,
        ),
    )
    order = ['__init__'] + [g for g in order if g != '__init__']
    out = ['```mermaid', 'flowchart TD']
    for g in order:
        label = f'{g}/' if g in SUBPACKAGES else f'{g}.py'
        out.append(
            f'    {g.strip("_")}["{label}<br/>{sizes[g]} modules"]'
            if g in SUBPACKAGES
            else f'    {g.strip("_")}["{label}"]'
        )
    for (a, b), n in sorted(counts.items(), key=lambda kv: (order.index(kv[0][0]), order.index(kv[0][1]))):
        out.append(f'    {a.strip("_")} -->|{n}| {b.strip("_")}')
    out.append('```')
    return '\n'.join(out)


def render(doc: str, package: Path = PACKAGE) -> str:
    """`doc` with the block between the markers replaced by the current picture."""
    head, sep, rest = doc.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise SystemExit(f'{DOC}: the markers {BEGIN!r} and {END!r} are missing')
    return f'{head}{BEGIN}\n{mermaid(package)}\n{END}{tail}'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--check', action='store_true', help='exit 1 when docs/architecture.md is out of date')
    args = parser.parse_args(argv)
    doc = DOC.read_text(encoding='utf-8')
    new = render(doc)
    for line in problems():
        print(line, file=sys.stderr)
    if args.check:
        if new != doc:
            print(f'{DOC}: out of date; run python benchmarks/architecture.py', file=sys.stderr)
            return 1
        return 0
    if new != doc:
        DOC.write_text(new, encoding='utf-8')
        print(f'wrote {DOC}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
