"""Boards and compile targets: one YAML per board under ``targets/``, TVM tags, or a raw JSON target.

A :class:`TargetSpec` says what TVM compiles for (``target`` and, for GPUs, ``host``), which ELF the board
loads (``arch``), which cross compiler links the library (``toolchain``), the RPC key the board registers
under, and what the board needs installed. :func:`load_target` accepts

- a board name from ``targets/`` (``rasp4``, ``jetson-orin-nano``, ...),
- a path to such a YAML file,
- a TVM target tag (``arm/rasp4b64``, ``nvidia/jetson-orin-nano``, see ``tvm.target.tag.list_tags()``),
- a JSON target (``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}``), optionally with a
  ``"host"`` entry for GPU targets.

Importing this module does not import TVM; building the ``tvm.target.Target`` does.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from edgeq.errors import TargetError
from edgeq.fileio import read_yaml

#: Architectures a board's loader can accept, named as in ``TargetSpec.arch``.
ARCHES = ("aarch64", "armhf", "x86_64")

#: The default cross toolchain for a JSON target or a tag, by architecture: (compiler, Debian package).
DEFAULT_TOOLCHAINS: dict[str, tuple[str | None, str]] = {
    "aarch64": ("aarch64-linux-gnu-gcc", "gcc-aarch64-linux-gnu"),
    "armhf": ("arm-linux-gnueabihf-gcc", "gcc-arm-linux-gnueabihf"),
    "x86_64": (None, "g++"),
}

#: the integer kernel family for targets no other family covers (:mod:`edgeq.lower.kernels.micro`)
GENERIC_KERNEL_FAMILY = "generic"

_KNOWN_TOP_KEYS = {"name", "description", "arch", "target", "host", "toolchain", "rpc", "board"}

#: How many ``tvm.target.Target`` objects edgeq has made from something else (a spec, a dict, a string) in this
#: process, by what was coerced: the measure of how often one build converts its target (see
#: :func:`target_coercions`).
_COERCIONS: dict[str, int] = {}


def _coerced(source: str) -> None:
    _COERCIONS[source] = _COERCIONS.get(source, 0) + 1


def target_coercions(reset: bool = False) -> dict[str, int]:
    """``{what was coerced: how many times}`` since the process started (or the last ``reset``): ``spec``
    (:meth:`TargetSpec.tvm_target`), ``dict`` and ``string`` (:func:`as_tvm_target`), ``check`` (the validation
    while loading a target)."""
    counts = dict(_COERCIONS)
    if reset:
        _COERCIONS.clear()
    return counts


def targets_dir() -> Path:
    """Where the board YAML files are: ``$EDGEQ_TARGETS_DIR`` or the repository's ``targets/``."""
    env = os.environ.get("EDGEQ_TARGETS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "targets"


@dataclass(frozen=True)
class Toolchain:
    """The compiler that links TVM's objects into a shared library the board can load."""

    compiler: str | None  # None: TVM's default compiler for this machine (g++ or $CXX)
    options: tuple[str, ...] = ()
    package: str = ""  # the Debian package providing ``compiler``

    def resolve(self) -> str:
        """The compiler's absolute path; :class:`ToolchainMissingError` names the package when it is absent."""
        from edgeq.errors import ToolchainMissingError

        name = self.compiler
        if name is None:
            from tvm.support.cc import get_cc

            name = get_cc()
            if name is None:
                raise ToolchainMissingError(
                    f"no C/C++ compiler found on this machine; install the Debian package {self.package or 'g++'}"
                )
        found = shutil.which(name)
        if found is None:
            hint = "install it"
            if self.package:
                hint = f"install the Debian package {self.package} (apt-get install {self.package})"
            raise ToolchainMissingError(
                f"cross compiler {name!r} not found on PATH; {hint}, or run deploy/install-host-tools.sh"
            )
        return found


@dataclass(frozen=True)
class TargetSpec:
    """One board (or one raw target): what to compile for and how to reach and equip the board."""

    name: str
    description: str
    arch: str
    target_json: str  # canonical JSON of the TVM target, without "host"
    host_json: str | None  # canonical JSON of the host target (GPU boards), else None
    toolchain: Toolchain
    rpc_key: str
    board_json: str = "{}"  # what the board must have (os, python, apt, pip, notes), as JSON
    source: str = ""  # the YAML path, "tag:NAME" or "json"

    # Parsed once per spec (cached_property writes the instance dict, which a frozen dataclass allows); the JSON
    # strings stay the fields so that specs compare and hash by value. Callers read these dicts, never mutate them.
    @cached_property
    def target(self) -> dict[str, Any]:
        return json.loads(self.target_json)

    @cached_property
    def host(self) -> dict[str, Any] | None:
        return json.loads(self.host_json) if self.host_json else None

    @property
    def kind(self) -> str:
        return str(self.target["kind"])

    @property
    def device_kind(self) -> str:
        """The kind of device the compiled code runs on, as ``tvm.rpc`` names it: cpu, cuda, opencl, ..."""
        return {"llvm": "cpu", "c": "cpu"}.get(self.kind, self.kind)

    @property
    def is_gpu(self) -> bool:
        return self.device_kind != "cpu"

    @cached_property
    def requirements(self) -> dict[str, Any]:
        return json.loads(self.board_json)

    def tvm_target(self):
        """The ``tvm.target.Target`` (with its host for GPU targets), made on the first call and shared after."""
        return self._tvm_target

    @cached_property
    def _tvm_target(self):
        import tvm

        _coerced("spec")
        host = self.host
        return tvm.target.Target(self.target, host=host) if host else tvm.target.Target(self.target)

    def fcompile(self):
        """The ``fcompile`` to pass to ``export_library``: the cross compiler, checked to exist."""
        from tvm.support import cc

        compiler = self.toolchain.resolve()
        if self.toolchain.compiler is None and not self.toolchain.options:
            return cc.create_shared
        return cc.cross_compiler(compiler, options=list(self.toolchain.options))

    def summary(self) -> dict[str, Any]:
        """Plain values for manifests and ``edgeq targets`` listings."""
        return {
            "name": self.name,
            "description": self.description,
            "arch": self.arch,
            "target": self.target,
            "host": self.host,
            "toolchain": {
                "compiler": self.toolchain.compiler,
                "options": list(self.toolchain.options),
                "package": self.toolchain.package,
            },
            "rpc_key": self.rpc_key,
            "board": self.requirements,
            "source": self.source,
        }


# ---------------------------------------------------------------------------------------------------------------
# Loading


def list_targets() -> list[str]:
    """Names of the boards described under :func:`targets_dir`, sorted."""
    folder = targets_dir()
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml"))


def load_target(what: str | os.PathLike | TargetSpec | Mapping[str, Any]) -> TargetSpec:
    """A board name, a YAML path, a TVM tag, a JSON target or a TVM target dict, as a :class:`TargetSpec`.

    Raises :class:`TargetError` (listing the known boards) when ``what`` is none of these, and when the YAML or
    JSON is malformed or TVM refuses the target.
    """
    if isinstance(what, TargetSpec):
        return what
    if isinstance(what, Mapping):
        return _from_config("custom", "target given as a dict", dict(what), source="dict")
    text = os.fspath(what).strip()
    if not text:
        raise TargetError(f"empty target; known boards: {', '.join(list_targets())}")
    if text.startswith("{"):
        return _from_json(text)
    path = Path(text).expanduser()
    if text.endswith((".yaml", ".yml")) or (path.is_file() and path.suffix in {".yaml", ".yml"}):
        if not path.is_file():
            raise TargetError(f"target file {text} does not exist")
        return _from_yaml(path)
    board_file = targets_dir() / f"{text}.yaml"
    if "/" not in text and board_file.is_file():
        return _from_yaml(board_file)
    tag = _tag_config(text)
    if tag is not None:
        return _from_config(text, f"TVM tag {text}", tag, source=f"tag:{text}")
    close = _close_names(text, list_targets())
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise TargetError(
        f"unknown target {text!r}{hint}; known boards: {', '.join(list_targets()) or '(none)'}; "
        "a TVM tag (python -c 'import tvm; print(list(tvm.target.tag.list_tags()))') or a JSON target such as "
        '\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"}\' also works'
    )


def as_tvm_target(target):
    """A ``tvm.target.Target`` from a Target, a :class:`TargetSpec`, a TVM target dict, or a string:
    whatever :func:`load_target` accepts (board, YAML path, TVM tag, JSON), else a bare TVM target kind such as
    ``"llvm"``."""
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    if isinstance(target, TargetSpec):
        return target.tvm_target()
    if isinstance(target, dict):
        _coerced("dict")
        return tvm.target.Target(target)
    try:
        return load_target(target).tvm_target()
    except TargetError as err:
        try:
            _coerced("string")
            return tvm.target.Target(os.fspath(target))
        except Exception:  # TVM's complaint about a string it cannot parse says less than edgeq's
            raise err from None


def _close_names(name: str, names: list[str]) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, names, n=3, cutoff=0.6)


