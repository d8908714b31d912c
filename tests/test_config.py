"""Tests for annsample.config: YAML loading, validation that names file and key, typed overrides."""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from hypothesis import given, settings
from hypothesis import strategies as st

from annsample.config import (
    CHOICES,
    POSITIVE,
    RunConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)
from annsample.errors import ConfigError

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "run.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def nested(key: str, value: object) -> dict:
    """{"a": {"b": value}} for key "a.b"."""
    *sections, last = key.split(".")
    raw: dict = {last: value}
    for section in reversed(sections):
        raw = {section: raw}
    return raw


def names(path: Path, *parts: str) -> str:
    """A regex matching a message that names ``path`` and then every part, in order."""
    return re.escape(str(path)) + "".join(".*" + re.escape(part) for part in parts)


# --------------------------------------------------------------------------- defaults and files


def test_defaults_load_without_a_file():
    assert load_config(None) == RunConfig()
    assert config_from_dict({}) == RunConfig()
    assert config_from_dict(None) == RunConfig()


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == RunConfig()
    assert load_config(write(tmp_path, "# only a comment\n")) == RunConfig()


def test_shipped_configs_exist():
    assert {path.name for path in CONFIGS} >= {"tiny.yaml", "beauty.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert config.name == raw.get("name", RunConfig().name)
    assert config.loss.name == raw.get("loss", {}).get("name", RunConfig().loss.name)
    if config.data.path != "synthetic":
        assert (REPO / config.data.path).is_file(), "a shipped config must name a shipped dataset"


def test_file_values_override_defaults(tmp_path):
    config = load_config(
        write(
            tmp_path,
            "seed: 7\ntrain:\n  epochs: 3\nsampler:\n  name: ann\n  index:\n    nlist: 32\n",
        )
    )
    assert config.seed == 7
    assert config.train.epochs == 3
    assert config.sampler.index.nlist == 32
    assert config.train.batch_size == RunConfig().train.batch_size  # untouched keys keep defaults


def test_config_is_frozen():
    config = RunConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.epochs = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- unknown keys and types


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("trian:\n  epochs: 3\n", "trian"),
        ("train:\n  epoch: 3\n", "train.epoch"),
        ("sampler:\n  index:\n    nlsit: 8\n", "sampler.index.nlsit"),
    ],
)
def test_unknown_key_names_file_and_key(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=names(path, f"unknown key(s) {key}")):
        load_config(path)


def test_unknown_key_lists_the_valid_keys(tmp_path):
    path = write(tmp_path, "sampler:\n  index:\n    nlsit: 8\n")
    with pytest.raises(ConfigError, match=r"valid keys here are: .*nlist.*nprobe"):
        load_config(path)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("train.epochs", "ten", "int"),
        ("train.epochs", True, "int"),  # bool is an int subclass in Python: must still be rejected
        ("train.epochs", 2.5, "int"),
        ("train.lr", True, "float"),
        ("train.lr", "fast", "float"),
        ("train.show_progress", "yes please", "bool"),
        ("train.show_progress", 1, "bool"),
        ("name", 3, "str"),
        ("data.path", None, "str"),
        ("sampler.index.nlist", [8], "int"),
    ],
)
def test_wrong_type_names_file_and_key(tmp_path, key, value, expected):
    path = write(tmp_path, yaml.safe_dump(nested(key, value)))
    with pytest.raises(ConfigError, match=names(path, f"'{key}'", f"expected {expected}")):
        load_config(path)


def test_int_is_accepted_for_float_and_stored_as_float(tmp_path):
    config = load_config(write(tmp_path, "train:\n  lr: 1\n"))
    assert config.train.lr == 1.0
    assert isinstance(config.train.lr, float)


@pytest.mark.parametrize("section", ["train", "sampler.index"])
def test_section_that_is_not_a_mapping_is_an_error(tmp_path, section):
    path = write(tmp_path, yaml.safe_dump(nested(section, 5)))
    with pytest.raises(ConfigError, match=names(path, section, "must be a mapping")):
        load_config(path)


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_choices_are_validated(tmp_path, key):
    path = write(tmp_path, yaml.safe_dump(nested(key, "foo")))
    with pytest.raises(ConfigError, match=names(path, f"'{key}' is 'foo'", CHOICES[key][0])):
        load_config(path)


