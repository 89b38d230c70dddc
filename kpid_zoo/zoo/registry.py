"""Stage 10: the kpid-zoo models in timm's registry.

`import kpid_zoo` registers, timm style (register_model + generate_default_cfgs):

* one architecture per zoo name, `kpid_zoo/zoo/<name>.json` (see `zoo.py`), with a pretrained tag per recorded
  weights: `timm.create_model(name)` builds it from the spec in the record, offline, with no network call;
  `pretrained=True` downloads the tag's weights file from its Hub repo (for the KPID authors' released models:
  timm's own repo) and loads it after checks. The zoo names are its recipes' (`kpid_effnet_b0`); the names it
  had before (`zoo.RENAMED`) still build, through timm's deprecation shim, with a warning;
* `kpid_pruned`, the generic architecture every export's config.json names: it rebuilds the pruned net from
  `kpid_spec` (an `ArchSpec` dict in config.json `model_args`), so `timm.create_model('hf-hub:ORG/NAME')` and
  `'local-dir:/path'` load anything kpid-zoo exported. Given no spec it builds `DEFAULT_SPEC`, a small ResNet-18.

A recipe whose build was not recorded yet has no name here: build it (`kpid-zoo build NAME`) and load the export.
Every name builds with timm's head options (num_classes, global_pool, in_chans) the way timm builds its own
models: `surgery.build_pruned` narrows the parent's canonical form, then gives it the caller's head.

Every weights file is checked before timm loads it: against the sha256 the zoo or the export recorded, else
against the hash the Hub reported for it at download (the cache names each blob by it: sha256 for LFS files, the
git blob sha1 otherwise). Then tensor by tensor against the architecture, so corruption or a mismatched spec fails
with the entry, the file and the tensor named (the checks: `_weights`).

An export's config.json is hostile input, loaded or not with its weights: `kpid_spec` is data (a JSON object, never
a path), the model arguments are plain values that cannot name files, and the spec, class count and preprocessing
must be the ones bound to the weights at export (`export.bound_values`); the first field that differs is named in one
line. An export without that binding (kpid-zoo format 1) is refused with pretrained=True, and builds with a warning
without it. Hub downloads fail within seconds, in one line, when the Hub does not answer (`hub.hub_download`).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, get_pretrained_cfg, register_model
from timm.models._builder import resolve_pretrained_cfg
from timm.models._registry import register_model_deprecations

from ..errors import KpidHubError, KpidWeightsError
from ._binding import GENERIC_ARCH
from ._weights import _check_export, _check_shapes, _verified_weights
from .card import PAPER_ID, PAPER_NAME, PAPER_URL
from .records import RENAMED, ZOO_DIR, ZooRecord, load_records, pool_size_for

__all__ = ['DEFAULT_SPEC', 'KpidHubError', 'KpidWeightsError', 'create_kpid', 'zoo_records']

# What `timm.create_model('kpid_pruned')` builds with no kpid_spec: resnet18 with every block's inner width halved
# (a small, fast net to try the generic architecture on; real models name their spec).
DEFAULT_SPEC: dict[str, Any] = dict(
    parent='resnet18',
    input_size=[3, 224, 224],
    widths={f'layer{s}.{b}.conv1': 32 * 2**s // 2 for s in range(1, 5) for b in range(2)},
)


def _paper(**cfg) -> dict:
    return dict(paper_ids=PAPER_ID, paper_name=PAPER_NAME, origin_url=PAPER_URL, **cfg)


def _record_cfg(record: ZooRecord) -> dict[str, Any]:
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in record.pretrained_cfg.items()}
    return _paper(
        hf_hub_id=record.hf_hub_id, hf_hub_filename=record.weights_file, description=record.description, **cfg
    )


def _spec_cfg(spec: dict) -> dict[str, Any]:
    """A pretrained cfg for a bare spec: the parent's stem / head / preprocessing at the spec's input size."""
    parent = get_pretrained_cfg(spec['parent'])
    input_size = tuple(spec.get('input_size', (3, 224, 224)))
    pool = (
        parent.pool_size
        and parent.input_size
        and tuple(pool_size_for(input_size, parent.input_size[-1] // parent.pool_size[-1]))
    )
    cfg = dict(
        input_size=input_size,
        pool_size=pool,
        first_conv=parent.first_conv,
        classifier=parent.classifier,
        crop_pct=parent.crop_pct,
        interpolation=parent.interpolation,
        mean=parent.mean,
        std=parent.std,
    )
    if 'num_classes' in spec.get('parent_kwargs', {}):
        cfg['num_classes'] = spec['parent_kwargs']['num_classes']
    return cfg


def _generic_cfg() -> dict[str, Any]:
    # the default spec's: an export's config.json brings its own pretrained cfg and replaces this
    return _paper(license='apache-2.0', **_spec_cfg(DEFAULT_SPEC))


# read once, at import: what timm registers is what create_kpid builds. zoo_records holds each name's default
# weights (its first tag, what `pretrained=True` loads); other tags of a name are in _tag_records.
_all_records = load_records(ZOO_DIR)  # each name's default first
zoo_records: dict[str, ZooRecord] = {}
_tag_records: dict[tuple[str, str], ZooRecord] = {}
for _record in _all_records:
    if _record.name in zoo_records:
        _tag_records[(_record.name, _record.tag)] = _record
    else:
        zoo_records[_record.name] = _record

default_cfgs = generate_default_cfgs(
    {
        **{f'{r.name}.{r.tag}': _record_cfg(r) for r in _all_records},  # timm: a name's first tag is its default
        GENERIC_ARCH: _generic_cfg(),
    }
)


# ---------------------------------------------------------------------------------------------------------------
# Model creation


def _build_net(kpid_spec: dict, feature_cfg: dict, **kwargs) -> nn.Module:
    from ..engine.surgery import ArchSpec, build_pruned  # surgery pulls in the fx tracer: only when a model is built

    net = build_pruned(ArchSpec.from_dict(kpid_spec, source='kpid_spec'), **kwargs)
    if feature_cfg.get('all_levels'):
        # features_only: the parent's levels, however many (timm's builder assumes five); read once it is built,
        # before the builder wraps it
        feature_cfg.pop('all_levels')
        feature_cfg['out_indices'] = tuple(range(len(net.feature_info)))
    return net


def _spec_dict(kpid_spec: Any, where: str) -> dict:
    """The spec as a checked dict. A spec is data: a str is refused, never opened (from a config.json it could name
    any local file, or a FIFO that blocks); a Python caller with a saved spec passes `ArchSpec.load(path)`."""
    from ..engine.surgery import ArchSpec

    if isinstance(kpid_spec, ArchSpec):
        kpid_spec = kpid_spec.to_dict()
    try:
        return ArchSpec.from_dict(kpid_spec, source=where).to_dict()
    except ValueError as e:
        raise KpidWeightsError(
            f'{e}'
            + (
                '; to build from a saved spec file, pass kpid_spec=ArchSpec.load(path)'
                if isinstance(kpid_spec, str) and where == 'kpid_spec'
                else ''
            )
        ) from None


def _weights_classes(file: Any, classifier: Any) -> int | None:
    """The class count of a caller's safetensors weights: the rows of its classifier, read from the header only."""
    import safetensors

    if not isinstance(file, (str, Path)) or not str(file).endswith('.safetensors') or not Path(file).is_file():
        return None
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    try:
        with safetensors.safe_open(str(file), framework='pt') as f:
            keys = set(f.keys())
            for name in names:
                if f'{name}.weight' in keys:
                    return f.get_slice(f'{name}.weight').get_shape()[0]
    except Exception:  # unreadable: timm's load reports it, with the file named
        return None
    return None


