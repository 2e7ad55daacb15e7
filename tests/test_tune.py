"""`edgeq tune`: MetaSchedule measures real candidates (on this machine, or on a board over RPC, directly or
through a tracker), writes a database, and a build with that database gives the tuned PrimFunc its schedule."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_cli
from edgeq.errors import EdgeqError

#: MetaSchedule's run time for a candidate that failed to build or run
FAILED_RUN_SECONDS = 1e10


@pytest.fixture(scope="module")
def layer_norm_onnx(tmp_path_factory) -> Path:
    """A one-operator model: one tuning task, so a tuning run takes seconds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    gamma = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "gamma")
    beta = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "beta")
    node = helper.make_node("LayerNormalization", ["input", "gamma", "beta"], ["output"], axis=-1, epsilon=1e-6)
    tensor = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 50, 64]) for name in ("input", "output")]
    graph = helper.make_graph([node], "layer_norm", tensor[:1], tensor[1:], [gamma, beta])
    path = tmp_path_factory.mktemp("onnx") / "layer_norm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    return path


def measured_seconds(database: Path) -> list[float]:
    lines = (database / "database_tuning_record.json").read_text().splitlines()
    return [json.loads(line)[1][1][0] for line in lines]


def assert_measured(database: Path, trials: int) -> None:
    seconds = measured_seconds(database)
    assert len(seconds) == trials
    assert all(0 < s < 1.0 for s in seconds), f"candidates failed to build or run: {seconds}"


