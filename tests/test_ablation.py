"""Ablation grids: expansion, parallel runs, resume and failure isolation (the report rebuilt from
the runs: test_ablation_report.py).

Most tests inject a stub runner (tests/ablation_stubs.py: a light module, since every worker process
imports it) that writes a finished run folder in milliseconds, its metrics a known function of its
settings; one end-to-end test trains two tiny real runs through the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ablation_stubs import dying_runner, stub_runner
from click.testing import CliRunner
from conftest import TINY_DATA
from conftest import TINY_PATH as TINY

from annsample import ablation
from annsample.ablation import (
    axis_settings,
    default_threads,
    parse_grid,
    parse_seeds,
    plan_runs,
    run_ablation,
)
from annsample.ablation_report import collect_rows
from annsample.cli.main import main
from annsample.config import RunConfig, TrainConfig, catalog_overrides
from annsample.errors import ConfigError

ANN = (
    TINY_DATA,
    "sampler.name=ann",
    "sampler.index.nlist=16",
    "sampler.index.nprobe=4",
)
REFRESH = "sampler.index.refresh_every"
PLOTS = ("quality.png", "wall_time.png", "staleness.png", "training.png")


class Recorder:
    """A runner that records its calls (jobs=1 only: it is not sent to a process)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, bool]] = []

    def __call__(self, config: RunConfig, run_dir: Path, resume: bool, overwrite: bool) -> None:
        self.calls.append((run_dir.name, resume, overwrite))
        stub_runner(config, run_dir, resume, overwrite)


def test_parse_grid_rejects_malformed_axes():
    assert parse_grid(("a.b=1, 2",)) == [("a.b", ["1", "2"])]
    for text in ("a.b", "=1", "a=", "a=, ,"):
        with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
            parse_grid((text,))
    with pytest.raises(ConfigError, match="more than once"):
        parse_grid(("train.lr=1,2", "train.lr=3"))
    with pytest.raises(ConfigError, match="use one axis"):
        parse_grid((f"{REFRESH}=1,10", "sampler.index.refresh=never"))


def test_parse_seeds():
    assert parse_seeds("2,0, 1") == [2, 0, 1]
    for text in ("0,a", "", "1,1"):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(text)


def test_refresh_words_map_to_the_schedule():
    assert axis_settings(REFRESH, "epoch") == ("sampler.index.refresh=epoch",)
    assert axis_settings(REFRESH, "25") == ("sampler.index.refresh=steps", f"{REFRESH}=25")
    assert axis_settings("sampler.index.asynchronous", "true") == (
        "sampler.index.asynchronous=true",
    )


def test_grid_expands_every_combination_times_every_seed():
    plans = plan_runs(
        TINY,
        (f"{REFRESH}=1,epoch,never", "sampler.index.asynchronous=false,true"),
        seeds=[0, 1],
        overrides=ANN,
        threads=3,
    )
    # never x asynchronous=true would repeat never x false: left out
    assert len(plans) == 3 * 2 * 2 - 2
    assert not any("never_asynchronous=true" in plan.label for plan in plans)
    assert len({plan.label for plan in plans}) == len(plans)
    first = plans[0]
    assert first.label == "refresh_every=1_asynchronous=false_seed=0"
    assert first.config.name == "tiny-refresh_every=1_asynchronous=false"  # seeds share a name
    schedules = {
        (p.config.sampler.index.refresh, p.config.sampler.index.refresh_every)
        for p in plans
        if p.config.sampler.index.refresh != "steps"
    }
    assert {kind for kind, _ in schedules} == {"epoch", "never"}
    assert {(p.config.seed, p.config.sampler.index.asynchronous) for p in plans} == {
        (s, a) for s in (0, 1) for a in (False, True)
    }
    # a grid whose every combination is ignored-setting, or otherwise invalid, is still an error
    with pytest.raises(ConfigError, match="asynchronous"):
        plan_runs(TINY, (f"{REFRESH}=never", "sampler.index.asynchronous=true"), overrides=ANN)
    assert {p.config.train.num_threads for p in plans} == {3}
    assert not any(p.config.train.show_progress for p in plans)
    # a thread count the user fixed is kept
    (fixed,) = plan_runs(TINY, ("train.lr=0.01",), overrides=("train.num_threads=2",), threads=5)
    assert (fixed.label, fixed.config.train.num_threads) == ("lr=0.01", 2)


