"""Boards left running in the background by ``edgeq board start``, found again by ``board status`` and ``stop``.

A started board's RPC server leads its own process session and is detached from the command that started it, so
it outlives that command. What is needed to find and stop it again (server pid and start time, address, key,
tracker, work folder) is kept in one JSON state file per board under ``<edgeq cache>/boards/`` (``$EDGEQ_CACHE``
moves it). Stopping ends the server together with its popen worker (killing only the server leaves the worker).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeq.errors import RemoteUnreachableError
from edgeq.fileio import atomic_write_json
from edgeq.boards.local import BoardHandle, _any_alive, process_started_at, stop_process_group


def state_dir() -> Path:
    from edgeq.data.archive import cache_root

    return cache_root() / "boards"


@dataclass(frozen=True)
class BackgroundBoard:
    """A board started in the background: where it serves and how to stop it."""

    name: str  # "emulated-<port>"
    kind: str  # "emulated" (real boards run deploy/board-setup.sh themselves)
    host: str
    port: int
    pid: int  # the RPC server, leader of its own process group
    started_at: float  # the server's process start time (guards against a reused pid)
    key: str
    tracker: str | None
    workdir: str
    log: str
    start_seconds: float

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def state_file(self) -> Path:
        return state_dir() / f"{self.name}.json"

    def alive(self) -> bool:
        """Whether any process of the board's process group still runs: the server, or a worker it left after
        the server alone was killed (it may still serve the port)."""
        return bool(group_members(self.pid, self.started_at))

    def listening(self, timeout: float = 2.0) -> bool:
        with contextlib.suppress(OSError):
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        return False

    def describe(self) -> str:
        via = f", registered at tracker {self.tracker} under key {self.key!r}" if self.tracker else ""
        return f"{self.kind} board {self.name} on {self.address} (process group {self.pid}{via})"


def group_members(pgid: int, not_before: float) -> list[int]:
    """Running processes (not zombies) of process group ``pgid`` started no earlier than ``not_before`` (a
    group id reused by a later, unrelated process group is not the board's)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[-1].split()
            if int(fields[2]) != pgid or fields[0] in ("Z", "X"):
                continue
            pid = int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
        started = process_started_at(pid)
        if started is not None and started >= not_before - 1.0:
            members.append(pid)
    return members


def record(handle: BoardHandle, kind: str = "emulated") -> BackgroundBoard:
    """Detach a started board from this process and write its state file; returns what was recorded."""
    started = process_started_at(handle.process.pid)
    board = BackgroundBoard(
        name=f"{kind}-{handle.port}", kind=kind, host=handle.host, port=handle.port, pid=handle.process.pid,
        started_at=started or time.time(), key=handle.key,
        tracker=f"{handle.tracker[0]}:{handle.tracker[1]}" if handle.tracker else None,
        workdir=str(handle.workdir), log=str(handle.log_path), start_seconds=handle.start_seconds,
    )
    handle.detach()
    atomic_write_json(board.state_file, asdict(board))
    return board


def start_emulated_in_background(
    port: int | None = None, tracker: str | None = None, key: str | None = None, *, host: str = "127.0.0.1",
    log=None, cpu: str | None = None,
) -> BackgroundBoard:
    """Start the emulated aarch64 board detached from this process (see :func:`start_emulated_board`; ``cpu``:
    qemu's CPU model, default the Pi 4's Cortex-A72)."""
    from edgeq.boards.emulated import DEFAULT_CPU, DEFAULT_KEY, start_emulated_board

    if port is not None:
        for board in list_boards():
            if board.port == port and board.alive():
                raise RemoteUnreachableError(f"{board.describe()} already serves on port {port}: edgeq board stop")
        if not port_is_free(host, port):
            raise RemoteUnreachableError(f"port {port} on {host} is already in use by another program; choose "
                                         "another --port or leave it out (a free one is picked)")
    kwargs = {"log": log} if log is not None else {}
    handle = start_emulated_board(port, tracker, key or DEFAULT_KEY, host=host, cpu=cpu or DEFAULT_CPU, **kwargs)
    return record(handle, "emulated")


def list_boards() -> list[BackgroundBoard]:
    """Every recorded board, running or not (see :meth:`BackgroundBoard.alive`), by port."""
    boards = []
    folder = state_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, TypeError):
            boards.append(BackgroundBoard(**json.loads(path.read_text())))
    return sorted(boards, key=lambda b: b.port)


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def stop_board(board: BackgroundBoard) -> bool:
    """Stop a recorded board (server, popen worker, sessions), remove its work folder and state file; the whole
    process group goes, even when its leader was killed on its own before.

    Returns whether anything of it was still running."""
    members = group_members(board.pid, board.started_at)
    if members:
        stop_process_group(board.pid, board.started_at)  # the server and its children, when the server still runs
        _end_group(board.pid, members)  # what is left of the group when it did not
    was_running = bool(members)
    if Path(board.workdir).is_dir() and "edgeq" in board.workdir:  # only folders edgeq made for the board
        shutil.rmtree(board.workdir, ignore_errors=True)
    board.state_file.unlink(missing_ok=True)
    return was_running


def _end_group(pgid: int, pids: list[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL, to a process group until none of ``pids`` runs."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _any_alive(pids):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _any_alive(pids):
            time.sleep(0.2)


def select_boards(port: int | None = None) -> list[BackgroundBoard]:
    """The recorded boards to act on: the one on ``port``, else all of them."""
    boards = list_boards()
    if port is None:
        return boards
    chosen = [b for b in boards if b.port == port]
    if not chosen:
        ports = ", ".join(str(b.port) for b in boards) or "none"
        raise RemoteUnreachableError(f"no board started by edgeq serves on port {port} (recorded ports: {ports})")
    return chosen
