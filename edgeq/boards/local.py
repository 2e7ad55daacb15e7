"""RPC servers and trackers run as local processes, on loopback unless asked otherwise.

:func:`start_rpc_server` runs ``python -m tvm.exec.rpc_server`` with any Python (this machine's for a local x86
"board", the emulated aarch64 one from :mod:`edgeq.boards.emulated`) and :func:`start_tracker` runs
``python -m tvm.exec.rpc_tracker``. Each process starts in its own session, so ``stop()`` ends it together with
the RPC server's popen worker and any session process it forked. Handles still running when the interpreter
exits are stopped then.
"""
from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeq.errors import RemoteRunError, RemoteUnreachableError


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def parse_tracker(value: str | tuple[str, int]) -> tuple[str, int]:
    from edgeq.boards.session import DEFAULT_TRACKER_PORT, parse_hostport

    if isinstance(value, tuple):
        return value[0], int(value[1])
    return parse_hostport(value, DEFAULT_TRACKER_PORT, what="tracker")


@dataclass
class ProcessHandle:
    """A server process started by this module."""

    host: str
    port: int
    process: subprocess.Popen
    log_path: Path
    workdir: Path
    start_seconds: float = 0.0
    owns_workdir: bool = True
    _stopped: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """End the process and everything it started; safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        kill_process_tree(self.process, timeout)
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        with contextlib.suppress(ValueError):
            _RUNNING.remove(self)

    def detach(self) -> None:
        """Let the process outlive this interpreter (no stop at exit); stop it later with :func:`stop_process_group`."""
        self._stopped = True
        with contextlib.suppress(ValueError):
            _RUNNING.remove(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class BoardHandle(ProcessHandle):
    """A running RPC server ("board"): connect with ``handle.connect()``."""

    key: str = ""
    tracker: tuple[str, int] | None = None

    def connect(self, **kwargs):
        """An :class:`edgeq.boards.session.BoardSession` with this board (through its tracker when it has one)."""
        from edgeq.boards.session import connect

        if self.tracker:
            return connect(tracker=f"{self.tracker[0]}:{self.tracker[1]}", key=self.key, **kwargs)
        return connect(rpc=self.address, **kwargs)


@dataclass
class TrackerHandle(ProcessHandle):
    """A running ``tvm.exec.rpc_tracker``."""


_RUNNING: list[ProcessHandle] = []


@atexit.register
def _stop_all() -> None:
    for handle in list(_RUNNING):
        with contextlib.suppress(Exception):
            handle.stop()


def kill_process_tree(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop a process started with ``start_new_session=True``, its children and their children."""
    pids: list[int] = []
    with contextlib.suppress(Exception):
        import psutil

        pids = [c.pid for c in psutil.Process(process.pid).children(recursive=True)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # the process leads its own group: signal the group, and the children seen above in case one left it
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None and not _any_alive(pids):
                return
            time.sleep(0.2)


def process_started_at(pid: int) -> float | None:
    """When a process started (seconds since the epoch), to tell it from a later one reusing its pid; None if gone."""
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def stop_process_group(pid: int, started_at: float | None = None, timeout: float = 10.0) -> bool:
    """Stop a detached process that leads its own session (see :meth:`ProcessHandle.detach`), with everything it
    started (the RPC server's popen worker included). ``started_at`` guards against a reused pid. Returns whether
    anything was running."""
    now_started = process_started_at(pid)
    if now_started is None or (started_at is not None and abs(now_started - started_at) > 1.0):
        return False
    import psutil

    pids = [pid]
    with contextlib.suppress(Exception):
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        for each in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(each, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _any_alive(pids):
                return True
            time.sleep(0.2)
    return True


def _any_alive(pids: list[int]) -> bool:
    """Whether any of these processes still runs (zombies waiting for a parent that is gone do not count)."""
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            return True
    return False


def _spawn(cmd: list[str], env: dict, workdir: Path) -> tuple[subprocess.Popen, Path]:
    log_path = workdir / "server.log"
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, env=env,
            start_new_session=True,
        )
    return process, log_path


def _workdir(workdir: str | os.PathLike | None, prefix: str) -> tuple[Path, bool]:
    if workdir is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    path = Path(workdir)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path, True


def start_rpc_server(
    python: str | os.PathLike | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    tracker: str | tuple[str, int] | None = None,
    key: str = "",
    env: dict | None = None,
    workdir: str | os.PathLike | None = None,
    timeout: float = 120.0,
) -> BoardHandle:
    """Run ``PYTHON -m tvm.exec.rpc_server`` bound to ``host:port`` and wait until it serves.

    ``python`` defaults to this interpreter. With ``tracker`` the server registers there under ``key`` and the
    call returns once the tracker lists it; without one the key is not used (any client may connect). The
    server's uploads go to ``workdir`` (a new temporary folder by default), removed by ``stop()``. Raises
    :class:`RemoteRunError` when the server exits or is not serving within ``timeout`` seconds.
    """
    python = os.fspath(python) if python else sys.executable
    port = port or free_port(host)
    tracker_addr = parse_tracker(tracker) if tracker else None
    if tracker_addr and not key:
        raise RemoteUnreachableError("a server registering with a tracker needs a key")
    folder, owned = _workdir(workdir, "edgeq-rpc-")
    cmd = [python, "-m", "tvm.exec.rpc_server", "--host", host, "--port", str(port), "--port-end", str(port + 1)]
    if tracker_addr:
        # the key only means something to a tracker; a server without one takes any direct client
        cmd += ["--tracker", f"{tracker_addr[0]}:{tracker_addr[1]}", "--custom-addr", host, "--key", key]
    run_env = dict(os.environ if env is None else env)
    run_env.setdefault("TMPDIR", str(folder))
    run_env["PYTHONUNBUFFERED"] = "1"
    started = time.monotonic()
    process, log_path = _spawn(cmd, run_env, folder)
    handle = BoardHandle(host=host, port=port, process=process, log_path=log_path, workdir=folder,
                         owns_workdir=owned, key=key, tracker=tracker_addr)
    _RUNNING.append(handle)
    bound = re.compile(rf"bind to {re.escape(host)}:{port}\b")
    try:
        while True:
            if not handle.alive():
                raise RemoteRunError(
                    f"the RPC server exited (code {process.returncode}) before serving; log {log_path}:\n"
                    f"{handle.log_tail()}"
                )
            text = log_path.read_text(errors="replace")
            if bound.search(text) and (tracker_addr is None or _tracker_lists(tracker_addr, key)):
                break
            if time.monotonic() - started > timeout:
                raise RemoteRunError(
                    f"the RPC server did not serve within {timeout:.0f} s; log {log_path}:\n{handle.log_tail()}"
                )
            time.sleep(0.5)
    except BaseException:
        handle.stop()
        raise
    handle.start_seconds = round(time.monotonic() - started, 1)
    return handle


def _tracker_lists(tracker: tuple[str, int], key: str) -> bool:
    from edgeq.boards.session import tracker_keys

    try:
        return key in tracker_keys(*tracker, timeout=5.0)
    except RemoteUnreachableError:
        return False


def start_tracker(host: str = "127.0.0.1", port: int | None = None, *, timeout: float = 60.0) -> TrackerHandle:
    """Run ``python -m tvm.exec.rpc_tracker`` on ``host:port`` (a free port by default) and wait until it answers."""
    from edgeq.boards.session import tracker_summary

    port = port or free_port(host)
    folder, owned = _workdir(None, "edgeq-tracker-")
    cmd = [sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", host, "--port", str(port),
           "--port-end", str(port + 1)]
    started = time.monotonic()
    # the tracker needs no compiler: the runtime library alone starts it several times faster
    process, log_path = _spawn(cmd, dict(os.environ, PYTHONUNBUFFERED="1", TVM_USE_RUNTIME_LIB="1"), folder)
    handle = TrackerHandle(host=host, port=port, process=process, log_path=log_path, workdir=folder,
                           owns_workdir=owned)
    _RUNNING.append(handle)
    try:
        while True:
            if not handle.alive():
                raise RemoteRunError(f"the RPC tracker exited before serving:\n{handle.log_tail()}")
            if f"bind to {host}:{port}" in log_path.read_text(errors="replace"):
                with contextlib.suppress(RemoteUnreachableError):
                    tracker_summary(host, port, timeout=5.0)
                    break
            if time.monotonic() - started > timeout:
                raise RemoteRunError(f"the RPC tracker did not answer within {timeout:.0f} s:\n{handle.log_tail()}")
            time.sleep(0.3)
    except BaseException:
        handle.stop()
        raise
    handle.start_seconds = round(time.monotonic() - started, 1)
    return handle
