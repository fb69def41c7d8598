"""``volseg select``: inference settings chosen by cross-validation, as nnU-Net's ``find_best_configuration``.

For each fold run (``volseg train --folds K``), every fold model predicts its own validation cases (the
out-of-fold predictions), once without and once with test-time mirroring (along the axes training mirrored; every
spatial axis when it did not mirror). The class
probabilities are saved under ``RUN/cv/<plain|mirror>/<case>.npz`` with the fold weights' digest, so they are
computed once and recomputed only when a fold is retrained. From them:

- the cross-validation Dice of each configuration (run x mirroring): per label, the mean over all cases;
- ensembles of two runs trained on the same splits (the mean of their out-of-fold probabilities);
- postprocessing on the best single-run configuration: keeping only the largest connected component of each
  label in turn, kept only when the mean cross-validation Dice rises and no label falls.

The best single-run configuration is written into its run's bundle: ``infer.tta_flips`` and
``infer.postprocess.largest_component`` in ``configs/volseg_recipe.yaml``, every config regenerated from it
(:func:`volseg.trust.rewrite_bundle`, so the bundle stays exactly volseg's), and the figures in ``metadata.json``'s
``eval_metrics`` (``select_cv_*``). A bundle runs one configuration: when an ensemble of two runs scores higher,
the table says so and by how much. ``RUN/logs/select.json`` records the table and the decisions.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import UserError

__all__ = [
    "Config",
    "FoldRun",
    "Selection",
    "keep_largest",
    "load_fold_run",
    "mirroring_supported",
    "postprocess_steps",
    "run_select",
]

CV_DIR = "cv"
"""Out-of-fold probabilities: ``RUN/cv/plain/<case>.npz`` and ``RUN/cv/mirror/<case>.npz``."""
METRIC_PREFIX = "select_cv_"
"""The keys ``volseg select`` writes into metadata.json's ``eval_metrics``."""


@dataclass
class FoldRun:
    """A run trained with ``--folds K``: its folds' bundles and the validation cases of each."""

    path: Path
    name: str
    recipe: Any
    validation: list[list[dict[str, Any]]]  # per fold: cases with absolute paths
    mirror: bool = True  # whether mirroring can be compared (see :func:`mirroring_supported`)

    @property
    def labels(self) -> dict[str, int]:
        return {n: lab.value for n, lab in self.recipe.data.labels.items() if lab.value != 0}

    def splits(self) -> list[frozenset[str]]:
        """Each fold's validation cases (label paths): two runs with equal splits can be ensembled."""
        return [frozenset(c["label"] for c in cases) for cases in self.validation]


@dataclass
class Config:
    """A configuration: one run or two averaged, with or without mirroring; its CV Dice per label."""

    name: str
    members: list[FoldRun]
    mirror: bool
    dice: dict[str, float] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        return statistics.mean(self.dice.values()) if self.dice else float("nan")


@dataclass
class Selection:
    """What ``volseg select`` decided."""

    configs: list[Config]
    chosen: Config
    largest_component: list[str]
    dice: dict[str, float]  # the chosen configuration's CV Dice per label after postprocessing
    decisions: list[str]
    best_ensemble: Config | None = None

    @property
    def mean(self) -> float:
        return statistics.mean(self.dice.values())


# --------------------------------------------------------------------------------------------------------
# Fold runs and their out-of-fold predictions


def _case_name(case: dict[str, Any]) -> str:
    from volseg.data.datalist import case_id

    return case_id(case["label"])


def _absolute(case: dict[str, Any], base: Path) -> dict[str, Any]:
    def one(v: Any) -> Any:
        return [str((base / x).resolve()) for x in v] if isinstance(v, list) else str((base / v).resolve())

    return {k: one(v) for k, v in case.items()}


