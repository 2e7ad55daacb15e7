"""The float ops between integer kernels give the same bits on x86_64 and aarch64 (edgeq.lower.pipeline).

An integer artifact's board library must reproduce the host library bit for bit. TVM's LLVM backend may fuse
a float multiply and add into an FMA wherever instruction selection likes, which differs by target; the
``edgeq_exact_fp`` TIR pipeline makes each product's rounding explicit. The fast tests check that every float
product is fused (``llvm.fma``) or fenced and that no libm call is left; the ``board`` test runs host and
aarch64 builds (the latter under qemu, on the emulated board's aarch64 Python) and compares outputs bit for bit.
"""
from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tvm
from tvm import relax, tirx

from edgeq.lower.pipeline import EXACT_FP_TIR_PIPELINE, compile_relax, cpu_pipeline, fence_float_products
from edgeq.compile.targets import load_target

A72 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}


def float_block(hidden: int = 48, tokens: int = 17, heads: int = 3) -> tvm.IRModule:
    """LayerNorm -> GELU (erf) -> residual add -> softmax over a score matrix: the float ops of a ViT block."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, tokens, hidden], "float32"))
    s = relax.Var("s", relax.TensorType([1, heads, tokens, tokens], "float32"))
    rng = np.random.default_rng(0)
    gamma, beta = (relax.const(rng.standard_normal(hidden).astype("float32")) for _ in range(2))
    with bb.function("main", [x, s]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1]))
            # GELU as the ONNX import writes it: FastMathTransform turns its erf into a polynomial (R.nn.gelu
            # would be legalized after that, into a call of libm's erff, whose last bit differs across targets)
            erf = relax.op.erf(relax.op.divide(y, relax.const(1.4142135, "float32")))
            y = bb.emit(relax.op.multiply(relax.op.multiply(y, relax.const(0.5, "float32")),
                                          relax.op.add(erf, relax.const(1.0, "float32"))))
            y = bb.emit(relax.op.add(relax.op.multiply(y, relax.const(0.7, "float32")), x))
            p = bb.emit(relax.op.nn.softmax(relax.op.multiply(s, relax.const(0.125, "float32")), axis=-1))
            out = bb.emit_output(relax.Tuple([y, p]))
        bb.emit_func_output(out)
    return bb.get()


def float_inputs(count: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [((rng.standard_normal((1, 17, 48)) * 3).astype("float32"),
             (rng.standard_normal((1, 3, 17, 17)) * 4).astype("float32")) for _ in range(count)]


def test_float_products_are_fused_or_fenced_explicitly():
    a = tirx.decl_buffer((8,), "float32", name="a")
    i = tirx.decl_buffer((8,), "int32", name="i")
    k = tirx.Var("k", "int32")
    body = tirx.SeqStmt([
        tirx.BufferStore(a, a[k] * a[k] + a[k], [k]),
        tirx.BufferStore(a, a[k] * a[k] - a[k], [k]),
        tirx.BufferStore(i, i[k] * i[k] + i[k], [k]),
    ])
    func = tirx.PrimFunc([a, i], tirx.For(k, 0, 8, tirx.ForKind.SERIAL, body))
    text = fence_float_products(tvm.IRModule({"f": func}))["f"].script()
    assert 'a[k] = T.call_llvm_pure_intrin("float32", "llvm.fma", a[k], a[k], a[k])' in text
    assert 'a[k] = T.call_llvm_pure_intrin("float32", "llvm.arithmetic.fence", a[k] * a[k]) - a[k]' in text
    assert "i[k] = i[k] * i[k] + i[k]" in text


def module_source(executable, fmt: str = "ll") -> str:
    mods = [executable.mod, *executable.mod.imports]
    return "\n".join(m.inspect_source(fmt) for m in mods if m.kind == "llvm")


@pytest.mark.parametrize("target", ["x86_64", "aarch64"])
def test_no_contraction_left_to_the_backend(target):
    tgt = load_target("host").tvm_target() if target == "x86_64" else A72
    ir = module_source(compile_relax(float_block(), tgt))
    assert "@llvm.fma." in ir and "@llvm.arithmetic.fence." in ir
    assert "fmuladd" not in ir and " contract " not in ir


@pytest.mark.parametrize("target", ["x86_64", "aarch64"])
def test_default_tir_pipeline_leaves_contraction_to_the_backend(target):
    """The check above can fail: TVM's own pipeline emits llvm.fmuladd (fused or not, as the backend likes)."""
    tgt = tvm.target.Target(A72) if target == "aarch64" else load_target("host").tvm_target()
    ex = tvm.compile(float_block(), target=tgt, relax_pipeline=cpu_pipeline(tgt), tir_pipeline="default")
    assert "fmuladd" in module_source(ex)
    assert EXACT_FP_TIR_PIPELINE != "default"


