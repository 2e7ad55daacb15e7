"""Quantizing whole reference architectures: layer names, closeness to float, metadata, progress."""
from __future__ import annotations

import pytest
import timm
import torch

from edgeq.errors import UnsupportedModelError
from edgeq.bitplan import BitPlan, LayerBits
from edgeq.quant import QuantizedModel, quantizable_layers, quantize
from edgeq.quant.modules import LogQuantizer, QuantConv2d, QuantLinear, QuantMatMul, UniformQuantizer

pytestmark = pytest.mark.usefixtures("single_thread")


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def test_vit_layer_names(vit_model):
    names = quantizable_layers(vit_model)
    assert names[:6] == ["patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.matmul_qk",
                         "blocks.0.attn.matmul_av", "blocks.0.attn.proj", "blocks.0.mlp.fc1"]
    assert names[-2:] == ["blocks.5.mlp.fc2", "head"]
    assert len(names) == 1 + 6 * 6 + 1 and len(set(names)) == len(names)


def test_swin_layer_names(swin_model):
    names = quantizable_layers(swin_model)
    assert names[0] == "patch_embed.proj" and names[-1] == "head.fc"
    assert "layers.0.blocks.1.attn.matmul_qk" in names and "layers.2.blocks.1.attn.matmul_av" in names
    assert [n for n in names if "downsample" in n] == ["layers.1.downsample.reduction", "layers.2.downsample.reduction"]
    assert len(names) == 1 + 6 * 6 + 2 + 1


def test_deit_distilled_layer_names():
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2)
    names = quantizable_layers(model)
    assert names[-2:] == ["head", "head_dist"]
    assert "blocks.1.attn.matmul_av" in names


def test_unsupported_model_is_refused():
    with pytest.raises(UnsupportedModelError, match="supports timm VisionTransformer"):
        quantizable_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.fixture(scope="module")
def vit_w8a8(vit_model, calib_images):
    return quantize(vit_model, calib_images, "w8a8", method="lrp-qvit")


def test_w8a8_vit_stays_close_to_float(vit_model, vit_w8a8, test_images):
    with torch.no_grad():
        ref, out = vit_model(test_images), vit_w8a8(test_images)
    assert isinstance(vit_w8a8, QuantizedModel)
    assert _relative_error(out, ref) < 0.1
    assert not torch.equal(out, ref)  # it really is quantized


@pytest.mark.parametrize("method", ["minmax", "repq"])
def test_w8a8_swin_stays_close_to_float(swin_model, calib_images, test_images, method):
    qmodel = quantize(swin_model, calib_images, "w8a8", method=method)
    with torch.no_grad():
        assert _relative_error(qmodel(test_images), swin_model(test_images)) < 0.1


@pytest.fixture(scope="module")
def vit_w4a4(vit_model, calib_images):
    return quantize(vit_model, calib_images, "w4a4", method="lrp-qvit")


def test_lower_bits_mean_larger_error(vit_model, test_images, vit_w8a8, vit_w4a4):
    with torch.no_grad():
        ref = vit_model(test_images)
        assert _relative_error(vit_w4a4(test_images), ref) > _relative_error(vit_w8a8(test_images), ref)


def test_float_model_is_left_untouched(vit_model, calib_images):
    before = {k: v.clone() for k, v in vit_model.state_dict().items()}
    quantize(vit_model, calib_images, "w4a4", method="repq")
    after = vit_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m).__module__.startswith(("timm", "torch")) for m in vit_model.modules())


