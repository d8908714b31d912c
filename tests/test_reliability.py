"""Bad input, everywhere it enters, is one ``error:`` line and exit status 2 with nothing created or
changed; NaN/inf stops ``annsample train`` with one line naming the step and keeping the last good
checkpoint (the in-process NaN-gradient and NaN-table stops: test_train.py); loaders, ``--set`` and
command lines never crash on arbitrary input (hypothesis).

The error catalogue in docs/reliability.md is this file's ``CASES``, printed with the messages they
produce by running the file as a script: ``.venv/bin/python tests/test_reliability.py``.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from conftest import REPO, TINY, invoke
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from annsample import checkpoint as ckpt
from annsample import train as train_mod
from annsample.cli.main import main
from annsample.config import (
    ModelConfig,
    RunConfig,
    config_from_dict,
    config_to_dict,
)
from annsample.data import read_interactions
from annsample.errors import ConfigError, DataError, RunError
from annsample.model import SASRec
from annsample.run import load_model

TINY_CONFIG = (REPO / TINY).read_bytes()
FUZZ_SETTINGS = {"deadline": None, "derandomize": True}


def one_error_line(result: Result) -> str:
    """The single ``error:`` line of a clean user error (exit 2, no traceback, no stdout)."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- error catalogue


def _state_dict_bytes(**shapes: tuple[int, ...]) -> Callable[[], bytes]:
    def make() -> bytes:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "x.pt"
            torch.save({name: torch.zeros(shape) for name, shape in shapes.items()}, path)
            return path.read_bytes()

    return make


def _tensor_bytes() -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.pt"
        torch.save(torch.zeros(3), path)
        return path.read_bytes()


@dataclass(frozen=True)
class Case:
    """One bad input: ``argv`` and ``files`` use ``{tmp}`` for the case's own folder."""

    id: str
    what: str  # the input, for the catalogue
    argv: tuple[str, ...]
    expect: str  # a fragment of the one-line message
    files: dict[str, bytes | Callable[[], bytes]] = field(default_factory=dict)


def train_with(*sets: str, out: str = "{tmp}/run", files=None, **kw) -> dict:
    argv = ["train", "--config", TINY]
    for item in sets:
        argv += ["--set", item]
    return {"argv": (*argv, "--out", out), "files": files or {}, **kw}


def data_case(id: str, what: str, content: bytes, expect: str, name: str = "d.txt") -> Case:
    return Case(
        id, what, **train_with(f"data.path={{tmp}}/{name}", files={name: content}), expect=expect
    )


