"""`edgeq build`: end-to-end builds of a tiny ViT (host and rasp4), weight bytes, atomic output, refusals."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeq.compile import artifact as A
from edgeq.compile import build as B
from cli_runner import run_cli
from edgeq.cli import main
from edgeq.errors import ArtifactError, BitPlanError
from edgeq.runtime import HostModel

TINY = "edgeq/vit-tiny-test"




@pytest.fixture(scope="module")
def tiny_model_name():
    """A one-block, 48-wide ViT registered as a bundled model so the command line can name it."""
    from dataclasses import replace

    from edgeq.models.reference import REFERENCE_MODELS

    vit = REFERENCE_MODELS["edgeq/vit-cifar10"]
    REFERENCE_MODELS[TINY] = replace(vit, name=TINY, arch={**vit.arch, "depth": 1, "embed_dim": 48, "num_heads": 3})
    yield TINY
    del REFERENCE_MODELS[TINY]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    from conftest import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("data") / "val", [f"c{i}" for i in range(10)], per_class=2)


def cli_build(capsys, name: str, images: Path, out: Path, *extra: str) -> tuple[int, str, str]:
    return run_cli(capsys, "build", "--model", name, "--random-init", "--calib", str(images), "--calib-count", "8",
                   "--eval-data", str(images), "--eval-limit", "10", "--out", str(out), *extra)


# --- end to end ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def host_build(tmp_path_factory, tiny_model_name, images):
    out = tmp_path_factory.mktemp("build") / "tiny-host"
    try:  # a module fixture cannot use capsys: call main directly
        main(["build", "--model", tiny_model_name, "--random-init", "--calib", str(images), "--calib-count", "8",
              "--eval-data", str(images), "--eval-limit", "10", "--target", "host", "--out", str(out)])
    except SystemExit as exit:  # pragma: no cover - shows the error in the failure
        raise AssertionError(f"edgeq build exited {exit.code}")
    return out


def test_host_build_writes_a_verified_integer_artifact(host_build: Path) -> None:
    art = A.load_artifact(host_build)
    m = art.manifest
    assert m.precision == "int" and m.target.name == "host" and m.target.arch == "x86_64"
    from edgeq.lower.kernels.micro import select_microkernel
    from edgeq.compile.targets import load_target

    assert m.target.kernel_family == select_microkernel(load_target("host").tvm_target()).family
    assert set(m.files) == {"model.so", "weights.safetensors", "plan.json", "model.onnx", "golden.npz"}
    assert m.bits.default == {"w": 8, "a": 8} and "blocks.0.attn.matmul_av" in m.bits.layers
    assert m.calibration.images == 8 and len(m.calibration.sha256) == 64
    assert set(m.versions) == {"edgeq", "tvm", "torch", "timm", "onnx", "python"}
    acc = m.accuracy
    assert acc.images == 10 and 0 <= acc.compiled_top1 <= 100
    # the integer program and the PyTorch fake-quant model agree on (nearly) every image
    assert acc.agreement_compiled_vs_fakequant >= 90
    # what build writes is what the schema documents: the manifest file round-trips through Manifest
    written = json.loads((host_build / A.MANIFEST).read_text())
    assert m.to_json() == written
    assert not (host_build.parent / ".tiny-host.partial").exists()


def test_golden_batch_is_reproduced_by_the_library(host_build: Path) -> None:
    art = A.load_artifact(host_build)
    inputs, outputs = art.golden()
    assert inputs.shape == (art.manifest.golden.count, 3, 32, 32) and outputs.shape == (len(inputs), 10)
    assert art.manifest.golden.exact is True
    np.testing.assert_array_equal(HostModel.of(art)(inputs), outputs)


def test_inspect_shows_the_real_build(capsys, host_build: Path) -> None:
    code, out, err = run_cli(capsys, "inspect", str(host_build))
    assert code == 0, err
    family = A.load_artifact(host_build).target.kernel_family
    for text in ("host (x86_64)", "int (default w8a8)", "blocks.0.mlp.fc1", "9216", "bit-exact",
                 "compiled (host library)", f"kernel family │ {family}"):
        assert text in out, text


def test_weight_bytes_are_within_five_percent_of_params_times_bits(host_build: Path) -> None:
    from safetensors.numpy import load_file

    art = A.load_artifact(host_build)
    weights = art.manifest.weights
    stored = load_file(str(art.path("weights.safetensors")))
    assert sum(v.nbytes for v in stored.values()) == weights.bytes
    # expected: sum over weighted layers of params x 8 / 8 plus a scale and a bias per output channel
    qkv = weights.by_layer["blocks.0.attn.qkv"]
    assert qkv.params == 48 * 144 and qkv.expected_bytes == 48 * 144 + 144 * B.CHANNEL_OVERHEAD_BYTES
    assert abs(weights.bytes - weights.expected_bytes) <= 0.05 * weights.expected_bytes, weights
    assert B.weight_bytes_within_tolerance(weights)


def test_tuned_rebuild_records_its_database_and_reproduces_its_golden_batch(capsys, tmp_path, host_build: Path,
                                                                           tiny_model_name, images) -> None:
    """`edgeq tune build/NAME` then `edgeq build --tuning-db build/NAME.tuning`: what the user runs."""
    code, out, err = run_cli(capsys, "tune", str(host_build), "--trials", "4", "--out", str(tmp_path / "db"))
    assert code == 0, err
    assert "measured on this machine (4 records)" in out
    rebuilt = tmp_path / "tiny-host-tuned"
    code, out, err = cli_build(capsys, tiny_model_name, images, rebuilt, "--target", "host", "--eval-limit", "0",
                               "--tuning-db", str(tmp_path / "db"))
    assert code == 0, err
    art = A.load_artifact(rebuilt)
    tuning = art.manifest.tuning
    assert tuning.database == str(tmp_path / "db") and len(tuning.sha256) == 64
    assert tuning.applied and f"tuned schedules for {len(tuning.applied)} PrimFunc(s)" in out
    inputs, outputs = art.golden()
    np.testing.assert_array_equal(HostModel.of(art)(inputs), outputs)


def test_rasp4_build_has_an_aarch64_library_and_a_host_reference(capsys, tmp_path, tiny_model_name, images) -> None:
    from edgeq.compile.targets import elf_info

    out = tmp_path / "tiny-rasp4"
    # min/max ranges quantize in a second (the host build covers LRP-QViT and the log2 softmax kernel)
    code, stdout, err = cli_build(capsys, tiny_model_name, images, out, "--target", "rasp4", "--bits", "w4a8",
                                  "--method", "minmax", "--eval-limit", "0")
    assert code == 0, err
    art = A.load_artifact(out)
    assert elf_info(art.library).arch == "aarch64" and elf_info(art.host_library).arch == "x86_64"
    target = art.manifest.target
    assert target.arch == "aarch64" and target.rpc_key == "rasp4"
    assert target.kernel_family == "arm_neon" and target.kernel_family_note is None
    assert art.manifest.accuracy is None
    weights = art.manifest.weights
    assert B.weight_bytes_within_tolerance(weights), weights
    # 4-bit weights are stored packed: half the bytes of the params
    fc1 = weights.by_layer["blocks.0.mlp.fc1"]
    assert fc1.w == fc1.stored_bits == 4 and fc1.params == 48 * 192
    assert fc1.params // 2 <= fc1.bytes <= 1.05 * fc1.expected_bytes
    assert f"→ {out}" in stdout


def test_manifest_and_inspect_say_when_the_kernels_fall_back_to_generic(capsys, tmp_path) -> None:

    from edgeq.compile.targets import load_target
    from test_artifact import make_artifact

    entry = B.target_entry(load_target("rasp4-32"), load_target("host"))
    assert entry.kernel_family == "generic" and "fall back to 'generic'" in entry.kernel_family_note
    out = make_artifact(tmp_path / "armv7")
    manifest = A.load_artifact(out).manifest
    A.write_manifest(out, replace(manifest, target=entry))
    code, shown, err = run_cli(capsys, "inspect", str(out), "--json")
    assert code == 0, err
    assert json.loads(shown)["target"]["kernel_family_note"] == entry.kernel_family_note
    code, shown, err = run_cli(capsys, "inspect", str(out))
    assert code == 0, err
    assert "kernel family generic (no kernel family covers this target" in " ".join(shown.replace("│", " ").split())


# --- bad input and atomic output -----------------------------------------------------------------------------


def test_unknown_target_lists_known_boards(capsys, tmp_path) -> None:
    code, _, err = run_cli(capsys, "build", "--target", "rasp9", "--out", str(tmp_path / "x"))
    assert code == 60 and "known boards: host" in err and "rasp4" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("target, message", [
    ("jetson-nano", "jetson-nano (sm_53) cannot run the integer plan (default w4a8): edgeq's int8 CUDA kernels use "
                    "__dp4a, which needs sm_61 or newer; build it with --float instead"),
    ("mali", "mali (opencl) cannot run the integer plan (default w4a8)"),
])
def test_integer_plan_on_a_target_without_integer_kernels(capsys, tmp_path, target: str, message: str) -> None:
    code, _, err = run_cli(capsys, "build", "--target", target, "--bits", "w4a8", "--out", str(tmp_path / "out"))
    assert code == BitPlanError.exit_code and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_out_that_is_not_an_artifact_is_refused(capsys, tmp_path, tiny_model_name, images) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, _, err = cli_build(capsys, tiny_model_name, images, tmp_path / "mine", "--target", "host")
    assert code == ArtifactError.exit_code and "not an edgeq artifact" in err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_build_keeps_the_earlier_artifact(tmp_path, monkeypatch, tiny_model_name, images) -> None:
    from test_artifact import make_artifact

    out = make_artifact(tmp_path / "kept")
    before = (out / "manifest.json").read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("quantizing blew up")

    monkeypatch.setattr(B, "quantize_model", broken)
    config = B.BuildConfig(target="host", model=tiny_model_name, random_init=True, calib=str(images), eval_limit=0)
    with pytest.raises(RuntimeError, match="blew up"):
        B.build_artifact(config, out)
    assert (out / "manifest.json").read_bytes() == before
    A.load_artifact(out)
    assert not (tmp_path / ".kept.partial").exists()


def test_weights_are_stored_at_the_kernels_widths() -> None:
    assert [B.storage_bits(w) for w in range(2, 9)] == [4, 4, 4, 8, 8, 8, 8]
