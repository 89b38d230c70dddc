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

import functools
import json
import math
import os
import re
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
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from ..core import threads
from ..core.files import first_mismatch, hash_files, read_json, write_json
from ..core.logs import get_logger
from ..core.recipe import FinetuneSpec, RecipeError, TrainSpec
from ..core.seeds import stable_seed
from .accelerator import process_accelerator, stage_autocast, stage_grad_scaler
from .data import first_image_shape, loader_layout, prepare_loader, skip_first_batches
from .distill import DistillationWrapper, InnerDistillLoss, build_distillation, capture_outputs
from .evaluate import EvalResult, evaluate

logger = get_logger(__name__)
CHECKPOINT_RE = re.compile(r'^step_(\d+)$')
LOOP_STATE_FILE = 'kpid_loop_state.pt'  # TrainState + LR schedule, beside what accelerator.save_state writes
CHECKSUMS = 'checksums.json'  # in each checkpoint: {file: sha256} of every file in it
# The most optimizer steps a schedule may hold. The longest published ImageNet schedules are about 10^6 steps; 10^9
# would take years at any rate a CNN trains at, so a schedule past it is a typo (`epochs: 1e12`), not a plan.
MAX_TOTAL_STEPS = 10**9


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


@dataclass(frozen=True)
class Schedule:
    """A training stage's length in optimizer steps, from the batches each process reads per epoch."""

    batches_per_epoch: int  # per process (drop_last: full batches only)
    grad_accum_steps: int
    steps_per_epoch: int  # the last step of an epoch may accumulate fewer batches
    total_steps: int
    warmup_steps: int

    @property
    def epochs(self) -> float:
        """The epochs `total_steps` make (the recipe's `epochs`, rounded to whole steps)."""
        return self.total_steps / self.steps_per_epoch


def plan_schedule(cfg: TrainSpec, batches_per_epoch: int, where: str = '', counted: str = '') -> Schedule:
    """The schedule `cfg` gives over epochs of `batches_per_epoch` batches, or a `RecipeError` for one that cannot
    run as written: no full batch, accumulation past the end of the epoch (every epoch would end in one short
    step), epochs > 0 that round to 0 steps, or more than MAX_TOTAL_STEPS steps. `epochs: 0` is no training
    (0 steps). `where` is the section the error names (`finetune`, `parent.train`), `counted` how the batches were
    counted (for the message)."""

    def name(f: str) -> str:
        return f'{where}.{f}' if where else f

    accum = cfg.grad_accum_steps
    if batches_per_epoch < 1:
        raise RecipeError(
            f'an epoch holds no full batch{counted}: expected a batch size (x processes) no larger '
            f'than the training set',
            'data.batch_size',
        )
    if accum > batches_per_epoch:
        raise RecipeError(
            f'{accum} batches per optimizer step, but an epoch holds {batches_per_epoch}{counted}: '
            f'expected at most {batches_per_epoch}',
            name('grad_accum_steps'),
        )
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total = round(cfg.epochs * steps_per_epoch)
    if cfg.epochs > 0 and total == 0:
        raise RecipeError(
            f'{cfg.epochs:g} epochs of {steps_per_epoch} optimizer steps round to 0 steps{counted}: '
            f'expected 0 (no training) or at least {1 / steps_per_epoch:.3g} (one step)',
            name('epochs'),
        )
    if total > MAX_TOTAL_STEPS:
        raise RecipeError(
            f'{cfg.epochs:g} epochs of {steps_per_epoch} optimizer steps are {total:.3g} steps'
            f'{counted}: expected at most {MAX_TOTAL_STEPS:.0e} steps',
            name('epochs'),
        )
    return Schedule(batches_per_epoch, accum, steps_per_epoch, total, round(cfg.warmup_epochs * steps_per_epoch))


