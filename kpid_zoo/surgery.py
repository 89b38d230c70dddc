"""Stage 6: cut the pruned channels out of a network, and rebuild a pruned network from its widths alone.

`prune_model` slices the parent's tensors (the result computes exactly what the parent computes with those
channels removed). `build_pruned` needs no parent weights: it creates the parent architecture with timm and
narrows it to the widths recorded in an `ArchSpec`, which is what the zoo ships in `config.json`.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn as nn

from .files import read_json
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
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: dict, source: str = "architecture spec") -> "ArchSpec":
        missing = {"parent", "widths"} - set(d)
        if missing:
            raise ValueError(f"{source}: missing field(s) {sorted(missing)}; expected parent, widths, input_size")
        unknown = set(d) - {"parent", "widths", "input_size", "parent_kwargs", "version"}
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {sorted(unknown)}")
        if d.get("version", SPEC_VERSION) > SPEC_VERSION:
            raise ValueError(f"{source}: spec version {d['version']} is newer than this kpid-zoo understands "
                             f"({SPEC_VERSION}); upgrade kpid-zoo")
        if not isinstance(d["widths"], dict) or not all(isinstance(v, int) and v > 0 for v in d["widths"].values()):
            raise ValueError(f"{source}: widths must map group names to positive integers")
        return cls(parent=d["parent"], widths=dict(d["widths"]),
                   input_size=tuple(d.get("input_size", (3, 224, 224))),
                   parent_kwargs=dict(d.get("parent_kwargs", {})), version=d.get("version", SPEC_VERSION))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ArchSpec":
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object with parent, widths, input_size")
        return cls.from_dict(data, source=str(path))


def prune_model(model: nn.Module, graph: GroupGraph, keep: dict[str, torch.Tensor], *,
                inplace: bool = False) -> nn.Module:
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
            raise ValueError(f"group {name!r} cannot be pruned: {group.reason}")
        if len(idx) == 0 or idx[0] < 0 or idx[-1] >= group.size or len(idx.unique()) != len(idx):
            raise ValueError(f"group {name!r}: kept indices must be distinct, in [0, {group.size}), and not empty")
        if group.parts > 1:
            per_block = torch.bincount(torch.tensor(group.blocks)[idx], minlength=group.parts)
            if (per_block != per_block[0]).any():
                raise ValueError(f"group {name!r}: a grouped conv needs as many channels kept in each of its "
                                 f"{group.parts} conv-groups, got {per_block.tolist()}")
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
HEAD_KWARGS = ("num_classes", "global_pool")
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
        raise ValueError(f"architecture spec: parent {spec.parent!r} is not a timm model")
    head = {k: timm_kwargs.pop(k) for k in HEAD_KWARGS if k in timm_kwargs}
    kwargs = {**spec.parent_kwargs, **timm_kwargs, "pretrained": False}
    model = timm.create_model(spec.parent, **kwargs)
    graph = _spec_groups(model, spec, kwargs)
    unknown = set(spec.widths) - {g.name for g in graph.groups}
    if unknown:
        raise ValueError(f"architecture spec for {spec.parent}: no channel group named {sorted(unknown)[:3]} "
                         f"(the spec was made for a different architecture or timm version)")
    keep = {}
    for name, width in spec.widths.items():
        if width > graph[name].size:
            raise ValueError(f"architecture spec for {spec.parent}: group {name!r} keeps {width} channels "
                             f"but the parent has only {graph[name].size}")
        group = graph[name]
        if width % group.parts:
            raise ValueError(f"architecture spec for {spec.parent}: group {name!r} keeps {width} channels, not a "
                             f"multiple of the {group.parts} conv-groups of its grouped convs")
        keep[name] = group.leading(width)
    pruned = prune_model(model, graph, keep, inplace=True)  # a fresh parent: no copy to keep
    _set_head(pruned, **head)
    pruned.kpid_spec = spec
    return pruned


def _set_head(model: nn.Module, num_classes: int | None = None, global_pool: str | None = None) -> None:
    """Give the pruned canonical net the caller's head, as timm's reset_classifier does (only what differs)."""
    current_pool = getattr(model, "global_pool", None)
    current_pool = getattr(current_pool, "pool_type", current_pool)  # SelectAdaptivePool2d, or a plain str
    wants_classes = num_classes is not None and num_classes != getattr(model, "num_classes", None)
    wants_pool = global_pool is not None and global_pool != current_pool
    if not (wants_classes or wants_pool):
        return
    if not hasattr(model, "reset_classifier"):
        raise ValueError(f"{type(model).__name__} has no reset_classifier: cannot set num_classes / global_pool")
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
    graph = _trace_groups(model, spec, kwargs.get("in_chans", spec.input_size[0]))
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
    if graph.global_pool is not None and hasattr(model, "num_features"):
        model.num_features = graph.width(graph.global_pool, widths)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if hasattr(model, "head_hidden_size"):
        if isinstance(classifier, nn.Linear):
            model.head_hidden_size = classifier.in_features
        elif "conv_head" in graph.outputs:
            model.head_hidden_size = graph.width(graph.outputs["conv_head"], widths)
        else:
            model.head_hidden_size = model.num_features
    feature_info = getattr(model, "feature_info", None)
    if feature_info:
        for info in feature_info:
            channels = graph.outputs.get(info["module"])
            if channels is not None:
                info["num_chs"] = graph.width(channels, widths)
