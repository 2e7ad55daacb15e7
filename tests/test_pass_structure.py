"""What each of edgeq's Relax passes emits, as IR: a small ``Before`` module, the one pass, an ``Expected`` module,
compared with ``tvm.ir.assert_structural_equal`` (the numbers they compute are tested in test_lower_passes.py,
test_softmax.py and test_float_kernels.py).

The integer passes rewrite the binding at the end of a matched chain and leave the bindings they no longer need
for :class:`RemoveDeadQDQ` to drop; their output goes through ``DeadCodeElimination`` before the comparison so
that ``Expected`` shows what the pass emits, not what it bypassed. Kernels come from the kernel builders with the
arguments the pass must choose, for the same target (what the pass emits around them is the subject here, the
kernels are tested bit for bit elsewhere).
"""
from __future__ import annotations

import json

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from edgeq.lower.kernels.attention import log2_av_kernel, qk_kernel
from edgeq.lower.kernels.fgemm import float_gemm_kernel
from edgeq.lower.kernels.qlinear import qlinear_kernel
from edgeq.lower.kernels.softmax import softmax_log2_codes_kernel
from edgeq.lower.passes import (FuseLog2AV, FuseQLinear, FuseQMatmul, FuseSoftmaxLog2Codes, MultiplyByReciprocal,
                                RemoveDeadQDQ)
from edgeq.lower.passes._graph import KERNEL_LAYERS_ATTR
from edgeq.lower.passes.float_kernels import FloatKernels
from edgeq.lower.relax_import import WEIGHT_BITS_ATTR, weight_key

TARGET = tvm.target.Target({"kind": "llvm"})
_OPAQUE = 8  # relax OpPatternKind.kOpaque


def kernel_var(func: tvm.tirx.PrimFunc, name: str) -> relax.GlobalVar:
    """A typed GlobalVar for ``func``: TVMScript can ``R.call_tir`` it before :func:`with_kernels` adds it."""
    return relax.BlockBuilder().add_func(func, name)


def with_kernels(mod: tvm.IRModule, kernels: dict[relax.GlobalVar, tvm.tirx.PrimFunc],
                 layers: dict[str, str] | None = None) -> tvm.IRModule:
    """``mod`` with its kernels' PrimFuncs and, for the integer passes, their ``edgeq.kernel_layers`` record."""
    for gv, func in kernels.items():
        mod[gv] = func
    relax.analysis.well_formed(mod)  # raises on the first violation
    return mod if layers is None else mod.with_attr(KERNEL_LAYERS_ATTR, json.dumps(layers, sort_keys=True))


def integer_pass(pass_, mod: tvm.IRModule) -> tvm.IRModule:
    return relax.transform.DeadCodeElimination()(pass_(mod))


def test_fuse_qlinear_emits_the_kernel_then_the_float_scale_and_bias_residual():
    w = np.array([[1, -2, 3], [4, 5, -6]], np.int8)  # a 4-bit layer's codes: packed as int4

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "uint8")) -> R.Tensor((2, 2), "float32"):
            with R.dataflow():
                xd = R.dequantize(x, R.const(0.5, "float32"), R.const(3, "uint8"), axis=-1, out_dtype="float32")
                wd = R.dequantize(R.const(w), R.const(np.array([0.25, 0.5], np.float32)),
                                  R.const(np.zeros(2, np.int8)), axis=0, out_dtype="float32")
                y = R.matmul(xd, R.permute_dims(wd, axes=[1, 0]))
                out = R.add(y, R.const(np.array([1.0, -0.5], np.float32)))
                R.output(out)
            return out

    weight_bits = json.dumps({weight_key(w): 4})  # the width the export recorded for these weights (4 bits)
    Before = Before.with_attr(WEIGHT_BITS_ATTR, weight_bits)
    # accumulator scales 0.5 * [0.25, 0.5]; the bias on that grid is [8, -2] exactly, so no residual is left
    kernel = qlinear_kernel(2, 3, 2, TARGET, x_dtype="uint8", w_bits=4, out_dtype="int32")
    packed = kernel.pack(w, np.array([8, -2], np.int32), 3)
    qlinear = kernel_var(kernel.func, kernel.name)

    @I.ir_module(check_well_formed=False)
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3), "uint8")) -> R.Tensor((2, 2), "float32"):
            with R.dataflow():
                linear0 = R.call_tir(qlinear, (x, R.const(packed["w"]), R.const(packed["bias"])),
                                     out_ty=R.Tensor((2, 2), "int32"))
                scaled = R.multiply(R.astype(linear0, "float32"), R.const(np.array([0.125, 0.25], np.float32)))
                exact = R.add(scaled, R.const(np.zeros(2, np.float32)))
                out = R.reshape(exact, R.shape([2, 2]))
                R.output(out)
            return out

    expected = with_kernels(Expected.with_attr(WEIGHT_BITS_ATTR, weight_bits), {qlinear: kernel.func},
                            {"linear0": "linear0"})
    tvm.ir.assert_structural_equal(integer_pass(FuseQLinear(TARGET), Before), expected)


