"""edgeq profile with local x86 RPC servers as boards; plans are built as tiny artifacts (edgeq build is tested
elsewhere), so these tests are about measuring, results files, resuming, parallel boards and labels."""
from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from board_fixtures import RUNTIME_ONLY, make_artifact
from edgeq.boards import profile as profile_module
from edgeq.compile.build import BuildConfig
from edgeq.errors import RemoteRunError
from edgeq.boards.profile import ProfileConfig, format_table, pareto_front, profile_plans
from edgeq.boards.local import start_rpc_server, start_tracker

HOST_BUILD = BuildConfig(target="host")


def write_plans(folder: Path, count: int) -> list[Path]:
    plans = []
    for i in range(count):
        path = folder / f"plan{i}.json"
        bits = (8, 4, 6, 5)[i % 4]
        path.write_text(json.dumps({"version": 1, "default": {"w": bits, "a": 8}, "layers": {},
                                    "provenance": {"method": "test", "i": i}}))
        plans.append(path)
    return plans


@pytest.fixture(scope="module")
def template_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_artifact(tmp_path_factory.mktemp("template") / "tiny", "host", golden=1)


@pytest.fixture
def tiny_builds(monkeypatch: pytest.MonkeyPatch, template_artifact: Path) -> list[str]:
    """Replace the real build by a copy of one tiny host artifact per plan, with the plan's bits and weight bytes
    sealed into its manifest; records which plans were built."""
    from edgeq.compile import artifact as art

    built: list[str] = []

    def build_plan(job, config, out, log):
        folder = out / "artifacts" / f"{job.path.stem}-{job.hash[:8]}"
        if not folder.exists():
            shutil.copytree(template_artifact, folder)
            (folder / art.PLAN).write_text(json.dumps(job.plan_json))
            manifest = json.loads((folder / art.MANIFEST).read_text())
            manifest["bits"] = {"default": job.plan_json["default"], "layers": {}}
            manifest["weights"] = {"bytes": 1000 * job.plan_json["default"]["w"]}
            manifest["files"] = art.describe_files(folder, manifest["files"])
            art.write_manifest(folder, manifest)
            built.append(job.path.name)
        return folder

    monkeypatch.setattr(profile_module, "build_plan", build_plan)
    return built


@pytest.fixture(scope="module")
def lab():
    """A tracker with two x86 boards under the key edgeq-prof (started side by side: each takes seconds)."""
    tracker = start_tracker()
    boards: list = []
    starting = [threading.Thread(target=lambda: boards.append(
        start_rpc_server(tracker=tracker.address, key="edgeq-prof", env=RUNTIME_ONLY))) for _ in range(2)]
    try:
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        assert len(boards) == 2
        yield {"tracker": tracker.address, "key": "edgeq-prof", "boards": boards}
    finally:
        for board in boards:
            board.stop()
        tracker.stop()


def at(lab: dict) -> dict:
    return {"tracker": lab["tracker"], "key": lab["key"], "env": {}}


def test_profile_writes_rows_table_plot_and_resumes(lab, tiny_builds, tmp_path) -> None:
    plans = write_plans(tmp_path, 2)
    out = tmp_path / "results"
    config = ProfileConfig(HOST_BUILD, plans=plans, out=out, **at(lab), repeat=3, warmup=1)
    outcome = profile_plans(config)
    assert sorted(Path(r["plan"]).name for r in outcome.rows) == ["plan0.json", "plan1.json"]
    for row in outcome.rows:
        assert row["timing"] == "board" and row["repeat"] == 3 and len(row["latency_all_ms"]) == 3
        assert 0 < row["latency_min_ms"] <= row["latency_median_ms"] <= row["latency_p90_ms"]
        assert row["golden"] == "1/1 exact" and row["golden_ok"]
    assert {r["bits"] for r in outcome.rows} == {"w8a8", "w4a8"}
    assert {r["weight_bytes"] for r in outcome.rows} == {8000, 4000}
    with open(out / "results.csv") as handle:
        assert [r["plan_hash"] for r in csv.DictReader(handle)] == [r["plan_hash"] for r in outcome.rows]
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "median ms" in format_table(outcome.rows) and "emulated" not in format_table(outcome.rows)

    # a rerun measures nothing again; a new plan is added to the same results
    plans = write_plans(tmp_path, 3)
    again = profile_plans(ProfileConfig(HOST_BUILD, plans=plans, out=out, **at(lab), repeat=2, warmup=0))
    assert again.skipped == [str(p) for p in plans[:2]] and len(again.rows) == 3
    assert tiny_builds == ["plan0.json", "plan1.json", "plan2.json"]
    assert [r["repeat"] for r in json.loads((out / "results.json").read_text())["rows"]] == [3, 3, 2]  # kept


