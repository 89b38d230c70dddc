"""The exceptions kpid-zoo raises on purpose, at the bottom of the layers (standard library only), so every layer
and every caller can catch them without importing the pipeline (like `huggingface_hub.errors`).

`KpidError` is the base of kpid-zoo's own errors. `UserError` is the user's input being wrong (a recipe, a path, a
loaded file, an argument, the network or a Hub repo): the command line prints its one line and exits with status 2,
never a traceback. Any other exception reaching the command line is a bug in kpid-zoo: exit status 1, one line, and
the traceback written to a file (see docs/reliability.md, "Errors").

Every class below keeps the standard bases it had before this module gathered them (`LockedError` is still a
`RuntimeError`, `HubUnreachableError` an `OSError`, ...), so code written against those keeps working; each is also
importable from the module that raises it (`kpid_zoo.core.recipe.RecipeError`, ...).
"""

from __future__ import annotations

__all__ = [
    'KpidError',
    'UserError',
    'RecipeError',
    'RefusedError',
    'LockedError',
    'UnreadableImageError',
    'HubUnreachableError',
    'DataUnavailableError',
    'KpidWeightsError',
    'KpidHubError',
    'PublishError',
    'MissingFileError',
    'MissingDependencyError',
    'UnsupportedModelError',
]


class KpidError(Exception):
    """Base of the errors kpid-zoo raises on purpose."""


class UserError(KpidError, ValueError):
    """The user's input is wrong (a recipe, a path, a file, an argument): the CLI prints one line, exit 2.

    Also a `ValueError`, as every such error was before this hierarchy: callers and tests that catch `ValueError`
    around kpid-zoo's input checks keep working.
    """


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named (a recipe, a checkpoint, a data root, an export) does not exist."""


class MissingDependencyError(UserError, ImportError):
    """An optional package a recipe needs is not installed; the message says what to `pip install`."""


class UnsupportedModelError(UserError):
    """A network cannot be exported to, or run in, a deployment runtime (an op it lacks): the message names the
    network or layer, the runtime and its reason."""


# --- core -----------------------------------------------------------------------------------------------------------


class RecipeError(UserError):
    """A recipe is invalid. The message reads ``<source>: <dotted.field>: <what was expected, what was found>``."""

    def __init__(self, detail: str, field: str = '', source: str = ''):
        self.detail, self.field, self.source = detail, field, source
        super().__init__(': '.join(part for part in (source, field, detail) if part))

    def within(self, section: str = '', source: str = '') -> RecipeError:
        """The same error seen from an enclosing section and/or file."""
        return RecipeError(self.detail, _join(section, self.field), source or self.source)


def _join(outer: str, inner: str) -> str:
    return f'{outer}.{inner}' if outer and inner else outer or inner


class RefusedError(UserError):
    """The command would delete or replace something it did not write: the message names it."""


class LockedError(UserError, RuntimeError):
    """The folder is being built by another live process."""


class UnreadableImageError(UserError):
    """An image (or stream sample) that cannot be decoded; the message names the file and the cause.

    A DataLoader worker re-raises an exception in the main process as `type(e)(text)`, where the text carries the
    worker's whole traceback; this class keeps only its own message from it, so the error stays one line.
    """

    def __init__(self, message: str):
        marker = f'{type(self).__name__}: '
        if message.startswith('Caught ') and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class HubUnreachableError(UserError, OSError):
    """The Hub did not answer and the file is not in the cache."""


# --- training -------------------------------------------------------------------------------------------------------


class DataUnavailableError(UserError, FileNotFoundError):
    """No copy of the data was found and none could be downloaded (the message lists what was tried)."""


# --- zoo ------------------------------------------------------------------------------------------------------------


class KpidWeightsError(UserError, RuntimeError):
    """Pretrained weights that do not match what was recorded or reported (hash) or the architecture (shapes), or an
    export's config.json that is malformed or not the one bound to its weights. A ValueError too: bad input."""


class KpidHubError(UserError, RuntimeError, OSError):
    """Pretrained weights that cannot be had: the Hub unreachable, offline and not cached, no such repo or file."""


class PublishError(UserError, RuntimeError):
    """The folder cannot be published as it is, or the Hub refused it; the message says which and why."""


def one_line(error: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (its whitespace collapsed; its type's name when it has none), cut to
    `limit` characters: how every message that quotes another error shows it."""
    text = ' '.join(str(error).split()) or type(error).__name__
    return text if limit is None or len(text) <= limit else text[: limit - 3] + '...'
