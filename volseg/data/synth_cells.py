"""Synthetic 2D fluorescence microscopy: many irregular nuclei that touch (the U-Net paper's own kind of task)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from volseg.data.synth_base import case_seed
from volseg.errors import UserError
from volseg.fileio import atomic_path, write_text_atomic

# ----------------------------------------------------------------------------------------------------------
# 2D fluorescence microscopy: many irregular nuclei that touch (the U-Net paper's own kind of task).
# ----------------------------------------------------------------------------------------------------------

CELL_PREFIX = "cell"
"""File prefix of the cells cases."""

CELL_LABELS: dict[str, str] = {"0": "background", "1": "cell"}


@dataclass
class CellImage:
    """One synthetic 2D fluorescence image of cell nuclei.

    Attributes:
        image: uint16 camera counts, array axes (row, column) as stored in the PNG.
        label: uint8 semantic mask, 0 background, 1 cell. Where two cells touch, the one-pixel rim of each cell
            along the contact is background (a two-pixel separating line, as in the U-Net paper's training masks),
            so the connected components of the mask are the cells.
        instances: uint16 instance ids 1..n (0 background); touching cells share a border without a gap.
        info: What was drawn (cell count, touching pairs, blur, photon scale, ...).
    """

    image: np.ndarray
    label: np.ndarray
    instances: np.ndarray
    info: dict[str, object] = field(default_factory=dict)


def _touching_rim(instances: np.ndarray) -> np.ndarray:
    """Pixels of a cell that have a pixel of another cell among their 8 neighbours."""
    padded = np.pad(instances, 1, mode="constant")
    rim = np.zeros(instances.shape, dtype=bool)
    h, w = instances.shape
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            nb = padded[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
            rim |= (nb > 0) & (nb != instances)
    return rim & (instances > 0)


def _touching_pairs(instances: np.ndarray) -> int:
    """Number of distinct pairs of cells that share a border (4-neighbourhood)."""
    pairs: set[tuple[int, int]] = set()
    for a, b in ((instances[:-1, :], instances[1:, :]), (instances[:, :-1], instances[:, 1:])):
        hit = (a > 0) & (b > 0) & (a != b)
        lo, hi = np.minimum(a[hit], b[hit]), np.maximum(a[hit], b[hit])
        pairs.update(zip(lo.tolist(), hi.tolist(), strict=True))
    return len(pairs)


def _place_nuclei(rng: np.random.Generator, h: int, w: int) -> tuple[list[np.ndarray], list[float]]:
    """Centres and mean radii of the nuclei, half of them next to an earlier nucleus."""
    n_target = int(rng.integers(28, 48) * (h * w) / 256**2)
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(n_target * 60):
        if len(centres) >= n_target:
            break
        r = float(rng.uniform(8.0, 16.0))
        if centres and rng.random() < 0.55:
            j = int(rng.integers(len(centres)))
            angle = rng.uniform(0, 2 * math.pi)
            c = centres[j] + (radii[j] + r) * rng.uniform(0.78, 0.95) * np.array([math.cos(angle), math.sin(angle)])
        else:
            c = rng.uniform([-4.0, -4.0], [h + 4.0, w + 4.0])
        if not (0 <= c[0] < h and 0 <= c[1] < w):
            continue
        if any(np.hypot(*(c - cc)) < 0.74 * (r + rr) for cc, rr in zip(centres, radii, strict=True)):
            continue
        centres.append(c)
        radii.append(r)

    return centres, radii


def _rasterise_nuclei(
    rng: np.random.Generator, centres: list[np.ndarray], radii: list[float], h: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each pixel's owner (the nucleus in whose star-convex shape it lies deepest) and that normalised radius."""
    best = np.full((h, w), np.inf)
    owner = np.zeros((h, w), dtype=np.int32)
    for k, (c, r) in enumerate(zip(centres, radii, strict=True), start=1):
        elong = float(rng.uniform(1.0, 1.6))
        a, b = r * math.sqrt(elong), r / math.sqrt(elong)
        alpha = rng.uniform(0, math.pi)
        harmonics = [(kk, rng.uniform(0, 0.16 / kk * 2), rng.uniform(0, 2 * math.pi)) for kk in range(2, 6)]
        reach = a * (1 + sum(x[1] for x in harmonics)) + 2
        r0, r1 = max(0, int(c[0] - reach)), min(h, int(c[0] + reach) + 2)
        c0, c1 = max(0, int(c[1] - reach)), min(w, int(c[1] + reach) + 2)
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
        dy, dx = yy - c[0], xx - c[1]
        u = math.cos(alpha) * dx + math.sin(alpha) * dy
        v = -math.sin(alpha) * dx + math.cos(alpha) * dy
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        theta = np.arctan2(v / b, u / a)
        bump = 1.0 + sum(amp * np.cos(kk * theta + ph) for kk, amp, ph in harmonics)
        q = rho / bump
        box = (slice(r0, r1), slice(c0, c1))
        take = (q < 1.0) & (q < best[box])
        best[box][take] = q[take]
        owner[box][take] = k

    return best, owner


def _fluorescence(
    rng: np.random.Generator, instances: np.ndarray, best: np.ndarray, n_cells: int
) -> tuple[np.ndarray, float, float, float]:
    """Camera counts of the nuclei (with texture), uneven illumination, haze, blur and noise; and the drawn blur,
    photon scale and read noise."""
    h, w = instances.shape
    # Intensities: a bright interior falling off toward the edge, with texture.
    brightness = np.concatenate([[0.0], rng.uniform(0.45, 1.0, n_cells)])
    q = np.where(instances > 0, np.minimum(best, 1.0), 1.0)
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.2)
    texture /= max(float(texture.std()), 1e-6)
    cells = brightness[instances] * (1.0 - 0.55 * q**3) * (1.0 + 0.12 * texture)
    cells[instances == 0] = 0.0

    # Uneven illumination (a broad off-centre spot and a gradient) and background haze.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    spot = rng.uniform([0, 0], [h, w])
    width = rng.uniform(0.5, 0.9) * max(h, w)
    tilt = rng.uniform(-0.25, 0.25, 2)
    light = 0.55 + 0.6 * np.exp(-((yy - spot[0]) ** 2 + (xx - spot[1]) ** 2) / (2 * width**2))
    light *= 1.0 + tilt[0] * (yy / h - 0.5) + tilt[1] * (xx / w - 0.5)
    haze = 0.06 + 0.04 * ndimage.gaussian_filter(rng.standard_normal((h, w)), 12.0) * 12.0
    signal = (cells + np.clip(haze, 0.01, None)) * light

    blur = float(rng.uniform(1.0, 1.8))
    signal = ndimage.gaussian_filter(signal, blur, mode="reflect")
    photons = float(rng.uniform(120.0, 500.0))
    read_sd, offset, gain = float(rng.uniform(2.0, 6.0)), 100.0, 2.0
    counts = rng.poisson(np.clip(signal, 0, None) * photons) * gain + rng.normal(0.0, read_sd, (h, w)) + offset
    image = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    return image, blur, photons, read_sd


