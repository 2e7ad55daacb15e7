"""Build artifacts: the directory ``edgeq build`` writes and every later command (deploy, check, profile) reads.

Layout of ``build/NAME/``
-------------------------
``model.so``            the compiled program for the target board (``edgeq.compile.library.export_library``)
``host.so``             the same program compiled for this x86 host: the reference a board is compared with
                        (absent when the target is the host itself; then ``model.so`` is the reference)
``weights.safetensors`` the integer kernels' constants at their bit width (int4 packed two per byte), their
                        biases and requantization constants, keyed ``<layer>.<param>``
``plan.json``           the bit plan (``edgeq.bitplan`` format; integer builds only)
``model.onnx``          the exported model (QDQ for integer builds, plain float for ``--float``)
``golden.npz``          ``inputs`` float32 [n, 3, H, W] and ``outputs`` float32 [n, classes] of the reference library
``manifest.json``       written last; describes all of the above

``manifest.json`` (``format`` ``edgeq.compile.artifact``, ``version`` 1) is a :class:`Manifest`::

    {"format", "version", "name", "created", "precision": "int"|"float", "entry": "main", "batch": 1,
     "model": {"name", "checkpoint", "weights_sha256", "num_classes", "input_size", "mean", "std",
               "interpolation", "crop_pct", "crop_mode"},
     "target": {"name", "tvm", "host", "arch", "rpc_key", "device", "reference" (the TVM target of the library
                the golden outputs come from), "kernel_family", "kernel_family_note"},
     "bits": {"default": {"w", "a"}, "layers": {name: {"w", "a"}}},
     "method": quantization method (null for float builds),
     "reconstruction": {"method", "iters", "batch_size", "drop_prob", "seed", "images", "seconds"} or null,
     "files": {file name: {"sha256", "bytes"}},
     "calibration": {"source", "sha256", "images", "seed"} or null (float builds),
     "accuracy": {"data", "images", "fp_top1", "quant_top1", "compiled_top1", "agreement_compiled_vs_fakequant"}
                 or null (no evaluation data),
     "golden": {"file", "count", "exact"  (, "atol" for float builds)},
     "weights": {"bytes", "expected_bytes", "params", "other_bytes" (constants of no layer),
                 "by_layer": {layer: {"w", "stored_bits", "params", "bytes", "expected_bytes"}}},
     "versions": {"edgeq", "tvm", "torch", "timm", "onnx", "python"},
     "tuning": {"database", "sha256", "applied": [PrimFunc names]} or null (no --tuning-db),
     "digest": sha256 of the manifest itself}

``digest`` is the sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without ``digest``, so a
hand-edited manifest is refused as surely as a changed library. :func:`load_artifact` re-hashes everything.
Manifests written before ``method``, ``tuning``, ``reconstruction`` or the target's ``device``/``reference``
were recorded load with those fields None.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from edgeq.errors import ArtifactError
from edgeq.fileio import atomic_write_text, file_sha256, read_json

FORMAT = "edgeq.artifact"
VERSION = 1
MANIFEST = "manifest.json"
LIBRARY = "model.so"
HOST_LIBRARY = "host.so"
WEIGHTS = "weights.safetensors"
PLAN = "plan.json"
ONNX = "model.onnx"
GOLDEN = "golden.npz"

#: Keys every version-1 manifest has; a manifest without one of them is refused.
REQUIRED_KEYS = ("format", "version", "name", "precision", "entry", "batch", "model", "target", "bits", "files",
                 "golden", "versions", "digest")
#: Files every artifact holds (``host.so`` too unless the target is the host; ``plan.json`` in integer builds).
REQUIRED_FILES = (LIBRARY, WEIGHTS, ONNX, GOLDEN)


# --- the manifest ------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, _Section):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


class _Section:
    """A manifest entry of named fields: read from its JSON object (fields it lacks are None, others ignored)."""

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        return cls(**{f.name: data.get(f.name) for f in fields(cls)})

    def to_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in fields(self)}


@dataclass(frozen=True)
class ModelInfo(_Section):
    """The float model built and timm's eval preprocessing of it (its data config at build time)."""

    name: Optional[str] = None
    checkpoint: Optional[str] = None
    weights_sha256: Optional[str] = None  # None: random or hub weights
    num_classes: Optional[int] = None
    input_size: Optional[list] = None
    mean: Optional[list] = None
    std: Optional[list] = None
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None
    crop_mode: Optional[str] = None

    def data_config(self) -> dict[str, Any]:
        """The data config images for this artifact are preprocessed with (``edgeq.data.load_image_folder``)."""
        config = {"input_size": tuple(self.input_size), "mean": tuple(self.mean), "std": tuple(self.std),
                  "interpolation": self.interpolation or "bicubic",
                  "crop_pct": 1.0 if self.crop_pct is None else self.crop_pct}
        if self.crop_mode:
            config["crop_mode"] = self.crop_mode
        return config


