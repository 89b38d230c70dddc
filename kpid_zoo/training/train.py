"""Training stage: the Accelerate fine-tune loop (inner KD when a teacher is given, plain CE otherwise).

Every call runs on the process's one Accelerator (`kpid_zoo.training.accelerator`), passed in or made on first use; the
stage's precision, gradient accumulation and data seed come from its own `TrainSpec` / `FinetuneSpec`, and
what the call prepared is released at its end, so parent adaptation and distillation follow each other in one
process.

Reproducibility contract (what the resume and multi-process tests check):
  * data order is Accelerate's seedable sampler (seed + epoch); augmentation is seeded per (seed, epoch, sample)
    in `kpid_zoo.training.data`; forward randomness (dropout, drop-path) is reseeded per (seed, epoch, batch, rank);
  * a checkpoint stores model + projections, optimizer (Accelerate's `save_state`), and beside them the LR
    schedule and `TrainState` (optimizer step, epoch, batches consumed in the epoch), so a resumed run skips
    exactly the consumed batches (`accelerator.skip_first_batches`) and neither loses nor repeats a step;
  * N processes at batch b equal one process at batch b accumulating N batches, bit for bit: Accelerate deals
    whole batches round-robin, DDP averages what accumulation sums (tests/test_train.py says why it is exact).
  * a stream source (`kpid_zoo.training.streams`) shards itself: the same number of batches on every process, a resume
    that skips inside the stream, and an order that depends on the process and worker counts, which the
    checkpoint records (a resume under another layout is refused).
BatchNorm note: on CPU, SyncBatchNorm is unavailable, so with N processes BN normalises over the per-process
batch, as it does over each accumulated batch in one process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.tracking import GeneralTracker
from timm.optim import create_optimizer_v2
from tqdm.auto import tqdm

from ..core import threads
from ..core.logs import get_logger
from ..core.recipe import FinetuneSpec, TrainSpec
from ..core.seeds import stable_seed
from ._checkpoints import (
    TrainState,
    checkpoint_interval,
    latest_intact_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from ._schedule import MAX_TOTAL_STEPS, Schedule, plan_schedule, warmup_cosine_schedule
from .accelerator import process_accelerator, stage_autocast, stage_grad_scaler
from .data import first_image_shape, loader_layout, prepare_loader, skip_first_batches
from .distill import DistillationWrapper, InnerDistillLoss, build_distillation, capture_outputs
from .evaluate import EvalResult, evaluate

# The schedule and checkpoint helpers live in `_schedule` and `_checkpoints`; this module is their public home.
__all__ = [
    'finetune',
    'TrainResult',
    'JsonlTracker',
    'Schedule',
    'plan_schedule',
    'MAX_TOTAL_STEPS',
    'warmup_cosine_schedule',
    'TrainState',
    'checkpoint_interval',
    'list_checkpoints',
    'latest_intact_checkpoint',
]

logger = get_logger(__name__)


@dataclass
class TrainResult:
    model: nn.Module = field(repr=False)  # the trained student, unwrapped (projections dropped)
    steps: int  # optimizer steps completed, including those before a resume
    total_steps: int
    resumed_from: int | None  # optimizer step of the checkpoint this run resumed from
    train_loss: float  # mean loss of the steps run by this invocation on the main process (nan if none)
    val: EvalResult | None
    checkpoint_dir: Path
    schedule: Schedule | None = None


class JsonlTracker(GeneralTracker):
    """One JSON line per `log` call in `<out_dir>/metrics.jsonl`, written by the main process of each training
    stage. An Accelerate `GeneralTracker`, so `Accelerator(log_with=[JsonlTracker(path)])` works too; the stages
    do not go through `accelerator.log`, because trackers live as long as the Accelerator, not the stage."""

    name = 'jsonl'
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = Path(path)

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict):
        self.log({'config': values})

    def log(self, values: dict, step: int | None = None, **kwargs):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, 'a') as f:
            f.write(json.dumps({'step': step, 'time': time.time(), **values}, default=float) + '\n')


def _set_epoch(loader, epoch: int) -> None:
    """Sampler order (seed + epoch) and per-sample augmentation seed. Accelerate's `set_epoch` skips the
    dataset when the sampler is sharded (multi-process), so the dataset is set explicitly too."""
    loader.set_epoch(epoch)
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)


def finetune(
    student: nn.Module,
    teacher: nn.Module | None,
    train_loader,
    val_loader,
    cfg: TrainSpec | FinetuneSpec,
    out_dir: str | os.PathLike,
    *,
    accelerator: Accelerator | None = None,
    kept: Mapping[str, torch.Tensor | None] | None = None,
    points: Sequence[str] | None = None,
    input_size: Sequence[int] | None = None,
    resume: bool = True,
    keep_checkpoints: int = 2,
    step_callback: Callable[[int, dict], None] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `student`: KPID inner distillation from `teacher` when cfg is a `FinetuneSpec` with a teacher, plain
    CE otherwise (a `TrainSpec`, e.g. the recipe's `parent.train`, or no teacher).

    train_loader / val_loader: plain (unprepared) DataLoaders with the per-process batch size.
    accelerator: the process's Accelerator (default: `process_accelerator()`); what this call prepares on it is
        released when it returns.
    kept: {distillation point: parent channel indices kept}, e.g. from the pruning result.
    out_dir: checkpoints go to out_dir/checkpoints/step_N, metrics to out_dir/metrics.jsonl. With `resume`, the
        latest complete checkpoint there is loaded and training continues from it.
    step_callback(step, metrics): called on every process after each optimizer step (and its checkpoint).
    The teacher is used in place: set to eval mode, requires_grad_(False) and moved to the accelerator's device.
    """
    accelerator = accelerator or process_accelerator()
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / 'checkpoints'
    accelerator.gradient_accumulation_steps = cfg.grad_accum_steps
    accelerator.dataloader_config.data_seed = cfg.seed  # read when the train loader is prepared below
    gamma = cfg.kd_gamma if isinstance(cfg, FinetuneSpec) else 0.0
    kl_weight = cfg.kd_logits_weight if isinstance(cfg, FinetuneSpec) else 0.0
    use_teacher = teacher is not None and (gamma > 0 or kl_weight > 0)
    if use_teacher:
        if input_size is None:
            input_size = first_image_shape(train_loader.dataset)
        module = (
            build_distillation(student, teacher, kept, points, input_size)
            if gamma > 0
            else DistillationWrapper(student, [], {})
        )
        # The teacher is never prepared: no DDP wrapper, no grads, no optimizer state, just forward passes.
        teacher = teacher.eval().requires_grad_(False).to(accelerator.device)
    else:
        module = DistillationWrapper(student, [], {})
    criterion = InnerDistillLoss(
        gamma if use_teacher else 0.0,
        kl_weight if use_teacher else 0.0,
        cfg.temperature if use_teacher else 1.0,
        cfg.label_smoothing,
    )

    if cfg.channels_last:  # before the optimizer is made: it holds (and checkpoints) tensors of this layout
        module.to(memory_format=torch.channels_last)
        if use_teacher:
            teacher.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(
        module, opt=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
    )
    module, optimizer = accelerator.prepare(module, optimizer)
    train_loader = prepare_loader(accelerator, train_loader)
    if val_loader is not None:
        val_loader = prepare_loader(accelerator, val_loader)
    try:
        return _train_loop(
            accelerator,
            module,
            teacher if use_teacher else None,
            optimizer,
            criterion,
            train_loader,
            val_loader,
            cfg,
            out_dir,
            checkpoint_dir,
            resume,
            keep_checkpoints,
            step_callback,
            progress,
        )
    finally:
        accelerator.free_memory()  # the next stage prepares its own model, optimizer and loaders
        if cfg.channels_last:  # the student and the teacher leave as they came: contiguous (safetensors needs it)
            student.to(memory_format=torch.contiguous_format)
            if use_teacher:
                teacher.to(memory_format=torch.contiguous_format)


