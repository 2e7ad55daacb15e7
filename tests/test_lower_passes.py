"""edgeq's Relax integer passes, each on a tiny hand-built graph: the rewrite happens, and the compiled result
is bit-exact with the numpy reference of the integer math (edgeq.lower.kernels.reference)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tvm
from tvm import relax

from edgeq.errors import UnsupportedModelError
from edgeq.lower.integer import integer_kernel_calls
from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.runner import host_target
from edgeq.lower.passes import FuseLog2AV, FuseQLinear, FuseQMatmul, RemoveDeadQDQ
from edgeq.lower.passes.attention import log2_table
from edgeq.lower.passes._graph import Graph
from edgeq.lower.relax_import import WEIGHT_BITS_ATTR, weight_key, weight_storage_bits

TARGET = host_target()
RNG = np.random.default_rng(0)


def _f32(v) -> relax.Expr:
    return relax.const(np.asarray(v, np.float32))


def _dq(bb, codes, scale, zp, axis=-1):
    zp_arr = np.asarray(zp, dtype=str(codes.ty.dtype))
    return bb.emit(relax.op.dequantize(codes, _f32(scale), relax.const(zp_arr), axis=axis, out_dtype="float32"))


def _weight_dq(bb, w, w_scale, w_zp=None):
    zp = np.zeros(w.shape[0], np.int8) if w_zp is None else np.asarray(w_zp, np.int8)
    return bb.emit(relax.op.dequantize(relax.const(w), _f32(w_scale), relax.const(zp), axis=0, out_dtype="float32"))


def _function(params, body):
    """``main(*params)`` whose dataflow block is built by ``body(bb, *params)`` (returns the output expr)."""
    bb = relax.BlockBuilder()
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(body(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *inputs):
    ex = tvm.compile(mod, target=TARGET)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in inputs]).numpy()


def _kernels(mod) -> list[str]:
    return [callee for _, callee, _ in integer_kernel_calls(mod)]


def _ops(mod) -> str:
    return mod["main"].script(show_meta=False)


def _with_weight_bits(mod, w, bits):
    """``mod`` as an import of edgeq's export has it: the width the export chose for the weights ``w``."""
    return mod.with_attr(WEIGHT_BITS_ATTR, json.dumps({weight_key(w): bits}))


def _lower(mod, *passes):
    return tvm.transform.Sequential([*passes, RemoveDeadQDQ()])(mod)


# --- FuseQLinear -------------------------------------------------------------------------------------


def _linear_module(w, w_scale, bias, x_scale, x_zp, shape, out_quant=None, w_zp=None, w_bits=8):
    x = relax.Var("x", relax.TensorType(shape, "uint8"))

    def body(bb, x):
        xd = _dq(bb, x, x_scale, np.uint8(x_zp))
        wt = bb.emit(relax.op.permute_dims(_weight_dq(bb, w, w_scale, w_zp), [1, 0]))
        y = bb.emit(relax.op.matmul(xd, wt))
        y = bb.emit(relax.op.add(y, _f32(bias)))
        if out_quant is None:
            return y
        scale, zp = out_quant
        return bb.emit(relax.op.quantize(y, _f32(scale), relax.const(np.uint8(zp)), axis=-1, out_dtype="uint8"))

    return _with_weight_bits(_function([x], body), w, w_bits)


def _linear_case(n=5, k=12, w_range=(-127, 128)):
    w = RNG.integers(*w_range, (n, k)).astype(np.int8)
    w_scale = RNG.uniform(0.002, 0.01, n).astype(np.float32)
    bias = RNG.uniform(-0.5, 0.5, n).astype(np.float32)
    x = RNG.integers(0, 256, (2, 3, k)).astype(np.uint8)
    return w, w_scale, bias, x


