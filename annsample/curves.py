"""Validation curves of training runs, finished or not, by epoch and by training second, with an
optional published reference curve (``annsample curves``; docs/results.md, "A training recipe at
the published level").

Only a run folder's ``metrics.jsonl`` is read, so a run that was stopped early still plots.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from annsample.errors import RunError


def run_curve(run_dir: str | Path) -> list[tuple[int, float, float]]:
    """``[(epoch, training seconds, validation NDCG@10), ...]`` of one run folder; seconds are
    the ``train/epoch_seconds`` logged before that validation, summed (validations excluded)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(
            f"{run_dir} has no metrics.jsonl; pass the --out folder of `annsample train`"
        )
    total = 0.0
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if "train/epoch_seconds" in record:
            total += record["train/epoch_seconds"]
        if "eval/valid/ndcg@10" in record:
            points.append((record["train/epoch"], total, record["eval/valid/ndcg@10"]))
    return points


def reference_curve(path: str | Path) -> list[tuple[int, float]]:
    """``[(epoch, validation NDCG@10), ...]`` from a CSV with the columns ``epoch,valid_ndcg10``
    (lines starting with ``#`` are comments: say where the figures come from)."""
    lines = [
        line for line in Path(path).read_text(encoding="utf-8").splitlines() if line[:1] != "#"
    ]
    rows = list(csv.DictReader(lines))
    if not rows or not {"epoch", "valid_ndcg10"} <= set(rows[0]):
        raise RunError(f"{path}: expected a CSV header 'epoch,valid_ndcg10' and at least one row")
    return [(int(row["epoch"]), float(row["valid_ndcg10"])) for row in rows]


def plot_runs(
    runs: list[tuple[str, list[tuple[int, float, float]]]],
    path: str | Path,
    reference: tuple[str, list[tuple[int, float]]] | None = None,
) -> None:
    """Two panels: validation NDCG@10 against epochs (with the reference, which has no
    seconds) and against training seconds; one line per ``(label, run_curve)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.6))
    if reference is not None:
        label, points = reference
        by_epoch.plot(*zip(*points, strict=True), "k--", label=label)
    for label, points in runs:
        epochs, seconds, values = zip(*points, strict=True) if points else ((), (), ())
        (line,) = by_epoch.plot(epochs, values, marker=".", label=label)
        by_time.plot(seconds, values, marker=".", color=line.get_color())
    by_epoch.set(xlabel="epoch", ylabel="validation NDCG@10")
    by_time.set(xlabel="training seconds (validations excluded)")
    for axis in (by_epoch, by_time):
        axis.grid(alpha=0.3)
    handles, labels = by_epoch.get_legend_handles_labels()
    # the legend sits below the panels: long labels would hide the curves
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.045 * ((len(labels) + 1) // 2) + 0.03, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
