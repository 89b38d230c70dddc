"""Logging for code that every process of a launch runs: the main process speaks, the others stay quiet.

`get_logger(__name__)` is `logging.getLogger(__name__)` behind an adapter that, like Accelerate's
`accelerate.logging.get_logger`, takes `main_process_only=True` by default (pass `main_process_only=False` for a
line every rank should write). Accelerate's own adapter is not used because it prefixes every message with
"[RANK n]", raises before Accelerate's state exists, and asks a bare `PartialState()`, which would fix the
process's state before `training.accelerator.process_accelerator()` does (on CPU that state would not join the
other processes). So the rank comes from Accelerate's state once something made it, else from the launcher's
`RANK` variable (torchrun and `accelerate launch` set it in every worker; a plain run has none and is the main
process).

The package's loggers hang under `kpid_zoo`; the command line gives that logger its handler (`kpid_zoo.cli`), a
library user configures logging as for any other library.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any


def is_main_process() -> bool:
    """Whether this is the launch's main process (rank 0), without creating Accelerate's state."""
    state = sys.modules.get('accelerate.state')
    if state is not None and state.PartialState._shared_state:
        return bool(state.PartialState().is_main_process)
    return os.environ.get('RANK', '0').strip() in ('', '0')


class MainProcessLogger(logging.LoggerAdapter):
    """A logger that writes on the main process only, unless a call passes `main_process_only=False`."""

    def __init__(self, logger: logging.Logger):
        super().__init__(logger, {})

    def log(self, level: int, msg: object, *args: Any, main_process_only: bool = True, **kwargs: Any) -> None:
        if self.isEnabledFor(level) and (not main_process_only or is_main_process()):
            kwargs.setdefault('stacklevel', 2)  # the caller's line, not this method's, in %(lineno)s
            self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> MainProcessLogger:
    """`logging.getLogger(name)`, writing on the main process only by default (see the module's docstring)."""
    return MainProcessLogger(logging.getLogger(name))
