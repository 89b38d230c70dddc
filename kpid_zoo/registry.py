"""Stage 10: the kpid-zoo models in timm's registry.

`import kpid_zoo` registers, timm style (register_model + generate_default_cfgs):

* one architecture per zoo entry (`kpid_effnet_b0`, ...), whose pretrained cfg points at `kpid-zoo/<name>` on the
  Hub, so `timm.create_model('kpid_effnet_b0', pretrained=True)` works like any timm model;
* `kpid_pruned`, the generic architecture every export's config.json names: it rebuilds the pruned net from
  `kpid_spec` (an `ArchSpec` dict in config.json `model_args`), so `timm.create_model('hf-hub:ORG/NAME')` and
  `'local-dir:/path'` load anything kpid-zoo exported.

A zoo entry's architecture comes from the packaged `kpid_zoo/zoo/<name>.json` a build writes (spec + sha256 of
the published weights), else from the entry's Hub config.json (cached / offline like any Hub file), else it is a
clear error. Pretrained weights are checked against the recorded sha256 before timm loads them, and against the
architecture tensor by tensor, so corruption or a mismatched spec fails with the entry, file and tensor named.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._hub import hf_split

from .export import CONFIG_FILE, GENERIC_ARCH, WEIGHTS_FILE, file_sha256
from .model_card import PAPER_ID, PAPER_NAME, PAPER_URL

__all__ = ['ZOO_ENTRIES', 'ZooEntry', 'ZOO_DIR', 'HUB_ORG', 'KpidWeightsError', 'load_zoo_record', 'create_kpid']

_logger = logging.getLogger(__name__)

HUB_ORG = 'kpid-zoo'
ZOO_DIR = Path(__file__).parent / 'zoo'  # tests point this elsewhere; looked up at create time, not import time


class KpidWeightsError(RuntimeError):
    """Pretrained weights that do not match what the zoo recorded (hash) or the architecture (shapes)."""


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: its recipe is `recipes/<name>.yaml` (a test keeps the two in agreement)."""
    parent: str
    target_gmacs: float
    crop_pct: float
    input_size: tuple[int, int, int] = (3, 224, 224)
    num_classes: int = 1000

    def hub_id(self, name: str) -> str:
        return f'{HUB_ORG}/{name}'


ZOO_ENTRIES: dict[str, ZooEntry] = {
    'kpid_effnet_b0': ZooEntry(parent='efficientnet_b1', target_gmacs=0.39, crop_pct=0.875),
    'kpid_mobilenetv3': ZooEntry(parent='efficientnet_b0', target_gmacs=0.22, crop_pct=0.875),
    'kpid_mobilenetv3_large': ZooEntry(parent='mobilenetv3_large_100', target_gmacs=0.16, crop_pct=0.875),
    'kpid_resnet50_2g': ZooEntry(parent='resnet50', target_gmacs=2.0, crop_pct=0.95),
    'kpid_resnet50_1g': ZooEntry(parent='resnet50', target_gmacs=1.0, crop_pct=0.95),
}


def _cfg(name: str, entry: ZooEntry) -> dict[str, Any]:
    # head / stem names and interpolation are the parent's: surgery keeps module names, so timm's in_chans and
    # num_classes adaptation find the same tensors
    parent = get_pretrained_cfg(entry.parent)
    return dict(
        hf_hub_id=entry.hub_id(name),
        input_size=entry.input_size, crop_pct=entry.crop_pct, interpolation=parent.interpolation,
        mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        num_classes=entry.num_classes, first_conv=parent.first_conv, classifier=parent.classifier,
        license='apache-2.0', paper_ids=PAPER_ID, paper_name=PAPER_NAME, origin_url=PAPER_URL,
        description=f'{entry.parent} pruned to {entry.target_gmacs} GMACs by KPID',
    )


default_cfgs = generate_default_cfgs({
    **{name: _cfg(name, entry) for name, entry in ZOO_ENTRIES.items()},
    # no weights of its own: exports name it in config.json and bring their pretrained cfg along
    GENERIC_ARCH: dict(license='apache-2.0', paper_ids=PAPER_ID, paper_name=PAPER_NAME, origin_url=PAPER_URL),
})


# ---------------------------------------------------------------------------------------------------------------
# Where an entry's architecture and weight hash come from

