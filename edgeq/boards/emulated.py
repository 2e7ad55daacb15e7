"""An emulated aarch64 board: the real aarch64 TVM RPC server running under ``qemu-aarch64`` on loopback.

The board is a sysroot built once and cached (``~/.cache/edgeq/emulated-board/`` unless
``$EDGEQ_EMULATED_BOARD_DIR`` says otherwise):

- Debian bookworm arm64 packages (python3.11, its standard library, libc6, libstdc++6 and whatever apt says they
  need), fetched with ``apt-get --download-only`` against a private apt state (the machine's own dpkg
  configuration is not touched) and unpacked with ``dpkg -x``;
- aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy, ml_dtypes, psutil, cloudpickle, typing_extensions, at the
  versions installed on this machine, put in place with ``pip install --platform manylinux..._aarch64 --target``;
- a wrapper script ``bin/python3`` that runs the sysroot's python3.11 under ``qemu-aarch64``. The interpreter sees
  the wrapper as ``sys.executable`` (``qemu -0``), so the RPC server's worker processes, which re-execute
  ``sys.executable``, come back through qemu too (this machine has no binfmt_misc registration).

:func:`start_emulated_board` then runs ``python -m tvm.exec.rpc_server`` there, bound to 127.0.0.1. By default the
server loads only the TVM runtime library (``TVM_USE_RUNTIME_LIB=1``), as a runtime-only board would: it starts
in 15-20 s instead of about 40 s with the compiler library (measured on 2 busy cores). Emulated timings say
nothing about a real board.

Command line: ``python -m edgeq.boards.emulated build|start|python`` (see ``--help``).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeq.errors import ToolchainMissingError
from edgeq.boards.local import BoardHandle, free_port, start_rpc_server
from edgeq.boards.session import EMULATION_MARKER

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("EDGEQ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
DEBIAN_SECURITY_MIRROR = os.environ.get("EDGEQ_DEBIAN_SECURITY_MIRROR", "http://deb.debian.org/debian-security")
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PYTHON_VERSION = "3.11"  # bookworm's python3
#: Debian arm64 packages asked for; apt adds what they depend on.
DEBIAN_PACKAGES = ("python3.11", "libpython3.11-stdlib", "libpython3.11-minimal", "libc6", "libstdc++6", "libgcc-s1")
#: Python packages the board needs, pinned to this machine's versions when installed here.
WHEELS = ("apache-tvm", "apache-tvm-ffi", "numpy", "ml_dtypes", "psutil", "cloudpickle", "typing_extensions")
#: manylinux tags a bookworm (glibc 2.36) aarch64 system accepts; pip does not widen explicit --platform tags.
MANYLINUX_TAGS = ("manylinux2014_aarch64",) + tuple(f"manylinux_2_{v}_aarch64" for v in range(17, 37))
DEFAULT_KEY = "rasp4-emulated"
DEFAULT_CPU = "cortex-a72"  # qemu's CPU model: like a Raspberry Pi 4 (no dot product), not qemu's "max"
RECIPE_VERSION = 1

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def board_dir() -> Path:
    """Where the sysroot is cached: ``$EDGEQ_EMULATED_BOARD_DIR`` or ``~/.cache/edgeq/emulated-board``."""
    env = os.environ.get("EDGEQ_EMULATED_BOARD_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "edgeq" / "emulated-board"


@dataclass(frozen=True)
class Sysroot:
    """A built emulated board: where its pieces lie."""

    root: Path  # the cache directory

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def site_packages(self) -> Path:
        return self.root / "site-packages"

    @property
    def python(self) -> Path:
        """The wrapper that runs the aarch64 Python under qemu; use it like any python3."""
        return self.root / "bin" / "python3"

    @property
    def stamp(self) -> Path:
        return self.root / "READY.json"

    def info(self) -> dict:
        return json.loads(self.stamp.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Building the sysroot


def _which_or_raise(tool: str, package: str) -> str:
    found = shutil.which(tool)
    if found is None:
        raise ToolchainMissingError(
            f"{tool} not found; install the Debian package {package} (apt-get install {package}) "
            "or run deploy/install-host-tools.sh"
        )
    return found


def _wheel_pins() -> list[str]:
    from importlib import metadata

    pins = []
    for name in WHEELS:
        try:
            pins.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pins.append(name)
    return pins


def _recipe() -> dict:
    return {
        "recipe": RECIPE_VERSION,
        "suite": DEBIAN_SUITE,
        "mirror": DEBIAN_MIRROR,
        "packages": list(DEBIAN_PACKAGES),
        "wheels": _wheel_pins(),
        "python": PYTHON_VERSION,
    }


def _recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def find_sysroot(cache_dir: str | os.PathLike | None = None) -> Sysroot | None:
    """The cached board when it is complete and built from the current recipe, else None."""
    built = Sysroot(Path(cache_dir) if cache_dir else board_dir())
    try:
        info = built.info()
    except (OSError, ValueError):
        return None
    if info.get("hash") != _recipe_hash(_recipe()) or not built.python.is_file():
        return None
    return built


@contextlib.contextmanager
def _lock(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], what: str, log: Log, **kwargs) -> str:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
        raise ToolchainMissingError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout


def _apt_options(apt: Path) -> list[str]:
    return [
        f"-o=Dir::Etc::SourceList={apt / 'sources.list'}",
        f"-o=Dir::Etc::SourceParts={apt / 'sources.list.d'}",
        f"-o=Dir::Etc::Preferences={apt / 'preferences'}",
        f"-o=Dir::Etc::PreferencesParts={apt / 'preferences.d'}",
        f"-o=Dir::State={apt / 'state'}",
        f"-o=Dir::State::status={apt / 'state' / 'status'}",
        f"-o=Dir::Cache={apt / 'cache'}",
        "-o=APT::Architecture=arm64",
        "-o=APT::Architectures::=arm64",
        "-o=APT::Install-Recommends=false",
        "-o=Acquire::Languages=none",
        # the private state needs no lock against the system's apt (build_sysroot holds its own lock)
        "-o=Debug::NoLocking=true",
    ] + (
        # files land under the user's cache, which apt's unprivileged download user may not reach
        ["-o=APT::Sandbox::User=root"] if os.geteuid() == 0 else []
    )


def _fetch_debs(root: Path, log: Log) -> list[Path]:
    """Download the arm64 packages and their dependencies with a private apt state; returns the .deb files."""
    apt_get = _which_or_raise("apt-get", "apt")
    apt = root / "apt"
    for sub in ("sources.list.d", "preferences.d", "state/lists/partial", "cache/archives/partial"):
        (apt / sub).mkdir(parents=True, exist_ok=True)
    (apt / "state" / "status").write_text("")  # nothing installed: apt fetches every dependency
    for stale in (apt / "cache" / "archives").glob("*.deb"):  # from an older recipe: would be unpacked too
        stale.unlink()
    signed = f" signed-by={DEBIAN_KEYRING}" if Path(DEBIAN_KEYRING).is_file() else ""
    (apt / "sources.list").write_text(
        f"deb [arch=arm64{signed}] {DEBIAN_MIRROR} {DEBIAN_SUITE} main\n"
        f"deb [arch=arm64{signed}] {DEBIAN_MIRROR} {DEBIAN_SUITE}-updates main\n"
        f"deb [arch=arm64{signed}] {DEBIAN_SECURITY_MIRROR} {DEBIAN_SUITE}-security main\n"
    )
    options = _apt_options(apt)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run([apt_get, *options, "-q", "update"], "apt-get update for the arm64 sysroot", log, env=env)
    _run(
        [apt_get, *options, "-q", "-y", "--download-only", "install", *DEBIAN_PACKAGES],
        "apt-get download of the arm64 packages",
        log,
        env=env,
    )
    debs = sorted((apt / "cache" / "archives").glob("*.deb"))
    if not debs:
        raise ToolchainMissingError("apt-get fetched no arm64 packages for the emulated board")
    return debs


def _install_wheels(target: Path, log: Log) -> None:
    cmd = [
        sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts",
        "--target", str(target), "--only-binary=:all:", "--python-version", PYTHON_VERSION,
        "--implementation", "cp", "--abi", "cp" + PYTHON_VERSION.replace(".", ""),
    ]
    for tag in MANYLINUX_TAGS:
        cmd += ["--platform", tag]
    _run(cmd + _wheel_pins(), "pip install of the aarch64 wheels", log)


def _write_wrapper(built: Sysroot, qemu: str) -> None:
    wrapper = built.python
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    interpreter = built.sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}"
    text = f"""#!/bin/sh
