"""edgeq deploy and edgeq check against a local x86 RPC server (a fast stand-in board) with tiny artifacts."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from board_fixtures import RUNTIME_ONLY, make_artifact, run_cli
from edgeq.compile import artifact as art
from edgeq.errors import ArtifactError, ArtifactTargetMismatchError
from edgeq.boards.local import free_port, start_rpc_server


@pytest.fixture(scope="module")
def x86_board():
    board = start_rpc_server(env=RUNTIME_ONLY)
    yield board
    board.stop()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("artifacts")
    built = {"int": make_artifact(folder / "tiny-int-host"),
             "float": make_artifact(folder / "tiny-float-host", precision="float")}
    if shutil.which("aarch64-linux-gnu-gcc"):
        built["rasp4"] = make_artifact(folder / "tiny-int-rasp4", "rasp4")
    return built


def test_deploy_runs_the_golden_batch_bit_exactly(x86_board, artifacts, tmp_path, capsys) -> None:
    report = tmp_path / "deploy.json"
    code, out, _ = run_cli(["deploy", str(artifacts["int"]), "--rpc", x86_board.address, "--output", str(report)],
                           capsys)
    assert code == 0, out
    assert "3/3 outputs match, bit-exact" in out and "OK" in out and "x86_64" in out
    data = json.loads(report.read_text())
    assert data["ok"] and data["exact"] and data["max_abs_diff"] == 0.0 and data["emulated"] is False


def test_deploy_float_artifact_compares_within_atol(x86_board, artifacts) -> None:
    from edgeq.boards.deploy import deploy_artifact

    result = deploy_artifact(artifacts["float"], rpc=x86_board.address, env={})
    assert result.ok and not result.exact and result.atol == pytest.approx(1e-4)
    assert "within atol" in result.report()


def test_deploy_reports_a_mismatching_board(x86_board, artifacts, tmp_path, capsys) -> None:
    """A golden batch the library does not reproduce (sealed into the manifest) is a mismatch, exit 1."""
    folder = tmp_path / "wrong-golden"
    shutil.copytree(artifacts["int"], folder)
    with np.load(folder / art.GOLDEN) as data:
        inputs, outputs = data["inputs"], data["outputs"].copy()
    outputs[1, 3] += 1.0  # one logit off by one
    np.savez(folder / art.GOLDEN, inputs=inputs, outputs=outputs)
    manifest = json.loads((folder / art.MANIFEST).read_text())
    manifest["files"] = art.describe_files(folder, manifest["files"])
    art.write_manifest(folder, manifest)
    code, out, _ = run_cli(["deploy", str(folder), "--rpc", x86_board.address], capsys)
    assert code == 1
    assert "2/3 outputs match" in out and "mismatch at golden input 1: max |diff| 1" in out and "MISMATCH" in out


def test_tampered_artifact_is_refused_before_connecting(artifacts, tmp_path, capsys) -> None:
    folder = tmp_path / "tampered"
    shutil.copytree(artifacts["int"], folder)
    library = folder / art.LIBRARY
    data = bytearray(library.read_bytes())
    data[len(data) // 2] ^= 0xFF
    library.write_bytes(bytes(data))
    port = free_port()  # nothing listens: the artifact must be refused first
    code, _, err = run_cli(["deploy", str(folder), "--rpc", f"127.0.0.1:{port}"], capsys)
    assert code == ArtifactError.exit_code and "model.so" in err and "sha256" in err


def test_artifact_for_another_architecture_is_exit_72(x86_board, artifacts, capsys) -> None:
    if "rasp4" not in artifacts:
        pytest.skip("aarch64-linux-gnu-gcc missing")
    code, _, err = run_cli(["deploy", str(artifacts["rasp4"]), "--rpc", x86_board.address], capsys)
    assert code == ArtifactTargetMismatchError.exit_code == 72
    assert "built for rasp4 (aarch64)" in err and "x86_64" in err


def test_unreachable_board_is_exit_70(artifacts, capsys, monkeypatch) -> None:
    for name in ("TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "TVM_TRACKER_KEY"):
        monkeypatch.delenv(name, raising=False)
    port = free_port()
    code, _, err = run_cli(["check", str(artifacts["int"]), "--data", "x", "--rpc", f"127.0.0.1:{port}"], capsys)
    assert code == 70 and f"127.0.0.1:{port}" in err and "refused" in err
    monkeypatch.setenv("TVM_TRACKER_HOST", "127.0.0.1")
    monkeypatch.setenv("TVM_TRACKER_PORT", str(port))
    code, _, err = run_cli(["deploy", str(artifacts["int"])], capsys)  # the key comes from the artifact's target
    assert code == 70 and "tracker" in err


def test_check_reports_top1_and_exact_agreement(x86_board, artifacts, tiny_folder, tmp_path, capsys) -> None:
    report = tmp_path / "check.json"
    code, out, _ = run_cli(["check", str(artifacts["int"]), "--data", str(tiny_folder.parent), "--limit", "10",
                            "--rpc", x86_board.address, "--output", str(report)], capsys)
    assert code == 0, out
    data = json.loads(report.read_text())
    assert data["images"] == 10 and data["agreement"] == "exact" and data["outputs_agree"] == 10
    assert data["device_top1"] == data["host_top1"] and data["top1_agreement"] == 100.0
    assert "exact: every output is bit-identical" in out


def test_check_lists_the_first_mismatching_images(x86_board, artifacts, tiny_folder, monkeypatch) -> None:
    """A board whose outputs differ from the host's on some images: not exact, and those images are named."""
    from edgeq.boards import check as check_module

    real = check_module.RemoteModel

    class OffByOne(real):
        calls = 0

        def __call__(self, x):
            out = super().__call__(x)
            OffByOne.calls += 1
            if OffByOne.calls % 2 == 0:
                out[0, 0] += 1.0
            return out

    monkeypatch.setattr(check_module, "RemoteModel", OffByOne)
    result = check_module.check_artifact(artifacts["int"], tiny_folder.parent, 6, rpc=x86_board.address, env={})
    assert not result.ok and result.outputs_agree == 3 and len(result.mismatches) == 3
    assert result.to_json()["agreement"] == "mismatch" and "NOT exact: 3 of 6 outputs differ" in result.report()
    assert all(Path(m["file"]).is_file() for m in result.mismatches)


