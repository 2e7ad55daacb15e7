"""ONNX export of a :class:`~edgeq.quant.QuantizedModel` with standard QDQ (QuantizeLinear/DequantizeLinear).

What the exported graph contains, per quantized layer ``L`` (an edgeq layer name such as
``blocks.0.attn.qkv``; every tensor and node below is named after it)
--------------------------------------------------------------------------------------------------
Weights of a Linear / the patch-embedding conv (per output channel)
    Initializer ``L.weight_int`` holding the integer codes, ``L.weight_scale`` (float32, one per
    output channel) and ``L.weight_zero_point`` (same integer type as the codes, one per channel),
    consumed by ``DequantizeLinear(axis=0)`` named ``L.weight/DequantizeLinear``. The codes are
    ``int8`` for ``w_bits > 4``. For ``w_bits <= 4`` they are opset-21 ``INT4`` initializers
    (values in ``[-8, 7]``) with ``int4="int4"`` (the default; the model's opset is then 21), or
    ``int8`` initializers holding the same values with ``int4="int8"``. Either way the real bit
    width, range and dtype are recorded in the model metadata (below). A Linear then reads
    ``Transpose(perm=[1, 0]) -> MatMul -> Add(bias)`` (nodes ``L/Transpose``, ``L/MatMul``,
    ``L/Add``; bias initializer ``L.bias``), the conv ``L/Conv`` (bias as its third input).
Activations (per tensor: the input of a Linear/conv, both operands of a uniform matmul)
    ``[Clip] -> QuantizeLinear -> DequantizeLinear`` named ``Q.../Clip``, ``Q.../QuantizeLinear``,
    ``Q.../DequantizeLinear`` where ``Q`` is ``L.input_quant`` / ``L.a_quant`` / ``L.b_quant``, with
    initializers ``Q.scale`` (float32 scalar), ``Q.zero_point`` (uint8 for an unsigned range, int8
    for a signed one), and, when the integer range ``[qmin, qmax]`` of the quantizer is narrower
    than the 8-bit type's (``a_bits < 8``, or a symmetric restricted range), a float ``Clip`` to
    ``[(qmin - zp) * scale, (qmax - zp) * scale]`` before it (``Q.clip_min`` / ``Q.clip_max``).
    Values inside that interval keep their codes, so Clip + 8-bit QDQ is exactly edgeq's
    ``clamp(round(x / scale) + zp, qmin, qmax)`` (round half to even in both).
Post-Softmax log2 quantizer (first operand ``L.a_quant`` of ``matmul_av`` when ``log2`` is on)
    Standard ops only, in two halves joined by a ``uint8`` code tensor ``L.a_quant.codes``
    (``Cast`` node ``L.a_quant/codes``), which is what an integer ``log2_av`` kernel consumes:

    quantize (``edgeq.quant.quantizers.log_codes``)::

        r = x / s;  pos = r > 0
        t = max(Round(Log(Where(pos, r, 1)) * (-2 / ln 2)), 0)
        code = Where(pos and t < Z, t, Z)                 # Z = 2^bits - 1, the zero code

    dequantize (``log2_dequant``)::

        e = Ceil(code / 2);  odd = code - 2 * Floor(code / 2)
        x_hat = Where(code == Z, 0, s * (2^F + odd * M) / 2^F * Pow(2, -e))

    with ``F = frac_bits`` and ``M = round((sqrt(2) - 1) * 2^F)`` (106 for F = 8). Initializers:
    ``L.a_quant.scale``; nodes ``L.a_quant/log2/...``. ``log2(r)`` is computed as ``ln(r) / ln 2``,
    which can differ from ``torch.log2`` in the last bit: a code can differ only when
    ``-2 log2(r)`` lies within about 1e-7 of a half integer.
Matmuls
    The attention ``MatMul`` consuming both dequantized operands is named ``L/MatMul``.
Float ops
    LayerNorm (with the reparameterized affine already in its weights), Softmax, GELU, residual
    adds, position embedding, tokens, pooling, Swin bias/masks: the usual float ONNX ops.

Metadata
    ``metadata_props["edgeq.export"]``: JSON ``{"format": "edgeq.onnx-qdq", "version": 1,
    "opset": N, "int4": "int4"|"int8", "layers": {L: {...}}}`` where each layer entry gives its
    kind, ``w_bits``/``a_bits``, and for each quantizer the names of its tensors, its integer
    range and bits (``weight``: ``initializer``, ``dtype``, ``bits``, ``stored_bits`` -- the width the
    integer kernels store the codes at, :func:`edgeq.bitplan.storage_bits` --, ``qmin``, ``qmax``, ``scale``,
    ``zero_point``; activations: ``scheme`` ``uniform`` or ``log2`` and the same
    fields; log2 adds ``zero_code``, ``frac_bits``, ``odd_multiplier``, ``codes``).
    ``metadata_props["edgeq.quantized"]`` is the quantized model's own metadata JSON.

Running it
    :func:`onnx_session` opens it in onnxruntime on the CPU with graph optimizations disabled
    (onnxruntime's optimizer has failed on opset-21 int4-weight models).

API: :func:`export_onnx`, :func:`onnx_session`, :func:`onnx_logits`, :func:`onnx_top1_agreement`.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeq.bitplan import storage_bits
from edgeq.quant import QuantizedModel
from edgeq.quant import quantizers as Q
from edgeq.quant.modules import LogQuantizer, QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer

EXPORT_FORMAT = "edgeq.onnx-qdq"
EXPORT_VERSION = 1
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
TRACE_OPSET = 18          # the TorchScript exporter's opset; raised afterwards when int4 needs 21
INT4_OPSET = 21
_DOMAIN = "edgeq.export"  # placeholder ops, all replaced before the file is written


# --- export-time wrappers: placeholders the post-processing turns into standard ops -----------------

@dataclass
class _Site:
    key: int
    layer: str
    role: str                     # "weight" | "input_quant" | "a_quant" | "b_quant"
    module: nn.Module             # the quantizer, or the weighted layer for "weight"


@dataclass
class _Registry:
    sites: list[_Site] = field(default_factory=list)

    def add(self, layer: str, role: str, module: nn.Module) -> int:
        self.sites.append(_Site(len(self.sites), layer, role, module))
        return len(self.sites) - 1


_ACTIVE: Optional[_Registry] = None


class _Placeholder(torch.autograd.Function):
    """Computes the fake-quant value in PyTorch; exports as one ``edgeq.export::Site(key)`` node."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, key: int) -> torch.Tensor:
        site = _ACTIVE.sites[key]
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)   # the placeholder stands for all of this in the graph
        try:
            out = site.module.dequantized_weight() if site.role == "weight" else site.module(x)
        finally:
            torch._C._set_tracing_state(state)
        return out

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{_DOMAIN}::Site", x, key_i=key)
        site = _ACTIVE.sites[key]
        if site.role != "weight":
            out.setType(x.type())
        else:
            out.setType(x.type().with_dtype(torch.float32))
        return out