# choices that need a companion setting to be a valid config on their own
COMPANIONS = {("sampler.name", "mixed"): {"num_negatives": 256}}


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_every_choice_is_accepted(key):
    for choice in CHOICES[key]:
        # choices alone: whether the chosen sampler reads the key is check_ignored's business
        raw = nested(key, choice)
        raw[key.split(".")[0]].update(COMPANIONS.get((key, choice), {}))
        config = config_from_dict(raw, check_ignored=False)
        node = config
        for part in key.split("."):
            node = getattr(node, part)
        assert node == choice


@pytest.mark.parametrize("key", sorted(POSITIVE))
@pytest.mark.parametrize("value", [0, -3])
def test_positive_ints_reject_zero_and_negatives(tmp_path, key, value):
    path = write(tmp_path, yaml.safe_dump(nested(key, value)))
    with pytest.raises(ConfigError, match=names(path, f"'{key}' must be >= 1")):
        load_config(path)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model": {"hidden_size": 10, "num_heads": 3}},
            "model.hidden_size (10) must be divisible",
        ),
        ({"model": {"dropout": 1.0}}, "model.dropout must be in [0, 1)"),
        ({"model": {"dropout": -0.1}}, "model.dropout must be in [0, 1)"),
        ({"sampler": {"epsilon": 1.5}}, "sampler.epsilon must be in [0, 1]"),
        ({"train": {"lr": 0.0}}, "train.lr must be a finite number > 0"),
        (
            {"sampler": {"index": {"nlist": 8, "nprobe": 16}}},
            "sampler.index.nprobe (16) must be <=",
        ),
    ],
)
def test_inconsistent_values_are_errors(raw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        config_from_dict(raw, "my.yaml")


@pytest.mark.parametrize("lr", [math.nan, math.inf])
def test_non_finite_learning_rate_is_an_error(lr):
    with pytest.raises(ConfigError, match="train.lr"):
        config_from_dict({"train": {"lr": lr}})


def test_exponent_float_in_a_file_reads_like_the_same_override(tmp_path):
    path = write(tmp_path, "train:\n  lr: 1e-3\n")
    assert load_config(path) == load_config(None, ("train.lr=1e-3",))


@pytest.mark.parametrize("text", ["0: 0\na: 0\n", "~: 1\na: x\n", "train:\n  1: 2\n  a: 3\n"])
def test_mixed_type_keys_are_a_config_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_self_referencing_alias_is_a_config_error(tmp_path):
    path = write(tmp_path, "train: &loop [*loop]\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


# --------------------------------------------------------------------------- invalid files


def test_missing_file_is_an_error(tmp_path):
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=names(path, "does not exist")):
        load_config(path)


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path))):
        load_config(tmp_path)


def test_invalid_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "train: [1, 2\n")
    with pytest.raises(ConfigError, match=names(path, "invalid YAML")) as info:
        load_config(path)
    assert "\n" not in str(info.value), "the CLI prints the message on one line"


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_top_level_must_be_a_mapping(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=names(path, "top level must be a mapping")):
        load_config(path)


def test_non_utf8_file_is_an_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=names(path, "UTF-8")):
        load_config(path)


# --------------------------------------------------------------------------- --set overrides


