"""annsample.ablation_report: rows of a grid's finished runs with their settings, metrics and index
figures, the summary averaged over seeds, and ``annsample ablate report`` rebuilding every output.

The grids are trained by the stub runner of tests/ablation_stubs.py (metrics a known function of the
settings)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from ablation_stubs import fake_ndcg, stub_runner
from click.testing import CliRunner
from conftest import TINY_DATA
from conftest import TINY_PATH as TINY

from annsample.ablation import run_ablation
from annsample.ablation_report import OUTPUTS, collect_rows, refresh_interval, summary_markdown
from annsample.checkpoint import flatten
from annsample.cli.main import main
from annsample.config import RunConfig, config_to_dict, load_config
from annsample.errors import RunError

ANN = (TINY_DATA, "sampler.name=ann", "sampler.index.nlist=16", "sampler.index.nprobe=4")
REFRESH = "sampler.index.refresh_every"
PLOTS = ("quality.png", "wall_time.png", "staleness.png", "training.png")


def test_rows_hold_settings_metrics_and_index_figures(tmp_path):
    out = tmp_path / "grid"
    run_ablation(
        TINY,
        (f"{REFRESH}=never,5,epoch", "sampler.index.asynchronous=false,true"),
        out,
        seeds=[0, 1],
        overrides=ANN,
        runner=stub_runner,
        show_progress=False,
    )
    # an interrupted run is listed, not tabulated
    interrupted = out / "refresh_every=5_asynchronous=true_seed=1"
    (interrupted / "results.json").unlink()
    rows, columns, unfinished = collect_rows(out)
    assert columns == ["refresh_interval", "sampler.index.asynchronous"]
    assert unfinished == [interrupted] and len(rows) == 9  # never x async=true left out
    # sorted by interval: steps (epoch at its 20 steps), then never
    assert list(dict.fromkeys(r["refresh_interval"] for r in rows)) == ["5", "epoch", "never"]
    for row in rows:
        assert row["refresh_interval"] == row["run"].split("_asynchronous")[0].removeprefix(
            "refresh_every="
        )
        assert row["test_ndcg@10"] == pytest.approx(fake_ndcg(load(out / row["run"])))
        assert row["train_seconds"] == pytest.approx(4.0)
        assert (row["refresh_count"], row["wait_seconds"]) == (4, 0.5)
        assert (row["recall_mean"], row["recall_final"]) == (pytest.approx(0.85), 0.8)
        assert row["tv_final"] == 0.2 and row["drift_mean"] is None
        # the training curves behind training.png
        assert row["_series"]["loss"] == [(20, 0.8), (40, 0.6)]
        assert row["_series"]["valid"][-1] == (40, pytest.approx(row["test_ndcg@10"]))
        assert row["wall_seconds"] >= 0.0
    summary = summary_markdown(rows, columns, unfinished)
    never = [line for line in summary.splitlines() if line.startswith("| never | False |")]
    values = [
        fake_ndcg(load(out / f"refresh_every=never_asynchronous=false_seed={s}")) for s in (0, 1)
    ]
    expected = f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"
    assert len(never) == 1 and never[0].split(" | ")[3] == expected
    assert "refresh_every=5_asynchronous=true_seed=1 (logs/" in summary


def load(run_dir: Path) -> RunConfig:
    return load_config(run_dir / "config.yaml")


def test_report_of_a_folder_without_finished_runs_is_an_error(tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        collect_rows(tmp_path / "missing")
    with pytest.raises(RunError, match="no finished run"):
        collect_rows(tmp_path)


def test_ablate_report_rebuilds_every_output(tmp_path):
    pytest.importorskip(
        "matplotlib", reason="matplotlib (a dependency: pip install -e .) is not installed"
    )
    out = tmp_path / "grid"
    run_ablation(
        TINY, (f"{REFRESH}=1,never",), out, seeds=[0, 1], overrides=ANN, runner=stub_runner
    )
    result = CliRunner().invoke(main, ["ablate", "report", str(out)])
    assert result.exit_code == 0, result.output
    assert "| 1 | 2 |" in result.output and "| never | 2 |" in result.output
    written = {name: (out / name).stat().st_mtime_ns for name in OUTPUTS}
    for name in written:
        (out / name).unlink()
    result = CliRunner().invoke(main, ["ablate", "report", str(out)])
    assert result.exit_code == 0, result.output
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "results.csv").open(encoding="utf-8") as file:
        table = list(csv.DictReader(file))
    assert [r["run"] for r in table] == [
        r["run"] for r in json.loads((out / "results.json").read_text())
    ]
    assert {r["refresh_interval"] for r in table} == {"1", "never"} and len(table) == 4
    assert (out / "summary.md").read_text(encoding="utf-8") in result.output


def test_refresh_interval_names_the_schedule():
    config = flatten(config_to_dict(RunConfig()))
    assert refresh_interval(config) == "-"  # the default sampler is uniform: no index
    config["sampler.name"] = "ann"
    assert refresh_interval(config) == str(RunConfig().sampler.index.refresh_every)
    config["sampler.index.refresh"] = "never"
    assert refresh_interval(config) == "never"
    config["loss.name"] = "full_ce"
    assert refresh_interval(config) == "-"
