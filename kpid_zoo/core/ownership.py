"""What kpid-zoo may delete or replace: only what it wrote itself.

A command is given folders by its user, and those folders may hold anything. Three rules keep the user's files:

* Output folders (`build --out`, `prune --out`) are replaced whole (staged beside, then swapped in), so they may hold
  nothing but the files a previous run of the same entry wrote there, each proven by its sha256 (`check_output`);
  anything else in them, and the command stops before any work, naming it. The swap itself checks again
  (`files.replace_dir`), so a file that arrives meanwhile stops it too.
* A work folder (`build --work`, the folder above `prune --out`) is shared: the build records the top-level entries
  it uses in `<work>/kpid-work.json` before it writes them (`claim_work`), an entry of one of those names that is
  there but not recorded is the user's and stops the command (`check_work`), and `--restart` removes only recorded
  entries (`clear_work`). A work folder written before this record was kept (it has `stages/` manifests) counts as
  recording the build's entries it holds.
* Output and work folders lie apart (`check_apart`): replacing an export must not take the work folder with it, and
  an export inside a work folder is where the build keeps stage results. Paths that exist but are no folder (a
  regular file, a device, a FIFO) are refused; a symlink is followed and the rules apply to its target.

Every refusal is a `RefusedError`, a ValueError: the command line prints it as one line and exits 2.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ..errors import RefusedError  # noqa: F401 (raised here; its home is kpid_zoo.errors)
from .files import file_sha256, is_staging_of, read_json, remove_staging, write_json
from .lock import LOCK_FILE

logger = logging.getLogger(__name__)

WORK_MANIFEST = 'kpid-work.json'
WORK_FORMAT = 1
_LEGACY_MARKER = 'stages'  # what every build wrote into its work folder before kpid-work.json was kept


def describe(path: Path) -> str:
    """'a regular file', 'a symlink to /x', 'a FIFO', ...: what `path` is, without following it."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return 'missing'
    if stat.S_ISLNK(mode):
        return f'a symlink to {os.readlink(path)}'
    for test, name in (
        (stat.S_ISDIR, 'a folder'),
        (stat.S_ISREG, 'a regular file'),
        (stat.S_ISCHR, 'a character device'),
        (stat.S_ISBLK, 'a block device'),
        (stat.S_ISFIFO, 'a FIFO'),
        (stat.S_ISSOCK, 'a socket'),
    ):
        if test(mode):
            return name
    return 'a special file'


def folder_target(path: str | Path, option: str) -> Path:
    """`path` as a folder a command may create or fill: a symlink is followed (the rules then apply to its target);
    something there that is not a folder is refused."""
    given = path = Path(path)
    if path.is_symlink():
        try:
            path = path.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop
            raise RefusedError(f'{option} {given}: cannot follow the symlink ({e})') from None
    if os.path.lexists(path) and not path.is_dir():
        via = f' (the symlink {given} points there)' if path != given else ''
        raise RefusedError(f'{option} {path}: {describe(path)}, not a folder{via}; give a folder')
    # a folder to be created: the nearest thing above it that exists must be a folder too (now, not after the work)
    above = path.absolute().parent
    while not os.path.lexists(above) and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise RefusedError(f'{option} {path}: {above} is {describe(above)}, not a folder; give a folder')
    return path


def check_apart(out: Path, work: Path) -> None:
    """The export folder is replaced whole: it must neither be, hold, nor lie inside the work folder."""
    o, w = out.resolve(), work.resolve()
    if o == w:
        raise RefusedError(
            f'--out {out} is the work folder {work}: the export replaces its folder whole; '
            f'give --out and --work different folders'
        )
    if w in o.parents:
        raise RefusedError(
            f'--out {out} is inside the work folder {work}, where the build keeps its stage results; '
            f'give --out a folder outside it'
        )
    if o in w.parents:
        raise RefusedError(
            f'the work folder {work} is inside --out {out}, and the export replaces that folder '
            f'whole; give --out a folder outside it'
        )


def _present(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def stray_entries(folder: Path, names: Iterable[str]) -> list[str]:
    """The entries of `folder` that are not regular files among `names` (symlinks and subfolders never are)."""
    names = set(names)
    stray = []
    for name in _present(folder):
        path = folder / name
        if name not in names or not stat.S_ISREG(os.lstat(path).st_mode):
            stray.append(name)
    return stray


def _refuse_stray(folder: Path, stray: list[str], option: str) -> None:
    first = folder / stray[0]
    more = f' (and {len(stray) - 1} more)' if len(stray) > 1 else ''
    raise RefusedError(
        f'{first}: {describe(first)} that kpid-zoo did not write{more}; refusing to replace {folder} '
        f'(move it away, or give {option} another folder)'
    )


def check_output(folder: Path, names: Iterable[str], ours: Callable[[str, str], bool], option: str) -> None:
    """Refuse unless `folder` may be replaced whole: absent, empty, or holding only regular files among `names`
    for each of which `ours(name, sha256)` says kpid-zoo wrote those bytes."""
    if not os.path.lexists(folder):
        return
    if folder.is_symlink() or not folder.is_dir():
        raise RefusedError(f'{option} {folder}: {describe(folder)}, not a folder; give a folder')
    stray = stray_entries(folder, names)
    if stray:
        _refuse_stray(folder, stray, option)
    for name in _present(folder):
        if not ours(name, file_sha256(folder / name)):
            raise RefusedError(
                f'{folder / name}: not the bytes kpid-zoo wrote there (changed since, or not '
                f'written by this entry); refusing to replace {folder} (move it away, or give '
                f'{option} another folder)'
            )


# --------------------------------------------------------------------------------------------------------------
# work folders


def _is_lock(path: Path) -> bool:
    """A build's lock file (`lock.acquire` takes such a file over when its holder is dead; nothing else)."""
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get('pid'), int)


