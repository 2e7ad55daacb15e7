"""A tiny Relax module calling one scheduled qlinear kernel through ``R.call_tir``, with its numpy reference."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from edgeq.lower.kernels import reference as ref
from edgeq.lower.kernels.micro import as_target
from edgeq.lower.kernels.qlinear import QLinearKernel, qlinear_kernel
from edgeq.lower.kernels.relax_glue import emit_call


def emit_qlinear(bb: relax.BlockBuilder, kernel: QLinearKernel, x: relax.Expr, packed: dict[str, np.ndarray]):
    """Emit one quantized linear layer; ``packed`` is ``kernel.pack(...)``'s result."""
    consts = [packed[name] for name in kernel.param_names[1:-1]]
    return emit_call(bb, kernel.func, kernel.name, [x, *consts], kernel.out_shape, kernel.out_dtype)


def qlinear_module(target, m: int = 7, k: int = 13, n: int = 5, seed: int = 0):
    """``main(x int8[m,k]) -> int8[m,n]`` calling a scheduled qlinear PrimFunc via call_tir.

    Returns ``(mod, inputs, expected)``: random weights/bias/scales baked in as constants and the
    reference result for a random ``x``.
    """
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


def vm_matches_reference(target=None, **shape) -> bool:
    """Build :func:`qlinear_module` with ``tvm.compile``, run it on the Relax VM (host CPU), compare."""
    target = as_target(target or {"kind": "llvm"})  # relax.build needs a Target, not a dict
    mod, inputs, expected = qlinear_module(target, **shape)
    ex = tvm.compile(mod, target=target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return bool(np.array_equal(out.numpy(), expected))
