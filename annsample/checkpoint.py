"""Full-state training checkpoints: atomic writes, integrity digests, safe loading, resume checks.

A checkpoint is one ``torch.save`` file, ``<run>/checkpoints/step-<step>.pt``, holding only tensors,
numbers, strings and containers of them, so it loads with ``weights_only=True`` (no code runs from
the pickle). It is written to a temporary file in the same folder, fsynced and renamed into place,
so a crash leaves the previous set of checkpoints intact; the newest ``keep`` are kept. A SHA-256
digest over every value is stored inside and checked on load (the zip container does not verify its
data), so a torn or altered file is reported and the previous checkpoint used instead.

What goes into a checkpoint is the training loop's business (``annsample.train``); this module
knows how to write, read, verify and match one, and how to capture the pieces that live outside the
loop: every RNG, and the ANN sampler's index with its refresh counters.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from annsample.errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT = "annsample.checkpoint/1"
FOLDER = "checkpoints"
_NAME = re.compile(r"step-(\d+)\.pt")
# Settings that never change what training computes, so a resumed run may change them.
RESUMABLE_CHANGES = frozenset(
    {"train.show_progress", "train.checkpoint_every", "train.keep_checkpoints"}
)


class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be trusted (torn, truncated, altered or foreign)."""


# --------------------------------------------------------------------------- atomic files


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically: temporary file, fsync, rename, fsync folder."""
    _atomic_write(Path(path), lambda file: torch.save(obj, file))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically (readers see the old file or the new one)."""
    _atomic_write(Path(path), lambda file: file.write(text.encode("utf-8")))


def _atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- digest


def state_digest(obj: Any) -> str:
    """SHA-256 over a nested structure of tensors, numbers, strings, lists, tuples and dicts.

    Tensors contribute dtype, shape and raw bytes; the structure and key order count too, so any
    changed bit or value changes the digest.

    >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.zeros(2)})
    True
    >>> state_digest({"w": torch.zeros(2)}) == state_digest({"w": torch.zeros(3)})
    False
    """
    digest = hashlib.sha256()
    _feed(digest, obj)
    return digest.hexdigest()