def test_check_refuses_data_with_another_class_count(x86_board, artifacts, tmp_path) -> None:
    from conftest import write_image_folder

    from edgeq.boards.check import check_artifact
    from edgeq.errors import ClassCountError

    folder = write_image_folder(tmp_path / "three", ["a", "b", "c"], per_class=1)
    with pytest.raises(ClassCountError, match="3 classes"):
        check_artifact(artifacts["int"], folder, 3, rpc=x86_board.address, env={})


def test_the_one_started_board_is_the_default_address(monkeypatch: pytest.MonkeyPatch) -> None:
    from edgeq import runtime

    class Running:
        def __init__(self, address: str, alive: bool = True):
            self.address, self._alive = address, alive

        def alive(self) -> bool:
            return self._alive

    monkeypatch.setattr(runtime, "list_boards", lambda: [Running("127.0.0.1:9301"), Running("127.0.0.1:9302", False)])
    assert runtime.started_board_address({}) == "127.0.0.1:9301"
    # a tracker in the environment wins; several running boards are ambiguous; none: nothing to default to
    assert runtime.started_board_address({"TVM_TRACKER_HOST": "10.0.0.2"}) is None
    monkeypatch.setattr(runtime, "list_boards", lambda: [Running("127.0.0.1:9301"), Running("127.0.0.1:9302")])
    assert runtime.started_board_address({}) is None
    monkeypatch.setattr(runtime, "list_boards", lambda: [])
    assert runtime.started_board_address({}) is None
