"""ItemIndex against the exact reference: exactness at nprobe == nlist, monotone recall, refresh
invariance, -1 padding, true inner-product scores, validation messages, state round trips."""

from __future__ import annotations

import io
import logging
import threading

import pytest
import torch
from conftest import D_MODEL, gaussian_mixture, with_bad_rows

from annsample.errors import ItemIndexError
from annsample.index import ItemIndex, exact_topk, recall_at_k


def hub_norms(n: int, d: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Popularity-like embeddings: 2% 'hub' items have 5x the norm of the rest. Returns (xb, xq)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(40, d, generator=g), dim=1)

    def directions(m: int) -> torch.Tensor:
        noisy = (
            centres[torch.randint(0, 40, (m,), generator=g)]
            + 1.5 * torch.randn(m, d, generator=g) / d**0.5
        )
        return torch.nn.functional.normalize(noisy, dim=1)

    hub = torch.rand(n, 1, generator=g) < 0.02
    norms = torch.where(hub, 5.0, 1.0) * torch.exp(0.1 * torch.randn(n, 1, generator=g))
    return directions(n) * norms, directions(300)


def faiss_index(metric: str = "ip", nlist: int = 32, nprobe: int = 4, **kwargs) -> ItemIndex:
    return ItemIndex(D_MODEL, nlist=nlist, nprobe=nprobe, backend="faiss", metric=metric, **kwargs)


# ----------------------------------------------------------------------------- IVF behaviour


