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
per-channel parameter, e.g. `x * self.gamma`, found by the engine itself). `conv_groups` (whole conv-groups of a
grouped conv, their inputs with their outputs: a channel multiplier's, an attention head's) holds a channel at
several positions, as an attention head's projections hold each head at `head_dim` positions.

A layer type the registry does not know is opaque: the channels it reads or writes are fixed, with the reason.
Teach the engine a custom module with `register_layer_handler(MyModule, MyHandler())` (or as a class decorator
on the handler); the most specific registered class of a module wins, so subclasses inherit their base's handler.
A registered module is traced as one layer (a leaf), unless its handler sets `leaf = False` (then it only keeps the
module's size attributes true after a cut, in `refresh`). Modules timm registers as not traceable by torch.fx are
leaves too; without a handler, their channels are fixed.
"""

from __future__ import annotations

import contextlib
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
    LayerScale2d,
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
from timm.layers.attention2d import MultiQueryAttention2d
from timm.layers.grn import GlobalResponseNorm
from timm.layers.norm import LayerNormExp2d
from timm.layers.norm_act import LayerNormAct2dFp32
from timm.models.efficientvit_mit import ClassifierHead as EfficientVitClassifierHead
from timm.models.efficientvit_mit import LiteMLA
from timm.models.fastvit import MobileOneBlock, ReparamLargeKernelConv, RepConditionalPosEnc, RepMixer

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

# whole conv-groups of a grouped conv (input and output channels of each, and `groups`): a channel-multiplier conv
# (groups == in < out) or a grouped conv whose conv-groups are cut whole (an attention head's)
ROLE_CONV_GROUPS = 'conv_groups'


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

    # A leaf is traced as one layer, through `propagate`; otherwise the tracer goes through the module's forward and
    # the handler only keeps the module's own size attributes true after a cut (`refresh`)
    leaf = True

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
        if g == conv.in_channels and conv.out_channels % g == 0:
            # a channel multiplier: each input channel is the only input of its conv-group, whose outputs it alone
            # makes, so the input channel and those outputs go together, and whole conv-groups with them
            y = ctx.repeat(x, conv.out_channels // g)
            ctx.member(y, name, ROLE_CONV_GROUPS)
            return y
        if conv.in_channels % g or conv.out_channels % g:
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
        elif role == ROLE_CONV_GROUPS:  # n output positions, in whole conv-groups
            per_in, per_out = conv.in_channels // conv.groups, conv.out_channels // conv.groups
            conv.groups = n // per_out
            conv.in_channels, conv.out_channels = conv.groups * per_in, n
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
        return [(conv.weight, per_channel(0))] if role in (ROLE_OUT, ROLE_DW, ROLE_CONV_GROUPS) else []


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


# -- timm layers traced as one (EfficientViT, MobileNetV4 hybrids) and reparameterisable blocks (FastViT) ----------


class LiteMLAHandler(LayerHandler):
    """timm's LiteMLA (EfficientViT's multi-scale linear attention), traced as one layer as timm traces it (its
    forward branches on the device type). Its heads are pruned whole: a head is `3 * dim` consecutive channels of
    the qkv conv (its q, k and v), the same channels of each scale's depthwise conv and of that scale's grouped
    conv (three whole conv-groups of `dim`), and `dim` consecutive inputs of the projection per scale. The heads
    compute independently and meet only in the projection, so removing one equals zeroing its projection inputs.
    The head dimension stays: its q and k dims meet in a matmul, and `reshape` keeps `3 * dim` per head.
    The input and the projection's output are plain channels (the residual stream's)."""

    def propagate(self, ctx, name, mla, x):
        qkv, proj, dim = mla.qkv, mla.proj, mla.dim
        why = self._not_understood(mla)
        if why:
            return ctx.opaque(x, name, f'LiteMLA {why}', proj.conv.out_channels)
        x = ctx.call(f'{name}.qkv.dropout', x)
        ctx.member(x, f'{name}.qkv.conv', ROLE_IN)
        heads = ctx.new(self.width(mla, ROLE_HEADS), name, ROLE_HEADS)
        qkv_out = ctx.repeat(heads, 3 * dim)  # head by head: its q, k and v, dim channels each
        ctx.member(qkv_out, f'{name}.qkv.conv', ROLE_OUT)
        if isinstance(qkv.norm, nn.modules.batchnorm._BatchNorm):
            ctx.member(qkv_out, f'{name}.qkv.norm', ROLE_NORM)
        for i in range(len(mla.aggreg)):
            ctx.member(qkv_out, f'{name}.aggreg.{i}.0', ROLE_DW)
            ctx.member(qkv_out, f'{name}.aggreg.{i}.1', ROLE_CONV_GROUPS)
        # (scale, head, dim) order: the attention's output is reshaped back with the heads of each scale in turn
        attn_out = np.tile(ctx.repeat(heads, dim), 1 + len(mla.aggreg))
        y = ctx.call(f'{name}.proj.conv', ctx.call(f'{name}.proj.dropout', attn_out))
        return ctx.call(f'{name}.proj.act', ctx.call(f'{name}.proj.norm', y))

    @staticmethod
    def _not_understood(mla) -> str:
        """Why the layout above does not hold for this LiteMLA ("" when it does)."""
        qkv, dim = mla.qkv, mla.dim
        total = qkv.conv.out_channels
        if type(qkv.conv) is not nn.Conv2d or qkv.conv.groups != 1 or total % (3 * dim):
            return f'with a qkv conv of {total} channels that are not whole heads of 3 x {dim}'
        if not isinstance(qkv.norm, (nn.Identity, nn.modules.batchnorm._BatchNorm)) or not all(
            isinstance(handler_for(m), ChannelwiseHandler) and not any(True for _ in m.parameters())
            for m in (qkv.act, mla.kernel_func)
        ):
            return 'with a qkv norm or activation that is not a batch norm or channel-wise'
        for scale in mla.aggreg:
            dw, grouped = (scale[0], scale[1]) if len(scale) == 2 else (None, None)
            if not (
                type(dw) is nn.Conv2d
                and dw.groups == dw.in_channels == dw.out_channels == total
                and type(grouped) is nn.Conv2d
                and grouped.in_channels == grouped.out_channels == total
                and grouped.groups * dim == total
            ):
                return (
                    'with an aggregation that is not a depthwise conv then a grouped conv of one conv-group per q/k/v'
                )
        return ''

    def width(self, mla, role):
        return mla.qkv.conv.out_channels // (3 * mla.dim)  # heads: their tensors are cut through the convs' members


class MultiQueryAttention2dHandler(LayerHandler):
    """timm's MultiQueryAttention2d (MobileNetV4's hybrid blocks), traced as one layer: its query heads are pruned
    whole (`key_dim` consecutive channels of the query projection, `value_dim` consecutive inputs of the output
    projection), the key and value (one head, shared by every query head) stay whole, and its input and output are
    plain channels (the residual stream's). A query head meets only its own softmax and the output projection, so
    removing one equals zeroing its inputs to the output projection."""

    def propagate(self, ctx, name, mqa, x):
        out_channels = mqa.output.proj.out_channels
        if getattr(mqa, 'einsum', False) or any(
            type(getattr(seq, 'proj', None)) is not nn.Conv2d or seq.proj.groups != 1
            for seq in (mqa.query, mqa.key, mqa.value, mqa.output)
        ):
            return ctx.opaque(x, name, 'MultiQueryAttention2d with projections that are not dense convs', out_channels)
        q = self._through(ctx, f'{name}.query', mqa.query, x)
        ctx.member(q, f'{name}.query.proj', ROLE_IN)
        heads = ctx.new(mqa.num_heads, name, ROLE_HEADS)
        ctx.member(ctx.repeat(heads, mqa.key_dim), f'{name}.query.proj', ROLE_OUT)
        for branch in ('key', 'value'):
            seq = getattr(mqa, branch)
            shared = ctx.call(f'{name}.{branch}.proj', self._through(ctx, f'{name}.{branch}', seq, x))
            ctx.block(shared, f'{name}.{branch}.proj: one {branch} head, shared by every query head')
        o = ctx.repeat(heads, mqa.value_dim)
        for child, module in mqa.output.named_children():
            if child == 'proj':
                o = ctx.call(f'{name}.output.proj', o)
            elif not isinstance(module, (nn.Upsample, nn.Dropout)):
                return ctx.opaque(
                    x, name, f'MultiQueryAttention2d with output.{child} ({type(module).__name__})', out_channels
                )
        return o

    @staticmethod
    def _through(ctx, prefix, seq, x):
        """x through a projection's pooling, depthwise conv and norm (everything before its `proj`)."""
        for child, _ in seq.named_children():
            if child == 'proj':
                return x
            x = ctx.call(f'{prefix}.{child}', x)
        return x

    def set_width(self, mqa, role, n):
        mqa.num_heads = n

    def width(self, mqa, role):
        return mqa.num_heads


class LayerScale2dHandler(LayerHandler):
    """timm's LayerScale2d (NCHW: `x * gamma.view(1, -1, 1, 1)`, MobileNetV4's blocks): one scale per channel,
    sliced with the channels it scales."""

    def propagate(self, ctx, name, scale, x):
        if scale.gamma.dim() != 1 or len(scale.gamma) != len(x) or ctx.ndim != 4:
            return ctx.opaque(
                x, name, f'LayerScale2d with gamma of shape {tuple(scale.gamma.shape)} on {len(x)} channels'
            )
        ctx.member(x, name, ROLE_CHANNEL)
        return x

    def tensors(self, scale, role):
        return [('gamma', 0)]


class EfficientVitHeadHandler(LayerHandler):
    """EfficientViT's classifier head (a conv before the pool, then linear, norm, linear), traced through: after a
    cut, `refresh` keeps its `in_features` and `num_features` true, which `reset_classifier` checks."""

    leaf = False

    def refresh(self, head):
        conv = getattr(head.in_conv, 'conv', None)
        if isinstance(conv, nn.Conv2d):
            head.in_features = conv.in_channels
        if isinstance(head.classifier[0], nn.Linear):
            head.num_features = head.classifier[0].out_features


class ReparamBlockHandler(LayerHandler):
    """FastViT's reparameterisable blocks (MobileOne, RepLKNet's large-kernel conv, RepMixer, the conditional
    position encoding), traced through: their train-time branches are plain convs and batch norms summed, which
    the engine follows. After a cut, `refresh` keeps the sizes their `reparameterize()` reads true (in_chs, out_chs,
    groups, dim), so a pruned network still fuses with timm's `reparameterize_model`."""

    leaf = False

    def refresh(self, block):
        conv = getattr(block, 'reparam_conv', None)
        for path in ('conv_kxk.0.conv', 'conv_scale.conv', 'large_conv.conv', 'mixer.conv_kxk.0.conv', 'pos_enc'):
            if conv is not None:
                break
            with contextlib.suppress(AttributeError, IndexError, TypeError):
                conv = block.get_submodule(path)
        if conv is None:  # a MobileOneBlock of only its identity batch norm (RepMixer's norm): depthwise
            identity = getattr(block, 'identity', None)
            if identity is not None:
                depthwise = block.groups == block.in_chs
                block.in_chs = block.out_chs = identity.num_features
                block.groups = block.in_chs if depthwise else block.groups
        elif hasattr(block, 'in_chs'):
            block.in_chs, block.out_chs, block.groups = conv.in_channels, conv.out_channels, conv.groups
        elif hasattr(block, 'dim_out'):
            block.dim, block.dim_out, block.groups = conv.in_channels, conv.out_channels, conv.groups
        else:
            block.dim = conv.out_channels
        id_tensor = getattr(block, 'id_tensor', None)
        if id_tensor is not None and id_tensor.shape[0] != getattr(block, 'in_chs', id_tensor.shape[0]):
            del block.id_tensor  # built again at the pruned width when the block is fused


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
    # layers of NCHW maps only (channels on dim 1), then channels-last and transformer layers
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
    register_layer_handler(LiteMLA, LiteMLAHandler())
    register_layer_handler(MultiQueryAttention2d, MultiQueryAttention2dHandler())
    register_layer_handler(LayerScale2d, LayerScale2dHandler())
    register_layer_handler(EfficientVitClassifierHead, EfficientVitHeadHandler())
    for cls in (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepConditionalPosEnc):
        register_layer_handler(cls, ReparamBlockHandler())


_register_builtins()
