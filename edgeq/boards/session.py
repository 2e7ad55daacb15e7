"""Sessions with a board over TVM RPC: connect, upload a library, run it in a Relax VM, ask what the board is.

Where the board is comes from ``--rpc HOST:PORT`` (straight to its RPC server) or ``--rpc-tracker HOST[:PORT]``
with ``--rpc-key KEY`` (through a ``tvm.exec.rpc_tracker``; the port defaults to 9190). Without either, the
environment variables ``TVM_TRACKER_HOST``, ``TVM_TRACKER_PORT`` and ``TVM_TRACKER_KEY`` name a tracker.

Failures are told apart: nothing answering is :class:`RemoteUnreachableError` (70), a board that answered and
then died or dropped the session is :class:`RemoteRunError` (71), and a library built for another architecture or
device than the board has is :class:`ArtifactTargetMismatchError` (72).

Every wait is bounded. Reaching a board and its RPC handshake must finish within ``EDGEQ_RPC_CONNECT_TIMEOUT``
seconds (default 30; ``--rpc-connect-timeout``), else 70; each upload, module load, run or timing within
``EDGEQ_RPC_TIMEOUT`` seconds (default 600; ``--rpc-timeout``), else 71. TVM's client blocks in ``recv`` with no
timeout of its own, so a watchdog shuts this process's socket to the board down when the time is up, which makes
the blocked call return with an error.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

from edgeq.errors import ArtifactTargetMismatchError, RemoteRunError, RemoteUnreachableError
from edgeq.interrupt import raise_if_interrupted
from edgeq.compile.targets import ElfInfo, TargetSpec, elf_info, load_target

DEFAULT_TRACKER_PORT = 9190
#: A file in the emulated board's sysroot that the guest sees at this absolute path (qemu looks under
#: QEMU_LD_PREFIX first): how a session tells the emulated board from a real one.
EMULATION_MARKER = "/etc/edgeq-emulated-board"

#: Seconds to reach a board and finish the RPC handshake, unless ``EDGEQ_RPC_CONNECT_TIMEOUT`` says otherwise.
DEFAULT_CONNECT_TIMEOUT = 30.0
#: Seconds one upload, load, run or timing on a board may take, unless ``EDGEQ_RPC_TIMEOUT`` says otherwise
#: (a W8A8 ViT timed 10 times under qemu takes about 15 s; a real board is faster).
DEFAULT_CALL_TIMEOUT = 600.0
CONNECT_TIMEOUT_ENV = "EDGEQ_RPC_CONNECT_TIMEOUT"
CALL_TIMEOUT_ENV = "EDGEQ_RPC_TIMEOUT"


def timeout_from_env(variable: str, default: float) -> float:
    """Seconds from ``variable`` (a positive number), else ``default``."""
    text = os.environ.get(variable, "").strip()
    if not text:
        return default
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise RemoteUnreachableError(f"{variable}={text!r} is not a positive number of seconds")
    return seconds


class Watchdog:
    """Shuts down this process's TCP connections to ``server`` once ``seconds`` pass: a TVM call blocked on a
    silent board then returns with an error, and :attr:`fired` tells that error apart from others."""

    def __init__(self, server: tuple[str, int], seconds: float):
        self.seconds = seconds
        self.fired = False
        self._server = server
        self._timer = threading.Timer(seconds, self._cut)
        self._timer.daemon = True

    def _cut(self) -> None:
        import psutil

        self.fired = True
        host, port = self._server
        try:  # resolved only now: most calls finish in time and need no lookup
            peers = {(info[4][0], port) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)}
        except OSError:
            peers = {(host, port)}
        for conn in psutil.Process().net_connections("tcp"):
            if conn.raddr and (conn.raddr.ip, conn.raddr.port) in peers and conn.fd >= 0:
                with contextlib.suppress(OSError):
                    with socket.socket(fileno=os.dup(conn.fd)) as sock:  # the dup is closed, the socket shut
                        sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> "Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


@dataclass(frozen=True)
class RemoteAddress:
    """Where a board is: its RPC server itself, or a tracker and the key the board registered under."""

    host: str
    port: int
    key: str = ""
    via_tracker: bool = False

    def describe(self) -> str:
        if self.via_tracker:
            return f"tracker {self.host}:{self.port} (key {self.key!r})"
        return f"RPC server {self.host}:{self.port}"


def parse_hostport(text: str, default_port: int | None = None, *, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as a tuple; ``HOST`` alone takes ``default_port``."""
    text = text.strip()
    host, port_text = text, ""
    if text.startswith("["):
        end = text.find("]")
        host, rest = text[1:end], text[end + 1 :]
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    if not host:
        raise RemoteUnreachableError(f"{what} {text!r} has no host")
    if not port_text:
        if default_port is None:
            raise RemoteUnreachableError(f"{what} {text!r} needs a port (HOST:PORT)")
        return host, default_port
    try:
        port = int(port_text)
    except ValueError:
        raise RemoteUnreachableError(f"{what} {text!r}: port {port_text!r} is not a number") from None
    if not 0 < port < 65536:
        raise RemoteUnreachableError(f"{what} {text!r}: port {port} is out of range")
    return host, port


