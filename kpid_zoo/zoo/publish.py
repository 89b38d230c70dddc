"""Stage 9b: push an export folder to the Hugging Face Hub (create_repo, then one commit of the export's files).

What is uploaded is exactly the export's own files: config.json and the files its `kpid.files` lists, each a
regular file in the folder itself (no symlink, no subfolder, no hidden name), read once, checked against its
recorded sha256 and size, and uploaded from those very bytes. Anything else in the folder is named and the publish
refused: a glob over the folder (upload_folder's patterns) would follow symlinks and take subfolders and hidden files.

The token comes from the caller, else the usual places (`HF_TOKEN`, `hf auth login`'s token file) through
`huggingface_hub.get_token()`. It is handed to `HfApi` and nowhere else: never logged, printed, or written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
from pathlib import Path

import safetensors
from huggingface_hub import CommitOperationAdd, HfApi, get_token
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.repocard import metadata_load

from .._version import __version__
from ..core.hub import network_errors
from ..core.ownership import describe
from ..errors import PublishError
from .export import CARD_FILE, CONFIG_FILE, EXPORT_FILES, ONNX_FILE, WEIGHTS_FILE, read_export_config

__all__ = ['check_weights_fit', 'publish', 'validate_export', 'export_payload', 'PublishError']

logger = logging.getLogger(__name__)

# pickled checkpoints have no place in a kpid-zoo repo: loading them runs code
_PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.pkl', '.pickle', '.ckpt', '.pth.tar')
_SHA256 = re.compile(r'^[0-9a-f]{64}$')


def _plain_name(name: object) -> bool:
    """A file name of the folder itself: no path, not hidden."""
    return isinstance(name, str) and bool(name) and not name.startswith('.') and '/' not in name and '\\' not in name


def _read_regular(path: Path) -> bytes:
    """The bytes of `path`, which must be a regular file and not a symlink (checked on the opened file)."""
    if not stat.S_ISREG(os.lstat(path).st_mode):  # before the open: a FIFO would block it
        raise PublishError(
            f"{path}: {describe(path)}, not a regular file; publish uploads only the export's own "
            f'files (re-run the export)'
        )
    # O_NOFOLLOW: a symlink swapped in since the check fails the open instead of being followed
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise PublishError(f"{path}: not a regular file; publish uploads only the export's own files")
        return f.read()


def export_payload(folder: str | Path) -> tuple[dict, dict[str, bytes]]:
    """Check that `folder` is a complete, consistent kpid-zoo export holding nothing else; returns its config.json
    and {file name: bytes} of exactly what is to be uploaded.

    Checks: the three files are there, no pickles, a listed model.onnx is the one `kpid.onnx` describes (its
    sha256, exported from these weights, its check passed), config.json is a sound kpid-zoo config whose spec, class
    count and preprocessing are the ones bound to the weights at export (`export.read_export_config`) and that lists the
    export's files (`kpid.files`: name -> sha256, size); the folder holds those and config.json only (each a
    regular file, no symlink, subfolder or hidden file), each with its recorded sha256 and size; the weights are
    safetensors whose sha256 is the one config.json records and whose tensors have the shapes of the architecture
    config.json builds (`check_weights_fit`); the card has YAML metadata.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f'{folder}: not a folder (expected the output of kpid_zoo.zoo.export.export_model)')
    missing = [f for f in EXPORT_FILES if not os.path.lexists(folder / f)]
    if missing:
        raise PublishError(
            f'{folder}: missing {", ".join(missing)} (expected {", ".join(EXPORT_FILES)}; re-run the export)'
        )
    pickles = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(_PICKLE_SUFFIXES))
    if pickles:
        raise PublishError(f'{folder}: holds pickled checkpoint(s) {pickles}; publish safetensors only')
    config_path = folder / CONFIG_FILE
    config_bytes = _read_regular(config_path)
    try:
        config = read_export_config(folder)
    except (ValueError, FileNotFoundError) as e:
        raise PublishError(str(e)) from None
    if json.loads(config_bytes) != config:
        raise PublishError(f'{config_path}: changed while it was read; publish again')
    listed = config['kpid'].get('files')
    if not isinstance(listed, dict) or not listed:
        raise PublishError(
            f"{config_path}: no kpid.files, the list of the export's own files that publish uploads "
            f'(exported by an older kpid-zoo?); re-run the export'
        )
    for name, entry in listed.items():
        if (
            not _plain_name(name)
            or name == CONFIG_FILE
            or not isinstance(entry, dict)
            or not _SHA256.match(str(entry.get('sha256')))
            or not isinstance(entry.get('size'), int)
        ):
            raise PublishError(
                f'{config_path}: kpid.files entry {name!r} is not a plain file name with its sha256 '
                f'and size; re-run the export'
            )
    _check_onnx_record(config, listed, config_path)
    own = set(listed) | {CONFIG_FILE}
    stray = sorted(set(os.listdir(folder)) - own)
    if stray:
        shown = ', '.join(
            f'{n}{"/" if (folder / n).is_dir() and not (folder / n).is_symlink() else ""}' for n in stray[:5]
        ) + (f' and {len(stray) - 5} more' if len(stray) > 5 else '')
        raise PublishError(
            f'{folder}: holds {shown}, which the export did not write ({CONFIG_FILE} kpid.files lists '
            f'its files); publish uploads only those: move the rest away'
        )
    payload = {CONFIG_FILE: config_bytes}
    for name in sorted(listed):
        path = folder / name
        if not os.path.lexists(path):
            raise PublishError(f'{path}: missing, though {CONFIG_FILE} lists it; re-run the export')
        data = _read_regular(path)
        sha = hashlib.sha256(data).hexdigest()
        if sha != listed[name]['sha256'] or len(data) != listed[name]['size']:
            raise PublishError(
                f'{path}: sha256 {sha} ({len(data)} bytes) differs from the {listed[name]["sha256"]} '
                f'({listed[name]["size"]} bytes) recorded in {config_path} (changed after export? '
                f're-run the export)'
            )
        payload[name] = data
    weights = folder / WEIGHTS_FILE
    try:
        with safetensors.safe_open(str(weights), framework='pt') as f:
            if not list(f.keys()):
                raise PublishError(f'{weights}: holds no tensors')
    except PublishError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise PublishError(f'{weights}: not a readable safetensors file ({e})') from None
    recorded = config['kpid']['weights_sha256']
    actual = hashlib.sha256(payload[WEIGHTS_FILE]).hexdigest() if WEIGHTS_FILE in payload else None
    if recorded != actual:
        raise PublishError(
            f'{weights}: sha256 {actual} differs from the {recorded} recorded in '
            f'{config_path} (weights changed after export? re-run the export)'
        )
    check_weights_fit(folder)
    try:
        meta = metadata_load(folder / CARD_FILE)
    except Exception as e:
        raise PublishError(f'{folder / CARD_FILE}: invalid YAML metadata ({e})') from None
    if not meta or meta.get('library_name') != 'timm':
        raise PublishError(f'{folder / CARD_FILE}: metadata must declare library_name: timm (got {meta!r})')
    return config, payload