# Written by edgeq.boards.emulated: the aarch64 Python of the emulated board, run under qemu-user.
# qemu -0 makes this script the interpreter's sys.executable, so processes it re-executes come back here.
QEMU_LD_PREFIX={_sh(built.sysroot)}; export QEMU_LD_PREFIX
QEMU_CPU="${{EDGEQ_QEMU_CPU:-{DEFAULT_CPU}}}"; export QEMU_CPU
PYTHONPATH={_sh(built.site_packages)}; export PYTHONPATH
PYTHONNOUSERSITE=1; export PYTHONNOUSERSITE
unset PYTHONHOME PYTHONSTARTUP
exec {_sh(qemu)} -0 {_sh(wrapper)} {_sh(interpreter)} "$@"
"""
    wrapper.write_text(text)
    wrapper.chmod(0o755)


def _sh(value: str | os.PathLike) -> str:
    import shlex

    return shlex.quote(os.fspath(value))


def build_sysroot(cache_dir: str | os.PathLike | None = None, *, force: bool = False, log: Log = _quiet) -> Sysroot:
    """Build the emulated board once (about 1 minute with a fast network, 500 MB) and return it; later calls
    return the cached one (in well under a second).

    Raises :class:`ToolchainMissingError` when qemu-aarch64, apt-get or dpkg is missing or a download fails.
    """
    root = Path(cache_dir) if cache_dir else board_dir()
    if not force:
        found = find_sysroot(root)
        if found is not None:
            return found
    qemu = _which_or_raise("qemu-aarch64", "qemu-user")
    dpkg = _which_or_raise("dpkg", "dpkg")
    with _lock(root):
        if not force:  # someone else may have finished while we waited for the lock
            found = find_sysroot(root)
            if found is not None:
                return found
        started = time.monotonic()
        built = Sysroot(root)
        built.stamp.unlink(missing_ok=True)
        for old in (built.sysroot, built.site_packages, root / "bin"):
            shutil.rmtree(old, ignore_errors=True)
        debs = _fetch_debs(root, log)
        built.sysroot.mkdir(parents=True)
        for deb in debs:
            _run([dpkg, "-x", str(deb), str(built.sysroot)], f"dpkg -x {deb.name}", _quiet)
        # empty folders that shadow this machine's own Python packages: qemu -L falls back to host paths
        for shadow in (f"usr/local/lib/python{PYTHON_VERSION}/dist-packages", "usr/lib/python3/dist-packages", "tmp"):
            (built.sysroot / shadow).mkdir(parents=True, exist_ok=True)
        _install_wheels(built.site_packages, log)
        if sys.version_info[:2] == tuple(int(p) for p in PYTHON_VERSION.split(".")):
            # byte-compile natively: the same .pyc files the emulated interpreter would write, minus the emulation
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", "-j", "0",
                 str(built.sysroot / "usr" / "lib" / f"python{PYTHON_VERSION}")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
            )
        _write_wrapper(built, qemu)
        probe = subprocess.run(
            [str(built.python), "-c", "import platform, numpy, tvm_ffi; print(platform.machine())"],
            capture_output=True, text=True, env=_board_env(built, runtime_only=True), timeout=600,
        )
        if probe.returncode != 0 or probe.stdout.strip() != "aarch64":
            raise ToolchainMissingError(
                f"the emulated aarch64 Python does not start (exit {probe.returncode}): "
                + " ".join((probe.stderr or probe.stdout).strip().splitlines()[-5:])
            )
        recipe = _recipe()
        info = dict(recipe, hash=_recipe_hash(recipe), debs=[d.name for d in debs],
                    build_seconds=round(time.monotonic() - started, 1), qemu=qemu)
        partial = built.stamp.with_suffix(".partial")
        partial.write_text(json.dumps(info, indent=2) + "\n")
        partial.replace(built.stamp)
        log(f"emulated board ready in {root} ({info['build_seconds']} s)")
        return built


# ---------------------------------------------------------------------------------------------------------------
# Running the board


def _board_env(built: Sysroot, *, runtime_only: bool, workdir: Path | None = None, cpu: str | None = None) -> dict:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/root"),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
    }
    if runtime_only:
        env["TVM_USE_RUNTIME_LIB"] = "1"
    if workdir is not None:
        env["TMPDIR"] = str(workdir)
    if cpu:
        env["EDGEQ_QEMU_CPU"] = cpu
    return env


def start_emulated_board(
    port: int | None = None,
    tracker: str | tuple[str, int] | None = None,
    key: str = DEFAULT_KEY,
    *,
    host: str = "127.0.0.1",
    cache_dir: str | os.PathLike | None = None,
    runtime_only: bool = True,
    cpu: str = DEFAULT_CPU,
    timeout: float = 900.0,
    log: Log = _quiet,
) -> BoardHandle:
    """Start the emulated aarch64 RPC server and wait until it serves (building the sysroot first if needed).

    ``port=None`` picks a free port. With ``tracker`` ("HOST:PORT") the server registers there under ``key``,
    and the call returns once the tracker lists it. ``runtime_only=False`` loads TVM's compiler library too
    (then the board answers ``target.llvm_get_system_triple``, and starts in about 40 s instead of 15-20 s).
    ``cpu`` is qemu's CPU model (cortex-a72 like a Raspberry Pi 4; "max" for every feature qemu has).
    Raises :class:`RemoteRunError` when the server dies or does not come up within ``timeout`` seconds.
    """
    built = build_sysroot(cache_dir, log=log)
    _write_marker(built, cpu)
    port = port or free_port(host)
    workdir = built.root / "boards" / f"{host}-{port}-{os.getpid()}"
    workdir.parent.mkdir(parents=True, exist_ok=True)
    handle = start_rpc_server(
        built.python, host=host, port=port, tracker=tracker, key=key, workdir=workdir, timeout=timeout,
        env=_board_env(built, runtime_only=runtime_only, workdir=workdir, cpu=cpu),
    )
    log(f"emulated board serving on {handle.address} after {handle.start_seconds} s")
    return handle


def _write_marker(built: Sysroot, cpu: str) -> None:
    marker = built.sysroot / EMULATION_MARKER.lstrip("/")
    text = f"edgeq emulated aarch64 board: qemu-user, cpu {cpu}; timings are not board latency\n"
    if not marker.is_file() or marker.read_text() != text:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(text)


def stop(handle: BoardHandle) -> None:
    """Stop a board started by :func:`start_emulated_board`: the server, its popen worker, its sessions."""
    handle.stop()


# ---------------------------------------------------------------------------------------------------------------
# Command line: python -m edgeq.boards.emulated build | start | python ...


def main(argv: list[str] | None = None) -> int:
    import argparse

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["python"]:  # everything after "python" goes to the emulated interpreter untouched
        built = build_sysroot(log=lambda m: print(m, file=sys.stderr, flush=True))
        return subprocess.call([str(built.python), *argv[1:]], env=_board_env(built, runtime_only=False))

    parser = argparse.ArgumentParser(prog="python -m edgeq.boards.emulated", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", default=None, help=f"sysroot cache (default {board_dir()})")
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or reuse) the sysroot and print where it is")
    b.add_argument("--force", action="store_true", help="rebuild even when a cached sysroot exists")
    s = sub.add_parser("start", help="run the emulated RPC server on loopback until interrupted")
    s.add_argument("--port", type=int, default=None)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: loopback only)")
    s.add_argument("--tracker", default=None, help="HOST:PORT of an RPC tracker to register with")
    s.add_argument("--key", default=DEFAULT_KEY)
    s.add_argument("--full-tvm", action="store_true", help="load TVM's compiler library too (slower start)")
    s.add_argument("--cpu", default=DEFAULT_CPU, help="qemu CPU model (default %(default)s)")
    sub.add_parser("python", help="run the emulated aarch64 python with the arguments that follow")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.command == "build":
        built = build_sysroot(args.cache_dir, force=args.force, log=say)
        print(json.dumps({"root": str(built.root), "python": str(built.python),
                          "build_seconds": built.info().get("build_seconds")}, indent=2))
        return 0
    handle = start_emulated_board(args.port, args.tracker, args.key, host=args.host, cache_dir=args.cache_dir,
                                  runtime_only=not args.full_tvm, cpu=args.cpu, log=say)
    print(json.dumps({"rpc": handle.address, "key": handle.key if handle.tracker else None,
                      "start_seconds": handle.start_seconds,
                      "log": str(handle.log_path)}), flush=True)
    import signal

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    # Ctrl-C, and kill / systemd's SIGTERM, stop the board too (a backgrounded shell job ignores SIGINT otherwise)
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        while handle.alive():
            time.sleep(1.0)
        say(f"the emulated board exited; log {handle.log_path}:\n{handle.log_tail()}")
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        stop(handle)


if __name__ == "__main__":
    sys.exit(main())