RUN = {"run/config.yaml": TINY_CONFIG}
CASES = [
    # --- YAML configs
    Case("config-missing", "`--config` names no file", ("train", "--config", "{tmp}/none.yaml"), "does not exist"),
    Case("config-binary", "config file is not UTF-8", ("train", "--config", "{tmp}/c.yaml"), "not a UTF-8 text file", {"c.yaml": b"\xff\xfe\x00"}),
    Case("config-yaml", "config is not valid YAML", ("train", "--config", "{tmp}/c.yaml"), "invalid YAML", {"c.yaml": b"train: [1\n"}),
    Case("config-top-level", "config's top level is a list", ("train", "--config", "{tmp}/c.yaml"), "top level must be a mapping", {"c.yaml": b"- 1\n- 2\n"}),
    Case("config-recursive", "config uses a recursive YAML alias", ("train", "--config", "{tmp}/c.yaml"), "refers to itself", {"c.yaml": b"train: &a\n  x: *a\n"}),
    Case("config-section", "a section is a scalar (`train: 5`)", ("train", "--config", "{tmp}/c.yaml"), "must be a mapping, got int", {"c.yaml": b"train: 5\n"}),
    Case("config-unknown-key", "unknown key (`sampler.index.nlsit`)", ("train", "--config", "{tmp}/c.yaml"), "unknown key(s) sampler.index.nlsit", {"c.yaml": b"sampler:\n  index:\n    nlsit: 8\n"}),
    Case("config-type", "wrong type (`train.epochs: ten`)", ("train", "--config", "{tmp}/c.yaml"), "key 'train.epochs': expected int", {"c.yaml": b"train:\n  epochs: ten\n"}),
    # --- --set overrides (typed like the YAML)
    Case("set-no-equals", "`--set train.lr`", ("train", "--set", "train.lr"), "expected KEY=VALUE"),
    Case("set-empty-key", "`--set a..b=1`", ("train", "--set", "a..b=1"), "the key is empty"),
    Case("set-bad-yaml", "`--set train.lr=[1`", ("train", "--set", "train.lr=[1"), "the value is not valid YAML"),
    Case("set-not-section", "`--set train.epochs.x=1` (a key set in the YAML)", ("train", "--config", TINY, "--set", "train.epochs.x=1"), "'epochs' is not a section"),
    Case("set-into-a-value", "`--set train.lr.x=1` (a key left at its default)", ("train", "--set", "train.lr.x=1"), "key 'train.lr': is a float, not a section (got keys: x)"),
    Case("set-unknown", "`--set train.lrr=1`", ("train", "--set", "train.lrr=1"), "unknown key(s) train.lrr"),
    Case("set-choice", "`--set sampler.name=foo`", ("train", "--set", "sampler.name=foo"), "choose one of uniform"),
    Case("set-positive", "`--set train.epochs=0`", ("train", "--set", "train.epochs=0"), "must be >= 1"),
    Case("set-heads", "`--set model.num_heads=3` (64 % 3)", ("train", "--set", "model.num_heads=3"), "must be divisible by"),
    Case("set-dropout", "`--set model.dropout=1.5`", ("train", "--set", "model.dropout=1.5"), "model.dropout must be in [0, 1)"),
    Case("set-epsilon", "`--set sampler.epsilon=2`", ("train", "--set", "sampler.epsilon=2"), "sampler.epsilon must be in [0, 1]"),
    Case("set-sparse-full-ce", "`model.sparse_embeddings=true` with `loss.name=full_ce`", ("train", "--set", "model.sparse_embeddings=true", "--set", "loss.name=full_ce"), "cannot train sparse embeddings"),
    Case("set-lr", "`--set train.lr=.nan` (or <= 0)", ("train", "--set", "train.lr=.nan"), "train.lr must be a finite number > 0"),
    Case("set-nprobe", "`sampler.index.nprobe` > `nlist`", ("train", "--set", "sampler.index.nlist=8", "--set", "sampler.index.nprobe=9"), "must be <= sampler.index.nlist"),
    Case("set-checkpoint-every", "`--set train.checkpoint_every=-1`", ("train", "--set", "train.checkpoint_every=-1"), "train.checkpoint_every must be >= 0"),
    Case("set-adaptive", "adaptive refresh with no threshold", train_with("sampler.name=ann", "sampler.index.refresh=adaptive", "sampler.index.drift_threshold=0", "sampler.index.nlist=16", "sampler.index.nprobe=4")["argv"], "needs sampler.index.drift_threshold > 0 or"),
    # --- flags
    Case("catalog-size-text", "`--catalog-size abc`", ("train", "--catalog-size", "abc"), "is not a number"),
    Case("catalog-size-small", "`--catalog-size 5`", ("train", "--catalog-size", "5"), "too small"),
    Case("flag-unknown", "an unknown flag", ("train", "--nope"), "No such option"),
    Case("flag-choice", "`evaluate --stage train`", ("evaluate", "{tmp}", "--stage", "train"), "Invalid value for '--stage'"),
    Case("flag-int", "`bench samplers --queries abc`", ("bench", "samplers", "{tmp}", "--queries", "abc"), "is not a valid integer"),
    Case("flag-range", "`bench samplers --repeats 0`", ("bench", "samplers", "{tmp}", "--repeats", "0"), "is not in the range x>=1"),
    Case("bench-set-model", "`bench samplers --set` on a model key", ("bench", "samplers", "{tmp}", "--set", "model.hidden_size=8"), "only changes sampler settings"),
    Case("flag-missing-argument", "`evaluate` without RUN_DIR", ("evaluate",), "Missing argument 'RUN_DIR'"),
    Case("flag-command", "an unknown command", ("frobnicate",), "No such command"),
    Case("flag-json-folder", "`--json` into a missing folder", ("evaluate", "{tmp}", "--json", "{tmp}/no/x.json"), "folder {tmp}/no does not exist"),
    Case("flag-resume-out", "`--resume` with `--out`", ("train", "--resume", "{tmp}", "--out", "{tmp}/x"), "drop --out"),
    Case("device-cuda", "`train.device=cuda` on a machine without one", ("train", "--set", "train.device=cuda", "--out", "{tmp}/run"), "torch sees no GPU"),
    # --- dataset files (sequences)
    Case("data-missing", "`data.path` names no file", **train_with("data.path={tmp}/none.txt"), expect="no such file"),
    Case("data-nul-path", "`data.path` with a NUL byte (YAML `\\0`)", ("train", "--config", "{tmp}/c.yaml", "--out", "{tmp}/run"), "contains a NUL byte", {"c.yaml": b'data:\n  path: "d\\0.txt"\n'}),
    Case("data-directory", "`data.path` is a folder", **train_with("data.path={tmp}"), expect="is a directory"),
    data_case("data-nul", "binary file (NUL byte)", b"1 2 3\n\x00", "NUL byte found"),
    data_case("data-utf8", "not UTF-8", b"1 2 3\n2 3 \xe9\n", "not UTF-8 text"),
    data_case("data-empty", "empty file", b"\n\n", "no users found"),
    data_case("data-token", "a non-integer token", b"1 2 x\n", "token 'x' is not an integer"),
    data_case("data-zero", "item id 0 (padding)", b"1 2 0 3\n", "item id 0 is not positive"),
    data_case("data-negative", "a negative id", b"-1 2 3\n", "user id -1 is not positive"),
    data_case("data-int64", "an id past int64", b"1 2 99999999999999999999\n", "does not fit in int64"),
    data_case("data-no-items", "a user with no items", b"1 2 3 4\n2\n", "user 2 has no items"),
    data_case("data-repeated-user", "a user on two lines", b"1 2 3 4\n1 5 6 7\n", "already appeared on line 1"),
    data_case("data-short", "no user with 3 items", b"1 2 3\n2 4\n", "no user has 3 or more interactions"),
    data_case("data-seen-all", "a user who has seen every item", b"1 1 2 3 1 2\n2 1 2 1 2\n", "have interacted with all 3 items"),
    # --- interaction tables
    data_case("table-empty", "empty table", b"", "the table is empty", "t.csv"),
    data_case("table-header-only", "header but no rows", b"user,item,timestamp\n", "has a header but no rows", "t.csv"),
    data_case("table-column", "a missing column", b"user,item\n1,2\n", "column(s) time_col='timestamp' not found", "t.csv"),
    data_case("table-fields", "a row with too many fields", b"user,item,timestamp\n1,2,3,4\n", "4 fields but the header has 3", "t.csv"),
    data_case("table-empty-field", "an empty user field", b"user,item,timestamp\n,2,3\n", "empty 'user' field", "t.csv"),
    data_case("table-timestamp", "a non-numeric timestamp", b"user,item,timestamp\n1,2,noon\n", "timestamp 'noon'", "t.csv"),
    data_case("table-csv", "a field past the CSV size limit", b"user,item,timestamp\n1,2,3\n" + b'"' + b"x" * 140_000 + b'",2,3\n', "cannot parse the row", "t.csv"),
    # --- index settings the catalog cannot satisfy
    Case("index-nlist", "`sampler.index.nlist` > items", **train_with("sampler.name=ann", "sampler.index.nlist=5000"), expect="nlist=5000 is larger than the number of items N=3354"),
    Case("ignored-setting", "a setting the sampler ignores", **train_with("sampler.tail_samples=64"), expect="sampler.tail_samples is set but sampler.name=uniform ignores it"),
    Case("ssm-dns", "`sampled_softmax` with `dns`", **train_with("sampler.name=dns", "loss.name=sampled_softmax"), expect="loss.name=sampled_softmax with sampler.name=dns is wrong"),
    Case("ssm-tron-logq", "`sampled_softmax` with `tron` and the logQ correction", **train_with("sampler.name=tron", "sampler.num_negatives=8", "loss.name=sampled_softmax"), expect="a top-k selection has no tractable proposal probability"),
    Case("mixed-counts", "`mixed` with no uniform negatives left", **train_with("sampler.name=mixed", "sampler.num_negatives=8", "sampler.in_batch_negatives=8"), expect="needs 1 <= in_batch_negatives < num_negatives; got 8 of 8"),
    Case("index-candidates", "`sampler.candidates` > items", **train_with("sampler.name=ann", "sampler.index.nlist=16", "sampler.index.nprobe=4", "sampler.candidates=5000"), expect="sampler.candidates=5000 is more than the catalog's 3354 items"),
    # --- run folders
    Case("out-file", "`--out` is a file", **train_with(files={"run": b"x"}), expect="exists and is not a folder"),
    Case("out-not-empty", "`--out` is a non-empty folder", **train_with(files={"run/notes.txt": b"keep"}), expect="already exists and is not empty"),
    Case("out-overwrite-bad-data", "`--overwrite` with a bad dataset: the old run survives", ("train", "--config", TINY, "--set", "data.path={tmp}/none.txt", "--out", "{tmp}/run", "--overwrite"), "no such file", {"run/results.json": b"{}"}),
    Case("out-under-file", "`--out` inside a file", **train_with(out="{tmp}/f/run", files={"f": b"x"}), expect="cannot create run folder"),
    Case("run-missing", "`evaluate` a missing folder", ("evaluate", "{tmp}/none"), "does not exist"),
    Case("run-no-config", "`evaluate` a folder without config.yaml", ("evaluate", "{tmp}"), "has no config.yaml"),
    Case("run-no-best", "`evaluate` a run without best.pt", ("evaluate", "{tmp}/run"), "has no best.pt", RUN),
    Case("run-bad-config", "`evaluate` a run whose config.yaml is invalid", ("evaluate", "{tmp}/run"), "unknown key(s) x", {"run/config.yaml": b"x: 1\n", "run/best.pt": b""}),
    Case("run-torn-best", "`evaluate` a run whose best.pt is torn", ("evaluate", "{tmp}/run"), "cannot be read", {**RUN, "run/best.pt": b"PK\x03\x04torn"}),
    Case("run-best-not-dict", "`evaluate` a run whose best.pt holds a bare tensor", ("evaluate", "{tmp}/run"), "is not a model state dict", {**RUN, "run/best.pt": _tensor_bytes}),
    Case("run-best-catalog", "`evaluate` a run whose best.pt has another item table", ("evaluate", "{tmp}/run"), "the dataset file changed since training", {**RUN, "run/best.pt": _state_dict_bytes(**{"item_embedding.weight": (10, 16)})}),
    Case("run-best-model", "`evaluate` a run whose best.pt is another model", ("evaluate", "{tmp}/run"), "does not fit the run's model config", {**RUN, "run/best.pt": _state_dict_bytes(**{"item_embedding.weight": (3355, 16)})}),
    Case("report-missing", "`report` a folder without results.json", ("report", "{tmp}"), "has no results.json"),
    Case("resume-missing", "`--resume` a missing folder", ("train", "--resume", "{tmp}/none"), "does not exist"),
    Case("resume-no-config", "`--resume` a folder without config.yaml", ("train", "--resume", "{tmp}"), "has no config.yaml"),
    Case("resume-no-checkpoints", "`--resume` a run with no checkpoints", ("train", "--resume", "{tmp}/run"), "has no checkpoints to resume from", RUN),
    Case("resume-finished", "`--resume` a finished run", ("train", "--resume", "{tmp}/run"), "already finished", {**RUN, "run/results.json": b"{}"}),
    Case("resume-all-corrupt", "`--resume` when every checkpoint is unreadable", ("train", "--resume", "{tmp}/run"), "none of the 2 checkpoints", {**RUN, "run/checkpoints/step-000000004.pt": b"", "run/checkpoints/step-000000008.pt": b"PK"}),
]  # fmt: skip


