"""Compile a kernel PrimFunc for the host and call it on numpy arrays (tests, benchmarks, checks)."""
from __future__ import annotations

import numpy as np
import tvm

from edgeq.compile.targets import host_mattr

from .micro import as_target

__all__ = ["host_target", "HostKernel"]


def host_target(num_cores: int | None = None) -> tvm.target.Target:
    """An llvm Target for this machine with its CPU named (``-mcpu=native`` is ignored by TVM 0.27) and the
    features LLVM's model of that CPU misses added (:func:`host_mattr`)."""
    cpu = tvm.target.codegen.llvm_get_system_cpu()
    cfg = {"kind": "llvm", "mcpu": cpu}
    mattr = host_mattr(cpu)
    if mattr:
        cfg["mattr"] = mattr
    if num_cores:
        cfg["num-cores"] = int(num_cores)
    try:
        return tvm.target.Target(cfg)
    except Exception:  # pragma: no cover - an LLVM that does not know the host cpu name
        return tvm.target.Target({"kind": "llvm"})


class HostKernel:
    """``HostKernel(func, name, target)(*arrays, out_shape=..., out_dtype=...) -> np.ndarray``."""

    def __init__(self, func: tvm.tirx.PrimFunc, name: str, target=None, tir_pipeline: str = "default"):
        self.target = as_target(target) if target is not None else host_target()
        self.name = name
        self.executable = tvm.compile(tvm.IRModule({name: func}), target=self.target, tir_pipeline=tir_pipeline)
        self.function = self.executable[name]
        self.device = tvm.cpu()

    def prepare(self, inputs, out_shape, out_dtype: str):
        """Device tensors for ``inputs`` plus an output tensor: reuse them with :meth:`call`."""
        args = [tvm.runtime.tensor(np.ascontiguousarray(a), self.device) for a in inputs]
        args.append(tvm.runtime.empty(tuple(out_shape), out_dtype, self.device))
        return args

    def call(self, args) -> None:
        self.function(*args)

    def __call__(self, *inputs, out_shape, out_dtype: str) -> np.ndarray:
        args = self.prepare(inputs, out_shape, out_dtype)
        self.call(args)
        return args[-1].numpy()

    def asm(self) -> str:
        return self.executable.mod.inspect_source("asm")
