"""Pass: a Softmax followed by edgeq's log2 quantize half -> one ``softmax_log2_codes`` kernel.

The export writes the post-Softmax log2 quantizer as a dozen float ops (divide, log, multiply, round, clamps,
casts) ending in a ``uint8`` code tensor. After :class:`~edgeq.lower.passes.attention.FuseLog2AV` reads those
codes with an integer kernel, this pass replaces the way they are computed::

    p = R.nn.softmax(z, axis=-1); codes = astype(<chain of p>, "uint8")
 -> codes = reshape(R.call_tir(softmax_log2_codes, (reshape(z, [R, S]),)), shape)

(:mod:`edgeq.lower.kernels.softmax`: no probability tensor, no per-element log). When ``z`` is a
``q @ k^T`` accumulator times a scalar (``FuseQMatmul``'s dequantize, through reshapes) the kernel reads the
int32 accumulator itself.

What the chain computes is checked, not assumed: it is evaluated (numpy) on a geometric grid of probabilities
(64 points per octave from 1 down to 2**-149, and 0), its zero code read at ``p = 0``, ``log2(s)`` located by
found at its first code step (every float32 around it evaluated), and it must then equal ``clamp(round(a * -log2(p / s)), 0, Z)`` for ``a = 2`` or
``a = 1`` at every grid point not within 1e-3 of a rounding boundary. Any other chain is left as it is.
CPU (``llvm``) targets only: on a GPU the chain stays float ops for TVM's GPU schedules.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from edgeq.lower.kernels.relax_glue import emit_call
from edgeq.lower.kernels.softmax import UNDERFLOW_LOG2, softmax_log2_codes_kernel
from edgeq.compile.targets import as_tvm_target

from ._graph import BindingRewriter, Graph, cached_kernel, dtype_of, rewrite_functions, shape_of
from .attention import evaluate_chain, softmax_source

__all__ = ["FuseSoftmaxLog2Codes", "Log2Quantizer", "fit_log2_quantizer"]

_STEPS_PER_OCTAVE = 64
_OCTAVES = 149  # down to the smallest float32 subnormal
_BOUNDARY_MARGIN = 1e-3


@dataclass(frozen=True)
class Log2Quantizer:
    """``code = clamp(round(alpha * -log2(p / 2**log2_scale)), 0, zero_code)``; ``p == 0`` -> ``zero_code``."""

    alpha: int
    log2_scale: float
    zero_code: int

    def codes(self, p: np.ndarray) -> np.ndarray:
        p = np.asarray(p, np.float64)
        with np.errstate(divide="ignore"):
            lp = -np.log2(p)
        value = self.alpha * (lp + self.log2_scale)
        rounded = np.maximum(np.round(value), 0)
        keep = (p > 0) & (rounded < self.zero_code) & (lp <= UNDERFLOW_LOG2)
        return np.where(keep, rounded, self.zero_code).astype(np.int64)


def _chain_codes(graph: Graph, codes: relax.Var, source: relax.Var, p: np.ndarray) -> Optional[np.ndarray]:
    try:
        with np.errstate(all="ignore"):
            out = evaluate_chain(graph, codes, source, np.asarray(p, np.float32), {})
        return np.broadcast_to(out, np.shape(p)).astype(np.int64)
    except (ValueError, KeyError, TypeError):
        return None


def _first_step(graph, codes, source, grid: np.ndarray, values: np.ndarray, zero_code: int):
    """(smallest float32 p with code c at the first code step c -> c + 1 below the zero code, c).

    The chain is evaluated once on every float32 between the two grid points around the step (about 2**17 of
    them at 64 points per octave), so the boundary is exact for the chain as numpy computes it."""
    steps = np.nonzero((np.diff(values) == 1) & (values[1:] < zero_code))[0]
    if not len(steps):
        return None
    i = int(steps[0])  # the grid descends: code(grid[i]) == c, code(grid[i + 1]) == c + 1
    code = int(values[i])
    bits = np.arange(grid[i + 1].view(np.uint32), grid[i].view(np.uint32) + 1, dtype=np.uint32)
    between = _chain_codes(graph, codes, source, bits.view(np.float32))
    if between is None or not (between == code).any():
        return None
    return float(bits.view(np.float32)[np.argmax(between == code)]), code


def fit_log2_quantizer(graph: Graph, codes: relax.Var, source: relax.Var) -> Optional[Log2Quantizer]:
    """The :class:`Log2Quantizer` the chain from ``source`` (probabilities) to ``codes`` computes, or None."""
    grid = np.exp2(-np.arange(_OCTAVES * _STEPS_PER_OCTAVE + 1) / _STEPS_PER_OCTAVE).astype(np.float32)
    values = _chain_codes(graph, codes, source, np.concatenate([grid, [0.0]]))
    if values is None:
        return None
    values, zero_code = values[:-1], int(values[-1])
    if not 1 <= zero_code <= 255:
        return None
    step = _first_step(graph, codes, source, grid, values, zero_code)
    if step is None:
        return None
    boundary, code = step
    p = grid.astype(np.float64)
    for alpha in (2, 1):
        # the step from code c to c + 1 is where alpha * -log2(p / s) = c + 1/2
        log2_scale = (code + 0.5) / alpha + float(np.log2(boundary))
        fit = Log2Quantizer(alpha, log2_scale, zero_code)
        value = alpha * (-np.log2(p) + log2_scale)
        clear = np.abs(value - np.floor(value) - 0.5) > _BOUNDARY_MARGIN
        if np.array_equal(fit.codes(p)[clear], values[clear]):
            return fit
    return None


def _int32_scores(graph: Graph, z: relax.Expr) -> Optional[tuple[relax.Var, float]]:
    """``(acc, scale)`` when ``z = reshape*(astype(acc int32, float32) * scale)``, else None."""
    while graph.op_name(z) == "reshape":
        z = graph.producer[z].args[0]
    mul = graph.call(z, "multiply")
    if mul is None:
        return None
    for value, factor in (mul.args, mul.args[::-1]):
        const = graph.const_value(factor)
        cast = graph.call(value, "astype")
        if const is not None and const.size == 1 and cast is not None and dtype_of(value) == "float32" \
                and dtype_of(cast.args[0]) == "int32":
            return cast.args[0], float(np.float32(const.reshape(())))
    return None


@mutator
class _SoftmaxCodesRewriter(BindingRewriter):
    def rewrite(self, var, call):
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.astype" and dtype_of(var) == "uint8"):
            return None
        source = softmax_source(self.graph, var)
        if source is None:
            return None
        fit = fit_log2_quantizer(self.graph, var, source)
        if fit is None:
            return None
        z = self.graph.producer[source].args[0]
        shape = shape_of(z)
        rows, length = int(np.prod(shape[:-1], dtype=np.int64)), shape[-1]
        scores = _int32_scores(self.graph, z)
        source_expr, in_scale = (z, None) if scores is None else scores
        kernel = cached_kernel(softmax_log2_codes_kernel, rows, length, target=self.target, alpha=fit.alpha,
                               log2_scale=float(np.float32(fit.log2_scale)), zero_code=fit.zero_code,
                               in_dtype=dtype_of(source_expr), in_scale=in_scale)
        bb = self.builder_
        flat = bb.emit(relax.op.reshape(self.visit_expr(source_expr), (rows, length)))
        out = emit_call(bb, kernel.func, kernel.name, [flat], kernel.out_shape, kernel.out_dtype)
        return relax.op.reshape(out, shape_of(var))


@tvm.transform.module_pass(opt_level=0, name="edgeq.FuseSoftmaxLog2Codes")
class FuseSoftmaxLog2Codes:
    """Softmax + log2 quantize chain -> one ``softmax_log2_codes`` kernel (see the module docstring)."""

    def __init__(self, target):
        self.target = as_tvm_target(target)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.target.kind.name != "llvm":  # the kernel has a CPU schedule only; GPUs keep the float chain
            return mod
        return rewrite_functions(mod, _SoftmaxCodesRewriter(mod, self.target))
