"""Stage 9a: write a pruned model as a folder laid out like a Hub repo, atomically.

    <out_dir>/model.safetensors   the state dict (safetensors: no pickles)
    <out_dir>/config.json         timm's config (architecture 'kpid_pruned' + model_args.kpid_spec rebuild the net)
    <out_dir>/README.md           the model card
    <out_dir>/layer_widths.png    per-layer widths, parent vs pruned (linked from the card)
    <out_dir>/model.onnx          the same network as an ONNX graph (opset 18, dynamic batch), checked in ONNX
                                  Runtime on real images; absent (config.json says why) without the [deploy] extra

config.json is written by timm's own `save_config_for_hf`, so `timm.create_model('hf-hub:ORG/NAME')` and
`'local-dir:/path'` read it like any timm export; kpid-zoo adds a top-level "kpid" block (ignored by timm) that
records the weights' sha256, the spec, the metrics and the recipe hash, and binds what the weights depend on to them
(`kpid.bound`, `kpid.bound_sha256`: see `bound_values`). Registry loads check the weights and the binding.
Its `files` maps every other file the export wrote to its sha256 and size: what `publish` uploads (with config.json,
which cannot hash itself: it is checked by parsing it), and the proof that lets a later export replace the folder.
`kpid.onnx` describes model.onnx (opset, input and output names, the dynamic batch axis, exporter and versions,
the check's result, its sha256 and the sha256 of the weights it was exported from), or why there is none.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models import PretrainedCfg, get_pretrained_cfg
from timm.models._hub import save_config_for_hf

from .._version import __version__
from ..core.files import WEIGHTS_FILE, atomic_write_text, file_sha256, save_weights, staged_dir
from ..core.ownership import RefusedError, check_output, recorded_sha256, stray_entries
from ..errors import MissingFileError, UserError
from ._binding import (
    BOUND_CFG_KEYS,
    GENERIC_ARCH,
    KPID_FORMAT_VERSION,
    REEXPORT,
    bound_digests,
    bound_mismatch,
    bound_values,
    export_config_problem,
    parse_config,
    unbound,
)
from ._onnx import ONNX_FILE, OnnxSkipped, check_images, finish_record, make_onnx, skipped_record
from .card import PAPER_ID, PAPER_NAME, PAPER_URL, WIDTHS_PLOT, build_card
from .records import CFG_KEYS, ZOO_DIR, ZooRecord, pool_size_for, record_for_zoo

__all__ = [
    'export_model',
    'check_export_folder',
    'file_sha256',
    'read_export_config',
    'zoo_entry_from_export',
    'write_zoo_entry',
    'bound_values',
    'bound_digests',
    'bound_mismatch',
    'export_config_problem',
    'parse_config',
    'unbound',
    'EXPORT_FILES',
    'WRITTEN_FILES',
    'WEIGHTS_FILE',
    'CONFIG_FILE',
    'CARD_FILE',
    'GENERIC_ARCH',
    'KPID_FORMAT_VERSION',
    'BOUND_CFG_KEYS',
    'REEXPORT',
    'ONNX_FILE',
]

logger = logging.getLogger(__name__)

CONFIG_FILE = 'config.json'
CARD_FILE = 'README.md'
EXPORT_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
WRITTEN_FILES = EXPORT_FILES + (WIDTHS_PLOT, ONNX_FILE)  # everything an export writes, and all its folder may hold

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


def _own_record(folder: Path) -> tuple[str | None, dict[str, str]]:
    """(the entry name, {file: sha256}) that `folder`'s config.json records; (None, {}) when it records none."""
    path = folder / CONFIG_FILE
    if path.is_symlink() or not path.is_file():  # a FIFO would block the read; a link is not the export's
        return None, {}
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (OSError, UnicodeDecodeError, ValueError):
        return None, {}
    kpid = config.get('kpid') if isinstance(config, dict) else None
    if not isinstance(kpid, dict) or not isinstance(kpid.get('name'), str):
        return None, {}
    files = recorded_sha256(kpid.get('files'))
    if isinstance(kpid.get('weights_sha256'), str):  # exports from before `files` was written record the weights
        files.setdefault(kpid.get('weights_file') or WEIGHTS_FILE, kpid['weights_sha256'])
    return kpid['name'], files


