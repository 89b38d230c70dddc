"""Stage 9a: write a pruned model as a folder laid out like a Hub repo, atomically.

    <out_dir>/model.safetensors   the state dict (safetensors: no pickles)
    <out_dir>/config.json         timm's config (architecture 'kpid_pruned' + model_args.kpid_spec rebuild the net)
    <out_dir>/README.md           the model card
    <out_dir>/layer_widths.png    per-layer widths, parent vs pruned (linked from the card)

config.json is written by timm's own `save_config_for_hf`, so `timm.create_model('hf-hub:ORG/NAME')` and
`'local-dir:/path'` read it like any timm export; kpid-zoo adds a top-level "kpid" block (ignored by timm) that
records the weights' sha256, the spec, the metrics and the recipe hash. Registry loads check the weights against it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch.nn as nn
from timm.models import PretrainedCfg, get_pretrained_cfg
from timm.models._hub import save_config_for_hf

from . import __version__
from .files import atomic_write_text, file_sha256, save_weights, staged_dir
from .model_card import PAPER_ID, PAPER_NAME, PAPER_URL, WIDTHS_PLOT, build_card
from .zoo import CFG_KEYS, ZOO_DIR, ZooRecord, pool_size_for, record_for_zoo

__all__ = [
    'export_model', 'file_sha256', 'read_export_config', 'zoo_entry_from_export', 'write_zoo_entry',
    'EXPORT_FILES', 'WEIGHTS_FILE', 'CONFIG_FILE', 'CARD_FILE', 'GENERIC_ARCH', 'KPID_FORMAT_VERSION',
]

_logger = logging.getLogger(__name__)

WEIGHTS_FILE = 'model.safetensors'
CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
GENERIC_ARCH = 'kpid_pruned'  # the registered timm architecture that rebuilds any export from model_args.kpid_spec
KPID_FORMAT_VERSION = 1

# Preprocessing keys a caller may set; everything else in the exported pretrained_cfg is derived.
_DATA_KEYS = ('input_size', 'crop_pct', 'crop_mode', 'mean', 'std', 'interpolation')
_META_KEYS = ('license', 'label_names', 'label_descriptions')
# The rest of a timm pretrained cfg describes the parent's checkpoint (its source, paper, test-time size) or is
# derived from the model by timm: a parent's full cfg is accepted, those keys are not carried over.
_PRETRAINED_CFG_FIELDS = frozenset(f.name for f in dataclasses.fields(PretrainedCfg))


def _as_dict(obj: Any, what: str) -> dict:
    if obj is None:
        return {}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, Mapping):
        return dict(obj)
    raise TypeError(f'export: {what} must be a mapping or a dataclass, got {type(obj).__name__}')


def _check_report(report: Any) -> None:
    needed = ('parent_gmacs', 'target_gmacs', 'achieved_gmacs', 'parent_params', 'params', 'layer_widths')
    missing = [k for k in needed if not hasattr(report, k)]
    if missing:
        raise TypeError(f'export: report must be a prune.PruneReport; {type(report).__name__} lacks {missing}')


def _parent_hub_id(parent: str, tag: str | None) -> str | None:
    """The Hub repo of the parent's pretrained weights, for the card's base_model (None when it has none)."""
    try:
        cfg = get_pretrained_cfg(f'{parent}.{tag}' if tag else parent)
    except RuntimeError:  # unknown tag: the recipe check reports it, the card just leaves base_model out
        return None
    hub_id = getattr(cfg, 'hf_hub_id', None)
    return hub_id.split('@')[0] if hub_id else None


def export_model(
        model: nn.Module,
        spec: Any,
        out_dir: str | Path,
        *,
        name: str,
        pretrained_cfg: Mapping[str, Any],
        metrics: Mapping[str, Any] | Any,
        report: Any,
        recipe: Any,
        repo_id: str | None = None,
        card_copy_dir: str | Path | None = None,
) -> Path:
    """Write `model` (a pruned timm network built from `spec`) into `out_dir` as a Hub repo, atomically.

    Args:
        model: the pruned, fine-tuned timm model (its `pretrained_cfg` is the parent's; it is not modified).
        spec: its `surgery.ArchSpec`; recorded in config.json `model_args.kpid_spec`.
        out_dir: the folder to (re)place; written beside it into a temp dir and renamed in when complete.
        name: the recipe's name (the zoo name the build is recorded under, if it is recorded), e.g. 'kpid_effnet_b0'.
        pretrained_cfg: preprocessing and metadata (input_size, crop_pct, mean, std, interpolation, license, ...).
        metrics: `evaluate.EvalResult` or a mapping with top1/top5 in percent (optional parent_top1/parent_top5).
        report: the `prune.PruneReport` (GMACs, params, layer_widths).
        recipe: the `recipe.Recipe` it was built from (embedded in the card, with its sha256).
        repo_id: the Hub repo it is meant for (default: recipe.hub.repo_id).
        card_copy_dir: also write the card to `<card_copy_dir>/<name>.md` (the committed cards of zoo entries).
    Returns:
        out_dir as a Path.
    """
    out_dir = Path(out_dir)
    if not name or any(c in name for c in '/\\'):
        raise ValueError(f'export: name must be a plain model name, got {name!r}')
    if not hasattr(model, 'pretrained_cfg'):
        raise TypeError('export: model must be a timm model (it has no pretrained_cfg); '
                        'pass the pruned network from prune/surgery')
    _check_report(report)
    metrics = _as_dict(metrics, 'metrics')
    if metrics.get('top1') is None:
        raise ValueError('export: metrics has no top1 (expected evaluate.EvalResult or {"top1": ..., "top5": ...})')
    cfg_in = dict(pretrained_cfg)
    unknown = set(cfg_in) - _PRETRAINED_CFG_FIELDS
    if unknown:
        raise ValueError(f'export: pretrained_cfg has unknown key(s) {sorted(unknown)}; '
                         f'expected timm PretrainedCfg fields, e.g. {list(_DATA_KEYS + _META_KEYS)}')
    if cfg_in.get('num_classes') is not None and cfg_in['num_classes'] != getattr(model, 'num_classes', None):
        raise ValueError(f"export: pretrained_cfg.num_classes {cfg_in['num_classes']} does not match the model's "
                         f"{getattr(model, 'num_classes', None)}")
    if 'input_size' in cfg_in and tuple(cfg_in['input_size'])[0] != getattr(model, 'in_chans', 3):
        raise ValueError(f"export: pretrained_cfg.input_size {tuple(cfg_in['input_size'])} does not match the "
                         f"model's {getattr(model, 'in_chans', 3)} input channels")
    recipe_dict = recipe.to_dict()
    recipe_sha = recipe.sha256()
    repo_id = repo_id or recipe.hub.repo_id
    license = cfg_in.get('license') or recipe.hub.license
    spec_dict = spec.to_dict()

    with staged_dir(out_dir) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_weights(model, weights)
        weights_sha = file_sha256(weights)

        data_config = {k: cfg_in[k] for k in _DATA_KEYS if cfg_in.get(k) is not None}
        cfg_override = {k: cfg_in[k] for k in _META_KEYS if cfg_in.get(k) is not None}
        cfg_override.update(
            architecture=GENERIC_ARCH, tag=None, license=license, paper_ids=PAPER_ID, paper_name=PAPER_NAME,
            origin_url=PAPER_URL, description=f'{spec.parent} pruned by KPID, a kpid-zoo build of recipe {name}',
        )
        kpid_block = {
            'format_version': KPID_FORMAT_VERSION,
            'kpid_zoo_version': __version__,
            'name': name,
            'repo_id': repo_id,
            'parent': spec.parent,
            'weights_file': WEIGHTS_FILE,
            'weights_sha256': weights_sha,
            'gmacs': report.achieved_gmacs,
            'parent_gmacs': report.parent_gmacs,
            'target_gmacs': report.target_gmacs,
            'params': report.params,
            'parent_params': report.parent_params,
            'metrics': {k: v for k, v in metrics.items() if isinstance(v, (int, float, str)) or v is None},
            'dataset': recipe.data.dataset,
            'recipe_sha256': recipe_sha,
        }
        save_config_for_hf(
            model, str(tmp / CONFIG_FILE),
            model_config={'pretrained_cfg': cfg_override, 'kpid': kpid_block},
            model_args={'kpid_spec': spec_dict},
            data_config=data_config,
        )
        config = json.loads((tmp / CONFIG_FILE).read_text())
        # the parent checkpoint's tag and notes mean nothing for the pruned model; timm tolerates their absence
        for key in ('tag', 'notes'):
            config['pretrained_cfg'].pop(key, None)
        # timm drops pool_size when the input size is not the parent's: the pruned net's own, for its input size
        config['pretrained_cfg']['pool_size'] = list(pool_size_for(
            config['pretrained_cfg']['input_size'], model.feature_info[-1]['reduction']))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')

        from .report import plot_widths  # matplotlib and the pruning engine load only for an export

        plot_widths(list(report.layer_widths), tmp / WIDTHS_PLOT, title=f'{name}: per-layer width, parent vs pruned')
        card = build_card(
            name=name, repo_id=repo_id, spec_parent=spec.parent,
            base_model=_parent_hub_id(recipe.parent.model, recipe.parent.tag) if recipe.parent.weights == 'timm' else None,
            license=license, dataset=recipe.data.dataset, metrics=metrics, report=report,
            recipe_dict=recipe_dict, recipe_sha256=recipe_sha, weights_sha256=weights_sha,
            pretrained_cfg=config['pretrained_cfg'],
        )
        card.save(tmp / CARD_FILE)
    if card_copy_dir is not None:
        atomic_write_text(Path(card_copy_dir) / f'{name}.md', (out_dir / CARD_FILE).read_text(encoding='utf-8'))
    _logger.info('exported %s to %s (weights sha256 %s)', name, out_dir, weights_sha)
    return out_dir


def read_export_config(folder: str | Path) -> dict:
    """config.json of an export, checked for what kpid-zoo loads need; errors name the file and the field."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f'{path}: missing (expected an export folder written by kpid_zoo.export)')
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    for dotted in ('architecture', 'pretrained_cfg', 'model_args.kpid_spec', 'kpid.weights_sha256'):
        node: Any = config
        for part in dotted.split('.'):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f'{path}: missing field {dotted!r} (not a kpid-zoo export?)')
            node = node[part]
    return config


