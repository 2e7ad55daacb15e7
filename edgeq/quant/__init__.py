"""Post-training quantization of timm ViT, DeiT (incl. distilled) and Swin models.

What is quantized
-----------------
- Every ``nn.Linear`` (attention ``qkv`` and ``proj``, MLP ``fc1``/``fc2``, the classifier ``head``
  / ``head_dist`` / ``head.fc``, Swin's ``downsample.reduction``): weights per output channel at
  the plan's ``w`` bits, the input per tensor at the plan's ``a`` bits.
- The patch-embedding convolution ``patch_embed.proj``: weights at the plan's ``w`` bits, its
  input (the normalized image) at ``QuantConfig.input_bits`` (8) whatever the plan's ``a``.
- Both attention matmuls of every attention module ``A`` (timm ``Attention`` and Swin
  ``WindowAttention``, whose forward is replaced by an explicit, never fused one):
  ``A.matmul_qk`` — operands ``q * head_dim**-0.5`` and ``k``; ``A.matmul_av`` — operands
  ``softmax(...)`` (log2 quantizer, or uniform when ``log2`` is off) and ``v``. Both operands use
  the plan's ``a`` bits; the ``w`` of a matmul entry is ignored.

What stays float
----------------
LayerNorm, Softmax, GELU, residual adds, position embeddings and class/distillation tokens,
pooling, q/k norms if any, Swin's relative position bias and attention masks, and the biases
(float32; an integer kernel can fold them at ``input_scale * weight_scale``).

Layer names (the keys a bit plan may use): ``quantizable_layers(model)``, e.g.
``patch_embed.proj``, ``blocks.3.attn.qkv``, ``blocks.3.attn.matmul_qk``,
``blocks.3.attn.matmul_av``, ``blocks.3.attn.proj``, ``blocks.3.mlp.fc1``, ``head``;
Swin: ``layers.1.blocks.0.attn.matmul_qk``, ``layers.1.downsample.reduction``, ``head.fc``.

Quantizers (``quantizers``)
---------------------------
Uniform asymmetric or symmetric (``QuantConfig.weight_symmetric`` / ``act_symmetric``; by default
weights symmetric, as the integer kernels of ``edgeq.lower.kernels`` expect, and activations
asymmetric), weights per output channel, activations per tensor. Ranges: with ``search`` the
percentile pair (p, 1-p) from ``QuantConfig.percentiles`` (p = 1 is the exact min/max) with the
smallest mean squared error, judged after the consuming operation where there is one — a
Linear's input by the error of its (float-weight) output, each matmul operand by the error of
the product — and on the tensor itself for weights (per output channel), the patch-embedding
input and the per-channel post-LayerNorm ranges; without ``search``, min/max. (Judging q and k
by their own MSE clipped the few large components that dominate the attention logits: an early
reference-ViT checkpoint at W4A4 scored 40.4 % top-1 on 500 val images that way, 43.6 % with
min/max q/k ranges.) Post-Softmax: log-sqrt(2) calibrated, run as log2 (shift + fixed-point sqrt(2) on odd
codes; see ``quantizers`` for the exact rounding). Post-LayerNorm inputs (``reparam``):
channel-wise ranges folded into the LayerNorm affine and the next Linear so inference is
per-tensor (``reparam``); with ``clip`` (LRP-QViT) the channel ranges are first capped — the rule
and its reason are in ``reparam``. Folded sites: ``norm1 -> attn.qkv`` and ``norm2 -> mlp.fc1`` of
every block and Swin's ``downsample.norm -> reduction``; the classifier head and Swin blocks
whose windows need padding keep per-tensor post-LN quantizers (``convert.norm_sites`` says why).

Methods: ``minmax`` (min/max everywhere, uniform softmax, no reparameterization), ``repq``
(search, reparam, log2), ``lrp-qvit`` (``repq`` plus clipping); every switch is a
:class:`QuantConfig` field and can be overridden: ``quantize(..., method="repq", log2=False)``.

Reconstruction (optional, ``quantize(..., reconstruction=ReconstructionConfig())``): after calibration,
unit by unit (patch embedding, each block, the head), the weight rounding (AdaRound) and the uniform
activation steps (LSQ) are learned so each quantized unit reproduces the float unit's output, with QDrop's
random dropping of activation quantization; the result has the same integer format. See ``reconstruct``.

Calibration runs the whole calibration batch through the model once; each quantized layer
calibrates on its first input, which already went through every quantized layer before it.
At least ``MIN_CALIBRATION_IMAGES`` (4) images of the model's input size are required; with
``calib_data=None`` images are synthesized from the model (``synthetic``), a
:class:`SyntheticCalibrationWarning` is issued and the metadata says ``"calibration": "synthetic"``.

File format (``save_quantized`` / ``load_quantized``)
----------------------------------------------------
One ``q.safetensors`` (a directory path gets ``DIR/q.safetensors``) with the converted model's
state dict — per quantized Linear/conv ``L``: ``L.weight_int`` (int8), ``L.weight_scale``
(float32, per output channel), ``L.weight_zero_point`` (int32, per output channel), ``L.bias``
(float32), ``L.input_quant.scale`` (float32 scalar), ``L.input_quant.zero_point`` (int32 scalar);
per matmul ``M``: ``M.a_quant.scale`` (+ ``M.a_quant.zero_point`` when uniform),
``M.b_quant.scale``, ``M.b_quant.zero_point``; the reparameterized LayerNorm ``weight``/``bias``
and every other float tensor under its usual name — and JSON metadata in the safetensors header
under the key ``"edgeq"``::

    {"format": "edgeq.quantized", "version": 1, "edgeq": "0.1.0",
     "model": {"class": "timm.models.vision_transformer.VisionTransformer",
               "architecture": "edgeq/vit-cifar10", "input_size": [3, 32, 32]},
     "method": "lrp-qvit", "config": {...QuantConfig...}, "plan": {...BitPlan JSON...},
     "calibration": "data" | "synthetic", "calibration_images": 32, "calibration_sha256": "...",
     "float_ops": [...],
     "layers": {"blocks.0.attn.qkv": {"kind": "linear", "w_bits": 4, "a_bits": 4,
                                      "weight_symmetric": true, "act_symmetric": false,
                                      "log2": false, "log2_frac_bits": 8,
                                      "norm": "blocks.0.norm1", "clip_kappa": 8.0,
                                      "r1_max_over_median": 7.9},
                "blocks.0.attn.matmul_av": {"kind": "matmul", "w_bits": null, "a_bits": 4,
                                            "log2": true, "log2_frac_bits": 8, ...}, ...}}

Integer ranges: weights signed (``[-2^(b-1), 2^(b-1)-1]``, symmetric ``±(2^(b-1)-1)``),
activations unsigned ``[0, 2^b-1]`` (signed restricted when symmetric); zero points always lie
inside the range. ``QuantizedModel.export()`` returns all of this as tensors and numbers.
"""
from edgeq.quant.api import FLOAT_OPS, QuantizedModel, SyntheticCalibrationWarning, quantize
from edgeq.quant.config import METHODS, MIN_CALIBRATION_IMAGES, QuantConfig
from edgeq.quant.convert import MATMUL_AV, MATMUL_QK, quantizable_layers
from edgeq.quant.io import load_quantized, read_quantized, save_quantized

__all__ = [
    "FLOAT_OPS",
    "MATMUL_AV",
    "MATMUL_QK",
    "METHODS",
    "MIN_CALIBRATION_IMAGES",
    "QuantConfig",
    "QuantizedModel",
    "SyntheticCalibrationWarning",
    "load_quantized",
    "quantizable_layers",
    "quantize",
    "read_quantized",
    "save_quantized",
]