def test_plan_hash_ignores_provenance_and_follows_bits(tmp_path) -> None:
    config = ProfileConfig(HOST_BUILD, plans=[], out=tmp_path)
    a = {"version": 1, "default": {"w": 8, "a": 8}, "layers": {}, "provenance": {"method": "x"}}
    b = dict(a, provenance={"method": "y"})
    c = dict(a, default={"w": 4, "a": 8})
    h = profile_module.plan_hash
    assert h(profile_module.plan_identity(config, a)) == h(profile_module.plan_identity(config, b))
    assert h(profile_module.plan_identity(config, a)) != h(profile_module.plan_identity(config, c))
    other_target = ProfileConfig(BuildConfig(target="rasp4"), plans=[], out=tmp_path)
    assert h(profile_module.plan_identity(config, a)) != h(profile_module.plan_identity(other_target, a))


def test_board_dying_mid_profile_keeps_rows_and_resumes(lab, tiny_builds, tmp_path, monkeypatch) -> None:
    board = start_rpc_server(env=RUNTIME_ONLY)
    plans = write_plans(tmp_path, 3)
    out = tmp_path / "results"
    real = profile_module.measure_artifact
    measured: list[str] = []

    def measure_then_die(artifact_dir, session, config, progress):
        row = real(artifact_dir, session, config, progress)
        measured.append(artifact_dir.name)
        if len(measured) == 1:
            board.stop()  # the board goes away after the first plan
        return row

    monkeypatch.setattr(profile_module, "measure_artifact", measure_then_die)
    try:
        with pytest.raises(RemoteRunError) as caught:
            profile_plans(ProfileConfig(HOST_BUILD, plans=plans, out=out, rpc=board.address, env={}, repeat=2))
    finally:
        board.stop()
    assert caught.value.exit_code == 71 and "kept" in str(caught.value)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [Path(r["plan"]).name for r in rows] == ["plan0.json"]
    assert (out / "pareto.png").is_file()

    monkeypatch.setattr(profile_module, "measure_artifact", real)
    outcome = profile_plans(ProfileConfig(HOST_BUILD, plans=plans, out=out, **at(lab), repeat=2))
    assert outcome.skipped == [str(plans[0])] and len(outcome.rows) == 3


def test_plans_are_measured_in_parallel_on_boards_under_one_key(lab, tiny_builds, tmp_path) -> None:
    plans = write_plans(tmp_path, 4)
    outcome = profile_plans(ProfileConfig(HOST_BUILD, plans=plans, out=tmp_path / "r", **at(lab), repeat=2, warmup=0))
    assert outcome.boards == 2 and len(outcome.rows) == 4
    assert len({row["board"] for row in outcome.rows}) == 2  # both boards measured plans


def test_emulated_timings_are_labelled_everywhere(lab, tiny_builds, tmp_path, monkeypatch) -> None:
    """A board found to run under qemu (the emulated board's marker file; tests/test_board_cli.py checks that on
    the real emulated board) has its timings labelled in every output."""
    from edgeq.boards.session import BoardSession

    monkeypatch.setattr(BoardSession, "under_emulation", lambda self, arch: True)
    plans = write_plans(tmp_path, 1)
    out = tmp_path / "r"
    outcome = profile_plans(ProfileConfig(HOST_BUILD, plans=plans, out=out, **at(lab), repeat=2))
    assert outcome.rows[0]["timing"] == "emulated" and outcome.rows[0]["board_info"]["emulated"]
    assert "NOT board latency" in format_table(outcome.rows)
    assert "emulated" in (out / "results.csv").read_text()
    assert "qemu" in json.loads((out / "results.json").read_text())["header"]["note"]


def test_pareto_front() -> None:
    rows = [{"latency_median_ms": 1.0, "accuracy_top1": 50.0}, {"latency_median_ms": 2.0, "accuracy_top1": 40.0},
            {"latency_median_ms": 3.0, "accuracy_top1": 70.0}]
    assert pareto_front(rows) == [rows[0], rows[2]]


