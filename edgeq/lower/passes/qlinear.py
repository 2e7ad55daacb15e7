"""Pass: quantized Linear layers and the patch-embedding conv -> ``qlinear`` integer kernels.

Matched (as TVM's ONNX frontend imports edgeq's QDQ export)::

    xd = R.dequantize(xq, sx, zx)                        # per-tensor activation codes, int8/uint8
    wd = R.dequantize(W, sw, zw, axis=0)                 # constant int8 weights, per output channel
    y  = R.matmul(xd, R.permute_dims(wd, [1, 0]))        # x [..., K] -> y [..., N]
    y  = R.add(y, b)                                     # optional constant bias
    [q = R.quantize(y, so, zo)]                          # optional: y's only consumer

and the patch embedding ``R.nn.conv2d(xd, wd) [+ reshape(b)]`` with stride equal to the kernel size, no padding,
no dilation, one group (im2col is then a reshape/permute of the uint8 codes). Emitted::

    acc = R.call_tir(qlinear, (reshape(xq, [M, K]), W packed, bias int32))  # int32 [M, N]
    y   = reshape(astype(acc, float32) * (sx * sw) + r, y's shape)         # back to the float island

or, with the consumer quantize, the kernel requantizes in its epilogue (fixed-point multiplier and shift of
``sx * sw / so``) and writes ``q``'s codes directly. The bias is rounded to ``round(b / (sx * sw))`` in int32;
when the result goes back to float, the rounding residual ``r = b - round(b / (sx * sw)) * sx * sw`` is added
with the scale (so the float bias is exact there; a fused requantization carries the int32 rounding).
Weights are stored at the width the export recorded for the layer (``stored_bits``, imported as the module
attribute ``edgeq.weight_bits``: int4 packed two per byte for ``w_bits <= 4``, else int8); a layer without one is
refused. Weight zero points must be 0 (edgeq quantizes weights symmetrically by default); a layer with non-zero
ones is refused with :class:`UnsupportedModelError`.

Rounding: edgeq's PyTorch fake-quant rounds half to even in float, the kernel's requantization rounds half up
in fixed point; outputs can differ by one code on ties (see :mod:`edgeq.lower.kernels.reference`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import tvm
from tvm import relax
from tvm.relax.expr_functor import mutator

from edgeq.errors import UnsupportedModelError
from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.qlinear import qlinear_kernel
from edgeq.lower.kernels.relax_glue import emit_call
from edgeq.lower.relax_import import INPUT_BITS_ATTR, WEIGHT_BITS_ATTR, module_json_attr, weight_key
from edgeq.compile.targets import as_tvm_target

from ._graph import (BindingRewriter, Graph, LayerNamer, QAct, QWeight, cached_kernel, match_act_dequant,
                     match_weight_dequant, rewrite_functions, shape_of)

__all__ = ["FuseQLinear", "LinearMatch", "match_linear"]


@dataclass
class LinearMatch:
    kind: str                     # "linear" | "conv"
    x: QAct
    w: QWeight                    # codes reshaped to [N, K]
    bias: Optional[np.ndarray]    # float [N]
    out_shape: tuple[int, ...]    # float result shape (the matmul's, or the conv's NCHW)
    conv_kernel: tuple[int, int] = (1, 1)
    requant: Optional[tuple[float, int, str]] = None   # (scale, zero point, dtype) of a fused consumer quantize


def _bias_of(graph: Graph, add: relax.Call, core: relax.Var, n: int, kind: str) -> Optional[np.ndarray]:
    """The constant per-output-channel bias ``add`` adds to ``core``, or None."""
    a, b = add.args
    other = b if a.same_as(core) else a if b.same_as(core) else None
    if other is None:
        return None
    value = graph.const_value(other)
    if value is None or value.size != n:
        return None
    shape = tuple(value.shape)
    channel_axis_ok = (shape[-1:] == (n,)) if kind == "linear" else (len(shape) >= 3 and shape[-3:] == (n, 1, 1))
    return value.astype(np.float64).reshape(n) if channel_axis_ok else None


def _linear_core(graph: Graph, var: relax.Expr, where: str) -> Optional[LinearMatch]:
    """A quantized matmul or patch conv producing ``var`` (no bias)."""
    mm = graph.call(var, "matmul")
    if mm is not None:
        x = match_act_dequant(graph, mm.args[0])
        perm = graph.call(mm.args[1], "permute_dims")
        if x is None or perm is None:
            return None
        axes = perm.attrs.axes
        if axes is None or [int(a) for a in axes] != [1, 0]:
            return None
        w = match_weight_dequant(graph, perm.args[0])
        if w is None or w.codes.ndim != 2 or w.codes.shape[1] != x.shape[-1]:
            return None
        _check_weight_zero_point(w, where)
        return LinearMatch("linear", x, w, None, shape_of(var))
    conv = graph.call(var, "nn.conv2d")
    if conv is None:
        return None
    x = match_act_dequant(graph, conv.args[0])
    w = match_weight_dequant(graph, conv.args[1])
    if x is None or w is None:
        return None
    attrs = conv.attrs
    kh, kw = int(w.codes.shape[2]), int(w.codes.shape[3])
    strides = [int(s) for s in attrs.strides]
    ok = (strides == [kh, kw] and all(int(p) == 0 for p in attrs.padding) and all(int(d) == 1 for d in attrs.dilation)
          and int(attrs.groups) == 1 and str(attrs.data_layout) == "NCHW" and str(attrs.kernel_layout) == "OIHW"
          and str(attrs.out_layout) == "NCHW" and x.shape[2] % kh == 0 and x.shape[3] % kw == 0)
    if not ok:
        raise UnsupportedModelError(
            f"{where}: quantized conv2d with kernel {kh}x{kw}, strides {strides}, padding "
            f"{[int(p) for p in attrs.padding]}, groups {int(attrs.groups)} is not supported (supported: a patch "
            "embedding, NCHW, stride equal to the kernel size, no padding or dilation, one group)")
    _check_weight_zero_point(w, where)
    flat = QWeight(w.codes.reshape(w.codes.shape[0], -1), w.scale, w.zero_point)
    return LinearMatch("conv", x, flat, None, shape_of(var), (kh, kw))


def _check_weight_zero_point(w: QWeight, where: str) -> None:
    if np.any(w.zero_point != 0):
        raise UnsupportedModelError(
            f"{where}: weights with non-zero zero points are not supported by the integer kernels "
            "(supported: symmetric per-channel weights, edgeq's default weight_symmetric=True)")


def match_linear(graph: Graph, var: relax.Var, value: relax.Call) -> Optional[LinearMatch]:
    """The quantized linear chain whose last binding is ``var = value`` (see the module docstring), or None.

    Returns None for a binding that is inside a longer chain (the longer chain is matched at its end).
    """
    where = f"binding {var.name}"
    op = value.op.name if isinstance(value.op, tvm.ir.Op) else ""
    if op == "relax.quantize":
        inner = _chain_end(graph, value.args[0], where)
        if inner is None or graph.only_user(value.args[0]) is None:
            return None
        requant = _requant_target(graph, value)
        if requant is None:
            return None
        inner.requant = requant
        return inner
    if op not in ("relax.add", "relax.matmul", "relax.nn.conv2d"):
        return None
    match = _chain_end(graph, var, where)
    if match is None:
        return None
    if op != "relax.add":
        user = graph.only_user(var)
        if user is not None and graph.call(user, "add") is not None and \
                _bias_of(graph, graph.producer[user], var, match.w.codes.shape[0], match.kind) is not None:
            return None  # matched at the bias add
    user = graph.only_user(var)
    if user is not None and graph.call(user, "quantize") is not None and \
            _requant_target(graph, graph.producer[user]) is not None:
        return None  # matched at the quantize
    return match


def _chain_end(graph: Graph, var: relax.Expr, where: str) -> Optional[LinearMatch]:
    """A linear chain ending at ``var``: ``core`` or ``add(core, bias)`` with ``core`` used only there."""
    add = graph.call(var, "add")
    if add is None:
        return _linear_core(graph, var, where)
    for core in add.args:
        if not isinstance(core, relax.Var) or graph.only_user(core) is None:
            continue
        match = _linear_core(graph, core, where)
        if match is None:
            continue
        bias = _bias_of(graph, add, core, match.w.codes.shape[0], match.kind)
        if bias is not None:
            match.bias = bias
            return match
    return None


def _requant_target(graph: Graph, quantize: relax.Call) -> Optional[tuple[float, int, str]]:
    scale = graph.const_value(quantize.args[1])
    zp = graph.const_value(quantize.args[2])
    dtype = str(quantize.attrs.out_dtype)
    if scale is None or zp is None or scale.size != 1 or zp.size != 1 or dtype not in ("int8", "uint8"):
        return None
    return float(np.float32(scale.reshape(()))), int(zp.reshape(())), dtype


def _real_scales(match: LinearMatch) -> np.ndarray:
    return np.float64(match.x.scale) * match.w.scale.astype(np.float64)


def _int_bias(match: LinearMatch, where: str) -> np.ndarray:
    n = match.w.codes.shape[0]
    if match.bias is None:
        return np.zeros(n, np.int32)
    q = np.round(match.bias / _real_scales(match))
    if np.abs(q).max(initial=0) >= 2**31 - 2**24:
        raise UnsupportedModelError(f"{where}: the bias does not fit int32 at the accumulator scale")
    return q.astype(np.int32)


def emit_linear(bb: relax.BlockBuilder, match: LinearMatch, x_codes: relax.Expr, target: tvm.target.Target,
                layer: str, w_bits: int, namer: Optional[LayerNamer] = None, a_bits: int = 8) -> relax.Expr:
    """Emit the integer kernel for ``match`` reading the (already remapped) ``x_codes``, its weights stored at
    ``w_bits`` (4: packed int4, 8: int8) and its input codes ``a_bits`` wide; returns the result."""
    n, k = match.w.codes.shape
    if match.kind == "conv":
        b, c, h, w = match.x.shape
        kh, kw = match.conv_kernel
        x6 = bb.emit(relax.op.reshape(x_codes, (b, c, h // kh, kh, w // kw, kw)))
        xp = bb.emit(relax.op.permute_dims(x6, [0, 2, 4, 1, 3, 5]))
        m = b * (h // kh) * (w // kw)
        x2 = bb.emit(relax.op.reshape(xp, (m, k)))
    else:
        m = int(np.prod(match.x.shape[:-1]))
        x2 = x_codes if len(match.x.shape) == 2 else bb.emit(relax.op.reshape(x_codes, (m, k)))
    bias = _int_bias(match, layer)
    if match.requant is None:
        kernel = cached_kernel(qlinear_kernel, m, k, n, target=target, x_dtype=match.x.dtype, w_bits=w_bits,
                               a_bits=a_bits, out_dtype="int32")
        packed = kernel.pack(match.w.codes, bias, match.x.zero_point)
    else:
        out_scale, out_zp, out_dtype = match.requant
        kernel = cached_kernel(qlinear_kernel, m, k, n, target=target, x_dtype=match.x.dtype, w_bits=w_bits,
                               a_bits=a_bits, out_dtype=out_dtype, out_zp=out_zp)
        mult, shift = ref.quantize_multipliers(_real_scales(match) / np.float64(out_scale))
        packed = kernel.pack(match.w.codes, bias, match.x.zero_point, mult, shift)
    consts = [packed[p] for p in kernel.param_names[1:-1]]
    out = emit_call(bb, kernel.func, kernel.name, [x2, *consts], kernel.out_shape, kernel.out_dtype, name_hint=layer)
    if namer is not None:
        namer.record(out, layer)
    if match.requant is None:
        scales = _real_scales(match).astype(np.float32)
        out = bb.emit(relax.op.astype(out, "float32"))
        out = bb.emit(relax.op.multiply(out, relax.const(scales)))
        if match.bias is not None:
            # the int32 bias is rounded to the accumulator's grid; on the way back to float its rounding
            # residual is added, so the layer equals float bias-add (measured: without it the rounding alone
            # moves the W8A8 ViT's logits by ~1 % against the fake-quant model)
            residual = (match.bias - bias.astype(np.float64) * _real_scales(match)).astype(np.float32)
            out = bb.emit(relax.op.add(out, relax.const(residual)))
    if match.kind == "conv":
        b, _, h, w = match.x.shape
        kh, kw = match.conv_kernel
        out = bb.emit(relax.op.reshape(out, (b, h // kh, w // kw, n)))
        return relax.op.permute_dims(out, [0, 3, 1, 2])
    return relax.op.reshape(out, match.out_shape)


@mutator
class _QLinearRewriter(BindingRewriter):
    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target):
        super().__init__(mod, target)
        self.weight_bits = module_json_attr(mod, WEIGHT_BITS_ATTR)
        self.input_bits = module_json_attr(mod, INPUT_BITS_ATTR)

    def rewrite(self, var, call):
        match = match_linear(self.graph, var, call)
        if match is None:
            return None
        key = weight_key(_original_codes(match))
        layer = self.namer.name(key, match.kind)
        if key not in self.weight_bits:
            raise UnsupportedModelError(
                f"binding {var.name} (layer {layer}): the export records no storage width for these weights; "
                "lower an ONNX file written by edgeq's export_onnx (its metadata gives each layer's "
                f"weight.stored_bits, imported as the module attribute {WEIGHT_BITS_ATTR})")
        return emit_linear(self.builder_, match, self.visit_expr(match.x.codes), self.target, layer,
                           int(self.weight_bits[key]), self.namer, a_bits=int(self.input_bits.get(key, 8)))


def _original_codes(match: LinearMatch) -> np.ndarray:
    if match.kind == "conv":
        c = match.x.shape[1]
        kh, kw = match.conv_kernel
        return match.w.codes.reshape(match.w.codes.shape[0], c, kh, kw)
    return match.w.codes


@tvm.transform.module_pass(opt_level=0, name="edgeq.FuseQLinear")
class FuseQLinear:
    """Quantized Linear / patch-conv chains -> ``qlinear`` kernels (see the module docstring)."""

    def __init__(self, target):
        self.target = as_tvm_target(target)

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        return rewrite_functions(mod, _QLinearRewriter(mod, self.target))
