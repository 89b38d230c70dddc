"""Stage 3: discover the channel groups of a network from its traced graph.

A *channel space* is the channel dimension of one tensor in the graph. Operations that keep channels aligned
(BN, activations, pooling, residual adds, depthwise convs, squeeze-excite gating) merge the spaces of their inputs
and output; a dense conv or linear layer starts a new space. Each merged space is a group: removing channel `c`
from it removes `c` from every member (the producing convs' filters, the BNs, the depthwise filters and the
consumers' input slices) at once, so the pruned network keeps its structure.

Nothing here is specific to one architecture: the rules are per operation, applied to a torch.fx trace.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp
from timm.layers import (DropPath, ScaledStdConv2d, ScaledStdConv2dSame, SelectAdaptivePool2d, StdConv2d,
                         StdConv2dSame)
from timm.layers import activations as timm_act, activations_me as timm_act_me
from timm.layers._fx import get_notrace_functions

ROLE_OUT = "out"    # output channels of a dense conv / linear (dim 0 of its weight)
ROLE_IN = "in"      # input channels of a dense conv / linear (dim 1 of its weight)
ROLE_DW = "dw"      # a depthwise conv: its input and output channels are the same channels
ROLE_NORM = "norm"  # a batch norm's features

# Modules that act channel by channel: channel c of the output depends only on channel c of the input.
_CHANNELWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Hardsigmoid, nn.Hardswish, nn.Tanh, nn.LeakyReLU,
    nn.PReLU, nn.ELU, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout2d,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten,
    SelectAdaptivePool2d, DropPath,
) + tuple(
    cls for mod in (timm_act, timm_act_me) for cls in vars(mod).values()
    if isinstance(cls, type) and issubclass(cls, nn.Module)
)
_CHANNELWISE_FUNCTIONS = {
    F.relu, F.relu6, F.silu, F.gelu, F.hardsigmoid, F.hardswish, F.sigmoid, F.mish, F.dropout, F.leaky_relu,
    torch.relu, torch.sigmoid, torch.tanh, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d,
    F.max_pool2d, torch.flatten,
}
_CHANNELWISE_METHODS = {
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "mean", "amax", "flatten", "contiguous", "clone", "to",
    "float", "type_as", "hardsigmoid", "hardswish", "clamp", "clamp_", "view_as",
}
# elementwise ops of two tensors: channel c of one operand meets channel c of the other
_MERGING_FUNCTIONS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                      operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_MERGING_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
# convs that normalise each filter over its inputs: removing an input channel changes every output
_WEIGHT_STANDARDIZED = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)


@dataclass(frozen=True)
class Member:
    """One place where a group's channels live: a module and which of its dimensions."""
    module: str
    role: str


@dataclass
class ChannelGroup:
    """Channels that must be kept or removed together."""
    name: str
    size: int
    members: tuple[Member, ...]
    prunable: bool
    reason: str = ""

    def modules(self, role: str | None = None) -> list[str]:
        return [m.module for m in self.members if role is None or m.role == role]


@dataclass
class GroupGraph:
    """All channel groups of a model, in graph order, plus where each module's output channels live."""
    groups: list[ChannelGroup]
    module_out_group: dict[str, str] = field(default_factory=dict)
    global_pool_group: str | None = None

    def __post_init__(self) -> None:
        self._by_name = {g.name: g for g in self.groups}

    def __getitem__(self, name: str) -> ChannelGroup:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no channel group named {name!r}; groups are named by their first producer, "
                           f"e.g. {self.groups[0].name!r}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]


