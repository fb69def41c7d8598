"""Datalists from MSD folders, image/label folders and CSV; deterministic splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from volseg.data.datalist import case_id, load_datalist, split_cases
from volseg.errors import UserError


def _touch(p: Path) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"x")
    return p


def test_msd_folder(tmp_path: Path) -> None:
    items = []
    for i in range(3):
        _touch(tmp_path / "imagesTr" / f"c{i}.nii.gz"), _touch(tmp_path / "labelsTr" / f"c{i}.nii.gz")
        items.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"training": items}))
    cases = load_datalist(tmp_path)
    assert [Path(c["image"]).name for c in cases] == ["c0.nii.gz", "c1.nii.gz", "c2.nii.gz"]
    assert all(Path(c["label"]).is_absolute() for c in cases)


def test_msd_missing_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}))
    with pytest.raises(UserError, match="listed file a.nii.gz does not exist"):
        load_datalist(tmp_path)


def test_folder_pairs_match_by_name_with_nnunet_suffix(tmp_path: Path) -> None:
    for n in ("b", "a"):
        _touch(tmp_path / "images" / f"{n}_0000.nii.gz"), _touch(tmp_path / "labels" / f"{n}.nii.gz")
    cases = load_datalist(tmp_path)
    assert [case_id(c["image"]) for c in cases] == ["a", "b"]
    assert [Path(c["label"]).name for c in cases] == ["a.nii.gz", "b.nii.gz"]
    _touch(tmp_path / "images" / "c.nii.gz")
    with pytest.raises(UserError, match="1 image\\(s\\) without a label, first: c"):
        load_datalist(tmp_path)


def test_csv(tmp_path: Path) -> None:
    _touch(tmp_path / "i.nrrd"), _touch(tmp_path / "l.nrrd")
    (tmp_path / "list.csv").write_text("image,label\ni.nrrd,l.nrrd\n")
    assert load_datalist(tmp_path / "list.csv") == [
        {"image": str((tmp_path / "i.nrrd").resolve()), "label": str((tmp_path / "l.nrrd").resolve())}
    ]
    (tmp_path / "bad.csv").write_text("img,lab\n")
    with pytest.raises(UserError, match="'image' and 'label' columns"):
        load_datalist(tmp_path / "bad.csv")


def test_split_fraction_is_deterministic_and_disjoint() -> None:
    cases = [{"image": f"{i}", "label": f"{i}"} for i in range(10)]
    tr1, va1 = split_cases(cases, 0.2, seed=3)
    tr2, va2 = split_cases(cases, 0.2, seed=3)
    assert (tr1, va1) == (tr2, va2)
    assert len(va1) == 2 and len(tr1) == 8
    assert not {c["image"] for c in tr1} & {c["image"] for c in va1}
    assert split_cases(cases, 0.2, seed=4)[1] != va1


def test_kfold_covers_every_case_once() -> None:
    cases = [{"image": f"{i}", "label": f"{i}"} for i in range(11)]
    vals = [c["image"] for k in range(5) for c in split_cases(cases, folds=5, fold=k, seed=0)[1]]
    assert sorted(vals) == sorted(c["image"] for c in cases)


def test_too_few_cases() -> None:
    with pytest.raises(UserError, match="at least 2 labelled cases"):
        split_cases([{"image": "a", "label": "a"}])


def _nnunet(root: Path, cases: list[str], channels: int = 1, **meta) -> Path:
    for c in cases:
        for k in range(channels):
            _touch(root / "imagesTr" / f"{c}_{k:04d}.nii.gz")
        _touch(root / "labelsTr" / f"{c}.nii.gz")
    js = {"channel_names": {str(k): f"ch{k}" for k in range(channels)}, "labels": {"background": 0, "liver": 1},
          "numTraining": len(cases), "file_ending": ".nii.gz", **meta}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(js))
    return root


def test_nnunet_raw_dataset(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "Dataset003_Liver", ["liver_1", "liver_0", "liver_10"])
    (root / "imagesTs").mkdir()
    _touch(root / "imagesTs" / "liver_99_0000.nii.gz")  # test images are not training cases
    cases = load_datalist(root)
    names = ["liver_0", "liver_1", "liver_10"]  # sorted by case name
    assert [Path(c["image"]).name for c in cases] == [f"{n}_0000.nii.gz" for n in names]
    assert [Path(c["label"]).name for c in cases] == [f"{n}.nii.gz" for n in names]
    assert load_datalist(root, "nnunet") == cases
    assert [case_id(c["image"]) for c in cases] == names


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda r: (r / "labelsTr" / "b.nii.gz").unlink(), "image(s) without a label, first: b"),
        (lambda r: (r / "imagesTr" / "b_0000.nii.gz").rename(r / "imagesTr" / "b_0001.nii.gz"), "b has channels [1]"),
        (lambda r: _nnunet(r, ["a", "b"], numTraining=3), "numTraining 3, imagesTr holds 2"),
        (lambda r: _nnunet(r, ["a", "b"], labels={"background": 0, "whole": [1, 2]}), "region-based labels (whole"),
        (lambda r: (_nnunet(r, ["a", "b"], channels=2), (r / "imagesTr" / "b_0001.nii.gz").unlink()),
         "case b has channels [0], dataset.json names 2"),
        (lambda r: _nnunet(r, ["a", "b"], file_ending="nii"), "needs 'file_ending'"),
    ],
)  # fmt: skip
def test_nnunet_raw_dataset_problems_are_named(tmp_path: Path, edit, words: str) -> None:
    root = _nnunet(tmp_path / "Dataset001_X", ["a", "b"])
    edit(root)
    with pytest.raises(UserError) as info:
        load_datalist(root)
    assert words in str(info.value) and "\n" not in str(info.value)