@pytest.mark.parametrize(
    ("text", "path", "value", "value_type"),
    [
        ("train.lr=1e-3", ["train", "lr"], 0.001, float),
        ("train.lr=0.01", ["train", "lr"], 0.01, float),
        ("train.epochs=5", ["train", "epochs"], 5, int),
        ("sampler.index.nlist=64", ["sampler", "index", "nlist"], 64, int),
        ("train.show_progress=false", ["train", "show_progress"], False, bool),
        ("data.path=data/tiny.txt", ["data", "path"], "data/tiny.txt", str),
        ("name = my-run", ["name"], "my-run", str),
        ("name=", ["name"], "", str),
    ],
)
def test_parse_override_types_values(text, path, value, value_type):
    parsed_path, parsed_value = parse_override(text)
    assert parsed_path == path
    assert parsed_value == value
    assert type(parsed_value) is value_type


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.lr", "expected KEY=VALUE"),
        ("=3", "the key is empty"),
        ("a..b=1", "the key is empty"),
        ("train.=1", "the key is empty"),
        ("train.lr=[1", "not valid YAML"),
    ],
)
def test_malformed_override_is_an_error(text, message):
    with pytest.raises(ConfigError, match=re.escape(f"--set {text!r}") + ".*" + re.escape(message)):
        parse_override(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, (text,))


def test_overrides_apply_typed_values_on_top_of_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n  lr: 0.1\nsampler:\n  name: ann\n")
    config = load_config(path, ("train.lr=1e-3", "train.epochs=5", "sampler.index.nlist=64"))
    assert config.train.lr == 0.001
    assert isinstance(config.train.lr, float)
    assert config.train.epochs == 5
    assert config.sampler.index.nlist == 64
    assert config.sampler.index.nprobe == RunConfig().sampler.index.nprobe


def test_later_override_wins():
    assert load_config(None, ("train.epochs=5", "train.epochs=7")).train.epochs == 7


def test_overrides_do_not_touch_the_raw_mapping():
    raw = {"train": {"epochs": 3}, "sampler": {"name": "ann"}}
    config_from_dict(raw, overrides=("train.epochs=9", "sampler.index.nlist=64"))
    assert raw == {"train": {"epochs": 3}, "sampler": {"name": "ann"}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train.epochs=ten", "key 'train.epochs': expected int"),
        ("train.epochs=true", "key 'train.epochs': expected int"),
        ("train.lrr=1", "unknown key(s) train.lrr"),
        ("sampler.name=foo", "key 'sampler.name' is 'foo'"),
        ("train.epochs=0", "key 'train.epochs' must be >= 1"),
    ],
)
def test_bad_override_value_names_the_key_and_the_flag(tmp_path, text, message):
    path = write(tmp_path, "name: from-file\nseed: 1\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_config(path, (text,))
    assert str(path) in str(info.value) and "--set" in str(info.value)


def test_override_below_a_scalar_names_the_flag(tmp_path):
    path = write(tmp_path, "name: from-file\n")
    with pytest.raises(ConfigError, match=re.escape("--set 'name.x=1': 'name' is not a section")):
        load_config(path, ("name.x=1",))


def test_override_of_a_string_key_keeps_exponent_like_text():
    assert load_config(None, ("name=1e5",)).name == "1e5"


# --------------------------------------------------------------------------- dump_config


def non_default_config() -> RunConfig:
    return load_config(
        None,
        (
            "name=dumped",
            "seed=3",
            "train.lr=1e-4",
            "model.sparse_embeddings=true",
            "sampler.name=ann",
            "sampler.index.nlist=64",
            "sampler.index.metric=cosine",
            "loss.name=gbce",
        ),
    )


@pytest.mark.parametrize(
    "config",
    [RunConfig(), non_default_config(), *(load_config(path) for path in CONFIGS)],
    ids=["defaults", "non-default", *(path.name for path in CONFIGS)],
)
def test_dump_config_round_trips(tmp_path, config):
    path = tmp_path / "config.yaml"
    dump_config(config, path)
    assert load_config(path) == config


def test_dump_config_does_not_mutate_the_config(tmp_path):
    config = non_default_config()
    before = config_to_dict(config)
    dump_config(config, tmp_path / "config.yaml")
    assert config == non_default_config()
    assert config_to_dict(config) == before


def test_config_to_dict_returns_a_new_object():
    config = non_default_config()
    raw = config_to_dict(config)
    raw["train"]["lr"] = 123.0
    raw["sampler"]["index"]["nlist"] = 1
    assert config == non_default_config()


# --------------------------------------------------------------------------- property


KEY_NAMES = sorted(
    {part for key in [*CHOICES, *POSITIVE] for part in key.split(".")}
    | {field.name for field in dataclasses.fields(RunConfig)}
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=10),
    st.sampled_from([choice for choices in CHOICES.values() for choice in choices]),
)
# Mappings shaped like configs (string keys, real section and field names) reach past the top-level
# checks; arbitrary text covers the parser.
CONFIG_LIKE = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from(KEY_NAMES) | st.text(max_size=6), children, max_size=4),
    ),
    max_leaves=12,
).map(lambda raw: yaml.safe_dump(raw, allow_unicode=True))


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.one_of(st.text(), CONFIG_LIKE))
def test_any_text_gives_a_config_or_a_config_error(text):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            config = load_config(path)
        except ConfigError as error:
            assert str(path) in str(error)
        else:
            assert isinstance(config, RunConfig)


