"""The FAISS backends of ItemIndex: an IndexIVFFlat built from a given assignment holds every row
once in its list and searches like exact scoring at full probe; faiss-gpu on a GPU, a clear error
without one."""

from __future__ import annotations

import faiss
import pytest
import torch
from conftest import D_MODEL

from annsample.errors import ItemIndexError
from annsample.index import ItemIndex, exact_topk, faiss_ivf, kmeans, nearest_centroid


@pytest.fixture(scope="module")
def store(mixture):
    """The ``faiss`` backend's contents over the mixture, 16 lists from a few k-means steps."""
    centroids = kmeans(mixture, mixture[:16].clone(), iters=4, spherical=False)
    return centroids, faiss_ivf.build_store(mixture, centroids, "ip")


def test_lists_follow_the_assignment_and_hold_every_row_once(store, mixture):
    centroids, built = store
    assign = nearest_centroid(mixture, centroids)
    assert torch.equal(built.list_sizes(), torch.bincount(assign, minlength=16))
    assert built.ntotal == len(mixture)
    # vectors() reads the lists back in row order: every row, unchanged
    assert torch.equal(built.vectors(), mixture)


def test_full_probe_is_exact_and_ids_are_row_positions(store, mixture, queries):
    _, built = store
    D, I = built.search(queries, 10, nprobe=16)
    D_ref, I_ref = exact_topk(queries, mixture, 10)
    assert torch.equal(I, I_ref)
    torch.testing.assert_close(D, D_ref)
    # one probed list holds fewer rows than the whole catalog: results come from those lists only
    _, I_one = built.search(queries, 10, nprobe=1)
    assign = nearest_centroid(mixture, store[0])
    nearest = nearest_centroid(queries, store[0])
    found = I_one[I_one >= 0]
    rows = torch.arange(len(queries)).unsqueeze(1).expand_as(I_one)[I_one >= 0]
    assert torch.equal(assign[found], nearest[rows])


def test_flat_assign_is_the_nearest_centroid(store, mixture):
    centroids, _ = store
    scores = mixture @ centroids.T  # (n, nlist)
    assert torch.equal(faiss_ivf.flat_assign(mixture, centroids, l2=False), scores.argmax(dim=1))
    distances = torch.cdist(mixture, centroids)
    assigned = faiss_ivf.flat_assign(mixture, centroids, l2=True)
    # L2 ties are measure-zero on this data; compare distances to allow rounding at near-ties
    torch.testing.assert_close(
        distances.gather(1, assigned[:, None]).squeeze(1), distances.min(dim=1).values
    )


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this machine has a GPU: see the GPU test")
def test_faiss_gpu_without_a_gpu_is_a_clear_error():
    with pytest.raises(
        ItemIndexError, match=r"backend 'faiss-gpu' was requested but .* sees no GPU"
    ):
        ItemIndex(D_MODEL, backend="faiss-gpu")


@pytest.mark.skipif(
    faiss.get_num_gpus() == 0 or not torch.cuda.is_available(),
    reason="needs faiss-gpu and CUDA; test_faiss_gpu_without_a_gpu_is_a_clear_error covers CPU",
)
def test_faiss_gpu_matches_exact_at_full_nprobe(mixture, queries):
    index = ItemIndex(D_MODEL, nlist=16, nprobe=16, backend="auto").build(mixture.cuda())
    assert index.backend == "faiss-gpu"
    D, I = index.search(queries.cuda(), 10)
    assert I.is_cuda
    assert torch.equal(I.cpu(), exact_topk(queries, mixture, 10)[1])
    with pytest.raises(ItemIndexError, match="FAISS GPU's limit of 2048"):
        index.search(queries.cuda(), 2049)