def test_fuse_qmatmul_flattens_heads_and_transposes_k_on_its_codes():
    @I.ir_module
    class Before:
        @R.function
        def main(q: R.Tensor((1, 2, 3, 4), "uint8"),
                 k: R.Tensor((1, 2, 4, 5), "uint8")) -> R.Tensor((1, 2, 3, 5), "float32"):
            with R.dataflow():
                qd = R.dequantize(q, R.const(0.5, "float32"), R.const(128, "uint8"), axis=-1, out_dtype="float32")
                kd = R.dequantize(k, R.const(0.25, "float32"), R.const(120, "uint8"), axis=-1, out_dtype="float32")
                scores = R.matmul(qd, kd)
                R.output(scores)
            return scores

    kernel = qk_kernel(2, 3, 5, 4, TARGET, q_dtype="uint8", k_dtype="uint8", q_zp=128, k_zp=120)
    qk = kernel_var(kernel.func, kernel.name)

    @I.ir_module(check_well_formed=False)
    class Expected:
        @R.function
        def main(q: R.Tensor((1, 2, 3, 4), "uint8"),
                 k: R.Tensor((1, 2, 4, 5), "uint8")) -> R.Tensor((1, 2, 3, 5), "float32"):
            with R.dataflow():
                q3 = R.reshape(q, R.shape([2, 3, 4]))
                k3 = R.reshape(R.permute_dims(k, axes=[0, 1, 3, 2]), R.shape([2, 5, 4]))
                qmatmul0 = R.call_tir(qk, (q3, k3), out_ty=R.Tensor((2, 3, 5), "int32"))
                scaled = R.multiply(R.astype(qmatmul0, "float32"), R.const(0.125, "float32"))
                scores = R.reshape(scaled, R.shape([1, 2, 3, 5]))
                R.output(scores)
            return scores

    expected = with_kernels(Expected, {qk: kernel.func}, {"qmatmul0": "qmatmul0"})
    tvm.ir.assert_structural_equal(integer_pass(FuseQMatmul(TARGET), Before), expected)