class _Tracer(fx.Tracer):
    """Keeps the layers whose channel semantics we know as leaves, and timm's untraceable helpers opaque."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm) + _CHANNELWISE_MODULES):
            return True
        return super().is_leaf_module(m, qualname)


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = []

    def make(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the earlier space stays the root: names follow graph order
        return min(ra, rb)


class _Spaces:
    """Channel spaces with their sizes, members and the reasons some cannot be pruned."""

    def __init__(self) -> None:
        self.uf = _UnionFind()
        self.size: dict[int, int] = {}
        self.members: dict[int, list[Member]] = {}
        self.blocked: dict[int, str] = {}

    def new(self, size: int) -> int:
        s = self.uf.make()
        self.size[s], self.members[s] = size, []
        return s

    def merge(self, a: int, b: int, where: str) -> int:
        ra, rb = self.uf.find(a), self.uf.find(b)
        if ra == rb:
            return ra
        if self.size[ra] != self.size[rb]:
            raise ValueError(f"{where}: ties channel spaces of different sizes ({self.size[ra]} vs {self.size[rb]})")
        root = self.uf.union(ra, rb)
        other = rb if root == ra else ra
        self.members[root] += self.members.pop(other)
        if other in self.blocked:
            self.blocked.setdefault(root, self.blocked.pop(other))
        return root

    def add_member(self, s: int, member: Member) -> None:
        self.members[self.uf.find(s)].append(member)

    def block(self, s: int, reason: str) -> None:
        self.blocked.setdefault(self.uf.find(s), reason)


def _channels(node_or_value) -> int | None:
    meta = getattr(node_or_value, "meta", {}).get("tensor_meta") if isinstance(node_or_value, fx.Node) else None
    if meta is None or not hasattr(meta, "shape") or len(meta.shape) < 2:
        return None
    return int(meta.shape[1])


def trace(model: nn.Module, input_size: tuple[int, int, int]) -> fx.GraphModule:
    """Symbolic trace with shapes propagated on one real (zero) batch."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    was_training = gm.training
    gm.eval()
    param = next(model.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, "cpu")
    with torch.no_grad():
        ShapeProp(gm).propagate(torch.zeros(1, *input_size, dtype=dtype, device=device))
    gm.train(was_training)
    return gm


def discover_groups(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> GroupGraph:
    """Trace `model` and return its channel groups (see the module docstring for the rules)."""
    try:
        gm = trace(model, input_size)
    except Exception as e:  # fx raises many kinds; the user needs to know which model and why
        raise ValueError(f"cannot trace {type(model).__name__} with torch.fx to find its channel groups: {e}") from e
    modules = dict(gm.named_modules())
    spaces = _Spaces()
    node_space: dict[fx.Node, int] = {}
    module_out_space: dict[str, int] = {}
    global_pool_space: int | None = None
    # (input space, output space) of each layer with per-channel parameters, from its first call
    first_call: dict[str, tuple[int, int]] = {}

    def space_of(arg) -> int | None:
        return node_space.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_args(node: fx.Node) -> list[int]:
        args = list(node.args) + list(node.kwargs.values())
        return [s for s in (space_of(a) for a in _flatten(args)) if s is not None]

    def opaque(node: fx.Node, why: str) -> None:
        for s in tensor_args(node):
            spaces.block(s, why)
        c = _channels(node)
        if c is not None:
            node_space[node] = spaces.new(c)
            spaces.block(node_space[node], why)

    def passthrough(node: fx.Node, where: str) -> None:
        ins = tensor_args(node)
        if not ins:
            return opaque(node, f"{where}: no channelled input")
        c = _channels(node)
        if c is None or c != spaces.size[spaces.uf.find(ins[0])]:
            return opaque(node, f"{where}: changes the channel dimension")
        node_space[node] = ins[0]

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            c = _channels(node)
            if c is not None:
                node_space[node] = spaces.new(c)
                spaces.block(node_space[node], "network input")
        elif node.op == "output":
            for s in tensor_args(node):
                spaces.block(s, "network output")
        elif node.op == "get_attr":
            continue
        elif node.op == "call_module" and str(node.target) in first_call and tensor_args(node):
            # A module called again holds the same filters: slicing its input once must fit every call, and its
            # outputs are the same channels. So its input spaces become one, and so do its output spaces.
            name, (s_in, s_out) = str(node.target), first_call[str(node.target)]
            s_again = tensor_args(node)[0]
            if spaces.size[spaces.uf.find(s_again)] == spaces.size[spaces.uf.find(s_in)]:
                spaces.merge(s_in, s_again, f"{name} (called more than once)")
            else:  # a layer that takes any width (some custom module): nothing can tie the two calls
                for s in (s_in, s_again, s_out):
                    spaces.block(s, f"{name}: called more than once on inputs of different widths")
            node_space[node] = s_out
        elif node.op == "call_module":
            mod, name = modules[node.target], str(node.target)
            ins = tensor_args(node)
            if isinstance(mod, nn.Conv2d):
                _conv(spaces, node_space, node, mod, name, ins[0])
            elif isinstance(mod, nn.Linear):
                c = _channels(node.args[0])
                if c != mod.in_features or len(node.args[0].meta["tensor_meta"].shape) != 2:
                    opaque(node, f"{name}: linear layer on a tensor that is not (batch, channels)")
                else:
                    spaces.add_member(ins[0], Member(name, ROLE_IN))
                    node_space[node] = spaces.new(mod.out_features)
                    spaces.add_member(node_space[node], Member(name, ROLE_OUT))
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
                spaces.add_member(ins[0], Member(name, ROLE_NORM))
                node_space[node] = ins[0]
            elif isinstance(mod, _CHANNELWISE_MODULES):
                passthrough(node, name)
                if name.endswith("global_pool") and ins:
                    global_pool_space = ins[0]
            else:
                opaque(node, f"{name}: {type(mod).__name__} is not understood channel by channel")
            if ins and node in node_space and any(True for _ in mod.parameters(recurse=False)):
                first_call[name] = (ins[0], node_space[node])
        elif node.op == "call_function" and node.target in _MERGING_FUNCTIONS or \
                node.op == "call_method" and node.target in _MERGING_METHODS:
            # an operand with one channel is broadcast (e.g. a spatial attention map): it ties nothing
            c_out = _channels(node)
            ins = [s for s in tensor_args(node) if spaces.size[spaces.uf.find(s)] == c_out]
            if ins:
                node_space[node] = ins[0]
                for s in ins[1:]:
                    node_space[node] = spaces.merge(node_space[node], s, f"{node.name} ({node.target})")
            elif tensor_args(node):
                opaque(node, f"{node.name}: {node.target} of tensors whose channels do not line up")
        elif node.op == "call_function" and node.target in _CHANNELWISE_FUNCTIONS or \
                node.op == "call_method" and node.target in _CHANNELWISE_METHODS:
            if _reduces_channels(node):
                opaque(node, f"{node.name}: reduces over channels")
            else:
                passthrough(node, node.name)
        elif node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "dtype", "device"):
            continue
        else:
            opaque(node, f"{node.name}: {node.op} {getattr(node.target, '__name__', node.target)} is not understood")
        if node in node_space:
            # a module's output is the last value computed inside it (containers such as stages included)
            for module_name in node.meta.get("nn_module_stack", {}):
                module_out_space[module_name] = node_space[node]

    by_root = _collect_groups(spaces)
    module_out_group = {m: by_root[spaces.uf.find(s)].name for m, s in module_out_space.items()
                        if spaces.uf.find(s) in by_root}
    pool_group = by_root.get(spaces.uf.find(global_pool_space)) if global_pool_space is not None else None
    return GroupGraph(list(by_root.values()), module_out_group, pool_group.name if pool_group else None)


