"""What a run measures: per-epoch losses, the validation metrics (surface metrics included), the one-line epoch
summary and the training curves."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg.bundle import DICE_METRIC, IOU_METRIC
from volseg.recipe import Recipe


def per_label(value: Any, names: list[str]) -> dict[str, float]:
    """Metrics computed without background, as a {label: value} dict."""
    if value is None:
        return {}
    if isinstance(value, torch.Tensor):
        vals = value.flatten().tolist()
    elif isinstance(value, (list, tuple)):
        vals = [float(v) for v in value]
    else:
        vals = [float(value)]
    return {n: float(v) for n, v in zip(names[1:], vals, strict=False)}


def defined_mean(values: list[float]) -> float:
    """Mean over the defined (finite) values; NaN when there are none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def plot_curves(history: dict[str, Any], path: Path, name: str) -> None:
    """Training curves as PNG after each validation (loss, per-label Dice, learning rate)."""
    from volseg.qc import plot_training_curves

    plot_training_curves(history, path, title=name)


class RunMetrics:
    """The losses and validation metrics of one training process, collected through engine events.

    Attributes:
        losses: Mean training loss of each epoch (over all ranks).
        best, best_epoch: The best key metric so far and its epoch.
        dice, iou: The last validation's per-label Dice and IoU.
        surface: The last validation's HD95, ASSD and surface Dice per label (single process only).
        history: What the training curves show.
    """

    def __init__(self, recipe: Recipe, world: int) -> None:
        self.recipe = recipe
        self.world = world
        self.names = recipe.data.label_names
        self.label_values = {n: lab.value for n, lab in recipe.data.labels.items() if lab.value}
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        self.best, self.best_epoch = -1.0, 0
        self.dice: dict[str, float] = {}
        self.iou: dict[str, float] = {}
        self.surface: dict[str, dict[str, float]] = {}
        self._cases: list[dict[str, dict[str, float]]] = []
        self.epoch_t = time.perf_counter()
        self.history: dict[str, Any] = {"loss": [], "lr": [], "epoch": [], "val_epoch": [], "val_dice": {}}

    def attach(self, trainer: Any, evaluator: Any) -> None:
        """Collect each iteration's loss, and the validation metrics when the evaluator completes."""
        from ignite.engine import Events
        from monai.handlers import from_engine

        loss_of = from_engine(["loss"], first=True)
        trainer.add_event_handler(Events.ITERATION_COMPLETED,
                                  lambda e: self.epoch_losses.append(float(loss_of(e.state.output))))  # fmt: skip
        evaluator.add_event_handler(Events.EPOCH_STARTED, lambda e: self._cases.clear())
        evaluator.add_event_handler(Events.ITERATION_COMPLETED, self._surface_collect)
        evaluator.add_event_handler(Events.COMPLETED, lambda e: self._validated(e, trainer))

    def _surface_collect(self, engine: Any) -> None:
        """Surface metrics in mm on the validation cases (model grid), as `volseg evaluate` computes them."""
        from volseg.metrics import evaluate_case

        if self.world > 1:  # each rank sees only its share of the validation cases
            return
        for item in engine.state.output if isinstance(engine.state.output, list) else []:
            pred, ref = item["pred"], item["label"]
            aff = pred.affine.cpu().numpy() if hasattr(pred, "affine") else np.eye(4)
            nd = pred.ndim - 1
            spacing = np.sqrt((aff[:nd, :nd] ** 2).sum(axis=0))
            self._cases.append(
                evaluate_case(pred.argmax(0).cpu().numpy(), ref.argmax(0).cpu().numpy(), self.label_values, spacing)
            )

    def _validated(self, engine: Any, trainer: Any) -> None:
        m = engine.state.metrics
        self.dice = per_label(m.get(DICE_METRIC), self.names)
        self.iou = per_label(m.get(IOU_METRIC), self.names)
        self.surface = {
            name: {metric: defined_mean([c[name][metric] for c in self._cases]) for metric in ("hd95", "assd", "nsd")}
            for name in self.label_values
        }
        if engine.state.best_metric > self.best:
            self.best = float(engine.state.best_metric)
            self.best_epoch = trainer.state.epoch

    def end_epoch(self, all_reduce: Callable[[torch.Tensor], Any] | None) -> float:
        """The epoch's mean loss (summed over ranks with ``all_reduce``), recorded; the iteration losses reset."""
        total: Any = torch.tensor([float(np.sum(self.epoch_losses)), float(len(self.epoch_losses))],
                                  dtype=torch.float64)  # fmt: skip
        if all_reduce is not None:
            total = all_reduce(total)
        loss = float(total[0] / total[1]) if total[1] else float("nan")
        self.losses.append(loss)
        self.epoch_losses.clear()
        return loss

    def epoch_line(self, engine: Any, evaluator: Any, loss: float, lr: float) -> str:
        """``epoch 3/40  loss 0.4210  lr 1.00e-02  val dice liver 0.912 ...  hd95 mm liver 4.1  2.3 s``."""
        line = f"epoch {engine.state.epoch}/{engine.state.max_epochs}  loss {loss:.4f}  lr {lr:.2e}"
        if self.dice and evaluator.state.epoch and engine.state.epoch % self.recipe.train.val_interval == 0:
            dice = " ".join(f"{k} {v:.3f}" for k, v in self.dice.items())
            line += f"  val dice {dice}  (best mean {self.best:.3f} @ {self.best_epoch})"
            hd95 = " ".join(f"{k} {v['hd95']:.1f}" for k, v in self.surface.items() if v["hd95"] == v["hd95"])
            if hd95:
                line += f"  hd95 mm {hd95}"
        line += f"  {time.perf_counter() - self.epoch_t:.1f} s"
        self.epoch_t = time.perf_counter()
        return line

    def record_curves(self, epoch: int, loss: float, lr: float, path: Path) -> None:
        """Add the epoch to the curves; after a validation epoch, redraw them."""
        h = self.history
        h["loss"].append(loss)
        h["lr"].append(lr)
        h["epoch"].append(epoch)
        if self.dice and epoch % self.recipe.train.val_interval == 0:
            h["val_epoch"].append(epoch)
            for k, v in self.dice.items():
                h["val_dice"].setdefault(k, []).append(v)
            plot_curves(h, path, self.recipe.name)
