"""Plug annsample's GenNi index sampler into your own torch model (here a small GRU recommender).

The sampler needs only tensors: hidden states (P, d), the item table (N+1, d) with row 0 padding,
and the items each position must not draw. Everything else (model, loss, optimiser, loop) is yours.

    .venv/bin/python examples/custom_model.py --data data/tiny.txt --steps 200
"""

from __future__ import annotations

import argparse
import logging

import torch
from torch import nn

from annsample.data import history_csr, leave_one_out, load_dataset, pad_rows, training_tensors
from annsample.index import ItemIndex
from annsample.losses import bce_loss
from annsample.refresh import IndexRefresher, make_schedule
from annsample.samplers import AnnSampler, Exclusions


class GRURecommender(nn.Module):
    """Any model that maps (B, T) item ids to (B, T, d) states and owns an item table works."""

    def __init__(self, n_items: int, dim: int = 32) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.gru(self.items(seq))[0]  # (B, T, d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/tiny.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.manual_seed(args.seed)

    split = leave_one_out(load_dataset(args.data))
    inputs, targets = (torch.as_tensor(a) for a in training_tensors(split, max_len=20))
    hist_indptr, hist_items = history_csr(split, "train")
    model = GRURecommender(split.n_items)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    # The index holds the item table without padding; ids 1..N come back from searches.
    ids = torch.arange(1, split.n_items + 1)
    refresher = IndexRefresher(lambda: ItemIndex(32, nlist=16, nprobe=8, metric="l2_augmented"))
    refresher.build(model.items.weight.detach()[1:].clone(), step=0, ids=ids)
    schedule = make_schedule("steps", n=20, retrain_every=5)
    sampler = AnnSampler(refresher, alpha=1.0, candidates=50, epsilon=0.01, tail_samples=64)
    generator = torch.Generator().manual_seed(args.seed)

    for step in range(1, args.steps + 1):
        users = torch.randint(0, inputs.shape[0], (args.batch_size,), generator=generator)
        seq, tgt = inputs[users], targets[users]
        h = model(seq)  # (B, T, d)
        mask = tgt > 0
        if not mask.any():
            continue
        h_pos, positives = h[mask], tgt[mask]  # (P, d), (P,)
        history = torch.as_tensor(
            pad_rows(hist_indptr, hist_items, users.numpy(), split.n_items + 1)
        )
        exclusions = Exclusions(history, mask.nonzero()[:, 0], positives, split.n_items)
        with torch.no_grad():
            negatives = sampler.sample(
                h_pos.detach(), model.items.weight.detach(), exclusions, 1, generator
            )
        pos_logits = (h_pos * model.items(positives)).sum(-1)
        neg_logits = torch.einsum("pd,pkd->pk", h_pos, model.items(negatives.ids))
        loss = bce_loss(pos_logits, neg_logits)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        kind = schedule.should_refresh(step)
        if kind:
            refresher.request(kind, model.items.weight.detach()[1:].clone(), step)
        if step % 50 == 0:
            stats = refresher.stats(step)
            print(f"step {step}: loss {loss.item():.4f}, index version {stats['index/version']}")
    refresher.close()


if __name__ == "__main__":
    main()
