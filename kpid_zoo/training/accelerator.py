"""One Accelerator per process, shared by every stage of a build.

Accelerate keeps process-wide state (`AcceleratorState` is a singleton): a second `Accelerator(...)` with another
`mixed_precision` raises "AcceleratorState has already been initialized". So the process makes one, here, with
mixed precision off, and each stage asks for its own precision with `stage_autocast` (and a `GradScaler` for
fp16): parent adaptation in fp32 and distillation in bf16 run in one process, on one Accelerator.

Under `torchrun` / `accelerate launch` on CPU, Accelerate only sets up the gloo process group when asked for
`cpu=True`; without it every worker would silently train alone, each believing it is the main process. Accelerate's
state is a singleton, so the first `PartialState()` of the process decides: code here asks `process_accelerator()`
for `is_main_process` and `wait_for_everyone`, never a bare `PartialState()`.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager

import torch
from accelerate import Accelerator, DataLoaderConfiguration

PRECISION_DTYPES = {'no': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}

_PROCESS_ACCELERATOR: Accelerator | None = None


def process_accelerator() -> Accelerator:
    """The process's Accelerator, made on first use (seedable samplers; precision is chosen per stage)."""
    global _PROCESS_ACCELERATOR
    if _PROCESS_ACCELERATOR is None:
        multi_process_cpu = int(os.environ.get('WORLD_SIZE', '1')) > 1 and not torch.cuda.is_available()
        _PROCESS_ACCELERATOR = Accelerator(
            cpu=multi_process_cpu,
            mixed_precision='no',
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        )
    return _PROCESS_ACCELERATOR


def stage_autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """Autocast to the stage's precision ('no', 'bf16', 'fp16') on `device` (the accelerator's)."""
    dtype = PRECISION_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def stage_grad_scaler(accelerator: Accelerator, precision: str) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling (its range is too small for gradients); bf16 and fp32 do not."""
    return torch.amp.GradScaler(accelerator.device.type) if precision == 'fp16' else None
