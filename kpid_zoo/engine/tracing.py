"""Stage 3, first half: trace a network with torch.fx and follow the channel layouts through its graph.

Every channel a layer produces is an *element*; the channel dimension of each tensor in the graph is a *layout*,
the element at each of its positions. What each layer does to layouts is its handler's business
(`kpid_zoo.engine.handlers`, one per layer type, extensible with `register_layer_handler`); this module applies the
handlers, and the rules for torch functions and methods (channel-wise ops, elementwise merges, concatenations,
splits, slices), node by node. `follow_layouts` returns the `TraceContext` it filled: which elements are tied,
which layouts each module's dimensions hold, what is blocked, inexact or balanced; `kpid_zoo.engine.groups` turns that
into channel groups.
"""

from __future__ import annotations

import contextlib
import io
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from timm.layers._fx import get_notrace_functions
from torch.fx.passes.shape_prop import ShapeProp

from ..core.threads import fixed_threads
from .handlers import ROLE_OUT, ROLE_PARAM, handler_for

Layout = np.ndarray  # int64: the element at each position of a channel dimension

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


@dataclass(frozen=True)
class Member:
    """One place where a group's channels live: a module (or a bare parameter, for role "param") and which of its
    dimensions."""

    module: str
    role: str


class _Tracer(fx.Tracer):
    """Keeps the layers that have a handler as leaves, and timm's untraceable helpers opaque."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return handler_for(m) is not None or super().is_leaf_module(m, qualname)


class Elements:
    """Union-find over channel elements, on numpy arrays so that a merge of two layouts is a few vector ops."""

    def __init__(self) -> None:
        self.parent = np.zeros(0, dtype=np.int64)

    def new(self, n: int) -> np.ndarray:
        start = len(self.parent)
        self.parent = np.concatenate([self.parent, np.arange(start, start + n)])
        return np.arange(start, start + n)

    def find(self, ids: np.ndarray) -> np.ndarray:
        roots = self.parent[ids]
        while True:
            up = self.parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        self.parent[ids] = roots
        return roots

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        while True:
            ra, rb = self.find(a), self.find(b)
            differ = ra != rb
            if not differ.any():
                return
            # the earlier element stays the root: channel order follows graph order
            self.parent[np.maximum(ra[differ], rb[differ])] = np.minimum(ra[differ], rb[differ])


class Opaque(Exception):
    """A part of a layer the engine cannot follow: the whole layer is opaque."""


class TraceContext:
    """What a handler's `propagate` may do to the channel layouts of the graph being traced."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self._modules = modules
        self._elements = Elements()
        self.spaces: list[tuple[Layout, str | None]] = []  # what each `new` created, and its producer
        self.members: dict[Member, Layout] = {}
        self.blocked: list[tuple[Layout, str]] = []
        self.inexact: list[tuple[Layout, str]] = []
        self.balanced: list[tuple[Layout, int, str]] = []
        self.param_dims: dict[str, int] = {}
        self.ndim = 4  # of the tensor the current layer reads

    # -- what handlers call ------------------------------------------------------------------------------------
    def new(self, size: int, producer: str | None = None) -> Layout:
        """`size` new channels; `producer` (a module name) makes them a group's, as that module's "out" member."""
        layout = self._elements.new(size)
        self.spaces.append((layout, producer))
        if producer is not None:
            self.member(layout, producer, ROLE_OUT)
        return layout

    def member(self, layout: Layout, module: str, role: str) -> None:
        """`module`'s dimension of `role` holds the channels of `layout`, position by position."""
        member = Member(module, role)
        if member in self.members:
            self.merge(self.members[member], layout, f'{module} ({role}, met twice)')
        else:
            self.members[member] = layout

    def merge(self, a: Layout, b: Layout, where: str) -> Layout:
        """Tie the channels at equal positions of `a` and `b`; returns `a`."""
        if len(a) != len(b):
            raise ValueError(f'{where}: ties channel spaces of different sizes ({len(a)} vs {len(b)})')
        self._elements.union(a, b)
        return a

    def concat(self, layouts: list[Layout]) -> Layout:
        return np.concatenate(layouts) if layouts else np.zeros(0, dtype=np.int64)

    def passthrough(self, x: Layout, name: str) -> Layout:
        return x

    def block(self, layout: Layout, reason: str) -> None:
        """The groups of these channels stay whole, for `reason`."""
        self.blocked.append((layout, reason))

    def mark_inexact(self, layout: Layout, reason: str) -> None:
        self.inexact.append((layout, reason))

    def balance(self, layout: Layout, parts: int, where: str) -> None:
        """The positions of `layout`, cut in `parts` equal consecutive blocks, must keep as many in each block."""
        self.balanced.append((layout, parts, where))

    def opaque(self, x: Layout | None, name: str, why: str, size: int | None = None) -> Layout:
        """Fix the channels read (`x`) and the `size` (default: as many as read) channels written by `name`."""
        reason = f'{name}: {why}'
        if x is not None:
            self.block(x, reason)
        out = self.new(len(x) if size is None else size)
        self.block(out, reason)
        return out

    def roots(self) -> np.ndarray:
        """The root element each element is tied to (for turning ties into groups)."""
        return self._elements.find(np.arange(len(self._elements.parent)))

    def call(self, name: str, x: Layout) -> Layout:
        """Apply the handler of submodule `name` (for handlers of layers made of other layers)."""
        module = self._modules[name]
        handler = handler_for(module)
        if handler is None:
            raise Opaque(f'{name}: {type(module).__name__} is not understood channel by channel')
        return handler.propagate(self, name, module, x)


