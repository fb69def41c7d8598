"""Evaluate predicted label maps against ground truth stored as NIfTI files, and write the tables.

:func:`pair_files` matches predictions to ground truth by case name, :func:`evaluate_files` computes every metric of
:func:`volseg.metrics.evaluate_case` for each pair and label and writes two CSV tables:

* ``metrics_per_case.csv``: case, label, dice, iou, hd95_mm, assd_mm, nsd, pred_voxels, ref_voxels (one row per case
  and label; an undefined distance is written ``nan``).
* ``metrics_summary.csv``: label, metric, mean, median, std, n, n_undefined (one row per label and metric). The
  statistics are over the cases where the metric is defined (``n`` of them, ``std`` the sample standard deviation,
  ``nan`` when ``n < 2``); ``n_undefined`` counts the cases where it is not (HD95 and ASSD when exactly one of the
  prediction and the reference lacks the label, see :mod:`volseg.metrics`).

Which labels are scored is the caller's choice; :func:`found_labels` gives every value present in the files.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import UserError
from volseg.fileio import atomic_path
from volseg.imageio import read_labels
from volseg.metrics import evaluate_case

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PREDICTION_SUFFIX = "_seg"
AFFINE_TOLERANCE = 1e-3
"""Largest absolute difference allowed between the prediction's and the reference's affine entries (mm)."""
MAX_FOUND_LABELS = 255
"""More distinct non-zero values than this in one file is taken as an image given as a label map."""

CASE_COLUMNS = ("case", "label", "dice", "iou", "hd95_mm", "assd_mm", "nsd", "pred_voxels", "ref_voxels")
SUMMARY_COLUMNS = ("label", "metric", "mean", "median", "std", "n", "n_undefined")
SUMMARY_METRICS = ("dice", "iou", "hd95_mm", "assd_mm", "nsd")
_METRIC_KEYS = {"dice": "dice", "iou": "iou", "hd95_mm": "hd95", "assd_mm": "assd", "nsd": "nsd"}


def _strip_nifti(name: str) -> str | None:
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def case_name(path: str | Path, prediction: bool = False) -> str:
    """The case name of a NIfTI file (:func:`volseg.data.datalist.case_id`: its name without ``.nii.gz``/``.nii``
    and nnU-Net's ``_0000``), and for a prediction without ``_seg`` (:func:`prediction_base`)."""
    from volseg.data.datalist import case_id

    if _strip_nifti(Path(path).name) is None:
        raise UserError("not a NIfTI file (.nii or .nii.gz)", path)
    stem = case_id(path)
    if prediction and stem.endswith(PREDICTION_SUFFIX) and len(stem) > len(PREDICTION_SUFFIX):
        stem = stem[: -len(PREDICTION_SUFFIX)]
    return stem


def prediction_base(source: str | Path, out_dir: str | Path) -> Path:
    """Where ``volseg infer`` writes a case's outputs: ``OUT/<case>_seg`` (each format adds its suffix)."""
    from volseg.data.datalist import case_id

    return Path(out_dir) / f"{case_id(source)}{PREDICTION_SUFFIX}"


def case_image(folder: str | Path, case: str) -> Path | None:
    """The image of a case in a folder (any image format volseg reads, nnU-Net's ``_0000`` included), or None."""
    from volseg.data.datalist import IMAGE_SUFFIXES, case_id

    folder = Path(folder)
    if not folder.is_dir():
        return None
    found = sorted(
        f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES) and case_id(f) == case
    )
    return found[0] if found else None


def _cases(path: Path, prediction: bool) -> dict[str, Path]:
    """Case name -> file for a NIfTI file or a folder of them (hidden files skipped)."""
    if path.is_file():
        return {case_name(path, prediction): path}
    if not path.is_dir():
        raise UserError("not found", path)
    files = sorted(
        f for f in path.iterdir() if f.is_file() and not f.name.startswith(".") and _strip_nifti(f.name) is not None
    )
    if not files:
        raise UserError("folder holds no NIfTI files (.nii or .nii.gz)", path)
    out: dict[str, Path] = {}
    for f in files:
        name = case_name(f, prediction)
        if name in out:
            raise UserError(
                f"two files in this folder have the case name {name!r}: {out[name].name} and {f.name}", path
            )
        out[name] = f
    return out


