"""`kpid-zoo build`: one recipe, end to end, resumable, and never reusing what it cannot vouch for.

parent (load, optionally adapt to the data) -> prune (importance + knapsack + surgery) -> fine-tune with inner
distillation -> evaluate -> export a Hub-shaped folder. Every stage leaves its result on disk under the work
folder with a manifest (`kpid_zoo.core.provenance`): the recipe fields and upstream results it was made from and the
sha256 of each file. A rerun reuses a stage only when both still hold, says why it runs each other one, and the
fine-tunes resume from their last checkpoint whose files still have their recorded hashes. First the folders are
checked (`guard_build_paths`, `kpid_zoo.core.ownership`: the build replaces or removes only what it wrote); then a lock
keeps a second build out of the same work folder, refusing it at once; then the checks that need no training
(family, FLOPs target vs the parent's and vs the smallest reachable) run before any work. Every stage starts from
an RNG state of its own, so a build gives the same bytes whether it ran straight through or was killed and resumed
anywhere, at a fixed torch thread count (`--threads N` or OMP_NUM_THREADS; the command line's default follows
the machine's load, `kpid_zoo.core.threads`, and torch's sums follow the thread count). Under `accelerate launch`
the pruning runs on the main process first and the other ranks read its result, so all ranks train the same
architecture.
"""

from __future__ import annotations

import math
import os
import random
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file

from ._version import __version__
from .budget.prune import (
    LatencyOutcome,
    PruneReport,
    PruneResult,
    check_latency_budget,
    check_target,
    prune_from_recipe,
)
from .budget.report import (
    PRUNE_FILES,
    REPORT_FILE,
    SPEC_FILE,
    summary_table,
    write_prune_outputs,
)
from .budget.timing import check_device
from .core.datasource import fingerprint
from .core.files import WEIGHTS_FILE, file_sha256, read_json, remove_staging, save_weights, write_json
from .core.lock import LOCK_FILE, build_lock, export_lock_name, main_process_value
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
from .core.provenance import DATA, MANIFEST_DIR, UPSTREAM, Manifest, Stage, flatten, select
from .core.recipe import Recipe, RecipeError, load_recipe
from .core.seeds import stable_seed
from .engine.flops import count_flops
from .engine.groups import discover_groups
from .engine.surgery import ArchSpec, build_pruned
from .errors import UserError
from .training.accelerator import process_accelerator
from .training.data import DataBundle, create_loaders, prepare_loader
from .training.distill import distill_points
from .training.evaluate import EvalResult, evaluate
from .training.parent import create_parent
from .training.train import Schedule, finetune, plan_schedule
from .zoo.export import KPID_FORMAT_VERSION, check_export_folder, export_model
from .zoo.export import WRITTEN_FILES as EXPORT_WRITES

logger = get_logger(__name__)
T = TypeVar('T')

# What each stage reads from the recipe: dotted prefixes in, and the fields among them that cannot change its result
# out (loader workers; the checkpoint interval, since a resumed training equals an uninterrupted one).
# `finetune.seed` seeds the parent's init and the loaders' subsets and augmentation, so every stage reads it.
_NEVER = ('data.workers', 'parent.train.checkpoint_every', 'finetune.checkpoint_every')
PARENT_FIELDS = (('parent', 'input_size', 'data', 'finetune.seed'), _NEVER + ('data.val_split', 'data.val_subset'))
PRUNE_FIELDS = (
    ('parent', 'input_size', 'flops', 'budget', 'importance', 'data', 'finetune.seed'),
    _NEVER + ('data.batch_size', 'data.val_split', 'data.val_subset'),
)
PRUNE_FIELDS_NO_DATA = (('parent', 'input_size', 'flops', 'budget', 'importance', 'finetune.seed'), _NEVER)
FINETUNE_FIELDS = (('input_size', 'data', 'finetune'), _NEVER)
EVAL_FIELDS = (('input_size', 'data', 'finetune.seed'), _NEVER + ('data.train_split', 'data.train_subset'))

# The top-level entries a build keeps in its work folder, recorded in kpid-work.json before they are written
# (kpid_zoo.core.ownership): stage manifests, stage results, the lock, a dry run's stand-in data. Nothing else there is
# the build's. `kpid-zoo prune --out DIR` keeps PRUNE_ENTRIES and DIR itself in the folder above DIR.
BUILD_ENTRIES = (MANIFEST_DIR, 'parent', 'pruned', 'finetune', 'eval.json', LOCK_FILE, 'standin')
PRUNE_ENTRIES = (MANIFEST_DIR, 'parent', LOCK_FILE)

