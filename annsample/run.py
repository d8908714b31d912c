"""Reading a finished run folder back: its config, its best checkpoint, its evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from annsample.checkpoint import describe_load_error
from annsample.config import RunConfig, load_config
from annsample.errors import RunError
from annsample.model import SASRec


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
    from annsample.train import evaluate_model, prepare_data, resolve_device

    config, checkpoint = load_run(run_dir)
    device = resolve_device(config.train.device)
    prepared = prepare_data(config)
    model = load_model(config, checkpoint, prepared.n_items, device)
    return {stage: evaluate_model(model, prepared, stage, config, device) for stage in stages}