def pair_files(pred_dir_or_file: str | Path, gt_dir_or_file: str | Path) -> list[tuple[Path, Path]]:
    """Match prediction files to ground-truth files by case name.

    Each argument is a NIfTI file or a folder of them. Case names are file names without ``.nii.gz``/``.nii``; a
    trailing ``_seg`` is also dropped from predictions (``volseg infer`` writes ``<case>_seg.nii.gz``). Two files given
    are paired whatever their names.

    Every prediction must have a ground truth (a prediction without one is more likely a naming mistake than intended);
    ground-truth files without a prediction are left out, so a subset of cases can be evaluated. With a folder of
    predictions and one ground-truth file, the prediction of that case is taken.

    Returns:
        ``(prediction, ground truth)`` pairs sorted by case name.

    Raises:
        UserError: a path is missing or holds no NIfTI file, a folder has two files for one case, a prediction has no
            ground truth, or no pair is found.
    """
    pred_path, gt_path = Path(pred_dir_or_file), Path(gt_dir_or_file)
    preds = _cases(pred_path, prediction=True)
    gts = _cases(gt_path, prediction=False)
    if pred_path.is_file() and gt_path.is_file():
        return [(pred_path, gt_path)]
    if gt_path.is_file():  # a folder of predictions and one ground truth: that case's prediction
        (name,) = gts
        if name not in preds:
            raise UserError(f"no prediction for case {name!r} ({gt_path.name})", pred_path)
        return [(preds[name], gt_path)]
    missing = sorted(name for name in preds if name not in gts)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        where = preds[missing[0]] if len(missing) == 1 else pred_path
        raise UserError(f"no ground truth in {gt_path} for case(s) {shown}", where)
    return [(preds[name], gts[name]) for name in sorted(preds)]


_BLOCK = 1 << 24  # voxels per block when collecting label values: bounds the temporaries


def _values(data: np.ndarray) -> set[int]:
    """The distinct values of an integer label map, block by block (counting for 8- and 16-bit maps)."""
    flat = np.ravel(data, order="K")
    found: set[int] = set()
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        if block.dtype.kind in "ub" and block.dtype.itemsize <= 2:
            found.update(int(v) for v in np.flatnonzero(np.bincount(block)))
        else:
            found.update(int(v) for v in np.unique(block))
        if len(found) > MAX_FOUND_LABELS + 1:
            break
    return found


def found_labels(pairs: list[tuple[Path, Path]]) -> dict[str, int]:
    """Every non-zero value in any prediction or ground truth of the pairs, named ``label_N``, by value.

    Each file is read once here (and again when evaluated).

    Raises:
        UserError: a file cannot be read or is not a label map, holds more than :data:`MAX_FOUND_LABELS` distinct
            values (an image?), or no file holds a foreground value.
    """
    values: set[int] = set()
    for pair in pairs:
        for path in pair:
            data, _ = read_labels(Path(path))
            found = _values(data) - {0}
            if len(found) > MAX_FOUND_LABELS:
                raise UserError(
                    f"holds more than {MAX_FOUND_LABELS} distinct label values: an image rather than a label map? "
                    "(--labels name=value chooses the labels to score)",
                    path,
                )
            values |= found
    if not values:
        raise UserError(
            "no foreground label in any prediction or ground truth: nothing to score "
            "(--labels name=value scores a label even where it is absent)"
        )
    return {f"label_{v}": v for v in sorted(values)}


