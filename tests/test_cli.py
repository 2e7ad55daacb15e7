from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import REPO, write_image_folder
from cli_runner import run_cli
from edgeq.errors import all_error_classes




def test_models_lists_reference_models(capsys) -> None:
    code, out, _ = run_cli(capsys, "models", "--timm", "deit_tiny*")
    assert code == 0
    assert "edgeq/vit-cifar10" in out and "edgeq/swin-cifar10" in out
    assert "deit_tiny_patch16_224" in out


def test_models_timm_matches_a_plain_word_as_a_substring(capsys) -> None:
    code, out, _ = run_cli(capsys, "models", "--timm", "deit")
    assert code == 0 and "deit_tiny_patch16_224" in out and "deit_small_patch16_224" in out
    code, out, _ = run_cli(capsys, "models", "--timm", "DeiT_Tiny")  # names are lower case; a capital is no miss
    assert code == 0 and "deit_tiny_patch16_224" in out and "deit_small_patch16_224" not in out
    code, out, _ = run_cli(capsys, "models", "--timm", "no-such-net")
    assert code == 0 and ": 0" in out and "deit_tiny_patch16_224" in out  # the hint names a real one


def test_eval_writes_timm_style_results(capsys, tiny_folder: Path, tmp_path: Path) -> None:
    out_file = tmp_path / "results.json"
    code, out, err = run_cli(capsys, "eval", "--model", "edgeq/vit-cifar10", "--random-init", "--data", str(tiny_folder),
                             "--limit", "20", "--output", str(out_file))
    assert code == 0, err
    result = json.loads(out_file.read_text())
    assert {"model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size"} <= set(result)
    assert result["num_images"] == 20 and result["top1"] + result["top1_err"] == pytest.approx(100)
    assert f"top-1 {result['top1']:.2f} %" in out


def _bad_checkpoint(tmp: Path) -> str:
    path = tmp / "bad.pth"
    path.write_text("not weights")
    return str(path)


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--model", "edgeq/vit-cifar1"], 10, "unknown model 'edgeq/vit-cifar1'; did you mean edgeq/vit-cifar10"),
        (["--model", "edgeq/vit-cifar10", "--checkpoint", "{bad}"], 11, "not a readable PyTorch checkpoint"),
        (["--model", "edgeq/vit-cifar10", "--random-init", "--data", "{missing}"], 13, "does not exist"),
        (["--model", "edgeq/vit-cifar10", "--random-init", "--data", "{three_classes}"], 14, "has 3 classes but the model has 10"),
    ],
    ids=["unknown-model", "bad-checkpoint", "missing-data", "class-count"],
)
def test_eval_bad_input_is_one_line_with_exit_code(capsys, tmp_path: Path, tiny_folder: Path, args, code, message):
    values = {
        "bad": _bad_checkpoint(tmp_path),
        "missing": str(tmp_path / "missing"),
        "three_classes": str(write_image_folder(tmp_path / "three", ["a", "b", "c"], 2)),
    }
    args = [a.format(**values) for a in args]
    if "--data" not in args:
        args += ["--data", str(tiny_folder)]
    previous = tmp_path / "results.json"
    previous.write_text('{"top1": 99.0}\n')
    got, out, err = run_cli(capsys, "eval", *args, "--output", str(previous))
    assert got == code
    assert message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert previous.read_text() == '{"top1": 99.0}\n'


def test_usage_errors_exit_2(capsys) -> None:
    code, _, err = run_cli(capsys, "eval", "--model", "edgeq/vit-cifar10", "--data", "x", "--limit", "0")
    assert code == 2 and "--limit" in err


def test_readme_documents_every_exit_code() -> None:
    readme = (REPO / "README.md").read_text()
    documented = dict(re.findall(r"^\|\s*(\d+)\s*\|\s*`(\w+)`", readme, flags=re.M))
    for cls in all_error_classes():
        if cls.__name__ != "EdgeqError":
            assert documented.get(str(cls.exit_code)) == cls.__name__, cls.__name__


def test_targets_list_and_unknown(capsys) -> None:
    code, out, _ = run_cli(capsys, "targets")
    assert code == 0 and "rasp4 " in out and "jetson-orin-nano" in out
    code, _, err = run_cli(capsys, "targets", "rasp9")
    assert code == 60 and "known boards: host" in err and len(err.strip().splitlines()) == 1


def test_plan_writes_a_plan_under_budget_and_plot(capsys, tiny_folder: Path, tmp_path: Path) -> None:
    from edgeq.bitplan import read_plan

    out, plot = tmp_path / "plan.json", tmp_path / "plan.png"
    code, stdout, err = run_cli(capsys, "plan", "--model", "edgeq/vit-cifar10", "--random-init", "--calib",
                                str(tiny_folder), "--calib-count", "4", "--method", "lrp", "--budget", "avg-bits=4",
                                "--out", str(out), "--plot", str(plot))
    assert code == 0, err
    plan = read_plan(out)
    assert plan.provenance["method"] == "lrp" and plan.layers
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"avg-bits (3\.\d+|4)\b", stdout)


