"""Tests of the synthetic liver CT phantoms and the MSD dataset writer."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from volseg.data.synth import best_window_dice, case_seed, liver_ct_phantom, write_dataset
from volseg.errors import UserError

TINY = (48, 48, 24)


def _world_centroid(phantom, label_values=(1, 2)) -> np.ndarray:
    ijk = np.argwhere(np.isin(phantom.label, label_values)).mean(axis=0)
    return phantom.affine[:3, :3] @ ijk + phantom.affine[:3, 3]


def test_same_seed_gives_identical_arrays_and_other_seeds_differ():
    a = liver_ct_phantom(3, shape=TINY, axcodes="RAS")
    b = liver_ct_phantom(3, shape=TINY, axcodes="RAS")
    c = liver_ct_phantom(4, shape=TINY, axcodes="RAS")
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8 and a.affine.dtype == np.float64
    assert a.image.shape == a.label.shape == TINY
    assert a.image.tobytes() == b.image.tobytes()
    assert a.label.tobytes() == b.label.tobytes()
    assert np.array_equal(a.affine, b.affine)
    assert not np.array_equal(a.label, c.label)


def test_labels_are_background_liver_tumour_and_tumours_sit_inside_the_liver():
    # Seed 2 has tumours; spacing <= 5 mm so a 6-neighbour is within the 5 mm of liver kept around each tumour.
    p = liver_ct_phantom(2, spacing=(2.5, 2.5, 4.0), axcodes="RAS")
    assert set(np.unique(p.label).tolist()) == {0, 1, 2}
    tumour = p.label == 2
    ring = ndimage.binary_dilation(tumour) & ~tumour
    assert ring.any() and np.all(p.label[ring] == 1)
    # The liver is essentially one piece.
    components, _ = ndimage.label(p.label > 0)
    sizes = np.bincount(components.ravel())[1:]
    assert sizes.max() > 0.99 * sizes.sum()


def test_liver_lies_on_the_patients_right():
    p = liver_ct_phantom(0, spacing=(3.0, 3.0, 5.0), axcodes="RAS")
    # In a RAS array, increasing i goes toward the patient's Right; the field of view is centred on the body.
    i = np.argwhere(p.label == 1)[:, 0]
    assert np.mean(i > (p.label.shape[0] - 1) / 2) > 0.75


@pytest.mark.parametrize(
    ("axcodes", "spacing", "shape"),
    [("RAS", (0.9, 0.9, 3.0), TINY), ("LPS", (1.2, 0.8, 2.5), TINY), ("SLP", (5.0, 0.7, 0.7), (24, 48, 40))],
)
def test_affine_honours_spacing_and_axcodes(axcodes, spacing, shape):
    p = liver_ct_phantom(1, spacing=spacing, axcodes=axcodes, shape=shape)
    assert p.image.shape == shape
    assert "".join(nib.aff2axcodes(p.affine)) == axcodes
    assert np.allclose(nib.affines.voxel_sizes(p.affine), spacing, rtol=1e-6)


def test_oblique_affine_keeps_spacing_and_nominal_axcodes():
    p = liver_ct_phantom(1, spacing=(2.0, 2.0, 4.0), axcodes="LPS", shape=TINY, oblique_deg=15.0)
    direction = p.affine[:3, :3] / nib.affines.voxel_sizes(p.affine)
    assert "".join(nib.aff2axcodes(p.affine)) == "LPS"
    assert np.allclose(nib.affines.voxel_sizes(p.affine), (2.0, 2.0, 4.0), rtol=1e-6)
    assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-6)
    assert np.min(np.abs(direction[np.abs(direction) > 1e-6])) < 0.9  # genuinely oblique, not a flip


def test_same_anatomy_under_different_orientations_and_grids():
    ras = liver_ct_phantom(5, spacing=(3.0, 3.0, 4.0), axcodes="RAS")
    lps = liver_ct_phantom(5, spacing=(3.0, 3.0, 4.0), axcodes="LPS")
    # The same voxel centres in another order: the label is the flipped array (up to float rounding at edges).
    assert np.mean(lps.label != ras.label[::-1, ::-1, :]) < 1e-4
    assert np.allclose(_world_centroid(ras), _world_centroid(lps), atol=0.5)
    # A permuted, differently sampled and oblique grid still finds the liver at the same place (sampling error).
    slp = liver_ct_phantom(5, spacing=(5.0, 2.5, 2.5), axcodes="SLP", oblique_deg=10.0)
    assert np.linalg.norm(_world_centroid(slp) - _world_centroid(ras)) < 2.0
    volumes = [np.sum(p.label > 0) * np.prod(nib.affines.voxel_sizes(p.affine)) for p in (ras, slp)]
    assert volumes[1] == pytest.approx(volumes[0], rel=0.03)


def test_threshold_window_cannot_segment_liver_and_tumours_hide_in_noise():
    p = liver_ct_phantom(7, spacing=(2.0, 2.0, 3.0), axcodes="LPS")
    dice, lo, hi = best_window_dice(p.image, p.label > 0)
    assert 0.3 < dice < 0.8, (dice, lo, hi)
    # The search itself works: a mask that is exactly a window is found with Dice 1.
    assert best_window_dice(p.image, (p.image >= 90) & (p.image <= 120))[0] == pytest.approx(1.0)
    # Tumour-vs-liver contrast, measured away from edges, is positive but below the noise SD.
    liver_core = ndimage.binary_erosion(p.label == 1, iterations=2)
    tumour_core = ndimage.binary_erosion(p.label == 2)
    assert tumour_core.sum() > 20
    contrast = np.median(p.image[liver_core]) - np.median(p.image[tumour_core])
    assert 3.0 < contrast < p.info["noise_sd"]


def test_write_dataset_msd_layout_round_trips(tmp_path):
    path = write_dataset(tmp_path / "ds", n=2, seed=11, n_test=1)
    root = tmp_path / "ds"
    assert path == root / "dataset.json"
    meta = json.loads(path.read_text())
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert (meta["numTraining"], meta["numTest"]) == (2, 1)
    assert meta["training"] == [
        {"image": f"./imagesTr/liver_00{i}.nii.gz", "label": f"./labelsTr/liver_00{i}.nii.gz"} for i in range(2)
    ]
    assert meta["test"] == ["./imagesTs/liver_002.nii.gz"]
    assert {"name", "description"} <= meta.keys()
    assert (root / "labelsTs" / "liver_002.nii.gz").is_file()
    assert not [f for f in root.rglob("*") if f.name.startswith(".")]  # no temporary files left

    image = nib.load(root / "imagesTr" / "liver_001.nii.gz")
    label = nib.load(root / "labelsTr" / "liver_001.nii.gz")
    expected = liver_ct_phantom(case_seed(11, 1))
    assert image.get_data_dtype() == np.int16 and label.get_data_dtype() == np.uint8
    assert np.array_equal(image.affine, expected.affine) and np.array_equal(label.affine, expected.affine)
    assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1
    assert np.allclose(image.get_qform(), expected.affine, atol=1e-4)
    assert np.array_equal(np.asarray(image.dataobj), expected.image)
    assert np.array_equal(np.asarray(label.dataobj), expected.label)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="liver_ct"):
        write_dataset(tmp_path, task="brain_mri", n=1)
    with pytest.raises(UserError, match="axcodes"):
        liver_ct_phantom(0, axcodes="RRS", shape=TINY)
    with pytest.raises(UserError, match="size"):
        liver_ct_phantom(0, size="huge")
    assert not any(tmp_path.iterdir())
