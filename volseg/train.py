"""Training on MONAI's Ignite engines, from the same configs the run's bundle ships.

The trainer and evaluator are instantiated from ``configs/train.json`` of the run directory (a MONAI bundle)
with MONAI's config parser. volseg then adds what a long run needs around them: a resumable last checkpoint
written atomically every epoch, early stopping, a progress bar and a one-line summary per epoch. At the end the
best weights become ``models/model.pt`` and ``models/model.ts`` and the metrics go into the bundle's metadata.
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg import __version__
from volseg.bundle import _versions, write_bundle_configs
from volseg.data.datalist import load_datalist, split_cases
from volseg.errors import UserError
from volseg.recipe import Recipe

LAST = "checkpoints/last.pt"


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


def resolve_device(name: str | None) -> torch.device:
    """``auto``/None picks CUDA when present; an unavailable device is a user error."""
    if name in (None, "", "auto"):
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"'{name}' is not a device (use cpu, cuda or cuda:N)", "--device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA was asked for but no CUDA GPU is available", "--device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"there is no GPU {dev.index} (found {torch.cuda.device_count()})", "--device")
    return dev


def _git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        rev = out.stdout.strip() if out.returncode == 0 else ""
        if rev:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5,
            ).stdout.strip()  # fmt: skip
            return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _per_label(value: Any, names: list[str]) -> dict[str, float]:
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


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": repr(random.getstate()),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    import ast

    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


def _relative_cases(cases: list[dict[str, str]], base: Path) -> list[dict[str, str]]:
    return [{k: os.path.relpath(v, base) for k, v in c.items()} for c in cases]


def prepare_run(
    recipe: Recipe, data_root: str | Path, run_dir: Path, resume: bool
) -> tuple[list[dict[str, str]], list[dict[str, str]], Path]:
    """Check the run folder and the data, split the cases and write the bundle's configs."""
    last = run_dir / LAST
    if resume and not last.is_file():
        raise UserError(f"nothing to resume: {LAST} is missing", run_dir)
    if not resume and last.is_file():
        raise UserError("this run folder already holds a training; add --resume or choose another --out", run_dir)
    cases = load_datalist(data_root, recipe.data.source)
    s = recipe.data.split
    train_cases, val_cases = split_cases(cases, s.val_fraction, s.folds, s.fold, s.seed)
    root = Path(data_root).resolve()
    base = root.parent if root.is_file() else root
    write_bundle_configs(
        recipe,
        run_dir,
        dataset_dir=str(base),
        train_cases=_relative_cases(train_cases, base),
        val_cases=_relative_cases(val_cases, base),
        data_note=f"{len(train_cases)} training and {len(val_cases)} validation cases from `{base}`.",
    )
    return train_cases, val_cases, base