# --------------------------------------------------------------------------- ignored settings


@pytest.mark.parametrize(
    ("settings", "key", "ignored_by"),
    [
        ({"sampler": {"name": "uniform", "alpha": 2.0}}, "sampler.alpha", "sampler.name=uniform"),
        ({"sampler": {"name": "popularity", "alpha": 2.0}}, "sampler.alpha", "popularity"),
        ({"sampler": {"name": "dns", "alpha": 2.0}}, "sampler.alpha", "sampler.name=dns"),
        ({"sampler": {"name": "exact", "beta": 0.5}}, "sampler.beta", "sampler.name=exact"),
        ({"sampler": {"name": "ann", "pool_size": 50}}, "sampler.pool_size", "sampler.name=ann"),
        ({"sampler": {"name": "exact", "candidates": 50}}, "sampler.candidates", "exact"),
        ({"sampler": {"name": "pool", "epsilon": 0.2}}, "sampler.epsilon", "sampler.name=pool"),
        ({"sampler": {"name": "exact", "tail_samples": 8}}, "sampler.tail_samples", "exact"),
        ({"sampler": {"name": "uniform", "query": "sequence"}}, "sampler.query", "uniform"),
        ({"sampler": {"name": "uniform", "warmup_steps": 5}}, "sampler.warmup_steps", "uniform"),
        (
            {"sampler": {"name": "uniform", "warmup_blend_steps": 5}},
            "sampler.warmup_blend_steps",
            "uniform",
        ),
        (
            {"sampler": {"name": "uniform", "warmup_share": 0.5}},
            "sampler.warmup_share",
            "uniform",
        ),
        (
            {"sampler": {"name": "uniform", "warmup_steps": 5, "warmup_sampler": "popularity"}},
            "sampler.warmup_steps",
            "uniform",
        ),
        (
            {"sampler": {"name": "ann", "warmup_sampler": "popularity"}},
            "sampler.warmup_sampler",
            "sampler.warmup_steps=0",
        ),
        (
            {"sampler": {"name": "ann", "warmup_steps": 5, "beta": 0.5}},
            "sampler.beta",
            "sampler.name=ann",
        ),
        ({"sampler": {"name": "exact", "index": {"nlist": 8}}}, "sampler.index.nlist", "exact"),
        ({"sampler": {"index": {"metric": "ip"}}}, "sampler.index.metric", "sampler.name=uniform"),
        (
            {"sampler": {"name": "pool", "index": {"refresh": "never"}}},
            "sampler.index.refresh",
            "pool",
        ),
        (
            {"sampler": {"name": "ann", "index": {"refresh": "epoch", "refresh_every": 3}}},
            "sampler.index.refresh_every",
            "sampler.index.refresh=epoch",
        ),
        (
            {"sampler": {"name": "ann", "index": {"refresh": "epoch", "retrain_below": 0.8}}},
            "sampler.index.retrain_below",
            "sampler.index.refresh=epoch",
        ),
        (
            {"sampler": {"name": "ann", "index": {"refresh": "never", "retrain_every": 3}}},
            "sampler.index.retrain_every",
            "sampler.index.refresh=never",
        ),
        (
            {"sampler": {"name": "ann", "index": {"refresh": "never", "asynchronous": True}}},
            "sampler.index.asynchronous",
            "sampler.index.refresh=never",
        ),
        (
            {"sampler": {"name": "ann", "index": {"drift_threshold": 0.2}}},
            "sampler.index.drift_threshold",
            "sampler.index.refresh=steps",
        ),
        (
            {"sampler": {"name": "ann", "index": {"recall_threshold": 0.5}}},
            "sampler.index.recall_threshold",
            "sampler.index.refresh=steps",
        ),
        (
            {"sampler": {"name": "ann", "index": {"check_every": 7}}},
            "sampler.index.check_every",
            "sampler.index.refresh=steps",
        ),
        ({"loss": {"name": "bce", "logq_correction": False}}, "loss.logq_correction", "bce"),
        ({"loss": {"name": "gbce", "logq_correction": False}}, "loss.logq_correction", "gbce"),
        ({"loss": {"name": "bce", "gbce_t": 0.5}}, "loss.gbce_t", "loss.name=bce"),
        (
            {"sampler": {"name": "uniform", "in_batch_negatives": 8}},
            "sampler.in_batch_negatives",
            "sampler.name=uniform",
        ),
        (
            {"sampler": {"name": "in_batch", "in_batch_negatives": 8}},
            "sampler.in_batch_negatives",
            "sampler.name=in_batch",
        ),
        (
            {"sampler": {"name": "mixed", "num_negatives": 256, "uniform_candidates": 8}},
            "sampler.uniform_candidates",
            "sampler.name=mixed",
        ),
        (
            {"sampler": {"name": "in_batch", "warmup_steps": 5}},
            "sampler.warmup_steps",
            "sampler.name=in_batch",
        ),
        (
            {"sampler": {"name": "tron", "pool_size": 50}},
            "sampler.pool_size",
            "sampler.name=tron",
        ),
        ({"loss": {"name": "bce", "corrected_logq": True}}, "loss.corrected_logq", "bce"),
        (
            {"loss": {"name": "scaled_ce", "corrected_logq": True}},
            "loss.corrected_logq",
            "scaled_ce",
        ),
        ({"loss": {"name": "sampled_softmax", "sce_scale": 50}}, "loss.sce_scale", "softmax"),
        (
            {"loss": {"name": "scaled_ce", "logq_correction": False}},
            "loss.logq_correction",
            "loss.name=scaled_ce",
        ),
        (
            {"loss": {"name": "sampled_softmax", "logq_correction": False, "corrected_logq": True}},
            "loss.corrected_logq",
            "loss.logq_correction=false",
        ),
        (
            {"loss": {"name": "full_ce"}, "sampler": {"uniform_candidates": 8}},
            "sampler.uniform_candidates",
            "loss.name=full_ce",
        ),
        (
            {"loss": {"name": "full_ce"}, "sampler": {"num_negatives": 8}},
            "sampler.num_negatives",
            "loss.name=full_ce",
        ),
        (
            {"loss": {"name": "full_ce"}, "sampler": {"name": "ann"}},
            "sampler.name",
            "loss.name=full_ce",
        ),
    ],
)
def test_a_setting_the_sampler_or_loss_ignores_is_an_error(settings, key, ignored_by):
    with pytest.raises(ConfigError, match=f"my.yaml: {re.escape(key)} is set but .*{ignored_by}"):
        config_from_dict(settings, "my.yaml")
    # the same setting with a sampler / loss / schedule that reads it loads
    config_from_dict(settings, "my.yaml", check_ignored=False)


