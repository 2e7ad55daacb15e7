"""Bounded waits on boards: a listener that accepts and never answers, and a board that stops answering mid-run,
end in exit 70 / 71 within the configured time (127.0.0.1 only, seconds per test)."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from cli_runner import run_cli
from edgeq.errors import RemoteRunError, RemoteUnreachableError
from edgeq.boards.local import start_rpc_server
from edgeq.boards.session import connect
from test_artifact import make_artifact
from test_remote import RUNTIME_ONLY, libraries  # noqa: F401 - fixture


@contextlib.contextmanager
def silent_listener() -> Iterator[str]:
    """127.0.0.1:PORT accepting connections and never sending a byte (a wedged board or a wrong service)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def test_deploy_to_a_silent_listener_is_exit_70_within_the_connect_timeout(capsys, tmp_path, monkeypatch) -> None:
    artifact = make_artifact(tmp_path / "art")
    monkeypatch.delenv("EDGEQ_RPC_CONNECT_TIMEOUT", raising=False)
    with silent_listener() as address:
        started = time.monotonic()
        code, _, err = run_cli(capsys, "deploy", str(artifact), "--rpc", address, "--rpc-connect-timeout", "1.5")
        elapsed = time.monotonic() - started
    os.environ.pop("EDGEQ_RPC_CONNECT_TIMEOUT", None)  # set by the option for this process
    assert code == RemoteUnreachableError.exit_code == 70
    assert len(err.strip().splitlines()) == 1 and "did not answer the RPC handshake within 1.5 s" in err
    assert 1.0 < elapsed < 10


def test_connect_timeout_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("EDGEQ_RPC_CONNECT_TIMEOUT", "1")
    with silent_listener() as address:
        started = time.monotonic()
        with pytest.raises(RemoteUnreachableError, match="within 1 s"):
            connect(rpc=address, env={})
    assert time.monotonic() - started < 8


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf"])
def test_a_bad_timeout_setting_is_refused(monkeypatch, value) -> None:
    monkeypatch.setenv("EDGEQ_RPC_CONNECT_TIMEOUT", value)
    with pytest.raises(RemoteUnreachableError, match="not a positive number"):
        connect(rpc="127.0.0.1:9", env={})


def test_a_board_that_stops_answering_mid_run_is_exit_71_within_the_call_timeout(libraries, monkeypatch) -> None:
    board = start_rpc_server(env=RUNTIME_ONLY)
    try:
        session = connect(rpc=board.address, env={})
        vm = session.vm(libraries["host"], target="host")
        x = session.tensor(np.zeros((4, 8), "float32"))
        os.killpg(board.process.pid, signal.SIGSTOP)  # server and worker alive, answering nothing
        monkeypatch.setenv("EDGEQ_RPC_TIMEOUT", "1.5")
        started = time.monotonic()
        with pytest.raises(RemoteRunError) as caught:
            session.run(vm, "main", x)
        elapsed = time.monotonic() - started
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(board.process.pid, signal.SIGCONT)
        board.stop()
    assert caught.value.exit_code == 71 and "no answer within 1.5 s" in str(caught.value)
    assert 1.0 < elapsed < 10


def test_no_board_at_all_suggests_the_emulated_one(capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("EDGEQ_CACHE", str(tmp_path / "cache"))  # no board recorded
    for variable in ("TVM_TRACKER_HOST", "TVM_TRACKER_PORT", "TVM_TRACKER_KEY"):
        monkeypatch.delenv(variable, raising=False)
    code, _, err = run_cli(capsys, "deploy", str(make_artifact(tmp_path / "art")))
    assert code == 70 and "edgeq board start --emulated" in err and len(err.strip().splitlines()) == 1


def test_a_silent_tracker_is_exit_70_within_the_connect_timeout(monkeypatch) -> None:
    monkeypatch.setenv("EDGEQ_RPC_CONNECT_TIMEOUT", "1")
    with silent_listener() as address:
        started = time.monotonic()
        with pytest.raises(RemoteUnreachableError) as caught:
            connect(tracker=address, key="rasp4", env={})
    assert caught.value.exit_code == 70 and time.monotonic() - started < 8