def _is_legacy(work: Path) -> bool:
    """A work folder written before kpid-work.json was kept: its stages/ holds at least one stage manifest."""
    stages = work / _LEGACY_MARKER
    if stages.is_symlink() or not stages.is_dir():
        return False
    for path in stages.glob('*.json'):
        try:
            data = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get('inputs'), dict) and 'files' in data:
            return True
    return False


def claimed(work: Path, known: Iterable[str] = ()) -> set[str] | None:
    """The entries `work`'s kpid-work.json records; for a work folder from before it was kept, those of `known`
    that are there; None when `work` is no kpid-zoo work folder."""
    path = work / WORK_MANIFEST
    if os.path.lexists(path):
        if path.is_symlink() or not path.is_file():
            raise RefusedError(f'{path}: {describe(path)}, not the work record kpid-zoo writes')
        try:
            data = read_json(path)
        except ValueError as e:
            raise RefusedError(f'{e}; expected the record of a kpid-zoo work folder') from None
        entries = data.get('entries') if isinstance(data, dict) else None
        if not isinstance(entries, list) or not all(isinstance(e, str) and e and '/' not in e for e in entries):
            raise RefusedError(f'{path}: not a kpid-zoo work record (expected "entries": a list of names)')
        return set(entries)
    if _is_legacy(work):
        return {name for name in known if os.path.lexists(work / name)} | {_LEGACY_MARKER}
    return None


def check_work(work: Path, entries: Iterable[str], restart: bool = False) -> set[str]:
    """Refuse when `work` holds, at a name in `entries`, something its record does not list (the user's), or when
    `restart` would clear a folder that is no kpid-zoo work folder; returns the recorded entries."""
    if not os.path.lexists(work):
        return set()
    entries = tuple(entries)
    ours = claimed(work, entries)
    if ours is None:
        # a folder with nothing of the build's: the build may add its entries beside what is there, but
        # --restart has nothing it may clear
        # the lock, and the file a starting build writes it from (`lock.acquire`), are not the user's
        others = [
            n for n in _present(work) if not (n == LOCK_FILE and _is_lock(work / n)) and not is_staging_of(n, LOCK_FILE)
        ]
        if restart and others:
            raise RefusedError(
                f'--work {work}: not a kpid-zoo work folder (no {WORK_MANIFEST}); --restart clears '
                f'only what a build recorded there, and this folder holds {others[0]}'
                f'{" and more" if len(others) > 1 else ""}'
            )
        ours = set()
    for name in entries:
        path = work / name
        if os.path.lexists(path) and name not in ours and not (name == LOCK_FILE and _is_lock(path)):
            raise RefusedError(
                f'{path}: {describe(path)} that kpid-zoo did not write (not in {work / WORK_MANIFEST})'
                f'; the build keeps its {name} there: move it away, or give --work another folder'
            )
    return ours


def claim_work(work: Path, entries: Iterable[str], vetted: Iterable[str] = ()) -> set[str]:
    """Check `work` (`check_work`; the caller checked the entries in `vetted` its own way), then record `entries`
    as the build's, before any of them is written."""
    entries = tuple(entries)
    ours = check_work(work, [e for e in entries if e not in set(vetted)])
    wanted = ours | set(entries)
    if wanted != ours or not (work / WORK_MANIFEST).is_file():
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / WORK_MANIFEST, {'kpid_zoo_work': WORK_FORMAT, 'entries': sorted(wanted)})
    return wanted


def clear_work(work: Path, known: Iterable[str]) -> list[Path]:
    """`--restart`: remove the entries the record lists (a symlink itself, never its target), nothing else; the
    record and the lock stay."""
    ours = claimed(work, known) or set()
    removed = []
    for name in sorted(ours - {WORK_MANIFEST, LOCK_FILE}):
        path = work / name
        if not os.path.lexists(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path)
    return removed


def remove_work_staging(work: Path, entries: Iterable[str]) -> list[Path]:
    """What killed writers left beside and below the build's own entries (not elsewhere in `work`)."""
    found = []
    for name in sorted(set(entries) | {WORK_MANIFEST}):
        found += remove_staging(work, name)
        path = work / name
        if path.is_dir() and not path.is_symlink():
            found += remove_staging(path)
    return found


def recorded_sha256(files: Mapping[str, object] | None) -> dict[str, str]:
    """{name: sha256} from a record that maps names to a sha256 or to {'sha256': ...}; junk entries are dropped."""
    out: dict[str, str] = {}
    for name, value in (files or {}).items() if isinstance(files, Mapping) else ():
        sha = value.get('sha256') if isinstance(value, Mapping) else value
        if isinstance(name, str) and isinstance(sha, str):
            out[name] = sha
    return out