class TrainState:
    """Loop position, checkpointed beside the model (`LOOP_STATE_FILE`)."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of `epoch` already consumed

    def state_dict(self) -> dict:
        return {'step': self.step, 'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step, self.epoch, self.batch_in_epoch = state['step'], state['epoch'], state['batch_in_epoch']


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


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup then cosine to 0, in optimizer steps."""
    return LambdaLR(optimizer, functools.partial(_warmup_cosine, warmup=warmup_steps, total=total_steps))


def _set_epoch(loader, epoch: int) -> None:
    """Sampler order (seed + epoch) and per-sample augmentation seed. Accelerate's `set_epoch` skips the
    dataset when the sampler is sharded (multi-process), so the dataset is set explicitly too."""
    loader.set_epoch(epoch)
    if hasattr(loader.dataset, 'set_epoch'):
        loader.dataset.set_epoch(epoch)


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list:
    """Completed checkpoints `step_N`, oldest first (temp dirs of interrupted saves are ignored)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def _save_checkpoint(
    accelerator: Accelerator,
    checkpoint_dir: Path,
    state: TrainState,
    scheduler: LambdaLR,
    keep: int,
    layout: dict | None = None,
) -> None:
    """save_state into a temp dir, rename to step_N once every process has written its part, keep the last `keep`.

    The loop state is saved by hand rather than with `register_for_checkpointing`: registrations live as long as
    the Accelerator, which outlives this stage (the next stage would save and expect this one's objects too).
    """
    step = state.step
    final, tmp = checkpoint_dir / f'step_{step}', checkpoint_dir / f'.tmp-step_{step}'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        torch.save(
            {'train_state': state.state_dict(), 'scheduler': scheduler.state_dict(), 'loader_layout': layout},
            tmp / LOOP_STATE_FILE,
        )
        # every file's sha256, inside the checkpoint before it is renamed in: a resume verifies before it loads
        write_json(tmp / CHECKSUMS, hash_files(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def checkpoint_interval(checkpoint_every: int, total_steps: int) -> int:
    """Optimizer steps between checkpoints: the recipe's, but at most a tenth of the run, so that a kill loses at
    most a tenth of a stage whatever its length (a 78-step stage with `checkpoint_every: 200` would lose all)."""
    return max(1, min(checkpoint_every, math.ceil(total_steps / 10)))


def latest_intact_checkpoint(checkpoint_dir: str | os.PathLike) -> Path | None:
    """The newest checkpoint whose files all have the sha256 recorded when it was saved; the others are named."""
    for checkpoint in reversed(list_checkpoints(checkpoint_dir)):
        try:
            recorded = read_json(checkpoint / CHECKSUMS)
        except (OSError, ValueError):
            problem = f'no readable {CHECKSUMS}'
        else:
            problem = first_mismatch(checkpoint, recorded) if isinstance(recorded, dict) else f'bad {CHECKSUMS}'
        if problem is None:
            return checkpoint
        logger.info('not resuming from %s (%s): trying an earlier one', checkpoint, problem)
    return None


def _load_checkpoint(
    accelerator: Accelerator, checkpoint: Path, state: TrainState, scheduler: LambdaLR, layout: dict | None = None
) -> None:
    loop = torch.load(checkpoint / LOOP_STATE_FILE, map_location='cpu', weights_only=True)
    saved = loop.get('loader_layout')
    if layout is not None and saved is not None and saved != layout:
        raise ValueError(
            f'{checkpoint}: written with {saved["processes"]} process(es) x {saved["workers"]} loader worker(s), '
            f"this run has {layout['processes']} x {layout['workers']}: a stream's sample order depends on both, "
            f'so it resumes only under the same layout (set data.workers: {saved["workers"]} and launch '
            f'{saved["processes"]} process(es), or start over without resuming)'
        )
    accelerator.load_state(str(checkpoint))
    state.load_state_dict(loop['train_state'])
    scheduler.load_state_dict(loop['scheduler'])


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
        _load_checkpoint(accelerator, intact, state, scheduler, layout)
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
                _save_checkpoint(accelerator, checkpoint_dir, state, scheduler, keep_checkpoints, layout)
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
