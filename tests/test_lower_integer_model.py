"""Whole quantized models through ONNX -> Relax -> integer kernels -> compiled host module.

Small seeded random-weight versions of the reference ViT and Swin keep the builds short; the compiled
integer program must agree with the PyTorch fake-quant model (top-1 and logits), every quantized layer must
be one integer kernel call, and the kernel constants must be the weights at their bit width.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from edgeq.compile.library import build
from edgeq.errors import EdgeqError, UnsupportedModelError
from edgeq.lower.export import export_onnx
from edgeq.lower.integer import integer_kernel_calls, kernel_constants, lower_integer, weight_bytes
from edgeq.lower.relax_import import import_onnx
from edgeq.quant import quantize

pytestmark = pytest.mark.usefixtures("single_thread")


def _lowered(build_fn, tmp_path_factory, name, spec, image_size=32, **arch):
    torch.manual_seed(0)
    model = build_fn(name, **arch)
    calib = torch.randn(8, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    qmodel = quantize(model, calib, spec, method="lrp-qvit")
    return compiled_against_fake_quant(qmodel, tmp_path_factory, image_size)


def compiled_against_fake_quant(qmodel, tmp_path_factory, image_size=32):
    """(qmodel, lowered Relax module, fake-quant logits, compiled host logits) on six seeded images."""
    path = export_onnx(qmodel, tmp_path_factory.mktemp("onnx") / "model.onnx")
    mod = lower_integer(import_onnx(path, batch=2), "host")
    vm = relax.VirtualMachine(build(mod, "host"), tvm.cpu())
    images = torch.randn(6, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = qmodel(images).numpy()
    got = np.concatenate([vm["main"](tvm.runtime.tensor(images[i:i + 2].numpy())).numpy() for i in range(0, 6, 2)])
    return qmodel, mod, expected, got


@pytest.fixture(scope="module")
def vit_w4a4(build, tmp_path_factory):
    return _lowered(build, tmp_path_factory, "edgeq/vit-cifar10", "w4a4", depth=1)


@pytest.fixture(scope="module")
def swin_w8a8(build, tmp_path_factory):
    return _lowered(build, tmp_path_factory, "edgeq/swin-cifar10", "w8a8", image_size=16, img_size=16,
                    embed_dim=16, depths=(2, 1), num_heads=(2, 2))


def agrees(expected, got, rel):
    assert got.shape == expected.shape
    assert (got.argmax(-1) == expected.argmax(-1)).all()
    assert np.linalg.norm(got - expected) <= rel * np.linalg.norm(expected)


def test_vit_w4a4_compiled_integer_program_agrees_with_fake_quant(vit_w4a4):
    qmodel, mod, expected, got = vit_w4a4
    agrees(expected, got, rel=0.05)


def test_swin_w8a8_compiled_integer_program_agrees_with_fake_quant(swin_w8a8):
    qmodel, mod, expected, got = swin_w8a8
    agrees(expected, got, rel=0.05)


@pytest.mark.parametrize("case", ["vit_w4a4", "swin_w8a8"])
def test_every_quantized_layer_is_one_integer_kernel(case, request):
    qmodel, mod, _, _ = request.getfixturevalue(case)
    layers = qmodel.metadata["layers"]
    calls = list(integer_kernel_calls(mod))
    assert sorted(layer for layer, _, _ in calls) == sorted(layers)
    for layer, callee, _ in calls:
        kind = layers[layer]["kind"]
        expected = "qlinear" if kind in ("linear", "conv") else ("log2av" if layers[layer].get("log2") else "qk")
        assert callee.startswith(f"edgeq_{expected}_"), (layer, callee)
    text = mod["main"].script(show_meta=False)
    # no float matmul or conv is left: every one of them was a quantized layer
    assert "R.matmul" not in text and "R.nn.conv2d" not in text and "R.dequantize" not in text


def test_qlinear_kernels_know_their_input_width(vit_w4a4, swin_w8a8):
    """The export's input ranges reach the kernels: 4-bit inputs get ``a4`` kernels (int16 accumulation on
    Cortex-A72), 8-bit ones the full-width kernels."""
    from edgeq.lower.kernels.micro import code_bits

    for (qmodel, mod, _, _), bits in ((vit_w4a4, 4), (swin_w8a8, 8)):
        widths = {}
        for layer, callee, _ in integer_kernel_calls(mod):
            if callee.startswith("edgeq_qlinear_"):
                widths[layer] = 4 if f"_w{bits}a4_" in callee else 8
        expected = {}
        for layer, q in qmodel.layers.items():
            if layer in widths:
                quant = q.input_quant
                expected[layer] = code_bits(quant.qmin, quant.qmax, "int8" if quant.qmin < 0 else "uint8")
        assert widths == expected
        assert (4 in widths.values()) == (bits == 4)


def test_kernel_constants_are_weights_at_their_bit_width(vit_w4a4, swin_w8a8):
    for (qmodel, mod, _, _), bits in ((vit_w4a4, 4), (swin_w8a8, 8)):
        consts = kernel_constants(mod)
        params = 0
        for name, spec in qmodel.metadata["layers"].items():
            if spec["kind"] == "matmul":
                continue
            weight = consts[f"{name}.weight"]
            assert weight.dtype == (np.uint8 if bits == 4 else np.int8)
            assert consts[f"{name}.bias"].dtype == np.int32 and consts[f"{name}.scale"].dtype == np.float32
            params += qmodel.layers[name].weight_int.numel()
        packed = sum(a.nbytes for k, a in consts.items() if k.endswith(".weight"))
        # panels pad output channels and K to the micro-kernel's tile: a few percent at most here
        assert params * bits / 8 <= packed <= 1.25 * params * bits / 8
        assert weight_bytes(mod) == sum(a.nbytes for a in consts.values())


def test_asymmetric_weights_are_refused_naming_the_layer(build, tmp_path):
    torch.manual_seed(0)
    model = build("edgeq/vit-cifar10", depth=1)
    qmodel = quantize(model, torch.randn(6, 3, 32, 32), "w8a8", method="lrp-qvit", weight_symmetric=False)
    mod = import_onnx(export_onnx(qmodel, tmp_path / "asym.onnx"))
    with pytest.raises(UnsupportedModelError, match="non-zero zero points.*weight_symmetric"):
        lower_integer(mod, "host")


def test_import_errors_are_edgeq_errors(tmp_path):
    with pytest.raises(EdgeqError, match="not found"):
        import_onnx(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(EdgeqError, match="not a readable ONNX file"):
        import_onnx(bad)


def test_float_onnx_imports_and_lowers_to_itself(build, tmp_path):
    import warnings

    model = build("edgeq/vit-cifar10", depth=1)
    path = tmp_path / "float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=False, opset_version=18,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    mod = import_onnx(path, batch=3)
    assert [int(d) for d in mod["main"].params[0].ty.shape.values] == [3, 3, 32, 32]
    lowered = lower_integer(mod, "host")
    assert kernel_constants(lowered) == {} and "R.matmul" in lowered["main"].script(show_meta=False)
