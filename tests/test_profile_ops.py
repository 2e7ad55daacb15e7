"""edgeq profile --per-op's timing of every PrimFunc of ``main`` (edgeq.boards.profile_ops), on a tiny module: float glue
(a quantize, a softmax) around one integer kernel, scheduled as the build schedules it and timed on a local
x86 RPC server."""
from __future__ import annotations

import numpy as np
import pytest
from tvm import relax

from board_fixtures import RUNTIME_ONLY
from edgeq.lower.kernels.runner import host_target
from edgeq.lower.pipeline import schedule_relax
from edgeq.boards.profile_ops import primfunc_calls, summarize, time_calls
from edgeq.boards.local import start_rpc_server
from edgeq.compile.targets import load_target


def quantize_kernel_softmax(m: int = 6, k: int = 16, n: int = 10):
    """``softmax(float(qlinear(int8(round(x)))))``: glue, one integer kernel, glue."""
    from edgeq.lower.kernels import reference as ref
    from edgeq.lower.kernels.qlinear import qlinear_kernel
    from qlinear_module import emit_qlinear

    rng = np.random.default_rng(0)
    target = host_target(2)
    mult, shift = ref.quantize_multipliers(rng.uniform(1e-3, 1e-2, n))
    kernel = qlinear_kernel(m, k, n, target, x_dtype="int8", w_bits=8, out_dtype="int8", out_zp=-2)
    packed = kernel.pack(rng.integers(-128, 128, (n, k)).astype(np.int8),
                         rng.integers(-2000, 2000, n).astype(np.int32), 3, mult, shift)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((m, k), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            q = bb.emit(relax.op.astype(relax.op.clip(relax.op.round(x), -128, 127), "int8"))
            y = emit_qlinear(bb, kernel, q, packed)
            out = bb.emit_output(bb.emit(relax.op.nn.softmax(relax.op.astype(y, "float32"))))
        bb.emit_func_output(out)
    return schedule_relax(bb.get(), target), kernel.name


def test_calls_are_kernels_and_glue_in_order_with_the_layer_they_follow():
    mod, kernel = quantize_kernel_softmax()
    calls = primfunc_calls(mod)
    kinds = [c["kind"] for c in calls]
    assert kinds.count("kernel") == 1 and kinds[0] == "glue" and kinds[-1] == "glue"
    (layer,) = {c["layer"] for c in calls if c["kind"] == "kernel"}
    assert [c["func"] for c in calls if c["kind"] == "kernel"] == [kernel]
    first_kernel = kinds.index("kernel")
    assert {c["layer"] for c in calls[:first_kernel]} == {"input"}
    assert {c["layer"] for c in calls[first_kernel:]} == {layer}
    kernel_call = calls[first_kernel]
    assert kernel_call["args"][0][2] is None  # the activation: random at timing time
    assert all(constant is not None for _, _, constant in kernel_call["args"][1:])  # packed weights, bias, ...
    assert calls[-1]["outs"] == [((6, 10), "float32")]


def test_every_call_is_timed_on_a_board_and_the_rest_is_overhead():
    mod, _ = quantize_kernel_softmax()
    calls = primfunc_calls(mod)
    board = start_rpc_server(env=RUNTIME_ONLY)
    try:
        with board.connect(target="host") as session:
            times = time_calls(mod, calls, load_target("host"), session, repeat=3)
    finally:
        board.stop()
    assert len(times) == len(calls) and all(t > 0 for t in times)
    total = sum(times) + 1.0
    result = summarize(calls, times, {"default": {"w": 4, "a": 8}}, total)
    (entry,) = result["layers"].values()
    assert (entry["w"], entry["a"]) == (4, 8)
    glue_ms = sum(t for c, t in zip(calls, times) if c["kind"] == "glue")
    assert sum(e["calls"] for e in result["glue"].values()) == len(calls) - 1
    assert result["glue_ms"] == pytest.approx(glue_ms, abs=1e-3)
    assert result["base_ms"] == pytest.approx(total - entry["ms"], abs=1e-3)  # what the planner adds to kernels
    assert result["overhead_ms"] == pytest.approx(1.0, abs=1e-3)


def test_summary_sorts_glue_and_keeps_the_old_keys():
    calls = [{"func": "quantize", "kind": "glue", "layer": "input"},
             {"func": "edgeq_qlinear_a", "kind": "kernel", "layer": "blocks.0.attn.matmul_qk"},
             {"func": "softmax", "kind": "glue", "layer": "blocks.0.attn.matmul_qk"},
             {"func": "quantize", "kind": "glue", "layer": "blocks.0.attn.matmul_qk"}]
    result = summarize(calls, [0.1, 2.0, 0.5, 0.3], {"default": {"w": 8, "a": 6}}, None)
    assert {"method", "layers", "kernels_ms", "base_ms"} <= set(result)
    assert list(result["glue"]) == ["softmax", "quantize"]
    assert result["glue"]["quantize"] == {"ms": 0.4, "calls": 2, "after": ["input", "blocks.0.attn.matmul_qk"]}
    assert result["layers"]["blocks.0.attn.matmul_qk"]["w"] == 6  # attention matmuls: one width
    assert result["base_ms"] == pytest.approx(0.9) and result["overhead_ms"] == 0.0


def test_reshapes_are_views_and_not_timed(tmp_path):
    """A PrimFunc that only reshapes is a view in the built library (RewriteDataflowReshape), so the per-op
    calls, lowered as the build lowers, hold the softmax but no reshape."""
    import onnx
    from onnx import TensorProto, helper

    from edgeq.boards.profile_ops import scheduled_calls
    from edgeq.compile.artifact import Artifact, Bits, Golden, Manifest, ModelInfo, TargetInfo

    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Softmax", ["r"], ["y"], axis=-1)],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor("shape", TensorProto.INT64, [2], [4, 6])])
    folder = tmp_path / "art"
    folder.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "model.onnx")
    manifest = Manifest(name="art", precision="float", model=ModelInfo.from_json({}),
                        target=TargetInfo.from_json({"name": "host"}), bits=Bits.from_json({}),
                        golden=Golden.from_json({}))
    mod, calls = scheduled_calls(Artifact(folder, manifest))
    assert len(calls) == 1 and "softmax" in calls[0]["func"], [c["func"] for c in calls]
    assert "R.reshape" in mod["main"].script()
