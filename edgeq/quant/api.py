"""``quantize``: calibrate a float timm model into a :class:`QuantizedModel`."""
from __future__ import annotations

import copy
import hashlib
import warnings
from typing import Any, Callable, Optional

import torch
from torch import nn

from edgeq import __version__
from edgeq.bitplan import BitPlan
from edgeq.errors import CalibrationError
from edgeq.quant.config import MIN_CALIBRATION_IMAGES, QuantConfig
from edgeq.quant.convert import check_supported, convert, layer_specs, quantizable_layers
from edgeq.quant.device import resolve_device
from edgeq.quant.modules import Calibration, QuantMatMul, _QuantWeighted
from edgeq.quant.qmodel import FORMAT, FORMAT_VERSION, QuantizedModel
from edgeq.quant.reconstruct import ReconstructionConfig, check_reconstruction_images, reconstruct, reconstruction_units
from edgeq.quant.synthetic import synthesize_calibration

FLOAT_OPS = ("LayerNorm", "Softmax", "GELU", "residual add", "position embedding", "class/distillation token",
             "Swin relative position bias and attention mask", "pooling", "q/k norms")

Progress = Callable[[int, int, str], None]


class SyntheticCalibrationWarning(UserWarning):
    """Quantization ran on synthetic calibration images because no data was given."""


def expected_input_shape(model: nn.Module) -> tuple[int, int, int]:
    """(channels, height, width) the model's patch embedding takes."""
    embed = model.patch_embed
    channels = embed.proj.in_channels
    size = getattr(embed, "img_size", None)
    if size is None:
        size = tuple((getattr(model, "pretrained_cfg", None) or {}).get("input_size", (channels, 224, 224))[1:])
    return channels, int(size[0]), int(size[1])


def check_calibration_data(data: Any, expected: tuple[int, int, int]) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CalibrationError(f"calibration data must be a float tensor N×{expected[0]}×H×W, got {type(data).__name__}")
    if not data.is_floating_point():
        raise CalibrationError(f"calibration data must be a float tensor (preprocessed images), got {data.dtype}")
    if data.dim() != 4:
        raise CalibrationError(f"calibration data must be N×{expected[0]}×H×W, got shape {tuple(data.shape)}")
    if data.shape[0] < MIN_CALIBRATION_IMAGES:
        raise CalibrationError(f"calibration needs at least {MIN_CALIBRATION_IMAGES} images, got {data.shape[0]}")
    if tuple(data.shape[1:]) != expected:
        c, h, w = data.shape[1:]
        raise CalibrationError(f"calibration images are {c}×{h}×{w}, the model expects {expected[0]}×{expected[1]}×{expected[2]}")
    if not bool(torch.isfinite(data).all()):
        raise CalibrationError("calibration images contain NaN or infinite values")
    return data.detach().to(torch.float32)