def test_catalog_preset_applies_to_every_run_and_settings_still_win():
    preset = catalog_overrides(100_000)
    plans = plan_runs(
        None,
        (f"{REFRESH}=10,never",),
        seeds=[0],
        overrides=("train.max_seconds=60",),
        preset=preset,
    )
    assert [plan.label for plan in plans] == [
        "refresh_every=10_seed=0",
        "refresh_every=never_seed=0",
    ]
    for plan in plans:
        assert plan.config.data.path == "synthetic"
        assert plan.config.data.synthetic_items == 100_000
        assert plan.config.sampler.name == "ann"
        assert plan.config.train.max_seconds == 60  # --set wins over the preset
    assert plans[1].config.sampler.index.refresh == "never"


def test_a_catalog_grid_with_never_reports_and_resumes(tmp_path):
    # the preset sets refresh_every=100, which a refresh=never run's saved config still lists:
    # reading the folder back (report, resume check) must not call that an ignored setting
    out = tmp_path / "grid"
    grid = (f"{REFRESH}=100,never",)
    preset = catalog_overrides(100_000)
    first = run_ablation(
        None, grid, out, seeds=[0], preset=preset, runner=stub_runner, show_progress=False
    )
    assert [o.state for o in first] == ["finished", "finished"]
    rows, _, unfinished = collect_rows(out)
    assert [r["refresh_interval"] for r in rows] == ["100", "never"] and not unfinished
    again = run_ablation(
        None, grid, out, seeds=[0], preset=preset, runner=stub_runner, show_progress=False
    )
    assert [o.state for o in again] == ["skipped", "skipped"]


def test_axes_sharing_a_last_key_part_get_full_names():
    plans = plan_runs(TINY, ("sampler.name=uniform", "loss.name=bce"))
    assert plans[0].label == "sampler.name=uniform_loss.name=bce"


def test_grid_refuses_seed_axes_and_bad_values_before_any_run(tmp_path):
    with pytest.raises(ConfigError, match="--seeds"):
        run_ablation(TINY, ("seed=0,1",), tmp_path / "grid", runner=stub_runner)
    with pytest.raises(ConfigError, match="sampler.name"):
        run_ablation(
            TINY, ("sampler.name=uniform,nonsense",), tmp_path / "grid", runner=stub_runner
        )
    with pytest.raises(ConfigError, match="--jobs"):
        run_ablation(TINY, ("train.lr=0.1",), tmp_path / "grid", jobs=0, runner=stub_runner)
    assert not (tmp_path / "grid").exists()


def test_default_threads_share_the_cores():
    cores = len(os.sched_getaffinity(0))
    assert default_threads(1) == cores
    assert default_threads(cores) == 1
    assert default_threads(4 * cores) == 1


def test_finished_runs_are_skipped_and_interrupted_ones_resumed(tmp_path):
    out = tmp_path / "grid"
    grid = (f"{REFRESH}=1,10,never",)
    first = run_ablation(TINY, grid, out, overrides=ANN, runner=stub_runner, show_progress=False)
    assert [o.state for o in first] == ["finished"] * 3
    # interrupt two runs: one after a checkpoint, one before its first checkpoint
    (out / "refresh_every=10" / "results.json").unlink()
    (out / "refresh_every=10" / "checkpoints").mkdir()
    (out / "refresh_every=10" / "checkpoints" / "step-00000020.pt").write_bytes(b"x")
    (out / "refresh_every=never" / "results.json").unlink()
    recorder = Recorder()
    second = run_ablation(TINY, grid, out, overrides=ANN, runner=recorder, show_progress=False)
    assert [o.state for o in second] == ["skipped", "resumed", "finished"]
    assert recorder.calls == [
        ("refresh_every=10", True, False),
        ("refresh_every=never", False, True),
    ]
    # --overwrite runs everything again from scratch
    recorder = Recorder()
    run_ablation(
        TINY, grid, out, overrides=ANN, overwrite=True, runner=recorder, show_progress=False
    )
    assert [resume for _, resume, _ in recorder.calls] == [False] * 3


