"""Run folders: creating one (refusing to clobber), its step-keyed ``metrics.jsonl``, and reading a
finished one back (its config, its best checkpoint, its evaluation)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from annsample import checkpoint as checkpoint_mod
from annsample.checkpoint import describe_load_error
from annsample.config import RunConfig, load_config
from annsample.errors import CheckpointError, RunError
from annsample.model import SASRec


def default_run_dir(config: RunConfig) -> Path:
    """``runs/<date>-<name>``, with characters a folder name cannot hold replaced by ``_``."""
    name = re.sub(r"[^\w.+-]", "_", config.name).lstrip(".") or "run"
    return Path("runs") / f"{datetime.now():%Y%m%d-%H%M%S}-{name}"


def check_run_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Refuse a run folder that is a file, or non-empty without ``overwrite``; touches nothing."""
    out = Path(out_dir)
    if "\0" in str(out):
        raise RunError(f"run folder {str(out)!r} contains a NUL byte; choose another --out")
    if out.exists() and not out.is_dir():
        raise RunError(f"run folder {out} exists and is not a folder; choose another --out")
    if out.exists() and any(out.iterdir()) and not overwrite:
        resumable = (
            " (or --resume it: it has checkpoints)" if checkpoint_mod.list_checkpoints(out) else ""
        )
        raise RunError(
            f"run folder {out} already exists and is not empty; choose another --out, or pass "
            f"--overwrite to replace it{resumable}"
        )
    return out


def prepare_run_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Create the run folder; refuse to reuse a non-empty one unless ``overwrite``."""
    out = check_run_dir(out_dir, overwrite)
    try:
        if out.exists() and any(out.iterdir()):
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunError(
            f"cannot create run folder {out} ({error.strerror or error}); choose a writable --out"
        ) from None
    return out


def resume_point(out: Path) -> tuple[Path, dict[str, Any], list[Path]]:
    """The checkpoint to resume the run folder ``out`` from (see checkpoint.latest_checkpoint)."""
    if not out.is_dir():
        raise RunError(
            f"run folder {out} does not exist; --resume takes the folder of an interrupted "
            "`annsample train`"
        )
    if (out / "results.json").is_file():
        raise RunError(f"run {out} already finished (it has results.json); nothing to resume")
    return checkpoint_mod.latest_checkpoint(out)


class MetricsLog:
    """Step-keyed JSONL records with namespaced keys (``train/loss``, ``eval/valid/ndcg@10``).

    ``resume_at`` (a byte offset from :meth:`sync`) drops every record written after it, so a
    resumed run's log reads as the uninterrupted run's.
    """

    def __init__(self, path: Path, resume_at: int | None = None) -> None:
        self.path = path
        if resume_at is not None:
            size = path.stat().st_size if path.is_file() else 0
            if size < resume_at:
                raise CheckpointError(
                    f"{path} holds {size} bytes but held {resume_at} when the checkpoint was "
                    "written, so records are missing; restore it, or start a new run"
                )
            os.truncate(path, resume_at)
        self._file = path.open("a", encoding="utf-8")

    def write(self, step: int, **values: Any) -> None:
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def sync(self) -> int:
        """Flush to disk (before a checkpoint refers to it); returns the log's size in bytes."""
        self._file.flush()
        os.fsync(self._file.fileno())
        return self._file.tell()

    def close(self) -> None:
        self._file.close()


def load_run(run_dir: str | Path, overrides: tuple[str, ...] = ()) -> tuple[RunConfig, Path]:
    """The resolved config of a run folder (plus ``KEY=VALUE`` overrides) and the path of its best
    checkpoint."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(
            f"run folder {run} does not exist; pass the --out folder of a finished `annsample train`"
        )
    config_path, checkpoint = run / "config.yaml", run / "best.pt"
    for path in (config_path, checkpoint):
        if not path.is_file():
            raise RunError(
                f"run folder {run} has no {path.name}; it is not a finished training run"
            )
    # a saved config lists every key, so settings its sampler ignores are not errors here
    return load_config(config_path, overrides, check_ignored=False), checkpoint


def run_config_path(run_dir: str | Path) -> Path:
    """The ``config.yaml`` of an existing run folder (finished or interrupted)."""
    run = Path(run_dir)
    if not run.is_dir():
        raise RunError(
            f"run folder {run} does not exist; pass the --out folder of an `annsample train`"
        )
    path = run / "config.yaml"
    if not path.is_file():
        raise RunError(f"run folder {run} has no config.yaml; it is not a training run")
    return path


def load_model(config: RunConfig, checkpoint: Path, n_items: int, device: torch.device) -> SASRec:
    """A SASRec with the checkpoint's weights, in eval mode."""
    model = SASRec(n_items, config.data.max_len, config.model).to(device)
    try:
        state = torch.load(checkpoint, map_location=device, weights_only=True)
    except Exception as error:  # torn file, bad pickle, or objects weights_only refuses
        raise RunError(
            f"checkpoint {checkpoint} cannot be read ({describe_load_error(error)}); it is "
            "damaged or not a saved state dict: train the run again"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RunError(
            f"checkpoint {checkpoint} is not a model state dict (a mapping of names to tensors); "
            "pass a run folder written by `annsample train`"
        )
    expected = model.item_embedding.weight.shape
    found = state.get("item_embedding.weight", torch.empty(0)).shape
    if found != expected:
        raise RunError(
            f"checkpoint {checkpoint} has an item table of shape {tuple(found)} but the run's dataset "
            f"gives {tuple(expected)}; the dataset file changed since training"
        )
    mismatch = _state_mismatch(model.state_dict(), state)
    if mismatch:
        raise RunError(
            f"checkpoint {checkpoint} does not fit the run's model config ({mismatch}); "
            "config.yaml was edited after training, or best.pt comes from another run"
        )
    model.load_state_dict(state)
    return model.eval()


def _state_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    """What keeps ``found`` from loading into a model whose state dict is ``expected`` ("" if
    nothing)."""

    def few(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    missing = [name for name in expected if name not in found]
    unexpected = [name for name in found if name not in expected]
    reshaped = [
        f"{name} {tuple(found[name].shape)} instead of {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in found and found[name].shape != tensor.shape
    ]
    parts = [
        f"{len(names)} {what}: {few(names)}"
        for what, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("reshaped", reshaped),
        )
        if names
    ]
    return "; ".join(parts)


def evaluate_run(
    run_dir: str | Path, stages: tuple[str, ...] = ("valid", "test")
) -> dict[str, dict[str, float]]:
    """Full-ranking metrics of a run's best checkpoint for each stage."""
    from annsample.distributed import resolve_device
    from annsample.evaluate import evaluate_model
    from annsample.prepare import prepare_data

    config, checkpoint = load_run(run_dir)
    device = resolve_device(config.train.device)
    prepared = prepare_data(config)
    model = load_model(config, checkpoint, prepared.n_items, device)
    return {stage: evaluate_model(model, prepared, stage, config, device) for stage in stages}
