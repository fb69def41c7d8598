"""The two-stage cascade: the fine stage's recipe, the region box, the crops it trains on, and the merge."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from volseg.cascade import box_affine, fine_recipe, merge, refine, region_box, roi_values, write_fine_dataset
from volseg.errors import UserError
from volseg.recipe import load_recipe

CASCADE = 'cascade={"spacing": [2.0, 2.0, 3.0], "patch_size": [48, 48, 32], "roi_labels": ["liver"], "margin_mm": 6}'


def _recipe(*extra: str):
    return load_recipe("configs/demo_liver_ct.yaml", [CASCADE, *extra])


def test_fine_recipe_takes_the_cascade_values_and_keeps_the_rest():
    r = _recipe("cascade.max_epochs=7", 'cascade.model_args={"channels": [8, 16, 32, 64]}')
    f = fine_recipe(r)
    assert f.cascade is None
    assert f.name == "demo_liver_ct_fine"
    assert f.data.spacing == (2.0, 2.0, 3.0) and r.data.spacing == (4.0, 4.0, 5.0)
    assert f.train.patch_size == (48, 48, 32)
    assert f.train.sampler == "class_balanced"
    assert f.train.max_epochs == 7 and f.train.iterations_per_epoch == r.train.iterations_per_epoch
    assert f.model.args["channels"] == [8, 16, 32, 64] and f.model.args["strides"] == r.model.args["strides"]
    assert f.data.labels == r.data.labels and f.data.split == r.data.split
    assert f.infer.postprocess == r.infer.postprocess


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ('cascade.roi_labels=["spleen"]', "not a foreground label"),
        ('cascade.roi_labels=["background"]', "not a foreground label"),
        ("cascade.patch_size=[48,48]", "cascade.patch_size has 2 values"),
        ("cascade.patch_size=[48,48,30]", "divisible by 8"),
        ("cascade.train_margin_mm=[30,10]", "low <= high"),
    ],
)
def test_bad_cascade_sections_are_refused(override, message):
    with pytest.raises(UserError, match=message):
        _recipe(override)


def test_cascade_needs_3d():
    with pytest.raises(UserError, match="cascade needs a 3D model"):
        load_recipe(
            "configs/cells_2d.yaml", ['cascade={"spacing": [1.0, 1.0], "patch_size": [64, 64]}']
        )


def test_region_box_ignores_specks_and_adds_the_margin_in_mm():
    mask = np.zeros((40, 30, 20), bool)
    mask[10:20, 5:15, 4:8] = True  # 400 voxels
    mask[35, 28, 18] = True  # a speck: under a tenth of the largest object
    affine = np.diag([2.0, 1.0, 4.0, 1.0])
    box = region_box(mask, affine, 4.0)
    # 4 mm = 2 voxels at 2 mm, 4 at 1 mm, 1 at 4 mm.
    assert box == (slice(8, 22), slice(1, 19), slice(3, 9))
    with_speck = region_box(mask, affine, 4.0, keep_fraction=0.0)
    assert with_speck == (slice(8, 38), slice(1, 30), slice(3, 20))
    assert region_box(np.zeros((4, 4, 4), bool), affine, 4.0) is None
    # Per-side margins (low, high) per axis; clipped to the image.
    sides = region_box(mask, affine, np.array([[30.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    assert sides == (slice(0, 20), slice(5, 16), slice(4, 8))


def test_box_affine_keeps_world_positions():
    affine = np.array([[0, -1.5, 0, 10], [2.0, 0, 0, -5], [0, 0, 3.0, 7], [0, 0, 0, 1]])
    box = (slice(3, 9), slice(2, 5), slice(1, 4))
    crop = box_affine(affine, box)
    ijk = np.array([1, 2, 0, 1.0])
    full_ijk = ijk + np.array([3, 2, 1, 0])
    assert np.allclose(crop @ ijk, affine @ full_ijk)
    assert np.allclose(crop[:3, :3], affine[:3, :3])


def test_merge_and_refine_replace_the_region_inside_the_box_only():
    coarse = np.zeros((20, 20, 10), np.uint8)
    coarse[5:12, 5:12, 2:6] = 1  # the region (liver)
    coarse[18:20, 18:20, 7:9] = 3  # another organ, kept outside the box
    coarse[0, 0, 0] = 1  # a speck of region far away: dropped, not widening the box
    image = np.random.default_rng(0).normal(size=coarse.shape).astype(np.float32)
    r = _recipe()
    r.data.labels["spleen"] = r.data.labels["tumour"].model_copy(update={"value": 3})
    calls = []

    def fine(arr, aff):
        calls.append((arr.shape, aff))
        out = np.ones(arr.shape, np.uint8)
        out[2, 2, 1] = 2
        return out

    labels, note = refine(r, coarse, image, np.eye(4), fine)
    assert note is None and len(calls) == 1
    # margin 6 mm at 1 mm voxels: 6 voxels each side (5-6 clipped to 0, 12+6 = 18).
    assert calls[0][0] == (18, 18, 10)
    assert np.allclose(calls[0][1][:3, 3], [0, 0, 0])
    assert labels[0, 0, 0] == 1  # inside the box: the fine stage's answer
    assert labels[2, 2, 1] == 2
    assert (labels[18:20, 18:20, 7:9] == 3).all()  # the other organ, outside the box, from the coarse stage
    assert labels[19, 19, 9] == 0 and labels[19, 0, 0] == 0
    empty, note = refine(r, np.zeros_like(coarse), image, np.eye(4), fine)
    assert note and "found none" in note and not empty.any() and len(calls) == 1
    assert merge(coarse, np.zeros((2, 2, 2), np.uint8), (slice(0, 2),) * 3, [1])[5, 5, 2] == 0


def test_fine_crops_follow_the_reference_region_and_keep_geometry(tmp_path):
    r = _recipe("cascade.train_margin_mm=[4,8]")
    cases = []
    for i in range(3):
        img = np.random.default_rng(i).normal(50, 10, size=(40, 36, 20)).astype(np.float32)
        lab = np.zeros(img.shape, np.uint8)
        lab[10 + i : 20 + i, 8:18, 5:12] = 1
        lab[12 + i, 10, 7] = 2
        affine = np.array([[-1.5, 0, 0, 30], [0, 1.5, 0, -20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
        ip, lp = tmp_path / f"img{i}.nii.gz", tmp_path / f"lab{i}.nii.gz"
        nib.save(nib.Nifti1Image(img, affine), ip)
        nib.save(nib.Nifti1Image(lab, affine), lp)
        cases.append({"image": str(ip), "label": str(lp)})
    out, names = write_fine_dataset(r, cases, tmp_path / "fine", seed=0)
    meta = json.loads((out / "dataset.json").read_text())
    assert [t["image"] for t in meta["training"]] == [f"./imagesTr/case_{i:04d}.nii.gz" for i in range(3)]
    assert names == ["img0.nii.gz", "img1.nii.gz", "img2.nii.gz"]
    for i, case in enumerate(cases):
        crop_img = nib.load(out / "imagesTr" / f"case_{i:04d}.nii.gz")
        crop_lab = np.asarray(nib.load(out / "labelsTr" / f"case_{i:04d}.nii.gz").dataobj)
        full_lab = np.asarray(nib.load(case["label"]).dataobj)
        assert crop_lab.sum() == full_lab.sum()  # the whole region is inside, with margin
        assert crop_lab.shape < full_lab.shape
        # The crop's voxel (0,0,0) is where the full image has the same value.
        full = nib.load(case["image"])
        offset = np.round(np.linalg.solve(full.affine, crop_img.affine @ [0, 0, 0, 1])[:3]).astype(int)
        assert (offset >= 0).all()
        sl = tuple(slice(o, o + n) for o, n in zip(offset, crop_lab.shape, strict=True))
        assert np.array_equal(np.asarray(full.dataobj)[sl], np.asarray(crop_img.dataobj))
        # margins of 4-8 mm: 3-6 voxels at 1.5 mm in-plane
        assert 3 <= (np.argwhere(full_lab)[:, 0].min() - offset[0]) <= 6
    assert roi_values(r) == [1]
