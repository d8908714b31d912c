"""Checkpoint files: atomic writes, integrity checks that catch torn and altered files, safe loading
(no code runs from a pickle), fallback to the previous checkpoint, and exact restore of every RNG
and of the ANN sampler's index."""

from __future__ import annotations

import logging
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annsample import checkpoint as ckpt
from annsample.checkpoint import CorruptCheckpoint
from annsample.config import RunConfig, config_to_dict
from annsample.data import leave_one_out, read_sequences
from annsample.errors import CheckpointError
from annsample.index import ItemIndex
from annsample.refresh import EveryEpoch, IndexRefresher


def state(step: int = 7) -> dict:
    """A small checkpoint-shaped state with every kind of value a real one holds."""
    g = torch.Generator().manual_seed(step)
    return {
        "step": step,
        "config": config_to_dict(RunConfig()),
        "model": {"w": torch.randn(5, 3, generator=g), "mask": torch.ones(2, 2, dtype=torch.bool)},
        "optimizers": [{"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 1e-3}]}],
        "progress": {"best_ndcg": -1.0, "epoch_seconds": [0.5, 0.25], "stopped": False},
        "rng": ckpt.capture_rng({"order": torch.Generator().manual_seed(1).get_state()}),
        "index": None,
        "metrics_offset": 123,
    }


def write(run: Path, step: int, **changes) -> Path:
    return ckpt.save_checkpoint(run, {**state(step), **changes}, keep=10)


# --------------------------------------------------------------------------- write


def test_save_and_read_round_trip(tmp_path):
    path = write(tmp_path, 7)
    assert path == tmp_path / "checkpoints" / "step-000000007.pt"
    loaded = ckpt.read_checkpoint(path)
    expected = state(7)
    assert loaded["format"] == ckpt.FORMAT
    assert torch.equal(loaded["model"]["w"], expected["model"]["w"])
    assert loaded["progress"] == expected["progress"]
    assert loaded["optimizers"][0]["state"][0]["step"].item() == 3.0
    assert ckpt.state_digest({k: v for k, v in loaded.items() if k != "format"}) == (
        ckpt.state_digest(expected)
    )
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [path.name], "no temp files"


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    for step in (3, 6, 9, 12, 15):
        ckpt.save_checkpoint(tmp_path, state(step), keep=3)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-000000009.pt",
        "step-000000012.pt",
        "step-000000015.pt",
    ]


def test_steps_sort_numerically_past_the_padding(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name in ("step-1000000000.pt", "step-000000002.pt", "step-000000010.pt", "notes.pt"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == [
        "step-000000002.pt",
        "step-000000010.pt",
        "step-1000000000.pt",
    ]


def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "best.pt"
    ckpt.atomic_save({"w": torch.zeros(3)}, path)
    before = path.read_bytes()

    def torn_save(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        ckpt.atomic_save({"w": torch.ones(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


def test_atomic_write_text_replaces_whole_files(tmp_path):
    path = tmp_path / "results.json"
    ckpt.atomic_write_text(path, "old\n")
    ckpt.atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# --------------------------------------------------------------------------- integrity


def test_digest_sees_every_kind_of_change():
    base = state()
    variants = [
        {**base, "step": 8},
        {**base, "metrics_offset": 124},
        {**base, "progress": {**base["progress"], "best_ndcg": -0.5}},
        {**base, "model": {**base["model"], "w": base["model"]["w"].double()}},
        {**base, "model": {**base["model"], "w": base["model"]["w"].reshape(3, 5)}},
        {**base, "model": {"mask": base["model"]["mask"], "w": base["model"]["w"]}},  # key order
    ]
    flipped = base["model"]["w"].clone()
    flipped.view(torch.int32)[2, 1] ^= 1  # one bit of one float
    variants.append({**base, "model": {**base["model"], "w": flipped}})
    digests = {ckpt.state_digest(v) for v in variants}
    assert ckpt.state_digest(base) not in digests
    assert len(digests) == len(variants)


def test_a_flipped_byte_is_detected(tmp_path):
    # torch.load itself does not notice: the zip container does not check its data
    path = write(tmp_path, 7, model={"w": torch.zeros(20_000)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert torch.load(path, weights_only=True)["model"]["w"].abs().sum() > 0
    with pytest.raises(CorruptCheckpoint, match="integrity check"):
        ckpt.read_checkpoint(path)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[: len(data) // 2], "cannot be read"),
        (lambda data: b"", "cannot be read"),
        (lambda data: b"not a checkpoint at all", "cannot be read"),
    ],
    ids=["truncated", "empty", "garbage"],
)
def test_torn_files_are_detected(tmp_path, damage, message):
    path = write(tmp_path, 7)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CorruptCheckpoint, match=message):
        ckpt.read_checkpoint(path)


def test_other_torch_files_are_not_checkpoints(tmp_path):
    path = tmp_path / "step-000000001.pt"
    torch.save({"w": torch.zeros(2)}, path)
    with pytest.raises(CorruptCheckpoint, match="not an annsample checkpoint"):
        ckpt.read_checkpoint(path)


class _Payload:
    """Unpickling this runs code: what weights_only=True exists to refuse."""

    marker: Path

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_loading_never_runs_code_from_the_pickle(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "checkpoints" / "step-000000001.pt"
    path.parent.mkdir()
    torch.save({"format": ckpt.FORMAT, "step": 1, "evil": payload}, path)
    with pytest.raises(CorruptCheckpoint, match="cannot be read"):
        ckpt.read_checkpoint(path)
    assert not marker.exists()


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(content=st.one_of(st.binary(max_size=400), st.binary(min_size=1, max_size=64)))
def test_arbitrary_bytes_are_refused_cleanly(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "step-000000001.pt"
        path.write_bytes(content)
        with pytest.raises(CorruptCheckpoint):
            ckpt.read_checkpoint(path)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(position=st.floats(0, 1, exclude_max=True), value=st.integers(1, 255))
def test_any_single_byte_change_is_refused(position, value):
    with tempfile.TemporaryDirectory() as folder:
        path = write(Path(folder), 3)
        data = bytearray(path.read_bytes())
        data[int(position * len(data))] ^= value
        path.write_bytes(bytes(data))
        try:
            ckpt.read_checkpoint(path)
        except CorruptCheckpoint:
            return
        # zip slack (alignment padding, unused header fields) may change without changing a value
        assert ckpt.state_digest(torch.load(path, weights_only=True)["model"]) == (
            ckpt.state_digest(state(3)["model"])
        )


# --------------------------------------------------------------------------- fallback


def test_latest_falls_back_past_corrupt_checkpoints_with_a_warning(tmp_path, caplog):
    for step in (5, 10, 15):
        write(tmp_path, step)
    newest = ckpt.list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="annsample.checkpoint"):
        path, payload, corrupt = ckpt.latest_checkpoint(tmp_path)
    assert path.name == "step-000000010.pt" and payload["step"] == 10
    assert corrupt == [newest]
    assert "step-000000015.pt" in caplog.text and "step-000000010.pt" in caplog.text
    (tmp_path / "checkpoints" / ".step-000000020.pt.99.tmp").write_bytes(b"half")
    ckpt.set_aside(tmp_path, corrupt)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-000000005.pt",
        "step-000000010.pt",
        "step-000000015.pt.corrupt",
    ]


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match=r"has no checkpoints to resume from.*--overwrite"):
        ckpt.latest_checkpoint(tmp_path)


def test_all_corrupt_is_a_clear_error(tmp_path):
    for step in (5, 10):
        write(tmp_path, step).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"none of the 2 checkpoints .* can be read"):
        ckpt.latest_checkpoint(tmp_path)


# --------------------------------------------------------------------------- matching


def test_another_config_is_refused_naming_the_setting(tmp_path):
    payload = {"config": config_to_dict(RunConfig())}
    changed = config_to_dict(RunConfig())
    changed["train"]["lr"] = 0.01
    changed["sampler"]["index"]["nlist"] = 8
    with pytest.raises(
        CheckpointError,
        match=r"written with sampler\.index\.nlist=0 but the config now has "
        r"sampler\.index\.nlist=8 \(and 1 more: train\.lr\)",
    ):
        ckpt.check_config(payload, changed, tmp_path / "step-1.pt")


def test_harmless_settings_may_change_on_resume(tmp_path):
    payload = {"config": config_to_dict(RunConfig())}
    changed = config_to_dict(RunConfig())
    changed["train"]["show_progress"] = False
    changed["train"]["keep_checkpoints"] = 5
    assert ckpt.check_config(payload, changed, tmp_path / "x.pt") == [
        "train.keep_checkpoints",
        "train.show_progress",
    ]


NEW_KEYS = (
    ("model", "layer_norm"),
    ("sampler", "in_batch_negatives"),
    ("sampler", "uniform_candidates"),
    ("loss", "corrected_logq"),
    ("loss", "sce_scale"),
    ("train", "lr_warmup_steps"),
    ("train", "lr_schedule"),
)


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default(tmp_path):
    old = config_to_dict(RunConfig())
    for section, key in NEW_KEYS:  # a checkpoint written before these settings existed
        del old[section][key]
    payload = {"config": old}
    defaults = config_to_dict(RunConfig())
    assert (
        ckpt.check_config(payload, config_to_dict(RunConfig()), tmp_path / "x.pt", defaults) == []
    )
    scheduled = config_to_dict(RunConfig())
    scheduled["train"]["lr_schedule"] = "cosine"
    with pytest.raises(
        CheckpointError,
        match=r"written with train\.lr_schedule='constant' but the config now has "
        r"train\.lr_schedule='cosine'",
    ):
        ckpt.check_config(payload, scheduled, tmp_path / "x.pt", defaults)
    # without the defaults, a missing key is a difference (what check_config did before)
    with pytest.raises(CheckpointError, match="<unset>"):
        ckpt.check_config(payload, config_to_dict(RunConfig()), tmp_path / "x.pt")


def test_a_checkpoint_without_schedulers_restores_a_run_without_one():
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters())
    payload = {
        "model": model.state_dict(),
        "optimizers": [optimizer.state_dict()],
        "rng": ckpt.capture_rng({}),
        "progress": {"step": 3},
    }  # no "schedulers": written before they were saved
    assert ckpt.restore_training(payload, model, [optimizer], {}).step == 3
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    with pytest.raises(CheckpointError, match="does not fit"):
        ckpt.restore_training(payload, model, [optimizer], {}, [scheduler])


def test_another_catalog_is_refused(tmp_path):
    split = leave_one_out(read_sequences(REPO / "data" / "tiny.txt"))
    saved = {"catalog": ckpt.catalog_summary(split)}
    fewer = dict(saved["catalog"], n_items=saved["catalog"]["n_items"] - 1)
    with pytest.raises(CheckpointError, match=r"catalog of \d+ items but d\.txt now gives \d+"):
        ckpt.check_catalog(saved, fewer, tmp_path / "c.pt", "d.txt")
    shuffled = dict(saved["catalog"], sha256="0" * 64)
    with pytest.raises(CheckpointError, match="same sizes, different contents"):
        ckpt.check_catalog(saved, shuffled, tmp_path / "c.pt", "d.txt")
    ckpt.check_catalog(saved, ckpt.catalog_summary(split), tmp_path / "c.pt", "d.txt")


# --------------------------------------------------------------------------- RNG and index


def draws(generator: torch.Generator) -> tuple:
    return (
        random.random(),
        float(np.random.rand()),
        float(np.random.randn()),
        float(torch.rand(1)),
        float(torch.rand(1, generator=generator)),
    )


def test_every_rng_is_restored(tmp_path):
    generator = torch.Generator().manual_seed(5)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    captured = ckpt.capture_rng({"sampler": generator.get_state()})
    path = ckpt.save_checkpoint(tmp_path, {"step": 1, "rng": captured}, keep=1)
    expected = [draws(generator) for _ in range(3)]
    for _ in range(5):
        draws(generator)
    ckpt.restore_rng(ckpt.read_checkpoint(path)["rng"], {"sampler": generator})
    assert [draws(generator) for _ in range(3)] == expected


def test_refresher_state_restores_the_exact_index(tmp_path):
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(600, 8, generator=g)

    def factory():
        return ItemIndex(8, nlist=8, nprobe=2, backend="faiss", seed=3)

    ids = torch.arange(1, 601)
    refresher, schedule = IndexRefresher(factory), EveryEpoch(retrain_every=2)
    refresher.build(xb, step=0, ids=ids)
    for step in (4, 8, 12):
        kind = schedule.should_refresh(step, epoch_end=True)
        refresher.request(kind, xb + 0.1 * step * torch.randn(600, 8, generator=g), step)
    saved = ckpt.refresher_state(refresher, schedule)
    path = ckpt.save_checkpoint(tmp_path, {"step": 12, "index": saved}, keep=1)

    restored, restored_schedule = IndexRefresher(factory), EveryEpoch(retrain_every=2)
    state_back = ckpt.read_checkpoint(path)["index"]
    ckpt.restore_refresher(restored, restored_schedule, state_back, torch.device("cpu"))
    xq = torch.randn(50, 8, generator=g)
    D, I = refresher.current().search(xq, 20)
    D2, I2 = restored.current().search(xq, 20)
    assert torch.equal(I, I2) and torch.equal(D, D2)
    volatile = re.compile(r"seconds")
    assert {k: v for k, v in refresher.stats(13).items() if not volatile.search(k)} == {
        k: v for k, v in restored.stats(13).items() if not volatile.search(k)
    }
    assert restored_schedule.refreshes == 3
    # the next refresh goes on from the same centroids in both
    nxt = xb - 0.2
    kind = schedule.should_refresh(16, epoch_end=True)
    assert kind == restored_schedule.should_refresh(16, epoch_end=True) == "retrain"
    refresher.request(kind, nxt, 16)
    restored.request(kind, nxt, 16)
    assert torch.equal(refresher.current().centroids, restored.current().centroids)
    assert torch.equal(refresher.current().search(xq, 20)[1], restored.current().search(xq, 20)[1])
    refresher.close()
    restored.close()
