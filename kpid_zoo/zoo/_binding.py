"""The binding of an export's config.json to its weights: the spec, class count and preprocessing a load depends
on, each recorded at export as the sha256 of its value (`kpid.bound`), and all of them with the weights' sha256
(`kpid.bound_sha256`); the structure a kpid-zoo config.json must have (`export_config_problem`). Read by the export
(which writes the binding), the registry (which checks it on every load) and publish.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from timm.models._hub import _parse_model_cfg

from ..core.files import WEIGHTS_FILE, json_sha256

__all__ = [
    'bound_values',
    'bound_digests',
    'bound_mismatch',
    'export_config_problem',
    'parse_config',
    'unbound',
    'GENERIC_ARCH',
    'KPID_FORMAT_VERSION',
    'BOUND_CFG_KEYS',
    'REEXPORT',
]

GENERIC_ARCH = 'kpid_pruned'  # the registered timm architecture that rebuilds any export from model_args.kpid_spec
# 2: kpid.bound / kpid.bound_sha256 bind the spec, class count and preprocessing to the weights (1 had none)
KPID_FORMAT_VERSION = 2
REEXPORT = (
    're-export it with this kpid-zoo (`kpid-zoo build <recipe>` rewrites the export from its saved stages, '
    'or kpid_zoo.zoo.export.export_model)'
)

# The pretrained_cfg fields a load depends on: what the weights were trained to see (input size, resampling, crop,
# mean, std), how many outputs they have and what they mean (num_classes, label_names, label_offset), and where timm
# adapts them (first_conv, classifier). Licence, description and paper are metadata, not bound.
BOUND_CFG_KEYS = (
    'num_classes',
    'label_names',
    'label_offset',
    'input_size',
    'fixed_input_size',
    'interpolation',
    'crop_pct',
    'crop_mode',
    'mean',
    'std',
    'pool_size',
    'first_conv',
    'classifier',
    'test_input_size',
    'test_crop_pct',
)
_SHA256_RE = re.compile(r'[0-9a-f]{64}')


def parse_config(config: Mapping[str, Any]) -> tuple[dict, dict]:
    """(pretrained_cfg, model_args) of a config.json as timm's hf-hub: / local-dir: loaders read it.

    timm folds the top-level num_classes / label_names into the pretrained cfg and model_args.in_chans into its
    input_size: the binding covers what a load uses, so it is computed on the same reading.
    """
    pretrained_cfg, _, model_args = _parse_model_cfg(copy.deepcopy(dict(config)), {})
    return pretrained_cfg, dict(model_args or {})


def bound_values(pretrained_cfg: Mapping[str, Any], model_args: Mapping[str, Any]) -> dict[str, Any]:
    """The config.json fields an export binds to its weights, by name, as a load reads them (`parse_config`).

    * `model_args.<key>` for every model argument (what timm builds the net with: num_classes, in_chans,
      global_pool, ...), the spec split into `model_args.kpid_spec.<field>` (parent, widths, input_size,
      parent_kwargs, version), so a mismatch names the part of the spec;
    * `pretrained_cfg.<key>` for each of BOUND_CFG_KEYS (None when absent): class count and labels, preprocessing
      (input_size, interpolation, crop_pct, crop_mode, mean, std, test-time size and crop), pool size, first conv
      and classifier.
    `kpid.bound` records the sha256 of each value's canonical JSON (sorted keys, no spaces; lists and tuples alike),
    and `kpid.bound_sha256` the sha256 of {"bound": kpid.bound, "weights_sha256": kpid.weights_sha256}: the fields
    and the weights file, bound together.
    """
    values: dict[str, Any] = {}
    for key, value in model_args.items():
        if key == 'kpid_spec' and isinstance(value, Mapping):
            values.update({f'model_args.kpid_spec.{k}': v for k, v in value.items()})
        else:
            values[f'model_args.{key}'] = value
    values.update({f'pretrained_cfg.{k}': pretrained_cfg.get(k) for k in BOUND_CFG_KEYS})
    return values


def bound_digests(
    pretrained_cfg: Mapping[str, Any], model_args: Mapping[str, Any], weights_sha256: str
) -> tuple[dict[str, str], str]:
    """(kpid.bound, kpid.bound_sha256) for these fields and weights: see `bound_values`."""
    bound = {name: json_sha256(value) for name, value in bound_values(pretrained_cfg, model_args).items()}
    return bound, json_sha256({'bound': bound, 'weights_sha256': weights_sha256})


def unbound(kpid: Any) -> bool:
    """An export of kpid-zoo format 1, which bound nothing to its weights but their sha256."""
    return isinstance(kpid, Mapping) and 'bound' not in kpid and 'bound_sha256' not in kpid


def bound_mismatch(kpid: Any, pretrained_cfg: Mapping[str, Any], model_args: Mapping[str, Any]) -> str | None:
    """None when config.json's fields are the ones bound to its weights at export, else a phrase naming the first
    field that differs (in the order recorded), or the part of the kpid block that is missing or malformed.

    Checks that config.json is consistent with itself: an edit, a config from another export, a spec that does not
    belong to the weights. It is not a signature (whoever can rewrite every field can rewrite the digests too): for
    that, load a pinned revision (`hf-hub:ORG/NAME@<commit>`) of a repo you trust.
    """
    if not isinstance(kpid, Mapping):
        return 'the kpid block is missing'
    if unbound(kpid):
        return (
            f'kpid.bound is missing: exported by an older kpid-zoo (format {kpid.get("format_version")!r}), '
            f'its spec and preprocessing are not bound to its weights'
        )
    recorded, total, weights_sha = kpid.get('bound'), kpid.get('bound_sha256'), kpid.get('weights_sha256')
    if not isinstance(recorded, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) and _SHA256_RE.fullmatch(v) for k, v in recorded.items()
    ):
        return 'kpid.bound is not a table of field names to sha256 digests'
    for name, value in (('kpid.bound_sha256', total), ('kpid.weights_sha256', weights_sha)):
        if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
            return f'{name} is not a sha256 digest'
    actual, _ = bound_digests(pretrained_cfg, model_args, weights_sha)
    for name in [*recorded, *(n for n in actual if n not in recorded)]:
        # a name comes from the file: shown only if it looks like one
        shown = name if re.fullmatch(r'[\w.]{1,100}', name) else f'{name[:40]!r}...'
        if name not in actual:
            return f'{shown} is missing (it was there at export)'
        if name not in recorded:
            return f'{shown} was not there at export'
        if actual[name] != recorded[name]:
            return f'{shown} differs from the value bound to the weights at export'
    if json_sha256({'bound': dict(recorded), 'weights_sha256': weights_sha}) != total:
        return 'kpid.bound_sha256 does not match kpid.bound and kpid.weights_sha256'
    return None


def export_config_problem(config: Any) -> str | None:
    """None when config.json has the shape of a kpid-zoo export, else a phrase naming the field that has not.

    The structure only: what the spec says is ArchSpec.from_dict's to check, what is bound `bound_mismatch`'s.
    """
    if not isinstance(config, dict):
        return 'not a JSON object'
    for dotted in ('architecture', 'pretrained_cfg', 'model_args.kpid_spec', 'kpid.weights_sha256'):
        node: Any = config
        for part in dotted.split('.'):
            if not isinstance(node, dict) or part not in node:
                return f'missing field {dotted!r} (not a kpid-zoo export?)'
            node = node[part]
    if config['architecture'] != GENERIC_ARCH:
        return f'architecture must be {GENERIC_ARCH!r}'
    if not isinstance(config['pretrained_cfg'], dict):
        return 'pretrained_cfg must be a JSON object'
    # where timm would look for the weights and how it would read them: the export's safetensors, natively
    if config['pretrained_cfg'].get('hf_hub_filename', WEIGHTS_FILE) != WEIGHTS_FILE:
        return f'pretrained_cfg.hf_hub_filename must be {WEIGHTS_FILE!r} or absent'
    if config['pretrained_cfg'].get('custom_load'):
        return 'pretrained_cfg.custom_load must be false'
    kpid = config['kpid']
    version = kpid.get('format_version', 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return 'kpid.format_version must be a positive integer'
    if version > KPID_FORMAT_VERSION:
        return (
            f'kpid.format_version {version} is newer than this kpid-zoo understands ({KPID_FORMAT_VERSION}); '
            f'upgrade kpid-zoo'
        )
    if kpid.get('weights_file', WEIGHTS_FILE) != WEIGHTS_FILE:  # a name, never a path to follow
        return f'kpid.weights_file must be {WEIGHTS_FILE!r}'
    if not isinstance(kpid['weights_sha256'], str) or not _SHA256_RE.fullmatch(kpid['weights_sha256']):
        return 'kpid.weights_sha256 is not a sha256 digest'
    return None
