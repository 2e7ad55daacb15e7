"""Build artifacts: the directory ``edgeq build`` writes and every later command (deploy, check, profile) reads.

Layout of ``build/NAME/``
-------------------------
``model.so``            the compiled program for the target board (``edgeq.compile.export_library``)
``host.so``             the same program compiled for this x86 host: the reference a board is compared with
                        (absent when the target is the host itself; then ``model.so`` is the reference)
``weights.safetensors`` the integer kernels' constants at their bit width (int4 packed two per byte), their
                        biases and requantization constants, keyed ``<layer>.<param>``
``plan.json``           the bit plan (``edgeq.bitplan`` format; integer builds only)
``model.onnx``          the exported model (QDQ for integer builds, plain float for ``--float``)
``golden.npz``          ``inputs`` float32 [n, 3, H, W] and ``outputs`` float32 [n, classes] of the reference library
``manifest.json``       written last; describes all of the above

``manifest.json`` (``format`` ``edgeq.artifact``, ``version`` 1)::

    {"format", "version", "name", "created", "precision": "int"|"float", "entry": "main", "batch": 1,
     "model": {"name", "checkpoint", "weights_sha256", "num_classes", "input_size", "mean", "std",
               "interpolation", "crop_pct", "crop_mode"},
     "target": {"name", "tvm", "host", "arch", "rpc_key", "kernel_family", "kernel_family_note"},
     "bits": {"default": {"w", "a"}, "layers": {name: {"w", "a"}}},
     "files": {file name: {"sha256", "bytes"}},
     "calibration": {"source", "sha256", "images", "seed"},
     "accuracy": {"data", "images", "fp_top1", "quant_top1", "compiled_top1", "agreement_compiled_vs_fakequant"},
     "golden": {"file", "count", "exact"  (, "atol" for float builds)},
     "weights": {"bytes", "expected_bytes", "by_layer": {layer: {"w", "params", "bytes", "expected_bytes"}}},
     "versions": {"edgeq", "tvm", "torch", "timm", "onnx", "python"},
     "digest": sha256 of the manifest itself}

``digest`` is the sha256 of the manifest's canonical JSON (sorted keys, no whitespace) without ``digest``, so a
hand-edited manifest is refused as surely as a changed library. :func:`load_artifact` re-hashes everything.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

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


def describe_files(folder: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{name: {"sha256", "bytes"}}`` for files in ``folder``: the manifest's ``files`` entry."""
    return {name: {"sha256": file_sha256(folder / name), "bytes": (folder / name).stat().st_size}
            for name in sorted(names)}


