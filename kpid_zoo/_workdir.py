"""The build's folders: where each stage's result goes (`BuildPaths`), the checks that refuse, before any slow work,
a folder the build must not touch (`guard_build_paths`, `guard_prune_paths`; `kpid_zoo.core.ownership`: the build
replaces or removes only what it wrote), and the work folder's record of the entries the build keeps there
(`prepare_work`, under the build lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from accelerate import Accelerator

from .budget.report import PRUNE_FILES
from .core.files import remove_staging
from .core.lock import LOCK_FILE, main_process_value
from .core.logs import get_logger
from .core.ownership import (
    WORK_MANIFEST,
    RefusedError,
    check_apart,
    check_output,
    check_work,
    claim_work,
    clear_work,
    folder_target,
    recorded_sha256,
    remove_work_staging,
)
from .core.provenance import MANIFEST_DIR, Manifest
from .zoo.export import check_export_folder

logger = get_logger(__name__)

# The top-level entries a build keeps in its work folder, recorded in kpid-work.json before they are written
# (kpid_zoo.core.ownership): stage manifests, stage results, the lock, a dry run's stand-in data. Nothing else there is
# the build's. `kpid-zoo prune --out DIR` keeps PRUNE_ENTRIES and DIR itself in the folder above DIR.
BUILD_ENTRIES = (MANIFEST_DIR, 'parent', 'pruned', 'finetune', 'eval.json', LOCK_FILE, 'standin')
PRUNE_ENTRIES = (MANIFEST_DIR, 'parent', LOCK_FILE)


@dataclass
class BuildPaths:
    work: Path  # stage results: parent/, pruned/, finetune/, eval.json, stages/ (manifests), build.lock
    export: Path  # the Hub-shaped output folder
    pruned_dir: Path | None = None  # `kpid-zoo prune --out`: elsewhere than work/pruned

    @property
    def parent(self) -> Path:
        return self.work / 'parent'

    @property
    def pruned(self) -> Path:
        return self.pruned_dir or self.work / 'pruned'

    @property
    def finetune(self) -> Path:
        return self.work / 'finetune'

    @property
    def eval(self) -> Path:
        return self.work / 'eval.json'


def guard_build_paths(paths: BuildPaths, name: str, restart: bool = False) -> BuildPaths:
    """Refuse, before any slow work, what would delete or replace a file the build did not write: an --out or
    --work that is a file, a device or a FIFO (a symlink is followed, its target checked), an --out that is, holds
    or lies inside the work folder, an --out holding anything but a previous export of `name`, a work folder holding
    at one of the build's names something its record does not list, and --restart of a folder that is no kpid-zoo
    work folder. Read-only; the checks that matter at the moment of writing run again then (`prepare_work`,
    `export_model`, `files.replace_dir`)."""
    work = folder_target(paths.work, '--work')
    export = folder_target(paths.export, '--out')
    check_apart(export, work)
    check_work(work, BUILD_ENTRIES, restart)
    if not restart:
        check_pruned_folder(work / 'pruned', claimed=True)
    check_export_folder(export, name, None if restart else recorded_files(work, 'export'))
    return BuildPaths(work, export)


def guard_prune_paths(out: str | Path) -> BuildPaths:
    """`kpid-zoo prune --out DIR`: the stage results go to DIR's parent (the work folder) and the pruning to DIR,
    which may be replaced only when it is absent, empty, or holds a previous pruning (recorded in the work folder's
    kpid-work.json, or its files have the sha256 the work folder's stage record lists)."""
    out = folder_target(out, '--out')
    work = out.parent
    if out.name in (set(BUILD_ENTRIES) - {'pruned'}) | {WORK_MANIFEST}:
        raise RefusedError(f'--out {out}: the build keeps its {out.name} there; give --out another folder name')
    ours = check_work(work, PRUNE_ENTRIES)
    check_pruned_folder(out, out.name in ours, recorded_files(work, 'pruned'))
    return BuildPaths(work=work, export=out, pruned_dir=out)


def check_pruned_folder(folder: Path, claimed: bool, recorded: dict[str, str] | None = None) -> None:
    """A pruning output folder holds only its four files; unless the work record claims it, each must have the
    sha256 the pruned stage recorded."""
    check_output(folder, PRUNE_FILES, lambda file, sha: claimed or (recorded or {}).get(file) == sha, '--out')


def recorded_files(work: Path, stage: str) -> dict[str, str]:
    """{file: sha256} of a stage's result as its committed manifest records it; {} when there is none."""
    try:
        return recorded_sha256(Manifest.read(work / MANIFEST_DIR / f'{stage}.json').files)
    except (OSError, ValueError):
        return {}


def prepare_work(
    accelerator: Accelerator,
    work: Path,
    entries: tuple[str, ...],
    restart: bool = False,
    export: Path | None = None,
    vetted: tuple[str, ...] = (),
) -> None:
    """Under the build lock, on the main process: check the work folder again, clear what its record lists for
    --restart, record `entries` (those in `vetted` were checked by the caller), and remove what killed builds left
    beside and below the build's entries (and beside `export`). A refusal reaches every rank."""
    refusal = None
    if accelerator.is_main_process:
        try:
            if restart:
                check_work(work, entries, restart=True)
                for path in clear_work(work, entries):
                    logger.info('build: --restart: removed %s', path)
            claims = claim_work(work, entries, vetted=vetted)
            # we hold the lock: staging folders and files there are what killed builds left
            remove_work_staging(work, claims)
            if export is not None:
                remove_staging(export.parent, export.name)
        except RefusedError as e:
            refusal = str(e)
    refusal = main_process_value(accelerator, refusal)
    if refusal:
        raise RefusedError(refusal)
