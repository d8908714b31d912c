"""A two-tower retrieval model whose item vectors come from an item tower with side features.

The item tower maps (item id, hashed category) to a vector, so no item table exists to read: the
sampler is built from a callable that encodes the whole catalog, and every index refresh re-encodes
it, the cost that dominates ANCE-style training. The run prints that cost next to the cost of a
training step. ``--catalog-size`` adds items no user has seen (they still get vectors from their
features) to show how the re-encode grows with the catalog:

    .venv/bin/python examples/two_tower.py --steps 200
    .venv/bin/python examples/two_tower.py --steps 200 --catalog-size 200000
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch
from torch import nn

from annsample import NegativeSampler, RefreshPolicy, sampled_logits, sampled_loss
from annsample.data import history_csr, leave_one_out, load_dataset, pad_rows, training_tensors

log = logging.getLogger("two_tower")


def hashed_category(ids: torch.Tensor, n_categories: int) -> torch.Tensor:
    """A stand-in side feature: a category id from a multiplicative hash of the item id."""
    return (ids * 2654435761) % n_categories


class ItemTower(nn.Module):
    """(item id, hashed category) -> (..., d) item vector."""

    def __init__(self, n_items: int, dim: int, n_categories: int = 64) -> None:
        super().__init__()
        self.n_categories = n_categories
        self.ids = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.categories = nn.Embedding(n_categories, dim)
        self.mlp = nn.Sequential(nn.Linear(2 * dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        features = torch.cat(
            [self.ids(ids), self.categories(hashed_category(ids, self.n_categories))], dim=-1
        )
        return self.mlp(features)  # (..., d)

    def encode_catalog(self, chunk: int = 65536) -> torch.Tensor:
        """(N+1, d) vectors of every item, row 0 padding; chunked to bound memory."""
        ids = torch.arange(self.ids.num_embeddings)
        return torch.cat([self(ids[start : start + chunk]) for start in range(0, len(ids), chunk)])


class UserTower(nn.Module):
    """A user's item sequence (B, T) -> one (B, d) query vector (the GRU's last state)."""

    def __init__(self, n_items: int, dim: int) -> None:
        super().__init__()
        self.items = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.gru = nn.GRU(dim, dim, batch_first=True)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        return self.gru(self.items(seq))[0][:, -1]  # (B, d): sequences are left-padded


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/tiny.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--negatives", type=int, default=16)
    parser.add_argument("--refresh-every", type=int, default=25)
    parser.add_argument("--catalog-size", type=int, default=0, help="0 = the dataset's items")
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)

    split = leave_one_out(load_dataset(args.data))
    n_items = max(split.n_items, args.catalog_size)
    inputs, targets = training_tensors(split, max_len=20)
    has_target = targets[:, -1] > 0  # rows whose last position has a next item to predict
    inputs = torch.as_tensor(inputs[has_target])
    positives = torch.as_tensor(targets[has_target, -1])  # (U,) one next item per user
    indptr, items = history_csr(split, "train")
    histories = torch.as_tensor(pad_rows(indptr, items, has_target.nonzero()[0], 0))  # (U, H)

    item_tower, user_tower = ItemTower(n_items, args.dim), UserTower(split.n_items, args.dim)
    parameters = [*item_tower.parameters(), *user_tower.parameters()]
    optimiser = torch.optim.Adam(parameters, lr=1e-3)
    sampler = NegativeSampler(
        item_tower.encode_catalog,  # a refresh re-encodes the catalog through the tower
        num_negatives=args.negatives,
        candidates=50,
        tail_samples=64,
        refresh=RefreshPolicy(every=args.refresh_every, retrain_every=4),
        seed=args.seed,
    )
    generator = torch.Generator().manual_seed(args.seed)

    step_seconds: list[float] = []
    encode_seconds: list[float] = []
    index_seconds: list[float] = []
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        users = torch.randint(0, inputs.shape[0], (args.batch_size,), generator=generator)
        h = user_tower(inputs[users])  # (B, d)
        negatives = sampler.sample(h, positives[users], histories[users])
        pos, neg = sampled_logits(h, item_tower(negatives.positives), item_tower(negatives.ids))
        loss = sampled_loss("sampled_softmax", pos, neg, negatives.log_q)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        trained = time.perf_counter()
        stats = sampler.step()
        if stats["index/refresh"] is not None:
            encode_seconds.append(stats["index/encode_seconds"])
            index_seconds.append(stats["index/last_refresh_seconds"])
        else:
            step_seconds.append(trained - start)
        if step % 50 == 0 or step == args.steps:
            log.info(
                "step %d: loss %.4f, index version %d", step, loss.item(), stats["index/version"]
            )
    sampler.close()

    step_median = statistics.median(step_seconds) if step_seconds else float("nan")
    encode_median = statistics.median(encode_seconds) if encode_seconds else float("nan")
    index_median = statistics.median(index_seconds) if index_seconds else float("nan")
    result = {
        "catalog_size": n_items,
        "refreshes": len(encode_seconds),
        "step_seconds": step_median,
        "encode_seconds": encode_median,
        "index_seconds": index_median,
        "encode_over_step": encode_median / step_median,
        "loss": loss.item(),
    }
    log.info(
        "catalog %d items, %d refreshes: median step %.2f ms; median re-encode %.2f ms (%.1f steps)"
        " + index re-add/retrain %.2f ms; re-encoding every %d steps costs %.0f%% of training time",
        n_items,
        len(encode_seconds),
        1e3 * step_median,
        1e3 * encode_median,
        result["encode_over_step"],
        1e3 * index_median,
        args.refresh_every,
        100 * encode_median / (encode_median + args.refresh_every * step_median),
    )
    return result


if __name__ == "__main__":
    main()