def _from_yaml(path: Path) -> TargetSpec:
    data = read_yaml(path, TargetError, "target file")
    if not isinstance(data, dict):
        raise TargetError(f"target file {path} is not a mapping")
    unknown = set(data) - _KNOWN_TOP_KEYS
    if unknown:
        raise TargetError(f"target file {path}: unknown keys {sorted(unknown)} (allowed: {sorted(_KNOWN_TOP_KEYS)})")
    for key in ("name", "arch", "target"):
        if key not in data:
            raise TargetError(f"target file {path}: missing {key!r}")
    name = data["name"]
    if not isinstance(name, str) or not name:
        raise TargetError(f"target file {path}: 'name' must be a non-empty string")
    if name != path.stem:
        raise TargetError(f"target file {path}: name {name!r} differs from the file name {path.stem!r}")
    toolchain = data.get("toolchain") or {}
    if not isinstance(toolchain, dict):
        raise TargetError(f"target file {path}: 'toolchain' must be a mapping")
    rpc = data.get("rpc") or {}
    if not isinstance(rpc, dict):
        raise TargetError(f"target file {path}: 'rpc' must be a mapping")
    board = data.get("board") or {}
    if not isinstance(board, dict):
        raise TargetError(f"target file {path}: 'board' must be a mapping")
    config = dict(data["target"]) if isinstance(data["target"], dict) else data["target"]
    if isinstance(config, str):
        config = _parse_json(config, f"target file {path}: target")
    if data.get("host") is not None:
        if not isinstance(config, dict):
            raise TargetError(f"target file {path}: 'target' must be a mapping")
        config["host"] = data["host"]
    return _from_config(
        name,
        str(data.get("description", "")),
        config,
        source=str(path),
        arch=data["arch"],
        toolchain=toolchain,
        rpc_key=str(rpc.get("key", name)),
        board=board,
        where=f"target file {path}",
    )


