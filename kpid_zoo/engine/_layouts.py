"""Stage 3, first half, node by node: follow the channel layouts through a traced graph (`follow_layouts`).

Each node of the torch.fx graph is one kind of op (`_LayoutFollower.kind`): a layer, which its handler propagates
(`kpid_zoo.engine.handlers`), a layer called again, an elementwise merge, a concatenation, a split and the pieces
taken from it, a getitem, a channel-wise function or method, a shape query, or something not understood, whose
channels are fixed. One method per kind (`_STEPS`) updates the layouts the follower holds and the `TraceContext`
it fills; `kpid_zoo.engine.groups` turns that into channel groups.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError, one_line
from .handlers import ROLE_PARAM, handler_for
from .tracing import Layout, Opaque, TraceContext, Traced, TraceFailure, _channels, _ndim, is_timm_leaf, trace

__all__ = ['follow_layouts']

_CHANNELWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.silu,
    F.gelu,
    F.hardsigmoid,
    F.hardswish,
    F.sigmoid,
    F.mish,
    F.dropout,
    F.leaky_relu,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    F.avg_pool2d,
    F.max_pool2d,
    torch.flatten,
}
_CHANNELWISE_METHODS = {
    'relu',
    'relu_',
    'sigmoid',
    'sigmoid_',
    'tanh',
    'mean',
    'amax',
    'flatten',
    'contiguous',
    'clone',
    'to',
    'float',
    'type_as',
    'hardsigmoid',
    'hardswish',
    'clamp',
    'clamp_',
    'view_as',
}
# elementwise ops of two tensors: channel c of one operand meets channel c of the other
_MERGING_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
}
_MERGING_METHODS = {'add', 'add_', 'sub', 'sub_', 'mul', 'mul_', 'div', 'div_'}
_CONCAT_FUNCTIONS = {torch.cat, torch.concat}
_SPLIT_FUNCTIONS = {torch.split, torch.chunk, torch.tensor_split}
_SPLIT_METHODS = {'split', 'chunk', 'tensor_split'}


def follow_layouts(model: nn.Module, input_size: tuple[int, int, int]) -> Traced:
    """Trace `model` and follow its channel layouts, node by node (see the module docstring)."""
    try:
        gm = trace(model, input_size)
    except TraceFailure as e:  # the user needs to know which model, which module and why, in one line
        hint = ''
        if e.where.startswith('in '):
            kind = e.where.split('(', 1)[1].split(')', 1)[0]
            hint = f'; register a layer handler for {kind} (kpid_zoo.register_layer_handler) to trace it as one layer'
        raise UserError(
            f'cannot trace {type(model).__name__} with torch.fx to find its channel groups: {one_line(e, 400)}{hint}'
        ) from e
    follower = _LayoutFollower(dict(gm.named_modules()))
    for node in gm.graph.nodes:
        try:
            _STEPS[follower.kind(node)](follower, node)
        except (ValueError, IndexError, KeyError, TypeError) as e:  # a graph the steps cannot follow: say where
            stack = list(node.meta.get('nn_module_stack', {}))
            where = f' in {stack[-1]}' if stack else ''
            target = getattr(node.target, '__name__', node.target)
            raise UserError(
                f'cannot follow the channels of {type(model).__name__}: node {node.name} ({node.op} {target}){where}: '
                f'{one_line(e, 300)}'
            ) from e
        if node in follower.layout:
            # a module's output is the last value computed inside it (containers such as stages included)
            for module_name in node.meta.get('nn_module_stack', {}):
                follower.module_out[module_name] = follower.layout[node]
    return Traced(follower.ctx, follower.module_out, follower.global_pool)


class _LayoutFollower:
    """The layouts found so far, node by node, and one method per kind of node that extends them."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.ctx = TraceContext(modules)
        self.layout: dict[fx.Node, Layout] = {}
        self.parts: dict[fx.Node, list[Layout]] = {}  # the pieces of a split, for the getitems that take them
        self.params: dict[fx.Node, str] = {}  # get_attr nodes of parameters and buffers
        self.module_out: dict[str, Layout] = {}
        self.global_pool: Layout | None = None
        # (input layout, output layout) of each layer with parameters, from its first call
        self.first_call: dict[str, tuple[Layout, Layout]] = {}

    # -- which kind of node --------------------------------------------------------------------------------------
    def kind(self, node: fx.Node) -> str:
        """The key of `_STEPS` that handles `node`; the first that applies, in this order."""
        op, target = node.op, node.target
        if op in ('placeholder', 'output', 'get_attr'):
            return op
        if op == 'call_module':
            return 'module_again' if str(target) in self.first_call and self.tensor_args(node) else 'module'
        if op == 'call_function' and target in _MERGING_FUNCTIONS or op == 'call_method' and target in _MERGING_METHODS:
            return 'merge'
        if op == 'call_function' and target in _CONCAT_FUNCTIONS:
            return 'concat'
        if op == 'call_function' and target in _SPLIT_FUNCTIONS or op == 'call_method' and target in _SPLIT_METHODS:
            return 'split'
        if op == 'call_function' and target is operator.getitem and node.args[0] in self.parts:
            return 'split_piece'
        if op == 'call_function' and target is operator.getitem and self.layout_of(node.args[0]) is not None:
            return 'getitem'
        if (
            op == 'call_function'
            and target in _CHANNELWISE_FUNCTIONS
            or op == 'call_method'
            and target in _CHANNELWISE_METHODS
        ):
            return 'channelwise'
        if op == 'call_function' and target is getattr and node.args[1] in ('shape', 'dtype', 'device'):
            return 'shape_query'
        return 'unknown'

    # -- what the steps share ------------------------------------------------------------------------------------
    def layout_of(self, arg) -> Layout | None:
        return self.layout.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_args(self, node: fx.Node) -> list[Layout]:
        args = list(node.args) + list(node.kwargs.values())
        return [s for s in (self.layout_of(a) for a in _flatten(args)) if s is not None]

    def opaque(self, node: fx.Node, why: str) -> None:
        for s in self.tensor_args(node):
            self.ctx.block(s, why)
        c = _channels(node)
        if c is not None:
            self.layout[node] = self.ctx.new(c)
            self.ctx.block(self.layout[node], why)

    def passthrough(self, node: fx.Node, where: str) -> None:
        ins = self.tensor_args(node)
        if not ins:
            return self.opaque(node, f'{where}: no channelled input')
        c = _channels(node)
        if c is None or c != len(ins[0]):
            return self.opaque(node, f'{where}: changes the channel dimension')
        self.layout[node] = ins[0]

    @staticmethod
    def channel_dim(node: fx.Node, dim, default: int = 0) -> bool:
        ndim = _ndim(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else _ndim(node)
        dim = default if dim is None else dim
        return isinstance(dim, int) and ndim is not None and dim % ndim == 1

    # -- one step per kind of node -------------------------------------------------------------------------------
    def placeholder(self, node: fx.Node) -> None:
        c = _channels(node)
        if c is not None:
            self.layout[node] = self.ctx.new(c)
            self.ctx.block(self.layout[node], 'network input')

    def output(self, node: fx.Node) -> None:
        for s in self.tensor_args(node):
            self.ctx.block(s, 'network output')

    def get_attr(self, node: fx.Node) -> None:
        self.params[node] = str(node.target)

    def module_again(self, node: fx.Node) -> None:
        # A module called again holds the same filters: slicing its input once must fit every call, and its
        # outputs are the same channels. So its input layouts become one, and so do its output layouts.
        name, (x_first, y_first) = str(node.target), self.first_call[str(node.target)]
        x_again = self.tensor_args(node)[0]
        if len(x_again) == len(x_first):
            self.ctx.merge(x_first, x_again, f'{name} (called more than once)')
        else:  # a layer that takes any width (some custom module): nothing can tie the two calls
            for s in (x_first, x_again, y_first):
                self.ctx.block(s, f'{name}: called more than once on inputs of different widths')
        self.layout[node] = y_first

    def module(self, node: fx.Node) -> None:
        mod, name = self.modules[node.target], str(node.target)
        ins = self.tensor_args(node)
        handler = handler_for(mod)
        if handler is None and is_timm_leaf(mod):
            why = 'is traced as one layer (timm marks it not traceable) and has no layer handler'
            self.opaque(node, f'{name}: {type(mod).__name__} {why}')
        elif handler is None or not ins:
            self.opaque(node, f'{name}: {type(mod).__name__} is not understood channel by channel')
        else:
            self.ctx.ndim = _ndim(node.args[0]) or 4
            try:
                y = handler.propagate(self.ctx, name, mod, ins[0])
            except Opaque as e:
                y = None
                self.opaque(node, str(e))
            if y is not None:
                if _channels(node) is not None and len(y) != _channels(node):
                    self.opaque(node, f'{name}: changes the channel dimension')
                else:
                    self.layout[node] = y
            if name.endswith('global_pool'):
                self.global_pool = ins[0]
        if ins and node in self.layout and any(True for _ in mod.parameters()):
            self.first_call[name] = (ins[0], self.layout[node])

    def merge(self, node: fx.Node) -> None:
        """An elementwise op of tensors (and perhaps a bare per-channel parameter)."""
        c_out = _channels(node)
        ndim = len(node.meta['tensor_meta'].shape) if hasattr(node.meta.get('tensor_meta'), 'shape') else None
        for arg in node.args:
            if arg in self.params and c_out is not None and ndim is not None:
                p_layout = _parameter_layout(self.ctx, self.params[arg], self.modules, node, c_out, ndim)
                if p_layout is not None:
                    self.layout[arg] = p_layout
        # an operand with one channel is broadcast (e.g. a spatial attention map): it ties nothing
        ins = [s for s in self.tensor_args(node) if len(s) == c_out]
        if ins:
            self.layout[node] = ins[0]
            for s in ins[1:]:
                self.ctx.merge(ins[0], s, f'{node.name} ({node.target})')
        elif self.tensor_args(node):
            self.opaque(node, f'{node.name}: {node.target} of tensors whose channels do not line up')

    def concat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get('tensors', ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim', 0)
        ins = [self.layout_of(t) for t in tensors]
        if any(s is None for s in ins) or not ins:
            self.opaque(node, f'{node.name}: concatenates tensors without channels')
        elif self.channel_dim(node, dim):
            self.layout[node] = self.ctx.concat(ins)
        else:  # along another dimension: channel c of every input is channel c of the output
            for s in ins[1:]:
                self.ctx.merge(ins[0], s, f'{node.name} (cat on dim {dim})')
            self.layout[node] = ins[0]

    def split(self, node: fx.Node) -> None:
        x = self.layout_of(node.args[0])
        if x is None:
            return self.opaque(node, f'{node.name}: splits a tensor without channels')
        how = (
            node.args[1] if len(node.args) > 1 else node.kwargs.get('split_size_or_sections', node.kwargs.get('chunks'))
        )
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get('dim', 0)
        n_out = len(node.meta['tensor_meta']) if isinstance(node.meta.get('tensor_meta'), (list, tuple)) else None
        if not self.channel_dim(node, dim):
            self.parts[node] = [x] * (n_out or 1)  # every piece has all the channels
            return
        if node.target in (torch.chunk, 'chunk') and isinstance(how, int) and len(x) % how == 0:
            # chunk cuts whatever the width is in equal parts: the pruned net cuts the same channels if each part
            # keeps as many
            self.ctx.balance(x, how, f'{node.name}: chunks the channels in {how}')
            step = len(x) // how
            self.parts[node] = [x[i * step : (i + 1) * step] for i in range(how)]
            return
        # split sizes written into the code stay the parent's in the pruned net
        why = (
            f'{node.name}: {getattr(node.target, "__name__", node.target)} cuts the channels at sizes fixed in the '
            f'code; register a handler for the module that owns them (kpid_zoo.register_layer_handler)'
        )
        self.ctx.block(x, why)
        sizes = [int(m.shape[1]) for m in node.meta['tensor_meta']] if n_out else []
        self.parts[node] = [self.ctx.opaque(None, node.name, why.split(': ', 1)[1], s) for s in sizes]

    def split_piece(self, node: fx.Node) -> None:
        pieces = self.parts[node.args[0]]
        if isinstance(node.args[1], int) and -len(pieces) <= node.args[1] < len(pieces):
            self.layout[node] = pieces[node.args[1]]
        else:
            self.opaque(node, f'{node.name}: takes {node.args[1]!r} of a split')

    def getitem(self, node: fx.Node) -> None:
        why = _slices_channels(node)
        if why:
            self.opaque(node, f'{node.name}: {why}')
        else:
            self.passthrough(node, node.name)

    def channelwise(self, node: fx.Node) -> None:
        if _reduces_channels(node):
            self.opaque(node, f'{node.name}: reduces over channels')
        else:
            self.passthrough(node, node.name)

    def shape_query(self, node: fx.Node) -> None:
        pass  # x.shape, x.dtype, x.device: no channels

    def unknown(self, node: fx.Node) -> None:
        self.opaque(node, f'{node.name}: {node.op} {getattr(node.target, "__name__", node.target)} is not understood')


# the step for each kind of node (`_LayoutFollower.kind`)
_STEPS: dict[str, Callable[[_LayoutFollower, fx.Node], None]] = {
    'placeholder': _LayoutFollower.placeholder,
    'output': _LayoutFollower.output,
    'get_attr': _LayoutFollower.get_attr,
    'module_again': _LayoutFollower.module_again,
    'module': _LayoutFollower.module,
    'merge': _LayoutFollower.merge,
    'concat': _LayoutFollower.concat,
    'split': _LayoutFollower.split,
    'split_piece': _LayoutFollower.split_piece,
    'getitem': _LayoutFollower.getitem,
    'channelwise': _LayoutFollower.channelwise,
    'shape_query': _LayoutFollower.shape_query,
    'unknown': _LayoutFollower.unknown,
}


def _parameter_layout(
    ctx: TraceContext, qualname: str, modules: dict, node: fx.Node, channels: int, ndim: int
) -> Layout | None:
    """A bare parameter broadcast against an activation: per channel if it varies along the channel axis only."""
    owner, _, attr = qualname.rpartition('.')
    t = getattr(modules[owner] if owner else modules[''], attr)
    shape = tuple(t.shape)
    if all(s == 1 for s in shape):
        return None  # a scalar: it ties nothing
    dim = 1 - (ndim - len(shape))  # broadcasting aligns the trailing dimensions
    if 0 <= dim < len(shape) and shape[dim] == channels and all(s == 1 for i, s in enumerate(shape) if i != dim):
        if not isinstance(t, nn.Parameter):
            return ctx.opaque(
                None,
                node.name,
                f'buffer {qualname} of shape {shape} is per channel, and no handler slices buffers outside layers',
                channels,
            )
        ctx.param_dims[qualname] = dim
        out = ctx.new(channels)
        ctx.member(out, qualname, ROLE_PARAM)
        return out
    return ctx.opaque(
        None,
        node.name,
        f'{qualname} of shape {shape} meets {channels} channels, and is not one value per channel',
        channels,
    )


def _slices_channels(node: fx.Node) -> str:
    """Why a getitem on a tensor is not a plain pass-through of its channels ("" when it is)."""
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    if len(index) < 2 or Ellipsis in index[:2] or index[0] != slice(None):
        return 'indexes a tensor in a way that may move its channel dimension'
    s, c = index[1], _channels(node.args[0])
    if not isinstance(s, slice) or not all(v is None or isinstance(v, int) for v in (s.start, s.stop, s.step)):
        return 'indexes the channel dimension'
    if (s.start or 0) == 0 and (s.step or 1) == 1 and (s.stop is None or (c is not None and s.stop >= c)):
        return ''  # keeps every channel, and still will when there are fewer
    return f'slices channels [{s.start}:{s.stop}:{s.step}] with constants of the code'


def _reduces_channels(node: fx.Node) -> bool:
    if node.target not in ('mean', 'amax'):
        return False
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim')
    dims = (dims,) if isinstance(dims, int) else tuple(dims or ())
    ndim = len(node.args[0].meta['tensor_meta'].shape)
    return not dims or any(d % ndim == 1 for d in dims)


def _flatten(args: Iterable) -> Iterable:
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flatten(a)
        elif isinstance(a, dict):
            yield from _flatten(a.values())
        else:
            yield a