def test_float_block_calls_no_libm():
    """libm results are not the same bits on every target: the compiled float ops must not call it."""
    asm = module_source(compile_relax(float_block(), A72), "asm")
    assert not re.findall(r"\b(bl?|call)\s+(erff?|expf?|tanhf?|logf?|powf?)\b", asm)


_BOARD_SCRIPT = textwrap.dedent("""
    import sys, numpy as np, tvm
    from tvm import relax
    for lib, inputs, output in zip(*[iter(sys.argv[1:])] * 3):
        data = np.load(inputs)
        vm = relax.VirtualMachine(tvm.runtime.load_module(lib), tvm.cpu())
        outs = {}
        for i in range(int(data["n"])):
            res = vm["main"](*[tvm.runtime.tensor(data[f"in{i}_{j}"]) for j in range(int(data["arity"]))])
            for j, r in enumerate([res] if hasattr(res, "numpy") else list(res)):
                outs[f"out{i}_{j}"] = r.numpy()
        np.savez(output, **outs)
""")


def _host_outputs(executable, inputs) -> list[list[np.ndarray]]:
    vm = relax.VirtualMachine(executable, tvm.cpu())
    outs = []
    for args in inputs:
        res = vm["main"](*[tvm.runtime.tensor(a) for a in args])
        outs.append([r.numpy() for r in ([res] if hasattr(res, "numpy") else list(res))])
    return outs


def _board_outputs(jobs, tmp_path) -> list[list[list[np.ndarray]]]:
    """Run each ``(library path, inputs)`` on the emulated aarch64 board's Python, all in one qemu process."""
    argv = []
    for n, (lib, inputs) in enumerate(jobs):
        arrays = {f"in{i}_{j}": a for i, args in enumerate(inputs) for j, a in enumerate(args)}
        np.savez(tmp_path / f"in{n}.npz", n=len(inputs), arity=len(inputs[0]), **arrays)
        argv += [str(lib), str(tmp_path / f"in{n}.npz"), str(tmp_path / f"out{n}.npz")]
    (tmp_path / "run.py").write_text(_BOARD_SCRIPT)
    subprocess.run([sys.executable, "-m", "edgeq.boards.emulated", "python", str(tmp_path / "run.py"), *argv],
                   check=True, capture_output=True, text=True, timeout=900)
    results = []
    for n, (_, inputs) in enumerate(jobs):
        data = np.load(tmp_path / f"out{n}.npz")
        count = len([k for k in data.files if k.startswith("out0_")])
        results.append([[data[f"out{i}_{j}"] for j in range(count)] for i in range(len(inputs))])
    return results


def _assert_bit_identical(want, got):
    assert len(want) == len(got)
    for w, g in zip(want, got):
        assert len(w) == len(g)
        for a, b in zip(w, g):
            assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.board
def test_host_and_aarch64_builds_give_identical_bits(build, calib_images, tmp_path):
    """A float ViT block and a tiny integer ViT (w8a8, one block): host and aarch64 outputs, bit for bit."""
    import torch

    from edgeq.compile.library import build as compile_module
    from edgeq.compile.library import export_library
    from edgeq.lower.export import export_onnx
    from edgeq.lower.integer import lower_integer
    from edgeq.lower.relax_import import import_onnx
    from edgeq.quant import quantize

    torch.manual_seed(0)
    qmodel = quantize(build("edgeq/vit-cifar10", depth=1), calib_images[:8], "w8a8", method="lrp-qvit")
    onnx_path = export_onnx(qmodel, tmp_path / "vit.onnx")
    images = [((np.random.default_rng(i).standard_normal((1, 3, 32, 32)) * 1.5).astype("float32"),)
              for i in range(4)]
    block_inputs = float_inputs(4)
    want, jobs = [], []
    for name, make, inputs in (("block", lambda t: float_block(), block_inputs),
                               ("vit", lambda t: lower_integer(import_onnx(onnx_path, batch=1), t), images)):
        want.append(_host_outputs(compile_module(make("host"), "host"), inputs))
        jobs.append((export_library(compile_module(make("rasp4"), "rasp4"), "rasp4", tmp_path / f"{name}.so"),
                     inputs))
    got = _board_outputs(jobs, tmp_path)
    for w, g in zip(want, got):
        _assert_bit_identical(w, g)
