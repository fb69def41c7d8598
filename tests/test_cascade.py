"""The two-stage cascade: the fine stage's recipe, the region box, the crops it trains on, and the merge."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from volseg.cascade import (
    box_affine,
    fine_recipe,
    merge,
    refine,
    region_box,
    region_mask,
    roi_values,
    write_fine_dataset,
)
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
        load_recipe("configs/cells_2d.yaml", ['cascade={"spacing": [1.0, 1.0], "patch_size": [64, 64]}'])


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


def test_region_mask_drops_islands_smaller_than_half_of_their_labels_largest():
    labels = np.zeros((60, 40, 30), np.uint8)
    labels[5:25, 5:25, 5:25] = 1  # the liver: 8000 voxels
    labels[10:14, 10:14, 10:14] = 2  # a lesion inside it: the same object
    labels[20:25, 20:30, 5:25] = 2  # a lesion at its edge, reaching outside: still the same object
    labels[40:55, 5:20, 5:20] = 1  # muscle taken for liver: 3375 voxels, under half of the liver
    labels[40:50, 25:35, 20:28] = 3  # another region label (spleen): its own largest, kept
    labels[58, 38, 28] = 3  # a speck of it: dropped
    mask = region_mask(labels, [1, 2, 3])
    assert mask[5:25, 5:25, 5:25].all() and mask[20:25, 25:30, 5:25].all()
    assert not mask[40:55, 5:20, 5:20].any()
    assert mask[40:50, 25:35, 20:28].all() and not mask[58, 38, 28]
    # A second liver-sized island (a second kidney, say) is kept.
    labels[40:55, 5:20, 5:20] = 0
    labels[35:55, 5:25, 5:25] = 1
    assert region_mask(labels, [1, 2, 3])[35:55, 5:25, 5:25].all()
    assert not region_mask(np.zeros((3, 3, 3), np.uint8), [1]).any()


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


@pytest.fixture(scope="module")
def cascade_run(tiny_data, tmp_path_factory):
    """A tiny two-stage bundle trained through the command line (2 epochs per stage)."""
    import yaml
    from helpers import TINY_RECIPE

    from volseg.cli import main

    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["name"] = "tiny_cascade"
    raw["train"]["max_epochs"] = 2
    raw["cascade"] = {"spacing": [4.0, 4.0, 4.0], "patch_size": [16, 16, 16], "roi_labels": ["liver"],
                      "margin_mm": 10.0, "max_epochs": 2}  # fmt: skip
    folder = tmp_path_factory.mktemp("cascade")
    recipe_path = folder / "tiny_cascade.yaml"
    recipe_path.write_text(yaml.safe_dump(raw))
    run = folder / "run"
    rc = main(["train", "--config", str(recipe_path), "--data", str(tiny_data), "--out", str(run),
               "--skip-data-check"])  # fmt: skip
    assert rc in (0, None)
    return run


@pytest.mark.slow
def test_a_cascade_trains_into_one_bundle_and_infer_runs_both_stages(cascade_run, tmp_path, monkeypatch):
    from helpers import save_nifti

    from volseg.cascade import FINE_DIR, CascadeEngine
    from volseg.data.synth import liver_ct_phantom
    from volseg.infer import Predictor
    from volseg.trust import check_bundle

    run = cascade_run
    assert (run / "models" / "model.pt").is_file() and (run / FINE_DIR / "models" / "model.pt").is_file()
    check_bundle(run)  # the fine stage's scripts are volseg's own, so the whole bundle passes
    check_bundle(run / FINE_DIR)
    fine_recipe_file = yaml_load(run / FINE_DIR / "configs" / "volseg_recipe.yaml")
    assert fine_recipe_file["data"]["spacing"] == [4.0, 4.0, 4.0] and fine_recipe_file["train"]["max_epochs"] == 2
    # Same split for both stages: the fine stage validated on crops of the coarse stage's validation cases.
    coarse_train = json.loads((run / "configs" / "train.json").read_text())
    fine_train = json.loads((run / FINE_DIR / "configs" / "train.json").read_text())
    assert len(coarse_train["val_cases"]) == len(fine_train["val_cases"]) >= 1

    predictor = Predictor.from_bundle(run, "cpu", precision="fp32")
    assert isinstance(predictor.engine, CascadeEngine)
    ph = liver_ct_phantom(21, shape=(48, 40, 24), axcodes="LPS")
    src = save_nifti(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    seen = []
    fine_segment = predictor.engine.fine.segment
    coarse_segment = predictor.engine.coarse.segment

    def spy(image, probabilities=False):
        seen.append((image.array.shape, image.affine))
        return fine_segment(image, probabilities)

    monkeypatch.setattr(predictor.engine.fine, "segment", spy)
    pred = predictor.predict(src)
    assert pred.labels.shape == ph.image.shape
    np.testing.assert_allclose(pred.affine, ph.affine, atol=1e-5)
    # The answer is the merge of the coarse labels and the fine stage's labels on the box, as documented.
    from volseg.imageio import read_image

    image = read_image(src)
    coarse = coarse_segment(image).labels
    box = region_box(region_mask(coarse, [1]), image.affine, 10.0, keep_fraction=0.0)
    if box is None:
        assert not seen and np.array_equal(pred.labels, coarse)
    else:
        assert len(seen) == 1 and seen[0][0] == tuple(s.stop - s.start for s in box)
        np.testing.assert_allclose(seen[0][1], box_affine(image.affine, box))
        crop = read_image(src)
        crop.array, crop.affine = np.ascontiguousarray(image.array[box]), box_affine(image.affine, box)
        fine = fine_segment(crop).labels
        assert np.array_equal(pred.labels, merge(coarse, fine, box, [1]))
    with pytest.raises(UserError, match="labels, not probabilities"):
        predictor.predict(src, probabilities=True)


def test_the_monai_chain_runs_both_stages_of_a_cascade(cascade_run, tmp_path):
    """With --engine monai each stage is its bundle's own chain; the fine one segments the crop it is given, not
    the file the crop came from."""
    from helpers import save_nifti

    from volseg.cascade import CascadeEngine
    from volseg.data.synth import liver_ct_phantom
    from volseg.engines import MonaiEngine
    from volseg.imageio import read_image
    from volseg.infer import Predictor

    predictor = Predictor.from_bundle(cascade_run, "cpu", "monai")
    assert isinstance(predictor.engine, CascadeEngine) and isinstance(predictor.engine.fine, MonaiEngine)
    ph = liver_ct_phantom(21, shape=(48, 40, 24), axcodes="LPS")
    src = save_nifti(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    image = read_image(src)
    box = (slice(6, 38), slice(4, 30), slice(2, 20))
    crop = read_image(src)
    crop.array, crop.affine = np.ascontiguousarray(image.array[box]), box_affine(image.affine, box)
    assert predictor.engine.fine.segment(crop).labels.shape == (32, 26, 18)
    assert predictor.predict(src).labels.shape == ph.image.shape


def yaml_load(path):
    import yaml

    return yaml.safe_load(path.read_text())


@pytest.mark.slow
def test_a_cascade_bundle_whose_fine_stage_is_not_its_own_is_refused(cascade_run, tmp_path):
    import shutil

    import yaml

    from volseg.cascade import FINE_DIR
    from volseg.infer import Predictor
    from volseg.trust import bundle_problem

    run = tmp_path / "run"
    shutil.copytree(cascade_run, run)
    recipe_file = run / FINE_DIR / "configs" / "volseg_recipe.yaml"
    raw = yaml.safe_load(recipe_file.read_text())
    raw["data"]["spacing"] = [2.0, 2.0, 2.0]
    recipe_file.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="not the fine stage of the bundle's recipe"):
        Predictor.from_bundle(run, "cpu")
    shutil.rmtree(run / FINE_DIR)
    with pytest.raises(UserError, match="holds no bundle"):
        Predictor.from_bundle(run, "cpu")
    # Code outside volseg's own scripts in the nested stage is refused by the trust check.
    shutil.copytree(cascade_run / FINE_DIR, run / FINE_DIR)
    (run / FINE_DIR / "extra.py").write_text("import os\n")
    assert "Python code outside scripts/" in (bundle_problem(run) or "")


@pytest.mark.slow
def test_infer_overrides_reach_both_stages_of_a_cascade(cascade_run, tmp_path):
    from helpers import save_nifti

    from volseg.cli import main
    from volseg.data.synth import liver_ct_phantom
    from volseg.infer import Predictor

    # --set changes what inference does, not which fine stage belongs to the bundle: both stages get it.
    predictor = Predictor.from_bundle(cascade_run, "cpu", overrides=["infer.tta_flips=[0,1]", "infer.overlap=0.5"])
    for stage in (predictor.engine.coarse, predictor.engine.fine):
        assert stage.recipe.infer.tta_flips == (0, 1) and stage.recipe.infer.overlap == 0.5
    ph = liver_ct_phantom(22, shape=(48, 40, 24))
    src = save_nifti(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    rc = main(["infer", str(src), "--bundle", str(cascade_run), "--output", str(tmp_path / "out"), "--device", "cpu",
               "--set", "infer.tta_flips=[0]"])  # fmt: skip
    assert rc in (0, None) and list((tmp_path / "out").glob("ct*.nii.gz"))
