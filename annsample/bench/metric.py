"""Index recall by metric: how well each IVF metric finds the exact inner-product top-k.

``metric_recall`` builds one ``ItemIndex`` per metric over the same item table and reports recall@k
against ``exact_topk`` at several nprobe values: the figure that says which metric to default to.
``run_queries`` reads a trained run's item table and probe queries (the last hidden state of
validation users), so the comparison is made on trained embeddings.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from annsample.index import METRICS, ItemIndex, exact_topk, recall_at_k

logger = logging.getLogger(__name__)


def metric_recall(
    xq: torch.Tensor,
    xb: torch.Tensor,
    nlist: int,
    nprobes: tuple[int, ...],
    k: int = 200,
    metrics: tuple[str, ...] = METRICS,
    seed: int = 0,
    show_progress: bool = False,
) -> list[dict]:
    """Recall@k of an IVF index per metric and nprobe, against the exact inner-product top-k.

    Args:
        xq: (Q, d) float32 queries.
        xb: (N, d) float32 item vectors.
        nlist: IVF lists of every index.
        nprobes: nprobe values to measure (each 1 <= nprobe <= nlist).
        k: results per query (the sampler's candidates), 1 <= k <= N.
        metrics: ``ItemIndex`` metrics to compare.
        seed: k-means seed of every index.

    Returns:
        One record per (metric, nprobe): ``metric``, ``nlist``, ``nprobe``, ``k``, ``recall``,
        ``largest_list`` (items in the fullest list: a balance check).
    """
    _, I_exact = exact_topk(xq, xb, k)
    records = []
    for metric in tqdm(metrics, desc="metrics", disable=not show_progress):
        index = ItemIndex(
            xb.shape[1], nlist=nlist, nprobe=1, backend="faiss", metric=metric, seed=seed
        ).build(xb, ids=torch.arange(xb.shape[0]))
        largest = int(index.list_sizes().max())
        for nprobe in nprobes:
            index.nprobe = nprobe
            recall = recall_at_k(index.search(xq, k)[1], I_exact)
            records.append(
                {
                    "metric": metric,
                    "nlist": nlist,
                    "nprobe": nprobe,
                    "k": k,
                    "recall": round(recall, 4),
                    "largest_list": largest,
                }
            )
            logger.info("%s", records[-1])
    return records


def run_queries(
    run_dir: str | Path, queries: int = 1000, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trained run's probe queries and item table.

    Returns:
        xq: (Q, d) float32 last hidden states of ``queries`` random validation users (eval mode).
        xb: (N, d) float32 item embeddings without the padding row.
    """
    from annsample import data as data_mod
    from annsample.prepare import prepare_data
    from annsample.run import load_model, load_run

    config, checkpoint = load_run(run_dir)
    prepared = prepare_data(config)
    model = load_model(config, checkpoint, prepared.n_items, torch.device("cpu"))
    split = prepared.split
    rng = np.random.default_rng(seed)
    users = np.sort(rng.choice(split.n_users, size=min(queries, split.n_users), replace=False))
    inputs, _ = data_mod.eval_tensors(split, "valid", config.data.max_len)
    with torch.no_grad():
        xq = model.encode(torch.as_tensor(inputs[users]))[:, -1].contiguous()  # (Q, d)
        xb = model.item_embeddings.detach()[1:].float().contiguous()  # (N, d)
    return xq, xb


def records_table(records: list[dict]) -> str:
    """Markdown table: one row per nprobe, one recall column per metric."""
    metrics = list(dict.fromkeys(r["metric"] for r in records))
    by_key = {(r["nprobe"], r["metric"]): r for r in records}
    nprobes = sorted({r["nprobe"] for r in records})
    first = records[0]
    header = "| nprobe / nlist | " + " | ".join(f"recall@{first['k']} `{m}`" for m in metrics)
    lines = [header + " |", "|---|" + "---:|" * len(metrics)]
    for nprobe in nprobes:
        cells = [f"{by_key[nprobe, m]['recall']:.3f}" for m in metrics]
        lines.append(f"| {nprobe} / {first['nlist']} | " + " | ".join(cells) + " |")
    largest = [str(by_key[nprobes[0], m]["largest_list"]) for m in metrics]
    lines.append("| largest list (items) | " + " | ".join(largest) + " |")
    return "\n".join(lines) + "\n"