@dataclass(frozen=True)
class TargetInfo(_Section):
    """The board the library is built for."""

    name: Optional[str] = None
    tvm: Optional[dict] = None             # the TVM target JSON
    host: Optional[dict] = None            # its host target JSON, if any
    arch: Optional[str] = None
    rpc_key: Optional[str] = None
    device: Optional[str] = None           # cpu, cuda, opencl, vulkan
    reference: Optional[dict] = None       # the TVM target of the library the golden outputs come from
    kernel_family: Optional[str] = None
    kernel_family_note: Optional[str] = None


@dataclass(frozen=True)
class Bits(_Section):
    """Bit widths: ``{"w", "a"}`` by default and per quantized layer (32/32 and no layers for float builds)."""

    default: dict = field(default_factory=dict)
    layers: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Bits":
        return cls(default=dict(data.get("default") or {}), layers=dict(data.get("layers") or {}))


@dataclass(frozen=True)
class FileEntry(_Section):
    sha256: Optional[str] = None
    bytes: Optional[int] = None


@dataclass(frozen=True)
class Calibration(_Section):
    source: Optional[str] = None           # "synthetic", a data set, or a recipe and its data
    sha256: Optional[str] = None
    images: Optional[int] = None
    seed: Optional[int] = None


@dataclass(frozen=True)
class Accuracy(_Section):
    """Top-1 in percent on the build's evaluation images."""

    data: Optional[str] = None
    images: Optional[int] = None
    fp_top1: Optional[float] = None
    quant_top1: Optional[float] = None
    compiled_top1: Optional[float] = None
    agreement_compiled_vs_fakequant: Optional[float] = None


@dataclass(frozen=True)
class Golden(_Section):
    file: Optional[str] = None
    count: Optional[int] = None
    exact: Optional[bool] = None           # integer builds: outputs must match bit for bit
    atol: Optional[float] = None           # float builds: the tolerance they must match within

    def to_json(self) -> dict[str, Any]:
        body = super().to_json()
        if self.atol is None:
            del body["atol"]
        return body


@dataclass(frozen=True)
class LayerWeights(_Section):
    w: Optional[int] = None
    stored_bits: Optional[int] = None      # the kernels store 2-3 bit weights as int4, 5-7 bit as int8
    params: Optional[int] = None
    bytes: Optional[int] = None
    expected_bytes: Optional[int] = None   # params x w / 8 plus the per-channel constants


@dataclass(frozen=True)
class Weights(_Section):
    """Bytes stored in ``weights.safetensors`` against the expected params x bits / 8 plus scales."""

    bytes: Optional[int] = None
    expected_bytes: Optional[int] = None
    params: Optional[int] = None
    other_bytes: Optional[int] = None
    by_layer: dict = field(default_factory=dict)  # layer -> LayerWeights

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Weights":
        by_layer = {name: LayerWeights.from_json(entry) for name, entry in (data.get("by_layer") or {}).items()}
        return cls(**{**{f.name: data.get(f.name) for f in fields(cls)}, "by_layer": by_layer})


@dataclass(frozen=True)
class Reconstruction(_Section):
    method: Optional[str] = None
    iters: Optional[int] = None
    batch_size: Optional[int] = None
    drop_prob: Optional[float] = None
    seed: Optional[int] = None
    images: Optional[int] = None
    seconds: Optional[float] = None


@dataclass(frozen=True)
class Tuning(_Section):
    database: Optional[str] = None
    sha256: Optional[str] = None
    applied: Optional[list] = None         # the PrimFuncs that took a tuned schedule


#: The manifest's optional entries and their types (None when absent).
_OPTIONAL_SECTIONS = {"calibration": Calibration, "accuracy": Accuracy, "weights": Weights,
                      "reconstruction": Reconstruction, "tuning": Tuning}


