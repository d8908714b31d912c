"""Tables and plots of an ablation folder, rebuilt from its finished run folders alone.

Each run folder under the ablation's output folder (one with ``config.yaml``) is read back: its
``config.yaml`` says which settings it ran with, ``results.json`` its final metrics, and
``metrics.jsonl`` its index refreshes and staleness over training. The settings that differ between
runs (other than the seed) are the ablation's axes; the refresh schedule is always shown as one
``refresh_interval`` column (``1``, ``100``, ``epoch``, ``adaptive``, ``never``; ``-`` where no
index is used). Outputs: ``results.csv`` and ``results.json`` (one row per run), ``summary.md``
(mean ± std over seeds), and the PNG plots ``quality.png``, ``wall_time.png``, ``staleness.png``
and ``training.png`` (each epoch's mean training loss and validation NDCG@10 over steps, where a
refresh that unsettles training, as ANCE-style work reports, would show).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from annsample.ablation import IGNORED_KEYS, LOG_FOLDER, WALL_FILE
from annsample.errors import RunError

logger = logging.getLogger(__name__)

METRICS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20")
INTERVAL = "refresh_interval"
REFRESH_KEYS = ("sampler.index.refresh", "sampler.index.refresh_every")
OUTPUTS = (
    "results.csv",
    "results.json",
    "summary.md",
    "quality.png",
    "wall_time.png",
    "staleness.png",
    "training.png",
)
SERIES = {  # run series read from metrics.jsonl: name -> key
    "recall": "index/recall@k",
    "drift": "index/drift",
    "tv": "sampler/tv_to_exact",
    "loss": "train/epoch_loss",
    "valid": "eval/valid/ndcg@10",
}


def refresh_interval(config: dict[str, Any]) -> str:
    """The refresh schedule of a flattened run config as one word: steps between refreshes, or
    ``epoch``, ``adaptive``, ``never``; ``-`` for runs without an index.

    >>> refresh_interval({"sampler.name": "ann", "loss.name": "bce",
    ...                   "sampler.index.refresh": "steps", "sampler.index.refresh_every": 10})
    '10'
    """
    if config["sampler.name"] != "ann" or config["loss.name"] == "full_ce":
        return "-"
    schedule = config["sampler.index.refresh"]
    return str(config["sampler.index.refresh_every"]) if schedule == "steps" else schedule


def _interval_order(interval: str, steps_per_epoch: float) -> tuple[int, float]:
    """Sort key: step intervals and ``epoch`` by their steps, then adaptive, never, no index."""
    if interval == "epoch":
        return (0, steps_per_epoch)
    if interval in ("adaptive", "never", "-"):
        return ({"adaptive": 1, "never": 2, "-": 3}[interval], 0.0)
    return (0, float(interval))


def run_folders(out_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run folders of an ablation folder: sub-folders with a config.yaml,
    finished when they also hold results.json."""
    out = Path(out_dir)
    if not out.is_dir():
        raise RunError(
            f"ablation folder {out} does not exist; pass the --out of `annsample ablate`"
        )
    runs = sorted(p for p in out.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
    finished = [p for p in runs if (p / "results.json").is_file()]
    return finished, [p for p in runs if p not in finished]


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise RunError(
                f"{path} line {number} is not JSON; the run folder is damaged: train it again"
            ) from None
    return records


def _series(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in records if key in r]


def read_run(run_dir: Path) -> dict[str, Any]:
    """One run's config (flattened), results, refresh totals and staleness series."""
    from annsample.checkpoint import flatten
    from annsample.config import config_to_dict, load_config
    from annsample.report import read_results

    # the run's own config.yaml lists every key, so settings its schedule ignores are no error
    config = flatten(config_to_dict(load_config(run_dir / "config.yaml", check_ignored=False)))
    results = read_results(run_dir)
    records = _read_metrics(run_dir / "metrics.jsonl")
    wall_path = run_dir / WALL_FILE
    wall = json.loads(wall_path.read_text(encoding="utf-8")) if wall_path.is_file() else {}
    index_records = [r for r in records if "index/refresh_count" in r]
    last = index_records[-1] if index_records else {}
    return {
        "dir": run_dir,
        "config": config,
        "results": results,
        "wall_seconds": wall.get("wall_seconds"),
        "train_seconds": sum(
            r["train/epoch_seconds"] for r in records if "train/epoch_seconds" in r
        ),
        "refresh_count": last.get("index/refresh_count", 0),
        "re_add_count": last.get("index/re_add_count", 0),
        "retrain_count": last.get("index/retrain_count", 0),
        "refresh_seconds": last.get("index/total_refresh_seconds", 0.0),
        "wait_seconds": last.get("index/total_wait_seconds", 0.0),
        **{name: _series(records, key) for name, key in SERIES.items()},
    }


def _mean(series: list[tuple[int, float]]) -> float | None:
    return float(np.mean([v for _, v in series])) if series else None


def _final(series: list[tuple[int, float]]) -> float | None:
    return series[-1][1] if series else None


def setting_columns(runs: list[dict[str, Any]]) -> list[str]:
    """The ablation's axes: ``refresh_interval``, then every config key that differs between runs
    (the seed, the name, the refresh keys and settings that do not change results left out)."""
    keys = list(runs[0]["config"])
    skip = IGNORED_KEYS | {"name", "seed", *REFRESH_KEYS}
    varied = [
        key
        for key in keys
        if key not in skip and len({repr(run["config"].get(key)) for run in runs}) > 1
    ]
    return [INTERVAL, *varied]


def collect_rows(out_dir: str | Path) -> tuple[list[dict[str, Any]], list[str], list[Path]]:
    """(rows, setting columns, unfinished folders) of an ablation folder: one row per finished run.

    Raises:
        RunError: the folder holds no finished run.
    """
    finished, unfinished = run_folders(out_dir)
    if not finished:
        raise RunError(
            f"{out_dir} holds no finished run (no sub-folder with results.json); run "
            "`annsample ablate --config ... --grid ... --out DIR` first"
        )
    runs = [read_run(path) for path in finished]
    columns = setting_columns(runs)
    rows = []
    for run in runs:
        config, results = run["config"], run["results"]
        row: dict[str, Any] = {"run": run["dir"].name, "name": results["name"]}
        for column in columns:
            row[column] = refresh_interval(config) if column == INTERVAL else config.get(column)
        row["seed"] = config["seed"]
        row.update({f"test_{m}": results["test"].get(m) for m in METRICS})
        row["valid_ndcg@10"] = results["valid"].get("ndcg@10")
        row.update({key: results.get(key) for key in ("best_epoch", "epochs_run", "steps")})
        for key in ("wall_seconds", "train_seconds", "refresh_count", "re_add_count"):
            row[key] = run[key]
        for key in ("retrain_count", "refresh_seconds", "wait_seconds"):
            row[key] = run[key]
        for name in ("recall", "drift", "tv"):
            row[f"{name}_mean"], row[f"{name}_final"] = _mean(run[name]), _final(run[name])
        row["_series"] = {name: run[name] for name in SERIES}
        rows.append(row)
    steps_per_epoch = float(
        np.median(
            [r["steps"] / max(r["epochs_run"] or 1, 1) for r in rows if r.get("steps")] or [1]
        )
    )
    rows.sort(
        key=lambda r: (
            _interval_order(r[INTERVAL], steps_per_epoch),
            [repr(r[c]) for c in columns[1:]],
            r["seed"],
        )
    )
    return rows, columns, unfinished


def _groups(rows: list[dict[str, Any]], columns: list[str]) -> dict[tuple, list[dict[str, Any]]]:
    """Rows grouped by their settings (seeds together), in row order."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[tuple(row[c] for c in columns)].append(row)
    return groups


def _stats(values: list[Any]) -> tuple[float, float] | None:
    """(mean, std with ddof=1; 0 for one value) of the values that are numbers, None if none."""
    numbers = [float(v) for v in values if v is not None]
    if not numbers:
        return None
    std = float(np.std(numbers, ddof=1)) if len(numbers) > 1 else 0.0
    return float(np.mean(numbers)), std


def _cell(values: list[Any], digits: int) -> str:
    stats = _stats(values)
    if stats is None:
        return "-"
    mean, std = stats
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


SUMMARY = (  # column, header, digits
    ("test_ndcg@10", "test NDCG@10", 4),
    ("test_hr@10", "test HR@10", 4),
    ("wall_seconds", "wall s", 1),
    ("train_seconds", "train s", 1),
    ("refresh_count", "refreshes", 1),
    ("refresh_seconds", "refresh s", 2),
    ("wait_seconds", "wait s", 2),
    ("recall_mean", "recall@k mean", 3),
    ("recall_final", "recall@k final", 3),
    ("tv_final", "TV final", 3),
)


def summary_markdown(
    rows: list[dict[str, Any]], columns: list[str], unfinished: Sequence[Path] = ()
) -> str:
    """Markdown table, one line per setting combination, mean ± std over its seeds."""
    header = [*columns, "seeds", *(title for _, title, _ in SUMMARY)]
    lines = [
        f"{len(rows)} finished runs, {len(unfinished)} unfinished; mean ± std over seeds.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for settings, group in _groups(rows, columns).items():
        cells = [str(value) for value in settings] + [str(len(group))]
        cells += [_cell([r[key] for r in group], digits) for key, _, digits in SUMMARY]
        lines.append("| " + " | ".join(cells) + " |")
    if unfinished:
        lines += [
            "",
            "Unfinished runs (no results.json; failed or interrupted, see their logs):",
            "",
        ]
        lines += [f"- {path.name} ({LOG_FOLDER}/{path.name}.log)" for path in unfinished]
    return "\n".join(lines) + "\n"


def _json_value(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_report(out_dir: str | Path) -> str:
    """Write results.csv, results.json, summary.md and the PNG plots into ``out_dir``; returns the
    summary markdown."""
    out = Path(out_dir)
    rows, columns, unfinished = collect_rows(out)
    tidy = [{k: _json_value(v) for k, v in row.items() if k != "_series"} for row in rows]
    with (out / "results.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(tidy[0]))
        writer.writeheader()
        writer.writerows(tidy)
    (out / "results.json").write_text(json.dumps(tidy, indent=2) + "\n", encoding="utf-8")
    summary = summary_markdown(rows, columns, unfinished)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    plot_report(rows, columns, out)
    logger.info("wrote %s into %s", ", ".join(OUTPUTS), out)
    return summary


def _series_label(settings: tuple, columns: list[str]) -> str:
    parts = [f"{c.split('.')[-1]}={v}" for c, v in zip(columns[1:], settings[1:], strict=True)]
    return ", ".join(parts) or "all runs"


def plot_report(rows: list[dict[str, Any]], columns: list[str], out: Path) -> None:
    """quality.png, wall_time.png, staleness.png and training.png (matplotlib, Agg canvas, no
    global state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RunError(
            f"matplotlib is not installed, so the plots were not drawn (the tables are in {out}); "
            "install it with pip install 'matplotlib>=3.7' (a dependency of annsample), then run "
            f"`annsample ablate report {out}`"
        ) from None

    intervals = list(dict.fromkeys(r[INTERVAL] for r in rows))  # rows are sorted by interval
    position = {interval: i for i, interval in enumerate(intervals)}
    series: dict[str, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for settings, group in _groups(rows, columns).items():
        series[_series_label(settings, columns)][settings[0]] = group

    def interval_panels(path: Path, panels: list[tuple[str, str]], title: str) -> None:
        fig = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (key, ylabel) in zip(axes, panels, strict=True):
            for label, by_interval in series.items():
                xs, means, stds = [], [], []
                for interval, group in by_interval.items():
                    stats = _stats([r[key] for r in group])
                    if stats is not None:
                        xs.append(position[interval])
                        means.append(stats[0])
                        stds.append(stats[1])
                ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, label=label)
            ax.set_xticks(range(len(intervals)), intervals)
            ax.set_xlabel("refresh interval (steps)")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize="small")
        fig.suptitle(title)
        fig.savefig(path, dpi=110)

    seeds = max(len(g) for g in _groups(rows, columns).values())
    interval_panels(
        out / "quality.png",
        [("test_ndcg@10", "test NDCG@10"), ("test_hr@10", "test HR@10")],
        f"quality vs refresh interval (mean ± std over {seeds} seed(s))",
    )
    interval_panels(
        out / "wall_time.png",
        [
            ("wall_seconds", "wall seconds per run")
            if all(r["wall_seconds"] is not None for r in rows)
            else ("train_seconds", "training seconds per run (epochs)"),
            ("wait_seconds", "seconds training waited on the index"),
        ],
        "wall time vs refresh interval",
    )

    groups = _groups(rows, columns)
    step_panels(
        out / "staleness.png",
        groups,
        columns,
        [("recall", "index recall@k"), ("tv", "TV to exact GenNi")],
        "staleness over training (mean over seeds, probes as logged)",
        "no staleness records (no ann run)",
    )
    step_panels(
        out / "training.png",
        groups,
        columns,
        [("loss", "training loss (epoch mean)"), ("valid", "validation NDCG@10")],
        "training over steps (mean over seeds)",
        "no training records",
    )


def step_panels(
    path: Path,
    groups: dict[tuple, list[dict[str, Any]]],
    columns: list[str],
    panels: list[tuple[str, str]],
    title: str,
    empty: str,
) -> None:
    """One PNG with a panel per run series (``SERIES`` names) against the training step: one line
    per setting combination, the mean over its seeds at each logged step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * len(panels), 3.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (name, ylabel) in zip(axes, panels, strict=True):
        for settings, group in groups.items():
            by_step: dict[int, list[float]] = defaultdict(list)
            for row in group:
                for step, value in row["_series"][name]:
                    by_step[step].append(value)
            if by_step:
                steps = sorted(by_step)
                label = f"interval={settings[0]}"
                if len(columns) > 1:
                    label += ", " + _series_label(settings, columns)
                ax.plot(steps, [np.mean(by_step[s]) for s in steps], marker=".", label=label)
        ax.set_xlabel("training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    if axes[0].has_data():
        axes[0].legend(fontsize="small")
    else:
        for ax in axes:
            ax.text(0.5, 0.5, empty, ha="center", transform=ax.transAxes)
    fig.suptitle(title)
    fig.savefig(path, dpi=110)
