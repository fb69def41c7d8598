"""Data sets written in nnU-Net v2's raw layout, read back by volseg with the same voxels and geometry."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import save_nifti, save_phantom

from volseg.data.datalist import load_datalist
from volseg.data.export import export_nnunet
from volseg.data.synth import liver_ct_phantom
from volseg.errors import UserError


def _msd(root: Path, n: int = 3) -> Path:
    items = []
    for i in range(n):
        img, lab = save_phantom(root, f"liver_{i:03d}", liver_ct_phantom(40 + i, shape=(24, 20, 12), axcodes="LPS"))
        items.append({"image": f"./imagesTr/{img.name}", "label": f"./labelsTr/{lab.name}"})
    meta = {"labels": {"0": "background", "1": "liver", "2": "tumour"}, "training": items}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_to_nnunet_and_back(tmp_path: Path) -> None:
    src = _msd(tmp_path / "msd")
    out = export_nnunet(src, tmp_path / "raw", name="Dataset501_Liver", echo=lambda s: None)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT"} and meta["numTraining"] == 3 and meta["file_ending"] == ".nii.gz"
    assert meta["labels"] == {"background": 0, "liver": 1, "tumour": 2}
    assert sorted(p.name for p in (out / "imagesTr").iterdir())[0] == "liver_000_0000.nii.gz"
    back = load_datalist(out)
    assert len(back) == 3
    for case, orig in zip(back, load_datalist(src), strict=True):
        for key in ("image", "label"):
            a, b = nib.load(case[key]), nib.load(orig[key])
            np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj))
            np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)
    assert not list(tmp_path.glob("raw/.tmp-*"))


def test_four_channels_are_split_and_nrrd_is_converted(tmp_path: Path) -> None:
    sitk = pytest.importorskip("SimpleITK")
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    affine = np.diag([-1.5, -1.5, 3.0, 1.0])
    for i in range(2):
        save_nifti(root / "images" / f"c{i}.nii.gz", rng.normal(size=(10, 9, 6, 4)).astype(np.float32), affine)
        lab = np.zeros((10, 9, 6), np.uint8)
        lab[2:5, 2:5, 1:4] = 1 + i
        img = sitk.GetImageFromArray(lab.transpose(2, 1, 0))  # SimpleITK's array order is z, y, x
        img.SetSpacing((1.5, 1.5, 3.0))
        img.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 1))  # LPS: the NIfTI affine above in RAS
        (root / "labels").mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(img, str(root / "labels" / f"c{i}.nrrd"))
    out = export_nnunet(root, tmp_path / "raw", name="Dataset502_Brain", echo=lambda s: None)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "MR_0", "1": "MR_1", "2": "MR_2", "3": "MR_3"}
    assert meta["labels"] == {"background": 0, "label_1": 1, "label_2": 2}
    src4d = np.asarray(nib.load(str(root / "images" / "c1.nii.gz")).dataobj)
    for k in range(4):
        ch = nib.load(str(out / "imagesTr" / f"c1_{k:04d}.nii.gz"))
        np.testing.assert_array_equal(np.asarray(ch.dataobj), src4d[..., k])
        np.testing.assert_allclose(ch.affine, affine, atol=1e-5)
    lab = nib.load(str(out / "labelsTr" / "c1.nii.gz"))
    assert np.asarray(lab.dataobj)[3, 3, 2] == 2 and np.asarray(lab.dataobj).sum() == 2 * 27
    np.testing.assert_allclose(lab.affine, affine, atol=1e-5)
    # volseg reads the written data set back: each case's image is its four channel files, in order.
    images = [c["image"] for c in load_datalist(out)]
    assert [[Path(p).name for p in image] for image in images] == [
        [f"c{i}_{k:04d}.nii.gz" for k in range(4)] for i in range(2)
    ]


def test_bad_name_and_existing_target(tmp_path: Path) -> None:
    src = _msd(tmp_path / "msd", n=2)
    with pytest.raises(UserError, match="DatasetXXX_Name"):
        export_nnunet(src, tmp_path / "raw", name="Liver")
    export_nnunet(src, tmp_path / "raw", name="Dataset001_A", echo=lambda s: None)
    with pytest.raises(UserError, match="exists already"):
        export_nnunet(src, tmp_path / "raw", name="Dataset001_A")
