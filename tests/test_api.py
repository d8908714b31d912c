"""The public plug-in API (annsample.api): validation, distribution, checkpoints, the step hook."""

from __future__ import annotations

import ast
import doctest
import re

import numpy as np
import pytest
import torch
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

import annsample
from annsample import api
from annsample.api import (
    NegativeSampler,
    RefreshPolicy,
    normalize_histories,
    sample_negatives,
    sampled_logits,
    sampled_loss,
)
from annsample.errors import ConfigError, SamplerError
from annsample.losses import (
    bce_loss,
    corrected_logq_loss,
    gbce_loss,
    sampled_softmax_loss,
    scaled_ce_loss,
)
from annsample.samplers import ExactSampler, Exclusions, UniformSampler

N, D = 120, 8


def item_table(seed: int = 0) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.randn(N + 1, D, generator=torch.Generator().manual_seed(seed)))


def small_sampler(items=None, **kwargs) -> NegativeSampler:
    settings_ = {"candidates": 20, "nlist": 4, "nprobe": 2, "seed": 0, **kwargs}
    return NegativeSampler(item_table() if items is None else items, **settings_)


def batch(seed: int = 1, B: int = 4, T: int = 5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g)
    positives = torch.randint(1, N + 1, (B, T), generator=g)
    positives[0, :2] = 0  # left padding on one row
    histories = torch.randint(0, N + 1, (B, 7), generator=g)  # unsorted, repeats, 0 = padding
    return hidden, positives, histories


# --------------------------------------------------------------------------- public surface


def test_the_api_is_importable_from_the_package():
    assert annsample.NegativeSampler is NegativeSampler
    assert annsample.sampled_loss is sampled_loss
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        annsample.NoSuchThing  # noqa: B018


def test_the_api_takes_tensors_not_models_or_the_trainer():
    tree = ast.parse((REPO / "annsample" / "api.py").read_text(encoding="utf-8"))
    imported = {
        alias.name if isinstance(node, ast.Import) else node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert "annsample.samplers" in imported  # the scan sees the real imports
    forbidden = ("annsample.train", "annsample.model", "torch.nn", "cli")
    assert not [m for m in imported if m and m.startswith(forbidden)]


def test_docstring_examples_run():
    result = doctest.testmod(api, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10 and result.failed == 0


def test_the_readme_snippet_runs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Plug it into your model", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert namespace["stats"]["index/version"] == 0 and namespace["step"] == 2
    assert torch.isfinite(namespace["loss"])


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h, p, s: (h[0, 0], p, s), r"\(B, T, d\) or \(B, d\) tensor"),
        (lambda h, p, s: (h.long(), p, s), "floating point"),
        (lambda h, p, s: (h[..., :3], p, s), "d = 3 but the item vectors have d = 8"),
        (lambda h, p, s: (h, p.float(), s), "integer item ids"),
        (lambda h, p, s: (h, p[:, :2], s), r"must be hidden.shape\[:-1\]"),
        (lambda h, p, s: (h, p + N, s), r"must lie in 0..120 .*1-based"),
        (lambda h, p, s: (h, p - 1, s), r"must lie in 0..120"),
        (lambda h, p, s: (h[:, -1], p[:, -1] * 0, s), r"positives holds ids 0..0 .* 1..120"),
        (lambda h, p, s: (h.index_fill(1, torch.tensor([4]), float("nan")), p, s), "NaN or inf"),
        (lambda h, p, s: (h, p, s + N), r"histories holds ids .* must lie in 0..120"),
        (lambda h, p, s: (h, p, s[:2]), r"padded histories must be \(B, H\) = \(4, H\)"),
        (lambda h, p, s: (h, p, s.double()), "integer item ids"),
        (lambda h, p, s: (h, p, (torch.tensor([0, 1, 2]), torch.tensor([1, 2]))), "B\\+1 = 5"),
        (
            lambda h, p, s: (h, p, (torch.tensor([0, 1, 1, 3, 2]), torch.tensor([1, 2]))),
            "never decrease and end at len",
        ),
        (lambda h, p, s: (h, p, (torch.tensor([0, 1, 1, 1, 1]), torch.tensor([0]))), "1..120"),
    ],
)
def test_bad_input_is_one_clear_error(change, message):
    with small_sampler() as sampler:
        hidden, positives, histories = change(*batch())
        with pytest.raises(SamplerError, match=message):
            sampler.sample(hidden, positives, histories)


