"""The layers a latency table times (`latency.build_table`): which layers a prunable width changes, the input shape
each sees in the network, and a copy of one narrowed to given group widths, sliced as surgery slices it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from ..engine.groups import (
    ROLE_CONV_GROUPS,
    ROLE_DW,
    ROLE_IN,
    ROLE_NORM,
    ROLE_PARAM,
    ChannelMap,
    GroupGraph,
    Member,
)
from ..engine.handlers import handler_for
from ..errors import UserError

MAX_TERM_GROUPS = 3  # a layer is timed at every combination of its groups' sampled widths: 5 ** 3 calls at most


@dataclass
class TimedLayer:
    """A layer the table times: its members' channel layouts, the layout of its input, and its input shape."""

    module: str
    roles: list[tuple[Member, ChannelMap]]  # its dimensions that hold prunable channels
    groups: tuple[str, ...]  # the prunable groups in them, the term's variables
    input_channels: ChannelMap | None  # its input's channel dimension (None: no prunable channel in it)
    shape: tuple[int, ...] = ()


def _prunable_in(graph: GroupGraph, channels: ChannelMap, prunable: set[str]) -> list[str]:
    return [graph.groups[gi].name for gi in np.unique(channels.group) if gi >= 0 and graph.groups[gi].name in prunable]


def timed_layers(model: nn.Module, graph: GroupGraph) -> list[TimedLayer]:
    """The layers whose cost depends on a prunable width: every group member (a conv, a BN, a BN+act) and every
    channel-wise leaf on prunable channels (activations, pools), outermost first, none inside another.

    Each dimension is read from the graph's layouts, so a layer whose input concatenates several groups depends
    on all of them; past `MAX_TERM_GROUPS` groups in one layer the grid is too large to time, which is an error
    (a latency budget does not reach such networks; a FLOPs budget does)."""
    prunable = {g.name for g in graph.prunable}
    roles: dict[str, list[tuple[Member, ChannelMap]]] = {}
    for member, channels in graph.layouts.items():
        if member.role != ROLE_PARAM and _prunable_in(graph, channels, prunable):
            roles.setdefault(member.module, []).append((member, channels))
    timed, taken = [], []
    for name, module in model.named_modules():
        if not name or any(name.startswith(t + '.') for t in taken):
            continue
        leaf = next(module.children(), None) is None
        if name in roles:
            member = roles[name]
            input_channels = next((c for m, c in member if m.role in (ROLE_IN, ROLE_DW, ROLE_NORM)), None)
            cut_whole = next((c for m, c in member if m.role == ROLE_CONV_GROUPS), None)
            if input_channels is None and cut_whole is not None:
                input_channels = _conv_groups_input(module, cut_whole)
        elif leaf and name in graph.outputs and _prunable_in(graph, graph.outputs[name], prunable):
            member, input_channels = [], graph.outputs[name]  # channel-wise: its input has its output's channels
        else:
            continue
        maps = [c for _, c in member] + ([input_channels] if input_channels is not None else [])
        groups = tuple(dict.fromkeys(g for c in maps for g in _prunable_in(graph, c, prunable)))
        if len(groups) > MAX_TERM_GROUPS:
            raise UserError(
                f'latency table: layer {name!r} holds channels of {len(groups)} prunable groups '
                f'(a concatenation); a latency budget times at most {MAX_TERM_GROUPS} per layer; '
                f'use a FLOPs budget (flops.target_gmacs) for this network'
            )
        timed.append(TimedLayer(name, member, groups, input_channels))
        taken.append(name)
    return timed


def _conv_groups_input(conv: nn.Module, channels: ChannelMap) -> ChannelMap:
    """The input of a grouped conv cut in whole conv-groups (a channel multiplier's): each conv-group's inputs
    hold the channel its outputs hold."""
    per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
    return ChannelMap(np.repeat(channels.group[::per_out], per_in), np.repeat(channels.channel[::per_out], per_in))


def record_shapes(model: nn.Module, layers: list[TimedLayer], x: torch.Tensor) -> list[TimedLayer]:
    """Each layer's input shape in a forward pass; layers called with anything but one tensor are left out."""
    shapes: dict[str, tuple[int, ...] | None] = {}
    hooks = []
    for layer in layers:

        def hook(_m, args, _out, name=layer.module):
            ok = len(args) == 1 and isinstance(args[0], torch.Tensor) and name not in shapes
            shapes[name] = tuple(args[0].shape) if ok else None

        hooks.append(model.get_submodule(layer.module).register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    kept = []
    for layer in layers:
        shape = shapes.get(layer.module)
        if shape is None or len(shape) < 2:
            continue
        layer.shape = shape
        kept.append(layer)
    return kept


def narrowed(module: nn.Module, layer: TimedLayer, graph: GroupGraph, widths: dict[str, int]) -> nn.Module:
    """A copy of the layer with each of its groups at `widths`, sliced as `surgery.prune_model` slices it."""
    narrow = copy.deepcopy(module)
    masks = graph.masks({g: graph[g].leading(w) for g, w in widths.items()})
    for member, channels in layer.roles:
        handler_for(narrow).slice(narrow, member.role, torch.from_numpy(channels.kept(masks)))
    for m in narrow.modules():
        handler = handler_for(m)
        if handler is not None:
            handler.refresh(m)
    return narrow


__all__ = ['MAX_TERM_GROUPS', 'TimedLayer', 'timed_layers', 'record_shapes', 'narrowed']
