"""Reading and writing the bundled reference weights and their model cards."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from edgeq.models.reference import ReferenceModel


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and the JSON-decoded metadata of a safetensors file."""
    return load_file(str(path)), read_weights_metadata(path) or {}


def write_reference_weights(
    path: Path, ref: ReferenceModel, state_dict: dict[str, torch.Tensor], **meta: Any
) -> Path:
    """Store float weights as float16 (half the bytes; the card's accuracy is measured on these)."""
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state_dict.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file(tensors, str(partial), metadata={"edgeq": json.dumps({"model": ref.name, **meta})})
    partial.replace(path)
    return path


def write_model_card(
    path: Path, ref: ReferenceModel, val_top1: float, num_images: int, epoch: int, epochs: int, seed: int,
    command: str,
) -> Path:
    finished = "finished" if epoch >= epochs else f"in training: epoch {epoch} of {epochs}"
    text = f"""# {ref.name}

{ref.summary}.

- Trained from scratch on CIFAR-10 train (`../shared/data/cifar10/train.tar.gz`, 50,000 images) by
  `tools/train_reference.py`, seed {seed}; {finished}.
- **Validation top-1: {val_top1:.2f} %** on `../shared/data/cifar10/val.tar.gz` ({num_images:,} images), measured on the
  float16 weights stored in `{path.with_suffix('.safetensors').name}`, with the preprocessing `edgeq eval` uses.
- Reproduce the figure: `edgeq eval --model {ref.name} --data ../shared/data/cifar10/val.tar.gz`
- Training command: `{command}`
"""
    path.write_text(text)
    return path


def read_weights_metadata(path: Path) -> dict[str, Any] | None:
    """The training metadata stored in a bundled weights file, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
        return json.loads(raw["edgeq"]) if "edgeq" in raw else None
    except Exception:  # an unreadable file is reported as having no metadata; loading it reports why
        return None
