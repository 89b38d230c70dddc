"""The runtimes a pruned net is deployed in, one handler each (as the engine has one per layer type): eager
PyTorch, ONNX Runtime (CPU execution provider) and OpenVINO (CPU plugin).

A runtime compiles a network for one input shape and returns a function from a float32 array to the network's
output array; `bind` fixes the input so timing calls nothing but the runtime. ONNX Runtime and OpenVINO run the
network's ONNX graph (`kpid_zoo.deploy.onnx`), each with its own graph optimisations (conv + norm + activation
fusion, kernels chosen by shape), which is why a width fast in one need not be fast in the other. Their packages
are optional (`pip install 'kpid-zoo[deploy]'`); asking for one that is not installed is one line naming the
package.

Threads: each compiled network uses `threads` intra-op threads and runs one inference at a time (ONNX Runtime:
`intra_op_num_threads`, one inter-op thread; OpenVINO: `INFERENCE_NUM_THREADS`, one stream, the LATENCY hint), as
eager PyTorch does under `kpid_zoo.core.threads.fixed_threads`. ONNX Runtime's intra-op threads spin for a while
after each run, waiting for the next: with two sessions timed in turn (a candidate beside its reference), the first
one's spinning threads hold the cores the second one needs. Its sessions stop spinning when a run ends
(`session.force_spinning_stop`; within a run they spin as deployed). Measured, two sessions of one network in turn at
batch 32 on 2 threads: the A/A ratio's IQR went from +-25-50% to +-3%, and each run took half the time.
Eager PyTorch's tensors come from the C library's malloc, whose thresholds are fixed before it is timed
(`kpid_zoo.core.allocator`: else two processes time one pair of networks at different ratios).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from ..core import allocator
from ..core.threads import fixed_threads
from ..errors import MissingDependencyError, UnsupportedModelError, UserError, one_line
from .onnx import onnx_bytes

Compiled = Callable[[np.ndarray], np.ndarray]


class Runtime:
    """What kpid-zoo knows of one runtime: its package, its version, and how it compiles and runs a network."""

    name: str = ''
    distribution: str | None = None  # the PyPI package that provides it (None: always present)
    module: str | None = None  # the module it is imported as
    uses_onnx: bool = True

    def installed(self) -> bool:
        return self.module is None or importlib.util.find_spec(self.module) is not None

    def require(self) -> None:
        """Fail with one line unless the runtime's package can be imported."""
        if not self.installed():
            raise MissingDependencyError(
                f'runtime {self.name!r} needs the {self.distribution} package: '
                f"pip install 'kpid-zoo[deploy]' (or pip install {self.distribution})"
            )

    def version(self) -> str:
        return importlib.metadata.version(self.distribution) if self.distribution else ''

    def settings(self) -> dict[str, str]:
        """The runtime's options beyond the threads that its timings depend on (a latency table's key has them)."""
        return {}

    def prepare(self) -> None:
        """Set this process up to time the runtime on the CPU (`kpid_zoo.budget.timing` calls it first)."""

    def describe(self) -> str:
        """The runtime and its version: what a latency table and a measured figure depend on."""
        return f'{self.name} {self.version()}'

    def compile(
        self, model: nn.Module, example: torch.Tensor, threads: int, *, exporter: str = 'dynamo', what: str = ''
    ) -> Compiled:
        """`model` ready to run on inputs shaped like `example` (float32, CPU). A whole network (`exporter`
        'dynamo') that cannot be exported or run is one line naming the layer that fails alone (`failing_layer`)."""
        self.require()
        try:
            data = onnx_bytes(model, example, dynamic_batch=False, exporter=exporter, what=what)
            return self.compile_onnx(data, tuple(example.shape), threads, what=what)
        except UnsupportedModelError as e:
            layer = failing_layer(self, model, example, threads) if exporter == 'dynamo' else None
            if layer is None:
                raise
            name = what or type(model).__name__
            detail = str(e).removeprefix(f'{name}: ')
            raise UnsupportedModelError(f'{name}: {layer}: {detail}') from e

    def compile_onnx(self, data: bytes, shape: tuple[int, ...], threads: int, *, what: str = '') -> Compiled:
        raise NotImplementedError

    def unsupported(self, what: str, error: Exception) -> UnsupportedModelError:
        return UnsupportedModelError(
            f'{what or "the network"}: {self.describe()} cannot run it: {one_line(error, 300)}'
        )


