"""A training stage's length and learning rate in optimizer steps: `plan_schedule` (the one place that turns the
recipe's epochs into steps, and refuses a schedule that cannot run as written) and the warmup-cosine LR schedule."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

from ..core.recipe import RecipeError, TrainSpec

# The most optimizer steps a schedule may hold. The longest published ImageNet schedules are about 10^6 steps; 10^9
# would take years at any rate a CNN trains at, so a schedule past it is a typo (`epochs: 1e12`), not a plan.
MAX_TOTAL_STEPS = 10**9


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


def _warmup_cosine(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """Linear warmup then cosine to 0, in optimizer steps."""
    return LambdaLR(optimizer, functools.partial(_warmup_cosine, warmup=warmup_steps, total=total_steps))