class _ExportQuantizer(nn.Module):
    def __init__(self, quantizer: nn.Module, key: int):
        super().__init__()
        self.quantizer = quantizer
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Placeholder.apply(x, self.key)


class _ExportLinear(nn.Module):
    def __init__(self, layer: QuantLinear, key: int):
        super().__init__()
        self.layer = layer
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = _Placeholder.apply(self.layer.weight_int, self.key)
        return torch.matmul(self.layer.input_quant(x), w.t()) + self.layer.bias


class _ExportConv(nn.Module):
    def __init__(self, layer: QuantConv2d, key: int):
        super().__init__()
        self.layer = layer
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        w = _Placeholder.apply(layer.weight_int, self.key)
        return F.conv2d(layer.input_quant(x), w, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def _export_model(qmodel: QuantizedModel, registry: _Registry) -> nn.Module:
    """A deep copy of the converted model whose quantized layers emit placeholders."""
    model = copy.deepcopy(qmodel.model).eval()
    names = list(qmodel.metadata["layers"])
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, (QuantLinear, QuantConv2d)):
            module.input_quant = _ExportQuantizer(module.input_quant,
                                                  registry.add(name, "input_quant", module.input_quant))
            key = registry.add(name, "weight", module)
            _set_submodule(model, name, (_ExportLinear if isinstance(module, QuantLinear) else _ExportConv)(module, key))
        elif isinstance(module, QuantMatMul):
            module.a_quant = _ExportQuantizer(module.a_quant, registry.add(name, "a_quant", module.a_quant))
            module.b_quant = _ExportQuantizer(module.b_quant, registry.add(name, "b_quant", module.b_quant))
        else:
            raise TypeError(f"{name}: unexpected quantized module {type(module).__name__}")
    return model


