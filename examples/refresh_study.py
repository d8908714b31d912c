"""A refresh-frequency study driven from Python: how often must the index follow the embeddings?

Trains the GRU4Rec model of ``gru4rec.py`` once per refresh policy, with the same seed and data
order, and reports for each: index recall@K on probe users (the exact top-K under the current
embeddings that the index returns, averaged over probes during training), the mean staleness in
steps, refresh seconds, the seconds training waited, and validation NDCG@10 / HR@10 (full
ranking) at the end.

    .venv/bin/python examples/refresh_study.py --steps 300 --every 5 25 100 0 --asynchronous 25
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gru4rec import GRU4Rec  # noqa: E402  (the model of the plain-loop example)

from annsample import NegativeSampler, RefreshPolicy, sampled_logits, sampled_loss  # noqa: E402
from annsample.data import (  # noqa: E402
    eval_tensors,
    history_csr,
    leave_one_out,
    load_dataset,
    pad_rows,
    training_tensors,
)
from annsample.evaluate import evaluate_ranking  # noqa: E402

log = logging.getLogger("refresh_study")


def run_policy(
    split, policy: RefreshPolicy, steps: int, probe_every: int, batch_size: int, seed: int
) -> dict[str, float]:
    """Train one model under ``policy``; returns its row of the study."""
    torch.manual_seed(seed)
    inputs, targets = (torch.as_tensor(a) for a in training_tensors(split, max_len=20))
    indptr, items = history_csr(split, "train")
    histories = torch.as_tensor(pad_rows(indptr, items, np.arange(split.n_users), 0))
    valid_inputs, valid_targets = eval_tensors(split, "valid", 20)
    probe_users = torch.randperm(split.n_users, generator=torch.Generator().manual_seed(seed))[:64]
    model = GRU4Rec(split.n_items)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    sampler = NegativeSampler(
        model.items.weight,
        candidates=50,
        tail_samples=64,
        nlist=16,
        nprobe=8,
        refresh=policy,
        seed=seed,
    )
    order = torch.Generator().manual_seed(seed)
    recalls, staleness = [], []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        users = torch.randint(0, inputs.shape[0], (batch_size,), generator=order)
        h = model(inputs[users])  # (B, T, d)
        negatives = sampler.sample(h, targets[users], histories[users])
        pos, neg = sampled_logits(
            h[negatives.mask], model.items(negatives.positives), model.items(negatives.ids)
        )
        loss = sampled_loss("bce", pos, neg)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        stats = sampler.step()
        staleness.append(stats["index/staleness_steps"])
        if step % probe_every == 0:
            with torch.no_grad():
                probes = model(torch.as_tensor(valid_inputs)[probe_users])[:, -1]  # (Q, d)
            recalls.append(sampler.staleness(probes)["index/recall@k"])
    sampler.wait()
    seconds = time.perf_counter() - start
    final = sampler.stats()
    sampler.close()
    model.eval()
    with torch.no_grad():
        metrics, _ = evaluate_ranking(
            lambda seq: model(seq),
            model.items.weight,
            valid_inputs,
            valid_targets,
            *history_csr(split, "valid"),
        )
    return {
        "recall@k": statistics.mean(recalls) if recalls else float("nan"),
        "staleness_steps": statistics.mean(staleness),
        "refreshes": final["index/refresh_count"],
        "refresh_seconds": final["index/total_refresh_seconds"],
        "wait_seconds": final["index/total_wait_seconds"],
        "train_seconds": seconds,
        "valid_ndcg@10": metrics["ndcg@10"],
        "valid_hr@10": metrics["hr@10"],
    }


def main(argv: list[str] | None = None) -> list[dict[str, float | str]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/tiny.txt")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--every", type=int, nargs="+", default=[5, 25, 100, 0], help="steps between refreshes"
    )
    parser.add_argument(
        "--asynchronous", type=int, nargs="*", default=[25], help="background-refresh intervals"
    )
    parser.add_argument("--probe-every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("annsample").setLevel(logging.WARNING)
    torch.set_num_threads(1)

    split = leave_one_out(load_dataset(args.data))
    policies = {
        (f"every {n}" if n else "never"): (
            RefreshPolicy(every=n, retrain_every=5) if n else RefreshPolicy(schedule="never")
        )
        for n in args.every
    }
    for n in args.asynchronous:
        policies[f"every {n}, async"] = RefreshPolicy(every=n, retrain_every=5, asynchronous=True)
    rows: list[dict[str, float | str]] = []
    for name, policy in policies.items():
        row = run_policy(split, policy, args.steps, args.probe_every, args.batch_size, args.seed)
        rows.append({"policy": name, **row})
        log.info("%s: %s", name, ", ".join(f"{k} {v:.4g}" for k, v in row.items()))
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [v if isinstance(v, str) else f"{v:.4g}" for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    log.info("%d steps each, seed %d:\n%s", args.steps, args.seed, "\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
