"""How far a float32 evaluation of a network may lie from its exact value: a tolerance per output, from the
arithmetic of float32 rounding. It is what `model.onnx` is checked with (`kpid_zoo.deploy.check.check_onnx`).

ONNX Runtime and eager PyTorch evaluate the same function in float32; they differ only in the order of each sum,
in fusion (a batch norm folded into the conv before it, a residual add accumulated into the conv's sum, a matmul
and its bias as one GEMM) and in how they approximate sigmoid. Both must lie within the tolerance of the exact
value, computed here in float64 on the network's `torch.export` graph (ATen ops: the graph the ONNX exporter
translated), on the very inputs checked.

**Local errors.** Each op's float32 result differs from the exact op applied to its (already inexact) inputs by
a sum of elementary rounding errors, each a relative error of at most u = 2^-24 (float32's unit roundoff) of an
intermediate result: a dot product of n terms, summed in any order with or without FMA, makes n of them, each at
most u * M, M = sum |w x| (no partial sum exceeds it). rho is the scale sqrt(count) * u * magnitude of an op's
independent roundings (`_independent`), elementwise:

* conv / linear, fan-in n = C_in/groups * kernel: rho = sqrt(n + 5) u (|W| |x| + |bias|) + n 2^-126; the 5 extra
  roundings are the bias add and up to 4 of a batch norm's scale folded into W, 2^-126 a flushed subnormal product.
* batch norm (eval), s = weight / sqrt(var + eps): rho = sqrt(8) u (|s x| + |s mean| + |beta|) (eps add, sqrt,
  divide, subtract, multiply, add, and a folded bias' two roundings).
* add: rho = sqrt(m + 1) u (|a| + |b|), m the accumulation length of a conv (through a batch norm) producing a
  term: ONNX Runtime may add a residual inside that conv's sum. mul: rho = u |y|.
* mean / (adaptive) average pool over k values: rho = sqrt(k + 1) u mean(|x|). max pool, ReLU, view, reshape: exact.
  Padding (TF-"same" convs) and clamping (ReLU6 = hardtanh(0, 6), clamp) only copy or compare values: exact when
  the value they pad with and their bounds are float32 numbers (else no rule); leaky ReLU, div: rho = u |y|; sub
  as add; addcmul (a + v b c): rho = sqrt(2) u (|a| + |v b c|).
* matmul / bmm, inner length n: as a linear layer, rho = sqrt(n + 5) u |A| |B| + n 2^-126. GELU: as hardswish
  (erf or tanh, within a few ULP, of x / sqrt(2), no float32 number). L2 norm over k values:
  rho = sqrt(k + 2) u |y| (k squares summed, a square root).
* layer norm over C values, x^ = (x - mean) / sigma, y = w x^ + b: the mean and the variance are sums of C terms
  (ONNX Runtime's kernel takes the variance as E[x^2] - mean^2, one pass, whose error is relative to E[x^2], not
  to the variance), the rest a few roundings: rho = sqrt(C + 8) u (|w x^| (1 + E[x^2] / sigma^2) +
  |w| E|x| / sigma + |b|).
* scaled dot-product attention, O = softmax(s Q K^T) V over L keys of dimension d: the scores' errors (a dot
  product of d, scaled: e_S = sqrt(d + 2) u s |Q| |K^T|) move each probability by P (e_S + sum_l P_l e_S_l), and
  the softmax's own roundings (an exp of a few ULP, a sum of L, a divide) by sqrt(L + 33) u P (1 + |S - max S|);
  then O = P V is a dot product of L: rho = sqrt(L + 5) u |P| |V| + (e_P) |V|, the attention's errors summed with
  the sign that hurts (no cancellation assumed inside the op).
* sigmoid: rho = 8 u |y| + u (vectorised exp-based sigmoids are within a few ULP; ONNX Runtime's MLAS saturates
  the logistic at |x| = 18, an absolute error below sigmoid(-18) < 2^-25); SiLU = x sigmoid(x): that times |x|,
  plus u |y| for the product; hardswish / hardsigmoid: rho = 4 u (|y| + |x|) (their 1/6 is no float32 number:
  u |x| / 6 per product, plus three roundings).

**Propagation.** A worst-case analysis (every rounding with the sign that hurts, Higham's gamma(n) = n u / (1 - n u)
per dot product, |W| times each error layer after layer) is rigorous but useless: it grows by the |W| row sums at
every layer (1e20 at resnet18's logits). Rounding errors do not conspire: the standard probabilistic model (Higham
and Mary, SIAM J. Sci. Comput. 41(5), 2019) takes the elementary errors as independent and zero-mean. To first
order the output error is then e_j = sum_k J_jk delta_k (J_jk: how output j moves with elementary error k), a sum
of independent terms |J_jk delta_k| <= |J_jk| u M_k, so by Hoeffding's inequality
P(|e_j| >= lambda S_j) <= 2 exp(-lambda^2 / 2) with S_j^2 = sum_k J_jk^2 (u M_k)^2 = sum_i J_ji^2 rho_i^2 (i: an
op's output element). S_j is measured, not bounded: S_j^2 = E[(J (rho * r))_j^2] for independent r_i = +-1
(Rademacher), so K float64 runs of the network with rho * r added to every op's output estimate it (S_j^2 ~
mean over the runs of the change of output j, squared). The tolerance is lambda S_j with lambda = 10 and K = 16:
a 16-sample estimate below half of S_j has probability below 1e-3 (the chi-square tail), and even then
|e_j| >= 5 S_j has probability below 2 exp(-12.5) < 1e-5 per output. The bound u M on each elementary error is
itself far above a typical one (partial sums grow like sqrt(n), not n): on the zoo's nets the float32 errors
measured are 1e-3 to 2e-2 of the tolerance. ONNX Runtime - exact and PyTorch - exact are each checked against it;
PyTorch's own float32 error passing checks the derivation on the model at hand.

It does not cover Winograd / FFT convolutions (ONNX Runtime's CPU provider uses neither) or reduced-precision
math (TF32, bf16). An op without a rule is `NoRoundingModel`: no tolerance, so no check, rather than a guessed one.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

U = 2.0**-24  # float32 unit roundoff (round to nearest)
TINY = 2.0**-126  # the smallest normal float32: a product flushed to zero loses at most this
CONV_EXTRA = 5  # roundings beyond the dot product: the bias add, a folded batch norm's scale (4)
BN_ROUNDINGS = 8
SIGMOID_ULPS = 8
ELEMENTWISE_ULPS = 4
LAMBDA = 10.0  # the tolerance in units of S_j (see the module docstring)
SAMPLES = 16  # K: the Rademacher runs that measure S_j

__all__ = ['NoRoundingModel', 'Tolerance', 'gamma', 'float32_tolerance', 'U', 'LAMBDA', 'SAMPLES']


class NoRoundingModel(Exception):
    """The graph holds an op this analysis has no rule for."""


def gamma(n: int | float) -> float:
    """Higham's gamma_n: |fl(sum of n products) - exact| <= gamma_n * sum |products|, any order."""
    nu = n * U
    if nu >= 1:
        raise ValueError(f'gamma({n}): n*u >= 1, no bound')
    return nu / (1 - nu)


