"""annsample.train: batches visit every row once per epoch, one step's loss is finite with
gradients on every trained weight, the optimisers cover every parameter once, and NaN / inf
stops training before the update (the CLI's side of numerical faults: test_reliability.py)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import REPO, TINY, TINY_ANN, metrics_records

from annsample import checkpoint as ckpt
from annsample import staleness
from annsample import train as train_mod
from annsample.config import TrainConfig, load_config
from annsample.errors import ConfigError, NumericalError
from annsample.model import SASRec
from annsample.samplers import UniformSampler

NAN_RUN = ("train.epochs=2", "train.checkpoint_every=2", "train.num_threads=1")


@pytest.mark.parametrize("bucket_by_length", [False, True])
def test_batches_visit_every_row_once_per_epoch(bucket_by_length):
    lengths = torch.randint(1, 21, (1000,), generator=torch.Generator().manual_seed(0))
    batches = train_mod.make_batches(
        lengths, 64, bucket_by_length, torch.Generator().manual_seed(1)
    )
    rows = torch.cat(batches)
    assert torch.equal(rows.sort().values, torch.arange(1000))
    assert all(len(b) <= 64 for b in batches)
    again = train_mod.make_batches(lengths, 64, bucket_by_length, torch.Generator().manual_seed(1))
    assert all(torch.equal(x, y) for x, y in zip(batches, again, strict=True))  # seeded
    if bucket_by_length:
        # a batch holds sequences of similar length: far narrower spread than random batches
        spread = sum(int(lengths[b].max() - lengths[b].min()) for b in batches) / len(batches)
        assert spread < 5
    else:
        assert rows.tolist() != list(range(1000))  # shuffled


STEP_LOSSES = {
    "bce": ("loss.name=bce",),
    "sampled_softmax": ("loss.name=sampled_softmax",),
    "gbce": ("loss.name=gbce",),
    "full_ce": ("loss.name=full_ce",),
    "scaled_ce": ("loss.name=scaled_ce", "sampler.num_negatives=20"),
    "corrected_logq": ("loss.name=sampled_softmax", "loss.corrected_logq=true"),
}


@pytest.mark.parametrize("loss", STEP_LOSSES)
def test_step_loss_is_finite_with_gradients_on_the_item_table(loss):
    config = load_config(REPO / TINY, STEP_LOSSES[loss])
    n_items = 50
    model = SASRec(n_items, config.data.max_len, config.model)
    g = torch.Generator().manual_seed(0)
    seq = torch.randint(1, n_items + 1, (4, config.data.max_len), generator=g)
    seq[:, :5] = 0  # left padding
    tgt = torch.roll(seq, -1, dims=1)
    tgt[:, -1] = 7
    tgt[seq == 0] = 0
    sampler = None if loss == "full_ce" else UniformSampler()
    histories = seq.clone()
    value = train_mod.step_loss(model, seq, tgt, config, sampler, histories, n_items, 0, g)
    assert value.dim() == 0 and torch.isfinite(value)
    assert value > 0 or loss == "corrected_logq"  # no positive in its denominator: may be < 0
    value.backward()
    grad = model.item_embedding.weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad[1:].abs().sum() > 0


@pytest.mark.parametrize("sparse", [False, True])
def test_optimisers_cover_every_parameter_once(sparse):
    config = load_config(REPO / TINY, (f"model.sparse_embeddings={str(sparse).lower()}",))
    model = SASRec(50, config.data.max_len, config.model)
    optimisers = train_mod.make_optimizers(model, config)
    covered = [id(p) for o in optimisers for group in o.param_groups for p in group["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())
    kinds = [type(o).__name__ for o in optimisers]
    assert kinds == (["SparseAdam", "Adam"] if sparse else ["Adam"])


@pytest.mark.parametrize("sparse", [False, True])
def test_embedding_lr_applies_to_the_item_table_only(sparse):
    flags = (f"model.sparse_embeddings={str(sparse).lower()}", "train.lr=1e-3")
    config = load_config(REPO / TINY, (*flags, "train.embedding_lr=1e-2"))
    model = SASRec(50, config.data.max_len, config.model)
    optimisers = train_mod.make_optimizers(model, config)
    table = model.item_embedding.weight
    lrs = {
        id(p): group["lr"] for o in optimisers for group in o.param_groups for p in group["params"]
    }
    assert lrs.pop(id(table)) == 1e-2
    assert set(lrs.values()) == {1e-3}
    covered = [id(p) for o in optimisers for group in o.param_groups for p in group["params"]]
    assert sorted(covered) == sorted(id(p) for p in model.parameters())
    # 0 (the default) means train.lr for the table too
    same = train_mod.make_optimizers(model, load_config(REPO / TINY, flags))
    assert {group["lr"] for o in same for group in o.param_groups} == {1e-3}


@pytest.mark.parametrize("value", ["-1e-3", ".nan"])
def test_embedding_lr_rejects_bad_values(value):
    with pytest.raises(ConfigError, match="train.embedding_lr"):
        load_config(REPO / TINY, (f"train.embedding_lr={value}",))


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def test_non_finite_gradients_stop_training_before_the_update(tmp_path, monkeypatch):
    original = train_mod.step_loss

    def nan_gradients_from_step_5(*args):
        loss = original(*args)
        return _NanGradient.apply(loss) if args[7] >= 4 else loss  # args[7]: steps done

    monkeypatch.setattr(train_mod, "step_loss", nan_gradients_from_step_5)
    monkeypatch.chdir(REPO)
    with pytest.raises(NumericalError) as error:
        train_mod.train(load_config(TINY, NAN_RUN), tmp_path / "run")
    message = str(error.value)
    assert "training diverged at step 5: the gradients of " in message
    assert "item_embedding.weight" in message and "hold NaN or inf" in message
    assert "step-000000004.pt" in message
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")][-1] == "step-000000004.pt"


def test_the_index_is_not_refreshed_from_non_finite_embeddings(tmp_path, monkeypatch):
    original = staleness.item_table_snapshot
    calls = []

    def nan_after_the_build(model):
        calls.append(1)  # 1: the first build, 2: the monitor's copy, 3: the first refresh
        table = original(model)
        return table * float("nan") if len(calls) >= 3 else table

    monkeypatch.setattr(staleness, "item_table_snapshot", nan_after_the_build)
    monkeypatch.chdir(REPO)
    ann = ("sampler.name=ann", "sampler.index.nlist=16", "sampler.index.nprobe=4")
    config = load_config(TINY, (*NAN_RUN, *ann, "sampler.index.refresh_every=3"))
    with pytest.raises(NumericalError, match="at step 3: the item embeddings hold NaN or inf, so "):
        train_mod.train(config, tmp_path / "run")


def served_samplers(monkeypatch, tmp_path, settings) -> list[tuple[int, str, float | None]]:
    """Train TINY with ``settings``; (steps done, sampler class, blend share) of every step."""
    original = train_mod.step_loss
    seen = []

    def record(*args):
        sampler = args[4]
        seen.append((args[7], type(sampler).__name__, getattr(sampler, "share", None)))
        return original(*args)

    monkeypatch.setattr(train_mod, "step_loss", record)
    monkeypatch.chdir(REPO)
    train_mod.train(load_config(TINY, settings), tmp_path / "run")
    return seen


def test_warmup_steps_draw_from_the_warmup_sampler_then_the_configured_one(tmp_path, monkeypatch):
    settings = (
        "train.epochs=1", "train.max_steps_per_epoch=5", "train.num_threads=1",
        "sampler.name=exact", "sampler.warmup_steps=3", "sampler.warmup_sampler=popularity",
        "sampler.beta=0.5",
    )  # fmt: skip
    seen = served_samplers(monkeypatch, tmp_path, settings)
    assert [(step, name) for step, name, _ in seen] == [
        (0, "PopularitySampler"), (1, "PopularitySampler"), (2, "PopularitySampler"),
        (3, "ExactSampler"), (4, "ExactSampler"),
    ]  # fmt: skip


def test_a_blended_hand_over_lowers_the_warmup_share_step_by_step(tmp_path, monkeypatch):
    settings = (
        "train.epochs=1", "train.max_steps_per_epoch=7", "train.num_threads=1",
        "sampler.name=exact", "sampler.warmup_steps=2", "sampler.warmup_sampler=popularity",
        "sampler.warmup_blend_steps=3",
    )  # fmt: skip
    seen = served_samplers(monkeypatch, tmp_path, settings)
    assert [(step, name) for step, name, _ in seen] == [
        (0, "PopularitySampler"), (1, "PopularitySampler"), (2, "BlendSampler"),
        (3, "BlendSampler"), (4, "BlendSampler"), (5, "ExactSampler"), (6, "ExactSampler"),
    ]  # fmt: skip
    assert [share for _, _, share in seen[2:5]] == pytest.approx([0.75, 0.5, 0.25])


def test_a_warmup_share_keeps_the_warmup_sampler_in_the_mix_after_the_hand_over(
    tmp_path, monkeypatch
):
    settings = (
        "train.epochs=1", "train.max_steps_per_epoch=6", "train.num_threads=1",
        "sampler.name=exact", "sampler.warmup_steps=1", "sampler.warmup_sampler=popularity",
        "sampler.warmup_blend_steps=3", "sampler.warmup_share=0.2",
    )  # fmt: skip
    seen = served_samplers(monkeypatch, tmp_path, settings)
    assert [name for _, name, _ in seen] == ["PopularitySampler"] + ["BlendSampler"] * 5
    # the hand-over falls from 1 towards 0.2 and stays there
    assert [share for _, _, share in seen[1:]] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2])


def test_a_warmup_share_alone_blends_from_the_first_step(tmp_path, monkeypatch):
    settings = (
        "train.epochs=1", "train.max_steps_per_epoch=2", "train.num_threads=1",
        "sampler.name=exact", "sampler.warmup_sampler=popularity", "sampler.warmup_share=0.5",
    )  # fmt: skip
    seen = served_samplers(monkeypatch, tmp_path, settings)
    assert [(name, share) for _, name, share in seen] == [("BlendSampler", 0.5)] * 2


def test_retrain_below_retrains_exactly_when_the_recall_before_a_refresh_is_low(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    settings = (
        *TINY_ANN, "train.epochs=2", "train.max_steps_per_epoch=6", "train.num_threads=1",
        "sampler.index.retrain_every=0", "sampler.index.retrain_below=0.7",
        "sampler.index.probe_every=0",
    )  # fmt: skip
    train_mod.train(load_config(TINY, settings), tmp_path / "run")
    refreshes = [r for r in metrics_records(tmp_path / "run") if r.get("index/refresh")]
    assert len(refreshes) == 4  # steps 3, 6, 9, 12
    for record in refreshes:
        low = record["index/recall@k"] < 0.7
        assert record["index/refresh"] == ("retrain" if low else "re_add"), record


# --------------------------------------------------------------------------- recipe knobs

# train/loss of the first steps of configs/tiny.yaml, recorded before the learning-rate schedule,
# layer-norm placement and the new losses existed (commit 1d65aec); the defaults must reproduce
# them (to float32 rounding: another CPU's kernels may round differently; any real change of
# behaviour moves them by far more)
BEFORE = {
    (): [1.3868815898895264, 1.3934814929962158, 1.387401819229126, 1.3874199390411377],
    ("loss.name=sampled_softmax", "sampler.num_negatives=8"): [
        8.120235443115234, 8.116147994995117, 8.11029052734375, 8.12192440032959,
    ],
}  # fmt: skip
SHORT = (
    "train.epochs=1",
    "train.max_steps_per_epoch=4",
    "train.log_every=1",
    "train.num_threads=1",
    # the settings of that time, which the recipe's defaults have since changed
    "train.lr=0.001",
    "train.bucket_by_length=true",
)


def step_losses(out) -> list[float]:
    return [r["train/loss"] for r in metrics_records(out) if "train/loss" in r]


@pytest.mark.parametrize("extra", BEFORE, ids=["bce", "sampled_softmax"])
def test_defaults_reproduce_the_losses_from_before_the_recipe_knobs(tmp_path, monkeypatch, extra):
    monkeypatch.chdir(REPO)
    train_mod.train(load_config(TINY, (*SHORT, *extra)), tmp_path / "run")
    default = step_losses(tmp_path / "run")
    assert default == pytest.approx(BEFORE[extra], rel=1e-5)
    explicit = ("model.layer_norm=post", "train.lr_schedule=constant", "train.lr_warmup_steps=0")
    train_mod.train(load_config(TINY, (*SHORT, *extra, *explicit)), tmp_path / "explicit")
    assert step_losses(tmp_path / "explicit") == default  # the same machine: bit-identical


def test_steps_per_epoch_counts_the_batches_make_batches_gives():
    lengths = torch.randint(1, 21, (1000,), generator=torch.Generator().manual_seed(0))
    for bucket in (False, True):
        batches = train_mod.make_batches(lengths, 64, bucket, torch.Generator().manual_seed(1))
        tc = TrainConfig(batch_size=64, bucket_by_length=bucket)
        assert train_mod.steps_per_epoch(1000, tc) == len(batches) == 16
    assert train_mod.steps_per_epoch(1000, TrainConfig(batch_size=64, max_steps_per_epoch=5)) == 5


@pytest.mark.parametrize(
    ("schedule", "warmup", "expected"),
    [
        ("constant", 0, [1.0] * 6),
        ("constant", 3, [1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0]),
        ("linear", 0, [1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6]),
        ("linear", 2, [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]),
        ("cosine", 2, [0.5, 1.0, 1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, 0.14644660940672627]),
    ],
)
def test_lr_factor_warms_up_linearly_then_decays_to_zero_at_the_last_step(
    schedule, warmup, expected
):
    tc = TrainConfig(lr_schedule=schedule, lr_warmup_steps=warmup)
    got = [train_mod.lr_factor(step, tc, 6) for step in range(6)]
    assert got == pytest.approx(expected, abs=1e-12)
    if schedule != "constant":
        assert train_mod.lr_factor(6, tc, 6) == pytest.approx(0.0, abs=1e-12)  # past the run
        assert train_mod.lr_factor(50, tc, 6) == pytest.approx(0.0, abs=1e-12)


def test_schedulers_set_every_optimisers_rate_and_none_exist_by_default():
    config = load_config(REPO / TINY, ("model.sparse_embeddings=true",))
    model = SASRec(50, config.data.max_len, config.model)
    optimisers = train_mod.make_optimizers(model, config)
    assert train_mod.make_schedulers(optimisers, config.train, 10) == []
    tc = TrainConfig(lr_schedule="cosine", lr_warmup_steps=2)
    schedulers = train_mod.make_schedulers(optimisers, tc, 10)
    assert len(schedulers) == 2  # SparseAdam and Adam
    for step in range(10):
        for optimiser in optimisers:
            lr = optimiser.param_groups[0]["lr"]
            assert lr == pytest.approx(config.train.lr * train_mod.lr_factor(step, tc, 10))
            optimiser.step()
        for scheduler in schedulers:
            scheduler.step()
    with pytest.raises(ConfigError, match="train.lr_warmup_steps=10 covers all 10 steps"):
        train_mod.make_schedulers(
            optimisers, TrainConfig(lr_warmup_steps=10, lr_schedule="linear"), 10
        )


def test_a_scheduled_run_checkpoints_its_scheduler_and_ends_at_rate_zero(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    saved = []
    original = ckpt.save_checkpoint
    monkeypatch.setattr(
        ckpt,
        "save_checkpoint",
        lambda out, state, keep: saved.append(state) or original(out, state, keep),
    )
    settings = (*SHORT, "train.lr_schedule=linear", "train.lr_warmup_steps=1", "train.lr=0.004")
    train_mod.train(load_config(TINY, settings), tmp_path / "run")
    state = saved[-1]  # the epoch end: 4 of the run's 4 steps done
    assert state["schedulers"][0]["last_epoch"] == 4
    assert state["optimizers"][0]["param_groups"][0]["lr"] == pytest.approx(0.0)
    assert state["optimizers"][0]["param_groups"][0]["initial_lr"] == 0.004


# the new baselines on the tiny catalog, as one short run each (data, size and speed overridden)
BASELINE_CONFIGS = [
    f"configs/{dataset}-{name}.yaml"
    for dataset in ("beauty", "sports")
    for name in ("uniform-ssm256", "sce", "tron", "mixed-ssm", "ann-ssm-corrected")
]
TINY_RUN = (
    f"data.path={REPO / 'data' / 'tiny.txt'}", "data.max_len=20", "model.hidden_size=16",
    "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=32", "train.num_threads=1",
    "train.show_progress=false", "train.log_every=1",
)  # fmt: skip


@pytest.mark.parametrize("path", BASELINE_CONFIGS)
def test_every_baseline_config_trains_through_the_trainer(tmp_path, monkeypatch, path):
    monkeypatch.chdir(REPO)
    extra = ()
    if "tron" in path:
        extra = ("sampler.uniform_candidates=2000",)  # the catalog holds 3,354 items
    if "ann" in path:
        extra = ("sampler.index.nlist=16", "sampler.index.nprobe=4")  # tiny: 39 points a list
    config = load_config(path, (*TINY_RUN, *extra))
    results = train_mod.train(config, tmp_path / "run")
    assert results["steps"] == 2 and results["name"] == config.name
    losses = step_losses(tmp_path / "run")
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
