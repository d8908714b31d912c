"""Recall@k of the IVF index per metric (ip, l2_augmented, cosine) on a trained run's embeddings.

    .venv/bin/python examples/metric_recall.py runs/h1-beauty --nprobe 1 2 4 8 16 32

Queries are the last hidden states of 1,000 validation users; nlist defaults to the catalog rule
``annsample.index.default_nlist(N)``. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import logging

import torch

from annsample.bench.metric import metric_recall, records_table, run_queries
from annsample.index import default_nlist


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--nlist", type=int, default=0, help="0 = default_nlist(N)")
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=0, help="ignored: nothing is trained")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    xq, xb = run_queries(args.run_dir, args.queries)
    nlist = args.nlist or default_nlist(xb.shape[0])
    nprobes = tuple(p for p in args.nprobe if p <= nlist)
    records = metric_recall(xq, xb, nlist, nprobes, k=args.k)
    print(f"{args.run_dir}: N={xb.shape[0]}, {xq.shape[0]} queries")
    print(records_table(records))


if __name__ == "__main__":
    main()
