"""Training stage: the Accelerate fine-tune loop (inner KD when a teacher is given, plain CE otherwise).

Reproducibility contract (what the resume and multi-process tests check):
  * data order is Accelerate's seedable sampler (seed + epoch); augmentation is seeded per (seed, epoch, sample)
    in `kpid_zoo.data`; forward randomness (dropout, drop-path) is reseeded per (seed, epoch, batch, rank);
  * a checkpoint stores model + projections, optimizer, LR schedule and `TrainState` (optimizer step, epoch,
    batches consumed in the epoch), so a resumed run skips exactly the consumed batches
    (`accelerator.skip_first_batches`) and neither loses nor repeats a step.
BatchNorm note: on CPU, SyncBatchNorm is unavailable, so with N processes BN normalises over the per-process
batch; N-process runs equal 1-process runs exactly only for batch-independent norms (or frozen BN).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.tracking import GeneralTracker
from timm.optim import create_optimizer_v2
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from .distill import DistillationWrapper, InnerDistillLoss, build_distillation, capture_outputs
from .evaluate import EvalResult, evaluate
from .files import first_mismatch, hash_files, read_json, write_json
from .recipe import setting

CHECKPOINT_RE = re.compile(r'^step_(\d+)$')
CHECKSUMS = 'checksums.json'  # in each checkpoint: {file: sha256} of the files accelerate wrote


@dataclass
class TrainResult:
    model: nn.Module = field(repr=False)  # the trained student, unwrapped (projections dropped)
    steps: int  # optimizer steps completed, including those before a resume
    total_steps: int
    resumed_from: Optional[int]  # optimizer step of the checkpoint this run resumed from
    train_loss: float  # mean loss of the steps run by this invocation on the main process (nan if none)
    val: Optional[EvalResult]
    checkpoint_dir: Path


class TrainState:
    """Loop position, checkpointed beside the model via `accelerator.register_for_checkpointing`."""

    def __init__(self):
        self.step = 0  # optimizer steps done
        self.epoch = 0
        self.batch_in_epoch = 0  # batches of `epoch` already consumed

    def state_dict(self) -> dict:
        return {'step': self.step, 'epoch': self.epoch, 'batch_in_epoch': self.batch_in_epoch}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.step, self.epoch, self.batch_in_epoch = state['step'], state['epoch'], state['batch_in_epoch']


class JsonlTracker(GeneralTracker):
    """Minimal Accelerate tracker: one JSON line per `accelerator.log` call in `<out_dir>/metrics.jsonl`."""
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

    def log(self, values: dict, step: Optional[int] = None, **kwargs):
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


def _step_seed(*parts: int) -> int:
    return hash(tuple(parts)) & 0x7FFF_FFFF


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


def _save_checkpoint(accelerator: Accelerator, checkpoint_dir: Path, step: int, keep: int) -> None:
    """save_state into a temp dir, rename to step_N once every process has written its part, keep the last `keep`."""
    final, tmp = checkpoint_dir / f'step_{step}', checkpoint_dir / f'.tmp-step_{step}'
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # every file's sha256, inside the checkpoint before it is renamed in: a resume verifies before it loads
        write_json(tmp / CHECKSUMS, hash_files(tmp))
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        for old in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def latest_intact_checkpoint(checkpoint_dir: str | os.PathLike, log: Callable[[str], None] = print
                             ) -> Optional[Path]:
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
        log(f'not resuming from {checkpoint} ({problem}): trying an earlier one')
    return None


def _default_trackers(out_dir: Path) -> list:
    trackers: list = [JsonlTracker(out_dir / 'metrics.jsonl')]
    try:
        import tensorboard  # noqa: F401  (optional: only used when installed)
        trackers.append('tensorboard')
    except ImportError:
        pass
    return trackers


def finetune(student: nn.Module, teacher: Optional[nn.Module], train_loader, val_loader, cfg: Any,
             out_dir: str | os.PathLike, *, kept: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
             points: Optional[Sequence[str]] = None, input_size: Optional[Sequence[int]] = None,
             resume: bool = True, keep_checkpoints: int = 2, log_with: Any = 'auto',
             step_callback: Optional[Callable[[int, dict], None]] = None, progress: bool = True) -> TrainResult:
    """Fine-tune `student` (KPID inner distillation from `teacher`, or plain CE when teacher is None).

    cfg: the recipe's `finetune` section (epochs, lr, weight_decay, warmup_epochs, optimizer [timm name],
        momentum, grad_accum_steps, mixed_precision, kd_gamma, kd_logits_weight, temperature, label_smoothing,
        checkpoint_every [optimizer steps, at most a tenth of the run], seed).
    train_loader / val_loader: plain (unprepared) DataLoaders with the per-process batch size.
    kept: {distillation point: parent channel indices kept}, e.g. from the pruning result.
    out_dir: checkpoints go to out_dir/checkpoints/step_N, metrics to out_dir/metrics.jsonl. With `resume`, the
        latest complete checkpoint there is loaded and training continues from it.
    step_callback(step, metrics): called on every process after each optimizer step (and its checkpoint).
    The teacher is used in place: set to eval mode, requires_grad_(False) and moved to the accelerator's device.
    """
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / 'checkpoints'
    seed, accum = int(setting(cfg, 'seed', 0)), int(setting(cfg, 'grad_accum_steps', 1))
    # Accelerate only sets up a multi-process CPU (gloo) group when asked for cpu=True; without it every torchrun
    # worker silently trains alone.
    multi_process_cpu = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=multi_process_cpu, mixed_precision=setting(cfg, 'mixed_precision', 'no'), gradient_accumulation_steps=accum,
        log_with=_default_trackers(out_dir) if log_with == 'auto' else log_with, project_dir=str(out_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))

    gamma, kl_weight = float(setting(cfg, 'kd_gamma', 0.0)), float(setting(cfg, 'kd_logits_weight', 0.0))
    use_teacher = teacher is not None and (gamma > 0 or kl_weight > 0)
    if use_teacher:
        if input_size is None:
            input_size = tuple(train_loader.dataset[0][0].shape)
        module = build_distillation(student, teacher, kept, points, input_size) if gamma > 0 else \
            DistillationWrapper(student, [], {})
        # The teacher is never prepared: no DDP wrapper, no grads, no optimizer state, just forward passes.
        teacher = teacher.eval().requires_grad_(False).to(accelerator.device)
    else:
        module = DistillationWrapper(student, [], {})
    criterion = InnerDistillLoss(gamma if use_teacher else 0.0, kl_weight if use_teacher else 0.0,
                                 float(setting(cfg, 'temperature', 1.0)), float(setting(cfg, 'label_smoothing', 0.0)))

    optimizer = create_optimizer_v2(
        module, opt=setting(cfg, 'optimizer', 'sgd'), lr=float(cfg.lr), weight_decay=float(setting(cfg, 'weight_decay', 0.0)),
        momentum=float(setting(cfg, 'momentum', 0.9)))
    module, optimizer, train_loader, val_loader = accelerator.prepare(module, optimizer, train_loader, val_loader)

    batches_per_epoch = len(train_loader)
    if batches_per_epoch == 0:
        raise ValueError('train loader yields no full batch: dataset smaller than batch_size x processes')
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    total_steps = max(1, round(float(cfg.epochs) * steps_per_epoch))
    warmup_steps = round(float(setting(cfg, 'warmup_epochs', 0.0)) * steps_per_epoch)
    # Not prepared: Accelerate's scheduler wrapper steps num_processes times per step, which would make the
    # schedule depend on the world size. We step it once per optimizer step ourselves.
    scheduler = warmup_cosine_schedule(optimizer.optimizer, warmup_steps, total_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, state)

    if accelerator.is_main_process and checkpoint_dir.is_dir():
        for stale in checkpoint_dir.glob('.tmp-step_*'):  # a save that was killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    resumed_from = None
    intact = latest_intact_checkpoint(checkpoint_dir, accelerator.print) if resume else None
    if intact is not None:
        accelerator.load_state(str(intact))
        resumed_from = state.step
    accelerator.init_trackers('kpid_zoo', config={
        'total_steps': total_steps, 'steps_per_epoch': steps_per_epoch, 'world_size': accelerator.num_processes,
        'resumed_from': resumed_from, 'teacher': use_teacher})

    # however long the run, a kill loses at most a tenth of it
    every = min(int(setting(cfg, 'checkpoint_every', 0)) or total_steps, math.ceil(total_steps / 10))
    clip = setting(cfg, 'clip_grad', None)
    losses = []
    bar = tqdm(total=total_steps, initial=state.step, disable=not (progress and accelerator.is_local_main_process),
               desc='finetune', dynamic_ncols=True)
    module.train()
    while state.step < total_steps:
        _set_epoch(train_loader, state.epoch)
        loader = accelerator.skip_first_batches(train_loader, state.batch_in_epoch) if state.batch_in_epoch \
            else train_loader
        for images, target in loader:
            torch.manual_seed(_step_seed(seed, state.epoch, state.batch_in_epoch, accelerator.process_index))
            with accelerator.accumulate(module):
                with accelerator.autocast():
                    logits, projected = module(images)
                    teacher_logits, teacher_feats = None, None
                    if use_teacher:
                        with torch.no_grad(), capture_outputs(teacher, list(projected)) as teacher_feats:
                            teacher_logits = teacher(images)
                loss, parts = criterion(logits, projected, target, teacher_logits, teacher_feats)
                accelerator.backward(loss)
                if clip and accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(module.parameters(), float(clip))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            if not accelerator.optimizer_step_was_skipped:
                scheduler.step()
            state.step += 1
            if state.batch_in_epoch >= batches_per_epoch:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            metrics = {'loss': loss.item(), 'lr': scheduler.get_last_lr()[0], 'epoch': state.epoch,
                       **{k: v.item() for k, v in parts.items()}}
            losses.append(metrics['loss'])
            accelerator.log(metrics, step=state.step)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.2e}")
            if (every and state.step % every == 0) or state.step == total_steps:
                _save_checkpoint(accelerator, checkpoint_dir, state.step, keep_checkpoints)
            if step_callback is not None:
                step_callback(state.step, metrics)
            if state.step >= total_steps or state.batch_in_epoch == 0:
                break  # done, or epoch finished (also leaves a skip-loader cleanly)
    bar.close()

    trained = accelerator.unwrap_model(module).student
    val = evaluate(trained, val_loader, accelerator) if val_loader is not None else None
    if val is not None:
        accelerator.log({f'val_{k}': v for k, v in val.as_dict().items()}, step=state.step)
    accelerator.end_training()
    train_loss = sum(losses) / len(losses) if losses else float('nan')
    return TrainResult(trained, state.step, total_steps, resumed_from, train_loss, val, checkpoint_dir)