def _from_json(text: str) -> TargetSpec:
    config = _parse_json(text, "JSON target")
    return _from_config("custom", "target given as JSON", config, source="json")


def _parse_json(text: str, where: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as err:
        raise TargetError(f"{where} is not valid JSON: {err}") from None
    except RecursionError:
        raise TargetError(f"{where} is nested too deeply to be a target") from None
    if not isinstance(config, dict):
        raise TargetError(f"{where} must be a JSON object")
    return config


def _tag_config(name: str) -> dict[str, Any] | None:
    """The configuration a TVM tag stands for, or None when TVM has no such tag."""
    if not name or any(c.isspace() for c in name):
        return None
    from tvm.target import tag

    tags = tag.list_tags() or {}
    if name not in tags:
        return None
    return _plain(tags[name].export())


def _plain(value: Any) -> Any:
    """TVM containers (Map, Array) and tuples as dicts and lists, dropping derived fields."""
    if isinstance(value, dict) or hasattr(value, "items"):
        return {
            str(k): _plain(v)
            for k, v in value.items()
            if not str(k).startswith("feature.") and not (str(k) == "tag" and not v)
        }
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) or (hasattr(value, "__len__") and hasattr(value, "__getitem__")):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, float)):
        return value
    return str(value)


def _from_config(
    name: str,
    description: str,
    config: Any,
    *,
    source: str,
    arch: str | None = None,
    toolchain: dict[str, Any] | None = None,
    rpc_key: str | None = None,
    board: dict[str, Any] | None = None,
    where: str = "",
) -> TargetSpec:
    where = where or f"target {name}"
    if not isinstance(config, dict):
        raise TargetError(f"{where}: the TVM target must be a mapping, got {type(config).__name__}")
    config = dict(config)
    host = config.pop("host", None)
    if host is not None and not isinstance(host, dict):
        raise TargetError(f"{where}: the host target must be a mapping")
    if "kind" not in config and "tag" not in config:
        raise TargetError(f"{where}: the TVM target needs a 'kind' (llvm, cuda, opencl, ...)")
    for part in (config, host):
        for key in ("mtriple", "mcpu", "kind"):
            if part is not None and key in part and not isinstance(part[key], str):
                raise TargetError(f"{where}: {key} must be a string, got {type(part[key]).__name__}")
    config = _fill_native(config, where)
    if host is not None:
        host = _fill_native(dict(host), where)
    for part in (config, host):
        if part is not None:
            _check_with_tvm(part, where)
    # the triple that decides which ELF the board loads: the host's for GPU targets, the target's for CPUs
    cpu = host if host is not None else config
    triple = cpu.get("mtriple")
    derived = _arch_of_triple(triple) if triple else None
    if config.get("kind") not in (None, "llvm", "c") and host is None:
        # a GPU target without a host: TVM would compile the host part for this machine
        derived = _arch_of_triple(_system_triple())
    if arch is None:
        arch = derived or _arch_of_triple(_system_triple())
    if arch not in ARCHES:
        raise TargetError(f"{where}: arch {arch!r} is not one of {', '.join(ARCHES)}")
    if derived is not None and derived != arch:
        raise TargetError(f"{where}: arch {arch!r} disagrees with the triple {triple!r} ({derived})")
    if arch == "armhf" and cpu.get("kind") == "llvm" and "mfloat-abi" not in cpu:
        # TVM leaves LLVM at the soft-float calling convention even for a *hf triple (its arm/rasp4b tag does);
        # such objects do not link against a hard-float C library
        cpu["mfloat-abi"] = "hard"
    default_cc, default_pkg = DEFAULT_TOOLCHAINS[arch]
    toolchain = toolchain or {}
    options = toolchain.get("options") or []
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options):
        raise TargetError(f"{where}: toolchain options must be a list of strings")
    compiler = toolchain["compiler"] if "compiler" in toolchain else default_cc
    for key, value in (("compiler", compiler), ("package", toolchain.get("package"))):
        if value is not None and not isinstance(value, str):
            raise TargetError(f"{where}: toolchain {key} must be a string (one command name), "
                              f"got {type(value).__name__}")
    tc = Toolchain(
        compiler=compiler if compiler else None,
        options=tuple(options),
        package=str(toolchain.get("package") or (default_pkg if compiler == default_cc else "")),
    )
    target_json = json.dumps(config, sort_keys=True)
    host_json = json.dumps(host, sort_keys=True) if host is not None else None
    spec = TargetSpec(
        name=name,
        description=description,
        arch=arch,
        target_json=target_json,
        host_json=host_json,
        toolchain=tc,
        rpc_key=rpc_key or name.replace("/", "-"),
        board_json=json.dumps(board or {}, sort_keys=True, default=str),
        source=source,
    )
    try:
        spec.tvm_target()
    except Exception as err:  # TVM raises ValueError / TVMError subclasses with long messages
        raise TargetError(f"{where}: TVM refuses the target with its host: {_last_line(err)}") from None
    return spec


