"""Calling the integer kernels from Relax: ``R.call_tir`` emission.

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

__all__ = ["add_kernel", "emit_call"]


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
