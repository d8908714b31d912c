"""annsample.run: run folders refuse to clobber, and a resumed metrics log drops later records."""

from __future__ import annotations

import json

import pytest

from annsample.errors import CheckpointError, RunError
from annsample.run import MetricsLog, check_run_dir, prepare_run_dir


def test_run_folders_refuse_to_clobber(tmp_path):
    out = prepare_run_dir(tmp_path / "run")
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunError, match="already exists and is not empty.*--overwrite"):
        check_run_dir(out)
    assert prepare_run_dir(out, overwrite=True).is_dir() and not any(out.iterdir())
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError, match="is not a folder"):
        check_run_dir(tmp_path / "file")


def test_metrics_log_resumes_at_the_checkpoint_offset(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write(1, **{"train/loss": 0.5})
    offset = log.sync()
    log.write(2, **{"train/loss": 0.4})
    log.close()
    MetricsLog(path, resume_at=offset).close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1]
    with pytest.raises(CheckpointError, match="records are missing"):
        MetricsLog(path, resume_at=offset + 1000)
