"""The chunked Gumbel-max exact sampler draws GenNi's distribution, reports exact log q, never draws
exclusions, and agrees with the reservoir ExactSampler; CUDA cases run only with a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    SAMPLING_DIM,
    SAMPLING_ITEMS,
    assert_draws_follow,
    draw_counts,
    sampling_problem,
)

from annsample.errors import SamplerError
from annsample.exact_gumbel import GumbelExactSampler, matmul_precision
from annsample.samplers import ExactSampler, Exclusions, genni_log_probs

N, D = SAMPLING_ITEMS, SAMPLING_DIM
cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)"
)


@pytest.fixture
def problem():
    return sampling_problem()


@pytest.mark.parametrize("chunk_elements", [None, 6 * 7])  # one chunk; chunks of 7 items
def test_draws_follow_the_genni_softmax(problem, chunk_elements):
    queries, items, ex = problem
    sampler = GumbelExactSampler(alpha=1.5, chunk_elements=chunk_elements)
    out = sampler.sample(queries, items, ex, 20000, torch.Generator().manual_seed(3))
    log_p = genni_log_probs(queries, items, ex, 1.5)
    assert not bool(ex.contains(out.ids).any())
    assert_draws_follow(out.ids, log_p.exp())
    assert torch.allclose(out.log_q.double(), log_p.gather(1, out.ids), atol=1e-5)


def test_log_q_does_not_depend_on_chunking(problem):
    queries, items, ex = problem
    one = GumbelExactSampler(alpha=2.0).sample(queries, items, ex, 50, torch.Generator())
    many = GumbelExactSampler(alpha=2.0, chunk_elements=6)  # one item per chunk
    out = many.sample(queries, items, ex, 50, torch.Generator())
    reference = genni_log_probs(queries, items, ex, 2.0)
    for draw in (one, out):
        assert torch.allclose(draw.log_q.double(), reference.gather(1, draw.ids), atol=1e-5)


def test_matches_the_reservoir_exact_sampler(problem):
    """Both exact samplers estimate the same distribution: small total variation between them."""
    queries, items, ex = problem
    gumbel = GumbelExactSampler(alpha=1.0).sample(
        queries, items, ex, 20000, torch.Generator().manual_seed(1)
    )
    reservoir = ExactSampler(alpha=1.0).sample(
        queries, items, ex, 20000, torch.Generator().manual_seed(2)
    )
    tv = 0.5 * (draw_counts(gumbel.ids) - draw_counts(reservoir.ids)).abs().sum(1) / 20000
    # Two samples of 20000 over <= 30 items differ by about sqrt(30 / 20000) in TV.
    assert float(tv.max()) < 0.03, tv
    # An unrelated distribution (uniform) is far away, so the check can fail.
    uniform = torch.randint(1, N + 1, (6, 20000), generator=torch.Generator().manual_seed(0))
    tv_uniform = 0.5 * (draw_counts(gumbel.ids) - draw_counts(uniform)).abs().sum(1) / 20000
    assert float(tv_uniform.min()) > 0.1, tv_uniform


def test_bf16_is_exact_for_its_own_logits_and_close_to_fp32(problem):
    queries, items, ex = problem
    sampler = GumbelExactSampler(alpha=1.0, precision="bf16")
    out = sampler.sample(queries, items, ex, 20000, torch.Generator().manual_seed(5))
    probs = sampler.probabilities(queries, items, ex)
    assert_draws_follow(out.ids, probs)
    assert torch.allclose(out.log_q.double(), probs.double().gather(1, out.ids).log(), atol=1e-4)
    fp32 = genni_log_probs(queries, items, ex, 1.0).exp()
    tv = 0.5 * (probs.double() - fp32).abs().sum(1)
    assert float(tv.max()) < 0.02, tv  # bf16 rounds the logits by about 2^-8 relative


def test_never_draws_padding_history_or_positive_even_when_they_dominate():
    items = torch.zeros(N + 1, D)
    items[:, 0] = -5.0
    items[[0, 1, 2, 3], 0] = 50.0  # padding, history and positive would win every draw
    queries = torch.ones(2, D)
    ex = Exclusions(torch.tensor([[1, 2, 31]]), torch.tensor([0, 0]), torch.tensor([3, 3]), N)
    out = GumbelExactSampler().sample(queries, items, ex, 500, torch.Generator().manual_seed(0))
    assert not bool(ex.contains(out.ids).any())
    assert torch.allclose(out.log_q, torch.full_like(out.log_q, -torch.log(torch.tensor(27.0))))


def test_same_seed_same_draws(problem):
    queries, items, ex = problem
    sampler = GumbelExactSampler(chunk_elements=6 * 5)
    a = sampler.sample(queries, items, ex, 7, torch.Generator().manual_seed(11))
    b = sampler.sample(queries, items, ex, 7, torch.Generator().manual_seed(11))
    c = sampler.sample(queries, items, ex, 7, torch.Generator().manual_seed(12))
    assert torch.equal(a.ids, b.ids) and torch.equal(a.log_q, b.log_q)
    assert not torch.equal(a.ids, c.ids)


def test_user_who_saw_everything_gets_a_clear_error():
    history = torch.arange(1, N + 1)[None]
    ex = Exclusions(history, torch.tensor([0]), torch.tensor([1]), N)
    with pytest.raises(SamplerError, match="interacted with all 30 items"):
        GumbelExactSampler().sample(
            torch.ones(1, D), torch.ones(N + 1, D), ex, 1, torch.Generator()
        )


def test_bad_settings_are_rejected():
    with pytest.raises(SamplerError, match="unknown matmul precision 'fp16'.*bf16"):
        GumbelExactSampler(precision="fp16")
    with pytest.raises(SamplerError, match="chunk_elements=0 must be positive"):
        GumbelExactSampler(chunk_elements=0)


def test_matmul_precision_restores_the_tf32_flag():
    before = torch.backends.cuda.matmul.allow_tf32
    with matmul_precision("tf32"):
        assert torch.backends.cuda.matmul.allow_tf32
    with matmul_precision("fp32"):
        assert not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cuda_draws_follow_the_proposal(problem, precision):
    queries, items, ex = problem
    ex_cuda = Exclusions(ex.history.cuda(), ex.row.cuda(), ex.positives.cuda(), N)
    sampler = GumbelExactSampler(alpha=1.5, precision=precision)
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = sampler.sample(queries.cuda(), items.cuda(), ex_cuda, 20000, generator)
    assert out.ids.is_cuda and not bool(ex_cuda.contains(out.ids).any())
    probs = sampler.probabilities(queries.cuda(), items.cuda(), ex_cuda).cpu()
    assert_draws_follow(out.ids.cpu(), probs)
    assert torch.allclose(
        out.log_q.double().cpu(), probs.double().gather(1, out.ids.cpu()).log(), atol=1e-3
    )
    exact = genni_log_probs(queries, items, ex, 1.5).exp()
    assert float(0.5 * (probs.double() - exact).abs().sum(1).max()) < 0.02


def test_registered_as_a_sampler_name():
    from annsample.config import load_config
    from annsample.samplers import build_sampler

    config = load_config(
        None, ("sampler.name=exact_gumbel", "sampler.matmul_precision=bf16", "sampler.alpha=2")
    )
    sampler = build_sampler(config.sampler)
    assert isinstance(sampler, GumbelExactSampler)
    assert sampler.precision == "bf16" and sampler.alpha == 2.0