def test_plan_fixes_or_bounds_activation_widths(capsys, tiny_folder: Path, tmp_path: Path) -> None:
    from edgeq.bitplan import read_plan

    out = tmp_path / "a4.json"
    code, _, err = run_cli(capsys, "plan", "--model", "edgeq/vit-cifar10", "--random-init", "--calib",
                           str(tiny_folder), "--calib-count", "2", "--method", "lrp", "--budget", "avg-bits=4",
                           "--a-bits", "4", "--w-bits", "3,4,5", "--out", str(out))
    assert code == 0, err
    layers = read_plan(out).layers
    assert layers and {bits.a for bits in layers.values()} == {4}
    assert {bits.w for name, bits in layers.items() if not name.endswith(("matmul_qk", "matmul_av"))} <= {3, 4, 5}
    # a bops budget with two activation widths: the program lowers some activations, not only weights
    out = tmp_path / "bops.json"
    code, _, err = run_cli(capsys, "plan", "--model", "edgeq/vit-cifar10", "--random-init", "--calib",
                           str(tiny_folder), "--calib-count", "2", "--method", "random", "--budget", "bops=8G",
                           "--w-bits", "8", "--a-bits", "4,8", "--out", str(out))
    assert code == 0, err
    assert {bits.a for bits in read_plan(out).layers.values()} == {4, 8}


@pytest.mark.parametrize("option, value", [("--a-bits", "9"), ("--w-bits", "4,x"), ("--a-bits", "")])
def test_plan_bad_width_lists_are_usage_errors(capsys, tmp_path: Path, option, value) -> None:
    out = tmp_path / "plan.json"
    code, _, err = run_cli(capsys, "plan", "--model", "edgeq/vit-cifar10", "--random-init", "--calib", "unused",
                           "--method", "random", "--budget", "avg-bits=4", option, value, "--out", str(out))
    assert code == 2 and option in err and not out.exists()


@pytest.mark.parametrize("budget, code, message", [("avg-bit=4", 30, "unknown kind 'avg-bit'"),
                                                    ("avg-bits=1.5", 31, "the smallest feasible is avg-bits=2")])
def test_plan_bad_budgets_keep_previous_plan(capsys, tiny_folder: Path, tmp_path: Path, budget, code, message):
    out = tmp_path / "plan.json"
    out.write_text("previous\n")
    got, _, err = run_cli(capsys, "plan", "--model", "edgeq/vit-cifar10", "--random-init", "--calib",
                          str(tiny_folder), "--calib-count", "2", "--method", "random", "--budget", budget,
                          "--out", str(out))
    assert got == code and message in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == "previous\n"


def test_quantize_then_eval_quantized(capsys, tiny_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "q.safetensors"
    code, stdout, err = run_cli(capsys, "quantize", "--model", "edgeq/vit-cifar10", "--random-init", "--calib",
                                str(tiny_folder), "--calib-count", "8", "--bits", "w4a8", "--method", "repq",
                                "--out", str(out))
    assert code == 0, err
    assert out.is_file() and "w4a8" in stdout
    results = tmp_path / "r.json"
    code, stdout, err = run_cli(capsys, "eval", "--model", "edgeq/vit-cifar10", "--quantized", str(out),
                                "--data", str(tiny_folder), "--output", str(results))
    assert code == 0, err
    assert json.loads(results.read_text())["quantized"] == str(out)


@pytest.mark.parametrize(
    "extra, code, message",
    [
        (["--bits", "w9a8"], 20, "weight bits must be an integer from 2 to 8, got 9"),
        (["--plan", "{plan}"], 20, "that the model does not have; closest: blocks.3.mlp.fc2, blocks.3.mlp.fc1"),
        (["--calib-count", "2"], 21, "at least"),
    ],
    ids=["bits-range", "plan-unknown-layer", "too-few-images"],
)
def test_quantize_bad_input_keeps_previous_output(capsys, tiny_folder: Path, tmp_path: Path, extra, code, message):
    plan = tmp_path / "plan.json"
    plan.write_text('{"version": 1, "default": {"w": 8, "a": 8}, "layers": {"blocks.3.mlp.fc9": {"w": 4, "a": 8}}}')
    out = tmp_path / "q.safetensors"
    out.write_bytes(b"previous")
    args = ["quantize", "--model", "edgeq/vit-cifar10", "--random-init", "--calib", str(tiny_folder),
            "--out", str(out)] + [a.format(plan=plan) for a in extra]
    got, _, err = run_cli(capsys, *args)
    assert got == code and message in err and len(err.strip().splitlines()) == 1
    assert out.read_bytes() == b"previous"