@pytest.mark.parametrize("metric", ["ip", "l2_augmented", "cosine"])
def test_nprobe_equal_nlist_is_exact(metric, mixture, queries):
    index = faiss_index(metric, nlist=32, nprobe=32).build(mixture, ids=torch.arange(len(mixture)))
    D, I = index.search(queries, 10)
    if metric == "cosine":
        scores = queries @ torch.nn.functional.normalize(mixture, dim=1).T
        I_ref = scores.topk(10, dim=1).indices
        assert recall_at_k(I, I_ref) == 1.0
    else:
        D_ref, I_ref = exact_topk(queries, mixture, 10)
        assert torch.equal(I, I_ref)
        torch.testing.assert_close(D, D_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("metric", ["ip", "l2_augmented", "cosine"])
def test_scores_are_true_inner_products_sorted_descending(metric, queries):
    # Widely varying norms, where cosine and augmented scores would differ from xq · x.
    xb = gaussian_mixture(3000) * torch.linspace(0.1, 5, 3000)[:, None]
    index = faiss_index(metric, nprobe=8).build(xb, ids=torch.arange(len(xb)))
    D, I = index.search(queries, 20)
    assert (I >= 0).all()
    torch.testing.assert_close(D, (queries[:, None, :] * xb[I]).sum(-1), rtol=1e-4, atol=1e-3)
    assert (D[:, :-1] >= D[:, 1:]).all()


@pytest.mark.parametrize("metric", ["ip", "l2_augmented"])
def test_recall_never_drops_as_nprobe_grows(metric, mixture, queries):
    _, I_exact = exact_topk(queries, mixture, 20)
    index = faiss_index(metric, nlist=32).build(mixture, ids=torch.arange(len(mixture)))
    recalls = []
    for nprobe in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
        index.nprobe = nprobe
        recalls.append(recall_at_k(index.search(queries, 20)[1], I_exact))
    assert recalls == sorted(recalls), recalls
    assert recalls[0] < 0.9 and recalls[-1] == 1.0  # the sweep spans something


def test_l2_augmented_beats_plain_ip_when_a_few_items_have_large_norms():
    # Plain IVF-IP assigns and probes by direction, so hub items a query should reach through
    # their norm sit in lists it never probes. The MIPS -> L2 augmentation puts them in their own
    # lists. (With log-normal norms and tight direction clusters plain ip can win instead, which is
    # why the benchmark reports recall for the metric in use.)
    xb, xq = hub_norms(10000)
    _, I_exact = exact_topk(xq, xb, 20)
    recall = {}
    for metric in ("ip", "l2_augmented"):
        index = ItemIndex(32, nlist=64, nprobe=8, backend="faiss", metric=metric).build(
            xb, ids=torch.arange(len(xb))
        )
        recall[metric] = recall_at_k(index.search(xq, 20)[1], I_exact)
    assert recall["l2_augmented"] >= recall["ip"], recall


def test_re_add_with_unchanged_embeddings_reproduces_search_exactly(mixture, queries):
    index = faiss_index(nprobe=3).build(mixture, ids=torch.arange(len(mixture)), step=5)
    D0, I0 = index.search(queries, 15)
    centroids = index.centroids
    index.re_add(mixture, step=9)
    D1, I1 = index.search(queries, 15)
    assert index.version == 9 and index.ntotal == mixture.shape[0]
    assert torch.equal(index.centroids, centroids)
    assert torch.equal(I0, I1) and torch.equal(D0, D1)
    # A fresh index given the same centroids and the same embeddings answers identically.
    fresh = faiss_index(nprobe=3)
    fresh.load_state_dict(index.state_dict(with_vectors=False))
    assert fresh.ntotal == 0
    fresh.re_add(mixture, step=9)
    D2, I2 = fresh.search(queries, 15)
    assert torch.equal(I0, I2) and torch.equal(D0, D2)


@pytest.mark.parametrize("backend", ["faiss", "torch_ivf"])
@pytest.mark.parametrize("metric", ["ip", "l2_augmented"])
def test_re_add_assigns_only_the_rows_that_changed_and_equals_a_full_re_add(
    backend, metric, mixture, queries
):
    index = ItemIndex(D_MODEL, nlist=32, nprobe=4, backend=backend, metric=metric)
    index.build(mixture, ids=torch.arange(len(mixture)), step=0)
    g = torch.Generator().manual_seed(5)
    moved = mixture.clone()
    rows = torch.randperm(len(mixture), generator=g)[:150]
    moved[rows] += 0.5 * torch.randn(len(rows), D_MODEL, generator=g)
    moved[rows[:10]] = mixture[torch.randint(0, len(mixture), (10,), generator=g)]  # new clusters
    index.re_add(moved, step=1)
    assert index.last_reassigned == 150
    # the same centroids and embeddings, every row assigned afresh
    full = ItemIndex(D_MODEL, nlist=32, nprobe=4, backend=backend, metric=metric)
    full.load_state_dict(index.state_dict(with_vectors=False))
    full.re_add(moved, step=1)
    assert full.last_reassigned == len(mixture)
    assert torch.equal(index.contents.assignment(), full.contents.assignment())
    D, I = index.search(queries, 15)
    D_full, I_full = full.search(queries, 15)
    assert torch.equal(I, I_full) and torch.equal(D, D_full)
    index.re_add(moved, step=2)  # nothing moved since
    assert index.last_reassigned == 0
    assert torch.equal(index.search(queries, 15)[1], I_full)


def test_re_add_follows_moved_embeddings(mixture, queries):
    index = faiss_index(nprobe=32).build(mixture, ids=torch.arange(len(mixture)))
    moved = mixture.flip(0)  # same vectors, different items
    index.re_add(moved, step=1)
    assert torch.equal(index.search(queries, 5)[1], exact_topk(queries, moved, 5)[1])


@pytest.mark.parametrize("metric", ["ip", "l2_augmented", "cosine"])
@pytest.mark.parametrize("drift", [0.2, 0.5])
def test_re_add_on_drifting_embeddings_never_does_worse_than_no_refresh(metric, drift, queries):
    # Every row moves by noise of `drift` times its norm and a few rows grow (popular items do):
    # under l2_augmented a re-add that recomputed M moved every row's extra coordinate away from
    # the centroids', and one list swallowed most rows (recall below the stale index's).
    xb = gaussian_mixture(6000, seed=3)
    g = torch.Generator().manual_seed(11)
    moved = xb + drift * xb.norm(dim=1, keepdim=True) / D_MODEL**0.5 * torch.randn(
        xb.shape, generator=g
    )
    moved[:12] *= 1 + 3 * drift
    _, I_moved = exact_topk(queries, moved, 50)
    index = faiss_index(metric, nlist=48, nprobe=4).build(xb, ids=torch.arange(len(xb)))
    largest_built = int(index.list_sizes().max())
    stale = recall_at_k(index.search(queries, 50)[1], I_moved)
    index.re_add(moved, step=1)
    refreshed = recall_at_k(index.search(queries, 50)[1], I_moved)
    assert refreshed >= stale, (stale, refreshed)
    assert int(index.list_sizes().max()) <= 2 * largest_built


def test_l2_augmented_re_add_keeps_the_centroids_augmentation_and_retrain_renews_it(queries):
    xb = gaussian_mixture(4000, seed=3)
    index = faiss_index("l2_augmented", nlist=32, nprobe=32).build(xb, ids=torch.arange(len(xb)))
    built_norm = index.state_dict(with_vectors=False)["max_norm"]
    assert built_norm == pytest.approx(float(xb.norm(dim=1).max()), rel=1e-5)
    grown = xb * 2.0
    index.re_add(grown, step=1)
    assert index.state_dict(with_vectors=False)["max_norm"] == built_norm
    # nprobe == nlist: still exact, whatever M is (rows past M just get extra coordinate 0)
    assert torch.equal(index.search(queries, 10)[1], exact_topk(queries, grown, 10)[1])
    index.retrain(grown, step=2)
    assert index.state_dict(with_vectors=False)["max_norm"] == pytest.approx(
        2 * built_norm, rel=1e-5
    )


def test_retrain_changes_centroids_and_keeps_recall(mixture, queries):
    index = faiss_index(nprobe=4).build(mixture, ids=torch.arange(len(mixture)))
    _, I_exact = exact_topk(queries, mixture, 20)
    recall_built = recall_at_k(index.search(queries, 20)[1], I_exact)
    centroids = index.centroids
    g = torch.Generator().manual_seed(7)
    moved = mixture + 0.3 * torch.randn(mixture.shape, generator=g)
    _, I_moved = exact_topk(queries, moved, 20)
    index.retrain(moved, step=100)
    assert index.version == 100
    assert not torch.allclose(index.centroids, centroids)
    recall_retrained = recall_at_k(index.search(queries, 20)[1], I_moved)
    assert recall_retrained >= recall_built - 0.05, (recall_built, recall_retrained)


def test_build_is_deterministic_under_a_seed(mixture):
    a = (
        faiss_index(seed=3, max_train_points=1000)
        .build(mixture, ids=torch.arange(len(mixture)))
        .centroids
    )
    b = (
        faiss_index(seed=3, max_train_points=1000)
        .build(mixture, ids=torch.arange(len(mixture)))
        .centroids
    )
    c = (
        faiss_index(seed=4, max_train_points=1000)
        .build(mixture, ids=torch.arange(len(mixture)))
        .centroids
    )
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_short_lists_pad_with_minus_one_and_minus_inf():
    xb = gaussian_mixture(40, clusters=8, spread=0.05)
    index = ItemIndex(D_MODEL, nlist=8, nprobe=1, backend="faiss").build(
        xb, ids=torch.arange(100, 140)
    )
    D, I = index.search(xb[:5], 30)  # one list of ~5 items cannot fill k=30
    missing = I == -1
    assert missing.any()
    assert torch.equal(torch.isinf(D) & (D < 0), missing)
    # Missing results trail the real ones, and real ones are the caller's ids.
    assert torch.equal(missing, missing.cummax(dim=1).values)
    assert ((I[~missing] >= 100) & (I[~missing] < 140)).all()


def test_custom_ids_are_returned(mixture, queries):
    ids = torch.randperm(mixture.shape[0], generator=torch.Generator().manual_seed(0)) * 3 + 11
    index = faiss_index(nprobe=32).build(mixture, ids=ids)
    _, I_ref = exact_topk(queries, mixture, 5)
    assert torch.equal(index.search(queries, 5)[1], ids[I_ref])


def test_exact_backend_matches_reference(mixture, queries):
    index = ItemIndex(D_MODEL, backend="exact").build(
        mixture, ids=torch.arange(len(mixture)), step=2
    )
    assert index.backend == "exact" and index.centroids is None
    D, I = index.search(queries, 10)
    D_ref, I_ref = exact_topk(queries, mixture, 10)
    assert torch.equal(I, I_ref)
    torch.testing.assert_close(D, D_ref)
    # It keeps a copy: training may update the caller's table in place.
    table = mixture.clone()
    index.build(table, ids=torch.arange(len(table)))
    table.mul_(-1)
    assert torch.equal(index.search(queries, 10)[1], I_ref)


def test_auto_backend_resolves_to_faiss_on_cpu(mixture):
    index = ItemIndex(D_MODEL, nlist=16, nprobe=4, backend="auto")
    assert index.backend == "auto"
    index.build(mixture, ids=torch.arange(len(mixture)))
    assert index.backend == "faiss"


def test_concurrent_searches_agree_with_sequential(mixture, queries):
    index = faiss_index(nprobe=6).build(mixture, ids=torch.arange(len(mixture)))
    expected = index.search(queries, 10)
    results, errors = [], []

    def search_many():
        try:
            for _ in range(5):
                results.append(index.search(queries, 10))
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=search_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 20
    for D, I in results:
        assert torch.equal(I, expected[1]) and torch.equal(D, expected[0])


def test_max_train_points_subsamples(mixture, caplog):
    # 40 points per centroid: enough for FAISS's advice, a tenth of the data.
    with caplog.at_level(logging.WARNING, logger="annsample.index"):
        index = faiss_index(nlist=10, max_train_points=400, nprobe=10).build(
            mixture, ids=torch.arange(len(mixture))
        )
    assert not caplog.records
    assert index.ntotal == mixture.shape[0]


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("metric", ["ip", "l2_augmented", "cosine"])
def test_state_dict_round_trip_gives_identical_results(metric, mixture, queries):
    index = faiss_index(metric, nprobe=5).build(
        mixture, ids=torch.arange(mixture.shape[0]) + 1, step=42
    )
    buffer = io.BytesIO()
    torch.save(index.state_dict(), buffer)  # plain tensors and values: no FAISS objects pickled
    buffer.seek(0)
    restored = ItemIndex.from_state_dict(torch.load(buffer, weights_only=True))
    assert restored.version == 42 and restored.nprobe == 5 and restored.metric == metric
    assert torch.equal(restored.centroids, index.centroids)
    D0, I0 = index.search(queries, 12)
    D1, I1 = restored.search(queries, 12)
    assert torch.equal(I0, I1) and torch.equal(D0, D1)


def test_state_dict_of_exact_backend_round_trips(mixture, queries):
    index = ItemIndex(D_MODEL, backend="exact", metric="cosine").build(
        mixture, ids=torch.arange(len(mixture)), step=3
    )
    restored = ItemIndex.from_state_dict(index.state_dict())
    assert restored.backend == "exact" and restored.version == 3
    assert torch.equal(restored.search(queries, 8)[1], index.search(queries, 8)[1])


def test_load_state_dict_rejects_mismatched_settings(mixture):
    state = (
        faiss_index(nlist=32)
        .build(mixture, ids=torch.arange(len(mixture)))
        .state_dict(with_vectors=False)
    )
    with pytest.raises(ItemIndexError, match=r"nlist=32 but this index has nlist=16"):
        faiss_index(nlist=16).load_state_dict(state)
    with pytest.raises(ItemIndexError, match="not an ItemIndex state_dict"):
        faiss_index().load_state_dict({"weights": 1})
    exact_state = (
        ItemIndex(D_MODEL, nlist=32, backend="exact")
        .build(mixture, ids=torch.arange(len(mixture)))
        .state_dict()
    )
    with pytest.raises(ItemIndexError, match="has no centroids"):
        faiss_index().load_state_dict(exact_state)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, "dim=0 must be positive"),
        ({"nlist": 0}, "nlist=0 must be positive"),
        ({"nlist": 8, "nprobe": 9}, r"nprobe=9 must be between 1 and nlist=8"),
        ({"nprobe": 0}, "nprobe=0"),
        (
            {"backend": "annoy"},
            "unknown backend 'annoy'; choose one of auto, faiss, faiss-gpu, exact",
        ),
        ({"metric": "l2"}, "unknown metric 'l2'; choose one of ip, l2_augmented, cosine"),
        ({"kmeans_iters": -1}, "kmeans_iters=-1 must be >= 0"),
        ({"nlist": 64, "max_train_points": 10}, "max_train_points=10 is below nlist=64"),
        ({"nlist": 2.5}, "nlist must be an integer"),
    ],
)
def test_constructor_rejects_bad_settings(kwargs, message):
    settings_ = {"dim": D_MODEL, **kwargs}
    with pytest.raises(ItemIndexError, match=message):
        ItemIndex(**settings_)


