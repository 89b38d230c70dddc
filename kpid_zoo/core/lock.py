"""One build per work folder and per export folder: a lock file naming its holder (pid, host, start time).

A second build of the same work folder, or of another work folder into the same export folder, stops at once with
a message naming the holder. A lock whose holder is a dead
process on this host (a killed build) is taken over; one held on another host cannot be checked from here, so the
message says which file to remove once that build is known to be gone. Under `accelerate launch` only the main
process takes the lock: the other ranks belong to the same build.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import itertools
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # accelerate is imported where a build takes the lock: `import kpid_zoo` must not load it
    from accelerate import Accelerator

from ..errors import LockedError  # noqa: F401 (raised here; its home is kpid_zoo.errors)
from .files import staging_path

LOCK_FILE = 'build.lock'


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's content; None when it is gone or unreadable (a writer killed between create and write)."""
    try:
        data = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def _take_over(path: Path) -> None:
    """Move a dead holder's lock aside; of two processes taking over at once, only one rename succeeds."""
    aside = staging_path(path, 'old')
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, aside)
        aside.unlink(missing_ok=True)


def export_lock_name(export: Path) -> str:
    """The lock beside an export folder: the folder itself is replaced whole when the export is moved into place."""
    return f'.{export.name}.{LOCK_FILE}'


def acquire(folder: str | Path, name: str = LOCK_FILE) -> Path:
    """Create `<folder>/<name>` for this process, or raise `LockedError` naming the live holder."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        'pid': os.getpid(),
        'host': socket.gethostname(),
        'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
    }
    for _ in range(3):
        try:
            _create_with(path, me)
        except FileNotFoundError:  # a refused build removed the empty folder it had made for its lock: make it again
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        except OSError as e:
            if e.errno != errno.EEXIST:
                raise
            holder = _holder(path)
            if holder is None:
                # empty or half-written: its writer died between create and write, or is writing right now
                if path.exists() and _age(path) < 5.0:
                    raise LockedError(f'{path}: another build is starting in {folder}; try again in a moment')
                _take_over(path)
                continue
            same_host = holder.get('host') == me['host']
            pid = holder.get('pid')
            if same_host and isinstance(pid, int) and not _alive(pid):
                _take_over(path)
                continue
            where = '' if same_host else f' on host {holder.get("host")} (remove {path} if that build is gone)'
            what = folder if name == LOCK_FILE else f'{folder}/{name.removeprefix(".").removesuffix("." + LOCK_FILE)}'
            raise LockedError(
                f'{what} is being built by process {pid}{where}, started {holder.get("started")}; '
                f'wait for it to finish or stop it'
            )
        return path
    raise LockedError(f'{path}: could not take the build lock (other builds keep taking it)')


def _create_with(path: Path, holder: dict) -> None:
    """Create `path` holding `holder`, failing with EEXIST if it exists. The content is written to a staging file
    that is then hard-linked into place, so the lock never exists empty: the other ranks of a launch check the work
    folder while the main process takes the lock, and an empty build.lock reads as a file the build did not write.
    Where the file system has no hard links, an exclusive create and a write (empty for a moment)."""
    staged = staging_path(path)
    try:
        staged.write_text(json.dumps(holder), encoding='utf-8')
        try:
            os.link(staged, path)
            return
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
    finally:
        staged.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
        json.dump(holder, f)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return float('inf')


def release(path: Path) -> None:
    """Remove the lock if this process still holds it."""
    holder = _holder(path)
    if holder is not None and holder.get('pid') == os.getpid() and holder.get('host') == socket.gethostname():
        path.unlink(missing_ok=True)


def main_process_value(accelerator: Accelerator, value: object) -> object:
    """The main process's `value`, on every process of the launch (a refusal only the main process could find:
    every rank then raises the same error instead of the others waiting at a barrier for ever)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list  # here: `import kpid_zoo` must not load accelerate

        box = [value]
        broadcast_object_list(box)
        value = box[0]
    return value


@contextlib.contextmanager
def build_lock(accelerator: Accelerator, folder: str | Path, name: str = LOCK_FILE) -> Iterator[None]:
    """Hold the lock `<folder>/<name>` for the block; under a multi-process launch the main process takes it for all.

    The main process's outcome is broadcast, so when it is refused every rank raises the same error instead of
    the others waiting at a barrier for ever.
    """
    path, refusal = None, None
    # the folders taking the lock creates, innermost first: the checks that run under the lock can still refuse
    # the build, and then it leaves no empty runs/<name>/ behind
    made = list(itertools.takewhile(lambda p: not p.exists(), (Path(folder), *Path(folder).parents)))
    if accelerator.is_main_process:
        try:
            path = acquire(folder, name)
        except LockedError as e:
            refusal = str(e)
    refusal = main_process_value(accelerator, refusal)
    if refusal:
        raise LockedError(refusal)
    try:
        yield
    finally:
        if path is not None:
            release(path)
            for created in made:
                try:
                    created.rmdir()  # only while empty: whatever the build wrote stays
                except OSError:
                    break
