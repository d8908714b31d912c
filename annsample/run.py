"""Reading a finished run folder back: its config, its best checkpoint, its evaluation."""

from __future__ import annotations

from pathlib import Path

import torch

from annsample.config import RunConfig, load_config
from annsample.errors import RunError
from annsample.model import SASRec


def load_run(run_dir: str | Path) -> tuple[RunConfig, Path]:
    """The resolved config of a run folder and the path of its best checkpoint."""
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
    return load_config(config_path), checkpoint


def load_model(config: RunConfig, checkpoint: Path, n_items: int, device: torch.device) -> SASRec:
    """A SASRec with the checkpoint's weights, in eval mode."""
    model = SASRec(n_items, config.data.max_len, config.model).to(device)
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    expected = model.item_embedding.weight.shape
    found = state.get("item_embedding.weight", torch.empty(0)).shape
    if found != expected:
        raise RunError(
            f"checkpoint {checkpoint} has an item table of shape {tuple(found)} but the run's dataset "
            f"gives {tuple(expected)}; the dataset file changed since training"
        )
    model.load_state_dict(state)
    return model.eval()


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