def _last_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def _check_with_tvm(part: dict[str, Any], where: str) -> None:
    """TVM accepts this (host-less) target, and LLVM knows its CPU."""
    import tvm

    if part.get("kind") == "llvm" and isinstance(part.get("mcpu"), str):
        # TVM only warns about a CPU LLVM does not know and compiles for a generic one: refuse instead
        from tvm.target import codegen

        triple = part.get("mtriple") or _system_triple()
        if not codegen.llvm_is_valid_cpu(part["mcpu"], triple):
            raise TargetError(f"{where}: LLVM does not know the CPU {part['mcpu']!r} for {triple}")
    try:
        _coerced("check")
        tvm.target.Target(part)
    except Exception as err:
        raise TargetError(f"{where}: TVM refuses the target: {_last_line(err)}") from None


def _fill_native(config: dict[str, Any], where: str) -> dict[str, Any]:
    """``"mcpu": "native"`` and ``"num-cores": "auto"`` become this machine's CPU and CPU count."""
    if config.get("mcpu") == "native":
        triple = config.get("mtriple") or _system_triple()
        if _arch_of_triple(triple) != _arch_of_triple(_system_triple()):
            raise TargetError(f"{where}: mcpu 'native' only makes sense for this machine's architecture")
        from tvm.target import codegen

        config["mcpu"] = str(codegen.llvm_get_system_cpu())
        extra = [f for f in host_mattr(config["mcpu"]) if f not in config.get("mattr", [])]
        if extra:
            config["mattr"] = list(config.get("mattr", [])) + extra
    if config.get("num-cores") == "auto":
        config["num-cores"] = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return config


