"""`kpid-zoo build`: one recipe, end to end, resumable, and never reusing what it cannot vouch for.

parent (load, optionally adapt to the data) -> prune (importance + knapsack + surgery) -> fine-tune with inner
distillation -> evaluate -> export a Hub-shaped folder. Every stage leaves its result on disk under the work
folder with a manifest (`kpid_zoo.provenance`): the recipe fields and upstream results it was made from and the
sha256 of each file. A rerun reuses a stage only when both still hold, says why it runs each other one, and the
fine-tunes resume from their last checkpoint whose files still have their recorded hashes. The checks that need
no training (family, FLOPs target vs the parent's and vs the smallest reachable) run first, and a lock keeps a
second build out of the same work folder. Every stage starts from an RNG state of its own, so a build gives the
same bytes whether it ran straight through or was killed and resumed anywhere, at a fixed torch thread count
(`--threads N` or OMP_NUM_THREADS; the command line's default follows the machine's load, `kpid_zoo.threads`, and
torch's sums follow the thread count).
Under `accelerate launch` the pruning runs on the main process first and the other ranks read its result, so
all ranks train the same architecture.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import timm
import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file

from . import __version__
from .accelerator import process_accelerator
from .data import DataBundle, create_loaders, prepare_loader
from .distill import distill_points
from .evaluate import EvalResult, evaluate
from .export import EXPORT_FILES, export_model
from .files import file_sha256, json_sha256, read_json, remove_staging, save_weights, write_json
from .flops import count_flops
from .groups import discover_groups
from .lock import LOCK_FILE, build_lock, export_lock_name
from .model_card import WIDTHS_PLOT
from .parent import create_parent
from .provenance import UPSTREAM, Stage, flatten, select
from .latency import check_device
from .prune import LatencyOutcome, PruneReport, PruneResult, check_latency_budget, check_target, prune_from_recipe
from .recipe import Recipe, load_recipe
from .report import (
    PRUNED_WEIGHTS,
    REPORT_FILE,
    SPEC_FILE,
    WIDTHS_PLOT as PRUNED_PLOT,
    summary_table,
    write_prune_outputs,
)
from .surgery import ArchSpec, build_pruned
from .train import finetune

T = TypeVar("T")

# What each stage reads from the recipe: dotted prefixes in, and the fields among them that cannot change its result
# out (loader workers; the checkpoint interval, since a resumed training equals an uninterrupted one).
# `finetune.seed` seeds the parent's init and the loaders' subsets and augmentation, so every stage reads it.
_NEVER = ("data.workers", "parent.train.checkpoint_every", "finetune.checkpoint_every")
PARENT_FIELDS = (("parent", "input_size", "data", "finetune.seed"), _NEVER + ("data.val_split", "data.val_subset"))
PRUNE_FIELDS = (("parent", "input_size", "flops", "budget", "importance", "data", "finetune.seed"),
                _NEVER + ("data.batch_size", "data.val_split", "data.val_subset"))
PRUNE_FIELDS_NO_DATA = (("parent", "input_size", "flops", "budget", "importance", "finetune.seed"), _NEVER)
FINETUNE_FIELDS = (("input_size", "data", "finetune"), _NEVER)
EVAL_FIELDS = (("input_size", "data", "finetune.seed"), _NEVER + ("data.train_split", "data.train_subset"))

HANG_ENV = "KPID_TEST_HANG_AT"        # tests: `<stage>:<step>`, `<stage>:written` or `<stage>:done`
HANG_MARKER_ENV = "KPID_TEST_HANG_MARKER"


def _hang(point: str) -> None:
    """Test hook: stop here for the test to SIGKILL the process, when $KPID_TEST_HANG_AT names `point`."""
    if os.environ.get(HANG_ENV) != point:
        return
    if os.environ.get(HANG_MARKER_ENV):
        Path(os.environ[HANG_MARKER_ENV]).write_text(point)
    time.sleep(3600)


def _hang_at_steps(stage: str) -> Callable[[int, dict], None] | None:
    if not os.environ.get(HANG_ENV, "").startswith(f"{stage}:"):
        return None
    return lambda step, _metrics: _hang(f"{stage}:{step}")


@dataclass
class BuildPaths:
    work: Path      # stage results: parent/, pruned/, finetune/, eval.json, stages/ (manifests), build.lock
    export: Path    # the Hub-shaped output folder
    pruned_dir: Path | None = None  # `kpid-zoo prune --out`: elsewhere than work/pruned

    @property
    def parent(self) -> Path:
        return self.work / "parent"

    @property
    def pruned(self) -> Path:
        return self.pruned_dir or self.work / "pruned"

    @property
    def finetune(self) -> Path:
        return self.work / "finetune"

    @property
    def eval(self) -> Path:
        return self.work / "eval.json"


@dataclass
class BuildResult:
    recipe: Recipe
    export_dir: Path
    prune: PruneResult
    metrics: dict


def build(recipe_path: str | Path, out_dir: str | Path | None = None, work_dir: str | Path | None = None,
          resume: bool = True, progress: bool = True) -> BuildResult:
    """Build the zoo entry of `recipe_path` into `out_dir` (default outputs/<name>)."""
    recipe = load_recipe(recipe_path)
    paths = BuildPaths(Path(work_dir or Path("runs") / recipe.name), Path(out_dir or Path("outputs") / recipe.name))
    preflight(recipe)
    # one per process, shared by every stage: parent adaptation, Taylor importance, distillation, evaluation
    accelerator = process_accelerator()
    # the export folder is locked too: two work folders building into one export would replace each other's files
    with build_lock(accelerator, paths.work), \
            build_lock(accelerator, paths.export.parent, export_lock_name(paths.export)):
        if accelerator.is_main_process:
            if not resume:
                for entry in paths.work.iterdir():
                    if entry.name != LOCK_FILE:
                        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            # we hold the lock: staging folders and files here are what killed builds left
            remove_staging(paths.work)
            remove_staging(paths.export.parent, paths.export.name)
        accelerator.wait_for_everyone()
        return _build(accelerator, recipe, paths, progress)


def _build(accelerator: Accelerator, recipe: Recipe, paths: BuildPaths, progress: bool) -> BuildResult:
    parent = create_parent(recipe)
    data = create_loaders(recipe.data, model=parent, input_size=recipe.input_size, seed=recipe.finetune.seed,
                          progress=progress)
    if data.source:
        _logger(accelerator)(f"data: {data.source}, from {data.source_path}")
    parent, parent_ref = adapt_parent(accelerator, recipe, parent, data, paths.work, progress)
    pruned, pruned_ref = load_or_prune(accelerator, recipe, parent, data, paths, parent_ref, progress)
    if accelerator.is_main_process:
        print(summary_table(pruned), flush=True)

    student, student_val, finetune_ref = distill(accelerator, recipe, parent, pruned, data, paths, parent_ref,
                                                 pruned_ref, progress)
    metrics, eval_ref = eval_stage(accelerator, recipe, parent, student, data, student_val, paths,
                                   {**parent_ref, **finetune_ref}, progress)
    # the card embeds the whole recipe and the kpid-zoo version: any change to either is a new export
    inputs = {**_recipe_inputs(recipe), **pruned_ref, **finetune_ref, **eval_ref, "kpid_zoo.version": __version__}
    stage = Stage("export", paths.work, paths.export, EXPORT_FILES + (WIDTHS_PLOT,), inputs,
                  log=_logger(accelerator))

    def export() -> None:
        export_model(student, pruned.spec, paths.export, name=recipe.name, pretrained_cfg=pretrained_cfg(parent, data),
                     metrics=metrics, report=pruned.report, recipe=recipe)
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
            raise ValueError(f"{recipe.source}: budget.device: {e}") from None
    with torch.random.fork_rng(devices=[]):  # the model is thrown away: leave the RNG as it was
        model = timm.create_model(spec.model, num_classes=spec.num_classes or recipe.data.num_classes).eval()
    size = tuple(recipe.input_size)
    settings = recipe.importance
    try:
        graph = discover_groups(model, size)
        if recipe.budget is not None:
            check_latency_budget(model, graph if settings.allow_inexact else graph.exact_only(), recipe.budget,
                                 arch=spec.model, input_size=size, min_channels=settings.min_channels,
                                 round_to=settings.round_to)
            return
        target = recipe.flops.resolve_target(count_flops(model, size).gmacs)
        check_target(model, graph, target, arch=spec.model, input_size=size,
                     min_channels=settings.min_channels, round_to=settings.round_to)
    except ValueError as e:
        raise ValueError(f"{recipe.source}: {e}") from None


def _logger(accelerator: Accelerator) -> Callable[[str], None]:
    """Stage messages, from the main process only."""
    def log(message: str) -> None:
        if accelerator.is_main_process:
            print(f"build: {message}", flush=True)
    return log


def _reseed(recipe: Recipe, stage: str) -> None:
    """Each stage starts from an RNG state of its own: what it draws (weight init, projections) is then the same
    whether the stages before it ran in this process or were read back from disk."""
    seed = int(json_sha256([recipe.finetune.seed, stage])[:8], 16)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _recipe_inputs(recipe: Recipe, fields: tuple[tuple[str, ...], tuple[str, ...]] | None = None) -> dict[str, Any]:
    """The recipe's fields (all, or those `fields` = (include, exclude) selects) as stage inputs."""
    flat = flatten(recipe.to_dict())
    if fields is not None and recipe.data.is_stream:
        # a stream's sample order depends on its loader workers (kpid_zoo.streams): they decide the result
        fields = (fields[0], tuple(f for f in fields[1] if f != "data.workers"))
    chosen = flat if fields is None else select(flat, *fields)
    return {f"recipe.{k}": v for k, v in chosen.items()}


