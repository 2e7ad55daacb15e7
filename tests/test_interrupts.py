"""Interrupts (SIGINT/SIGTERM at each stage), one writer per output, output paths checked before the work.

Interrupts are injected by sending the signal to this process from inside a stage (through TVM's FFI where TVM
would turn it into a RuntimeError), so each case is deterministic and takes seconds.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from cli_runner import run_cli
from edgeq.compile import build as B
from edgeq import interrupt
from edgeq.errors import ArtifactError, OutputBusyError, OutputPathError
from edgeq.fileio import atomic_write_json, exclusive_output
from test_artifact import make_artifact
from test_build import TINY, cli_build, images, tiny_model_name  # noqa: F401 - fixtures


def signal_self(signum: int) -> None:
    os.kill(os.getpid(), signum)


def signal_through_tvm(signum: int) -> None:
    """Deliver ``signum`` inside a Python function that TVM calls, and swallow what comes out, as the old
    ``except RuntimeError: continue`` around scheduling did: the interrupt must still stop the command."""
    import tvm_ffi

    name = f"edgeq.test.signal_self_{signum}"
    tvm_ffi.register_global_func(name, lambda: signal_self(signum), override=True)
    try:
        tvm_ffi.get_global_func(name)()
    except RuntimeError:  # TVM's wrapping of the Interrupted the handler raised
        pass


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep and not p.name.endswith(".lock"))


def test_tvm_turns_an_interrupt_into_runtime_error_but_it_stays_recorded() -> None:
    with interrupt.handled():
        signal_through_tvm(signal.SIGINT)
        assert interrupt.pending() == signal.SIGINT
        with pytest.raises(interrupt.Interrupted):
            interrupt.raise_if_interrupted()
    interrupt.clear()


@pytest.mark.parametrize("stage, signum, code", [
    ("load_model", signal.SIGINT, 130),
    ("quantize_model", signal.SIGTERM, 143),
])
def test_build_interrupted_before_compiling_keeps_the_earlier_artifact(
        capsys, tmp_path, monkeypatch, tiny_model_name, images, stage, signum, code) -> None:
    out = make_artifact(tmp_path / "art")
    before = snapshot(out)
    monkeypatch.setattr(B, stage, lambda *args, **kwargs: signal_self(signum))
    status, stdout, err = cli_build(capsys, tiny_model_name, images, out, "--target", "host")
    assert status == code, err
    assert err.strip().splitlines()[-1] == ("edgeq: interrupted" if code == 130 else "edgeq: terminated (signal 15)")
    assert "Traceback" not in err
    assert snapshot(out) == before
    assert leftovers(tmp_path, {"art"}) == []
    assert "built" not in stdout


def test_build_interrupted_while_compiling_inside_tvm_exits_143(capsys, tmp_path, monkeypatch, tiny_model_name,
                                                                images) -> None:
    """The issue's case: the signal arrives inside TVM, comes out as a RuntimeError and is swallowed; the build
    must not go on to replace the earlier artifact and exit 0."""
    out = make_artifact(tmp_path / "art")
    before = snapshot(out)
    real = B.compile_library

    def compile_interrupted(*args, **kwargs):
        signal_through_tvm(signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(B, "compile_library", compile_interrupted)
    status, stdout, err = cli_build(capsys, tiny_model_name, images, out, "--target", "host", "--eval-limit", "0")
    assert status == 143, err
    assert snapshot(out) == before
    assert leftovers(tmp_path, {"art"}) == []


def test_eval_interrupted_keeps_the_earlier_results_file(capsys, tmp_path, monkeypatch, tiny_folder) -> None:
    import edgeq.evaluate

    results = tmp_path / "results.json"
    results.write_text('{"top1": 1.0}\n')
    monkeypatch.setattr(edgeq.evaluate, "evaluate", lambda *args, **kwargs: signal_self(signal.SIGINT))
    status, _, err = run_cli(capsys, "eval", "--model", "edgeq/vit-cifar10", "--random-init", "--data",
                             str(tiny_folder), "--output", str(results))
    assert status == 130 and err.strip() == "edgeq: interrupted"
    assert results.read_text() == '{"top1": 1.0}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "tiny"]


def test_a_recorded_interrupt_stops_a_result_file_from_replacing_the_earlier_one(tmp_path) -> None:
    results = tmp_path / "r.json"
    results.write_text("earlier")
    with interrupt.handled():
        signal_through_tvm(signal.SIGINT)
        with pytest.raises(interrupt.Interrupted):
            atomic_write_json(results, {"new": 1})
    interrupt.clear()
    assert results.read_text() == "earlier"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_a_refused_schedule_primitive_does_not_hide_an_interrupt(monkeypatch) -> None:
    from tvm.s_tir.schedule.schedule import ScheduleError

    from edgeq.lower import pipeline

    def refused_after_ctrl_c(func):
        signal_through_tvm(signal.SIGINT)
        raise ScheduleError("refused")

    monkeypatch.setattr(pipeline, "Schedule", refused_after_ctrl_c)
    with interrupt.handled():
        with pytest.raises(interrupt.Interrupted):
            pipeline.schedule_cpu_primfunc(object())
    interrupt.clear()


# --- one writer per output -------------------------------------------------------------------------------------

def test_second_build_into_a_busy_out_fails_at_once(capsys, tmp_path, monkeypatch, tiny_model_name, images) -> None:
    out = make_artifact(tmp_path / "art")
    before = snapshot(out)
    monkeypatch.setattr(B, "load_model", lambda *a, **k: pytest.fail("a busy --out must fail before any work"))
    with exclusive_output(out, "--out"):  # as another build holding it
        status, _, err = cli_build(capsys, tiny_model_name, images, out, "--target", "host")
    assert status == OutputBusyError.exit_code == 4
    assert len(err.strip().splitlines()) == 1 and f"pid {os.getpid()}" in err and "being written" in err
    assert snapshot(out) == before


def test_builds_use_a_partial_directory_of_their_own_and_clear_stale_ones(tmp_path) -> None:
    out = tmp_path / "art"
    stale = tmp_path / ".art.999999.partial"
    stale.mkdir()
    (stale / "model.so").write_bytes(b"half")
    sibling = tmp_path / ".art.v2.4242.partial"  # a build of --out art.v2 running now: not ours to remove
    sibling.mkdir()
    with exclusive_output(out, "--out"):
        partial = B.prepare_out_dir(out)
    assert partial.name == f".art.{os.getpid()}.partial" and partial.is_dir()
    assert not stale.exists() and sibling.is_dir()


def test_lock_is_released_when_the_holder_ends(tmp_path) -> None:
    out = tmp_path / "art"
    with exclusive_output(out, "--out"):
        pass
    with exclusive_output(out, "--out"):  # no leftover lock from the first
        pass


# --- output paths checked before the work ----------------------------------------------------------------------

@pytest.fixture
def no_evaluation(monkeypatch):
    import edgeq.evaluate

    monkeypatch.setattr(edgeq.evaluate, "evaluate", lambda *a, **k: pytest.fail("output must be checked first"))


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_eval_output_that_cannot_be_written_fails_before_evaluating(capsys, tmp_path, tiny_folder, no_evaluation,
                                                                    where) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    output = tmp_path / "dir" if where == "a directory" else tmp_path / "file" / "r.json"
    status, _, err = run_cli(capsys, "eval", "--model", "edgeq/vit-cifar10", "--random-init", "--data",
                             str(tiny_folder), "--output", str(output))
    assert status == OutputPathError.exit_code == 3
    assert len(err.strip().splitlines()) == 1 and err.startswith("edgeq: error: --output")
    assert (tmp_path / "file").read_text() == "x" and list((tmp_path / "dir").iterdir()) == []


def test_eval_output_in_a_missing_folder_is_created(capsys, tmp_path, monkeypatch, tiny_folder) -> None:
    output = tmp_path / "new" / "deeper" / "r.json"
    status, _, err = run_cli(capsys, "eval", "--model", "edgeq/vit-cifar10", "--random-init", "--data",
                             str(tiny_folder), "--limit", "10", "--output", str(output))
    assert status == 0, err
    assert output.is_file() and not list(output.parent.glob(".*partial"))


def test_build_out_that_is_a_file_fails_before_loading_the_model(capsys, tmp_path, monkeypatch, tiny_model_name,
                                                                 images) -> None:
    monkeypatch.setattr(B, "load_model", lambda *a, **k: pytest.fail("--out must be checked first"))
    (tmp_path / "art").write_text("not a folder")
    status, _, err = cli_build(capsys, tiny_model_name, images, tmp_path / "art", "--target", "host")
    assert status == OutputPathError.exit_code and "not a directory" in err
    assert (tmp_path / "art").read_text() == "not a folder"


def test_build_out_holding_other_files_is_refused_before_loading(capsys, tmp_path, monkeypatch, tiny_model_name,
                                                                 images) -> None:
    monkeypatch.setattr(B, "load_model", lambda *a, **k: pytest.fail("--out must be checked first"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    status, _, err = cli_build(capsys, tiny_model_name, images, tmp_path / "mine", "--target", "host")
    assert status == ArtifactError.exit_code and "not an edgeq artifact" in err


def test_plan_latency_budget_without_table_fails_before_loading(capsys, tmp_path, monkeypatch) -> None:
    import edgeq.cli

    monkeypatch.setattr(edgeq.cli, "load_model_option", lambda *a: pytest.fail("checks must come first"))
    status, _, err = run_cli(capsys, "plan", "--model", "edgeq/vit-cifar10", "--calib", "x", "--method", "lrp",
                             "--budget", "latency-ms=3", "--out", str(tmp_path / "p.json"))
    assert status == 30 and "--latency-table" in err and len(err.strip().splitlines()) == 1


# --- a real process, a real signal -----------------------------------------------------------------------------

BUILD_IN_CHILD = """
import sys
from dataclasses import replace
from edgeq.models.reference import REFERENCE_MODELS
from edgeq.cli import main
vit = REFERENCE_MODELS["edgeq/vit-cifar10"]
REFERENCE_MODELS["edgeq/vit-tiny-test"] = replace(vit, name="edgeq/vit-tiny-test",
                                                  arch={**vit.arch, "depth": 1, "embed_dim": 48, "num_heads": 3})
