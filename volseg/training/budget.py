"""Training that keeps to a time budget (``train.time_budget_s``).

A plan made for a time budget sizes its schedule from one measured training step: ``max_epochs`` is what the
budget would hold at that bare step. The real epochs also load and augment crops (in a loader process that shares
the CPU with the step), validate and write checkpoints, and on a shared machine they run slower still. So the
trainer measures itself: after every epoch it estimates, at the median training time of the epochs so far (the
first, which builds the convolution primitives, only while it is the only one) and the median validation time, how
many epochs the seconds left hold, and when that is fewer than ``max_epochs`` it lowers ``max_epochs`` to the last
one that fits. After the first epoch it acts only when not one more epoch fits: a cut made from the first epoch's
start-up could not be taken back. It never raises ``max_epochs``: that stays the most a run trains, and a machine
faster than the plan's measurement ends early. A poly or cosine learning-rate schedule is fitted to the new
length, so that the rate still decays to its end. The budget counts this process's training from the trainer's
start: caching before it is not counted, validation is.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from statistics import median
from typing import Any

MAX_EPOCHS_FITTED = 1_000_000
"""An upper bound on the epochs :func:`fit_epochs` returns (a budget of days at sub-millisecond epochs)."""


def fit_epochs(
    budget_s: float, elapsed_s: float, epoch: int, train_epoch_s: float, val_s: float, val_interval: int
) -> int:
    """The last epoch that ends within ``budget_s``: ``epoch`` plus the epochs the rest holds, at ``train_epoch_s``
    each and ``val_s`` for each validation (after every ``val_interval``-th epoch). When more epochs fit, the result
    is rounded down to a validated epoch if that still adds one, since weights after the last validation are never
    kept; ``epoch`` itself means stop now."""
    remaining = budget_s - elapsed_s
    per_cycle = val_interval * train_epoch_s + val_s
    if remaining <= 0 or train_epoch_s <= 0 and per_cycle <= 0:
        return epoch if remaining <= 0 else epoch + MAX_EPOCHS_FITTED
    n = 0
    # whole validation cycles first, then the epochs one by one up to the next validation
    to_next = (-epoch) % val_interval or val_interval
    first = to_next * train_epoch_s + val_s
    if first <= remaining:
        n = to_next
        remaining -= first
        cycles = int(remaining // per_cycle) if per_cycle > 0 else MAX_EPOCHS_FITTED
        n += cycles * val_interval
        remaining -= cycles * per_cycle
    while n < MAX_EPOCHS_FITTED:
        cost = train_epoch_s + (val_s if (epoch + n + 1) % val_interval == 0 else 0.0)
        if cost > remaining:
            break
        remaining -= cost
        n += 1
    fitted = min(epoch + n, epoch + MAX_EPOCHS_FITTED)
    validated = fitted - fitted % val_interval
    return validated if validated > epoch else fitted


def fit_schedule(scheduler: Any, optimizer: Any, epoch: int, max_epochs: int) -> bool:
    """Stretch or shorten an epoch-stepped poly or cosine schedule to end at ``max_epochs``: its length is set and
    the learning rate made what the new schedule gives after ``epoch`` steps. Returns whether it was one of
    those."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, PolynomialLR

    if isinstance(scheduler, PolynomialLR):
        scheduler.total_iters = max_epochs
        factor = (1.0 - min(epoch, max_epochs) / max_epochs) ** scheduler.power
        lrs = [base * factor for base in scheduler.base_lrs]
    elif isinstance(scheduler, CosineAnnealingLR):
        scheduler.T_max = max_epochs
        c = (1.0 + math.cos(math.pi * min(epoch, max_epochs) / max_epochs)) / 2.0
        lrs = [scheduler.eta_min + (base - scheduler.eta_min) * c for base in scheduler.base_lrs]
    else:
        return False
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    return True


def attach_time_budget(
    trainer: Any,
    evaluator: Any,
    scheduler: Any,
    optimizer: Any,
    budget_s: float,
    val_interval: int,
    echo: Callable[[str], None],
    agree: Callable[[int], int] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, Any]:
    """Lower the trainer's ``max_epochs`` (and fit its schedule) after any epoch where ``budget_s`` would not hold it.

    ``agree`` makes the processes of a distributed run take one value (rank 0's). Returns the live record: the
    seconds measured per epoch (``train_s``) and per validation (``val_s``), and each change as
    ``(after epoch, old max_epochs, new max_epochs)`` in ``changes``.
    """
    from ignite.engine import Events

    record: dict[str, Any] = {"budget_s": budget_s, "train_s": [], "val_s": [], "changes": []}
    clocks: dict[str, float] = {}

    @trainer.on(Events.STARTED)
    def _started(engine: Any) -> None:
        clocks["start"] = clocks["last"] = clock()

    @trainer.on(Events.EPOCH_STARTED)
    def _epoch_started(engine: Any) -> None:
        clocks["val"] = 0.0

    @evaluator.on(Events.STARTED)
    def _val_started(engine: Any) -> None:
        clocks["val_start"] = clock()

    @evaluator.on(Events.COMPLETED)
    def _val_completed(engine: Any) -> None:
        seconds = clock() - clocks.pop("val_start", clock())
        clocks["val"] = clocks.get("val", 0.0) + seconds
        record["val_s"].append(seconds)

    @trainer.on(Events.EPOCH_COMPLETED)
    def _fit(engine: Any) -> None:
        # from the previous epoch's fit to this one: the handlers after it (checkpoint, curves) count too
        now = clock()
        record["train_s"].append(now - clocks.get("last", now) - clocks.get("val", 0.0))
        clocks["last"] = now
        epoch, planned = engine.state.epoch, engine.state.max_epochs
        steady = record["train_s"][1:] or record["train_s"]
        epoch_s, val_s = median(steady), (median(record["val_s"]) if record["val_s"] else 0.0)
        elapsed = now - clocks.get("start", now)
        # max_epochs stays the most the run trains: the budget only shortens it
        fitted = min(planned, fit_epochs(budget_s, elapsed, epoch, epoch_s, val_s, val_interval))
        if epoch == 1 and planned > 2 and fitted > epoch:
            # the first epoch also builds the convolution primitives and warms the loader: a cut made from it
            # alone could never be taken back, so only a stop is taken now and a cut waits for a steady epoch
            fitted = planned
        if agree is not None:
            fitted = int(agree(fitted))
        if fitted == planned:
            return
        record["changes"].append((epoch, planned, fitted))
        per_epoch = f"{epoch_s:.1f} s per epoch" + (f", {val_s:.1f} s per validation" if val_s else "")
        if fitted <= epoch:
            echo(f"time budget {budget_s:.0f} s reached after epoch {epoch} ({per_epoch}): training ends here")
            engine.state.max_epochs = epoch  # ends as a completed run: the handlers of its end all run
            return
        engine.state.max_epochs = fitted
        refit = fit_schedule(scheduler, optimizer, epoch, fitted) if scheduler is not None else False
        echo(f"time budget {budget_s:.0f} s: at {per_epoch}, max_epochs {planned} -> {fitted}"
             + (" (learning-rate schedule fitted to it)" if refit else ""))  # fmt: skip

    return record