def quantize(
    model: nn.Module,
    calib_data: Optional[torch.Tensor],
    plan: BitPlan | str,
    method: str = "lrp-qvit",
    *,
    progress: Optional[Progress] = None,
    config: Optional[QuantConfig] = None,
    reconstruction: Optional[ReconstructionConfig] = None,
    cache: bool = True,
    device: str | torch.device | None = None,
    **options: Any,
) -> QuantizedModel:
    """Quantize a copy of ``model`` (left untouched) with ``plan`` by ``method``.

    ``calib_data``: preprocessed images N×C×H×W (N >= MIN_CALIBRATION_IMAGES), or None for
    synthetic calibration images (with a :class:`SyntheticCalibrationWarning`). ``plan``: a
    BitPlan or a ``wNaM`` spec. ``method``: minmax | repq | lrp-qvit; ``options`` replace fields
    of the method's :class:`QuantConfig` preset (e.g. ``clip=False``), or pass ``config``
    whole. ``progress(done, total, what)`` is called as calibration (and reconstruction) advances.
    ``reconstruction``: block reconstruction after calibration (``edgeq.quant.reconstruct``); its
    result is cached under the edgeq cache, keyed by model, images, method, options and plan, unless
    ``cache`` is False. ``device``: where calibration and reconstruction run (:func:`resolve_device`: cpu,
    cuda[:N], auto); the quantized model is returned on the CPU either way.
    """
    device = resolve_device(device)
    if config is None:
        config = QuantConfig.for_method(method, **options)
    elif options:
        raise TypeError("give either config or options, not both")
    if isinstance(plan, str):
        plan = BitPlan.from_spec(plan)
    if isinstance(model, QuantizedModel):
        raise TypeError("the model is already quantized; pass the float model")
    check_supported(model)
    plan.check_layers(quantizable_layers(model))
    expected = expected_input_shape(model)
    if reconstruction is not None and not reconstruction.enabled:
        reconstruction = None
    if reconstruction is not None and calib_data is not None and isinstance(calib_data, torch.Tensor):
        check_reconstruction_images(int(calib_data.shape[0]))

    float_model = model
    model = copy.deepcopy(model).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    specs = layer_specs(model, plan, config)
    synth_steps = config.synthetic_steps if calib_data is None else 0
    total = synth_steps + len(specs)

    if calib_data is None:
        warnings.warn(
            f"no calibration data: quantizing on {config.synthetic_images} synthetic images generated from the "
            "model (PSAQ-ViT patch similarity); expect lower accuracy than with real images",
            SyntheticCalibrationWarning, stacklevel=2,
        )
        data = synthesize_calibration(
            model, expected, count=config.synthetic_images, steps=config.synthetic_steps, seed=config.seed,
            progress=(lambda done, _t, what: progress(done, total, what)) if progress else None,
        ).cpu()
        source = "synthetic"
    else:
        data = check_calibration_data(calib_data, expected)
        source = "data"

    cache_entry = None
    if reconstruction is not None:
        check_reconstruction_images(int(data.shape[0]))
        cache_entry = _reconstruction_cache(float_model, data, method, config, plan, reconstruction) if cache else None
        if cache_entry is not None and cache_entry[2] is not None:
            return cache_entry[2]

    calibration = Calibration(config=config, total=len(specs), progress=progress, offset=synth_steps)
    convert(model, specs, calibration)
    recon_steps = 0
    if reconstruction is not None:
        recon_steps = len(reconstruction_units(model, list(specs))) * reconstruction.iters
        calibration.total += recon_steps
    with torch.no_grad():
        out = model(data.to(device))
    pending = [name for name, m in model.named_modules()
               if isinstance(m, (_QuantWeighted, QuantMatMul)) and m._pending is not None]
    if pending:
        raise RuntimeError(f"layers never reached during calibration: {', '.join(pending[:3])}")
    if not bool(torch.isfinite(out).all()):
        raise CalibrationError("non-finite values at the model output during calibration")

    layers = {}
    for name, spec in specs.items():
        entry = spec.to_json()
        entry.update(calibration.records.get(name, {}))
        layers[name] = entry
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "edgeq": __version__,
        "model": {"class": f"{type(model).__module__}.{type(model).__qualname__}",
                  "architecture": (getattr(model, "pretrained_cfg", None) or {}).get("architecture"),
                  "input_size": list(expected)},
        "method": method,
        "config": config.to_json(),
        "plan": plan.to_json(),
        "calibration": source,
        "calibration_images": int(data.shape[0]),
        "calibration_sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest(),
        "float_ops": list(FLOAT_OPS),
        "layers": layers,
    }
    qmodel = QuantizedModel(model, metadata)
    if reconstruction is not None:
        offset = synth_steps + len(specs)
        reconstruct(float_model, qmodel, data.to(device), reconstruction,
                    progress=(lambda done, _t, what: progress(offset + done, offset + recon_steps, what))
                    if progress else None)
    model.to("cpu")
    if reconstruction is not None:
        if cache_entry is not None:
            from edgeq.quant.io import save_quantized

            path, key, _ = cache_entry
            qmodel.metadata["reconstruction"]["key"] = key
            save_quantized(qmodel, path)
    return qmodel


def _reconstruction_cache(float_model: nn.Module, data: torch.Tensor, method: str, config: QuantConfig,
                          plan: BitPlan, reconstruction: ReconstructionConfig):
    """(cache file, key, the cached model or None) of a reconstructed quantization."""
    from edgeq.errors import QuantizedModelError
    from edgeq.quant.digest import images_digest, model_digest
    from edgeq.quant.io import load_quantized
    from edgeq.quant.reconstruct import cache_key, cache_path

    key = cache_key(model_digest(float_model), images_digest(data), method, config.to_json(),
                    plan.to_json(), reconstruction)
    path = cache_path(key)
    if not path.is_file():
        return path, key, None
    try:
        cached = load_quantized(path, float_model)
    except QuantizedModelError:
        return path, key, None  # a damaged entry is computed again and replaced
    if (cached.metadata.get("reconstruction") or {}).get("key") != key:
        return path, key, None
    return path, key, cached