def test_a_run_folder_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "grid"
    run_ablation(TINY, (f"{REFRESH}=1",), out, overrides=ANN, runner=stub_runner)
    lr = TrainConfig().lr  # configs/tiny.yaml keeps the default
    with pytest.raises(ConfigError, match=f"train.lr={lr} but the grid now asks for train.lr=0.01"):
        run_ablation(TINY, (f"{REFRESH}=1",), out, overrides=(*ANN, "train.lr=0.01"))


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_failed_run_does_not_stop_the_others(tmp_path, jobs):
    out = tmp_path / "grid"
    outcomes = run_ablation(
        TINY,
        ("sampler.index.nprobe=2,3,4",),
        out,
        overrides=ANN,
        jobs=jobs,
        runner=stub_runner,
        show_progress=False,
    )
    by_label = {o.label: o for o in outcomes}
    failed = [o for o in outcomes if o.state == "failed"]
    assert {o.label for o in failed} == {
        label for label in by_label if label.startswith("nprobe=3")
    }
    assert all(o.state == "finished" for o in outcomes if o not in failed)
    log = out / "logs" / f"{failed[0].label}.log"
    assert failed[0].error == f"RuntimeError: stub failure on two lines (log: {log})"
    assert "Traceback" in log.read_text(encoding="utf-8")
    assert ablation.failures_text(outcomes).count("FAILED nprobe=3") == len(failed)
    rows, _, unfinished = collect_rows(out)
    assert len(rows) == len(outcomes) - len(failed) and unfinished == []


def test_a_run_whose_process_dies_fails_alone(tmp_path):
    outcomes = run_ablation(
        TINY,
        ("sampler.index.nprobe=3,4",),
        tmp_path / "grid",
        overrides=ANN,
        jobs=2,
        runner=dying_runner,
        show_progress=False,
    )
    assert [o.state for o in outcomes] == ["failed", "finished"]
    assert "process died (exit code 7)" in outcomes[0].error


def test_cli_usage_errors_are_one_line(tmp_path):
    result = CliRunner().invoke(main, ["ablate"])  # `ablate` alone is `ablate run`
    assert result.exit_code == 2 and "Missing option '--grid'" in result.output
    result = CliRunner().invoke(main, ["ablate", "--grid", "train.lr", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "expected KEY=V1,V2" in result.output
    result = CliRunner().invoke(main, ["ablate", "report", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_cli_exits_1_and_names_the_failed_run(tmp_path, monkeypatch):
    pytest.importorskip(
        "matplotlib", reason="matplotlib (a dependency: pip install -e .) is not installed"
    )
    monkeypatch.setattr(ablation, "train_runner", stub_runner)
    args = ["ablate", "--config", str(TINY), "--grid", "sampler.index.nprobe=3,4"]
    args += [arg for override in ANN for arg in ("--set", override)]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "grid")])
    assert result.exit_code == 1
    assert "FAILED nprobe=3: RuntimeError: stub failure" in result.output
    assert "| nprobe=4 | finished |" in result.output
    assert (tmp_path / "grid" / "summary.md").is_file()


@pytest.mark.slow
def test_two_tiny_real_runs_end_to_end(tmp_path):
    """Real training through the ablation (no plots, so it runs without matplotlib too)."""
    out = tmp_path / "grid"
    fast = (*ANN, "train.epochs=1", "train.num_threads=1", "sampler.index.probe_every=2")
    grid = (f"{REFRESH}=2,never",)
    outcomes = run_ablation(TINY, grid, out, overrides=fast, show_progress=False)
    assert [o.state for o in outcomes] == ["finished", "finished"], outcomes
    rows, columns, unfinished = collect_rows(out)
    assert columns == ["refresh_interval"] and unfinished == []
    by_interval = {r["refresh_interval"]: r for r in rows}
    assert set(by_interval) == {"2", "never"}
    steps = by_interval["2"]["steps"]
    assert by_interval["2"]["refresh_count"] == steps // 2
    assert by_interval["never"]["refresh_count"] == 0
    assert by_interval["never"]["wait_seconds"] == 0.0
    # probes every 2 steps: the never-refreshed index falls behind the refreshed one
    assert len(by_interval["never"]["_series"]["recall"]) == steps // 2
    assert by_interval["never"]["drift_final"] > by_interval["2"]["drift_final"]
    assert all(0.0 <= r["recall_final"] <= 1.0 and 0.0 <= r["tv_final"] <= 1.0 for r in rows)
    assert all(r["wall_seconds"] > 0 and r["train_seconds"] > 0 for r in rows)
    # running it again trains nothing
    again = run_ablation(TINY, grid, out, overrides=fast, show_progress=False)
    assert [o.state for o in again] == ["skipped", "skipped"]


def test_a_resumed_run_keeps_the_threads_it_started_with(tmp_path):
    # a checkpoint only resumes under its own config, and --jobs may change between invocations
    (started,) = plan_runs(TINY, (f"{REFRESH}=10",), overrides=ANN, threads=7)
    stub_runner(started.config, tmp_path / started.label, False, False)
    (now,) = plan_runs(TINY, (f"{REFRESH}=10",), overrides=ANN, threads=1)
    resumed = ablation.resume_config(now, tmp_path / now.label)
    assert resumed.train.num_threads == 7
    assert resumed == started.config
