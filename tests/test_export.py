"""``annsample export`` / ``annsample recommend`` and ``annsample.export.Recommender``: the export
folder reproduces the trained model's rankings, excludes the history, and refuses bad input with
one clear error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import REPO, TINY

from annsample import checkpoint as ckpt
from annsample import train as train_mod
from annsample.cli.main import main
from annsample.config import load_config
from annsample.errors import RunError
from annsample.export import (
    FORMAT,
    ExportError,
    Recommender,
    build_ivf,
    export_run,
    parse_history,
    read_manifest,
)
from annsample.prepare import prepare_data
from annsample.run import load_model, load_run

OVERRIDES = ("train.num_threads=1", "train.epochs=2")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished tiny run (two epochs: seconds)."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        train_mod.train(load_config(TINY, OVERRIDES), out)
    return out


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "tiny"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        export_run(run, out)
    return out


@pytest.fixture(scope="module")
def recommender(exported) -> Recommender:
    return Recommender.load(exported)


def exact_top_k(run: Path, history: list[int], k: int) -> list[int]:
    """Reference: score every item with the run's best weights, history masked, top-k."""
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        config, best = load_run(run)
        model = load_model(config, best, 3354, torch.device("cpu"))
    seq = torch.zeros(1, config.data.max_len, dtype=torch.int64)
    tail = history[-config.data.max_len :]
    seq[0, -len(tail) :] = torch.tensor(tail)
    with torch.no_grad():
        scores = model.score_all(model.encode(seq)[:, -1])[0]  # (N+1,)
    scores[0] = -torch.inf
    scores[torch.tensor(history)] = -torch.inf
    return scores.topk(k).indices.tolist()


def test_export_writes_model_embeddings_index_and_manifest(run, exported):
    manifest = read_manifest(exported)
    assert manifest["format"] == FORMAT
    assert set(manifest["versions"]) >= {"annsample", "torch", "faiss"}
    assert manifest["versions"]["faiss"] == faiss.__version__
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        prepared = prepare_data(load_config(TINY, OVERRIDES))
    assert manifest["catalog"] == ckpt.catalog_summary(prepared.split)
    best = torch.load(run / "best.pt", weights_only=True)
    xb = np.load(exported / "item_embeddings.npy")
    assert xb.shape == (prepared.n_items, manifest["dim"])
    np.testing.assert_array_equal(xb, best["item_embedding.weight"][1:].numpy())
    index = faiss.read_index(str(exported / "index.faiss"))
    assert index.ntotal == prepared.n_items
    # the index's labels are item ids: each item's own vector finds itself with nprobe = nlist
    ivf = faiss.extract_index_ivf(index)
    ivf.nprobe = ivf.nlist
    _, I = index.search(xb[:5], 1)
    assert I[:, 0].tolist() == ((xb[:5] @ xb.T).argmax(axis=1) + 1).tolist()
    assert 0.0 <= manifest["index"]["recall@10"] <= 1.0
    assert set(manifest["files"]) == {
        "config.yaml",
        "model.pt",
        "item_embeddings.npy",
        "index.faiss",
    }


@pytest.mark.parametrize("history", [[5, 17, 42], [1], list(range(1, 60))])
def test_exhaustive_probe_matches_exact_scoring_of_every_item(run, recommender, history):
    recommender.nprobe = faiss.extract_index_ivf(recommender.index).nlist
    try:
        result = recommender.recommend(history, 10)
    finally:
        recommender.nprobe = recommender.manifest["index"]["nprobe"]
    assert result.ids == exact_top_k(run, history, 10)
    assert np.all(np.diff(result.scores) <= 1e-6)


def test_recommendations_exclude_the_history_and_are_distinct(recommender):
    history = [5, 17, 42, 42, 3000]
    ids = recommender.recommend(history, 50).ids
    assert len(ids) == 50 == len(set(ids))
    assert not set(ids) & set(history)
    assert all(1 <= i <= recommender.n_items for i in ids)


def test_batch_equals_one_by_one(recommender):
    histories = [[5, 17, 42], [7], [100, 200, 300, 400]]
    batch = recommender.recommend_batch(histories, 7)
    for history, result in zip(histories, batch, strict=True):
        assert result.ids == recommender.recommend(history, 7).ids


def test_only_the_last_max_len_items_are_encoded(recommender):
    long = list(range(1, 41))  # max_len is 20 in tiny.yaml
    other = list(range(500, 520)) + long[-20:]  # other older items, the same last 20
    a = recommender.recommend(long, 100)
    b = recommender.recommend(other, 100)
    # the same query vector, so items recommended to both score the same
    score_a = dict(zip(a.ids, a.scores.tolist(), strict=True))
    common = [
        (score_a[i], s) for i, s in zip(b.ids, b.scores.tolist(), strict=True) if i in score_a
    ]
    assert len(common) > 50
    expected, found = np.array(common).T
    np.testing.assert_allclose(found, expected, rtol=1e-5)
    assert not set(b.ids) & set(other)


def test_when_probed_lists_run_short_every_list_is_searched(recommender):
    recommender.nprobe = 1
    try:
        result = recommender.recommend([5], 1000)  # far more than one list holds
    finally:
        recommender.nprobe = recommender.manifest["index"]["nprobe"]
    assert len(set(result.ids)) == 1000 and 5 not in result.ids


