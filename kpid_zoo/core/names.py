"""Names close to one nobody knows, for the 'did you mean' of an error line (a recipe key, a timm model, a
kpid-zoo name)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def close_names(word: str, candidates: Iterable[str], n: int = 1) -> list[str]:
    """Up to `n` of `candidates` close to `word`, closest first (difflib's ratio of at least 0.6)."""
    return difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=n, cutoff=0.6)


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """ " (did you mean 'x'?)" with the closest of `candidates`, '' when none is close."""
    close = close_names(word, candidates)
    return f" (did you mean '{close[0]}'?)" if close else ''