def _independent(n: int) -> float:
    """The scale of n independent roundings, each at most u times the sum's magnitude: sqrt(n) u."""
    return math.sqrt(n) * U


@dataclass
class Tolerance:
    """The exact output (float64), the tolerance per output (lambda * S_j) and how it was derived."""

    exact: torch.Tensor
    tolerance: torch.Tensor
    samples: int
    lam: float


def _op_name(target: Any) -> str:
    """'aten.conv2d.default' -> 'conv2d'."""
    name = getattr(target, '_opname', None) or getattr(target, '__name__', str(target))
    return name.split('.')[0]


def _conv_local(fn: Callable, args: tuple, kwargs: dict, out: torch.Tensor) -> tuple[Any, int]:
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get('bias')
    n = w[0].numel()
    mag = fn(x.abs(), w.abs(), None, *args[3:]) if fn is not F.linear else fn(x.abs(), w.abs())
    if bias is not None:
        shape = (-1,) if fn is F.linear else (1, -1) + (1,) * (out.dim() - 2)
        mag = mag + bias.abs().reshape(shape)
    return _independent(n + CONV_EXTRA) * mag + n * TINY, n + CONV_EXTRA


def _bn_local(args: tuple) -> torch.Tensor:
    x, weight, bias, mean, var = args[:5]
    eps = args[6] if len(args) == 7 else args[7]  # _native_batch_norm_legit_no_training / batch_norm
    shape = (1, -1) + (1,) * (x.dim() - 2)
    s = (weight if weight is not None else torch.ones_like(var)) / torch.sqrt(var + eps)
    beta = bias if bias is not None else torch.zeros_like(var)
    s, mean, beta = s.reshape(shape), mean.reshape(shape), beta.reshape(shape)
    return _independent(BN_ROUNDINGS) * ((s * x).abs() + (s * mean).abs() + beta.abs())