# --- post-processing with onnx -----------------------------------------------------------------------

class _Builder:
    def __init__(self, onnx_mod, use_int4: bool):
        self.onnx = onnx_mod
        self.h = onnx_mod.helper
        self.nodes_for: dict[str, list] = {}
        self.initializers: list = []
        self.use_int4 = use_int4

    def const(self, name: str, array: np.ndarray, int4: bool = False):
        onnx = self.onnx
        if int4:
            tensor = self.h.make_tensor(name, onnx.TensorProto.INT4, list(array.shape),
                                        array.astype(np.int8).reshape(-1).tolist())
        else:
            tensor = onnx.numpy_helper.from_array(array, name)
        self.initializers.append(tensor)
        return name


def _scalar(value: float) -> np.ndarray:
    return np.array(value, dtype=np.float32)


def _act_nodes(b: _Builder, prefix: str, x: str, out: str, q: UniformQuantizer) -> dict[str, Any]:
    h = b.h
    scale = float(q.scale)
    zp = int(q.zero_point)
    signed = q.qmin < 0
    full = (-128, 127) if signed else (0, 255)
    dtype = np.int8 if signed else np.uint8
    nodes = []
    info: dict[str, Any] = {"scheme": "uniform", "bits": q.bits, "qmin": q.qmin, "qmax": q.qmax,
                            "dtype": "int8" if signed else "uint8",
                            "scale": f"{prefix}.scale", "zero_point": f"{prefix}.zero_point"}
    b.const(f"{prefix}.scale", _scalar(scale))
    b.const(f"{prefix}.zero_point", np.array(zp, dtype=dtype))
    src = x
    if (q.qmin, q.qmax) != full:
        lo = np.float32((q.qmin - zp) * np.float32(scale))
        hi = np.float32((q.qmax - zp) * np.float32(scale))
        b.const(f"{prefix}.clip_min", _scalar(lo))
        b.const(f"{prefix}.clip_max", _scalar(hi))
        nodes.append(h.make_node("Clip", [src, f"{prefix}.clip_min", f"{prefix}.clip_max"], [f"{prefix}.clipped"],
                                 name=f"{prefix}/Clip"))
        src = f"{prefix}.clipped"
        info["clip"] = [f"{prefix}.clip_min", f"{prefix}.clip_max"]
    nodes.append(h.make_node("QuantizeLinear", [src, f"{prefix}.scale", f"{prefix}.zero_point"],
                             [f"{prefix}.quantized"], name=f"{prefix}/QuantizeLinear"))
    nodes.append(h.make_node("DequantizeLinear", [f"{prefix}.quantized", f"{prefix}.scale", f"{prefix}.zero_point"],
                             [out], name=f"{prefix}/DequantizeLinear"))
    info["quantized"] = f"{prefix}.quantized"
    return {"nodes": nodes, "info": info}