TRAINING_FILE = 'training.json'  # beside the fine-tune's weights: the schedule that ran (steps, epochs)

HANG_ENV = 'KPID_TEST_HANG_AT'  # tests: `<stage>:<step>`, `<stage>:written` or `<stage>:done`
HANG_MARKER_ENV = 'KPID_TEST_HANG_MARKER'


def _hang(point: str) -> None:
    """Test hook: stop here for the test to SIGKILL the process, when $KPID_TEST_HANG_AT names `point`."""
    if os.environ.get(HANG_ENV) != point:
        return
    if os.environ.get(HANG_MARKER_ENV):
        Path(os.environ[HANG_MARKER_ENV]).write_text(point)
    time.sleep(3600)


def _hang_at_steps(stage: str) -> Callable[[int, dict], None] | None:
    if not os.environ.get(HANG_ENV, '').startswith(f'{stage}:'):
        return None
    return lambda step, _metrics: _hang(f'{stage}:{step}')


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


@dataclass
class BuildResult:
    recipe: Recipe
    export_dir: Path
    prune: PruneResult
    metrics: dict


def build(
    recipe_path: str | Path,
    out_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
) -> BuildResult:
    """Build the zoo entry of `recipe_path` into `out_dir` (default outputs/<name>)."""
    recipe = load_recipe(recipe_path)
    restart = not resume
    # read-only and quick: a folder the build must not touch is refused before anything else
    paths = guard_build_paths(
        BuildPaths(Path(work_dir or Path('runs') / recipe.name), Path(out_dir or Path('outputs') / recipe.name)),
        recipe.name,
        restart,
    )
    # one per process, shared by every stage: parent adaptation, Taylor importance, distillation, evaluation
    accelerator = process_accelerator()
    # the locks come first: a second build of a folder is refused at once, not after the checks below have made
    # and traced the parent. The export folder is locked too: two work folders building into one export would
    # replace each other's files.
    with (
        build_lock(accelerator, paths.work),
        build_lock(accelerator, paths.export.parent, export_lock_name(paths.export)),
    ):
        preflight(recipe)  # before anything is removed, reused or written
        prepare_work(accelerator, paths.work, BUILD_ENTRIES, restart=restart, export=paths.export)
        accelerator.wait_for_everyone()
        return _build(accelerator, recipe, paths, progress)


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


def _build(accelerator: Accelerator, recipe: Recipe, paths: BuildPaths, progress: bool) -> BuildResult:
    parent = create_parent(recipe)
    data = create_loaders(
        recipe.data, model=parent, input_size=recipe.input_size, seed=recipe.finetune.seed, progress=progress
    )
    if data.source:
        logger.info('build: data: %s, from %s', data.source, data.source_path)
    # the data's size is known now: a schedule it cannot run fails here, before any training
    check_schedules(recipe, data, accelerator.num_processes)
    parent, parent_ref = adapt_parent(accelerator, recipe, parent, data, paths.work, progress)
    pruned, pruned_ref = load_or_prune(accelerator, recipe, parent, data, paths, parent_ref, progress)
    logger.info('%s', summary_table(pruned))

    student, student_val, finetune_ref, training = distill(
        accelerator, recipe, parent, pruned, data, paths, parent_ref, pruned_ref, progress
    )
    metrics, eval_ref = eval_stage(
        accelerator, recipe, parent, student, data, student_val, paths, {**parent_ref, **finetune_ref}, progress
    )
    # what the fine-tune ran (the card says it: "not fine-tuned" for finetune.epochs: 0)
    metrics = {**metrics, 'finetune_steps': training['steps'], 'finetune_epochs': training['epochs']}
    # the card embeds the whole recipe and the kpid-zoo version: any change to either is a new export; so is a new
    # export format (an export of an older format is refused by pretrained loads: a rebuild must rewrite it)
    inputs = {
        **_recipe_inputs(recipe),
        **pruned_ref,
        **finetune_ref,
        **eval_ref,
        'kpid_zoo.version': __version__,
        'kpid_zoo.export_format': KPID_FORMAT_VERSION,
    }
    stage = Stage('export', paths.work, paths.export, EXPORT_WRITES, inputs)
    # read before the stage starts over its manifest: what this work folder exported before may be replaced
    recorded = recorded_files(paths.work, 'export')

    def export() -> None:
        export_model(
            student,
            pruned.spec,
            paths.export,
            name=recipe.name,
            pretrained_cfg=pretrained_cfg(parent, data),
            metrics=metrics,
            report=pruned.report,
            recipe=recipe,
            recorded=recorded,
        )

    run_stage(accelerator, stage, export, lambda: None, everywhere=False)
    return BuildResult(recipe, paths.export, pruned, metrics)