def _expected_float(x, x_zp, x_scale, w, w_scale, bias):
    scales = (np.float64(np.float32(x_scale)) * w_scale.astype(np.float64))
    bias_int = np.round(bias.astype(np.float64) / scales).astype(np.int32)
    acc = ref.qlinear_acc(x.reshape(-1, x.shape[-1]), x_zp, w, bias_int)
    residual = (bias.astype(np.float64) - bias_int * scales).astype(np.float32)  # added back in float
    out = acc.astype(np.float32) * scales.astype(np.float32) + residual
    return out.reshape(*x.shape[:-1], -1), bias_int, scales


@pytest.mark.parametrize("w_range", [(-127, 128), (-8, 8)], ids=["int8", "int4"])
def test_fuse_qlinear_bit_exact(w_range):
    w, w_scale, bias, x = _linear_case(w_range=w_range)
    x_scale, x_zp = 0.05, 121
    mod = _linear_module(w, w_scale, bias, x_scale, x_zp, x.shape, w_bits=4 if w_range == (-8, 8) else 8)
    lowered = _lower(mod, FuseQLinear(TARGET))
    kernels = _kernels(lowered)
    assert len(kernels) == 1 and "qlinear" in kernels[0]
    assert ("_w4_" in kernels[0]) == (w_range == (-8, 8))
    assert "R.matmul" not in _ops(lowered) and "R.dequantize" not in _ops(lowered)
    expected, _, _ = _expected_float(x, x_zp, x_scale, w, w_scale, bias)
    got = _run(lowered, x)
    np.testing.assert_array_equal(got, expected)
    # and it is the float layer up to float32 rounding
    np.testing.assert_allclose(got, _run(mod, x), rtol=1e-5, atol=1e-5)


def test_fuse_qlinear_stores_weights_at_the_width_the_export_chose():
    w, w_scale, bias, x = _linear_case(w_range=(-8, 8))  # codes that would fit int4, of an 8-bit layer
    mod = _linear_module(w, w_scale, bias, 0.05, 121, x.shape, w_bits=8)
    (kernel,) = _kernels(_lower(mod, FuseQLinear(TARGET)))
    assert "_w4_" not in kernel  # the width comes from the export, not from the code values
    unrecorded = mod.without_attr(WEIGHT_BITS_ATTR)
    with pytest.raises(UnsupportedModelError, match=r"records no storage width.*export_onnx.*stored_bits"):
        FuseQLinear(TARGET)(unrecorded)


def test_import_reads_the_storage_width_from_the_export_metadata():
    keys = {"w:a": "blocks.0.attn.qkv", "w:b": "head", "w:c": "blocks.0.mlp.fc1", "mm:x:y": "blocks.0.attn.matmul_qk"}
    meta = {"layers": {"blocks.0.attn.qkv": {"weight": {"bits": 4, "stored_bits": 4}},
                       "head": {"weight": {"bits": 6, "stored_bits": 8}},
                       "blocks.0.mlp.fc1": {"weight": {"bits": 3}},  # an export from before stored_bits
                       "blocks.0.attn.matmul_qk": {"a_quant": {"bits": 8}}}}
    assert weight_storage_bits(meta, keys) == {"w:a": 4, "w:b": 8, "w:c": 4}


def test_fuse_qlinear_requantizes_into_the_next_quantize():
    w, w_scale, bias, x = _linear_case()
    x_scale, x_zp, out_scale, out_zp = 0.05, 121, 0.04, 100
    mod = _linear_module(w, w_scale, bias, x_scale, x_zp, x.shape, out_quant=(out_scale, out_zp))
    lowered = _lower(mod, FuseQLinear(TARGET))
    assert len(_kernels(lowered)) == 1 and "R.quantize" not in _ops(lowered)
    _, bias_int, scales = _expected_float(x, x_zp, x_scale, w, w_scale, bias)
    mult, shift = ref.quantize_multipliers(scales / np.float64(np.float32(out_scale)))
    expected = ref.qlinear(x.reshape(-1, x.shape[-1]), x_zp, w, bias_int, mult, shift, out_zp, 8, "uint8")
    got = _run(lowered, x)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got.reshape(expected.shape), expected)
    # against float math followed by quantize (round half to even): at most one code apart
    assert np.abs(got.astype(int) - _run(mod, x).astype(int)).max() <= 1