def run_case(case: Case, folder: Path) -> tuple[Result, dict, dict]:
    """Create the case's files under ``folder``, run it; returns the result and the folder's
    contents before and after."""
    for name, content in case.files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content() if callable(content) else content)
    before = snapshot(folder)
    result = invoke([arg.replace("{tmp}", str(folder)) for arg in case.argv])
    return result, before, snapshot(folder)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_clear_line_and_changes_nothing(case, tmp_path):
    if case.id == "device-cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU, so train.device=cuda is valid here")
    result, before, after = run_case(case, tmp_path)
    line = one_error_line(result)
    assert case.expect.replace("{tmp}", str(tmp_path)) in line, line
    assert after == before, "nothing is created or changed"
    assert not (REPO / "runs" / "{tmp}").exists()


def test_the_catalogue_ids_are_unique():
    assert len({case.id for case in CASES}) == len(CASES)


# --------------------------------------------------------------------------- numerical faults


def test_diverging_training_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "--config",
        TINY,
        "--set",
        "train.lr=1e30",
        "--set",
        "train.checkpoint_every=1",
    ]
    line = one_error_line(invoke([*args, "--out", str(out)]))
    kept = out / "checkpoints" / "step-000000001.pt"
    assert "training diverged at step 2: the hidden states hold NaN or inf" in line
    assert f"the last good checkpoint is {kept}" in line and "lower train.lr" in line
    assert [p.name for p in ckpt.list_checkpoints(out)] == [kept.name]
    state = ckpt.read_checkpoint(kept)
    assert state["step"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())
    assert not (out / "results.json").exists()


