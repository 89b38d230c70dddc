"""Artifacts appear complete or not at all: every folder and file is written beside its place, then moved in."""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import torch.nn as nn
from safetensors.torch import save_file


@contextlib.contextmanager
def staged_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; it replaces `dest` when the block succeeds, and is gone if not."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, dest: Path) -> None:
    """Move the complete `new` into place; an existing `dest` is removed only after `new` is there.

    POSIX has no portable atomic swap of two directories: the old one is renamed aside first, so for an instant
    `dest` is absent, but it is never half-written, and a crash leaves the old copy recoverable beside it.
    """
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except BaseException:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_weights(model: nn.Module, path: str | Path) -> None:
    """The model's state dict as safetensors (no pickle), readable by others, written atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage, and timm's state dicts hold views now and then
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors writes 0600; a Hub repo folder is meant to be read by others
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
