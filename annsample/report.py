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


def results_table(run_dirs: list[str | Path], stage: str = "test") -> str:
    """A markdown table of ``stage`` metrics; runs sharing a name (different seeds) are averaged."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in run_dirs:
        results = read_results(run)
        groups[results["name"]].append(results)
    header = ["run", "seeds", *COLUMNS, "s/epoch", "epochs (best)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, runs in groups.items():
        cells = [name, str(len(runs))]
        cells += [_cell([r[stage][column] for r in runs]) for column in COLUMNS]
        cells.append(f"{np.median([r['seconds_per_epoch'] for r in runs]):.1f}")
        cells.append(", ".join(f"{r['epochs_run']} ({r['best_epoch']})" for r in runs))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
