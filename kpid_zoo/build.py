"""`kpid-zoo build`: one recipe, end to end, resumable.

parent (load, optionally adapt to the data) -> prune (importance + knapsack + surgery) -> fine-tune with inner
distillation -> evaluate -> export a Hub-shaped folder. Every stage leaves its result on disk under the work
folder; a rerun picks up from the last finished stage, and the fine-tune resumes from its last checkpoint.
Under `accelerate launch` the pruning runs on the main process first and the other ranks read its result, so
all ranks train the same architecture.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from safetensors.torch import load_file

from .accelerator import process_accelerator
from .data import DataBundle, create_loaders
from .distill import distill_points
from .evaluate import EvalResult, evaluate
from .export import export_model
from .files import save_weights
from .groups import discover_groups
from .parent import create_parent
from .prune import PruneReport, PruneResult, prune_from_recipe
from .recipe import Recipe, load_recipe
from .report import (
    PRUNED_WEIGHTS,
    REPORT_FILE,
    SPEC_FILE,
    summary_table,
    write_prune_outputs,
)
from .surgery import ArchSpec, build_pruned
from .train import finetune


@dataclass
class BuildPaths:
    work: Path      # stage results: parent/, pruned/, finetune/, eval.json
    export: Path    # the Hub-shaped output folder

    @property
    def parent(self) -> Path:
        return self.work / "parent"

    @property
    def pruned(self) -> Path:
        return self.work / "pruned"

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
    # one per process, shared by every stage: parent adaptation, Taylor importance, distillation, evaluation
    accelerator = process_accelerator()
    if not resume and accelerator.is_main_process:
        shutil.rmtree(paths.work, ignore_errors=True)
    accelerator.wait_for_everyone()

    parent = create_parent(recipe)
    data = create_loaders(recipe.data, model=parent, input_size=recipe.input_size, seed=recipe.finetune.seed)
    parent = adapt_parent(accelerator, recipe, parent, data, paths.parent, progress)
    with accelerator.main_process_first():
        pruned = load_or_prune(accelerator, recipe, parent, data, paths.pruned, progress)
    if accelerator.is_main_process:
        print(summary_table(pruned), flush=True)

    student, student_val = distill(accelerator, recipe, parent, pruned, data, paths, progress)
    metrics = measure(accelerator, recipe, parent, student, data, student_val, paths)
    if accelerator.is_main_process:
        export_model(student, pruned.spec, paths.export, name=recipe.name,
                     pretrained_cfg=pretrained_cfg(parent, data), metrics=metrics, report=pruned.report,
                     recipe=recipe)
    accelerator.wait_for_everyone()
    return BuildResult(recipe, paths.export, pruned, metrics)


def adapt_parent(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, data: DataBundle | None,
                 folder: Path, progress: bool = True) -> nn.Module:
    """Train the parent on the recipe's data first when `parent.train.epochs` > 0 (CIFAR-scale recipes)."""
    if recipe.parent.train.epochs <= 0:
        return parent
    weights = folder / PRUNED_WEIGHTS
    if not weights.exists():
        trained = finetune(parent, None, data.train_loader, data.val_loader, recipe.parent.train, folder / "train",
                           accelerator=accelerator, resume=True, progress=progress)
        if accelerator.is_main_process:
            save_weights(trained.model, weights)
        accelerator.wait_for_everyone()
    parent.load_state_dict(load_file(str(weights)))
    return parent.eval()


def distill(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, pruned: PruneResult, data: DataBundle,
            paths: BuildPaths, progress: bool = True) -> tuple[nn.Module, EvalResult | None]:
    """Fine-tune the pruned net with inner distillation from its parent (resuming from the last checkpoint)."""
    weights = paths.finetune / PRUNED_WEIGHTS
    if weights.exists():
        pruned.model.load_state_dict(load_file(str(weights)))
        return pruned.model, None
    kept = {p: pruned.kept_channels(p) for p in distill_points(parent)}
    trained = finetune(pruned.model, parent, data.train_loader, data.val_loader, recipe.finetune, paths.finetune,
                       accelerator=accelerator, kept=kept, input_size=recipe.input_size, resume=True,
                       progress=progress)
    if accelerator.is_main_process:
        save_weights(trained.model, weights)
    accelerator.wait_for_everyone()
    return trained.model, trained.val


def load_or_prune(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, data: DataBundle | None,
                  folder: Path, progress: bool = True) -> PruneResult:
    """The pruning result in `folder` if there is one, else prune now (Taylor scores on the accelerator's
    device) and write it there."""
    if (folder / SPEC_FILE).exists():
        return load_prune_outputs(folder, parent, tuple(recipe.input_size))
    result = prune_from_recipe(recipe, parent, data.train_loader if data else None, device=accelerator.device,
                               progress=progress)
    write_prune_outputs(result, folder)
    return result


def load_prune_outputs(folder: Path, parent: nn.Module, input_size: tuple[int, int, int]) -> PruneResult:
    """Rebuild a `PruneResult` from what `write_prune_outputs` wrote."""
    spec = ArchSpec.load(folder / SPEC_FILE)
    report = json.loads((folder / REPORT_FILE).read_text())
    keep = {g: torch.tensor(idx, dtype=torch.long) for g, idx in report.pop("kept_channels").items()}
    report.pop("flops_error", None)
    report["input_size"] = tuple(report["input_size"])
    report["layer_widths"] = [tuple(row) for row in report["layer_widths"]]
    model = build_pruned(spec, num_classes=parent.num_classes)
    model.load_state_dict(load_file(str(folder / PRUNED_WEIGHTS)))
    model.pretrained_cfg = parent.pretrained_cfg
    return PruneResult(model.eval(), spec, keep, discover_groups(parent, input_size), PruneReport(**report))


def measure(accelerator: Accelerator, recipe: Recipe, parent: nn.Module, student: nn.Module, data: DataBundle,
            student_val: EvalResult | None, paths: BuildPaths) -> dict:
    """Top-1/top-5 of the pruned net and of its parent on the recipe's validation split (cached in eval.json),
    on the accelerator: each process scores its shard and `gather_for_metrics` counts every image once."""
    if paths.eval.exists():
        return json.loads(paths.eval.read_text())
    val_loader = accelerator.prepare_data_loader(data.val_loader)
    try:
        student_val = student_val or evaluate(student.to(accelerator.device), val_loader, accelerator)
        parent_val = evaluate(parent.to(accelerator.device), val_loader, accelerator)
    finally:
        accelerator.free_memory()
    metrics = {"top1": student_val.top1, "top5": student_val.top5, "parent_top1": parent_val.top1,
               "parent_top5": parent_val.top5, "n": student_val.n,
               "dataset": recipe.data.dataset, "split": recipe.data.val_split}
    if accelerator.is_main_process:
        paths.eval.parent.mkdir(parents=True, exist_ok=True)
        paths.eval.write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def pretrained_cfg(parent: nn.Module, data: DataBundle) -> dict:
    """The parent's timm pretrained cfg with the preprocessing this build trained and evaluated with."""
    cfg = dict(getattr(parent, "pretrained_cfg", {}) or {})
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode"):
        if key in data.data_config:
            cfg[key] = data.data_config[key]
    cfg["num_classes"] = data.num_classes
    return cfg