def manifest_digest(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Seal ``manifest`` with its digest and write it atomically as ``folder/manifest.json``."""
    sealed = {**manifest, "digest": None}
    sealed["digest"] = manifest_digest(sealed)
    return atomic_write_text(Path(folder) / MANIFEST, json.dumps(sealed, indent=2) + "\n")


@dataclass(frozen=True)
class Artifact:
    """A loaded (and, unless asked otherwise, verified) build directory."""

    dir: Path
    manifest: dict[str, Any]

    def path(self, name: str) -> Path:
        return self.dir / name

    @property
    def paths(self) -> dict[str, Path]:
        return {name: self.dir / name for name in self.manifest["files"]}

    @property
    def library(self) -> Path:
        """The library for the board."""
        return self.dir / LIBRARY

    @property
    def host_library(self) -> Path:
        """The library this machine runs as the reference: ``host.so``, or ``model.so`` for host builds."""
        return self.dir / (HOST_LIBRARY if HOST_LIBRARY in self.manifest["files"] else LIBRARY)

    @property
    def name(self) -> str:
        return str(self.manifest["name"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])

    @property
    def exact(self) -> bool:
        """Whether board outputs must equal the golden outputs bit for bit (integer builds)."""
        return bool(self.manifest["golden"].get("exact"))

    @property
    def target(self) -> dict[str, Any]:
        return self.manifest["target"]

    def golden(self):
        """``(inputs, outputs)`` of the golden batch as float32 numpy arrays."""
        import numpy as np

        with np.load(self.dir / self.manifest["golden"]["file"]) as data:
            return data["inputs"], data["outputs"]


def _check_file_name(name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", "..") \
            or name == MANIFEST:
        raise ArtifactError(f"manifest lists an invalid file name {name!r}")
    return name


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artifact {folder} does not exist (build it with `edgeq build --out {folder}`)")
    if not path.is_file():
        raise ArtifactError(f"{path} is missing: not an edgeq build directory, or the build did not finish")
    manifest = read_json(path, ArtifactError, "artifact manifest")
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
    return manifest


#: The type each field that later commands use must have (a re-sealed manifest is not trusted to have them).
_FIELD_TYPES = {"name": str, "precision": str, "entry": str, "batch": int, "model": dict, "target": dict,
                "bits": dict, "golden": dict, "versions": dict}
_NESTED_TYPES = {("golden", "file"): str, ("golden", "count"): int, ("target", "name"): str,
                 ("target", "arch"): str, ("model", "input_size"): list, ("model", "num_classes"): int}


def _check_field_types(manifest: dict[str, Any], path: Path) -> None:
    def wrong(field: str, expected: type, value: Any) -> ArtifactError:
        return ArtifactError(f"{path}: {field} must be {expected.__name__}, not {type(value).__name__}; "
                             "hand-edited: rebuild the artifact")

    for key, expected in _FIELD_TYPES.items():
        if not isinstance(manifest[key], expected) or isinstance(manifest[key], bool):
            raise wrong(key, expected, manifest[key])
    for (outer, inner), expected in _NESTED_TYPES.items():
        value = manifest[outer].get(inner)
        if value is not None and (not isinstance(value, expected) or isinstance(value, bool)):
            raise wrong(f"{outer}.{inner}", expected, value)
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
    manifest = _read_manifest(folder)
    files = manifest["files"]
    for name in files:
        _check_file_name(name)
    for name in REQUIRED_FILES + ((PLAN,) if manifest["precision"] == "int" else ()):
        if name not in files:
            raise ArtifactError(f"{folder / MANIFEST} does not list {name}: incomplete artifact, rebuild it")
    if verify:
        if manifest.get("digest") != manifest_digest(manifest):
            raise ArtifactError(f"{folder / MANIFEST} was modified after the build (its digest does not match); "
                                "rebuild the artifact")
        for name, entry in files.items():
            file = folder / name
            if file.is_symlink() or not file.is_file():  # a link could point anywhere: files live in the artifact
                raise ArtifactError(f"{file} is missing from the artifact or not a plain file; rebuild it")
            if file_sha256(file) != entry["sha256"]:
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


def _calibration(entry: dict[str, Any] | None) -> str:
    if not entry or not entry.get("source"):
        return "-"
    if entry["source"] == "synthetic":
        return "images synthesized from the model"
    return f"{entry.get('images')} images of {entry['source']} (seed {entry.get('seed')})"


def _kernel_family(target: dict[str, Any]) -> str:
    family = target.get("kernel_family") or "-"  # manifests written before the family was recorded
    note = target.get("kernel_family_note")
    return f"{family} ({note})" if note else family


def inspect_sections(manifest: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """The manifest as ``(title, column names, rows)`` tables of strings, for ``edgeq inspect``."""
    target = manifest["target"]
    model = manifest["model"]
    accuracy = manifest.get("accuracy") or {}
    weights = manifest.get("weights") or {}
    golden = manifest["golden"]
    default = manifest["bits"].get("default") or {}
    precision = manifest["precision"]
    if precision == "int":
        precision += f" (default w{default.get('w')}a{default.get('a')})"
    calibration = manifest.get("calibration") or {}
    summary = [
        ["name", str(manifest["name"])],
        ["created", str(manifest.get("created", "-"))],
        ["model", f"{model.get('name')}" + (f" ({model['checkpoint']})" if model.get("checkpoint") else "")],
        ["input", "x".join(str(v) for v in model.get("input_size", [])) + f", batch {manifest['batch']}"],
        ["target", f"{target.get('name')} ({target.get('arch')}), rpc key {target.get('rpc_key')}"],
        ["TVM target", json.dumps(target.get("tvm"), sort_keys=True)],
        ["kernel family", _kernel_family(target)],
        ["precision", precision],
        ["calibration", _calibration(calibration)],
        ["golden batch", f"{golden.get('count')} images in {golden.get('file')}, "
                         + ("bit-exact" if golden.get("exact") else f"atol {golden.get('atol')}")],
    ]
    sections = [("artifact", ["", ""], summary)]

    by_layer = weights.get("by_layer") or {}
    layer_bits = manifest["bits"].get("layers") or {}
    names = list(layer_bits) + [n for n in by_layer if n not in layer_bits]  # matmuls too: they have bits, no weights
    rows = []
    for name in names:
        bits = layer_bits.get(name, default)
        entry = by_layer.get(name, {})
        weighted = bool(entry) or not name.endswith(("matmul_qk", "matmul_av"))
        w = str(bits.get("w", "-")) if weighted else "-"
        if entry.get("stored_bits") not in (None, bits.get("w")):
            w += f" (as {entry['stored_bits']})"  # the kernels store 2-3 bit weights as int4, 5-7 bit as int8
        rows.append([name, w, str(bits.get("a", "-")),
                     str(entry.get("params", "-")),
                     _size(entry.get("bytes")), _size(entry.get("expected_bytes"))])
    if weights:
        ratio = weights["bytes"] / weights["expected_bytes"] if weights.get("expected_bytes") else None
        params = weights.get("params", sum(int(e.get("params", 0)) for e in by_layer.values()))
        rows.append(["total", "", "", str(params),
                     _size(weights.get("bytes")),
                     _size(weights.get("expected_bytes")) + (f" ({ratio:.3f}x)" if ratio else "")])
    if rows:
        sections.append(("layers", ["layer", "w", "a", "params", "bytes", "expected"], rows))

    if accuracy:
        images = f"{accuracy.get('images')} images of {accuracy.get('data')}"
        sections.append(("accuracy (top-1)", ["", ""], [
            ["data", images],
            ["float (PyTorch)", _percent(accuracy.get("fp_top1"))],
            ["fake-quant (PyTorch)", _percent(accuracy.get("quant_top1"))],
            ["compiled (host library)", _percent(accuracy.get("compiled_top1"))],
            ["agreement compiled vs fake-quant", _percent(accuracy.get("agreement_compiled_vs_fakequant"))],
        ]))
    sections.append(("files", ["file", "bytes", "sha256"],
                     [[name, _size(e.get("bytes")), str(e.get("sha256", ""))[:16]]
                      for name, e in manifest["files"].items()]))
    sections.append(("versions", ["", ""], [[k, str(v)] for k, v in (manifest.get("versions") or {}).items()]))
    return sections