def test_nprobe_setter_validates(mixture):
    index = faiss_index(nlist=16)
    with pytest.raises(ItemIndexError, match=r"nprobe=17 must be between 1 and nlist=16"):
        index.nprobe = 17


@pytest.mark.parametrize(
    ("make_xb", "message"),
    [
        # every check of test_index_checks.py is reached from build; these also need the index
        (lambda x: x[:, :8], "xb has d=8 columns but the index was created with dim=16"),
        (with_bad_rows, r"xb has 2 of 4000 rows with NaN or inf \(first at row 3\)"),
        (lambda x: x[:20], r"nlist=32 is larger than the number of items N=20; lower nlist"),
    ],
)
def test_build_rejects_bad_embeddings(make_xb, message, mixture):
    with pytest.raises(ItemIndexError, match=message):
        faiss_index().build(make_xb(mixture))


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (torch.arange(10), r"ids must be a 1-D tensor with one id per row of xb \(4000\)"),
        (torch.arange(4000, dtype=torch.int32), "ids must be int64, got torch.int32"),
        (torch.arange(4000) - 1, "ids must be non-negative"),
        (torch.zeros(4000, dtype=torch.int64), "ids must be unique"),
    ],
)
def test_build_rejects_bad_ids(ids, message, mixture):
    with pytest.raises(ItemIndexError, match=message):
        faiss_index().build(mixture, ids=ids)


