"""Training on MONAI's Ignite engines, from the same configs the run's bundle ships.

The trainer and evaluator are instantiated from ``configs/train.json`` of the run directory (a MONAI bundle)
with MONAI's config parser. volseg then adds what a long run needs around them: a resumable last checkpoint
written atomically every epoch, early stopping, a progress bar and a one-line summary per epoch. At the end the
best (or, with ``train.weights: final``, the final) weights become ``models/model.pt`` and ``models/model.ts`` and
the metrics go into the bundle's metadata.

This module puts the parts in :mod:`volseg.training` together (run folder, engines, metrics, checkpoint,
signals, result) and launches one process or several.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch

from volseg.errors import UserError
from volseg.recipe import Recipe, recipe_from_dict
from volseg.runtime import distributed_backend, rank_device, resolve_device
from volseg.training.checkpoint import Checkpointer
from volseg.training.distributed import average_buffers, record_states
from volseg.training.engines import Engines, attach_cpu_autocast, build_engines, cpu_bf16_training
from volseg.training.metrics import RunMetrics
from volseg.training.result import TrainResult, finish_bundle, read_result, write_result
from volseg.training.run_dir import (
    LAST,
    check_run_dir,
    prepare_run,
    relative_cases,
    split_run_cases,
    write_run_configs,
    write_run_info,
)
from volseg.training.signals import TrainingInterrupted, caught_signals

__all__ = [
    "LAST",
    "TrainResult",
    "TrainingInterrupted",
    "attach_cpu_autocast",
    "check_run_dir",
    "cpu_bf16_training",
    "finish_bundle",
    "prepare_run",
    "split_run_cases",
    "train",
]

# The names other modules used before the trainer was split into volseg.training.
_relative_cases = relative_cases
_read_result = read_result


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
    nproc_per_node: int = 1,
) -> TrainResult:
    """Train a recipe on a data set; the run folder becomes a MONAI bundle.

    Args:
        recipe: the validated recipe.
        data_root: MSD folder, image/label folder or CSV.
        run_dir: the run folder (created), which becomes the bundle.
        resume: continue from ``checkpoints/last.pt``.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        progress: show a progress bar (default: when stderr is a terminal).
        echo: where the per-epoch summary lines go (rank 0 only when distributed).
        overrides: the ``--set`` overrides, recorded in the run information.
        nproc_per_node: spawn this many processes through ignite.distributed (NCCL on CUDA, gloo on CPU). Under
            ``torchrun`` (``WORLD_SIZE`` set) the processes already exist and this stays 1.

    Raises:
        TrainingInterrupted: SIGINT/SIGTERM arrived; the checkpoint to resume from was written first.
    """
    run_dir = Path(run_dir).resolve()
    if nproc_per_node > 1:
        import ignite.distributed as idist

        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "--nproc-per-node cannot be combined with torchrun; use one or the other", "--nproc-per-node"
            )
        resolve_device(device)
        check_run_dir(run_dir, resume)
        split_run_cases(recipe, data_root)  # data errors surface here, before any process is spawned
        backend = distributed_backend(device)
        with idist.Parallel(backend=backend, nproc_per_node=nproc_per_node) as parallel:
            parallel.run(_spawned, recipe, str(data_root), str(run_dir), resume, device, progress, overrides)
        return read_result(run_dir)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import ignite.distributed as idist

        with idist.Parallel(backend=distributed_backend(device)) as parallel:
            parallel.run(_spawned, recipe, str(data_root), str(run_dir), resume, device, progress, overrides)
        return read_result(run_dir)
    return _run(recipe, data_root, run_dir, resume=resume, device=device, progress=progress, echo=echo,
                overrides=overrides)  # fmt: skip


def _calibrate(
    recipe: Recipe, run_dir: Path, engines: Engines, dev: torch.device, train_cases: list[dict[str, str]],
    val_cases: list[dict[str, str]], base: Path, echo: Callable[[str], None],
) -> Recipe:  # fmt: skip
    """``train.calibrate``: the label bias chosen on the validation cases (:mod:`volseg.training.calibrate`),
    written into the bundle's recipe and configs. Returns the recipe the bundle now holds."""
    from volseg.training.calibrate import calibrate, validation_cases

    model_pt = run_dir / "models" / "model.pt"
    if not val_cases or not model_pt.is_file():
        echo("calibration: no validation ran, so infer.label_bias stays as written")
        return recipe
    cases = validation_cases(recipe, engines.evaluator, model_pt, dev)
    chosen, _ = calibrate(recipe, cases, echo)
    if chosen == recipe.infer.label_bias:
        return recipe
    raw = recipe.model_dump(mode="json")
    raw["infer"]["label_bias"] = chosen
    calibrated = recipe_from_dict(raw, recipe.name)
    write_run_configs(calibrated, run_dir, train_cases, val_cases, base)
    return calibrated