# --------------------------------------------------------------------------- fuzzing


_TABLE_BYTES = st.one_of(
    st.binary(max_size=200),
    st.lists(
        st.sampled_from(
            [b"user", b"item", b"timestamp", b",", b"\t", b"\n", b"\r", b'"', b" ", b"1", b"2",
             b"a", b"1e3", b"nan", b"-", b"inf", b"\xff", b"\x00", b"\xef\xbb\xbf"]
        ),
        max_size=60,
    ).map(b"".join),
    st.lists(
        st.tuples(st.sampled_from(["u1", "u2", "u3", "", " "]), st.sampled_from(["a", "b", "c", ""]),
                  st.sampled_from(["1", "2", "2.5", "x", "", "1e400"])),
        max_size=8,
    ).map(lambda rows: ("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows)).encode()),
)  # fmt: skip


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], **FUZZ_SETTINGS)
@given(content=_TABLE_BYTES)
def test_arbitrary_bytes_give_an_interactions_table_or_a_data_error(content):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.csv"
        path.write_bytes(content)
        try:
            ds = read_interactions(path)
        except DataError as error:
            assert str(path) in str(error)
            return
    assert ds.n_users >= 1 and ds.indptr[0] == 0 and ds.indptr[-1] == len(ds.items)
    assert np.all(np.diff(ds.indptr) >= 1)
    assert ds.items.min() >= 1 and ds.items.max() == ds.n_items == len(ds.item_labels) - 1
    assert len(ds.user_labels) == ds.n_users


