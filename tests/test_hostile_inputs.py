"""Every reader through the same hostile inputs: missing, empty, non-UTF-8 bytes, wrong types, deep nesting, huge,
and links to what is not a file. Each case must give one line on stderr (``edgeq: error: ...``), the reader's
documented exit code, and write nothing (no output file, no partial file)."""
from __future__ import annotations

import json
import os
import struct
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import pytest

from cli_runner import run_cli
from edgeq.compile import artifact as A
from test_artifact import make_artifact

NOT_UTF8 = b"\xff\xfe\x80 not text \xc3\x28"
DEEP_JSON = "[" * 100_000
DEEP_YAML = "a: " + "[" * 100_000
SMALL_LIMIT = "64"  # EDGEQ_MAX_TEXT_BYTES for the "huge" cases: a real input of any size above it is refused
TARGET_LIMIT = "4096"  # the same for commands that also read a bundled target file (targets/host.yaml)


#: a file's bytes, or a function making them when the test runs (some need a model)
Content = Union[bytes, Callable[[], bytes]]


@dataclass(frozen=True)
class Reader:
    """How to hand a reader a file: its file name, the command that reads it, and the exit code it owes."""

    file_name: str
    command: Callable[[Path, Path], list[str]]  # (input path, tmp folder) -> argv
    exit_code: int
    wrong_types: Optional[Content]  # well-formed content of the wrong shape
    huge: Optional[bytes]  # well-formed content above SMALL_LIMIT (text readers)
    text: bool = True
    deep: Optional[Content] = None  # deep nesting inside a binary format (text readers get DEEP_JSON/DEEP_YAML)
    not_cases: tuple[str, ...] = ()  # cases that are no error for this reader ("missing" for a new results folder)
    limit: str = SMALL_LIMIT  # EDGEQ_MAX_TEXT_BYTES for "huge": above the other text files the command reads


def quantize_with_plan(path: Path, tmp: Path) -> list[str]:
    return ["quantize", "--model", "edgeq/vit-cifar10", "--random-init", "--plan", str(path),
            "--out", str(tmp / "out" / "q.safetensors")]


def show_target(path: Path, tmp: Path) -> list[str]:
    return ["targets", str(path)]


def quantize_with_recipe(path: Path, tmp: Path) -> list[str]:
    return ["quantize", "--model", "edgeq/vit-cifar10", "--random-init", "--calib", str(path),
            "--out", str(tmp / "out" / "q.safetensors")]


def plan_with_latency_table(path: Path, tmp: Path) -> list[str]:
    return ["plan", "--model", "edgeq/vit-cifar10", "--random-init", "--calib", "unused", "--method", "random",
            "--budget", "latency-ms=3", "--latency-table", str(path), "--out", str(tmp / "out" / "plan.json")]


def inspect_manifest(path: Path, tmp: Path) -> list[str]:
    return ["inspect", str(path.parent)]


def eval_with_checkpoint(path: Path, tmp: Path) -> list[str]:
    return ["eval", "--model", "edgeq/vit-cifar10", "--checkpoint", str(path), "--data", str(path.parent),
            "--output", str(tmp / "out" / "r.json")]


def eval_on_image(path: Path, tmp: Path) -> list[str]:
    return ["eval", "--model", "edgeq/vit-cifar10", "--random-init", "--data", str(path.parent.parent),
            "--output", str(tmp / "out" / "r.json")]


def eval_on_archive(path: Path, tmp: Path) -> list[str]:
    return ["eval", "--model", "edgeq/vit-cifar10", "--random-init", "--data", str(path),
            "--output", str(tmp / "out" / "r.json")]


def eval_with_quantized(path: Path, tmp: Path) -> list[str]:
    return ["eval", "--model", "edgeq/vit-cifar10", "--quantized", str(path), "--data", str(path.parent),
            "--output", str(tmp / "out" / "r.json")]


def profile_into_results(path: Path, tmp: Path) -> list[str]:
    """`edgeq profile` into a results folder whose earlier results.json is the input under attack (read before
    any board is reached: the address given answers nothing)."""
    plan = path.parent.parent / "plan.json"
    plan.write_bytes(plan_json())
    return ["profile", "--target", "host", "--plans", str(plan), "--rpc", "127.0.0.1:9", "--out", str(path.parent)]


