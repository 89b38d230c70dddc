"""Hub downloads that fail fast, with one line, when the Hub cannot be reached.

`huggingface_hub.hf_hub_download` of a file that is not cached retries a failed first request with backoff
(5 more tries, 1 to 8 s apart, each with its own timeout): with no network and `HF_HUB_OFFLINE` unset, a pretrained
load sat there 25-50 s (minutes when the connection hangs) before a multi-line error. `hub_download` asks once first,
with a short timeout; when no answer comes back it serves the file from the cache, or says in one line that it
cannot. A Hub that answers (even with an error) gets the ordinary `hf_hub_download`, retries and all.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

__all__ = ['HubUnreachableError', 'PROBE_TIMEOUT', 'hub_download', 'probe_timeout']

_logger = logging.getLogger(__name__)

# Seconds to wait for the Hub's answer to one HEAD request before taking it as unreachable: huggingface.co answers in
# well under a second; `HF_HUB_ETAG_TIMEOUT`, when set, replaces it (a slow link is the user's to declare).
PROBE_TIMEOUT = 3.0


class HubUnreachableError(OSError):
    """The Hub did not answer and the file is not in the cache."""


def probe_timeout() -> float:
    value = os.environ.get('HF_HUB_ETAG_TIMEOUT')
    try:
        return float(value) if value else PROBE_TIMEOUT
    except ValueError:
        return PROBE_TIMEOUT


def hub_download(repo_id: str, filename: str, *, revision: str | None = None,
                 cache_dir: str | Path | None = None) -> str:
    """`hf_hub_download(repo_id, filename)`, except that an unreachable Hub costs one short request, not retries.

    Offline (`HF_HUB_OFFLINE`), the cache only, as hf_hub_download does. Raises HubUnreachableError (an OSError)
    when the Hub does not answer and the file is not cached; the Hub's own errors (a missing repo or file, a bad
    token) come from hf_hub_download as before.
    """
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError

    from .publish import network_errors

    if not constants.HF_HUB_OFFLINE:
        try:
            get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision), timeout=probe_timeout())
        except network_errors() as e:
            reason = ' '.join(str(e).split()) or type(e).__name__
            try:
                path = hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                       local_files_only=True)
            except LocalEntryNotFoundError:
                raise HubUnreachableError(
                    f'cannot reach the Hub at {constants.ENDPOINT} ({reason}) and {repo_id}/{filename} is not in '
                    f'the cache; connect, or set HF_HUB_OFFLINE=1 to use only the cache') from None
            _logger.info('the Hub at %s is unreachable (%s): %s/%s from the cache', constants.ENDPOINT, reason,
                         repo_id, filename)
            return path
        except Exception:  # the Hub answered: hf_hub_download asks again and reports its answer its own way
            pass
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
