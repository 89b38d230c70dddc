"""Stage 3, first half: trace a network with torch.fx, and the bookkeeping of its channel layouts.

Every channel a layer produces is an *element*; the channel dimension of each tensor in the graph is a *layout*,
the element at each of its positions. What each layer does to layouts is its handler's business
(`kpid_zoo.engine.handlers`, one per layer type, extensible with `register_layer_handler`), through the
`TraceContext` this module defines: which elements are tied, which layouts each module's dimensions hold, what is
blocked, inexact or balanced. `trace` traces a network with its shapes; `kpid_zoo.engine._layouts.follow_layouts`
follows the layouts through the trace, node by node (the handlers, and the rules for torch functions and methods:
channel-wise ops, elementwise merges, concatenations, splits, slices), and returns the `Traced` context it filled;
`kpid_zoo.engine.groups` turns that into channel groups.
"""

from __future__ import annotations

import contextlib
import io
import linecache
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from timm.layers._fx import get_notrace_functions, get_notrace_modules
from torch.fx.passes.shape_prop import ShapeProp

from ..core.threads import fixed_threads
from .handlers import ROLE_OUT, handler_for

Layout = np.ndarray  # int64: the element at each position of a channel dimension


@dataclass(frozen=True)
class Member:
    """One place where a group's channels live: a module (or a bare parameter, for role "param") and which of its
    dimensions."""

    module: str
    role: str


class _Tracer(fx.Tracer):
    """Keeps the layers that have a handler as leaves, and what timm's own FX feature extraction keeps opaque
    (`timm.layers._fx`: the modules and functions timm registers as not traceable, e.g. EfficientViT's LiteMLA,
    whose forward branches on the device type), so that every model timm traces, the engine traces. A leaf
    without a handler fixes the channels it touches, with its name in the reason. When tracing fails,
    `failed_in` names the innermost module being traced (qualified name, type)."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        handler = handler_for(m)
        if handler is not None and not handler.leaf:
            return False
        return handler is not None or is_timm_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module sees the error first
                self.failed_in = (self.path_of_module(m), type(m).__name__)
            raise


def is_timm_leaf(module: nn.Module) -> bool:
    """Whether timm registers `module`'s type as not traceable by torch.fx (`timm.layers.register_notrace_module`)."""
    return isinstance(module, tuple(get_notrace_modules()))


class TraceFailure(Exception):
    """torch.fx could not trace a network: `where` names the module (and the source line) it failed in."""

    def __init__(self, where: str, cause: BaseException) -> None:
        super().__init__(f'{where}: {cause}' if where else str(cause))
        self.where, self.cause = where, cause


def _source_line(error: BaseException) -> str:
    """file:line and code of the innermost frame outside torch that raised `error` (the model's own code)."""
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if '/torch/' not in frame.filename and '/kpid_zoo/' not in frame.filename:
            code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
            return f'{frame.filename.rsplit("/", 1)[-1]}:{frame.lineno}' + (f' ({code})' if code else '')
    return ''


class _ShapeProp(ShapeProp):
    """ShapeProp that remembers the node it runs, to name it when the pass fails."""

    node: fx.Node | None = None

    def run_node(self, n: fx.Node):
        self.node = n
        return super().run_node(n)


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
        self.cdim = 1  # the dimension of that tensor that holds its channels (channels-last: ndim - 1)

    # -- what handlers call ------------------------------------------------------------------------------------
    def new(self, size: int, producer: str | None = None, role: str = ROLE_OUT) -> Layout:
        """`size` new channels; `producer` (a module name) makes them a group's, as that module's `role` member
        ("out"; an attention layer produces "heads")."""
        layout = self._elements.new(size)
        self.spaces.append((layout, producer))
        if producer is not None:
            self.member(layout, producer, role)
        return layout

    def repeat(self, layout: Layout, times: int) -> Layout:
        """Each channel of `layout` at `times` consecutive positions (a channel multiplier's conv-group, an
        attention head's dimensions): those positions are kept or cut together."""
        return np.repeat(layout, times)

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
    """Symbolic trace with shapes propagated on one real (zero) batch; a `TraceFailure` names where it failed."""
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx raises many kinds: control flow on a traced value, len() or iter() of one...
        module, kind = tracer.failed_in or ('', '')
        where = f'in {module} ({kind})' if module else ''
        line = _source_line(e)
        raise TraceFailure(f'{where} at {line}' if where and line else where or line, e) from e
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
        prop = _ShapeProp(gm)
        with fixed_threads(1), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(torch.zeros(1, *input_size, dtype=dtype, device=device))
    except Exception as e:
        cause = e
        while cause.__cause__ is not None:  # ShapeProp wraps the failing op's error in a page about the node
            cause = cause.__cause__
        node = prop.node
        stack = list(node.meta.get('nn_module_stack', {}).values()) if node is not None else []
        where = f'in {stack[-1][0]} ({getattr(stack[-1][1], "__name__", stack[-1][1])})' if stack else ''
        if node is not None:
            where = f'{where} at node {node.name}' if where else f'at node {node.name}'
        raise TraceFailure(where, cause) from e
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
