"""Hub downloads that fail fast, with one line, when the Hub cannot be reached.

`huggingface_hub.hf_hub_download` of a file that is not cached retries a failed first request with backoff
(5 more tries, 1 to 8 s apart, each with its own timeout): with no network and `HF_HUB_OFFLINE` unset, a pretrained
load sat there 25-50 s (minutes when the connection hangs) before a multi-line error. `hub_download` asks once first,
with a short timeout; when no answer comes back it serves the file from the cache, or says in one line that it
cannot. A Hub that answers (even with an error) gets the ordinary `hf_hub_download`, retries and all.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from ..errors import HubUnreachableError, one_line

__all__ = [
    'HubUnreachableError',
    'PROBE_TIMEOUT',
    'hub_download',
    'network_errors',
    'probe_timeout',
    'require_hub_or_cache',
    'unreachable',
]

logger = logging.getLogger(__name__)

# Seconds to wait for the Hub's answer to one HEAD request before taking it as unreachable: huggingface.co answers in
# well under a second; `HF_HUB_ETAG_TIMEOUT`, when set, replaces it (a slow link is the user's to declare).
PROBE_TIMEOUT = 3.0


def probe_timeout() -> float:
    value = os.environ.get('HF_HUB_ETAG_TIMEOUT')
    try:
        return float(value) if value else PROBE_TIMEOUT
    except ValueError:
        return PROBE_TIMEOUT


def network_errors() -> tuple[type[BaseException], ...]:
    """What the HTTP clients under huggingface_hub raise when the Hub cannot be reached (not all are OSErrors)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (
        ('httpx2', ('TransportError',)),
        ('httpx', ('TransportError',)),
        ('requests', ('ConnectionError', 'Timeout')),
    ):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        errors += [getattr(mod, n) for n in names if isinstance(getattr(mod, n, None), type)]
    return tuple(errors)


def unreachable(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """None when the Hub answers a HEAD of the file's URL (any answer, even 401 or 404); else why it does not.

    A bare request on huggingface_hub's own HTTP client (its proxies and certificates), with no token and none of
    the headers huggingface_hub builds: building them the first time in a process asks the Hub for its list of agent
    harnesses, up to 3 s more when it does not answer.
    """
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import get_session

    try:
        get_session().head(
            hf_hub_url(repo_id, filename, revision=revision), timeout=probe_timeout(), follow_redirects=False
        )
    except network_errors() as e:
        return one_line(e)
    return None


def require_hub_or_cache(
    repo_id: str,
    filenames: tuple[str, ...] | list[str],
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> None:
    """Before a download someone else makes (timm's): fail in seconds, not after retries, when the Hub does not
    answer and none of `filenames` is cached. Offline (`HF_HUB_OFFLINE`) it does nothing: the cache is all there is.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or not filenames:
        return
    reason = unreachable(repo_id, filenames[0], revision)
    if reason is None:
        return
    for name in filenames:
        if isinstance(try_to_load_from_cache(repo_id, name, cache_dir=cache_dir, revision=revision), str):
            return  # hf_hub_download falls back to it after one failed request, no retries
    raise HubUnreachableError(
        f'cannot reach the Hub at {constants.ENDPOINT} ({reason}) and {repo_id}/{filenames[0]} is not in the cache; '
        f'connect, or set HF_HUB_OFFLINE=1 to use only the cache'
    )


def hub_download(
    repo_id: str, filename: str, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> str:
    """`hf_hub_download(repo_id, filename)`, except that an unreachable Hub costs one short request, not retries.

    Offline (`HF_HUB_OFFLINE`), the cache only, as hf_hub_download does. Raises HubUnreachableError (an OSError)
    when the Hub does not answer and the file is not cached; the Hub's own errors (a missing repo or file, a bad
    token) come from hf_hub_download as before.
    """
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        reason = unreachable(repo_id, filename, revision)
        if reason is not None:
            path = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
            if not isinstance(path, str):
                raise HubUnreachableError(
                    f'cannot reach the Hub at {constants.ENDPOINT} ({reason}) and {repo_id}/{filename} is not in '
                    f'the cache; connect, or set HF_HUB_OFFLINE=1 to use only the cache'
                )
            logger.info(
                'the Hub at %s is unreachable (%s): %s/%s from the cache', constants.ENDPOINT, reason, repo_id, filename
            )
            return path
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
