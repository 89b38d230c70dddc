"""Artifacts appear complete or not at all: every folder and file is written beside its place, then moved in.

Everything written beside its place carries a `.tmp-XXXXXXXX` / `.old-XXXXXXXX` suffix (`STAGING_RE`), so the
leftovers of a killed writer can be recognised and removed (`remove_staging`) by the next holder of the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch.nn as nn
from safetensors.torch import save_file

logger = logging.getLogger(__name__)

# The weights file of every folder kpid-zoo writes (a stage's, a pruning's, an export's), and the name timm and
# the Hub ask a repo for
WEIGHTS_FILE = 'model.safetensors'
# The cache root of every layer (unpacked datasets, latency tables): ~/.cache/kpid_zoo, or $KPID_CACHE.
CACHE_ENV = 'KPID_CACHE'


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or '~/.cache/kpid_zoo').expanduser()


def staging_path(dest: str | Path, kind: str = 'tmp') -> Path:
    """A new name beside `dest` for what will replace it (`kind` 'tmp') or what it replaces ('old'):
    `.<name>.tmp-XXXXXXXX`, the one pattern `remove_staging` recognises (`STAGING_RE`)."""
    dest = Path(dest)
    return dest.with_name(f'.{dest.name}.{kind}-{uuid.uuid4().hex[:8]}')


@contextlib.contextmanager
def staged_dir(dest: str | Path, owned: Iterable[str]) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; it replaces `dest` when the block succeeds, and is gone if not.

    An existing `dest` may hold only regular files named in `owned` (see `replace_dir`).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(dest)
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dest, owned)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _strays(folder: Path, owned: set[str]) -> list[str]:
    return [e.name for e in os.scandir(folder) if e.name not in owned or not e.is_file(follow_symlinks=False)]


def replace_dir(new: Path, dest: Path, owned: Iterable[str]) -> None:
    """Move the complete `new` into place; an existing `dest` goes only after `new` is there, and only if it holds
    nothing but regular files named in `owned` (what the caller wrote there before; the caller proves the bytes).

    `dest` is checked, moved aside, and checked again there, where nothing can arrive through its path any more:
    anything else in it (a file, a link, a subfolder) and it goes back untouched, and a ValueError names it. Then
    only the owned files are removed. POSIX has no portable atomic swap of two directories: for an instant `dest`
    is absent, but it is never half-written, and a crash leaves the old copy recoverable beside it.
    """
    owned = set(owned)
    if not os.path.lexists(dest):
        os.replace(new, dest)
        return
    if dest.is_symlink() or not dest.is_dir():
        raise ValueError(f'{dest}: not a folder; refusing to replace it')
    stray = _strays(dest, owned)
    if not stray:
        old = staging_path(dest, 'old')
        os.replace(dest, old)
        try:
            stray = _strays(old, owned)
            if not stray:
                os.replace(new, dest)
        except BaseException:
            os.replace(old, dest)
            raise
        if stray:
            os.replace(old, dest)
    if stray:
        raise ValueError(f'{dest / stray[0]}: not written by kpid-zoo; refusing to replace {dest} (move it away)')
    for name in owned:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old / name)
    try:
        os.rmdir(old)
    except OSError:  # something arrived in the moved-aside folder after its check: keep it, in plain sight
        kept = dest.parent / f'{dest.name}.kept-{uuid.uuid4().hex[:8]}'
        os.replace(old, kept)
        logger.warning('%s: moved what arrived in the old %s meanwhile here', kept, dest)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_path(path)
    try:
        tmp.write_text(text, encoding='utf-8')
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The model's state dict as safetensors (no pickle), readable by others, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage, and timm's state dicts hold views now and then
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = staging_path(path)
    try:
        save_file(state, str(tmp), metadata={'format': 'pt'})
        os.chmod(tmp, 0o644)  # safetensors writes 0600; a Hub repo folder is meant to be read by others
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# `.<name>.tmp-1a2b3c4d` (staging_path: staged_dir, atomic writes, unpacks, shards), `.<name>.old-1a2b3c4d`
# (replace_dir, the lock's take-over), `.tmp-step_N` (train: every process of a run saves into the same folder, so
# its name cannot be random)
STAGING_RE = re.compile(r'^\.(.+\.(tmp|old)-[0-9a-f]{8}|tmp-step_\d+)$')


def is_staging_of(entry: str, name: str) -> bool:
    """Whether the folder entry `entry` is a staging name beside `name` (`.<name>.tmp-…` or `.<name>.old-…`)."""
    return bool(STAGING_RE.match(entry)) and entry.startswith(f'.{name}.')


def remove_staging(folder: str | Path, name: str | None = None) -> list[Path]:
    """Remove what killed writers left below `folder` (only beside `name` and not below, when given).

    Only safe while no other writer can be at work there: the caller holds the folder's build lock.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if name is not None:
        found = [p for p in folder.iterdir() if is_staging_of(p.name, name)]
    else:
        found = [p for p in folder.rglob('.*') if STAGING_RE.match(p.name)]
    for path in found:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return found


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_sha256(value: Any) -> str:
    """sha256 of the canonical JSON of `value` (sorted keys, no spaces): the same data gives the same hash."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def read_json(path: str | Path) -> Any:
    """A JSON file's content; an unreadable one is a ValueError that names the file (json's own does not)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    except RecursionError:  # `[[[[...` thousands deep: json's parser recurses once per level
        raise ValueError(f'{path}: not valid JSON (nested too deep to read)') from None


def write_json(path: str | Path, value: Any) -> None:
    atomic_write_text(path, json.dumps(value, indent=2) + '\n')


def hash_files(folder: str | Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """{name: sha256} of `names` in `folder` (default: every file below it, as relative POSIX paths)."""
    folder = Path(folder)
    if names is None:
        names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    return {name: file_sha256(folder / name) for name in names}


def first_mismatch(folder: str | Path, recorded: dict[str, str]) -> str | None:
    """None when every recorded file in `folder` still has its sha256, else a phrase naming the first that does not."""
    folder = Path(folder)
    for name, sha in recorded.items():
        path = folder / name
        if not path.is_file():
            return f'{path} is missing'
        if file_sha256(path) != sha:
            return f'{path} does not match the sha256 recorded when it was written'
    return None
