"""edgeq: mixed-precision post-training quantization of vision transformers for edge boards."""

__version__ = "0.1.0"
