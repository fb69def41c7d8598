"""Inputs that used to pass in silence (a voxel size of 0 or below), and evaluation without --labels."""

from __future__ import annotations

import csv
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from tests.conftest import TINY_RECIPE, save_nifti
from volseg.data.validate import check_image_file
from volseg.errors import UserError

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
