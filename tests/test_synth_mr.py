"""Tests of the synthetic abdominal MR phantoms: grid, intensities, labels, determinism, and how they are planned."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from volseg import plan as P
from volseg.data.synth import TASKS, case_seed, write_dataset
from volseg.data.synth_mr import MR_LABELS, mr_phantom
from volseg.errors import UserError


@pytest.fixture(scope="module")
def mr_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mr") / "data"
    write_dataset(root, task="mr", n=2, seed=0, n_test=1)
    return root


def _case(root: Path, index: int, split: str = "Tr") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, label, affine) of case ``index`` as written."""
    name = f"mr_{index:03d}.nii.gz"
    img, lab = nib.load(root / f"images{split}" / name), nib.load(root / f"labels{split}" / name)
    return np.asanyarray(img.dataobj), np.asanyarray(lab.dataobj), img.affine


def test_the_grid_is_anisotropic_about_0_9_by_0_9_by_5_mm(mr_data: Path) -> None:
    image, label, affine = _case(mr_data, 1)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    assert zooms[0] == pytest.approx(zooms[1]) and 0.85 <= zooms[0] <= 0.95
    assert 4.5 <= zooms[2] <= 5.5 and zooms[2] / zooms[0] > 4.0
    assert nib.aff2axcodes(affine)[2] == "S"  # slices along the third array axis
    assert image.shape == label.shape and image.shape[2] < image.shape[0] / 4


def test_intensities_are_arbitrary_units_not_hounsfield(mr_data: Path) -> None:
    image, label, _ = _case(mr_data, 2, "Ts")
    assert image.dtype == np.int16 and int(image.min()) >= 0  # no air at -1000, nothing negative
    assert np.percentile(image, 5) < 0.2 * float(image[label > 0].mean())  # background: the noise floor, near 0
    assert float(image[label == 1].mean()) > 100.0
    corner = image[:10, :10, :]  # Rician noise: the background's magnitude is positive, not all zero
    assert corner.min() >= 0 and corner.mean() > 0


def test_labels_liver_and_kidney_present(mr_data: Path) -> None:
    from scipy import ndimage

    meta = json.loads((mr_data / "dataset.json").read_text())
    assert meta["modality"] == {"0": "MR"} and meta["labels"] == MR_LABELS and TASKS["mr"] == "mr"
    assert meta["numTraining"] == 2 and meta["numTest"] == 1
    for index, split in ((0, "Tr"), (1, "Tr"), (2, "Ts")):
        _, label, _ = _case(mr_data, index, split)
        assert set(np.unique(label).tolist()) == {0, 1, 2}
        assert ndimage.label(label == 2)[1] >= 2  # two kidneys
        assert ndimage.label(label == 1)[1] >= 1


def test_same_seed_same_arrays_other_seed_differs(mr_data: Path) -> None:
    again = mr_phantom(case_seed(0, 0))
    image, label, affine = _case(mr_data, 0)
    assert again.image.tobytes() == np.ascontiguousarray(image).tobytes()
    assert again.label.tobytes() == np.ascontiguousarray(label).tobytes()
    assert np.allclose(again.affine, affine)
    other = _case(mr_data, 1)[1]
    assert other.shape != label.shape or not np.array_equal(other, label)
    with pytest.raises(ValueError):
        mr_phantom(-1)


def test_a_smooth_bias_field_multiplies_the_image(mr_data: Path) -> None:
    image, label, _ = _case(mr_data, 1)
    flat = mr_phantom(case_seed(0, 1), bias=False)
    assert np.array_equal(flat.label, label)
    bright = flat.image > 300  # well above the noise floor
    ratio = image[bright] / flat.image[bright]
    lo, hi = np.percentile(ratio, [5, 95])
    assert hi - lo > 0.15  # the signal varies by more than 15% across the body
    # Smooth: the ratio of neighbouring bright voxels in-plane hardly changes, unlike the noise.
    both = bright[1:, :, :] & bright[:-1, :, :]
    r = image.astype(float) / np.maximum(flat.image, 1)
    step = np.abs(r[1:, :, :] - r[:-1, :, :])[both]
    assert np.median(step) < 0.1 * (hi - lo) + 0.05


def test_the_planner_sees_mr_not_ct(mr_data: Path) -> None:
    from volseg.data.datalist import load_datalist

    cases = load_datalist(mr_data, "msd")
    fp = P.fingerprint(cases)  # no dataset.json: the intensities alone
    modality, why = P.determine_modality(fp)
    assert modality != "CT" and "MR-like" in why
    intensity, _ = P.determine_normalization(fp, modality, 1.0)
    assert "nonzero" in intensity  # a z-score, not a CT window
    assert P.fingerprint_dataset(mr_data)["modality"] == "MR"  # and dataset.json says MR


def test_plan_keeps_the_thick_axis_and_its_kernel_is_1(mr_data: Path) -> None:
    fp = P.fingerprint_dataset(mr_data)
    spacing, _ = P.determine_target_spacing(fp)
    assert spacing[2] > 4.0 * spacing[0] and spacing[0] == pytest.approx(spacing[1])
    result = P.plan_recipe(fp, device="cpu", memory_gb=4.0, step_timer=lambda m, p, b: 0.05, time_budget_s=240)
    assert result.recipe["data"]["modality"] == "MR"
    assert result.decisions["kernels_per_level"][0][2] == 1  # no 3-voxel kernel across 5 mm slices
    assert result.decisions["strides"][0][2] == 1  # z waits before it is down-sampled
    assert result.recipe["model"]["args"]["strides"][0] == [2, 2, 1]


def test_spacing_is_for_liver_ct_only(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="liver_ct"):
        write_dataset(tmp_path / "x", task="mr", n=1, spacing=(1.5, 1.5, 1.5))


def test_volseg_synth_writes_isotropic_ct_phantoms(tmp_path: Path) -> None:
    from volseg.cli import main

    out = tmp_path / "ct"
    argv = ["synth", "--task", "liver_ct", "--variety", "hard", "--spacing", "3", "3", "3", "-n", "1", "-o", str(out)]
    assert main(argv) == 0
    img = nib.load(out / "imagesTr" / "liver_000.nii.gz")
    assert tuple(float(z) for z in img.header.get_zooms()) == (3.0, 3.0, 3.0)
    assert json.loads((out / "dataset.json").read_text())["synthetic"]["spacing"] == [3.0, 3.0, 3.0]
    assert float(np.asanyarray(img.dataobj).min()) < -500  # still CT: air around the body
