"""Loading user checkpoints (.safetensors, .pth/.pt/.bin) into a model, with errors that say what is wrong."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from edgeq.errors import CheckpointError

# Training frameworks nest the weights under one of these keys.
_NESTING_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module", "net")
_PREFIXES = ("module.", "model.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            raw: Any = load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None
    else:
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        # The unpickler fails in many ways on foreign bytes (IndexError, KeyError,
        # UnpicklingError, ...); all of them mean "not a checkpoint we can read".
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({first[:200]})") from None
    return _unwrap(raw, path)


def _unwrap(raw: Any, path: Path) -> dict[str, torch.Tensor]:
    while isinstance(raw, Mapping) and not _is_tensor_dict(raw):
        nested = next((raw[k] for k in _NESTING_KEYS if k in raw and isinstance(raw[k], Mapping)), None)
        if nested is None:
            raise CheckpointError(f"{path} holds no tensors under any of {', '.join(_NESTING_KEYS)}")
        raw = nested
    if not isinstance(raw, Mapping) or not raw:
        raise CheckpointError(f"{path} does not hold a state dict")
    state = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _is_tensor_dict(raw: Mapping) -> bool:
    return bool(raw) and all(isinstance(v, torch.Tensor) for v in raw.values())


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Strict load that names the first mismatching keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected {_first(unexpected)}")
    if wrong_shape:
        problems.append(f"shape mismatch {_first(wrong_shape)}")
    if problems:
        raise CheckpointError(f"checkpoint {source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})


def _first(items: list[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" (+{len(items) - n} more)" if len(items) > n else "")
