"""The data integrity check: each kind of bad data is found and named; a clean data set passes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import dicom_factory as factory
import numpy as np
import pytest
import SimpleITK as sitk
import yaml
from helpers import TINY_RECIPE, save_nifti

from volseg.data.checks import check_data, run_check_data
from volseg.errors import UserError
from volseg.recipe import recipe_from_dict

SHAPE = (10, 9, 6)
AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 15.0], [0, 0, 3.0, -40.0], [0, 0, 0, 1]])


def _recipe(**changes: object):
    raw = json.loads(json.dumps(TINY_RECIPE))
    for dotted, value in changes.items():
        node = raw
        *parents, last = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return recipe_from_dict(raw)


RECIPE_2D = dict(
    model__spatial_dims=2,
    data__spacing=[1.0, 1.0],
    data__orientation="RA",
    train__patch_size=[16, 16],
)


def _image(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, shape).astype(np.float32)


def _label(shape: tuple[int, ...] = SHAPE, classes: tuple[int, ...] = (1, 2)) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    for n, value in enumerate(classes):
        lab[1 + 3 * n : 3 + 3 * n, 2:5, ...] = value
    return lab


def _dataset(root: Path, n: int = 3, shape: tuple[int, ...] = SHAPE, affine: np.ndarray = AFFINE) -> Path:
    for i in range(n):
        save_nifti(root / "images" / f"case{i}.nii.gz", _image(i, shape), affine)
        save_nifti(root / "labels" / f"case{i}.nii.gz", _label(shape), affine)
    return root


def _run(root: Path, tmp_path: Path, recipe: dict | None = None) -> tuple[int, str]:
    raw = json.loads(json.dumps(recipe or TINY_RECIPE))
    raw["data"]["root"] = str(root)
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out: list[str] = []
    code = run_check_data(cfg, None, [], out.append)
    return code, "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# Clean data


def test_clean_dataset_passes(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    report = check_data(_recipe(), root)
    assert report.ok and not report.findings and report.n_cases == 3
    code, text = _run(root, tmp_path)
    assert code == 0
    assert text.strip() == "3 cases checked: 0 errors, 0 warnings"


def test_nnunet_raw_dataset_is_checked_like_any_other(tmp_path: Path) -> None:
    root = tmp_path / "Dataset002_Tiny"
    for i in range(3):
        save_nifti(root / "imagesTr" / f"case{i}_0000.nii.gz", _image(i), AFFINE)
        save_nifti(root / "labelsTr" / f"case{i}.nii.gz", _label(), AFFINE)
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1, "tumour": 2}, "numTraining": 3,
            "file_ending": ".nii.gz"}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    report = check_data(_recipe(), root)
    assert report.ok and not report.findings and report.n_cases == 3
    save_nifti(root / "labelsTr" / "case1.nii.gz", _label(shape=(10, 9, 5)), AFFINE)
    report = check_data(_recipe(), root)
    assert not report.ok and any("case1" in str(f) for f in report.findings)


def test_four_channel_image_fits_a_four_channel_recipe(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(2):
        save_nifti(root / "images" / f"c{i}.nii.gz", _image(i, (*SHAPE, 4)), AFFINE)
        save_nifti(root / "labels" / f"c{i}.nii.gz", _label(), AFFINE)
    assert check_data(_recipe(model__in_channels=4), root).ok
    report = check_data(_recipe(), root)  # one channel expected: both images are refused
    assert [Path(f.path).name for f in report.errors] == ["c0.nii.gz", "c1.nii.gz"]
    assert "4D image 10x9x6x4 where a 3D image is expected" in report.errors[0].problem
    report = check_data(_recipe(model__in_channels=2), _dataset(tmp_path / "plain", n=1))
    assert "3D image 10x9x6 with one channel, but model.in_channels is 2" in report.errors[0].problem


# --------------------------------------------------------------------------------------------------------
# Errors, one kind at a time


def _break(kind: str, root: Path) -> str:
    """Spoil case1 of a clean data set in one way; returns the name of the file that is now wrong."""
    img, lab = root / "images" / "case1.nii.gz", root / "labels" / "case1.nii.gz"
    if kind == "shape":
        save_nifti(lab, _label((10, 9, 5)), AFFINE)
    elif kind == "origin":
        moved = AFFINE.copy()
        moved[0, 3] += 2.0
        save_nifti(lab, _label(), moved)
    elif kind == "spacing":
        save_nifti(lab, _label(), AFFINE @ np.diag([1, 1, 1.2, 1]))
    elif kind == "values":
        save_nifti(lab, _label(classes=(1, 5)), AFFINE)
    elif kind == "mask255":
        save_nifti(lab, _label(classes=(255,)), AFFINE)
    elif kind == "fraction":
        save_nifti(lab, _label().astype(np.float32) * 0.5, AFFINE)
    elif kind in ("nan", "inf"):
        data = _image(1)
        data[3, 3, 3] = np.nan if kind == "nan" else np.inf
        save_nifti(img, data, AFFINE)
    elif kind == "4d":
        save_nifti(img, _image(1, (*SHAPE, 3)), AFFINE)
    elif kind == "2d":
        save_nifti(img, _image(1, SHAPE[:2]), AFFINE)
    elif kind == "label4d":
        save_nifti(lab, np.stack([_label()] * 2, axis=-1), AFFINE)
    elif kind == "corrupt":
        img.write_bytes(np.random.default_rng(0).bytes(900))
    elif kind == "truncated":
        data = img.read_bytes()
        img.write_bytes(data[: len(data) // 2])
    elif kind == "bad_header":  # sform with a zero row: every voxel on one plane
        raw = bytearray(gzip.decompress(img.read_bytes()))
        raw[312:328] = np.zeros(4, "<f4").tobytes()  # srow_z
        img.write_bytes(gzip.compress(bytes(raw)))
    elif kind == "duplicate":
        img.write_bytes((root / "images" / "case0.nii.gz").read_bytes())
    else:  # pragma: no cover
        raise ValueError(kind)
    return lab.name if kind in ("shape", "origin", "spacing", "values", "mask255", "fraction", "label4d") else img.name


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("shape", "shape 10x9x5 differs from its image case1.nii.gz (10x9x6)"),
        ("origin", "origin off by 2 mm"),
        ("spacing", "spacing 1.5x1.5x3.6 mm vs image 1.5x1.5x3 mm"),
        ("values", "label values 5 are not among the recipe's labels 0..2 (background, liver, tumour)"),
        ("mask255", "look like a 0/255 mask"),
        ("fraction", "not whole numbers (e.g. 0.5)"),
        ("nan", "1 NaN voxel"),
        ("inf", "1 Inf voxel"),
        ("4d", "4D image 10x9x6x3 where a 3D image is expected"),
        ("2d", "2D image 10x9 where a 3D image is expected"),
        ("label4d", "4D label 10x9x6x2 where a 3D label map is expected"),
        ("corrupt", "not gzip-compressed"),
        ("truncated", "truncated"),
        ("bad_header", "singular affine"),
        ("duplicate", "byte-identical to case0.nii.gz"),
    ],
)
def test_each_error_is_found_and_named(kind: str, words: str, tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    name = _break(kind, root)
    report = check_data(_recipe(), root)
    errors = [f for f in report.errors if Path(f.path).name == name and "case1" in f.path]
    assert errors, report.table()
    assert any(words in f.problem for f in errors), report.table()
    assert all("case1" in f.path for f in report.errors), report.table()
    code, text = _run(root, tmp_path)
    assert code == 2
    assert words in text and "3 cases checked:" in text


def test_datalist_errors_are_findings(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    (root / "labels" / "case2.nii.gz").unlink()
    report = check_data(_recipe(), root)
    assert report.n_cases == 0 and not report.ok
    assert "1 image(s) without a label, first: case2" in report.errors[0].problem

    msd = _dataset(tmp_path / "msd")
    items = [{"image": "images/case0.nii.gz", "label": "labels/case0.nii.gz"}] * 2
    (msd / "dataset.json").write_text(json.dumps({"training": items}))
    assert "image listed twice" in check_data(_recipe(), msd).errors[0].problem


def test_three_d_file_where_two_d_is_expected(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", shape=(12, 10))
    assert check_data(_recipe(**RECIPE_2D), root).ok
    save_nifti(root / "images" / "case1.nii.gz", _image(1, (12, 10, 3)), AFFINE)
    report = check_data(_recipe(**RECIPE_2D), root)
    assert "3D image 12x10x3 where a 2D image is expected" in report.errors[0].problem
    assert report.errors[0].path.endswith("images/case1.nii.gz")


# --------------------------------------------------------------------------------------------------------
# Warnings: training can go on


def test_empty_label_and_absent_class_are_warnings(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(3):
        save_nifti(root / "images" / f"case{i}.nii.gz", _image(i), AFFINE)
        save_nifti(root / "labels" / f"case{i}.nii.gz", _label(classes=(1,) if i else ()), AFFINE)
    report = check_data(_recipe(), root)
    assert report.ok and not report.errors
    problems = {(Path(f.path).name, f.problem) for f in report.warnings}
    assert ("case0.nii.gz", "label is empty (all background)") in problems
    assert any("label 'tumour' (2) occurs in no case" in p for _, p in problems)
    code, text = _run(root, tmp_path)
    assert code == 0 and "3 cases checked: 0 errors, 2 warnings" in text


def test_anisotropic_spacing_is_a_warning(tmp_path: Path) -> None:
    flat = AFFINE @ np.diag([0.2, 0.2, 4.0, 1.0])  # 0.3 x 0.3 x 12 mm
    report = check_data(_recipe(), _dataset(tmp_path / "data", affine=flat))
    assert report.ok
    assert {f.level for f in report.findings} == {"warning"}
    assert "very anisotropic voxels 0.3x0.3x12 mm (ratio 40)" in report.warnings[0].problem


# --------------------------------------------------------------------------------------------------------
# Other formats


def _save_sitk(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    """Write (i, j, k) voxels with a RAS affine through SimpleITK (LPS), as NRRD or MHA."""
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)).copy())
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def test_nrrd_and_mha_pairs_with_nifti_labels(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _save_sitk(root / "images" / "a.nrrd", _image(0), AFFINE)
    save_nifti(root / "labels" / "a.nii.gz", _label(), AFFINE)
    _save_sitk(root / "images" / "b.mha", _image(1), AFFINE)
    _save_sitk(root / "labels" / "b.nrrd", _label(), AFFINE)
    report = check_data(_recipe(), root)
    assert report.ok and not report.findings, report.table()

    (root / "images" / "b.mha").write_bytes(b"ObjectType = Image\nNDims = 3\nDimSize = 10 9 6\n")
    report = check_data(_recipe(), root)
    assert [Path(f.path).name for f in report.errors] == ["b.mha"], report.table()


def test_dicom_series_image_with_nifti_label(tmp_path: Path) -> None:
    root = tmp_path / "data"
    volume = factory.phantom((8, 7, 5))
    affine = factory.axial_affine()
    factory.write_series(root / "images" / "ct1", volume, affine)
    _, grid = factory.expected(volume, affine)
    save_nifti(root / "labels" / "ct1.nii.gz", _label((8, 7, 5)), grid)
    assert check_data(_recipe(), root).ok

    moved = grid.copy()
    moved[2, 3] += 5.0
    save_nifti(root / "labels" / "ct1.nii.gz", _label((8, 7, 5)), moved)
    assert "origin off by 5 mm" in check_data(_recipe(), root).errors[0].problem


# --------------------------------------------------------------------------------------------------------
# The report


def test_table_is_aligned_with_a_summary(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data")
    _break("nan", root)
    with gzip.open(root / "labels" / "case2.nii.gz", "rb") as fh:
        raw = fh.read()
    (root / "labels" / "case2.nii.gz").write_bytes(gzip.compress(raw)[:-40])
    report = check_data(_recipe(), root)
    lines = report.table().splitlines()
    assert lines[0].split() == ["file", "level", "problem"]
    starts = {line.index(" error ") for line in lines[2:-1]}
    assert len(starts) == 1  # the level column lines up
    assert lines[2].startswith("images/case1.nii.gz") and lines[3].startswith("labels/case2.nii.gz")
    assert lines[-1] == "3 cases checked: 2 errors, 0 warnings"


def test_missing_data_root_is_a_user_error(tmp_path: Path) -> None:
    cfg = tmp_path / "recipe.yaml"
    cfg.write_text(yaml.safe_dump(TINY_RECIPE))
    with pytest.raises(UserError, match="no data given"):
        run_check_data(cfg, None, [], print)
    code = run_check_data(cfg, tmp_path / "nowhere", [], lambda s: None)
    assert code == 2


def test_label_map_makes_a_0_255_mask_acceptable(tmp_path: Path) -> None:
    from volseg.data.checks import check_data
    from volseg.recipe import recipe_from_dict

    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    for i in range(2):
        img = np.full((8, 8, 4), 10 + i, np.int16)
        lab = np.zeros((8, 8, 4), np.uint8)
        lab[2:5, 2:5, 1:3] = 255
        for kind, arr in (("images", img), ("labels", lab)):
            (tmp_path / kind).mkdir(exist_ok=True)
            save_nifti(tmp_path / kind / f"c{i}.nii.gz", arr, aff)
    base = {"name": "t", "data": {"labels": {"background": 0, "cell": 1}}, "train": {"patch_size": [16, 16, 16]}}
    report = check_data(recipe_from_dict(base), tmp_path)
    assert not report.ok and "data.label_map: {255: 1}" in report.errors[0].problem
    mapped = {**base, "data": {**base["data"], "label_map": {255: 1}}}
    assert check_data(recipe_from_dict(mapped), tmp_path).ok