def build_with_tuning_db(path: Path, tmp: Path) -> list[str]:
    """`edgeq build --tuning-db DIR` with the database's record file under attack (its workload file is fine)."""
    (path.parent / "database_workload.json").touch()
    return ["build", "--target", "host", "--random-init", "--tuning-db", str(path.parent),
            "--out", str(tmp / "out" / "art")]


def quantized_metadata(layers_of: Callable[[list[str], str], object] | None = None, raw: str | None = None) -> bytes:
    """A safetensors file with edgeq's metadata for edgeq/vit-cifar10: its layers as ``layers_of(names, class)``
    makes them, or the metadata text ``raw``."""
    import io

    import torch
    from safetensors.torch import save

    from edgeq.models import create_model
    from edgeq.quant.convert import quantizable_layers
    from edgeq.quant.qmodel import FORMAT, FORMAT_VERSION

    if raw is None:
        model = create_model("edgeq/vit-cifar10", pretrained=False)
        model_class = f"{type(model).__module__}.{type(model).__qualname__}"
        raw = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, "model": {"class": model_class},
                          "layers": layers_of(quantizable_layers(model), model_class)})
    return save({"x": torch.zeros(1)}, metadata={"edgeq": raw})


def plan_json(padding: int = 0) -> bytes:
    return (json.dumps({"version": 1, "default": {"w": 8, "a": 8}, "layers": {}}) + " " * padding).encode()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in a few dozen bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def saved_list() -> bytes:
    """A real PyTorch file holding a list, not a state dict."""
    import io

    import torch

    buffer = io.BytesIO()
    torch.save([1, 2, 3], buffer)
    return buffer.getvalue()


def tar_without_classes() -> bytes:
    """A real .tar.gz holding one loose text file: no <class>/<image> tree."""
    import io

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("notes.txt")
        info.size = 5
        tar.addfile(info, io.BytesIO(b"hello"))
    return buffer.getvalue()


READERS = {
    "plan": Reader("plan.json", quantize_with_plan, 20,
                   wrong_types=b'{"version": 1, "default": "w8a8", "layers": []}', huge=plan_json(100)),
    "target": Reader("board.yaml", show_target, 60,
                     wrong_types=b"name: board\narch: aarch64\ntarget: {kind: llvm, mtriple: 5}\n",
                     huge=b"name: board\narch: aarch64\ntarget: {kind: llvm}\n" + b"#" * 100 + b"\n"),
    "target toolchain": Reader("board.yaml", show_target, 60,
                               wrong_types=b"name: board\narch: aarch64\ntarget: {kind: llvm, mtriple: "
                                           b"aarch64-linux-gnu}\ntoolchain: {compiler: [gcc, -O2]}\n", huge=None),
    "recipe": Reader("recipe.yaml", quantize_with_recipe, 13, wrong_types=b"data: cifar10/val.tar.gz\ncount: [1]\n",
                     huge=b"data: cifar10/val.tar.gz\n" + b"#" * 100 + b"\n"),
    "latency table": Reader("latency.json", plan_with_latency_table, 30, wrong_types=b'{"header": [], "layers": 5}',
                            huge=b'{"header": {}, "layers": {}}' + b" " * 100),
    "manifest": Reader("manifest.json", inspect_manifest, 40, wrong_types=None, huge=b"{}" + b" " * 100),
    "checkpoint": Reader("weights.pth", eval_with_checkpoint, 11, wrong_types=saved_list(), huge=None, text=False),
    "image": Reader("c0/0000.png", eval_on_image, 13, wrong_types=None, huge=png_header(20000, 10000), text=False),
    "archive": Reader("data.tar.gz", eval_on_archive, 13, wrong_types=tar_without_classes(), huge=None, text=False),
    # every layer present, with a string where bits go (used to fail deep inside PyTorch)
    "quantized model": Reader("q.safetensors", eval_with_quantized, 22, text=False, huge=None,
                              wrong_types=lambda: quantized_metadata(lambda names, _: {
                                  n: {"kind": "conv" if n == "patch_embed.proj" else "matmul" if "matmul" in n
                                      else "linear", "w_bits": "eight", "a_bits": 8} for n in names}),
                              deep=lambda: quantized_metadata(raw="[" * 100_000)),
    "profile results": Reader("results/results.json", profile_into_results, 1, not_cases=("missing",),
                              wrong_types=b'{"header": "rasp4", "rows": 5}',
                              huge=b'{"header": {}, "rows": []}' + b" " * 5000, limit=TARGET_LIMIT),
    # a record MetaSchedule's loader refuses (it names a workload the database does not have)
    "tuning database": Reader("db/database_tuning_record.json", build_with_tuning_db, 1, not_cases=("empty",),
                              wrong_types=b'[0, [[], [1.0], {"kind": "llvm"}, []]]\n', huge=b"\n" * 5000,
                              limit=TARGET_LIMIT),
}

