"""The quality table of synthetic-catalog runs and its plot of validation NDCG@10 against wall clock.

``annsample quality RUN_DIR ... [--png docs/quality.png]`` reads each finished run folder
(``config.yaml``, ``metrics.jsonl``, ``results.json``) into one markdown row per run: sampler,
loss, test NDCG@10 / HR@10, their fraction of the catalog's oracle, steps, and training seconds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from annsample import data as data_mod
from annsample.curves import run_curve
from annsample.errors import RunError

logger = logging.getLogger(__name__)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """One finished run: its label, results and validation curve ``[(seconds, ndcg@10), ...]``."""
    run = Path(run_dir)
    missing = [
        n for n in ("config.yaml", "metrics.jsonl", "results.json") if not (run / n).is_file()
    ]
    if missing:
        raise RunError(
            f"{run} is not a finished run folder (missing {', '.join(missing)}); pass the --out "
            "folder of a finished `annsample train`"
        )
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    records = [
        json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line
    ]
    # wall clock of training, validations excluded: the sum of epoch seconds so far
    epoch_seconds = [r["train/epoch_seconds"] for r in records if "train/epoch_seconds" in r]
    curve = [(seconds, ndcg) for _, seconds, ndcg in run_curve(run)]
    sampler, loss = config["sampler"]["name"], config["loss"]["name"]
    return {
        "label": f"{sampler} {loss}" + sampler_label(config),
        "sampler": sampler,
        "loss": loss,
        "catalog_size": config["data"]["synthetic_items"],
        "catalog": catalog_name(config["data"]),
        "steps": results["steps"],
        "train_seconds": sum(epoch_seconds),
        "test": results["test"],
        "oracle": results.get("oracle"),
        "fraction": results.get("fraction_of_oracle"),
        "curve": curve,
    }


def catalog_name(data: dict) -> str:
    """ "100,000 items" for a synthetic catalog, else the dataset file's stem (e.g. "Beauty")."""
    if data["path"] == "synthetic":
        return f"{data['synthetic_items']:,} items"
    return Path(data["path"]).stem


def sampler_label(config: dict) -> str:
    """What a run label adds to "SAMPLER LOSS": pool size, ANN candidates, the warm-up."""
    sampler = config["sampler"]
    label = ""
    if sampler["name"] == "pool":
        label = f" (pool {sampler['pool_size']})"
    elif sampler["name"] == "ann":
        label = f" ({sampler['candidates']} candidates)"
    warmup = sampler.get("warmup_sampler", "uniform")
    if sampler.get("warmup_steps"):
        label += f", {sampler['warmup_steps']} {warmup} warm-up steps"
    if sampler.get("warmup_blend_steps"):
        label += f", {sampler['warmup_blend_steps']} steps blended from {warmup}"
    if sampler.get("warmup_share"):
        label += f", {sampler['warmup_share']:g} of the negatives from {warmup} throughout"
    return label