@pytest.mark.parametrize("sampler", ["dns", "pool"])
def test_sampled_softmax_with_a_conditional_log_q_says_what_to_use_instead(sampler):
    raw = {"sampler": {"name": sampler}, "loss": {"name": "sampled_softmax"}}
    with pytest.raises(ConfigError, match=f"sampler.name={sampler} is wrong.*Use sampler.name=ann"):
        config_from_dict(raw, "my.yaml")


@pytest.mark.parametrize("sampler", ["uniform", "popularity", "exact", "ann", "in_batch", "mixed"])
def test_sampled_softmax_with_an_exact_log_q_sampler_loads(sampler):
    raw = {"sampler": {"name": sampler, "num_negatives": 256}, "loss": {"name": "sampled_softmax"}}
    assert config_from_dict(raw).loss.name == "sampled_softmax"
    raw["loss"]["corrected_logq"] = True
    assert config_from_dict(raw).loss.corrected_logq


def test_tron_refuses_a_logq_correction_and_says_why():
    raw = {"sampler": {"name": "tron", "num_negatives": 100}, "loss": {"name": "sampled_softmax"}}
    with pytest.raises(
        ConfigError,
        match="my.yaml: loss.logq_correction=true .* sampler.name=tron is wrong: .*top-k "
        "selection has no tractable proposal probability.*Set loss.logq_correction=false",
    ):
        config_from_dict(raw, "my.yaml")
    raw["loss"]["logq_correction"] = False
    config = config_from_dict(raw, "my.yaml")
    assert (config.sampler.in_batch_negatives, config.sampler.uniform_candidates) == (127, 16384)
    # tron with other losses reads no log q at all
    for loss in ("bce", "scaled_ce", "gbce"):
        assert config_from_dict({**raw, "loss": {"name": loss}}).loss.name == loss


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"sampler": {"name": "mixed", "num_negatives": 8, "in_batch_negatives": 8}},
            "sampler.name=mixed draws sampler.in_batch_negatives of its sampler.num_negatives "
            "negatives from the batch and the rest uniformly, so it needs 1 <= in_batch_negatives "
            "< num_negatives; got 8 of 8",
        ),
        (
            {"sampler": {"name": "mixed", "num_negatives": 8, "in_batch_negatives": 0}},
            "got 0 of 8",
        ),
        (
            {"sampler": {"name": "tron", "in_batch_negatives": -1}},
            "sampler.in_batch_negatives must be >= 0, got -1",
        ),
        (
            {"sampler": {"name": "tron", "uniform_candidates": -2}},
            "sampler.uniform_candidates must be >= 0, got -2",
        ),
        (
            {
                "sampler": {
                    "name": "tron",
                    "num_negatives": 100,
                    "in_batch_negatives": 10,
                    "uniform_candidates": 50,
                }
            },
            "sampler.name=tron keeps the sampler.num_negatives=100 best of "
            "sampler.in_batch_negatives + sampler.uniform_candidates = 10 + 50 candidates",
        ),
        ({"loss": {"name": "scaled_ce", "sce_scale": 0.0}}, "loss.sce_scale must be a finite"),
        ({"loss": {"name": "scaled_ce", "sce_scale": -1.0}}, "loss.sce_scale must be a finite"),
        ({"loss": {"name": "scaled_ce", "sce_scale": math.inf}}, "loss.sce_scale must be a finite"),
        ({"train": {"lr_warmup_steps": -1}}, "train.lr_warmup_steps must be >= 0"),
        ({"sampler": {"warmup_steps": -1}}, "sampler.warmup_steps must be >= 0"),
        ({"sampler": {"warmup_blend_steps": -2}}, "sampler.warmup_blend_steps must be >= 0"),
        (
            {"sampler": {"name": "ann", "warmup_share": 1.0}},
            "sampler.warmup_share must be in [0, 1)",
        ),
        (
            {"sampler": {"name": "ann", "warmup_share": -0.1}},
            "sampler.warmup_share must be in [0, 1)",
        ),
        (
            {"sampler": {"name": "ann", "warmup_share": 0.5}, "loss": {"name": "sampled_softmax"}},
            "sampler.warmup_share with a logQ-corrected sampled_softmax",
        ),
        (
            {
                "sampler": {"name": "ann", "warmup_blend_steps": 100},
                "loss": {"name": "sampled_softmax"},
            },
            "each negative carries the log q of the sampler that drew it",
        ),
    ],
)
def test_new_settings_with_bad_values_are_one_clear_error(raw, message):
    with pytest.raises(ConfigError, match="my.yaml: .*" + re.escape(message)):
        config_from_dict(raw, "my.yaml")


