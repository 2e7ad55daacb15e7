"""RPC addresses, unreachable boards, sessions with a local x86 RPC server and a tracker, and the emulated
aarch64 board (``-m board``; a few minutes under emulation, the sysroot is built once into the user's cache)."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from edgeq.compile.library import export_for_target
from edgeq.errors import EdgeqError
from edgeq.errors import (
    ArtifactTargetMismatchError,
    RemoteRunError,
    RemoteUnreachableError,
    TargetError,
    ToolchainMissingError,
)
from edgeq.boards.local import free_port, start_rpc_server, start_tracker
from edgeq.boards.session import DEFAULT_TRACKER_PORT, connect, parse_hostport, resolve_address
from test_targets import tiny_relax_module

# x86 servers that only load TVM's runtime library start several times faster, like a runtime-only board
RUNTIME_ONLY = dict(os.environ, TVM_USE_RUNTIME_LIB="1")


def test_error_classes_and_codes() -> None:
    codes = {TargetError: 60, ToolchainMissingError: 61, RemoteUnreachableError: 70, RemoteRunError: 71,
             ArtifactTargetMismatchError: 72}
    for cls, code in codes.items():
        assert issubclass(cls, EdgeqError) and cls.exit_code == code and cls.__doc__


# ----------------------------------------------------------------------------------------------------------------
# Where the board is


def test_direct_address() -> None:
    address = resolve_address(rpc="10.0.0.7:9090", env={})
    assert (address.host, address.port, address.via_tracker) == ("10.0.0.7", 9090, False)
    assert parse_hostport("[::1]:9091") == ("::1", 9091)


def test_tracker_address_defaults_to_port_9190_and_the_target_key() -> None:
    address = resolve_address(tracker="lab-host", default_key="rasp4", env={})
    assert (address.host, address.port, address.key, address.via_tracker) == ("lab-host", DEFAULT_TRACKER_PORT, "rasp4", True)
    assert resolve_address(tracker="lab-host:9000", key="pi-7", default_key="rasp4", env={}).key == "pi-7"


def test_tracker_from_environment() -> None:
    env = {"TVM_TRACKER_HOST": "10.1.1.1", "TVM_TRACKER_PORT": "9195", "TVM_TRACKER_KEY": "rasp4"}
    address = resolve_address(env=env)
    assert (address.host, address.port, address.key, address.via_tracker) == ("10.1.1.1", 9195, "rasp4", True)
    assert resolve_address(env={"TVM_TRACKER_HOST": "h", "TVM_TRACKER_KEY": "k"}).port == 9190
    assert resolve_address(rpc="127.0.0.1:9090", env=env).via_tracker is False  # --rpc wins over the environment


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "TVM_TRACKER_HOST"),
        ({"tracker": "lab-host"}, "needs the key"),
        ({"rpc": "a:1", "tracker": "b:2"}, "not both"),
        ({"rpc": "lab-host"}, "needs a port"),
        ({"rpc": "lab-host:http"}, "not a number"),
        ({"rpc": "lab-host:70000"}, "out of range"),
    ],
)
def test_bad_addresses(kwargs: dict, message: str) -> None:
    with pytest.raises(RemoteUnreachableError, match=message) as caught:
        resolve_address(env={}, **kwargs)
    assert caught.value.exit_code == 70


def test_unreachable_rpc_server_is_exit_code_70() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RemoteUnreachableError) as caught:
        connect(rpc=f"127.0.0.1:{port}", env={})
    assert caught.value.exit_code == 70
    assert f"127.0.0.1:{port}" in str(caught.value) and "refused" in str(caught.value)
    assert "`edgeq board start --emulated`" in str(caught.value)  # a board-less user is told what to do
    assert time.monotonic() - started < 15


def test_unreachable_tracker_is_exit_code_70() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RemoteUnreachableError, match="RPC tracker"):
        connect(env={"TVM_TRACKER_HOST": "127.0.0.1", "TVM_TRACKER_PORT": str(port), "TVM_TRACKER_KEY": "rasp4"})
    assert time.monotonic() - started < 15


# ----------------------------------------------------------------------------------------------------------------
# A local x86 RPC server as the board


@pytest.fixture(scope="module")
def libraries(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny model built for this machine and for rasp4, with its weights."""
    folder = tmp_path_factory.mktemp("libs")
    mod, weight, bias = tiny_relax_module(seed=7)
    libs = {"host": export_for_target(mod, "host", folder / "host.so"), "weight": weight, "bias": bias}
    if shutil.which("aarch64-linux-gnu-gcc"):
        libs["rasp4"] = export_for_target(mod, "rasp4", folder / "rasp4.so")
    return libs


@pytest.fixture(scope="module")
def x86_board():
    board = start_rpc_server(env=RUNTIME_ONLY)
    yield board
    board.stop()


def test_session_runs_a_library_on_the_x86_board(x86_board, libraries) -> None:
    x = np.random.default_rng(0).standard_normal((4, 8)).astype("float32")
    with connect(rpc=x86_board.address, env={}) as session:
        info = session.info()
        assert info.arch == "x86_64" and info.method == "server-executable" and info.has_device("cpu")
        vm = session.vm(libraries["host"], target="host")
        got = session.run(vm, "main", session.tensor(x)).numpy()
        np.testing.assert_allclose(got, x @ libraries["weight"] + libraries["bias"], rtol=1e-5, atol=1e-5)
        seconds = session.time(vm, "main", session.tensor(x), number=5, repeat=2)
        assert len(seconds) == 2 and all(0 < s < 1 for s in seconds)