def _spatial(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop axes of length 1 (a 2D slice stored as X*Y*1 is a 2D image) and give the spacing of the rest."""
    if data.ndim > 3 and any(s != 1 for s in data.shape[3:]):
        raise ValueError(f"has shape {data.shape}; expected a 2D or 3D label map")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[: min(data.ndim, 3)]
    keep = [axis for axis in range(min(data.ndim, 3)) if data.shape[axis] != 1]
    if not keep:
        raise ValueError(f"has shape {data.shape}; expected a 2D or 3D label map")
    return data.reshape([data.shape[a] for a in keep]), spacing[keep]


def _load_pair(pred_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred, pred_affine = read_labels(pred_path)
    ref, ref_affine = read_labels(gt_path)
    if pred.shape != ref.shape:
        raise UserError(f"shape {pred.shape} differs from the ground truth's {ref.shape} ({gt_path})", pred_path)
    diff = float(np.max(np.abs(pred_affine - ref_affine)))
    if not diff <= AFFINE_TOLERANCE:
        raise UserError(
            f"affine differs from the ground truth's ({gt_path}) by up to {diff:.4g}, more than {AFFINE_TOLERANCE}: "
            "the prediction is not on the ground truth's grid",
            pred_path,
        )
    try:
        pred, spacing = _spatial(pred, pred_affine)
        ref, _ = _spatial(ref, ref_affine)
    except ValueError as exc:
        raise UserError(str(exc), pred_path) from exc
    return pred, ref, spacing


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6f}"
    return str(value)


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, Any]]) -> None:
    """Write a CSV table to a temporary name in the same folder, then rename it into place."""
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_format(row[c]) for c in columns])


def summarize(rows: list[dict[str, Any]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per label and metric: mean, median, sample std over the cases where it is defined, n and n_undefined."""
    out = []
    for label in labels:
        for metric in SUMMARY_METRICS:
            values = np.array([row[metric] for row in rows if row["label"] == label], dtype=np.float64)
            defined = values[~np.isnan(values)]
            n = int(defined.size)
            out.append(
                {
                    "label": label,
                    "metric": metric,
                    "mean": float(defined.mean()) if n else math.nan,
                    "median": float(np.median(defined)) if n else math.nan,
                    "std": float(defined.std(ddof=1)) if n > 1 else math.nan,
                    "n": n,
                    "n_undefined": int(values.size - n),
                }
            )
    return out


def evaluate_files(
    pairs: list[tuple[Path, Path]], labels: dict[str, int], tolerance_mm: float, out_dir: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Evaluate NIfTI prediction/ground-truth pairs and write ``metrics_per_case.csv`` and ``metrics_summary.csv``.

    Each pair must share shape and affine (every entry within 1e-3); the spacing is the norm of each of the affine's
    first three columns. Axes of length 1 are dropped, so a 2D slice stored as X*Y*1 is evaluated in 2D. Float label
    files are accepted when every value is a whole number.

    Args:
        pairs: ``(prediction, ground truth)`` paths, as from :func:`pair_files`.
        labels: label name to value; the background (value 0) is skipped.
        tolerance_mm: tolerance of the normalized surface Dice.
        out_dir: folder for the two tables (created if missing).

    Returns:
        ``(rows, summary)``: the per-case rows and the summary rows as written (floats unrounded, ``nan`` for
        undefined values), keyed by the CSV column names.

    Raises:
        UserError: a file cannot be read, is not a label map, or does not match its ground truth's grid (the message
            names the prediction file).
    """
    if not pairs:
        raise UserError("no prediction/ground-truth pairs to evaluate")
    names = [name for name, value in labels.items() if value != 0]
    if not names:
        raise UserError("no foreground label to evaluate (every label given has value 0)")
    rows: list[dict[str, Any]] = []
    for pred_path, gt_path in pairs:
        pred_path, gt_path = Path(pred_path), Path(gt_path)
        pred, ref, spacing = _load_pair(pred_path, gt_path)
        case = case_name(gt_path)
        for label, m in evaluate_case(pred, ref, labels, spacing, tolerance_mm).items():
            rows.append(
                {
                    "case": case,
                    "label": label,
                    **{column: m[key] for column, key in _METRIC_KEYS.items()},
                    "pred_voxels": m["pred_voxels"],
                    "ref_voxels": m["ref_voxels"],
                }
            )
    summary = summarize(rows, names)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_csv(out_dir / "metrics_per_case.csv", CASE_COLUMNS, rows)
    _write_csv(out_dir / "metrics_summary.csv", SUMMARY_COLUMNS, summary)
    return rows, summary
