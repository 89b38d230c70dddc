"""The checks a pretrained load passes before timm loads anything (see `registry`).

An hf-hub: / local-dir: export's config.json is read again and checked as hostile input (`_check_export`: its
structure, its spec and model arguments, the binding of spec, classes and preprocessing to the weights). The weights
file is checked against the sha256 the zoo or the export recorded, else against the hash the Hub reported for it at
download (`_verified_weights`), then tensor by tensor against the architecture (`_check_shapes`, timm's filter_fn).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch.nn as nn
from timm.models._hub import hf_split

from ..core.files import read_json
from ..core.hub import hub_download
from ..errors import KpidHubError, KpidWeightsError, one_line
from ._binding import REEXPORT, bound_mismatch, export_config_problem, parse_config, unbound
from .export import CONFIG_FILE, WEIGHTS_FILE, file_sha256
from .records import ZooRecord

logger = logging.getLogger(__name__)

# config.json of an export is a few KiB; a bigger one is not one (and is not read into memory)
_MAX_CONFIG_BYTES = 1 << 24


def _hub_config(hf_hub_id: str, cache_dir: str | Path | None) -> tuple[dict, str]:
    """config.json of a Hub repo (honours HF_HUB_OFFLINE and the cache, like every hf_hub_download)."""
    repo_id, revision = hf_split(hf_hub_id)
    path = hub_download(repo_id, CONFIG_FILE, revision=revision, cache_dir=cache_dir)
    return _read_config(path), path


def _read_config(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():  # a FIFO or a device could block the load, or never end
        raise KpidWeightsError(f'{path}: not a regular file (expected the config.json of a kpid-zoo export)')
    if path.stat().st_size > _MAX_CONFIG_BYTES:
        raise KpidWeightsError(
            f'{path}: {path.stat().st_size} bytes, too big for a config.json (at most {_MAX_CONFIG_BYTES})'
        )
    try:
        return read_json(path)
    except ValueError as e:
        raise KpidWeightsError(str(e)) from None


def _export_config(variant: str, cfg: dict, cache_dir) -> tuple[dict, str] | None:
    """The config.json timm read for an hf-hub: / local-dir: load, read again for its kpid block; else None."""
    source = cfg.get('source')
    if source == 'local-dir' and cfg.get('file'):
        path = Path(cfg['file']) / CONFIG_FILE
        return _read_config(path), str(path)
    if source == 'hf-hub' and cfg.get('hf_hub_id'):
        try:
            return _hub_config(cfg['hf_hub_id'], cache_dir)
        except KpidWeightsError:
            raise
        except Exception as e:  # timm just read it: gone from the cache meanwhile, the Hub down...
            raise KpidHubError(
                f'{variant}: cannot get {CONFIG_FILE} from {cfg["hf_hub_id"]} ({type(e).__name__}: {one_line(e)})'
            ) from e
    return None


def _check_export(variant: str, cfg: dict, model_args: dict | None, pretrained: bool, cache_dir) -> tuple[dict, str]:
    """Check the config.json of an hf-hub: / local-dir: export as the hostile input it is; returns (config, path).

    `cfg` and `model_args` are what timm read from it and builds with (its parsed pretrained cfg, and the model
    arguments it passes on): the binding recorded at export is checked on those.
    """
    from ..engine.surgery import ArchSpec, check_model_kwargs

    config, path = _export_config(variant, cfg, cache_dir)
    problem = export_config_problem(config)
    if problem:
        raise KpidWeightsError(f'{path}: {problem}')
    if model_args is None:  # a timm that does not pass them on: the file's own
        _, model_args = parse_config(config)
    if 'kpid_spec' not in model_args:
        raise KpidWeightsError(f"{path}: missing field 'model_args.kpid_spec' (not a kpid-zoo export?)")
    try:
        check_model_kwargs({k: v for k, v in model_args.items() if k != 'kpid_spec'}, f'{path}: model_args')
        ArchSpec.from_dict(model_args['kpid_spec'], source=f'{path}: model_args.kpid_spec')
    except ValueError as e:
        raise KpidWeightsError(str(e)) from None
    problem = bound_mismatch(config['kpid'], cfg, model_args)
    if problem and unbound(config['kpid']):
        if pretrained:
            raise KpidWeightsError(f'{path}: {problem}, so they are not loaded; {REEXPORT}')
        logger.warning('%s: %s; the architecture is built, its preprocessing unchecked; %s', path, problem, REEXPORT)
    elif problem:
        raise KpidWeightsError(
            f'{path}: {problem} (config.json was edited after export, or belongs to other '
            f'weights); download it again, or {REEXPORT}'
        )
    return config, path


def _recorded_sha(config: dict, where: str) -> str:
    sha = (config.get('kpid') or {}).get('weights_sha256')
    if not sha:
        raise KpidWeightsError(
            f'{where}: no kpid.weights_sha256 recorded, so the weights cannot be checked '
            f'(was it exported by kpid_zoo.zoo.export?)'
        )
    return sha


def _verify_hub_reported(variant: str, path: str) -> None:
    """Check a Hub download against the hash the Hub reported for it, which the cache named its blob after."""
    blob = Path(path).resolve()
    if re.fullmatch(r'[0-9a-f]{64}', blob.name):  # an LFS file: its sha256
        return _verify_sha256(variant, path, blob.name)
    if re.fullmatch(r'[0-9a-f]{40}', blob.name):  # a regular file: its git blob sha1
        data = blob.read_bytes()
        actual = hashlib.sha1(b'blob %d\0' % len(data) + data).hexdigest()
        if actual != blob.name:
            raise KpidWeightsError(
                f'{variant}: pretrained weights {path} fail the check against the git sha1 the '
                f'Hub reported: expected {blob.name}, got {actual}. {_REDOWNLOAD}'
            )
        return None
    raise KpidWeightsError(
        f'{variant}: pretrained weights {path} carry no hash from the Hub (blob {blob.name}) and '
        f'none is recorded, so they cannot be checked'
    )


_REDOWNLOAD = (
    'The file is corrupt or not the published one: delete it (for a Hub download, the cached blob) and download again.'
)


def _verify_sha256(variant: str, path: str, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise KpidWeightsError(
            f'{variant}: pretrained weights {path} fail the sha256 check: expected {expected}, '
            f'got {actual}. {_REDOWNLOAD}'
        )


def _verified_weights(
    variant: str, cfg: dict, record: ZooRecord | None, cache_dir, export: tuple[dict, str] | None = None
) -> str | None:
    """The local weights file timm is about to load, checked; None for caller-supplied weights (nothing to check).

    `export`: the (config, path) `_check_export` checked, for an hf-hub: / local-dir: export: its kpid block
    records the weights' sha256.
    """
    source = cfg.get('source') or ''
    if source == 'local-dir' and cfg.get('file'):
        path = str(Path(cfg['file']) / WEIGHTS_FILE)
        _verify_sha256(variant, path, _recorded_sha(*export))
        return path
    if cfg.get('state_dict') is not None or (source != 'hf-hub' and (cfg.get('file') or cfg.get('url'))):
        return None
    if not cfg.get('hf_hub_id'):
        return None
    repo_id, revision = hf_split(cfg['hf_hub_id'])
    filename = cfg.get('hf_hub_filename') or WEIGHTS_FILE
    try:
        path = hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # the Hub unreachable and not cached, offline and not cached, repo or file missing...
        raise KpidHubError(
            f'{variant}: cannot get pretrained weights {filename} from {cfg["hf_hub_id"]} '
            f'({type(e).__name__}: {one_line(e)})'
        ) from e
    if record is not None and record.weights_sha256:
        _verify_sha256(variant, path, record.weights_sha256)
    elif export is not None:  # an export: its config.json records the hash
        _verify_sha256(variant, path, _recorded_sha(*export))
    else:
        _verify_hub_reported(variant, path)
    return path


def _check_shapes(state_dict: dict, model: nn.Module, *, variant: str, source: str, cfg: dict) -> dict:
    """timm filter_fn: fail on the first tensor that does not fit, instead of a long load_state_dict report.

    Leaves alone what timm adapts right after: the stem's input channels (in_chans) and the classifier when
    num_classes differs from the weights'.
    """
    own = model.state_dict()
    classifiers = cfg.get('classifier') or ()
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    adapting_head = getattr(model, 'num_classes', None) != cfg.get('num_classes')
    first_convs = cfg.get('first_conv') or ()
    first_convs = (first_convs,) if isinstance(first_convs, str) else tuple(first_convs)

    def skip(key: str) -> bool:
        return adapting_head and any(key.startswith(c + '.') for c in classifiers)

    # in the network's order, so "the first mismatching tensor" is the first one a reader meets going through it
    for key, param in own.items():
        if key not in state_dict:
            if skip(key):
                continue
            missing = [k for k in own if k not in state_dict and not skip(k)]
            raise KpidWeightsError(
                f'{variant}: {source} lacks tensor {key!r} of the architecture '
                f'({len(missing)} missing; weights and spec come from different builds?)'
            )
        if skip(key):
            continue
        want, got = tuple(param.shape), tuple(state_dict[key].shape)
        if key in {c + '.weight' for c in first_convs} and len(want) == 4 and len(got) == 4:
            want, got = (want[0], *want[2:]), (got[0], *got[2:])  # input channels are adapted by timm
        if want != got:
            raise KpidWeightsError(
                f'{variant}: {source} does not fit the architecture: tensor {key!r} has shape '
                f'{tuple(state_dict[key].shape)} but the spec builds {tuple(param.shape)} '
                f'(weights and spec come from different builds?)'
            )
    extra = [k for k in state_dict if k not in own and not skip(k)]
    if extra:
        raise KpidWeightsError(
            f'{variant}: {source} holds tensor {extra[0]!r}, which the architecture built from '
            f'the spec does not have (weights and spec come from different builds?)'
        )
    return state_dict