def test_latency_table_from_per_op_rows(tmp_path) -> None:
    from edgeq.plan.latency import LatencyTable

    rows = [{"timing": "emulated", "per_op": {"base_ms": 1.0, "layers": {
                "blocks.0.mlp.fc1": {"w": 8, "a": 8, "ms": 0.5}, "blocks.0.attn.matmul_qk": {"w": 8, "a": 8, "ms": 0.2}}}},
            {"timing": "emulated", "per_op": {"base_ms": 1.2, "layers": {
                "blocks.0.mlp.fc1": {"w": 4, "a": 8, "ms": 0.3}, "blocks.0.attn.matmul_qk": {"w": 8, "a": 8, "ms": 0.2}}}}]
    config = ProfileConfig(BuildConfig(target="rasp4", model="edgeq/vit-cifar10"), plans=[], out=tmp_path)
    path = profile_module.write_latency_table(rows, config, tmp_path / "t.json")
    table = LatencyTable.load(path)
    assert table.target == "rasp4" and table.model == "edgeq/vit-cifar10" and table.base_ms == pytest.approx(1.1)
    assert table.ms("blocks.0.mlp.fc1", 4, 8) == 0.3 and table.extra_header["timing"] == "emulated"


def test_unreachable_board_fails_before_any_build(tiny_builds, tmp_path) -> None:
    from edgeq.errors import RemoteUnreachableError
    from edgeq.boards.local import free_port

    with pytest.raises(RemoteUnreachableError, match="refused"):
        profile_plans(ProfileConfig(HOST_BUILD, plans=write_plans(tmp_path, 1), out=tmp_path / "r",
                                    rpc=f"127.0.0.1:{free_port()}", env={}))
    assert tiny_builds == []


def test_results_of_another_target_are_not_mixed(tmp_path) -> None:
    from edgeq.errors import EdgeqError

    (tmp_path / "results.json").write_text(json.dumps({"header": {"model": "m", "target": "rasp4"}, "rows": []}))
    with pytest.raises(EdgeqError, match="target 'rasp4', not 'host'"):
        profile_module.ResultsBook(tmp_path, {"model": "m", "target": "host"})
    (tmp_path / "results.json").write_text("[1, 2]")
    with pytest.raises(EdgeqError, match="not a profile results file"):
        profile_module.ResultsBook(tmp_path, {"model": "m", "target": "host"})


def test_a_build_reports_each_stage_and_long_counted_stages_as_they_go(tmp_path, monkeypatch) -> None:
    clock = [100.0]
    monkeypatch.setattr(profile_module.time, "monotonic", lambda: clock[0])

    def build(config, folder, progress=None):
        for stage, done, total, seconds in [("loading model", None, None, 2), ("quantizing", 1, 38, 5),
                                            ("quantizing", 2, 38, 10), ("quantizing", 30, 38, 10),
                                            ("quantizing", 38, 38, 30), ("compiling for rasp4", None, None, 0)]:
            clock[0] += seconds
            progress(stage, done, total)

    monkeypatch.setattr("edgeq.compile.build.build_artifact", build)
    lines: list[str] = []
    job = profile_module.PlanJob(write_plans(tmp_path, 1)[0], "0123456789abcdef", {})
    profile_module.build_plan(job, ProfileConfig(HOST_BUILD, plans=[], out=tmp_path), tmp_path, lines.append)
    assert lines == ["plan0.json: building for host", "plan0.json: loading model (2 s)", "plan0.json: quantizing (7 s)",
                     "plan0.json: quantizing 30/38 (27 s)", "plan0.json: quantizing 38/38 (57 s)",
                     "plan0.json: compiling for rasp4 (57 s)", "plan0.json: built in 57 s"]


