"""Integer kernel library: numpy references (the semantics) and scheduled TIR kernels per target family.

* :mod:`.reference` — the integer semantics, in numpy (``qlinear``, ``qlinear_acc``, ``qmatmul_qk``,
  ``log2_av``, ``requantize``, ``quantize_multiplier``, int4 packing). Every kernel is tested bit for bit
  against it.
* :mod:`.qlinear` — ``qlinear_kernel(m, k, n, target, ...)``: int8/uint8 activations x int8 or packed int4
  weights -> int32 accumulator (+ bias) -> requantized int8/uint8 or int32; ``a_bits`` says how wide the input
  codes are (narrow widths let Cortex-A72 kernels accumulate in int16 lanes); ``QLinearKernel.pack`` makes
  the build-time constants (weight panels, zero-point-folded bias, requantization constants).
* :mod:`.attention` — ``qk_kernel`` (integer ``q @ k^T``) and ``log2_av_kernel`` (``p @ v`` with
  log2-quantized probabilities as floored shifts).
* :mod:`.micro` — target families (x86 VNNI/AVX-512/AVX2, Cortex-A72 NEON with int32 or int16 accumulators, ARM
  dot product, CUDA dp4a, generic), their micro-kernels and weight layouts; :mod:`.requant` — the SIMD requantization, why it is exact, and a
  standalone ``requantize_kernel`` (int32 -> int8, e.g. after ``log2_av``).
* :mod:`.relax_glue` — ``R.call_tir`` emission; :mod:`.runner` — host compile-and-call helper.

All builders return scheduled ``tvm.tirx.PrimFunc`` objects (``tirx.is_scheduled`` set) for fixed shapes;
they raise ``ValueError`` for arguments outside the supported ranges (they are called by the lowering
pass, not directly by users).
"""
from .attention import AttentionKernel, log2_av_kernel, qk_kernel
from .micro import MICROKERNELS, Microkernel, select_microkernel
from .qlinear import QLinearKernel, qlinear_kernel
from .requant import requant_params, requantize_kernel

__all__ = [
    "AttentionKernel",
    "MICROKERNELS",
    "Microkernel",
    "QLinearKernel",
    "log2_av_kernel",
    "qk_kernel",
    "qlinear_kernel",
    "requant_params",
    "requantize_kernel",
    "select_microkernel",
]
