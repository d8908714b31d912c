"""Tests for annsample.curves and `annsample curves`: curves of finished or stopped runs."""

from __future__ import annotations

import json

import pytest
from conftest import REPO, invoke

from annsample.curves import reference_curve, run_curve
from annsample.errors import RunError


def write_metrics(run, records) -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_run_curve_sums_epoch_seconds_up_to_each_validation(tmp_path):
    # a stopped run: metrics.jsonl only, validation every second epoch, a step record in between
    write_metrics(
        tmp_path / "run",
        [
            {"step": 1, "train/epoch": 1, "train/epoch_seconds": 2.0},
            {"step": 2, "train/epoch": 2, "train/epoch_seconds": 3.0},
            {"step": 2, "train/epoch": 2, "eval/valid/ndcg@10": 0.01},
            {"step": 3, "train/epoch": 3, "train/loss": 1.0},
            {"step": 3, "train/epoch": 3, "train/epoch_seconds": 4.0},
            {"step": 4, "train/epoch": 4, "train/epoch_seconds": 5.0},
            {"step": 4, "train/epoch": 4, "eval/valid/ndcg@10": 0.03},
        ],
    )
    assert run_curve(tmp_path / "run") == [(2, 5.0, 0.01), (4, 14.0, 0.03)]
    with pytest.raises(RunError, match="no metrics.jsonl"):
        run_curve(tmp_path)


def test_reference_csv_skips_comments_and_refuses_other_columns(tmp_path):
    good = tmp_path / "ref.csv"
    good.write_text("# from a public log\nepoch,valid_ndcg10\n0,0.001\n5,0.0118\n")
    assert reference_curve(good) == [(0, 0.001), (5, 0.0118)]
    bad = tmp_path / "bad.csv"
    bad.write_text("epoch,ndcg\n0,0.1\n")
    with pytest.raises(RunError, match="epoch,valid_ndcg10"):
        reference_curve(bad)
    # the shipped reference reads (the recipe docs plot it)
    shipped = reference_curve(REPO / "docs" / "recipe" / "reference_beauty_ce_valid.csv")
    assert shipped[0] == (0, 0.0005) and max(v for _, v in shipped) == 0.0729


def test_cli_plots_labelled_runs_with_a_reference(tmp_path):
    pytest.importorskip("matplotlib", reason="the plot needs the optional matplotlib (.[plot])")
    records = [
        {"step": 1, "train/epoch": 1, "train/epoch_seconds": 2.0},
        {"step": 1, "train/epoch": 1, "eval/valid/ndcg@10": 0.02},
    ]
    write_metrics(tmp_path / "a", records)
    write_metrics(tmp_path / "b", records)
    ref = tmp_path / "ref.csv"
    ref.write_text("epoch,valid_ndcg10\n0,0.0\n1,0.02\n")
    png = tmp_path / "curves.png"
    result = invoke(
        ["curves", f"first run={tmp_path / 'a'}", str(tmp_path / "b"), "--png", str(png),
         "--reference", str(ref)]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert png.stat().st_size > 1000
    missing = invoke(["curves", str(tmp_path / "a"), "--png", str(tmp_path / "no" / "c.png")])
    assert missing.exit_code != 0 and "does not exist" in missing.output