def test_bad_construction_is_one_clear_error():
    with pytest.raises(SamplerError, match="unknown sampler 'genni'; choose one of uniform"):
        NegativeSampler(item_table(), sampler="genni")
    with pytest.raises(SamplerError, match="candidates=500 is more than the catalog's 120"):
        NegativeSampler(item_table(), candidates=500)
    with pytest.raises(SamplerError, match="2-D \\(N\\+1, d\\) float tensor"):
        NegativeSampler(torch.randn(N + 1))
    with pytest.raises(SamplerError, match="callable returning it, got list"):
        NegativeSampler([[0.0]])
    with pytest.raises(SamplerError, match="num_negatives must be a positive integer"):
        NegativeSampler(item_table(), num_negatives=0)
    with pytest.raises(SamplerError, match="needs popularity="):
        NegativeSampler(item_table(), sampler="popularity")
    with pytest.raises(ConfigError, match="unknown refresh schedule 'hourly'"):
        RefreshPolicy(schedule="hourly")
    with pytest.raises(ConfigError, match="EveryNSteps n must be an integer >= 1"):
        RefreshPolicy(every=0)
    with pytest.raises(ConfigError, match="Adaptive needs drift_threshold or recall_threshold"):
        RefreshPolicy(schedule="adaptive")


def test_a_nan_table_is_never_indexed():
    items = item_table()
    with small_sampler(items, refresh=RefreshPolicy(every=1)) as sampler:
        with torch.no_grad():
            items[5, 0] = float("nan")
        with pytest.raises(SamplerError, match="NaN or inf at step 1, so the index is not built"):
            sampler.step()


def test_loss_helpers_match_the_losses_module_and_check_shapes():
    g = torch.Generator().manual_seed(0)
    pos, neg, log_q = torch.randn(6, generator=g), torch.randn(6, 3, generator=g), -torch.rand(6, 3)
    assert torch.equal(sampled_loss("bce", pos, neg), bce_loss(pos, neg))
    assert torch.equal(sampled_loss("gbce", pos, neg, n_items=N), gbce_loss(pos, neg, N))
    assert torch.equal(
        sampled_loss("sampled_softmax", pos, neg, log_q), sampled_softmax_loss(pos, neg, log_q)
    )
    with pytest.raises(SamplerError, match="unknown loss 'ce'; choose one of bce"):
        sampled_loss("ce", pos, neg)
    with pytest.raises(SamplerError, match="gbce needs n_items"):
        sampled_loss("gbce", pos, neg)
    with pytest.raises(SamplerError, match=r"log_q has shape \(6, 2\)"):
        sampled_loss("sampled_softmax", pos, neg, log_q[:, :2])
    with pytest.raises(SamplerError, match="negative_vectors \\(P, k, d\\)"):
        sampled_logits(torch.randn(6, D), torch.randn(6, D), torch.randn(6, D))


def test_loss_helpers_take_the_new_losses_and_refuse_what_they_cannot_compute():
    g = torch.Generator().manual_seed(0)
    pos, neg, log_q = torch.randn(6, generator=g), torch.randn(6, 3, generator=g), -torch.rand(6, 3)
    assert torch.equal(
        sampled_loss("scaled_ce", pos, neg, sce_scale=500.0), scaled_ce_loss(pos, neg, 500.0)
    )
    assert torch.equal(sampled_loss("scaled_ce", pos, neg), scaled_ce_loss(pos, neg, 100.0))
    assert torch.equal(
        sampled_loss("sampled_softmax", pos, neg, log_q, corrected_logq=True),
        corrected_logq_loss(pos, neg, log_q),
    )
    with pytest.raises(SamplerError, match="corrected_logq=True needs log_q"):
        sampled_loss("sampled_softmax", pos, neg, corrected_logq=True)
    with pytest.raises(SamplerError, match="loss 'bce' has none"):
        sampled_loss("bce", pos, neg, log_q, corrected_logq=True)
    with pytest.raises(SamplerError, match="scaled_ce needs sce_scale > 0"):
        sampled_loss("scaled_ce", pos, neg, sce_scale=0.0)