def _log2_nodes(b: _Builder, prefix: str, x: str, out: str, q: LogQuantizer) -> dict[str, Any]:
    h = b.h
    p = f"{prefix}/log2"
    t = lambda s: f"{prefix}.log2.{s}"  # noqa: E731  (intermediate tensor names)
    zero = Q.log_zero_code(q.bits)
    mult = Q.log2_odd_multiplier(q.frac_bits)
    b.const(f"{prefix}.scale", _scalar(float(q.scale)))
    consts = {"zero": 0.0, "one": 1.0, "two": 2.0, "half": 0.5, "neg2_over_ln2": -2.0 / math.log(2.0),
              "zero_code": float(zero), "one_frac": float(2 ** q.frac_bits), "odd_mult": float(mult),
              "inv_one_frac": 1.0 / 2 ** q.frac_bits}
    for k, v in consts.items():
        b.const(t(k), _scalar(v))
    codes = f"{prefix}.codes"
    n = h.make_node
    nodes = [
        n("Div", [x, f"{prefix}.scale"], [t("ratio")], name=f"{p}/Div"),
        n("Greater", [t("ratio"), t("zero")], [t("positive")], name=f"{p}/Greater"),
        n("Where", [t("positive"), t("ratio"), t("one")], [t("safe")], name=f"{p}/WhereSafe"),
        n("Log", [t("safe")], [t("ln")], name=f"{p}/Log"),
        n("Mul", [t("ln"), t("neg2_over_ln2")], [t("neg2log2")], name=f"{p}/MulLog2"),
        n("Round", [t("neg2log2")], [t("rounded")], name=f"{p}/Round"),
        n("Max", [t("rounded"), t("zero")], [t("t")], name=f"{p}/Max"),
        n("Less", [t("t"), t("zero_code")], [t("in_range")], name=f"{p}/Less"),
        n("And", [t("positive"), t("in_range")], [t("keep")], name=f"{p}/And"),
        n("Where", [t("keep"), t("t"), t("zero_code")], [t("code_f")], name=f"{p}/WhereCode"),
        n("Cast", [t("code_f")], [codes], to=b.onnx.TensorProto.UINT8, name=f"{prefix}/codes"),
        # dequantize: the log2 reading of the codes
        n("Cast", [codes], [t("code")], to=b.onnx.TensorProto.FLOAT, name=f"{p}/CastCode"),
        n("Mul", [t("code"), t("half")], [t("code_half")], name=f"{p}/MulHalf"),
        n("Ceil", [t("code_half")], [t("shift")], name=f"{p}/Ceil"),
        n("Floor", [t("code_half")], [t("floor_half")], name=f"{p}/Floor"),
        n("Mul", [t("floor_half"), t("two")], [t("even")], name=f"{p}/MulTwo"),
        n("Sub", [t("code"), t("even")], [t("odd")], name=f"{p}/SubOdd"),
        n("Mul", [t("odd"), t("odd_mult")], [t("odd_term")], name=f"{p}/MulOdd"),
        n("Add", [t("odd_term"), t("one_frac")], [t("mantissa_int")], name=f"{p}/AddMantissa"),
        n("Mul", [t("mantissa_int"), t("inv_one_frac")], [t("mantissa")], name=f"{p}/MulMantissa"),
        n("Neg", [t("shift")], [t("neg_shift")], name=f"{p}/Neg"),
        n("Pow", [t("two"), t("neg_shift")], [t("power")], name=f"{p}/Pow"),
        n("Mul", [t("mantissa"), t("power")], [t("unit")], name=f"{p}/MulPow"),
        n("Mul", [t("unit"), f"{prefix}.scale"], [t("value")], name=f"{p}/MulScale"),
        n("Equal", [t("code"), t("zero_code")], [t("is_zero")], name=f"{p}/Equal"),
        n("Where", [t("is_zero"), t("zero"), t("value")], [out], name=f"{p}/WhereZero"),
    ]
    info = {"scheme": "log2", "bits": q.bits, "zero_code": zero, "frac_bits": q.frac_bits, "odd_multiplier": mult,
            "scale": f"{prefix}.scale", "codes": codes, "dtype": "uint8"}
    return {"nodes": nodes, "info": info}


