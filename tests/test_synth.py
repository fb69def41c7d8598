"""Tests of the synthetic liver CT phantoms and the MSD dataset writer."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from volseg.data import synth_liver as synth
from volseg.data.synth import best_window_dice, case_seed, liver_ct_geometry, liver_ct_phantom, write_dataset
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
    expected = liver_ct_phantom(case_seed(11, 1), variety="clinical")  # write_dataset's default variety
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


# --- the clinical variety ---------------------------------------------------------------------------------------

CLINICAL_SEEDS = range(30)


@pytest.fixture(scope="module")
def clinical_geometries():
    """Grids and drawn parameters of 30 full-size clinical phantoms (no voxels are made: about 0.1 s each)."""
    return [liver_ct_geometry(seed, variety="clinical", size="full") for seed in CLINICAL_SEEDS]


def test_clinical_labels_follow_the_contract_and_are_deterministic():
    a = liver_ct_phantom(2, variety="clinical", shape=(40, 40, 48), axcodes="LPS")
    b = liver_ct_phantom(2, variety="clinical", shape=(40, 40, 48), axcodes="LPS")
    assert a.image.dtype == np.int16 and a.label.dtype == np.uint8 and a.image.shape == a.label.shape == (40, 40, 48)
    assert set(np.unique(a.label).tolist()) == {0, 1, 2}
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    hard = liver_ct_phantom(2, shape=(40, 40, 48), axcodes="LPS")
    assert not np.array_equal(hard.label, a.label)
    assert a.info["variety"] == "clinical" and hard.info["variety"] == "hard"


def test_clinical_slabs_join_without_seams(monkeypatch):
    whole = liver_ct_phantom(2, variety="clinical", shape=(36, 40, 48), axcodes="LPS")
    monkeypatch.setattr(synth, "_SLAB_VOXELS", 1)  # many thin slabs (each 4 halos deep)
    slabbed = liver_ct_phantom(2, variety="clinical", shape=(36, 40, 48), axcodes="LPS")
    assert np.array_equal(whole.image, slabbed.image) and np.array_equal(whole.label, slabbed.label)


def test_clinical_lesion_contrast_sizes_and_counts_span_lits_like_ranges(clinical_geometries):
    lesions = [t for g in clinical_geometries for t in g.info["tumours"]]
    contrast = np.array([t["contrast_hu"] for t in lesions])  # liver minus lesion: > 0 darker, < 0 brighter
    diameter = np.array([t["diameter_mm"] for t in lesions])
    assert len(lesions) >= 60
    assert np.mean((contrast >= 15) & (contrast <= 70)) > 0.6  # most are 15-70 HU darker
    assert np.any(contrast < 0) and np.any((contrast > 0) & (contrast < 10))  # a few brighter, some faint
    assert contrast.max() <= 70 and contrast.min() >= -60
    assert diameter.min() >= 5 and diameter.max() <= 60
    assert np.any(diameter < 10) and np.any(diameter > 35)
    counts = [len(g.info["tumours"]) for g in clinical_geometries]
    assert min(counts) == 0 and max(counts) >= 6 and max(counts) <= 8


def test_clinical_fields_of_view_phases_and_noise_span_the_ranges(clinical_geometries):
    infos = [g.info for g in clinical_geometries]
    assert {i["fov_kind"] for i in infos} == {"liver", "abdomen", "abdomen-pelvis", "chest-abdomen-pelvis"}
    extents = []
    for g in clinical_geometries:
        # The field of view from the grid itself: the world extent of the voxel centres, plus one voxel.
        sizes = nib.affines.voxel_sizes(g.affine) * np.array(g.shape)
        slice_axis = [synth._AXES[c][0] for c in g.info["axcodes"]].index(2)
        inplane = [sizes[a] for a in range(3) if a != slice_axis]
        assert inplane[0] == pytest.approx(inplane[1], rel=1e-3) and 249 <= inplane[0] <= 501
        assert sorted(g.shape[a] for a in range(3) if a != slice_axis) == [512, 512]
        extents.append((inplane[0], sizes[slice_axis], nib.affines.voxel_sizes(g.affine)[slice_axis]))
    fov, z, thickness = np.array(extents).T
    assert fov.min() < 330 and fov.max() > 430
    assert z.min() < 250 and z.max() > 550 and z.max() <= 606  # up to 600 mm (plus rounding to whole slices)
    assert thickness.min() < 1.2 and thickness.max() > 4.0 and 0.6 <= thickness.min() and thickness.max() <= 5.0
    assert {i["phase"] for i in infos} == {"non-contrast", "arterial", "portal venous", "delayed"}
    liver = np.array([i["hu"]["liver"] for i in infos])
    assert liver.min() >= 60 and liver.max() <= 140 and liver.max() - liver.min() > 40
    noise = np.array([i["noise_sd"] for i in infos])
    assert noise.min() >= 8 and noise.max() <= 30 and noise.max() - noise.min() > 12
    offsets = np.abs(np.array([i["table_offset_mm"] for i in infos]))
    assert offsets.max() > 15 and offsets.max() <= 30
    tilts = np.abs([i["oblique_deg"] for i in infos])
    assert 5 <= np.sum(tilts > 0) <= 25 and tilts.max() <= 5 and tilts[tilts > 0].min() >= 1


def test_clinical_demo_size_keeps_the_field_of_view_with_coarser_voxels(clinical_geometries):
    for seed in (2, 5):
        full = clinical_geometries[seed]
        demo = liver_ct_geometry(seed, variety="clinical", size="demo")
        assert demo.info["fov_mm"] == full.info["fov_mm"]
        slice_axis = [synth._AXES[c][0] for c in demo.info["axcodes"]].index(2)
        assert demo.shape[slice_axis] <= 128 and all(demo.shape[a] <= 192 for a in range(3) if a != slice_axis)
        extent = nib.affines.voxel_sizes(demo.affine) * np.array(demo.shape)
        assert extent[slice_axis] >= 0.99 * full.info["fov_mm"][2]


def test_clinical_long_scans_have_slices_without_liver(clinical_geometries):
    long = [g.info["seed"] for g in clinical_geometries if g.info["fov_kind"] == "chest-abdomen-pelvis"]
    p = liver_ct_phantom(long[0], variety="clinical", shape=(32, 32, 60), axcodes="RAS")
    per_slice = (p.label > 0).any(axis=(0, 1))
    assert per_slice.any() and (~per_slice).sum() > 20  # most of a chest-abdomen-pelvis scan has no liver
    body_per_slice = (p.image > -500).any(axis=(0, 1))
    assert body_per_slice.all()  # those slices still hold a body, not air


def test_write_dataset_variety(tmp_path):
    write_dataset(tmp_path / "h", n=1, seed=3, variety="hard")
    meta = json.loads((tmp_path / "h" / "dataset.json").read_text())
    assert meta["synthetic"]["variety"] == "hard"
    label = np.asarray(nib.load(tmp_path / "h" / "labelsTr" / "liver_000.nii.gz").dataobj)
    assert np.array_equal(label, liver_ct_phantom(case_seed(3, 0)).label)
    with pytest.raises(UserError, match="variety"):
        write_dataset(tmp_path / "x", n=1, variety="easy")
    with pytest.raises(UserError, match="variety"):
        liver_ct_phantom(0, variety="easy", shape=TINY)


# --- the independent torso family (held-out evaluation only) ------------------------------------------------------


@pytest.fixture
def tiny_torso(monkeypatch):
    """Cap the torso demo grid at 48 x 48 x 24 voxels (the model lattice coarsens with it), for speed."""
    from volseg.data import synth_torso

    monkeypatch.setattr(synth_torso, "_DEMO_MATRIX", 48)
    monkeypatch.setattr(synth_torso, "_DEMO_SLICES", 24)
    return synth_torso


def test_torso_is_deterministic_oblique_anisotropic_and_labelled(tiny_torso):
    a = tiny_torso.torso_ct_phantom(1)
    b = tiny_torso.torso_ct_phantom(1)
    assert a.image.tobytes() == b.image.tobytes() and a.label.tobytes() == b.label.tobytes()
    assert np.array_equal(a.affine, b.affine)
    assert not np.array_equal(tiny_torso.torso_ct_phantom(2).label, tiny_torso.torso_ct_phantom(3).label)
    codes = set()
    for seed in range(4):
        p = tiny_torso.torso_ct_phantom(seed)
        assert p.image.dtype == np.int16 and p.label.dtype == np.uint8 and p.image.shape == p.label.shape
        assert set(np.unique(p.label).tolist()) <= {0, 1, 2} and (p.label == 1).any()
        if any(t["diameter_mm"] > 20 for t in p.info["tumours"]):
            assert (p.label == 2).any()
        zooms = nib.affines.voxel_sizes(p.affine)
        assert zooms[0] == pytest.approx(zooms[1]) and zooms[2] > 1.2 * zooms[0]  # anisotropic
        direction = p.affine[:3, :3] / zooms
        assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-5)
        off_axis = np.abs(direction[~np.eye(3, dtype=bool)])
        assert off_axis.max() > 0.01 and np.abs(np.diag(direction)).min() > 0.99  # tilted 1-6 degrees
        codes.add("".join(nib.aff2axcodes(p.affine)))
    assert codes == {"LPS", "RAS"}


def test_torso_liver_sits_on_the_patients_right(tiny_torso):
    for seed in range(3):
        p = tiny_torso.torso_ct_phantom(seed)
        liver = p.affine[:3, :3] @ np.argwhere(p.label > 0).mean(axis=0)
        body = p.affine[:3, :3] @ np.argwhere(p.image > -500).mean(axis=0)
        assert liver[0] - body[0] > 20  # RAS+ x grows toward the patient's right


def test_write_torso_dataset_is_held_out_only(tiny_torso, tmp_path):
    path = tiny_torso.write_torso_dataset(tmp_path / "t", n=2, seed=4)
    meta = json.loads(path.read_text())
    assert (meta["numTraining"], meta["numTest"], meta["training"]) == (0, 2, [])
    assert meta["test"] == ["./imagesTs/torso_000.nii.gz", "./imagesTs/torso_001.nii.gz"]
    assert meta["labels"] == {"0": "background", "1": "liver", "2": "tumour"} and meta["synthetic"]["held_out_only"]
    assert not (tmp_path / "t" / "imagesTr").exists()
    image = nib.load(tmp_path / "t" / "imagesTs" / "torso_001.nii.gz")
    label = nib.load(tmp_path / "t" / "labelsTs" / "torso_001.nii.gz")
    expected = tiny_torso.torso_ct_phantom(tiny_torso.torso_case_seed(4, 1))
    assert np.array_equal(image.affine, expected.affine) and int(image.header["sform_code"]) == 1
    assert np.array_equal(np.asarray(image.dataobj), expected.image)
    assert np.array_equal(np.asarray(label.dataobj), expected.label)
    with pytest.raises(UserError, match="size"):
        tiny_torso.write_torso_dataset(tmp_path / "u", n=1, size="huge")
    with pytest.raises(UserError, match="n must"):
        tiny_torso.write_torso_dataset(tmp_path / "u", n=0)


def test_synth_command_variety_and_torso_task(tiny_torso, tmp_path, capsys):
    from volseg import cli

    assert cli.main(["synth", "--task", "torso_ct", "-n", "1", "-o", str(tmp_path / "t")]) == 0
    assert json.loads((tmp_path / "t" / "dataset.json").read_text())["numTest"] == 1
    assert "held-out" in capsys.readouterr().out
    assert cli.main(["synth", "-n", "1", "--variety", "hard", "-o", str(tmp_path / "h")]) == 0
    assert json.loads((tmp_path / "h" / "dataset.json").read_text())["synthetic"]["variety"] == "hard"
    assert cli.main(["synth", "-n", "1", "--variety", "easy", "-o", str(tmp_path / "x")]) == 2
