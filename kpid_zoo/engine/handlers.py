"""One handler per layer type: everything the pruning engine knows about a layer, in one place.

A handler says, for the layers of its type,
- how channels flow through it when the graph is traced (`propagate`: which channel spaces it reads, creates or
  ties, and where its tensors hold them),
- how it is cut (`slice`: the tensors and dimensions each role owns, then `set_width` for its size attributes),
- which tensors importance reads (`importance_tensors`: Taylor's |w * dL/dw|; `filters`: magnitude's L1), and
- how its width is read back (`width`).

Roles name the dimension of a layer a channel group owns: `out` (the filters producing new channels), `in` (the
slice of each filter reading them), `dw` (a depthwise conv: input and output are the same channels), `norm` (a
batch norm's features), `channel` (per-channel weights of a channel-wise layer, e.g. PReLU) and `param` (a bare
per-channel parameter, e.g. `x * self.gamma`, found by the engine itself).

A layer type the registry does not know is opaque: the channels it reads or writes are fixed, with the reason.
Teach the engine a custom module with `register_layer_handler(MyModule, MyHandler())` (or as a class decorator
on the handler); the most specific registered class of a module wins, so subclasses inherit their base's handler.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn as nn
from timm.layers import (
    Attention,
    BatchNormAct2d,
    CecaModule,
    DropPath,
    EcaModule,
    LayerNorm2d,
    LayerNorm2dFp32,
    LayerNormAct2d,
    MixedConv2d,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    SelectAdaptivePool2d,
    SelectiveKernel,
    StdConv2d,
    StdConv2dSame,
)
from timm.layers import activations as timm_act
from timm.layers import activations_me as timm_act_me
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm import LayerNormExp2d
from timm.layers.norm_act import LayerNormAct2dFp32

if TYPE_CHECKING:
    from .tracing import Layout, TraceContext

ROLE_OUT = 'out'  # output channels of a dense conv / linear (dim 0 of its weight)
ROLE_IN = 'in'  # input channels of a dense conv / linear (dim 1 of its weight)
ROLE_DW = 'dw'  # a depthwise conv: its input and output channels are the same channels
ROLE_NORM = 'norm'  # a batch norm's features
ROLE_CHANNEL = 'channel'  # per-channel weights of a channel-wise layer (PReLU with one weight per channel)
ROLE_PARAM = 'param'  # a bare per-channel parameter of some module, meeting activations in an elementwise op
ROLE_HEADS = 'heads'  # an attention layer's heads: its channels are heads, each head_dim wide in q, k, v and proj

# (tensor, function mapping a tensor of that shape to one value per position of the role's dimension)
TensorScores = list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]]


def per_channel(dim: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Sum of a tensor over everything but `dim`: one value per channel along `dim`."""
    return lambda t: t.transpose(0, dim).reshape(t.shape[dim], -1).sum(1)


def slice_tensor(owner: nn.Module, attr: str, dim: int, idx: torch.Tensor) -> None:
    """Replace `owner.attr` by its `idx` entries along `dim` (a new tensor, sharing nothing with the old one)."""
    t = getattr(owner, attr, None)
    if t is None:
        return
    sliced = t.detach().index_select(dim, idx.to(t.device))
    if isinstance(t, nn.Parameter):
        setattr(owner, attr, nn.Parameter(sliced, requires_grad=t.requires_grad))
    else:
        setattr(owner, attr, sliced)


