"""What a finished run reached (logs/result.json), and the bundle's final weights and metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from volseg import __version__
from volseg.fileio import atomic_path, write_text_atomic
from volseg.recipe import Recipe
from volseg.training.checkpoint import save_torch_atomic


@dataclass
class TrainResult:
    """What a finished run reached."""

    run_dir: Path
    epochs: int
    best_mean_dice: float
    best_epoch: int
    per_label_dice: dict[str, float]
    per_label_iou: dict[str, float]
    seconds: float
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    surface: dict[str, dict[str, float]] = field(default_factory=dict)
    """Last validation's HD95 and average surface distance (mm) and surface Dice (2 mm) per label."""


def write_result(run_dir: Path, result: TrainResult) -> None:
    """logs/result.json."""
    data = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
    write_text_atomic(run_dir / "logs" / "result.json", json.dumps(data, indent=2) + "\n")


def read_result(run_dir: Path) -> TrainResult:
    """The result a run wrote to logs/result.json."""
    data = json.loads((run_dir / "logs" / "result.json").read_text())
    data["run_dir"] = Path(data["run_dir"])
    return TrainResult(**data)


def saved_network(recipe: Recipe, model_pt: Path) -> torch.nn.Module:
    """The bundle's inference network with the weights of ``model_pt`` (a plain state dict), on the CPU."""
    from volseg.bundle import inference_config
    from volseg.nets import build_network

    net = build_network(inference_config(recipe)["network_def"])
    net.load_state_dict(torch.load(model_pt, map_location="cpu", weights_only=True))
    return net


def finish_bundle(
    recipe: Recipe,
    run_dir: Path,
    result: TrainResult,
    network: torch.nn.Module,
    base: Path,
    n_train: int,
    n_val: int,
) -> None:
    """The kept weights (models/model.pt, already written by the checkpoint handler: the best epoch's or the final
    ones, ``train.weights``) to model.ts; metrics to metadata."""
    from volseg.bundle import run_metrics, update_bundle_metrics
    from volseg.nets import export_torchscript

    model_pt = run_dir / "models" / "model.pt"
    if not model_pt.is_file():  # no validation ran: keep the last weights
        save_torch_atomic(network.state_dict(), model_pt)
    # The saved weights (best epoch or final), re-read as a plain state dict.
    net = saved_network(recipe, model_pt)
    example = torch.zeros(1, recipe.model.in_channels, *recipe.roi_size)
    ts = export_torchscript(net, example)
    with atomic_path(run_dir / "models" / "model.ts") as tmp:
        torch.jit.save(ts, str(tmp))

    # The per-label figures are those of the last validation; the best epoch's mean is the first.
    metrics = run_metrics(result.best_mean_dice, result.per_label_dice, result.per_label_iou, result.surface)
    note = (
        f"Trained with volseg {__version__} on {n_train} cases from `{base}` and validated on {n_val}; "
        f"{result.epochs} epochs, best mean validation Dice {result.best_mean_dice:.4f} at epoch {result.best_epoch}"
        + ("; the bundle holds the final weights (train.weights: final)." if recipe.train.weights == "final" else ".")
    )
    update_bundle_metrics(recipe, run_dir, metrics, note)
