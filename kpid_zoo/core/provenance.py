"""What each build stage was made from, and whether what lies on disk is still exactly that.

Every stage of `kpid-zoo build` (parent adaptation, pruning, fine-tune, evaluation, export) keeps a manifest in
`<work>/stages/<stage>.json`:

    inputs  the recipe fields the stage reads, the digests of the upstream results it consumes (dotted names),
            and the fingerprint of each data split it reads (`data.train`, `data.val`: `kpid_zoo.core.datasource`)
    files   sha256 of each result file, or null while the stage runs

`Stage.begin` writes the manifest with `files: null` before any work, so the checkpoints of an interrupted run are
resumed only by a run with the same inputs (any other run wipes them first). `Stage.commit` writes it again, with
the hashes, after the result files are in place: the manifest is the commit point, and a result without a
committed manifest, with other inputs, or with a file whose hash changed is never reused. A stage's `digest`
(its inputs and file hashes) is an input of the stages downstream, so a redone stage that yields other bytes makes
them stale in turn, while one that yields the same bytes (a deterministic redo) leaves them fresh.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .datasource import describe_data_change
from .files import first_mismatch, hash_files, json_sha256, read_json, write_json
from .logs import get_logger

logger = get_logger(__name__)

MANIFEST_DIR = 'stages'
UPSTREAM = 'upstream.'  # inputs under this prefix are digests of other stages' results
DATA = 'data.'  # inputs under this prefix are fingerprints of the data splits a stage reads


def flatten(value: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}: one entry per leaf, so a difference can be named field by field."""
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = f'{prefix}{key}'
        if isinstance(item, Mapping) and item:
            out.update(flatten(item, f'{name}.'))
        else:
            out[name] = item
    return out


def select(fields: Mapping[str, Any], include: Iterable[str], exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The entries of flat `fields` under any `include` prefix and under no `exclude` prefix."""

    def under(name: str, prefixes: Iterable[str]) -> bool:
        return any(name == p or name.startswith(f'{p}.') for p in prefixes)

    exclude = tuple(exclude)
    return {k: v for k, v in fields.items() if under(k, include) and not under(k, exclude)}


@dataclass
class Manifest:
    stage: str
    inputs: dict[str, Any]
    files: dict[str, str] | None = None  # result file (relative to the stage's folder) -> sha256

    @property
    def key(self) -> str:
        return json_sha256(self.inputs)

    @property
    def digest(self) -> str:
        return json_sha256({'inputs': self.inputs, 'files': self.files})

    def to_dict(self) -> dict:
        return {'stage': self.stage, 'key': self.key, 'inputs': self.inputs, 'files': self.files}

    @classmethod
    def read(cls, path: Path) -> Manifest:
        data = read_json(path)
        if (
            not isinstance(data, dict)
            or not isinstance(data.get('inputs'), dict)
            or not isinstance(data.get('files'), (dict, type(None)))
        ):
            raise ValueError(f'{path}: not a stage manifest (expected stage, inputs, files)')
        return cls(str(data.get('stage')), data['inputs'], data['files'])


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any], most: int = 3) -> str:
    """'flops.target_ratio 0.5 -> 0.25; the pruned result changed': what differs between two input sets."""
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k, '<absent>') != new.get(k, '<absent>')]
    words = []
    for key in changed[:most]:
        if key.startswith(UPSTREAM):
            words.append(f'the {key[len(UPSTREAM) :]} result changed')
        elif key.startswith(DATA):
            words.append(describe_data_change(old.get(key), new.get(key)))
        else:
            before, after = (_short(d.get(key, '<absent>')) for d in (old, new))
            words.append(f'{key} {before} -> {after}')
    more = f' (+{len(changed) - most} more)' if len(changed) > most else ''
    return '; '.join(words) + more


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + '...'


class Stage:
    """One stage's result on disk: `files` under `folder`, made from `inputs`; `scratch` is wiped when stale."""

    def __init__(
        self,
        name: str,
        work: Path,
        folder: Path,
        files: Iterable[str],
        inputs: Mapping[str, Any],
        scratch: Iterable[Path] = (),
        optional: Iterable[str] = (),
    ):
        self.name, self.folder, self.files = name, Path(folder), tuple(files)
        # files of `files` a run may leave out (the export's model.onnx, without the deploy extra): the manifest
        # lists those it wrote
        self.optional = frozenset(optional)
        self.inputs = dict(inputs)
        self.manifest_path = Path(work) / MANIFEST_DIR / f'{name}.json'
        self.scratch = tuple(scratch)
        self.digest: str | None = None

    def _previous(self) -> tuple[Manifest | None, str | None]:
        """The manifest on disk (None if none) and, if it cannot be read, why."""
        if not self.manifest_path.is_file():
            return None, None
        try:
            return Manifest.read(self.manifest_path), None
        except (OSError, ValueError) as e:
            return None, str(e)

    def check(self) -> bool:
        """True when the finished result on disk was made from these inputs and no file of it changed since.

        Otherwise logs why the stage runs: not built yet, stale (which inputs changed), or a
        result file missing or altered.
        """
        old, unreadable = self._previous()
        new = Manifest(self.name, self.inputs)
        logger.debug(
            'build: %s: checking %s against %s (inputs %s)', self.name, self.folder, self.manifest_path, new.key
        )
        if unreadable:
            reason = f'unreadable manifest ({unreadable})'
        elif old is None:
            reason = 'not built yet'
        elif old.key != new.key:
            reason = f'stale: {describe_change(old.inputs, new.inputs)}'
        elif old.files is None:
            reason = 'interrupted earlier: resuming'
        elif not set(self.files) - self.optional <= set(old.files) <= set(self.files):
            reason = f'its manifest lists other files ({", ".join(sorted(old.files))})'
        else:
            bad = first_mismatch(self.folder, old.files)
            if bad is None:
                self.digest = old.digest
                where = self.folder / self.files[0] if len(self.files) == 1 else self.folder
                logger.info('build: %s: up to date, reusing %s', self.name, where)
                return True
            reason = bad
        logger.info('build: %s: %s: running it', self.name, reason)
        return False

    def begin(self) -> None:
        """Before any work: forget a result made from other inputs (checkpoints included), record these inputs."""
        old, _ = self._previous()
        if old is None or old.key != Manifest(self.name, self.inputs).key:
            for path in self.scratch:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        write_json(self.manifest_path, Manifest(self.name, self.inputs).to_dict())

    def commit(self) -> str:
        """After the result files are in place: record their hashes. Returns the stage's digest."""
        written = [f for f in self.files if f not in self.optional or (self.folder / f).is_file()]
        manifest = Manifest(self.name, self.inputs, hash_files(self.folder, written))
        write_json(self.manifest_path, manifest.to_dict())
        self.digest = manifest.digest
        return self.digest
