"""What a build read: a cheap fingerprint of each data split, and the error for an image that cannot be read.

A stage that reads data records the fingerprint of each split it read among its inputs (`kpid_zoo.core.provenance`),
so replacing, adding or removing images reruns it, and the rerun says what changed. The fingerprint reads no image
bytes: it is the list of files the dataset reads (their paths relative to the split, sizes and mtimes, in ns),
hashed per part -- a class folder of an ImageFolder, a shard of a WebDataset split -- and over all parts. A
touched file counts as changed, and so does a copy that did not keep mtimes (`cp` without `-p`; `cp -p` and
`rsync -a` keep them); a moved folder whose files kept their names, sizes and mtimes does not. The 60,000
CIFAR-10 JPEGs take about 0.25 s (one `stat` each, page cache warm, a 2-core AMD EPYC).

Sources without a file list fall back to what can be had cheaply: a Hugging Face dataset's own content fingerprint
(`hfds/`), or every file under `data.root` (`torch/`); a stream read from URLs records the URLs and sample counts
only, and the build says that a change to its content would go unnoticed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import UnreadableImageError  # noqa: F401 (raised here; its home is kpid_zoo.errors)

FINGERPRINT_VERSION = 1
UNKNOWN = 'unknown'  # a source whose content cannot be fingerprinted cheaply


def _digest(lines: Iterable[str], size: int = 8) -> str:
    h = hashlib.blake2b(digest_size=size)
    for line in lines:
        h.update(line.encode('utf-8', 'surrogateescape'))
        h.update(b'\n')
    return h.hexdigest()


def _files_fingerprint(split: str, files: Iterable[tuple[str, tuple[str, str]]]) -> dict[str, Any]:
    """{(part, path relative to the split)} -> one fingerprint: per part [files, bytes, digest of (path, size,
    mtime_ns)], and the sha256 over all parts."""
    entries: dict[str, list[str]] = {}
    sizes: dict[str, int] = {}
    for part, (path, rel) in files:
        st = os.stat(path)
        entries.setdefault(part, []).append(f'{rel}\0{st.st_size}\0{st.st_mtime_ns}')
        sizes[part] = sizes.get(part, 0) + st.st_size
    parts = {part: [len(lines), sizes[part], _digest(sorted(lines))] for part, lines in sorted(entries.items())}
    return _fingerprint('files', split, parts)


def _fingerprint(kind: str, split: str, parts: Mapping[str, list], **extra: Any) -> dict[str, Any]:
    total = hashlib.sha256(json.dumps([FINGERPRINT_VERSION, kind, parts, extra], sort_keys=True).encode())
    return {
        'kind': kind,
        'split': split,
        'files': sum(p[0] for p in parts.values()),
        'bytes': sum(p[1] for p in parts.values()),
        'sha256': total.hexdigest(),
        'parts': dict(parts),
        **extra,
    }


def folder_fingerprint(samples: Iterable[tuple[str, Any]], root: str | os.PathLike, split: str) -> dict[str, Any]:
    """The fingerprint of the image files `samples` (path, target) of an ImageFolder split at `root`, each file's
    part being its folder relative to `root` (its class)."""
    root = os.path.join(os.fspath(root), '')

    def walk():
        for path, _ in samples:
            # timm lists root-joined paths: slicing is 10x cheaper than os.path.relpath (60k files: 0.1 s of 0.5)
            rel = path[len(root) :] if path.startswith(root) else os.path.relpath(path, root)
            yield os.path.dirname(rel), (path, rel)

    return _files_fingerprint(split, walk())


def tree_fingerprint(root: str | os.PathLike, split: str) -> dict[str, Any]:
    """Every file under `root` (hidden ones included), each in the part of its top-level entry."""
    root = os.fspath(root)

    def walk():
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, root)
                yield rel.split(os.sep, 1)[0] if os.sep in rel else '', (path, rel)

    return _files_fingerprint(split, walk())


def shards_fingerprint(shards: Iterable[Any], num_samples: int, split: str) -> dict[str, Any]:
    """A stream split (`streams.Shard`s): per shard file [samples, bytes, digest of (name, samples, size,
    mtime_ns)]; a shard given by URL has no size or mtime here, only its name and sample count."""
    parts, remote = {}, 0
    for shard in shards:
        name = os.path.basename(shard.url.split('?', 1)[0]) or shard.url
        if '://' in shard.url or shard.url.startswith('pipe:'):
            remote += 1
            size, mtime = 0, 0
        else:
            st = os.stat(shard.url)
            size, mtime = st.st_size, st.st_mtime_ns
        parts[name] = [1, size, _digest([f'{shard.url}\0{shard.samples}\0{size}\0{mtime}'])]
    extra = {'samples': int(num_samples)}
    if remote:
        extra['unverified'] = f'{remote} shard(s) read from URLs: only their names and sample counts are recorded'
    return _fingerprint('shards', split, parts, **extra)


def unknown_fingerprint(split: str, why: str) -> dict[str, Any]:
    return {'kind': UNKNOWN, 'split': split, 'unverified': why}


def fingerprint(dataset: Any, split: str, root: str | None = None) -> dict[str, Any]:
    """The fingerprint of what `dataset` reads: a `kpid_zoo.training.data.SeededTransformDataset` (over a timm folder
    dataset, a Hugging Face dataset or a torchvision one) or a `kpid_zoo.training.streams.ShardStream`. `root` is the
    recipe's data.root (the fallback for a source that lists no files)."""
    shards = getattr(dataset, 'shards', None)
    if shards is not None and hasattr(dataset, 'num_samples'):
        return shards_fingerprint(shards, dataset.num_samples, split)
    base = getattr(dataset, 'base', dataset)
    reader = getattr(base, 'reader', None)
    samples = getattr(reader, 'samples', None)
    if (
        isinstance(samples, list)
        and getattr(reader, 'root', None)
        and all(isinstance(s, tuple) and isinstance(s[0], str) for s in samples[:1])
    ):
        return folder_fingerprint(samples, reader.root, split)
    hf_fingerprint = getattr(getattr(reader, 'dataset', None), '_fingerprint', None)
    if isinstance(hf_fingerprint, str):
        return _fingerprint('hfds', split, {'': [len(base), 0, hf_fingerprint]})
    local = getattr(base, 'root', None) or root
    if local and Path(local).expanduser().is_dir():
        return tree_fingerprint(Path(local).expanduser(), split)
    return unknown_fingerprint(split, f'{type(base).__name__} lists no files, and data.root is no local folder')