@dataclass(frozen=True)
class Manifest:
    """``manifest.json``, the schema of the module doc; :meth:`from_json` refuses what later commands cannot use."""

    name: str
    precision: str                          # "int" or "float"
    model: ModelInfo
    target: TargetInfo
    bits: Bits
    golden: Golden
    files: dict = field(default_factory=dict)  # file name -> FileEntry
    versions: dict = field(default_factory=dict)
    created: Optional[str] = None
    entry: str = "main"
    batch: int = 1
    method: Optional[str] = None
    reconstruction: Optional[Reconstruction] = None
    calibration: Optional[Calibration] = None
    accuracy: Optional[Accuracy] = None
    weights: Optional[Weights] = None
    tuning: Optional[Tuning] = None
    digest: Optional[str] = None
    format: str = FORMAT
    version: int = VERSION

    @property
    def exact(self) -> bool:
        """Whether board outputs must equal the golden outputs bit for bit (integer builds)."""
        return bool(self.golden.exact)

    @property
    def atol(self) -> float:
        """The tolerance outputs are compared with when not :attr:`exact`."""
        return float(self.golden.atol or 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "version": self.version, "name": self.name, "created": self.created,
            "precision": self.precision, "entry": self.entry, "batch": self.batch,
            "model": self.model.to_json(), "target": self.target.to_json(), "bits": self.bits.to_json(),
            "method": self.method, "reconstruction": _plain(self.reconstruction), "files": _plain(self.files),
            "calibration": _plain(self.calibration), "accuracy": _plain(self.accuracy),
            "golden": self.golden.to_json(), "weights": _plain(self.weights), "versions": dict(self.versions),
            "tuning": _plain(self.tuning), "digest": self.digest,
        }

    @classmethod
    def from_json(cls, data: Any, where: str | os.PathLike = MANIFEST) -> "Manifest":
        """The manifest in ``data`` (parsed JSON); :class:`ArtifactError` naming ``where`` in one line for another
        format or version, a missing key, or a field of the wrong type."""
        _check_manifest(data, Path(where))
        sections = {}
        for key, section in _OPTIONAL_SECTIONS.items():
            value = data.get(key)
            if value is not None and not isinstance(value, dict):
                raise _wrong_type(Path(where), key, dict, value)
            sections[key] = value
        try:
            return cls._parse(data, sections)
        except (AttributeError, TypeError, ValueError) as err:
            raise ArtifactError(f"{where}: malformed entry ({err}); hand-edited: rebuild the artifact") from None

    @classmethod
    def _parse(cls, data: dict[str, Any], sections: dict[str, Any]) -> "Manifest":
        sections = {key: None if value is None else _OPTIONAL_SECTIONS[key].from_json(value)
                    for key, value in sections.items()}
        return cls(name=data["name"], precision=data["precision"], model=ModelInfo.from_json(data["model"]),
                   target=TargetInfo.from_json(data["target"]), bits=Bits.from_json(data["bits"]),
                   golden=Golden.from_json(data["golden"]),
                   files={name: FileEntry.from_json(entry) for name, entry in data["files"].items()},
                   versions=dict(data["versions"]), created=data.get("created"), entry=data["entry"],
                   batch=data["batch"], method=data.get("method"), digest=data.get("digest"),
                   format=data["format"], version=data["version"], **sections)


def describe_files(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for files in ``folder``: the manifest's ``files`` entry."""
    return {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in sorted(names)}


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: Manifest | Mapping[str, Any]) -> Path:
    """Seal ``manifest`` with its digest and write it atomically as ``folder/manifest.json``."""
    sealed = {**(manifest.to_json() if isinstance(manifest, Manifest) else manifest), "digest": None}
    sealed["digest"] = manifest_digest(sealed)
    return atomic_write_text(Path(folder) / MANIFEST, json.dumps(sealed, indent=2) + "\n")


@dataclass(frozen=True)
class Artifact:
    """A loaded (and, unless asked otherwise, verified) build directory."""

    dir: Path
    manifest: Manifest

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def paths(self) -> dict[str, Path]:
        return {name: self.dir / name for name in self.manifest.files}

    @property
    def library(self) -> Path:
        """The library for the board."""
        return self.dir / LIBRARY

    @property
    def host_library(self) -> Path:
        """The library this machine runs as the reference: ``host.so``, or ``model.so`` for host builds."""
        return self.dir / (HOST_LIBRARY if HOST_LIBRARY in self.manifest.files else LIBRARY)

    @property
    def name(self) -> str:
        return str(self.manifest.name)

    @property
    def precision(self) -> str:
        return str(self.manifest.precision)

    @property
    def exact(self) -> bool:
        """Whether board outputs must equal the golden outputs bit for bit (integer builds)."""
        return self.manifest.exact

    @property
    def target(self) -> TargetInfo:
        return self.manifest.target

    def golden(self):
        """``(inputs, outputs)`` of the golden batch as float32 numpy arrays."""
        import numpy as np

        with np.load(self.dir / self.manifest.golden.file) as data:
            return data["inputs"], data["outputs"]


