"""Stage 3, first half, node by node: follow the channel layouts through a traced graph (`follow_layouts`).

Each node of the torch.fx graph is one kind of op (`_LayoutFollower.kind`): a layer, which its handler propagates
(`kpid_zoo.engine.handlers`), a layer called again, an elementwise merge, a concatenation, a split and the pieces
taken from it, a getitem, a channel-wise function or method, a shape query, or something not understood, whose
channels are fixed. One method per kind (`_STEPS`) updates the layouts the follower holds and the `TraceContext`
it fills; `kpid_zoo.engine.groups` turns that into channel groups.
"""

from __future__ import annotations

import math
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
# -- ops that move or merge axes: the channels are followed to wherever they land (channels-last tensors) --
_AXES_METHODS = {
    'permute',
    'transpose',
    'reshape',
    'view',
    'flatten',
    'squeeze',
    'unsqueeze',
    'expand',
    'view_as',
    'reshape_as',
    'expand_as',
}
_AXES_FUNCTIONS = {torch.permute, torch.transpose, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze}
# what a parameter may go through on its way to an activation (`self.gamma.reshape(1, -1, 1, 1)`)
_PARAM_VIEW_METHODS = _AXES_METHODS | {'to', 'float', 'double', 'half', 'type_as', 'contiguous', 'clone'}
# channel-wise functions that read NCHW maps: the channels must be on dim 1
_SPATIAL_FUNCTIONS = {F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.avg_pool2d, F.max_pool2d}
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
        # the dimension that holds the channels of each layout (1 unless an op moved it: channels-last tensors)
        self.cdim: dict[fx.Node, int] = {}
        # a parameter, or a view of one: its name, and the parameter's dimension at each of the view's (None: new)
        self.param_view: dict[fx.Node, tuple[str, tuple[int | None, ...]]] = {}
        self.literal_views: dict[fx.Node, str] = {}  # views of a parameter sized with constants of the code
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
        if self.is_param_view(node):
            return 'param_view'
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
            op == 'call_method' and target in _AXES_METHODS or op == 'call_function' and target in _AXES_FUNCTIONS
        ) and (node.args and self.layout_of(node.args[0]) is not None):
            return 'axes'
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
        return [self.layout[a] for a in self.tensor_nodes(node)]

    def tensor_nodes(self, node: fx.Node) -> list[fx.Node]:
        args = list(node.args) + list(node.kwargs.values())
        return [a for a in _flatten(args) if self.layout_of(a) is not None]

    def cdim_of(self, node: fx.Node) -> int:
        return self.cdim.get(node, 1)

    def set_layout(self, node: fx.Node, layout: Layout, cdim: int) -> None:
        self.layout[node] = layout
        self.cdim[node] = cdim

    def opaque(self, node: fx.Node, why: str) -> None:
        ins = self.tensor_nodes(node)
        for a in ins:
            self.ctx.block(self.layout[a], why)
        shape = _shape(node)
        cdim = self.cdim_of(ins[0]) if ins else 1
        cdim = cdim if shape is not None and cdim < len(shape) else 1
        if shape is not None and len(shape) > cdim:
            self.set_layout(node, self.ctx.new(int(shape[cdim])), cdim)
            self.ctx.block(self.layout[node], why)

    def passthrough(self, node: fx.Node, where: str, cdim: int | None = None) -> None:
        """The output holds the first input's channels, on `cdim` (default: the dimension they were on)."""
        ins = self.tensor_nodes(node)
        if not ins:
            return self.opaque(node, f'{where}: no channelled input')
        cdim = self.cdim_of(ins[0]) if cdim is None else cdim
        shape = _shape(node)
        if shape is None or cdim >= len(shape) or shape[cdim] != len(self.layout[ins[0]]):
            return self.opaque(node, f'{where}: changes the channel dimension')
        self.set_layout(node, self.layout[ins[0]], cdim)

    def channel_dim(self, node: fx.Node, dim, default: int = 0) -> bool:
        """Whether `dim` of the node's first input is the dimension holding its channels."""
        src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        if src is None and node.args and isinstance(node.args[0], (list, tuple)) and node.args[0]:
            src = node.args[0][0]  # torch.cat((a, b), dim)
        ndim = _ndim(src) if isinstance(src, fx.Node) else _ndim(node)
        dim = default if dim is None else dim
        return isinstance(dim, int) and ndim is not None and dim % ndim == self.cdim_of(src)

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
        shape = _shape(node)
        if shape is not None:
            self.param_view[node] = (str(node.target), tuple(range(len(shape))))

    def module_again(self, node: fx.Node) -> None:
        # A module called again holds the same filters: slicing its input once must fit every call, and its
        # outputs are the same channels. So its input layouts become one, and so do its output layouts.
        name, (x_first, y_first) = str(node.target), self.first_call[str(node.target)]
        x_node = self.tensor_nodes(node)[0]
        x_again = self.layout[x_node]
        if len(x_again) == len(x_first):
            self.ctx.merge(x_first, x_again, f'{name} (called more than once)')
        else:  # a layer that takes any width (some custom module): nothing can tie the two calls
            for s in (x_first, x_again, y_first):
                self.ctx.block(s, f'{name}: called more than once on inputs of different widths')
        self.set_layout(node, y_first, self.cdim_of(x_node))

    def module(self, node: fx.Node) -> None:
        mod, name = self.modules[node.target], str(node.target)
        in_nodes = self.tensor_nodes(node)
        ins = [self.layout[a] for a in in_nodes]
        handler = handler_for(mod)
        cdim = self.cdim_of(in_nodes[0]) if in_nodes else 1
        if handler is None and is_timm_leaf(mod):
            why = 'is traced as one layer (timm marks it not traceable) and has no layer handler'
            self.opaque(node, f'{name}: {type(mod).__name__} {why}')
        elif handler is None or not ins:
            self.opaque(node, f'{name}: {type(mod).__name__} is not understood channel by channel')
        elif cdim != 1 and not handler.any_channel_dim:
            self.opaque(
                node, f'{name}: {type(mod).__name__} reads channels on dim 1, but they are on dim {cdim} of its input'
            )
        else:
            self.ctx.ndim = _ndim(in_nodes[0]) or 4
            self.ctx.cdim = cdim
            try:
                y = handler.propagate(self.ctx, name, mod, ins[0])
            except Opaque as e:
                y = None
                self.opaque(node, str(e))
            if y is not None:
                shape = _shape(node)
                if shape is not None and (cdim >= len(shape) or len(y) != shape[cdim]):
                    self.opaque(node, f'{name}: changes the channel dimension')
                else:
                    self.set_layout(node, y, cdim)
            if name.endswith('global_pool'):
                self.global_pool = ins[0]
        if ins and node in self.layout and any(True for _ in mod.parameters()):
            self.first_call[name] = (ins[0], self.layout[node])

    def merge(self, node: fx.Node) -> None:
        """An elementwise op of tensors (and perhaps a parameter broadcast against them, e.g. `x * self.gamma`)."""
        shape = _shape(node)
        acts = self.tensor_nodes(node)
        if shape is None:
            return self.opaque(node, f'{node.name}: {node.target} of tensors gives no tensor') if acts else None
        nd = len(shape)
        # broadcasting aligns the trailing dimensions: where each operand's channels land in the output
        aligned = [(a, self.cdim_of(a) + nd - (_ndim(a) or nd)) for a in acts]
        main = next(((a, d) for a, d in aligned if 0 <= d < nd and shape[d] == len(self.layout[a]) > 1), None)
        main = main or next(((a, d) for a, d in aligned if 0 <= d < nd and shape[d] == len(self.layout[a])), None)
        if main is None:
            if acts:
                self.opaque(node, f'{node.name}: {node.target} of tensors whose channels do not line up')
            else:
                self.taint_params(node)
            return
        cdim = main[1]
        ins = []
        for a, d in aligned:
            if d == cdim and len(self.layout[a]) == shape[cdim]:
                ins.append(self.layout[a])
            elif len(self.layout[a]) > 1:  # its channels would land on another dimension of the output
                self.ctx.block(self.layout[a], f'{node.name}: {node.target} of tensors whose channels do not line up')
        for arg in _flatten(list(node.args) + list(node.kwargs.values())):
            if isinstance(arg, fx.Node) and arg in self.param_view and arg not in self.layout:
                p_layout = self.param_layout(arg, node, cdim, nd)
                if p_layout is not None:
                    ins.append(p_layout)
        self.set_layout(node, ins[0], cdim)
        for s in ins[1:]:
            self.ctx.merge(ins[0], s, f'{node.name} ({node.target})')

    def param_layout(self, view: fx.Node, node: fx.Node, cdim: int, ndim: int) -> Layout | None:
        """The layout of a parameter (or a view of it) broadcast against activations whose channels are on `cdim` of
        the `ndim` dimensions of `node`'s output (None: it holds no channels, e.g. a scalar)."""
        qualname, dims = self.param_view[view]
        at = cdim - (ndim - len(dims))  # the view's dimension that meets the channels
        shape = _shape(view)
        dim = dims[at] if 0 <= at < len(dims) else None
        if shape is not None and (at < 0 or at >= len(dims) or shape[at] == 1):
            dim = -1  # broadcast along the channels: one value for all of them
        elif view in self.literal_views and dims[at] is not None:  # `gamma.view(1, 8, 1, 1)`: fits 8 channels only
            return self.ctx.opaque(None, node.name, self.literal_views[view].split(': ', 1)[1], _shape(node)[cdim])
        elif all(d is None for d in dims):
            why = f'{qualname} meets {_shape(node)[cdim]} channels through an op other than a view (reshape, a cast...)'
            return self.ctx.opaque(None, node.name, why, _shape(node)[cdim])
        return _parameter_layout(self.ctx, qualname, self.modules, node, _shape(node)[cdim], dim, cdim == ndim - 1)

    def concat(self, node: fx.Node) -> None:
        tensors = node.args[0] if node.args else node.kwargs.get('tensors', ())
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim', 0)
        acts = [t for t in tensors if self.layout_of(t) is not None]
        shape = _shape(node)
        if (
            not acts
            or shape is None
            or any(self.layout_of(t) is None and not (isinstance(t, fx.Node) and t in self.param_view) for t in tensors)
        ):
            return self.opaque(node, f'{node.name}: concatenates tensors without channels')
        cdim = self.cdim_of(acts[0])
        if any(self.cdim_of(t) != cdim for t in acts):
            return self.opaque(node, f'{node.name}: concatenates tensors whose channels are on different dimensions')
        if isinstance(dim, int) and dim % len(shape) == cdim:
            if len(acts) < len(tensors):  # a parameter's channels would be new ones, of no producer
                return self.opaque(node, f'{node.name}: concatenates a parameter along the channels')
            self.set_layout(node, self.ctx.concat([self.layout[t] for t in tensors]), cdim)
            return
        # along another dimension: channel c of every input is channel c of the output (a class token's too)
        ins = [self.layout[t] if t in acts else self.param_layout(t, node, cdim, len(shape)) for t in tensors]
        ins = [x for x in ins if x is not None]
        for x in ins[1:]:
            self.ctx.merge(ins[0], x, f'{node.name} (cat on dim {dim})')
        self.set_layout(node, ins[0], cdim)

    def split(self, node: fx.Node) -> None:
        x = self.layout_of(node.args[0])
        if x is None:
            return self.opaque(node, f'{node.name}: splits a tensor without channels')
        how = (
            node.args[1] if len(node.args) > 1 else node.kwargs.get('split_size_or_sections', node.kwargs.get('chunks'))
        )
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get('dim', 0)
        n_out = len(node.meta['tensor_meta']) if isinstance(node.meta.get('tensor_meta'), (list, tuple)) else None
        self.cdim[node] = cdim = self.cdim_of(node.args[0])  # the pieces' channels stay where they were
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
        sizes = [int(m.shape[cdim]) for m in node.meta['tensor_meta']] if n_out else []
        self.parts[node] = [self.ctx.opaque(None, node.name, why.split(': ', 1)[1], s) for s in sizes]

    def split_piece(self, node: fx.Node) -> None:
        pieces = self.parts[node.args[0]]
        if isinstance(node.args[1], int) and -len(pieces) <= node.args[1] < len(pieces):
            self.set_layout(node, pieces[node.args[1]], self.cdim_of(node.args[0]))
        else:
            self.opaque(node, f'{node.name}: takes {node.args[1]!r} of a split')

    def getitem(self, node: fx.Node) -> None:
        why, cdim = _indexed_channels(node, self.cdim_of(node.args[0]))
        if why:
            self.opaque(node, f'{node.name}: {why}')
        else:
            self.passthrough(node, node.name, cdim)

    def channelwise(self, node: fx.Node) -> None:
        cdim = self.cdim_of(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else 1
        if node.target in _SPATIAL_FUNCTIONS and cdim != 1:
            self.opaque(
                node, f'{node.name}: {node.target.__name__} pools dims 2, 3, but the channels are on dim {cdim}'
            )
        elif _reduces_channels(node, cdim):
            self.opaque(node, f'{node.name}: reduces over channels')
        else:
            self.passthrough(node, node.name, _reduced_cdim(node, cdim))

    def axes(self, node: fx.Node) -> None:
        """permute, transpose, reshape, view, flatten, (un)squeeze, expand: the channels move to another dimension,
        or stay whole where the op merges or splits only other dimensions."""
        src = node.args[0]
        to = _moved_dim(node, self.cdim_of(src), _shape(src), _shape(node), batch=True)
        if isinstance(to, str):
            return self.opaque(node, f'{node.name}: {node.target} {to}')
        if _literal_size(node, to):
            return self.opaque(node, f'{node.name}: {node.target} sizes the channels with a constant of the code')
        self.set_layout(node, self.layout[src], to)

    def is_param_view(self, node: fx.Node) -> bool:
        """A view of a parameter (reshape, expand, a dtype cast...) that no activation meets yet."""
        return (
            node.op in ('call_method', 'call_function')
            and bool(node.args)
            and isinstance(node.args[0], fx.Node)
            and node.args[0] in self.param_view
            and (node.target in _PARAM_VIEW_METHODS or node.target in _AXES_FUNCTIONS)
            and not self.tensor_nodes(node)
        )

    def param_view_step(self, node: fx.Node) -> None:
        src = node.args[0]
        qualname, dims = self.param_view[src]
        in_shape, out_shape = _shape(src), _shape(node)
        if in_shape is None or out_shape is None:
            return
        out: list[int | None] = [None] * len(out_shape)
        for i, p in enumerate(dims):
            to = _moved_dim(node, i, in_shape, out_shape, batch=False) if in_shape[i] > 1 else None
            if isinstance(to, int):
                out[to] = p
                if _literal_size(node, to):
                    self.literal_views[node] = (
                        f'{node.name}: {node.target} sizes {qualname} with a constant of the code'
                    )
        self.param_view[node] = (qualname, tuple(out))
        if src in self.literal_views:
            self.literal_views.setdefault(node, self.literal_views[src])

    def shape_query(self, node: fx.Node) -> None:
        pass  # x.shape, x.dtype, x.device: no channels

    def unknown(self, node: fx.Node) -> None:
        if not self.tensor_nodes(node) and self.taint_params(node):
            return  # computed from parameters alone: fixed where it meets activations
        self.opaque(node, f'{node.name}: {node.op} {getattr(node.target, "__name__", node.target)} is not understood')

    def taint_params(self, node: fx.Node) -> bool:
        """A tensor computed from parameters alone, by something other than a view (`self.gamma * 2`,
        `self.gamma.exp()`): where it meets activations, their channels are fixed (nothing says how to slice it)."""
        args = _flatten(list(node.args) + list(node.kwargs.values()))
        views = [a for a in args if isinstance(a, fx.Node) and a in self.param_view]
        shape = _shape(node)
        if views and shape is not None:
            self.param_view[node] = (self.param_view[views[0]][0], (None,) * len(shape))
        return bool(views)


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
    'axes': _LayoutFollower.axes,
    'param_view': _LayoutFollower.param_view_step,
    'shape_query': _LayoutFollower.shape_query,
    'unknown': _LayoutFollower.unknown,
}