def _spawned(
    local_rank: int,
    recipe: Recipe,
    data_root: str,
    run_dir: str,
    resume: bool,
    device: str | None,
    progress: bool | None,
    overrides: list[str] | None,
) -> None:
    """Entry point of each distributed process (ignite.distributed.Parallel.run)."""
    import ignite.distributed as idist

    device = rank_device(device, local_rank)
    if device is not None and device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(device))
    echo = print if idist.get_rank() == 0 else (lambda s: None)
    _run(recipe, data_root, Path(run_dir), resume=resume, device=device, progress=progress, echo=echo,
         overrides=overrides)  # fmt: skip


def _attach_epoch_end(
    recipe: Recipe, run_dir: Path, engines: Engines, metrics: RunMetrics, checkpointer: Checkpointer,
    echo: Callable[[str], None], idist: Any,
) -> None:  # fmt: skip
    """After each epoch: one state over the ranks, the summary line, the checkpoint and (rank 0) the curves."""
    from ignite.engine import Events

    trainer, world, rank = engines.trainer, idist.get_world_size(), idist.get_rank()

    @trainer.on(Events.EPOCH_COMPLETED)
    def _epoch_end(engine: Any) -> None:
        if world > 1:
            average_buffers(engines.network, idist)
        loss = metrics.end_epoch(idist.all_reduce if world > 1 else None)
        lr = engines.optimizer.param_groups[0]["lr"]
        echo(metrics.epoch_line(engine, engines.evaluator, loss, lr))
        checkpointer.save()
        if rank == 0:
            metrics.record_curves(engine.state.epoch, loss, lr, run_dir / "logs" / "training_curves.png")


def _resume(recipe: Recipe, run_dir: Path, engines: Engines, metrics: RunMetrics, checkpointer: Checkpointer,
            device: torch.device, world: int, echo: Callable[[str], None]) -> None:  # fmt: skip
    """Continue from checkpoints/last.pt: engine states, counters, the best so far and (one process) the RNGs."""
    trainer, evaluator = engines.trainer, engines.evaluator
    v = checkpointer.load(device, restore_rng=world == 1)
    metrics.losses.extend(v.get("losses", []))
    metrics.best, metrics.best_epoch = v.get("best", -1.0), v.get("best_epoch", 0)
    evaluator.state.best_metric = metrics.best
    evaluator.state.best_metric_epoch = metrics.best_epoch
    trainer.state.max_epochs = recipe.train.max_epochs
    echo(f"resuming {run_dir} after epoch {trainer.state.epoch} (iteration {trainer.state.iteration})")
    if trainer.state.epoch >= recipe.train.max_epochs:
        echo("the run had already reached train.max_epochs; raise it with --set train.max_epochs=N")