def test_fuse_qlinear_refuses_weight_zero_points():
    w, w_scale, bias, x = _linear_case()
    mod = _linear_module(w, w_scale, bias, 0.05, 121, x.shape, w_zp=np.full(w.shape[0], 3, np.int8))
    with pytest.raises(UnsupportedModelError, match="zero points"):
        FuseQLinear(TARGET)(mod)


def _conv_module(w, w_scale, bias, x_scale, x_zp, shape, stride, padding=0, w_bits=8):
    x = relax.Var("x", relax.TensorType(shape, "uint8"))

    def body(bb, x):
        xd = _dq(bb, x, x_scale, np.uint8(x_zp), axis=1)
        y = bb.emit(relax.op.nn.conv2d(xd, _weight_dq(bb, w, w_scale), strides=stride, padding=padding))
        b = bb.emit(relax.op.reshape(_f32(bias), (1, w.shape[0], 1, 1)))
        return bb.emit(relax.op.add(y, b))

    return _with_weight_bits(_function([x], body), w, w_bits)


PATCH_CONV = (6, 3, 2)  # output channels, input channels, patch size


def _patch_conv_lowered():
    """A quantized 2x2 patch conv on a 6x4 uint8 image (odd sizes): the image, weights, module before and after."""
    o, c, p = PATCH_CONV
    w = RNG.integers(-127, 128, (o, c, p, p)).astype(np.int8)
    w_scale = RNG.uniform(0.002, 0.01, o).astype(np.float32)
    bias = RNG.uniform(-0.5, 0.5, o).astype(np.float32)
    x = RNG.integers(0, 256, (2, c, 6, 4)).astype(np.uint8)
    mod = _conv_module(w, w_scale, bias, 0.03, 120, x.shape, (p, p))
    lowered = _lower(mod, FuseQLinear(TARGET))
    return x, (w, w_scale, bias), mod, lowered


def test_fuse_patch_conv_as_im2col_qlinear():
    o, c, p = PATCH_CONV
    x, (w, w_scale, bias), _, lowered = _patch_conv_lowered()
    assert len(_kernels(lowered)) == 1 and "conv2d" not in _ops(lowered)
    cols = x.reshape(2, c, 3, p, 2, p).transpose(0, 2, 4, 1, 3, 5).reshape(12, c * p * p)
    expected, _, _ = _expected_float(cols, 120, 0.03, w.reshape(o, -1), w_scale, bias)
    expected = expected.reshape(2, 3, 2, o).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(_run(lowered, x), expected)


def test_overlapping_conv_is_refused_with_its_binding():
    w = RNG.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8)
    mod = _conv_module(w, np.full(4, 0.01, np.float32), np.zeros(4, np.float32), 0.03, 120, (1, 3, 8, 8), (1, 1), 1)
    with pytest.raises(UnsupportedModelError, match=r"conv2d with kernel 3x3.*patch embedding"):
        FuseQLinear(TARGET)(mod)


# --- FuseQMatmul ---------------------------------------------------------------------------------------


def test_fuse_qmatmul_qk_bit_exact():
    a = RNG.integers(0, 256, (2, 3, 5, 8)).astype(np.uint8)     # [B, H, T, D]
    b = RNG.integers(0, 256, (2, 3, 8, 7)).astype(np.uint8)     # [B, H, D, S] (k already transposed)
    sa, za, sb, zb = 0.02, 130, 0.03, 117
    av = relax.Var("a", relax.TensorType(a.shape, "uint8"))
    bv = relax.Var("b", relax.TensorType(b.shape, "uint8"))
    mod = _function([av, bv], lambda bb, a_, b_: bb.emit(relax.op.matmul(_dq(bb, a_, sa, np.uint8(za)),
                                                                           _dq(bb, b_, sb, np.uint8(zb)))))
    lowered = _lower(mod, FuseQMatmul(TARGET))
    kernels = _kernels(lowered)
    assert len(kernels) == 1 and "edgeq_qk" in kernels[0] and "R.matmul" not in _ops(lowered)
    acc = ref.qmatmul_qk(a.reshape(6, 5, 8), b.reshape(6, 8, 7).transpose(0, 2, 1).copy(), za, zb)
    expected = (acc.astype(np.float32) * np.float32(np.float64(np.float32(sa)) * np.float64(np.float32(sb))))
    np.testing.assert_array_equal(_run(lowered, a, b), expected.reshape(2, 3, 5, 7))


