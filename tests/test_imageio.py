"""volseg.imageio: one reader for every format, geometry included, on both engines."""

from __future__ import annotations

from pathlib import Path

import dicom_factory as F
import nibabel as nib
import numpy as np
import pytest
from helpers import save_nifti

from volseg.data.synth import liver_ct_phantom
from volseg.imageio import LPS_TO_RAS, read_image


def _as_itk(src: Path, dst: Path) -> Path:
    """The NIfTI converted by SimpleITK (ITK's own NIfTI -> LPS geometry, independent of volseg's reader)."""
    import SimpleITK as sitk

    sitk.WriteImage(sitk.ReadImage(str(src)), str(dst))
    return dst


def _oblique_lps_affine() -> np.ndarray:
    """Stored in LPS axis order, slightly oblique, anisotropic, with an offset origin."""
    c, s = np.cos(0.2), np.sin(0.2)
    rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    a = np.eye(4)
    a[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ rot @ np.diag([0.9, 1.1, 2.5])
    a[:3, 3] = (12.5, -30.0, 41.0)
    return a


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd"])
def test_nrrd_and_mha_read_with_the_niftis_geometry(tmp_path: Path, suffix: str) -> None:
    ph = liver_ct_phantom(3, shape=(24, 20, 12), axcodes="RAS")
    nii = save_nifti(tmp_path / "scan.nii.gz", ph.image.astype(np.int16), _oblique_lps_affine())
    other = _as_itk(nii, tmp_path / f"scan{suffix}")
    a, b = read_image(nii), read_image(other)
    assert b.array.dtype == np.float32 and b.array.shape == a.array.shape
    np.testing.assert_array_equal(b.array, a.array)
    np.testing.assert_allclose(b.affine, a.affine, atol=1e-4)
    assert nib.aff2axcodes(b.affine) == nib.aff2axcodes(a.affine) == nib.aff2axcodes(_oblique_lps_affine())
    assert b.meta["format"] in ("nrrd", "mha")


def test_lps_constant_is_its_own_inverse() -> None:
    np.testing.assert_array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fast", "monai"])
def test_both_engines_segment_nrrd_and_mha_on_their_grid(trained_bundle: Path, tmp_path: Path, engine: str) -> None:
    from volseg.infer import Predictor

    ph = liver_ct_phantom(5, shape=(40, 36, 20), axcodes="LPS")
    nii = save_nifti(tmp_path / "scan.nii.gz", ph.image.astype(np.int16), ph.affine)
    predictor = Predictor.from_bundle(trained_bundle, "cpu", engine)
    assert predictor.engine.name == engine
    ref = predictor.predict(nii)
    assert ref.labels.shape == ph.image.shape and (ref.labels == 1).sum() > 100
    for suffix in (".nrrd", ".mha"):
        pred = predictor.predict(_as_itk(nii, tmp_path / f"scan{suffix}"))
        np.testing.assert_allclose(pred.affine, ref.affine, atol=1e-4)
        np.testing.assert_array_equal(pred.labels, ref.labels)


@pytest.mark.slow
def test_a_dicom_case_is_scanned_once(trained_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import volseg.data.dicom as dicom
    from volseg.infer import run_inference

    ph = liver_ct_phantom(7, shape=(40, 36, 20), axcodes="LPS")
    folder = tmp_path / "study"
    F.write_series(folder / "ct", ph.image.astype(np.float32), ph.affine, series_number=2)
    F.write_series(folder / "other", ph.image[:, :, :5].astype(np.float32), ph.affine, series_number=3)
    scans: list[Path] = []
    real = dicom._scan

    def counted(root):  # type: ignore[no-untyped-def]
        scans.append(Path(root))
        return real(root)

    monkeypatch.setattr(dicom, "_scan", counted)
    lines: list[str] = []
    written, failures = run_inference(
        [str(folder)], tmp_path / "out", trained_bundle, "cpu", echo=lines.append, qc=True, formats=["nifti"]
    )
    assert not failures, failures
    assert scans == [folder], scans  # segmentation, notes and the QC picture from one scan of the folder
    assert any("chose" in s for s in lines) and any("skipped" in s for s in lines), lines
    assert (tmp_path / "out" / "study_seg_qc.png").is_file()


def test_qc_and_seg_nrrd_give_a_label_without_colour_the_same_colour(tmp_path: Path) -> None:
    from volseg.data.writers import SegmentInfo, segment_colors, write_segmentation
    from volseg.qc import _color

    segments = [SegmentInfo("liver", 1, color=(10, 20, 30)), SegmentInfo("tumour", 2)]
    labels = np.zeros((6, 5, 4), np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    labels[3:5, 3:4, 2:3] = 2
    (path,) = write_segmentation(labels, np.eye(4), tmp_path / "case_seg", ["seg.nrrd"], segments)
    header = path.read_bytes().split(b"\n\n", 1)[0].decode()
    fields = dict(line.split(":=", 1) for line in header.splitlines() if ":=" in line)
    colors = segment_colors(segments)
    for n, seg in enumerate(segments):
        rgb = tuple(round(float(v) * 255) for v in fields[f"Segment{n}_Color"].split())
        assert rgb == colors[seg.value] == _color(seg.value, colors)
    # Without any colour map (evaluate --qc), the picture gives label v what the outputs give the v-th segment.
    assert _color(2, None) == colors[2]


def test_png_is_a_writer_like_the_others(tmp_path: Path) -> None:
    from PIL import Image

    from volseg.data.writers import SUFFIXES, WRITERS, write_segmentation

    assert set(SUFFIXES) == set(WRITERS) and WRITERS["png"].spatial_dims == 2
    labels = np.zeros((7, 5), np.uint8)
    labels[2:4, 1:3] = 1
    (path,) = write_segmentation(labels, np.eye(3), tmp_path / "cell_seg", ["png"], [])
    assert path.name == "cell_seg.png"
    with Image.open(path) as im:
        np.testing.assert_array_equal(np.asarray(im).T, labels)
    assert read_image(path).array.shape == labels.shape
