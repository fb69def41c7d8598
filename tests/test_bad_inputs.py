"""Inputs that used to pass in silence (NaN and Inf voxels, a voxel size of 0 or below), and evaluation without
--labels."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from helpers import TINY_RECIPE, monai_chain, random_net, save_nifti
from helpers import organ_recipe as _recipe

from volseg.data.validate import check_image_file, replace_non_finite
from volseg.errors import UserError
from volseg.fastpath import FastEngine

# ---------------------------------------------------------------------------------------------------------------
# NaN and Inf voxels


def test_replace_non_finite_counts_and_fills() -> None:
    x = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4) - 5.0  # finite values -5 .. 18
    x[0, 0, 0, :2] = float("nan")  # -5 and -4 gone: the smallest finite value is -3
    x[0, 1, 2, 3] = float("inf")  # 18 gone: the largest is 17
    x[0, 1, 0, 0] = -float("inf")
    original = x.clone()
    out, note = replace_non_finite(x, "scan.nii.gz")
    assert note == (
        "2 NaN and 1 -Inf and 1 +Inf voxels (of 24) replaced: NaN and -Inf by the smallest finite value (-3); "
        "+Inf by the largest (17)"
    )
    assert int(torch.isnan(x).sum()) == 2 and int(torch.isinf(x).sum()) == 2  # the input is left as it was
    assert torch.isfinite(out).all()
    assert out[0, 0, 0, :2].tolist() == [-3.0, -3.0] and out[0, 1, 0, 0] == -3.0 and out[0, 1, 2, 3] == 17.0
    keep = torch.isfinite(original)
    assert torch.equal(out[keep], original[keep])


def test_replace_non_finite_leaves_finite_images_alone() -> None:
    x = torch.rand(2, 5, 6, 7)
    out, note = replace_non_finite(x)
    assert out is x and note is None
    ints = torch.zeros(1, 3, 3, 3, dtype=torch.int16)
    assert replace_non_finite(ints) == (ints, None)
    huge = torch.full((1, 40, 40, 40), 3e38)  # the sum overflows to inf, the voxels are finite
    out, note = replace_non_finite(huge)
    assert out is huge and note is None


def test_replace_non_finite_per_channel_and_refuses_an_empty_channel() -> None:
    x = torch.zeros(2, 4, 4, 4)
    x[0] = 10.0
    x[0, 0, 0, 0] = float("nan")
    x[1] = torch.linspace(-2.0, 5.0, 64).reshape(4, 4, 4)
    x[1, 3, 3, 3] = float("nan")
    out, note = replace_non_finite(x)
    assert out[0, 0, 0, 0] == 10.0 and out[1, 3, 3, 3] == -2.0
    assert note is not None and "2 NaN voxels (of 128)" in note and "channel 0: 10, channel 1: -2" in note
    x[1] = float("nan")
    with pytest.raises(UserError, match="scan.nii: no finite voxel: channel 1 has only NaN or Inf values"):
        replace_non_finite(x, "scan.nii")


def _nan_head(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, Path]:
    """A CT-like head whose outer slab is NaN (outside a registration's field of view) with a NaN hole inside,
    saved as NIfTI."""
    rng = np.random.default_rng(0)
    img = np.full((30, 28, 12), -1000.0, np.float32)
    img[4:26, 5:24, 2:10] = rng.normal(60.0, 40.0, size=(22, 19, 8))
    img[:, 20:, :] = np.nan  # 30 x 8 x 12 = 2880 voxels
    img[12:16, 8:12, 5] = np.nan  # 16 more, inside the head
    img[3, 3, 3] = np.inf
    affine = np.diag([-1.2, -1.1, 2.5, 1.0])
    src = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), src)
    return img, affine, src


def test_both_engines_replace_nan_voxels_alike_and_say_so(tmp_path: Path) -> None:
    from volseg.monai_compat import preprocess

    recipe = _recipe({"intensity": {"a_min": -175, "a_max": 250}})
    net = random_net(recipe)
    img, affine, src = _nan_head(tmp_path)
    engine = FastEngine(recipe, net, torch.device("cpu"), "fp32")
    ours, _ = engine.segment_array(img, affine)
    assert np.isnan(img).sum() == 2896  # the caller's array is left as it was
    top = float(img[np.isfinite(img)].max())
    assert engine.notes == [
        f"2896 NaN and 1 +Inf voxels (of 10080) replaced: NaN by the smallest finite value (-1000); +Inf by the "
        f"largest ({top:g})"
    ]
    # The same labels as for the image with the replacement made by hand: nothing else changed.
    filled = np.where(np.isnan(img), -1000.0, np.where(np.isinf(img), top, img))
    by_hand, _ = FastEngine(recipe, net, torch.device("cpu"), "fp32").segment_array(filled.astype(np.float32), affine)
    np.testing.assert_array_equal(ours, by_hand)
    head = np.isfinite(img) & (img > -1000)
    assert 0.05 < (ours[head] == 1).mean() < 0.95  # a segmentation, not all background
    # The MONAI chain with the same replacement (volseg.monai_compat.preprocess) gives the same labels.
    pre, inferer, post = monai_chain(recipe)
    data, note = preprocess(pre, {"image": str(src)}, src)
    assert note == engine.notes[0]
    with torch.inference_mode():
        data["pred"] = inferer(data["image"][None], net)[0]
    ref = np.asarray(post(data)["pred"][0]).astype(np.uint8)
    assert (ours == ref)[head].mean() > 0.999 and (ref[head] == 1).mean() > 0.05
    # Without it, the NaN inside the head spreads through resampling and every window it touches: all background.
    data = pre({"image": str(src)})
    with torch.inference_mode():
        data["pred"] = inferer(data["image"][None], net)[0]
    assert not np.asarray(post(data)["pred"]).any()


def test_an_image_without_a_finite_voxel_is_refused(tmp_path: Path) -> None:
    recipe = _recipe()
    engine = FastEngine(recipe, random_net(recipe), torch.device("cpu"), "fp32")
    with pytest.raises(UserError, match="no finite voxel"):
        engine.segment_array(np.full((20, 20, 10), np.nan, np.float32), np.eye(4))


def test_check_data_reports_nan_and_inf_images(tmp_path: Path) -> None:
    from volseg.data.checks import check_data
    from volseg.data.synth import liver_ct_phantom
    from volseg.recipe import recipe_from_dict

    for k in range(2):
        ph = liver_ct_phantom(40 + k, shape=(24, 24, 12))
        image = ph.image.astype(np.float32)
        if k == 1:
            image[:3, :2, :1] = np.nan
            image[5, 5, 5] = -np.inf
        save_nifti(tmp_path / "images" / f"c{k}.nii.gz", image, ph.affine)
        save_nifti(tmp_path / "labels" / f"c{k}.nii.gz", ph.label, ph.affine)
    report = check_data(recipe_from_dict(TINY_RECIPE), tmp_path)
    errors = [(Path(f.path).name, f.problem) for f in report.errors]
    assert errors == [("c1.nii.gz", "6 NaN and 1 Inf voxels (of 6912): training would produce NaN losses")]


# ---------------------------------------------------------------------------------------------------------------
# Voxel sizes


def _nifti_with(path: Path, pixdim: tuple[float, float, float], qform_code: int, sform_code: int, srow=None) -> Path:
    """A small NIfTI whose header fields are patched after nibabel wrote it (nibabel would fix them on save)."""
    img = nib.Nifti1Image(np.ones((4, 5, 6), np.float32), np.diag([1.5, 1.5, 2.0, 1.0]))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, path)
    raw = bytearray(path.read_bytes())
    struct.pack_into("<3f", raw, 80, *pixdim)  # pixdim[1..3]
    struct.pack_into("<2h", raw, 252, qform_code, sform_code)
    if srow is not None:
        struct.pack_into("<12f", raw, 280, *np.asarray(srow, dtype=np.float32).ravel())
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize(
    ("pixdim", "qform", "sform", "words"),
    [
        ((0.0, 0.0, 0.0), 0, 0, "voxel size pixdim[1] = 0 and no sform: the spacing is unknown"),
        ((1.0, 1.0, 0.0), 1, 0, "voxel size pixdim[3] = 0 and no sform"),
        ((-1.5, 1.5, 2.0), 0, 0, "voxel size pixdim[1] = -1.5 is negative and there is no sform"),
        ((1.5, -1.5, 2.0), 1, 0, "pixdim[2] = -1.5 is negative"),
        ((float("nan"), 1.0, 1.0), 0, 1, "pixdim nan 1 1 is not finite"),
        ((1e-9, 1.0, 1.0), 0, 0, "singular affine from the pixdim"),
    ],
)
def test_voxel_sizes_the_geometry_cannot_come_from(tmp_path: Path, pixdim, qform, sform, words) -> None:
    path = _nifti_with(tmp_path / "x.nii", pixdim, qform, sform)
    with pytest.raises(UserError, match=r"x\.nii: .*" + words.replace("[", r"\[").replace("]", r"\]")):
        check_image_file(path)


def test_pixdim_does_not_matter_when_an_sform_gives_the_geometry(tmp_path: Path) -> None:
    for pixdim in [(0.0, 0.0, 0.0), (-1.5, 1.5, 2.0)]:
        path = _nifti_with(tmp_path / "x.nii", pixdim, 1, 1)
        check_image_file(path)  # the sform (1.5, 1.5, 2 mm) is what every reader uses
        np.testing.assert_allclose(nib.load(path).affine, np.diag([1.5, 1.5, 2.0, 1.0]))
    singular = [[1.5, 0, 0, 0], [3.0, 0, 0, 0], [0, 0, 2.0, 0]]  # two voxel axes along one world axis
    with pytest.raises(UserError, match="singular affine from the sform"):
        check_image_file(_nifti_with(tmp_path / "s.nii", (1.5, 1.5, 2.0), 0, 1, singular))


def test_check_data_names_the_file_with_a_zero_voxel_size(tmp_path: Path, capsys) -> None:
    from volseg.cli import main
    from volseg.data.synth import liver_ct_phantom

    ph = liver_ct_phantom(7, shape=(24, 24, 12))
    image = save_nifti(tmp_path / "images" / "c0.nii", ph.image.astype(np.float32), ph.affine)
    save_nifti(tmp_path / "labels" / "c0.nii", ph.label, ph.affine)
    raw = bytearray(image.read_bytes())
    struct.pack_into("<3f", raw, 80, 0.0, 0.0, 0.0)
    struct.pack_into("<2h", raw, 252, 0, 0)
    image.write_bytes(bytes(raw))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    assert main(["check-data", "--config", str(recipe), "--data", str(tmp_path)]) == 2
    table = capsys.readouterr().out
    assert "c0.nii" in table and "voxel size pixdim[1] = 0 and no sform" in table


# ---------------------------------------------------------------------------------------------------------------
# volseg evaluate without --labels


def _pair(tmp_path: Path, pred: np.ndarray, ref: np.ndarray, case: str = "c1") -> None:
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    save_nifti(tmp_path / "pred" / f"{case}_seg.nii.gz", pred, aff)
    save_nifti(tmp_path / "gt" / f"{case}.nii.gz", ref, aff)


def _summary(out: Path) -> dict[tuple[str, str], float]:
    with open(out / "metrics_summary.csv", newline="") as f:
        return {(r["label"], r["metric"]): float(r["mean"]) for r in csv.DictReader(f)}


def test_evaluate_without_labels_scores_every_value_found(tmp_path: Path, capsys) -> None:
    from volseg.cli import main
    from volseg.evaluate import found_labels, pair_files

    ref = np.zeros((20, 20, 10), np.uint8)
    ref[2:8, 2:8, 2:6] = 1
    ref[10:16, 10:16, 2:6] = 2
    pred = ref.copy()
    pred[10:16, 10:16, 2:6] = 0  # label 2 missed
    pred[2:4, 12:14, 7:9] = 3  # a value only the prediction has
    _pair(tmp_path, pred, ref)
    _pair(tmp_path, ref, ref, "c2")
    assert found_labels(pair_files(tmp_path / "pred", tmp_path / "gt")) == {"label_1": 1, "label_2": 2, "label_3": 3}
    assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "-o", str(tmp_path / "ev")]) == 0
    assert "labels found in the files: label_1, label_2, label_3" in capsys.readouterr().out
    dice = _summary(tmp_path / "ev")
    # c1 misses label 2 and invents label 3 (Dice 0 each); c2 is perfect (label 3 absent from both: Dice 1).
    assert (dice[("label_1", "dice")], dice[("label_2", "dice")], dice[("label_3", "dice")]) == (1.0, 0.5, 0.5)


def test_evaluate_takes_names_from_a_recipe_or_a_bundle(tmp_path: Path) -> None:
    from volseg.cli import main
    from volseg.recipe import dump_recipe, recipe_from_dict

    ref = np.zeros((20, 20, 10), np.uint8)
    ref[2:8, 2:8, 2:6] = 1
    ref[10:16, 10:16, 2:6] = 2
    _pair(tmp_path, ref, ref)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "volseg_recipe.yaml").write_text(dump_recipe(recipe_from_dict(TINY_RECIPE)))
    for option, value in (("--config", recipe), ("--bundle", bundle)):
        out = tmp_path / option.strip("-")
        assert main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), option, str(value), "-o", str(out)]) == 0
        assert {label for label, _ in _summary(out)} == {"liver", "tumour"}
    args = ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--config", str(recipe), "--bundle", str(bundle)]
    assert main(args) == 2


def test_evaluate_without_labels_refuses_images_and_empty_maps(tmp_path: Path, capsys) -> None:
    from volseg.cli import main

    rng = np.random.default_rng(0)
    ct = rng.integers(-1000, 1000, size=(20, 20, 10)).astype(np.int16)  # an image given as the ground truth
    _pair(tmp_path / "a", np.zeros_like(ct, dtype=np.uint8), ct)
    assert main(["evaluate", str(tmp_path / "a" / "pred"), str(tmp_path / "a" / "gt"), "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "c1.nii.gz: holds more than 255 distinct label values" in err and err.count("\n") == 1
    empty = np.zeros((8, 8, 4), np.uint8)
    _pair(tmp_path / "b", empty, empty)
    assert main(["evaluate", str(tmp_path / "b" / "pred"), str(tmp_path / "b" / "gt"), "-o", str(tmp_path)]) == 2
    assert "no foreground label in any prediction or ground truth" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# What `volseg infer` says about them, on both engines


def test_volseg_infer_says_what_it_replaced_on_both_engines(tmp_path: Path, capsys) -> None:
    from helpers import write_random_bundle

    from volseg.cli import main

    bundle = write_random_bundle(tmp_path / "bundle")
    _, _, src = _nan_head(tmp_path)
    for engine in ("fast", "monai"):
        rc = main(["infer", str(src), "--bundle", str(bundle), "--engine", engine, "-o", str(tmp_path / engine)])
        out = capsys.readouterr()
        assert rc == 0, out.err
        said = [line for line in out.out.splitlines() if "2896 NaN and 1 +Inf voxels (of 10080) replaced" in line]
        assert len(said) == 1 and said[0].startswith("[1/1] nan.nii.gz:"), out.out
        assert (tmp_path / engine / "nan_seg.nii.gz").is_file()


def test_a_recipe_the_fast_engine_cannot_run_falls_back_to_the_monai_chain(tmp_path: Path, capsys, monkeypatch) -> None:
    # Every 3D recipe the schema takes runs on the fast engine today; a future one it cannot run must fall back.
    from helpers import write_random_bundle

    import volseg.fastpath
    from volseg.cli import main
    from volseg.infer import Predictor

    monkeypatch.setattr(volseg.fastpath, "unsupported_reason", lambda recipe: "the fast engine has no such step")
    bundle = write_random_bundle(tmp_path / "bundle")
    rng = np.random.default_rng(1)
    scan = save_nifti(tmp_path / "scan.nii.gz", rng.normal(0, 100, (30, 30, 20)).astype(np.float32), np.eye(4))
    rc = main(["infer", str(scan), "--bundle", str(bundle), "-o", str(tmp_path / "out")])
    out = capsys.readouterr()
    assert rc == 0, out.err
    notes = [line for line in out.out.splitlines() if line.startswith("note:")]
    assert notes == ["note: the fast engine has no such step: the bundle's MONAI chain runs it"], out.out
    assert nib.load(str(tmp_path / "out" / "scan_seg.nii.gz")).shape == (30, 30, 20)
    assert Predictor.from_bundle(bundle, "cpu").fast is None
    with pytest.raises(UserError, match="--set needs the fast engine"):
        Predictor.from_bundle(bundle, "cpu", overrides=["infer.overlap=0.5"])