def test_library_for_another_architecture_is_refused(x86_board, libraries) -> None:
    if "rasp4" not in libraries:
        pytest.skip("aarch64-linux-gnu-gcc missing")
    with connect(rpc=x86_board.address, env={}) as session:
        with pytest.raises(ArtifactTargetMismatchError) as caught:
            session.load_module(libraries["rasp4"])
        assert caught.value.exit_code == 72 and "aarch64" in str(caught.value) and "x86_64" in str(caught.value)
        with pytest.raises(ArtifactTargetMismatchError, match="no cuda device"):
            session.check_library(libraries["host"], target='{"kind": "cuda", "arch": "sm_80"}')


def test_probe_libraries_find_the_architecture(x86_board) -> None:
    with connect(rpc=x86_board.address, env={}) as session:
        assert session.probe().arch == "x86_64"


def test_board_dying_mid_session_is_exit_code_71(libraries) -> None:
    board = start_rpc_server(env=RUNTIME_ONLY)
    try:
        session = connect(rpc=board.address, env={})
        vm = session.vm(libraries["host"], target="host")
        x = session.tensor(np.zeros((4, 8), "float32"))
    finally:
        board.stop()
    assert not board.alive()
    with pytest.raises(RemoteRunError) as caught:
        session.run(vm, "main", x)
    assert caught.value.exit_code == 71 and board.address in str(caught.value)


def test_through_a_tracker_with_a_key(libraries, monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = start_tracker()
    board = None
    try:
        board = start_rpc_server(tracker=tracker.address, key="edgeq-test-x86", env=RUNTIME_ONLY)
        with board.connect() as session:
            assert session.address.via_tracker and session.info().arch == "x86_64"
        monkeypatch.setenv("TVM_TRACKER_HOST", tracker.host)
        monkeypatch.setenv("TVM_TRACKER_PORT", str(tracker.port))
        monkeypatch.setenv("TVM_TRACKER_KEY", "edgeq-test-x86")
        with connect() as session:
            x = np.ones((4, 8), "float32")
            got = session.run(session.vm(libraries["host"]), "main", session.tensor(x)).numpy()
            np.testing.assert_allclose(got, x @ libraries["weight"] + libraries["bias"], rtol=1e-5, atol=1e-5)
        with pytest.raises(RemoteUnreachableError, match="registered keys: edgeq-test-x86"):
            connect(tracker=tracker.address, key="rasp4")
    finally:
        if board is not None:
            board.stop()
        tracker.stop()
    assert not tracker.alive() and not board.alive()


# ----------------------------------------------------------------------------------------------------------------
# The emulated aarch64 board


def _board_cache() -> Path:
    # the sysroot is large (about 450 MB) and slow to build: keep it in the user's cache, not in a test folder
    return Path(os.environ.get("EDGEQ_EMULATED_BOARD_DIR", Path.home() / ".cache" / "edgeq" / "emulated-board"))


@pytest.fixture(scope="module")
def emulated_board():
    for tool in ("qemu-aarch64", "aarch64-linux-gnu-gcc", "apt-get", "dpkg"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing: run deploy/install-host-tools.sh")
    if os.environ.get("EDGEQ_SKIP_BOARD_TESTS"):
        pytest.skip("EDGEQ_SKIP_BOARD_TESTS is set")
    from edgeq.boards.emulated import start_emulated_board

    board = start_emulated_board(cache_dir=_board_cache())
    yield board
    board.stop()


@pytest.mark.board
@pytest.mark.shared_cache
def test_emulated_board_agrees_with_the_x86_build(emulated_board, libraries) -> None:
    x = np.random.default_rng(11).standard_normal((4, 8)).astype("float32")
    import tvm
    from tvm import relax

    local = relax.VirtualMachine(tvm.runtime.load_module(str(libraries["host"])), tvm.cpu())
    expected = local["main"](tvm.runtime.tensor(x)).numpy()
    with emulated_board.connect() as session:
        info = session.info()
        assert info.arch == "aarch64" and info.bits == 64
        vm = session.vm(libraries["rasp4"], target="rasp4")
        got = session.run(vm, "main", session.tensor(x)).numpy()
    assert np.abs(got - expected).max() <= 1e-6


@pytest.mark.board
@pytest.mark.shared_cache
def test_emulated_board_refuses_x86_libraries(emulated_board, libraries) -> None:
    with emulated_board.connect() as session:
        with pytest.raises(ArtifactTargetMismatchError, match="x86-64"):
            session.load_module(libraries["host"])
        with pytest.raises(ArtifactTargetMismatchError, match="no cuda device"):
            session.check_library(libraries["rasp4"], target="jetson-orin-nano")


@pytest.mark.board
@pytest.mark.shared_cache
def test_emulated_board_through_a_tracker(emulated_board, libraries) -> None:
    from edgeq.boards.emulated import start_emulated_board

    tracker = start_tracker()
    board = None
    try:
        board = start_emulated_board(tracker=tracker.address, key="rasp4", cache_dir=_board_cache())
        assert board.host == "127.0.0.1"
        with connect(tracker=tracker.address, target="rasp4", env={}) as session:  # the key comes from rasp4.yaml
            x = np.ones((4, 8), "float32")
            got = session.run(session.vm(libraries["rasp4"], target="rasp4"), "main", session.tensor(x)).numpy()
        np.testing.assert_allclose(got, x @ libraries["weight"] + libraries["bias"], rtol=1e-5, atol=1e-5)
    finally:
        if board is not None:
            board.stop()
        tracker.stop()