class LayerHandler:
    """What the engine knows about one layer type (see the module docstring); subclass and override."""

    # False: the layer reads NCHW-style tensors, channels on dim 1 (a layer given channels elsewhere is opaque);
    # True: `propagate` checks `ctx.cdim` itself (channel-wise ops, linear layers and norms on channels-last tensors)
    any_channel_dim = False

    def propagate(self, ctx: TraceContext, name: str, module: nn.Module, x: Layout) -> Layout:
        """The layout of the output, given the layout `x` of the (first) input; record members with `ctx`."""
        return ctx.opaque(x, name, f'{type(module).__name__} is not understood channel by channel')

    def tensors(self, module: nn.Module, role: str) -> list[tuple[str, int]]:
        """(attribute, dimension) of every tensor of `module` that holds the channels of `role`."""
        return []

    def slice(self, module: nn.Module, role: str, idx: torch.Tensor) -> None:
        """Keep only positions `idx` (sorted) of the dimension that `role` names."""
        for attr, dim in self.tensors(module, role):
            slice_tensor(module, attr, dim, idx)
        self.set_width(module, role, len(idx))

    def set_width(self, module: nn.Module, role: str, n: int) -> None:
        """Update the size attributes after slicing `role` down to `n` positions."""

    def width(self, module: nn.Module, role: str) -> int:
        """How many positions the dimension of `role` has now."""
        attr, dim = self.tensors(module, role)[0]
        return getattr(module, attr).shape[dim]

    def importance_tensors(self, module: nn.Module, role: str) -> TensorScores:
        """What Taylor importance reads: by default every parameter that slicing `role` cuts."""
        return [
            (t, per_channel(dim))
            for attr, dim in self.tensors(module, role)
            if isinstance(t := getattr(module, attr, None), nn.Parameter)
        ]

    def filters(self, module: nn.Module, role: str) -> TensorScores:
        """What magnitude importance reads (the filters that produce the channels); none by default."""
        return []

    def refresh(self, module: nn.Module) -> None:
        """Called on every module of the type after a network is cut: keep derived attributes true."""


class ChannelwiseHandler(LayerHandler):
    """A layer that acts channel by channel without parameters (activations, pooling, dropout, flatten)."""

    any_channel_dim = True

    def propagate(self, ctx, name, module, x):
        if any(True for _ in module.parameters()):
            # a parameter nobody slices would make the pruned net crash or compute something else
            return ctx.opaque(x, name, f'{type(module).__name__} has parameters no handler slices')
        return ctx.passthrough(x, name)


class ChannelMixingHandler(LayerHandler):
    """Keeps the channel count but mixes neighbouring channels with parameters independent of that count (ECA's
    Conv1d over the channel axis): pruning through it is valid but inexact."""

    def propagate(self, ctx, name, module, x):
        y = ctx.passthrough(x, name)
        ctx.mark_inexact(y, f'{name}: {type(module).__name__} mixes neighbouring channels')
        return y


