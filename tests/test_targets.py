"""Board YAML files, target resolution (names, paths, TVM tags, JSON) and cross-compilation for the boards."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli
from edgeq.compile.library import build, export_for_target, export_library
from edgeq.errors import EdgeqError
from edgeq.errors import TargetError, ToolchainMissingError
from edgeq.lower.kernels.micro import kernel_family
from edgeq.compile.targets import (TargetSpec, as_tvm_target, elf_info, list_targets, load_target, target_coercions,
                           targets_dir)

BOARDS = {"rasp4", "rasp4-32", "rasp5", "orion-o6", "jetson-orin-nano", "jetson-nano", "mali", "host"}


def tiny_relax_module(seed: int = 0):
    """y = x @ w + b with x (4, 8): builds in a fraction of a second for any target. Returns (mod, w, b)."""
    from tvm import relax

    rng = np.random.default_rng(seed)
    w = rng.standard_normal((8, 16)).astype("float32")
    b = rng.standard_normal((16,)).astype("float32")
    weight, bias = relax.const(w), relax.const(b)
    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([4, 8], "float32"))
    with builder.function("main", [x]):
        with builder.dataflow():
            y = builder.emit(relax.op.add(relax.op.matmul(x, weight), bias))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    return builder.get(), w, b


def describe_file(path: Path) -> str:
    if shutil.which("file") is None:
        pytest.skip("the `file` command is missing (deploy/install-host-tools.sh installs it)")
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout


def needs(compiler: str) -> None:
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} missing: run deploy/install-host-tools.sh")


# ----------------------------------------------------------------------------------------------------------------
# The board files


def test_every_expected_board_has_a_yaml() -> None:
    assert BOARDS <= set(list_targets())
    assert list_targets() == sorted(list_targets())


@pytest.mark.parametrize("name", sorted(BOARDS))
def test_board_yaml_is_complete(name: str) -> None:
    spec = load_target(name)
    assert isinstance(spec, TargetSpec)
    assert spec.name == name and spec.description
    assert spec.source == str(targets_dir() / f"{name}.yaml")
    assert spec.arch in ("aarch64", "armhf", "x86_64")
    assert spec.rpc_key == name
    assert spec.toolchain.package, "each board names the Debian package of its toolchain"
    for field in ("os", "python", "apt", "pip", "notes"):
        assert field in spec.requirements, f"{name}: board.{field} missing"
    json.loads(spec.target_json)
    assert spec.tvm_target() is not None
    summary = spec.summary()
    assert summary["name"] == name and summary["target"] == spec.target
    hash(spec)  # frozen and hashable


def test_raspberry_pi_targets() -> None:
    rasp4, rasp5, rasp4_32 = load_target("rasp4"), load_target("rasp5"), load_target("rasp4-32")
    assert rasp4.target == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
                            "mattr": ["+neon"], "num-cores": 4}
    assert rasp4.toolchain.compiler == "aarch64-linux-gnu-gcc" and rasp4.toolchain.package == "gcc-aarch64-linux-gnu"
    assert not rasp4.tvm_target().features.has_dotprod
    assert rasp5.tvm_target().features.has_dotprod
    assert rasp5.target["mcpu"] == "cortex-a76"
    assert rasp4_32.arch == "armhf" and rasp4_32.target["mfloat-abi"] == "hard"
    assert rasp4_32.toolchain.compiler == "arm-linux-gnueabihf-gcc"
    assert rasp4_32.toolchain.package == "gcc-arm-linux-gnueabihf"
    assert not rasp4.is_gpu and rasp4.device_kind == "cpu" and rasp4.host is None


@pytest.mark.parametrize("name, kind, arch", [("jetson-orin-nano", "cuda", "sm_87"), ("jetson-nano", "cuda", "sm_53"),
                                              ("mali", "opencl", None)])
def test_gpu_boards_have_an_aarch64_host(name: str, kind: str, arch: str | None) -> None:
    spec = load_target(name)
    assert spec.kind == kind and spec.is_gpu and spec.device_kind == kind
    assert spec.host["mtriple"] == "aarch64-linux-gnu" and spec.arch == "aarch64"
    if arch:
        assert spec.target["arch"] == arch
    else:
        assert "mali" in spec.target["keys"]
    target = spec.tvm_target()
    assert target.host is not None and str(target.host.attrs["mtriple"]) == "aarch64-linux-gnu"


def test_host_board_is_filled_in_from_this_machine() -> None:
    spec = load_target("host")
    assert spec.arch == "x86_64"
    assert spec.target["mcpu"] not in ("native", "", None)
    assert isinstance(spec.target["num-cores"], int) and spec.target["num-cores"] >= 1
    assert spec.toolchain.compiler is None


# ----------------------------------------------------------------------------------------------------------------
# Other ways to name a target


def test_target_coercions_are_counted_by_what_was_coerced() -> None:
    spec = load_target("rasp4")
    target_coercions(reset=True)
    tvm_target = spec.tvm_target()
    assert as_tvm_target(tvm_target) is tvm_target  # a Target passes through: not a coercion
    as_tvm_target({"kind": "llvm"})
    as_tvm_target("llvm")  # no board, tag or JSON of that name: TVM's own parse of the string
    # the spec made its Target when load_target validated it, and keeps it
    assert target_coercions(reset=True) == {"dict": 1, "string": 1}
    assert target_coercions() == {}


def test_unknown_target_lists_the_known_boards() -> None:
    with pytest.raises(TargetError) as caught:
        load_target("rasp9")
    message = str(caught.value)
    assert caught.value.exit_code == 60 and isinstance(caught.value, EdgeqError)
    for name in BOARDS:
        assert name in message
    assert "did you mean" in message and "JSON" in message


def test_json_target_string() -> None:
    spec = load_target('{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53", "num-cores": 4}')
    assert spec.arch == "aarch64" and spec.source == "json"
    assert spec.toolchain.compiler == "aarch64-linux-gnu-gcc" and spec.toolchain.package == "gcc-aarch64-linux-gnu"
    assert spec.target["mcpu"] == "cortex-a53"


def test_json_target_with_host() -> None:
    spec = load_target(json.dumps({"kind": "cuda", "arch": "sm_72",
                                   "host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "carmel"}}))
    assert spec.is_gpu and spec.arch == "aarch64" and spec.host["mcpu"] == "carmel"
    assert "host" not in spec.target


def test_json_armhf_target_gets_the_hard_float_abi() -> None:
    spec = load_target('{"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf", "mattr": ["+neon"]}')
    assert spec.arch == "armhf" and spec.target["mfloat-abi"] == "hard"


@pytest.mark.parametrize("tag, arch", [("arm/rasp4b64", "aarch64"), ("arm/rasp4b", "armhf"),
                                       ("nvidia/jetson-orin-nano", "aarch64")])
def test_tvm_tags(tag: str, arch: str) -> None:
    spec = load_target(tag)
    assert spec.arch == arch and spec.source == f"tag:{tag}"
    assert not any(key.startswith("feature.") for key in spec.target)
    spec.tvm_target()


def test_yaml_path(tmp_path: Path) -> None:
    text = (targets_dir() / "rasp4.yaml").read_text().replace("name: rasp4\n", "name: my-pi\n")
    path = tmp_path / "my-pi.yaml"
    path.write_text(text)
    spec = load_target(str(path))
    assert spec.name == "my-pi" and spec.rpc_key == "rasp4" and spec.source == str(path)


@pytest.mark.parametrize(
    "edit, expected",
    [
        (lambda d: d.pop("target"), "missing 'target'"),
        (lambda d: d.update(name="other"), "differs from the file name"),
        (lambda d: d.update(colour="red"), "unknown keys"),
        (lambda d: d.update(arch="mips"), "arch 'mips'"),
        (lambda d: d.update(arch="armhf"), "disagrees with the triple"),
        (lambda d: d["target"].update(mcpu="cortex-z99"), "does not know the CPU"),
        (lambda d: d["target"].update(kind="nonsense"), "TVM refuses the target"),
        (lambda d: d.update(toolchain={"compiler": "gcc", "options": "-O2"}), "list of strings"),
        (lambda d: d.update(target='{"kind": '), "not valid JSON"),
    ],
)
def test_malformed_board_files(tmp_path: Path, edit, expected: str) -> None:
    import yaml

    data = yaml.safe_load((targets_dir() / "rasp4.yaml").read_text())
    data["name"] = "broken"
    edit(data)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TargetError, match=expected):
        load_target(path)


def test_missing_yaml_file_and_empty_name(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match="does not exist"):
        load_target(tmp_path / "nope.yaml")
    with pytest.raises(TargetError, match="empty target"):
        load_target("  ")


def test_targets_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lab-board.yaml").write_text((targets_dir() / "rasp5.yaml").read_text().replace("name: rasp5", "name: lab-board"))
    monkeypatch.setenv("EDGEQ_TARGETS_DIR", str(tmp_path))
    assert list_targets() == ["lab-board"]
    assert load_target("lab-board").target["mcpu"] == "cortex-a76"


def test_elf_info_reads_headers(tmp_path: Path) -> None:
    with pytest.raises(TargetError):
        elf_info(b"not an elf at all, just some bytes that are long enough.......")
    info = elf_info(shutil.which("ls") or "/bin/ls")
    assert info.bits == 64 and info.arch in ("x86_64", "aarch64")


# ----------------------------------------------------------------------------------------------------------------
# Cross-compilation


@pytest.fixture(scope="module")
def tiny():
    return tiny_relax_module()[0]


def test_rasp4_library_is_arm_aarch64(tiny, tmp_path: Path) -> None:
    needs("aarch64-linux-gnu-gcc")
    path = export_for_target(tiny, "rasp4", tmp_path / "rasp4.so")
    assert "ARM aarch64" in describe_file(path)
    assert elf_info(path).arch == "aarch64"
    assert not list(tmp_path.glob(".*partial*"))


def test_rasp4_32_library_is_arm_32bit_hard_float(tiny, tmp_path: Path) -> None:
    needs("arm-linux-gnueabihf-gcc")
    path = export_for_target(tiny, "rasp4-32", tmp_path / "rasp4-32.so")
    text = describe_file(path)
    assert "ELF 32-bit" in text and "ARM," in text and "EABI5" in text
    info = elf_info(path)
    assert info.arch == "armhf" and info.bits == 32 and info.hard_float


@pytest.mark.parametrize("name, marker", [("jetson-orin-nano", b"__global__"), ("mali", b"__kernel")])
def test_gpu_library_holds_host_and_device_code(tiny, tmp_path: Path, name: str, marker: bytes) -> None:
    needs("aarch64-linux-gnu-gcc")
    path = export_for_target(tiny, name, tmp_path / f"{name}.so")
    assert "ARM aarch64" in describe_file(path)
    assert marker in path.read_bytes(), "the device kernels travel inside the library"


def test_host_library_runs_here(tmp_path: Path) -> None:
    import tvm
    from tvm import relax

    mod, weight, bias = tiny_relax_module(seed=3)
    path = export_for_target(mod, "host", tmp_path / "host.so")
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(path)), tvm.cpu())
    x = np.random.default_rng(4).standard_normal((4, 8)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(got, x @ weight + bias, rtol=1e-5, atol=1e-5)


def test_missing_cross_compiler_names_the_debian_package(tiny, tmp_path: Path) -> None:
    import yaml

    data = yaml.safe_load((targets_dir() / "rasp4.yaml").read_text())
    data.update(name="nocc", toolchain={"compiler": "edgeq-no-such-gcc", "options": [], "package": "gcc-edgeq-test"})
    path = tmp_path / "nocc.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ToolchainMissingError) as caught:
        export_for_target(tiny, path, tmp_path / "x.so")
    assert caught.value.exit_code == 61
    assert "edgeq-no-such-gcc" in str(caught.value) and "apt-get install gcc-edgeq-test" in str(caught.value)
    assert not (tmp_path / "x.so").exists()


def test_cross_compiler_off_path(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = build(tiny, "rasp4-32")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolchainMissingError, match="gcc-arm-linux-gnueabihf"):
        export_library(built, "rasp4-32", tmp_path / "x.so")


def test_wrong_compiler_for_the_board_is_reported(tiny, tmp_path: Path) -> None:
    """A toolchain that cannot link the board's objects (here this machine's gcc for ARM code) fails clearly."""
    import yaml

    needs("gcc")
    data = yaml.safe_load((targets_dir() / "rasp4.yaml").read_text())
    data.update(name="wrongcc", toolchain={"compiler": "gcc", "options": [], "package": "gcc"})
    path = tmp_path / "wrongcc.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises((ToolchainMissingError, TargetError)) as caught:
        export_for_target(tiny, path, tmp_path / "x.so")
    assert "wrongcc" in str(caught.value)
    assert not (tmp_path / "x.so").exists()


# --- integer kernel family -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, family", [
    ("rasp4", "arm_neon"),
    ("rasp5", "arm_dotprod"),
    ("orion-o6", "arm_i8mm"),
    ("jetson-orin-nano", "cuda"),
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}', "x86_avx2"),
])
def test_targets_command_shows_the_kernel_family(capsys, name: str, family: str) -> None:
    code, out, err = run_cli(capsys, "targets", name)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["kernel_family"] == family and shown["kernel_family_note"] is None


@pytest.mark.parametrize("name, named", [
    ("rasp4-32", 'mtriple "armv7l-linux-gnueabihf"'),  # 32-bit ARM: the NEON families are aarch64 kernels
    ('{"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "core2"}', 'mcpu "core2"'),  # x86 without AVX2
])
def test_targets_command_says_when_a_cpu_falls_back_to_generic(capsys, name: str, named: str) -> None:
    code, out, err = run_cli(capsys, "targets", name)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["kernel_family"] == "generic"
    note = shown["kernel_family_note"]
    assert note.startswith("no kernel family covers this target (kind \"llvm\"") and named in note
    assert "fall back to 'generic'" in note and "slow" in note


def test_gpu_without_integer_kernels_says_integer_plans_are_refused() -> None:
    entry = kernel_family(load_target("mali"))
    assert entry["kernel_family"] == "generic"
    assert entry["kernel_family_note"] == ("edgeq has no integer kernels for opencl devices: integer plans are "
                                           "refused, build with --float")


def test_one_coercion_to_a_tvm_target_for_boards_dicts_and_tvm_strings():
    import tvm

    rasp4 = load_target("rasp4").tvm_target()
    assert str(as_tvm_target("rasp4")) == str(rasp4) == str(as_tvm_target(load_target("rasp4")))
    assert as_tvm_target(rasp4) is rasp4
    haswell = {"kind": "llvm", "mcpu": "haswell"}
    assert str(as_tvm_target(haswell)) == str(tvm.target.Target(haswell))
    assert str(as_tvm_target("llvm")) == str(tvm.target.Target({"kind": "llvm"}))
    with pytest.raises(TargetError, match="known boards: .*rasp4"):
        as_tvm_target("rasp44")


def test_a_spec_parses_and_makes_its_tvm_target_once() -> None:
    target_coercions(reset=True)
    spec = load_target("rasp4")
    assert spec.target is spec.target and spec.host is spec.host
    first = spec.tvm_target()
    assert spec.tvm_target() is first and as_tvm_target(spec) is first
    assert target_coercions(reset=True) == {"check": 1, "spec": 1}  # the validation's, and the spec's one
    assert first.attrs["mcpu"] == "cortex-a72"


def test_load_target_takes_a_tvm_target_dict() -> None:
    spec = load_target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a53"})
    assert spec.source == "dict" and spec.arch == "aarch64" and spec.target["mcpu"] == "cortex-a53"
    assert load_target(spec.target).target_json == spec.target_json