def _check_onnx_record(config: dict, listed: dict, config_path: Path) -> None:
    """model.onnx is uploaded only as what config.json says it is: the export's, from these weights, checked."""
    onnx = config['kpid'].get('onnx')
    if ONNX_FILE not in listed:
        if isinstance(onnx, dict) and onnx.get('file'):
            raise PublishError(
                f'{config_path}: kpid.onnx names {onnx.get("file")!r}, which kpid.files does not list; '
                f're-run the export (or `kpid-zoo export-onnx`)'
            )
        return
    problem = None
    if not isinstance(onnx, dict) or onnx.get('file') != ONNX_FILE:
        problem = 'kpid.onnx does not describe it'
    elif onnx.get('sha256') != listed[ONNX_FILE].get('sha256'):
        problem = 'kpid.onnx.sha256 differs from its kpid.files entry'
    elif onnx.get('weights_sha256') != config['kpid']['weights_sha256']:
        problem = 'it was exported from other weights (kpid.onnx.weights_sha256 is not kpid.weights_sha256)'
    elif not isinstance(onnx.get('check'), dict) or onnx['check'].get('passed') is not True:
        problem = 'kpid.onnx.check does not record a passed check'
    if problem:
        raise PublishError(f'{config_path}: {ONNX_FILE}: {problem}; re-run `kpid-zoo export-onnx --force`')