def load_zoo_record(name: str) -> dict | None:
    """The packaged record of a built entry (`<ZOO_DIR>/<name>.json`), None when the entry was not built yet."""
    path = Path(ZOO_DIR) / f'{name}.json'
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    for key in ('spec', 'weights_sha256'):
        if key not in record:
            raise ValueError(f'{path}: missing field {key!r} (expected a record written by export.write_zoo_entry)')
    return record


def _hub_config(hf_hub_id: str, cache_dir: str | Path | None) -> tuple[dict, str]:
    """config.json of a Hub repo (honours HF_HUB_OFFLINE and the cache, like every hf_hub_download)."""
    from huggingface_hub import hf_hub_download
    repo_id, revision = hf_split(hf_hub_id)
    path = hf_hub_download(repo_id, CONFIG_FILE, revision=revision, cache_dir=cache_dir)
    return json.loads(Path(path).read_text(encoding='utf-8')), path


def _local_config(folder: str | Path) -> tuple[dict, str]:
    path = Path(folder) / CONFIG_FILE
    return json.loads(path.read_text(encoding='utf-8')), str(path)


def _recorded_sha(config: dict, where: str) -> str:
    sha = (config.get('kpid') or {}).get('weights_sha256')
    if not sha:
        raise KpidWeightsError(f'{where}: no kpid.weights_sha256 recorded, so the weights cannot be checked '
                               f'(was it exported by kpid_zoo.export?)')
    return sha


def _spec_from_hub(variant: str, hf_hub_id: str, cache_dir) -> tuple[dict, str]:
    try:
        config, path = _hub_config(hf_hub_id, cache_dir)
    except Exception as e:  # offline and not cached, repo not published yet, no network...
        raise RuntimeError(
            f"{variant} has no architecture spec yet: no {Path(ZOO_DIR) / (variant + '.json')} and "
            f"config.json of {hf_hub_id} could not be read ({type(e).__name__}: {e}). Build it with "
            f"`kpid-zoo build recipes/{variant}.yaml` (then publish it, or load the build folder with "
            f"timm.create_model('local-dir:<folder>'))") from e
    spec = (config.get('model_args') or {}).get('kpid_spec')
    if spec is None:
        raise RuntimeError(f'{variant}: {path} has no model_args.kpid_spec (not a kpid-zoo export)')
    return spec, _recorded_sha(config, path)


# ---------------------------------------------------------------------------------------------------------------
# Weight checks

def _weights_location(cfg: dict, cache_dir) -> tuple[str, str] | None:
    """(local weights file, where its expected hash is recorded) for the source timm will load, else None."""
    source = cfg.get('source') or ''
    if source == 'local-dir' and cfg.get('file'):
        return str(Path(cfg['file']) / WEIGHTS_FILE), 'local-dir'
    if cfg.get('state_dict') is not None or (source != 'hf-hub' and (cfg.get('file') or cfg.get('url'))):
        return None  # caller-supplied weights: nothing recorded to check them against
    if cfg.get('hf_hub_id'):
        from huggingface_hub import hf_hub_download
        repo_id, revision = hf_split(cfg['hf_hub_id'])
        filename = cfg.get('hf_hub_filename') or WEIGHTS_FILE
        return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir), source or 'registry'
    return None


