"""Writing WebDataset shards (`kpid-zoo shards`): an ImageFolder split as tar shards in the format
`kpid_zoo.training.streams` reads (`wds/<name>`), with the split recorded in timm's `_info.json`."""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from ..core.files import atomic_write_text, remove_staging, staging_path
from .streams import INFO_FILE

IMAGE_EXTENSIONS = {'.jpg': 'jpg', '.jpeg': 'jpg', '.png': 'png', '.webp': 'webp'}


def _key(class_name: str, path: Path) -> str:
    # webdataset splits a member name at the first dot of its base name: the key must hold none (nor a slash)
    return f'{class_name}_{path.stem}'.replace('.', '_').replace('/', '_')


def _add(tf: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644  # fixed metadata: the same images give the same bytes
    tf.addfile(info, io.BytesIO(payload))


def write_shards(
    samples: Sequence[tuple[str | os.PathLike, int]],
    out_dir: str | os.PathLike,
    split: str,
    shard_size: int,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    progress: Callable[[Iterator], Iterator] | None = None,
) -> list[Path]:
    """Write (image file, class index) pairs as WebDataset shards `out_dir/{split}-NNNNNN.tar` (`KEY.jpg` or
    `.png`/`.webp` with the file's own bytes, `KEY.cls` with the index), in an order shuffled by `seed` (a stream
    reads shards in order: a class-sorted folder would give class-sorted batches), and record the split in
    `out_dir/_info.json` in timm's format, with every shard's length. Each shard is written to a temp name and
    renamed into place; `_info.json` is written last, so a killed write leaves no split that claims missing data.
    """
    if shard_size < 1:
        raise ValueError(f'shard_size: expected a positive integer, got {shard_size}')
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    order = list(range(len(samples)))
    random.Random(seed).shuffle(order)
    chunks = [order[i : i + shard_size] for i in range(0, len(order), shard_size)]
    written = []
    for index, chunk in enumerate(progress(chunks) if progress else chunks):
        final = out_dir / f'{split}-{index:06d}.tar'
        remove_staging(out_dir, final.name)  # a killed write's leftover of this shard
        tmp = staging_path(final)
        try:
            with tarfile.open(tmp, 'w', format=tarfile.USTAR_FORMAT) as tf:
                for i in chunk:
                    path, target = Path(samples[i][0]), int(samples[i][1])
                    ext = IMAGE_EXTENSIONS.get(path.suffix.lower())
                    if ext is None:
                        raise ValueError(f'{path}: expected a .jpg, .jpeg, .png or .webp image')
                    name = class_names[target] if class_names else str(target)
                    key = _key(name, path)
                    _add(tf, f'{key}.{ext}', path.read_bytes())
                    _add(tf, f'{key}.cls', str(target).encode())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(final)
    info_path = out_dir / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {'name': out_dir.name, 'splits': {}}
    info['splits'][split] = {
        'name': split,
        'num_samples': len(samples),
        'filenames': [p.name for p in written],
        'shard_lengths': [len(c) for c in chunks],
    }
    remove_staging(out_dir, INFO_FILE)
    atomic_write_text(info_path, json.dumps(info, indent=1) + '\n')
    return written