def validate_export(folder: str | Path) -> dict:
    """Check `folder` as `export_payload` does; returns its config.json."""
    return export_payload(folder)[0]


def check_weights_fit(folder: str | Path) -> None:
    """Fail unless model.safetensors holds exactly the tensors, in shape, of the net config.json builds.

    The net is built as `timm.create_model('local-dir:<folder>')` builds it (random init, its config checked on
    the way); the weights' shapes come from the safetensors header, no tensor is read.
    """
    import timm

    import kpid_zoo  # noqa: F401  (registers kpid_pruned)

    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    try:
        own = {k: tuple(v.shape) for k, v in timm.create_model(f'local-dir:{folder}').state_dict().items()}
    except ValueError as e:  # the registry's one-line errors (KpidWeightsError is a ValueError)
        raise PublishError(str(e)) from None
    with safetensors.safe_open(str(weights), framework='pt') as f:
        got = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    for key, shape in own.items():  # in the network's order: the first misfit a reader meets
        if key not in got:
            raise PublishError(
                f'{weights}: lacks tensor {key!r} of the net {folder / CONFIG_FILE} builds '
                f'(weights and spec from different builds? re-run the export)'
            )
        if got[key] != shape:
            raise PublishError(
                f'{weights}: tensor {key!r} has shape {got[key]} but the spec in '
                f'{folder / CONFIG_FILE} builds {shape} (widths that do not fit the weights; '
                f're-run the export)'
            )
    extra = [k for k in got if k not in own]
    if extra:
        raise PublishError(
            f'{weights}: holds tensor {extra[0]!r}, which the net {folder / CONFIG_FILE} builds does '
            f'not have (weights and spec from different builds? re-run the export)'
        )


def publish(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload an export folder to `repo_id` (created if needed); returns the repo's URL.

    Args:
        folder: an export folder (see `validate_export`).
        repo_id: 'ORG/NAME' on the Hub.
        private: create the repo private (an existing repo keeps its visibility).
        token: a Hub token with write access; default: `HF_TOKEN` / the stored login.
        revision: a branch to commit to (created from main if missing); default main.
        commit_message: default 'Upload <name> (kpid-zoo <version>)'.
        endpoint: the Hub URL; default `HF_ENDPOINT` / https://huggingface.co.
    """
    folder = Path(folder)
    config, payload = export_payload(folder)
    token = token or get_token()
    if not token:
        raise PublishError('no Hugging Face token: set HF_TOKEN, run `hf auth login`, or pass token=')
    name = config['kpid'].get('name', folder.name)
    commit_message = commit_message or f'Upload {name} (kpid-zoo {__version__})'
    api = HfApi(endpoint=endpoint, token=token, library_name='kpid-zoo', library_version=__version__)
    try:
        repo_url = api.create_repo(repo_id, repo_type='model', private=private, exist_ok=True)
        if revision and revision != 'main':
            api.create_branch(repo_url.repo_id, branch=revision, exist_ok=True)
        # the checked bytes themselves, file by file: nothing is read from the folder again
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in payload.items()]
        commit = api.create_commit(
            repo_id=repo_url.repo_id, operations=operations, revision=revision, commit_message=commit_message
        )
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        hint = ' (check that the token has write access to the namespace)' if status in (401, 403) else ''
        # the message of HfHubHTTPError carries the URL and the server's reason, never the request headers
        raise PublishError(f'publishing {folder} to {repo_id} failed: {e}{hint}') from None
    except network_errors() as e:
        raise PublishError(f'publishing {folder} to {repo_id}: cannot reach {api.endpoint} ({e})') from None
    url = f'{api.endpoint}/{repo_url.repo_id}'
    logger.debug('published %s to %s (commit %s)', folder, url, commit.oid)
    return url