def test_fuse_log2_av_reads_the_codes_and_scales_by_the_base_shift():
    @I.ir_module
    class Before:
        @R.function
        def main(p: R.Tensor((1, 2, 3, 6), "uint8"),
                 v: R.Tensor((1, 2, 6, 4), "uint8")) -> R.Tensor((1, 2, 3, 4), "float32"):
            with R.dataflow():
                c = R.astype(p, "float32")
                value = R.multiply(R.power(R.const(2.0, "float32"), R.negative(c)), R.const(0.5, "float32"))
                probs = R.where(R.equal(c, R.const(15.0, "float32")), R.const(0.0, "float32"), value)
                vd = R.dequantize(v, R.const(0.25, "float32"), R.const(128, "uint8"), axis=-1, out_dtype="float32")
                out = R.matmul(probs, vd)
                R.output(out)
            return out

    # plain log2 codes 0.5 * 2**-c, zero code 15; six terms a row allow a base shift of 20 in int32
    kernel = log2_av_kernel(2, 3, 6, 4, TARGET, v_dtype="uint8", v_zp=128, base_shift=20, zero_code=15,
                            odd_multiplier=None, frac_bits=0)
    log2av = kernel_var(kernel.func, kernel.name)

    @I.ir_module(check_well_formed=False)
    class Expected:
        @R.function
        def main(p: R.Tensor((1, 2, 3, 6), "uint8"),
                 v: R.Tensor((1, 2, 6, 4), "uint8")) -> R.Tensor((1, 2, 3, 4), "float32"):
            with R.dataflow():
                p3 = R.reshape(p, R.shape([2, 3, 6]))
                v3 = R.reshape(v, R.shape([2, 6, 4]))
                log2av0 = R.call_tir(log2av, (p3, v3), out_ty=R.Tensor((2, 3, 4), "int32"))
                scaled = R.multiply(R.astype(log2av0, "float32"), R.const(0.5 * 0.25 * 2.0**-20, "float32"))
                out = R.reshape(scaled, R.shape([1, 2, 3, 4]))
                R.output(out)
            return out

    expected = with_kernels(Expected, {log2av: kernel.func}, {"log2av0": "log2av0"})
    tvm.ir.assert_structural_equal(integer_pass(FuseLog2AV(TARGET), Before), expected)


def test_fuse_softmax_log2_codes_replaces_softmax_and_its_quantize_chain():
    to_codes = float(np.float32(-2.0 / np.log(2.0)))  # -2 log2(p / s): log-sqrt(2) codes

    @I.ir_module
    class Before:
        @R.function
        def main(z: R.Tensor((2, 3, 8), "float32")) -> R.Tensor((2, 3, 8), "uint8"):
            with R.dataflow():
                p = R.nn.softmax(z, axis=-1)
                t = R.round(R.multiply(R.log(R.divide(p, R.const(0.5, "float32"))), R.const(to_codes, "float32")))
                t = R.minimum(R.maximum(t, R.const(0.0, "float32")), R.const(15.0, "float32"))
                codes = R.astype(t, "uint8")
                R.output(codes)
            return codes

    kernel = softmax_log2_codes_kernel(6, 8, TARGET, alpha=2, log2_scale=-1.0, zero_code=15)
    softmax_codes = kernel_var(kernel.func, kernel.name)

    @I.ir_module(check_well_formed=False)
    class Expected:
        @R.function
        def main(z: R.Tensor((2, 3, 8), "float32")) -> R.Tensor((2, 3, 8), "uint8"):
            with R.dataflow():
                rows = R.call_tir(softmax_codes, (R.reshape(z, R.shape([6, 8])),), out_ty=R.Tensor((6, 8), "uint8"))
                codes = R.reshape(rows, R.shape([2, 3, 8]))
                R.output(codes)
            return codes

    expected = with_kernels(Expected, {softmax_codes: kernel.func}, {})
    tvm.ir.assert_structural_equal(integer_pass(FuseSoftmaxLog2Codes(TARGET), Before), expected)


def test_remove_dead_qdq_drops_the_dequantize_chains_nothing_reads():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "uint8")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                xd = R.dequantize(x, R.const(0.5, "float32"), R.const(3, "uint8"), axis=-1, out_dtype="float32")
                wd = R.dequantize(R.const(np.ones((4, 3), np.int8)), R.const(np.full(4, 0.25, np.float32)),
                                  R.const(np.zeros(4, np.int8)), axis=0, out_dtype="float32")
                wt = R.permute_dims(wd, axes=[1, 0])
                out = R.multiply(R.astype(x, "float32"), R.const(0.5, "float32"))
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3), "uint8")) -> R.Tensor((2, 3), "float32"):
            with R.dataflow():
                out = R.multiply(R.astype(x, "float32"), R.const(0.5, "float32"))
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(RemoveDeadQDQ()(Before), Expected)


