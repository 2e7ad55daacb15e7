"""Row softmax kernels (float probabilities, log2 codes) against float64 math, and the pass that puts the codes
kernel in place of the export's quantize chain (only where that chain is a log2 quantizer of a softmax)."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgeq.lower.kernels.runner import HostKernel, host_target
from edgeq.lower.kernels.softmax import softmax_kernel, softmax_log2_codes_kernel, softmax_log2_codes_reference
from edgeq.lower.passes import FuseSoftmaxLog2Codes, RemoveDeadQDQ
from edgeq.lower.passes._graph import Graph
from edgeq.lower.passes.softmax_codes import fit_log2_quantizer
from log2_chains import f32, quantize_half

TARGET = host_target(2)
RNG = np.random.default_rng(11)


def _near_boundary(scores, alpha, log2_scale, in_scale=None, margin=1e-4):
    """Where the float64 code value lies within ``margin`` of a rounding boundary (float32 may go either way)."""
    z = np.asarray(scores).astype(np.float32)
    if in_scale is not None:
        z = z * np.float32(in_scale)
    z = z.astype(np.float64)
    m = z.max(-1, keepdims=True)
    value = alpha * ((m - z) / np.log(2.0) + np.log2(np.exp(z - m).sum(-1, keepdims=True)) + log2_scale)
    return np.abs(value - np.floor(value) - 0.5) < margin


@pytest.mark.parametrize("rows, length, alpha, zero_code, dtype", [
    (591, 197, 2, 255, "float32"),   # deit_tiny: 3 heads x 197 tokens
    (13, 5, 2, 255, "float32"),      # shorter than the 8 lanes
    (7, 65, 1, 255, "int32"),        # q @ k^T accumulators, log2 codes
    (30, 49, 2, 15, "float32"),      # Swin window, 4-bit codes
    (4, 8, 1, 15, "float32"),
    (3, 1, 2, 255, "float32"),
])
def test_kernel_matches_float64_codes(rows, length, alpha, zero_code, dtype):
    log2_scale = float(np.log2(0.75))
    if dtype == "int32":
        scores, in_scale = RNG.integers(-60000, 60000, (rows, length)).astype(np.int32), 1.3e-4
    else:
        scores, in_scale = (RNG.standard_normal((rows, length)) * 4).astype(np.float32), None
    kernel = softmax_log2_codes_kernel(rows, length, TARGET, alpha=alpha, log2_scale=log2_scale,
                                       zero_code=zero_code, in_dtype=dtype, in_scale=in_scale)
    got = HostKernel(kernel.func, kernel.name, TARGET)(scores, out_shape=(rows, length), out_dtype="uint8")
    want = softmax_log2_codes_reference(scores, alpha=alpha, log2_scale=log2_scale, zero_code=zero_code,
                                        in_scale=in_scale)
    assert int(want.max()) - int(want.min()) >= min(length - 1, 10)  # many codes, not one
    differ = got != want
    assert not (differ & ~_near_boundary(scores, alpha, log2_scale, in_scale)).any()
    assert np.abs(got.astype(int) - want).max(initial=0) <= 1


def test_vanished_and_deep_probabilities_get_the_zero_code():
    # a gap of 120 in the scores: exp underflows float32 (p == 0 in the float chain) -> the zero code, while
    # log2 codes of a gap of 60 (p ~ 2**-87) are kept as numbers; the row sum is 1 + e**-1 (-log2 p = 0.45 at 0)
    scores = np.array([[0.0, -60.0, -120.0, -1e30, -np.inf, -1.0]], np.float32)
    kernel = softmax_log2_codes_kernel(1, 6, TARGET, alpha=1, log2_scale=0.0, zero_code=255)
    got = HostKernel(kernel.func, kernel.name, TARGET)(scores, out_shape=(1, 6), out_dtype="uint8")
    assert got.tolist() == [[0, 87, 255, 255, 255, 2]]


def _softmax_codes_module(shape, scale, zero_code, alpha=2.0, int_scores=False, quantizer="log2"):
    dtype = "int32" if int_scores else "float32"
    x = relax.Var("x", relax.TensorType(shape, dtype))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            z = bb.emit(relax.op.multiply(bb.emit(relax.op.astype(x, "float32")), f32(1e-4))) if int_scores else x
            p = bb.emit(relax.op.nn.softmax(z, axis=-1))
            if quantizer == "log2":
                codes = quantize_half(bb, p, scale, zero_code, alpha)
            else:  # a uniform quantizer of the probabilities: not a log2 chain
                codes = bb.emit(relax.op.quantize(p, f32(scale), relax.const(np.uint8(0)), axis=-1, out_dtype="uint8"))
            out = bb.emit_output(codes)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x):
    vm = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def _ops(mod) -> set[str]:
    graph = Graph(mod["main"])
    return {graph.op_name(v) for v in graph.producer}


@pytest.mark.parametrize("scale, zero_code, alpha, int_scores", [
    (0.75, 255, 2.0, False), (1.0, 15, 2.0, True), (0.02, 255, 1.0, False), (3.0, 15, 1.0, True)])
def test_pass_replaces_the_chain_and_keeps_the_codes(scale, zero_code, alpha, int_scores):
    shape = (1, 3, 9, 37)
    mod = _softmax_codes_module(shape, scale, zero_code, alpha, int_scores)
    graph = Graph(mod["main"])
    (codes,) = [v for v in graph.producer if graph.op_name(v) == "astype" and str(v.ty.dtype) == "uint8"]
    (source,) = [v for v in graph.producer if graph.op_name(v) == "nn.softmax"]
    fit = fit_log2_quantizer(graph, codes, source)
    assert fit is not None and fit.alpha == alpha and fit.zero_code == zero_code
    assert fit.log2_scale == pytest.approx(np.log2(np.float32(scale)), abs=1e-6)

    fused = tvm.transform.Sequential([FuseSoftmaxLog2Codes(TARGET), RemoveDeadQDQ()])(mod)
    assert not _ops(fused) & {"nn.softmax", "log", "round", "divide"}
    calls = [gv.name_hint for gv in fused.get_global_vars() if gv.name_hint.startswith("edgeq_softmaxcodes")]
    assert len(calls) == 1 and ("_int32x" in calls[0]) == int_scores  # int32 scores are read directly

    x = (RNG.integers(-50000, 50000, shape).astype(np.int32) if int_scores
         else (RNG.standard_normal(shape) * 3).astype(np.float32))
    want, got = _run(mod, x), _run(fused, x)
    assert int(want.max()) - int(want.min()) >= 8
    differ = got != want
    assert differ.mean() < 1e-3 and np.abs(got.astype(int) - want).max() <= 1


def test_pass_leaves_other_quantizers_of_a_softmax_alone():
    mod = _softmax_codes_module((1, 2, 5, 16), 1 / 255, 255, quantizer="uniform")
    fused = FuseSoftmaxLog2Codes(TARGET)(mod)
    assert "nn.softmax" in _ops(fused)
    assert not any(gv.name_hint.startswith("edgeq_softmaxcodes") for gv in fused.get_global_vars())


def test_pass_leaves_gpu_targets_alone():
    mod = _softmax_codes_module((1, 2, 5, 16), 0.75, 255)
    fused = FuseSoftmaxLog2Codes({"kind": "cuda", "arch": "sm_87"})(mod)
    assert "nn.softmax" in _ops(fused)


@pytest.mark.parametrize("rows, length", [(591, 197), (5, 3), (12, 64)])
def test_float_softmax_kernel_matches_float64(rows, length):
    scores = (RNG.standard_normal((rows, length)) * 5).astype(np.float32)
    kernel = softmax_kernel(rows, length, TARGET)
    got = HostKernel(kernel.func, kernel.name, TARGET)(scores, out_shape=(rows, length), out_dtype="float32")
    z = scores.astype(np.float64)
    want = np.exp(z - z.max(-1, keepdims=True))
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-9)
