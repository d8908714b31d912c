"""bench index: recall against the exact top-k, monotone in nprobe, exact when every list is probed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, invoke

from annsample import train as train_mod
from annsample.bench.index import index_sweep, load_probe, probe_from_run, sweep_table
from annsample.config import load_config
from annsample.errors import ConfigError
from annsample.prepare import prepare_data, probe_set
from annsample.run import load_model, load_run


@pytest.fixture(scope="module")
def clustered():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(20, 16, generator=g)
    xb = centres[torch.randint(0, 20, (2000,), generator=g)] + torch.randn(2000, 16, generator=g)
    xq = centres[torch.randint(0, 20, (40,), generator=g)] + torch.randn(40, 16, generator=g)
    return xq, xb


def test_ivf_recall_grows_with_nprobe_and_is_exact_at_nlist(clustered):
    xq, xb = clustered
    records = index_sweep(
        xq, xb, 20, nlists=(32,), nprobes=(1, 4, 32), metrics=("ip", "l2_augmented"),
        repeats=1, show_progress=False,
    )  # fmt: skip
    for metric in ("ip", "l2_augmented"):
        recalls = [r["recall"] for r in records if r["metric"] == metric]
        assert recalls == sorted(recalls) and recalls[0] < 1.0
        assert recalls[-1] == 1.0
    assert all(r["search_ms"] > 0 and r["re_add_seconds"] >= 0 for r in records)
    assert "| ivf_flat | 32 | 32 | ip |" in sweep_table(records)


def test_hnsw_kinds_find_most_of_the_exact_top_k(clustered):
    xq, xb = clustered
    records = index_sweep(
        xq, xb, 20, nlists=(32,), nprobes=(32,), kinds=("ivf_hnsw", "hnsw", "exact"),
        metrics=("ip", "l2_augmented"), ef_searches=(64,), repeats=1, show_progress=False,
    )  # fmt: skip
    assert [(r["kind"], r["metric"]) for r in records] == [
        ("ivf_hnsw", "ip"), ("ivf_hnsw", "l2_augmented"), ("hnsw", "ip"),
        ("hnsw", "l2_augmented"), ("exact", "ip"),
    ]  # fmt: skip
    assert all(r["recall"] > 0.9 for r in records), records
    assert records[-1]["recall"] == 1.0


def test_l2_augmented_space_ranks_by_inner_product(clustered):
    import faiss

    from annsample.bench.index import _faiss_space

    xq, xb = clustered
    xb = xb * torch.linspace(0.2, 3.0, xb.shape[0])[:, None]  # norms that matter for MIPS
    items, queries, space = _faiss_space(xb, xq, "l2_augmented", multiple=8)
    assert space == faiss.METRIC_L2 and items.shape == (2000, 24) and queries.shape == (40, 24)
    flat = faiss.IndexFlatL2(24)
    flat.add(items)
    _, I = flat.search(queries.numpy(), 20)
    assert torch.equal(torch.from_numpy(I), (xq @ xb.T).topk(20, dim=1).indices)


def test_ivf_pq_with_exact_rescoring_recalls_more_with_a_wider_refine(clustered):
    xq, xb = clustered
    records = index_sweep(
        xq, xb, 20, nlists=(8,), nprobes=(2, 8), kinds=("ivf_pq",), pq_m=4, refines=(1, 8),
        repeats=1, show_progress=False,
    )  # fmt: skip
    assert [(r["refine"], r["nprobe"]) for r in records] == [(1, 2), (1, 8), (8, 2), (8, 8)]
    recall = {(r["refine"], r["nprobe"]): r["recall"] for r in records}
    # 4 bytes for 16 floats loses order; rescoring 8 x k candidates exactly wins most of it back
    assert recall[(1, 8)] < 0.9 < recall[(8, 8)], recall
    assert recall[(8, 2)] <= recall[(8, 8)]
    assert "| ivf_pq | 8 | 8 | ip | – | 8 |" in sweep_table(records)
    with pytest.raises(
        ConfigError, match=r"pq_m=5 must divide the embedding size 16 \(metric ip\)"
    ):
        index_sweep(xq, xb, 20, kinds=("ivf_pq",), pq_m=5)
    # l2_augmented pads its d + 1 columns to a multiple of pq_m itself
    augmented = index_sweep(
        xq, xb, 20, nlists=(8,), nprobes=(8,), kinds=("ivf_pq",), metrics=("l2_augmented",),
        pq_m=5, refines=(8,), repeats=1, show_progress=False,
    )  # fmt: skip
    assert augmented[0]["recall"] > 0.9, augmented
    with pytest.raises(ConfigError, match="cosine is an ivf_flat metric"):
        index_sweep(xq, xb, 20, kinds=("hnsw",), metrics=("cosine",))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (one epoch)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        train_mod.train(load_config(TINY, ("train.num_threads=1", "train.epochs=1")), out)
    return out


def test_a_run_folder_probes_its_trained_table_with_validation_hidden_states(run):
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        xq, xb = probe_from_run(run, queries=10)
        config, best = load_run(run, ("sampler.index.probe_queries=10",))
        prepared = prepare_data(config)
        model = load_model(config, best, prepared.n_items, torch.device("cpu"))
        inputs, _ = probe_set(prepared, config, torch.device("cpu"))
    assert xb.shape == (prepared.n_items, config.model.hidden_size)
    assert torch.equal(xb, model.item_embeddings.detach()[1:])  # the padding row is not an item
    assert xq.shape == (10, config.model.hidden_size)
    with torch.no_grad():
        assert torch.allclose(xq, model.encode(inputs)[:, -1])


def test_bench_index_reads_a_run_folder_from_the_command_line(run, tmp_path):
    out = tmp_path / "sweep.json"
    result = invoke([
        "bench", "index", str(run), "--k", "10", "--nlist", "8", "--nprobe", "8",
        "--kind", "ivf_flat", "--kind", "exact", "--probe-queries", "12", "--threads", "1",
        "--json", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = json.loads(out.read_text())
    assert [r["kind"] for r in records] == ["ivf_flat", "exact"]
    assert all(r["queries"] == 12 and r["threads"] == 1 for r in records)
    assert records[0]["recall"] == 1.0  # every list probed: exact
    assert "| ivf_flat | 8 | 8 | ip |" in result.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--pq-m", "8"], "--pq-m and --refine set ivf_pq only"),
        (["--refine", "2"], "--pq-m and --refine set ivf_pq only"),
    ],
)
def test_ivf_pq_settings_without_ivf_pq_are_refused(run, extra, message):
    result = invoke(["bench", "index", str(run), *extra])
    assert result.exit_code == 2 and message in result.output, result.output


def test_probe_queries_with_a_probe_file_is_refused(clustered, tmp_path):
    xq, xb = clustered
    probe = tmp_path / "probe.pt"
    torch.save({"queries": xq, "item_embeddings": torch.cat([torch.zeros(1, 16), xb])}, probe)
    result = invoke(["bench", "index", str(probe), "--probe-queries", "5"])
    assert result.exit_code == 2 and "--probe-queries applies to a run folder" in result.output


def test_bad_inputs_are_clear_errors(clustered, tmp_path):
    xq, xb = clustered
    with pytest.raises(ConfigError, match="unknown index kind"):
        index_sweep(xq, xb, 20, kinds=("ivf_sq",))
    with pytest.raises(ConfigError, match="nlist=5000 is more than"):
        index_sweep(xq, xb, 20, nlists=(5000,), show_progress=False)
    (tmp_path / "bad.pt").write_text("not a tensor file")
    with pytest.raises(ConfigError, match="--save-probe"):
        load_probe(tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="is a folder"):
        load_probe(tmp_path)