def _weight_nodes(b: _Builder, layer: str, out: str, module) -> dict[str, Any]:
    h = b.h
    w = module.weight_int.detach().cpu().numpy().astype(np.int8)
    bits = module.spec.w_bits
    int4 = bits <= 4 and b.use_int4
    dtype = "int4" if int4 else "int8"
    zp = module.weight_zero_point.detach().cpu().numpy().astype(np.int8)
    b.const(f"{layer}.weight_int", w, int4=int4)
    b.const(f"{layer}.weight_scale", module.weight_scale.detach().cpu().numpy().astype(np.float32))
    b.const(f"{layer}.weight_zero_point", zp, int4=int4)
    node = h.make_node("DequantizeLinear", [f"{layer}.weight_int", f"{layer}.weight_scale", f"{layer}.weight_zero_point"],
                       [out], axis=0, name=f"{layer}.weight/DequantizeLinear")
    info = {"initializer": f"{layer}.weight_int", "dtype": dtype, "bits": bits, "stored_bits": storage_bits(bits),
            "qmin": module.w_qmin, "qmax": module.w_qmax, "axis": 0,
            "scale": f"{layer}.weight_scale", "zero_point": f"{layer}.weight_zero_point"}
    return {"nodes": [node], "info": info}


def _rename_consumers(graph, layer: str, start: str, initializer_names: set[str], renamed: dict[str, str]) -> None:
    """Name the float ops that consume a dequantized weight after the layer (Transpose/MatMul/Add, Conv)."""
    consumers = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    tensor = start
    for _ in range(3):
        users = consumers.get(tensor, [])
        if len(users) != 1:
            return
        node = users[0]
        if node.op_type not in ("Transpose", "MatMul", "Add", "Conv", "Gemm"):
            return
        node.name = f"{layer}/{node.op_type}"
        if node.op_type in ("Add", "Conv", "Gemm"):
            for i in node.input[1:]:
                if i in initializer_names and i not in renamed:
                    renamed[i] = f"{layer}.bias"
        if node.op_type in ("Conv", "Gemm", "Add"):
            return
        tensor = node.output[0]


