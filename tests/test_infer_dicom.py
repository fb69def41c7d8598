"""DICOM series in, NIfTI and DICOM SEG out, on the series' own grid; output formats; probabilities."""

from __future__ import annotations

from pathlib import Path

import dicom_factory as F
import nibabel as nib
import numpy as np
import pytest
from helpers import TINY_FLOORS, TINY_LABELS, TINY_RECIPE, assert_agreement, assert_real_overlap, save_nifti

from volseg.data.synth import liver_ct_phantom
from volseg.errors import UserError
from volseg.infer import run_inference

pytestmark = pytest.mark.slow


def test_dicom_folder_gives_nifti_and_dicom_seg_on_the_series_grid(trained_bundle: Path, tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    import highdicom as hd

    ph = liver_ct_phantom(11, shape=(40, 36, 20), axcodes="LPS")
    folder = tmp_path / "study"
    F.write_series(folder / "ct", ph.image.astype(np.float32), ph.affine, slope=1.0, intercept=0.0, series_number=2)
    # A smaller second series and a scout in the same folder: the CT with most slices is chosen.
    F.write_series(folder / "other", ph.image[:, :, :5].astype(np.float32), ph.affine, series_number=3)
    F.write_series(
        folder / "scout", ph.image[:, :, :1].astype(np.float32), ph.affine, series_number=1,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )  # fmt: skip
    lines: list[str] = []
    written, failures = run_inference([str(folder)], tmp_path / "out", trained_bundle, "cpu", echo=lines.append)
    assert not failures, failures
    assert any("chose" in s and "20 image" in s for s in lines), lines
    assert sum("skipped" in s for s in lines) == 2, lines
    nii = nib.load(str(tmp_path / "out" / "study_seg.nii.gz"))
    assert nii.shape == ph.image.shape
    np.testing.assert_allclose(nii.affine, ph.affine, atol=1e-3)
    labels = np.asarray(nii.dataobj)
    # The frames are compared with these labels below: they must hold the phantom's liver (and so a segment).
    assert_real_overlap(labels, ph.label, {"liver": 1}, TINY_FLOORS)
    seg = hd.seg.segread(str(tmp_path / "out" / "study_seg.dcm"))
    assert seg.SegmentationType == "BINARY"
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"liver", "tumour"}
    ref_uids = {ds.SeriesInstanceUID for ds in seg.ReferencedSeriesSequence}
    assert len(ref_uids) == 1
    for number, item in enumerate(seg.SegmentSequence, 1):
        value = {"liver": 1, "tumour": 2}[item.SegmentLabel]
        frames = [
            f for f in seg.PerFrameFunctionalGroupsSequence
            if f.SegmentIdentificationSequence[0].ReferencedSegmentNumber == number
        ]  # fmt: skip
        # Only slices that hold the segment have a frame.
        assert len(frames) == int(np.count_nonzero((labels == value).any(axis=(0, 1))))


def test_formats_and_probabilities(trained_bundle: Path, tmp_path: Path) -> None:
    ph = liver_ct_phantom(12, shape=(40, 36, 20), axcodes="RAS")
    src = save_nifti(tmp_path / "scan.nii.gz", ph.image, ph.affine)
    written, failures = run_inference(
        [str(src)], tmp_path / "out", trained_bundle, "cpu", echo=lambda s: None,
        formats=["nifti", "seg.nrrd", "nrrd"], probabilities=True,
    )  # fmt: skip
    assert not failures
    out = tmp_path / "out"
    for name in ("scan_seg.nii.gz", "scan_seg.seg.nrrd", "scan_seg.nrrd", "scan_seg_probabilities.nii.gz"):
        assert (out / name).is_file(), name
    probs = nib.load(str(out / "scan_seg_probabilities.nii.gz"))
    assert probs.shape == (*ph.image.shape, 3)
    p = probs.get_fdata()
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, atol=2e-3)
    labels = np.asarray(nib.load(str(out / "scan_seg.nii.gz")).dataobj)
    # Without postprocessing differences, the argmax of the probabilities is the label map almost everywhere.
    assert (p.argmax(-1) == labels).mean() > 0.98
    assert_agreement(p.argmax(-1), labels, TINY_LABELS, truth=ph.label, floors=TINY_FLOORS, min_dice=0.95)
    with pytest.raises(UserError, match="unknown format 'png'"):
        run_inference([str(src)], out, trained_bundle, "cpu", formats=["png"])
    written, failures = run_inference(
        [str(src)], out, trained_bundle, "cpu", echo=lambda s: None, formats=["dicom-seg"]
    )
    assert failures and "DICOM" in failures[0][1]


def test_dicom_series_folder_in_a_training_datalist(tmp_path: Path) -> None:
    """A CSV datalist may name a DICOM series folder as the image: it loads on the label's grid."""
    from volseg.data import transforms as T
    from volseg.data.datalist import load_datalist
    from volseg.recipe import recipe_from_dict

    ph = liver_ct_phantom(13, shape=(40, 36, 20), axcodes="LPS")
    F.write_series(tmp_path / "case1", ph.image.astype(np.float32), ph.affine)
    save_nifti(tmp_path / "case1_label.nii.gz", ph.label, ph.affine)
    (tmp_path / "list.csv").write_text("image,label\ncase1,case1_label.nii.gz\n")
    (case,) = load_datalist(tmp_path / "list.csv")
    chain = T.instantiate(T.preprocessing(recipe_from_dict(TINY_RECIPE), with_label=True))
    d = chain(case)
    assert d["image"].shape == d["label"].shape
    np.testing.assert_allclose(d["image"].affine.numpy(), d["label"].affine.numpy(), atol=1e-3)
    # The label still marks the liver where the image shows it (HU of liver, not air or bone).
    img, lab = d["image"][0].numpy(), d["label"][0].numpy()
    assert 0.5 < float(np.median(img[lab == 1])) < 0.8