def _run(
    recipe: Recipe,
    data_root: str | Path,
    run_dir: Path,
    *,
    resume: bool,
    device: str | None,
    progress: bool | None,
    echo: Callable[[str], None],
    overrides: list[str] | None,
) -> TrainResult:
    """One training process (the only one, or one rank of a distributed run)."""
    import logging

    import ignite.distributed as idist
    from ignite.engine import Events
    from monai.handlers import from_engine
    from monai.utils import set_determinism

    t0 = time.perf_counter()
    rank, world = idist.get_rank(), idist.get_world_size()
    dev = resolve_device(device)
    if rank == 0:
        train_cases, val_cases, base = prepare_run(recipe, data_root, run_dir, resume)
    else:
        check_run_dir(run_dir, resume)
        train_cases, val_cases, base = split_run_cases(recipe, data_root)
    if world > 1:
        idist.barrier()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    logging.getLogger("monai.handlers.StatsHandler").setLevel(logging.WARNING)
    logging.getLogger("ignite").setLevel(logging.WARNING)
    if rank == 0:
        write_run_info(run_dir, resume=resume, overrides=overrides, base=base, device=dev, world=world,
                       n_train=len(train_cases), n_val=len(val_cases))  # fmt: skip

    set_determinism(seed=recipe.train.seed + rank)
    echo(
        f"caching {len(train_cases)} training and {len(val_cases)} validation cases"
        + (f" over {world} processes" if world > 1 else "")
    )
    rel_train, rel_val = relative_cases(train_cases, base), relative_cases(val_cases, base)
    engines = build_engines(recipe, run_dir, base, rel_train, rel_val, dev, rank, world)
    trainer = engines.trainer
    leave_autocast = attach_cpu_autocast(trainer, engines.network) if cpu_bf16_training(recipe, dev) else None
    if leave_autocast is not None:
        echo("training steps in bfloat16 autocast on this CPU (train.amp: false for float32)")

    metrics = RunMetrics(recipe, world)
    metrics.attach(trainer, engines.evaluator)

    def progress_of() -> dict[str, Any]:
        return {"losses": metrics.losses, "best": metrics.best, "best_epoch": metrics.best_epoch}

    checkpointer = Checkpointer(run_dir / LAST, engines.state_objects(), engines.saver, progress_of, rank == 0)
    _attach_epoch_end(recipe, run_dir, engines, metrics, checkpointer, echo, idist)
    if recipe.train.time_budget_s is not None:
        from volseg.training.budget import attach_time_budget

        agree = (lambda n: int(cast(Any, idist.broadcast(n, src=0)))) if world > 1 else None
        attach_time_budget(trainer, engines.evaluator, engines.scheduler, engines.optimizer,
                           recipe.train.time_budget_s, recipe.train.val_interval, echo, agree)  # fmt: skip
    signals: list[int] = []

    @trainer.on(Events.ITERATION_COMPLETED)
    def _on_signal(engine: Any) -> None:
        if signals:
            checkpointer.save()
            engine.terminate()

    if rank == 0 and (progress if progress is not None else sys.stderr.isatty()):
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=from_engine(["loss"], first=True))
    if resume:
        _resume(recipe, run_dir, engines, metrics, checkpointer, dev, world, echo)
    try:
        with caught_signals(signals):
            trainer.run()
    finally:
        if leave_autocast is not None:
            leave_autocast()  # also when an iteration was interrupted inside the autocast region
    if signals:
        raise TrainingInterrupted(signals[0], run_dir / LAST)

    result = TrainResult(
        run_dir=run_dir,
        epochs=trainer.state.epoch,
        best_mean_dice=metrics.best,
        best_epoch=metrics.best_epoch,
        per_label_dice=metrics.dice,
        per_label_iou=metrics.iou,
        seconds=time.perf_counter() - t0,
        losses=metrics.losses,
        stopped_early=engines.stopper is not None and trainer.state.epoch < recipe.train.max_epochs,
        surface=metrics.surface,
    )
    if world > 1:
        record_states(engines.network, run_dir, idist)
    if rank == 0 and recipe.train.calibrate:
        recipe = _calibrate(recipe, run_dir, engines, dev, train_cases, val_cases, base, echo)
    if rank == 0:
        finish_bundle(recipe, run_dir, result, engines.network, base, len(train_cases), len(val_cases))
        write_result(run_dir, result)
    if world > 1:
        idist.barrier()
    return result