def test_modules_and_export(vit_w8a8):
    model = vit_w8a8.model
    assert isinstance(model.patch_embed.proj, QuantConv2d) and model.patch_embed.proj.input_quant.bits == 8
    attn = model.blocks[2].attn
    assert isinstance(attn.matmul_qk, QuantMatMul) and isinstance(attn.matmul_qk.a_quant, UniformQuantizer)
    assert isinstance(attn.matmul_av.a_quant, LogQuantizer)
    assert isinstance(model.blocks[2].mlp.fc1, QuantLinear)

    exported = vit_w8a8.export()
    fc1 = exported["layers"]["blocks.2.mlp.fc1"]
    assert fc1["weight_int"].dtype == torch.int8 and fc1["weight_int"].shape == (768, 192)
    assert fc1["weight_scale"].shape == (768,) and fc1["weight_zero_point"].dtype == torch.int32
    assert fc1["weight_qmin"] <= int(fc1["weight_int"].min()) and int(fc1["weight_int"].max()) <= fc1["weight_qmax"]
    assert fc1["input"]["qmin"] <= int(fc1["input"]["zero_point"]) <= fc1["input"]["qmax"]
    assert fc1["folded_norm"] == "blocks.2.norm2"
    assert exported["norms"]["blocks.2.norm2"]["feeds"] == "blocks.2.mlp.fc1"
    av = exported["layers"]["blocks.2.attn.matmul_av"]
    assert av["a"]["scheme"] == "log2" and av["a"]["odd_multiplier"] == 106 and av["a"]["zero_code"] == 255

    # the fake-quant weight is exactly the exported integers times their scales
    layer = model.blocks[2].mlp.fc1
    recon = (fc1["weight_int"].float() - fc1["weight_zero_point"].float().unsqueeze(1)) * fc1["weight_scale"].unsqueeze(1)
    assert torch.equal(recon, layer.dequantized_weight())


def test_metadata(vit_w8a8, calib_images):
    meta = vit_w8a8.metadata
    assert meta["format"] == "edgeq.quantized" and meta["calibration"] == "data"
    assert meta["calibration_images"] == len(calib_images)
    assert meta["method"] == "lrp-qvit" and meta["config"]["clip"] is True
    assert meta["model"]["architecture"] == "edgeq/vit-cifar10"
    layers = meta["layers"]
    assert list(layers) == quantizable_layers(vit_w8a8)
    assert layers["blocks.0.attn.qkv"]["norm"] == "blocks.0.norm1"
    assert layers["head"]["norm"] is None  # one token per image: too few samples for channel ranges
    assert layers["blocks.0.attn.proj"]["norm"] is None
    assert layers["patch_embed.proj"]["a_bits"] == 8


def test_mixed_plan_bits_reach_the_layers(vit_model, calib_images):
    plan = BitPlan(LayerBits(8, 8), {"blocks.1.mlp.fc1": LayerBits(3, 5), "blocks.1.attn.matmul_av": LayerBits(8, 4)})
    qmodel = quantize(vit_model, calib_images, plan, method="minmax")
    fc1 = qmodel.model.blocks[1].mlp.fc1
    assert fc1.spec.w_bits == 3 and fc1.input_quant.bits == 5
    assert int(fc1.weight_int.min()) >= -4 and int(fc1.weight_int.max()) <= 3
    av = qmodel.model.blocks[1].attn.matmul_av
    assert av.a_quant.bits == 4 and isinstance(av.a_quant, UniformQuantizer)  # minmax: no log2
    assert qmodel.model.blocks[0].mlp.fc1.spec.w_bits == 8
    assert qmodel.metadata["plan"]["layers"]["blocks.1.mlp.fc1"] == {"w": 3, "a": 5}


def test_ablation_switches(vit_model, calib_images):
    qmodel = quantize(vit_model, calib_images, "w4a4", method="lrp-qvit", reparam=False, log2=False)
    layers = qmodel.metadata["layers"]
    assert all(entry["norm"] is None for entry in layers.values())
    assert isinstance(qmodel.model.blocks[0].attn.matmul_av.a_quant, UniformQuantizer)
    assert qmodel.metadata["config"]["reparam"] is False


def test_progress_reports_every_layer(vit_model, calib_images):
    calls = []
    quantize(vit_model, calib_images, "w8a8", method="minmax", progress=lambda d, t, w: calls.append((d, t, w)))
    names = quantizable_layers(vit_model)
    assert [c[0] for c in calls] == list(range(1, len(names) + 1))
    assert {c[1] for c in calls} == {len(names)}
    assert sorted(c[2] for c in calls) == sorted(names)


def test_deterministic(vit_model, calib_images, test_images, vit_w4a4):
    again = quantize(vit_model, calib_images, "w4a4", method="lrp-qvit")
    with torch.no_grad():
        assert torch.equal(again(test_images), vit_w4a4(test_images))


def test_deit_distilled_quantizes_end_to_end():
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, depth=2).eval()
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    qmodel = quantize(model, images, "w8a8", method="lrp-qvit")
    layers = qmodel.metadata["layers"]
    assert layers["head_dist"]["norm"] is None and layers["blocks.1.mlp.fc1"]["norm"] == "blocks.1.norm2"
    with torch.no_grad():
        assert _relative_error(qmodel(images), model(images)) < 0.1
