"""Result tables from finished run folders: mean ± std over seeds, one row per run name."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from annsample.errors import RunError

COLUMNS = ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20")


def read_results(run_dir: str | Path) -> dict:
    """The ``results.json`` of a finished run."""
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise RunError(f"{run_dir} has no results.json; it is not a finished training run")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunError(
            f"{path} is not valid JSON ({error}); re-run `annsample evaluate` or the training"
        ) from None
    if not isinstance(results, dict):
        raise RunError(f"{path} holds no JSON object; it was not written by `annsample train`")
    keys = ("name", "test", "valid", "best_epoch", "epochs_run", "seconds_per_epoch")
    missing = [key for key in keys if key not in results]
    if missing:
        raise RunError(
            f"{path} lacks {', '.join(missing)}; it was not written by `annsample train`"
        )
    return results


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def seconds_to_reach(run_dir: str | Path, target: float) -> float | None:
    """Training seconds until validation NDCG@10 first reached ``target`` (None: never).

    The seconds are the run's epoch times summed up to and including the epoch of that validation
    (``train/epoch_seconds`` in ``metrics.jsonl``): training only, validations and setup excluded,
    so runs that validate at different cadences compare fairly.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{run_dir} has no metrics.jsonl; it is not a training run folder")
    elapsed = 0.0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        elapsed += record.get("train/epoch_seconds", 0.0)
        if record.get("eval/valid/ndcg@10", -1.0) >= target:
            return elapsed
    return None


def _seconds_cell(values: list[float | None]) -> str:
    reached = [v for v in values if v is not None]
    if not reached:
        return "not reached"
    cell = f"{np.median(reached):.0f}"
    return cell if len(reached) == len(values) else f"{cell} ({len(reached)} of {len(values)})"


def results_table(
    run_dirs: list[str | Path], stage: str = "test", time_to: float | None = None
) -> str:
    """A markdown table of ``stage`` metrics; runs sharing a name (different seeds) are averaged.

    With ``time_to``, a last column gives the median over seeds of :func:`seconds_to_reach` that
    validation NDCG@10 ("not reached" if no seed did; "(m of n)" if only some did).
    """
    groups: dict[str, list[tuple[Path, dict]]] = defaultdict(list)
    for run in run_dirs:
        results = read_results(run)
        groups[results["name"]].append((Path(run), results))
    header = ["run", "seeds", *COLUMNS, "s/epoch", "epochs (best)"]
    if time_to is not None:
        header.append(f"train s to valid NDCG@10 ≥ {time_to:g}")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, members in groups.items():
        runs = [results for _, results in members]
        cells = [name, str(len(runs))]
        cells += [_cell([r[stage][column] for r in runs]) for column in COLUMNS]
        cells.append(f"{np.median([r['seconds_per_epoch'] for r in runs]):.1f}")
        cells.append(", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in runs))
        if time_to is not None:
            cells.append(_seconds_cell([seconds_to_reach(d, time_to) for d, _ in members]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
