"""Quality-control pictures: segmentation outlines over the image, and training curves, as PNG files (Pillow).

Montages of 3D images follow the radiological convention. The image is first reoriented to RAS (nibabel's
closest-axis reorientation; oblique grids are shown on their nearest axes), then:

* axial: seen from the feet, the patient's right on the picture's left, anterior up;
* coronal: seen from the front, the patient's right on the picture's left, superior up;
* sagittal: seen from the patient's left, anterior on the picture's left, superior up.

Each panel is drawn with square millimetres (the voxel spacing sets its aspect ratio) and the slices pass through
the centre of mass of the labelled region, taken in world coordinates (the segmentation's, else the ground truth's,
else the middle of the volume). Segmentation outlines are solid lines in the label colours; ground-truth outlines are
dashed in a lighter tint of the same colours. Letters at the panels' edges name the patient directions.

2D images give one panel, drawn as the picture appears on screen: by default the arrays are (x, y), the layout that
MONAI's readers and :class:`volseg.infer.Predictor` give for PNG and TIFF (``axes="xy"``); pass ``axes="rc"`` for
(row, column) arrays as Pillow and numpy give them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

__all__ = ["PANEL_SIZE", "montage_panels", "plot_training_curves", "write_montage"]

PANEL_SIZE = 320
"""Each panel is fitted into a square of this many pixels (letterboxed)."""
MARGIN = 8
HEADER = 22
CAPTION = 18

#: Line colours of the training curves (not label colours: those are :func:`volseg.data.writers.segment_colors`).
CURVE_COLORS = [
    (255, 64, 64),
    (64, 200, 255),
    (255, 210, 0),
    (90, 230, 90),
    (200, 110, 255),
    (255, 140, 40),
    (0, 230, 200),
    (255, 110, 200),
]


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def _color(value: int, colors: Mapping[int, Sequence[int]] | None) -> tuple[int, int, int]:
    if colors and value in colors:
        c = colors[value]
        return (int(c[0]), int(c[1]), int(c[2]))
    from volseg.data.writers import default_color

    # A label without a colour takes the one .seg.nrrd and DICOM SEG give segment value - 1 of 1..N.
    return default_color(value - 1)


def _window(image: np.ndarray, window: tuple[float, float] | None) -> tuple[float, float]:
    if window is not None:
        lo, hi = float(window[0]), float(window[1])
    else:
        finite = image[np.isfinite(image)]
        lo, hi = (float(np.percentile(finite, 0.5)), float(np.percentile(finite, 99.5))) if finite.size else (0, 1)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def _to_ras(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    return apply_orientation(array, transform)


def _ras_affine(affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

    transform = ornt_transform(io_orientation(affine), axcodes2ornt("RAS"))
    return affine @ inv_ornt_aff(transform, shape)


def _centre_world(mask: np.ndarray | None, affine: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if mask is not None and mask.any():
        com = np.array(ndimage.center_of_mass(mask))
    else:
        com = (np.asarray(shape, dtype=float) - 1) / 2
    return (affine @ np.append(com, 1.0))[:3]


Panel = tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None, tuple[float, float], tuple[str, str, str, str]]
"""(name, image 2D, labels 2D or None, ground truth 2D or None, (row spacing, column spacing), edge letters
(top, bottom, left, right)) of one panel, rows and columns as shown on screen."""


def _panels_3d(image: np.ndarray, affine: np.ndarray, labels: np.ndarray | None, gt: np.ndarray | None) -> list[Panel]:
    shape = image.shape
    ref = labels if labels is not None and labels.any() else gt
    world = _centre_world(None if ref is None else ref > 0, affine, shape)
    img = _to_ras(image, affine)
    lab = None if labels is None else _to_ras(labels, affine)
    tru = None if gt is None else _to_ras(gt, affine)
    ras = _ras_affine(affine, shape)
    sx, sy, sz = np.sqrt((ras[:3, :3] ** 2).sum(axis=0))
    centre = np.linalg.solve(ras, np.append(world, 1.0))[:3]
    i, j, k = (int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(centre, img.shape, strict=True))

    def cut(a: np.ndarray | None, view: str) -> np.ndarray | None:
        if a is None:
            return None
        if view == "axial":  # rows: anterior -> posterior; columns: patient's right -> left
            return a[::-1, ::-1, k].T
        if view == "coronal":  # rows: superior -> inferior; columns: right -> left
            return a[::-1, j, ::-1].T
        return a[i, ::-1, ::-1].T  # sagittal; rows: superior -> inferior; columns: anterior -> posterior

    spacing = {"axial": (sy, sx), "coronal": (sz, sx), "sagittal": (sz, sy)}
    letters = {"axial": ("A", "P", "R", "L"), "coronal": ("S", "I", "R", "L"), "sagittal": ("S", "I", "A", "P")}
    out: list[Panel] = []
    for view in ("axial", "coronal", "sagittal"):
        out.append((view, cut(img, view), cut(lab, view), cut(tru, view), spacing[view], letters[view]))  # type: ignore[arg-type]
    return out


def _panel_2d(
    image: np.ndarray,
    affine: np.ndarray | None,
    labels: np.ndarray | None,
    gt: np.ndarray | None,
    axes: Literal["xy", "rc"],
) -> list[Panel]:
    sp = (1.0, 1.0)
    if affine is not None:
        a = np.asarray(affine, dtype=float)
        if a.shape[0] >= 3:
            s0, s1 = np.sqrt((a[:-1, :2] ** 2).sum(axis=0))
            sp = (float(s0) or 1.0, float(s1) or 1.0)

    def show(x: np.ndarray | None) -> np.ndarray | None:
        return None if x is None else (x.T if axes == "xy" else x)

    spacing = (sp[1], sp[0]) if axes == "xy" else sp
    return [("image", show(image), show(labels), show(gt), spacing, ("", "", "", ""))]  # type: ignore[list-item]


def _rendered(
    image: np.ndarray,
    affine: np.ndarray | None,
    labels: np.ndarray | None,
    ground_truth: np.ndarray | None,
    colors: Mapping[int, Sequence[int]] | None,
    window: tuple[float, float] | None,
    panel_size: int,
    axes: Literal["xy", "rc"],
) -> list[tuple[Panel, np.ndarray]]:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim not in (2, 3):
        raise ValueError(f"image must be 2D or 3D, got shape {img.shape}")
    for name, arr in (("labels", labels), ("ground_truth", ground_truth)):
        if arr is not None and np.asarray(arr).shape != img.shape:
            raise ValueError(f"{name} shape {np.asarray(arr).shape} differs from image shape {img.shape}")
    lab = None if labels is None else np.asarray(labels).astype(np.int32)
    gt = None if ground_truth is None else np.asarray(ground_truth).astype(np.int32)
    lo, hi = _window(img, window)
    if img.ndim == 3:
        aff = np.eye(4) if affine is None else np.asarray(affine, dtype=float)
        if aff.shape != (4, 4):
            raise ValueError(f"a 3D image needs a 4x4 affine, got shape {aff.shape}")
        panels = _panels_3d(img, aff, lab, gt)
    else:
        panels = _panel_2d(img, affine, lab, gt, axes)
    return [(p, _render(p, lo, hi, colors, panel_size)) for p in panels]


def montage_panels(
    image: np.ndarray,
    affine: np.ndarray | None,
    labels: np.ndarray | None = None,
    *,
    ground_truth: np.ndarray | None = None,
    colors: Mapping[int, Sequence[int]] | None = None,
    window: tuple[float, float] | None = None,
    panel_size: int = PANEL_SIZE,
    axes: Literal["xy", "rc"] = "xy",
) -> list[tuple[str, np.ndarray]]:
    """The panels of :func:`write_montage` as (name, RGB uint8 array (rows, columns, 3)), without letterboxing.

    See :func:`write_montage` for the arguments.
    """
    return [(p[0], rgb) for p, rgb in _rendered(image, affine, labels, ground_truth, colors, window, panel_size, axes)]


def _render(
    panel: Panel, lo: float, hi: float, colors: Mapping[int, Sequence[int]] | None, panel_size: int
) -> np.ndarray:
    _, img, lab, gt, (row_mm, col_mm), _ = panel
    rows, cols = img.shape
    scale = panel_size / max(rows * row_mm, cols * col_mm)
    size = (max(1, round(cols * col_mm * scale)), max(1, round(rows * row_mm * scale)))  # PIL: (width, height)
    grey = np.clip((img - lo) / (hi - lo) * 255.0, 0, 255).astype(np.uint8)
    rgb = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR).convert("RGB")).copy()
    thick = max(1, round(panel_size / 160))
    for mask_map, dashed in ((lab, False), (gt, True)):
        if mask_map is None:
            continue
        big = np.asarray(Image.fromarray(mask_map.astype(np.int32), mode="I").resize(size, Image.Resampling.NEAREST))
        rr, cc = np.mgrid[0 : big.shape[0], 0 : big.shape[1]]
        for value in np.unique(big):
            if value == 0:
                continue
            mask = big == value
            edge = mask & ~ndimage.binary_erosion(mask, iterations=thick, border_value=0)
            color = np.array(_color(int(value), colors), dtype=np.float32)
            if dashed:
                edge &= ((rr + cc) // 4) % 2 == 0
                color = 0.5 * color + 0.5 * 255.0
            rgb[edge] = color.astype(np.uint8)
    return rgb


def _atomic_png(img: Image.Image, path: Path) -> Path:
    from volseg.fileio import atomic_path

    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return path


def write_montage(
    image: np.ndarray,
    affine: np.ndarray | None,
    labels: np.ndarray | None,
    path: str | Path,
    *,
    ground_truth: np.ndarray | None = None,
    colors: Mapping[int, Sequence[int]] | None = None,
    window: tuple[float, float] | None = None,
    title: str = "",
    panel_size: int = PANEL_SIZE,
    axes: Literal["xy", "rc"] = "xy",
) -> Path:
    """Write a PNG of the image with the segmentation (and ground-truth) outlines.

    3D: axial, coronal and sagittal panels through the labelled region's centre, side by side; 2D: one panel.
    The picture is ``n * (panel_size + MARGIN) + MARGIN`` pixels wide (n panels) and
    ``HEADER + panel_size + CAPTION + MARGIN`` high.

    Args:
        image: 2D or 3D intensities, in the array layout of ``affine``.
        affine: 4x4 voxel -> RAS world matrix (3D; None means identity), or None / the 2D image's matrix (its
            column norms give the pixel spacing).
        labels: integer label map of the image's shape, or None.
        path: the PNG to write (written under a temporary name, then renamed).
        ground_truth: reference label map, drawn dashed.
        colors: label value -> RGB (:func:`volseg.data.writers.segment_colors`); a value without one takes
            :func:`volseg.data.writers.default_color` of ``value - 1``, as the other outputs do for labels 1..N.
        window: (low, high) intensities mapped to black and white (default: the 0.5 and 99.5 percentiles).
        title: text at the top left.
        panel_size: side of each panel's square, in pixels.
        axes: for 2D, ``"xy"`` (axis 0 runs across the picture, MONAI's PNG layout) or ``"rc"`` (rows first).

    Returns:
        The path written.
    """
    panels = _rendered(image, affine, labels, ground_truth, colors, window, panel_size, axes)
    n = len(panels)
    width = n * (panel_size + MARGIN) + MARGIN
    height = HEADER + panel_size + CAPTION + MARGIN
    canvas = Image.new("RGB", (width, height), (16, 16, 16))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    legend = "solid: segmentation" + ("   dashed: ground truth" if ground_truth is not None else "")
    draw.text((MARGIN, 5), (title + "   " if title else "") + legend, fill=(230, 230, 230), font=font)
    for idx, (panel, rgb) in enumerate(panels):
        name, letters = panel[0], panel[5]
        x0 = MARGIN + idx * (panel_size + MARGIN)
        y0 = HEADER
        h, w = rgb.shape[:2]
        px, py = x0 + (panel_size - w) // 2, y0 + (panel_size - h) // 2
        canvas.paste(Image.fromarray(rgb), (px, py))
        if any(letters):
            top, bottom, left, right = letters
            yellow = (255, 230, 120)
            draw.text((px + w // 2 - 3, py + 1), top, fill=yellow, font=font)
            draw.text((px + w // 2 - 3, py + h - 13), bottom, fill=yellow, font=font)
            draw.text((px + 2, py + h // 2 - 6), left, fill=yellow, font=font)
            draw.text((px + w - 9, py + h // 2 - 6), right, fill=yellow, font=font)
        draw.text((x0, y0 + panel_size + 3), name, fill=(200, 200, 200), font=font)
    return _atomic_png(canvas, Path(path))


# ---------------------------------------------------------------------------------------------------------------
# Training curves


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    return [start + i * step for i in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) < 1e-2 or abs(v) >= 1e4:
        return f"{v:.0e}"
    return f"{v:.3g}"


def _plot(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    series: Sequence[tuple[str, Sequence[float], Sequence[float], tuple[int, int, int]]],
    title: str,
    x_range: tuple[float, float],
    font: ImageFont.ImageFont | ImageFont.FreeTypeFont,
    y_range: tuple[float, float] | None = None,
) -> None:
    x0, y0, x1, y1 = box
    left, bottom, top = x0 + 56, y1 - 22, y0 + 18
    right = x1 - 10
    draw.text((x0 + 4, y0 + 2), title, fill=(20, 20, 20), font=font)
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    values = [v for _, _, ys, _ in series for v in ys if v is not None and math.isfinite(v)]
    if not values:
        draw.text((left + 10, (top + bottom) // 2), "no data", fill=(120, 120, 120), font=font)
        return
    lo, hi = y_range if y_range else (min(values), max(values))
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    pad = 0.05 * (hi - lo)
    lo, hi = (lo, hi) if y_range else (lo - pad, hi + pad)
    xa, xb = x_range
    if xb <= xa:
        xa, xb = xa - 0.5, xb + 0.5

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - xa) / (xb - xa) * (right - left), bottom - (y - lo) / (hi - lo) * (bottom - top))

    for t in _nice_ticks(lo, hi):
        _, yy = px(xa, t)
        draw.line((left, yy, right, yy), fill=(225, 225, 225))
        draw.text((x0 + 4, yy - 6), _fmt(t), fill=(60, 60, 60), font=font)
    for t in _nice_ticks(xa, xb, 8):
        if abs(t - round(t)) > 1e-9:
            continue
        xx, _ = px(t, lo)
        draw.line((xx, bottom, xx, bottom + 3), fill=(120, 120, 120))
        draw.text((xx - 6, bottom + 5), str(int(round(t))), fill=(60, 60, 60), font=font)
    legend_x = left + 8
    for name, xs, ys, color in series:
        pts = [px(x, y) for x, y in zip(xs, ys, strict=False) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for p in pts:
            draw.ellipse((p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2), fill=color)
        if name:
            draw.text((legend_x, top + 3), name, fill=color, font=font)
            legend_x += 8 + int(draw.textlength(name, font=font))


def plot_training_curves(history: Mapping[str, Any], path: str | Path, *, title: str = "") -> Path:
    """Write a PNG of the training loss, the validation Dice per label and the learning rate against the epoch.

    Args:
        history: ``{"loss": [per epoch], "lr": [per epoch], "epoch": [epoch numbers, default 1..n],
            "val_epoch": [epochs that were validated], "val_dice": {label: [one value per validation]}}``; any part
            may be missing (its panel then says "no data").
        path: the PNG to write (written under a temporary name, then renamed).
        title: text at the top.

    Returns:
        The path written.
    """
    loss = [float(v) for v in history.get("loss", []) or []]
    lr = [float(v) for v in history.get("lr", []) or []]
    epochs = [float(v) for v in history.get("epoch", []) or []] or [
        float(i + 1) for i in range(max(len(loss), len(lr)))
    ]
    dice = dict(history.get("val_dice", {}) or {})
    val_epochs = [float(v) for v in history.get("val_epoch", []) or []]
    n_val = max((len(v) for v in dice.values()), default=0)
    if not val_epochs:
        val_epochs = [float(i + 1) for i in range(n_val)]
    all_x = epochs + val_epochs
    x_range = (min(all_x, default=0.0), max(all_x, default=1.0))
    width, plot_h = 720, 210
    canvas = Image.new("RGB", (width, 28 + 3 * plot_h + 16), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((8, 7), title or "training curves", fill=(0, 0, 0), font=font)
    palette = CURVE_COLORS
    dice_series = [
        (str(name), val_epochs[: len(vals)], [float(v) for v in vals], palette[i % len(palette)])
        for i, (name, vals) in enumerate(dice.items())
    ]
    _plot(draw, (0, 28, width, 28 + plot_h), [("", epochs, loss, (30, 90, 200))], "training loss", x_range, font)
    _plot(draw, (0, 28 + plot_h, width, 28 + 2 * plot_h), dice_series, "validation Dice", x_range, font, (0.0, 1.0))
    lr_box = (0, 28 + 2 * plot_h, width, 28 + 3 * plot_h)
    _plot(draw, lr_box, [("", epochs, lr, (200, 90, 30))], "learning rate", x_range, font)
    draw.text((width // 2 - 15, 28 + 3 * plot_h), "epoch", fill=(60, 60, 60), font=font)
    return _atomic_png(canvas, Path(path))
