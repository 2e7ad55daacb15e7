"""save_quantized / load_quantized: identical outputs, atomic writes, refusals of mismatching models."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import edgeq.quant.io as qio
from edgeq.errors import QuantizedModelError
from edgeq.quant import load_quantized, quantize, save_quantized

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def vit_q(vit_model, calib_images):
    return quantize(vit_model, calib_images, "w4a4", method="lrp-qvit")


@pytest.fixture(scope="module")
def swin_q(swin_model, calib_images):
    return quantize(swin_model, calib_images, "w6a6", method="repq")


@pytest.mark.parametrize("which", ["vit", "swin"])
def test_round_trip_gives_identical_outputs(which, vit_q, swin_q, build, test_images, tmp_path):
    qmodel, name = (vit_q, "edgeq/vit-cifar10") if which == "vit" else (swin_q, "edgeq/swin-cifar10")
    path = save_quantized(qmodel, tmp_path)
    assert path == tmp_path / "q.safetensors"
    fresh = build(name, seed=123)  # other random weights: the file carries every tensor
    loaded = load_quantized(tmp_path, fresh)
    with torch.no_grad():
        assert torch.equal(loaded(test_images), qmodel(test_images))
    assert loaded.metadata == qmodel.metadata
    assert all(type(m).__module__.startswith(("timm", "torch")) for m in fresh.modules())  # fresh model untouched


def test_file_contents(vit_q, tmp_path):
    path = save_quantized(vit_q, tmp_path / "model.safetensors")
    assert path.name == "model.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["edgeq"])
        assert handle.get_tensor("blocks.0.mlp.fc1.weight_int").dtype == torch.int8
        assert handle.get_tensor("blocks.0.mlp.fc1.weight_zero_point").dtype == torch.int32
        assert handle.get_tensor("blocks.0.attn.matmul_av.a_quant.scale").shape == ()
        assert "blocks.0.mlp.fc1.weight" not in handle.keys()  # no float copy of quantized weights
    assert meta["format"] == "edgeq.quantized" and meta["version"] == 1
    assert meta["layers"]["blocks.0.attn.matmul_av"]["log2"] is True
    assert not list(tmp_path.glob("*.partial"))


def test_failed_write_keeps_the_old_file(vit_q, swin_q, build, tmp_path, monkeypatch, test_images):
    save_quantized(vit_q, tmp_path)

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(qio, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(swin_q, tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name != "q.safetensors"]  # no partial file left
    loaded = load_quantized(tmp_path, build("edgeq/vit-cifar10"))
    with torch.no_grad():
        assert torch.equal(loaded(test_images), vit_q(test_images))


def test_other_architecture_is_refused(vit_q, build, tmp_path):
    save_quantized(vit_q, tmp_path)
    with pytest.raises(QuantizedModelError, match="was quantized from a .*VisionTransformer"):
        load_quantized(tmp_path, build("edgeq/swin-cifar10"))
    with pytest.raises(QuantizedModelError, match="layers differ"):
        load_quantized(tmp_path, build("edgeq/vit-cifar10", depth=4))
    with pytest.raises(QuantizedModelError, match="shape mismatch"):
        load_quantized(tmp_path, build("edgeq/vit-cifar10", mlp_ratio=2.0))


def test_unreadable_files(vit_model, tmp_path):
    with pytest.raises(QuantizedModelError, match="does not exist"):
        load_quantized(tmp_path / "missing.safetensors", vit_model)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(QuantizedModelError, match="not a readable safetensors file"):
        load_quantized(garbage, vit_model)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(plain))
    with pytest.raises(QuantizedModelError, match="no edgeq quantization metadata"):
        load_quantized(plain, vit_model)


def test_newer_format_version_is_refused(vit_q, vit_model, tmp_path):
    vit_q_meta = dict(vit_q.metadata, version=99)
    from edgeq.quant import QuantizedModel
    save_quantized(QuantizedModel(vit_q.model, vit_q_meta), tmp_path)
    with pytest.raises(QuantizedModelError, match="unsupported quantized-model version 99"):
        load_quantized(tmp_path, vit_model)