CASES = ["missing", "empty", "not utf-8", "wrong types", "deep nesting", "huge", "link to a device",
         "dangling link"]


def place(reader: Reader, case: str, tmp: Path, monkeypatch) -> Optional[Path]:
    """Write ``case`` for ``reader`` under ``tmp``; None when the case does not apply to this reader."""
    path = tmp / "in" / reader.file_name
    path.parent.mkdir(parents=True)
    if reader.file_name == "manifest.json":  # a real artifact around the manifest under attack
        path.parent.rmdir()
        make_artifact(path.parent)
        path.unlink()
    content = {"empty": b"", "not utf-8": NOT_UTF8, "wrong types": reader.wrong_types, "huge": reader.huge,
               "deep nesting": (DEEP_YAML if reader.file_name.endswith(".yaml") else DEEP_JSON).encode()
               if reader.text else reader.deep}
    if case in reader.not_cases:
        return None
    if reader.file_name.endswith(".png"):
        if case == "missing":  # the data folder itself
            path.parent.rmdir()
            path.parent.parent.rmdir()
            return path
        from conftest import write_image_folder

        # nine good classes beside the one holding the hostile image
        write_image_folder(path.parent.parent, [f"c{i}" for i in range(1, 10)], per_class=1)
    if case == "missing":
        return path
    if case == "link to a device":
        path.symlink_to("/dev/zero")
        return path
    if case == "dangling link":
        path.symlink_to(tmp / "nowhere")
        return path
    if content[case] is None:
        return None
    if case == "huge" and reader.text:
        monkeypatch.setenv("EDGEQ_MAX_TEXT_BYTES", reader.limit)
    path.write_bytes(content[case]() if callable(content[case]) else content[case])
    return path


def written(tmp: Path) -> list[str]:
    """Everything under ``tmp`` that is not an input."""
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if "in" not in p.relative_to(tmp).parts[:1])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list(READERS))
def test_hostile_input(capsys, tmp_path, monkeypatch, name: str, case: str) -> None:
    reader = READERS[name]
    path = place(reader, case, tmp_path, monkeypatch)
    if path is None:
        pytest.skip(f"{case!r} does not apply to a {name}")
    code, _, err = run_cli(capsys, *reader.command(path, tmp_path))
    lines = err.strip().splitlines()
    assert code == reader.exit_code, err
    assert lines[-1].startswith("edgeq: error: ") and "Traceback" not in err, err
    assert len([line for line in lines if line.startswith("edgeq: error")]) == 1 and len(lines[-1]) < 600
    assert written(tmp_path) == []


def resealed(folder: Path, **changes) -> Path:
    """The artifact at ``folder`` with manifest fields changed and the digest recomputed (a careful forger)."""
    manifest = json.loads((folder / A.MANIFEST).read_text())
    for dotted, value in changes.items():
        outer, _, inner = dotted.partition("__")
        if inner:
            manifest[outer][inner] = value
        else:
            manifest[outer] = value
    A.write_manifest(folder, {k: v for k, v in manifest.items() if k != "digest"})
    return folder


