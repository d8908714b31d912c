"""The pure-torch IVF backend against the exact reference and against FAISS: exactness at
nprobe == nlist, monotone recall in nprobe, re-add / retrain, state round trips, same lists as FAISS
given the same centroids, and the list layout itself. CUDA cases run only where a GPU is present
(``pytest -m gpu``, see examples/gpu_bench.sh)."""

from __future__ import annotations

import pytest
import torch
from conftest import D_MODEL, gaussian_mixture
from hypothesis import given, settings
from hypothesis import strategies as st

from annsample.errors import ItemIndexError
from annsample.index import ItemIndex, exact_topk, recall_at_k, torch_ivf
from annsample.index import faiss_ivf as faiss_backend

METRICS = ["ip", "l2_augmented", "cosine"]
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)"
            ),
        ],
    ),
]
needs_faiss = pytest.mark.skipif(
    not faiss_backend.available(), reason="compares against FAISS, which is not installed here"
)


def torch_index(metric: str = "ip", nlist: int = 32, nprobe: int = 4, **kwargs) -> ItemIndex:
    return ItemIndex(
        D_MODEL, nlist=nlist, nprobe=nprobe, backend="torch_ivf", metric=metric, **kwargs
    )


# ----------------------------------------------------------------------------- exactness, recall


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", METRICS)
def test_nprobe_equal_nlist_is_exact(metric, device, mixture, queries):
    xb, xq = mixture.to(device), queries.to(device)
    index = torch_index(metric, nlist=32, nprobe=32).build(xb, ids=torch.arange(len(xb)))
    assert index.backend == "torch_ivf"
    D, I = index.search(xq, 10)
    assert D.device == xq.device and I.device == xq.device
    # The exact backend with the same metric is the reference (cosine ranks by cosine).
    D_ref, I_ref = (
        ItemIndex(D_MODEL, backend="exact", metric=metric)
        .build(xb, ids=torch.arange(len(xb)))
        .search(xq, 10)
    )
    assert torch.equal(I.cpu(), I_ref.cpu())
    torch.testing.assert_close(D.cpu(), D_ref.cpu(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("metric", ["ip", "l2_augmented"])
def test_recall_against_exact_is_monotone_in_nprobe(metric, device, mixture, queries):
    xb, xq = mixture.to(device), queries.to(device)
    index = torch_index(metric, nlist=64, nprobe=1).build(xb, ids=torch.arange(len(xb)))
    _, I_exact = exact_topk(xq, xb, 20)
    recalls = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        index.nprobe = nprobe
        recalls.append(recall_at_k(index.search(xq, 20)[1], I_exact))
    # Probing more lists only adds candidates, so recall never drops; all lists give the exact set.
    assert recalls == sorted(recalls), recalls
    assert recalls[-1] == 1.0
    assert recalls[0] < 1.0  # one list of 64 misses some neighbours: the sweep measures something
    assert recalls[3] >= 0.9, recalls  # an eighth of the lists finds most of them on this data


def test_scores_are_true_inner_products_for_every_metric(queries):
    # Widely varying norms, where cosine and augmented scores would differ from xq · x.
    xb = gaussian_mixture(3000) * torch.linspace(0.1, 5, 3000)[:, None]
    for metric in METRICS:
        D, I = (
            torch_index(metric, nprobe=8).build(xb, ids=torch.arange(len(xb))).search(queries, 20)
        )
        real = I >= 0
        true = (queries[:, None, :] * xb[I.clamp(min=0)]).sum(-1)
        torch.testing.assert_close(D[real], true[real], rtol=1e-5, atol=1e-4)
        assert torch.all(D[:, 1:] <= D[:, :-1])


def test_short_lists_pad_with_minus_one_and_minus_inf():
    xb = gaussian_mixture(40, clusters=8, spread=0.05)
    index = torch_index(nlist=8, nprobe=1).build(xb, ids=torch.arange(100, 140))
    D, I = index.search(xb[:5], 30)  # one list of ~5 items cannot fill k=30
    missing = I == -1
    assert missing.any()
    assert torch.equal(torch.isinf(D) & (D < 0), missing)
    assert torch.equal(missing, missing.cummax(dim=1).values)  # missing results trail
    assert ((I[~missing] >= 100) & (I[~missing] < 140)).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 300),
    nq=st.integers(1, 40),
    nlist=st.integers(1, 16),
    k=st.integers(1, 12),
    block=st.sampled_from([1, 64, 1 << 20]),
    method=st.sampled_from(torch_ivf.SEARCH_METHODS),
    seed=st.integers(0, 2**16),
)
def test_search_inverted_lists_at_full_probe_is_the_exact_topk(
    n, nq, nlist, k, block, method, seed
):
    nlist, k = min(nlist, n), min(k, n)
    g = torch.Generator().manual_seed(seed)
    xb, xq = torch.randn(n, 8, generator=g), torch.randn(nq, 8, generator=g)
    centroids = xb[torch.randperm(n, generator=g)[:nlist]]
    lists = torch_ivf.build_inverted_lists(xb, centroids)
    # A tiny block budget forces one query per block: blocking must not change any result.
    D, I = torch_ivf.search_inverted_lists(
        lists, xq, k, nprobe=nlist, block_elements=block, method=method
    )
    D_ref, _ = exact_topk(xq, xb, k)
    torch.testing.assert_close(D, D_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((xq[:, None, :] * xb[I]).sum(-1), D, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nprobe", [1, 3, 8])
def test_search_methods_agree(device, nprobe, mixture, queries):
    """Gathering the probed rows and looping over the probed lists give the same results."""
    xb, xq = mixture.to(device), queries.to(device)
    lists = torch_ivf.build_inverted_lists(xb, xb[:32].clone())
    D_g, I_g = torch_ivf.search_inverted_lists(lists, xq, 20, nprobe, method="gather")
    D_l, I_l = torch_ivf.search_inverted_lists(lists, xq, 20, nprobe, method="lists")
    assert recall_at_k(I_l, I_g) == 1.0
    torch.testing.assert_close(D_l, D_g, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown search method 'scan'"):
        torch_ivf.search_inverted_lists(lists, xq, 20, nprobe, method="scan")


# ----------------------------------------------------------------------------- list layout


def test_lists_are_rows_sorted_by_nearest_centroid(mixture):
    centroids = mixture[:16].clone()
    for l2 in (False, True):
        lists = torch_ivf.build_inverted_lists(mixture, centroids, l2=l2)
        sizes = lists.list_sizes()
        assert int(sizes.sum()) == mixture.shape[0] and lists.max_list_size == int(sizes.max())
        assert torch.equal(lists.rows.sort().values, torch.arange(mixture.shape[0]))
        assert torch.equal(lists.xb, mixture[lists.rows])
        assert torch.equal(lists.vectors(), mixture)
        if l2:
            expected = torch.cdist(mixture, centroids).argmin(dim=1)
        else:
            expected = (mixture @ centroids.T).argmax(dim=1)
        list_of_row = torch.repeat_interleave(torch.arange(16), sizes)
        assert torch.equal(list_of_row, expected[lists.rows])
        # Inside a list rows keep their original order (a stable sort).
        for list_no in range(16):
            members = lists.rows[lists.offsets[list_no] : lists.offsets[list_no + 1]]
            assert torch.equal(members, members.sort().values)


def test_lists_hold_a_private_copy(mixture, queries):
    xb = mixture.clone()
    index = torch_index(nprobe=32).build(xb, ids=torch.arange(len(xb)))
    D0, I0 = index.search(queries, 5)
    xb.mul_(-1)  # the caller's table keeps training after the build
    D1, I1 = index.search(queries, 5)
    assert torch.equal(I0, I1) and torch.equal(D0, D1)


# ----------------------------------------------------------------------------- refresh tiers


@pytest.mark.parametrize("device", DEVICES)
def test_re_add_keeps_centroids_and_follows_moved_embeddings(device, mixture, queries):
    xb, xq = mixture.to(device), queries.to(device)
    index = torch_index(nprobe=3).build(xb, ids=torch.arange(len(xb)), step=5)
    D0, I0 = index.search(xq, 15)
    centroids = index.centroids
    index.re_add(xb, step=9)
    assert index.version == 9 and index.ntotal == xb.shape[0]
    assert torch.equal(index.centroids, centroids)
    D1, I1 = index.search(xq, 15)
    assert torch.equal(I0, I1) and torch.equal(D0, D1)
    moved = xb.flip(0)  # same vectors, different items
    index.nprobe = index.nlist
    index.re_add(moved, step=10)
    assert torch.equal(index.search(xq, 5)[1], exact_topk(xq, moved, 5)[1])


@pytest.mark.parametrize("device", DEVICES)
def test_retrain_is_warm_started_and_keeps_recall(device, mixture, queries):
    xb, xq = mixture.to(device), queries.to(device)
    index = torch_index(nprobe=4).build(xb, ids=torch.arange(len(xb)))
    _, I_exact = exact_topk(xq, xb, 20)
    recall_built = recall_at_k(index.search(xq, 20)[1], I_exact)
    centroids = index.centroids
    g = torch.Generator().manual_seed(7)
    moved = xb + 0.3 * torch.randn(xb.shape, generator=g).to(device)
    _, I_moved = exact_topk(xq, moved, 20)
    stale = recall_at_k(index.search(xq, 20)[1], I_moved)
    index.retrain(moved, step=100)
    assert index.version == 100
    assert not torch.allclose(index.centroids, centroids)
    # Warm start: the new centroids stay close to the old ones (k-means moved, not restarted).
    moved_by = (index.centroids - centroids).norm(dim=1).mean()
    assert moved_by < 0.5 * centroids.norm(dim=1).mean()
    recall_retrained = recall_at_k(index.search(xq, 20)[1], I_moved)
    assert recall_retrained >= recall_built - 0.05, (recall_built, recall_retrained)
    assert recall_retrained >= stale - 0.02, (stale, recall_retrained)


def test_retrain_with_zero_iterations_is_a_re_add(mixture, queries):
    index = torch_index(nprobe=4, kmeans_iters=3).build(mixture, ids=torch.arange(len(mixture)))
    index.kmeans_iters = 0
    centroids = index.centroids
    index.retrain(mixture.flip(0), step=1)
    # (re-normalising the spherical centroids may move the last bit)
    torch.testing.assert_close(index.centroids, centroids, rtol=1e-6, atol=1e-7)
    index.nprobe = index.nlist
    assert torch.equal(index.search(queries, 5)[1], exact_topk(queries, mixture.flip(0), 5)[1])


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("metric", METRICS)
def test_state_dict_round_trips(metric, mixture, queries):
    index = torch_index(metric, nprobe=5).build(mixture, ids=torch.arange(4000) + 1, step=7)
    state = index.state_dict()
    restored = ItemIndex.from_state_dict(state)
    assert restored.backend == "torch_ivf" and restored.version == 7 and restored.nprobe == 5
    assert torch.equal(restored.centroids, index.centroids)
    D0, I0 = index.search(queries, 10)
    D1, I1 = restored.search(queries, 10)
    assert torch.equal(I0, I1) and torch.equal(D0, D1)
    # Without vectors: centroids only, refused until re_add refills the lists.
    empty = ItemIndex.from_state_dict(index.state_dict(with_vectors=False))
    with pytest.raises(ItemIndexError, match="empty"):
        empty.search(queries, 10)
    empty.re_add(mixture, ids=torch.arange(4000) + 1, step=8)
    assert torch.equal(empty.search(queries, 10)[1], I0)


# ----------------------------------------------------------------------------- against FAISS


@needs_faiss
@pytest.mark.parametrize("metric", METRICS)
def test_same_centroids_give_the_same_lists_and_results_as_faiss(metric, mixture, queries):
    faiss_ivf = ItemIndex(D_MODEL, nlist=32, nprobe=4, backend="faiss", metric=metric)
    faiss_ivf.build(mixture, ids=torch.arange(len(mixture)), step=3)
    torch_ivf_index = torch_index(metric, nprobe=4)
    torch_ivf_index.load_state_dict(faiss_ivf.state_dict())
    # Same list sizes: the FAISS inverted lists and the torch offsets hold the same rows.
    faiss_sizes = faiss_ivf.list_sizes()
    torch_sizes = torch_ivf_index.list_sizes()
    assert (faiss_sizes - torch_sizes).abs().sum() <= 2  # float rounding may move a near-tie
    D_f, I_f = faiss_ivf.search(queries, 20)
    D_t, I_t = torch_ivf_index.search(queries, 20)
    assert recall_at_k(I_t, I_f) >= 0.995
    torch.testing.assert_close(D_t, D_f, rtol=1e-4, atol=1e-4)


@needs_faiss
def test_recall_matches_faiss_over_nprobe(mixture, queries):
    """Built independently (own k-means on each side), the two backends reach the same recall."""
    _, I_exact = exact_topk(queries, mixture, 20)
    faiss_ivf = ItemIndex(D_MODEL, nlist=64, nprobe=1, backend="faiss").build(
        mixture, ids=torch.arange(len(mixture))
    )
    torch_ivf_index = torch_index(nlist=64, nprobe=1).build(mixture, ids=torch.arange(len(mixture)))
    for nprobe in (1, 4, 16):
        faiss_ivf.nprobe = torch_ivf_index.nprobe = nprobe
        recall_f = recall_at_k(faiss_ivf.search(queries, 20)[1], I_exact)
        recall_t = recall_at_k(torch_ivf_index.search(queries, 20)[1], I_exact)
        assert abs(recall_f - recall_t) <= 0.05, (nprobe, recall_f, recall_t)


# ----------------------------------------------------------------------------- backend choice


def test_torch_ivf_runs_and_auto_picks_it_without_faiss(monkeypatch, mixture, queries):
    monkeypatch.setattr(faiss_backend, "faiss", None)
    index = ItemIndex(D_MODEL, nlist=16, nprobe=16, backend="auto").build(
        mixture, ids=torch.arange(len(mixture))
    )
    assert index.backend == "torch_ivf"
    assert torch.equal(index.search(queries, 5)[1], exact_topk(queries, mixture, 5)[1])
    with pytest.raises(ItemIndexError, match="needs the faiss package.*torch_ivf"):
        ItemIndex(D_MODEL, nlist=16, nprobe=4, backend="faiss")


@needs_faiss
def test_auto_still_picks_faiss_on_cpu(mixture):
    assert (
        ItemIndex(D_MODEL, nlist=16, nprobe=4, backend="auto")
        .build(mixture, ids=torch.arange(len(mixture)))
        .backend
        == "faiss"
    )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch sees none)")
def test_auto_on_cuda_picks_faiss_gpu_or_torch_ivf(mixture):
    index = ItemIndex(D_MODEL, nlist=16, nprobe=4, backend="auto").build(mixture.cuda())
    expected = "faiss-gpu" if faiss_backend.gpu_available() else "torch_ivf"
    assert index.backend == expected


def test_training_with_the_ann_sampler_on_torch_ivf(tmp_path, monkeypatch):
    """End to end: the config accepts the backend and a tiny ann run trains and refreshes on it."""
    from pathlib import Path

    from annsample.config import load_config
    from annsample.train import train

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    overrides = (
        "sampler.name=ann",
        "sampler.index.backend=torch_ivf",
        "sampler.index.nlist=16",
        "sampler.index.nprobe=4",
        "sampler.index.refresh_every=3",
        "sampler.index.retrain_every=2",
        "train.epochs=1",
        "train.max_steps_per_epoch=8",
        "train.num_threads=1",
    )
    config = load_config("configs/tiny.yaml", overrides)
    assert config.sampler.index.backend == "torch_ivf"
    results = train(config, tmp_path / "run")
    assert all(0.0 <= value <= 1.0 for value in results["test"].values())
    records = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert '"index/' in records  # the refresher rebuilt and probed the torch index
