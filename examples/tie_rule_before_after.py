"""Test metrics of finished runs under the evaluation's tie rule before and after the 2026-12 fix.

Before: items within a 1e-5 relative tolerance of the target's score counted as "not higher", so
ties favoured the target. After (annsample.evaluate): ties are broken at random in expectation. The
same checkpoint is evaluated both ways, so the difference is the rule alone.

    .venv/bin/python examples/tie_rule_before_after.py runs/beauty-s0 runs/sports-s0 [--steps N]

``--steps`` is accepted for uniformity with the other examples and ignored (nothing is trained).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from annsample import data as data_mod
from annsample.distributed import resolve_device
from annsample.evaluate import eval_users, metrics_from_ranks
from annsample.prepare import prepare_data
from annsample.run import evaluate_run, load_model, load_run


@torch.no_grad()
def favourable_ranks(model, prepared, config, device) -> np.ndarray:
    """0-based ranks under the pre-fix rule (ties and near-ties counted in the target's favour)."""
    inputs, targets = data_mod.eval_tensors(prepared.split, "test", config.data.max_len)
    indptr, items = data_mod.history_csr(prepared.split, "test")
    users = eval_users(prepared.split.n_users, config.train.eval_users, config.seed)
    users = np.arange(len(targets)) if users is None else users
    table = model.item_embeddings
    ranks = []
    for start in range(0, len(users), 1024):
        rows = users[start : start + 1024]
        h = model.encode(torch.as_tensor(inputs[rows], device=device))[:, -1]
        target = torch.as_tensor(targets[rows], device=device)
        target_emb = table[target]
        threshold = (h * target_emb).sum(1) + 1e-5 * h.norm(dim=1) * target_emb.norm(dim=1)
        scores = h @ table.T
        scores[:, 0] = float("-inf")
        history = data_mod.pad_rows(indptr, items, rows, table.shape[0])
        for r in range(len(rows)):
            masked = history[r][(history[r] < table.shape[0]) & (history[r] != targets[rows[r]])]
            scores[r, torch.as_tensor(masked)] = float("-inf")
        scores[torch.arange(len(rows)), target] = float("-inf")
        ranks.append((scores > threshold[:, None]).sum(1).numpy())
    return np.concatenate(ranks)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--steps", type=int, default=0, help="ignored")
    args = parser.parse_args(argv)
    print("| run | test NDCG@10 before | after | change | test HR@10 before | after |")
    print("|---|---:|---:|---:|---:|---:|")
    for run in args.runs:
        config, checkpoint = load_run(run)
        device = resolve_device(config.train.device)
        prepared = prepare_data(config)
        model = load_model(config, checkpoint, prepared.n_items, device)
        before = metrics_from_ranks(favourable_ranks(model, prepared, config, device))
        after = evaluate_run(run, stages=("test",))["test"]
        change = after["ndcg@10"] / before["ndcg@10"] - 1 if before["ndcg@10"] else float("nan")
        print(
            f"| {config.name} | {before['ndcg@10']:.4f} | {after['ndcg@10']:.4f} | "
            f"{change:+.2%} | {before['hr@10']:.4f} | {after['hr@10']:.4f} |"
        )


if __name__ == "__main__":
    main()