_KEYS = sorted(ckpt.flatten(config_to_dict(RunConfig())))  # every dotted key
_OVERRIDES = st.one_of(
    st.text(max_size=30),
    st.tuples(
        st.sampled_from([*_KEYS, "sampler.index.nlist", "train", "", "a..b", "train.lr.x"]),
        st.sampled_from(["=", "=", " = ", ""]),
        st.one_of(st.text(max_size=12), st.sampled_from(["1e-3", "-1", "0", "true", "[1", "{a: 1}", ".nan", "~", "1e400", "uniform", "ann"])),
    ).map("".join),
)  # fmt: skip


@settings(max_examples=400, **FUZZ_SETTINGS)
@given(overrides=st.lists(_OVERRIDES, min_size=1, max_size=3))
def test_any_set_overrides_give_a_config_or_a_config_error(overrides):
    try:
        config = config_from_dict({}, "<defaults>", tuple(overrides))
    except ConfigError as error:
        assert "--set" in str(error) or "<defaults> (with --set overrides)" in str(error)
    else:
        assert isinstance(config, RunConfig)


_TOKENS = st.sampled_from(
    ["--config", TINY, "missing.yaml", "--set", "train.lr=1e-3", "train.lr", "=1", "train.epochs=0",
     "--out", "--overwrite", "--resume", "--catalog-size", "1M", "abc", "5", "-1", "0", "--stage",
     "valid", "train", "test", "--json", "--sampler", "ann", "--queries", "--draws", "--help",
     "configs", ".", "-v", "--", "--nope", "runs/definitely-missing"]
)  # fmt: skip
_ARGV = st.tuples(
    st.sampled_from([["train"], ["evaluate"], ["report"], ["bench", "samplers"], ["bench"], []]),
    st.lists(st.one_of(_TOKENS, st.text(max_size=8)), max_size=7),
).map(lambda parts: [*parts[0], *parts[1]])