def load_fold_run(path: str | Path) -> FoldRun:
    """A fold run's recipe and each fold's validation cases.

    Raises:
        UserError: ``path`` is not a run trained with ``--folds K`` (all folds finished).
    """
    from volseg.bundle import read_bundle_recipe
    from volseg.folds import fold_weights

    root = Path(path).resolve()
    record = root / "logs" / "folds.json"
    if not root.is_dir():
        raise UserError("run folder not found", path)
    if not record.is_file() or not fold_weights(root):
        raise UserError(
            "not a fold run (no logs/folds.json and models/folds/): volseg select compares cross-validation, "
            "train the run with `volseg train --folds K`",
            path,
        )
    try:
        folds = int(json.loads(record.read_text(encoding="utf-8"))["folds"])
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError("logs/folds.json cannot be read", record) from None
    validation = []
    for k in range(folds):
        cfg = root / "folds" / f"fold_{k}" / "configs" / "train.json"
        try:
            train = json.loads(cfg.read_text(encoding="utf-8"))
            base, cases = Path(train["dataset_dir"]), train["val_cases"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"fold {k}'s validation cases cannot be read", cfg) from None
        if not isinstance(cases, list) or not cases:
            raise UserError(f"fold {k} has no validation cases", cfg)
        validation.append([_absolute(c, base) for c in cases])
    return FoldRun(root, root.name, read_bundle_recipe(root), validation)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _stored(path: Path, digest: str) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return str(z["weights"]) == digest
    except (OSError, ValueError, KeyError):
        return False


def mirror_axes(recipe: Any) -> list[int]:
    """The axes the mirrored configuration flips: those training mirrored, every axis when it did not mirror
    (mirrored along an axis it never saw flipped, a model can only lose; the table then shows it)."""
    nd = recipe.model.spatial_dims
    return recipe.train.augment.flipped_axes(nd) or list(range(nd))


def mirroring_supported(recipe: Any) -> bool:
    """Whether the fold models can be run mirrored here: by the fast engine, which takes ``infer.*`` overrides."""
    from volseg.fastpath import unsupported_reason

    return unsupported_reason(recipe) is None


def _fold_predictor(fold_dir: Path, flips: tuple[int, ...], device: str) -> Any:
    """A predictor of one fold's bundle with the given mirroring and no postprocessing (the fast engine), or the
    bundle's own MONAI chain as it is (recipes the fast engine does not run; probabilities are taken before its
    postprocessing)."""
    from volseg import infer
    from volseg.bundle import read_bundle_recipe

    make: Any = getattr(infer.Predictor, "from_bundle", infer.Predictor)  # the constructor before from_bundle
    if mirroring_supported(read_bundle_recipe(fold_dir)):
        sets = [f"infer.tta_flips={list(flips)}", "infer.postprocess.largest_component=[]"]
        return make(fold_dir, device, precision="fp32", overrides=sets)
    return make(fold_dir, device, "monai")


def _source(image: Any, scratch: Path) -> Path:
    """The image to predict: a file, or several channel files stacked into one 4D NIfTI in ``scratch``."""
    if not isinstance(image, list):
        return Path(image)
    from volseg.data.channels import stack_channels

    return stack_channels(image, scratch / f"{Path(image[0]).name.split('.')[0]}_stacked.nii.gz")


