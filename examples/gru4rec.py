"""A GRU4Rec-style recommender in a plain PyTorch loop, trained with annsample's GenNi negatives.

The sampler takes 15 lines (the import, the history table, the policy and sampler, sample, the
logits and loss, the step hook, close); the model, data and optimiser are ordinary PyTorch. Runs
in seconds on the bundled tiny data:

    .venv/bin/python examples/gru4rec.py --data data/tiny.txt --steps 200
"""

from __future__ import annotations

import argparse
import logging

import numpy as np
import torch
from torch import nn

from annsample import NegativeSampler, RefreshPolicy, sampled_logits, sampled_loss
from annsample.data import history_csr, leave_one_out, load_dataset, pad_rows, training_tensors

log = logging.getLogger("gru4rec")


class GRU4Rec(nn.Module):
    """Item ids (B, T) -> hidden states (B, T, d) through an embedding and a GRU."""

    def __init__(self, n_items: int, dim: int = 32) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)  # (N+1, d), row 0 padding
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.gru(self.items(seq))[0]  # (B, T, d)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/tiny.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    split = leave_one_out(load_dataset(args.data))
    inputs, targets = (torch.as_tensor(a) for a in training_tensors(split, max_len=20))
    indptr, items = history_csr(split, "train")
    histories = torch.as_tensor(pad_rows(indptr, items, np.arange(split.n_users), 0))  # (U, H)
    model = GRU4Rec(split.n_items)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    # the sampler reads the live item table; the index re-adds it every 20 steps
    policy = RefreshPolicy(every=20, retrain_every=5)
    sampler = NegativeSampler(
        model.items.weight, candidates=50, tail_samples=64, refresh=policy, seed=args.seed
    )
    generator = torch.Generator().manual_seed(args.seed)

    for step in range(1, args.steps + 1):
        users = torch.randint(0, inputs.shape[0], (args.batch_size,), generator=generator)
        h = model(inputs[users])  # (B, T, d)
        negatives = sampler.sample(h, targets[users], histories[users])  # (P, k) ids, log q
        h_pos = h[negatives.mask]  # (P, d) the real positions
        pos, neg = sampled_logits(
            h_pos, model.items(negatives.positives), model.items(negatives.ids)
        )
        loss = sampled_loss("bce", pos, neg)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        stats = sampler.step()  # refreshes the index on schedule
        if step % 50 == 0 or step == args.steps:
            log.info(
                "step %d: loss %.4f, index version %d (%d steps stale)",
                step,
                loss.item(),
                stats["index/version"],
                stats["index/staleness_steps"],
            )
    sampler.close()
    return {"loss": loss.item(), **sampler.stats()}


if __name__ == "__main__":
    main()
