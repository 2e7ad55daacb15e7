"""edgeq's compile pipeline (edgeq.lower.pipeline.compile_relax), the float kernel pass and the float ONNX export.

A tiny timm ViT goes PyTorch -> float ONNX -> Relax -> compile_relax and must agree with PyTorch to ~1e-5,
with its matmuls and patch conv as fp32 GEMM kernels; an integer ``call_tir`` kernel must come through the
pipeline unchanged and bit exact.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from edgeq.errors import EdgeqError
from edgeq.lower.export import export_float_onnx
from edgeq.lower.kernels.runner import host_target
from edgeq.lower.passes.float_kernels import rewrite_float_kernels
from edgeq.lower.pipeline import ScheduleCPU, compile_relax, keep_kernels_opaque, schedule_cpu_primfunc


@pytest.fixture(scope="module")
def tiny_vit():
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, embed_dim=32,
                              depth=1, num_heads=2, num_classes=5).eval()
    return model


@pytest.fixture(scope="module")
def tiny_onnx(tiny_vit, tmp_path_factory):
    return export_float_onnx(tiny_vit, tmp_path_factory.mktemp("onnx") / "tiny.onnx", input_size=(3, 16, 16))


def run_vm(executable, x: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def test_float_export_runs_in_onnxruntime(tiny_vit, tiny_onnx):
    import json

    import onnx
    import onnxruntime as ort

    proto = onnx.load(tiny_onnx)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["edgeq.export"])
    assert meta["format"] == "edgeq.onnx-float" and meta["opset"] == 18
    assert not [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))  # dynamic batch
    session = ort.InferenceSession(str(tiny_onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    np.testing.assert_allclose(got, tiny_vit(x).detach().numpy(), atol=1e-5)


def test_float_vit_agrees_with_pytorch(tiny_vit, tiny_onnx):
    from edgeq.lower.relax_import import import_onnx

    mod = import_onnx(tiny_onnx)
    rewritten, count = rewrite_float_kernels(mod, host_target(2))
    # patch conv + qkv + proj + fc1 + fc2 + head, the two attention matmuls and the softmax
    assert count == 9
    assert not [c for c in _calls(rewritten) if c in ("relax.matmul", "relax.nn.conv2d", "relax.nn.softmax")]
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    got = run_vm(compile_relax(mod, host_target(2)), x.numpy())
    np.testing.assert_allclose(got, tiny_vit(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def _calls(mod) -> list[str]:
    names = []

    def visit(expr):
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            names.append(expr.op.name)

    relax.analysis.post_order_visit(mod["main"], visit)
    return names


def test_integer_kernels_pass_through_untouched():
    from qlinear_module import qlinear_module

    target = host_target(2)
    mod, inputs, expected = qlinear_module(target, m=7, k=13, n=5)
    kernels = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert kernels
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic

    with target:
        lowered = tvm.transform.Sequential(
            [keep_kernels_opaque] + cpu_generic.legalize_passes(target) + [ScheduleCPU(target)])(mod)
    for name, func in kernels.items():
        after = lowered[name]
        tvm.ir.assert_structural_equal(after.body, func.body)  # not rescheduled
    got = run_vm(compile_relax(mod, target), inputs[0])
    np.testing.assert_array_equal(got, expected)


def test_generic_schedule_parallelizes_layer_norm():
    from tvm.script import relax as R
    from tvm.script import ir as I

    @I.ir_module
    class Norm:
        @R.function
        def main(x: R.Tensor((4, 10, 24), "float32"), g: R.Tensor((24,), "float32"),
                 b: R.Tensor((24,), "float32")) -> R.Tensor((4, 10, 24), "float32"):
            with R.dataflow():
                y = R.nn.layer_norm(x, g, b, axes=[-1])
                R.output(y)
            return y

    legal = relax.transform.LegalizeOps()(Norm)
    func = next(f for f in legal.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    scheduled = schedule_cpu_primfunc(func, max_threads=2)
    assert "T.parallel" in scheduled.script() and "T.vectorized" in scheduled.script()
    rng = np.random.default_rng(0)
    x, g, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 10, 24), (24,), (24,)))
    vm = relax.VirtualMachine(compile_relax(Norm, host_target(2)), tvm.cpu())
    got = vm["main"](*[tvm.runtime.tensor(a) for a in (x, g, b)]).numpy()
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(got, (x - mean) / np.sqrt(var + 1e-5) * g + b, rtol=1e-4, atol=1e-4)


def test_missing_tuning_database_is_a_user_error(tmp_path):
    from tvm.script import relax as R
    from tvm.script import ir as I

    @I.ir_module
    class Add:
        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
            return R.add(x, x)

    with pytest.raises(EdgeqError, match="edgeq tune"):
        compile_relax(Add, host_target(2), tuning_db=tmp_path / "nothing")


def test_tune_command_refuses_a_missing_model(tmp_path, capsys):
    from edgeq.cli import main

    with pytest.raises(SystemExit) as caught:
        main(["tune", str(tmp_path / "none.onnx"), "--target", "host", "--trials", "2"])
    assert caught.value.code == 1
    assert "no ONNX model" in capsys.readouterr().err
    assert not (tmp_path / "none.tuning").exists()


def test_interleaved_row_reductions_give_the_serial_bits():
    """LayerNorm's and Softmax's reductions run several rows side by side (65 rows: 5 lanes), each row still
    summed in order: the scheduled PrimFuncs give the same bits as the unscheduled, one-row-at-a-time ones."""
    from tvm.script import ir as I
    from tvm.script import relax as R

    from edgeq.lower.pipeline import EXACT_FP_TIR_PIPELINE

    @I.ir_module
    class NormSoftmax:
        @R.function
        def main(x: R.Tensor((1, 65, 96), "float32"), g: R.Tensor((96,), "float32"),
                 b: R.Tensor((96,), "float32")) -> R.Tensor((1, 65, 96), "float32"):
            with R.dataflow():
                y = R.nn.layer_norm(x, g, b, axes=[-1])
                z = R.nn.softmax(y * R.const(4.0, "float32"), axis=-1)
                R.output(z)
            return z

    legal = relax.transform.LegalizeOps()(NormSoftmax)
    rng = np.random.default_rng(0)
    x, g, b = (rng.standard_normal(s).astype(np.float32) * 3 for s in ((1, 65, 96), (96,), (96,)))
    scripts = []
    for gv, func in legal.functions.items():
        if not ("layer_norm" in gv.name_hint or "softmax" in gv.name_hint):
            continue
        scheduled = schedule_cpu_primfunc(func, max_threads=2)
        scripts.append(scheduled.script())
        inputs = (x, g, b) if "layer_norm" in gv.name_hint else (np.abs(x),)
        outs = []
        for f in (func, scheduled):
            lib = tvm.compile(tvm.IRModule({"f": f.with_attr("global_symbol", "f")}), target=host_target(2),
                              tir_pipeline=EXACT_FP_TIR_PIPELINE)
            out = tvm.runtime.tensor(np.zeros(x.shape, "float32"))
            lib.mod["f"](*[tvm.runtime.tensor(a) for a in inputs], out)
            outs.append(out.numpy())
        np.testing.assert_array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32))
    reductions = [s for s in scripts if "_update" in s]
    assert len(reductions) >= 2  # layer norm's sums and softmax's max / exp sum were interleaved
    assert all("T.vectorized(T.int64(5))" in s for s in reductions)


def test_rows_that_do_not_group_reduce_in_lanes():
    """197 rows (prime: no row interleave) of LayerNorm: each row's sums run as 8 vectorized partial chains added
    in lane order (rfactor), matching the float64 result; rows of 20 (not whole lane groups) stay serial."""
    from tvm.script import ir as I
    from tvm.script import relax as R

    from edgeq.lower.pipeline import EXACT_FP_TIR_PIPELINE

    def norm_module(hidden):
        @I.ir_module
        class Norm:
            @R.function
            def main(x: R.Tensor((1, 197, hidden), "float32"), g: R.Tensor((hidden,), "float32"),
                     b: R.Tensor((hidden,), "float32")) -> R.Tensor((1, 197, hidden), "float32"):
                with R.dataflow():
                    y = R.nn.layer_norm(x, g, b, axes=[-1])
                    R.output(y)
                return y
        return Norm

    rng = np.random.default_rng(1)
    for hidden, lanes in ((48, True), (20, False)):
        legal = relax.transform.LegalizeOps()(norm_module(hidden))
        func = next(f for f in legal.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
        scheduled = schedule_cpu_primfunc(func, max_threads=2)
        assert ("_rf" in scheduled.script()) == lanes
        x, g, b = (rng.standard_normal(s).astype(np.float32) * 3 for s in ((1, 197, hidden), (hidden,), (hidden,)))
        lib = tvm.compile(tvm.IRModule({"f": scheduled.with_attr("global_symbol", "f")}), target=host_target(2),
                          tir_pipeline=EXACT_FP_TIR_PIPELINE)
        out = tvm.runtime.tensor(np.zeros(x.shape, "float32"))
        lib.mod["f"](*[tvm.runtime.tensor(a) for a in (x, g, b)], out)
        x64 = x.astype(np.float64)
        want = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * g + b
        np.testing.assert_allclose(out.numpy(), want, rtol=2e-5, atol=2e-5)


def test_class_token_take_is_bounds_checked_so_tvm_does_not_warn(tiny_onnx):
    """ONNX Gather of the class token arrives as take(mode="fast"), which makes TVM print a segfault warning on
    every build; its index is a constant within bounds, so the pipeline gives it the "clip" mode."""
    from edgeq.lower.pipeline import checked_takes
    from edgeq.lower.relax_import import import_onnx

    def modes(mod) -> list[str]:
        found = []

        def visit(expr):
            if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name == "relax.take":
                found.append(str(expr.attrs.mode))

        relax.analysis.post_order_visit(mod["main"], visit)
        return found

    mod = import_onnx(tiny_onnx)
    assert "fast" in modes(mod)
    assert "fast" not in modes(checked_takes(mod)) and "clip" in modes(checked_takes(mod))
