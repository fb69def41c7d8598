"""The run folder: refusing to train over a training, the recipe's case split, the bundle's configs, run information."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from volseg import __version__
from volseg.bundle import _versions, write_bundle_configs
from volseg.data.datalist import load_datalist, split_cases
from volseg.errors import UserError
from volseg.fileio import write_text_atomic
from volseg.recipe import Recipe

LAST = "checkpoints/last.pt"
"""The resumable checkpoint, relative to the run folder."""


def relative_cases(cases: list[dict[str, Any]], base: Path) -> list[dict[str, Any]]:
    """Case paths relative to ``base``; an image of several channel files is a list of them."""

    def rel(v: Any) -> Any:
        return [os.path.relpath(x, base) for x in v] if isinstance(v, list) else os.path.relpath(v, base)

    return [{k: rel(v) for k, v in c.items()} for c in cases]


def split_run_cases(recipe: Recipe, data_root: str | Path) -> tuple[list[dict[str, str]], list[dict[str, str]], Path]:
    """The recipe's deterministic train/validation split, and the folder case paths are relative to."""
    cases = load_datalist(data_root, recipe.data.source)
    s = recipe.data.split
    train_cases, val_cases = split_cases(cases, s.val_fraction, s.folds, s.fold, s.seed)
    root = Path(data_root).resolve()
    return train_cases, val_cases, (root.parent if root.is_file() else root)


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Refuse to resume nothing, or to train over a finished or running training without --resume."""
    last = run_dir / LAST
    if resume and not last.is_file():
        raise UserError(f"nothing to resume: {LAST} is missing", run_dir)
    if not resume and last.is_file():
        raise UserError("this run folder already holds a training; add --resume or choose another --out", run_dir)


def prepare_run(
    recipe: Recipe, data_root: str | Path, run_dir: Path, resume: bool
) -> tuple[list[dict[str, str]], list[dict[str, str]], Path]:
    """Check the run folder and the data, split the cases and write the bundle's configs."""
    check_run_dir(run_dir, resume)
    train_cases, val_cases, base = split_run_cases(recipe, data_root)
    write_run_configs(recipe, run_dir, train_cases, val_cases, base)
    return train_cases, val_cases, base


def write_run_configs(
    recipe: Recipe, run_dir: Path, train_cases: list[dict[str, str]], val_cases: list[dict[str, str]], base: Path
) -> None:
    """The run's bundle configs for ``recipe``, with its case lists."""
    write_bundle_configs(
        recipe,
        run_dir,
        dataset_dir=str(base),
        train_cases=relative_cases(train_cases, base),
        val_cases=relative_cases(val_cases, base),
        data_note=f"{len(train_cases)} training and {len(val_cases)} validation cases from `{base}`.",
    )


def git_revision() -> str:
    """The volseg checkout's commit (``-dirty`` with uncommitted changes), or ``unknown``."""
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


def write_run_info(run_dir: Path, *, resume: bool, overrides: list[str] | None, base: Path, device: Any,
                   world: int, n_train: int, n_val: int) -> None:  # fmt: skip
    """logs/run_info.json (logs/run_info_resume.json when resuming): versions, command, data, device."""
    info = {
        "volseg_version": __version__,
        "git_revision": git_revision(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "overrides": overrides or [],
        "data_root": str(base),
        "device": str(device),
        "world_size": world,
        "python": platform.python_version(),
        "packages": _versions(),
        "train_cases": n_train,
        "val_cases": n_val,
    }
    name = "run_info.json" if not resume else "run_info_resume.json"
    write_text_atomic(run_dir / "logs" / name, json.dumps(info, indent=2) + "\n")