def _inline_identities(graph) -> None:
    """The exporter shares equal initializers through Identity nodes: give each consumer its own copy."""
    import onnx

    inits = {i.name: i for i in graph.initializer}
    keep, copies = [], []
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in inits:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(inits[node.input[0]])
            tensor.name = node.output[0]
            copies.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    graph.initializer.extend(copies)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _postprocess(model_proto, registry: _Registry, use_int4: bool, opset: int, qmodel: QuantizedModel):
    import onnx

    graph = model_proto.graph
    b = _Builder(onnx, use_int4)
    layers: dict[str, dict[str, Any]] = {}
    new_nodes = []
    weight_outputs: dict[str, str] = {}
    matmul_operands: dict[str, str] = {}
    for node in graph.node:
        if node.domain != _DOMAIN:
            new_nodes.append(node)
            continue
        key = next(a.i for a in node.attribute if a.name == "key")
        site = registry.sites[key]
        out = node.output[0]
        if site.role == "weight":
            built = _weight_nodes(b, site.layer, out, site.module)
            weight_outputs[site.layer] = out
        elif isinstance(site.module, LogQuantizer):
            built = _log2_nodes(b, f"{site.layer}.{site.role}", node.input[0], out, site.module)
        else:
            built = _act_nodes(b, f"{site.layer}.{site.role}", node.input[0], out, site.module)
        if site.role in ("a_quant", "b_quant"):
            matmul_operands[out] = site.layer
        new_nodes.extend(built["nodes"])
        entry = layers.setdefault(site.layer, {})
        entry["weight" if site.role == "weight" else site.role] = built["info"]
    del graph.node[:]
    graph.node.extend(new_nodes)

    # drop what only the placeholders used (the weight_int buffers as float/int constants)
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.initializer.extend(b.initializers)

    _inline_identities(graph)

    # name the consuming float ops after the layer
    init_names = {i.name for i in graph.initializer}
    renamed: dict[str, str] = {}
    for layer, out in weight_outputs.items():
        _rename_consumers(graph, layer, out, init_names, renamed)
    for node in graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[0] in matmul_operands \
                and matmul_operands.get(node.input[1]) == matmul_operands[node.input[0]]:
            node.name = f"{matmul_operands[node.input[0]]}/MatMul"
    if renamed:
        for init in graph.initializer:
            if init.name in renamed:
                init.name = renamed[init.name]
        for node in graph.node:
            for idx, i in enumerate(node.input):
                if i in renamed:
                    node.input[idx] = renamed[i]

    # layer-level metadata
    for name, spec in qmodel.metadata["layers"].items():
        entry = layers.setdefault(name, {})
        entry.update({"kind": spec["kind"], "w_bits": spec.get("w_bits"), "a_bits": spec["a_bits"],
                      "log2": bool(spec.get("log2", False)), "norm": spec.get("norm")})

    # opsets: drop the placeholder domain, set the default domain's version
    imports = [op for op in model_proto.opset_import if op.domain not in (_DOMAIN,)]
    del model_proto.opset_import[:]
    model_proto.opset_import.extend(imports)
    for op in model_proto.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = opset
    metadata = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "opset": opset,
                "int4": "int4" if use_int4 else "int8", "input": INPUT_NAME, "output": OUTPUT_NAME,
                "layers": layers}
    del model_proto.metadata_props[:]
    for k, v in (("edgeq.export", json.dumps(metadata)), ("edgeq.quantized", json.dumps(qmodel.metadata))):
        prop = model_proto.metadata_props.add()
        prop.key, prop.value = k, v
    model_proto.producer_name = "edgeq"
    return model_proto


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def export_onnx(qmodel: QuantizedModel, path: str | os.PathLike, *, opset: Optional[int] = None,
                int4: str = "int4", batch: Optional[int] = None) -> Path:
    """Write ``qmodel`` as an ONNX QDQ model to ``path`` (atomically) and return the path.

    ``opset``: the default domain's opset (default 21 when some weights have ``w_bits <= 4`` and
    ``int4="int4"``, else 18; at least 21 for int4 initializers, at least 13 otherwise).
    ``int4``: ``"int4"`` writes 4-bit weights as opset-21 INT4 initializers, ``"int8"`` as int8
    initializers (the bit width is in the metadata in both cases). ``batch``: a fixed batch size;
    ``None`` (default) exports a dynamic batch dimension named ``batch``.
    """
    import onnx

    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(f"export_onnx needs a QuantizedModel, got {type(qmodel).__name__}")
    if int4 not in ("int4", "int8"):
        raise ValueError(f"int4 must be 'int4' or 'int8', got {int4!r}")
    has_int4 = any((spec.get("w_bits") or 99) <= 4 for spec in qmodel.metadata["layers"].values())
    use_int4 = has_int4 and int4 == "int4"
    if opset is None:
        opset = INT4_OPSET if use_int4 else TRACE_OPSET
    if use_int4 and opset < INT4_OPSET:
        raise ValueError(f"int4 weight initializers need opset >= {INT4_OPSET} (got {opset}); pass int4='int8'")
    if opset < 13:
        raise ValueError(f"per-channel DequantizeLinear needs opset >= 13 (got {opset})")
    path = Path(path)

    channels, height, width = qmodel.metadata["model"]["input_size"]
    example = torch.zeros(batch or 2, channels, height, width)
    global _ACTIVE
    registry = _Registry()
    model = _export_model(qmodel, registry)
    buffer = io.BytesIO()
    _ACTIVE = registry
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (example,), buffer, dynamo=False, opset_version=min(opset, TRACE_OPSET),
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes=None if batch else {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                custom_opsets={_DOMAIN: 1}, do_constant_folding=True,
            )
    finally:
        _ACTIVE = None
    proto = onnx.load_from_string(buffer.getvalue())
    proto = _postprocess(proto, registry, use_int4, opset, qmodel)
    onnx.checker.check_model(proto)
    _atomic_write(path, proto.SerializeToString())
    return path


