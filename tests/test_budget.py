"""Training that keeps to a time budget (volseg.training.budget): the epoch fit, the schedule fit, the handler on
ignite engines with a fake clock, and a real training run that stops at its budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from volseg.recipe import load_recipe
from volseg.training.budget import attach_time_budget, fit_epochs, fit_schedule


def test_fit_epochs_counts_the_epochs_and_validations_left() -> None:
    # 100 s left, 10 s per epoch, no validation: 10 more.
    assert fit_epochs(150.0, 50.0, 5, 10.0, 0.0, 1) == 15
    # 4 s per validation after every epoch: 14 s an epoch, 7 more (98 s).
    assert fit_epochs(150.0, 50.0, 5, 10.0, 4.0, 1) == 12
    # Validation every 3rd epoch: 6, 9 and 12 validate; 7 epochs + 3 validations = 82 s, 8 + 3 = 92 s, 9 + 3 = 102 s;
    # 13 would not be validated, so 12.
    assert fit_epochs(150.0, 50.0, 5, 10.0, 4.0, 3) == 12
    # Nothing left, or not one more epoch: stop now.
    assert fit_epochs(100.0, 120.0, 5, 10.0, 0.0, 1) == 5
    assert fit_epochs(100.0, 95.0, 5, 10.0, 0.0, 1) == 5
    # One more epoch fits but it would not be validated: it is still taken (the rounding never removes the last).
    assert fit_epochs(100.0, 85.0, 5, 10.0, 0.0, 4) == 6
    # Many cycles are counted without a loop over each epoch.
    assert fit_epochs(1e9, 0.0, 0, 1e-3, 0.0, 1) == 1_000_000


@pytest.mark.parametrize("name", ["poly", "cosine"])
def test_fit_schedule_ends_the_rate_at_the_new_length(name: str) -> None:
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    if name == "poly":
        sched: Any = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=20, power=0.9)
        closed = [0.01 * (1 - e / 10) ** 0.9 for e in range(11)]
    else:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)
        import math

        closed = [0.01 * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(11)]
    for _ in range(4):
        opt.step()
        sched.step()
    assert fit_schedule(sched, opt, 4, 10) is True  # 20 epochs planned, 10 fit
    assert opt.param_groups[0]["lr"] == pytest.approx(closed[4])
    for e in range(5, 11):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(closed[e], abs=1e-9)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-9)
    multistep = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2])
    assert fit_schedule(multistep, opt, 1, 5) is False


class _Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def _engines(clock: _Clock, step_s: float, val_s: float, val_every: int) -> tuple[Any, Any]:
    from ignite.engine import Engine, Events

    def step(engine: Any, batch: Any) -> None:
        clock.t += step_s

    def validate(engine: Any, batch: Any) -> None:
        clock.t += val_s

    trainer, evaluator = Engine(step), Engine(validate)

    @trainer.on(Events.EPOCH_COMPLETED(every=val_every))
    def _validate(engine: Any) -> None:
        evaluator.run([0])

    return trainer, evaluator


def test_the_handler_shortens_a_run_that_would_overrun_and_fits_its_schedule() -> None:
    clock = _Clock()
    trainer, evaluator = _engines(clock, step_s=1.0, val_s=2.0, val_every=1)  # 5 + 2 s an epoch
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=10, power=0.9)
    from ignite.engine import Events

    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: (opt.step(), sched.step()))  # as LrScheduleHandler
    lines: list[str] = []
    record = attach_time_budget(trainer, evaluator, sched, opt, 30.0, 1, lines.append, clock=clock)
    trainer.run(range(5), max_epochs=10)
    assert trainer.state.epoch == 4 and clock.t == pytest.approx(28.0)  # 4 x 7 s; a fifth would end at 35 s
    assert record["changes"][0] == (2, 10, 4)  # not after the first epoch, which may hold start-up costs
    assert record["train_s"][0] == pytest.approx(5.0) and record["val_s"][0] == pytest.approx(2.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the schedule ended with the run
    assert any("max_epochs 10 -> 4" in line for line in lines)


def test_the_handler_never_lengthens_a_run_and_stops_at_once_when_over() -> None:
    clock = _Clock()
    trainer, evaluator = _engines(clock, step_s=1.0, val_s=0.0, val_every=1)
    record = attach_time_budget(trainer, evaluator, None, None, 100.0, 1, lambda s: None, clock=clock)
    trainer.run(range(5), max_epochs=3)
    # 20 epochs would fit; max_epochs stays the most a run trains.
    assert trainer.state.epoch == 3 and record["changes"] == [] and clock.t == pytest.approx(15.0)

    # Epoch times that vary by 5% either way: fewer epochs are taken once, and that is all.
    clock = _Clock()
    times = iter([10.0] + [10.5, 9.5, 10.0] * 4)
    trainer, evaluator = _engines(clock, step_s=0.0, val_s=0.0, val_every=1)
    from ignite.engine import Events

    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(clock, "t", clock.t + next(times)))
    record = attach_time_budget(trainer, evaluator, None, None, 95.0, 1, lambda s: None, clock=clock)
    trainer.run(range(5), max_epochs=10)
    assert record["changes"] == [(2, 10, 9)] and trainer.state.epoch == 9 and clock.t == pytest.approx(90.0)

    clock = _Clock()
    trainer, evaluator = _engines(clock, step_s=10.0, val_s=0.0, val_every=1)
    lines: list[str] = []
    attach_time_budget(trainer, evaluator, None, None, 30.0, 1, lines.append, clock=clock)
    trainer.run(range(5), max_epochs=8)  # the first epoch alone takes 50 s
    assert trainer.state.epoch == 1 and any("reached after epoch 1" in line for line in lines)


def test_a_slow_first_epoch_does_not_cut_the_run() -> None:
    # The first epoch takes 30 s (start-up), the others 10 s: 9 epochs fit in 110 s, a cut after the first
    # epoch alone would have kept 3 (its 30 s at face value: 30 + 2 x 30 = 90 s) and left 60 s unused.
    clock = _Clock()
    times = iter([30.0] + [10.0] * 20)
    trainer, evaluator = _engines(clock, step_s=0.0, val_s=0.0, val_every=1)
    from ignite.engine import Events

    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(clock, "t", clock.t + next(times)))
    record = attach_time_budget(trainer, evaluator, None, None, 110.0, 1, lambda s: None, clock=clock)
    trainer.run(range(5), max_epochs=20)
    assert record["changes"] == [(2, 20, 9)] and trainer.state.epoch == 9 and clock.t == pytest.approx(110.0)


def test_training_with_a_budget_stops_at_it(tiny_recipe_path: Path, tiny_data: Path, tmp_path: Path) -> None:
    from volseg.train import train

    recipe = load_recipe(tiny_recipe_path, ["train.max_epochs=50", "train.time_budget_s=0.001"])
    lines: list[str] = []
    result = train(recipe, tiny_data, tmp_path / "run", echo=lines.append, progress=False)
    assert result.epochs == 1
    assert any("time budget" in line and "training ends here" in line for line in lines)
    assert (tmp_path / "run" / "models" / "model.pt").is_file()
