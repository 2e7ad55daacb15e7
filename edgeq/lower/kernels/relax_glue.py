"""Calling the integer kernels from Relax: ``R.call_tir`` emission and a tiny end-to-end example.

The lowering pass adds each scheduled PrimFunc to the module once (``BlockBuilder.add_func``) and
replaces a ``DequantizeLinear -> MatMul -> QuantizeLinear`` chain by::

    lv = R.call_tir(qlinear_gv, (x, w_packed, bias_eff, requant), out_sinfo=R.Tensor((M, N), "int8"))

with the packed constants from :meth:`QLinearKernel.pack` as ``relax.const`` (or as parameters). The
PrimFuncs carry ``tirx.is_scheduled`` so default pipelines leave their schedules alone.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .micro import as_target
from .qlinear import QLinearKernel, qlinear_kernel

__all__ = ["add_kernel", "emit_qlinear", "emit_call", "demo_qlinear_module", "run_demo"]


def add_kernel(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str) -> relax.GlobalVar:
    """Add a scheduled PrimFunc to the module being built (once per name) and return its GlobalVar."""
    mod = bb.get()
    for gv in mod.get_global_vars():
        if gv.name_hint == name:
            return gv
    return bb.add_func(func, name)


def emit_call(bb: relax.BlockBuilder, func: tvm.tirx.PrimFunc, name: str, args, out_shape, out_dtype: str,
              name_hint: str = ""):
    """``R.call_tir`` of a kernel PrimFunc; ``args`` are Relax expressions or numpy arrays (made constants).

    ``name_hint`` names the bound var (the lowering passes use the edgeq layer name).
    """
    gv = add_kernel(bb, func, name)
    rargs = [relax.const(a) if isinstance(a, np.ndarray) else a for a in args]
    return bb.emit(relax.call_tir(gv, rargs, relax.TensorType(tuple(out_shape), out_dtype)), name_hint=name_hint)


def emit_qlinear(bb: relax.BlockBuilder, kernel: QLinearKernel, x: relax.Expr, packed: dict[str, np.ndarray]):
    """Emit one quantized linear layer; ``packed`` is ``kernel.pack(...)``'s result."""
    consts = [packed[name] for name in kernel.param_names[1:-1]]
    return emit_call(bb, kernel.func, kernel.name, [x, *consts], kernel.out_shape, kernel.out_dtype)


def demo_qlinear_module(target, m: int = 7, k: int = 13, n: int = 5, seed: int = 0):
    """A Relax module ``main(x int8[m,k]) -> int8[m,n]`` calling a scheduled qlinear PrimFunc via call_tir.

    Returns ``(mod, inputs, expected)``: random weights/bias/scales baked in as constants and the
    reference result for a random ``x``.
    """
    from . import reference as ref

    rng = np.random.default_rng(seed)
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    w = rng.integers(-128, 128, (n, k)).astype(np.int8)
    bias = rng.integers(-2000, 2000, n).astype(np.int32)
    x_zp, out_zp = 3, -2
    mult, shift = ref.quantize_multipliers(rng.uniform(1e-3, 1e-2, n))
    kernel = qlinear_kernel(m, k, n, target, x_dtype="int8", w_bits=8, out_dtype="int8", out_zp=out_zp)
    packed = kernel.pack(w, bias, x_zp, mult, shift)
    bb = relax.BlockBuilder()
    xv = relax.Var("x", relax.TensorType((m, k), "int8"))
    with bb.function("main", [xv]):
        with bb.dataflow():
            y = emit_qlinear(bb, kernel, xv, packed)
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    expected = ref.qlinear(x, x_zp, w, bias, mult, shift, out_zp)
    return bb.get(), [x], expected


def run_demo(target=None, **kw) -> bool:
    """Build :func:`demo_qlinear_module` with ``tvm.compile``, run it on the Relax VM (host CPU), compare."""
    target = as_target(target or {"kind": "llvm"})  # relax.build needs a Target, not a dict
    mod, inputs, expected = demo_qlinear_module(target, **kw)
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return bool(np.array_equal(out.numpy(), expected))