def train(
    recipe: Recipe,
    data_root: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str | None = None,
    progress: bool | None = None,
    echo: Callable[[str], None] = print,
    overrides: list[str] | None = None,
) -> TrainResult:
    """Train a recipe on a data set; the run folder becomes a MONAI bundle.

    Args:
        recipe: the validated recipe.
        data_root: MSD folder, image/label folder or CSV.
        run_dir: the run folder (created), which becomes the bundle.
        resume: continue from ``checkpoints/last.pt``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar (default: when stderr is a terminal).
        echo: where the per-epoch summary lines go.
        overrides: the ``--set`` overrides, recorded in the run information.
    """
    import logging

    from ignite.engine import Events
    from ignite.handlers import EarlyStopping
    from monai.bundle import ConfigParser
    from monai.handlers import CheckpointSaver, from_engine
    from monai.utils import set_determinism

    from volseg.bundle import train_config

    t0 = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    dev = resolve_device(device)
    train_cases, val_cases, base = prepare_run(recipe, data_root, run_dir, resume)
    names = recipe.data.label_names
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    logging.getLogger("monai.handlers.StatsHandler").setLevel(logging.WARNING)
    logging.getLogger("ignite").setLevel(logging.WARNING)

    info = {
        "volseg_version": __version__,
        "git_revision": _git_revision(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "overrides": overrides or [],
        "data_root": str(base),
        "device": str(dev),
        "python": platform.python_version(),
        "packages": _versions(),
        "train_cases": len(train_cases),
        "val_cases": len(val_cases),
    }
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    (run_dir / "logs" / ("run_info.json" if not resume else "run_info_resume.json")).write_text(
        json.dumps(info, indent=2) + "\n"
    )

    cfg = train_config(recipe, str(base), _relative_cases(train_cases, base), _relative_cases(val_cases, base))
    parser = ConfigParser(cfg)
    parser["bundle_root"] = str(run_dir)
    parser["device"] = f"$torch.device('{dev}')"
    if sys.path[0] != str(run_dir):
        sys.path.insert(0, str(run_dir))
    set_determinism(seed=recipe.train.seed)
    echo(f"caching {len(train_cases)} training and {len(val_cases)} validation cases")
    trainer = parser.get_parsed_content("train#trainer")
    evaluator = parser.get_parsed_content("validate#evaluator")
    network = parser.get_parsed_content("network")
    optimizer = parser.get_parsed_content("optimizer")
    scheduler = parser.get_parsed_content("lr_scheduler") if "lr_scheduler" in cfg else None
    saver = next(h for h in parser.get_parsed_content("validate#handlers") if isinstance(h, CheckpointSaver))

    stopper = None
    if recipe.train.early_stopping is not None:
        es = recipe.train.early_stopping
        stopper = EarlyStopping(
            patience=es.patience,
            score_function=lambda e: float(e.state.metrics["val_mean_dice"]),
            trainer=trainer,
            min_delta=es.min_delta,
        )
        evaluator.add_event_handler(Events.COMPLETED, stopper)

    losses: list[float] = []
    epoch_losses: list[float] = []
    state: dict[str, Any] = {"best": -1.0, "best_epoch": 0, "dice": {}, "iou": {}, "epoch_t": time.perf_counter()}

    @trainer.on(Events.ITERATION_COMPLETED)
    def _collect(engine: Any) -> None:
        epoch_losses.append(float(from_engine(["loss"], first=True)(engine.state.output)))

    @evaluator.on(Events.COMPLETED)
    def _val(engine: Any) -> None:
        m = engine.state.metrics
        state["dice"] = _per_label(m.get("val_dice"), names)
        state["iou"] = _per_label(m.get("val_iou"), names)
        if engine.state.best_metric > state["best"]:
            state["best"] = float(engine.state.best_metric)
            state["best_epoch"] = trainer.state.epoch

    def objects() -> dict[str, Any]:
        objs: dict[str, Any] = {"network": network, "optimizer": optimizer, "trainer": trainer}
        if scheduler is not None:
            objs["lr_scheduler"] = scheduler
        if stopper is not None:
            objs["early_stopping"] = stopper
        return objs

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_end(engine: Any) -> None:
        loss = float(np.mean(epoch_losses)) if epoch_losses else float("nan")
        losses.append(loss)
        epoch_losses.clear()
        lr = optimizer.param_groups[0]["lr"]
        line = f"epoch {engine.state.epoch}/{engine.state.max_epochs}  loss {loss:.4f}  lr {lr:.2e}"
        if state["dice"] and evaluator.state.epoch and engine.state.epoch % recipe.train.val_interval == 0:
            dice = " ".join(f"{k} {v:.3f}" for k, v in state["dice"].items())
            line += f"  val dice {dice}  (best mean {state['best']:.3f} @ {state['best_epoch']})"
        line += f"  {time.perf_counter() - state['epoch_t']:.1f} s"
        state["epoch_t"] = time.perf_counter()
        echo(line)
        ckpt = {k: v.state_dict() for k, v in objects().items()}
        ckpt["best_saver"] = saver._key_metric_checkpoint.state_dict() if saver._key_metric_checkpoint else {}
        ckpt["volseg"] = {"losses": losses, "best": state["best"], "best_epoch": state["best_epoch"]}
        ckpt["rng"] = _rng_state()
        _atomic_save(ckpt, run_dir / LAST)

    if progress if progress is not None else sys.stderr.isatty():
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=from_engine(["loss"], first=True))

    if resume:
        ckpt = torch.load(run_dir / LAST, map_location=dev, weights_only=True)
        for k, obj in objects().items():
            if k in ckpt:
                obj.load_state_dict(ckpt[k])
        if ckpt.get("best_saver") and saver._key_metric_checkpoint is not None:
            saver._key_metric_checkpoint.load_state_dict(ckpt["best_saver"])
        v = ckpt.get("volseg", {})
        losses.extend(v.get("losses", []))
        state["best"], state["best_epoch"] = v.get("best", -1.0), v.get("best_epoch", 0)
        evaluator.state.best_metric = state["best"]
        evaluator.state.best_metric_epoch = state["best_epoch"]
        if "rng" in ckpt:
            _set_rng_state(ckpt["rng"])
        trainer.state.max_epochs = recipe.train.max_epochs
        echo(f"resuming {run_dir} after epoch {trainer.state.epoch}")
        if trainer.state.epoch >= recipe.train.max_epochs:
            echo("the run had already reached train.max_epochs; raise it with --set train.max_epochs=N")

    trainer.run()

    stopped = stopper is not None and trainer.state.epoch < recipe.train.max_epochs
    result = TrainResult(
        run_dir=run_dir,
        epochs=trainer.state.epoch,
        best_mean_dice=state["best"],
        best_epoch=state["best_epoch"],
        per_label_dice=state["dice"],
        per_label_iou=state["iou"],
        seconds=time.perf_counter() - t0,
        losses=losses,
        stopped_early=stopped,
    )
    finish_bundle(recipe, run_dir, result, network, base, len(train_cases), len(val_cases))
    return result


