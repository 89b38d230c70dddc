"""The build's stages after the parent is made: adapt the parent to the data, prune it, fine-tune the pruned net
with inner distillation, evaluate both; each reuses its result on disk while it is fresh (`_runner.run_stage`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file

from ._runner import (
    EVAL_FIELDS,
    FINETUNE_FIELDS,
    PARENT_FIELDS,
    PRUNE_FIELDS,
    PRUNE_FIELDS_NO_DATA,
    check_schedules,
    data_inputs,
    hang_at_steps,
    parent_inputs,
    recipe_inputs,
    reseed,
    run_stage,
)
from ._workdir import BuildPaths
from .budget.prune import LatencyOutcome, PruneReport, PruneResult, prune_from_recipe
from .budget.report import PRUNE_FILES, REPORT_FILE, SPEC_FILE, write_prune_outputs
from .core.files import WEIGHTS_FILE, read_json, save_weights, write_json
from .core.logs import get_logger
from .core.provenance import UPSTREAM, Stage
from .core.recipe import Recipe
from .engine.groups import discover_groups
from .engine.surgery import ArchSpec, build_pruned
from .training.data import DataBundle, prepare_loader
from .training.distill import distill_points
from .training.evaluate import EvalResult, evaluate
from .training.train import finetune

logger = get_logger(__name__)

TRAINING_FILE = 'training.json'  # beside the fine-tune's weights: the schedule that ran (steps, epochs)


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
        {**identity, **recipe_inputs(recipe, PARENT_FIELDS), **data_inputs(accelerator, recipe, data, 'train')},
        scratch=(folder,),
    )

    def train() -> None:
        reseed(recipe, 'parent-train')
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
            step_callback=hang_at_steps('parent'),
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
            **recipe_inputs(recipe, FINETUNE_FIELDS),
            **data_inputs(accelerator, recipe, data, 'train'),
        },
        scratch=(paths.finetune,),
    )

    def train() -> tuple[nn.Module, EvalResult | None, dict[str, Any]]:
        reseed(recipe, 'finetune')
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
            step_callback=hang_at_steps('finetune'),
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
    stage = Stage('pruned', paths.work, folder, PRUNE_FILES, {**parent_ref, **recipe_inputs(recipe, fields), **reads})

    def prune() -> PruneResult:
        reseed(recipe, 'pruned')
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
        {**upstream, **recipe_inputs(recipe, EVAL_FIELDS), **data_inputs(accelerator, recipe, data, 'val')},
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