def _parameter_layout(
    ctx: TraceContext, qualname: str, modules: dict, node: fx.Node, channels: int, dim: int | None, channels_last: bool
) -> Layout | None:
    """A parameter broadcast against activations of `channels` channels, its dimension `dim` meeting theirs (-1: it
    is broadcast along them, None: no dimension of its own meets them whole). Sliced with the channels if it holds
    one value per channel; on channels-last tensors (tokens) it may also vary along other dimensions (a position
    embedding: one vector per token)."""
    owner, _, attr = qualname.rpartition('.')
    t = getattr(modules[owner] if owner else modules[''], attr)
    shape = tuple(t.shape)
    if all(s == 1 for s in shape) or dim == -1:
        return None  # one value for every channel: it ties nothing
    per_channel = dim is not None and shape[dim] == channels
    if per_channel and not channels_last and any(s != 1 for i, s in enumerate(shape) if i != dim):
        per_channel = False  # on a feature map, a value per channel and position depends on the resolution
    if per_channel:
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


def _shape(node) -> tuple[int, ...] | None:
    meta = node.meta.get('tensor_meta') if isinstance(node, fx.Node) else None
    return tuple(int(d) for d in meta.shape) if meta is not None and hasattr(meta, 'shape') else None


def _moved_dim(node: fx.Node, dim: int, in_shape, out_shape, batch: bool) -> int | str:
    """Where dimension `dim` of the input of an axes op (permute, reshape...) lands in its output, whole; or why it
    does not (a string). With `batch`, the input is an activation whose dim 0 is the batch: a reshape must keep it
    in front (the trace runs one image, where a batch merged into other dims would look the same)."""
    if in_shape is None or out_shape is None:
        return 'gives no tensor shape'
    target = node.target if isinstance(node.target, str) else node.target.__name__
    nd = len(in_shape)
    args = list(node.args[1:])
    if target == 'permute':
        dims = node.kwargs.get('dims', args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
        if not all(isinstance(d, int) for d in dims) or len(dims) != nd:
            return 'permutes with dimensions not known when tracing'
        return [d % nd for d in dims].index(dim)
    if target == 'transpose':
        a, b = (args + [node.kwargs.get('dim0'), node.kwargs.get('dim1')])[:2]
        if not (isinstance(a, int) and isinstance(b, int)):
            return 'transposes dimensions not known when tracing'
        a, b = a % nd, b % nd
        return b if dim == a else a if dim == b else dim
    if target in ('expand', 'expand_as'):
        to = dim + len(out_shape) - nd
        return to if out_shape[to] == in_shape[dim] else 'expands the channel dimension'
    # reshape-like: the dimension stays whole where the elements before it and its size are unchanged
    before = math.prod(in_shape[:dim])
    for to in range(len(out_shape)):
        if math.prod(out_shape[:to]) == before and out_shape[to] == in_shape[dim]:
            if batch and dim > 0 and (to == 0 or out_shape[0] != in_shape[0]):
                return 'moves the batch dimension'
            return to
    return 'merges or splits the channel dimension'


def _literal_size(node: fx.Node, to: int) -> bool:
    """Whether a reshape, view or expand writes the size of its output's dimension `to` as a constant (which a
    pruned network, with fewer channels there, cannot meet), rather than -1 or a size read from a tensor."""
    target = node.target if isinstance(node.target, str) else node.target.__name__
    if target not in ('reshape', 'view', 'expand'):
        return False
    sizes = list(node.args[1:]) or list(node.kwargs.get('shape', node.kwargs.get('size', ())))
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
        sizes = list(sizes[0])
    shape = _shape(node)
    if shape is None or len(sizes) != len(shape):
        return False
    return isinstance(sizes[to], int) and sizes[to] > 1


def _indexed_channels(node: fx.Node, cdim: int) -> tuple[str, int]:
    """Why a getitem on a tensor is not a plain pass-through of its channels ("" when it is), and the dimension that
    holds them in the result."""
    index = node.args[1]
    index = index if isinstance(index, tuple) else (index,)
    shape = _shape(node.args[0])
    if shape is None or not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in index):
        return 'indexes a tensor in a way that may move its channel dimension', cdim
    if index.count(Ellipsis) > 1:
        return 'indexes a tensor in a way that may move its channel dimension', cdim
    real = sum(1 for i in index if i is not None and i is not Ellipsis)
    if Ellipsis in index:
        at = index.index(Ellipsis)
        index = index[:at] + (slice(None),) * (len(shape) - real) + index[at + 1 :]
    index = index + (slice(None),) * (len(shape) - real)
    dim = out = 0
    new_cdim = cdim
    for i in index:
        if i is None:
            out += 1
            continue
        if dim == cdim:
            if not isinstance(i, slice):
                return 'indexes the channel dimension', cdim
            if not all(v is None or isinstance(v, int) for v in (i.start, i.stop, i.step)):
                return 'indexes the channel dimension', cdim
            c = shape[cdim]
            if not ((i.start or 0) == 0 and (i.step or 1) == 1 and (i.stop is None or i.stop >= c)):
                return f'slices channels [{i.start}:{i.stop}:{i.step}] with constants of the code', cdim
            new_cdim = out  # keeps every channel, and still will when there are fewer
        dim += 1
        out += isinstance(i, slice)
    return '', new_cdim


def _reduction_dims(node: fx.Node) -> tuple[int, ...] | None:
    dims = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim')
    ndim = len(node.args[0].meta['tensor_meta'].shape)
    if dims is None:
        return None
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return tuple(d % ndim for d in dims)


def _reduces_channels(node: fx.Node, cdim: int = 1) -> bool:
    if node.target not in ('mean', 'amax'):
        return False
    dims = _reduction_dims(node)
    return not dims or cdim in dims


def _reduced_cdim(node: fx.Node, cdim: int) -> int:
    """Where the channels are after a channel-wise op: a reduction without keepdim drops the dims before them."""
    if node.target not in ('mean', 'amax') or node.kwargs.get('keepdim') or (len(node.args) > 2 and node.args[2]):
        return cdim
    return cdim - sum(1 for d in _reduction_dims(node) or () if d < cdim)


def _flatten(args: Iterable) -> Iterable:
    for a in args:
        if isinstance(a, (list, tuple)):
            yield from _flatten(a)
        elif isinstance(a, dict):
            yield from _flatten(a.values())
        else:
            yield a
