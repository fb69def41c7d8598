"""Tests of volseg.metrics and volseg.evaluate: analytic shapes, empty masks, MONAI agreement, NIfTI tables."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from volseg import metrics
from volseg.errors import UserError
from volseg.evaluate import evaluate_files, pair_files
from volseg.metrics import (
    assd,
    dice,
    dice_per_label,
    evaluate_case,
    hd95,
    iou,
    iou_per_label,
    normalized_surface_dice,
    surface_distances,
)

SPACING_3D = (0.8, 1.1, 2.5)
SPACING_2D = (0.7, 1.3)


def ball(shape: tuple[int, ...], spacing: tuple[float, ...], radius_mm: float) -> np.ndarray:
    """Voxels whose centre lies within radius_mm of the grid's central voxel centre, in physical units."""
    grids = np.meshgrid(*[(np.arange(n) - n // 2) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    return sum(g * g for g in grids) <= radius_mm**2


def box(shape: tuple[int, ...], start: int, stop: int, shift: int = 0, axis: int = 0) -> np.ndarray:
    """A cube [start, stop) on every axis, moved by ``shift`` voxels along ``axis``."""
    mask = np.zeros(shape, bool)
    index = [slice(start, stop)] * len(shape)
    index[axis] = slice(start + shift, stop + shift)
    mask[tuple(index)] = True
    return mask


def blob_pair(shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random reference shape and a prediction that disagrees with it near its surface."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 3.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    ref = field > 0.02
    pred = field + 0.3 * noise > 0.02
    return pred, ref


def brute_surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, ...]):
    """The definition, without cropping: boundary voxels and dense distance_transform_edt maps."""
    structure = ndimage.generate_binary_structure(pred.ndim, 1)
    p_surf = pred & ~ndimage.binary_erosion(pred, structure, border_value=0)
    r_surf = ref & ~ndimage.binary_erosion(ref, structure, border_value=0)
    to_ref = ndimage.distance_transform_edt(~r_surf, sampling=spacing)
    to_pred = ndimage.distance_transform_edt(~p_surf, sampling=spacing)
    return to_ref[p_surf], to_pred[r_surf]


# --- analytic shapes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shape", "spacing"), [((41, 31, 15), SPACING_3D), ((51, 29), SPACING_2D)], ids=["3d", "2d"])
def test_concentric_spheres(shape, spacing):
    r1, r2 = 8.0, 14.0
    inner, outer = ball(shape, spacing, r1), ball(shape, spacing, r2)
    assert not outer[0].any() and not outer[-1].any()  # the grid holds the outer sphere
    diagonal = math.sqrt(sum(s * s for s in spacing))
    assert hd95(inner, outer, spacing) == pytest.approx(r2 - r1, abs=diagonal)
    assert assd(inner, outer, spacing) == pytest.approx(r2 - r1, abs=diagonal)
    assert normalized_surface_dice(inner, outer, spacing, r2 - r1 + diagonal) == 1.0
    assert normalized_surface_dice(inner, outer, spacing, r2 - r1 - diagonal) == 0.0
    # symmetric
    assert hd95(outer, inner, spacing) == hd95(inner, outer, spacing)
    assert assd(outer, inner, spacing) == pytest.approx(assd(inner, outer, spacing), rel=1e-12)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_cube_3d(axis, k):
    shape = (24, 24, 24)
    ref, pred = box(shape, 6, 16), box(shape, 6, 16, shift=k, axis=axis)
    shift_mm = k * SPACING_3D[axis]
    # a whole face (20 % of the surface) lies k voxels from the other surface, nothing farther
    assert hd95(pred, ref, SPACING_3D) == pytest.approx(shift_mm, rel=1e-12)
    assert normalized_surface_dice(pred, ref, SPACING_3D, shift_mm + 0.01) == 1.0
    assert normalized_surface_dice(pred, ref, SPACING_3D, shift_mm - 0.01) < 1.0
    assert dice(pred, ref) == pytest.approx(1 - k / 10)
    assert iou(pred, ref) == pytest.approx((10 - k) / (10 + k))


@pytest.mark.parametrize("axis", [0, 1])
def test_shifted_square_2d(axis):
    shape = (30, 30)
    ref, pred = box(shape, 8, 20), box(shape, 8, 20, shift=2, axis=axis)
    shift_mm = 2 * SPACING_2D[axis]
    assert hd95(pred, ref, SPACING_2D) == pytest.approx(shift_mm, rel=1e-12)
    assert normalized_surface_dice(pred, ref, SPACING_2D, shift_mm) == 1.0  # the tolerance is inclusive
    assert normalized_surface_dice(pred, ref, SPACING_2D, shift_mm - 0.01) < 1.0


@pytest.mark.parametrize(("shape", "spacing"), [((20, 22, 9), SPACING_3D), ((25, 21), SPACING_2D)], ids=["3d", "2d"])
def test_identical_masks(shape, spacing):
    mask = ball(shape, spacing, 6.0)
    assert dice(mask, mask) == 1.0 and iou(mask, mask) == 1.0
    assert hd95(mask, mask, spacing) == 0.0 and assd(mask, mask, spacing) == 0.0
    assert normalized_surface_dice(mask, mask, spacing, 0.0) == 1.0


def test_single_voxels_far_apart():
    a, b = np.zeros((5, 40), bool), np.zeros((5, 40), bool)
    a[2, 3], b[2, 33] = True, True
    assert hd95(a, b, (1.0, 0.5)) == pytest.approx(15.0)
    assert assd(a, b, (1.0, 0.5)) == pytest.approx(15.0)
    assert normalized_surface_dice(a, b, (1.0, 0.5), 14.9) == 0.0


# --- empty masks --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(12, 10, 8), (12, 10)], ids=["3d", "2d"])
def test_empty_mask_rules(shape):
    spacing = (1.0,) * len(shape)
    empty, some = np.zeros(shape, bool), box(shape, 2, 6)
    assert (dice(empty, empty), iou(empty, empty)) == (1.0, 1.0)
    assert (hd95(empty, empty, spacing), assd(empty, empty, spacing)) == (0.0, 0.0)
    assert normalized_surface_dice(empty, empty, spacing, 1.0) == 1.0
    for pred, ref in [(empty, some), (some, empty)]:
        assert (dice(pred, ref), iou(pred, ref)) == (0.0, 0.0)
        assert math.isnan(hd95(pred, ref, spacing)) and math.isnan(assd(pred, ref, spacing))
        assert normalized_surface_dice(pred, ref, spacing, 100.0) == 0.0
        d_pr, d_rp = surface_distances(pred, ref, spacing)
        assert d_pr.size == 0 and d_rp.size == 0


def test_evaluate_case_labels_and_empty_rules():
    shape = (20, 20, 12)
    ref = np.zeros(shape, np.uint8)
    ref[4:14, 4:14, 2:8] = 1
    ref[6:9, 6:9, 3:5] = 2
    pred = ref.copy()
    pred[6:9, 6:9, 3:5] = 1  # tumour missed
    labels = {"background": 0, "liver": 1, "tumour": 2, "vessel": 3}
    out = evaluate_case(pred, ref, labels, SPACING_3D, tolerance_mm=1.0)
    assert list(out) == ["liver", "tumour", "vessel"]
    assert set(out["liver"]) == {"dice", "iou", "hd95", "assd", "nsd", "pred_voxels", "ref_voxels"}
    assert out["liver"]["pred_voxels"] == 600 and out["liver"]["ref_voxels"] == 600 - 18
    assert out["tumour"] == {
        "dice": 0.0,
        "iou": 0.0,
        "hd95": pytest.approx(math.nan, nan_ok=True),
        "assd": pytest.approx(math.nan, nan_ok=True),
        "nsd": 0.0,
        "pred_voxels": 0,
        "ref_voxels": 18,
    }
    assert out["vessel"] == {
        "dice": 1.0,
        "iou": 1.0,
        "hd95": 0.0,
        "assd": 0.0,
        "nsd": 1.0,
        "pred_voxels": 0,
        "ref_voxels": 0,
    }
    for name in ("liver", "tumour", "vessel"):  # the older helpers agree
        assert dice_per_label(pred, ref, labels)[name] == out[name]["dice"]
        assert iou_per_label(pred, ref, labels)[name] == out[name]["iou"]


# --- the definition: cropping, the array's edge, both distance methods --------------------------------------------


def _speck_pair(shape, spacing):
    """A ball predicted with a one-voxel false positive far away in a corner."""
    ref = ball(shape, spacing, 5.0)
    pred = np.roll(ref, 1, axis=0)
    pred[(0,) * len(shape)] = True
    return pred, ref


def _ragged_pair(shape, spacing):
    """A ball predicted with salt-and-pepper errors all over the array."""
    ref = ball(shape, spacing, 5.0)
    return ref ^ (np.random.default_rng(0).random(shape) < 0.05), ref


# the three ways "auto" can go: straight to the distance transform (default constants, thick surfaces), k-d tree for
# near and far queries, k-d tree for near queries then the distance transform because too many were far
AUTO_BRANCHES = {
    "default": {},
    "kdtree-far": {"KDTREE_MAX_SURFACE_FRACTION": 2.0, "KDTREE_NEAR_VOXELS": 1, "KDTREE_MAX_FAR_FRACTION": 2.0},
    "kdtree-then-edt": {"KDTREE_MAX_SURFACE_FRACTION": 2.0, "KDTREE_NEAR_VOXELS": 1, "KDTREE_MAX_FAR_FRACTION": 0.0},
}


@pytest.mark.parametrize("branch", list(AUTO_BRANCHES))
@pytest.mark.parametrize("make", [blob_pair, _speck_pair, _ragged_pair], ids=["blobs", "speck", "ragged"])
@pytest.mark.parametrize(("shape", "spacing"), [((30, 34, 14), SPACING_3D), ((60, 52), SPACING_2D)], ids=["3d", "2d"])
def test_distances_match_the_definition(shape, spacing, make, branch, monkeypatch):
    for name, value in AUTO_BRANCHES[branch].items():
        monkeypatch.setattr(metrics, name, value)
    pred, ref = make(shape, 3) if make is blob_pair else make(shape, spacing)
    assert pred[0].any() and ref.any()  # the prediction touches the array's edge, where it has a surface too
    want_pr, want_rp = brute_surface_distances(pred, ref, spacing)
    for method in ("edt", "kdtree", "auto"):
        d_pr, d_rp = surface_distances(pred, ref, spacing, method=method)
        np.testing.assert_allclose(d_pr, want_pr, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(d_rp, want_rp, rtol=1e-12, atol=1e-12)


def test_crop_does_not_change_results():
    small_pred, small_ref = box((16, 16, 16), 3, 11), ball((16, 16, 16), SPACING_3D, 5.0)
    big_pred, big_ref = np.zeros((60, 50, 40), bool), np.zeros((60, 50, 40), bool)
    big_pred[20:36, 10:26, 5:21], big_ref[20:36, 10:26, 5:21] = small_pred, small_ref
    for f in (hd95, assd):
        assert f(big_pred, big_ref, SPACING_3D) == f(small_pred, small_ref, SPACING_3D)
    assert normalized_surface_dice(big_pred, big_ref, SPACING_3D, 1.5) == normalized_surface_dice(
        small_pred, small_ref, SPACING_3D, 1.5
    )


def test_bad_arguments():
    mask = np.ones((4, 4, 4), bool)
    with pytest.raises(ValueError, match="shape"):
        hd95(mask, mask[:3], SPACING_3D)
    with pytest.raises(ValueError, match="spacing has 2 values"):
        hd95(mask, mask, (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        assd(mask, mask, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="tolerance"):
        normalized_surface_dice(mask, mask, 1.0, -1.0)
    assert hd95(mask, mask, 0.5) == 0.0  # one number is isotropic spacing


# --- agreement with MONAI -----------------------------------------------------------------------------------------


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(mask)[None, None].float()
    return torch.cat([1 - t, t], dim=1)


@pytest.mark.filterwarnings("ignore:.*deprecated")  # MONAI's own deprecation notices
@pytest.mark.parametrize(
    ("shape", "spacing", "seed"),
    [
        ((40, 44, 20), SPACING_3D, 0),
        ((40, 44, 20), SPACING_3D, 1),
        ((72, 64), SPACING_2D, 2),
        ((72, 64), (1.0, 1.0), 3),
    ],
    ids=["3d-a", "3d-b", "2d-a", "2d-iso"],
)
def test_agrees_with_monai(shape, spacing, seed):
    """Same boundary voxels and exact Euclidean distances: equal up to MONAI's float32 (rel 1e-5)."""
    from monai.metrics import (
        compute_average_surface_distance,
        compute_dice,
        compute_hausdorff_distance,
        compute_iou,
        compute_surface_dice,
    )

    pred, ref = blob_pair(shape, seed)
    p, r = _one_hot(pred), _one_hot(ref)
    tol = 1.7
    ours = evaluate_case(pred.astype(np.uint8), ref.astype(np.uint8), {"fg": 1}, spacing, tolerance_mm=tol)["fg"]
    assert 0.3 < ours["dice"] < 0.95 and ours["hd95"] > 1.0  # a fair test: overlapping but different shapes
    assert ours["dice"] == pytest.approx(compute_dice(p, r, include_background=False).item(), rel=1e-6)
    assert ours["iou"] == pytest.approx(compute_iou(p, r, include_background=False).item(), rel=1e-6)
    monai_hd = compute_hausdorff_distance(p, r, percentile=95, spacing=spacing).item()
    assert ours["hd95"] == pytest.approx(monai_hd, rel=1e-5)
    monai_assd = compute_average_surface_distance(p, r, symmetric=True, spacing=spacing).item()
    assert ours["assd"] == pytest.approx(monai_assd, rel=1e-5)
    monai_nsd = compute_surface_dice(p, r, class_thresholds=[tol], spacing=spacing).item()
    assert ours["nsd"] == pytest.approx(monai_nsd, rel=1e-6)


# --- evaluate_files -----------------------------------------------------------------------------------------------

LABELS = {"background": 0, "liver": 1, "tumour": 2}


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def _oblique_affine(spacing: tuple[float, float, float]) -> np.ndarray:
    angle = math.radians(20)
    rot = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing) @ np.diag([-1, -1, 1])
    affine[:3, 3] = [12.0, -40.0, 7.5]
    return affine


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def nifti_pairs(tmp_path):
    """Two cases: case_a predicted well; case_b with the tumour missed. Predictions named <case>_seg.nii.gz."""
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    affine = _oblique_affine(SPACING_3D)
    ref = np.zeros((20, 18, 10), np.uint8)
    ref[3:15, 4:14, 2:8] = 1
    ref[6:9, 6:9, 3:5] = 2
    pred_a = np.roll(ref, 1, axis=0)
    pred_b = ref.copy()
    pred_b[pred_b == 2] = 1
    for case, pred in (("case_a", pred_a), ("case_b", pred_b)):
        _save(gt_dir / f"{case}.nii.gz", ref, affine)
        _save(pred_dir / f"{case}_seg.nii.gz", pred, affine)
    _save(gt_dir / "case_c.nii.gz", ref, affine)  # ground truth without a prediction: left out
    return pred_dir, gt_dir, ref, {"case_a": pred_a, "case_b": pred_b}


def test_evaluate_files_writes_tables(nifti_pairs, tmp_path):
    pred_dir, gt_dir, ref, preds = nifti_pairs
    pairs = pair_files(pred_dir, gt_dir)
    assert [(p.name, g.name) for p, g in pairs] == [
        ("case_a_seg.nii.gz", "case_a.nii.gz"),
        ("case_b_seg.nii.gz", "case_b.nii.gz"),
    ]
    out = tmp_path / "out"
    rows, summary = evaluate_files(pairs, LABELS, 2.0, out)
    assert sorted(p.name for p in out.iterdir()) == ["metrics_per_case.csv", "metrics_summary.csv"]  # no temp files

    per_case = _read_csv(out / "metrics_per_case.csv")
    assert list(per_case[0]) == [
        "case",
        "label",
        "dice",
        "iou",
        "hd95_mm",
        "assd_mm",
        "nsd",
        "pred_voxels",
        "ref_voxels",
    ]
    assert [(r["case"], r["label"]) for r in per_case] == [
        ("case_a", "liver"),
        ("case_a", "tumour"),
        ("case_b", "liver"),
        ("case_b", "tumour"),
    ]
    for written, row in zip(per_case, rows, strict=True):
        want = evaluate_case(preds[row["case"]], ref, LABELS, SPACING_3D, 2.0)[row["label"]]  # spacing from the affine
        assert row["hd95_mm"] == pytest.approx(want["hd95"], nan_ok=True)
        assert row["dice"] == want["dice"] and row["pred_voxels"] == want["pred_voxels"]
        for column in ("dice", "iou", "hd95_mm", "assd_mm", "nsd"):
            assert float(written[column]) == pytest.approx(row[column], abs=1e-6, nan_ok=True)
        assert int(written["ref_voxels"]) == row["ref_voxels"]
    assert per_case[3]["hd95_mm"] == "nan" and per_case[3]["dice"] == "0.000000"
    assert per_case[1]["hd95_mm"] == f"{SPACING_3D[0]:.6f}"  # the tumour moved one voxel along the first axis

    table = {(s["label"], s["metric"]): s for s in _read_csv(out / "metrics_summary.csv")}
    assert list(next(iter(table.values()))) == ["label", "metric", "mean", "median", "std", "n", "n_undefined"]
    assert len(table) == 2 * 5
    tumour_hd = table[("tumour", "hd95_mm")]
    assert (tumour_hd["n"], tumour_hd["n_undefined"], tumour_hd["std"]) == ("1", "1", "nan")
    assert float(tumour_hd["mean"]) == pytest.approx(SPACING_3D[0])
    liver_dice = table[("liver", "dice")]
    values = [r["dice"] for r in rows if r["label"] == "liver"]
    assert (liver_dice["n"], liver_dice["n_undefined"]) == ("2", "0")
    assert float(liver_dice["mean"]) == pytest.approx(np.mean(values), abs=1e-6)
    assert float(liver_dice["std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-6)
    assert {s["metric"] for s in summary} == {"dice", "iou", "hd95_mm", "assd_mm", "nsd"}


def test_evaluate_files_rejects_other_grids(nifti_pairs, tmp_path):
    pred_dir, gt_dir, ref, _ = nifti_pairs
    moved = _oblique_affine(SPACING_3D)
    moved[0, 3] += 0.01
    bad = _save(tmp_path / "case_a_seg.nii.gz", ref, moved)
    with pytest.raises(UserError, match="affine differs") as info:
        evaluate_files([(bad, gt_dir / "case_a.nii.gz")], LABELS, 2.0, tmp_path / "out")
    assert info.value.path == str(bad)
    assert not (tmp_path / "out").exists()  # nothing written

    cropped = _save(tmp_path / "case_b_seg.nii.gz", ref[:, :, :9], _oblique_affine(SPACING_3D))
    with pytest.raises(UserError, match="shape") as info:
        evaluate_files([(cropped, gt_dir / "case_b.nii.gz")], LABELS, 2.0, tmp_path / "out")
    assert info.value.path == str(cropped)

    fuzzy = _save(tmp_path / "fuzzy.nii.gz", ref.astype(np.float32) * 0.5, _oblique_affine(SPACING_3D))
    with pytest.raises(UserError, match="non-integer"):
        evaluate_files([(fuzzy, gt_dir / "case_b.nii.gz")], LABELS, 2.0, tmp_path / "out")


def test_evaluate_files_2d_slice_stored_as_3d(tmp_path):
    ref = np.zeros((30, 26, 1), np.uint8)
    ref[5:20, 6:18] = 1
    pred = np.roll(ref, 2, axis=1)
    affine = np.diag([0.6, 0.9, 3.0, 1.0])
    pairs = [(_save(tmp_path / "s_seg.nii", pred, affine), _save(tmp_path / "s.nii", ref, affine))]
    rows, _ = evaluate_files(pairs, {"fg": 1}, 1.0, tmp_path)
    want = evaluate_case(pred[..., 0], ref[..., 0], {"fg": 1}, (0.6, 0.9), 1.0)["fg"]
    assert rows[0]["hd95_mm"] == pytest.approx(want["hd95"], rel=1e-6) == 1.8  # in 2D: a whole edge moved by 2 x 0.9 mm
    assert rows[0]["assd_mm"] == pytest.approx(want["assd"], rel=1e-6)


def test_pair_files(nifti_pairs, tmp_path):
    pred_dir, gt_dir, _, _ = nifti_pairs
    one = pair_files(pred_dir / "case_b_seg.nii.gz", gt_dir)
    assert [(p.name, g.name) for p, g in one] == [("case_b_seg.nii.gz", "case_b.nii.gz")]
    one = pair_files(pred_dir, gt_dir / "case_a.nii.gz")
    assert [(p.name, g.name) for p, g in one] == [("case_a_seg.nii.gz", "case_a.nii.gz")]
    files = pair_files(pred_dir / "case_a_seg.nii.gz", gt_dir / "case_b.nii.gz")  # two files: paired as given
    assert [(p.name, g.name) for p, g in files] == [("case_a_seg.nii.gz", "case_b.nii.gz")]

    (pred_dir / "case_z_seg.nii.gz").write_bytes(b"")
    with pytest.raises(UserError, match="no ground truth .* case_z") as info:
        pair_files(pred_dir, gt_dir)
    assert info.value.path == str(pred_dir / "case_z_seg.nii.gz")
    (pred_dir / "case_a.nii").write_bytes(b"")
    with pytest.raises(UserError, match="two files .* 'case_a'"):
        pair_files(pred_dir, gt_dir)
    with pytest.raises(UserError, match="not found"):
        pair_files(tmp_path / "nowhere", gt_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no NIfTI"):
        pair_files(tmp_path / "empty", gt_dir)


# --- per-lesion detection -------------------------------------------------------------------------------------------


def _place_ball(label_map: np.ndarray, spacing: tuple[float, ...], centre: tuple[int, ...], radius_mm: float, value):
    grids = np.meshgrid(
        *[(np.arange(n) - c) * s for n, c, s in zip(label_map.shape, centre, spacing, strict=True)], indexing="ij"
    )
    label_map[sum(g * g for g in grids) <= radius_mm**2] = value


def test_lesion_detection_counts_hits_by_size_and_false_positives():
    spacing = (1.0, 1.0, 2.0)
    truth = np.zeros((80, 80, 40), np.uint8)
    truth[5:75, 5:75, 3:37] = 1  # the organ around the lesions
    _place_ball(truth, spacing, (20, 20, 10), 3.0, 2)  # ~6 mm: found by one voxel
    _place_ball(truth, spacing, (60, 20, 10), 3.0, 2)  # ~6 mm: missed
    _place_ball(truth, spacing, (40, 55, 25), 9.0, 2)  # ~18 mm: found
    pred = (truth > 0).astype(np.uint8)  # the organ, no lesion ...
    pred[20, 20, 10] = 2  # ... except one voxel of the first small lesion
    pred[35:45, 50:60, 22:28] = np.where(truth[35:45, 50:60, 22:28] == 2, 2, 1)
    pred[70, 70, 5] = 2  # a false positive away from every lesion

    out = metrics.lesion_detection(pred, truth, 2, spacing, sizes_mm=(10,))
    assert (out["present"], out["found"], out["false_positives"]) == (3, 2, 1)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["by_size"] == {
        "<10 mm": {"present": 2, "found": 1, "recall": 0.5},
        ">=10 mm": {"present": 1, "found": 1, "recall": 1.0},
    }
    diameters = sorted(lesion["diameter_mm"] for lesion in out["lesions"])
    assert diameters[0] == pytest.approx(6.0, rel=0.15) and diameters[2] == pytest.approx(18.0, rel=0.1)
    # The spacing matters: the same voxels at half the voxel size are half as wide, all three under 10 mm.
    small = metrics.lesion_detection(pred, truth, 2, (0.5, 0.5, 1.0), sizes_mm=(10, 20))
    assert [b["present"] for b in small["by_size"].values()] == [3, 0, 0]
    assert list(small["by_size"]) == ["<10 mm", "10-20 mm", ">=20 mm"]
    assert math.isnan(small["by_size"]["10-20 mm"]["recall"])


def test_lesion_detection_empty_cases_and_connectivity():
    truth = np.zeros((12, 12), np.uint8)
    out = metrics.lesion_detection(truth, truth, 2, 1.0, sizes_mm=())
    assert (out["present"], out["found"], out["false_positives"]) == (0, 0, 0)
    assert math.isnan(out["recall"]) and list(out["by_size"]) == ["all"]
    truth[2, 2] = truth[3, 3] = 2  # diagonal neighbours: one lesion by default, two with face connectivity
    pred = np.zeros_like(truth)
    pred[2, 2] = 2
    assert metrics.lesion_detection(pred, truth, 2, 1.0)["present"] == 1
    faces = metrics.lesion_detection(pred, truth, 2, 1.0, connectivity=1)
    assert (faces["present"], faces["found"]) == (2, 1)
    # The disc of the same area: one pixel of 1 mm^2 -> sqrt(4 / pi) mm.
    assert faces["lesions"][0]["diameter_mm"] == pytest.approx(math.sqrt(4 / math.pi))
    with pytest.raises(ValueError, match="sizes_mm"):
        metrics.lesion_detection(pred, truth, 2, 1.0, sizes_mm=(20, 10))
    with pytest.raises(ValueError, match="shape"):
        metrics.lesion_detection(pred[:5], truth, 2, 1.0)
