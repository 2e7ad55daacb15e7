"""The torch device calibration, sensitivity trials and reconstruction run on (``--device``).

Results always come back to the CPU: a quantized model leaves :func:`edgeq.quant.quantize` on the CPU, so
export, lowering and saving do not depend on where it was computed. Random draws (calibration subsets,
QDrop masks, reconstruction batches) are made on the CPU and moved, so a seed picks the same draws on
every device; float results on a GPU still differ from the CPU's in their last bits.
"""
from __future__ import annotations

import torch

from edgeq.errors import DeviceUnavailableError

__all__ = ["DEVICE_NAMES", "resolve_device"]

DEVICE_NAMES = "cpu, cuda, cuda:N or auto"


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The torch device for ``name``: None or "cpu", "cuda[:N]", "auto"; raises :class:`DeviceUnavailableError`."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "cpu").strip().lower()
    if name == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceUnavailableError(f"--device {name!r} is not a device: use {DEVICE_NAMES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise DeviceUnavailableError(f"--device {name!r}: edgeq runs on cpu or cuda devices, not {device.type}")
    if not torch.cuda.is_available():
        raise DeviceUnavailableError(f"--device {name!r}: torch sees no CUDA device on this machine "
                                     f"(torch {torch.__version__}, torch.cuda.is_available() is False); use cpu")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise DeviceUnavailableError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA "
                                     f"device(s), numbered from 0")
    return torch.device("cuda", index)