def test_tuned_database_is_measured_and_a_build_applies_it(layer_norm_onnx, tmp_path) -> None:
    import tvm
    from tvm import relax

    from edgeq.lower.kernels.runner import host_target
    from edgeq.lower.pipeline import lower_relax
    from edgeq.lower.relax_import import import_onnx
    from edgeq.compile.tune import tune_onnx

    result = tune_onnx(layer_norm_onnx, "host", tmp_path / "db", trials=2)
    assert (result.tasks, result.records, result.measured_on) == (1, 2, "this machine")
    assert_measured(tmp_path / "db", 2)

    executable, tuning = lower_relax(import_onnx(layer_norm_onnx, batch=1), host_target(2), tuning_db=tmp_path / "db")
    assert tuning.applied == ("layer_norm",)
    x = np.random.default_rng(1).standard_normal((1, 50, 64)).astype(np.float32)
    got = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    import onnxruntime as ort

    expected = ort.InferenceSession(str(layer_norm_onnx), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    # a database tuned for other PrimFuncs schedules nothing, and says so
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Add:
        @R.function
        def main(x: R.Tensor((4,), "float32")) -> R.Tensor((4,), "float32"):
            return R.add(x, x)

    assert lower_relax(Add, host_target(2), tuning_db=tmp_path / "db")[1].applied == ()


def test_per_op_profiling_schedules_with_the_artifacts_tuning_database(layer_norm_onnx, tmp_path) -> None:
    """`edgeq profile --per-op` lowers the artifact again: with the database its build applied, so the PrimFuncs it
    times have the board library's tuned schedules (it used to time the untuned ones)."""
    import shutil

    import tvm

    from edgeq.compile.artifact import Artifact, Bits, Golden, Manifest, ModelInfo, TargetInfo, Tuning
    from edgeq.lower import lower_model
    from edgeq.lower.tuning_database import database_digest
    from edgeq.boards.profile_ops import scheduled_calls
    from edgeq.compile.tune import tune_onnx

    tune_onnx(layer_norm_onnx, "host", tmp_path / "db", trials=1)
    folder = tmp_path / "art"
    folder.mkdir()
    shutil.copy(layer_norm_onnx, folder / "model.onnx")
    manifest = Manifest(name="art", precision="float", model=ModelInfo.from_json({}),
                        target=TargetInfo.from_json({"name": "host"}), bits=Bits.from_json({}),
                        golden=Golden.from_json({}),
                        tuning=Tuning(database=str(tmp_path / "db"), sha256=database_digest(tmp_path / "db")))
    profiled, calls = scheduled_calls(Artifact(folder, manifest))
    assert [c["func"] for c in calls] == ["layer_norm"]

    tuned = lower_model(layer_norm_onnx, "host", "float", tuning_db=tmp_path / "db", schedule_only=True)
    untuned = lower_model(layer_norm_onnx, "host", "float", schedule_only=True)
    assert tuned.tuning.applied == ("layer_norm",) and untuned.tuning is None
    tvm.ir.assert_structural_equal(profiled["layer_norm"], tuned.module["layer_norm"])
    with pytest.raises(ValueError):  # and not the generic schedule
        tvm.ir.assert_structural_equal(profiled["layer_norm"], untuned.module["layer_norm"])

    (tmp_path / "db" / "database_tuning_record.json").write_text("")  # the database changed since the build
    with pytest.raises(EdgeqError, match="changed since"):
        scheduled_calls(Artifact(folder, manifest))


def test_tune_measures_on_a_board_through_a_tracker(layer_norm_onnx, tmp_path) -> None:
    from board_fixtures import RUNTIME_ONLY
    from edgeq.boards.local import start_rpc_server, start_tracker
    from edgeq.compile.tune import tune_onnx

    tracker = start_tracker()
    board = None
    try:
        board = start_rpc_server(tracker=tracker.address, key="tune-test", env=RUNTIME_ONLY)
        result = tune_onnx(layer_norm_onnx, "host", tmp_path / "db", trials=2, tracker=tracker.address,
                           key="tune-test")
    finally:
        if board is not None:
            board.stop()
        tracker.stop()
    assert result.measured_on == f"tracker {tracker.address} (key 'tune-test')" and result.records == 2
    assert_measured(tmp_path / "db", 2)


def test_tune_command_on_a_board_given_directly(layer_norm_onnx, tmp_path, capsys) -> None:
    from board_fixtures import RUNTIME_ONLY
    from edgeq.boards.local import start_rpc_server

    board = start_rpc_server(env=RUNTIME_ONLY)
    try:
        code, out, err = run_cli(capsys, "tune", str(layer_norm_onnx), "--target", "host", "--trials", "1",
                                 "--rpc", board.address, "--out", str(tmp_path / "db"))
    finally:
        board.stop()
    assert code == 0, err
    assert f"measured on RPC server {board.address}" in out and f"--tuning-db {tmp_path / 'db'}" in out
    assert_measured(tmp_path / "db", 1)


def test_tuning_for_an_arm_board_needs_the_board(layer_norm_onnx, tmp_path) -> None:
    from edgeq.compile.tune import tune_onnx

    with pytest.raises(EdgeqError, match="measures candidates on the board.*--rpc.*edgeq board start --emulated"):
        tune_onnx(layer_norm_onnx, "rasp4", tmp_path / "db", trials=1)
    assert not (tmp_path / "db").exists()


def test_tune_command_needs_a_target_for_an_onnx_file(layer_norm_onnx, capsys) -> None:
    code, _, err = run_cli(capsys, "tune", str(layer_norm_onnx))
    assert code == 2 and "--target is needed" in err


def test_build_refuses_a_missing_tuning_database_before_quantizing(tmp_path, capsys) -> None:
    code, out, err = run_cli(capsys, "build", "--target", "host", "--tuning-db", str(tmp_path / "none"),
                             "--out", str(tmp_path / "art"))
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "holds no MetaSchedule database" in err and "edgeq tune" in err
    assert not (tmp_path / "art").exists()


def test_a_failed_tuning_names_the_last_candidates_error(tmp_path) -> None:
    from edgeq.compile.tune import _last_error, _trials_per_round

    log = tmp_path / "tuning.log"
    log.write_text("[Task #0: add] Trial #1: Error in building:\nLocalBuilder: An exception occurred\n"
                   "RuntimeError: no compiler\n# from tvm.script import ir as I\n@I.ir_module\n"
                   "[Task #1: take] Trial #1: Error in running:\nLocalRunner: An exception occurred\n"
                   "Subprocess terminated\n# from tvm.script import ir as I\nclass Module:\n")
    assert _last_error(log) == "running: Subprocess terminated"
    assert _last_error(tmp_path / "none.log") == "no log"
    # a budget reaches every task before any task gets a second round
    assert (_trials_per_round(192, 95), _trials_per_round(4, 19), _trials_per_round(1000, 10)) == (2, 1, 16)


# --- the database is written as an artifact is: one writer, replaced only when a tune succeeds ------------------

EARLIER = {"database_workload.json": b'["earlier workload"]\n', "database_tuning_record.json": b'[0, "earlier"]\n',
           "tuning.log": b"earlier log\n"}


def earlier_database(folder: Path) -> Path:
    folder.mkdir()
    for name, data in EARLIER.items():
        (folder / name).write_bytes(data)
    return folder


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


@pytest.fixture
def fake_child(monkeypatch):
    """Replace the tuning child process by ``behave(partial_database)``, which returns its exit code; the
    folders it was handed are recorded."""
    import subprocess

    import edgeq.compile.tune as tune

    seen: list[Path] = []
    behaviour = {}

    def run(argv, **kwargs):
        partial = Path(json.loads(Path(argv[-1]).read_text())["database"])
        seen.append(partial)
        code, stderr = behaviour["behave"](partial)
        stdout = json.dumps({"tasks": 1, "records": 2, "measured_on": "this machine"}) + "\n" if code == 0 else ""
        return subprocess.CompletedProcess(argv, code, stdout, stderr)

    monkeypatch.setattr(tune.subprocess, "run", run)

    def set_behaviour(behave):
        behaviour["behave"] = behave
        return seen
    return set_behaviour


def tune_cli(capsys, onnx: Path, database: Path) -> tuple[int, str, str]:
    return run_cli(capsys, "tune", str(onnx), "--target", "host", "--trials", "2", "--out", str(database))


def test_a_tune_adds_to_a_copy_of_the_database_and_replaces_it_when_done(fake_child, layer_norm_onnx, tmp_path,
                                                                          capsys) -> None:
    database = earlier_database(tmp_path / "db")

    def add_records(partial: Path):
        assert contents(partial) == EARLIER and partial.parent == tmp_path and partial.name.endswith(".partial")
        with open(partial / "database_tuning_record.json", "ab") as handle:
            handle.write(b'[0, "new"]\n')
        return 0, ""

    seen = fake_child(add_records)
    code, out, err = tune_cli(capsys, layer_norm_onnx, database)
    assert code == 0, err
    assert contents(database)["database_tuning_record.json"] == b'[0, "earlier"]\n[0, "new"]\n'
    assert not seen[0].exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("signum, code", [(2, 130), (15, 143)])
def test_an_interrupted_tune_leaves_the_earlier_database_byte_identical(fake_child, layer_norm_onnx, tmp_path,
                                                                         capsys, signum, code) -> None:
    import os

    database = earlier_database(tmp_path / "db")

    def half_written_then_interrupted(partial: Path):
        (partial / "database_tuning_record.json").write_bytes(b"[0, ")  # a record cut short
        os.kill(os.getpid(), signum)
        return 0, ""

    fake_child(half_written_then_interrupted)
    status, out, err = tune_cli(capsys, layer_norm_onnx, database)
    assert status == code and "Traceback" not in err and out == ""
    assert contents(database) == EARLIER and leftovers(tmp_path) == []


def test_a_failed_tune_keeps_the_earlier_database_and_names_its_log(fake_child, layer_norm_onnx, tmp_path,
                                                                     capsys) -> None:
    database = earlier_database(tmp_path / "db")

    def fail(partial: Path):
        (partial / "tuning.log").write_text("Error in running:\nSubprocess terminated\n")
        return 1, f"edgeq: error: no candidate built and ran: running (log: {partial / 'tuning.log'})\n"

    fake_child(fail)
    code, _, err = tune_cli(capsys, layer_norm_onnx, database)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "no candidate built and ran" in err
    log = Path(err.rsplit("(log: ", 1)[1].split(")")[0])
    assert log.read_text().endswith("Subprocess terminated\n") and tmp_path not in log.parents
    assert contents(database) == EARLIER and leftovers(tmp_path) == []


def test_a_second_tune_into_a_busy_database_fails_at_once(fake_child, layer_norm_onnx, tmp_path, capsys) -> None:
    from edgeq.fileio import exclusive_output

    database = earlier_database(tmp_path / "db")
    seen = fake_child(lambda partial: (0, ""))
    with exclusive_output(database, "--out"):  # as another `edgeq tune` holding it
        code, out, err = tune_cli(capsys, layer_norm_onnx, database)
    assert code == 4 and out == "" and len(err.strip().splitlines()) == 1
    assert "is being written by edgeq pid" in err and seen == []
    assert contents(database) == EARLIER and leftovers(tmp_path) == []


def test_a_tune_refuses_a_folder_that_holds_more_than_a_database(fake_child, layer_norm_onnx, tmp_path,
                                                                  capsys) -> None:
    folder = earlier_database(tmp_path / "db")
    (folder / "notes.txt").write_text("mine")
    seen = fake_child(lambda partial: (0, ""))
    code, _, err = tune_cli(capsys, layer_norm_onnx, folder)
    assert code == 3 and "notes.txt" in err and len(err.strip().splitlines()) == 1 and seen == []
    assert (folder / "notes.txt").read_text() == "mine" and leftovers(tmp_path) == []