def _count(n: int, unit: str) -> str:
    return f'{n} {unit}' if n == 1 else f'{n} {unit}s'


def describe_data_change(old: Any, new: Any, most: int = 3) -> str:
    """ "the 'test' split changed: 32 -> 33 files (+1 in cat, changed files in ship)": what differs between two
    fingerprints (`new` is this run's; `old` the recorded one, or None for a stage recorded without one)."""
    split = (new or old or {}).get('split', '?')
    if not isinstance(old, Mapping):
        return f'the {split!r} split was not recorded when the stage ran (an older kpid-zoo): it is now'
    if not isinstance(new, Mapping):
        return f'the {split!r} split is no longer read'
    if old.get('split') != new.get('split') or old.get('kind') != new.get('kind'):
        return f'the data changed: {old.get("kind")} {old.get("split")!r} -> {new.get("kind")} {new.get("split")!r}'
    unit = 'shard' if new.get('kind') == 'shards' else 'file'
    before, after = old.get('parts') or {}, new.get('parts') or {}
    words = []
    for name in sorted(set(before) | set(after)):
        a, b = before.get(name, [0, 0, None]), after.get(name, [0, 0, None])
        if a == b:
            continue
        where = f' in {name}' if name else ''
        if b[0] > a[0]:
            words.append(f'+{b[0] - a[0]}{where}')
        elif b[0] < a[0]:
            words.append(f'-{a[0] - b[0]}{where}')
        else:
            words.append(f'changed {unit}s{where}')
    detail = ', '.join(words[:most]) + (f' and {len(words) - most} more' if len(words) > most else '')
    if not words:
        detail = 'the same files, other metadata'
    if old.get('files') != new.get('files'):
        return (
            f'the {split!r} split changed: {old.get("files")} -> {_count(int(new.get("files") or 0), unit)} ({detail})'
        )
    return f'the {split!r} split changed: {detail}'