def quality_table(runs: list[dict[str, Any]]) -> str:
    """Markdown rows, one per run; ``train s`` excludes setup and the final test."""
    lines = [
        "| catalog | run | test NDCG@10 | test HR@10 | fraction of oracle (NDCG / HR) | steps | train s |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        fraction = r["fraction"] or {}
        of_oracle = (
            f"{fraction['ndcg@10']:.2f} / {fraction['hr@10']:.2f}" if fraction else "– (no oracle)"
        )
        catalog = f"{r['catalog_size']:,}" if r["catalog_size"] else r["catalog"]
        lines.append(
            f"| {catalog} | {r['label']} | {r['test']['ndcg@10']:.4f} "
            f"| {r['test']['hr@10']:.4f} | {of_oracle} | {r['steps']} | {r['train_seconds']:.0f} |"
        )
    oracles = {r["catalog_size"]: r["oracle"] for r in runs if r["oracle"]}
    for size, oracle in sorted(oracles.items()):
        lines.append(
            f"| {size:,} | oracle (true next-item probabilities) | {oracle['ndcg@10']:.4f} "
            f"| {oracle['hr@10']:.4f} | 1.00 / 1.00 | | |"
        )
    return "\n".join(lines)


def plot_curves(runs: list[dict[str, Any]], path: str | Path) -> None:
    """Validation NDCG@10 against training seconds, one line per run, one panel per catalog
    (a synthetic size or a dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    catalogs = sorted({(r["catalog_size"], r["catalog"]) for r in runs})
    # legends sit below the panels: long run labels would hide the curves
    fig, axes = plt.subplots(1, len(catalogs), figsize=(7 * len(catalogs), 5.5), squeeze=False)
    for ax, (size, name) in zip(axes[0], catalogs, strict=True):
        for r in (r for r in runs if (r["catalog_size"], r["catalog"]) == (size, name)):
            xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((), ())
            ax.plot(xs, ys, marker="o", label=r["label"])
        ax.set_title(name)
        ax.set_xlabel("training wall clock (s)")
        ax.set_ylabel("validation NDCG@10")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def transition_count_ranks(
    train_indptr: np.ndarray,
    train_items: np.ndarray,
    n_items: int,
    previous: np.ndarray,
    targets: np.ndarray,
    history: np.ndarray,
) -> np.ndarray:
    """Ranks of a model-free reference: score j by how often j followed the previous item in training.

    Ties (most items never followed it) are broken by training popularity. Same protocol as
    :func:`annsample.evaluate.rank_targets`: history masked, strictly higher scores counted.

    Args:
        train_indptr, train_items: CSR training sequences; n_items: N.
        previous: (Q,) int64 last input item; targets: (Q,) int64; history: (Q, H) int64 (0 = pad).
    Returns:
        (Q,) int64 ranks.
    """
    follows = np.ones(len(train_items), dtype=bool)
    follows[train_indptr[:-1][np.diff(train_indptr) > 0]] = False  # a sequence's first item
    pairs = np.unique(
        train_items[:-1][follows[1:]] * (n_items + 1) + train_items[1:][follows[1:]],
        return_counts=True,
    )
    keys, counts = pairs
    popularity = np.bincount(train_items, minlength=n_items + 1).astype(np.float64)
    scale = popularity.max() + 1.0  # one transition outweighs any popularity
    ranks = np.empty(len(targets), dtype=np.int64)
    for q, (prev, target) in enumerate(zip(previous, targets, strict=True)):
        lo, hi = np.searchsorted(keys, [prev * (n_items + 1), (prev + 1) * (n_items + 1)])
        followers = keys[lo:hi] - prev * (n_items + 1)
        score_target = popularity[target] + scale * counts[lo:hi][followers == target].sum()
        masked = history[q][(history[q] > 0) & (history[q] != target)]
        above = int((popularity[1:] > score_target).sum())  # items by popularity alone
        # items with transitions: replace their popularity-only score by the full one
        full = popularity[followers] + scale * counts[lo:hi]
        keep = followers != target
        above += int((full[keep] > score_target).sum()) - int(
            (popularity[followers[keep]] > score_target).sum()
        )
        # masked history items no longer count
        in_followers = np.isin(masked, followers)
        masked_score = popularity[masked].copy()
        if in_followers.any():
            where = np.searchsorted(followers, masked[in_followers])
            masked_score[in_followers] += scale * counts[lo:hi][where]
        above -= int((masked_score > score_target).sum())
        ranks[q] = above
    return ranks


def transition_count_metrics(
    n_items: int, test_users: int, seed: int = 0, synthetic_seed: int = 0, max_len: int = 20
) -> dict[str, float]:
    """Test HR/NDCG of the transition-count reference on the users a ``--catalog-size`` run tests
    (``train.eval_users`` = ``test_users`` with run seed ``seed``)."""
    from annsample.evaluate import eval_users, metrics_from_ranks
    from annsample.synthetic import synthetic_dataset

    split = data_mod.leave_one_out(synthetic_dataset(n_items, seed=synthetic_seed))
    inputs, targets = data_mod.eval_tensors(split, "test", max_len)
    indptr, items = data_mod.history_csr(split, "test")
    users = eval_users(split.n_users, test_users, seed)
    users = np.arange(split.n_users) if users is None else users
    history = data_mod.pad_rows(indptr, items, users, 0)
    ranks = transition_count_ranks(
        split.train_indptr, split.train_items, n_items, inputs[users, -1], targets[users], history
    )
    return metrics_from_ranks(ranks)
