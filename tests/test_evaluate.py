"""Tests for annsample.evaluate: hand-computed metrics and ranks against a dense brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from annsample.evaluate import (
    KS,
    Ranks,
    evaluate_ranking,
    hit_rate,
    metrics_from_ranks,
    ndcg,
    rank_targets,
)

# --------------------------------------------------------------------------- metrics


RANKS = np.array([0, 1, 5, 30])


def test_hit_rate_hand_computed():
    assert hit_rate(RANKS, 1) == 0.25
    assert hit_rate(RANKS, 5) == 0.5
    assert hit_rate(RANKS, 6) == 0.75
    assert hit_rate(RANKS, 31) == 1.0


def test_ndcg_hand_computed():
    assert ndcg(RANKS, 1) == pytest.approx(1 / 4)
    assert ndcg(RANKS, 5) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert ndcg(RANKS, 10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 4)
    assert ndcg(RANKS, 100) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7) + 1 / 5) / 4)


def test_metrics_from_ranks_keys_and_values():
    metrics = metrics_from_ranks(RANKS)
    assert list(metrics) == [f"{name}@{k}" for k in KS for name in ("hr", "ndcg")]
    assert metrics["hr@5"] == 0.5
    assert metrics["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert metrics["hr@10"] == 0.75
    assert metrics["hr@20"] == 0.75
    assert metrics_from_ranks(RANKS, ks=(1,)) == {"hr@1": 0.25, "ndcg@1": 0.25}


def test_metrics_are_monotone_in_k_and_ndcg_never_exceeds_hr():
    ranks = np.random.default_rng(0).integers(0, 60, size=500)
    ks = range(1, 70)
    hrs = [hit_rate(ranks, k) for k in ks]
    ndcgs = [ndcg(ranks, k) for k in ks]
    assert hrs == sorted(hrs) and ndcgs == sorted(ndcgs)
    assert all(n <= h for n, h in zip(ndcgs, hrs, strict=True))


def test_metrics_accept_lists_and_torch_ranks():
    assert hit_rate([0, 7], 5) == 0.5
    assert ndcg(torch.tensor([0, 7]).numpy(), 5) == 0.5


# --------------------------------------------------------------------------- rank_targets


def brute_force_counts(h, item_embeddings, targets, history) -> Ranks:
    """Dense reference in float64: allowed items scoring strictly above the target, and exactly
    tied with it (the target itself not counted)."""
    scores = h.double() @ item_embeddings.double().T  # (C, N+1)
    higher, ties = [], []
    for c in range(h.shape[0]):
        target = int(targets[c])
        allowed = torch.ones(item_embeddings.shape[0], dtype=torch.bool)
        allowed[0] = False  # padding
        for item in history[c].tolist():
            if 1 <= item < item_embeddings.shape[0] and item != target:
                allowed[item] = False
        allowed[target] = False  # the target does not outrank itself
        higher.append(int((scores[c][allowed] > scores[c, target]).sum()))
        ties.append(int((scores[c][allowed] == scores[c, target]).sum()))
    return Ranks(torch.tensor(higher), torch.tensor(ties))


def same_counts(found: Ranks, expected: Ranks) -> bool:
    return torch.equal(found.higher, expected.higher) and torch.equal(found.ties, expected.ties)


def integer_problem(seed: int, C: int = 17, N: int = 40, d: int = 3, H: int = 6):
    """Small integer-valued embeddings: float32 scores are exact, and ties are frequent."""
    generator = torch.Generator().manual_seed(seed)
    h = torch.randint(-2, 3, (C, d), generator=generator).float()
    items = torch.randint(-2, 3, (N + 1, d), generator=generator).float()
    items[0] = 50.0  # padding would outrank everything if it were not masked
    targets = torch.randint(1, N + 1, (C,), generator=generator)
    history = torch.randint(1, N + 1, (C, H), generator=generator)
    history[::3, 0] = targets[::3]  # some targets also occur in the history
    history[1::4, -2:] = 0  # padding values
    history[2::5, -1] = N + 1  # the pad_rows fill value
    return h, items, targets, history


@pytest.mark.parametrize("seed", range(5))
def test_rank_targets_matches_brute_force(seed):
    h, items, targets, history = integer_problem(seed)
    expected = brute_force_counts(h, items, targets, history)
    assert int(expected.ties.sum()) > 0  # the problem does exercise ties
    assert same_counts(rank_targets(h, items, targets, history), expected)


@pytest.mark.parametrize("item_chunk", [1, 2, 7, 39, 40, 41, 1 << 16])
def test_rank_targets_is_item_chunk_invariant(item_chunk):
    h, items, targets, history = integer_problem(seed=11)
    expected = brute_force_counts(h, items, targets, history)
    assert same_counts(rank_targets(h, items, targets, history, item_chunk=item_chunk), expected)


def test_rank_targets_random_float_embeddings_match_brute_force():
    generator = torch.Generator().manual_seed(3)
    C, N, d = 25, 300, 16
    h = torch.randn(C, d, generator=generator)
    items = torch.randn(N + 1, d, generator=generator)
    targets = torch.randint(1, N + 1, (C,), generator=generator)
    history = torch.randint(0, N + 2, (C, 30), generator=generator)
    expected = brute_force_counts(h, items, targets, history)
    for item_chunk in (64, 1 << 16):
        assert same_counts(
            rank_targets(h, items, targets, history, item_chunk=item_chunk), expected
        )


def test_history_is_masked_but_the_target_never_is():
    h = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[9.0, 0.0], [4.0, 0.0], [3.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    target = torch.tensor([3])  # score 2; items 1 and 2 score higher
    assert rank_targets(h, items, target, torch.tensor([[0]])).higher.item() == 2
    assert rank_targets(h, items, target, torch.tensor([[1, 0]])).higher.item() == 1
    assert rank_targets(h, items, target, torch.tensor([[1, 2]])).higher.item() == 0
    # the target in its own history stays rankable; the other history item is still masked
    assert rank_targets(h, items, target, torch.tensor([[3, 1]])).higher.item() == 1


def test_padding_row_is_never_ranked():
    h = torch.tensor([[1.0]])
    items = torch.tensor([[100.0], [1.0], [2.0]])
    counts = rank_targets(h, items, torch.tensor([2]), torch.tensor([[0]]))
    assert (counts.higher.item(), counts.ties.item()) == (0, 0)


def test_ties_are_counted_apart_from_higher_items():
    h = torch.tensor([[1.0, 1.0]])
    items = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    # items 1-3 score 2, item 4 scores 3: one item above each of targets 1-3, two tied with it
    for target in (1, 2, 3):
        counts = rank_targets(h, items, torch.tensor([target]), torch.tensor([[0]]))
        assert (counts.higher.item(), counts.ties.item()) == (1, 2)


def test_tied_targets_get_expected_metrics_under_random_tie_breaking():
    ranks = Ranks(np.array([1]), np.array([2]))  # uniform rank in {1, 2, 3}
    assert hit_rate(ranks, 1) == 0.0
    assert hit_rate(ranks, 2) == pytest.approx(1 / 3)
    assert hit_rate(ranks, 3) == pytest.approx(2 / 3)
    assert hit_rate(ranks, 4) == 1.0
    gains = [1 / math.log2(r + 2) for r in (1, 2, 3)]
    assert ndcg(ranks, 3) == pytest.approx(sum(gains[:2]) / 3)
    assert ndcg(ranks, 10) == pytest.approx(sum(gains) / 3)
    assert ranks.expected.tolist() == [2.0]
    # without ties the expectation is the plain metric
    assert metrics_from_ranks(Ranks(RANKS, np.zeros_like(RANKS))) == metrics_from_ranks(RANKS)


def test_all_equal_scores_rank_at_chance():
    """A model that scores every item the same must get HR@k = k / n_allowed, not 1."""
    N, C = 1000, 50
    generator = torch.Generator().manual_seed(0)
    h = torch.zeros(C, 8)
    items = torch.randn(N + 1, 8, generator=generator)
    targets = torch.randint(1, N + 1, (C,), generator=generator)
    history = torch.randint(1, N + 1, (C, 20), generator=generator)
    counts = rank_targets(h, items, targets, history)
    n_allowed = np.array(
        [
            len(set(range(1, N + 1)) - (set(history[c].tolist()) - {int(targets[c])}))
            for c in range(C)
        ]
    )
    assert (counts.higher == 0).all()
    assert counts.ties.numpy().tolist() == (n_allowed - 1).tolist()
    metrics = metrics_from_ranks(Ranks(counts.higher.numpy(), counts.ties.numpy()))
    for k in KS:
        assert metrics[f"hr@{k}"] == pytest.approx(float(np.mean(k / n_allowed)))
    # NDCG@10 of a random rank among ~980 items is about 0.0045, far from 1
    assert metrics["ndcg@10"] < 0.01


def test_items_with_the_targets_embedding_do_not_outrank_it():
    generator = torch.Generator().manual_seed(1)
    C, N, d = 30, 200, 64
    h = torch.randn(C, d, generator=generator)
    items = torch.randn(N + 1, d, generator=generator)
    items[5:100] = items[3]  # 95 exact copies of the target's embedding
    targets = torch.full((C,), 3)
    history = torch.zeros(C, 1, dtype=torch.int64)
    expected = brute_force_counts(h, items, targets, history)  # copies tie exactly in float64
    counts = rank_targets(h, items, targets, history)
    assert same_counts(counts, expected)
    assert (counts.ties == 95).all()  # the copies are ties, neither above nor below the target


def test_rank_targets_does_not_modify_its_inputs():
    h, items, targets, history = integer_problem(seed=2)
    copies = [t.clone() for t in (h, items, targets, history)]
    rank_targets(h, items, targets, history, item_chunk=5)
    for before, after in zip(copies, (h, items, targets, history), strict=True):
        assert torch.equal(before, after)


# --------------------------------------------------------------------------- evaluate_ranking


class SumEncoder:
    """A fake model: the state at every position is the sum of the sequence's item vectors.

    Padding maps to zero, so the output does not depend on how much left padding is trimmed; the
    encoder records the widths it is called with.
    """

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table  # (N+1, d), row 0 zero
        self.widths: list[int] = []

    def __call__(self, seq: torch.Tensor) -> torch.Tensor:
        self.widths.append(seq.shape[1])
        h = self.table[seq].sum(dim=1, keepdim=True)  # (B, 1, d)
        return h.expand(-1, seq.shape[1], -1)


@pytest.fixture
def ranking_problem():
    rng = np.random.default_rng(0)
    U, T, N, d = 23, 8, 30, 3
    lengths = rng.integers(1, T + 1, size=U)
    inputs = np.zeros((U, T), dtype=np.int64)
    for u, length in enumerate(lengths):
        inputs[u, T - length :] = rng.integers(1, N + 1, size=length)
    targets = rng.integers(1, N + 1, size=U)
    history = [
        np.unique(np.concatenate([inputs[u][inputs[u] > 0], rng.integers(1, N + 1, size=2)]))
        for u in range(U)
    ]
    indptr = np.concatenate([[0], np.cumsum([len(row) for row in history])]).astype(np.int64)
    items = np.concatenate(history).astype(np.int64)
    table = torch.tensor(rng.integers(-2, 3, size=(N + 1, d)), dtype=torch.float32)
    table[0] = 0.0
    item_embeddings = torch.tensor(rng.integers(-2, 3, size=(N + 1, d)), dtype=torch.float32)
    return inputs, targets, indptr, items, table, item_embeddings


@pytest.mark.parametrize("batch_size", [1, 4, 1024])
def test_evaluate_ranking_matches_brute_force(ranking_problem, batch_size):
    inputs, targets, indptr, items, table, item_embeddings = ranking_problem
    encoder = SumEncoder(table)
    metrics, ranks = evaluate_ranking(
        encoder, item_embeddings, inputs, targets, indptr, items, batch_size=batch_size
    )
    h = table[torch.as_tensor(inputs)].sum(dim=1)
    width = int(np.diff(indptr).max())
    history = torch.zeros(len(targets), width, dtype=torch.int64)
    for u in range(len(targets)):
        row = items[indptr[u] : indptr[u + 1]]
        history[u, : len(row)] = torch.as_tensor(row)
    expected = brute_force_counts(h, item_embeddings, torch.as_tensor(targets), history)
    # in the users' original order
    assert ranks.higher.tolist() == expected.higher.tolist()
    assert ranks.ties.tolist() == expected.ties.tolist()
    assert metrics == metrics_from_ranks(ranks)
    assert len(encoder.widths) == math.ceil(len(targets) / batch_size)
    assert max(encoder.widths) <= inputs.shape[1]


def test_evaluate_ranking_trims_left_padding(ranking_problem):
    inputs, targets, indptr, items, table, item_embeddings = ranking_problem
    encoder = SumEncoder(table)
    evaluate_ranking(encoder, item_embeddings, inputs, targets, indptr, items, batch_size=1)
    # one user per batch: the encoder sees exactly that user's real items
    assert sorted(encoder.widths) == sorted((inputs > 0).sum(axis=1).tolist())


def test_evaluate_ranking_custom_ks(ranking_problem):
    inputs, targets, indptr, items, table, item_embeddings = ranking_problem
    metrics, ranks = evaluate_ranking(
        SumEncoder(table), item_embeddings, inputs, targets, indptr, items, ks=(1, 3)
    )
    assert metrics == metrics_from_ranks(ranks, ks=(1, 3))
    assert ranks.higher.dtype == np.int64 and ranks.higher.shape == targets.shape
    assert ranks.ties.dtype == np.int64 and ranks.ties.shape == targets.shape


def test_untrained_all_equal_model_scores_at_chance_end_to_end(tmp_path):
    """The review's reproduction: zero-initialised SASRec, no real update, full `train` pipeline."""
    from annsample import data as data_mod
    from annsample.config import load_config
    from annsample.prepare import prepare_data
    from annsample.train import train

    config = load_config(
        "configs/tiny.yaml",
        ("model.init_std=0", "train.lr=1e-12", "train.epochs=1", "train.num_threads=1"),
    )
    results = train(config, tmp_path / "run")
    split = prepare_data(config).split
    indptr, _ = data_mod.history_csr(split, "test")
    # distinct masked items per user; the target is never masked
    n_allowed = split.n_items - np.diff(indptr)
    chance = float(np.mean(10 / n_allowed))
    assert results["test"]["hr@10"] == pytest.approx(chance, rel=0.05)
    assert results["test"]["ndcg@10"] < 2 * chance