def test_a_blended_hand_over_loads_with_the_losses_that_read_no_log_q():
    for loss in ({"name": "bce"}, {"name": "sampled_softmax", "logq_correction": False}):
        config = config_from_dict(
            {
                "sampler": {
                    "name": "ann",
                    "warmup_blend_steps": 100,
                    "warmup_sampler": "popularity",
                },
                "loss": loss,
            },
            "my.yaml",
        )
        assert (config.sampler.warmup_steps, config.sampler.warmup_blend_steps) == (0, 100)


def test_recipe_knobs_load_and_default_to_the_old_behaviour():
    config = config_from_dict(
        {
            "model": {"layer_norm": "pre"},
            "train": {"lr_warmup_steps": 100, "lr_schedule": "cosine"},
            "loss": {"name": "scaled_ce", "sce_scale": 500},
        }
    )
    assert config.model.layer_norm == "pre" and config.train.lr_schedule == "cosine"
    assert config.loss.sce_scale == 500.0
    defaults = RunConfig()
    assert (defaults.model.layer_norm, defaults.train.lr_schedule) == ("post", "constant")
    assert (defaults.train.lr_warmup_steps, defaults.loss.corrected_logq) == (0, False)


BASELINES = ("uniform-ssm256", "sce", "tron", "mixed-ssm", "ann-ssm-corrected")


