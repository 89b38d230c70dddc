"""The layers a latency table times (`latency.build_table`): which layers a prunable width changes, the input shape
each sees in the network, and a copy of one narrowed to given group widths, sliced as surgery slices it.

For a deployment runtime that fuses a convolution with the norm and activation after it (ONNX Runtime, OpenVINO),
`fuse_following` makes the three one timed unit, as the runtime runs them (see docs/latency.md).
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
    fused: tuple[TimedLayer, ...] = ()  # the layers after it timed with it as one unit (its norm and activation)

    @property
    def name(self) -> str:
        """The module, or the modules of a fused unit joined by '+' (e.g. 'layer1.0.conv1+bn1+act1')."""
        return '+'.join([self.module] + [f.module.rsplit('.', 1)[-1] for f in self.fused])


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
            # a layer with members of its own and inside it (an attention layer's heads, and its qkv and proj)
            member = roles[name] + [r for m, rs in roles.items() if m.startswith(name + '.') for r in rs]
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


# The activations a runtime folds into the convolution before them (ONNX Runtime's FusedConv, OpenVINO's fused
# post-ops): torch's and timm's own activation modules.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.GELU, nn.LeakyReLU, nn.Tanh)


def _is_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACTIVATIONS) or type(module).__module__.startswith('timm.layers.activations')


def fuse_following(model: nn.Module, layers: list[TimedLayer], x: torch.Tensor) -> list[TimedLayer]:
    """`layers` with each convolution joined by the norm that reads its output and the activation that reads the
    norm's (or the conv's, without a norm), when each reads exactly the tensor the one before wrote in a forward
    pass on `x`: one timed unit, as ONNX Runtime and OpenVINO run them (the norm folded into the conv's weights,
    the activation a post-op). A unit keeps to `MAX_TERM_GROUPS` groups; anything else stays a layer of its own;
    identities are left out (an exported graph has none)."""
    # an identity (timm's drop-block and anti-aliasing slots when off) is no node of an exported graph: not timed
    layers = [layer for layer in layers if not isinstance(model.get_submodule(layer.module), nn.Identity)]
    by_name = {layer.module: layer for layer in layers}
    # A tensor is known by its object and its version counter: an in-place op (a residual `x += shortcut`, an
    # in-place ReLU) makes it another value, which the layers after it read, not the value the layer before wrote.
    keep: list[torch.Tensor] = []  # held until the end: ids are not reused meanwhile
    reads: dict[tuple[int, int], list[str]] = {}  # a value -> the layers that read it, in call order
    output: dict[str, tuple[int, int]] = {}

    def key(t: torch.Tensor) -> tuple[int, int]:
        keep.append(t)
        return id(t), t._version

    def read(name: str, args: tuple) -> None:  # before the call: an in-place layer changes its input's version
        if args and isinstance(args[0], torch.Tensor):
            reads.setdefault(key(args[0]), []).append(name)

    def wrote(name: str, out: object) -> None:
        if isinstance(out, torch.Tensor):
            output[name] = key(out)

    hooks = []
    for name in by_name:
        module = model.get_submodule(name)
        hooks.append(module.register_forward_pre_hook(lambda _m, args, name=name: read(name, args)))
        hooks.append(module.register_forward_hook(lambda _m, _a, out, name=name: wrote(name, out)))
    try:
        with torch.no_grad():  # not inference mode: its tensors keep no version counter
            model(x)
    finally:
        for h in hooks:
            h.remove()

    def single_reader(name: str, ok) -> str | None:
        """The layer that reads the value `name` wrote, if `ok` for it and no other layer reads that value."""
        readers = reads.get(output.get(name), [])
        return readers[0] if len(readers) == 1 and ok(model.get_submodule(readers[0])) else None

    absorbed: set[str] = set()
    for layer in layers:
        if layer.module in absorbed or not isinstance(model.get_submodule(layer.module), nn.Conv2d):
            continue
        norm = single_reader(layer.module, lambda m: isinstance(m, nn.modules.batchnorm._BatchNorm))
        act = single_reader(norm or layer.module, _is_activation)
        chain = [n for n in (norm, act) if n is not None]
        parts = [by_name[n] for n in chain if n not in absorbed]
        groups = tuple(dict.fromkeys(g for part in [layer, *parts] for g in part.groups))
        if parts and len(groups) <= MAX_TERM_GROUPS:
            layer.fused, layer.groups = tuple(parts), groups
            absorbed.update(p.module for p in parts)
    return [layer for layer in layers if layer.module not in absorbed]


def narrowed_unit(model: nn.Module, layer: TimedLayer, graph: GroupGraph, widths: dict[str, int]) -> nn.Module:
    """The layer (with the layers fused after it, in order) narrowed to `widths`: what a table times."""
    first = narrowed(model.get_submodule(layer.module), layer, graph, widths)
    if not layer.fused:
        return first
    return nn.Sequential(first, *(narrowed(model.get_submodule(f.module), f, graph, widths) for f in layer.fused))


def narrowed(module: nn.Module, layer: TimedLayer, graph: GroupGraph, widths: dict[str, int]) -> nn.Module:
    """A copy of the layer with each of its groups at `widths`, sliced as `surgery.prune_model` slices it."""
    narrow = copy.deepcopy(module)
    masks = graph.masks({g: graph[g].leading(w) for g, w in widths.items()})
    for member, channels in layer.roles:
        inner = (
            narrow if member.module == layer.module else narrow.get_submodule(member.module[len(layer.module) + 1 :])
        )
        handler_for(inner).slice(inner, member.role, torch.from_numpy(channels.kept(masks)))
    for m in narrow.modules():
        handler = handler_for(m)
        if handler is not None:
            handler.refresh(m)
    return narrow


__all__ = [
    'MAX_TERM_GROUPS',
    'TimedLayer',
    'timed_layers',
    'record_shapes',
    'fuse_following',
    'narrowed',
    'narrowed_unit',
]