def _channels(node_or_value) -> int | None:
    meta = getattr(node_or_value, 'meta', {}).get('tensor_meta') if isinstance(node_or_value, fx.Node) else None
    if meta is None or not hasattr(meta, 'shape') or len(meta.shape) < 2:
        return None
    return int(meta.shape[1])


def _ndim(node) -> int | None:
    meta = node.meta.get('tensor_meta') if isinstance(node, fx.Node) else None
    return len(meta.shape) if meta is not None and hasattr(meta, 'shape') else None


def trace(model: nn.Module, input_size: tuple[int, int, int]) -> fx.GraphModule:
    """Symbolic trace with shapes propagated on one real (zero) batch."""
    graph = _Tracer().trace(model)
    gm = fx.GraphModule(model, graph)
    was_training = gm.training
    gm.eval()
    param = next(model.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, 'cpu')
    # one small image: its ops are too small to share out, and on a busy CPU every hand-off between threads waits
    # for a core (6x slower on 2 shared cores), so the pass runs on one thread
    try:
        # ShapeProp prints the traceback of a failing node to stderr before raising; the error itself is the caller's
        # to word (one line for a user), so the print goes nowhere
        with fixed_threads(1), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            ShapeProp(gm).propagate(torch.zeros(1, *input_size, dtype=dtype, device=device))
    finally:
        gm.train(was_training)
    return gm


@dataclass
class Traced:
    """What following the layouts found: the filled context, each module's output layout (containers included)
    and the layout entering the global pool (None without one)."""

    context: TraceContext
    module_out: dict[str, Layout]
    global_pool: Layout | None


