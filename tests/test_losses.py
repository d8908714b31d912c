"""Tests for annsample.losses against hand-computed values and exact full-softmax references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from annsample.losses import (
    bce_loss,
    corrected_logq_loss,
    full_ce_loss,
    gbce_loss,
    sampled_softmax_loss,
    scaled_ce_loss,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


POS = torch.tensor([2.0, -1.0])
NEG = torch.tensor([[0.5, -3.0], [1.0, 0.0]])


# --------------------------------------------------------------------------- bce


def test_bce_matches_hand_computed_value():
    # row 0: -log σ(2) - log(1-σ(0.5)) - log(1-σ(-3)); row 1: -log σ(-1) - log(1-σ(1)) - log(1-σ(0))
    row0 = -math.log(sigmoid(2.0)) - math.log(1 - sigmoid(0.5)) - math.log(1 - sigmoid(-3.0))
    row1 = -math.log(sigmoid(-1.0)) - math.log(1 - sigmoid(1.0)) - math.log(1 - sigmoid(0.0))
    assert bce_loss(POS, NEG).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_bce_at_zero_logits_is_k_plus_one_log_two():
    k = 3
    loss = bce_loss(torch.zeros(5), torch.zeros(5, k))
    assert loss.item() == pytest.approx((k + 1) * math.log(2), rel=1e-6)


def test_bce_is_stable_for_large_logits():
    loss = bce_loss(torch.tensor([200.0, -200.0]), torch.tensor([[-200.0], [200.0]]))
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(200.0, rel=1e-6)  # row 0 costs 0, row 1 costs 200 + 200


def test_bce_gradient_matches_closed_form():
    pos = POS.clone().requires_grad_(True)
    neg = NEG.clone().requires_grad_(True)
    bce_loss(pos, neg).backward()
    P = pos.shape[0]
    torch.testing.assert_close(pos.grad, (torch.sigmoid(POS) - 1) / P)
    torch.testing.assert_close(neg.grad, torch.sigmoid(NEG) / P)


# --------------------------------------------------------------------------- gbce


def gbce_reference(pos: torch.Tensor, neg: torch.Tensor, n_items: int, t: float) -> float:
    """gSASRec eq.: α = k/(N-1), β = α(t(1 - 1/α) + 1/α); loss = -β log σ(s+) - Σ log(1 - σ(s-))."""
    k = neg.shape[1]
    alpha = k / (n_items - 1)
    beta = alpha * (t * (1 - 1 / alpha) + 1 / alpha)
    total = 0.0
    for p, row in zip(pos.tolist(), neg.tolist(), strict=True):
        total += -beta * math.log(sigmoid(p)) - sum(math.log(1 - sigmoid(s)) for s in row)
    return total / len(pos)


@pytest.mark.parametrize("t", [0.0, 0.25, 0.75, 1.0])
@pytest.mark.parametrize("n_items", [3, 101, 10_000])
def test_gbce_matches_the_gsasrec_formula(t, n_items):
    assert gbce_loss(POS, NEG, n_items, t).item() == pytest.approx(
        gbce_reference(POS, NEG, n_items, t), rel=1e-6
    )


def test_gbce_hand_computed_beta():
    # k = 2, N = 101 -> α = 0.02; t = 0.75 -> β = 0.02 * (0.75 * (1 - 50) + 50) = 0.265
    pos, neg = torch.tensor([1.0]), torch.tensor([[0.0, 2.0]])
    expected = -0.265 * math.log(sigmoid(1.0)) - math.log(0.5) - math.log(1 - sigmoid(2.0))
    assert gbce_loss(pos, neg, 101, 0.75).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("n_items", [3, 50, 10_000])
def test_gbce_with_t_zero_is_bce(n_items):
    torch.testing.assert_close(gbce_loss(POS, NEG, n_items, t=0.0), bce_loss(POS, NEG))


def test_gbce_with_all_items_as_negatives_is_bce_for_any_t():
    # k = N - 1 makes α = 1 and so β = 1 whatever t is
    neg = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    pos = torch.randn(4, generator=torch.Generator().manual_seed(1))
    for t in (0.0, 0.5, 1.0):
        torch.testing.assert_close(gbce_loss(pos, neg, 10, t), bce_loss(pos, neg))


def test_gbce_positive_weight_shrinks_as_t_grows():
    # β decreases from 1 (t = 0) to α (t = 1) when α < 1: the positive term weighs less
    losses = [gbce_loss(POS, NEG, 1000, t).item() for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert losses == sorted(losses, reverse=True)


# --------------------------------------------------------------------------- sampled softmax


def test_sampled_softmax_matches_hand_computed_value():
    # row 0: log(e^2 + e^0.5 + e^-3) - 2; row 1: log(e^-1 + e^1 + e^0) + 1
    row0 = math.log(math.exp(2) + math.exp(0.5) + math.exp(-3)) - 2
    row1 = math.log(math.exp(-1) + math.exp(1) + math.exp(0)) + 1
    assert sampled_softmax_loss(POS, NEG).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_sampled_softmax_logq_correction_matches_hand_computed_value():
    neg_log_q = torch.log(torch.tensor([[0.5, 0.1], [0.2, 0.2]]))
    pos_log_q = torch.log(torch.tensor([0.25, 0.05]))
    # the positive becomes s+ - log q(+), each of the k = 2 negatives s_j - log(k q(j))
    row0 = [2 - math.log(0.25), 0.5 - math.log(2 * 0.5), -3 - math.log(2 * 0.1)]
    row1 = [-1 - math.log(0.05), 1 - math.log(2 * 0.2), 0 - math.log(2 * 0.2)]
    expected = sum(math.log(sum(math.exp(x) for x in row)) - row[0] for row in (row0, row1)) / 2
    loss = sampled_softmax_loss(POS, NEG, neg_log_q, pos_log_q)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # correcting only the negatives leaves the positive logit as it is
    row0[0], row1[0] = 2.0, -1.0
    expected = sum(math.log(sum(math.exp(x) for x in row)) - row[0] for row in (row0, row1)) / 2
    assert sampled_softmax_loss(POS, NEG, neg_log_q).item() == pytest.approx(expected, rel=1e-6)


def test_sampled_softmax_uniform_q_over_k_negatives_cancels():
    # q(j) = 1/k for each of the k negatives: log(k q) = 0, nothing changes
    k = NEG.shape[1]
    log_q = torch.full_like(NEG, -math.log(k))
    torch.testing.assert_close(
        sampled_softmax_loss(POS, NEG, log_q), sampled_softmax_loss(POS, NEG)
    )


def all_other_items(h: torch.Tensor, items: torch.Tensor, targets: torch.Tensor):
    """Positive logits (P,) and the logits of every other item as negatives (P, N-1)."""
    logits = h @ items[1:].T  # (P, N)
    P, N = logits.shape
    keep = torch.ones(P, N, dtype=torch.bool)
    keep[torch.arange(P), targets - 1] = False
    return logits[torch.arange(P), targets - 1], logits[keep].view(P, N - 1)


def test_sampled_softmax_over_every_item_with_uniform_q_is_full_ce():
    generator = torch.Generator().manual_seed(0)
    N, d, P = 12, 5, 7
    h = torch.randn(P, d, generator=generator)
    items = torch.randn(N + 1, d, generator=generator)
    targets = torch.randint(1, N + 1, (P,), generator=generator)
    pos, neg = all_other_items(h, items, targets)
    full = full_ce_loss(h, items, targets)
    torch.testing.assert_close(sampled_softmax_loss(pos, neg), full)
    # the N - 1 other items as k = N - 1 negatives from q = uniform over them: unbiased, exact here
    uniform = math.log(1.0 / (N - 1))
    torch.testing.assert_close(sampled_softmax_loss(pos, neg, torch.full_like(neg, uniform)), full)


def test_sampled_softmax_is_stable_for_large_logits():
    loss = sampled_softmax_loss(torch.tensor([1000.0]), torch.tensor([[999.0, -1000.0]]))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-4)  # float32 ulp at 1000


# --------------------------------------------------------------------------- scaled ce


def test_scaled_ce_matches_hand_computed_value():
    # row 0: log(e^2 + 100·(e^0.5 + e^-3)) - 2; row 1: log(e^-1 + 100·(e^1 + e^0)) + 1
    row0 = math.log(math.exp(2) + 100 * (math.exp(0.5) + math.exp(-3))) - 2
    row1 = math.log(math.exp(-1) + 100 * (math.exp(1) + math.exp(0))) + 1
    assert scaled_ce_loss(POS, NEG, 100.0).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_scaled_ce_with_scale_one_is_sampled_softmax_and_with_n_over_k_is_uniform_logq():
    torch.testing.assert_close(scaled_ce_loss(POS, NEG, 1.0), sampled_softmax_loss(POS, NEG))
    # uniform negatives over n allowed items: logQ adds log(n / k) to every negative logit
    n, k = 1000, NEG.shape[1]
    uniform = torch.full_like(NEG, -math.log(n))
    torch.testing.assert_close(
        scaled_ce_loss(POS, NEG, n / k), sampled_softmax_loss(POS, NEG, uniform)
    )


def test_scaled_ce_gradient_matches_closed_form():
    pos = POS.clone().requires_grad_(True)
    neg = NEG.clone().requires_grad_(True)
    scaled_ce_loss(pos, neg, 100.0).backward()
    logits = torch.cat([POS[:, None], NEG + math.log(100.0)], dim=1)
    p = torch.softmax(logits, dim=1) / POS.shape[0]  # d loss / d logit = softmax - one-hot
    torch.testing.assert_close(pos.grad, p[:, 0] - 1 / POS.shape[0])
    torch.testing.assert_close(neg.grad, p[:, 1:])


def test_scaled_ce_grows_with_the_scale():
    losses = [scaled_ce_loss(POS, NEG, scale).item() for scale in (0.1, 1.0, 10.0, 500.0)]
    assert losses == sorted(losses)


# --------------------------------------------------------------------------- corrected logQ


LOG_Q = torch.log(torch.tensor([[0.5, 0.1], [0.2, 0.2]]))


def corrected_reference(pos, neg, log_q) -> float:
    """Khrylchenko et al.: mean over rows of (1 - p̂+)·(-s+ + log Σ_j exp(s_j - log(k q_j)))."""
    total = 0.0
    for s_pos, row, row_q in zip(pos.tolist(), neg.tolist(), log_q.tolist(), strict=True):
        k = len(row)
        mass = sum(math.exp(s - lq - math.log(k)) for s, lq in zip(row, row_q, strict=True))
        p_pos = math.exp(s_pos) / (math.exp(s_pos) + mass)
        total += (1 - p_pos) * (math.log(mass) - s_pos)
    return total / len(pos)


def test_corrected_logq_matches_hand_computed_value():
    # row 0: mass = e^0.5/(2·0.5) + e^-3/(2·0.1) = 1.6487 + 0.2489 = 1.8976; p̂+ = e^2/(e^2 + 1.8976)
    mass = math.exp(0.5) / 1.0 + math.exp(-3) / 0.2
    row0 = (1 - math.exp(2) / (math.exp(2) + mass)) * (math.log(mass) - 2)
    mass = math.exp(1) / 0.4 + math.exp(0) / 0.4
    row1 = (1 - math.exp(-1) / (math.exp(-1) + mass)) * (math.log(mass) + 1)
    loss = corrected_logq_loss(POS, NEG, LOG_Q)
    assert loss.item() == pytest.approx((row0 + row1) / 2, rel=1e-6)
    assert loss.item() == pytest.approx(corrected_reference(POS, NEG, LOG_Q), rel=1e-6)


def test_corrected_logq_weight_is_not_differentiated():
    pos = POS.clone().requires_grad_(True)
    neg = NEG.clone().requires_grad_(True)
    corrected_logq_loss(pos, neg, LOG_Q).backward()
    corrected = NEG - LOG_Q - math.log(2)
    log_mass = corrected.logsumexp(1)
    weight = torch.sigmoid(log_mass - POS) / POS.shape[0]  # (1 - p̂+) / P, held constant
    torch.testing.assert_close(pos.grad, -weight)
    torch.testing.assert_close(neg.grad, weight[:, None] * torch.softmax(corrected, dim=1))


def test_corrected_logq_over_every_other_item_has_the_full_softmax_gradient():
    """With the N - 1 other items as negatives and q uniform over them, the estimate of the
    partition function without the positive is exact, and so is the gradient: (1 - p+) scales the
    softmax over the negatives into the full softmax's."""
    generator = torch.Generator().manual_seed(0)
    N, d, P = 12, 5, 7
    h = torch.randn(P, d, generator=generator, dtype=torch.float64)
    items = torch.randn(N + 1, d, generator=generator, dtype=torch.float64)
    targets = torch.randint(1, N + 1, (P,), generator=generator)
    grads = []
    for corrected in (True, False):
        h_, items_ = h.clone().requires_grad_(True), items.clone().requires_grad_(True)
        if corrected:
            pos, neg = all_other_items(h_, items_, targets)
            corrected_logq_loss(pos, neg, torch.full_like(neg, -math.log(N - 1))).backward()
        else:
            full_ce_loss(h_, items_, targets).backward()
        grads.append((h_.grad, items_.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_corrected_logq_is_stable_for_large_logits():
    loss = corrected_logq_loss(
        torch.tensor([1000.0, -1000.0]), torch.tensor([[-1000.0], [1000.0]]), torch.zeros(2, 1)
    )
    assert torch.isfinite(loss) and loss.item() == pytest.approx(1000.0, rel=1e-6)


# --------------------------------------------------------------------------- full ce


@pytest.fixture
def full_ce_inputs():
    generator = torch.Generator().manual_seed(0)
    N, d, P = 30, 8, 23
    h = torch.randn(P, d, generator=generator)
    items = torch.randn(N + 1, d, generator=generator)
    items[0] = 100.0  # a huge padding row: it would dominate the softmax if it were included
    targets = torch.randint(1, N + 1, (P,), generator=generator)
    return h, items, targets


def test_full_ce_equals_cross_entropy_without_the_padding_column(full_ce_inputs):
    h, items, targets = full_ce_inputs
    expected = F.cross_entropy(h @ items[1:].T, targets - 1)
    torch.testing.assert_close(full_ce_loss(h, items, targets), expected)


def test_full_ce_matches_hand_computed_value():
    h = torch.tensor([[1.0, 0.0]])
    items = torch.tensor([[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    # logits for items 1..3 are 1, 0, -1; target 2
    expected = math.log(math.e + 1 + math.exp(-1)) - 0.0
    assert full_ce_loss(h, items, torch.tensor([2])).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 22, 23, 24, 4096])
def test_full_ce_is_chunk_size_invariant(full_ce_inputs, chunk_size):
    h, items, targets = full_ce_inputs
    torch.testing.assert_close(
        full_ce_loss(h, items, targets, chunk_size=chunk_size), full_ce_loss(h, items, targets)
    )


def test_full_ce_gradients_are_chunk_size_invariant_and_skip_padding(full_ce_inputs):
    h, items, targets = full_ce_inputs
    grads = []
    for chunk_size in (3, 4096):
        h_, items_ = h.clone().requires_grad_(True), items.clone().requires_grad_(True)
        full_ce_loss(h_, items_, targets, chunk_size=chunk_size).backward()
        assert torch.count_nonzero(items_.grad[0]) == 0
        grads.append((h_.grad, items_.grad))
    torch.testing.assert_close(grads[0], grads[1])


def test_full_ce_of_no_positions_is_zero():
    loss = full_ce_loss(torch.empty(0, 4), torch.randn(6, 4), torch.empty(0, dtype=torch.int64))
    assert loss.item() == 0.0