def _reduces_channels(node: fx.Node) -> bool:
    if node.target not in ("mean", "amax"):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    ndim = len(node.args[0].meta["tensor_meta"].shape)
    return not dims or any(d % ndim == 1 for d in dims)


def _conv(spaces: _Spaces, node_space: dict, node: fx.Node, conv: nn.Conv2d, name: str, s_in: int) -> None:
    if isinstance(conv, _WEIGHT_STANDARDIZED):
        spaces.block(s_in, f"{name}: {type(conv).__name__} standardises filters over their input channels")
        node_space[node] = spaces.new(conv.out_channels)
        spaces.add_member(node_space[node], Member(name, ROLE_OUT))
    elif conv.groups == 1:
        spaces.add_member(s_in, Member(name, ROLE_IN))
        node_space[node] = spaces.new(conv.out_channels)
        spaces.add_member(node_space[node], Member(name, ROLE_OUT))
    elif conv.groups == conv.in_channels == conv.out_channels:
        spaces.add_member(s_in, Member(name, ROLE_DW))
        node_space[node] = s_in
    else:
        why = f"{name}: grouped conv (groups={conv.groups}) is pruned only as a whole"
        spaces.block(s_in, why)
        node_space[node] = spaces.new(conv.out_channels)
        spaces.block(node_space[node], why)


def _collect_groups(spaces: _Spaces) -> dict[int, ChannelGroup]:
    """One group per root space that some conv or linear layer produces, keyed by root, in graph order."""
    groups = {}
    for root in sorted({spaces.uf.find(s) for s in spaces.size}):
        members = tuple(spaces.members[root])
        producers = [m for m in members if m.role == ROLE_OUT]
        if not producers:
            continue  # input/logit spaces and spaces fed only by opaque ops have nothing to prune
        reason = spaces.blocked.get(root, "")
        groups[root] = ChannelGroup(producers[0].module, spaces.size[root], members, not reason, reason)
    return groups


def _flatten(args: Iterable) -> Iterable:
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flatten(a)
        elif isinstance(a, dict):
            yield from _flatten(a.values())
        else:
            yield a
