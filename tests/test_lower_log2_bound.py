"""FuseLog2AV's base shift: the softmax bound on ``sum_j p_j`` (sound, and only where the producer is a softmax).

The Relax graphs mirror what :func:`edgeq.lower.relax_import.import_onnx` makes of the export's log2 quantizer
(:mod:`log2_chains`).
"""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgeq.lower.integer import integer_kernel_calls
from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.runner import host_target
from edgeq.lower.passes import FuseLog2AV, RemoveDeadQDQ
from edgeq.lower.passes._graph import Graph
from edgeq.lower.passes.attention import log2_table, softmax_prob_sum
from log2_chains import dequant_half, f32, quantize_half

TARGET = host_target()
RNG = np.random.default_rng(5)


def _module(scores_shape, v_shape, p_scale, zero_code, v_scale=0.05, v_zp=120, producer="softmax"):
    sv = relax.Var("scores", relax.TensorType(scores_shape, "float32"))
    vv = relax.Var("v", relax.TensorType(v_shape, "uint8"))
    bb = relax.BlockBuilder()
    with bb.function("main", [sv, vv]):
        with bb.dataflow():
            probs = bb.emit(relax.op.nn.softmax(sv, axis=-1) if producer == "softmax" else relax.op.sigmoid(sv))
            codes = quantize_half(bb, probs, p_scale, zero_code)
            p = dequant_half(bb, codes, p_scale, zero_code)
            v = bb.emit(relax.op.dequantize(vv, f32(v_scale), relax.const(np.uint8(v_zp)), axis=-1,
                                            out_dtype="float32"))
            out = bb.emit_output(bb.emit(relax.op.matmul(p, v)))
        bb.emit_func_output(out)
    return bb.get()


def _codes_and_table(mod):
    graph = Graph(mod["main"])
    matmul = next(val for var, val in graph.producer.items() if graph.op_name(var) == "matmul")
    codes, table = log2_table(graph, matmul.args[0])
    return graph, codes, table


def _shift_of(lowered) -> int:
    (name,) = [callee for _, callee, _ in integer_kernel_calls(lowered)]
    return int(name.split("_S")[1].split("_")[0])


@pytest.mark.parametrize("p_scale, zero_code", [(1.0, 255), (0.02, 15), (0.3, 255)])
def test_softmax_bound_holds_on_random_rows(p_scale, zero_code):
    mod = _module((1, 2, 4, 50), (1, 2, 50, 8), p_scale, zero_code)
    graph, codes, table = _codes_and_table(mod)
    bound = softmax_prob_sum(graph, codes, table, np.float32(p_scale))
    assert bound is not None and bound <= 1.2 / np.float32(p_scale) * 1.01
    # the export's quantizer on float32 softmax rows, from flat to one-hot; the bound is never passed
    for temperature in (0.01, 0.3, 1.0, 5.0, 50.0):
        logits = RNG.normal(0.0, temperature, (2000, 50)).astype(np.float32)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
        r = p / np.float32(p_scale)
        t = np.maximum(np.round(-2.0 * np.log(np.where(r > 0, r, 1)) / np.log(2.0)), 0)
        c = np.where((r > 0) & (t < zero_code), t, zero_code).astype(np.int64)
        sums = table[c].astype(np.float64).sum(-1) / np.float32(p_scale)
        assert sums.max() <= bound


def test_softmax_codes_get_the_larger_shift():
    h, t, s, d, p_scale, zero_code, v_zp = 2, 5, 197, 8, 1.0, 255, 120
    mod = _module((1, h, t, s), (1, h, s, d), p_scale, zero_code, v_zp=v_zp)
    lowered = tvm.transform.Sequential([FuseLog2AV(TARGET), RemoveDeadQDQ()])(mod)
    shift = _shift_of(lowered)
    assert shift == 21 > ref.log2_av_max_shift(s, 53, 7) == 14
    scores = RNG.normal(0, 3, (1, h, t, s)).astype(np.float32)
    v = RNG.integers(0, 256, (1, h, s, d)).astype(np.uint8)
    ex = relax.VirtualMachine(tvm.compile(lowered, target=TARGET), tvm.cpu())
    got = ex["main"](tvm.runtime.tensor(scores), tvm.runtime.tensor(v)).numpy()
    float_ex = relax.VirtualMachine(tvm.compile(mod, target=TARGET), tvm.cpu())
    expected_float = float_ex["main"](tvm.runtime.tensor(scores), tvm.runtime.tensor(v)).numpy()
    # S = 21: the rounding error is at most T / 2 units of 2**-21 * v_scale, far below float32 noise here
    assert np.abs(got - expected_float).max() <= s * 2.0**-22 * 0.05 + 1e-5 * np.abs(expected_float).max()


def test_codes_not_from_a_softmax_keep_the_general_shift():
    s = 197
    mod = _module((1, 1, 3, s), (1, 1, s, 8), 1.0, 255, producer="sigmoid")
    graph, codes, table = _codes_and_table(mod)
    assert softmax_prob_sum(graph, codes, table, 1.0) is None
    lowered = tvm.transform.Sequential([FuseLog2AV(TARGET), RemoveDeadQDQ()])(mod)
    assert _shift_of(lowered) == ref.log2_av_max_shift(s, 53, 7) == 14


def test_max_shift_with_a_probability_bound():
    assert ref.log2_av_max_shift(197, 53, 7) == 14
    assert ref.log2_av_max_shift(197, 53, 7, prob_sum=1.19) == 21   # per-term limit 255 * 181 * 2**(S-7) < 2**30
    assert ref.log2_av_max_shift(197, 53, 7, prob_sum=1.19 / 0.02) == 17
    assert ref.log2_av_max_shift(49, None, 0, prob_sum=1.0) == 23    # plain log2 codes: 255 * 2**S + T < 2**31
    with pytest.raises(ValueError):
        ref.log2_av_max_shift(197, 53, 7, prob_sum=float("nan"))