FLOAT_EXPORT_FORMAT = "edgeq.onnx-float"


def export_float_onnx(model: nn.Module, path: str | os.PathLike, *, input_size: Sequence[int],
                      opset: int = TRACE_OPSET) -> Path:
    """Write the unquantized ``model`` (eval mode, float32) as a plain float ONNX model to ``path``.

    ``input_size``: ``(channels, height, width)``. The graph has the same input/output names and dynamic
    ``batch`` axis as :func:`export_onnx`, so the float and the quantized export import the same way;
    ``metadata_props["edgeq.export"]`` says ``{"format": "edgeq.onnx-float", "version": 1, "opset": N}``.
    """
    import onnx

    if opset < 13 or opset > TRACE_OPSET:
        raise ValueError(f"float export supports opsets 13..{TRACE_OPSET}, got {opset}")
    channels, height, width = (int(v) for v in input_size)
    model = copy.deepcopy(model).float().eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, channels, height, width),), buffer, dynamo=False, opset_version=opset,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, do_constant_folding=True,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    metadata = {"format": FLOAT_EXPORT_FORMAT, "version": EXPORT_VERSION, "opset": opset,
                "input": INPUT_NAME, "output": OUTPUT_NAME}
    del proto.metadata_props[:]
    prop = proto.metadata_props.add()
    prop.key, prop.value = "edgeq.export", json.dumps(metadata)
    proto.producer_name = "edgeq"
    onnx.checker.check_model(proto)
    path = Path(path)
    _atomic_write(path, proto.SerializeToString())
    return path


# --- running it ------------------------------------------------------------------------------------

def onnx_session(onnx_path: str | os.PathLike, threads: int = 0):
    """An onnxruntime CPU session with graph optimizations disabled."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def onnx_logits(onnx_path_or_session, images: torch.Tensor | np.ndarray, batch_size: int = 64) -> np.ndarray:
    session = onnx_path_or_session if hasattr(onnx_path_or_session, "run") else onnx_session(onnx_path_or_session)
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    x = x.astype(np.float32)
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) else batch_size
    outs = []
    for i in range(0, len(x), step):
        chunk = x[i:i + step]
        if isinstance(fixed, int) and len(chunk) < fixed:
            pad = np.zeros((fixed - len(chunk),) + chunk.shape[1:], np.float32)
            outs.append(session.run(None, {session.get_inputs()[0].name: np.concatenate([chunk, pad])})[0][:len(chunk)])
        else:
            outs.append(session.run(None, {session.get_inputs()[0].name: chunk})[0])
    return np.concatenate(outs)


def onnx_top1_agreement(qmodel: QuantizedModel, onnx_path: str | os.PathLike,
                        images: torch.Tensor | Sequence, batch_size: int = 64) -> float:
    """Fraction of ``images`` on which onnxruntime and the PyTorch fake-quant model agree on the top-1 class.

    ``images``: a preprocessed float tensor N×C×H×W, or an iterable of ``(images, labels)``
    batches (a DataLoader).
    """
    if isinstance(images, torch.Tensor):
        batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    else:
        batches = [b[0] if isinstance(b, (tuple, list)) else b for b in images]
    session = onnx_session(onnx_path)
    agree = total = 0
    qmodel.eval()
    with torch.no_grad():
        for x in batches:
            ref = qmodel(x.float()).argmax(-1).numpy()
            got = onnx_logits(session, x).argmax(-1)
            agree += int((ref == got).sum())
            total += len(x)
    if total == 0:
        raise ValueError("no images")
    return agree / total