def _verify_sha256(variant: str, path: str, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise KpidWeightsError(
            f'{variant}: pretrained weights {path} fail the sha256 check: expected {expected}, got {actual}. '
            f'The file is corrupt or not the published one: delete it (for a Hub download, the cached blob) and '
            f'download again.')


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
            raise KpidWeightsError(f'{variant}: {source} lacks tensor {key!r} of the architecture '
                                   f'({len(missing)} missing; weights and spec come from different builds?)')
        if skip(key):
            continue
        want, got = tuple(param.shape), tuple(state_dict[key].shape)
        if key in {c + '.weight' for c in first_convs} and len(want) == 4 and len(got) == 4:
            want, got = (want[0], *want[2:]), (got[0], *got[2:])  # input channels are adapted by timm
        if want != got:
            raise KpidWeightsError(
                f'{variant}: {source} does not fit the architecture: tensor {key!r} has shape '
                f'{tuple(state_dict[key].shape)} but the spec builds {tuple(param.shape)} '
                f'(weights and spec come from different builds?)')
    extra = [k for k in state_dict if k not in own and not skip(k)]
    if extra:
        raise KpidWeightsError(f'{variant}: {source} holds tensor {extra[0]!r}, which the architecture built from '
                               f'the spec does not have (weights and spec come from different builds?)')
    return state_dict


# ---------------------------------------------------------------------------------------------------------------
# Model creation

def _build_net(kpid_spec: dict, **kwargs) -> nn.Module:
    from .surgery import ArchSpec, build_pruned  # surgery pulls in the fx tracer: only when a model is built
    return build_pruned(ArchSpec.from_dict(kpid_spec, source='kpid_spec'), **kwargs)


def create_kpid(variant: str, pretrained: bool = False, kpid_spec: dict | None = None, **kwargs) -> nn.Module:
    """Build `variant` (a zoo entry, or the generic 'kpid_pruned' given `kpid_spec`) with timm's builder."""
    cache_dir = kwargs.get('cache_dir')
    cfg = resolve_pretrained_cfg(
        variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')).to_dict()
    record_sha = None
    if kpid_spec is None:
        if variant not in ZOO_ENTRIES:
            raise ValueError(f"{variant} needs kpid_spec=<ArchSpec.to_dict()>; to load an export use "
                             f"timm.create_model('hf-hub:ORG/NAME') or 'local-dir:/path' (after `import kpid_zoo`)")
        record = load_zoo_record(variant)
        if record is not None:
            kpid_spec, record_sha = record['spec'], record['weights_sha256']
        else:
            kpid_spec, record_sha = _spec_from_hub(variant, cfg.get('hf_hub_id') or ZOO_ENTRIES[variant].hub_id(variant), cache_dir)
    if isinstance(kpid_spec, str):  # a path to a saved ArchSpec json
        kpid_spec = json.loads(Path(kpid_spec).read_text(encoding='utf-8'))

    filter_fn = None
    if pretrained:
        loc = _weights_location(cfg, cache_dir)
        source = 'pretrained weights'
        if loc is not None:
            path, where = loc
            source = path
            if where in ('local-dir', 'hf-hub') or record_sha is None:
                # an export carries its own hash beside the weights; a zoo entry's comes from the packaged record
                config, cfg_path = _local_config(cfg['file']) if where == 'local-dir' \
                    else _hub_config(cfg['hf_hub_id'], cache_dir)
                expected = _recorded_sha(config, cfg_path)
            else:
                expected = record_sha
            _verify_sha256(variant, path, expected)
        filter_fn = partial(_check_shapes, variant=variant, source=source, cfg=cfg)

    return build_model_with_cfg(
        _build_net, variant, pretrained,
        kpid_spec=kpid_spec,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(feature_cls='getter'),
        **kwargs,
    )


@register_model
def kpid_pruned(pretrained: bool = False, **kwargs) -> nn.Module:
    """Any KPID-pruned timm network, rebuilt from `kpid_spec` (what every kpid-zoo config.json names)."""
    return create_kpid(GENERIC_ARCH, pretrained, **kwargs)


@register_model
def kpid_effnet_b0(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B1 pruned to B0's 0.39 GMACs by KPID."""
    return create_kpid('kpid_effnet_b0', pretrained, **kwargs)


@register_model
def kpid_mobilenetv3(pretrained: bool = False, **kwargs) -> nn.Module:
    """EfficientNet-B0 pruned to MobileNetV3-Large's 0.22 GMACs by KPID."""
    return create_kpid('kpid_mobilenetv3', pretrained, **kwargs)


@register_model
def kpid_mobilenetv3_large(pretrained: bool = False, **kwargs) -> nn.Module:
    """MobileNetV3-Large-1.0 pruned to 0.16 GMACs by KPID."""
    return create_kpid('kpid_mobilenetv3_large', pretrained, **kwargs)


@register_model
def kpid_resnet50_2g(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-50 pruned to 2.0 GMACs by KPID."""
    return create_kpid('kpid_resnet50_2g', pretrained, **kwargs)


@register_model
def kpid_resnet50_1g(pretrained: bool = False, **kwargs) -> nn.Module:
    """ResNet-50 pruned to 1.0 GMACs by KPID."""
    return create_kpid('kpid_resnet50_1g', pretrained, **kwargs)