def out_of_fold(run: FoldRun, mirror: bool, device: str, echo: Callable[[str], None]) -> dict[str, Path]:
    """Each validation case's out-of-fold probabilities (``RUN/cv/<plain|mirror>/<case>.npz``), computed when
    missing or made by other weights. Returns case name -> file."""
    import tempfile

    from volseg.fileio import atomic_path

    flips = tuple(mirror_axes(run.recipe)) if mirror else ()
    folder = run.path / CV_DIR / ("mirror" if mirror else "plain")
    files: dict[str, Path] = {}
    for k, cases in enumerate(run.validation):
        fold_dir = run.path / "folds" / f"fold_{k}"
        digest = f"{_digest(fold_dir / 'models' / 'model.pt')} flips {list(flips)}"  # weights and mirroring
        todo = [c for c in cases if not _stored(folder / f"{_case_name(c)}.npz", digest)]
        files.update({_case_name(c): folder / f"{_case_name(c)}.npz" for c in cases})
        if not todo:
            continue
        echo(f"{run.name}: fold {k} predicts {len(todo)} validation case(s){' mirrored' if mirror else ''}")
        predictor = _fold_predictor(fold_dir, flips, device)
        with tempfile.TemporaryDirectory() as scratch:
            for case in todo:
                pred = predictor.predict(_source(case["image"], Path(scratch)), probabilities=True)
                probs = np.asarray(pred.probabilities, dtype=np.float16)
                with atomic_path(folder / f"{_case_name(case)}.npz") as tmp:
                    with tmp.open("wb") as fh:
                        np.savez_compressed(fh, probabilities=probs, weights=np.array(digest))
    return files


def _truth(case: dict[str, Any], recipe: Any) -> np.ndarray:
    """A validation case's reference labels, with the recipe's label map applied."""
    from volseg.imageio import is_nifti, read_image, read_labels

    path = case["label"]
    data = np.asarray(read_labels(path)[0]) if is_nifti(path) else np.rint(read_image(path).array)
    data = np.rint(data).astype(np.int64) if data.dtype.kind == "f" else data.astype(np.int64)
    data = data.reshape(data.shape[:3]) if data.ndim > 3 and all(s == 1 for s in data.shape[3:]) else data
    if recipe.data.label_map:
        mapped = data.copy()
        for src, dst in recipe.data.label_map.items():
            mapped[data == int(src)] = int(dst)
        data = mapped
    return data


# --------------------------------------------------------------------------------------------------------
# Scores and postprocessing


