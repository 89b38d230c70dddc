"""The exceptions kpid-zoo raises on purpose, at the bottom of the layers (standard library only), so every layer
and every caller can catch them without importing the pipeline (like `huggingface_hub.errors`).

`KpidError` is the base of kpid-zoo's own errors. `UserError` is the user's input being wrong (a recipe, a path, a
loaded file, an argument): the command line prints its one line and exits with status 2, never a traceback.
"""
from __future__ import annotations

__all__ = ['KpidError', 'UserError']


class KpidError(Exception):
    """Base of the errors kpid-zoo raises on purpose."""


class UserError(KpidError):
    """The user's input is wrong: the CLI prints one line, exit 2."""