# --------------------------------------------------------------------------- histories


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(1, 9), max_size=6), min_size=1, max_size=5))
def test_histories_are_normalised_the_same_from_padded_and_csr(rows):
    n_items = 9
    width = max(len(r) for r in rows)
    padded = torch.tensor([r + [0] * (width - len(r)) for r in rows], dtype=torch.int64)
    padded = padded.reshape(len(rows), width)
    indptr = torch.tensor(np.cumsum([0, *map(len, rows)]))
    items = torch.tensor([i for r in rows for i in r], dtype=torch.int64)
    from_padded = normalize_histories(padded, len(rows), n_items)
    from_csr = normalize_histories((indptr, items), len(rows), n_items)
    assert torch.equal(from_padded, from_csr)
    for row, out in zip(rows, from_padded.tolist(), strict=True):
        expected = sorted(set(row))
        assert out == expected + [n_items + 1] * (len(out) - len(expected))


def test_unsorted_repeated_histories_draw_what_sorted_ones_draw():
    hidden, positives, histories = batch()
    tidy = [sorted(set(r) - {0}) for r in histories.tolist()]
    width = max(map(len, tidy))
    tidy = torch.tensor([r + [0] * (width - len(r)) for r in tidy])
    draws = []
    for h in (histories, tidy, histories.flip(1)):
        with small_sampler() as sampler:
            draws.append(sampler.sample(hidden, positives, h, k=16))
    for other in draws[1:]:
        assert torch.equal(draws[0].ids, other.ids) and torch.equal(draws[0].log_q, other.log_q)


@pytest.mark.parametrize(
    "name", ["ann", "uniform", "exact", "pool", "dns", "in_batch", "mixed", "tron"]
)
def test_excluded_items_are_never_drawn(name):
    hidden, positives, histories = batch()
    batch_sizes = {"in_batch_negatives": 10, "uniform_candidates": 200}
    with small_sampler(sampler=name, pool_size=40, **batch_sizes) as sampler:
        out = sampler.sample(hidden, positives, histories, k=30)
    mask = positives > 0
    assert tuple(out.ids.shape) == (int(mask.sum()), 30) and torch.equal(out.mask, mask)
    assert torch.equal(out.positives, positives[mask])
    row = mask.nonzero()[:, 0]
    for p in range(out.ids.shape[0]):
        banned = set(histories[row[p]].tolist()) | {0, int(out.positives[p])}
        assert not banned & set(out.ids[p].tolist())
    assert bool(((out.ids >= 1) & (out.ids <= N)).all())


def test_the_functional_form_is_the_trainers_old_glue():
    """sample_negatives draws exactly what train.py drew before it went through the API."""
    hidden, positives, histories = batch()
    hidden[0, :2] = 0.0  # padding positions of a left-padded row
    table = item_table().detach()
    tidy = normalize_histories(histories, 4, N)
    mask = positives > 0
    for sampler in (UniformSampler(), ExactSampler(alpha=1.0)):
        got = sample_negatives(
            sampler, hidden, positives, table, 3, torch.Generator().manual_seed(5), histories
        )
        exclusions = Exclusions(tidy, mask.nonzero()[:, 0], positives[mask], N)
        expected = sampler.sample(
            hidden[mask], table, exclusions, 3, torch.Generator().manual_seed(5), hidden[:, -1]
        )
        assert torch.equal(got.ids, expected.ids) and torch.equal(got.log_q, expected.log_q)


# --------------------------------------------------------------------------- distribution


