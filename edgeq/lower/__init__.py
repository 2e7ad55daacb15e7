"""Lowering of quantized models to integer TVM code (Relax + scheduled TIR kernels).

:func:`lower_model` (from :mod:`edgeq.lower.lowering`) is the one call from an exported ONNX file to a compiled
module; it is loaded on first use, so importing ``edgeq.lower`` (or the export alone) does not import TVM.
"""
from __future__ import annotations

__all__ = ["Lowered", "lower_model"]


def __getattr__(name: str):
    if name in __all__:
        from edgeq.lower import lowering

        return getattr(lowering, name)
    raise AttributeError(f"module 'edgeq.lower' has no attribute {name!r}")