# /proc/cpuinfo flag -> LLVM feature, for the features that choose a kernel family (and what they build on)
_CPUINFO_LLVM_FEATURES = {
    "avx2": "avx2", "fma": "fma", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
    "avx512dq": "avx512dq", "avx512cd": "avx512cd", "avx512_vnni": "avx512vnni", "avx_vnni": "avxvnni",
}


def host_mattr(mcpu: str, cpuinfo: str | None = None) -> list[str]:
    """``+feature`` entries this machine's CPU has (``/proc/cpuinfo``) but LLVM's model of ``mcpu`` lacks.

    LLVM names a CPU by its family and model, which a hypervisor may report as an older part (a Xeon with
    AVX-VNNI seen as "rocketlake"); the flags the kernel families depend on then come from the CPU itself.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return []
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            flags = set(value.split())
            break
    import tvm
    from tvm.target import codegen

    model = tvm.target.Target({"kind": "llvm", "mcpu": mcpu})
    return [f"+{feature}" for flag, feature in _CPUINFO_LLVM_FEATURES.items()
            if flag in flags and not codegen.target_has_features([feature], model)]


def _system_triple() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine) + "-linux-gnu"


def _arch_of_triple(triple: str) -> str | None:
    head = triple.split("-", 1)[0].lower()
    if head in ("aarch64", "arm64"):
        return "aarch64"
    if head in ("x86_64", "amd64"):
        return "x86_64"
    if head.startswith(("arm", "thumb")) and "hf" in triple.lower():
        return "armhf"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Which architecture a shared library is for

_EM = {183: "aarch64", 40: "arm", 62: "x86_64", 3: "x86", 243: "riscv"}
_EF_ARM_ABI_FLOAT_HARD = 0x400


@dataclass(frozen=True)
class ElfInfo:
    machine: str  # aarch64, arm, x86_64, ...
    bits: int
    hard_float: bool | None = None  # ARM 32-bit only

    @property
    def arch(self) -> str | None:
        """The :data:`ARCHES` name, or None for architectures edgeq does not target."""
        if self.machine == "arm":
            return "armhf" if self.hard_float else "armel"
        return self.machine if self.machine in ARCHES else None

    def describe(self) -> str:
        if self.machine == "arm":
            return f"ARM 32-bit ({'hard' if self.hard_float else 'soft'}-float)"
        names = {"aarch64": "ARM aarch64 (64-bit)", "x86_64": "x86-64"}
        return names.get(self.machine, f"{self.machine} {self.bits}-bit")


def elf_info(data: bytes | str | os.PathLike) -> ElfInfo:
    """The machine of an ELF file (a path or its first bytes); :class:`TargetError` when it is not ELF."""
    head = data if isinstance(data, (bytes, bytearray)) else Path(data).open("rb").read(64)
    head = bytes(head[:64])
    if len(head) < 52 or head[:4] != b"\x7fELF":
        raise TargetError("not an ELF shared library")
    bits = {1: 32, 2: 64}.get(head[4], 0)
    order = "<" if head[5] == 1 else ">"
    (e_machine,) = struct.unpack_from(order + "H", head, 18)
    flags_at = 48 if bits == 64 else 36
    (e_flags,) = struct.unpack_from(order + "I", head, flags_at)
    machine = _EM.get(e_machine, f"em{e_machine}")
    hard = bool(e_flags & _EF_ARM_ABI_FLOAT_HARD) if machine == "arm" else None
    return ElfInfo(machine=machine, bits=bits, hard_float=hard)