def create_kpid(variant: str, pretrained: bool = False, kpid_spec: Any = None, **kwargs) -> nn.Module:
    """Build `variant` (a zoo entry, or the generic 'kpid_pruned' given `kpid_spec`) with timm's builder.

    `kpid_spec`: an `ArchSpec` or its dict; never a path (`ArchSpec.load(path)` reads a saved one). For an
    hf-hub: / local-dir: export, timm passes config.json's, which is checked with the rest of the file
    (`_check_export`) before anything is built.
    """
    cache_dir = kwargs.get('cache_dir')
    record = export = None
    given_cfg = kwargs.get('pretrained_cfg')
    if variant != GENERIC_ARCH:
        record = zoo_records[variant]
        kpid_spec = record.spec  # every tag of a name has this architecture (zoo.load_records checks it)
    elif isinstance(given_cfg, dict) and given_cfg.get('source') in ('hf-hub', 'local-dir'):
        model_args = kwargs.get('pretrained_model_args')
        export = _check_export(variant, given_cfg, model_args, pretrained, cache_dir)
        if kpid_spec is None:  # a timm that does not pass config.json's model arguments on
            kpid_spec = export[0]['model_args']['kpid_spec']
        from_config = model_args is None or kpid_spec is model_args.get('kpid_spec')
        kpid_spec = _spec_dict(kpid_spec, f'{export[1]}: model_args.kpid_spec' if from_config else 'kpid_spec')
    elif kpid_spec is None:
        kpid_spec = DEFAULT_SPEC
    kpid_spec = _spec_dict(kpid_spec, 'kpid_spec') if export is None else kpid_spec

    if variant == GENERIC_ARCH and kwargs.get('pretrained_cfg') is None:
        # a bare spec (no export config): the spec's own classes and input, the parent's stem and head names
        overlay = kwargs.get('pretrained_cfg_overlay') or {}
        spec_cfg = _spec_cfg(kpid_spec)
        if pretrained and 'num_classes' not in overlay:
            # the caller's weights file: timm keeps its head when asked for as many classes as it has
            classes = _weights_classes(overlay.get('file'), spec_cfg['classifier'])
            if classes is not None:
                spec_cfg['num_classes'] = classes
        kwargs['pretrained_cfg_overlay'] = {**spec_cfg, **overlay}
    parent_kwargs = kpid_spec.get('parent_kwargs') or {}
    for key in ('num_classes', 'in_chans'):
        if key in parent_kwargs:  # timm's builder would otherwise impose the pretrained cfg's
            kwargs.setdefault(key, parent_kwargs[key])
    cfg = resolve_pretrained_cfg(variant, kwargs.get('pretrained_cfg'), kwargs.get('pretrained_cfg_overlay')).to_dict()
    if record is not None and cfg.get('tag') not in (None, record.tag):
        record = _tag_records.get((variant, cfg['tag']), record)  # other weights of the name: their own sha256

    filter_fn = None
    if pretrained:
        path = _verified_weights(variant, cfg, record, cache_dir, export)
        if record is not None and path is not None:
            # timm loads the very file that was checked (its own Hub lookup could pick another revision)
            kwargs['pretrained_cfg_overlay'] = {**(kwargs.get('pretrained_cfg_overlay') or {}), 'file': path}
        filter_fn = partial(_check_shapes, variant=variant, source=path or 'pretrained weights', cfg=cfg)

    feature_cfg = dict(feature_cls='getter')
    if kwargs.get('features_only') and 'out_indices' not in kwargs:
        feature_cfg['all_levels'] = True
    return build_model_with_cfg(
        partial(_build_net, feature_cfg=feature_cfg),
        variant,
        pretrained,
        kpid_spec=kpid_spec,
        pretrained_filter_fn=filter_fn,
        feature_cfg=feature_cfg,
        **kwargs,
    )


@register_model
def kpid_pruned(pretrained: bool = False, **kwargs) -> nn.Module:
    """Any KPID-pruned timm network, rebuilt from `kpid_spec` (what every kpid-zoo config.json names)."""
    return create_kpid(GENERIC_ARCH, pretrained, **kwargs)


def _entrypoint(name: str, doc: str):
    def fn(pretrained: bool = False, **kwargs) -> nn.Module:
        return create_kpid(name, pretrained, **kwargs)

    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = doc
    return fn


# one entrypoint per name, as if written out `def kpid_effnet_b0(pretrained=False, **kwargs)` above
for _name, _record in zoo_records.items():
    globals()[_name] = register_model(_entrypoint(_name, f'{_record.description} ({_record.source_model}).'))

# the names the zoo had before: timm warns and builds the new name with the same weights (its tag)
register_model_deprecations(
    __name__, {old: f'{new}.{zoo_records[new].tag}' for old, new in RENAMED.items() if new in zoo_records}
)
