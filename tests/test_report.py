"""annsample.report: the results table of finished runs, seeds of one run name averaged."""

from __future__ import annotations

import json

import numpy as np
import pytest

from annsample.errors import RunError
from annsample.report import COLUMNS, read_results, results_table, seconds_to_reach


def write_run(folder, name, ndcg10, seconds=2.0, epochs=(3, 2)):
    folder.mkdir(parents=True)
    metrics = {column: 0.1 for column in COLUMNS} | {"ndcg@10": ndcg10}
    results = {
        "name": name,
        "test": metrics,
        "valid": metrics,
        "epochs_run": epochs[0],
        "best_epoch": epochs[1],
        "seconds_per_epoch": seconds,
    }
    (folder / "results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def test_runs_sharing_a_name_are_averaged_over_seeds(tmp_path):
    runs = [
        write_run(tmp_path / "a0", "ann", 0.30, seconds=2.0),
        write_run(tmp_path / "a1", "ann", 0.34, seconds=4.0, epochs=(5, 4)),
        write_run(tmp_path / "u0", "uniform", 0.2),
    ]
    lines = results_table(runs).splitlines()
    assert lines[0].startswith("| run | seeds | hr@5 |") and len(lines) == 4
    ann, uniform = lines[2].split(" | "), lines[3].split(" | ")
    ndcg10 = 2 + COLUMNS.index("ndcg@10")
    assert ann[1] == "2" and ann[ndcg10] == f"0.3200 ± {np.std([0.30, 0.34], ddof=1):.4f}"
    assert ann[-2:] == ["3.0", "3 (2), 5 (4) |"]  # median s/epoch; epochs (best) per seed
    assert uniform[1] == "1" and uniform[ndcg10] == "0.2000"  # one seed: no ± part


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "has no results.json; it is not a finished training run"),
        ("{", "is not valid JSON"),
        ("[1, 2]", "holds no JSON object"),
        ('{"name": "x"}', "lacks test, valid, best_epoch"),
    ],
)
def test_what_is_not_a_finished_run_is_a_run_error(tmp_path, content, message):
    if content is not None:
        (tmp_path / "results.json").write_text(content, encoding="utf-8")
    with pytest.raises(RunError, match=message):
        read_results(tmp_path)


def write_curve(folder, curve):
    """metrics.jsonl with one (epoch seconds, validation NDCG@10) pair per epoch."""
    lines = [{"step": 0, "train/loss": 1.0}]  # records without either key are passed over
    for epoch, (seconds, ndcg) in enumerate(curve, start=1):
        lines.append({"step": epoch, "train/epoch_seconds": seconds, "train/epoch": epoch})
        lines.append({"step": epoch, "eval/valid/ndcg@10": ndcg})
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (folder / "metrics.jsonl").write_text(text, encoding="utf-8")


def test_time_to_quality_sums_training_seconds_until_validation_first_reaches_it(tmp_path):
    fast = write_run(tmp_path / "f0", "fast", 0.06)
    write_curve(fast, [(10.0, 0.03), (12.0, 0.05), (11.0, 0.04)])
    assert seconds_to_reach(fast, 0.05) == 22.0  # first reached at epoch 2, not re-counted later
    assert seconds_to_reach(fast, 0.03) == 10.0
    assert seconds_to_reach(fast, 0.051) is None
    slow = [write_run(tmp_path / f"s{i}", "slow", 0.05) for i in range(3)]
    write_curve(slow[0], [(30.0, 0.05)])
    write_curve(slow[1], [(30.0, 0.01), (40.0, 0.06)])
    write_curve(slow[2], [(30.0, 0.01)])
    lines = results_table([fast, *slow], time_to=0.05).splitlines()
    assert lines[0].endswith("| train s to valid NDCG@10 ≥ 0.05 |")
    assert lines[2].endswith("| 22 |")
    assert lines[3].endswith("| 50 (2 of 3) |")  # median of the seeds that reached it
    assert results_table([slow[2]], time_to=0.05).splitlines()[2].endswith("| not reached |")
    with pytest.raises(RunError, match="no metrics.jsonl"):
        seconds_to_reach(write_run(tmp_path / "bare", "bare", 0.1), 0.05)
