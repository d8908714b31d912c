"""Time the ann sampler's candidate scoring in query="sequence" mode, per-position gather vs
per-sequence bmm, alternating in one process (median of --steps, 7). Index search is excluded (the fake
index returns fixed ids), so only the scoring and exclusion look-ups are timed.

    .venv/bin/python examples/sequence_rescore_timing.py --items 1000000 --threads 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from annsample.samplers import AnnSampler, Exclusions


class FixedIndex:
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def search(self, xq: torch.Tensor, k: int):
        return torch.zeros(self.ids.shape), self.ids


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--sequences", type=int, default=256)
    parser.add_argument("--positions", type=int, default=12, help="mean positions per sequence")
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=7, help="timed calls of each path (median)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, B, K, d = args.items, args.sequences, args.candidates, 64
    items = torch.randn(n + 1, d, generator=g)
    lengths = torch.randint(1, 2 * args.positions, (B,), generator=g)
    row = torch.repeat_interleave(torch.arange(B), lengths)  # (P,) grouped by sequence
    P = row.shape[0]
    history = torch.randint(1, n + 1, (B, 20), generator=g).sort(dim=1).values
    exclusions = Exclusions(history, row, torch.randint(1, n + 1, (P,), generator=g), n)
    queries, sequence_queries = torch.randn(P, d, generator=g), torch.randn(B, d, generator=g)
    sampler = AnnSampler(FixedIndex(torch.randint(1, n + 1, (B, K), generator=g)), candidates=K,
                         query="sequence")  # fmt: skip

    def per_position():
        ids = sampler.candidate_ids(queries, exclusions, sequence_queries)
        logits = sampler.rescore(queries, items, ids)
        return logits.masked_fill(exclusions.contains(ids.clamp(min=0)), float("-inf"))

    def per_sequence():
        return sampler.candidate_logits(queries, items, exclusions, sequence_queries)[0]

    assert torch.allclose(per_position(), per_sequence(), atol=1e-4)
    times: dict[str, list[float]] = {"per_position": [], "per_sequence": []}
    for _ in range(args.steps):
        for name, fn in (("per_position", per_position), ("per_sequence", per_sequence)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1000)
    a, b = (float(np.median(times[k])) for k in ("per_position", "per_sequence"))
    print(f"P={P} positions, {B} sequences, K={K}, N={n}, threads={args.threads}")
    print(f"per-position gather: {a:.1f} ms; per-sequence bmm: {b:.1f} ms; ratio {a / b:.2f}x")
    return {"per_position_ms": a, "per_sequence_ms": b}


if __name__ == "__main__":
    main()
