"""edgeq: mixed-precision post-training quantization of vision transformers for edge boards.

The packages follow the data: :mod:`edgeq.models` → :mod:`edgeq.data` (calibration) → :mod:`edgeq.plan` →
:mod:`edgeq.quant` → :mod:`edgeq.lower` (export, lowering, kernels) → :mod:`edgeq.compile` (targets, build,
artifact) → :mod:`edgeq.boards` (deploy, check, profile), with :mod:`edgeq.runtime` running the compiled libraries.
"""

__version__ = "0.1.0"