def keep_largest(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """A copy of ``labels`` keeping only the largest face-connected component of each of ``values`` (the rest
    becomes background): the fast engine's postprocessing itself."""
    from volseg.fastpath import _largest_component

    return _largest_component(labels.copy(), list(values))


def _mean_dice(per_case: list[dict[str, float]]) -> dict[str, float]:
    return {name: round(float(np.mean([d[name] for d in per_case])), 4) for name in per_case[0]}


def postprocess_steps(
    cases: Sequence[tuple[np.ndarray, np.ndarray]], labels: dict[str, int]
) -> tuple[list[str], dict[str, float], list[str]]:
    """Largest-component postprocessing chosen on (prediction, truth) pairs, one label after the other: a label's
    step is kept only when the mean Dice over labels rises and no label's Dice falls.

    Returns:
        The labels whose largest component is kept, the Dice per label with them, and one line per decision.
    """
    from volseg.metrics import dice_per_label

    kept: list[str] = []
    current = [pred for pred, _ in cases]
    best = _mean_dice([dice_per_label(p, t, labels) for p, (_, t) in zip(current, cases, strict=True)])
    lines = []
    for name, value in labels.items():
        trial = [keep_largest(p, [value]) for p in current]
        dice = _mean_dice([dice_per_label(p, t, labels) for p, (_, t) in zip(trial, cases, strict=True)])
        rises = statistics.mean(dice.values()) > statistics.mean(best.values()) + 1e-6
        fallen = [n for n in labels if dice[n] < best[n] - 1e-6]
        change = f"mean {statistics.mean(best.values()):.4f} -> {statistics.mean(dice.values()):.4f}"
        if rises and not fallen:
            kept.append(name)
            current, best = trial, dice
            lines.append(f"largest component of {name}: kept ({change}, no label falls)")
        elif fallen:
            falls = ", ".join(f"{n} {best[n]:.4f} -> {dice[n]:.4f}" for n in fallen)
            lines.append(f"largest component of {name}: refused ({falls})")
        else:
            lines.append(f"largest component of {name}: refused ({change}: no gain)")
    return kept, best, lines


def _predicted(config: Config, case: str, files: dict[tuple[str, bool], dict[str, Path]]) -> np.ndarray:
    """The labels of ``config`` for one case: argmax of its members' mean probabilities."""
    total: np.ndarray | None = None
    for run in config.members:
        with np.load(files[(str(run.path), config.mirror)][case]) as z:
            p = z["probabilities"].astype(np.float32)
        total = p if total is None else total + p
    assert total is not None
    return np.asarray(total.argmax(axis=0), dtype=np.uint8)


# --------------------------------------------------------------------------------------------------------
# The command


def _configs(runs: list[FoldRun]) -> list[Config]:
    configs = []
    for run in runs:
        configs.append(Config(run.name, [run], False))
        if run.mirror:
            configs.append(Config(f"{run.name} +mirror", [run], True))
    for a, b in itertools.combinations(runs, 2):
        if a.splits() == b.splits():
            name = f"{a.name} & {b.name}"
            configs.append(Config(name, [a, b], False))
            if a.mirror and b.mirror:
                configs.append(Config(f"{name} +mirror", [a, b], True))
    return configs


def _table(rows: list[tuple[str, float, dict[str, float]]], labels: list[str]) -> str:
    width = max(len("configuration"), *(len(r[0]) for r in rows))
    head = f"{'configuration':<{width}}  {'mean':>6}  " + "  ".join(f"{n:>8}" for n in labels)
    body = [
        f"{name:<{width}}  {mean:6.4f}  " + "  ".join(f"{dice[n]:8.4f}" for n in labels) for name, mean, dice in rows
    ]
    return "\n".join([head, *body])


def select(runs: Sequence[str | Path], device: str = "cpu", echo: Callable[[str], None] = print) -> Selection:
    """Cross-validation Dice of every configuration of ``runs``; the best single run's settings and
    postprocessing. Nothing is written into a bundle (see :func:`write_choice`)."""
    loaded = [load_fold_run(r) for r in runs]
    if len({r.path for r in loaded}) != len(loaded):
        raise UserError("a run is given twice", runs[0])
    names = [r.name for r in loaded]
    for run in loaded:  # two runs named alike (runs/a/x, runs/b/x) get their parent's name too
        if names.count(run.name) > 1:
            run.name = f"{run.path.parent.name}/{run.name}"
    first = loaded[0]
    for run in loaded[1:]:
        if run.labels != first.labels:
            raise UserError(f"labels {run.labels} differ from {first.name}'s {first.labels}", run.path)
    labels = first.labels
    for run in loaded:
        run.mirror = mirroring_supported(run.recipe)
        if not run.mirror:
            echo(f"note: {run.name}: compared without mirroring only (the fast engine does not run its recipe)")
    files = {(str(r.path), m): out_of_fold(r, m, device, echo) for r in loaded for m in (False, True) if m <= r.mirror}
    configs = _configs(loaded)
    for a, b in itertools.combinations(loaded, 2):
        if a.splits() != b.splits():
            echo(f"note: {a.name} and {b.name} were trained on different splits: not ensembled")
    per_case: dict[str, list[dict[str, float]]] = {c.name: [] for c in configs}
    from volseg.metrics import dice_per_label

    for run in loaded:
        for cases in run.validation:
            for case in cases:
                truth = _truth(case, run.recipe)
                for c in configs:
                    if c.members[0] is run:
                        pred = _predicted(c, _case_name(case), files)
                        per_case[c.name].append(dice_per_label(pred, truth, labels))
    for c in configs:
        c.dice = _mean_dice(per_case[c.name])
    singles = [c for c in configs if len(c.members) == 1]
    chosen = max(singles, key=lambda c: c.mean)  # the first of equals: without mirroring, the first run
    pairs = []
    for cases in chosen.members[0].validation:
        for case in cases:
            pairs.append((_predicted(chosen, _case_name(case), files), _truth(case, chosen.members[0].recipe)))
    kept, dice, decisions = postprocess_steps(pairs, labels)
    ensembles = [c for c in configs if len(c.members) == 2]
    best_ensemble = max(ensembles, key=lambda c: c.mean) if ensembles else None
    return Selection(configs, chosen, kept, dice, decisions, best_ensemble)


def write_choice(selection: Selection, echo: Callable[[str], None] = print) -> Path:
    """Write the chosen configuration into its run's bundle: the recipe's infer section, every config regenerated
    from it, the CV figures in metadata.json, ``logs/select.json``. Returns the bundle folder."""
    from volseg.bundle import RECIPE_FILE
    from volseg.fileio import write_text_atomic
    from volseg.recipe import dump_recipe, recipe_from_dict
    from volseg.trust import check_bundle, rewrite_bundle

    run = selection.chosen.members[0]
    raw = run.recipe.model_dump(mode="json")
    raw["infer"]["tta_flips"] = mirror_axes(run.recipe) if selection.chosen.mirror else []
    raw["infer"]["postprocess"]["largest_component"] = list(selection.largest_component)
    recipe = recipe_from_dict(raw, str(run.path / RECIPE_FILE))
    meta_file = run.path / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8"))
    metrics = {k: v for k, v in (meta.get("eval_metrics") or {}).items() if not k.startswith(METRIC_PREFIX)}
    metrics[f"{METRIC_PREFIX}mean_dice"] = round(selection.mean, 4)
    metrics.update({f"{METRIC_PREFIX}dice_{n}": v for n, v in selection.dice.items()})
    metrics[f"{METRIC_PREFIX}mirroring"] = int(selection.chosen.mirror)
    meta["eval_metrics"] = metrics
    write_text_atomic(run.path / RECIPE_FILE, dump_recipe(recipe))
    write_text_atomic(meta_file, json.dumps(meta, indent=4) + "\n")
    rewrite_bundle(run.path, echo=echo)
    check_bundle(run.path)
    record = {
        "configurations": [{"name": c.name, "mean_dice": round(c.mean, 4), "dice": c.dice} for c in selection.configs],
        "chosen": selection.chosen.name,
        "tta_flips": raw["infer"]["tta_flips"],
        "largest_component": list(selection.largest_component),
        "decisions": selection.decisions,
        "mean_dice": round(selection.mean, 4),
        "dice": selection.dice,
    }
    write_text_atomic(run.path / "logs" / "select.json", json.dumps(record, indent=2) + "\n")
    return run.path


def run_select(runs: Sequence[str | Path], device: str = "auto", echo: Callable[[str], None] = print) -> Selection:
    """``volseg select``: the table, the decisions, and the choice written into the chosen run's bundle."""
    from volseg.runtime import resolve_device

    selection = select(runs, str(resolve_device(device)), echo)
    labels = list(selection.dice)
    rows = [(c.name, c.mean, c.dice) for c in selection.configs]
    post = " + ".join(f"largest {n}" for n in selection.largest_component)
    if post:
        rows.append((f"{selection.chosen.name} + {post}", selection.mean, selection.dice))
    echo(_table(rows, labels))
    for line in selection.decisions:
        echo(f"postprocessing: {line}")
    ens = selection.best_ensemble
    if ens is not None and ens.mean > selection.mean:
        echo(
            f"note: the ensemble {ens.name} scores {ens.mean:.4f}, {ens.mean - selection.mean:+.4f} over the choice; "
            "a bundle runs one configuration, so the best single run is written"
        )
    bundle = write_choice(selection, echo)
    flips = "mirroring on" if selection.chosen.mirror else "no mirroring"
    kept = ", ".join(selection.largest_component) or "none"
    echo(
        f"chosen: {selection.chosen.name} ({flips}; largest component of: {kept}), mean CV Dice {selection.mean:.4f}"
        f", written into {bundle}"
    )
    return selection
