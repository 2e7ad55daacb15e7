"""edgeq's Relax passes: each rewrites one quantized pattern of an imported ONNX QDQ model into integer kernels.

* :class:`FuseQLinear` (:mod:`.qlinear`) -- Linear layers and the patch-embedding conv -> ``qlinear`` kernels
  (int8 or packed int4 weights, int32 bias, fixed-point requantization when a quantize follows);
* :class:`FuseQMatmul` (:mod:`.attention`) -- ``q @ k^T`` (any matmul of two quantized activations) -> ``qk``;
* :class:`FuseLog2AV` (:mod:`.attention`) -- ``softmax @ v`` with log2 codes -> shift-based ``log2_av``;
* :class:`FuseSoftmaxLog2Codes` (:mod:`.softmax_codes`) -- Softmax and the log2 quantize chain after it -> one
  ``softmax_log2_codes`` kernel (codes without a probability tensor or a per-element log);
* :class:`RemoveDeadQDQ` (:mod:`.cleanup`) -- drop the dead dequantize chains, refuse quantized ops left in float;
* :class:`MultiplyByReciprocal` (:mod:`.reciprocal`) -- the float glue's divisions by constants (GELU's
  ``/ sqrt(2)``, every activation quantize) become multiplications by float32 reciprocals;
* :class:`FuseQLinearEpilogue` (:mod:`.epilogue`) -- the float ops from an int32 ``qlinear`` to the next quantize
  (fc1's dequantize, GELU, quantize), or up to a residual add (fc2, proj), move into the kernel's epilogue (CPU
  targets).

:func:`edgeq.lower.integer.lower_integer` runs them in this order.
"""
from .attention import FuseLog2AV, FuseQMatmul
from .cleanup import RemoveDeadQDQ
from .epilogue import FuseQLinearEpilogue
from .qlinear import FuseQLinear
from .reciprocal import MultiplyByReciprocal
from .softmax_codes import FuseSoftmaxLog2Codes

__all__ = ["FuseLog2AV", "FuseQLinear", "FuseQLinearEpilogue", "FuseQMatmul", "FuseSoftmaxLog2Codes", "MultiplyByReciprocal", "RemoveDeadQDQ"]
