"""What a quantization run does: the method presets and their ablation switches."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

# Fewer images than this give percentile ranges with no meaning: a classifier
# head sees one token per image, so its per-channel ranges come from N values.
MIN_CALIBRATION_IMAGES = 4

METHODS = ("minmax", "repq", "lrp-qvit")

# Candidate percentiles for the MSE range search: each is tried as the upper
# bound (and 1 - p as the lower bound); the one with the smallest
# quantization MSE on the calibration data wins. 1.0 is plain min/max.
DEFAULT_PERCENTILES = (1.0, 0.99999, 0.9999, 0.999, 0.995, 0.99, 0.98, 0.97, 0.95)

# LRP-QViT clipping: a post-LayerNorm channel's range may be at most kappa
# times the median channel range; kappa is chosen per LayerNorm from these
# (and "no clipping") by the output error of the Linear it feeds.
DEFAULT_CLIP_CANDIDATES = (32.0, 16.0, 8.0, 4.0, 2.0)


@dataclass(frozen=True)
class QuantConfig:
    """Switches of one quantization run; ``QuantConfig.for_method(name)`` gives the presets.

    search:  ranges by MSE over ``percentiles`` (False: plain min/max).
    reparam: post-LayerNorm activations quantized channel-wise, then the
             channel-wise scales folded into the LayerNorm affine and the next
             Linear (RepQ-ViT); False: per-tensor quantization of those inputs.
    log2:    post-Softmax activations on the log-sqrt(2) quantizer, run as log2
             with a fixed-point sqrt(2) at inference (RepQ-ViT); False: uniform.
    clip:    LRP-QViT clipped channel-wise ranges before the reparameterization
             (acts only where ``reparam`` is on).
    weight_symmetric: weights with zero point 0 (the integer kernels in ``edgeq.lower.kernels``
             take symmetric weights); activations are asymmetric (uint with a zero point) unless
             ``act_symmetric``.
    """

    search: bool = True
    reparam: bool = True
    log2: bool = True
    clip: bool = True
    weight_symmetric: bool = True
    act_symmetric: bool = False
    input_bits: int = 8
    log2_frac_bits: int = 8
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    clip_candidates: tuple[float, ...] = DEFAULT_CLIP_CANDIDATES
    max_search_elements: int = 1 << 16
    max_search_rows: int = 4096
    seed: int = 0
    synthetic_images: int = 32
    synthetic_steps: int = 40

    def __post_init__(self) -> None:
        if not 2 <= self.input_bits <= 8:
            raise ValueError(f"input_bits must be 2..8, got {self.input_bits}")
        if not 1 <= self.log2_frac_bits <= 16:
            raise ValueError(f"log2_frac_bits must be 1..16, got {self.log2_frac_bits}")
        if not self.percentiles or any(not 0.5 < p <= 1.0 for p in self.percentiles):
            raise ValueError(f"percentiles must lie in (0.5, 1], got {self.percentiles}")
        if any(k <= 1.0 for k in self.clip_candidates):
            raise ValueError(f"clip candidates must be > 1, got {self.clip_candidates}")
        if self.synthetic_images < MIN_CALIBRATION_IMAGES or self.synthetic_steps < 0:
            raise ValueError("synthetic_images must be at least "
                             f"{MIN_CALIBRATION_IMAGES} and synthetic_steps non-negative")

    @classmethod
    def for_method(cls, method: str, **options: Any) -> "QuantConfig":
        """The preset of ``method`` with ``options`` (field names of this class) replaced."""
        if method == "minmax":
            base = cls(search=False, reparam=False, log2=False, clip=False)
        elif method == "repq":
            base = cls(clip=False)
        elif method == "lrp-qvit":
            base = cls()
        else:
            raise ValueError(f"unknown quantization method {method!r}; choose one of {', '.join(METHODS)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown quantization option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return replace(base, **options)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "QuantConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known})
