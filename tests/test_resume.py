"""``annsample train --resume``: a run killed with SIGKILL at a random step and resumed ends with the
same metrics, the same best weights and the same final training state (weights, optimiser moments,
RNGs, index) as the uninterrupted run; resuming the wrong thing is a clear error.

Set ANNSAMPLE_KILL_SEED to replay a particular kill point.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SCRIPT, TINY, TINY_ANN, invoke, metrics_records

from annsample import checkpoint as ckpt
from annsample import train as train_mod
from annsample.config import load_config
from annsample.errors import CheckpointError

BASE = (
    "train.num_threads=1",
    "train.lr=5e-3",
    "train.patience=20",
    "train.checkpoint_every=4",
    "train.log_every=1",
)
RUNS = {
    "uniform": (*BASE, "train.epochs=6"),
    "ann": (
        *BASE,
        "train.epochs=6",
        *TINY_ANN,
    ),
}
VOLATILE = ("time", "seconds")  # wall-clock fields: train/epoch_seconds, index/*_seconds


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(word in k for word in VOLATILE)}


def results(run: Path) -> dict:
    return stable(json.loads((run / "results.json").read_text(encoding="utf-8")))


def final_state(state: dict) -> dict:
    """The last checkpoint a run writes, without its wall-clock fields and log offset."""
    progress = {
        k: v for k, v in state["progress"].items() if k not in ("epoch_seconds", "epoch_elapsed")
    }
    index = state["index"]
    if index is not None:
        counters = {k: v for k, v in index["counters"].items() if "seconds" not in k}
        index = {**index, "counters": counters}
    kept = ("model", "optimizers", "schedulers", "rng", "step", "config", "catalog")
    return {**{key: state[key] for key in kept}, "progress": progress, "index": index}


class LastCheckpoint:
    """Digests of each part of the last checkpoint a run writes (the final epoch's end), taken
    when it is written (its tensors are the live weights, which the best ones replace later)."""

    def __init__(self, monkeypatch) -> None:
        self.digests: dict[str, str] = {}
        original = ckpt.save_checkpoint

        def spy(run_dir, state, keep):
            self.digests = {k: ckpt.state_digest(v) for k, v in final_state(state).items()}
            return original(run_dir, state, keep)

        monkeypatch.setattr(ckpt, "save_checkpoint", spy)

    def differences(self, reference: dict[str, str]) -> list[str]:
        assert self.digests, "the run wrote no checkpoint"
        return [key for key in reference if self.digests.get(key) != reference[key]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, in-process: name -> (run folder, digests of the final state)."""
    done = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        for name, overrides in RUNS.items():
            spy = LastCheckpoint(patch)
            out = tmp_path_factory.mktemp(name) / "run"
            train_mod.train(load_config(TINY, overrides), out)
            done[name] = (out, spy.digests)
    return done


def kill_mid_run(
    out: Path, overrides: tuple[str, ...], rng: random.Random, earliest: int = 4
) -> int:
    """Start ``annsample train`` in a fresh process and SIGKILL it at a random step after a
    random checkpoint (step ``earliest`` or later); returns the last step it logged."""
    if not SCRIPT.is_file():
        pytest.skip(f"console script not installed next to {sys.executable}; pip install -e .")
    sets = [arg for override in overrides for arg in ("--set", override)]
    # a checkpoint step in the first 24 of 42 steps, then up to 80 ms (a few steps) more
    target = rng.choice([step for step in (4, 8, 12, 16, 20, 24) if step >= earliest])
    delay = rng.uniform(0.0, 0.08)
    process = subprocess.Popen(
        [str(SCRIPT), "train", "--config", TINY, *sets, "--out", str(out)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(int(p.stem[5:]) >= target for p in ckpt.list_checkpoints(out)):
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait(timeout=60)
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "results.json").exists()
    return max(r["step"] for r in metrics_records(out))


def assert_same_run(resumed: Path, reference_run: Path, where: str) -> None:
    assert results(resumed) == results(reference_run), where
    assert [stable(r) for r in metrics_records(resumed)] == [
        stable(r) for r in metrics_records(reference_run)
    ], where
    a = torch.load(resumed / "best.pt", weights_only=True)
    b = torch.load(reference_run / "best.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), where
    assert not (resumed / "checkpoints").exists(), "a finished run removes its checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "corrupt_newest"),
    [("uniform", False), ("ann", False), ("uniform", True)],
    ids=["uniform", "ann", "uniform-torn-newest-checkpoint"],
)
def test_killed_run_resumes_exactly(reference, tmp_path, monkeypatch, caplog, name, corrupt_newest):
    seed = int(os.environ.get("ANNSAMPLE_KILL_SEED", 0)) or random.SystemRandom().randrange(
        1, 2**32
    )
    rng = random.Random(seed)
    out = tmp_path / "run"
    killed_at = kill_mid_run(out, RUNS[name], rng, earliest=8 if corrupt_newest else 4)
    checkpoints = ckpt.list_checkpoints(out)
    if corrupt_newest:
        assert len(checkpoints) >= 2, f"seed {seed}"
        newest = checkpoints[-1]
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    resume_from = checkpoints[-2 if corrupt_newest else -1]

    spy = LastCheckpoint(monkeypatch)
    result = invoke(["train", "--resume", str(out)])
    assert result.exit_code == 0, f"seed {seed}: {result.output}"
    reference_run, reference_digests = reference[name]
    where = f"seed {seed}: killed at step {killed_at}, resumed from {resume_from.name}"
    assert_same_run(out, reference_run, where)
    differ = spy.differences(reference_digests)
    assert not differ, f"{where}: the final training state differs in {differ}"
    if corrupt_newest:
        assert (
            f"checkpoint {checkpoints[-1]}" in caplog.text and "trying the previous" in caplog.text
        )
    print(where)


# --------------------------------------------------------------------------- refusals


def interrupt(out: Path, overrides: tuple[str, ...], evaluations: int) -> Path:
    """Train in-process until validation number ``evaluations`` (which crashes); leaves a run
    folder with checkpoints, as a killed run would."""
    calls = []
    original = train_mod.evaluate_model

    def evaluate_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == evaluations:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setattr(train_mod, "evaluate_model", evaluate_then_crash)
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(load_config(TINY, overrides), out)
    assert ckpt.list_checkpoints(out)
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    return interrupt(tmp_path_factory.mktemp("interrupted") / "run", RUNS["uniform"], 3)


def snapshot(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_clean_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--set", "train.lr=0.01"], ["train.lr=0.005", "train.lr=0.01", "drop --config/--set"]),
        (["--set", "sampler.name=pool"], ["sampler.name='uniform'", "sampler.name='pool'"]),
        (["--config", TINY], ["train.epochs=6", "train.epochs=2", "(and 4 more"]),
        (["--out", "elsewhere"], ["--resume continues RUN_DIR in place", "drop --out"]),
        (["--overwrite"], ["drop --overwrite"]),
    ],
    ids=["lr", "sampler", "other-config-file", "out", "overwrite"],
)
def test_resume_refuses_another_config(interrupted, extra, fragments):
    before = snapshot(interrupted)
    assert_clean_error(invoke(["train", "--resume", str(interrupted), *extra]), *fragments)
    assert snapshot(interrupted) == before


def test_resume_refuses_another_catalog(tmp_path):
    data = tmp_path / "data.txt"
    data.write_bytes((REPO / "data" / "tiny.txt").read_bytes())
    out = interrupt(tmp_path / "run", (*RUNS["uniform"], f"data.path={data}"), 1)
    lines = data.read_text().splitlines()
    data.write_text("\n".join([*lines, "9999 1 2 3 4"]) + "\n")
    assert_clean_error(invoke(["train", "--resume", str(out)]), "users but", "dataset changed")
    data.write_text("\n".join([*lines[1:], lines[0]]) + "\n")  # same users, another order
    assert_clean_error(invoke(["train", "--resume", str(out)]), "different contents")


def test_harmless_settings_may_change_on_resume(interrupted, tmp_path):
    out = copy_run(interrupted, tmp_path / "run")
    result = invoke(["train", "--resume", str(out), "--set", "train.keep_checkpoints=1"])
    assert result.exit_code == 0, result.output
    assert load_config(out / "config.yaml").train.keep_checkpoints == 1


@pytest.mark.parametrize(
    ("make", "fragments"),
    [
        (lambda run: None, ["does not exist"]),
        (lambda run: run.mkdir(), ["has no config.yaml"]),
        (
            lambda run: (run.mkdir(), (run / "config.yaml").write_bytes(b"name: x\n")),
            ["has no checkpoints to resume from", "--overwrite"],
        ),
        (
            lambda run: (
                run.mkdir(),
                (run / "config.yaml").write_bytes(b"name: x\n"),
                (run / "results.json").write_bytes(b"{}"),
            ),
            ["already finished"],
        ),
    ],
    ids=["missing", "no-config", "no-checkpoints", "finished"],
)
def test_resume_of_what_is_not_an_interrupted_run(tmp_path, make, fragments):
    run = tmp_path / "run"
    make(run)
    assert_clean_error(invoke(["train", "--resume", str(run)]), *fragments)


# --------------------------------------------------------------------------- more state to restore


VARIANTS = {
    # SparseAdam moments, and a sampler that scores candidates with the current embeddings
    "sparse-dns": ("model.sparse_embeddings=true", "sampler.name=dns", "sampler.pool_size=64"),
    # the adaptive schedule's refresh count and the monitor's built table (drift)
    "ann-adaptive": (
        "sampler.name=ann",
        "sampler.index.nlist=16",
        "sampler.index.nprobe=4",
        "sampler.candidates=50",
        "sampler.index.refresh=adaptive",
        "sampler.index.drift_threshold=0.02",
        "sampler.index.check_every=3",
        "sampler.index.retrain_every=2",
    ),
    # a learning-rate warm-up and cosine decay (the schedulers' state) on a pre-LN model
    "lr-schedule": (
        "train.lr_schedule=cosine",
        "train.lr_warmup_steps=5",
        "model.layer_norm=pre",
    ),
    # in-batch and uniform negatives (the batch's positives) with the corrected logQ
    "mixed-corrected-logq": (
        "sampler.name=mixed",
        "sampler.num_negatives=8",
        "sampler.in_batch_negatives=4",
        "loss.name=sampled_softmax",
        "loss.corrected_logq=true",
    ),
    # the pure-torch IVF's lists and centroids, re-added and retrained across the interruption
    "ann-torch-ivf": (
        "sampler.name=ann",
        "sampler.index.backend=torch_ivf",
        "sampler.index.nlist=16",
        "sampler.index.nprobe=4",
        "sampler.candidates=50",
        "sampler.index.refresh_every=3",
        "sampler.index.retrain_every=2",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_interrupted_run_resumes_exactly_in_process(tmp_path, monkeypatch, variant):
    overrides = (*BASE, "train.epochs=3", *VARIANTS[variant])
    monkeypatch.chdir(REPO)
    spy = LastCheckpoint(monkeypatch)
    train_mod.train(load_config(TINY, overrides), tmp_path / "reference")
    reference_digests = spy.digests
    out = interrupt(tmp_path / "run", overrides, 2)
    resumed_from = ckpt.list_checkpoints(out)[-1].name
    spy = LastCheckpoint(monkeypatch)
    train_mod.train(load_config(TINY, overrides), out, resume=True)
    assert_same_run(out, tmp_path / "reference", f"{variant} from {resumed_from}")
    assert not spy.differences(reference_digests)


def test_asynchronous_refresh_resumes_approximately(tmp_path, monkeypatch):
    """A background refresh in flight at the checkpoint is not saved: the resumed run continues
    from the published index (documented as approximate), and finishes."""
    overrides = (*RUNS["ann"], "train.epochs=2", "sampler.index.asynchronous=true")
    out = interrupt(tmp_path / "run", overrides, 2)
    monkeypatch.chdir(REPO)
    results = train_mod.train(load_config(TINY, overrides), out, resume=True)
    assert results["epochs_run"] == 2 and (out / "best.pt").is_file()


def copy_run(source: Path, target: Path) -> Path:
    for path in source.rglob("*"):
        if path.is_file():
            (target / path.relative_to(source)).parent.mkdir(parents=True, exist_ok=True)
            (target / path.relative_to(source)).write_bytes(path.read_bytes())
    return target


def test_a_shortened_metrics_log_is_refused(interrupted, tmp_path):
    out = copy_run(interrupted, tmp_path / "run")
    (out / "metrics.jsonl").write_text('{"step": 1}\n', encoding="utf-8")
    assert_clean_error(invoke(["train", "--resume", str(out)]), "records are missing")


def test_a_best_pt_from_lost_progress_is_refused(tmp_path, monkeypatch):
    """best.pt replaced after the checkpoint, and not rewritten by the resumed run (as on a GPU,
    where the recomputed epoch may score lower): the digest check refuses to test it."""
    # with these settings validation NDCG@10 drops in epoch 2: no new best.pt
    overrides = (*BASE, "train.epochs=2", "train.lr=0.001", "train.bucket_by_length=true")
    out = interrupt(tmp_path / "run", overrides, 2)
    state = torch.load(out / "best.pt", weights_only=True)
    torch.save({name: torch.zeros_like(tensor) for name, tensor in state.items()}, out / "best.pt")
    monkeypatch.chdir(REPO)
    with pytest.raises(CheckpointError, match="does not hold the weights of the best epoch"):
        train_mod.train(load_config(TINY, overrides), out, resume=True)