def preflight(recipe: Recipe) -> None:
    """What can fail without weights, data or training fails here, before any of them, in a second or so:
    the FLOPs target against the parent's FLOPs and against the smallest network the knapsack can reach; for a
    latency budget, the device, and the budget against what the parent and the smallest network measure here
    (latency does not depend on the weights: a randomly initialised parent is timed)."""
    spec = recipe.parent
    if recipe.budget is not None:
        try:
            check_device(recipe.budget.device)
        except ValueError as e:
            raise UserError(f'{recipe.source}: budget.device: {e}') from None
    with torch.random.fork_rng(devices=[]):  # the model is thrown away: leave the RNG as it was
        model = timm.create_model(spec.model, num_classes=spec.num_classes or recipe.data.num_classes).eval()
    size = tuple(recipe.input_size)
    settings = recipe.importance
    try:
        graph = discover_groups(model, size)
        if recipe.budget is not None:
            check_latency_budget(
                model,
                graph if settings.allow_inexact else graph.exact_only(),
                recipe.budget,
                arch=spec.model,
                input_size=size,
                min_channels=settings.min_channels,
                round_to=settings.round_to,
            )
            return
        target = recipe.flops.resolve_target(count_flops(model, size).gmacs)
        check_target(
            model,
            graph,
            target,
            arch=spec.model,
            input_size=size,
            min_channels=settings.min_channels,
            round_to=settings.round_to,
        )
    except ValueError as e:
        raise UserError(f'{recipe.source}: {e}') from None


