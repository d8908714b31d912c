"""annsample.train: batches visit every row once per epoch, one step's loss is finite with
gradients on every trained weight, the optimisers cover every parameter once, and NaN / inf
stops training before the update (the CLI's side of numerical faults: test_reliability.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO, TINY

from annsample import checkpoint as ckpt
from annsample import staleness
from annsample import train as train_mod
from annsample.config import load_config
from annsample.errors import NumericalError
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


@pytest.mark.parametrize("loss", ["bce", "sampled_softmax", "gbce", "full_ce"])
def test_step_loss_is_finite_with_gradients_on_the_item_table(loss):
    config = load_config(REPO / TINY, (f"loss.name={loss}",))
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
    assert value.dim() == 0 and torch.isfinite(value) and value > 0
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


def test_warmup_steps_draw_from_the_warmup_sampler_then_the_configured_one(tmp_path, monkeypatch):
    original = train_mod.step_loss
    seen = []

    def record(*args):
        seen.append((args[7], type(args[4]).__name__))  # (steps done, the sampler that served)
        return original(*args)

    monkeypatch.setattr(train_mod, "step_loss", record)
    monkeypatch.chdir(REPO)
    settings = (
        "train.epochs=1", "train.max_steps_per_epoch=5", "train.num_threads=1",
        "sampler.name=exact", "sampler.warmup_steps=3", "sampler.warmup_sampler=popularity",
        "sampler.beta=0.5",
    )  # fmt: skip
    train_mod.train(load_config(TINY, settings), tmp_path / "run")
    assert seen == [
        (0, "PopularitySampler"), (1, "PopularitySampler"), (2, "PopularitySampler"),
        (3, "ExactSampler"), (4, "ExactSampler"),
    ]  # fmt: skip
