"""Training checkpoints: `step_N` folders under a stage's `checkpoints/`, each written by Accelerate's `save_state`
into a temp folder with the loop state (`TrainState`, LR schedule, stream layout) and every file's sha256 beside it,
then renamed into place; a resume loads the newest one whose files still match their sha256."""

from __future__ import annotations

import math
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.optim.lr_scheduler import LambdaLR

from ..core.files import first_mismatch, hash_files, read_json, write_json
from ..core.logs import get_logger

logger = get_logger(__name__)
CHECKPOINT_RE = re.compile(r'^step_(\d+)$')
LOOP_STATE_FILE = 'kpid_loop_state.pt'  # TrainState + LR schedule, beside what accelerator.save_state writes
CHECKSUMS = 'checksums.json'  # in each checkpoint: {file: sha256} of every file in it


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


def list_checkpoints(checkpoint_dir: str | os.PathLike) -> list:
    """Completed checkpoints `step_N`, oldest first (temp dirs of interrupted saves are ignored)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(
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


def load_checkpoint(
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
