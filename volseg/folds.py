"""K-fold cross-validation and fold ensembles, as nnU-Net trains and predicts.

``volseg train --folds K`` trains fold ``k`` (the split ``data.split.folds = K``, ``data.split.fold = k``, fixed by
``data.split.seed``) into ``RUN/folds/fold_k``, itself a complete bundle, and then makes ``RUN`` the ensemble's
bundle::

    RUN/configs/...               fold 0's configs (exactly volseg's for fold 0's recipe)
    RUN/models/model.pt, model.ts fold 0's weights: what `monai.bundle run` and MONAI Label use
    RUN/models/folds/fold_k.pt    every fold's weights: what volseg infer averages
    RUN/logs/folds.json           the splits (validation cases per fold) and each fold's validation figures

``metadata.json``'s ``eval_metrics`` holds the cross-validation means (``cv_*``) and each fold's mean Dice.
volseg's engines average the folds' softmax in each window (:func:`ensembled`).
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from volseg.errors import UserError
from volseg.fileio import write_text_atomic
from volseg.recipe import Recipe, recipe_from_dict

FOLDS_DIR = "models/folds"


def fold_weights(bundle_dir: str | Path) -> list[Path]:
    """The fold models of an ensemble bundle (``models/folds/fold_k.pt``, by k); empty for a single model."""
    found = [(int(p.stem[5:]), p) for p in (Path(bundle_dir) / FOLDS_DIR).glob("fold_*.pt") if p.stem[5:].isdigit()]
    return [p for _, p in sorted(found)]


def ensembled(networks: Sequence[Any]) -> Any:
    """A predictor averaging the softmax of ``networks`` (batch in, one output per network): it returns the log of
    the mean probabilities, so the softmax that follows the sliding window gives the mean back."""
    if len(networks) == 1:
        return networks[0]

    def run(x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for net in networks:
            y = net(x)
            if isinstance(y, (tuple, list)):
                y = y[-1]
            p = torch.softmax(y.float(), dim=1)
            total = p if total is None else total + p
        assert total is not None
        return torch.log((total / len(networks)).clamp_min(1e-12))

    return run


def fold_recipe(recipe: Recipe, folds: int, fold: int) -> Recipe:
    """``recipe`` with its split set to fold ``fold`` of ``folds``."""
    raw = recipe.model_dump(mode="json")
    raw["data"]["split"].update(folds=folds, fold=fold)
    return recipe_from_dict(raw, f"fold {fold} of {folds}")


def train_folds(
    recipe: Recipe,
    data_root: str | Path,
    run_dir: str | Path,
    folds: int,
    *,
    only: int | None = None,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> list[Any]:
    """Train the folds (or fold ``only``) one after the other; when every fold is trained, make ``run_dir`` the
    ensemble's bundle. A fold already finished is kept; with ``resume`` an interrupted fold continues.

    Returns:
        The TrainResult of every fold trained or found finished.
    """
    from volseg.train import LAST, _read_result, split_run_cases, train

    if folds < 2:
        raise UserError("--folds needs at least 2", "--folds")
    if only is not None and not 0 <= only < folds:
        raise UserError(f"--fold {only} is out of range for {folds} folds", "--fold")
    run_dir = Path(run_dir).resolve()
    split_run_cases(fold_recipe(recipe, folds, 0), data_root)  # too few cases for K folds: say so first
    results = {}
    for k in [only] if only is not None else range(folds):
        fold_dir = run_dir / "folds" / f"fold_{k}"
        if (fold_dir / "logs" / "result.json").is_file():
            echo(f"fold {k}/{folds}: finished earlier ({fold_dir})")
            results[k] = _read_result(fold_dir)
            continue
        started = (fold_dir / LAST).is_file()
        if started and not resume:
            raise UserError(f"fold {k} was started and not finished; add --resume", fold_dir)
        echo(f"fold {k}/{folds}: training into {fold_dir}")
        results[k] = train(fold_recipe(recipe, folds, k), data_root, fold_dir, resume=started, echo=echo,
                           **train_kwargs)  # fmt: skip
    done = [k for k in range(folds) if (run_dir / "folds" / f"fold_{k}" / "logs" / "result.json").is_file()]
    if len(done) == folds:
        assemble_ensemble(recipe, data_root, run_dir, folds)
        echo(f"ensemble of {folds} folds: {run_dir}")
    else:
        echo(f"{len(done)} of {folds} folds trained; the ensemble bundle is made when all are")
    return [results[k] for k in sorted(results)]


def assemble_ensemble(recipe: Recipe, data_root: str | Path, run_dir: Path, folds: int) -> Path:
    """Make ``run_dir`` the bundle of the trained folds under ``run_dir/folds``."""
    from volseg.bundle import write_bundle_configs
    from volseg.fileio import atomic_path
    from volseg.train import _read_result, _relative_cases, split_run_cases

    first = fold_recipe(recipe, folds, 0)
    splits = [split_run_cases(fold_recipe(recipe, folds, k), data_root) for k in range(folds)]
    train_cases, val_cases, base = splits[0]
    results = [_read_result(run_dir / "folds" / f"fold_{k}") for k in range(folds)]
    metrics: dict[str, float] = {"cv_mean_dice": round(statistics.mean(r.best_mean_dice for r in results), 4)}
    for name in results[0].per_label_dice:
        values = [r.per_label_dice[name] for r in results if r.per_label_dice.get(name) == r.per_label_dice.get(name)]
        if values:
            metrics[f"cv_dice_{name}"] = round(statistics.mean(values), 4)
    metrics.update({f"fold{k}_mean_dice": round(r.best_mean_dice, 4) for k, r in enumerate(results)})
    note = (
        f"{folds}-fold cross-validation on the cases in `{base}` (split seed {recipe.data.split.seed}); "
        f"models/folds/fold_k.pt are the {folds} fold models, which volseg infer averages; models/model.pt is fold "
        "0's, which `monai.bundle run` and MONAI Label use."
    )
    write_bundle_configs(
        first,
        run_dir,
        dataset_dir=str(base),
        train_cases=_relative_cases(train_cases, base),
        val_cases=_relative_cases(val_cases, base),
        metrics=metrics,
        data_note=note,
    )
    for k in range(folds):
        src = run_dir / "folds" / f"fold_{k}" / "models" / "model.pt"
        with atomic_path(run_dir / FOLDS_DIR / f"fold_{k}.pt") as tmp:
            shutil.copyfile(src, tmp)
    for name in ("model.pt", "model.ts"):
        src = run_dir / "folds" / "fold_0" / "models" / name
        if src.is_file():
            with atomic_path(run_dir / "models" / name) as tmp:
                shutil.copyfile(src, tmp)
    per_fold = [
        {"fold": k, "validation": _relative_cases(splits[k][1], base), "best_mean_dice": r.best_mean_dice,
         "per_label_dice": r.per_label_dice, "epochs": r.epochs, "seconds": r.seconds}
        for k, r in enumerate(results)
    ]  # fmt: skip
    record = {"folds": folds, "seed": recipe.data.split.seed, "splits": per_fold, "metrics": metrics}
    write_text_atomic(run_dir / "logs" / "folds.json", json.dumps(record, indent=2) + "\n")
    return run_dir
