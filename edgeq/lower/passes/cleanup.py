"""Pass: after the integer rewrites, drop the dead Q/DQ chains and refuse quantized layers left in float.

Once a quantized layer reads its integer codes directly, the ``R.dequantize`` of its activations and
weights (and the weight transpose, the log2 dequantize half) have no users left: dead-code elimination
removes them. What must not remain is a ``matmul``/``conv2d`` that still consumes a dequantized tensor --
legalization would run it as float math while the build claims integer kernels -- so this pass raises
:class:`UnsupportedModelError` naming each such binding and what was matched instead.
"""
from __future__ import annotations

import tvm
from tvm import relax

from edgeq.errors import UnsupportedModelError

from ._graph import Graph

__all__ = ["RemoveDeadQDQ", "leftover_quantized_ops"]

_COMPUTE = ("matmul", "nn.conv2d", "nn.conv1d", "linear")


def leftover_quantized_ops(func: relax.Function) -> list[str]:
    """``"<binding> = <op>"`` for each compute op of ``func`` that still reads a dequantized operand."""
    graph = Graph(func)
    found = []
    for var, value in graph.producer.items():
        op = graph.op_name(var)
        if op not in _COMPUTE:
            continue
        if any(graph.call(arg, "dequantize") is not None for arg in value.args):
            found.append(f"{var.name} = R.{op}")
    return found


@tvm.transform.module_pass(opt_level=0, name="edgeq.RemoveDeadQDQ")
class RemoveDeadQDQ:
    """Dead-code elimination, then a check that no quantized matmul/conv was left to float execution."""

    def transform_module(self, mod: tvm.IRModule, ctx: tvm.transform.PassContext) -> tvm.IRModule:
        mod = relax.transform.DeadCodeElimination()(mod)
        for gv, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            left = leftover_quantized_ops(func)
            if left:
                raise UnsupportedModelError(
                    f"{gv.name_hint}: quantized operators with no integer kernel: {', '.join(left[:5])}"
                    f"{' ...' if len(left) > 5 else ''} (supported: Linear and patch-embedding conv with symmetric "
                    "per-channel weights, matmuls of two per-tensor quantized activations, log2 softmax @ v)")
        return mod