def parent_inputs(recipe: Recipe) -> dict[str, Any]:
    """The parent's identity: its recipe fields and, for a checkpoint file, that file's sha256."""
    inputs = _recipe_inputs(recipe, (("parent",), ()))
    weights = recipe.parent.weights
    if weights not in ("timm", "none") and not weights.startswith("pypi:"):
        path = recipe.resolve_path(weights)
        if path.is_file():
            inputs["parent.weights_sha256"] = file_sha256(path)
    return inputs


def run_stage(accelerator: Accelerator, stage: Stage, make: Callable[[], T], load: Callable[[], T],
              everywhere: bool = True) -> T:
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
        _hang(f"{stage.name}:written")
        stage.commit()
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        stage.check()  # reads the digest the main process committed
        if not everywhere:
            result = load()
    _hang(f"{stage.name}:done")
    return result


def adapt_parent(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, data: DataBundle | None, work: Path,
                 progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Train the parent on the recipe's data first when `parent.train.epochs` > 0 (CIFAR-scale recipes).

    Returns the parent and what identifies it for the stages downstream.
    """
    identity = parent_inputs(recipe)
    if recipe.parent.train.epochs <= 0:
        return parent, identity
    folder = work / "parent"
    weights = folder / PRUNED_WEIGHTS
    stage = Stage("parent", work, folder, (PRUNED_WEIGHTS,), {**identity, **_recipe_inputs(recipe, PARENT_FIELDS)},
                  scratch=(folder,), log=_logger(accelerator))

    def train() -> None:
        _reseed(recipe, "parent-train")
        # no evaluation here: the eval stage scores the parent on the validation split (once, it is not cheap)
        trained = finetune(parent, None, data.train_loader, None, recipe.parent.train, folder / "train",
                           accelerator=accelerator, resume=True, progress=progress,
                           step_callback=_hang_at_steps("parent"))
        if accelerator.is_main_process:
            save_weights(trained.model, weights)

    run_stage(accelerator, stage, train, lambda: None)
    # the pruning reads the parent from its recorded file whether it was trained in this process or not
    parent.load_state_dict(load_file(str(weights)))
    return parent.eval(), {f"{UPSTREAM}parent": stage.digest}


def distill(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, pruned: PruneResult, data: DataBundle,
            paths: BuildPaths, parent_ref: dict, pruned_ref: dict, progress: bool = True
            ) -> tuple[nn.Module, EvalResult | None, dict[str, Any]]:
    """Fine-tune the pruned net with inner distillation from its parent (resuming from the last checkpoint)."""
    weights = paths.finetune / PRUNED_WEIGHTS
    stage = Stage("finetune", paths.work, paths.finetune, (PRUNED_WEIGHTS,),
                  {**parent_ref, **pruned_ref, **_recipe_inputs(recipe, FINETUNE_FIELDS)},
                  scratch=(paths.finetune,), log=_logger(accelerator))

    def train() -> tuple[nn.Module, EvalResult | None]:
        _reseed(recipe, "finetune")
        kept = {p: pruned.kept_channels(p) for p in distill_points(parent)}
        trained = finetune(pruned.model, parent, data.train_loader, data.val_loader, recipe.finetune,
                           paths.finetune, accelerator=accelerator, kept=kept, input_size=recipe.input_size,
                           resume=True, progress=progress, step_callback=_hang_at_steps("finetune"))
        if accelerator.is_main_process:
            save_weights(trained.model, weights)
        return trained.model, trained.val

    def load() -> tuple[nn.Module, None]:
        pruned.model.load_state_dict(load_file(str(weights)))
        return pruned.model, None

    student, val = run_stage(accelerator, stage, train, load)
    return student, val, {f"{UPSTREAM}finetune": stage.digest}


def load_or_prune(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, data: DataBundle | None,
                  paths: BuildPaths, parent_ref: dict, progress: bool = True) -> tuple[PruneResult, dict[str, Any]]:
    """The pruning result in `paths.pruned` if it is fresh, else prune now (on the main process; Taylor scores on
    the accelerator's device) and write it."""
    folder = paths.pruned
    fields = PRUNE_FIELDS if recipe.importance.method == "taylor" else PRUNE_FIELDS_NO_DATA
    stage = Stage("pruned", paths.work, folder, (PRUNED_WEIGHTS, SPEC_FILE, REPORT_FILE, PRUNED_PLOT),
                  {**parent_ref, **_recipe_inputs(recipe, fields)}, scratch=(folder,), log=_logger(accelerator))

    def prune() -> PruneResult:
        _reseed(recipe, "pruned")
        result = prune_from_recipe(recipe, parent, data.train_loader if data else None,
                                   device=accelerator.device, progress=progress)
        write_prune_outputs(result, folder)
        return result

    result = run_stage(accelerator, stage, prune,
                       lambda: load_prune_outputs(folder, parent, tuple(recipe.input_size)), everywhere=False)
    return result, {f"{UPSTREAM}pruned": stage.digest}


def load_prune_outputs(folder: Path, parent: nn.Module, input_size: tuple[int, int, int]) -> PruneResult:
    """Rebuild a `PruneResult` from what `write_prune_outputs` wrote."""
    spec = ArchSpec.load(folder / SPEC_FILE)
    report = read_json(folder / REPORT_FILE)
    try:
        keep = {g: torch.tensor(idx, dtype=torch.long) for g, idx in report.pop("kept_channels").items()}
        report.pop("flops_error", None)
        report["input_size"] = tuple(report["input_size"])
        report["layer_widths"] = [tuple(row) for row in report["layer_widths"]]
        if report.get("latency") is not None:
            report["latency"] = LatencyOutcome(**report["latency"])
        prune_report = PruneReport(**report)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{folder / REPORT_FILE}: not a pruning report ({type(e).__name__}: {e})") from None
    model = build_pruned(spec, num_classes=parent.num_classes)
    model.load_state_dict(load_file(str(folder / PRUNED_WEIGHTS)))
    model.pretrained_cfg = parent.pretrained_cfg
    return PruneResult(model.eval(), spec, keep, discover_groups(parent, input_size), prune_report)


def eval_stage(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, student: nn.Module, data: DataBundle,
               student_val: EvalResult | None, paths: BuildPaths, upstream: dict, progress: bool = True
               ) -> tuple[dict, dict[str, Any]]:
    """The evaluation stage: `measure`, or the metrics in eval.json while they are fresh."""
    stage = Stage("eval", paths.work, paths.work, (paths.eval.name,),
                  {**upstream, **_recipe_inputs(recipe, EVAL_FIELDS)}, scratch=(paths.eval,), log=_logger(accelerator))
    metrics = run_stage(accelerator, stage,
                        lambda: measure(accelerator, recipe, parent, student, data, student_val, paths, progress),
                        lambda: read_json(paths.eval))
    return metrics, {f"{UPSTREAM}eval": stage.digest}


def measure(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, student: nn.Module, data: DataBundle,
            student_val: EvalResult | None, paths: BuildPaths, progress: bool = True) -> dict:
    """Top-1/top-5 of the pruned net and of its parent on the recipe's validation split (written to eval.json),
    on the accelerator: each process scores its shard and `gather_for_metrics` counts every image once."""
    val_loader = prepare_loader(accelerator, data.val_loader)
    try:
        student_val = student_val or evaluate(student.to(accelerator.device), val_loader, accelerator,
                                              progress=progress, desc="evaluate (pruned)")
        parent_val = evaluate(parent.to(accelerator.device), val_loader, accelerator, progress=progress,
                              desc="evaluate (parent)")
    finally:
        accelerator.free_memory()
    metrics = {"top1": student_val.top1, "top5": student_val.top5, "parent_top1": parent_val.top1,
               "parent_top5": parent_val.top5, "n": student_val.n,
               "dataset": recipe.data.dataset, "split": recipe.data.val_split}
    if data.source:  # CIFAR-10: the JPEG copy (quality 75) scores lower than the official images
        metrics["data_source"] = data.source
    if accelerator.is_main_process:
        write_json(paths.eval, metrics)
    return metrics


def pretrained_cfg(parent: nn.Module, data: DataBundle) -> dict:
    """The parent's timm pretrained cfg with the preprocessing this build trained and evaluated with."""
    cfg = dict(getattr(parent, "pretrained_cfg", {}) or {})
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
        if key in data.data_config:
            cfg[key] = data.data_config[key]
    cfg["num_classes"] = data.num_classes
    return cfg