def _feed(digest: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        tensor = obj.detach()
        if tensor.is_sparse:
            tensor = tensor.coalesce()
            _feed(digest, ("sparse", tuple(tensor.shape), tensor.indices(), tensor.values()))
            return
        tensor = tensor.cpu().contiguous()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)};".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, Mapping):
        digest.update(f"D{len(obj)};".encode())
        for key, value in obj.items():
            _feed(digest, key)
            _feed(digest, value)
    elif isinstance(obj, (list, tuple)):
        digest.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)};".encode())
        for value in obj:
            _feed(digest, value)
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        digest.update(f"{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"a checkpoint holds tensors and plain values only, not {type(obj)}")


# --------------------------------------------------------------------------- write and read


def checkpoint_folder(run_dir: str | Path) -> Path:
    return Path(run_dir) / FOLDER


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The checkpoint files of a run folder, oldest (lowest step) first."""
    folder = checkpoint_folder(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write ``state`` as the checkpoint of step ``state["step"]``; keep the newest ``keep``.

    Returns the checkpoint's path. ``state`` must hold tensors and plain values only.
    """
    folder = checkpoint_folder(run_dir)
    folder.mkdir(exist_ok=True)
    payload = {"format": FORMAT, **state}
    payload["digest"] = state_digest(payload)
    path = folder / f"step-{int(state['step']):09d}.pt"
    atomic_save(payload, path)
    for old in list_checkpoints(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load one checkpoint with ``weights_only=True`` onto the CPU and verify its digest.

    Raises:
        CorruptCheckpoint: the file is torn, truncated, altered, not a checkpoint, or holds
            objects other than tensors and plain values.
    """
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before refusing them
            warnings.simplefilter("ignore", UserWarning)
            payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a torn zip, a bad pickle, a refused global: all "do not use"
        raise CorruptCheckpoint(f"cannot be read ({describe_load_error(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CorruptCheckpoint(f"is not an annsample checkpoint (expected format {FORMAT!r})")
    digest = payload.pop("digest", None)
    try:
        intact = digest == state_digest(payload)
    except TypeError:
        intact = False
    if not intact:
        raise CorruptCheckpoint("fails its integrity check (the stored digest does not match)")
    return payload


def describe_load_error(error: BaseException) -> str:
    """A short reason why ``torch.load`` failed: the refused global, or the first sentence.

    >>> describe_load_error(RuntimeError("failed reading zip archive: not a ZIP archive. This is"))
    'RuntimeError: failed reading zip archive: not a ZIP archive'
    """
    text = " ".join(str(error).split())
    refused = re.search(r"Unsupported global: (GLOBAL \S+)", text)
    if refused:
        return f"it holds objects that weights_only=True refuses to load: {refused.group(1)}"
    first = re.split(r"(?<=[.!?]) ", text, maxsplit=1)[0].rstrip(".") or "no data"
    return f"{type(error).__name__}: {first}"


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, dict[str, Any], list[Path]]:
    """The newest checkpoint that reads back intact, its payload, and the newer unreadable ones.

    Each unreadable checkpoint is skipped with a warning that names it and the one used instead.

    Raises:
        CheckpointError: the run folder has no checkpoint, or none of them can be read.
    """
    paths = list_checkpoints(run_dir)
    if not paths:
        raise CheckpointError(
            f"run folder {run_dir} has no checkpoints to resume from (it stopped before its first "
            "checkpoint, or was written by an older annsample); start it again with "
            f"--out {run_dir} --overwrite"
        )
    corrupt: list[Path] = []
    reasons: list[str] = []
    for path in reversed(paths):
        try:
            payload = read_checkpoint(path)
        except CorruptCheckpoint as error:
            corrupt.append(path)
            reasons.append(f"{path.name} {error}")
            logger.warning("checkpoint %s %s; trying the previous one", path, error)
            continue
        if corrupt:
            logger.warning(
                "resuming from %s instead of the newer, unreadable %s",
                path.name,
                ", ".join(p.name for p in corrupt),
            )
        return path, payload, corrupt
    raise CheckpointError(
        f"none of the {len(paths)} checkpoints in {checkpoint_folder(run_dir)} can be read "
        f"({reasons[0]}); start the run again with --out {run_dir} --overwrite"
    )


def set_aside(run_dir: str | Path, corrupt: list[Path]) -> None:
    """Before resuming: rename unreadable checkpoints to ``*.corrupt`` (kept for inspection, never
    loaded, and never counted as newer than the checkpoints written next) and delete the
    temporary file of a write the crash interrupted."""
    for path in corrupt:
        path.rename(path.with_name(path.name + ".corrupt"))
    for temporary in checkpoint_folder(run_dir).glob(".step-*.tmp"):
        temporary.unlink(missing_ok=True)


# --------------------------------------------------------------------------- matching


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``.

    >>> flatten({"a": 1, "b": {"c": 2}})
    {'a': 1, 'b.c': 2}
    """
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


_MISSING = object()


def config_differences(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Dotted keys whose values differ between two nested config dicts (or exist in only one).

    A key ``saved`` lacks counts as its value in ``defaults`` (a nested config dict of the
    built-in defaults), when given: a checkpoint written before a setting existed ran with the
    behaviour that setting's default keeps.

    >>> config_differences({"a": 1}, {"a": 1, "b": 2}, defaults={"b": 2})
    []
    >>> config_differences({"a": 1}, {"a": 1, "b": 3}, defaults={"b": 2})
    ['b']
    """
    a, b = flatten(saved), flatten(current)
    a = {**flatten(defaults or {}), **a}
    return [
        key for key in sorted(a.keys() | b.keys()) if a.get(key, _MISSING) != b.get(key, _MISSING)
    ]


def check_config(
    payload: Mapping[str, Any],
    current: Mapping[str, Any],
    path: Path,
    defaults: Mapping[str, Any] | None = None,
) -> list[str]:
    """Refuse a checkpoint written under another config; return the harmless keys that changed.

    ``defaults`` (the built-in config as a nested dict) stand in for keys an older checkpoint
    lacks (see :func:`config_differences`).

    Raises:
        CheckpointError: naming the first setting that differs (and how many others do).
    """
    changed = config_differences(payload["config"], current, defaults)
    blocking = [key for key in changed if key not in RESUMABLE_CHANGES]
    if blocking:
        key = blocking[0]
        saved = {**flatten(defaults or {}), **flatten(payload["config"])}
        now = flatten(current)
        more = (
            f" (and {len(blocking) - 1} more: {', '.join(blocking[1:4])})" if blocking[1:] else ""
        )
        raise CheckpointError(
            f"checkpoint {path} was written with {key}={saved.get(key, '<unset>')!r} but the config "
            f"now has {key}={now.get(key, '<unset>')!r}{more}; resume with the run's own config "
            "(drop --config/--set), or start a new run"
        )
    return changed


def catalog_summary(split: Any) -> dict[str, Any]:
    """Sizes and a SHA-256 fingerprint of a leave-one-out split (the data a run trains on)."""
    digest = hashlib.sha256()
    for array in (split.train_indptr, split.train_items, split.valid_target, split.test_target):
        digest.update(np.ascontiguousarray(array, dtype=np.int64))
    return {
        "n_items": int(split.n_items),
        "n_users": int(split.n_users),
        "n_interactions": int(len(split.train_items) + 2 * split.n_users),
        "sha256": digest.hexdigest(),
    }


def check_catalog(
    payload: Mapping[str, Any], current: Mapping[str, Any], path: Path, data_path: str
) -> None:
    """Refuse a checkpoint trained on other data, naming what differs.

    Raises:
        CheckpointError: item count, user count, interaction count or the contents differ.
    """
    saved = payload["catalog"]
    for key, what in (
        ("n_items", "items"),
        ("n_users", "users"),
        ("n_interactions", "interactions"),
    ):
        if saved[key] != current[key]:
            raise CheckpointError(
                f"checkpoint {path} was trained on a catalog of {saved[key]} {what} but "
                f"{data_path} now gives {current[key]}; the dataset changed since the checkpoint: "
                "restore it, or start a new run"
            )
    if saved["sha256"] != current["sha256"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on other interactions than {data_path} now holds "
            "(same sizes, different contents); restore the dataset, or start a new run"
        )


# --------------------------------------------------------------------------- RNG


def capture_rng(generators: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The state of every global RNG (python, numpy, torch, CUDA) plus named generator states."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": numpy_state["bit_generator"],
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "generators": dict(generators),
    }


def restore_rng(state: Mapping[str, Any], generators: Mapping[str, torch.Generator]) -> None:
    """Put back what :func:`capture_rng` captured; ``generators`` are set from their saved states."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": numpy["bit_generator"],
            "state": {"key": numpy["key"].numpy().astype(np.uint32), "pos": numpy["pos"]},
            "has_gauss": numpy["has_gauss"],
            "gauss": numpy["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])


# --------------------------------------------------------------------------- index


# The refresher saves and restores itself (IndexRefresher.state_dict); these add the schedule's count.
def refresher_state(refresher: Any, schedule: Any) -> dict[str, Any]:
    """The refresher's published index and counters, and the schedule's refresh count. A refresh
    still running on a background thread is not included."""
    return {**refresher.state_dict(), "schedule_refreshes": getattr(schedule, "refreshes", None)}


def restore_refresher(
    refresher: Any, schedule: Any, state: Mapping[str, Any], device: torch.device
) -> None:
    """Publish the saved index in ``refresher`` (no k-means, no re-add) and restore the counters."""
    refresher.load_state_dict(state, device)
    if state["schedule_refreshes"] is not None:
        schedule.refreshes = state["schedule_refreshes"]


# --------------------------------------------------------------------------- training state


@dataclass
class Progress:
    """Where training stands: what a checkpoint holds besides weights, optimisers and RNGs."""

    step: int = 0
    next_epoch: int = 1  # the epoch to run (or to finish, when next_batch > 0)
    next_batch: int = 0  # batches of next_epoch already trained
    epoch_loss_sum: float = 0.0  # sum of train/loss over those batches
    epoch_elapsed: float = 0.0  # seconds spent on those batches
    best_ndcg: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0
    stopped: bool = False  # early stopping fired
    epoch_seconds: list[float] = field(default_factory=list)
    best_digest: str = ""  # state_digest of the weights in best.pt


def restore_training(
    checkpoint: Mapping[str, Any],
    model: torch.nn.Module,
    optimizers: list[torch.optim.Optimizer],
    generators: Mapping[str, torch.Generator],
    schedulers: list[Any] = (),
) -> Progress:
    """Load weights, optimiser moments, learning-rate schedulers and RNGs from a checkpoint;
    return its progress (the index is :func:`restore_refresher`'s). A checkpoint from before
    schedulers were saved holds none, as a run without a schedule."""
    try:
        model.load_state_dict(checkpoint["model"])
        for optimizer, state in zip(optimizers, checkpoint["optimizers"], strict=True):
            optimizer.load_state_dict(state)
        saved = checkpoint.get("schedulers", [])
        for scheduler, state in zip(schedulers, saved, strict=True):
            scheduler.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as error:
        # check_config makes this unreachable for annsample's own checkpoints
        raise CheckpointError(f"the checkpoint does not fit the model: {error}") from None
    restore_rng(checkpoint["rng"], generators)
    return Progress(**checkpoint["progress"])


def save_best(model: torch.nn.Module, path: Path) -> str:
    """Write the model's weights to ``path`` atomically; returns their digest."""
    state = model.state_dict()
    atomic_save(state, path)
    return state_digest(state)


def load_best(path: Path, digest: str, device: torch.device) -> dict[str, torch.Tensor]:
    """The best weights, checked against the digest recorded when they were written."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
        intact = state_digest(state) == digest
    except Exception as error:  # missing, torn, or not a state dict: the run cannot be tested
        reason = describe_load_error(error)
        raise CheckpointError(f"cannot read {path} ({reason}); start the run again") from None
    if not intact:
        raise CheckpointError(
            f"{path} does not hold the weights of the best epoch this run recorded (it was "
            "written after the checkpoint it resumed from, by a run that then diverged); start "
            "the run again"
        )
    return state