class ConvHandler(LayerHandler):
    """nn.Conv2d: dense (new output channels), depthwise (the same channels) or grouped (new output channels,
    with the same number kept in each conv-group on both sides)."""

    def propagate(self, ctx, name, conv, x):
        g = conv.groups
        if g == 1:
            ctx.member(x, name, ROLE_IN)
            return ctx.new(conv.out_channels, name)
        if g == conv.in_channels == conv.out_channels:
            ctx.member(x, name, ROLE_DW)
            return x
        if conv.in_channels % g or conv.out_channels % g or g == conv.in_channels:
            # a channel multiplier (groups == in < out) ties each input to a block of outputs: only whole
            # conv-groups could go, which would change `groups`
            return ctx.opaque(
                x,
                name,
                f'grouped conv (groups={g}, in={conv.in_channels}, out={conv.out_channels}) is pruned only as a whole',
                conv.out_channels,
            )
        ctx.member(x, name, ROLE_IN)
        ctx.balance(x, g, f'{name}: grouped conv (groups={g})')
        y = ctx.new(conv.out_channels, name)
        ctx.balance(y, g, f'{name}: grouped conv (groups={g})')
        return y

    def tensors(self, conv, role):
        if role == ROLE_IN:
            return [('weight', 1)]
        return [('weight', 0), ('bias', 0)]

    def slice(self, conv, role, idx):
        if role == ROLE_IN and conv.groups > 1:
            # positions are global input channels; each conv-group's filters read only their own block of them
            g, per_in = conv.groups, conv.in_channels // conv.groups
            keep = idx.view(g, -1) - torch.arange(g).unsqueeze(1) * per_in  # local indices, one row per conv-group
            w = conv.weight.detach()
            per_out = w.shape[0] // g
            rows = [w[k * per_out : (k + 1) * per_out].index_select(1, keep[k].to(w.device)) for k in range(g)]
            conv.weight = nn.Parameter(torch.cat(rows), requires_grad=conv.weight.requires_grad)
            conv.in_channels = len(idx)
            return
        super().slice(conv, role, idx)

    def set_width(self, conv, role, n):
        if role == ROLE_OUT:
            conv.out_channels = n
        elif role == ROLE_IN:
            conv.in_channels = n
        else:
            conv.in_channels = conv.out_channels = conv.groups = n

    def width(self, conv, role):
        return conv.in_channels if role == ROLE_IN else conv.out_channels

    def importance_tensors(self, conv, role):
        if role == ROLE_IN and conv.groups > 1:
            g = conv.groups
            # weight[k * per_out + o, j] reads input k * per_in + j
            return [(conv.weight, lambda t: t.reshape(g, t.shape[0] // g, t.shape[1], -1).sum((1, 3)).reshape(-1))]
        return super().importance_tensors(conv, role)

    def filters(self, conv, role):
        return [(conv.weight, per_channel(0))] if role in (ROLE_OUT, ROLE_DW) else []


class WeightStandardizedConvHandler(ConvHandler):
    """Convs that normalise each filter over its inputs: removing an input channel changes every output."""

    def propagate(self, ctx, name, conv, x):
        ctx.block(x, f'{name}: {type(conv).__name__} standardises filters over their input channels')
        if conv.groups == 1:
            return ctx.new(conv.out_channels, name)
        return ctx.opaque(x, name, f'grouped {type(conv).__name__}', conv.out_channels)


class LinearHandler(LayerHandler):
    """nn.Linear: reads and writes the last dimension, (batch, channels) or channels-last (tokens, NHWC)."""

    any_channel_dim = True

    def propagate(self, ctx, name, linear, x):
        if ctx.cdim != ctx.ndim - 1 or len(x) != linear.in_features:
            return ctx.opaque(
                x,
                name,
                f'linear layer on a tensor whose channels are on dim {ctx.cdim}, not its last',
                linear.out_features,
            )
        ctx.member(x, name, ROLE_IN)
        return ctx.new(linear.out_features, name)

    def tensors(self, linear, role):
        return [('weight', 1)] if role == ROLE_IN else [('weight', 0), ('bias', 0)]

    def set_width(self, linear, role, n):
        if role == ROLE_IN:
            linear.in_features = n
        else:
            linear.out_features = n

    def width(self, linear, role):
        return linear.in_features if role == ROLE_IN else linear.out_features

    def filters(self, linear, role):
        return [(linear.weight, per_channel(0))] if role == ROLE_OUT else []


class BatchNormHandler(LayerHandler):
    """Batch norms (timm's BatchNormAct2d included: its activation and dropout act channel by channel)."""

    def propagate(self, ctx, name, bn, x):
        extra = [n for n, _ in bn.named_parameters() if n not in ('weight', 'bias')]
        if extra:  # e.g. a BatchNormAct2d whose activation has weights of its own
            return ctx.opaque(x, name, f'{type(bn).__name__} has parameters no handler slices ({extra[0]})')
        ctx.member(x, name, ROLE_NORM)
        return x

    def tensors(self, bn, role):
        return [(a, 0) for a in ('weight', 'bias', 'running_mean', 'running_var')]

    def set_width(self, bn, role, n):
        bn.num_features = n

    def width(self, bn, role):
        return bn.num_features


class PReLUHandler(LayerHandler):
    """nn.PReLU: one slope per channel is sliced with the channels; a single shared slope ties nothing."""

    def propagate(self, ctx, name, prelu, x):
        if prelu.num_parameters == 1:
            return ctx.passthrough(x, name)
        if prelu.num_parameters != len(x) or ctx.ndim < 2:
            return ctx.opaque(x, name, f'PReLU with {prelu.num_parameters} slopes on {len(x)} channels')
        ctx.member(x, name, ROLE_CHANNEL)
        return x

    def tensors(self, prelu, role):
        return [('weight', 0)]

    def set_width(self, prelu, role, n):
        prelu.num_parameters = n


class ParameterHandler(LayerHandler):
    """A bare per-channel parameter (`x * self.gamma`, gamma of shape (C, 1, 1)), found by the engine itself when
    it meets an activation in an elementwise op: its member names the parameter ("blocks.0.gamma"), and the module
    handed to the methods is the parameter's owner."""

    def __init__(self, attr: str, dim: int) -> None:
        self.attr, self.dim = attr, dim

    def tensors(self, owner, role):
        return [(self.attr, self.dim)]


class MixedConvHandler(LayerHandler):
    """timm's MixedConv2d (MixNet): the input is split by `splits`, each part goes through its own conv, and the
    outputs are concatenated; `refresh` keeps `splits` and the channel counts true after a cut."""

    def propagate(self, ctx, name, mixed, x):
        outs, start = [], 0
        for (key, conv), size in zip(mixed.items(), mixed.splits):
            outs.append(ctx.call(f'{name}.{key}', x[start : start + size]))
            start += size
        return ctx.concat(outs)

    def refresh(self, mixed):
        convs = list(mixed.values())
        mixed.splits = [c.in_channels for c in convs]
        mixed.in_channels, mixed.out_channels = sum(mixed.splits), sum(c.out_channels for c in convs)


class SelectiveKernelHandler(LayerHandler):
    """timm's SelectiveKernel (SKNet): paths of conv+norm on the input (or on equal splits of it), an attention
    over the paths from their sum, and the attention-weighted sum. Every path output and each path's slice of the
    attention's last conv are the same channels."""

    def propagate(self, ctx, name, sk, x):
        paths = len(sk.paths)
        if sk.split_input:
            ctx.balance(x, paths, f'{name}: splits its input into {paths} equal parts')
            step = len(x) // paths
            inputs = [x[i * step : (i + 1) * step] for i in range(paths)]
        else:
            inputs = [x] * paths
        out = None
        for i, (inp, path) in enumerate(zip(inputs, sk.paths)):
            if not isinstance(getattr(path, 'aa', None), (nn.Identity, type(None))):
                return ctx.opaque(x, name, 'SelectiveKernel path with an anti-aliasing layer', sk.out_channels)
            y = ctx.call(f'{name}.paths.{i}.bn', ctx.call(f'{name}.paths.{i}.conv', inp))
            out = y if out is None else ctx.merge(out, y, f'{name} (sum of paths)')
        attn = ctx.call(f'{name}.attn.bn', ctx.call(f'{name}.attn.fc_reduce', out))
        select = ctx.call(f'{name}.attn.fc_select', attn)
        for i in range(paths):  # view(B, paths, C, H, W): path i's attention is positions i*C .. (i+1)*C
            ctx.merge(out, select[i * len(out) : (i + 1) * len(out)], f'{name}.attn (attention of path {i})')
        return out

    def refresh(self, sk):
        conv = sk.paths[0].conv
        sk.in_channels = conv.in_channels * (len(sk.paths) if sk.split_input else 1)
        sk.out_channels = conv.out_channels


# -- channels-last and transformer layers (ConvNeXt, ViT, DeiT) ----------------------------------------------------


class SpatialHandler(ChannelwiseHandler):
    """A parameter-free layer that acts on NCHW maps (pooling, 2d dropout, flatten): channels on dim 1 only."""

    any_channel_dim = False


class LayerNormHandler(LayerHandler):
    """nn.LayerNorm (and timm's LayerNorm) over the channels of a channels-last tensor, timm's LayerNorm2d over
    dim 1 of an NCHW map: the weight and bias are sliced with the channels. Removing a channel changes the mean and
    variance every other channel is normalised with, so the group is inexact."""

    any_channel_dim = True

    def __init__(self, channels_first: bool = False) -> None:
        self.channels_first = channels_first

    def propagate(self, ctx, name, ln, x):
        want = 1 if self.channels_first else ctx.ndim - 1
        extra = [n for n, _ in ln.named_parameters() if n not in ('weight', 'bias')]
        if tuple(ln.normalized_shape) != (len(x),) or ctx.cdim != want or extra:
            why = (
                f'has parameters no handler slices ({extra[0]})'
                if extra
                else (f'normalises over {tuple(ln.normalized_shape)}, not the {len(x)} channels on dim {ctx.cdim}')
            )
            return ctx.opaque(x, name, f'{type(ln).__name__} {why}')
        ctx.member(x, name, ROLE_NORM)
        ctx.mark_inexact(
            x, f'{name}: {type(ln).__name__} normalises over the channels (a removed one changes the mean and variance)'
        )
        return x

    def tensors(self, ln, role):
        return [('weight', 0), ('bias', 0)]

    def set_width(self, ln, role, n):
        ln.normalized_shape = (n,)

    def width(self, ln, role):
        return ln.normalized_shape[0]


class GlobalResponseNormHandler(LayerHandler):
    """timm's GlobalResponseNorm (ConvNeXt-V2): each channel is scaled by its spatial L2 norm over the mean of all
    channels' norms. Its weight and bias are per channel; removing a channel changes that mean: inexact."""

    any_channel_dim = True

    def propagate(self, ctx, name, grn, x):
        want = ctx.ndim - 1 if grn.channel_dim == -1 else grn.channel_dim
        if ctx.cdim != want or grn.weight.shape[0] != len(x):
            return ctx.opaque(x, name, f'GlobalResponseNorm over dim {want}, but the channels are on dim {ctx.cdim}')
        ctx.member(x, name, ROLE_CHANNEL)
        ctx.mark_inexact(x, f'{name}: GlobalResponseNorm divides each channel by the mean response of all channels')
        return x

    def tensors(self, grn, role):
        return [('weight', 0), ('bias', 0)]


class AttentionHandler(LayerHandler):
    """timm's multi-head self-attention (ViT, DeiT): `qkv` reads the embedding, `proj` writes it. Its heads are
    one group whose channels are heads: removing head h removes its rows of q, k and v and its proj input columns
    (head_dim each), so every other head computes exactly what it did; `num_heads` follows the cut. Fused
    (scaled_dot_product_attention) or not, the layer is traced as one leaf."""

    any_channel_dim = True

    def propagate(self, ctx, name, attn, x):
        qkv, proj = getattr(attn, 'qkv', None), getattr(attn, 'proj', None)
        heads, head_dim = getattr(attn, 'num_heads', 0), getattr(attn, 'head_dim', 0)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear)) or ctx.cdim != ctx.ndim - 1:
            return ctx.opaque(x, name, f'{type(attn).__name__} without qkv and proj linears on channels-last tokens')
        if (
            qkv.in_features != len(x)
            or qkv.out_features != 3 * heads * head_dim
            or proj.in_features != heads * head_dim
        ):
            return ctx.opaque(
                x, name, f'{type(attn).__name__} whose qkv / proj widths are not 3 x / 1 x heads x head_dim'
            )
        ctx.member(x, f'{name}.qkv', ROLE_IN)
        units = ctx.new(heads, name, ROLE_HEADS)
        per_head = np.repeat(units, head_dim)  # the attn_dim positions: head by head, head_dim each
        ctx.member(np.tile(per_head, 3), f'{name}.qkv', ROLE_OUT)  # qkv rows: (q, k, v) x heads x head_dim
        ctx.member(per_head, f'{name}.proj', ROLE_IN)
        extra = [n for n in ('norm', 'gate') if not isinstance(getattr(attn, n, None), (nn.Identity, type(None)))]
        if extra:  # a norm over all heads' outputs (scale_norm) or a gate: not sliced here
            ctx.block(units, f'{name}: {type(attn).__name__} with a {extra[0]} over all heads keeps its heads')
        return ctx.new(proj.out_features, f'{name}.proj')

    def set_width(self, attn, role, n):
        attn.num_heads = n
        attn.attn_dim = n * attn.head_dim

    def width(self, attn, role):
        return attn.num_heads


_REGISTRY: dict[type, LayerHandler] = {}


def register_layer_handler(module_type: type, handler: LayerHandler | None = None):
    """Teach the engine a layer type: `register_layer_handler(MyModule, MyHandler())`, or, as a decorator on a
    handler class, `@register_layer_handler(MyModule)`. The module is traced as one leaf from then on."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f'register_layer_handler: expected an nn.Module subclass, got {module_type!r}')
    if handler is None:

        def decorate(cls):
            _REGISTRY[module_type] = cls()
            return cls

        return decorate
    if not isinstance(handler, LayerHandler):
        raise TypeError(f'register_layer_handler: expected a LayerHandler, got {type(handler).__name__}')
    _REGISTRY[module_type] = handler
    return handler


def handler_for(module: nn.Module) -> LayerHandler | None:
    """The handler of the most specific registered class of `module`, or None (opaque)."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def _register_builtins() -> None:
    channelwise = ChannelwiseHandler()
    for cls in (
        nn.ReLU,
        nn.ReLU6,
        nn.SiLU,
        nn.GELU,
        nn.Sigmoid,
        nn.Hardsigmoid,
        nn.Hardswish,
        nn.Tanh,
        nn.LeakyReLU,
        nn.ELU,
        nn.Mish,
        nn.Identity,
        nn.Dropout,
        nn.Dropout2d,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Flatten,
        SelectAdaptivePool2d,
        DropPath,
    ):
        register_layer_handler(cls, channelwise)
    for mod in (timm_act, timm_act_me):
        for cls in vars(mod).values():
            if isinstance(cls, type) and issubclass(cls, nn.Module) and not issubclass(cls, nn.PReLU):
                register_layer_handler(cls, channelwise)
    register_layer_handler(nn.PReLU, PReLUHandler())
    register_layer_handler(nn.Conv2d, ConvHandler())
    for cls in (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame):
        register_layer_handler(cls, WeightStandardizedConvHandler())
    register_layer_handler(nn.Linear, LinearHandler())
    register_layer_handler(nn.modules.batchnorm._BatchNorm, BatchNormHandler())
    register_layer_handler(BatchNormAct2d, BatchNormHandler())
    for cls in (EcaModule, CecaModule):
        register_layer_handler(cls, ChannelMixingHandler())
    register_layer_handler(MixedConv2d, MixedConvHandler())
    register_layer_handler(SelectiveKernel, SelectiveKernelHandler())
    # channels-last and transformer layers
    spatial = SpatialHandler()
    for cls in (
        nn.Dropout2d,
        nn.MaxPool2d,
        nn.AvgPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Flatten,
        SelectAdaptivePool2d,
    ):
        register_layer_handler(cls, spatial)
    register_layer_handler(nn.LayerNorm, LayerNormHandler())
    for cls in (LayerNorm2d, LayerNorm2dFp32, LayerNormExp2d, LayerNormAct2d, LayerNormAct2dFp32):
        register_layer_handler(cls, LayerNormHandler(channels_first=True))
    register_layer_handler(GlobalResponseNorm, GlobalResponseNormHandler())
    register_layer_handler(Attention, AttentionHandler())


_register_builtins()
