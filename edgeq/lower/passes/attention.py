"""Passes: the attention matmuls as integer kernels.

``FuseQMatmul`` -- a matmul of two per-tensor quantized activations (``q @ k^T``; also ``p @ v`` when the
softmax output is uniformly quantized)::

    y = R.matmul(R.dequantize(a, sa, za), R.dequantize(b, sb, zb))      # a [..., T, D], b [..., D, S]
 -> acc = R.call_tir(qk_kernel, (reshape(a, [G, T, D]), reshape(permute(b), [G, S, D])))   # int32 [G, T, S]
    y   = reshape(astype(acc, float32) * (sa * sb), [..., T, S])

The leading dims (batch x heads, or Swin's windows x heads) are flattened into ``G``; the transpose of the
second operand is done on its int8/uint8 codes. What follows (scale already applied before quantization,
Swin's relative position bias and masks, Softmax) stays float.

``FuseLog2AV`` -- ``softmax @ v`` with edgeq's log2 post-Softmax quantizer: the first operand is a float chain
of elementwise ops reading a ``uint8`` code tensor (the export's ``L.a_quant.codes``), the second a dequantized
activation. The chain is evaluated on every code 0..255 (a numpy interpreter of the few elementwise ops it
uses) and the resulting table must be ``s * 2**-c`` (log2 codes) or
``s * 2**-ceil(c/2) * (2**F + (c mod 2) * M) / 2**F`` (log-sqrt(2) codes read as log2) to float32 rounding
below the zero code ``Z`` (the first code read as 0; anything else is refused). Codes above ``Z`` are read
as 0 by the kernel; edgeq's quantize half never produces them (it clamps to ``Z``). Then::

    acc = R.call_tir(log2_av_kernel, (reshape(codes, [G, T, S]), reshape(v, [G, S, D])))  # int32 [G, T, D]
    y   = reshape(astype(acc, float32) * (s * sv * 2**-base_shift), [..., T, D])

The kernel computes each term as ``(v - zv) * 2**S * mant / 2**e`` floored (see
:func:`edgeq.lower.kernels.reference.log2_av`): against the float product the error is at most ``T * 2**-S``
units of ``sv``, all on one side. ``S`` is the largest base shift int32 allows (edgeq's F = 8, M = 106 is read as the equal
F = 7, M = 53): per term ``255 * 2**S * 181/128 < 2**30`` (S <= 21), and for the sum either the general
``T * 255 * 2**S * 181/128 < 2**31`` (S = 14 at T = 197) or, when the codes are verified to quantize a
softmax over the matmul's axis (:func:`softmax_prob_sum`: an elementwise chain from ``R.nn.softmax``, monotone
on a dense grid), ``255 * 2**S * B + T < 2**31`` with ``B >= sum_j p_hat_j / s`` (about ``1.19 / s``: a
log-sqrt(2) code overstates a probability by at most ``2**(1/4)``), i.e. S = 21 for ``s = 1``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from edgeq.errors import UnsupportedModelError
from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.attention import log2_av_kernel, qk_kernel
from edgeq.lower.kernels.relax_glue import emit_call
from edgeq.lower.relax_import import matmul_key
from edgeq.compile.targets import as_tvm_target

from ._graph import (BindingRewriter, Graph, cached_kernel, dtype_of, match_act_dequant,
                     rewrite_functions, shape_of)

__all__ = ["FuseQMatmul", "FuseLog2AV", "Log2Codes", "match_log2_codes", "log2_table", "softmax_source", "evaluate_chain"]


def _batched_shapes(a: tuple[int, ...], b: tuple[int, ...]) -> Optional[tuple[int, int, int, int]]:
    """(G, T, D, S) for ``a [..., T, D] @ b [..., D, S]`` with equal leading dims, else None."""
    if len(a) < 2 or len(a) != len(b) or a[:-2] != b[:-2] or a[-1] != b[-2]:
        return None
    return int(np.prod(a[:-2], dtype=np.int64)), a[-2], a[-1], b[-1]


def _dequantize_float(bb: relax.BlockBuilder, acc: relax.Expr, scale: float, shape) -> relax.Expr:
    out = bb.emit(relax.op.astype(acc, "float32"))
    out = bb.emit(relax.op.multiply(out, relax.const(np.float32(scale))))
    return relax.op.reshape(out, tuple(shape))


# --- q @ k^T (and any uniform x uniform matmul) --------------------------------------------------------


@mutator
class _QMatmulRewriter(BindingRewriter):
    def rewrite(self, var, call):
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return None
        a = match_act_dequant(self.graph, call.args[0])
        b = match_act_dequant(self.graph, call.args[1])
        if a is None or b is None:
            return None
        dims = _batched_shapes(a.shape, b.shape)
        if dims is None:
            raise UnsupportedModelError(
                f"binding {var.name}: quantized matmul of shapes {a.shape} and {b.shape} is not supported "
                "(supported: [..., T, D] @ [..., D, S] with equal leading dims)")
        g, t, d, s = dims
        bb = self.builder_
        a3 = bb.emit(relax.op.reshape(self.visit_expr(a.codes), (g, t, d)))
        perm = list(range(len(b.shape) - 2)) + [len(b.shape) - 1, len(b.shape) - 2]
        bt = bb.emit(relax.op.permute_dims(self.visit_expr(b.codes), perm))
        b3 = bb.emit(relax.op.reshape(bt, (g, s, d)))
        kernel = cached_kernel(qk_kernel, g, t, s, d, target=self.target, q_dtype=a.dtype, k_dtype=b.dtype,
                               q_zp=a.zero_point, k_zp=b.zero_point)
        layer = self.namer.name(matmul_key(a.scale, b.scale), "qmatmul")
        acc = emit_call(bb, kernel.func, kernel.name, [a3, b3], kernel.out_shape, kernel.out_dtype, name_hint=layer)
        self.namer.record(acc, layer)
        return _dequantize_float(bb, acc, np.float64(a.scale) * np.float64(b.scale), shape_of(var))


@tvm.transform.module_pass(opt_level=0, name="edgeq.FuseQMatmul")
class FuseQMatmul:
    """Matmuls of two quantized activations -> integer ``qk`` kernels (see the module docstring)."""

    def __init__(self, target):
        self.target = as_tvm_target(target)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _QMatmulRewriter(mod, self.target))


# --- softmax @ v with log2 codes ---------------------------------------------------------------------

_ELEMENTWISE = {
    "astype", "multiply", "add", "subtract", "divide", "floor", "ceil", "negative", "power", "equal", "where",
    "less", "greater", "logical_and", "logical_not", "round", "maximum", "minimum",
}
_MAX_CHAIN = 64


@dataclass(frozen=True)
class Log2Codes:
    """The uint8 code tensor behind a dequantized log2 operand and how its table reads."""

    codes: relax.Expr
    scale: float
    zero_code: int
    odd_multiplier: Optional[int]   # None: plain log2 codes
    frac_bits: int
    prob_sum: Optional[float] = None  # proven bound on sum_j p_j / scale over a row (codes of a softmax)


def _chain_leaves(graph: Graph, expr: relax.Expr) -> Optional[tuple[relax.Var, list]]:
    """The one uint8 var an elementwise float chain ending at ``expr`` reads (and the chain's vars)."""
    leaf, seen, stack = None, [], [expr]
    while stack:
        v = stack.pop()
        if graph.const_value(v) is not None:
            continue
        if not isinstance(v, relax.Var):
            return None
        if any(v.same_as(s) for s in seen):
            continue
        seen.append(v)
        if len(seen) > _MAX_CHAIN:
            return None
        op = graph.op_name(v)
        if dtype_of(v) == "uint8":
            if leaf is not None and not leaf.same_as(v):
                return None
            leaf = v
            continue
        if op not in _ELEMENTWISE:
            return None
        stack.extend(graph.producer[v].args)
    return (leaf, seen) if leaf is not None else None


def evaluate_chain(graph: Graph, expr: relax.Expr, leaf: relax.Var, codes: np.ndarray, memo: dict) -> np.ndarray:
    if isinstance(expr, relax.Var) and expr.same_as(leaf):
        return codes
    const = graph.const_value(expr)
    if const is not None:
        if const.size != 1:
            raise ValueError("non-scalar constant in the log2 chain")
        return const.reshape(())
    if expr in memo:
        return memo[expr]
    call = graph.producer[expr]
    op = call.op.name[len("relax."):]
    if op in _VALUE_PRESERVING:  # element values unchanged; numpy broadcasting stands in for the shape
        memo[expr] = evaluate_chain(graph, call.args[0], leaf, codes, memo)
        return memo[expr]
    if op == "stack":  # ONNX Max/Min of two tensors imports as max(stack((a, b)), axis=0)
        parts = np.broadcast_arrays(*[evaluate_chain(graph, a, leaf, codes, memo) for a in call.args[0].fields])
        memo[expr] = np.stack(parts, axis=int(call.attrs.axis))
        return memo[expr]
    args = [evaluate_chain(graph, a, leaf, codes, memo) for a in call.args]
    f32 = lambda x: np.asarray(x, np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)  # noqa: E731
    if op == "astype":
        out = np.asarray(args[0]).astype(str(call.attrs.dtype))
    elif op in ("max", "min"):  # only over a stack's new axis (checked by softmax_source)
        fn = np.max if op == "max" else np.min
        out = fn(args[0], axis=tuple(int(a) for a in call.attrs.axis), keepdims=bool(call.attrs.keepdims))
    elif op in ("isfinite", "isnan"):
        out = (np.isfinite if op == "isfinite" else np.isnan)(args[0])
    elif op == "bitwise_and":
        out = np.bitwise_and(args[0], args[1])
    elif op in ("multiply", "add", "subtract", "divide", "power", "maximum", "minimum"):
        fn = {"multiply": np.multiply, "add": np.add, "subtract": np.subtract, "divide": np.divide,
              "power": np.power, "maximum": np.maximum, "minimum": np.minimum}[op]
        out = fn(f32(args[0]), f32(args[1]))
    elif op in ("floor", "ceil", "negative", "round", "logical_not", "log"):
        fn = {"floor": np.floor, "ceil": np.ceil, "negative": np.negative, "round": np.round,
              "logical_not": np.logical_not, "log": np.log}[op]
        out = fn(f32(args[0]))
    elif op in ("equal", "less", "greater", "logical_and"):
        fn = {"equal": np.equal, "less": np.less, "greater": np.greater, "logical_and": np.logical_and}[op]
        out = fn(args[0], args[1])
    elif op == "where":
        out = np.where(args[0], f32(args[1]), f32(args[2]))
    else:  # pragma: no cover - _chain_leaves admits only the ops above
        raise ValueError(op)
    memo[expr] = out
    return out


def log2_table(graph: Graph, expr: relax.Expr) -> Optional[tuple[relax.Var, np.ndarray]]:
    """(codes var, float32 value of every code 0..255) for a float chain reading one uint8 code tensor."""
    found = _chain_leaves(graph, expr)
    if found is None:
        return None
    leaf, _ = found
    codes = np.arange(256, dtype=np.uint8)
    with np.errstate(all="ignore"):
        table = np.broadcast_to(evaluate_chain(graph, expr, leaf, codes, {}), (256,)).astype(np.float32)
    return leaf, table


def _fit_log2(table: np.ndarray) -> Optional[tuple[float, int, Optional[int], int]]:
    """(scale, zero code, odd multiplier or None, frac bits) when ``table`` is one of the two readings."""
    scale = float(table[0])
    if not scale > 0 or not np.isfinite(table).all():
        return None
    zeros = np.nonzero(table == 0)[0]
    if not len(zeros):
        return None
    zero_code = int(zeros[0])  # codes above it never occur: edgeq's quantize half clamps to the zero code
    if zero_code < 2:
        return None
    c = np.arange(zero_code)
    live = table[:zero_code].astype(np.float64)
    s32 = np.float32(scale)

    def close(expected) -> bool:
        # float32 rounding of the chain's last multiply; the deepest codes may underflow float32
        expected = np.asarray(expected, np.float64)
        normal = expected >= 1e-30
        return bool(np.all(np.abs(live - expected)[normal] <= 1e-6 * expected[normal])
                    and np.all(live[~normal] <= 1e-30))

    if close(np.float64(s32) * np.exp2(-c.astype(np.float64))):
        return scale, zero_code, None, 0
    ratio = 2.0 * float(table[1]) / scale - 1.0
    for frac in range(1, 17):
        mult = int(round((math.sqrt(2.0) - 1.0) * 2**frac))
        if mult / 2**frac != np.float32(ratio) and abs(mult / 2**frac - ratio) > 1e-7:
            continue
        expected = np.float64(s32) * (2**frac + (c % 2) * mult) / 2**frac * np.exp2(-np.ceil(c / 2.0))
        if close(expected):
            return scale, zero_code, mult, frac
    return None


def match_log2_codes(graph: Graph, expr: relax.Expr) -> Optional[Log2Codes]:
    found = log2_table(graph, expr)
    if found is None:
        return None
    leaf, table = found
    fit = _fit_log2(table)
    if fit is None:
        return None
    scale, zero_code, mult, frac = fit
    return Log2Codes(leaf, scale, zero_code, mult, frac, softmax_prob_sum(graph, leaf, table, scale))


# --- a bound on sum_j p_j when the codes quantize a softmax -----------------------------------------------

_QUANTIZE_OPS = _ELEMENTWISE | {"log", "isfinite", "isnan", "bitwise_and", "broadcast_to", "stack", "max", "min"}
_VALUE_PRESERVING = {"broadcast_to"}
_GRID_STEPS_PER_OCTAVE = 64
_GRID_OCTAVES = 60          # probabilities below 2**-60 only enter through the tail term
_SOFTMAX_SUM_SLACK = 1e-3   # float32 softmax rows sum to 1 within a few ulps per term; generous
_LOG_SLACK = 1e-4


def softmax_source(graph: Graph, codes: relax.Var) -> Optional[relax.Var]:
    """The softmax output (over the last axis) that an elementwise chain turns into ``codes``, else None."""
    if graph.op_name(codes) != "astype":
        return None
    source, seen, stack = None, [], list(graph.producer[codes].args)
    while stack:
        v = stack.pop()
        if graph.const_value(v) is not None:
            continue
        if not isinstance(v, relax.Var) or len(seen) > _MAX_CHAIN:
            return None
        if any(v.same_as(s) for s in seen):
            continue
        seen.append(v)
        op = graph.op_name(v)
        if op == "nn.softmax":
            axis = int(graph.producer[v].attrs.axis)
            if axis not in (-1, len(shape_of(v)) - 1) or (source is not None and not source.same_as(v)):
                return None
            source = v
            continue
        if op not in _QUANTIZE_OPS:
            return None
        call = graph.producer[v]
        if op in _VALUE_PRESERVING:
            stack.append(call.args[0])
        elif op == "stack":
            if not isinstance(call.args[0], relax.Tuple):
                return None
            stack.extend(call.args[0].fields)
        elif op in ("max", "min"):  # a reduction is elementwise only over the new axis of a stack
            inner = graph.producer.get(call.args[0]) if isinstance(call.args[0], relax.Var) else None
            axes = [int(a) for a in call.attrs.axis] if call.attrs.axis is not None else None
            if graph.op_name(call.args[0]) != "stack" or axes != [int(inner.attrs.axis)] or call.attrs.keepdims:
                return None
            stack.append(call.args[0])
        else:
            stack.extend(call.args)
    return source


def softmax_prob_sum(graph: Graph, codes: relax.Var, table: np.ndarray, scale: float) -> Optional[float]:
    """A sound bound on ``sum_j table[codes_j] / scale`` over a row, or None when it cannot be shown.

    Only for codes that an elementwise chain computes from a softmax over the last axis (so the row's
    probabilities ``p_j >= 0`` sum to 1). The chain is evaluated on a geometric grid ``x_0 < x_1 < ...`` of
    probabilities; it must be monotone there (codes non-increasing, values non-decreasing in ``p``) -- round,
    log, max, where-clamps are -- and then ``table[code(p)] <= kappa * p`` with
    ``kappa = max_k table[code(x_{k+1} (1 + 1e-4))] / x_k`` for ``p >= x_0`` (the slack covers a compiled log
    a few ulps off numpy's), and ``<= table[code(x_0 (1 + 1e-4))]`` below ``x_0``.
    So ``sum_j p_hat_j <= kappa * sum_j p_j + T * table[code(x_0)]``. The tail must be below ``2**-30 * scale``
    (codes reach the zero code or ~2**-60 on the grid), so for rows under 2**20 it adds less than 1e-3.
    Anything else (another producer, a reshape in between, a non-monotone chain) gives None: the caller then
    uses the general bound (every probability may be the largest).
    """
    source = softmax_source(graph, codes)
    if source is None:
        return None
    steps = _GRID_STEPS_PER_OCTAVE * _GRID_OCTAVES
    grid = np.unique(np.exp2(-np.arange(steps, -1, -1) / _GRID_STEPS_PER_OCTAVE).astype(np.float32))
    # the compiled log may differ from numpy's by a few ulps, moving code boundaries by ~1e-5 relative at
    # 2**-60: codes are read at x * (1 + _LOG_SLACK), an upper bound on what any such log gives at x
    raised = (grid.astype(np.float64) * (1.0 + _LOG_SLACK)).astype(np.float32)
    try:
        with np.errstate(all="ignore"):
            code = np.broadcast_to(evaluate_chain(graph, codes, source, raised, {}), grid.shape).astype(np.int64)
    except (ValueError, KeyError, TypeError):
        return None
    if code.min() < 0 or code.max() > 255:
        return None
    value = table[code].astype(np.float64)
    if np.any(np.diff(code) > 0) or np.any(np.diff(value) < 0) or not np.isfinite(value).all():
        return None
    x = grid.astype(np.float64)
    kappa = float(np.max(value[1:] / x[:-1]))
    tail = float(value[0])
    if tail > 2.0**-30 * scale:  # the codes do not reach 0 on the grid: no useful bound
        return None
    # per row: kappa * (1 + slack) + T * tail <= kappa * (1 + slack) + 2**-30 * T * scale; T * 2**-30 < 1e-3
    return (kappa * (1.0 + _SOFTMAX_SUM_SLACK) + 1e-3 * scale) / scale


@mutator
class _Log2AVRewriter(BindingRewriter):
    def rewrite(self, var, call):
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.matmul"):
            return None
        v = match_act_dequant(self.graph, call.args[1])
        if v is None or match_act_dequant(self.graph, call.args[0]) is not None:
            return None
        p_shape = shape_of(call.args[0])
        p = match_log2_codes(self.graph, call.args[0])
        if p is None:
            if log2_table(self.graph, call.args[0]) is not None:
                raise UnsupportedModelError(
                    f"binding {var.name}: the matmul's first operand is read from uint8 codes by a table that is "
                    "neither log2 (s * 2^-c) nor log-sqrt(2) read as log2 (supported: edgeq's log2 softmax quantizer)")
            return None
        dims = _batched_shapes(p_shape, v.shape)
        if dims is None:
            raise UnsupportedModelError(f"binding {var.name}: log2 matmul of shapes {p_shape} and {v.shape} is not "
                                        "supported (supported: [..., T, S] @ [..., S, D] with equal leading dims)")
        g, t, s, d = dims
        if s * 2.0**-30 >= 1e-3:  # softmax_prob_sum's tail allowance assumes rows shorter than 2**20
            p = Log2Codes(p.codes, p.scale, p.zero_code, p.odd_multiplier, p.frac_bits, None)
        shift = ref.log2_av_max_shift(s, p.odd_multiplier, p.frac_bits, p.prob_sum)
        bb = self.builder_
        p3 = bb.emit(relax.op.reshape(self.visit_expr(p.codes), (g, t, s)))
        v3 = bb.emit(relax.op.reshape(self.visit_expr(v.codes), (g, s, d)))
        kernel = cached_kernel(log2_av_kernel, g, t, s, d, target=self.target, v_dtype=v.dtype, v_zp=v.zero_point,
                               base_shift=shift, zero_code=p.zero_code, odd_multiplier=p.odd_multiplier,
                               frac_bits=p.frac_bits)
        layer = self.namer.name(matmul_key(p.scale, v.scale), "log2av")
        acc = emit_call(bb, kernel.func, kernel.name, [p3, v3], kernel.out_shape, kernel.out_dtype, name_hint=layer)
        self.namer.record(acc, layer)
        real = np.float64(p.scale) * np.float64(v.scale) * 2.0**-shift
        return _dequantize_float(bb, acc, real, shape_of(var))


@tvm.transform.module_pass(opt_level=0, name="edgeq.FuseLog2AV")
class FuseLog2AV:
    """``softmax @ v`` with log2-coded probabilities -> shift-based ``log2_av`` kernels (module docstring)."""

    def __init__(self, target):
        self.target = as_tvm_target(target)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _Log2AVRewriter(mod, self.target))
