"""nnU-Net raw data sets with several channels: one file per channel (<case>_0000, <case>_0001), read everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import TINY_RECIPE, save_nifti

from volseg.data.synth import liver_ct_phantom


def _two_channel_dataset(root: Path, n: int = 4) -> Path:
    """``root/Dataset900_Two``: channel 0 the CT, channel 1 a second contrast (its negative, shifted)."""
    ds = root / "Dataset900_Two"
    for i in range(n):
        ph = liver_ct_phantom(200 + i, shape=(40, 40, 20))
        save_nifti(ds / "imagesTr" / f"case_{i:03d}_0000.nii.gz", ph.image, ph.affine)
        save_nifti(ds / "imagesTr" / f"case_{i:03d}_0001.nii.gz", (500.0 - ph.image).astype(np.float32), ph.affine)
        save_nifti(ds / "labelsTr" / f"case_{i:03d}.nii.gz", ph.label, ph.affine)
    meta = {
        "channel_names": {"0": "CT", "1": "other"},
        "labels": {"background": 0, "liver": 1, "tumour": 2},
        "numTraining": n,
        "file_ending": ".nii.gz",
    }
    (ds / "dataset.json").write_text(json.dumps(meta))
    return ds


def _recipe(**infer: object):
    from volseg.recipe import recipe_from_dict

    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["model"]["in_channels"] = 2
    raw["data"]["split"] = {"val_fraction": 0.25, "seed": 0}
    raw["train"]["max_epochs"] = 1
    raw["infer"].update(infer)
    return recipe_from_dict(raw)


def test_channels_are_listed_in_order_and_fingerprinted(tmp_path: Path) -> None:
    from volseg.data.datalist import load_datalist
    from volseg.plan import fingerprint_dataset

    ds = _two_channel_dataset(tmp_path)
    cases = load_datalist(ds)
    assert len(cases) == 4
    for case in cases:
        assert [Path(p).name for p in case["image"]] == [
            Path(case["label"]).name.replace(".nii.gz", f"_{k:04d}.nii.gz") for k in (0, 1)
        ]
    fp = fingerprint_dataset(ds)
    assert fp["n_channels"] == 2 and len(fp["channels"]) == 2
    first, second = fp["channels"]
    assert first["mean"] != pytest.approx(second["mean"], abs=1.0)  # two channels read, not one twice
    assert fp["cases"][0]["shape"] == [40, 40, 20]
    from volseg.plan import plan_recipe

    planned = plan_recipe(fp, device="cuda", memory_gb=8.0, step_timer=lambda model, patch, batch: 0.5)
    assert planned.recipe["model"]["in_channels"] == 2


def test_a_missing_channel_file_is_named(tmp_path: Path) -> None:
    from volseg.data.datalist import load_datalist
    from volseg.errors import UserError

    ds = _two_channel_dataset(tmp_path, n=2)
    (ds / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(UserError, match="case case_001 has channels"):
        load_datalist(ds)


def test_check_data_reads_each_channel(tmp_path: Path) -> None:
    from volseg.data.checks import check_data

    ds = _two_channel_dataset(tmp_path, n=2)
    report = check_data(_recipe(), ds)
    assert report.ok, report.table()
    # A channel on another grid is an error naming that channel's file.
    bad = ds / "imagesTr" / "case_001_0001.nii.gz"
    img = nib.load(str(bad))
    save_nifti(bad, np.asarray(img.dataobj)[:, :, :10], img.affine)
    report = check_data(_recipe(), ds)
    assert not report.ok and "case_001_0001" in report.table()


def test_export_writes_the_channels_back(tmp_path: Path) -> None:
    from volseg.data.datalist import load_datalist
    from volseg.data.export import export_nnunet

    ds = _two_channel_dataset(tmp_path / "src", n=2)
    out = export_nnunet(ds, tmp_path / "out", name="Dataset901_Again", echo=lambda s: None)
    meta = json.loads((out / "dataset.json").read_text())
    assert len(meta["channel_names"]) == 2
    names = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert names == ["case_000_0000.nii.gz", "case_000_0001.nii.gz", "case_001_0000.nii.gz", "case_001_0001.nii.gz"]
    for k in (0, 1):
        a = np.asarray(nib.load(str(out / "imagesTr" / f"case_001_{k:04d}.nii.gz")).dataobj)
        b = np.asarray(nib.load(str(ds / "imagesTr" / f"case_001_{k:04d}.nii.gz")).dataobj)
        assert np.array_equal(a, b)
    assert [len(c["image"]) for c in load_datalist(out)] == [2, 2]


def test_channel_files_are_grouped_into_cases(tmp_path: Path) -> None:
    from volseg.data.channels import group_channel_files
    from volseg.errors import UserError

    files = [tmp_path / n for n in ("b_0001.nii.gz", "a_0000.nii.gz", "ct4d.nii.gz", "b_0000.nii.gz", "a_0001.nii.gz")]
    assert group_channel_files(files, 1) == files
    assert group_channel_files(files, 2) == [
        [files[3], files[0]],
        [files[1], files[4]],
        files[2],
    ]
    with pytest.raises(UserError, match="case a has channel files \\[0\\]; the model takes 2"):
        group_channel_files(files[1:3], 2)


@pytest.mark.slow
def test_train_and_infer_on_two_channels(tmp_path: Path) -> None:
    from volseg.data.channels import stack_channels
    from volseg.data.datalist import load_datalist
    from volseg.infer import Predictor
    from volseg.train import train
    from volseg.trust import check_bundle, rewrite_bundle

    ds = _two_channel_dataset(tmp_path)
    run = tmp_path / "run"
    result = train(_recipe(), ds, run, echo=lambda s: None, progress=False)
    assert result.epochs == 1
    cfg = json.loads((run / "configs" / "train.json").read_text())
    assert all(isinstance(c["image"], list) and len(c["image"]) == 2 for c in cfg["train_cases"] + cfg["val_cases"])
    meta = json.loads((run / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    check_bundle(run)
    rewrite_bundle(run, echo=lambda s: None)  # the channel lists are kept as the run record
    assert json.loads((run / "configs" / "train.json").read_text())["train_cases"] == cfg["train_cases"]
    check_bundle(run)
    # A case's channel files, stacked, segment with the bundle (both engines: same grid as the channels).
    case = load_datalist(ds)[0]
    src = stack_channels(case["image"], tmp_path / "case_stacked.nii.gz")
    fast = Predictor.from_bundle(run, "cpu", precision="fp32").predict(src)
    chain = Predictor.from_bundle(run, "cpu", "monai").predict(src)
    label = nib.load(case["label"])
    assert fast.labels.shape == chain.labels.shape == label.shape
    assert np.allclose(fast.affine, label.affine, atol=1e-4)
    # volseg infer takes the channel files as one case, and names the output after the case.
    from volseg.cli import main

    out = tmp_path / "pred"
    args = ["--bundle", str(run), "--output", str(out), "--device", "cpu", "--precision", "fp32"]
    assert main(["infer", *case["image"], *args]) == 0
    written = nib.load(str(out / "case_000_seg.nii.gz"))
    assert np.array_equal(np.asarray(written.dataobj), fast.labels)
    assert [p.name for p in out.iterdir()] == ["case_000_seg.nii.gz"]
