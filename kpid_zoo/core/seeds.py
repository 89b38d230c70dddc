"""Seeds derived from names: one function, so a stage, an epoch, a step or a sample draws the same numbers in
every process and every run."""

from __future__ import annotations

import hashlib


def stable_seed(*parts) -> int:
    """A 31-bit seed from ints and strings, the same in every process (`hash()` of a str is salted per process)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, 'little') & 0x7FFF_FFFF