def _train_loop(
    accelerator: Accelerator,
    module: nn.Module,
    teacher: nn.Module | None,
    optimizer,
    criterion,
    train_loader,
    val_loader,
    cfg: TrainSpec,
    out_dir: Path,
    checkpoint_dir: Path,
    resume: bool,
    keep_checkpoints: int,
    step_callback,
    progress: bool,
) -> TrainResult:
    batches_per_epoch = len(train_loader)
    schedule = plan_schedule(cfg, batches_per_epoch)  # the build checked the recipe's; this guards direct calls
    steps_per_epoch, total_steps, warmup_steps = schedule.steps_per_epoch, schedule.total_steps, schedule.warmup_steps
    # Not prepared: Accelerate's scheduler wrapper steps num_processes times per step, which would make the
    # schedule depend on the world size. We step it once per optimizer step ourselves.
    scheduler = warmup_cosine_schedule(optimizer.optimizer, warmup_steps, total_steps)
    scaler = stage_grad_scaler(accelerator, cfg.mixed_precision)
    state = TrainState()

    if accelerator.is_main_process and checkpoint_dir.is_dir():
        for stale in checkpoint_dir.glob('.tmp-step_*'):  # a save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    resumed_from = None
    intact = latest_intact_checkpoint(checkpoint_dir) if resume else None
    layout = loader_layout(train_loader)
    if intact is not None:
        load_checkpoint(accelerator, intact, state, scheduler, layout)
        resumed_from = state.step
    tracker = JsonlTracker(out_dir / 'metrics.jsonl') if accelerator.is_main_process else None
    # a stream says what an epoch reads, and how many samples it repeats or drops (kpid_zoo.training.streams)
    stream = train_loader.dataset.describe(train_loader.num_workers) if layout is not None else None
    if stream is not None and progress:
        logger.info('%s', stream)
    if tracker is not None:
        tracker.store_init_configuration(
            {
                'total_steps': total_steps,
                'steps_per_epoch': steps_per_epoch,
                'world_size': accelerator.num_processes,
                'resumed_from': resumed_from,
                'teacher': teacher is not None,
                'mixed_precision': cfg.mixed_precision,
                **({'stream': stream} if stream else {}),
            }
        )

    every = checkpoint_interval(cfg.checkpoint_every, total_steps)
    losses = []
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        disable=not (progress and accelerator.is_local_main_process),
        desc='finetune' if teacher is not None else 'train',
        dynamic_ncols=True,
    )
    module.train()
    while state.step < total_steps:
        _set_epoch(train_loader, state.epoch)
        loader = (
            skip_first_batches(accelerator, train_loader, state.batch_in_epoch)
            if state.batch_in_epoch
            else train_loader
        )
        for images, target in loader:
            threads.tick()
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            torch.manual_seed(stable_seed(cfg.seed, state.epoch, state.batch_in_epoch, accelerator.process_index))
            with accelerator.accumulate(module):
                with stage_autocast(accelerator.device, cfg.mixed_precision):
                    logits, projected = module(images)
                    teacher_logits, teacher_feats = None, None
                    if teacher is not None:
                        with torch.no_grad(), capture_outputs(teacher, list(projected)) as teacher_feats:
                            teacher_logits = teacher(images)
                loss, parts = criterion(logits, projected, target, teacher_logits, teacher_feats)
                skipped = _backward_and_step(accelerator, module, optimizer, scaler, loss, cfg.clip_grad)
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            if not skipped:
                scheduler.step()
            state.step += 1
            if state.batch_in_epoch >= batches_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            # threads: sums are taken in an order that follows the thread count, which the command line's
            # default adapts to the machine's load (kpid_zoo.core.threads): the record of what each step ran on
            metrics = {
                'loss': loss.item(),
                'lr': scheduler.get_last_lr()[0],
                'epoch': state.epoch,
                'threads': torch.get_num_threads(),
                **{k: v.item() for k, v in parts.items()},
            }
            losses.append(metrics['loss'])
            if tracker is not None:
                tracker.log(metrics, step=state.step)
            bar.update(1)
            bar.set_postfix(loss=f'{metrics["loss"]:.3f}', lr=f'{metrics["lr"]:.2e}')
            if state.step % every == 0 or state.step == total_steps:
                save_checkpoint(accelerator, checkpoint_dir, state, scheduler, keep_checkpoints, layout)
            if step_callback is not None:
                step_callback(state.step, metrics)
            if state.step >= total_steps or state.batch_in_epoch == 0:
                break  # done, or epoch finished (also leaves a skip-loader cleanly)
    bar.close()

    trained = accelerator.unwrap_model(module).student
    val = None
    if val_loader is not None:
        val = evaluate(
            trained,
            val_loader,
            accelerator,
            channels_last=cfg.channels_last,
            progress=progress,
            desc='evaluate (fine-tuned)' if teacher is not None else 'evaluate',
        )
    if val is not None and tracker is not None:
        tracker.log({f'val_{k}': v for k, v in val.as_dict().items()}, step=state.step)
    train_loss = sum(losses) / len(losses) if losses else float('nan')
    return TrainResult(trained, state.step, total_steps, resumed_from, train_loss, val, checkpoint_dir, schedule)


def _backward_and_step(
    accelerator: Accelerator, module: nn.Module, optimizer, scaler, loss: torch.Tensor, clip_grad: float | None
) -> bool:
    """Backward, then (on the last batch of an accumulation) clip and step. True when fp16 skipped the step."""
    accelerator.backward(loss if scaler is None else scaler.scale(loss))
    if not accelerator.sync_gradients:
        return False  # the prepared optimizer ignores step()/zero_grad() until the accumulation completes
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        accelerator.clip_grad_norm_(module.parameters(), clip_grad)
    skipped = False
    if scaler is None:
        optimizer.step()
    else:
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        skipped = scaler.get_scale() < scale  # inf/nan gradients: the step was skipped and the scale lowered
    optimizer.zero_grad(set_to_none=True)
    return skipped