def follow_layouts(model: nn.Module, input_size: tuple[int, int, int]) -> Traced:
    """Trace `model` and follow its channel layouts, node by node (see the module docstring)."""
    try:
        gm = trace(model, input_size)
    except Exception as e:  # fx raises many kinds; the user needs to know which model and why
        cause = e
        while cause.__cause__ is not None:  # ShapeProp wraps the failing op's error in a page about the node
            cause = cause.__cause__
        raise ValueError(
            f'cannot trace {type(model).__name__} with torch.fx to find its channel groups: {cause}'
        ) from e
    modules = dict(gm.named_modules())
    ctx = TraceContext(modules)
    layout: dict[fx.Node, Layout] = {}
    parts: dict[fx.Node, list[Layout]] = {}  # the pieces of a split, for the getitems that take them
    params: dict[fx.Node, str] = {}  # get_attr nodes of parameters and buffers
    module_out: dict[str, Layout] = {}
    global_pool: Layout | None = None
    # (input layout, output layout) of each layer with parameters, from its first call
    first_call: dict[str, tuple[Layout, Layout]] = {}

    def layout_of(arg) -> Layout | None:
        return layout.get(arg) if isinstance(arg, fx.Node) else None

    def tensor_args(node: fx.Node) -> list[Layout]:
        args = list(node.args) + list(node.kwargs.values())
        return [s for s in (layout_of(a) for a in _flatten(args)) if s is not None]

    def opaque(node: fx.Node, why: str) -> None:
        for s in tensor_args(node):
            ctx.block(s, why)
        c = _channels(node)
        if c is not None:
            layout[node] = ctx.new(c)
            ctx.block(layout[node], why)

    def passthrough(node: fx.Node, where: str) -> None:
        ins = tensor_args(node)
        if not ins:
            return opaque(node, f'{where}: no channelled input')
        c = _channels(node)
        if c is None or c != len(ins[0]):
            return opaque(node, f'{where}: changes the channel dimension')
        layout[node] = ins[0]

    def channel_dim(node: fx.Node, dim, default: int = 0) -> bool:
        ndim = _ndim(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else _ndim(node)
        dim = default if dim is None else dim
        return isinstance(dim, int) and ndim is not None and dim % ndim == 1

    for node in gm.graph.nodes:
        if node.op == 'placeholder':
            c = _channels(node)
            if c is not None:
                layout[node] = ctx.new(c)
                ctx.block(layout[node], 'network input')
        elif node.op == 'output':
            for s in tensor_args(node):
                ctx.block(s, 'network output')
        elif node.op == 'get_attr':
            params[node] = str(node.target)
        elif node.op == 'call_module' and str(node.target) in first_call and tensor_args(node):
            # A module called again holds the same filters: slicing its input once must fit every call, and its
            # outputs are the same channels. So its input layouts become one, and so do its output layouts.
            name, (x_first, y_first) = str(node.target), first_call[str(node.target)]
            x_again = tensor_args(node)[0]
            if len(x_again) == len(x_first):
                ctx.merge(x_first, x_again, f'{name} (called more than once)')
            else:  # a layer that takes any width (some custom module): nothing can tie the two calls
                for s in (x_first, x_again, y_first):
                    ctx.block(s, f'{name}: called more than once on inputs of different widths')
            layout[node] = y_first
        elif node.op == 'call_module':
            mod, name = modules[node.target], str(node.target)
            ins = tensor_args(node)
            handler = handler_for(mod)
            if handler is None or not ins:
                opaque(node, f'{name}: {type(mod).__name__} is not understood channel by channel')
            else:
                ctx.ndim = _ndim(node.args[0]) or 4
                try:
                    y = handler.propagate(ctx, name, mod, ins[0])
                except Opaque as e:
                    y = None
                    opaque(node, str(e))
                if y is not None:
                    if _channels(node) is not None and len(y) != _channels(node):
                        opaque(node, f'{name}: changes the channel dimension')
                    else:
                        layout[node] = y
                if name.endswith('global_pool'):
                    global_pool = ins[0]
            if ins and node in layout and any(True for _ in mod.parameters()):
                first_call[name] = (ins[0], layout[node])
        elif (
            node.op == 'call_function'
            and node.target in _MERGING_FUNCTIONS
            or node.op == 'call_method'
            and node.target in _MERGING_METHODS
        ):
            _merge_node(ctx, node, layout, params, modules, tensor_args, opaque)
        elif node.op == 'call_function' and node.target in _CONCAT_FUNCTIONS:
            tensors = node.args[0] if node.args else node.kwargs.get('tensors', ())
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get('dim', 0)
            ins = [layout_of(t) for t in tensors]
            if any(s is None for s in ins) or not ins:
                opaque(node, f'{node.name}: concatenates tensors without channels')
            elif channel_dim(node, dim):
                layout[node] = ctx.concat(ins)
            else:  # along another dimension: channel c of every input is channel c of the output
                for s in ins[1:]:
                    ctx.merge(ins[0], s, f'{node.name} (cat on dim {dim})')
                layout[node] = ins[0]
        elif (
            node.op == 'call_function'
            and node.target in _SPLIT_FUNCTIONS
            or node.op == 'call_method'
            and node.target in _SPLIT_METHODS
        ):
            _split_node(ctx, node, layout_of(node.args[0]), parts, opaque, channel_dim)
        elif node.op == 'call_function' and node.target is operator.getitem and node.args[0] in parts:
            pieces = parts[node.args[0]]
            if isinstance(node.args[1], int) and -len(pieces) <= node.args[1] < len(pieces):
                layout[node] = pieces[node.args[1]]
            else:
                opaque(node, f'{node.name}: takes {node.args[1]!r} of a split')
        elif node.op == 'call_function' and node.target is operator.getitem and layout_of(node.args[0]) is not None:
            why = _slices_channels(node)
            if why:
                opaque(node, f'{node.name}: {why}')
            else:
                passthrough(node, node.name)
        elif (
            node.op == 'call_function'
            and node.target in _CHANNELWISE_FUNCTIONS
            or node.op == 'call_method'
            and node.target in _CHANNELWISE_METHODS
        ):
            if _reduces_channels(node):
                opaque(node, f'{node.name}: reduces over channels')
            else:
                passthrough(node, node.name)
        elif node.op == 'call_function' and node.target is getattr and node.args[1] in ('shape', 'dtype', 'device'):
            continue
        else:
            opaque(node, f'{node.name}: {node.op} {getattr(node.target, "__name__", node.target)} is not understood')
        if node in layout:
            # a module's output is the last value computed inside it (containers such as stages included)
            for module_name in node.meta.get('nn_module_stack', {}):
                module_out[module_name] = layout[node]
    return Traced(ctx, module_out, global_pool)


def _merge_node(
    ctx: TraceContext, node: fx.Node, layout: dict, params: dict, modules: dict, tensor_args, opaque
) -> None:
    """An elementwise op of tensors (and perhaps a bare per-channel parameter)."""
    c_out = _channels(node)
    ndim = len(node.meta['tensor_meta'].shape) if hasattr(node.meta.get('tensor_meta'), 'shape') else None
    for arg in node.args:
        if arg in params and c_out is not None and ndim is not None:
            p_layout = _parameter_layout(ctx, params[arg], modules, node, c_out, ndim)
            if p_layout is not None:
                layout[arg] = p_layout
    # an operand with one channel is broadcast (e.g. a spatial attention map): it ties nothing
    ins = [s for s in tensor_args(node) if len(s) == c_out]
    if ins:
        layout[node] = ins[0]
        for s in ins[1:]:
            ctx.merge(ins[0], s, f'{node.name} ({node.target})')
    elif tensor_args(node):
        opaque(node, f'{node.name}: {node.target} of tensors whose channels do not line up')


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


def _split_node(ctx: TraceContext, node: fx.Node, x: Layout | None, parts: dict, opaque, channel_dim) -> None:
    if x is None:
        return opaque(node, f'{node.name}: splits a tensor without channels')
    how = node.args[1] if len(node.args) > 1 else node.kwargs.get('split_size_or_sections', node.kwargs.get('chunks'))
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get('dim', 0)
    n_out = len(node.meta['tensor_meta']) if isinstance(node.meta.get('tensor_meta'), (list, tuple)) else None
    if not channel_dim(node, dim):
        parts[node] = [x] * (n_out or 1)  # every piece has all the channels
        return
    if node.target in (torch.chunk, 'chunk') and isinstance(how, int) and len(x) % how == 0:
        # chunk cuts whatever the width is in equal parts: the pruned net cuts the same channels if each part
        # keeps as many
        ctx.balance(x, how, f'{node.name}: chunks the channels in {how}')
        step = len(x) // how
        parts[node] = [x[i * step : (i + 1) * step] for i in range(how)]
        return
    # split sizes written into the code stay the parent's in the pruned net
    why = (
        f'{node.name}: {getattr(node.target, "__name__", node.target)} cuts the channels at sizes fixed in the '
        f'code; register a handler for the module that owns them (kpid_zoo.register_layer_handler)'
    )
    ctx.block(x, why)
    sizes = [int(m.shape[1]) for m in node.meta['tensor_meta']] if n_out else []
    parts[node] = [ctx.opaque(None, node.name, why.split(': ', 1)[1], s) for s in sizes]


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
