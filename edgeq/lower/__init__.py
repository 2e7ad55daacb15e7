"""Lowering of quantized models to integer TVM code (Relax + scheduled TIR kernels)."""
