"""QC pictures: montages in the radiological convention whatever the storage orientation, and training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from volseg.data.synth import liver_ct_phantom
from volseg.data.writers import default_color
from volseg.qc import CAPTION, HEADER, MARGIN, PANEL_SIZE, montage_panels, plot_training_curves, write_montage

RED = (255, 0, 0)


def _marker_volume() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A RAS-stored volume (x right, y anterior, z superior; 2 mm slices) with a label cube in the patient's
    right-anterior-superior corner and a bright line along x (left-right) at the centre."""
    shape = (40, 30, 20)
    image = np.zeros(shape, np.float32)
    label = np.zeros(shape, np.uint8)
    label[28:36, 20:27, 13:18] = 1  # high x (right), high y (anterior), high z (superior)
    image[label > 0] = 100.0
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    affine[:3, 3] = [-20.0, -15.0, -20.0]
    return image, label, affine


def _flip_to_lps(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same volume stored LPS: the first two array axes reversed, the affine adjusted to keep the world."""
    flipped = array[::-1, ::-1, :].copy()
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3], flip[1, 3] = array.shape[0] - 1, array.shape[1] - 1
    return flipped, affine @ flip


def _red_centre(rgb: np.ndarray) -> tuple[float, float]:
    """(row, column) of the red outline pixels, as fractions of the panel's height and width."""
    rows, cols = np.nonzero((rgb[..., 0] == 255) & (rgb[..., 1] == 0) & (rgb[..., 2] == 0))
    assert rows.size, "no outline drawn"
    return rows.mean() / rgb.shape[0], cols.mean() / rgb.shape[1]


def test_panels_follow_the_radiological_convention_and_spacing() -> None:
    image, label, affine = _marker_volume()
    panels = dict(montage_panels(image, affine, label, colors={1: RED}, panel_size=200))
    # Axial: patient's right on the left, anterior up.
    r, c = _red_centre(panels["axial"])
    assert r < 0.4 and c < 0.4
    # Coronal: right on the left, superior up.
    r, c = _red_centre(panels["coronal"])
    assert r < 0.4 and c < 0.4
    # Sagittal: anterior on the left, superior up.
    r, c = _red_centre(panels["sagittal"])
    assert r < 0.4 and c < 0.4
    # Aspect ratio in millimetres: axial 40 x 30 mm, coronal 40 x 40 mm (20 slices of 2 mm), sagittal 30 x 40.
    assert panels["axial"].shape[:2] == (150, 200)
    assert panels["coronal"].shape[:2] == (200, 200)
    assert panels["sagittal"].shape[:2] == (200, 150)


def test_lps_and_ras_storage_give_the_same_pictures() -> None:
    image, label, affine = _marker_volume()
    lps_image, lps_affine = _flip_to_lps(image, affine)
    lps_label, _ = _flip_to_lps(label, affine)
    a = dict(montage_panels(image, affine, label, window=(0, 100)))
    b = dict(montage_panels(lps_image, lps_affine, lps_label, window=(0, 100)))
    for view in ("axial", "coronal", "sagittal"):
        assert np.array_equal(a[view], b[view]), view


def test_phantom_stored_lps_and_ras_gives_the_same_axial_panel(tmp_path: Path) -> None:
    shape, spacing = (64, 56, 24), (5.0, 5.0, 8.0)
    ras = liver_ct_phantom(3, axcodes="RAS", shape=shape, spacing=spacing)
    lps = liver_ct_phantom(3, axcodes="LPS", shape=shape, spacing=spacing)
    assert np.array_equal(ras.label, lps.label[::-1, ::-1, :])  # the same anatomy, stored flipped
    pa = dict(montage_panels(ras.image, ras.affine, ras.label, window=(-175, 250)))
    pb = dict(montage_panels(lps.image, lps.affine, lps.label, window=(-175, 250)))
    # The outlines are the same pixels; the grey values differ only by the noise, drawn in each array's own order.
    outline_a = np.any(pa["axial"] != pa["axial"][..., :1], axis=-1)
    outline_b = np.any(pb["axial"] != pb["axial"][..., :1], axis=-1)
    assert outline_a.sum() > 100 and np.array_equal(outline_a, outline_b)
    assert np.array_equal(pa["axial"][outline_a], pb["axial"][outline_b])
    grey_a, grey_b = pa["axial"][..., 0].astype(float), pb["axial"][..., 0].astype(float)
    assert np.corrcoef(grey_a[~outline_a], grey_b[~outline_b])[0, 1] > 0.95
    # The liver (label 1, first default colour) lies on the patient's right: the picture's left half.
    liver = np.all(pa["axial"] == default_color(0), axis=-1)
    assert liver.any() and np.nonzero(liver)[1].mean() < 0.5 * liver.shape[1]
    # Same for the picture written from the same image stored both ways.
    flipped = ras.image[::-1, ::-1, :].copy()
    fa = write_montage(ras.image, ras.affine, ras.label, tmp_path / "ras.png", window=(-175, 250))
    fb = write_montage(flipped, lps.affine, lps.label, tmp_path / "lps.png", window=(-175, 250))
    assert np.array_equal(np.asarray(Image.open(fa)), np.asarray(Image.open(fb)))


def test_montage_file_size_and_content(tmp_path: Path) -> None:
    ph = liver_ct_phantom(1, shape=(64, 64, 24), spacing=(5.0, 5.0, 8.0))
    gt = ph.label.copy()
    pred = np.where(ph.label == 2, 1, ph.label).astype(np.uint8)  # a "prediction" that misses the tumours
    path = write_montage(
        ph.image, ph.affine, pred, tmp_path / "qc" / "case.png", ground_truth=gt, title="case", window=(-175, 250)
    )
    assert path == tmp_path / "qc" / "case.png" and path.is_file()
    with Image.open(path) as im:
        assert im.size == (3 * (PANEL_SIZE + MARGIN) + MARGIN, HEADER + PANEL_SIZE + CAPTION + MARGIN)
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.std() > 20  # an image, not a blank
    assert np.all(rgb == default_color(0), axis=-1).sum() > 100  # segmentation outlines in the label colour
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_2d_montage_one_panel_and_axis_layouts(tmp_path: Path) -> None:
    rows, cols = 60, 90
    image = np.zeros((rows, cols), np.float32)
    label = np.zeros((rows, cols), np.uint8)
    label[5:20, 60:85] = 1  # top right of the picture, in (row, column) layout
    image[label > 0] = 1.0
    rc = dict(montage_panels(image, None, label, colors={1: RED}, axes="rc", panel_size=180))
    xy = dict(montage_panels(image.T, None, label.T, colors={1: RED}, axes="xy", panel_size=180))
    assert np.array_equal(rc["image"], xy["image"])
    assert rc["image"].shape[:2] == (120, 180)
    r, c = _red_centre(rc["image"])
    assert r < 0.4 and c > 0.6
    path = write_montage(image.T, None, label.T, tmp_path / "cell.png")
    with Image.open(path) as im:
        assert im.size == (PANEL_SIZE + 2 * MARGIN, HEADER + PANEL_SIZE + CAPTION + MARGIN)


def test_montage_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        montage_panels(np.zeros((4, 4, 4)), np.eye(4), np.zeros((4, 4, 3)))
    with pytest.raises(ValueError, match="2D or 3D"):
        montage_panels(np.zeros((2, 4, 4, 4)), np.eye(4))


def test_training_curves(tmp_path: Path) -> None:
    history = {
        "loss": [1.0, 0.7, 0.5, 0.45, 0.4, 0.38],
        "lr": [1e-3, 8e-4, 6e-4, 4e-4, 2e-4, 0.0],
        "val_epoch": [2, 4, 6],
        "val_dice": {"liver": [0.5, 0.8, 0.9], "tumour": [0.1, 0.3, 0.4]},
    }
    path = plot_training_curves(history, tmp_path / "curves.png", title="run")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    assert rgb.shape[1] == 720 and rgb.shape[0] > 600
    assert np.all(rgb == (30, 90, 200), axis=-1).sum() > 50  # the loss line
    assert np.all(rgb == (255, 64, 64), axis=-1).sum() > 50  # the first label's Dice line
    # Parts may be missing.
    plot_training_curves({"loss": [0.5]}, tmp_path / "one.png")
    assert (tmp_path / "one.png").is_file()
