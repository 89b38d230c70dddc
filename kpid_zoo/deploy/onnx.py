"""A network as an ONNX graph: the file a deployment runtime (ONNX Runtime, OpenVINO) loads, and its check.

Two exporters, both torch's own. The published `model.onnx` comes from `torch.onnx.export(dynamo=True)`, the
torch.export-based exporter PyTorch develops and defaults to, with a dynamic batch axis. The latency tables export
hundreds of single layers; for those the TorchScript exporter (`dynamo=False`) is used: 0.01-0.04 s a layer
against 0.8-3 s for the torch.export one on a 2-core AMD EPYC, and a layer alone has no graph feature
(control flow, symbolic shapes) that the two would translate differently.

`kpid_zoo.deploy.check` runs such a graph in ONNX Runtime on real images and checks it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterator

import torch
import torch.nn as nn

from ..errors import UnsupportedModelError, one_line

logger = logging.getLogger(__name__)

OPSET = 18  # the lowest opset torch's torch.export-based exporter writes
INPUT_NAME = 'input'
OUTPUT_NAME = 'logits'
EXPORTERS = ('dynamo', 'torchscript')
# what writing and checking a model.onnx needs (the [deploy] extra): the exporter's own dependencies and ONNX Runtime
ONNX_PACKAGES = ('onnx', 'onnxscript', 'onnxruntime')
DEPLOY_HINT = "pip install 'kpid-zoo[deploy]'"


def missing_onnx_packages() -> list[str]:
    """The packages of `ONNX_PACKAGES` that cannot be imported (a module set to None in sys.modules counts)."""
    missing = []
    for name in ONNX_PACKAGES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a parent package broken, or a module without a spec
            found = False
        if not found:
            missing.append(name)
    return missing


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters report progress on stdout and warn about their own internals: a build's log keeps neither.
    The TorchScript exporter also writes the whole graph to the process's stdout from C++ when an op fails (its
    ONNX log is always on: torch checks `_jit_is_onnx_log_enabled` without calling it), which would print the
    network's layers around a one-line error: file descriptor 1 goes to a discarded file meanwhile."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), _stdout_discarded():
        warnings.simplefilter('ignore')
        yield


@contextlib.contextmanager
def _stdout_discarded() -> Iterator[None]:
    try:
        sys.__stdout__.flush()
        saved = os.dup(1)
    except (AttributeError, OSError, ValueError):  # no file descriptor 1 (an embedded interpreter): nothing to keep
        yield
        return
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 1)
            try:
                yield
            finally:
                os.dup2(saved, 1)
    finally:
        os.close(saved)


def _reason(error: BaseException) -> str:
    """The exporter's reason in one line: the innermost error it chained (torch.export's exporter wraps the op it
    has no translation for, e.g. "No ONNX function found for <OpOverload(op='prims.bessel_i0', ...)>", in two
    generic errors), its terminal colour codes removed."""
    seen = {id(error)}
    while (error.__cause__ or error.__context__) is not None and id(error.__cause__ or error.__context__) not in seen:
        error = error.__cause__ or error.__context__
        seen.add(id(error))
    text = re.sub(r'\x1b\[[0-9;]*m', '', str(error))
    return one_line(Exception(text) if text.strip() else error, 300)


def onnx_bytes(
    model: nn.Module,
    example: torch.Tensor,
    *,
    dynamic_batch: bool = True,
    exporter: str = 'dynamo',
    opset: int = OPSET,
    what: str = '',
) -> bytes:
    """`model` (in eval mode, on the CPU) as a serialised ONNX model with one input `input` and one output `logits`;
    the batch axis is dynamic when `dynamic_batch`. An op the exporter cannot translate is one line naming `what`
    (the network or layer) and the exporter's reason."""
    return _export(model, example, dynamic_batch=dynamic_batch, exporter=exporter, opset=opset, what=what)[0]


def onnx_program(
    model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool = True, opset: int = OPSET, what: str = ''
) -> tuple[bytes, torch.export.ExportedProgram]:
    """`onnx_bytes` with the 'dynamo' exporter, and the `torch.export` graph it translated (ATen ops): the graph
    `deploy.check.check_onnx` derives its tolerance on."""
    data, program = _export(model, example, dynamic_batch=dynamic_batch, exporter='dynamo', opset=opset, what=what)
    if program is None:  # a torch whose ONNXProgram does not keep it
        raise UnsupportedModelError(f'{what or type(model).__name__}: torch.onnx kept no exported program')
    return data, program


def _export(
    model: nn.Module, example: torch.Tensor, *, dynamic_batch: bool, exporter: str, opset: int, what: str
) -> tuple[bytes, torch.export.ExportedProgram | None]:
    if exporter not in EXPORTERS:
        raise ValueError(f'exporter: expected one of {EXPORTERS}, got {exporter!r}')
    model = model.eval()
    buffer = io.BytesIO()
    kwargs: dict = {'input_names': [INPUT_NAME], 'output_names': [OUTPUT_NAME], 'opset_version': opset}
    if exporter == 'dynamo':
        kwargs.update(dynamo=True, verbose=False, optimize=True)
        if dynamic_batch:
            kwargs['dynamic_shapes'] = ({0: torch.export.Dim('batch', min=1, max=1 << 16)},)
    else:
        # verbose=False: left unset, torch's legacy exporter writes the whole graph to stderr when an op fails
        kwargs.update(dynamo=False, do_constant_folding=True, verbose=False)
        if dynamic_batch:
            kwargs['dynamic_axes'] = {INPUT_NAME: {0: 'batch'}, OUTPUT_NAME: {0: 'batch'}}
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(model, (example,), buffer, **kwargs)
    except Exception as e:  # the exporters raise many types; the user needs the op and the layer
        name = what or type(model).__name__
        raise UnsupportedModelError(f'{name}: torch.onnx ({exporter}) cannot export it: {_reason(e)}') from e
    return buffer.getvalue(), getattr(program, 'exported_program', None)


__all__ = [
    'OPSET',
    'INPUT_NAME',
    'OUTPUT_NAME',
    'EXPORTERS',
    'ONNX_PACKAGES',
    'DEPLOY_HINT',
    'missing_onnx_packages',
    'onnx_bytes',
    'onnx_program',
    'package_version',
]