@pytest.mark.parametrize("tail_samples", [0, 32])
def test_draws_follow_the_probabilities_the_sampler_reports(tail_samples):
    """Empirical frequencies of many draws for one position match q, and log q is q's log."""
    hidden = torch.randn(1, D, generator=torch.Generator().manual_seed(3))
    positives = torch.tensor([7])
    history = torch.tensor([[3, 9, 3]])
    n_draws = 40_000
    with small_sampler(epsilon=0.1, tail_samples=tail_samples, nprobe=4) as sampler:
        state = sampler.generator.get_state()
        out = sampler.sample(hidden, positives, history, k=n_draws)
        table = sampler.item_table()
        exclusions = Exclusions(normalize_histories(history, 1, N), torch.tensor([0]), positives, N)
        # the draws follow the proposal given this call's tail draw (the generator's state)
        generator = torch.Generator().set_state(state)
        q = sampler.core.probabilities(hidden, table, exclusions, generator=generator)[0].double()
        marginal = sampler.core.marginal_probabilities(hidden, table, exclusions, draws=400)[0]
    counts = torch.bincount(out.ids[0], minlength=N + 1).double() / n_draws
    assert float(q[[0, 3, 7, 9]].sum()) == 0.0 and float(counts[[0, 3, 7, 9]].sum()) == 0.0
    assert float(0.5 * (counts - q).abs().sum()) < 0.03
    reported = out.log_q[0].double().exp()
    if tail_samples:
        # log q reports the proposal averaged over tail draws (to first order), not this draw's
        assert torch.allclose(reported, marginal.double()[out.ids[0]], rtol=0.25, atol=1e-4)
    else:
        assert torch.allclose(reported, q[out.ids[0]], rtol=1e-4)


# --------------------------------------------------------------------------- the step hook


def test_the_step_hook_refreshes_on_schedule():
    items = item_table()
    policy = RefreshPolicy(every=3, retrain_every=2)
    with small_sampler(items, refresh=policy) as sampler:
        kinds, versions, stale = [], [], []
        for _ in range(7):
            with torch.no_grad():
                items.add_(0.01)
            stats = sampler.step()
            kinds.append(stats["index/refresh"])
            versions.append(stats["index/version"])
            stale.append(stats["index/staleness_steps"])
    assert kinds == [None, None, "re_add", None, None, "retrain", None]
    assert versions == [0, 0, 3, 3, 3, 6, 6] and stale == [1, 2, 0, 1, 2, 0, 1]
    assert stats["index/re_add_count"] == 1 and stats["index/retrain_count"] == 1


def test_the_index_follows_the_table_only_when_refreshed():
    items = item_table()
    probes = torch.randn(16, D, generator=torch.Generator().manual_seed(4))
    with small_sampler(items, nprobe=4, refresh=RefreshPolicy(every=2)) as sampler:
        assert sampler.staleness(probes)["index/recall@k"] == 1.0  # nprobe = nlist: exact
        with torch.no_grad():
            items.copy_(item_table(seed=9))
        sampler.step()
        stale = sampler.staleness(probes)["index/recall@k"]
        sampler.step()
        fresh = sampler.staleness(probes)["index/recall@k"]
    assert stale < 0.5 and fresh == 1.0


def test_asynchronous_and_epoch_policies():
    items = item_table()
    with small_sampler(items, refresh=RefreshPolicy(every=2, asynchronous=True)) as sampler:
        for _ in range(4):
            sampler.step()
        sampler.wait()
        assert sampler.stats()["index/version"] == 4
        assert sampler.stats()["index/refresh_count"] >= 1  # the step-2 one may be superseded
    with small_sampler(items, refresh=RefreshPolicy(schedule="epoch")) as sampler:
        assert [sampler.step()["index/refresh"] for _ in range(3)] == [None] * 3
        end = sampler.step(epoch_end=True)
        assert end["index/refresh"] == "re_add" and end["index/version"] == 3
        assert sampler.step_count == 3


