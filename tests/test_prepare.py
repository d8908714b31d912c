"""annsample.prepare: the dataset a config names as training arrays, the sampler-fits check that
refuses impossible settings before any file is written, and the staleness probe set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import TINY_DATA as DATA
from conftest import TINY_PATH as TINY

from annsample.config import load_config
from annsample.errors import ConfigError, DataError, SamplerError
from annsample.prepare import check_sampler_fits, prepare_data, probe_set

ANN = ("sampler.name=ann", "sampler.index.nlist=16", "sampler.index.nprobe=4")


@pytest.fixture(scope="module")
def prepared():
    return prepare_data(load_config(TINY, (DATA,)))


def test_training_rows_have_targets_and_histories_are_each_users_training_items(prepared):
    split = prepared.split
    assert prepared.n_items == split.n_items == 3354
    assert (prepared.train_targets > 0).any(axis=1).all()  # rows without a target are dropped
    assert len(prepared.train_inputs) == len(prepared.train_users) <= split.n_users
    batch = torch.tensor([0, 5, len(prepared.train_users) - 1])
    histories = prepared.histories(batch, torch.device("cpu"))  # (B, H), 0 = padding
    for row, user in zip(histories, prepared.train_users[batch.numpy()], strict=True):
        train = split.train_items[split.train_indptr[user] : split.train_indptr[user + 1]]
        assert sorted(row[row > 0].tolist()) == sorted(set(train.tolist()))
    assert prepared.popularity.sum() == len(split.train_items) and prepared.popularity[0] == 0


def test_a_path_with_a_nul_byte_is_a_data_error():
    # --set refuses a NUL in YAML; a config built in Python reaches prepare_data with it
    config = load_config(TINY)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path="a\0b"))
    with pytest.raises(DataError, match="contains a NUL byte; fix the path"):
        prepare_data(config)


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        (
            (*ANN, "sampler.candidates=5000"),
            ConfigError,
            r"sampler.candidates=5000 is more than the catalog's 3354 items; lower it",
        ),
        (
            ("sampler.name=ann", "sampler.index.nlist=5000"),
            ConfigError,
            r"sampler.index: nlist=5000 is larger than the number of items N=3354",
        ),
    ],
)
def test_sampler_settings_the_catalog_cannot_satisfy_are_refused(
    prepared, overrides, error, message
):
    config = load_config(TINY, (DATA, *overrides))
    with pytest.raises(error, match=message):
        check_sampler_fits(config, prepared)
    check_sampler_fits(load_config(TINY, (DATA, *ANN)), prepared)  # what fits passes


def test_a_user_who_saw_every_item_is_refused_unless_history_is_not_excluded(tmp_path):
    (tmp_path / "d.txt").write_text("1 1 2 3 1 2\n2 1 2 1 2\n")
    path = f"data.path={tmp_path / 'd.txt'}"
    config = load_config(TINY, (path,))
    fully_seen = prepare_data(config)
    with pytest.raises(SamplerError, match=r"1 user\(s\) have interacted with all 3 items"):
        check_sampler_fits(config, fully_seen)
    check_sampler_fits(load_config(TINY, (path, "sampler.exclude_history=false")), fully_seen)
    # full softmax draws no negatives: nothing to check
    check_sampler_fits(load_config(TINY, (path, "loss.name=full_ce")), fully_seen)


def test_probe_set_is_fixed_validation_users_with_their_exclusions(prepared):
    config = load_config(TINY, (DATA, *ANN, "sampler.index.probe_queries=32"))
    inputs, exclusions = probe_set(prepared, config, torch.device("cpu"))
    assert inputs.shape == (32, config.data.max_len) and inputs.dtype == torch.int64
    assert exclusions.positives.shape == (32,) and (exclusions.positives >= 1).all()
    again, _ = probe_set(prepared, config, torch.device("cpu"))
    assert torch.equal(inputs, again)  # the same users at every probe of a run
    assert np.isin(exclusions.positives.numpy(), np.arange(1, prepared.n_items + 1)).all()
