"""FLOPs and parameter counts with fvcore; one FLOP = one multiply-add, so `gmacs` matches timm's published GMACs."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

with warnings.catch_warnings():
    # fvcore scripts its focal loss with torch.jit at import, which torch flags as deprecated: a FutureWarning on
    # stderr at every `kpid-zoo` start, around the one line an error is meant to be
    warnings.filterwarnings('ignore', message='.*torch.jit.script.*is deprecated', category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import get_shape

__all__ = ['FlopsReport', 'count_flops', 'count_params']


@dataclass
class FlopsReport:
    total: int  # multiply-adds for one image
    by_module: dict[str, int]  # fvcore's per-module totals ('' is the whole model)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9


def _sdpa_flops(inputs: list, outputs: list) -> int:
    """aten::scaled_dot_product_attention (timm's fused attention), which fvcore does not know: the two matmuls it
    fuses, q @ k^T and attn @ v, one multiply-add each, as fvcore counts the unfused `q @ k.transpose(-2, -1)` and
    `attn @ v` (the softmax and scaling, elementwise, are not counted there either)."""
    q, k, v = (get_shape(x) for x in inputs[:3])
    *batch, n, d = q
    s, dv = k[-2], v[-1]
    heads = 1
    for b in batch:
        heads *= b
    return heads * n * s * (d + dv)


def count_flops(model: nn.Module, input_size: tuple[int, int, int] = (3, 224, 224)) -> FlopsReport:
    """Count FLOPs of `model` for one image of `input_size` (C, H, W).

    fvcore's defaults: convolutions, linear layers, matmuls and norms are counted, elementwise ops (activations,
    residual adds, SE multiplies) are not -- the convention behind timm's GMACs column. Fused attention
    (scaled_dot_product_attention), which fvcore skips, is counted as its two matmuls (`_sdpa_flops`).
    The trace runs on an eval-mode CPU copy so the caller's model (its mode, device, BN running stats) is untouched.
    """
    counted = copy.deepcopy(model).to(device='cpu', dtype=torch.float32).eval()
    image = torch.zeros(1, *input_size)
    analysis = FlopCountAnalysis(counted, image).set_op_handle('aten::scaled_dot_product_attention', _sdpa_flops)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter('ignore')  # jit tracer warnings about data-dependent python control flow
        by_module = dict(analysis.by_module())
    return FlopsReport(total=int(by_module['']), by_module=by_module)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
