"""Tests for the ``annsample`` command line: help, an end-to-end tiny run, and clean user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
import torch
from click.testing import Result
from conftest import REPO, TINY, invoke, metrics_records

from annsample.cli.main import main
from annsample.config import load_config

# One epoch keeps the two end-to-end runs cheap; log_every=2 makes train/loss records appear.
TRAIN_ARGS = [
    "train",
    "--config",
    TINY,
    "--set",
    "train.epochs=1",
    "--set",
    "train.log_every=2",
    "--set",
    "train.num_threads=1",
]
OVERRIDES = ("train.epochs=1", "train.log_every=2", "train.num_threads=1")
RUN_FILES = {"config.yaml", "metrics.jsonl", "best.pt", "results.json"}


def assert_clean_error(result: Result, *fragments: str) -> None:
    """Exit 2 with exactly one ``error: ...`` line on stderr, no traceback, nothing on stdout."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    assert result.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0]


def format_metrics(stage: str, metrics: dict[str, float]) -> str:
    return f"{stage}: " + "  ".join(f"{key} {value:.4f}" for key, value in metrics.items())


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        path.name: (path.read_bytes(), path.stat().st_mtime_ns) for path in sorted(folder.iterdir())
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Result]:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = invoke([*TRAIN_ARGS, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, result


# --------------------------------------------------------------------------- help


def command_paths(group: click.Group = main, prefix: tuple[str, ...] = ()):
    """(path, command) for the group, every command and every nested group, depth first."""
    yield prefix, group
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))
        else:
            yield (*prefix, name), command


COMMANDS = list(command_paths())


@pytest.mark.parametrize(
    ("path", "command"), COMMANDS, ids=[" ".join(path) or "annsample" for path, _ in COMMANDS]
)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_on_the_group_and_every_command(path, command, flag):
    result = invoke([*path, flag])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("Usage: ")
    summary = command.help.split("\n\n")[0]
    assert " ".join(summary.split()) in " ".join(result.stdout.split())  # click re-wraps lines


def test_group_lists_train_and_evaluate():
    assert {"train", "evaluate"} <= set(main.commands)
    output = invoke(["--help"]).stdout
    assert "train" in output and "evaluate" in output


def test_version():
    result = invoke(["--version"])
    assert result.exit_code == 0
    assert "0.1.0" in result.stdout


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_writes_a_complete_run_folder(tiny_run):
    out, result = tiny_run
    assert {path.name for path in out.iterdir()} == RUN_FILES
    assert load_config(out / "config.yaml") == load_config(REPO / TINY, OVERRIDES)

    log = metrics_records(out)
    keys = {key for record in log for key in record} - {"step", "time"}
    assert all("/" in key for key in keys), "metric keys are namespaced"
    assert {"train/loss", "train/epoch_loss", "eval/valid/ndcg@10", "eval/test/ndcg@10"} <= keys
    steps = [record["step"] for record in log]
    assert steps == sorted(steps)

    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["name"] == "tiny"
    assert results["best_epoch"] == 1 and results["epochs_run"] == 1
    assert set(results["test"]) == {f"{name}@{k}" for k in (5, 10, 20) for name in ("hr", "ndcg")}
    assert all(0.0 <= value <= 1.0 for value in results["test"].values())
    # the last record is the single test evaluation, the same numbers as results.json
    assert log[-1] == {
        "step": log[-1]["step"],
        "time": log[-1]["time"],
        **{f"eval/test/{key}": value for key, value in results["test"].items()},
    }
    # the reloaded best checkpoint scores what it scored when it was selected
    valid = [record for record in log if "eval/valid/ndcg@10" in record]
    assert {key: valid[0][f"eval/valid/{key}"] for key in results["valid"]} == results["valid"]
    assert sum("eval/test/hr@5" in record for record in log) == 1

    assert f"run folder: {out}" in result.stdout
    assert format_metrics("test", results["test"]) in result.stdout.splitlines()
    state = torch.load(out / "best.pt", weights_only=True)
    assert "item_embedding.weight" in state