def resolve_address(
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    *,
    default_key: str | None = None,
    env: Mapping[str, str] | None = None,
) -> RemoteAddress:
    """Where to reach the board, from ``--rpc`` / ``--rpc-tracker`` / ``--rpc-key``, else the TVM_TRACKER_* variables.

    ``default_key`` (a target's ``rpc.key``) is used through a tracker when no key is given.
    """
    env = os.environ if env is None else env
    if rpc and tracker:
        raise RemoteUnreachableError("give either --rpc HOST:PORT or --rpc-tracker HOST:PORT, not both")
    if rpc:
        host, port = parse_hostport(rpc, what="--rpc")
        return RemoteAddress(host, port, key or "", via_tracker=False)
    if not tracker and env.get("TVM_TRACKER_HOST"):
        port_text = env.get("TVM_TRACKER_PORT") or str(DEFAULT_TRACKER_PORT)
        tracker = f"{env['TVM_TRACKER_HOST']}:{port_text}"
    if tracker:
        host, port = parse_hostport(tracker, DEFAULT_TRACKER_PORT, what="--rpc-tracker")
        key = key or env.get("TVM_TRACKER_KEY") or default_key
        if not key:
            raise RemoteUnreachableError(
                f"a tracker ({host}:{port}) needs the key of the board: --rpc-key KEY or TVM_TRACKER_KEY"
            )
        return RemoteAddress(host, port, key, via_tracker=True)
    raise RemoteUnreachableError(
        "no board given: use --rpc HOST:PORT, or --rpc-tracker HOST[:9190] with --rpc-key KEY "
        "(or set TVM_TRACKER_HOST, TVM_TRACKER_PORT, TVM_TRACKER_KEY); with no board at hand, "
        "`edgeq board start --emulated` runs an emulated aarch64 one here"
    )


# ---------------------------------------------------------------------------------------------------------------
# The tracker protocol, spoken directly so that every step has a timeout (TVM's TrackerSession waits forever for a
# key nobody serves and retries a refused connection for a minute)


def _tracker_socket(host: str, port: int, timeout: float) -> socket.socket:
    from tvm.rpc import base

    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as err:
        raise RemoteUnreachableError(f"cannot reach the RPC tracker at {host}:{port}: {_reason(err)}") from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        (magic,) = struct.unpack("<i", _recv_exact(sock, 4))
    except OSError as err:
        sock.close()
        raise RemoteUnreachableError(f"{host}:{port} did not answer as an RPC tracker: {_reason(err)}") from None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise RemoteUnreachableError(f"{host}:{port} is not an RPC tracker")
    return sock


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("connection closed")
        data += chunk
    return data


def _send_json(sock: socket.socket, value: Any) -> None:
    data = json.dumps(value).encode()
    sock.sendall(struct.pack("<i", len(data)) + data)


def _recv_json(sock: socket.socket) -> Any:
    (size,) = struct.unpack("<i", _recv_exact(sock, 4))
    return json.loads(_recv_exact(sock, size).decode())