def test_search_and_refresh_validate_their_input(mixture, queries):
    empty = faiss_index()
    with pytest.raises(ItemIndexError, match=r"the index is empty: call build\(xb\)"):
        empty.search(queries, 5)
    with pytest.raises(ItemIndexError, match=r"re_add needs a built index: call build\(xb\) first"):
        empty.re_add(mixture, step=1)
    with pytest.raises(ItemIndexError, match=r"retrain needs a built index"):
        empty.retrain(mixture, step=1)
    index = faiss_index().build(mixture, ids=torch.arange(len(mixture)))
    with pytest.raises(
        ItemIndexError, match=r"k=0 must be between 1 and the number of indexed items ntotal=4000"
    ):
        index.search(queries, 0)
    with pytest.raises(ItemIndexError, match=r"k=4001 must be between 1"):
        index.search(queries, 4001)
    with pytest.raises(ItemIndexError, match="k must be an integer"):
        index.search(queries, 2.0)
    with pytest.raises(ItemIndexError, match=r"xq has d=15 columns"):
        index.search(queries[:, :15], 5)
    with pytest.raises(ItemIndexError, match=r"for a single vector use xq\[None\]"):
        index.search(queries[0], 5)
    with pytest.raises(ItemIndexError, match=r"xq has 2 of 200 rows with NaN or inf"):
        index.search(with_bad_rows(queries), 5)
    with pytest.raises(
        ItemIndexError, match=r"xb has 3999 rows but the index holds 4000 ids; pass ids="
    ):
        index.re_add(mixture[1:], step=1)
    with pytest.raises(ItemIndexError, match="NaN or inf"):
        index.retrain(with_bad_rows(mixture), step=1)
    assert index.version == 0  # failed refreshes leave the index untouched