def test_each_plan_is_built_as_the_profile_build_config_says(tmp_path, monkeypatch) -> None:
    built = []
    monkeypatch.setattr("edgeq.compile.build.build_artifact", lambda config, folder, progress=None: built.append(config))
    plan = write_plans(tmp_path, 1)[0]
    build = BuildConfig(target="rasp4", model="edgeq/swin-cifar10", calib="c.yaml", calib_count=8, method="repq")
    job = profile_module.PlanJob(plan, "0123456789abcdef", {})
    for data, eval_limit in ((None, build.eval_limit), ("val", 0)):  # with --data the board's check is the accuracy
        config = ProfileConfig(build, plans=[plan], out=tmp_path, data=data)
        profile_module.build_plan(job, config, tmp_path, lambda _: None)
        assert built.pop() == dataclasses.replace(build, plan=str(plan), eval_limit=eval_limit)


@pytest.mark.parametrize("repeat, rounds", [(2, [1, 1]), (5, [1] * 5), (10, [1] * 10), (23, [3, 3, 3] + [2] * 7),
                                            (100, [10] * 10)])
def test_timing_rounds_split_the_runs(repeat, rounds) -> None:
    assert profile_module.timing_rounds(repeat) == rounds and sum(rounds) == repeat


def test_timing_calls_the_evaluator_once_per_round_and_keeps_every_run() -> None:
    class Model:
        calls: list = []

        def time(self, x, *, number, repeat, min_repeat_ms):
            self.calls.append((number, repeat, min_repeat_ms))
            return [0.001 * (len(self.calls) * 10 + i) for i in range(repeat)]

    model, steps = Model(), []
    config = ProfileConfig(HOST_BUILD, plans=[], out=".", repeat=23, min_repeat_ms=7)
    seconds = profile_module.time_in_rounds(model, None, config, lambda *step: steps.append(step))
    assert model.calls == [(1, 3, 7)] * 3 + [(1, 2, 7)] * 7
    assert len(seconds) == 23 and seconds[:4] == [0.010, 0.011, 0.012, 0.020]
    assert steps == [("timing", i, 10) for i in range(1, 11)]


def test_progress_follows_warm_up_rounds_and_accuracy_per_plan(lab, tiny_builds, tmp_path, monkeypatch) -> None:
    from edgeq.boards import check

    monkeypatch.setattr(check, "load_images", lambda artifact, data, limit, seed=0: (None, list(range(3))))
    monkeypatch.setattr(check, "image_batches", lambda dataset, indices, batch: iter(
        [([i], np.zeros((1, 3, 32, 32), "float32"), [0]) for i in indices]))
    steps: list[tuple] = []
    plans = write_plans(tmp_path, 2)
    outcome = profile_plans(ProfileConfig(HOST_BUILD, plans=plans, out=tmp_path / "r", **at(lab), repeat=4, warmup=2,
                                          data=str(tmp_path), limit=3), progress=lambda *step: steps.append(step))
    assert all(row["repeat"] == 4 and len(row["latency_all_ms"]) == 4 for row in outcome.rows)
    for plan in ("plan0.json", "plan1.json"):
        assert [s[1:] for s in steps if s[0] == plan] == [
            ("warm-up", 1, 2), ("warm-up", 2, 2), *[("timing", i, 4) for i in range(1, 5)],
            *[("checking accuracy", i, 3) for i in range(1, 4)]]


def test_cli_plan_progress_prints_a_line_per_step_without_a_terminal(capsys, monkeypatch) -> None:
    import sys

    from edgeq.cli import plan_progress

    calls = [("a.json", "warm-up", 1, 2), ("a.json", "warm-up", 2, 2), ("a.json", "timing", 1, 5),
             ("b.json", "timing", 1, 5), ("a.json", "timing", 2, 5), ("a.json", "checking accuracy", 1, 20)]
    with plan_progress() as progress:
        for call in calls:
            progress(*call)
    assert capsys.readouterr().err.splitlines() == [
        "edgeq: a.json: warm-up (2 calls)", "edgeq: a.json: timing (5 rounds)", "edgeq: b.json: timing (5 rounds)",
        "edgeq: a.json: checking accuracy (20 images)"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    with plan_progress() as progress:  # the rich bars: one per plan, restarted per step
        for call in calls:
            progress(*call)


def test_missing_data_fails_before_any_build(tiny_builds, tmp_path) -> None:
    from edgeq.errors import DataError

    with pytest.raises(DataError, match="does not exist"):
        profile_plans(ProfileConfig(HOST_BUILD, plans=write_plans(tmp_path, 1), out=tmp_path / "r",
                                    rpc="127.0.0.1:9", env={}, data=str(tmp_path / "nowhere")))
    assert tiny_builds == []