def _reason(err: BaseException) -> str:
    if isinstance(err, ConnectionRefusedError):
        return "connection refused (nothing listens there)"
    if isinstance(err, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(err, socket.gaierror):
        return f"unknown host ({err.strerror})"
    return str(err) or type(err).__name__


def tracker_summary(host: str, port: int = DEFAULT_TRACKER_PORT, *, timeout: float = 10.0) -> dict:
    """The tracker's summary: ``{"queue_info": {key: {"free": n, "pending": n}}, "server_info": [...]}``."""
    from tvm.rpc import base

    sock = _tracker_socket(host, port, timeout)
    try:
        _send_json(sock, [base.TrackerCode.SUMMARY])
        reply = _recv_json(sock)
    except (OSError, ValueError) as err:
        raise RemoteUnreachableError(f"the RPC tracker at {host}:{port} stopped answering: {_reason(err)}") from None
    finally:
        sock.close()
    if not isinstance(reply, list) or reply[0] != base.TrackerCode.SUCCESS:
        raise RemoteUnreachableError(f"the RPC tracker at {host}:{port} answered {reply!r}")
    return reply[1]


def tracker_keys(host: str, port: int = DEFAULT_TRACKER_PORT, *, timeout: float = 10.0) -> dict[str, int]:
    """Board keys registered at a tracker, with how many servers each."""
    counts: dict[str, int] = {}
    for item in tracker_summary(host, port, timeout=timeout).get("server_info", []):
        key = str(item.get("key", "")).split(":", 1)[-1]
        counts[key] = counts.get(key, 0) + 1
    return counts


def _request_from_tracker(address: RemoteAddress, timeout: float) -> tuple[str, int, str]:
    from tvm.rpc import base

    keys = tracker_keys(address.host, address.port, timeout=timeout)
    if address.key not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise RemoteUnreachableError(
            f"no board with key {address.key!r} is registered at the tracker {address.host}:{address.port} "
            f"(registered keys: {known})"
        )
    sock = _tracker_socket(address.host, address.port, timeout)
    try:
        _send_json(sock, [base.TrackerCode.REQUEST, address.key, "", 1])
        reply = _recv_json(sock)  # waits while every board with this key is busy, up to the timeout
    except (OSError, ValueError) as err:
        raise RemoteUnreachableError(
            f"the tracker {address.host}:{address.port} gave no free board with key {address.key!r} "
            f"within {timeout:.0f} s: {_reason(err)}"
        ) from None
    finally:
        sock.close()
    if not isinstance(reply, list) or reply[0] != base.TrackerCode.SUCCESS:
        raise RemoteUnreachableError(f"the tracker refused the request for {address.key!r}: {reply!r}")
    host, port, matchkey = reply[1]
    return str(host), int(port), str(matchkey)


# ---------------------------------------------------------------------------------------------------------------
# Sessions


def connect(
    rpc: str | None = None,
    tracker: str | None = None,
    key: str | None = None,
    *,
    target: str | TargetSpec | None = None,
    timeout: float | None = None,
    session_timeout: float = 0,
    env: Mapping[str, str] | None = None,
    default_key: str | None = None,
) -> "BoardSession":
    """Open a session with a board (see :func:`resolve_address` for where it is looked for).

    ``target`` supplies the default tracker key (its ``rpc.key``) unless ``default_key`` is given. ``timeout``
    (default: ``EDGEQ_RPC_CONNECT_TIMEOUT``, else 30 s) bounds reaching the board (and, through a tracker, waiting
    for a free one); the RPC handshake has ``EDGEQ_RPC_CONNECT_TIMEOUT`` too; ``session_timeout`` asks the server
    to end the session after so many seconds (0: never). Raises :class:`RemoteUnreachableError` when nothing answers.
    """
    if default_key is None and target is not None:
        default_key = load_target(target).rpc_key
    if timeout is None:
        timeout = timeout_from_env(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT)
    address = resolve_address(rpc, tracker, key, default_key=default_key, env=env)
    if address.via_tracker:
        host, port, matchkey = _request_from_tracker(address, timeout)
        where = f"board {host}:{port} from {address.describe()}"
    else:
        host, port, matchkey = address.host, address.port, address.key
        where = address.describe()
        # not through a tracker: a board given out by one expects its one-time key on the first connection
        check_listening(host, port, timeout, where)
    from tvm import rpc as tvm_rpc

    handshake = timeout_from_env(CONNECT_TIMEOUT_ENV, DEFAULT_CONNECT_TIMEOUT)
    try:
        with Watchdog((host, port), handshake) as watchdog:
            session = tvm_rpc.connect(host, port, key=matchkey, session_timeout=session_timeout)
    except Exception as err:  # TVM raises InternalError / RPCError / TVMError with the C++ check message
        raise_if_interrupted()
        text = str(err).strip().splitlines()
        detail = text[-1] if text else type(err).__name__
        if watchdog.fired:
            detail = (f"it accepted the connection but did not answer the RPC handshake within {handshake:g} s "
                      f"({CONNECT_TIMEOUT_ENV} or --rpc-connect-timeout sets the limit)")
        if "mismatch" in detail.lower() or "matches key" in detail:
            detail = f"the server refused the key {matchkey!r}: it serves another key (--rpc-key)"
        raise RemoteUnreachableError(f"cannot open an RPC session with the {where}: {detail}") from None
    return BoardSession(session, address, (host, port))


def check_listening(host: str, port: int, timeout: float, where: str) -> None:
    """Fail fast with a clear reason when nothing listens (TVM's connect gives a terse C++ check failure)."""
    try:
        with socket.create_connection((host, port), timeout=min(timeout, 10.0)):
            pass  # the server reads a magic number; a closed socket just makes it go back to accept()
    except OSError as err:
        hint = ("; with no board at hand, `edgeq board start --emulated` runs an emulated aarch64 one here"
                if isinstance(err, ConnectionRefusedError) else "")
        raise RemoteUnreachableError(f"cannot reach the {where}: {_reason(err)}{hint}") from None


@dataclass(frozen=True)
class BoardInfo:
    """What the board says it is."""

    arch: str | None  # aarch64 | armhf | armel | x86_64 | None (unknown)
    machine: str  # ELF machine of the server process: aarch64, arm, x86_64, ...
    bits: int
    method: str  # how it was found: "llvm", "server-executable" or "probe"
    triple: str | None = None  # LLVM's triple when the board has TVM's compiler library
    cpu: str | None = None  # LLVM's CPU name, likewise
    num_threads: int | None = None  # TVM runtime thread pool size
    devices: tuple[tuple[str, bool], ...] = field(default=())  # (kind, exists) for cpu, cuda, opencl, vulkan
    emulated: bool = False  # the server runs under qemu-user: its timings say nothing about a real board

    def has_device(self, kind: str) -> bool:
        return dict(self.devices).get(kind, False)

    def describe(self) -> str:
        extra = f", cpu {self.cpu}" if self.cpu else ""
        present = [k for k, ok in self.devices if ok]
        emulated = ", emulated under qemu" if self.emulated else ""
        return (f"{self.arch or self.machine} ({self.bits}-bit{extra}{emulated}; "
                f"devices: {', '.join(present) or 'none'})")


_TRANSPORT_WORDS = ("socket", "connection", "rpc", "closed", "broken pipe", "timeout", "shutdown", "eof")


class BoardSession:
    """An open RPC session with a board. Close it (or use ``with``) when done."""

    def __init__(self, session, address: RemoteAddress, server: tuple[str, int]):
        self.rpc = session  # the tvm.rpc.RPCSession
        self.address = address
        self.server = server
        self._info: BoardInfo | None = None
        self._modules: dict[str, Any] = {}  # sha256 of a library -> its module loaded on the board

    # -- errors

    @contextlib.contextmanager
    def remote_step(self, doing: str) -> Iterator[None]:
        """Turn transport failures into :class:`RemoteRunError` naming what was being done."""
        limit = timeout_from_env(CALL_TIMEOUT_ENV, DEFAULT_CALL_TIMEOUT)
        try:
            with Watchdog(self.server, limit) as watchdog:
                yield
        except (RuntimeError, OSError) as err:  # TVM's errors (InternalError, RPCError, ...) are RuntimeErrors
            raise_if_interrupted()
            text = str(err).strip().splitlines()
            detail = text[-1] if text else type(err).__name__
            if watchdog.fired:
                detail = f"no answer within {limit:g} s ({CALL_TIMEOUT_ENV} or --rpc-timeout sets the limit)"
            raise RemoteRunError(f"board {self.server[0]}:{self.server[1]} failed while {doing}: {detail}") from err

    def run(self, vm, function: str, *args):
        """``vm[function](*args)`` on the board; a board that fails or drops the session is :class:`RemoteRunError`."""
        with self.remote_step(f"running {function}"):
            return vm[function](*args)

    def call(self, function, *args, doing: str = "running a function"):
        """Call a remote function object; failures become :class:`RemoteRunError`."""
        with self.remote_step(doing):
            return function(*args)

    # -- files and modules

    def upload(self, path: str | os.PathLike, name: str | None = None) -> str:
        """Copy a local file into the server's work folder; returns its name there."""
        path = Path(path)
        name = name or path.name
        with self.remote_step(f"uploading {path.name}"):
            self.rpc.upload(str(path), target=name)
        return name

    def load_module(self, path: str | os.PathLike, *, target: str | TargetSpec | None = None, check: bool = True,
                    name: str | None = None):
        """Upload a compiled library and load it on the board; returns the remote ``runtime.Module``.

        With ``check`` the library's architecture (and ``target``'s device, when given) is compared with the
        board first: :class:`ArtifactTargetMismatchError` instead of an obscure dlopen failure. The file is named
        by its content on the board (unless ``name`` is given) and loaded once per session: overwriting a
        library the server has loaded crashes it.
        """
        import hashlib

        path = Path(path)
        if check:
            self.check_library(path, target)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest in self._modules:  # uploading over a library this session has loaded would crash the server
            return self._modules[digest]
        name = self.upload(path, name or f"{path.stem}-{digest[:16]}{path.suffix}")
        with self.remote_step(f"loading {path.name}"):
            module = self.rpc.load_module(name)
        self._modules[digest] = module
        return module

    def device(self, kind: str = "cpu", index: int = 0):
        with self.remote_step(f"opening device {kind}:{index}"):
            return self.rpc.device(kind, index)

    def vm(self, library, device: str | None = None, *, target: str | TargetSpec | None = None):
        """A Relax ``VirtualMachine`` on the board for a library path (uploaded and loaded) or a remote module.

        The device defaults to the target's (cuda, opencl, ...) when ``target`` is given, else the CPU.
        """
        from tvm import relax

        module = self.load_module(library, target=target) if isinstance(library, (str, os.PathLike)) else library
        if device is None:
            device = load_target(target).device_kind if target is not None else "cpu"
        dev = self.device(device)
        with self.remote_step("creating the Relax VM"):
            return relax.VirtualMachine(module, dev)

    def tensor(self, array, device: str = "cpu"):
        """Copy a numpy array to the board."""
        import tvm

        dev = self.device(device)
        with self.remote_step("copying an input to the board"):
            return tvm.runtime.tensor(array, dev)

    def time(self, vm, function: str, *args, device: str = "cpu", number: int = 1, repeat: int = 3,
             min_repeat_ms: int = 0) -> list[float]:
        """Seconds per call of ``vm[function](*args)``, timed on the board itself, one value per repeat."""
        dev = self.device(device)
        with self.remote_step(f"timing {function}"):
            timer = vm.time_evaluator(function, dev, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms)
            return [float(t) for t in timer(*args).results]

    # -- what the board is

    def info(self) -> BoardInfo:
        """What the board is: its architecture (from LLVM when it has TVM's compiler library, else from the ELF
        header of the server's own executable, else by loading probe libraries), CPU and devices."""
        if self._info is None:
            self._info = self._identify()
        return self._info

    def _identify(self) -> BoardInfo:
        triple = cpu = None
        num_threads = None
        with contextlib.suppress(Exception):
            triple = str(self.rpc.get_function("target.llvm_get_system_triple")())
            cpu = str(self.rpc.get_function("target.llvm_get_system_cpu")())
        with contextlib.suppress(Exception):
            num_threads = int(self.rpc.get_function("runtime.NumThreads")())
        devices = []
        for kind in ("cpu", "cuda", "opencl", "vulkan"):
            exists = False
            with contextlib.suppress(Exception):
                exists = bool(self.rpc.device(kind, 0).exist)
            devices.append((kind, exists))
        elf: ElfInfo | None = None
        method = ""
        with self.remote_step("reading what the board is"):
            with contextlib.suppress(Exception):
                # the RPC server's download reads any path; /proc/self/exe is the server's own interpreter
                elf = elf_info(bytes(self.rpc.download("/proc/self/exe")[:64]))
                method = "server-executable"
            if elf is None:
                elf = self.probe()
                method = "probe"
        if triple:
            method = "llvm"
        arch = elf.arch if elf else None
        return BoardInfo(
            arch=arch, machine=elf.machine if elf else "unknown", bits=elf.bits if elf else 0, method=method,
            triple=triple, cpu=cpu, num_threads=num_threads, devices=tuple(devices),
            emulated=self.under_emulation(arch),
        )

    def under_emulation(self, arch: str | None) -> bool:
        """Whether the server runs under qemu-user: the emulated board's sysroot holds a marker file that qemu
        shows the guest at an absolute path (a real board has no such file). /proc cannot tell: the server's
        download reads a file by its size, and /proc files have none."""
        with contextlib.suppress(Exception):
            return len(bytes(self.rpc.download(EMULATION_MARKER))) > 0
        return False

    def probe(self) -> ElfInfo | None:
        """Load tiny libraries built for each architecture edgeq can build for; the one that loads tells."""
        import tempfile

        from edgeq.errors import ToolchainMissingError
        from edgeq.compile.targets import DEFAULT_TOOLCHAINS

        triples = {"aarch64": "aarch64-linux-gnu", "armhf": "armv7l-linux-gnueabihf", "x86_64": "x86_64-linux-gnu"}
        with tempfile.TemporaryDirectory(prefix="edgeq-probe-") as tmp:
            for arch in DEFAULT_TOOLCHAINS:
                spec = load_target(json.dumps({"kind": "llvm", "mtriple": triples[arch]}))
                try:
                    path = _probe_library(spec, Path(tmp) / f"probe-{arch}.so")
                except ToolchainMissingError:
                    continue
                name = self.upload(path)
                try:
                    self.rpc.load_module(name)
                except Exception:
                    continue
                return elf_info(path)
        return None

    def check_library(self, path: str | os.PathLike, target: str | TargetSpec | None = None) -> ElfInfo:
        """Raise :class:`ArtifactTargetMismatchError` unless the board can load and run the library at ``path``."""
        path = Path(path)
        try:
            lib = elf_info(path)
        except (OSError, ValueError) as err:
            raise ArtifactTargetMismatchError(f"{path} is not a loadable library: {err}") from None
        except Exception as err:  # TargetError: not ELF
            raise ArtifactTargetMismatchError(f"{path} is not an ELF shared library ({err})") from None
        board = self.info()
        if board.arch is not None and lib.arch != board.arch:
            built_for = f" (target {load_target(target).name})" if target is not None else ""
            raise ArtifactTargetMismatchError(
                f"{path.name} is built for {lib.describe()}{built_for}, but the board at "
                f"{self.server[0]}:{self.server[1]} is {board.describe()}: rebuild for the board's target"
            )
        if target is not None:
            spec = load_target(target)
            if spec.arch != lib.arch:
                raise ArtifactTargetMismatchError(
                    f"{path.name} is {lib.describe()}, not the {spec.arch} library target {spec.name} produces"
                )
            if spec.is_gpu and not board.has_device(spec.device_kind):
                raise ArtifactTargetMismatchError(
                    f"{path.name} is built for {spec.name} ({spec.device_kind}), but the board's TVM runtime has "
                    f"no {spec.device_kind} device: {board.describe()}"
                )
        return lib

    # -- closing

    def close(self) -> None:
        """Drop the session (the server goes back to waiting for the next one)."""
        session, self.rpc = self.rpc, None
        self._modules.clear()
        if session is not None:
            with contextlib.suppress(Exception):
                session._sess = None  # the RPC channel closes when the last reference to it goes
            del session

    def __enter__(self) -> "BoardSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _probe_library(spec: TargetSpec, path: Path) -> Path:
    """A one-function library for ``spec`` (a TIR add), linked with its cross compiler."""
    import tvm
    from tvm import te

    a = te.placeholder((4,), name="a", dtype="float32")
    b = te.compute((4,), lambda i: a[i] + 1.0, name="b")
    func = te.create_prim_func([a, b]).with_attr("global_symbol", "edgeq_probe")
    lib = tvm.compile(tvm.IRModule({"edgeq_probe": func}), target=spec.tvm_target())
    lib.export_library(str(path), fcompile=spec.fcompile())
    return path