class TorchRuntime(Runtime):
    """Eager PyTorch: the network itself, under inference mode, with torch's intra-op threads fixed."""

    name = 'torch'
    distribution = 'torch'
    module = 'torch'
    uses_onnx = False

    def settings(self):
        return allocator.settings()  # eager tensors come from malloc: its thresholds are fixed while timing

    def prepare(self):
        allocator.fix_thresholds()

    def compile(self, model, example, threads, *, exporter='dynamo', what=''):
        model = model.eval()

        def run(x: np.ndarray) -> np.ndarray:
            with fixed_threads(threads), torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        return run


class OnnxRuntime(Runtime):
    """ONNX Runtime's CPU execution provider, every graph optimisation on (its default for a session)."""

    name = 'onnxruntime'
    distribution = 'onnxruntime'
    module = 'onnxruntime'

    def settings(self):
        return {'session.force_spinning_stop': '1'}  # see the module's docstring

    def session_options(self, threads: int):
        """A session's options: `threads` intra-op threads, one op at a time, `settings()`, errors logged only."""
        self.require()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only: its warnings are about its own graph rewrites
        for entry, value in self.settings().items():
            options.add_session_config_entry(entry, value)
        return options

    def compile_onnx(self, data, shape, threads, *, what=''):
        import onnxruntime as ort

        options = self.session_options(threads)
        try:
            session = ort.InferenceSession(data, options, providers=['CPUExecutionProvider'])
        except Exception as e:  # onnxruntime raises its own exception types per failure
            raise self.unsupported(what, e) from e
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]


class OpenVinoRuntime(Runtime):
    """OpenVINO's CPU plugin, compiled for the input's static shape with the LATENCY hint and one stream."""

    name = 'openvino'
    distribution = 'openvino'
    module = 'openvino'

    def compile_onnx(self, data, shape, threads, *, what=''):
        self.require()
        import openvino as ov

        core = ov.Core()
        try:
            model = core.read_model(data)
            model.reshape({model.inputs[0]: ov.PartialShape(list(shape))})
            compiled = core.compile_model(
                model,
                'CPU',
                {'INFERENCE_NUM_THREADS': threads, 'NUM_STREAMS': 1, 'PERFORMANCE_HINT': 'LATENCY'},
            )
        except Exception as e:  # OpenVINO raises RuntimeError / its own types for unsupported ops
            raise self.unsupported(what, e) from e
        request = compiled.create_infer_request()

        def run(x: np.ndarray) -> np.ndarray:
            request.infer({0: x})
            return request.get_output_tensor(0).data

        return run


def failing_layer(runtime: Runtime, model: nn.Module, example: torch.Tensor, threads: int) -> str | None:
    """The first leaf module of `model` (in call order) that cannot be exported or run alone in `runtime`, on the
    input it sees in a forward pass on `example`; None when every one can (the failure is in how they combine).
    What a network's export error lacks: torch.export's exporter names the op, not the layer."""
    inputs: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in model.named_modules():
        if name and next(module.children(), None) is None:

            def record(_m, args, name=name):
                if args and isinstance(args[0], torch.Tensor) and name not in inputs:
                    inputs[name] = args[0].detach().clone()

            hooks.append(module.register_forward_pre_hook(record))
    try:
        with torch.no_grad():
            model(example)
    except Exception:  # a network that does not even run eagerly: its own error says more than a layer would
        return None
    finally:
        for h in hooks:
            h.remove()
    for name, x in inputs.items():
        try:
            data = onnx_bytes(model.get_submodule(name), x, dynamic_batch=False, exporter='torchscript', what=name)
            runtime.compile_onnx(data, tuple(x.shape), threads, what=name)
        except UnsupportedModelError:
            return name
    return None


RUNTIMES: dict[str, Runtime] = {r.name: r for r in (TorchRuntime(), OnnxRuntime(), OpenVinoRuntime())}


def get_runtime(name: str) -> Runtime:
    """The runtime called `name`; one line for an unknown name (listing the known ones) or a missing package."""
    runtime = RUNTIMES.get(name)
    if runtime is None:
        raise UserError(f'expected a runtime among {", ".join(RUNTIMES)}, got {name!r}')
    runtime.require()
    return runtime


def bind(compiled: Compiled, x: np.ndarray) -> Callable[[], object]:
    """A call of `compiled` on a fixed input: what the timing functions time."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return lambda: compiled(x)


__all__ = [
    'Compiled',
    'Runtime',
    'failing_layer',
    'TorchRuntime',
    'OnnxRuntime',
    'OpenVinoRuntime',
    'RUNTIMES',
    'get_runtime',
    'bind',
]
