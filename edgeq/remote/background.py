"""Boards left running in the background by ``edgeq board start``, found again by ``board status`` and ``stop``.

A started board's RPC server leads its own process session and is detached from the command that started it, so
it outlives that command. What is needed to find and stop it again (server pid and start time, address, key,
tracker, work folder) is kept in one JSON state file per board under ``<edgeq cache>/boards/`` (``$EDGEQ_CACHE``
moves it). Stopping ends the server together with its popen worker (killing only the server leaves the worker).
"""
from __future__ import annotations

import contextlib
import json
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from edgeq.errors import RemoteUnreachableError
from edgeq.fileio import atomic_write_json
from edgeq.remote.local import BoardHandle, process_started_at, stop_process_group


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
        started = process_started_at(self.pid)
        return started is not None and abs(started - self.started_at) <= 1.0 and _pid_running(self.pid)

    def listening(self, timeout: float = 2.0) -> bool:
        with contextlib.suppress(OSError):
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return True
        return False

    def describe(self) -> str:
        via = f", registered at tracker {self.tracker} under key {self.key!r}" if self.tracker else ""
        return f"{self.kind} board {self.name} on {self.address} (pid {self.pid}{via})"


def _pid_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


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
    log=None,
) -> BackgroundBoard:
    """Start the emulated aarch64 board detached from this process (see :func:`start_emulated_board`)."""
    from edgeq.remote.emulated import DEFAULT_KEY, start_emulated_board

    if port is not None:
        for board in list_boards():
            if board.port == port and board.alive():
                raise RemoteUnreachableError(f"{board.describe()} already serves on port {port}: edgeq board stop")
    kwargs = {"log": log} if log is not None else {}
    handle = start_emulated_board(port, tracker, key or DEFAULT_KEY, host=host, **kwargs)
    return record(handle, "emulated")


def list_boards() -> list[BackgroundBoard]:
    """Every recorded board, running or not (see :meth:`BackgroundBoard.alive`), by port."""
    boards = []
    folder = state_dir()
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with contextlib.suppress(OSError, ValueError, TypeError):
            boards.append(BackgroundBoard(**json.loads(path.read_text())))
    return sorted(boards, key=lambda b: b.port)


def stop_board(board: BackgroundBoard) -> bool:
    """Stop a recorded board (server, popen worker, sessions), remove its work folder and state file.

    Returns whether it was still running."""
    was_running = board.alive() and stop_process_group(board.pid, board.started_at)
    if Path(board.workdir).is_dir() and "edgeq" in board.workdir:  # only folders edgeq made for the board
        shutil.rmtree(board.workdir, ignore_errors=True)
    board.state_file.unlink(missing_ok=True)
    return was_running


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
