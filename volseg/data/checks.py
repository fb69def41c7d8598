"""The data integrity check: every image/label pair of a recipe's data set, read once, before training.

:func:`check_data` reports per file what would make training fail or learn the wrong thing (errors) and what is
merely suspicious (warnings):

errors
    image and label of different shape or affine (tolerance :data:`AFFINE_TOLERANCE_MM`); label values outside
    the recipe's labels (a 0/255 mask is named as such); label values that are not whole numbers; NaN or Inf
    voxels; an image or label whose dimensions do not fit ``model.spatial_dims`` and ``model.in_channels``;
    unreadable, corrupt or truncated files; the same image twice (by path, or byte-identical under two names);
    a datalist that does not hold together (images without labels, missing files).
warnings
    an empty (all-background) label; a foreground label that occurs in no case; very anisotropic or unusual
    voxel spacing.

Files are read one pair at a time, headers first (shape and affine come from the header for NIfTI, NRRD and
MHA), and each file's voxels are read once, in their stored type (no float64 copy of an integer volume).
Image files are hashed only when another image has the same size, so duplicates cost nothing otherwise.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from volseg.data.channels import image_files
from volseg.data.datalist import load_datalist
from volseg.errors import UserError
from volseg.imageio import READ_ERRORS, ImageFile, open_image, read_reason
from volseg.recipe import Recipe, load_recipe

__all__ = ["AFFINE_TOLERANCE_MM", "CheckReport", "Finding", "check_data", "run_check_data"]

#: Largest difference between the image's and the label's affine entries (mm) still taken as equal.
AFFINE_TOLERANCE_MM = 1e-3
#: Spacing ratio (largest / smallest voxel size) from which a warning is given.
ANISOTROPY_WARNING = 10.0
#: Voxel sizes outside this range (mm) get a warning: probably the wrong unit in the header.
USUAL_SPACING_MM = (0.01, 50.0)

_BLOCK = 1 << 24  # voxels per block when scanning a volume: bounds the temporaries
_MAX_DISTINCT = 1000  # a "label" with more distinct values than this is probably an image

Level = Literal["error", "warning"]


@dataclass(frozen=True)
class Finding:
    """One problem: its level, the file it is about and what is wrong, in words."""

    level: Level
    path: str
    problem: str


@dataclass
class CheckReport:
    """What :func:`check_data` found.

    Attributes:
        findings: errors and warnings, in the order the cases were read.
        n_cases: number of cases (image/label pairs) in the datalist; 0 when the datalist itself is broken.
        root: the data folder or CSV that was checked (paths in :meth:`table` are shown relative to it).
    """

    findings: list[Finding] = field(default_factory=list)
    n_cases: int = 0
    root: str = ""

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    @property
    def ok(self) -> bool:
        """True when there are no errors (warnings allowed)."""
        return not self.errors

    def add(self, level: Level, path: str | Path, problem: str) -> None:
        self.findings.append(Finding(level, str(path), problem))

    def table(self) -> str:
        """A plain aligned text table (file, level, problem) and a summary line."""
        lines = []
        if self.findings:
            rows = [(self._show(f.path), f.level, f.problem) for f in self.findings]
            w_file = max(len("file"), *(len(r[0]) for r in rows))
            w_level = max(len("level"), *(len(r[1]) for r in rows))
            lines.append(f"{'file':<{w_file}}  {'level':<{w_level}}  problem")
            lines.append(f"{'-' * w_file}  {'-' * w_level}  {'-' * 7}")
            lines.extend(f"{a:<{w_file}}  {b:<{w_level}}  {c}" for a, b, c in rows)
        n_err, n_warn = len(self.errors), len(self.warnings)
        lines.append(
            f"{self.n_cases} {_plural(self.n_cases, 'case')} checked: "
            f"{n_err} {_plural(n_err, 'error')}, {n_warn} {_plural(n_warn, 'warning')}"
        )
        return "\n".join(lines)

    def _show(self, path: str) -> str:
        if self.root:
            root = Path(self.root)
            base = root if root.is_dir() else root.parent
            try:
                rel = Path(path).relative_to(base.resolve())
                return str(rel) if rel.parts else path
            except ValueError:
                pass
        return path


def _plural(n: int, word: str) -> str:
    return word if n == 1 else word + "s"


# --------------------------------------------------------------------------------------------------------
# Reading: header first, voxels once


def _read(report: CheckReport, path: Path, step: Callable[[], Any]) -> Any:
    """Run a reading step; a failure becomes one error finding for ``path`` and None."""
    try:
        return step()
    except UserError as exc:
        report.add("error", exc.path or path, exc.message)
    except READ_ERRORS as exc:
        report.add("error", path, f"unreadable ({read_reason(exc)})")
    return None


# --------------------------------------------------------------------------------------------------------
# The check


def check_data(recipe: Recipe, data_root: str | Path) -> CheckReport:
    """Check every image/label pair of the recipe's data set.

    Args:
        recipe: the task; its labels, ``model.spatial_dims``, ``model.in_channels`` and ``data.source`` are used.
        data_root: the data folder or CSV (as for training).

    Returns:
        The report; ``report.ok`` is False when any error was found.
    """
    root = Path(data_root)
    report = CheckReport(root=str(root))
    try:
        cases = load_datalist(root, recipe.data.source)
    except UserError as exc:
        report.add("error", exc.path or root, exc.message)
        return report
    report.n_cases = len(cases)
    n_classes = recipe.num_classes
    names = recipe.data.label_names
    seen_classes: set[int] = set()
    labels_read = 0
    by_size: dict[tuple[bool, int], list[Path]] = {}
    nd = recipe.model.spatial_dims
    for case in cases:
        label_path = Path(case["label"])
        label = _read(report, label_path, partial(open_image, label_path))
        if label is not None:
            _check_label_dims(report, label, nd)
        files = image_files(case["image"])  # several when each channel is a file of its own (nnU-Net)
        if len(files) > 1 and len(files) != recipe.model.in_channels:
            report.add("error", files[0], f"{len(files)} channel files; model.in_channels {recipe.model.in_channels}")
        for image_path in files:
            by_size.setdefault(_size_of(image_path), []).append(image_path)
            image = _read(report, image_path, partial(open_image, image_path))
            if image is None:
                continue
            if len(files) == 1:
                _check_image_dims(report, image, recipe)
            elif len(image.shape) != nd:
                report.add("error", image_path, f"a channel file must be {nd}D, not {_dims_text(image.shape)}")
            _check_spacing(report, image, nd)
            if label is not None and min(len(image.shape), len(label.shape)) >= nd:
                _check_pair(report, image, label, nd)
            stored = _read(report, image_path, image.voxels)
            if stored is not None:
                _check_finite(report, image_path, stored)
            del stored
        if label is not None:
            stored = _read(report, label_path, label.voxels)
            if stored is not None:
                seen_classes.update(
                    _check_label_values(report, label, stored, n_classes, names, recipe.data.label_map or {})
                )
                labels_read += 1
            del stored
    _check_duplicates(report, by_size)
    for value in range(1, n_classes if labels_read else 0):
        if value not in seen_classes:
            report.add(
                "warning", root, f"label '{names[value]}' ({value}) occurs in no case: the network cannot learn it"
            )
    return report


def run_check_data(config: Path, data: Path | None, overrides: list[str], echo: Callable[[str], None]) -> int:
    """``volseg check-data``: check a recipe's data set, print the table; 0 without errors, 2 with.

    Raises:
        UserError: the recipe is invalid, or no data folder is given and the recipe has no ``data.root``.
    """
    recipe = load_recipe(config, overrides)
    root = data or (Path(recipe.data.root) if recipe.data.root else None)
    if root is None:
        raise UserError("no data given: pass --data DIR or set data.root in the recipe", config)
    report = check_data(recipe, root)
    echo(report.table())
    return 0 if report.ok else 2


# --------------------------------------------------------------------------------------------------------
# Individual checks


def _dims_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _check_image_dims(report: CheckReport, image: ImageFile, recipe: Recipe) -> None:
    """An image is ``nd``-D with one channel, or ``nd+1``-D with ``model.in_channels`` channels last."""
    nd, channels = recipe.model.spatial_dims, recipe.model.in_channels
    shape = image.shape
    if len(shape) == nd + 1 and shape[-1] == channels:
        return
    if len(shape) == nd:
        if channels != 1:
            report.add(
                "error",
                image.path,
                f"{nd}D image {_dims_text(shape)} with one channel, but model.in_channels is {channels} "
                f"(expected a {nd + 1}D image with {channels} channels last)",
            )
        return
    report.add(
        "error",
        image.path,
        f"{len(shape)}D image {_dims_text(shape)} where a {nd}D image is expected "
        f"(model.spatial_dims is {nd}, model.in_channels {channels})",
    )


def _label_spatial(shape: tuple[int, ...], nd: int) -> bool:
    return len(shape) == nd or (len(shape) == nd + 1 and shape[-1] == 1)


def _check_label_dims(report: CheckReport, label: ImageFile, nd: int) -> None:
    if not _label_spatial(label.shape, nd):
        report.add(
            "error",
            label.path,
            f"{len(label.shape)}D label {_dims_text(label.shape)} where a {nd}D label map is expected "
            f"(model.spatial_dims is {nd})",
        )


def _check_pair(report: CheckReport, image: ImageFile, label: ImageFile, nd: int) -> None:
    img_sp, lab_sp = image.shape[:nd], label.shape[:nd]
    if img_sp != lab_sp:
        report.add(
            "error",
            label.path,
            f"shape {_dims_text(lab_sp)} differs from its image {image.path.name} ({_dims_text(img_sp)})",
        )
    diff = np.abs(image.affine - label.affine)
    if float(diff.max()) <= AFFINE_TOLERANCE_MM:
        return
    k = min(nd, 3)
    parts = []
    img_vox = np.linalg.norm(image.affine[:3, :k], axis=0)
    lab_vox = np.linalg.norm(label.affine[:3, :k], axis=0)
    if np.max(np.abs(img_vox - lab_vox)) > AFFINE_TOLERANCE_MM:
        parts.append(f"spacing {_fmt(lab_vox)} mm vs image {_fmt(img_vox)} mm")
    shift = float(np.linalg.norm(image.affine[:3, 3] - label.affine[:3, 3]))
    if shift > AFFINE_TOLERANCE_MM:
        parts.append(f"origin off by {shift:.4g} mm ({_vec(label.affine[:3, 3])} vs image {_vec(image.affine[:3, 3])})")
    img_dir = image.affine[:3, :k] / np.where(img_vox > 0, img_vox, 1.0)
    lab_dir = label.affine[:3, :k] / np.where(lab_vox > 0, lab_vox, 1.0)
    cos_err = float(np.max(np.abs(img_dir - lab_dir)))
    if cos_err > 1e-4:
        parts.append(f"direction cosines differ by up to {cos_err:.3g}")
    if not parts:
        parts.append(f"entries differ by up to {float(diff.max()):.3g} mm")
    report.add(
        "error",
        label.path,
        f"affine differs from its image {image.path.name}: {'; '.join(parts)} (tolerance {AFFINE_TOLERANCE_MM} mm)",
    )


def _check_spacing(report: CheckReport, image: ImageFile, nd: int) -> None:
    k = min(nd, 3, len(image.shape))
    vox = np.linalg.norm(image.affine[:3, :k], axis=0)
    if vox.size == 0 or not np.all(np.isfinite(vox)) or float(vox.min()) <= 0:
        return
    lo, hi = USUAL_SPACING_MM
    if float(vox.min()) < lo or float(vox.max()) > hi:
        report.add("warning", image.path, f"unusual voxel size {_fmt(vox)} mm (wrong unit in the header?)")
    elif nd > 1 and float(vox.max() / vox.min()) >= ANISOTROPY_WARNING:
        report.add(
            "warning",
            image.path,
            f"very anisotropic voxels {_fmt(vox)} mm (ratio {float(vox.max() / vox.min()):.3g})",
        )


def _check_finite(report: CheckReport, path: Path, stored: np.ndarray) -> None:
    if not np.issubdtype(stored.dtype, np.floating):
        return
    flat = np.ravel(stored, order="K")
    n_nan = n_inf = 0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        if not np.isfinite(block).all():
            n_nan += int(np.isnan(block).sum())
            n_inf += int(np.isinf(block).sum())
    if n_nan or n_inf:
        what = " and ".join(t for t in (f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else "") if t)
        plural = "s" if n_nan + n_inf > 1 else ""
        report.add("error", path, f"{what} voxel{plural} (of {flat.size}): training would produce NaN losses")


def _label_values(stored: np.ndarray, scaling: tuple[float, float] | None, n_classes: int) -> np.ndarray:
    """The distinct label values in a label map (scaled), sorted; at most about :data:`_MAX_DISTINCT`.

    The recipe's values are counted with one comparison pass each (no sort, no int64 copy); other values are
    only collected when some voxels match none of them.
    """
    flat = np.ravel(stored, order="K")
    slope, inter = scaling if scaling is not None else (1.0, 0.0)
    expected = [(v, (v - inter) / slope if scaling is not None else v) for v in range(n_classes)]
    present: set[float] = set()
    matched = 0
    for start in range(0, flat.size, _BLOCK):
        block = flat[start : start + _BLOCK]
        for value, raw in expected:
            count = int(np.count_nonzero(block == raw))
            if count:
                present.add(float(value))
                matched += count
    if matched < flat.size:
        raws = np.asarray([raw for _, raw in expected], dtype=np.float64)
        others: set[float] = set()
        for start in range(0, flat.size, _BLOCK):
            block = flat[start : start + _BLOCK]
            rest = block[~np.isin(block, raws)]
            others.update(float(v) * slope + inter for v in np.unique(rest)[:_MAX_DISTINCT])
            if len(others) > _MAX_DISTINCT:
                break
        present |= others
    return np.asarray(sorted(present), dtype=np.float64)


def _check_label_values(
    report: CheckReport,
    label: ImageFile,
    stored: np.ndarray,
    n_classes: int,
    names: list[str],
    label_map: dict[int, int] | None = None,
) -> set[int]:
    """Label values (after the recipe's ``data.label_map``) against the recipe's labels; returns the foreground
    classes present."""
    path = label.path
    if stored.size == 0:
        report.add("error", path, "label has no voxels")
        return set()
    if np.issubdtype(stored.dtype, np.floating) and not all(
        np.isfinite(stored.ravel(order="K")[i : i + _BLOCK]).all() for i in range(0, stored.size, _BLOCK)
    ):
        report.add("error", path, "label has NaN or Inf values")
        return set()
    values = _label_values(stored, label.scaling, n_classes)
    if values.size > _MAX_DISTINCT:
        report.add(
            "error", path, f"label has more than {_MAX_DISTINCT} distinct values: is it an image, not a label map?"
        )
        return set()
    fractional = values[values != np.round(values)]
    if fractional.size:
        report.add(
            "error",
            path,
            f"label values are not whole numbers (e.g. {fractional[0]:g}): resampled with interpolation?",
        )
        return set()
    present = {int(v) for v in values}
    if label_map:
        present = {label_map.get(v, v) for v in present}
    unknown = sorted(present - set(range(n_classes)))
    if unknown:
        listing = ", ".join(str(v) for v in unknown[:6]) + (", ..." if len(unknown) > 6 else "")
        allowed = f"0..{n_classes - 1} ({', '.join(names)})"
        if present <= {0, 255}:
            report.add(
                "error",
                path,
                f"label values 0 and 255 look like a 0/255 mask; store the foreground as 1 or set "
                f"data.label_map: {{255: 1}} in the recipe (the recipe's labels are {allowed})",
            )
        else:
            report.add("error", path, f"label values {listing} are not among the recipe's labels {allowed}")
    if present <= {0}:
        report.add("warning", path, "label is empty (all background)")
    return {v for v in present if 0 < v < n_classes}


def _size_of(path: Path) -> tuple[bool, int]:
    """(is a folder, size): file size, or for a DICOM folder the total size of its files; -1 if unreadable."""
    try:
        if path.is_dir():
            return True, sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return False, path.stat().st_size
    except OSError:
        return False, -1


def _digest(path: Path) -> str | None:
    """sha256 of a file, or of a folder's files (their contents, in name order)."""
    h = hashlib.sha256()
    try:
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    h.update(chunk)
    except OSError:
        return None
    return h.hexdigest()


def _check_duplicates(report: CheckReport, by_size: dict[tuple[bool, int], list[Path]]) -> None:
    for (_, size), paths in by_size.items():
        if size < 0 or len(paths) < 2:
            continue
        first: dict[str, Path] = {}
        for p in paths:
            digest = _digest(p)
            if digest is None:
                continue
            if digest in first:
                report.add(
                    "error", p, f"byte-identical to {first[digest].name}: the same image is in the data set twice"
                )
            else:
                first[digest] = p


def _fmt(values: Any) -> str:
    return "x".join(f"{float(v):.4g}" for v in values)


def _vec(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in values) + ")"