# --- FuseLog2AV -------------------------------------------------------------------------------------------


def _log2_dequant(bb, codes, scale, zero_code, mult, frac):
    """The export's log2 dequantize half (edgeq.lower.export._log2_nodes) written in Relax ops."""
    c = bb.emit(relax.op.astype(codes, "float32"))
    half = bb.emit(relax.op.multiply(c, _f32(0.5)))
    shift = bb.emit(relax.op.ceil(half))
    even = bb.emit(relax.op.multiply(bb.emit(relax.op.floor(half)), _f32(2.0)))
    odd = bb.emit(relax.op.subtract(c, even))
    mant = bb.emit(relax.op.add(bb.emit(relax.op.multiply(odd, _f32(mult))), _f32(2.0**frac)))
    mant = bb.emit(relax.op.multiply(mant, _f32(1.0 / 2**frac)))
    power = bb.emit(relax.op.power(_f32(2.0), bb.emit(relax.op.negative(shift))))
    value = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(mant, power)), _f32(scale)))
    is_zero = bb.emit(relax.op.equal(c, _f32(zero_code)))
    return bb.emit(relax.op.where(is_zero, _f32(0.0), value))


def _av_module(p_shape, v_shape, p_scale, v_scale, v_zp, zero_code, mult, frac):
    pv = relax.Var("p", relax.TensorType(p_shape, "uint8"))
    vv = relax.Var("v", relax.TensorType(v_shape, "uint8"))

    def body(bb, p, v):
        probs = _log2_dequant(bb, p, p_scale, zero_code, mult, frac)
        return bb.emit(relax.op.matmul(probs, _dq(bb, v, v_scale, np.uint8(v_zp))))

    return _function([pv, vv], body)


def test_fuse_log2_av_bit_exact_and_reads_the_table():
    zero_code, mult, frac = 15, 106, 8
    p = RNG.integers(0, zero_code + 1, (1, 2, 6, 9)).astype(np.uint8)
    v = RNG.integers(0, 256, (1, 2, 9, 8)).astype(np.uint8)
    p_scale, v_scale, v_zp = 0.7, 0.02, 125
    mod = _av_module(p.shape, v.shape, p_scale, v_scale, v_zp, zero_code, mult, frac)
    graph = Graph(mod["main"])
    matmul = next(val for var, val in graph.producer.items() if graph.op_name(var) == "matmul")
    _, table = log2_table(graph, matmul.args[0])
    c = np.arange(zero_code)
    np.testing.assert_allclose(table[:zero_code], np.float32(p_scale) * (2**frac + (c % 2) * mult) / 2**frac
                               * np.exp2(-np.ceil(c / 2)), rtol=1e-6)
    lowered = _lower(mod, FuseLog2AV(TARGET))
    kernels = _kernels(lowered)
    assert len(kernels) == 1 and "log2av" in kernels[0] and "R.matmul" not in _ops(lowered)
    # the smallest equivalent (M, F) reading is used: 106/256 == 53/128
    shift = ref.log2_av_max_shift(9, 53, 7)
    acc = ref.log2_av(p.reshape(2, 6, 9), v.reshape(2, 9, 8), v_zp, shift, zero_code, 53, 7)
    assert acc.tolist() == ref.log2_av(p.reshape(2, 6, 9), v.reshape(2, 9, 8), v_zp, shift, zero_code, 106, 8).tolist()
    real = np.float32(np.float64(np.float32(p_scale)) * np.float64(np.float32(v_scale)) * 2.0**-shift)
    got = _run(lowered, p, v)
    np.testing.assert_array_equal(got, (acc.astype(np.float32) * real).reshape(1, 2, 6, 8))
    # against the float chain: the floors cost less than Tk * 2**-S units of v_scale
    assert np.abs(got - _run(mod, p, v)).max() <= 9 * 2.0**-shift * v_scale * 1.01 + 1e-6