def zoo_entry_from_export(folder: str | Path, revision: str | None = None) -> ZooRecord:
    """The zoo record of a (published) export: what `kpid_zoo/zoo/<name>.json` holds once it is registered."""
    config = read_export_config(folder)
    kpid, pcfg = config['kpid'], config['pretrained_cfg']
    weights = Path(folder) / kpid.get('weights_file', WEIGHTS_FILE)
    # the record is trusted by every later load: it must describe the weights that are there, not a stale config
    if not weights.is_file() or file_sha256(weights) != kpid['weights_sha256']:
        state = 'is missing' if not weights.is_file() else 'does not match'
        raise ValueError(f"{weights} {state} the sha256 {kpid['weights_sha256']} recorded in "
                         f"{Path(folder) / CONFIG_FILE}; re-run the export")
    metrics = kpid.get('metrics') or {}
    hub_id = kpid['repo_id'] + (f'@{revision}' if revision else '')
    return ZooRecord(
        name=kpid['name'], tag='kpid', description=pcfg.get('description') or f"{kpid['parent']} pruned by KPID",
        spec=config['model_args']['kpid_spec'], source='kpid-zoo', source_model=kpid['name'], hf_hub_id=hub_id,
        weights_file=kpid.get('weights_file', WEIGHTS_FILE), weights_sha256=kpid['weights_sha256'],
        pretrained_cfg={k: pcfg[k] for k in CFG_KEYS if pcfg.get(k) is not None},
        gmacs=kpid.get('gmacs'), params=kpid.get('params'), top1=metrics.get('top1'), top5=metrics.get('top5'),
        eval_size=pcfg['input_size'][-1], metrics_source=f"kpid-zoo build, {kpid.get('dataset')}",
        extra={'recipe_sha256': kpid.get('recipe_sha256')},
    )


def write_zoo_entry(folder: str | Path, zoo_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """Record a (published) export in the packaged zoo, so `timm.create_model(<name>)` knows its architecture.

    The name is the recipe's. A name the zoo holds with other widths is refused (`zoo.record_for_zoo`); the same
    widths with other weights are recorded as a new tag of the name, its default weights left as they are.
    """
    zoo_dir = zoo_dir or ZOO_DIR
    record, default = record_for_zoo(zoo_entry_from_export(folder, revision), zoo_dir)
    return record.save(zoo_dir, default)
