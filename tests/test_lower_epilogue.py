"""Epilogue fusion: the float ops after an int32 qlinear (fc1's dequantize, GELU, quantize) run in the kernel.

The fused build must compute every output bit for bit as the unfused one (same ops in the same order, same
fencing of float products), keep the same constants, fuse only chains whose intermediates nothing else reads,
and give the same codes on aarch64 (under qemu) as on this host.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from aarch64_qemu import aarch64_available, aarch64_tools, run_aarch64
from edgeq.compile.library import build
from edgeq.lower.export import export_onnx
from edgeq.lower.integer import integer_kernel_calls, kernel_constants, lower_integer
from edgeq.lower.kernels.epilogue import FloatTail
from edgeq.lower.kernels.qlinear import qlinear_kernel
from edgeq.lower.kernels.runner import HostKernel, host_target
from edgeq.lower.pipeline import EXACT_FP_TIR_PIPELINE
from edgeq.lower.relax_import import import_onnx
from edgeq.quant import quantize

pytestmark = pytest.mark.usefixtures("single_thread")

A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"]}
A720 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a720"}  # arm_i8mm: tiles of row pairs

#: GELU as the ONNX import has it after MultiplyByReciprocal, then a quantize's reciprocal scale
GELU_TAIL = (("multiply", ("value", 0), ("const", 0.70710677)), ("erf", ("value", 1)),
             ("add", ("value", 2), ("const", 1.0)), ("multiply", ("value", 0), ("value", 3)),
             ("multiply", ("value", 4), ("const", 0.5)), ("multiply", ("value", 5), ("const", 18.21)))


def _imported(build_fn, tmp_path, name, spec, image_size=32, **arch):
    torch.manual_seed(0)
    model = build_fn(name, **arch)
    calib = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    qmodel = quantize(model, calib, spec, method="lrp-qvit")
    return import_onnx(export_onnx(qmodel, tmp_path / "model.onnx"), batch=2)


def _run(mod, images):
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    return np.concatenate([vm["main"](tvm.runtime.tensor(images[i:i + 2])).numpy() for i in range(0, len(images), 2)])


@pytest.mark.parametrize("name,spec,arch,expect_residual", [
    ("edgeq/vit-cifar10", "w4a4", dict(depth=2), ("attn.proj", "mlp.fc2")),
    ("edgeq/swin-cifar10", "w8a8", dict(image_size=16, img_size=16, embed_dim=16, depths=(2, 1), num_heads=(2, 2)),
     ("mlp.fc2",)),
], ids=["vit-w4a4", "swin-w8a8"])
def test_fused_build_equals_unfused_bit_for_bit(build, tmp_path, name, spec, arch, expect_residual):
    image_size = arch.pop("image_size", 32)
    mod = _imported(build, tmp_path, name, spec, image_size, **arch)
    fused, plain = lower_integer(mod, "host"), lower_integer(mod, "host", fuse_epilogues=False)

    fused_calls = {layer: callee for layer, callee, _ in integer_kernel_calls(fused)}
    plain_calls = {layer: callee for layer, callee, _ in integer_kernel_calls(plain)}
    assert sorted(fused_calls) == sorted(plain_calls)  # every layer still one kernel, under its name
    quantizing = sorted(layer for layer, callee in fused_calls.items() if "_f2x" in callee and "_float32_" not in callee)
    residual = sorted(layer for layer, callee in fused_calls.items() if "_float32_f2x" in callee)
    # fc1's GELU tail ends in a quantize; fc2 (and ViT's attention proj) go straight into the residual add; qkv
    # goes on to a split, Swin's proj to the window reverse, the head to the logits: those keep their glue
    assert quantizing == sorted(layer for layer in plain_calls if layer.endswith("mlp.fc1"))
    assert residual == sorted(layer for layer in plain_calls if layer.endswith(expect_residual))
    assert all(plain_calls[layer].endswith("_int32") for layer in quantizing + residual)
    assert "R.erf" not in fused["main"].script(show_meta=False)
    assert "R.erf" in plain["main"].script(show_meta=False)

    consts, plain_consts = kernel_constants(fused), kernel_constants(plain)
    assert sorted(consts) == sorted(plain_consts)
    for key, value in consts.items():
        np.testing.assert_array_equal(value, plain_consts[key], err_msg=key)

    images = torch.randn(4, 3, image_size, image_size, generator=torch.Generator().manual_seed(3)).numpy()
    np.testing.assert_array_equal(_run(fused, images), _run(plain, images))


def test_float_tail_checks_its_ops():
    with pytest.raises(ValueError, match="not one of"):
        FloatTail((("exp", ("value", 0)),), 1.0, 0, "uint8")
    with pytest.raises(ValueError, match="not computed before"):
        FloatTail((("add", ("value", 1), ("const", 1.0)),), 1.0, 0, "uint8")
    with pytest.raises(ValueError, match="operands"):
        FloatTail((("erf", ("value", 0), ("value", 0)),), 1.0, 0, "uint8")
    with pytest.raises(ValueError, match="zero point"):
        FloatTail((), 1.0, 300, "uint8")
    with pytest.raises(ValueError, match="reads input 0 of 0"):
        FloatTail((("add", ("value", 0), ("input", 0)),), 1.0, 0, "float32")
    with pytest.raises(ValueError, match="int8, uint8 or float32"):
        FloatTail((), 1.0, 0, "int32")
    tail = FloatTail(GELU_TAIL, 1.0, 3, "uint8")
    assert tail.key != FloatTail(GELU_TAIL, 1.0, 4, "uint8").key
    with pytest.raises(ValueError, match="int32 accumulator"):
        qlinear_kernel(4, 8, 16, host_target(), out_dtype="int8", epilogue=tail)


def _fused_kernel_inputs(target, rng, m=13, k=40, n=24, residual=False):
    if residual:
        tail = FloatTail((("add", ("input", 0), ("value", 0)),), 1.0, 0, "float32", inputs=1)
    else:
        tail = FloatTail(GELU_TAIL, 1.0, 7, "uint8")
    kern = qlinear_kernel(m, k, n, target, x_dtype="uint8", out_dtype="int32", epilogue=tail, dequant_rows=2)
    x = rng.integers(0, 256, (m, k)).astype(np.uint8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    packed = kern.pack(w, rng.integers(-3000, 3000, n).astype(np.int32), 9)
    dequant = np.stack([rng.uniform(1e-4, 4e-4, n), rng.uniform(-0.02, 0.02, n)]).astype(np.float32)
    stream = [rng.standard_normal((m, n)).astype(np.float32)] if residual else []
    return kern, [x, packed["w"], packed["bias"], dequant, *stream]


def test_fused_kernel_codes_follow_the_float_tail():
    """Against numpy in float32 (exact erf, not TVM's polynomial): codes within one step, most identical."""
    from math import erf

    rng = np.random.default_rng(5)
    target = host_target()
    kern, inputs = _fused_kernel_inputs(target, rng)
    got = HostKernel(kern.func, kern.name, target)(*inputs, out_shape=kern.out_shape, out_dtype="uint8")
    plain = qlinear_kernel(kern.m, kern.k, kern.n, target, x_dtype="uint8", out_dtype="int32")
    acc = HostKernel(plain.func, plain.name, target)(*inputs[:3], out_shape=plain.out_shape, out_dtype="int32")
    y = acc.astype(np.float32) * inputs[3][0] + inputs[3][1]
    gelu = y * (np.vectorize(lambda v: erf(v * np.float32(0.70710677)))(y).astype(np.float32) + 1) * 0.5
    expect = np.clip(np.round(gelu * np.float32(18.21)) + 7, 0, 255)
    assert np.abs(got.astype(int) - expect).max() <= 1
    assert (got == expect).mean() > 0.95
    assert len(np.unique(got)) > 20  # the tail spans many codes, not a saturated block


@pytest.mark.skipif(not aarch64_available(), reason=f"aarch64 toolchain/qemu missing: {aarch64_tools()}")
@pytest.mark.parametrize("arm", [A72, A720], ids=["a72", "i8mm"])
@pytest.mark.parametrize("residual", [False, True], ids=["gelu-quantize", "residual-add"])
def test_fused_kernel_is_bit_exact_on_aarch64_under_qemu(residual, arm):
    host = host_target()
    outputs = []
    for target in (arm, host):
        kern, inputs = _fused_kernel_inputs(target, np.random.default_rng(6), residual=residual)  # same values
        if target is arm:
            outputs.append(run_aarch64(kern.func, kern.name, arm, inputs, kern.out_shape, kern.out_dtype,
                                       tir_pipeline=EXACT_FP_TIR_PIPELINE))
        else:
            outputs.append(HostKernel(kern.func, kern.name, host, tir_pipeline=EXACT_FP_TIR_PIPELINE)(
                *inputs, out_shape=kern.out_shape, out_dtype=kern.out_dtype))
    np.testing.assert_array_equal(outputs[0].view(np.uint8), outputs[1].view(np.uint8))
    if residual:  # the float output: the stream + fma(acc, scale, bias residual) (the pipeline fuses a * b + c
        # into one rounding, in the unfused glue as here); |acc| < 2**21, so float64 holds the product exactly
        kern, inputs = _fused_kernel_inputs(host, np.random.default_rng(6), residual=True)
        plain = qlinear_kernel(kern.m, kern.k, kern.n, host, x_dtype="uint8", out_dtype="int32")
        acc = HostKernel(plain.func, plain.name, host)(*inputs[:3], out_shape=plain.out_shape, out_dtype="int32")
        assert np.abs(acc).max() < 2**21
        fused = (acc.astype(np.float64) * inputs[3][0].astype(np.float64) + inputs[3][1].astype(np.float64))
        expect = inputs[4] + fused.astype(np.float32)
        np.testing.assert_array_equal(outputs[1], expect)


def test_tail_float_values_equal_the_legalized_relax_ops():
    """The tail's float value, before the quantize, bit for bit against the Relax ops it replaces as edgeq's
    pipeline legalizes them (FastMathTransform's erf, fenced products), on values across erf's whole range."""
    from tvm.script import tirx as T

    from edgeq.lower.pipeline import compile_relax

    tail = FloatTail(GELU_TAIL + (("minimum", ("value", 6), ("const", 200.0)), ("maximum", ("value", 7),
                                                                              ("const", -2.0))), 1.0, 0, "uint8")
    size = 1 << 15
    values = np.random.default_rng(7).standard_normal(size).astype(np.float32) * 4

    @T.prim_func(s_tir=True)
    def tail_values(x: T.Buffer((size,), "float32"), out: T.Buffer((size,), "float32")):
        for i in range(size):
            with T.sblock("tail"):
                vi = T.axis.spatial(size, i)
                out[vi] = tail.float_expr(x[vi])

    host = host_target()
    got = HostKernel(tail_values.with_attr("global_symbol", "tail_values"), "tail_values", host,
                     tir_pipeline=EXACT_FP_TIR_PIPELINE)(values, out_shape=(size,), out_dtype="float32")

    x = relax.Var("x", relax.TensorType((size,), "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            f32 = lambda v: relax.const(np.float32(v))  # noqa: E731
            scaled = bb.emit(relax.op.multiply(x, f32(0.70710677)))
            erf = bb.emit(relax.op.add(bb.emit(relax.op.erf(scaled)), f32(1.0)))
            gelu = bb.emit(relax.op.multiply(bb.emit(relax.op.multiply(x, erf)), f32(0.5)))
            clipped = bb.emit(relax.op.minimum(bb.emit(relax.op.multiply(gelu, f32(18.21))), f32(200.0)))
            out = bb.emit_output(bb.emit(relax.op.maximum(clipped, f32(-2.0))))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(compile_relax(bb.get(), host), tvm.cpu())
    expect = vm["main"](tvm.runtime.tensor(values)).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), expect.view(np.uint32))
    assert len(np.unique(got)) > size // 2  # values, not a clipped constant