def _layer_norm_local(args: tuple) -> torch.Tensor:
    x, shape = args[0], args[1]
    weight = args[2] if len(args) > 2 else None
    bias = args[3] if len(args) > 3 else None
    eps = args[4] if len(args) > 4 else 1e-5
    dims = tuple(range(x.dim() - len(shape), x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = x.var(dims, unbiased=False, keepdim=True)
    sigma = torch.sqrt(var + eps)
    normalised = (x - mean) / sigma
    w = weight.abs() if weight is not None else torch.ones_like(x)
    b = bias.abs() if bias is not None else 0.0
    square = (x * x).mean(dims, keepdim=True)
    count = math.prod(shape)
    scale = (w * normalised).abs() * (1 + square / sigma**2) + w * x.abs().mean(dims, keepdim=True) / sigma + b
    return _independent(count + 8) * scale


def _attention_local(args: tuple, kwargs: dict) -> torch.Tensor:
    q, k, v = args[:3]
    mask = args[3] if len(args) > 3 else kwargs.get('attn_mask')
    causal = args[5] if len(args) > 5 else kwargs.get('is_causal', False)
    scale = kwargs.get('scale') or (args[6] if len(args) > 6 else None)
    if mask is not None or causal:
        raise NoRoundingModel('scaled_dot_product_attention with a mask')
    d, keys = q.shape[-1], k.shape[-2]
    scale = scale if scale is not None else 1 / math.sqrt(d)
    scores = scale * (q @ k.transpose(-2, -1))
    probs = torch.softmax(scores, dim=-1)
    score_error = _independent(d + 2) * abs(scale) * (q.abs() @ k.abs().transpose(-2, -1))
    own = _independent(keys + 33) * (1 + (scores - scores.amax(-1, keepdim=True)).abs())
    prob_error = probs * (score_error + (probs * score_error).sum(-1, keepdim=True) + own)
    return _independent(keys + CONV_EXTRA) * (probs @ v.abs()) + prob_error @ v.abs() + keys * TINY


def _sigmoid_local(y: torch.Tensor) -> torch.Tensor:
    return SIGMOID_ULPS * U * y.abs() + U


def _abs(a: Any) -> Any:
    return a.abs() if isinstance(a, torch.Tensor) else abs(a)


def _reduced(x: torch.Tensor, dims: Any) -> int:
    dims = range(x.dim()) if dims is None else ([dims] if isinstance(dims, int) else dims)
    return math.prod(x.shape[d] for d in dims)


# ops that only move values, or are exact in floating point (ReLU, max pool)
_EXACT = {
    'view',
    'reshape',
    '_unsafe_view',
    'expand',
    'flatten',
    'permute',
    'transpose',
    'squeeze',
    'unsqueeze',
    'clone',
    'contiguous',
    'dropout',
    'alias',
    'detach',
    'slice',
    'select',
    'cat',
    'relu',
    'max_pool2d',
    'max_pool1d',
    'as_strided',
    'split',
    'split_with_sizes',
    'chunk',
    'unbind',
    'sym_size',
    'size',
    'sym_numel',
    'numel',
}


# ops that copy or compare values against constants (argument positions, keyword names): exact when those
# constants are float32 numbers
_COPIES_CONSTANTS = {
    'pad': ((3, 'value'),),
    'constant_pad_nd': ((2, 'value'),),
    'hardtanh': ((1, 'min_val'), (2, 'max_val')),
    'clamp': ((1, 'min'), (2, 'max')),
    'clamp_min': ((1, 'min'),),
    'clamp_max': ((1, 'max'),),
    'scalar_tensor': ((0, 's'),),
}


def _constant_of(name: str, args: tuple, kwargs: dict, where: tuple[int, str]) -> Any:
    position, keyword = where
    value = args[position] if len(args) > position else kwargs.get(keyword)
    if isinstance(value, torch.Tensor):
        raise NoRoundingModel(f'{name} with a tensor bound')
    return value


def _is_float32(value: float) -> bool:
    return math.isfinite(value) and float(torch.tensor(value, dtype=torch.float32)) == value


def local_error(target: Any, args: tuple, kwargs: dict, out: Any, acc: dict[int, int]) -> tuple[Any, int]:
    """(rho, the accumulation length a later add may be fused into) of one op at exact arguments; `acc` maps
    id(argument) to its own accumulation length."""
    name = _op_name(target)
    if name in _EXACT:
        return 0.0, 0
    if name in ('conv1d', 'conv2d', 'conv3d', 'linear'):
        fn = {'conv1d': F.conv1d, 'conv2d': F.conv2d, 'conv3d': F.conv3d, 'linear': F.linear}[name]
        return _conv_local(fn, args, kwargs, out)
    if name == '_native_batch_norm_legit_no_training' or (name == 'batch_norm' and not args[5]):
        return _bn_local(args), acc.get(id(args[0]), 0)
    if name == 'sigmoid':
        return _sigmoid_local(out), 0
    if name == 'silu':
        return _sigmoid_local(torch.sigmoid(args[0])) * args[0].abs() + U * out.abs(), 0
    if name in ('hardswish', 'hardsigmoid'):
        return ELEMENTWISE_ULPS * U * (out.abs() + args[0].abs()), 0
    if name in ('add', 'sub'):
        a, b = args[0], args[1]
        alpha = kwargs.get('alpha', 1)
        m = max(acc.get(id(a), 0), acc.get(id(b), 0))
        return _independent(m + 1) * (_abs(a) + abs(alpha) * _abs(b)), 0
    if name in ('mul', 'div', 'leaky_relu'):
        return U * out.abs(), 0
    if name == 'addcmul':
        a, b, c = args[:3]
        value = args[3] if len(args) > 3 else kwargs.get('value', 1)
        return _independent(2) * (_abs(a) + abs(value) * _abs(b) * _abs(c)), 0
    if name in ('matmul', 'bmm', 'mm'):
        a, b = args[0], args[1]
        n = a.shape[-1]
        return _independent(n + CONV_EXTRA) * (a.abs() @ b.abs()) + n * TINY, n + CONV_EXTRA
    if name == 'gelu':
        return ELEMENTWISE_ULPS * U * (out.abs() + args[0].abs()), 0
    if name == 'linalg_vector_norm':
        order = args[1] if len(args) > 1 else kwargs.get('ord', 2)
        if order != 2:
            raise NoRoundingModel(f'{target} of order {order}')
        dims = args[2] if len(args) > 2 else kwargs.get('dim')
        return _independent(_reduced(args[0], dims) + 2) * out.abs(), 0
    if name == 'layer_norm':
        return _layer_norm_local(args), 0
    if name == 'scaled_dot_product_attention':
        return _attention_local(args, kwargs), 0
    if name in _COPIES_CONSTANTS:
        constants = [_constant_of(name, args, kwargs, i) for i in _COPIES_CONSTANTS[name]]
        unrepresentable = [c for c in constants if c is not None and not _is_float32(c)]
        if unrepresentable:  # the float32 graph holds a rounded constant: that is no rounding of arithmetic
            raise NoRoundingModel(f'{target} with {unrepresentable[0]!r}, which is no float32 number')
        return 0.0, 0
    if name == 'mean':
        dims = args[1] if len(args) > 1 else kwargs.get('dim')
        keep = args[2] if len(args) > 2 else kwargs.get('keepdim', False)
        k = _reduced(args[0], dims)
        return _independent(k + 1) * args[0].abs().mean(dim=dims, keepdim=keep), 0
    if name in ('avg_pool2d', 'avg_pool1d'):
        kernel = args[1]
        k = math.prod(kernel) if isinstance(kernel, (list, tuple)) else kernel ** (args[0].dim() - 2)
        fn = F.avg_pool2d if name == 'avg_pool2d' else F.avg_pool1d
        return _independent(k + 1) * fn(args[0].abs(), *args[1:]), 0
    if name == 'adaptive_avg_pool2d':
        (h, w), (oh, ow) = args[0].shape[-2:], out.shape[-2:]
        k = math.ceil(h / oh + 1) * math.ceil(w / ow + 1) if (oh, ow) != (1, 1) else h * w  # the largest window
        return _independent(k + 1) * F.adaptive_avg_pool2d(args[0].abs(), args[1]), 0
    raise NoRoundingModel(str(target))


def _interpret(
    program: torch.export.ExportedProgram,
    x: torch.Tensor,
    on_op: Callable[[Any, Any, tuple, dict, Any], Any],
) -> Any:
    """Run the graph of `program` in float64 on `x`; `on_op(node, target, args, kwargs, out)` may replace each
    op's output."""
    params = {**program.state_dict, **getattr(program, 'constants', {})}
    specs = {s.arg.name: s for s in program.graph_signature.input_specs if hasattr(s.arg, 'name')}
    env: dict[str, Any] = {}
    with torch.no_grad():
        for node in program.graph.nodes:
            if node.op == 'placeholder':
                spec = specs.get(node.name)
                if spec is not None and spec.target is not None:
                    value = params[spec.target].detach()
                    env[node.name] = value.to(torch.float64) if value.is_floating_point() else value
                else:
                    env[node.name] = x
            elif node.op == 'call_function':
                args = tuple(torch.fx.node.map_arg(node.args, lambda n: env[n.name]))
                kwargs = dict(torch.fx.node.map_arg(node.kwargs, lambda n: env[n.name]))
                out = node.target(*args, **kwargs)
                if node.target is not operator.getitem:
                    out = on_op(node, node.target, args, kwargs, out)
                env[node.name] = out
            elif node.op == 'output':
                outs = torch.fx.node.map_arg(node.args[0], lambda n: env[n.name])
                return outs[0] if isinstance(outs, (list, tuple)) else outs
            else:
                raise NoRoundingModel(f'graph node {node.op} {node.target}')
    raise NoRoundingModel('the graph has no output')


def float32_tolerance(
    program: torch.export.ExportedProgram,
    x: torch.Tensor,
    *,
    samples: int = SAMPLES,
    lam: float = LAMBDA,
    seed: int = 0,
) -> Tolerance:
    """The exact output (float64) of the exported network `program` (eval mode, one tensor input, one tensor
    output) at the float32 input `x`, and the tolerance per output within which any float32 evaluation of it lies
    (see the module docstring). Raises `NoRoundingModel` naming the first op without a rule."""
    x64 = x.detach().to(torch.float64)
    rho: dict[str, Any] = {}
    acc: dict[int, int] = {}

    def exact(node, target, args, kwargs, out):
        value = out[0] if isinstance(out, tuple) else out  # batch norm: (out, save_mean, save_invstd)
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            rho[node.name], acc[id(value)] = local_error(target, args, kwargs, value, acc)
            if isinstance(out, tuple):
                acc[id(out)] = acc[id(value)]
        return out

    exact_out = _interpret(program, x64, exact)
    generator = torch.Generator().manual_seed(seed)

    def perturbed(node, target, args, kwargs, out):
        r = rho.get(node.name)
        if not isinstance(r, torch.Tensor) and not r:
            return out
        value = out[0] if isinstance(out, tuple) else out
        sign = torch.randint(0, 2, value.shape, generator=generator, dtype=torch.float64) * 2 - 1
        value = value + sign * r
        return (value, *out[1:]) if isinstance(out, tuple) else value

    # one run per sample, at the input's own batch size: a graph exported for a fixed batch runs only that
    squares = torch.zeros_like(exact_out)
    for _ in range(samples):
        squares += (_interpret(program, x64, perturbed) - exact_out) ** 2
    return Tolerance(exact_out, lam * (squares / samples).sqrt(), samples, lam)
