"""The artifact format: manifest sealing, verification of every file, refusals, and `edgeq inspect`."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeq.compile import artifact as A
from cli_runner import run_cli
from edgeq.errors import ArtifactError




def make_artifact(folder: Path, *, host: bool = True) -> Path:
    """A small but complete artifact directory (the files' contents are stand-ins, the format is real)."""
    folder.mkdir(parents=True)
    (folder / A.LIBRARY).write_bytes(b"\x7fELF model library")
    if host:
        (folder / A.HOST_LIBRARY).write_bytes(b"\x7fELF host library")
    (folder / A.WEIGHTS).write_bytes(b"weights" * 10)
    (folder / A.PLAN).write_text(json.dumps({"version": 1, "default": {"w": 8, "a": 8}, "layers": {}}))
    (folder / A.ONNX).write_bytes(b"onnx")
    inputs = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    np.savez(folder / A.GOLDEN, inputs=inputs, outputs=np.ones((2, 10), np.float32))
    manifest = {
        "format": A.FORMAT, "version": A.VERSION, "name": folder.name, "created": "2026-01-01T00:00:00+00:00",
        "precision": "int", "entry": "main", "batch": 1,
        "model": {"name": "edgeq/vit-cifar10", "checkpoint": None, "num_classes": 10, "input_size": [3, 4, 4],
                  "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bicubic", "crop_pct": 1.0},
        "target": {"name": "rasp4", "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}, "host": None,
                   "arch": "aarch64", "rpc_key": "rasp4"},
        "bits": {"default": {"w": 8, "a": 8}, "layers": {"blocks.0.attn.qkv": {"w": 4, "a": 8},
                                                         "head": {"w": 8, "a": 8}}},
        "files": A.describe_files(folder, [p.name for p in folder.iterdir()]),
        "calibration": {"source": "calibration/cifar10-32.yaml", "sha256": "ab" * 32, "images": 32, "seed": 0},
        "accuracy": {"data": "cifar10/val.tar.gz", "images": 500, "fp_top1": 59.5, "quant_top1": 58.25,
                     "compiled_top1": 58.25, "agreement_compiled_vs_fakequant": 99.8},
        "golden": {"file": A.GOLDEN, "count": 2, "exact": True},
        "weights": {"bytes": 41000, "expected_bytes": 40000, "other_bytes": 0,
                    "by_layer": {"blocks.0.attn.qkv": {"w": 4, "params": 60000, "bytes": 31000,
                                                       "expected_bytes": 30000},
                                 "head": {"w": 8, "params": 9000, "bytes": 10000, "expected_bytes": 10000}}},
        "versions": {"edgeq": "0.1.0", "tvm": "0.27.0"},
    }
    A.write_manifest(folder, manifest)
    return folder


@pytest.fixture
def built(tmp_path: Path) -> Path:
    return make_artifact(tmp_path / "vit-rasp4")


def test_round_trip_verifies_and_exposes_files(built: Path) -> None:
    art = A.load_artifact(built)
    assert art.name == "vit-rasp4" and art.precision == "int" and art.exact
    assert art.library == built / "model.so" and art.host_library == built / "host.so"
    assert set(art.paths) == {"model.so", "host.so", "weights.safetensors", "plan.json", "model.onnx", "golden.npz"}
    inputs, outputs = art.golden()
    assert inputs.shape == (2, 3, 4, 4) and inputs[1, 2, 3, 3] == 95 and outputs.shape == (2, 10)
    manifest = json.loads((built / "manifest.json").read_text())
    assert manifest["digest"] == A.manifest_digest(manifest)


def test_manifest_round_trips_and_reads_manifests_without_the_later_fields(built: Path) -> None:
    written = json.loads((built / "manifest.json").read_text())
    manifest = A.Manifest.from_json(written)
    assert A.Manifest.from_json(manifest.to_json()) == manifest
    # this manifest, like those of earlier builds, has no method, tuning, reconstruction, target device/reference
    # or per-layer stored_bits: they read as None
    assert manifest.method is None and manifest.tuning is None and manifest.reconstruction is None
    assert manifest.target.device is None and manifest.target.reference is None
    assert manifest.weights.by_layer["head"].stored_bits is None and manifest.weights.other_bytes == 0
    assert manifest.model.data_config() == {"input_size": (3, 4, 4), "mean": (0.5,) * 3, "std": (0.25,) * 3,
                                            "interpolation": "bicubic", "crop_pct": 1.0}
    assert manifest.exact and manifest.atol == 0.0


def test_host_target_artifact_uses_model_so_as_reference(tmp_path: Path) -> None:
    art = A.load_artifact(make_artifact(tmp_path / "host", host=False))
    assert art.host_library == tmp_path / "host" / "model.so"


@pytest.mark.parametrize("name", ["model.so", "host.so", "weights.safetensors", "plan.json", "golden.npz"])
def test_a_changed_file_is_refused_by_name(built: Path, name: str) -> None:
    data = bytearray((built / name).read_bytes())
    data[len(data) // 2] ^= 0x01
    (built / name).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=rf"{name} does not match its sha256"):
        A.load_artifact(built)
    A.load_artifact(built, verify=False)  # readable when asked not to verify


def test_a_missing_file_is_refused_by_name(built: Path) -> None:
    (built / "model.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model.onnx is missing"):
        A.load_artifact(built)


def test_a_hand_edited_manifest_is_refused(built: Path) -> None:
    path = built / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["accuracy"]["compiled_top1"] = 99.0
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json was modified after the build"):
        A.load_artifact(built)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(version=2), "artifact version 2 is not supported"),
    (lambda m: m.update(format="something"), "not an edgeq artifact manifest"),
    (lambda m: m.pop("golden"), "lacks golden"),
    (lambda m: m["files"].pop("weights.safetensors"), "does not list weights.safetensors"),
    (lambda m: m["files"].update({"../escape": {"sha256": "0", "bytes": 1}}), "invalid file name '../escape'"),
])
def test_malformed_manifests_are_refused(built: Path, edit, message: str) -> None:
    path = built / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    A.write_manifest(built, manifest)  # resealed: the refusal is about the content, not the digest
    with pytest.raises(ArtifactError, match=message):
        A.load_artifact(built)


