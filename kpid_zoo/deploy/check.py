"""The check of a model.onnx: ONNX Runtime's outputs on real images, and PyTorch's, against the exact (float64)
output of the network, within the tolerance float32 rounding allows (`kpid_zoo.deploy.rounding`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from .rounding import Tolerance, float32_tolerance
from .runtimes import get_runtime

__all__ = ['OnnxCheck', 'check_onnx']


@dataclass
class OnnxCheck:
    """The check of a model.onnx: ONNX Runtime's and PyTorch's float32 outputs against the exact (float64) one,
    each |difference| / tolerance at its worst over every output of every image (passed: both <= 1)."""

    passed: bool
    images: int
    outputs: int
    onnxruntime_max_ratio: float  # max |ONNX Runtime - exact| / tolerance
    torch_max_ratio: float  # max |PyTorch float32 - exact| / tolerance
    onnxruntime_max_abs: float
    torch_max_abs: float
    tolerance_min: float
    tolerance_max: float
    lam: float
    samples: int
    onnxruntime: str
    reason: str = ''

    def to_dict(self) -> dict:
        return asdict(self)


def check_onnx(
    data: bytes,
    program: torch.export.ExportedProgram,
    model: nn.Module,
    images: torch.Tensor,
    *,
    threads: int = 1,
    what: str = '',
    tolerance: Tolerance | None = None,
) -> OnnxCheck:
    """Run `data` (a serialised ONNX graph of `model`) in ONNX Runtime on `images` (float32, N x C x H x W, the
    network's input preprocessing applied) and check it (see `kpid_zoo.deploy.rounding`): every output within the
    tolerance float32 rounding allows around the exact value of the network `program` (the graph `data` was
    translated from), and PyTorch's own float32 output too. A graph ONNX Runtime cannot load or run is an
    `UnsupportedModelError` naming `what`; an op the tolerance has no rule for is `rounding.NoRoundingModel`."""
    images = images.detach().to(torch.float32).cpu().contiguous()
    runtime = get_runtime('onnxruntime')
    compiled = runtime.compile_onnx(data, tuple(images.shape), threads, what=what)
    try:
        got = torch.from_numpy(compiled(images.numpy()).copy()).to(torch.float64)
    except Exception as e:  # onnxruntime's own error types, for an op it loads but cannot run
        raise runtime.unsupported(what, e) from e
    with torch.no_grad():
        own = model.eval()(images).to(torch.float64)
    tol = tolerance or float32_tolerance(program, images)  # a caller checking several graphs computes it once
    if got.shape != tol.exact.shape:
        return _failed(
            images,
            tol,
            runtime.describe(),
            f'ONNX Runtime gave shape {tuple(got.shape)}, the network {tuple(tol.exact.shape)}',
        )
    ort_ratio = ((got - tol.exact).abs() / tol.tolerance).max().item()
    torch_ratio = ((own - tol.exact).abs() / tol.tolerance).max().item()
    reason = ''
    if not torch_ratio <= 1:  # NaN fails too
        reason = f"PyTorch's own float32 output is {torch_ratio:.3g} tolerances from the exact one"
    elif not ort_ratio <= 1:
        worst = int(((got - tol.exact).abs() / tol.tolerance).flatten().argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), got.shape))
        reason = (
            f'ONNX Runtime output {index} is {ort_ratio:.3g} tolerances from the exact value '
            f'({(got - tol.exact).flatten()[worst].item():.3g}, tolerance {tol.tolerance.flatten()[worst].item():.3g})'
        )
    return OnnxCheck(
        passed=not reason,
        images=images.shape[0],
        outputs=got.numel(),
        onnxruntime_max_ratio=ort_ratio,
        torch_max_ratio=torch_ratio,
        onnxruntime_max_abs=(got - tol.exact).abs().max().item(),
        torch_max_abs=(own - tol.exact).abs().max().item(),
        tolerance_min=tol.tolerance.min().item(),
        tolerance_max=tol.tolerance.max().item(),
        lam=tol.lam,
        samples=tol.samples,
        onnxruntime=runtime.describe(),
        reason=reason,
    )


def _failed(images: torch.Tensor, tol, describe: str, reason: str) -> OnnxCheck:
    nan = float('nan')
    return OnnxCheck(False, images.shape[0], 0, nan, nan, nan, nan, nan, nan, tol.lam, tol.samples, describe, reason)