@pytest.mark.parametrize("changes, message", [
    ({"golden__file": 5}, "golden.file must be str"),
    ({"golden__file": "../../outside.npz"}, "invalid file name"),
    ({"golden__file": "weights.safetensors.missing"}, "not one of the artifact's files"),
    ({"batch": "1"}, "batch must be int"),
    ({"target": ["rasp4"]}, "target must be dict"),
    ({"files": {"/etc/passwd": {"sha256": "00", "bytes": 1}}}, "invalid file name"),
    ({"precision": "fp16"}, "precision must be"),
    ({"accuracy": [99.0]}, "accuracy must be dict"),
    ({"weights__by_layer": ["head"]}, "malformed entry"),
])
def test_resealed_manifest_with_wrong_fields_is_refused(capsys, tmp_path, changes, message) -> None:
    folder = resealed(make_artifact(tmp_path / "art"), **changes)
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert code == 40 and message in err and len(err.strip().splitlines()) == 1


def test_an_artifact_file_replaced_by_a_link_is_refused(capsys, tmp_path) -> None:
    folder = make_artifact(tmp_path / "art")
    outside = tmp_path / "elsewhere.so"
    outside.write_bytes((folder / A.LIBRARY).read_bytes())  # same bytes, same sha256: only the link is wrong
    (folder / A.LIBRARY).unlink()
    (folder / A.LIBRARY).symlink_to(outside)
    code, _, err = run_cli(capsys, "inspect", str(folder))
    assert code == 40 and "not a plain file" in err


def test_a_non_tar_archive_error_is_one_line(capsys, tmp_path) -> None:
    archive = tmp_path / "data.tar.gz"
    with tarfile.open(tmp_path / "real.tar", "w"):
        pass
    archive.write_bytes(b"\x1f\x8b" + os.urandom(200))  # a gzip magic and noise
    code, _, err = run_cli(capsys, "eval", "--model", "edgeq/vit-cifar10", "--random-init", "--data", str(archive))
    assert code == 13 and len(err.strip().splitlines()) == 1


def test_a_yaml_tag_is_refused_in_one_line(capsys, tmp_path) -> None:
    board = tmp_path / "board.yaml"
    board.write_text('name: board\narch: aarch64\ntarget: !!python/object/apply:os.system ["touch pwned"]\n')
    code, _, err = run_cli(capsys, "targets", str(board))
    assert code == 60 and len(err.strip().splitlines()) == 1 and "line 3" in err
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize("argv", [["build"], ["eval", "--model"], ["board", "start"], ["nope"],
                                  ["eval", "--model", "m", "--data", "d", "--limit", "0"]])
def test_usage_errors_are_one_line(capsys, argv) -> None:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("edgeq: error: ")
    assert "--help" in err


def test_a_deeply_nested_json_target_on_the_command_line_is_one_line(capsys) -> None:
    code, _, err = run_cli(capsys, "targets", "{\"kind\": " + "[" * 50_000 + "]" * 50_000 + "}")
    assert code == 60 and len(err.strip().splitlines()) == 1 and "nested too deeply" in err


@pytest.mark.parametrize("argv", [
    ["eval", "--model", "M", "--random-init", "--data", "{missing}"],
    ["eval", "--model", "M", "--data", "{tmp}", "--quantized", "{missing}"],
    ["quantize", "--model", "M", "--random-init", "--calib", "{missing}", "--out", "{tmp}/q.safetensors"],
    ["plan", "--model", "M", "--random-init", "--calib", "{missing}", "--budget", "avg-bits=6",
     "--out", "{tmp}/p.json"],
    ["build", "--model", "M", "--random-init", "--calib", "{missing}", "--target", "host", "--out", "{tmp}/art"],
    ["build", "--model", "M", "--random-init", "--eval-data", "{missing}", "--target", "host",
     "--out", "{tmp}/art"],
])
def test_missing_inputs_are_refused_before_the_model_loads(capsys, tmp_path, monkeypatch, argv) -> None:
    """Cheap checks first: loading a model takes seconds (a large timm model, a minute)."""
    import edgeq.compile.build
    import edgeq.cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(edgeq.cli, "load_model_option", no_loading)
    monkeypatch.setattr(edgeq.compile.build, "load_model", no_loading)
    monkeypatch.setenv("EDGEQ_DATA", str(tmp_path))
    values = {"{missing}": str(tmp_path / "missing"), "{tmp}": str(tmp_path), "M": "edgeq/vit-cifar10"}
    argv = [values.get(a, a.replace("{tmp}", str(tmp_path))) for a in argv]
    code, _, err = run_cli(capsys, *argv)
    assert code in (13, 22) and "does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
