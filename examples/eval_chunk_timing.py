"""Time full-ranking evaluation (`annsample.evaluate.rank_targets`) of U users over N random items
for several item-chunk sizes, in one process (median of --steps): the size of the (U, chunk) score
block decides the cost on CPU more than the matmul does.

    .venv/bin/python examples/eval_chunk_timing.py --items 1000000 --users 500 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from annsample.evaluate import rank_targets


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunks", type=int, nargs="+", default=[32768, 8192, 2048])
    parser.add_argument("--steps", type=int, default=3, help="timed calls per chunk (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, u, d = args.items, args.users, 64
    items = 0.1 * torch.randn(n + 1, d, generator=g)
    h = torch.randn(u, d, generator=g)
    targets = torch.randint(1, n + 1, (u,), generator=g)
    history = torch.randint(1, n + 1, (u, 20), generator=g)
    out: dict = {"items": n, "users": u, "threads": args.threads, "seconds": {}}
    reference = None
    for chunk in args.chunks:
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            ranks = rank_targets(h, items, targets, history, chunk)
            times.append(time.perf_counter() - t0)
        if reference is None:
            reference = ranks
        # the chunking changes the cost, never the ranks
        assert torch.equal(ranks.higher, reference.higher)
        assert torch.equal(ranks.ties, reference.ties)
        out["seconds"][chunk] = round(float(np.median(times)), 3)
    print(out)
    return out


if __name__ == "__main__":
    main()
