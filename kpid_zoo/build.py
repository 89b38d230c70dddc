"""`kpid-zoo build`: one recipe, end to end, resumable, and never reusing what it cannot vouch for.

parent (load, optionally adapt to the data) -> prune (importance + knapsack + surgery) -> fine-tune with inner
distillation -> evaluate -> export a Hub-shaped folder. Every stage leaves its result on disk under the work folder with
a manifest (`kpid_zoo.core.provenance`): the recipe fields and upstream results it was made from and the sha256 of each
file. A rerun reuses a stage only when both still hold, says why it runs each other one, and the fine-tunes resume from
their last checkpoint whose files still have their recorded hashes. First the folders are checked (`guard_build_paths`,
`kpid_zoo.core.ownership`: the build replaces or removes only what it wrote); then a lock keeps a second build out of
the same work folder, refusing it at once; then the checks that need no training (a parent the engine can prune, FLOPs
target vs the parent's and vs the smallest reachable) run before any work. Every stage starts from an RNG state of its
own, so a build gives the same bytes whether it ran straight through or was killed and resumed anywhere, at a fixed
torch thread count (`--threads N` or OMP_NUM_THREADS; the command line's default follows the machine's load,
`kpid_zoo.core.threads`, and torch's sums follow the thread count). Under `accelerate launch` the pruning runs on the
main process first and the other ranks read its result, so all ranks train the same architecture. This module runs the
build; the stages are in `kpid_zoo._stages`, what they share (inputs, reuse, seeds) in `kpid_zoo._runner`, and the
folder checks in `kpid_zoo._workdir`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from accelerate import Accelerator

from ._runner import check_schedules, recipe_inputs, run_stage
from ._stages import adapt_parent, distill, eval_stage, load_or_prune, pretrained_cfg
from ._version import __version__
from ._workdir import BUILD_ENTRIES, BuildPaths, guard_build_paths, prepare_work, recorded_files
from .budget.prune import PruneResult, check_latency_budget, check_target
from .budget.report import summary_table
from .budget.timing import check_device, check_runtime
from .core.lock import build_lock, export_lock_name
from .core.logs import get_logger
from .core.provenance import Stage
from .core.recipe import Recipe, load_recipe
from .deploy.onnx import missing_onnx_packages
from .engine.flops import count_flops
from .engine.groups import GroupGraph, discover_groups
from .errors import UserError
from .training.accelerator import process_accelerator
from .training.data import create_loaders
from .training.distill import distill_points
from .training.parent import create_parent
from .zoo._onnx import CHECK_IMAGES, ONNX_FILE
from .zoo.export import KPID_FORMAT_VERSION, export_model
from .zoo.export import WRITTEN_FILES as EXPORT_WRITES

logger = get_logger(__name__)


@dataclass
class BuildResult:
    recipe: Recipe
    export_dir: Path
    prune: PruneResult
    metrics: dict


def _check_images(loader) -> torch.Tensor:
    """The first CHECK_IMAGES validation images, preprocessed as evaluated: what model.onnx is checked on."""
    found: list[torch.Tensor] = []
    for x, _ in loader:
        found.extend(x[: CHECK_IMAGES - len(found)].cpu())
        if len(found) >= CHECK_IMAGES:
            break
    return torch.stack(found)


def build(
    recipe_path: str | Path,
    out_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    resume: bool = True,
    progress: bool = True,
    onnx: bool = True,
) -> BuildResult:
    """Build the zoo entry of `recipe_path` into `out_dir` (default outputs/<name>); with `onnx`, its model.onnx too
    (checked in ONNX Runtime on validation images, when the deploy extra is installed)."""
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
        return _build(accelerator, recipe, paths, progress, onnx)


def _build(accelerator: Accelerator, recipe: Recipe, paths: BuildPaths, progress: bool, onnx: bool) -> BuildResult:
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
        **recipe_inputs(recipe),
        **pruned_ref,
        **finetune_ref,
        **eval_ref,
        'kpid_zoo.version': __version__,
        'kpid_zoo.export_format': KPID_FORMAT_VERSION,
        # installing the deploy extra later makes the next build write the model.onnx this one could not
        'kpid_zoo.onnx_packages': onnx and not missing_onnx_packages(),
    }
    stage = Stage('export', paths.work, paths.export, EXPORT_WRITES, inputs, optional=(ONNX_FILE,))
    # read before the stage starts over its manifest: what this work folder exported before may be replaced
    recorded = recorded_files(paths.work, 'export')

    def export() -> None:
        images = _check_images(data.val_loader) if onnx else None
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
            onnx=onnx,
            images=images,
            images_from=f'{len(images)} validation images of the build ({recipe.data.val_split} split)' if onnx else '',
        )

    run_stage(accelerator, stage, export, lambda: None, everywhere=False)
    return BuildResult(recipe, paths.export, pruned, metrics)


def preflight(recipe: Recipe, fine_tunes: bool = True) -> None:
    """What can fail without weights, data or training fails here, before any of them, in a second or so:
    whether the engine can prune the parent at all (any timm model is a recipe's parent: one that no channel group
    of can be pruned, or only inexact ones without `importance.allow_inexact`, is refused with the engine's
    reasons), the FLOPs target against the parent's FLOPs and against the smallest network the knapsack can reach;
    for a latency budget, the device, the runtime (installed, and able to run the parent and every layer its table
    times: in ONNX Runtime or OpenVINO each is exported and compiled once, seconds more), and the budget against
    what the parent and the smallest network measure here (latency does not depend on the weights: a randomly
    initialised parent is timed); when the run `fine_tunes` with inner distillation, that the parent names its
    distillation points."""
    spec = recipe.parent
    if recipe.budget is not None:
        try:
            check_device(recipe.budget.device)
        except ValueError as e:
            raise UserError(f'{recipe.source}: budget.device: {e}') from None
        try:
            check_runtime(recipe.budget.runtime)  # its package: one line naming it, before the parent is made
        except ValueError as e:
            raise UserError(f'{recipe.source}: budget.runtime: {e}') from None
    with torch.random.fork_rng(devices=[]):  # the model is thrown away: leave the RNG as it was
        model = timm.create_model(spec.model, num_classes=spec.num_classes or recipe.data.num_classes).eval()
    size = tuple(recipe.input_size)
    settings = recipe.importance
    try:
        graph = discover_groups(model, size)
        # the groups the prune step will see (`prune_from_recipe`): inexact ones only when the recipe opts in
        usable = graph if settings.allow_inexact else graph.exact_only()
        widths = dict(arch=spec.model, input_size=size, min_channels=settings.min_channels, round_to=settings.round_to)
        if recipe.budget is not None:
            check_latency_budget(model, usable, recipe.budget, **widths)
        else:
            _check_flops_target(recipe, model, graph, usable, widths)
    except ValueError as e:
        raise UserError(f'{recipe.source}: {e}') from None
    if fine_tunes and recipe.finetune.epochs > 0 and recipe.finetune.kd_gamma > 0:
        try:  # the fine-tune's inner distillation reads the parent at these points: known before any training
            distill_points(model)
        except ValueError as e:
            raise UserError(
                f'{recipe.source}: finetune.kd_gamma: {e}; finetune.kd_gamma: 0 fine-tunes without inner distillation'
            ) from None


def _check_flops_target(
    recipe: Recipe, model: torch.nn.Module, graph: GroupGraph, usable: GroupGraph, widths: dict
) -> None:
    """The FLOPs target against the parent's FLOPs and the smallest network the `usable` groups reach; where only
    the inexact groups the recipe leaves out would reach it, the error names the field that lets them in."""
    target = recipe.flops.resolve_target(count_flops(model, widths['input_size']).gmacs)
    try:
        check_target(model, usable, target, **widths)
    except UserError as e:
        if usable is graph or not graph.inexact or not usable.prunable:
            raise
        try:  # would the inexact groups reach the target? Then the recipe only needs to opt in
            check_target(model, graph, target, **widths)
        except UserError:
            raise e from None
        raise UserError(
            f'{e} with exact groups only; set importance.allow_inexact: true to also prune its '
            f'{len(graph.inexact)} inexact groups, which reach it'
        ) from None
