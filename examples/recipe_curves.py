"""Validation NDCG@10 against epochs and against training seconds for several runs, with a
published reference curve, in one PNG (docs/results.md, "A training recipe at the published level").

    python examples/recipe_curves.py --reference docs/recipe/reference_beauty_ce_valid.csv \
        --run "old defaults=runs/beauty-full-ce-s0" --run "recipe=runs/recipe/ce-hp" \
        --out docs/recipe/beauty_curves.png

Each run folder's metrics.jsonl gives the validation records (``train/epoch``) and the seconds of
every epoch (``train/epoch_seconds``, validation excluded); the reference CSV has only epochs, so it
appears in the left panel alone.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def run_curve(folder: Path) -> tuple[list[int], list[float], list[float]]:
    """(epochs, training seconds at each, validation NDCG@10) of one run folder."""
    seconds_at: dict[int, float] = {}
    total = 0.0
    points: list[tuple[int, float]] = []
    for line in (folder / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train/epoch_seconds" in record:
            total += record["train/epoch_seconds"]
            seconds_at[record["train/epoch"]] = total
        if "eval/valid/ndcg@10" in record:
            points.append((record["train/epoch"], record["eval/valid/ndcg@10"]))
    epochs = [epoch for epoch, _ in points]
    return epochs, [seconds_at.get(epoch, float("nan")) for epoch in epochs], [v for _, v in points]


def reference_curve(path: Path) -> tuple[list[int], list[float]]:
    rows = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    table = list(csv.DictReader(rows))
    return [int(row["epoch"]) for row in table], [float(row["valid_ndcg10"]) for row in table]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="LABEL=RUN_DIR")
    parser.add_argument("--reference", type=Path, help="CSV of epoch,valid_ndcg10")
    parser.add_argument("--reference-label", default="public full-CE SASRec log")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    fig, (by_epoch, by_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    if args.reference:
        epochs, values = reference_curve(args.reference)
        by_epoch.plot(epochs, values, "k--", label=args.reference_label)
    for item in args.run:
        label, _, folder = item.partition("=")
        if not folder:
            parser.error(f"--run {item!r}: write LABEL=RUN_DIR")
        epochs, seconds, values = run_curve(Path(folder))
        (line,) = by_epoch.plot(epochs, values, marker=".", label=label)
        by_time.plot(seconds, values, marker=".", color=line.get_color(), label=label)
    by_epoch.set(xlabel="epoch", ylabel="validation NDCG@10")
    by_time.set(xlabel="training seconds (one thread, validation excluded)")
    for axis in (by_epoch, by_time):
        axis.grid(alpha=0.3)
    handles, labels = by_epoch.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
