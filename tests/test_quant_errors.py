"""Every bad input gives its edgeq error (or a clear Python error for programming mistakes)."""
from __future__ import annotations

import pytest
import torch

from edgeq.bitplan import BitPlan, LayerBits
from edgeq.errors import BitPlanError, CalibrationError
from edgeq.quant import MIN_CALIBRATION_IMAGES, quantize

pytestmark = pytest.mark.usefixtures("single_thread")


def test_too_few_images(vit_model, calib_images):
    with pytest.raises(CalibrationError, match=f"at least {MIN_CALIBRATION_IMAGES} images, got 3"):
        quantize(vit_model, calib_images[:3], "w8a8")


def test_wrong_image_size(vit_model):
    with pytest.raises(CalibrationError, match="3×16×16, the model expects 3×32×32"):
        quantize(vit_model, torch.zeros(8, 3, 16, 16), "w8a8")
    with pytest.raises(CalibrationError, match="1×32×32"):
        quantize(vit_model, torch.zeros(8, 1, 32, 32), "w8a8")


@pytest.mark.parametrize("data, message", [
    (torch.zeros(8, 3, 32), "N×3×H×W"),
    (torch.zeros(8, 3, 32, 32, dtype=torch.uint8), "float tensor"),
    ([[0.0]], "float tensor"),
])
def test_malformed_calibration_data(vit_model, data, message):
    with pytest.raises(CalibrationError, match=message):
        quantize(vit_model, data, "w8a8")


def test_non_finite_images(vit_model, calib_images):
    bad = calib_images.clone()
    bad[2, 0, 5, 5] = float("nan")
    with pytest.raises(CalibrationError, match="NaN or infinite"):
        quantize(vit_model, bad, "w8a8", method="minmax")


def test_non_finite_activations_name_the_layer(vit_model, calib_images, build):
    model = build("edgeq/vit-cifar10")
    with torch.no_grad():
        model.blocks[2].mlp.fc1.bias[0] = float("inf")
    with pytest.raises(CalibrationError, match="non-finite activations at the input of layer blocks.2.mlp.fc2"):
        quantize(model, calib_images, "w8a8", method="minmax")


def test_plan_with_unknown_layer(vit_model, calib_images):
    plan = BitPlan(LayerBits(8, 8), {"blocks.3.mlp.fc9": LayerBits(4, 4)})
    with pytest.raises(BitPlanError, match="blocks.3.mlp.fc9.*closest: .*blocks.3.mlp.fc1"):
        quantize(vit_model, calib_images, plan)


def test_bad_bit_spec(vit_model, calib_images):
    with pytest.raises(BitPlanError):
        quantize(vit_model, calib_images, "w9a8")


def test_unknown_method_and_option(vit_model, calib_images):
    with pytest.raises(ValueError, match="unknown quantization method 'awq'"):
        quantize(vit_model, calib_images, "w8a8", method="awq")
    with pytest.raises(TypeError, match="unknown quantization option.*reparm"):
        quantize(vit_model, calib_images, "w8a8", reparm=False)
