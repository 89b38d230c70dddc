"""CIFAR-10 for `dataset: cifar10`: finding, downloading, checking and unpacking it -- the JPEG tarball
(`cifar10-jpg.tar.gz`, quality 75) or the official python version (`cifar-10-python.tar.gz`, lossless) -- into the
cache (`resolve_cifar10`). Reading a split of it is the data stage's (`kpid_zoo.training.data.load_cifar10_split`).

Every tarball is hostile input: unpacked into a staging folder through tarfile's 'data' filter and renamed into
place only when complete; a download is checked against the published md5; one process at a time writes into the
cache (`_cache_lock`).
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import os
import shutil
import socket
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ..core.files import CACHE_ENV, default_cache_dir, remove_staging, staging_path
from ..errors import DataUnavailableError, MissingFileError, UserError, one_line

logger = logging.getLogger(__name__)

CIFAR10_TARBALL = 'cifar10-jpg.tar.gz'
CIFAR10_DIRNAME = 'cifar10-jpg'
CIFAR10_TAR_ENV = 'KPID_CIFAR10_TAR'
# The official CIFAR-10 ("python version"): what torchvision.datasets.CIFAR10 downloads, checks and reads
CIFAR10_URL = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
CIFAR10_MD5 = 'c58f30108f718f92721af3b95e74349a'  # published on the page above, and in torchvision
CIFAR10_OFFICIAL_TARBALL = 'cifar-10-python.tar.gz'
CIFAR10_OFFICIAL_DIRNAME = 'cifar-10-batches-py'
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
DOWNLOAD_TIMEOUT_S = 10.0  # per connect / read: offline, the download fails in seconds instead of hanging
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Cifar10Source:
    """The CIFAR-10 a build reads: `kind` 'jpeg' (the JPEG tree `path`/{train,test}/<class>/*.jpg, quality 75)
    or 'official' (the python version, lossless: `path`/cifar-10-batches-py, read by torchvision's CIFAR10)."""

    kind: str
    path: Path

    @property
    def label(self) -> str:
        """What a figure measured on it should name (recorded in eval.json and the model card)."""
        return 'cifar10-jpg (JPEG quality 75)' if self.kind == 'jpeg' else 'cifar-10-python (official, lossless)'

    @property
    def folder(self) -> Path:
        return self.path if self.kind == 'jpeg' else self.path / CIFAR10_OFFICIAL_DIRNAME


def _shared_tarballs() -> list[Path]:
    """Where the JPEG tarball sits beside a checkout: ../shared/data next to the repo or the working directory."""
    return list(
        dict.fromkeys(
            [
                _REPO_ROOT.parent / 'shared' / 'data' / CIFAR10_TARBALL,
                Path.cwd().parent / 'shared' / 'data' / CIFAR10_TARBALL,
            ]
        )
    )


def find_cifar10_tarball(root: str | os.PathLike | None = None) -> Path:
    """Locate `cifar10-jpg.tar.gz`: `root` (the tarball or a folder holding it) if given, else $KPID_CIFAR10_TAR if
    set, else ../shared/data next to the repo (or the working directory). An explicit location never falls back."""
    if root:
        root = Path(root).expanduser()
        candidates = [root if root.name.endswith('.gz') else root / CIFAR10_TARBALL]
    elif os.environ.get(CIFAR10_TAR_ENV):
        candidates = [Path(os.environ[CIFAR10_TAR_ENV]).expanduser()]
    else:
        candidates = _shared_tarballs()
    for path in candidates:
        if path.is_file():
            return path
    tried = ', '.join(str(p) for p in dict.fromkeys(candidates))
    raise MissingFileError(
        f'CIFAR-10 JPEG tarball not found; tried: {tried}. '
        f'Set data.root in the recipe or ${CIFAR10_TAR_ENV} to the path of {CIFAR10_TARBALL}.'
    )


def _is_split_tree(path: Path) -> bool:
    return (path / 'train').is_dir() and (path / 'test').is_dir()


def _official_files() -> list[str]:
    from torchvision.datasets import CIFAR10

    return [name for name, _ in CIFAR10.train_list + CIFAR10.test_list] + [CIFAR10.meta['filename']]


def _is_official_tree(path: Path) -> bool:
    """`path` (a cifar-10-batches-py folder) holds every file of the official set (their md5s are checked when
    torchvision reads them)."""
    return path.is_dir() and all((path / name).is_file() for name in _official_files())


def resolve_cifar10(
    root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = False
) -> Cifar10Source:
    """The CIFAR-10 that `dataset: cifar10` reads, the first of:

    1. `root` (the recipe's data.root), else $KPID_CIFAR10_TAR: the JPEG tarball, a folder holding it or its
       unpacked tree; or the official `cifar-10-python.tar.gz`, a folder holding it, or its `cifar-10-batches-py`.
       An explicit location never falls back to another copy.
    2. the JPEG tree unpacked into the cache by an earlier build, else ../shared/data/cifar10-jpg.tar.gz beside
       the repository or the working directory (unpacked into the cache);
    3. the official set in the cache, else downloaded there from its publisher with torchvision's downloader and
       checked against the published md5. Offline, this fails within seconds with a `DataUnavailableError` that
       lists what was tried and how to provide the data.

    The two copies differ: the JPEG images were re-encoded at quality 75, which costs some accuracy against the
    official (lossless) images, so a figure should say which one it used (`Cifar10Source.label`).
    """
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    explicit = root or os.environ.get(CIFAR10_TAR_ENV)
    if explicit:
        official = _official_location(Path(explicit).expanduser())
        if official is not None:
            return _prepare_official(official, cache_dir, progress)
        return Cifar10Source('jpeg', prepare_cifar10(root, cache_dir, progress))
    if _is_split_tree(cache_dir / CIFAR10_DIRNAME) or any(p.is_file() for p in _shared_tarballs()):
        return Cifar10Source('jpeg', prepare_cifar10(None, cache_dir, progress))
    if _is_official_tree(cache_dir / CIFAR10_OFFICIAL_DIRNAME):
        return Cifar10Source('official', cache_dir)
    if (cache_dir / CIFAR10_OFFICIAL_DIRNAME).exists():  # checked before a 170 MB download that could not land
        raise UserError(
            f'{cache_dir / CIFAR10_OFFICIAL_DIRNAME} exists but is not a complete official CIFAR-10; '
            f'remove it to download the set there'
        )
    with _cache_lock(cache_dir):
        if not _is_official_tree(cache_dir / CIFAR10_OFFICIAL_DIRNAME):  # else another process fetched it meanwhile
            try:
                download_cifar10(cache_dir, progress)
            except _DownloadFailed as e:
                raise DataUnavailableError(
                    f'CIFAR-10 not found and not downloaded: no data.root or ${CIFAR10_TAR_ENV} given; no '
                    f'{" or ".join(str(p) for p in _shared_tarballs())}; no copy in {cache_dir}; {e}. Provide it: '
                    f'run once where {CIFAR10_URL} can be reached (the official set, 170 MB, goes into '
                    f'{cache_dir}; ${CACHE_ENV} moves it), or set data.root or ${CIFAR10_TAR_ENV} to a copy of '
                    f'{CIFAR10_OFFICIAL_TARBALL} or {CIFAR10_TARBALL}'
                ) from None
    return Cifar10Source('official', cache_dir)


def _official_location(path: Path) -> tuple[str, Path] | None:
    """('tarball', cifar-10-python.tar.gz) or ('tree', the folder holding cifar-10-batches-py) when an explicit
    location names the official set; None for anything else (the JPEG copy's rules apply)."""
    if path.name == CIFAR10_OFFICIAL_TARBALL:
        return 'tarball', path
    if path.name == CIFAR10_OFFICIAL_DIRNAME and path.is_dir():
        return 'tree', path.parent
    if path.is_dir() and (path / CIFAR10_OFFICIAL_DIRNAME).is_dir():
        return 'tree', path
    if path.is_dir() and (path / CIFAR10_OFFICIAL_TARBALL).is_file() and not (path / CIFAR10_TARBALL).is_file():
        return 'tarball', path / CIFAR10_OFFICIAL_TARBALL
    return None


def _prepare_official(location: tuple[str, Path], cache_dir: Path, progress: bool) -> Cifar10Source:
    kind, path = location
    if kind == 'tree':
        return Cifar10Source('official', path)
    if not path.is_file():
        raise MissingFileError(
            f'{path} does not exist (expected the official {CIFAR10_OFFICIAL_TARBALL} from {CIFAR10_URL})'
        )
    _check_md5(path, CIFAR10_MD5, f'{path}: not the official {CIFAR10_OFFICIAL_TARBALL}')
    with _cache_lock(cache_dir):
        if not _is_official_tree(cache_dir / CIFAR10_OFFICIAL_DIRNAME):
            _unpack_official(path, cache_dir, progress)
    return Cifar10Source('official', cache_dir)


class _DownloadFailed(Exception):
    """The official set could not be fetched (offline, refused, timed out, HTTP error)."""


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """torchvision's downloader opens its URLs without a timeout: a network that drops packets would hang it."""
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _check_md5(path: Path, expected: str, what: str) -> None:
    from torchvision.datasets.utils import calculate_md5

    actual = calculate_md5(path)
    if actual != expected:
        raise UserError(f'{what} ({path.stat().st_size} bytes, md5 {actual}, expected the published {expected})')


def download_cifar10(cache_dir: Path, progress: bool = False) -> Path:
    """Download the official CIFAR-10 into `cache_dir`/cifar-10-batches-py (torchvision's downloader, into a
    staging folder), check the archive against the published md5 and unpack it. A partial or corrupted download
    fails the check: it is removed with its staging folder, and the error names it. Call under `_cache_lock`."""
    from torchvision.datasets.utils import download_url

    cache_dir.mkdir(parents=True, exist_ok=True)
    remove_staging(cache_dir, CIFAR10_OFFICIAL_TARBALL)  # a killed download's leftovers (we hold the lock)
    staging = _staging_dir(cache_dir, CIFAR10_OFFICIAL_TARBALL)
    archive = staging / CIFAR10_OFFICIAL_TARBALL
    try:
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                download_url(CIFAR10_URL, str(staging), CIFAR10_OFFICIAL_TARBALL)  # md5: below, to name the file
        except (OSError, http.client.HTTPException) as e:  # URLError, refused, timed out, cut off
            reason = getattr(e, 'reason', None) or e
            raise _DownloadFailed(f'downloading {CIFAR10_URL} failed ({one_line(reason)})') from None
        _check_md5(
            archive,
            CIFAR10_MD5,
            f'the download of {CIFAR10_URL} is partial or corrupted: removed {archive}; run again to retry',
        )
        return _unpack_official(archive, cache_dir, progress)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _unpack_official(archive: Path, cache_dir: Path, progress: bool) -> Path:
    def complete(tree: Path) -> str | None:
        missing = [name for name in _official_files() if not (tree / name).is_file()]
        return f'has no {CIFAR10_OFFICIAL_DIRNAME}/{missing[0]}' if missing else None

    remove_staging(cache_dir, CIFAR10_OFFICIAL_DIRNAME)  # a killed unpack's leftovers (the caller holds the lock)
    return unpack_tarball(archive, cache_dir, CIFAR10_OFFICIAL_DIRNAME, progress, complete)


def prepare_cifar10(
    root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None, progress: bool = False
) -> Path:
    """Return a folder with `train/<class>/*.jpg` and `test/<class>/*.jpg`, unpacking the JPEG tarball on first
    use (`unpack_tarball`: staged, every member checked, renamed into place only when complete)."""
    if root and not Path(root).expanduser().exists():
        # checked first: once the cache holds an unpacked copy, a wrong root would otherwise go unnoticed
        raise MissingFileError(
            f'data.root: {root} does not exist (expected {CIFAR10_TARBALL}, a folder holding it, '
            f'or an unpacked tree with train/ and test/)'
        )
    if root and _is_split_tree(Path(root).expanduser()):
        return Path(root).expanduser()  # already an unpacked tree
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache_dir / CIFAR10_DIRNAME
    if _is_split_tree(target):
        return target
    tarball = find_cifar10_tarball(root)
    with _cache_lock(cache_dir):
        if _is_split_tree(target):  # another process unpacked it while this one waited
            return target
        remove_staging(cache_dir, CIFAR10_DIRNAME)  # what a killed unpack left (we hold the lock)
        unpack_tarball(
            tarball,
            cache_dir,
            CIFAR10_DIRNAME,
            progress,
            lambda tree: None if _is_split_tree(tree) else 'has no train/ and test/ folders',
        )
    return target


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    """One process at a time unpacks or downloads into the cache (the ranks of a launch, two builds): an flock on
    the cache folder itself, which the kernel releases when its holder dies, so a killed one never blocks."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: the staged renames alone keep a half-written copy out of use
        yield
        return
    fd = os.open(cache_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.warning('waiting for another process that is preparing data in %s', cache_dir)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _staging_dir(folder: Path, name: str) -> Path:
    """A new `.<name>.tmp-XXXXXXXX` folder in `folder`: the pattern `files.remove_staging` recognises."""
    staging = staging_path(folder / name)
    staging.mkdir(parents=True)
    return staging


def unpack_tarball(
    tarball: Path, into: Path, top: str, progress: bool = False, check: Callable[[Path], str | None] | None = None
) -> Path:
    """Unpack the folder `top` of the .tar.gz `tarball` as `into/top`, which must not exist yet.

    The archive is unpacked into a staging folder beside the target and renamed into place only when complete
    and `check(tree)` finds nothing wrong (it returns a phrase saying what is): a killed unpack leaves no
    `into/top`, only the staging folder, which the next unpack removes. Every member goes through tarfile's
    'data' filter: nothing lands outside the staging folder (no absolute or `../` names, no links pointing
    out of it, no device files). A file that is not a readable .tar.gz, that holds such a member, or that fails
    `check` is a ValueError naming it.
    """
    tarball, into = Path(tarball), Path(into)
    if (into / top).exists():  # not written by an unpack (those appear complete or not at all): not ours to replace
        raise UserError(f'{into / top} exists but is not a complete copy; remove it to unpack {tarball} there')
    staging = _staging_dir(into, top)
    try:
        try:
            with (
                open(tarball, 'rb') as raw,
                tqdm.wrapattr(
                    raw,
                    'read',
                    total=tarball.stat().st_size,
                    desc=f'unpack {tarball.name}',
                    unit='B',
                    unit_scale=True,
                    leave=False,
                    disable=not progress,
                ) as counted,
                tarfile.open(fileobj=counted, mode='r:gz') as tf,
            ):
                tf.extractall(staging, filter='data')
        except tarfile.FilterError as e:
            raise UserError(
                f'{tarball}: refused, it holds a member that would land outside the folder it is '
                f'unpacked into, or is not a plain file or folder ({e})'
            ) from None
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UserError(f'{tarball}: not a readable .tar.gz archive ({one_line(e)})') from None
        tree = staging / top
        problem = f'has no {top}/ folder' if not tree.is_dir() else check(tree) if check else None
        if problem:
            raise UserError(f'{tarball} {problem} (expected {top}/ at the top of the archive)')
        os.rename(tree, into / top)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return into / top