@settings(max_examples=300, **FUZZ_SETTINGS)
@given(argv=_ARGV)
def test_any_command_line_runs_or_is_one_clean_error(argv):
    """Work is stubbed out: what is tested is flag parsing, config loading and input checks."""
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)
        patch.setattr(
            train_mod, "train", lambda *args, **kwargs: calls.append(args) or {"test": {}}
        )
        result = CliRunner().invoke(main, argv)
    if result.exit_code == 0:
        assert result.exception is None or isinstance(result.exception, SystemExit)
        return
    one_error_line(result)


def _valid_best_pt() -> bytes:
    model = SASRec(30, 5, ModelConfig(hidden_size=8, num_blocks=1, num_heads=2))
    with tempfile.TemporaryDirectory() as folder:
        torch.save(model.state_dict(), Path(folder) / "best.pt")
        return (Path(folder) / "best.pt").read_bytes()


_BEST_PT = _valid_best_pt()
_BEST_BYTES = st.one_of(
    st.binary(max_size=300),
    st.integers(0, len(_BEST_PT)).map(lambda n: _BEST_PT[:n]),  # torn at any byte
    st.tuples(st.integers(0, len(_BEST_PT) - 1), st.integers(1, 255)).map(
        lambda change: (
            _BEST_PT[: change[0]]
            + bytes([_BEST_PT[change[0]] ^ change[1]])
            + _BEST_PT[change[0] + 1 :]
        )
    ),
)


@settings(max_examples=200, **FUZZ_SETTINGS)
@given(content=_BEST_BYTES)
def test_any_best_pt_loads_or_is_a_run_error(content):
    config = config_from_dict({"model": {"hidden_size": 8, "num_blocks": 1, "num_heads": 2}})
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, max_len=5))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "best.pt"
        path.write_bytes(content)
        try:
            model = load_model(config, path, 29, torch.device("cpu"))
        except RunError as error:
            assert str(path) in str(error) and "\n" not in str(error)
        else:
            assert model.item_embedding.weight.shape == (30, 8)


# --------------------------------------------------------------------------- the catalogue


def catalogue() -> str:
    """The markdown table of docs/reliability.md: every case with the message it produces."""
    rows = ["| input | message (after `error: `) |", "|---|---|"]
    for case in CASES:
        with tempfile.TemporaryDirectory() as folder:
            result, _, _ = run_case(case, Path(folder))
            message = one_error_line(result).removeprefix("error: ").replace(folder, "$TMP")
        message = message.replace(str(REPO) + "/", "").replace("|", "\\|")
        rows.append(f"| {case.what} | {message} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(catalogue(), end="")