def cells_image(seed: int, shape: tuple[int, int] = (256, 256)) -> CellImage:
    """Make one synthetic fluorescence image of densely packed, irregular, often touching nuclei.

    Each nucleus is a star-convex shape: a randomly elongated and rotated ellipse (mean radius 8-16 px, semi-axes up
    to about 20 px) whose radius is modulated by harmonics 2-5. Half of the nuclei are placed next to an earlier one
    so that their shapes overlap; every pixel goes to the nucleus in whose shape it lies deepest (smallest
    normalised radius), so touching nuclei share a curved border and never overlap. The intensity of a nucleus
    falls off toward its edge (a faint dip along the contact of two nuclei) and carries a fine texture; the field
    has uneven illumination and a background haze, then a Gaussian blur, Poisson photon noise, Gaussian read noise
    and a camera offset.

    Args:
        seed: Non-negative integer; the same seed gives byte-identical arrays.
        shape: (rows, columns) of the image.

    Returns:
        The image (uint16), the semantic mask with touching borders separated, and the instance ids.

    Raises:
        UserError: A negative seed or a shape under 32 pixels.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if len(shape) != 2 or min(shape) < 32:
        raise UserError(f"shape must be two sizes of at least 32 pixels, got {shape!r}")
    h, w = int(shape[0]), int(shape[1])
    rng = np.random.default_rng([int(seed), 7])
    centres, radii = _place_nuclei(rng, h, w)
    best, owner = _rasterise_nuclei(rng, centres, radii, h, w)
    # Consecutive ids for the nuclei that kept pixels.
    kept = np.unique(owner[owner > 0])
    relabel = np.zeros(len(centres) + 1, dtype=np.uint16)
    relabel[kept] = np.arange(1, kept.size + 1, dtype=np.uint16)
    instances = relabel[owner]
    label = ((instances > 0) & ~_touching_rim(instances)).astype(np.uint8)

    image, blur, photons, read_sd = _fluorescence(rng, instances, best, kept.size)
    info: dict[str, object] = {
        "seed": int(seed),
        "shape": [h, w],
        "cells": int(kept.size),
        "touching_pairs": _touching_pairs(instances),
        "blur_sigma_px": round(blur, 3),
        "photons_per_unit": round(photons, 1),
        "read_noise_sd": round(read_sd, 2),
    }
    return CellImage(image=image, label=label, instances=instances, info=info)


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a 2D array as a PNG (8-bit for uint8, 16-bit for uint16) under a temporary name, then rename."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def write_cells_dataset(root: Path, n: int, seed: int, n_test: int) -> Path:
    """The ``cells`` task of :func:`volseg.data.synth.write_dataset` (PNG files; see there)."""
    sub = {"Tr": ("images", "labels", "instances"), "Ts": ("imagesTs", "labelsTs", "instancesTs")}
    for split, count in (("Tr", n), ("Ts", n_test)):
        if count:
            for folder in sub[split]:
                (root / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(n + n_test):
        cell = cells_image(case_seed(seed, index))
        name = f"{CELL_PREFIX}_{index:03d}.png"
        split = "Tr" if index < n else "Ts"
        img_dir, lab_dir, inst_dir = sub[split]
        _save_png(cell.image, root / img_dir / name)
        _save_png(cell.label, root / lab_dir / name)
        _save_png(cell.instances, root / inst_dir / name)
        entry = {"image": f"./{img_dir}/{name}", "label": f"./{lab_dir}/{name}", "instance": f"./{inst_dir}/{name}"}
        if split == "Tr":
            training.append(entry)
        else:
            test.append(entry["image"])
    dataset = {
        "name": "SyntheticCells",
        "description": "Synthetic 2D fluorescence images of touching cell nuclei from volseg (semantic masks with "
        "separated touching borders, and instance masks)",
        "reference": "volseg.data.synth (generated, not patient data)",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "2D",
        "modality": {"0": "fluorescence microscopy"},
        "labels": dict(CELL_LABELS),
        "numTraining": n,
        "numTest": n_test,
        "training": training,
        "test": test,
        "synthetic": {"generator": "volseg.data.synth.cells_image", "seed": int(seed), "shape": [256, 256]},
    }
    return write_text_atomic(root / "dataset.json", json.dumps(dataset, indent=2) + "\n")
