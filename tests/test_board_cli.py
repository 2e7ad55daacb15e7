"""edgeq board start/stop/status, and (``-m board``) the whole path on the emulated aarch64 board:
build edgeq/vit-cifar10 for rasp4, start the board in the background, deploy, check exactly, stop."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import pytest

from board_fixtures import RUNTIME_ONLY, run_cli
from edgeq.boards import background
from edgeq.boards.local import start_rpc_server


def test_board_start_needs_emulated(capsys) -> None:
    code, _, err = run_cli(["board", "start"], capsys)
    assert code == 2 and "--emulated" in err and "board-setup.sh" in err


def test_status_and_stop_with_no_board(capsys) -> None:
    assert run_cli(["board", "status"], capsys)[:2] == (0, "no board started by edgeq is recorded\n")
    assert run_cli(["board", "stop"], capsys)[:2] == (0, "no board started by edgeq is recorded\n")
    code, _, err = run_cli(["board", "stop", "--port", "9"], capsys)
    assert code == 70 and "port 9" in err


def test_a_recorded_board_outlives_its_handle_and_stop_ends_server_and_worker(capsys) -> None:
    """What `board start` does after starting a server (here an x86 one: fast) and what `board stop` undoes."""
    import psutil

    handle = start_rpc_server(env=RUNTIME_ONLY)
    try:
        board = background.record(handle, "emulated")
        assert json.loads(board.state_file.read_text())["port"] == handle.port
        workers = psutil.Process(board.pid).children(recursive=True)
        assert workers, "the RPC server starts a popen worker"
        handle.stop()  # a detached handle no longer stops the server (the CLI process that started it exits)
        assert board.alive() and board.listening()
        code, out, _ = run_cli(["board", "status"], capsys)
        assert code == 0 and f"127.0.0.1:{handle.port}" in out and "serving" in out
        code, out, _ = run_cli(["board", "stop", "--port", str(handle.port)], capsys)
        assert code == 0 and out.startswith("stopped emulated board")
        assert not board.alive() and not any(w.is_running() and w.status() != "zombie" for w in workers)
        assert not board.state_file.exists() and not Path(board.workdir).exists()
        assert run_cli(["board", "status"], capsys)[1] == "no board started by edgeq is recorded\n"
    finally:
        handle.process.kill()  # in case an assertion failed before stop


# ----------------------------------------------------------------------------------------------------------------
# The emulated aarch64 board, end to end


@pytest.mark.board
@pytest.mark.shared_cache
def test_vit_rasp4_build_deploy_check_on_the_emulated_board(tmp_path, capsys) -> None:
    for tool in ("qemu-aarch64", "aarch64-linux-gnu-gcc", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: run deploy/install-host-tools.sh")
    if os.environ.get("EDGEQ_SKIP_BOARD_TESTS"):
        pytest.skip("EDGEQ_SKIP_BOARD_TESTS is set")
    from conftest import CIFAR_VAL
    from edgeq.compile.build import BuildConfig, build_artifact

    artifact = build_artifact(BuildConfig(target="rasp4", bits="w8a8", eval_limit=0), tmp_path / "vit-rasp4")
    code, out, err = run_cli(["board", "start", "--emulated"], capsys)
    assert code == 0, err
    address = out.split("use: --rpc ")[1].split()[0]
    try:
        code, out, err = run_cli(["deploy", str(artifact), "--rpc", address], capsys)
        assert code == 0, out + err
        assert "emulated under qemu" in out and "8/8 outputs match, bit-exact" in out
        report = tmp_path / "check.json"
        code, out, err = run_cli(["check", str(artifact), "--data", str(CIFAR_VAL), "--limit", "10", "--rpc", address,
                                  "--output", str(report)], capsys)
        assert code == 0, out + err
        result = json.loads(report.read_text())
        assert result["agreement"] == "exact" and result["images"] == 10 and result["emulated"]
        assert result["device_top1"] == result["host_top1"]
        # W4A4: the Cortex-A72 kernels accumulate in int16 lanes (arm_neon_s16) and must still match the host
        narrow = build_artifact(BuildConfig(target="rasp4", bits="w4a4", eval_limit=0), tmp_path / "vit-rasp4-w4a4")
        code, out, err = run_cli(["deploy", str(narrow), "--rpc", address], capsys)
        assert code == 0, out + err
        assert "8/8 outputs match, bit-exact" in out
        assert b"edgeq_qlinear_arm_neon_s16_" in (narrow / "model.so").read_bytes()
    finally:
        code, out, _ = run_cli(["board", "stop", "--port", address.rsplit(":", 1)[1]], capsys)
    assert code == 0 and out.startswith("stopped emulated board")



# ----------------------------------------------------------------------------------------------------------------
# Lifecycle: the process group, not the one pid; busy ports; exposed hosts


def test_killing_only_the_reported_server_leaves_a_board_that_status_sees_and_stop_ends(capsys) -> None:
    import signal

    import psutil

    handle = start_rpc_server(env=RUNTIME_ONLY)
    try:
        board = background.record(handle, "emulated")
        workers = psutil.Process(board.pid).children(recursive=True)
        assert workers
        os.kill(board.pid, signal.SIGKILL)  # what a user does with the pid status used to print
        handle.process.wait(10)
        assert board.alive(), "its worker still runs"
        code, out, _ = run_cli(["board", "status"], capsys)
        assert code == 0 and f"process group {board.pid}" in out and "not running" not in out
        code, out, _ = run_cli(["board", "stop"], capsys)
        assert code == 0 and out.startswith("stopped emulated board")
        assert not any(w.is_running() and w.status() != "zombie" for w in workers)
        assert not background.group_members(board.pid, board.started_at)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(handle.process.pid, 9)


def test_board_start_on_a_busy_port_is_one_line(capsys) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = run_cli(["board", "start", "--emulated", "--port", str(port)], capsys)
    assert code == 70 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("edgeq: error: port ") and "already in use" in err


def test_board_start_on_a_non_loopback_host_warns_about_uploaded_code(capsys, monkeypatch) -> None:
    from edgeq.errors import RemoteRunError

    def not_started(*args, **kwargs):
        raise RemoteRunError("stopped here by the test")

    monkeypatch.setattr(background, "start_emulated_in_background", not_started)
    _, _, err = run_cli(["board", "start", "--emulated", "--host", "0.0.0.0"], capsys)
    assert "warning: --host 0.0.0.0" in err and "runs whatever code it is sent" in err
    _, _, err = run_cli(["board", "start", "--emulated", "--host", "127.0.0.1"], capsys)
    assert "warning" not in err