@pytest.mark.parametrize("baseline", BASELINES)
def test_baseline_configs_for_beauty_and_sports_differ_only_in_data_and_name(baseline):
    beauty = config_to_dict(load_config(REPO / "configs" / f"beauty-{baseline}.yaml"))
    sports = config_to_dict(load_config(REPO / "configs" / f"sports-{baseline}.yaml"))
    assert (beauty["name"], sports["name"]) == (f"beauty-{baseline}", f"sports-{baseline}")
    assert (beauty["data"]["path"], sports["data"]["path"]) == (
        "data/Beauty.txt",
        "data/Sports_and_Outdoors.txt",
    )
    for config in (beauty, sports):
        del config["name"], config["data"]["path"]
    assert beauty == sports
    text = (REPO / "configs" / f"beauty-{baseline}.yaml").read_text(encoding="utf-8")
    assert text.startswith("# ") and re.search(r"(19|20)\d\d", text.split("name:")[0])  # cites


def test_settings_read_by_the_chosen_sampler_load():
    config = config_from_dict(
        {
            "sampler": {
                "name": "ann",
                "alpha": 0.5,
                "candidates": 100,
                "epsilon": 0.1,
                "tail_samples": 64,
                "query": "sequence",
                "warmup_steps": 10,
                "index": {"refresh": "adaptive", "drift_threshold": 0.1, "check_every": 20},
            },
            "loss": {"name": "sampled_softmax", "logq_correction": False},
        }
    )
    assert config.sampler.index.check_every == 20 and not config.loss.logq_correction


def test_a_saved_run_config_with_every_key_loads_without_the_check(tmp_path):
    # A run folder's config.yaml lists every key; an older run holds older defaults.
    raw = config_to_dict(config_from_dict({}))
    raw["sampler"]["tail_samples"] = 0
    raw["sampler"]["index"]["nlist"] = 256
    path = write(tmp_path, yaml.safe_dump(raw), "config.yaml")
    with pytest.raises(ConfigError, match="sampler.tail_samples is set"):
        load_config(path)
    assert load_config(path, check_ignored=False).sampler.index.nlist == 256


def test_index_size_zero_means_the_catalog_rule_and_negative_is_an_error():
    config = config_from_dict({"sampler": {"name": "ann"}})
    assert config.sampler.index.nlist == 0 and config.sampler.index.nprobe == 0
    with pytest.raises(ConfigError, match="sampler.index.nlist must be >= 0"):
        config_from_dict({"sampler": {"name": "ann", "index": {"nlist": -1}}})