def test_log2_table_that_is_not_log2_is_refused():
    mod = _av_module((1, 1, 2, 3), (1, 1, 3, 4), 0.5, 0.02, 0, 15, 100, 8)  # 100 is not round((sqrt2-1)*256)
    with pytest.raises(UnsupportedModelError, match="neither log2"):
        FuseLog2AV(TARGET)(mod)


# --- RemoveDeadQDQ ----------------------------------------------------------------------------------------


def test_cleanup_refuses_quantized_matmul_left_in_float():
    # weights dequantized along axis 1: no pass matches, so the matmul would silently run as float
    w = RNG.integers(-127, 128, (4, 6)).astype(np.int8)
    x = relax.Var("x", relax.TensorType((3, 4), "uint8"))

    def body(bb, x):
        wd = bb.emit(relax.op.dequantize(relax.const(w), _f32(np.full(6, 0.01)), relax.const(np.zeros(6, np.int8)),
                                         axis=1, out_dtype="float32"))
        return bb.emit(relax.op.matmul(_dq(bb, x, 0.05, np.uint8(3)), wd))

    mod = _function([x], body)
    with pytest.raises(UnsupportedModelError, match=r"no integer kernel: .* = R\.matmul"):
        _lower(mod, FuseQLinear(TARGET), FuseQMatmul(TARGET), FuseLog2AV(TARGET))


def test_cleanup_drops_dead_dequantize_chains():
    w, w_scale, bias, x = _linear_case()
    lowered = _lower(_linear_module(w, w_scale, bias, 0.05, 121, x.shape), FuseQLinear(TARGET))
    text = _ops(lowered)
    assert "R.dequantize" not in text and "R.permute_dims" not in text


def test_patch_conv_matches_float_conv():
    x, _, mod, lowered = _patch_conv_lowered()
    np.testing.assert_allclose(_run(lowered, x), _run(mod, x), rtol=1e-5, atol=1e-5)


def test_log2_av_kernel_with_sqrt2_codes_is_bit_exact_at_vit_shapes():
    from edgeq.lower.kernels.attention import log2_av_kernel
    from edgeq.lower.kernels.runner import HostKernel

    # c = 1: p = 2**-1 * (256 + 106) / 256; with S = F = 8 the term is (1 * 362 + 1) >> 1 = round(256 * 0.707)
    assert ref.log2_av(np.array([[[1]]], np.uint8), np.array([[[1]]], np.int8), 0, 8, 255, 106, 8).item() == 181
    with pytest.raises(ValueError, match="frac_bits"):  # v * 2**S * mant is exact only for S >= F
        ref.log2_av(np.array([[[1]]], np.uint8), np.array([[[1]]], np.int8), 0, 7, 255, 106, 8)
    h, t, s, d = 3, 65, 65, 64
    codes = np.minimum(RNG.geometric(0.15, (h, t, s)), 255).astype(np.uint8)
    v = RNG.integers(0, 256, (h, s, d)).astype(np.uint8)
    shift = ref.log2_av_max_shift(s, 53, 7)
    kernel = log2_av_kernel(h, t, s, d, TARGET, v_dtype="uint8", v_zp=131, base_shift=shift, zero_code=255,
                            odd_multiplier=53, frac_bits=7)
    got = HostKernel(kernel.func, kernel.name, TARGET)(codes, v, out_shape=(h, t, d), out_dtype="int32")
    np.testing.assert_array_equal(got, ref.log2_av(codes, v, 131, shift, 255, 53, 7))
