from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import edgeq.models as models
from edgeq.errors import CheckpointError, ModelNotFoundError, WeightsUnavailableError
from edgeq.models import REFERENCE_MODELS, create_model
from edgeq.models.checkpoint import read_state_dict


@pytest.fixture(scope="module")
def vit_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return REFERENCE_MODELS["edgeq/vit-cifar10"].build().state_dict()


def _same_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_timm_name_with_random_init() -> None:
    model = create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)
    assert type(model).__name__ == "VisionTransformer" and model.num_classes == 10
    assert not model.training


@pytest.mark.parametrize("name", sorted(REFERENCE_MODELS))
def test_bundled_reference_models_load_their_weights(name: str) -> None:
    ref = REFERENCE_MODELS[name]
    model = create_model(name)
    stored = read_state_dict(ref.weights_path)
    assert _same_weights(model, {k: v.float() for k, v in stored.items()})
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda s: s,
        lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}},
        lambda s: {"model": {f"model.{k}": v for k, v in s.items()}, "epoch": 3, "optimizer": {}},
        lambda s: {"state_dict_ema": s, "arch": "vit"},
    ],
    ids=["plain", "state_dict+module.", "model+model.", "ema"],
)
def test_pth_checkpoint_layouts(tmp_path: Path, vit_state, wrap) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(vit_state), path)
    model = create_model("edgeq/vit-cifar10", checkpoint=path)
    assert _same_weights(model, vit_state)


def test_safetensors_checkpoint(tmp_path: Path, vit_state) -> None:
    path = tmp_path / "ckpt.safetensors"
    save_file({k: v.contiguous() for k, v in vit_state.items()}, str(path))
    assert _same_weights(create_model("edgeq/vit-cifar10", checkpoint=path), vit_state)


def test_timm_model_from_checkpoint(tmp_path: Path) -> None:
    source = create_model("deit_tiny_patch16_224", pretrained=False, num_classes=10)
    path = tmp_path / "deit.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    loaded = create_model("deit_tiny_patch16_224", checkpoint=path, num_classes=10)
    assert _same_weights(loaded, source.state_dict())


def test_unknown_model_suggests_close_names() -> None:
    with pytest.raises(ModelNotFoundError, match="did you mean .*deit_tiny_patch16_224"):
        create_model("deit_tiny_patch16_22")
    with pytest.raises(ModelNotFoundError, match="edgeq/vit-cifar10"):
        create_model("edgeq/vit-cifar")


def test_offline_pretrained_request_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(WeightsUnavailableError, match="--checkpoint"):
        create_model("deit_tiny_patch16_224")


def test_missing_truncated_and_foreign_checkpoints(tmp_path: Path, vit_state) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        create_model("edgeq/vit-cifar10", checkpoint=tmp_path / "nope.pth")
    good = tmp_path / "good.pth"
    torch.save(vit_state, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        create_model("edgeq/vit-cifar10", checkpoint=truncated)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        create_model("edgeq/vit-cifar10", checkpoint=text)
    st = tmp_path / "broken.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        create_model("edgeq/vit-cifar10", checkpoint=st)
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "config": {"lr": 0.1}}, nested)
    with pytest.raises(CheckpointError, match="holds no tensors"):
        create_model("edgeq/vit-cifar10", checkpoint=nested)


def test_mismatched_checkpoint_names_first_mismatches(tmp_path: Path, vit_state) -> None:
    swin = tmp_path / "swin.pth"
    torch.save(REFERENCE_MODELS["edgeq/swin-cifar10"].build().state_dict(), swin)
    with pytest.raises(CheckpointError, match=r"does not fit the model: missing cls_token, pos_embed"):
        create_model("edgeq/vit-cifar10", checkpoint=swin)
    reshaped = dict(vit_state)
    reshaped["head.weight"] = torch.zeros(100, 192)
    path = tmp_path / "head100.pth"
    torch.save(reshaped, path)
    with pytest.raises(CheckpointError, match=r"shape mismatch head.weight \(100, 192\) vs model \(10, 192\)"):
        create_model("edgeq/vit-cifar10", checkpoint=path)


def test_random_init_is_the_same_model_every_time_and_leaves_the_callers_rng_alone() -> None:
    import torch

    from edgeq.models import create_model

    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = create_model("edgeq/vit-cifar10", pretrained=False).state_dict()
    assert torch.equal(torch.rand(1), expected_next)
    second = create_model("edgeq/vit-cifar10", pretrained=False).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], torch.zeros_like(first["blocks.0.attn.qkv.weight"]))