def _check_file_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or name == MANIFEST:
        raise ArtifactError(f"manifest lists an invalid file name {name!r}")
    return name


def _read_manifest(folder: Path) -> tuple[dict[str, Any], Manifest]:
    """The manifest in ``folder`` as read (for its digest) and as a :class:`Manifest`."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artifact {folder} does not exist (build it with `edgeq build --out {folder}`)")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not an edgeq build directory, or the build did not finish")
    data = read_json(path, ArtifactError, "artifact manifest")
    return data, Manifest.from_json(data, path)


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path} is not an edgeq artifact manifest (format {FORMAT!r} expected)")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: artifact version {manifest.get('version')!r} is not supported "
                            f"(this edgeq reads version {VERSION}); rebuild it with `edgeq build`")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks {', '.join(missing)}: hand-edited or truncated; rebuild it")
    if not isinstance(manifest["files"], dict):
        raise ArtifactError(f"{path}: 'files' must map file names to their sha256 and size")
    _check_field_types(manifest, path)


#: The type each field that later commands use must have (a re-sealed manifest is not trusted to have them).
_FIELD_TYPES = {"name": str, "precision": str, "entry": str, "batch": int, "model": dict, "target": dict,
                "bits": dict, "golden": dict, "versions": dict}
_NESTED_TYPES = {("golden", "file"): str, ("golden", "count"): int, ("target", "name"): str,
                 ("target", "arch"): str, ("model", "input_size"): list, ("model", "num_classes"): int}


def _wrong_type(path: Path, field_name: str, expected: type, value: Any) -> ArtifactError:
    return ArtifactError(f"{path}: {field_name} must be {expected.__name__}, not {type(value).__name__}; "
                         "hand-edited: rebuild the artifact")


def _check_field_types(manifest: dict[str, Any], path: Path) -> None:
    for key, expected in _FIELD_TYPES.items():
        if not isinstance(manifest[key], expected) or isinstance(manifest[key], bool):
            raise _wrong_type(path, key, expected, manifest[key])
    for (outer, inner), expected in _NESTED_TYPES.items():
        value = manifest[outer].get(inner)
        if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            raise _wrong_type(path, f"{outer}.{inner}", expected, value)
    if manifest["precision"] not in ("int", "float"):
        raise ArtifactError(f"{path}: precision must be 'int' or 'float', not {manifest['precision']!r}")
    for name, entry in manifest["files"].items():
        _check_file_name(name)
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
            raise ArtifactError(f"{path}: entry for {name} has no sha256")
    golden = manifest["golden"].get("file")
    if _check_file_name(golden) not in manifest["files"]:
        raise ArtifactError(f"{path}: the golden file {golden!r} is not one of the artifact's files")


def load_artifact(path: str | os.PathLike, *, verify: bool = True) -> Artifact:
    """The artifact in ``path``; with ``verify`` every file's sha256 (and the manifest's own digest) is checked.

    Raises :class:`ArtifactError` with one line naming the file for a missing directory or manifest, an unknown
    format or version, a manifest that was edited by hand, and a missing, changed or unexpected file.
    """
    folder = Path(path)
    data, manifest = _read_manifest(folder)
    files = manifest.files
    for name in REQUIRED_FILES + ((PLAN,) if manifest.precision == "int" else ()):
        if name not in files:
            raise ArtifactError(f"{folder / MANIFEST} does not list {name}: incomplete artifact, rebuild it")
    if verify:
        if data.get("digest") != manifest_digest(data):
            raise ArtifactError(f"{folder / MANIFEST} was modified after the build (its digest does not match); "
                                "rebuild the artifact")
        for name, entry in files.items():
            file = folder / name
            if file.is_symlink() or not file.is_file():  # a link could point anywhere: files live in the artifact
                raise ArtifactError(f"{file} is missing from the artifact or not a plain file; rebuild it")
            if file_sha256(file) != entry.sha256:
                raise ArtifactError(f"{file} does not match its sha256 in the manifest (corrupt or modified); "
                                    "rebuild the artifact")
    return Artifact(dir=folder, manifest=manifest)


# --- what `edgeq inspect` shows ----------------------------------------------------------------------------------

def _percent(value: Any) -> str:
    return "-" if value is None else f"{value:.2f} %"


def _size(count: Any) -> str:
    if count is None:
        return "-"
    count = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def _calibration(entry: Calibration | None) -> str:
    if entry is None or not entry.source:
        return "-"
    if entry.source == "synthetic":
        return "images synthesized from the model"
    return f"{entry.images} images of {entry.source} (seed {entry.seed})"


def _kernel_family(target: TargetInfo) -> str:
    family = target.kernel_family or "-"  # manifests written before the family was recorded
    note = target.kernel_family_note
    return f"{family} ({note})" if note else family


def _layer_rows(manifest: Manifest) -> list[list[str]]:
    weights = manifest.weights
    by_layer = weights.by_layer if weights is not None else {}
    default = manifest.bits.default
    layer_bits = manifest.bits.layers
    names = list(layer_bits) + [n for n in by_layer if n not in layer_bits]  # matmuls too: they have bits, no weights
    rows = []
    for name in names:
        bits = layer_bits.get(name, default)
        entry = by_layer.get(name) or LayerWeights()
        weighted = name in by_layer or not name.endswith(("matmul_qk", "matmul_av"))
        w = str(bits.get("w", "-")) if weighted else "-"
        if entry.stored_bits not in (None, bits.get("w")):
            w += f" (as {entry.stored_bits})"  # the kernels store 2-3 bit weights as int4, 5-7 bit as int8
        rows.append([name, w, str(bits.get("a", "-")), str("-" if entry.params is None else entry.params),
                     _size(entry.bytes), _size(entry.expected_bytes)])
    if weights is not None:
        ratio = weights.bytes / weights.expected_bytes if weights.expected_bytes else None
        params = weights.params if weights.params is not None else sum(int(e.params or 0) for e in by_layer.values())
        rows.append(["total", "", "", str(params), _size(weights.bytes),
                     _size(weights.expected_bytes) + (f" ({ratio:.3f}x)" if ratio else "")])
    return rows


def inspect_sections(manifest: Manifest) -> list[tuple[str, list[str], list[list[str]]]]:
    """The manifest as ``(title, column names, rows)`` tables of strings, for ``edgeq inspect``."""
    target, model, golden = manifest.target, manifest.model, manifest.golden
    default = manifest.bits.default
    precision = manifest.precision
    if precision == "int":
        precision += f" (default w{default.get('w')}a{default.get('a')})"
    summary = [
        ["name", str(manifest.name)],
        ["created", "-" if manifest.created is None else str(manifest.created)],
        ["model", f"{model.name}" + (f" ({model.checkpoint})" if model.checkpoint else "")],
        ["input", "x".join(str(v) for v in model.input_size or []) + f", batch {manifest.batch}"],
        ["target", f"{target.name} ({target.arch}), rpc key {target.rpc_key}"],
        ["TVM target", json.dumps(target.tvm, sort_keys=True)],
        ["kernel family", _kernel_family(target)],
        ["precision", precision],
        ["calibration", _calibration(manifest.calibration)],
        ["golden batch", f"{golden.count} images in {golden.file}, "
                         + ("bit-exact" if golden.exact else f"atol {golden.atol}")],
    ]
    sections = [("artifact", ["", ""], summary)]
    rows = _layer_rows(manifest)
    if rows:
        sections.append(("layers", ["layer", "w", "a", "params", "bytes", "expected"], rows))
    accuracy = manifest.accuracy
    if accuracy is not None:
        sections.append(("accuracy (top-1)", ["", ""], [
            ["data", f"{accuracy.images} images of {accuracy.data}"],
            ["float (PyTorch)", _percent(accuracy.fp_top1)],
            ["fake-quant (PyTorch)", _percent(accuracy.quant_top1)],
            ["compiled (host library)", _percent(accuracy.compiled_top1)],
            ["agreement compiled vs fake-quant", _percent(accuracy.agreement_compiled_vs_fakequant)],
        ]))
    sections.append(("files", ["file", "bytes", "sha256"],
                     [[name, _size(e.bytes), str(e.sha256 or "")[:16]] for name, e in manifest.files.items()]))
    sections.append(("versions", ["", ""], [[k, str(v)] for k, v in manifest.versions.items()]))
    return sections