def test_not_an_artifact(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        A.load_artifact(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="manifest.json is missing"):
        A.load_artifact(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        A.load_artifact(tmp_path / "empty")


def test_inspect_prints_tables(capsys, built: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", str(built))
    assert code == 0, err
    for text in ("rasp4 (aarch64)", "blocks.0.attn.qkv", "29.3 KiB", "total", "69000", "1.025x", "58.25 %",
                 "99.80 %", "bit-exact", "2 images in golden.npz", "0.27.0", "int (default w8a8)"):
        assert text in out, text


def test_inspect_json_prints_the_manifest(capsys, built: Path) -> None:
    code, out, _ = run_cli(capsys, "inspect", str(built), "--json")
    assert code == 0
    written = json.loads((built / "manifest.json").read_text())
    shown = json.loads(out)
    assert shown == A.Manifest.from_json(written).to_json()
    assert contains(shown, written)  # every field the file holds, as it is (fields it lacks are null)


def contains(big, small) -> bool:
    if isinstance(small, dict):
        return isinstance(big, dict) and all(k in big and contains(big[k], v) for k, v in small.items())
    return big == small


def test_inspect_refuses_a_tampered_artifact_in_one_line(capsys, built: Path, tmp_path: Path) -> None:
    shutil.copy(built / "plan.json", tmp_path / "plan.json")
    (built / "plan.json").write_text('{"version": 1, "default": {"w": 2, "a": 2}, "layers": {}}')
    code, out, err = run_cli(capsys, "inspect", str(built))
    assert code == ArtifactError.exit_code == 40
    assert err.startswith("edgeq: error: ") and "plan.json" in err and len(err.strip().splitlines()) == 1
    assert out == ""
