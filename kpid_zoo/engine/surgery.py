"""Stage 6: cut the pruned channels out of a network, and rebuild a pruned network from its widths alone.

`prune_model` slices the parent's tensors (the result computes exactly what the parent computes with those
channels removed). `build_pruned` needs no parent weights: it creates the parent architecture with timm and
narrows it to the widths recorded in an `ArchSpec`, which is what the zoo ships in `config.json`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import math
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn
from timm.layers import NormMlpClassifierHead
from timm.models import build_model_with_cfg

from ..core.files import read_json
from ..errors import UserError
from .groups import GroupGraph, discover_groups
from .handlers import handler_for

SPEC_VERSION = 1
_TRACE_SIZE = 64


@dataclass
class ArchSpec:
    """A pruned architecture: the timm parent and the kept width of every pruned channel group."""

    parent: str
    widths: dict[str, int]
    input_size: tuple[int, int, int] = (3, 224, 224)
    parent_kwargs: dict = field(default_factory=dict)
    version: int = SPEC_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d['input_size'] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = 'architecture spec') -> ArchSpec:
        """A spec from JSON data, every field checked: specs arrive in config.json files anyone can publish.

        `source` names where `d` came from (a file, a config.json field) in the one-line errors.
        """
        if not isinstance(d, dict):
            kind = 'a str (a spec is data, never a path)' if isinstance(d, str) else f'a {type(d).__name__}'
            raise UserError(f'{source}: expected a JSON object with parent, widths, input_size; got {kind}')
        missing = {'parent', 'widths'} - set(d)
        if missing:
            raise UserError(f'{source}: missing field(s) {sorted(missing)}; expected parent, widths, input_size')
        unknown = set(d) - {'parent', 'widths', 'input_size', 'parent_kwargs', 'version'}
        if unknown:
            raise UserError(f'{source}: unknown field(s) {sorted(str(k)[:40] for k in unknown)[:3]}')
        version = d.get('version', SPEC_VERSION)
        if not _is_int(version) or version < 1:
            raise UserError(f'{source}: version must be a positive integer')
        if version > SPEC_VERSION:
            raise UserError(
                f'{source}: spec version {version} is newer than this kpid-zoo understands '
                f'({SPEC_VERSION}); upgrade kpid-zoo'
            )
        return cls(
            parent=_check_parent(d['parent'], source),
            widths=_check_widths(d['widths'], source),
            input_size=_check_input_size(d.get('input_size', (3, 224, 224)), source),
            parent_kwargs=_check_parent_kwargs(d.get('parent_kwargs', {}), source),
            version=version,
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + '\n')

    @classmethod
    def load(cls, path: str | Path) -> ArchSpec:
        """The spec saved in a JSON file: the explicit way for a Python caller to build from a file."""
        if not Path(path).is_file():  # not a FIFO or a device: reading one could block or never end
            raise UserError(f'{path}: not a regular file (expected a saved architecture spec, JSON)')
        data = read_json(path)
        if not isinstance(data, dict):
            raise UserError(f'{path}: expected a JSON object with parent, widths, input_size')
        return cls.from_dict(data, source=str(path))


# The checks of ArchSpec.from_dict. Bounds keep a hostile spec from making timm build or trace something huge; they
# are far above any real network's.
_MAX_SIDE = 4096  # input height / width, pixels
_MAX_CHANS = 1024  # input channels
_MAX_WIDTH = 1 << 20  # channels kept in one group
_MAX_TEXT = 200  # characters of a name or a string argument
_NAME_RE = re.compile(r'[A-Za-z0-9_]+(\.[A-Za-z0-9_-]+)?')  # a timm model name, with an optional pretrained tag
_GROUP_RE = re.compile(r'[A-Za-z0-9_.]+')  # a channel group: the module path of its producer
# Keywords of timm's factory and builder that read files (checkpoint_path), fetch or adapt weights, or change what
# is returned: model arguments from a file never set them.
LOADER_KWARGS = frozenset(
    {
        'pretrained',
        'pretrained_cfg',
        'pretrained_cfg_overlay',
        'pretrained_model_args',
        'pretrained_strict',
        'pretrained_filter_fn',
        'checkpoint_path',
        'cache_dir',
        'features_only',
        'out_indices',
        'feature_cls',
        'feature_cfg',
        'model_cfg',
        'kwargs_filter',
        'pruned',
        'scriptable',
        'exportable',
        'no_jit',
        'device',
        'dtype',
        'kpid_spec',
    }
) | (
    frozenset(inspect.signature(timm.create_model).parameters)
    | frozenset(inspect.signature(build_model_with_cfg).parameters)
) - {'kwargs'}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is not a width


def _check_parent(parent, source: str) -> str:
    if not isinstance(parent, str) or len(parent) > _MAX_TEXT or not _NAME_RE.fullmatch(parent):
        raise UserError(f"{source}: parent must be a timm model name such as 'resnet50'")
    if parent.startswith('kpid_'):
        raise UserError(f'{source}: parent {parent!r} is a kpid-zoo model; a spec prunes a timm architecture')
    if not timm.is_model(parent):
        raise UserError(f'{source}: parent {parent!r} is not a timm model')
    return parent


def _check_widths(widths, source: str) -> dict[str, int]:
    if not isinstance(widths, dict):
        raise UserError(f'{source}: widths must map group names to positive integers')
    for name, width in widths.items():
        if not isinstance(name, str) or len(name) > _MAX_TEXT or not _GROUP_RE.fullmatch(name):
            raise UserError(f'{source}: widths has a key that is not a channel group name (module path)')
        if not _is_int(width) or not 0 < width <= _MAX_WIDTH:
            raise UserError(f'{source}: widths[{name!r}] must be a positive integer')
    return dict(widths)


def _check_input_size(size, source: str) -> tuple[int, int, int]:
    if (
        not isinstance(size, (list, tuple))
        or len(size) != 3
        or not all(_is_int(v) and v > 0 for v in size)
        or size[0] > _MAX_CHANS
        or max(size[1:]) > _MAX_SIDE
    ):
        raise UserError(
            f'{source}: input_size must be [C, H, W], positive integers, C <= {_MAX_CHANS}, H and W <= {_MAX_SIDE}'
        )
    return tuple(size)


def _check_parent_kwargs(kwargs, source: str) -> dict:
    return check_model_kwargs(kwargs, f'{source}: parent_kwargs')


def check_model_kwargs(kwargs, where: str) -> dict:
    """Model arguments read from a file (a spec's parent_kwargs, config.json model_args), checked as hostile: plain
    JSON values under argument names, none of timm's loader keywords (`LOADER_KWARGS`). `where` names them."""
    if not isinstance(kwargs, dict):
        raise UserError(f'{where} must be a JSON object of timm model arguments')

    def plain(v) -> bool:
        if isinstance(v, float):
            return math.isfinite(v)
        return v is None or isinstance(v, (bool, int)) or (isinstance(v, str) and len(v) <= _MAX_TEXT)

    for key, value in kwargs.items():
        if not isinstance(key, str) or not key.isidentifier() or len(key) > _MAX_TEXT:
            raise UserError(f'{where} has a key that is not an argument name')
        if key in LOADER_KWARGS:
            raise UserError(
                f'{where}.{key} is not allowed (model arguments describe an architecture; they do not '
                f'load files or weights)'
            )
        if not (plain(value) or isinstance(value, list) and len(value) <= 64 and all(map(plain, value))):
            raise UserError(f'{where}.{key} must be a number, string, boolean, null or a short list of those')
        if key == 'num_classes' and not (_is_int(value) and 0 <= value <= _MAX_WIDTH):
            raise UserError(f'{where}.num_classes must be a non-negative integer')
        if key == 'in_chans' and not (_is_int(value) and 0 < value <= _MAX_CHANS):
            raise UserError(f'{where}.in_chans must be an integer in [1, {_MAX_CHANS}]')
    return dict(kwargs)


def prune_model(
    model: nn.Module, graph: GroupGraph, keep: dict[str, torch.Tensor], *, inplace: bool = False
) -> nn.Module:
    """A copy of `model` (or `model` itself, when `inplace`) that keeps, for each group named in `keep`, only the
    channels at those indices.

    Groups not named in `keep` stay whole. Unless `inplace`, the parent is not modified.
    """
    checked = {}
    for name, idx in keep.items():
        group = graph[name]
        idx = torch.as_tensor(idx, dtype=torch.long).sort().values
        if not group.prunable:
            if len(idx) == group.size:
                continue
            raise UserError(f'group {name!r} cannot be pruned: {group.reason}')
        if len(idx) == 0 or idx[0] < 0 or idx[-1] >= group.size or len(idx.unique()) != len(idx):
            raise UserError(f'group {name!r}: kept indices must be distinct, in [0, {group.size}), and not empty')
        if group.parts > 1:
            per_block = torch.bincount(torch.tensor(group.blocks)[idx], minlength=group.parts)
            if (per_block != per_block[0]).any():
                raise UserError(
                    f'group {name!r}: a grouped conv needs as many channels kept in each of its '
                    f'{group.parts} conv-groups, got {per_block.tolist()}'
                )
        checked[name] = idx
    pruned = model if inplace else copy.deepcopy(model)
    masks = graph.masks(checked)
    for member, channels in graph.layouts.items():
        if not any(gi in masks for gi in np.unique(channels.group)):
            continue
        handler, module = graph.resolve(pruned, member)
        handler.slice(module, member.role, torch.from_numpy(channels.kept(masks)))
    for module in pruned.modules():
        handler = handler_for(module)
        if handler is not None:
            handler.refresh(module)
    _update_model_widths(pruned, graph, {n: len(i) for n, i in checked.items()})
    return pruned


# The options of a timm classification head: they change what the network outputs, never a channel of its trunk.
HEAD_KWARGS = ('num_classes', 'global_pool')
_GRAPH_CACHE_SIZE = 32
_graphs: OrderedDict[str, GroupGraph] = OrderedDict()


def build_pruned(spec: ArchSpec, **timm_kwargs) -> nn.Module:
    """The pruned architecture of `spec` with freshly initialised weights (load the pruned weights after).

    Built the way timm builds its own models: the parent in its canonical form (`spec.parent_kwargs`, its own head)
    is narrowed to the spec's widths, then given the caller's head (`num_classes`, `global_pool`) with
    `reset_classifier`. Tracing the parent with the caller's head instead would mistake a headless trunk's last
    group for the network output (num_classes=0) or fail on an unpooled output (global_pool=''). `in_chans` and
    every other option are the parent's to build with: the stem's input channels are never pruned.
    """
    if not timm.is_model(spec.parent):
        raise UserError(f'architecture spec: parent {spec.parent!r} is not a timm model')
    head = {k: timm_kwargs.pop(k) for k in HEAD_KWARGS if k in timm_kwargs}
    kwargs = {**spec.parent_kwargs, **timm_kwargs, 'pretrained': False}
    model = timm.create_model(spec.parent, **kwargs)
    graph = _spec_groups(model, spec, kwargs)
    unknown = set(spec.widths) - {g.name for g in graph.groups}
    if unknown:
        raise UserError(
            f'architecture spec for {spec.parent}: no channel group named {sorted(unknown)[:3]} '
            f'(the spec was made for a different architecture or timm version)'
        )
    keep = {}
    for name, width in spec.widths.items():
        if width > graph[name].size:
            raise UserError(
                f'architecture spec for {spec.parent}: group {name!r} keeps {width} channels '
                f'but the parent has only {graph[name].size}'
            )
        group = graph[name]
        if width % group.parts:
            raise UserError(
                f'architecture spec for {spec.parent}: group {name!r} keeps {width} channels, not a '
                f'multiple of the {group.parts} conv-groups of its grouped convs'
            )
        keep[name] = group.leading(width)
    pruned = prune_model(model, graph, keep, inplace=True)  # a fresh parent: no copy to keep
    _set_head(pruned, **head)
    pruned.kpid_spec = spec
    return pruned


def _set_head(model: nn.Module, num_classes: int | None = None, global_pool: str | None = None) -> None:
    """Give the pruned canonical net the caller's head, as timm's reset_classifier does (only what differs)."""
    current_pool = getattr(model, 'global_pool', None)
    current_pool = getattr(current_pool, 'pool_type', current_pool)  # SelectAdaptivePool2d, or a plain str
    wants_classes = num_classes is not None and num_classes != getattr(model, 'num_classes', None)
    wants_pool = global_pool is not None and global_pool != current_pool
    if not (wants_classes or wants_pool):
        return
    if not hasattr(model, 'reset_classifier'):
        raise UserError(f'{type(model).__name__} has no reset_classifier: cannot set num_classes / global_pool')
    classes = num_classes if num_classes is not None else model.num_classes
    if global_pool is not None:
        model.reset_classifier(classes, global_pool)
    elif isinstance(current_pool, str):
        model.reset_classifier(classes, current_pool)  # keep the canonical pooling (some defaults reset it to avg)
    else:
        model.reset_classifier(classes)


def _spec_groups(model: nn.Module, spec: ArchSpec, kwargs: dict) -> GroupGraph:
    """The parent's channel groups, traced once per spec and build options (a graph names modules, holds none).

    Channel groups do not depend on the weights, so every later build of the same architecture reuses the trace
    (and still gets fresh weights: the parent is created anew each time).
    """
    try:
        key = json.dumps([spec.to_dict(), kwargs], sort_keys=True)
    except TypeError:  # an option that is not plain data (a layer class...): trace, do not cache
        key = None
    if key is not None and key in _graphs:
        _graphs.move_to_end(key)
        return _graphs[key]
    graph = _trace_groups(model, spec, kwargs.get('in_chans', spec.input_size[0]))
    if key is not None:
        _graphs[key] = graph
        while len(_graphs) > _GRAPH_CACHE_SIZE:
            _graphs.popitem(last=False)
    return graph


def _trace_groups(model: nn.Module, spec: ArchSpec, in_chans: int) -> GroupGraph:
    """The parent's channel groups, traced small when the model runs small, else at the spec's own size.

    Channel groups do not depend on the resolution, so a small trace makes every model load fast; a model whose
    kernels outgrow a small image (inception_v3 at 64 px) is traced at the size the spec was made for.
    """
    full = (in_chans, *spec.input_size[1:])
    small = (in_chans, *(min(d, _TRACE_SIZE) for d in spec.input_size[1:]))
    if small == full:
        return discover_groups(model, full)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # torch's ShapeProp prints the traceback it raises
            return discover_groups(model, small)
    except ValueError:
        return discover_groups(model, full)


def _update_model_widths(model: nn.Module, graph: GroupGraph, widths: dict[str, int]) -> None:
    """Keep timm's width attributes true, so reset_classifier, forward_head and features_only keep working."""
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if graph.global_pool is not None and hasattr(model, 'num_features'):
        model.num_features = graph.width(graph.global_pool, widths)
    elif isinstance(classifier, nn.Linear) and hasattr(model, 'num_features'):
        model.num_features = classifier.in_features  # token models (ViT): the head reads a token, no pool module
    if isinstance(getattr(model, 'embed_dim', None), int) and 'patch_embed' in graph.outputs:
        model.embed_dim = graph.width(graph.outputs['patch_embed'], widths)  # ViT's reset_classifier reads it
    head = getattr(model, 'head', None)
    if isinstance(head, NormMlpClassifierHead) and graph.global_pool is not None:
        # ConvNeXt's head: reset_classifier refuses an in_features other than the head's own
        head.in_features = graph.width(graph.global_pool, widths)
        head.num_features = head.pre_logits.fc.out_features if head.hidden_size else head.in_features
        head.hidden_size = head.num_features if head.hidden_size else head.hidden_size
    in_conv = getattr(head, 'in_conv', None)
    if isinstance(in_conv, nn.Module) and not isinstance(in_conv, nn.Identity) and hasattr(model, 'num_features'):
        # a head that convolves before it pools (EfficientViT's): the features are what enters the head, whose
        # handler keeps `in_features` true
        model.num_features = getattr(head, 'in_features', model.num_features)
    if hasattr(model, 'head_hidden_size'):
        if isinstance(classifier, nn.Linear):
            model.head_hidden_size = classifier.in_features
        elif 'conv_head' in graph.outputs:
            model.head_hidden_size = graph.width(graph.outputs['conv_head'], widths)
        else:
            model.head_hidden_size = model.num_features
    feature_info = getattr(model, 'feature_info', None)
    if feature_info:
        for info in feature_info:
            channels = graph.outputs.get(info['module'])
            if channels is not None:
                info['num_chs'] = graph.width(channels, widths)
