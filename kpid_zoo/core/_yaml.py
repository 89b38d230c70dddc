"""Reading a recipe file as hostile input: the file checks and a YAML loader with bounds.

A path that is a folder, missing, not UTF-8 or holding NUL bytes is refused with one line naming it; the YAML is
read by PyYAML's SafeLoader with duplicate keys refused and aliases, their expansion and nesting bounded (a few
hundred bytes expand to no gigabytes and end in no RecursionError); a syntax error names its line and column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import MissingFileError, RecipeError

MAX_ALIASES = 50  # a recipe uses a few `<<: *defaults`; more is an alias bomb
MAX_EXPANDED_NODES = 100_000  # nodes once every alias is expanded (a recipe has about a hundred)
# Mappings and lists inside one another: a recipe goes 4 deep (recipe > parent > train > a list). PyYAML composes
# nodes recursively, so `[[[[...` a few thousand deep would end in a RecursionError rather than a message.
MAX_DEPTH = 32


class _NoDuplicateKeysLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader, except that a key given twice is an error (plain PyYAML silently keeps the last `lr:`),
    that aliases are bounded (a few hundred bytes of nested `*alias`es expand to gigabytes downstream) and that
    nesting is: a document nests at most MAX_DEPTH levels, counted through its aliases too."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases = getattr(self, '_aliases', 0) + 1
            if self._aliases > MAX_ALIASES:
                raise yaml.composer.ComposerError(
                    None, None, f'more than {MAX_ALIASES} aliases (*name)', self.peek_event().start_mark
                )
        self._depth = getattr(self, '_depth', 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f'nested more than {MAX_DEPTH} levels deep (a recipe nests 4)',
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            # (expanded size, expanded depth) of each node, memoised: shared (aliased) nodes are sized once. An alias
            # points back at a node composed before it, which this walk (in document order) has finished by then or
            # is inside of, so it recurses no deeper than the document's own nesting.
            sizes: dict[int, tuple[int, int]] = {}

            def expanded(n: Any) -> tuple[int, int]:
                if id(n) not in sizes:
                    sizes[id(n)] = (0, 0)  # a recursive alias counts as nothing more while it is being sized
                    children = (
                        [c for pair in n.value for c in pair]
                        if isinstance(n, yaml.MappingNode)
                        else n.value
                        if isinstance(n, yaml.SequenceNode)
                        else []
                    )
                    counts = [expanded(c) for c in children]
                    sizes[id(n)] = (
                        min(1 + sum(c[0] for c in counts), MAX_EXPANDED_NODES + 1),
                        min(1 + max((c[1] for c in counts), default=0), MAX_DEPTH + 1),
                    )
                return sizes[id(n)]

            size, depth = expanded(node)
            if size > MAX_EXPANDED_NODES:
                raise yaml.composer.ComposerError(
                    None, None, f'aliases expand to more than {MAX_EXPANDED_NODES} values', node.start_mark
                )
            if depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f'aliases nest the document more than {MAX_DEPTH} levels deep (a recipe nests 4)',
                    node.start_mark,
                )
        return node

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == 'tag:yaml.org,2002:merge':  # `<<: *anchor` may be overridden by explicit keys
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f'duplicate key {key!r}', key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml_file(path: str | Path) -> Any:
    """The one YAML document in the recipe file `path`; every error names the file (and the line for syntax)."""
    source = str(path)
    if Path(path).is_dir():
        raise RecipeError(
            'is a folder, expected a recipe YAML file (e.g. recipes/kpid_effnet_lite0_cifar10.yaml)', source=source
        )
    try:
        text = Path(path).read_text(encoding='utf-8')
    except FileNotFoundError:
        raise MissingFileError(f'{source}: no such recipe file') from None
    except UnicodeDecodeError as e:
        raise RecipeError(
            f'not a text file (byte {e.start} is not UTF-8): expected a recipe YAML file', source=source
        ) from None
    if '\x00' in text:
        raise RecipeError('not a text file (it holds NUL bytes): expected a recipe YAML file', source=source)
    try:
        data = yaml.load(text, Loader=_NoDuplicateKeysLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, 'problem_mark', None)
        where = f'line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
        problem = getattr(e, 'problem', None) or str(e)
        raise RecipeError(f'invalid YAML: {problem}', where, source) from None
    return data


def _kind_of(data: Any) -> str:
    """What a YAML document that is not a mapping holds, in words and without its content."""
    if data is None:
        return 'is empty'
    if isinstance(data, (list, tuple)):
        return f'holds a list of {len(data)} item{"" if len(data) == 1 else "s"}, not a mapping of fields'
    if isinstance(data, str):
        return f'holds one string of {len(data)} character{"" if len(data) == 1 else "s"}, not a mapping of fields'
    return f'holds a single {type(data).__name__} value, not a mapping of fields'
