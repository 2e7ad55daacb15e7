"""Integer lowering of an imported quantized model: :func:`lower_integer`, and what the result holds.

``lower_integer(import_onnx(path), target)`` runs edgeq's Relax passes (:mod:`edgeq.lower.passes`) so that
every quantized Linear, the patch-embedding conv and both attention matmuls are ``R.call_tir`` of scheduled
integer kernels from :mod:`edgeq.lower.kernels` (a log2-quantized Softmax becomes one kernel that writes the
codes), with their integer weights, biases and requantization constants baked in as ``relax.const``. LayerNorm, Softmax, GELU, residual adds and the quantization of
activations (float -> int8/uint8 codes) stay float between these integer islands. Each kernel call is bound to
a var named after its edgeq layer (from the export's names, see :mod:`edgeq.lower.relax_import`).

:func:`kernel_constants` lists those constants, keyed ``<layer>.<param>`` (``weight``: int8, or packed int4
two per byte as uint8, in the kernel's panel layout; ``bias``: int32 with the activation zero point folded in;
``requant``: int32 fixed-point constants; ``scale``: the float32 scales that turn an int32 result back into
float; ``bias_residual``: float32 rounding residual of the int32 bias, added with the scale), and
:func:`weight_bytes` sums their sizes.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import tvm
from tvm import relax

from edgeq.lower.passes import (FuseLog2AV, FuseQLinear, FuseQLinearEpilogue, FuseQMatmul, FuseSoftmaxLog2Codes,
                                MultiplyByReciprocal, RemoveDeadQDQ)
from edgeq.lower.passes._graph import KERNEL_LAYERS_ATTR, Graph
from edgeq.lower.relax_import import module_json_attr
from edgeq.compile.targets import as_tvm_target

__all__ = ["lower_integer", "kernel_constants", "weight_bytes", "integer_kernel_calls", "KERNEL_PREFIX"]

KERNEL_PREFIX = "edgeq_"
_PARAMS = {
    "qlinear": ("x", "weight", "bias", "requant"),
    "qk": ("q", "k"),
    "log2av": ("p", "v"),
}


def lower_integer(mod: tvm.IRModule, target, *, fuse_epilogues: bool = True) -> tvm.IRModule:
    """Rewrite the quantized layers of ``mod`` (from :func:`edgeq.lower.relax_import.import_onnx`) into integer kernels.

    ``target``: an edgeq board name or :class:`~edgeq.compile.targets.TargetSpec`, a ``tvm.target.Target`` or a TVM
    target dict; the kernels are scheduled for it. Raises :class:`~edgeq.errors.UnsupportedModelError` naming
    the binding of a quantized pattern no kernel covers. ``fuse_epilogues=False`` leaves the float ops after
    int32 kernels as separate glue (the fused build computes the same codes; tests compare the two).
    """
    tvm_target = as_tvm_target(target)
    seq = tvm.transform.Sequential([
        FuseQLinear(tvm_target),
        FuseQMatmul(tvm_target),
        FuseLog2AV(tvm_target),  # reads the quantize chain to bound the codes: before it is replaced
        FuseSoftmaxLog2Codes(tvm_target),
        RemoveDeadQDQ(),
        MultiplyByReciprocal(),  # the float glue left between the kernels: after every pattern was matched
    ] + ([FuseQLinearEpilogue(tvm_target)] if fuse_epilogues else []), name="edgeq.LowerInteger")
    return seq(mod)


def _kernel_kind(name: str) -> str | None:
    if not name.startswith(KERNEL_PREFIX):
        return None
    kind = name[len(KERNEL_PREFIX):].split("_", 1)[0]
    return kind if kind in _PARAMS else None


def integer_kernel_calls(mod: tvm.IRModule, entry: str = "main") -> Iterator[tuple[str, str, relax.Call]]:
    """``(layer, kernel PrimFunc name, call)`` for every integer kernel ``R.call_tir`` in ``entry``, in order."""
    func = mod[entry]
    layers = module_json_attr(mod, KERNEL_LAYERS_ATTR)
    for block in func.body.blocks:
        for binding in block.bindings:
            value = getattr(binding, "value", None)
            if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op)
                    and value.op.name == "relax.call_tir"):
                continue
            callee = value.args[0].name_hint
            if _kernel_kind(callee) is not None:
                yield layers.get(binding.var.name, binding.var.name), callee, value


def kernel_constants(mod: tvm.IRModule, entry: str = "main") -> dict[str, np.ndarray]:
    """The constants of every integer kernel in ``entry``, keyed ``<layer>.<param>`` (module docstring)."""
    out: dict[str, np.ndarray] = {}
    for layer, callee, call in integer_kernel_calls(mod, entry):
        names = _PARAMS[_kernel_kind(callee)]
        for name, arg in zip(names, call.args[1].fields):
            if not isinstance(arg, tvm.ir.expr.Constant):
                continue
            value = arg.value.numpy()
            if name == "requant" and value.dtype == np.float32:  # a float epilogue's [scale; bias residual]
                out.update({f"{layer}.{row}": v for row, v in zip(("scale", "bias_residual"), value)})
            else:
                out[f"{layer}.{name}"] = value
    graph = Graph(mod[entry])
    layers = module_json_attr(mod, KERNEL_LAYERS_ATTR)
    # the float scale that follows a kernel: multiply(astype(kernel_out, float32), const)
    for var, value in graph.producer.items():
        if graph.op_name(var) != "multiply":
            continue
        source, scale = value.args
        cast = graph.call(source, "astype")
        const = graph.const_value(scale) if isinstance(scale, tvm.ir.expr.Constant) else None
        if cast is None or const is None:
            continue
        kernel = cast.args[0]
        producer = graph.producer.get(kernel)
        if isinstance(producer, relax.Call) and isinstance(producer.op, tvm.ir.Op) and \
                producer.op.name == "relax.call_tir" and _kernel_kind(producer.args[0].name_hint) is not None:
            layer = layers.get(kernel.name, kernel.name)
            out[f"{layer}.scale"] = const
            residual = _bias_residual(graph, var)
            if residual is not None:
                out[f"{layer}.bias_residual"] = residual
    return out


def _bias_residual(graph: Graph, scaled: relax.Var) -> np.ndarray | None:
    user = graph.only_user(scaled)
    add = graph.call(user, "add") if user is not None else None
    if add is None or not add.args[0].same_as(scaled) or not isinstance(add.args[1], tvm.ir.expr.Constant):
        return None
    return add.args[1].value.numpy()


def weight_bytes(mod: tvm.IRModule, entry: str = "main") -> int:
    """Total bytes of :func:`kernel_constants` (weights at their bit width, biases, requantization, scales)."""
    return int(sum(a.nbytes for a in kernel_constants(mod, entry).values()))