@pytest.mark.slow
def test_evaluate_reproduces_the_test_metrics(tiny_run, tmp_path):
    out, _ = tiny_run
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    json_path = tmp_path / "metrics.json"
    result = invoke(["evaluate", str(out), "--json", str(json_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        format_metrics("valid", results["valid"]),
        format_metrics("test", results["test"]),
    ]
    assert json.loads(json_path.read_text(encoding="utf-8")) == {
        "valid": results["valid"],
        "test": results["test"],
    }
    only_test = invoke(["evaluate", str(out), "--stage", "test"])
    assert only_test.exit_code == 0, only_test.output
    assert only_test.stdout.splitlines() == [format_metrics("test", results["test"])]


@pytest.mark.slow
def test_console_script_run_with_the_same_seed_is_identical(tiny_run, tmp_path):
    """The installed ``annsample`` script, in a fresh process, reproduces the in-process run."""
    script = Path(sys.executable).parent / "annsample"
    if not script.is_file():
        pytest.skip(f"console script not installed next to {sys.executable}; pip install -e .")
    first, _ = tiny_run
    second = tmp_path / "run"
    process = subprocess.run(
        [str(script), *TRAIN_ARGS, "--out", str(second)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr
    assert "Traceback" not in process.stderr
    assert {path.name for path in second.iterdir()} == RUN_FILES

    def results(run: Path) -> dict:
        data = json.loads((run / "results.json").read_text(encoding="utf-8"))
        return {key: data[key] for key in ("best_epoch", "epochs_run", "steps", "valid", "test")}

    assert results(second) == results(first)
    volatile = {"time", "train/epoch_seconds"}
    assert [{k: v for k, v in r.items() if k not in volatile} for r in metrics_records(second)] == [
        {k: v for k, v in r.items() if k not in volatile} for r in metrics_records(first)
    ]
    a = torch.load(first / "best.pt", weights_only=True)
    b = torch.load(second / "best.pt", weights_only=True)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert (first / "config.yaml").read_text() == (second / "config.yaml").read_text()
    assert format_metrics("test", results(first)["test"]) in process.stdout.splitlines()


# --------------------------------------------------------------------------- user errors


@pytest.mark.slow
def test_existing_run_folder_is_not_overwritten(tiny_run):
    out, _ = tiny_run
    before = snapshot(out)
    result = invoke([*TRAIN_ARGS, "--out", str(out)])
    assert_clean_error(result, str(out), "--overwrite")
    assert snapshot(out) == before


def test_non_empty_folder_is_not_reused(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me", encoding="utf-8")
    before = snapshot(tmp_path)
    result = invoke([*TRAIN_ARGS, "--out", str(tmp_path)])
    assert_clean_error(result, "already exists and is not empty")
    assert snapshot(tmp_path) == before


def test_out_that_is_a_file_is_an_error(tmp_path):
    path = tmp_path / "run"
    path.write_text("x", encoding="utf-8")
    assert_clean_error(invoke([*TRAIN_ARGS, "--out", str(path)]), "not a folder")
    assert path.read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.lr", "expected KEY=VALUE"),
        ("=3", "the key is empty"),
        ("a..b=1", "the key is empty"),
        ("train.epochs=ten", "train.epochs"),
        ("train.lrr=1", "train.lrr"),
        ("sampler.name=foo", "sampler.name"),
    ],
)
def test_bad_override_is_a_clean_error(tmp_path, override, fragment):
    out = tmp_path / "run"
    result = invoke(["train", "--config", TINY, "--set", override, "--out", str(out)])
    assert_clean_error(result, fragment)
    assert not out.exists(), "nothing is written before the config is valid"


def test_missing_config_is_a_clean_error(tmp_path):
    out = tmp_path / "run"
    result = invoke(["train", "--config", "missing.yaml", "--out", str(out)])
    assert_clean_error(result, "missing.yaml", "does not exist")
    assert not out.exists()


def test_invalid_config_is_a_clean_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("sampler:\n  index:\n    nlsit: 8\n", encoding="utf-8")
    result = invoke(["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert_clean_error(result, str(config), "sampler.index.nlsit")


def test_evaluate_on_a_folder_that_is_not_a_run(tmp_path):
    assert_clean_error(invoke(["evaluate", str(tmp_path)]), "not a finished training run")
    (tmp_path / "config.yaml").write_text("name: half\n", encoding="utf-8")
    assert_clean_error(invoke(["evaluate", str(tmp_path)]), "best.pt")


def test_evaluate_on_a_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    assert_clean_error(invoke(["evaluate", str(missing)]), str(missing), "does not exist")


def test_unknown_stage_is_a_usage_error(tmp_path):
    result = invoke(["evaluate", str(tmp_path), "--stage", "train"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert "--stage" in result.stderr