@pytest.mark.parametrize(
    "user", [("sampler.name=uniform",), ("sampler.index.refresh=never",), ("sampler.name=exact",)]
)
def test_catalog_size_preset_counts_as_defaults_for_the_ignored_settings_check(user):
    from annsample.config import catalog_overrides

    preset = catalog_overrides(1_000_000)  # sets ann-only keys and a refresh interval
    config = load_config(None, user, preset=preset)
    assert config.data.synthetic_items == 1_000_000
    # as plain overrides the same keys are settings the chosen sampler / schedule ignores
    with pytest.raises(ConfigError, match="is set but"):
        load_config(None, preset + user)


def test_catalog_size_preset_validates_every_epoch_of_its_budget():
    # its epochs are 250 steps and its budget 600 s: validating every 5 epochs (the dataset
    # recipe's schedule) would keep at most two checkpoints to test from
    from annsample.config import catalog_overrides

    for n_items in (100_000, 1_000_000):
        config = load_config(None, preset=catalog_overrides(n_items))
        assert config.train.eval_every == 1
        assert config.train.max_steps_per_epoch == 250
        # the ann sampler mixed with popularity negatives, the variant measured best there
        assert (config.sampler.name, config.sampler.warmup_sampler) == ("ann", "popularity")
        assert config.sampler.warmup_share == 0.5
        assert config.sampler.index.retrain_below == 0.5
        # dropout 0.1 from 100k items up (measured there); smaller catalogs keep 0.5
        assert config.model.dropout == 0.1
    assert load_config(None, preset=catalog_overrides(10_000)).model.dropout == 0.5
    # a logQ-corrected sampled softmax cannot read a blend: one clear error naming the way out
    with pytest.raises(ConfigError, match="sampler.warmup_share=0"):
        load_config(None, ("loss.name=sampled_softmax",), preset=catalog_overrides(100_000))
    load_config(
        None,
        ("loss.name=sampled_softmax", "sampler.warmup_share=0"),
        preset=catalog_overrides(100_000),
    )


@pytest.mark.parametrize("sampler", ["uniform", "popularity", "pool", "exact", "dns"])
def test_a_baseline_sampler_on_the_catalog_preset_does_not_inherit_its_popularity_mixture(sampler):
    # --catalog-size 1M --set sampler.name=uniform is the uniform baseline, not half popularity
    from annsample.config import catalog_overrides

    preset = catalog_overrides(1_000_000)
    config = load_config(None, (f"sampler.name={sampler}",), preset=preset)
    assert (config.sampler.warmup_share, config.sampler.warmup_sampler) == (0.0, "uniform")
    # set explicitly, the mixture applies to the named sampler too
    mixed = ("sampler.warmup_sampler=popularity", "sampler.warmup_share=0.3")
    if sampler != "uniform":
        config = load_config(None, (f"sampler.name={sampler}", *mixed), preset=preset)
        assert (config.sampler.warmup_share, config.sampler.warmup_sampler) == (0.3, "popularity")
    # naming the preset's own sampler keeps it
    config = load_config(None, ("sampler.name=ann",), preset=preset)
    assert (config.sampler.warmup_share, config.sampler.warmup_sampler) == (0.5, "popularity")


def test_beta_is_read_by_a_popularity_warmup():
    config = config_from_dict(
        {"sampler": {"name": "ann", "warmup_steps": 5, "warmup_sampler": "popularity", "beta": 0.5}}
    )
    assert config.sampler.warmup_sampler == "popularity" and config.sampler.beta == 0.5


@pytest.mark.parametrize("setting", ["model.layer_norm=pre", "model.init_std=0.05"])
def test_sasrec_architecture_refuses_the_settings_it_ignores(setting):
    with pytest.raises(ConfigError, match=r"model\.architecture=sasrec ignores it"):
        config_from_dict({}, overrides=["model.architecture=sasrec", setting])
    assert config_from_dict({}, overrides=["model.architecture=sasrec"]).model.architecture == (
        "sasrec"
    )