main(sys.argv[1:])
"""


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_to_a_build_process_while_it_compiles(tmp_path, images, signum, code) -> None:  # noqa: F811
    import subprocess
    import sys
    import time

    out = make_artifact(tmp_path / "art")
    before = snapshot(out)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(B.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    child = subprocess.Popen(
        [sys.executable, "-c", BUILD_IN_CHILD, "build", "--model", TINY, "--random-init", "--calib", str(images),
         "--calib-count", "8", "--eval-limit", "0", "--target", "host", "--out", str(out)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    lines = []
    deadline = time.monotonic() + 120
    for line in child.stderr:
        lines.append(line.strip())
        if line.startswith("edgeq: compiling for host") or time.monotonic() > deadline:
            time.sleep(0.5)  # inside TVM's compile by now
            child.send_signal(signum)
            break
    rest = child.stderr.read()
    assert child.wait(60) == code, lines + rest.splitlines()
    assert rest.strip().splitlines()[-1] in ("edgeq: interrupted", "edgeq: terminated (signal 15)")
    assert "Traceback" not in rest
    assert snapshot(out) == before
    assert leftovers(tmp_path, {"art"}) == []


def test_an_interrupted_quantize_keeps_the_earlier_quantized_file(capsys, tmp_path, monkeypatch, tiny_folder,
                                                                 tiny_model_name) -> None:  # noqa: F811
    import edgeq.quant

    out = tmp_path / "q.safetensors"
    out.write_bytes(b"earlier")
    real = edgeq.quant.quantize

    def quantize_then_swallowed_ctrl_c(*args, **kwargs):
        result = real(*args, **kwargs)
        signal_through_tvm(signal.SIGINT)
        return result

    monkeypatch.setattr(edgeq.quant, "quantize", quantize_then_swallowed_ctrl_c)
    status, _, err = run_cli(capsys, "quantize", "--model", tiny_model_name, "--random-init", "--bits", "w8a8",
                             "--calib", str(tiny_folder), "--calib-count", "10", "--out", str(out))
    assert status == 130, err
    assert out.read_bytes() == b"earlier" and sorted(p.name for p in tmp_path.iterdir()) == ["q.safetensors", "tiny"]


def test_an_interrupted_plan_plot_leaves_no_half_png(tmp_path) -> None:
    from edgeq.bitplan import BitPlan
    from edgeq.plan import plot_plan

    with interrupt.handled():
        signal_through_tvm(signal.SIGINT)
        with pytest.raises(interrupt.Interrupted):
            plot_plan({"a": 1.0}, BitPlan.uniform(8, 8), tmp_path / "p.png")
    interrupt.clear()
    assert list(tmp_path.iterdir()) == []


def test_profile_interrupted_while_building_keeps_the_earlier_results(capsys, tmp_path, monkeypatch) -> None:
    import json
    import socket

    import edgeq.boards.profile

    out = tmp_path / "results"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({"header": {"model": "edgeq/vit-cifar10", "target": "host"},
                                                  "rows": []}))
    before = snapshot(out)
    plan = tmp_path / "w8a8.json"
    plan.write_text('{"version": 1, "default": {"w": 8, "a": 8}, "layers": {}}')
    monkeypatch.setattr(edgeq.boards.profile, "build_plan", lambda *a, **k: signal_self(signal.SIGTERM))
    with socket.socket() as board:  # something listening, so the early reachability check passes
        board.bind(("127.0.0.1", 0))
        board.listen()
        status, _, err = run_cli(capsys, "profile", "--target", "host", "--plans", str(plan), "--rpc",
                                 f"127.0.0.1:{board.getsockname()[1]}", "--out", str(out))
    assert status == 143, err
    assert snapshot(out) == before


@pytest.mark.parametrize("command, function, signum, code", [
    ("deploy", "edgeq.boards.deploy.deploy_artifact", signal.SIGINT, 130),
    ("check", "edgeq.boards.check.check_artifact", signal.SIGTERM, 143),
])
def test_deploy_and_check_interrupted_on_the_board_keep_the_earlier_report(capsys, tmp_path, monkeypatch, command,
                                                                          function, signum, code) -> None:
    """An interrupt while the board runs (deploy's golden batch, check's images) ends the command with 130/143
    and leaves the report an earlier run wrote as it was, with no partial file beside it."""
    artifact = make_artifact(tmp_path / "art")
    report = tmp_path / "report.json"
    report.write_text('{"ok": true}\n')
    monkeypatch.setattr(function, lambda *args, **kwargs: signal_self(signum))
    extra = ["--data", str(tmp_path), "--limit", "5"] if command == "check" else []
    status, _, err = run_cli(capsys, command, str(artifact), *extra, "--rpc", "127.0.0.1:9", "--output", str(report))
    assert status == code and len(err.strip().splitlines()) == 1, err
    assert err.strip() == ("edgeq: interrupted" if signum == signal.SIGINT else "edgeq: terminated (signal 15)")
    assert report.read_text() == '{"ok": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "report.json"]
