"""ONNX -> TVM Relax import of the files :func:`edgeq.lower.export.export_onnx` writes (and of plain float ONNX).

TVM 0.27's ONNX frontend imports ``QuantizeLinear``/``DequantizeLinear`` as ``R.quantize``/``R.dequantize``
(weights as ``R.dequantize(const, axis=0)``), which legalization would later turn into float arithmetic;
edgeq's passes (:mod:`edgeq.lower.passes`, driven by :func:`edgeq.lower.integer.lower_integer`) rewrite them
into integer kernels first. Two things are done before the frontend sees the file:

* opset-21 ``INT4`` initializers (4-bit weights and their zero points) are widened to ``int8`` holding the
  same values -- the frontend fails on packed int4 tensors, and the widening is exact;
* the batch dimension is fixed (``batch``), so every shape in the module is static, and the shape
  arithmetic the PyTorch exporter writes for dynamic batches (``Shape -> Gather -> Concat -> Reshape``,
  Swin's padding and window sizes) is evaluated once with onnxruntime and replaced by constants: the
  frontend cannot reshape with a computed shape. Only values that depend on no model input are folded,
  and never through a ``QuantizeLinear``/``DequantizeLinear`` (those stay for the integer passes).

The module keeps what the Relax graph itself has lost, as module attributes (plain JSON strings):

``edgeq.export``
    the file's ``metadata_props["edgeq.export"]`` (per-layer bits, ranges, tensor names), when present;
``edgeq.layer_keys``
    ``{key: layer}`` so passes can name the kernels they emit after edgeq layers: weighted layers are keyed
    by :func:`weight_key` of their integer weight codes, matmuls by :func:`matmul_key` of their two
    operands' scales;
``edgeq.weight_bits``
    ``{weight key: bits}``: the width the integer kernels store each layer's weights at, as the export
    decided it (``stored_bits`` of the layer's ``weight`` entry; read by the qlinear pass);
``edgeq.input_bits``
    ``{weight key: bits}``: the width of each weighted layer's input codes (from its ``input_quant`` range), which
    lets the qlinear pass pick kernels that accumulate narrow products in int16 lanes.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

from edgeq.errors import EdgeqError, UnsupportedModelError

__all__ = ["import_onnx", "load_onnx_for_relax", "weight_key", "matmul_key", "layer_keys", "weight_storage_bits", "input_code_bits",
           "module_json_attr"]

EXPORT_ATTR = "edgeq.export"
LAYER_KEYS_ATTR = "edgeq.layer_keys"
WEIGHT_BITS_ATTR = "edgeq.weight_bits"
INPUT_BITS_ATTR = "edgeq.input_bits"


def weight_key(codes: np.ndarray) -> str:
    """Key of a weighted layer: a hash of its integer weight codes (as int8, with their shape)."""
    codes = np.ascontiguousarray(np.asarray(codes).astype(np.int8))
    digest = hashlib.sha1(codes.tobytes() + repr(codes.shape).encode()).hexdigest()[:20]
    return f"w:{digest}"


def _f32_hex(value: float) -> str:
    return struct.pack("<f", float(value)).hex()


def matmul_key(a_scale: float, b_scale: float) -> str:
    """Key of a quantized matmul: the float32 bit patterns of its two operands' scales."""
    return f"mm:{_f32_hex(a_scale)}:{_f32_hex(b_scale)}"


def _initializer_arrays(proto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {init.name: np.asarray(numpy_helper.to_array(init)) for init in proto.graph.initializer}


def layer_keys(proto) -> dict[str, str]:
    """``{key: layer}`` for every quantized layer described in ``proto``'s ``edgeq.export`` metadata."""
    meta = _export_metadata(proto)
    if not meta:
        return {}
    arrays = _initializer_arrays(proto)
    keys: dict[str, str] = {}
    for layer, entry in meta.get("layers", {}).items():
        weight = entry.get("weight")
        if weight and weight.get("initializer") in arrays:
            keys[weight_key(arrays[weight["initializer"]])] = layer
        a, b = entry.get("a_quant"), entry.get("b_quant")
        if a and b and a.get("scale") in arrays and b.get("scale") in arrays:
            keys[matmul_key(float(arrays[a["scale"]]), float(arrays[b["scale"]]))] = layer
    return keys


def weight_storage_bits(meta: dict[str, Any], keys: dict[str, str]) -> dict[str, int]:
    """``{weight key: stored bits}`` from the export metadata ``meta`` and :func:`layer_keys` ``keys``, for every
    weighted layer whose entry records its storage width (``stored_bits``; exports written before it was recorded
    give the layer's bits, stored as :func:`edgeq.bitplan.storage_bits` says)."""
    from edgeq.bitplan import storage_bits

    out = {}
    for key, layer in keys.items():
        weight = meta.get("layers", {}).get(layer, {}).get("weight") or {}
        if weight.get("stored_bits") is not None:
            out[key] = int(weight["stored_bits"])
        elif weight.get("bits") is not None:
            out[key] = storage_bits(int(weight["bits"]))
    return out


def input_code_bits(meta: dict[str, Any], keys: dict[str, str]) -> dict[str, int]:
    """``{weight key: bits}``: the width of each weighted layer's input codes, from the integer range its
    ``input_quant`` entry records (:func:`edgeq.lower.kernels.micro.code_bits`); layers without one are left out
    (their kernels then take full 8-bit codes)."""
    from edgeq.lower.kernels.micro import code_bits

    out = {}
    for key, layer in keys.items():
        quant = meta.get("layers", {}).get(layer, {}).get("input_quant") or {}
        if quant.get("scheme") == "uniform" and {"qmin", "qmax", "dtype"} <= quant.keys():
            out[key] = code_bits(int(quant["qmin"]), int(quant["qmax"]), str(quant["dtype"]))
    return out


def _export_metadata(proto) -> dict[str, Any]:
    props = {p.key: p.value for p in proto.metadata_props}
    return json.loads(props[EXPORT_ATTR]) if EXPORT_ATTR in props else {}


def _widen_int4(proto) -> None:
    """INT4/UINT4 initializers -> int8/uint8 tensors with the same values (exact)."""
    import onnx
    from onnx import numpy_helper

    wide = {onnx.TensorProto.INT4: np.int8, onnx.TensorProto.UINT4: np.uint8}
    for init in proto.graph.initializer:
        if init.data_type in wide:
            values = np.asarray(numpy_helper.to_array(init)).astype(wide[init.data_type])
            init.CopyFrom(numpy_helper.from_array(values, init.name))


def _fix_batch(proto, batch: int) -> None:
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].ClearField("dim_param")
            dims[0].dim_value = batch
        elif dims and dims[0].dim_value != batch and value in proto.graph.input:
            raise UnsupportedModelError(
                f"the ONNX input {value.name!r} has a fixed batch of {dims[0].dim_value}, not {batch}")
    del proto.graph.value_info[:]  # intermediate shapes recorded for another batch would contradict


_NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear"}


def _fold_constant_subgraphs(proto) -> None:
    """Replace tensors computed only from initializers and (static) shapes by initializers."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    constant = {init.name for init in graph.initializer} | {""}
    folded_nodes = []
    for node in graph.node:
        if node.op_type in _NEVER_FOLD:
            continue
        if node.op_type == "Shape" or all(i in constant for i in node.input):
            constant.update(node.output)
            folded_nodes.append(node)
    if not folded_nodes:
        return
    folded_ids = {tuple(n.output) for n in folded_nodes}  # outputs name a node uniquely
    folded_outputs = {o for n in folded_nodes for o in n.output}
    needed = []
    for node in graph.node:
        if tuple(node.output) in folded_ids:
            continue
        needed.extend(i for i in node.input if i in folded_outputs and i not in needed)
    needed.extend(o.name for o in graph.output if o.name in folded_outputs and o.name not in needed)
    if not needed:
        return
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.output[:]
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in needed)
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        shape = [int(d) for d in value.shape]
        dtypes = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8, "tensor(int8)": np.int8}
        feeds[value.name] = np.zeros(shape, dtypes.get(value.type, np.float32))
    values = dict(zip(needed, session.run(needed, feeds)))
    keep = [n for n in graph.node if tuple(n.output) not in folded_ids]
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(numpy_helper.from_array(np.asarray(v), name) for name, v in values.items())
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def load_onnx_for_relax(onnx_path: str | os.PathLike, batch: int = 1):
    """The ONNX model at ``onnx_path`` prepared for TVM's frontend (int4 widened, batch fixed)."""
    import onnx

    path = Path(onnx_path)
    if not path.is_file():
        raise EdgeqError(f"ONNX file not found: {path}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    try:
        proto = onnx.load(str(path))
    except Exception as err:  # protobuf decode errors have no common base class
        raise EdgeqError(f"{path} is not a readable ONNX file: {err}") from None
    _widen_int4(proto)
    _fix_batch(proto, batch)
    _fold_constant_subgraphs(proto)
    return proto


def module_json_attr(mod, key: str) -> dict[str, Any]:
    """A JSON module attribute written by :func:`import_onnx` (``{}`` when absent)."""
    attrs = mod.attrs
    if attrs is None or key not in attrs:
        return {}
    return json.loads(str(attrs[key]))


def import_onnx(onnx_path: str | os.PathLike, *, batch: int = 1):
    """Relax module ``main(input: float32[batch, 3, H, W]) -> float32[batch, classes]`` of an ONNX file.

    Quantize/dequantize nodes stay ``R.quantize``/``R.dequantize``; run
    :func:`edgeq.lower.integer.lower_integer` to turn the quantized layers into integer kernels. Raises
    :class:`UnsupportedModelError` when TVM's frontend cannot import an operator (named).
    """
    from tvm.relax.frontend.onnx import from_onnx

    proto = load_onnx_for_relax(onnx_path, batch)
    keys = layer_keys(proto)
    meta = _export_metadata(proto)
    try:
        mod = from_onnx(proto, keep_params_in_input=False)
    except Exception as err:
        message = str(err).strip().splitlines()
        detail = message[-1] if message else type(err).__name__
        raise UnsupportedModelError(
            f"TVM's ONNX frontend cannot import {onnx_path}: {detail} (supported: the standard ONNX operators "
            "TVM 0.27 converts, QuantizeLinear/DequantizeLinear with int8/uint8 tensors)") from None
    attrs = {LAYER_KEYS_ATTR: json.dumps(keys, sort_keys=True)}
    if meta:
        attrs[EXPORT_ATTR] = json.dumps(meta, sort_keys=True)
        attrs[WEIGHT_BITS_ATTR] = json.dumps(weight_storage_bits(meta, keys), sort_keys=True)
        attrs[INPUT_BITS_ATTR] = json.dumps(input_code_bits(meta, keys), sort_keys=True)
    return mod.with_attrs(attrs)