def finish_bundle(
    recipe: Recipe,
    run_dir: Path,
    result: TrainResult,
    network: torch.nn.Module,
    base: Path,
    n_train: int,
    n_val: int,
) -> None:
    """Best weights to models/model.pt (already written by the evaluator) and model.ts; metrics to metadata."""
    from volseg.bundle import inference_config, update_bundle_metrics
    from volseg.nets import build_network, export_torchscript

    model_pt = run_dir / "models" / "model.pt"
    if not model_pt.is_file():  # no validation ran: keep the last weights
        _atomic_save(network.state_dict(), model_pt)
    # The saved weights of the evaluator's best epoch, re-read as a plain state dict.
    state = torch.load(model_pt, map_location="cpu", weights_only=True)
    net_cfg = inference_config(recipe)["network_def"]
    net = build_network(net_cfg)
    net.load_state_dict(state)
    example = torch.zeros(1, recipe.model.in_channels, *recipe.roi_size)
    ts = export_torchscript(net, example)
    tmp = run_dir / "models" / ".model.ts.tmp"
    torch.jit.save(ts, str(tmp))
    os.replace(tmp, run_dir / "models" / "model.ts")

    metrics: dict[str, float] = {"val_mean_dice": round(result.best_mean_dice, 4)}
    # The per-label figures are those of the last validation; the best epoch's mean is above.
    metrics.update({f"val_dice_{k}": round(v, 4) for k, v in result.per_label_dice.items()})
    metrics.update({f"val_iou_{k}": round(v, 4) for k, v in result.per_label_iou.items()})
    note = (
        f"Trained with volseg {__version__} on {n_train} cases from `{base}` and validated on {n_val}; "
        f"{result.epochs} epochs, best mean validation Dice {result.best_mean_dice:.4f} at epoch {result.best_epoch}."
    )
    update_bundle_metrics(recipe, run_dir, metrics, note)