def check_export_folder(
    out_dir: str | Path, name: str, recorded: Mapping[str, str] | None = None, option: str = '--out'
) -> None:
    """Refuse (`RefusedError`, naming the file) unless an export of `name` may replace `out_dir`.

    It may when `out_dir` is absent, empty, or holds a previous export of `name` and nothing else: regular files of
    the names an export writes, each with the sha256 that config.json (naming `name`) or `recorded` (the build's
    own record of what it exported, {file: sha256}) lists for it. config.json itself, which cannot record its own
    hash, must name `name` -- or, unreadable or altered, sit beside files that are all proven so.
    """
    folder = Path(out_dir)
    named, listed = _own_record(folder) if folder.is_dir() else (None, {})
    if named is not None and named != name:
        raise RefusedError(
            f'{option} {folder}: holds the export of {named!r}, not of {name!r}; refusing to replace '
            f'it (give {option} another folder)'
        )
    recorded = dict(recorded or {})

    def proven(file: str, sha: str) -> bool:
        return listed.get(file) == sha or recorded.get(file) == sha

    def ours(file: str, sha: str) -> bool:
        if file != CONFIG_FILE:
            return proven(file, sha)
        if named == name or recorded.get(file) == sha:
            return True
        others = [f for f in os.listdir(folder) if f != CONFIG_FILE]
        return bool(others) and all(proven(f, file_sha256(folder / f)) for f in others)

    config = folder / CONFIG_FILE
    if (
        folder.is_dir()
        and not folder.is_symlink()
        and not stray_entries(folder, WRITTEN_FILES)
        and config.exists()
        and not ours(CONFIG_FILE, file_sha256(config))
    ):
        # the record that says whose export this is: named first, when it says nothing of the kind
        raise RefusedError(
            f'{config}: not a config.json kpid-zoo exported for {name!r}, and no record vouches for '
            f'the files beside it; refusing to replace {folder} (move it away, or give {option} '
            f'another folder)'
        )
    check_output(folder, WRITTEN_FILES, ours, option)


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
    recorded: Mapping[str, str] | None = None,
    onnx: bool = True,
    images: torch.Tensor | None = None,
    images_from: str = '',
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
        recorded: {file: sha256} of what the caller exported into `out_dir` before (the build's stage record): a
            previous export whose config.json was damaged may then be replaced (see `check_export_folder`).
        onnx: also write model.onnx (checked in ONNX Runtime on `images`); False records that it was not asked for.
        images: real images, preprocessed for the model (N x C x H x W), to check model.onnx on (the build gives a
            few of its validation images); default: a few CIFAR-10 JPEGs where kpid-zoo finds them
            (`_onnx.check_images`), else model.onnx is skipped.
        images_from: what `images` are, for config.json (e.g. '4 validation images of the build').
    Returns:
        out_dir as a Path.
    """
    out_dir = Path(out_dir)
    if not name or any(c in name for c in '/\\'):
        raise ValueError(f'export: name must be a plain model name, got {name!r}')
    if not hasattr(model, 'pretrained_cfg'):
        raise TypeError(
            'export: model must be a timm model (it has no pretrained_cfg); pass the pruned network from prune/surgery'
        )
    _check_report(report)
    metrics = _as_dict(metrics, 'metrics')
    if metrics.get('top1') is None:
        raise ValueError('export: metrics has no top1 (expected evaluate.EvalResult or {"top1": ..., "top5": ...})')
    cfg_in = dict(pretrained_cfg)
    unknown = set(cfg_in) - _PRETRAINED_CFG_FIELDS
    if unknown:
        raise ValueError(
            f'export: pretrained_cfg has unknown key(s) {sorted(unknown)}; '
            f'expected timm PretrainedCfg fields, e.g. {list(_DATA_KEYS + _META_KEYS)}'
        )
    if cfg_in.get('num_classes') is not None and cfg_in['num_classes'] != getattr(model, 'num_classes', None):
        raise ValueError(
            f"export: pretrained_cfg.num_classes {cfg_in['num_classes']} does not match the model's "
            f'{getattr(model, "num_classes", None)}'
        )
    if 'input_size' in cfg_in and tuple(cfg_in['input_size'])[0] != getattr(model, 'in_chans', 3):
        raise ValueError(
            f'export: pretrained_cfg.input_size {tuple(cfg_in["input_size"])} does not match the '
            f"model's {getattr(model, 'in_chans', 3)} input channels"
        )
    recipe_dict = recipe.to_dict()
    recipe_sha = recipe.sha256()
    repo_id = repo_id or recipe.hub.repo_id
    license = cfg_in.get('license') or recipe.hub.license
    spec_dict = spec.to_dict()
    # before any work, and again as the folder is swapped (staged_dir): nothing in it but a previous export of it
    check_export_folder(out_dir, name, recorded)

    with staged_dir(out_dir, owned=WRITTEN_FILES) as tmp:
        weights = tmp / WEIGHTS_FILE
        save_weights(model, weights)
        weights_sha = file_sha256(weights)

        data_config = {k: cfg_in[k] for k in _DATA_KEYS if cfg_in.get(k) is not None}
        cfg_override = {k: cfg_in[k] for k in _META_KEYS if cfg_in.get(k) is not None}
        # The class count is the model's, stated, so timm keeps the label names given for it (it drops them when
        # the cfg it starts from, the parent's, counts other classes); the parent's names for another head go.
        cfg_override['num_classes'] = model.num_classes
        for key in ('label_names', 'label_descriptions'):
            if key in cfg_override and len(cfg_override[key]) != model.num_classes:
                logger.info(
                    'export: %s: dropped pretrained_cfg.%s (%d entries for %d classes)',
                    name,
                    key,
                    len(cfg_override[key]),
                    model.num_classes,
                )
                del cfg_override[key]
        cfg_override.update(
            architecture=GENERIC_ARCH,
            tag=None,
            license=license,
            paper_ids=PAPER_ID,
            paper_name=PAPER_NAME,
            origin_url=PAPER_URL,
            description=f'{spec.parent} pruned by KPID, a kpid-zoo build of recipe {name}',
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
            model,
            str(tmp / CONFIG_FILE),
            model_config={'pretrained_cfg': cfg_override, 'kpid': kpid_block},
            model_args={'kpid_spec': spec_dict},
            data_config=data_config,
        )
        config = json.loads((tmp / CONFIG_FILE).read_text())
        # the parent checkpoint's tag and notes mean nothing for the pruned model; timm tolerates their absence
        for key in ('tag', 'notes'):
            config['pretrained_cfg'].pop(key, None)
        # timm drops pool_size when the input size is not the parent's: the pruned net's own, for its input size
        config['pretrained_cfg']['pool_size'] = list(
            pool_size_for(config['pretrained_cfg']['input_size'], model.feature_info[-1]['reduction'])
        )
        # last: the binding covers the config as written, read the way a load reads it
        config['kpid']['bound'], config['kpid']['bound_sha256'] = bound_digests(*parse_config(config), weights_sha)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')

        from ..budget.report import plot_widths  # matplotlib and the pruning engine load only for an export

        plot_widths(list(report.layer_widths), tmp / WIDTHS_PLOT, title=f'{name}: per-layer width, parent vs pruned')
        onnx_record = _write_onnx(model, name, tmp, config['pretrained_cfg'], weights_sha, onnx, images, images_from)
        config['kpid']['onnx'] = onnx_record
        card = build_card(
            name=name,
            repo_id=repo_id,
            spec_parent=spec.parent,
            base_model=_parent_hub_id(recipe.parent.model, recipe.parent.tag)
            if recipe.parent.weights == 'timm'
            else None,
            license=license,
            dataset=recipe.data.dataset,
            metrics=metrics,
            report=report,
            recipe_dict=recipe_dict,
            recipe_sha256=recipe_sha,
            weights_sha256=weights_sha,
            pretrained_cfg=config['pretrained_cfg'],
            onnx=onnx_record,
        )
        card.save(tmp / CARD_FILE)
        # the export's own files, for publish and for the next export into this folder (config.json is the record)
        config['kpid']['files'] = {
            f: {'sha256': file_sha256(tmp / f), 'size': (tmp / f).stat().st_size}
            for f in (WEIGHTS_FILE, CARD_FILE, WIDTHS_PLOT, ONNX_FILE)
            if (tmp / f).is_file()
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + '\n')
    if card_copy_dir is not None:
        atomic_write_text(Path(card_copy_dir) / f'{name}.md', (out_dir / CARD_FILE).read_text(encoding='utf-8'))
    logger.info('exported %s to %s (weights sha256 %s)', name, out_dir, weights_sha)
    return out_dir


def _write_onnx(
    model: nn.Module,
    name: str,
    folder: Path,
    pretrained_cfg: Mapping[str, Any],
    weights_sha: str,
    wanted: bool,
    images: torch.Tensor | None,
    images_from: str,
) -> dict:
    """Write model.onnx into `folder` when it can be written and checked; its `kpid.onnx` record either way. Whatever
    stops it is one log line: the PyTorch export is complete and valid without it."""
    if not wanted:
        return skipped_record('not asked for (export_model(onnx=False))')
    try:
        if images is None:
            try:
                images, images_from = check_images(pretrained_cfg)
            except UserError as e:
                raise OnnxSkipped(f'{ONNX_FILE} not written: {e}') from None
        data, record = make_onnx(
            model, tuple(pretrained_cfg['input_size']), images, name=name, inputs=images_from or 'real images'
        )
    except OnnxSkipped as e:
        logger.warning('export: %s: %s', name, e)
        return skipped_record(str(e))
    (folder / ONNX_FILE).write_bytes(data)
    return finish_record(record, data, weights_sha)


def read_export_config(folder: str | Path) -> dict:
    """config.json of an export, checked for what kpid-zoo loads need; errors name the file and the field.

    Checked: the structure (`export_config_problem`), the spec (`ArchSpec.from_dict`: it is data, never a path),
    and the binding of spec, class count and preprocessing to the weights (`bound_mismatch`).
    """
    from ..engine.surgery import ArchSpec  # the fx tracer loads only when an export is read

    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise MissingFileError(f'{path}: missing (expected an export folder written by kpid_zoo.zoo.export)')
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    problem = export_config_problem(config)
    if problem:
        raise ValueError(f'{path}: {problem}')
    ArchSpec.from_dict(config['model_args']['kpid_spec'], source=f'{path}: model_args.kpid_spec')
    try:
        pretrained_cfg, model_args = parse_config(config)
    except (AttributeError, KeyError, TypeError, ValueError, AssertionError):  # timm assumes a sound file
        raise ValueError(f'{path}: pretrained_cfg / model_args cannot be read the way timm reads them') from None
    problem = bound_mismatch(config['kpid'], pretrained_cfg, model_args)
    if problem:
        hint = REEXPORT if unbound(config['kpid']) else 'config.json was edited after export; ' + REEXPORT
        raise ValueError(f'{path}: {problem}; {hint}')
    return config


def zoo_entry_from_export(folder: str | Path, revision: str | None = None) -> ZooRecord:
    """The zoo record of a (published) export: what `kpid_zoo/zoo/<name>.json` holds once it is registered."""
    config = read_export_config(folder)
    kpid, pcfg = config['kpid'], config['pretrained_cfg']
    weights = Path(folder) / kpid.get('weights_file', WEIGHTS_FILE)
    # the record is trusted by every later load: it must describe the weights that are there, not a stale config
    if not weights.is_file() or file_sha256(weights) != kpid['weights_sha256']:
        state = 'is missing' if not weights.is_file() else 'does not match'
        raise ValueError(
            f'{weights} {state} the sha256 {kpid["weights_sha256"]} recorded in '
            f'{Path(folder) / CONFIG_FILE}; re-run the export'
        )
    metrics = kpid.get('metrics') or {}
    hub_id = kpid['repo_id'] + (f'@{revision}' if revision else '')
    return ZooRecord(
        name=kpid['name'],
        tag='kpid',
        description=pcfg.get('description') or f'{kpid["parent"]} pruned by KPID',
        spec=config['model_args']['kpid_spec'],
        source='kpid-zoo',
        source_model=kpid['name'],
        hf_hub_id=hub_id,
        weights_file=kpid.get('weights_file', WEIGHTS_FILE),
        weights_sha256=kpid['weights_sha256'],
        pretrained_cfg={k: pcfg[k] for k in CFG_KEYS if pcfg.get(k) is not None},
        gmacs=kpid.get('gmacs'),
        params=kpid.get('params'),
        top1=metrics.get('top1'),
        top5=metrics.get('top5'),
        eval_size=pcfg['input_size'][-1],
        metrics_source=f'kpid-zoo build, {kpid.get("dataset")}',
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
