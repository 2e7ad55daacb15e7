"""``q.safetensors``: one reader and one writer for quantized models.

The file holds the converted model's whole state dict (integer weights, scales, zero points,
float biases, reparameterized LayerNorm affines and the remaining float tensors: position
embeddings, tokens, relative position bias tables), so it is self-contained; the float model
given to ``load_quantized`` only supplies the architecture. The JSON metadata (see
``edgeq.quant``) is stored in the safetensors header under the key ``"edgeq"``.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from edgeq.errors import QuantizedModelError
from edgeq.fileio import replace_unless_interrupted
from edgeq.quant.qmodel import FORMAT, FORMAT_VERSION, QuantizedModel
from edgeq.quant.convert import _walk, check_supported, convert, quantizable_layers
from edgeq.quant.modules import LayerSpec

FILE_NAME = "q.safetensors"
METADATA_KEY = "edgeq"


def quantized_path(path: str | os.PathLike) -> Path:
    """``path`` itself when it names a ``.safetensors`` file, else ``path/q.safetensors``."""
    path = Path(path)
    return path if path.suffix == ".safetensors" else path / FILE_NAME


def save_quantized(qmodel: QuantizedModel, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file in the same folder, then rename); returns the file written."""
    target = quantized_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in qmodel.model.state_dict().items()}
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    os.close(handle)
    try:
        save_file(tensors, partial, metadata={METADATA_KEY: json.dumps(qmodel.metadata)})
        replace_unless_interrupted(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def read_quantized(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a quantized-model file, or QuantizedModelError."""
    target = quantized_path(path)
    if not target.is_file():
        exists = target.exists()
        raise QuantizedModelError(f"quantized model {target} " + ("is not a regular file" if exists else
                                                                  "does not exist"))
    try:
        with safe_open(str(target), framework="pt") as handle:
            raw = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise QuantizedModelError(f"{target} is not a readable safetensors file ({exc})") from None
    try:
        meta = json.loads(raw[METADATA_KEY])
    except (KeyError, json.JSONDecodeError, RecursionError):
        raise QuantizedModelError(f"{target} has no edgeq quantization metadata") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise QuantizedModelError(f"{target} is not an edgeq quantized model")
    if meta.get("version") != FORMAT_VERSION:
        raise QuantizedModelError(
            f"{target}: unsupported quantized-model version {meta.get('version')!r} (this edgeq reads {FORMAT_VERSION})")
    if not isinstance(meta.get("model"), dict) or not isinstance(meta.get("layers"), dict):
        raise QuantizedModelError(f"{target} has malformed edgeq quantization metadata")
    return tensors, meta


def _check_spec(target: Path, spec: LayerSpec, kind: str, model: nn.Module) -> None:
    """A stored layer spec of the right kind and field types: the file is read into modules built from it, so a
    wrong type would otherwise fail deep inside PyTorch."""
    def is_int(value, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    problems = [
        ("kind", spec.kind != kind),
        ("w_bits", not (spec.w_bits is None if kind == "matmul" else is_int(spec.w_bits, 2, 8))),
        ("a_bits", not is_int(spec.a_bits, 2, 8)),
        ("log2_frac_bits", not is_int(spec.log2_frac_bits, 1, 16)),
        *((name, not isinstance(getattr(spec, name), bool)) for name in ("weight_symmetric", "act_symmetric", "log2")),
        ("norm", spec.norm is not None and not (isinstance(spec.norm, str)
                                                and isinstance(_submodule(model, spec.norm), nn.LayerNorm))),
    ]
    for field, wrong in problems:
        if wrong:
            raise QuantizedModelError(f"{target} has malformed layer metadata: {spec.name} {field} "
                                      f"{getattr(spec, field)!r}" + (f" (the model's layer is {kind})"
                                                                     if field == "kind" else ""))


def _submodule(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def load_quantized(path: str | os.PathLike, model: nn.Module) -> QuantizedModel:
    """Rebuild the quantized model on a copy of ``model`` (same architecture) from ``path``."""
    tensors, meta = read_quantized(path)
    target = quantized_path(path)
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    if meta["model"].get("class") != model_class:
        raise QuantizedModelError(f"{target} was quantized from a {meta['model'].get('class')}, not a {model_class}")
    try:
        check_supported(model)
    except TypeError as exc:
        raise QuantizedModelError(f"{target} does not fit the model: {exc}") from None
    names = quantizable_layers(model)
    stored = list(meta["layers"])
    if names != stored:
        diff = next((a for a, b in zip(names, stored) if a != b), None) or (names[len(stored):] or stored[len(names):])[0]
        raise QuantizedModelError(
            f"{target} does not fit the model: layers differ ({len(stored)} stored, {len(names)} in the model; "
            f"first difference at {diff})")
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        specs = {name: LayerSpec.from_json(name, data) for name, data in meta["layers"].items()}
    except TypeError as exc:
        raise QuantizedModelError(f"{target} has malformed layer metadata ({exc})") from None
    kinds = dict(_walk(model))
    for spec in specs.values():
        _check_spec(target, spec, kinds[spec.name], model)
    convert(model, specs)
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    shapes = [f"{k} {tuple(tensors[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)]
    dtypes = [f"{k} {tensors[k].dtype} vs {v.dtype}" for k, v in expected.items()
              if k in tensors and tensors[k].dtype != v.dtype]
    for problem, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes),
                           ("dtype mismatch", dtypes)):
        if items:
            more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
            raise QuantizedModelError(f"{target} does not fit the model: {problem} {items[0]}{more}")
    model.load_state_dict(tensors, strict=True)
    return QuantizedModel(model, meta)
