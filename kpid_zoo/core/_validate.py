"""The generic checker behind the recipe's sections: a `kw_only` frozen dataclass whose fields carry their own rule.

A field's type comes from its annotation, its range or choices from the `metadata` that `_rule` (and `_positive`,
`_non_negative`, `_fraction`) put there; `_Section.__post_init__` enforces them (and normalises: int -> float,
list -> tuple), so a section built by hand is validated exactly like one read from YAML, and
`_Section._from_mapping` reads a nested mapping into sections, naming unknown and missing keys. Every failure is a
`RecipeError` naming the dotted field and what was expected, in one short line whatever the value holds.
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import MISSING, field, fields
from functools import cache
from typing import Any

from ..errors import RecipeError
from .names import did_you_mean


def _join(outer: str, inner: str) -> str:
    return f'{outer}.{inner}' if outer and inner else outer or inner


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxstring, _SHORT_REPR.maxother = 3, 200, 200


def _got(value: Any, limit: int = 200) -> str:
    if isinstance(value, bool):
        # YAML 1.1 turns unquoted yes/no/on/off into booleans: `mixed_precision: no` arrives here as False.
        return f'{value!r} (YAML reads unquoted yes/no/on/off as booleans: quote the value)'
    text = _SHORT_REPR.repr(value)  # an error message stays one short line, whatever a recipe holds
    return text if len(text) <= limit else text[: limit - 3] + '...'


# ---------------------------------------------------------------------------------------------------------------
# Field rules: the annotation gives the type, these give the range / choices and the words for "expected".


def _rule(
    default: Any = MISSING,
    *,
    expected: str | None = None,
    ok: Callable[[Any], bool] | None = None,
    choices: tuple[str, ...] | None = None,
    internal: bool = False,
) -> Any:
    if choices is not None:
        expected = 'one of ' + ', '.join(repr(c) for c in choices)
        ok = choices.__contains__
    metadata = {'expected': expected, 'ok': ok, 'internal': internal}
    # an internal field (where the recipe came from) is not content: no part of equality
    return field(default=default, metadata=metadata, compare=not internal)


def _positive(default: Any = MISSING, kind: str = 'number') -> Any:
    return _rule(default, expected=f'a positive {kind}', ok=lambda v: v > 0)


def _non_negative(default: Any = MISSING, kind: str = 'number') -> Any:
    return _rule(default, expected=f'a non-negative {kind}', ok=lambda v: v >= 0)


def _fraction(default: Any = MISSING, *, low_open: bool = False, high_open: bool = True) -> Any:
    lo, hi = '(' if low_open else '[', ')' if high_open else ']'
    return _rule(
        default,
        expected=f'a number in {lo}0, 1{hi}',
        ok=lambda v: (v > 0 if low_open else v >= 0) and (v < 1 if high_open else v <= 1),
    )


def _type_words(tp: Any) -> str:
    if tp is bool:
        return 'true or false'
    if tp is int:
        return 'an integer'
    if tp is float:
        return 'a number'
    if tp is str:
        return 'a string'
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        count = '' if args[1:] == (Ellipsis,) else f'{len(args)} '
        return f'a list of {count}{_type_words(args[0]).split(" ", 1)[1]}s'  # 'a number' -> 'a list of numbers'
    if dataclasses.is_dataclass(tp):
        return 'a mapping'
    return str(tp)


class _BadValue(Exception):
    """Internal: a value does not have the annotated type; the caller knows the words for what was expected."""


def _coerce(value: Any, tp: Any) -> Any:
    """Convert `value` (as YAML or a caller gave it) to annotation `tp`, or raise `_BadValue`."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # PyYAML reads exponents without a dot (`1e-5`) as strings
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            item_types = [args[0]] * len(value) if args[1:] == (Ellipsis,) else list(args)
            if len(item_types) == len(value):
                return tuple(_coerce(v, t) for v, t in zip(value, item_types))
    elif dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f'recipe field type {tp} is not supported')
    raise _BadValue


def _optional_inner(tp: Any) -> Any:
    """`X | None` -> X (an optional section is read like a required one when present); anything else as it is."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


@cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


class _Section:
    """Validates (and normalises: int -> float, list -> tuple) every field, then the section's own cross-field rules."""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value, expected, ok = getattr(self, f.name), f.metadata.get('expected'), f.metadata.get('ok')
            try:
                value = _coerce(value, hints[f.name])
                if value is not None and ok is not None and not ok(value):
                    raise _BadValue
            except _BadValue:
                raise RecipeError(f'expected {expected or _type_words(hints[f.name])}, got {_got(value)}', f.name)
            if any(
                isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, tuple) else (value,))
            ):
                raise RecipeError(f'expected a finite number, got {_got(value)}', f.name)
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        """Cross-field rules; override per section."""

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # resolving a default in _check of a frozen dataclass

    @classmethod
    def _from_mapping(cls, data: Any, where: str = '') -> Any:
        if data is None:  # an empty section in YAML (`importance:`) means "all defaults"
            data = {}
        if not isinstance(data, Mapping):
            raise RecipeError(f'expected a mapping, got {_got(data)}', where)
        known = {f.name: f for f in fields(cls) if not f.metadata.get('internal')}  # type: ignore[arg-type]
        for key in data:
            if key not in known:
                name = str(key) if len(str(key)) <= 60 else str(key)[:57] + '...'  # named, in one short line
                raise RecipeError(f'unknown key{did_you_mean(str(key), known)}', _join(where, name))
        hints = _type_hints(cls)
        kwargs = {}
        for name, f in known.items():
            if name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    expected = f.metadata.get('expected') or _type_words(hints[name])
                    raise RecipeError(f'missing required field ({expected})', _join(where, name))
                continue
            value, tp = data[name], _optional_inner(hints[name])
            kwargs[name] = tp._from_mapping(value, _join(where, name)) if dataclasses.is_dataclass(tp) else value
        try:
            return cls(**kwargs)
        except RecipeError as e:
            raise e.within(where) from None


def _exactly_one(section: _Section, *names: str) -> None:
    """Several ways to state one target: exactly one of them must be given."""
    given = [n for n in names if getattr(section, n) is not None]
    if len(given) != 1:
        got = 'neither' if not given else 'both' if len(given) == len(names) == 2 else ' and '.join(given)
        raise RecipeError(f'expected exactly one of {" / ".join(names)}, got {got}')


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