def test_multiply_by_reciprocal_rewrites_constant_divisions_and_quantize_scales():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), y: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "uint8"):
            with R.dataflow():
                a = R.divide(x, R.const(1.4142135, "float32"))
                b = R.divide(a, y)  # not a constant: stays a division
                c = R.divide(b, R.const(0.0, "float32"))  # no finite reciprocal: stays
                out = R.quantize(c, R.const(0.1, "float32"), R.const(3, "uint8"), axis=-1, out_dtype="uint8")
                R.output(out)
            return out

    inverse_sqrt2 = float(np.float32(1 / np.float64(np.float32(1.4142135))))
    inverse_scale = float(np.float32(1 / np.float64(np.float32(0.1))))

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3), "float32"), y: R.Tensor((2, 3), "float32")) -> R.Tensor((2, 3), "uint8"):
            with R.dataflow():
                a = R.multiply(x, R.const(inverse_sqrt2, "float32"))
                b = R.divide(a, y)
                c = R.divide(b, R.const(0.0, "float32"))
                scaled = R.multiply(c, R.const(inverse_scale, "float32"))
                out = R.quantize(scaled, R.const(1.0, "float32"), R.const(3, "uint8"), axis=-1, out_dtype="uint8")
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(MultiplyByReciprocal()(Before), Expected)


def test_float_kernels_fuse_a_constant_bias_into_the_packed_gemm():
    w = np.arange(12, dtype=np.float32).reshape(3, 4) / 8
    bias = np.array([1, 2, 3, 4], np.float32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 5, 3), "float32")) -> R.Tensor((2, 5, 4), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(w))
                out = R.add(y, R.const(bias))
                R.output(out)
            return out

    kernel = float_gemm_kernel(1, 10, 3, 4, TARGET, mode="packed", bias=True)
    func = kernel.func.with_attr("op_pattern", _OPAQUE)
    gemm = kernel_var(func, kernel.name)

    @I.ir_module(check_well_formed=False)
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 5, 3), "float32")) -> R.Tensor((2, 5, 4), "float32"):
            with R.dataflow():
                rows = R.reshape(x, R.shape([1, 10, 3]))
                flat = R.call_tir(gemm, (rows, R.const(kernel.pack(w)), R.const(bias)),
                                  out_ty=R.Tensor((1, 10, 4), "float32"))
                unflat = R.reshape(flat, R.shape([2, 5, 4]))
                y = unflat  # the matmul and the add whose bias the kernel took in are aliases of its result
                out = y
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(FloatKernels(TARGET)(Before), with_kernels(Expected, {gemm: func}))


def test_checked_takes_gives_a_constant_in_bounds_index_the_clip_mode():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 5, 4), "float32")) -> R.Tuple(R.Tensor((1, 4), "float32"),
                                                               R.Tensor((1, 4), "float32")):
            with R.dataflow():
                index = R.add(R.const(1, "int64"), R.const(-1, "int64"))  # computed from constants: 0
                token = R.take(x, index, axis=1, mode="fast")
                past = R.take(x, R.const(7, "int64"), axis=1, mode="fast")  # out of bounds: left alone
                out = (token, past)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 5, 4), "float32")) -> R.Tuple(R.Tensor((1, 4), "float32"),
                                                               R.Tensor((1, 4), "float32")):
            with R.dataflow():
                index = R.add(R.const(1, "int64"), R.const(-1, "int64"))
                token = R.take(x, index, axis=1, mode="clip")
                past = R.take(x, R.const(7, "int64"), axis=1, mode="fast")
                out = (token, past)
                R.output(out)
            return out

    from edgeq.lower.pipeline import checked_takes

    tvm.ir.assert_structural_equal(checked_takes(Before), Expected)


def test_keep_kernels_opaque_marks_only_scheduled_primfuncs():
    from tvm.script import tirx as T

    from edgeq.lower.pipeline import keep_kernels_opaque

    def copy(scheduled: bool):
        @T.prim_func
        def func(A: T.Buffer((4,), "int32"), B: T.Buffer((4,), "int32")):
            for i in range(4):
                B[i] = A[i]

        return func.with_attr("tirx.is_scheduled", True) if scheduled else func

    before = tvm.IRModule({"kernel": copy(True), "legalized": copy(False)})
    expected = tvm.IRModule({"kernel": copy(True).with_attr("op_pattern", _OPAQUE), "legalized": copy(False)})
    tvm.ir.assert_structural_equal(keep_kernels_opaque(before), expected)
