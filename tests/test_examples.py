"""Every example runs, in seconds, on the bundled tiny data (each with a small --steps)."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import pytest
from conftest import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.py"))


def load(name: str):
    path = REPO / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"example_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # the examples' default --data is relative to the repository


def test_the_examples_are_found():
    assert {"gru4rec.py", "two_tower.py", "refresh_study.py"} <= {p.name for p in EXAMPLES}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_every_example_accepts_steps(path, capsys):
    module = load(path.stem)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0 and "--steps" in capsys.readouterr().out


def test_gru4rec_trains_and_refreshes_on_schedule():
    result = load("gru4rec").main(["--steps", "41", "--batch-size", "16"])
    assert math.isfinite(result["loss"])
    # RefreshPolicy(every=20): the index was rebuilt at steps 20 and 40
    assert result["index/refresh_count"] == 2 and result["index/version"] == 40


def test_two_tower_re_encodes_the_catalog_at_every_refresh():
    args = ["--steps", "12", "--refresh-every", "4", "--batch-size", "16", "--negatives", "4"]
    result = load("two_tower").main([*args, "--catalog-size", "5000"])
    assert result["catalog_size"] == 5000 and result["refreshes"] == 3
    assert result["encode_seconds"] > 0 and result["step_seconds"] > 0
    assert math.isfinite(result["loss"])


def test_refresh_study_reports_every_policy(tmp_path):
    out = tmp_path / "study.json"
    args = ["--steps", "6", "--every", "2", "0", "--asynchronous", "3", "--probe-every", "3"]
    rows = load("refresh_study").main([*args, "--batch-size", "16", "--json", str(out)])
    assert [row["policy"] for row in rows] == ["every 2", "never", "every 3, async"]
    by_policy = {row["policy"]: row for row in rows}
    assert by_policy["never"]["refreshes"] == 0 and by_policy["every 2"]["refreshes"] == 3
    # a never-refreshed index is on average older than one refreshed every 2 steps
    assert by_policy["never"]["staleness_steps"] > by_policy["every 2"]["staleness_steps"]
    assert all(0.0 <= row["recall@k"] <= 1.0 for row in rows)
    assert out.read_text().startswith("[")


def test_an_example_runs_as_a_script():
    done = subprocess.run(
        [sys.executable, "examples/gru4rec.py", "--steps", "2", "--batch-size", "8"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "step 2: loss" in done.stderr


def test_ann_sample_timing_times_both_paths_and_the_mixture(tmp_path, monkeypatch):
    monkeypatch.setenv("ANNSAMPLE_CACHE", str(tmp_path))
    out = load("ann_sample_timing").main(["--steps", "1", "--negatives", "1"])
    assert out["catalog_size"] == 100_000 and not out["trained"]
    assert set(out["k=1"]) == {"general", "fast", "mixture_general", "mixture_fast"}
    assert all(ms > 0 for ms in out["k=1"].values())