@pytest.mark.parametrize(
    ("history", "k", "fragment"),
    [
        ([], 10, "history is empty"),
        ([0], 10, "unknown item id(s) 0"),
        ([5, 3355], 10, "unknown item id(s) 3355"),
        ([-1], 10, "unknown item id(s) -1"),
        (["5"], 10, "must be integers"),
        ([5], 0, "positive integer"),
        ([5, 6], 3353, "more than the 3352 items outside the history"),
    ],
)
def test_bad_requests_are_clear_errors(recommender, history, k, fragment):
    with pytest.raises(ExportError) as caught:
        recommender.recommend(history, k)
    assert fragment in str(caught.value)


def test_nprobe_out_of_range_is_refused(recommender):
    with pytest.raises(ExportError, match="nprobe=0 must be an integer between 1 and nlist"):
        recommender.nprobe = 0


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "history is empty"), ("5,,6", "empty entry"), ("5,x", "unknown item id(s) x")],
)
def test_parse_history_errors(text, fragment):
    with pytest.raises(ExportError) as caught:
        parse_history(text)
    assert fragment in str(caught.value)


def copy_of(exported: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(exported, folder)
    return folder


def test_another_format_version_is_refused(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["format"] = "annsample.export/0"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ExportError, match="format 'annsample.export/0' but this annsample"):
        Recommender.load(folder)


def test_altered_or_missing_files_are_refused(exported, tmp_path):
    folder = copy_of(exported, tmp_path)
    data = bytearray((folder / "index.faiss").read_bytes())
    data[-1] ^= 0xFF
    (folder / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="does not match the checksum"):
        Recommender.load(folder)
    (folder / "model.pt").unlink()
    with pytest.raises(ExportError, match="lacks model.pt"):
        Recommender.load(folder)


def test_a_folder_that_is_not_an_export_is_refused(run, tmp_path):
    with pytest.raises(ExportError, match="has no manifest.json"):
        Recommender.load(run)
    with pytest.raises(ExportError, match="does not exist"):
        Recommender.load(tmp_path / "nowhere")


def test_unfinished_and_missing_runs_are_refused(run, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "results.json").unlink()
    (unfinished / "checkpoints").mkdir()
    with pytest.raises(RunError, match="has not finished .* train --resume"):
        export_run(unfinished, tmp_path / "out")
    with pytest.raises(RunError, match="does not exist"):
        export_run(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_non_empty_out_dir_needs_overwrite(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="not empty; choose another, or pass --overwrite"):
        export_run(run, out)
    assert (out / "keep.txt").read_text() == "x"


def test_cli_export_then_recommend(run, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "served"
    result = CliRunner().invoke(main, ["export", str(run), str(out), "--nlist", "20"])
    assert result.exit_code == 0, result.output
    assert read_manifest(out)["index"]["nlist"] == 20
    result = CliRunner().invoke(
        main, ["recommend", str(out), "--history", "5,17,42", "-k", "10", "--nprobe", "20"]
    )
    assert result.exit_code == 0, result.output
    ids = [int(token) for token in result.stdout.split()]
    assert ids == exact_top_k(run, [5, 17, 42], 10)


def test_cli_bad_history_is_one_error_line(exported):
    result = CliRunner().invoke(main, ["recommend", str(exported), "--history", "5,99999"])
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown item id(s) 99999")


def test_interaction_tables_keep_their_original_item_ids(tmp_path, monkeypatch):
    """A CSV catalog is remapped to 1..N for training; export and recommend speak its own ids."""
    monkeypatch.chdir(REPO)
    rows = ["user,item,timestamp"]
    for line in (REPO / "data" / "tiny.txt").read_text().splitlines()[:150]:
        user, *items = line.split()
        rows += [f"u{user},sku-{item},{t}" for t, item in enumerate(items)]
    table = tmp_path / "tiny.csv"
    table.write_text("\n".join(rows) + "\n")
    config = load_config(TINY, (*OVERRIDES, f"data.path={table}", "train.epochs=1"))
    train_mod.train(config, tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "out")
    recommender = Recommender.load(tmp_path / "out")
    result = recommender.recommend(["sku-5", "sku-17"], 5)
    assert all(isinstance(i, str) and i.startswith("sku-") for i in result.ids)
    assert not {"sku-5", "sku-17"} & set(result.ids)
    with pytest.raises(ExportError, match="unknown item id.*sku-nope"):
        recommender.recommend(["sku-5", "sku-nope"], 5)


def test_build_ivf_labels_are_item_ids():
    xb = torch.randn(500, 8, generator=torch.Generator().manual_seed(0)).numpy()
    index = build_ivf(xb, nlist=10, nprobe=10)
    _, I = index.search(xb[:3], 1)
    # exhaustive inner-product search: the top item is the exact argmax of xq · xb
    assert I[:, 0].tolist() == ((xb[:3] @ xb.T).argmax(axis=1) + 1).tolist()


def test_the_run_folder_is_never_the_export_folder(run):
    for target in (run, run.parent):
        with pytest.raises(ExportError, match="would replace the run folder"):
            export_run(run, target, overwrite=True)
    assert (run / "best.pt").is_file()
