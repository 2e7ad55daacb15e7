"""Integer models compiled for a CUDA board (compile only: no GPU here), and TVM refusals as edgeq errors.

TVM's CUDA pipeline fuses and re-schedules whatever ``AnnotateTIROpPattern`` calls fusable; edgeq's kernels
must reach the device code as they were scheduled (``__dp4a`` and all), and a failure inside TVM must be a
:class:`TargetError`, not a traceback.
"""
from __future__ import annotations

import re

import pytest
import torch
import tvm
from tvm import relax
from tvm.script import tirx as T

from cli_runner import run_cli
from edgeq.bitplan import BitPlan
from edgeq.compile.library import build
from edgeq.errors import TargetError
from edgeq.lower.export import export_onnx
from edgeq.lower.integer import integer_kernel_calls, lower_integer
from edgeq.lower.relax_import import import_onnx
from edgeq.quant import quantize

CUDA_BOARD = "jetson-orin-nano"
#: W8A8 with one 4-bit weight layer: the int8 and the packed-int4 qlinear kernels in one program
MIXED_PLAN = {"version": 1, "default": {"w": 8, "a": 8}, "layers": {"blocks.0.mlp.fc1": {"w": 4, "a": 8}}}


def _walk(module):
    yield module
    for imported in module.imports:
        yield from _walk(imported)


def cuda_source(executable) -> str:
    sources = [m.inspect_source() for m in _walk(executable.mod) if m.kind == "cuda"]
    assert len(sources) == 1, [m.kind for m in _walk(executable.mod)]
    return sources[0]


@pytest.fixture(scope="module")
def mixed_vit_for_cuda(build, tmp_path_factory):
    """Two blocks (kernels of one shape called by both), min/max ranges for speed, log2 post-Softmax codes."""
    model = build("edgeq/vit-cifar10", depth=2, embed_dim=48, num_heads=3)
    calib = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    qmodel = quantize(model, calib, BitPlan.from_json(MIXED_PLAN), method="minmax", log2=True)
    path = export_onnx(qmodel, tmp_path_factory.mktemp("onnx") / "model.onnx", batch=1)
    return lower_integer(import_onnx(path, batch=1), CUDA_BOARD)


def test_integer_vit_compiles_for_cuda_with_its_kernels_intact(mixed_vit_for_cuda):
    mod = mixed_vit_for_cuda
    kernels = {callee for _, callee, _ in integer_kernel_calls(mod)}
    kinds = {name.split("_")[1] for name in kernels}
    assert kinds == {"qlinear", "qk", "log2av"}, kernels
    assert any("_w4_" in name for name in kernels) and any("_w8_" in name for name in kernels), kernels
    source = cuda_source(build(mod, CUDA_BOARD))
    # every kernel is still its own device function (none fused into a PrimFunc dlight schedules anew) ...
    for name in kernels:
        assert re.search(rf"__global__ void __launch_bounds__\(\d+\) {name}_kernel\w*\(", source), name
    # ... and the int8 GEMMs still multiply with the dot product their schedule chose (not only declare it)
    assert re.search(r"\+ __dp4a\(", source)


def _module_fuse_tir_refuses() -> tvm.IRModule:
    """An unscheduled PrimFunc with int32 buffer extents whose result is cast: FuseOps fuses the two and
    FuseTIR stops at the int64 extents of the legalized cast (the InternalError integer CUDA builds hit)."""
    @T.prim_func(s_tir=True)
    def add_one(X: T.Buffer((8,), "int32"), O: T.Buffer((8,), "int32")):
        T.func_attr({"tirx.noalias": True})
        for i in range(8):
            with T.sblock("O"):
                vi = T.axis.spatial(8, i)
                O[vi] = X[vi] + 1

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((8,), "int32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            kernel = bb.add_func(add_one, "add_one")
            added = bb.emit(relax.call_tir(kernel, [x], relax.TensorType((8,), "int32")))
            out = bb.emit_output(relax.op.astype(added, "float32"))
        bb.emit_func_output(out)
    return bb.get()


def test_tvm_refusing_a_module_is_a_one_line_target_error():
    with pytest.raises(TargetError) as caught:
        build(_module_fuse_tir_refuses(), CUDA_BOARD)
    message = str(caught.value)
    assert message.startswith(f"TVM refused to compile the model for {CUDA_BOARD} (cuda): ")
    assert "\n" not in message and len(message) < 400
    assert "Inconsistent buffers" in message
    assert isinstance(caught.value.__cause__, tvm.error.InternalError)  # kept as the cause


def test_build_command_reports_a_tvm_refusal_with_exit_60(capsys, tmp_path, monkeypatch):
    # the float export imports as a module TVM's CUDA pipeline refuses (edgeq.lower.lower_model imports it)
    monkeypatch.setattr("edgeq.lower.relax_import.import_onnx", lambda onnx_path, batch: _module_fuse_tir_refuses())
    code, _, err = run_cli(capsys, "build", "--target", CUDA_BOARD, "--float", "--model", "edgeq/vit-cifar10",
                           "--random-init", "--eval-limit", "0", "--out", str(tmp_path / "out"))
    assert code == TargetError.exit_code, err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("edgeq: error: TVM refused to compile the model for jetson-orin-nano (cuda)")
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