def _reseed(recipe: Recipe, stage: str) -> None:
    """Each stage starts from an RNG state of its own: what it draws (weight init, projections) is then the same
    whether the stages before it ran in this process or were read back from disk."""
    seed = stable_seed(recipe.finetune.seed, stage)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _recipe_inputs(recipe: Recipe, fields: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The recipe's fields (all, or those `fields` = (include, exclude) selects) as stage inputs."""
    flat = flatten(recipe.to_dict())
    if fields is not None and recipe.data.is_stream:
        # a stream's sample order depends on its loader workers (kpid_zoo.training.streams): they decide the result
        fields = (fields[0], tuple(f for f in fields[1] if f != 'data.workers'))
    chosen = flat if fields is None else select(flat, *fields)
    return {f'recipe.{k}': v for k, v in chosen.items()}


def parent_inputs(recipe: Recipe) -> dict[str, Any]:
    """The parent's identity: its recipe fields and, for a checkpoint file, that file's sha256."""
    inputs = _recipe_inputs(recipe, (('parent',), ()))
    weights = recipe.parent.weights
    if weights not in ('timm', 'none') and not weights.startswith('pypi:'):
        path = recipe.resolve_path(weights)
        if path.is_file():
            inputs['parent.weights_sha256'] = file_sha256(path)
    return inputs


def run_stage(
    accelerator: Accelerator, stage: Stage, make: Callable[[], T], load: Callable[[], T], everywhere: bool = True
) -> T:
    """Reuse `stage`'s result (`load`) when it is fresh, else `make` it and commit its manifest.

    `make` runs on every process when `everywhere` (training, which is distributed), else on the main one only and
    the others `load` what it wrote; only the main process writes files. Every rank checks the same files before
    any rank writes, so all take the same branch.
    """
    fresh = stage.check()
    accelerator.wait_for_everyone()
    if fresh:
        return load()
    if accelerator.is_main_process:
        stage.begin()
    accelerator.wait_for_everyone()
    result = make() if everywhere or accelerator.is_main_process else None
    if accelerator.is_main_process:
        _hang(f'{stage.name}:written')
        stage.commit()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        stage.check()  # reads the digest the main process committed
        if not everywhere:
            result = load()
    _hang(f'{stage.name}:done')
    return result


def _train_images(data: DataBundle) -> int:
    """The training split's image count (a stream's from its shard index; a subset's when one is asked for)."""
    dataset = data.train_loader.dataset
    return int(getattr(dataset, 'num_samples', None) or len(dataset))


def check_schedules(
    recipe: Recipe, data: DataBundle, processes: int, parts: tuple[str, ...] = ('parent', 'importance', 'finetune')
) -> dict[str, Schedule]:
    """The schedules the data makes of the recipe's training stages (`parts`), or a `RecipeError` naming the file,
    the field and the numbers for one that cannot run: accumulation past an epoch, epochs that round to no step or
    to absurdly many (`train.plan_schedule`), more Taylor batches than the training split holds. Cheap: the data's
    size is known once its datasets are built, before any weights are trained."""
    images, batch = _train_images(data), recipe.data.batch_size
    counted = f' ({images} training images in batches of {batch} x {processes} process{"es" * (processes > 1)})'
    schedules = {}
    try:
        for part, where, spec in (
            ('parent', 'parent.train', recipe.parent.train),
            ('finetune', 'finetune', recipe.finetune),
        ):
            if part in parts and spec.epochs > 0:
                schedules[part] = plan_schedule(spec, images // (batch * processes), where, counted)
        settings = recipe.importance
        if 'importance' in parts and settings.method == 'taylor':
            # the Taylor loader reads the (unsharded) training set in batches of importance.batch_size, keeping
            # the last partial one; a stream yields its whole training batches
            readable = len(data.train_loader.dataset)
            held = math.ceil(readable / settings.batch_size)
            if settings.batches > held:
                raise RecipeError(
                    f'{settings.batches} batches of {settings.batch_size} images, but the '
                    f'{recipe.data.train_split!r} split holds {readable} images ({held} batches): '
                    f'expected at most {held}',
                    'importance.batches',
                )
    except RecipeError as e:
        raise e.within(source=recipe.source) from None
    return schedules


# each split's fingerprint, taken once per build (every stage that reads the split records it)
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def data_inputs(accelerator: Accelerator, recipe: Recipe, data: DataBundle, role: str) -> dict[str, Any]:
    """{"data.<role>": fingerprint} of the split a stage reads (`role` "train" or "val"; `kpid_zoo.core.datasource`):
    a changed, added or removed image makes the stage stale. Taken on the main process and handed to the others,
    which must all decide alike whether a stage is fresh."""
    dataset = (data.train_loader if role == 'train' else data.val_loader).dataset
    if dataset not in _FINGERPRINTS:
        split = recipe.data.train_split if role == 'train' else recipe.data.val_split
        found: list[Any] = [None, None]  # the fingerprint, or why it could not be taken (on every rank alike)
        if accelerator.is_main_process:
            try:
                found[0] = fingerprint(dataset, split, recipe.data.root)
            except OSError as e:  # a file gone since the dataset listed it
                found[1] = f'the {split!r} split changed while it was read: {e}'
        found = main_process_value(accelerator, found)
        if found[1] is not None:
            raise OSError(found[1])
        _FINGERPRINTS[dataset] = found[0]
        if found[0].get('unverified'):
            logger.info(
                'build: data: the %r split is not fully fingerprinted (%s): a change to its content will not '
                'rerun the stages that read it',
                split,
                found[0]['unverified'],
            )
    return {f'{DATA}{role}': _FINGERPRINTS[dataset]}


def adapt_parent(
    accelerator: Accelerator,
    recipe: Recipe,
    parent: nn.Module,
    data: DataBundle | None,
    work: Path,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train the parent on the recipe's data first when `parent.train.epochs` > 0 (CIFAR-scale recipes).

    Returns the parent and what identifies it for the stages downstream.
    """
    identity = parent_inputs(recipe)
    if recipe.parent.train.epochs <= 0:
        return parent, identity
    check_schedules(recipe, data, accelerator.num_processes, ('parent',))
    folder = work / 'parent'
    weights = folder / WEIGHTS_FILE
    stage = Stage(
        'parent',
        work,
        folder,
        (WEIGHTS_FILE,),
        {**identity, **_recipe_inputs(recipe, PARENT_FIELDS), **data_inputs(accelerator, recipe, data, 'train')},
        scratch=(folder,),
    )

    def train() -> None:
        _reseed(recipe, 'parent-train')
        # no evaluation here: the eval stage scores the parent on the validation split (once, it is not cheap)
        trained = finetune(
            parent,
            None,
            data.train_loader,
            None,
            recipe.parent.train,
            folder / 'train',
            accelerator=accelerator,
            resume=True,
            progress=progress,
            step_callback=_hang_at_steps('parent'),
        )
        if accelerator.is_main_process:
            save_weights(trained.model, weights)

    run_stage(accelerator, stage, train, lambda: None)
    # the pruning reads the parent from its recorded file whether it was trained in this process or not
    parent.load_state_dict(load_file(str(weights)))
    return parent.eval(), {f'{UPSTREAM}parent': stage.digest}


def distill(
    accelerator: Accelerator,
    recipe: Recipe,
    parent: nn.Module,
    pruned: PruneResult,
    data: DataBundle,
    paths: BuildPaths,
    parent_ref: dict,
    pruned_ref: dict,
    progress: bool = True,
) -> tuple[nn.Module, EvalResult | None, dict[str, Any], dict[str, Any]]:
    """Fine-tune the pruned net with inner distillation from its parent (resuming from the last checkpoint).

    Returns the student, its validation result when it was measured here, what identifies it for the stages
    downstream, and what the fine-tune ran (`TRAINING_FILE`). `finetune.epochs: 0` runs none: the student is
    the pruned net as it is (a prune-only build, which the model card says was not fine-tuned).
    """
    if recipe.finetune.epochs == 0:
        logger.info(
            'build: finetune: finetune.epochs is 0: skipped, the pruned network is evaluated and exported '
            'as pruned, not fine-tuned'
        )
        return pruned.model, None, dict(pruned_ref), {'steps': 0, 'epochs': 0.0}
    check_schedules(recipe, data, accelerator.num_processes, ('finetune',))
    weights, record = paths.finetune / WEIGHTS_FILE, paths.finetune / TRAINING_FILE
    stage = Stage(
        'finetune',
        paths.work,
        paths.finetune,
        (WEIGHTS_FILE, TRAINING_FILE),
        {
            **parent_ref,
            **pruned_ref,
            **_recipe_inputs(recipe, FINETUNE_FIELDS),
            **data_inputs(accelerator, recipe, data, 'train'),
        },
        scratch=(paths.finetune,),
    )

    def train() -> tuple[nn.Module, EvalResult | None, dict[str, Any]]:
        _reseed(recipe, 'finetune')
        kept = {p: pruned.kept_channels(p) for p in distill_points(parent)}
        trained = finetune(
            pruned.model,
            parent,
            data.train_loader,
            data.val_loader,
            recipe.finetune,
            paths.finetune,
            accelerator=accelerator,
            kept=kept,
            input_size=recipe.input_size,
            resume=True,
            progress=progress,
            step_callback=_hang_at_steps('finetune'),
        )
        schedule = trained.schedule
        # the same bytes whether the run was resumed or not (no times, no resume point): downstream stays fresh
        training = {
            'steps': trained.steps,
            'epochs': trained.steps / schedule.steps_per_epoch,
            'steps_per_epoch': schedule.steps_per_epoch,
            'batches_per_epoch': schedule.batches_per_epoch,
            'grad_accum_steps': schedule.grad_accum_steps,
            'batch_size': recipe.data.batch_size,
            'processes': accelerator.num_processes,
        }
        if accelerator.is_main_process:
            save_weights(trained.model, weights)
            write_json(record, training)
        return trained.model, trained.val, training

    def load() -> tuple[nn.Module, None, dict[str, Any]]:
        pruned.model.load_state_dict(load_file(str(weights)))
        training = read_json(record)
        if (
            not isinstance(training, dict)
            or not isinstance(training.get('steps'), int)
            or not isinstance(training.get('epochs'), (int, float))
        ):
            raise ValueError(f'{record}: not a training record (expected steps and epochs)')
        return pruned.model, None, training

    student, val, training = run_stage(accelerator, stage, train, load)
    return student, val, {f'{UPSTREAM}finetune': stage.digest}, training


def load_or_prune(
    accelerator: Accelerator,
    recipe: Recipe,
    parent: nn.Module,
    data: DataBundle | None,
    paths: BuildPaths,
    parent_ref: dict,
    progress: bool = True,
) -> tuple[PruneResult, dict[str, Any]]:
    """The pruning result in `paths.pruned` if it is fresh, else prune now (on the main process; Taylor scores on
    the accelerator's device) and write it."""
    folder = paths.pruned
    taylor = recipe.importance.method == 'taylor'
    fields = PRUNE_FIELDS if taylor else PRUNE_FIELDS_NO_DATA
    reads = {}
    if taylor and data is not None:
        check_schedules(recipe, data, accelerator.num_processes, ('importance',))
        reads = data_inputs(accelerator, recipe, data, 'train')
    # no scratch to wipe: the folder is replaced whole when the new result is complete, and only if it holds
    # nothing but the four files (it may be a user's `prune --out`)
    stage = Stage('pruned', paths.work, folder, PRUNE_FILES, {**parent_ref, **_recipe_inputs(recipe, fields), **reads})

    def prune() -> PruneResult:
        _reseed(recipe, 'pruned')
        result = prune_from_recipe(
            recipe, parent, data.train_loader if data else None, device=accelerator.device, progress=progress
        )
        write_prune_outputs(result, folder)
        return result

    result = run_stage(
        accelerator,
        stage,
        prune,
        lambda: load_prune_outputs(folder, parent, tuple(recipe.input_size)),
        everywhere=False,
    )
    return result, {f'{UPSTREAM}pruned': stage.digest}


def load_prune_outputs(folder: Path, parent: nn.Module, input_size: tuple[int, int, int]) -> PruneResult:
    """Rebuild a `PruneResult` from what `write_prune_outputs` wrote."""
    spec = ArchSpec.load(folder / SPEC_FILE)
    report = read_json(folder / REPORT_FILE)
    try:
        keep = {g: torch.tensor(idx, dtype=torch.long) for g, idx in report.pop('kept_channels').items()}
        report.pop('flops_error', None)
        report['input_size'] = tuple(report['input_size'])
        report['layer_widths'] = [tuple(row) for row in report['layer_widths']]
        if report.get('latency') is not None:
            report['latency'] = LatencyOutcome(**report['latency'])
        prune_report = PruneReport(**report)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{folder / REPORT_FILE}: not a pruning report ({type(e).__name__}: {e})') from None
    model = build_pruned(spec, num_classes=parent.num_classes)
    model.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
    model.pretrained_cfg = parent.pretrained_cfg
    return PruneResult(model.eval(), spec, keep, discover_groups(parent, input_size), prune_report)


def eval_stage(
    accelerator: Accelerator,
    recipe: Recipe,
    parent: nn.Module,
    student: nn.Module,
    data: DataBundle,
    student_val: EvalResult | None,
    paths: BuildPaths,
    upstream: dict,
    progress: bool = True,
) -> tuple[dict, dict[str, Any]]:
    """The evaluation stage: `measure`, or the metrics in eval.json while they are fresh."""
    stage = Stage(
        'eval',
        paths.work,
        paths.work,
        (paths.eval.name,),
        {**upstream, **_recipe_inputs(recipe, EVAL_FIELDS), **data_inputs(accelerator, recipe, data, 'val')},
        scratch=(paths.eval,),
    )
    metrics = run_stage(
        accelerator,
        stage,
        lambda: measure(accelerator, recipe, parent, student, data, student_val, paths, progress),
        lambda: read_json(paths.eval),
    )
    return metrics, {f'{UPSTREAM}eval': stage.digest}


def measure(
    accelerator: Accelerator,
    recipe: Recipe,
    parent: nn.Module,
    student: nn.Module,
    data: DataBundle,
    student_val: EvalResult | None,
    paths: BuildPaths,
    progress: bool = True,
) -> dict:
    """Top-1/top-5 of the pruned net and of its parent on the recipe's validation split (written to eval.json),
    on the accelerator: each process scores its shard and `gather_for_metrics` counts every image once."""
    val_loader = prepare_loader(accelerator, data.val_loader)
    try:
        student_val = student_val or evaluate(
            student.to(accelerator.device), val_loader, accelerator, progress=progress, desc='evaluate (pruned)'
        )
        parent_val = evaluate(
            parent.to(accelerator.device), val_loader, accelerator, progress=progress, desc='evaluate (parent)'
        )
    finally:
        accelerator.free_memory()
    metrics = {
        'top1': student_val.top1,
        'top5': student_val.top5,
        'parent_top1': parent_val.top1,
        'parent_top5': parent_val.top5,
        'n': student_val.n,
        'dataset': recipe.data.dataset,
        'split': recipe.data.val_split,
    }
    if data.source:  # CIFAR-10: the JPEG copy (quality 75) scores lower than the official images
        metrics['data_source'] = data.source
    if accelerator.is_main_process:
        write_json(paths.eval, metrics)
    return metrics


def pretrained_cfg(parent: nn.Module, data: DataBundle) -> dict:
    """The parent's timm pretrained cfg with the preprocessing this build trained and evaluated with."""
    cfg = dict(getattr(parent, 'pretrained_cfg', {}) or {})
    for key in ('input_size', 'mean', 'std', 'interpolation', 'crop_pct', 'crop_mode'):
        if key in data.data_config:
            cfg[key] = data.data_config[key]
    cfg['num_classes'] = data.num_classes
    return cfg