def test_the_adaptive_policy_refreshes_when_the_table_drifts():
    items = item_table()
    policy = RefreshPolicy(schedule="adaptive", drift_threshold=0.5, check_every=2)
    with small_sampler(items, refresh=policy) as sampler:
        assert sampler.step()["index/refresh"] is None
        quiet = sampler.step()
        with torch.no_grad():
            items.mul_(3.0)  # relative drift 2.0
        sampler.step()
        moved = sampler.step()
    assert quiet["index/refresh"] is None and quiet["index/drift"] == 0.0
    assert moved["index/refresh"] == "re_add" and moved["index/drift"] == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("policy", "fresh", "stale_kind", "missing_probes"),
    [
        # adaptive: refresh only when recall drops
        (
            RefreshPolicy(schedule="adaptive", recall_threshold=0.9, check_every=1),
            None,
            "re_add",
            r"pass step\(probe_queries=...\)",
        ),
        # steps with retrain_below: refresh every step, a retrain when recall is low
        (
            RefreshPolicy(every=1, retrain_every=0, retrain_below=0.9),
            "re_add",
            "retrain",
            r"RefreshPolicy\(retrain_below=...\)",
        ),
    ],
    ids=["adaptive", "retrain_below"],
)
def test_a_policy_reading_probe_recall_acts_when_it_drops(
    policy, fresh, stale_kind, missing_probes
):
    items = item_table()
    probes = torch.randn(16, D, generator=torch.Generator().manual_seed(4))
    with small_sampler(items, nprobe=4, refresh=policy) as sampler:
        assert sampler.step(probe_queries=probes)["index/refresh"] == fresh  # recall 1.0
        with torch.no_grad():
            items.copy_(item_table(seed=9))
        stale = sampler.step(probe_queries=probes)
        assert stale["index/refresh"] == stale_kind and stale["index/recall"] < 0.9
        with pytest.raises(SamplerError, match=missing_probes):
            sampler.step()


def test_an_item_tower_is_re_encoded_at_every_refresh():
    tower = torch.nn.Linear(4, D)
    features = torch.randn(N + 1, 4)
    calls = []

    def encode() -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return tower(features)

    hidden, positives, histories = batch()
    with small_sampler(encode, refresh=RefreshPolicy(every=2)) as sampler:
        first = sampler.item_table().clone()
        with torch.no_grad():
            tower.weight.add_(1.0)
        sampler.step()
        assert len(calls) == 1 and torch.equal(sampler.item_table(), first)  # not yet refreshed
        stats = sampler.step()
        assert calls == [False, False] and stats["index/refresh"] == "re_add"
        assert torch.allclose(sampler.item_table(), tower(features).detach())
        assert stats["index/encode_seconds"] > 0.0
        out = sampler.sample(hidden, positives, histories, k=2)
        assert not out.ids.requires_grad and tuple(out.ids.shape) == (18, 2)
        features = torch.randn(N, 4)  # the catalog shrank: a clear error at the next refresh
        sampler.step()
        with pytest.raises(SamplerError, match=r"returned \(120, 8\) but returned \(121, 8\)"):
            sampler.step()


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("asynchronous", [False, True])
def test_state_dict_round_trip_resumes_exactly(asynchronous):
    hidden, positives, histories = batch()
    policy = RefreshPolicy(every=3, retrain_every=2, asynchronous=asynchronous)
    items = item_table()
    with small_sampler(items, refresh=policy, tail_samples=8) as first:
        for _ in range(7):
            with torch.no_grad():
                items.add_(0.05)
            first.sample(hidden, positives, histories, k=4)
            first.step()
        first.wait()
        state = first.state_dict()
        expected = first.sample(hidden, positives, histories, k=4)
        expected_stats = first.step()
    with small_sampler(items, refresh=policy, tail_samples=8, seed=11) as second:
        second.load_state_dict(state)
        got = second.sample(hidden, positives, histories, k=4)
        got_stats = second.step()
    assert torch.equal(got.ids, expected.ids) and torch.equal(got.log_q, expected.log_q)
    for key in ("step", "index/version", "index/refresh_count", "index/retrain_count"):
        assert got_stats[key] == expected_stats[key]


def test_state_from_another_sampler_is_refused():
    with small_sampler() as sampler:
        state = sampler.state_dict()
    with (
        small_sampler(refresh=RefreshPolicy(every=7)) as other,
        pytest.raises(SamplerError, match="build the NegativeSampler with the settings"),
    ):
        other.load_state_dict(state)


def test_in_batch_samplers_draw_from_the_batch_positives_through_the_api():
    hidden, positives, histories = batch()
    real = set(positives[positives > 0].tolist())
    with small_sampler(sampler="in_batch") as sampler:
        out = sampler.sample(hidden, positives, histories, k=50)
    assert set(out.ids.flatten().tolist()) <= real
    with small_sampler(sampler="mixed", in_batch_negatives=20) as sampler:
        out = sampler.sample(hidden, positives, histories, k=50)
        assert set(out.ids[:, :20].flatten().tolist()) <= real
        with pytest.raises(SamplerError, match="k must exceed 20"):
            sampler.sample(hidden, positives, histories, k=20)
