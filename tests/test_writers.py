"""Segmentation writers: every format read back by an independent reader and compared with what went in.

NIfTI with nibabel, NRRD with pynrrd, .seg.nrrd with slicerio and pynrrd, DICOM SEG with highdicom, pydicom and
dciodvfy from dicom3tools (skipped without it, a failure in CI). Geometry is checked on RAS, LPS, oblique and
anisotropic grids: the labels must come back on exactly the grid they were written on.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import dicom_factory as factory
import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import TINY_RECIPE, dciodvfy_errors

from volseg.data.dicom import read_series
from volseg.data.writers import (
    FORMATS,
    SegmentInfo,
    default_color,
    segments_from_recipe,
    write_probabilities,
    write_segmentation,
)
from volseg.errors import UserError
from volseg.recipe import recipe_from_dict

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
LIVER = SegmentInfo(
    "liver", 1, (221, 130, 101), ("SCT", "123037004", "Anatomical Structure"), ("SCT", "10200004", "Liver")
)
TUMOUR = SegmentInfo("tumour", 3)  # no colour, no codes; value 3 so segment numbers must be remapped
VESSEL = SegmentInfo("vessel", 2, (0, 151, 206), type=("SCT", "59820001", "Blood vessel"))  # absent from labels
SEGMENTS = [LIVER, VESSEL, TUMOUR]
ALGORITHM = {"name": "volseg", "version": "0.1.0", "bundle": "tiny_liver", "bundle_version": "1.2.3"}

AFFINES = {
    "ras": np.array([[0.9, 0, 0, -40.0], [0, 1.1, 0, -30.5], [0, 0, 3.0, 12.25], [0, 0, 0, 1]]),
    "lps": factory.axial_affine(),
    "oblique": factory.oblique_affine(),
    "coronal": factory.coronal_affine(),
}
SLICER_LIVER = (
    "TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical "
    "Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^|"
)
SLICER_VESSEL = (
    "TerminologyEntry:Segmentation category and type - 3D Slicer General Anatomy list~SCT^85756007^Tissue"
    "~SCT^59820001^Blood vessel~^^~Anatomic codes - DICOM master list~^^~^^|"
)


def make_labels(shape: tuple[int, int, int] = (12, 10, 8)) -> np.ndarray:
    """Two asymmetric blobs (values 1 and 3) that touch no border on most axes, so flips and transposes show."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[2:6, 3:8, 1:4] = 1
    labels[3, 2, 4] = 1  # a lone voxel: extent and frame k=4
    labels[7:11, 1:3, 5:7] = 3
    return labels


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# --------------------------------------------------------------------------------------------------------
# Arguments


def test_segments_from_recipe() -> None:
    segments = segments_from_recipe(recipe_from_dict(TINY_RECIPE))
    assert [(s.name, s.value, s.color) for s in segments] == [("liver", 1, (221, 130, 101)), ("tumour", 2, None)]
    assert all(s.category is None and s.type is None for s in segments)


def test_unknown_format_lists_valid_ones(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown output format 'mha'") as err:
        write_segmentation(make_labels(), AFFINES["ras"], tmp_path / "c", ["nifti", "mha"], SEGMENTS)
    assert all(fmt in str(err.value) for fmt in FORMATS)
    assert files_in(tmp_path) == []


def test_dicom_seg_needs_dicom_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="DICOM SEG output needs DICOM input"):
        write_segmentation(make_labels(), AFFINES["ras"], tmp_path / "c", ["nifti", "dicom-seg"], SEGMENTS)
    assert files_in(tmp_path) == []  # checked before anything is written


def test_undescribed_label_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"label values \[3\]"):
        write_segmentation(make_labels(), AFFINES["ras"], tmp_path / "c", ["nrrd"], [LIVER])


# --------------------------------------------------------------------------------------------------------
# NIfTI


@pytest.mark.parametrize("name", list(AFFINES))
def test_nifti(tmp_path: Path, name: str) -> None:
    labels, affine = make_labels(), AFFINES[name]
    (path,) = write_segmentation(labels, affine, tmp_path / "case_seg", ["nifti"], SEGMENTS)
    assert path == tmp_path / "case_seg.nii.gz"
    img = nib.load(path)
    assert img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asarray(img.dataobj), labels)
    for matrix, code in (img.header.get_qform(coded=True), img.header.get_sform(coded=True)):
        assert code == 1
        np.testing.assert_allclose(matrix, affine, atol=1e-4)
    assert files_in(tmp_path) == ["case_seg.nii.gz"]


def test_nifti_keeps_reference_header(tmp_path: Path) -> None:
    affine = AFFINES["oblique"]
    ref = nib.Nifti1Image(np.zeros((12, 10, 8), np.int16), affine)
    ref.set_qform(affine, code=2)  # aligned
    ref.set_sform(affine, code=4)  # MNI, say
    ref.header.set_xyzt_units("mm", "msec")
    nib.save(ref, tmp_path / "scan.nii.gz")
    ref_header = nib.load(tmp_path / "scan.nii.gz").header
    labels = make_labels()
    (path,) = write_segmentation(
        labels, affine, tmp_path / "seg", ["nifti"], SEGMENTS, reference_nifti=tmp_path / "scan.nii.gz"
    )
    img = nib.load(path)
    header = img.header
    assert header["qform_code"] == 2 and header["sform_code"] == 4
    for key in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z"):
        assert header[key] == ref_header[key], key
    for key in ("srow_x", "srow_y", "srow_z", "pixdim"):
        assert np.array_equal(header[key], ref_header[key]), key
    assert header.get_xyzt_units() == ("mm", "msec")
    assert img.get_data_dtype() == np.uint8 and np.array_equal(np.asarray(img.dataobj), labels)
    np.testing.assert_array_equal(img.affine, nib.load(tmp_path / "scan.nii.gz").affine)

    with pytest.raises(UserError, match="not the same grid"):
        write_segmentation(
            labels[:, :, :5], affine, tmp_path / "bad", ["nifti"], SEGMENTS, reference_nifti=tmp_path / "scan.nii.gz"
        )
    assert not (tmp_path / "bad.nii.gz").exists()


def test_probabilities(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 12, 10, 8))
    probs = (np.exp(logits) / np.exp(logits).sum(axis=0)).astype(np.float32)
    affine = AFFINES["oblique"]
    path = write_probabilities(probs, affine, tmp_path / "case_probs.nii.gz")
    img = nib.load(path)
    assert img.shape == (12, 10, 8, 3)
    assert img.get_data_dtype().itemsize == 2
    np.testing.assert_allclose(img.get_fdata(), np.moveaxis(probs, 0, -1), atol=1e-5)
    np.testing.assert_allclose(img.header.get_sform(), affine, atol=1e-4)
    with pytest.raises(ValueError, match="within"):
        write_probabilities(logits.astype(np.float32), affine, tmp_path / "logits.nii.gz")
    assert files_in(tmp_path) == ["case_probs.nii.gz"]


# --------------------------------------------------------------------------------------------------------
# NRRD and .seg.nrrd


@pytest.mark.parametrize("name", list(AFFINES))
def test_nrrd(tmp_path: Path, name: str) -> None:
    nrrd = pytest.importorskip("nrrd", reason="pynrrd reads the NRRD back")
    labels, affine = make_labels(), AFFINES[name]
    (path,) = write_segmentation(labels, affine, tmp_path / "case_seg", ["nrrd"], SEGMENTS)
    assert path == tmp_path / "case_seg.nrrd"
    data, header = nrrd.read(str(path))
    assert header["space"] == "left-posterior-superior" and header["encoding"] == "gzip"
    assert data.dtype == np.uint8 and np.array_equal(data, labels)
    lps = LPS @ affine
    np.testing.assert_allclose(header["space directions"], lps[:3, :3].T, atol=1e-12)  # one row per axis
    np.testing.assert_allclose(header["space origin"], lps[:3, 3], atol=1e-12)


@pytest.mark.parametrize("name", ["lps", "oblique"])
def test_seg_nrrd(tmp_path: Path, name: str) -> None:
    nrrd = pytest.importorskip("nrrd", reason="pynrrd reads the .seg.nrrd header")
    slicerio = pytest.importorskip("slicerio", reason="slicerio reads the .seg.nrrd as 3D Slicer would")
    labels, affine = make_labels(), AFFINES[name]
    (path,) = write_segmentation(labels, affine, tmp_path / "case_seg", ["seg.nrrd"], SEGMENTS)
    assert path == tmp_path / "case_seg.seg.nrrd"

    seg = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(seg["ijkToLPS"], LPS @ affine, atol=1e-12)
    assert np.array_equal(seg["voxels"], labels)
    assert seg["masterRepresentation"] == "Binary labelmap"
    assert seg["containedRepresentationNames"] == ["Binary labelmap"]
    assert seg["referenceImageExtentOffset"] == [0, 0, 0]
    (geometry,) = [p for p in seg["conversionParameters"] if p["name"] == "Reference image geometry"]
    values = [float(v) for v in geometry["value"].split(";") if v]
    np.testing.assert_allclose(np.reshape(values[:16], (4, 4)), affine, atol=1e-12)  # image-to-RAS, row-major
    assert values[16:] == [0, 11, 0, 9, 0, 7]

    by_name = {s["name"]: s for s in seg["segments"]}
    assert list(by_name) == ["liver", "vessel", "tumour"]
    for seg_info in SEGMENTS:
        s = by_name[seg_info.name]
        assert s["id"] == seg_info.name and s["labelValue"] == seg_info.value and s["layer"] == 0
        assert s["nameAutoGenerated"] is False
        rgb = seg_info.color or default_color(SEGMENTS.index(seg_info))
        assert s["color"] == pytest.approx([c / 255 for c in rgb], abs=1e-6)
        assert s["colorAutoGenerated"] is (seg_info.color is None)
        mask = np.nonzero(labels == seg_info.value)
        if mask[0].size:
            assert s["extent"] == [v for axis in mask for v in (int(axis.min()), int(axis.max()))]
        else:
            assert s["extent"] == [0, -1, 0, -1, 0, -1]
    assert by_name["liver"]["extent"] == [2, 5, 2, 7, 1, 4]
    assert by_name["liver"]["terminology"] == {
        "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
        "category": ["SCT", "123037004", "Anatomical Structure"],
        "type": ["SCT", "10200004", "Liver"],
        "anatomicContextName": "Anatomic codes - DICOM master list",
    }
    assert "terminology" not in by_name["tumour"]

    header = nrrd.read_header(str(path))
    assert header["Segment0_Tags"] == SLICER_LIVER
    assert header["Segment1_Tags"] == SLICER_VESSEL  # type only: category defaults to Tissue
    assert header["Segment2_Tags"] == ""
    assert header["Segment0_Color"] == "0.866667 0.509804 0.396078"
    assert header["Segmentation_MasterRepresentation"] == "Binary labelmap"
    assert header["Segmentation_ContainedRepresentationNames"] == "Binary labelmap|"
    assert header["Segmentation_ReferenceImageExtentOffset"] == "0 0 0"
    assert header["kinds"] == ["domain", "domain", "domain"] and header["type"] == "unsigned char"
    head = path.read_bytes().split(b"\n\n", 1)[0].decode()
    assert head.startswith("NRRD0004\n")


# --------------------------------------------------------------------------------------------------------
# Temporary names


def test_failure_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels, affine = make_labels(), AFFINES["ras"]
    write_segmentation(labels, affine, tmp_path / "case", ["nrrd"], SEGMENTS)
    before = (tmp_path / "case.nrrd").read_bytes()

    def broken_write(self: gzip.GzipFile, data: bytes) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gzip.GzipFile, "write", broken_write)
    with pytest.raises(OSError, match="No space left"):
        write_segmentation(np.where(labels == 3, 2, labels), affine, tmp_path / "case", ["nrrd"], SEGMENTS)
    with pytest.raises(OSError, match="No space left"):
        write_segmentation(labels, affine, tmp_path / "other", ["seg.nrrd"], SEGMENTS)
    monkeypatch.undo()

    def broken_rename(src: str | Path, dst: str | Path) -> None:
        raise KeyboardInterrupt  # the temporary file is complete, the rename never happens

    import volseg.fileio

    monkeypatch.setattr(volseg.fileio.os, "replace", broken_rename)
    with pytest.raises(KeyboardInterrupt):
        write_segmentation(labels, affine, tmp_path / "case", ["nifti"], SEGMENTS)
    assert files_in(tmp_path) == ["case.nrrd"]  # no temporary files, no partial outputs
    assert (tmp_path / "case.nrrd").read_bytes() == before  # the earlier output is untouched


# --------------------------------------------------------------------------------------------------------
# DICOM SEG


@pytest.fixture(scope="module", params=["lps", "oblique"])
def dicom_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A CT series, the volume read_series makes of it, labels on that grid and the DICOM SEG written for them."""
    pytest.importorskip("highdicom", reason="highdicom writes DICOM SEG")
    root = tmp_path_factory.mktemp(f"seg_{request.param}")
    factory.write_series(root / "ct", factory.phantom((12, 10, 8)), AFFINES[request.param], seed=3)
    volume = read_series(root / "ct")
    labels = make_labels(volume.array.shape)
    paths = write_segmentation(
        labels,
        volume.affine,
        root / "out" / "case_seg",
        ["dicom-seg", "nifti"],
        SEGMENTS,
        dicom_series_files=volume.series.files,
        algorithm=ALGORITHM,
    )
    return {"volume": volume, "labels": labels, "paths": paths, "root": root}


def source_sop_uids_in_slice_order(files: list[Path]) -> list[str]:
    """SOPInstanceUIDs sorted by position along the slice normal: read_series's k order."""
    items = []
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        items.append((float(np.array(ds.ImagePositionPatient, dtype=float) @ normal), str(ds.SOPInstanceUID)))
    return [uid for _, uid in sorted(items)]


def test_dicom_seg_frames_match_labels(dicom_case: dict) -> None:
    """Every stored frame sits on a slice of the labels' grid and equals that slice's mask; empty ones are absent."""
    labels, affine = dicom_case["labels"], dicom_case["volume"].affine
    path = dicom_case["paths"][0]
    assert path.name == "case_seg.dcm" and dicom_case["paths"][1].name == "case_seg.nii.gz"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4" and ds.SegmentationType == "BINARY"
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    spacing = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)  # (between rows, between cols)
    lps = LPS @ affine
    np.testing.assert_allclose(iop[:3] * spacing[1], lps[:3, 0], atol=1e-4)  # i: along a row, column index
    np.testing.assert_allclose(iop[3:] * spacing[0], lps[:3, 1], atol=1e-4)  # j: down a column, row index
    assert (ds.Rows, ds.Columns) == (labels.shape[1], labels.shape[0])

    values = {n: s.value for n, s in enumerate(SEGMENTS, start=1)}
    frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    seen = set()
    inverse = np.linalg.inv(lps)
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        position = np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        ijk = (inverse @ np.append(position, 1.0))[:3]
        np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-4)  # on the grid, at i = j = 0
        i, j, k = (int(v) for v in np.round(ijk))
        assert (i, j) == (0, 0)
        assert np.array_equal(frame, (labels[:, :, k] == values[number]).T.astype(frame.dtype))
        assert frame.any()
        seen.add((number, k))
    expected = {(n, k) for n, v in values.items() for k in range(labels.shape[2]) if (labels[:, :, k] == v).any()}
    assert seen == expected  # every non-empty frame, no empty one (segment 2 "vessel" has no frames at all)


def test_dicom_seg_read_back_with_highdicom(dicom_case: dict) -> None:
    hd = pytest.importorskip("highdicom")
    volume, labels = dicom_case["volume"], dicom_case["labels"]
    seg = hd.seg.segread(dicom_case["paths"][0])
    sources = [pydicom.dcmread(f, stop_before_pixels=True) for f in volume.series.files]
    first = sources[0]

    # References to the source series.
    assert seg.StudyInstanceUID == first.StudyInstanceUID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID
    (ref_series,) = seg.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == volume.series.uid
    assert {str(r.ReferencedSOPInstanceUID) for r in ref_series.ReferencedInstanceSequence} == {
        str(s.SOPInstanceUID) for s in sources
    }
    assert {str(r.ReferencedSOPClassUID) for r in ref_series.ReferencedInstanceSequence} == {str(first.SOPClassUID)}

    # Masks by source instance, in read_series's slice order: (k, rows, columns, segment).
    uids = source_sop_uids_in_slice_order(volume.series.files)
    masks = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2, 3])
    for n, s in enumerate(SEGMENTS):
        assert np.array_equal(masks[..., n], (labels == s.value).transpose(2, 1, 0)), s.name

    # Segment descriptions.
    described = seg.SegmentSequence
    assert [d.SegmentLabel for d in described] == ["liver", "vessel", "tumour"]
    assert [d.SegmentNumber for d in described] == [1, 2, 3]
    codes = [(d.SegmentedPropertyCategoryCodeSequence[0], d.SegmentedPropertyTypeCodeSequence[0]) for d in described]
    triples = [tuple((c.CodingSchemeDesignator, c.CodeValue, c.CodeMeaning) for c in pair) for pair in codes]
    tissue = ("SCT", "85756007", "Tissue")
    assert triples == [(LIVER.category, LIVER.type), (tissue, VESSEL.type), (tissue, tissue)]
    for n, d in enumerate(described):
        rgb = SEGMENTS[n].color or default_color(n)
        assert list(d.RecommendedDisplayCIELabValue) == list(hd.color.CIELabColor.from_rgb(*rgb).value)
        assert d.SegmentAlgorithmType == "AUTOMATIC"
        (algo,) = d.SegmentationAlgorithmIdentificationSequence
        assert algo.AlgorithmName == "volseg" and algo.AlgorithmVersion == "0.1.0"
        assert algo.AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
        assert "tiny_liver" in algo.AlgorithmParameters and "1.2.3" in algo.AlgorithmParameters
    assert "tiny_liver 1.2.3" in seg.ContentDescription and "tiny_liver 1.2.3" in seg.SeriesDescription


def test_dicom_seg_validates(dicom_case: dict) -> None:
    errors = dciodvfy_errors(dicom_case["paths"][0])
    assert not errors, "\n".join(errors)


def test_dicom_seg_resampled_series(tmp_path: Path) -> None:
    """A series with a missing slice is resampled by read_series: frames follow the labels' grid, not the files."""
    hd = pytest.importorskip("highdicom", reason="highdicom writes DICOM SEG")
    factory.write_series(tmp_path / "ct", factory.phantom((12, 10, 8)), AFFINES["lps"], drop=(4,))
    volume = read_series(tmp_path / "ct")
    assert volume.warnings and volume.array.shape == (12, 10, 8)
    labels = make_labels(volume.array.shape)
    (path,) = write_segmentation(
        labels, volume.affine, tmp_path / "seg", ["dicom-seg"], SEGMENTS, dicom_series_files=volume.series.files
    )
    seg = hd.seg.segread(path)
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 7
    got = seg.get_volume(combine_segments=True, relabel=False)
    # Put highdicom's volume (slice, row, column indices; LPS affine) back on the labels' grid.
    index = np.stack(np.meshgrid(*(np.arange(n) for n in got.array.shape), indexing="ij"), axis=-1)
    to_ours = np.linalg.inv(LPS @ volume.affine) @ got.affine
    ijk = index @ to_ours[:3, :3].T + to_ours[:3, 3]
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-4)
    ijk = np.round(ijk).astype(int)
    back = np.zeros_like(labels)
    back[ijk[..., 0], ijk[..., 1], ijk[..., 2]] = np.asarray(got.array)
    numbers = np.zeros_like(labels)
    for n, s in enumerate(SEGMENTS, start=1):
        numbers[labels == s.value] = n
    assert np.array_equal(back, numbers)
    assert not dciodvfy_errors(path)


def test_dicom_seg_enhanced_source(tmp_path: Path) -> None:
    """An Enhanced CT source (one multi-frame file, frames shuffled): frames reference source frame numbers."""
    hd = pytest.importorskip("highdicom", reason="highdicom writes DICOM SEG")
    source = factory.write_multiframe(
        tmp_path / "ct" / "enhanced.dcm", factory.phantom((12, 10, 8)), AFFINES["oblique"]
    )
    volume = read_series(tmp_path / "ct")
    labels = make_labels(volume.array.shape)
    (path,) = write_segmentation(
        labels, volume.affine, tmp_path / "seg", ["dicom-seg"], SEGMENTS, dicom_series_files=[source]
    )
    seg = hd.seg.segread(path)
    src = pydicom.dcmread(source, stop_before_pixels=True)
    inverse = np.linalg.inv(LPS @ volume.affine)
    k_of_frame = [
        int(round((inverse @ np.append(np.array(f.PlanePositionSequence[0].ImagePositionPatient, float), 1.0))[2]))
        for f in src.PerFrameFunctionalGroupsSequence
    ]
    frames_in_k_order = [k_of_frame.index(k) + 1 for k in range(labels.shape[2])]
    masks = seg.get_pixels_by_source_frame(
        str(src.SOPInstanceUID), frames_in_k_order, segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True
    )
    for n, s in enumerate(SEGMENTS):
        assert np.array_equal(masks[..., n], (labels == s.value).transpose(2, 1, 0)), s.name
    assert not dciodvfy_errors(path)


def test_dicom_seg_without_segmented_voxels(tmp_path: Path) -> None:
    hd = pytest.importorskip("highdicom", reason="highdicom writes DICOM SEG")
    files = factory.write_series(tmp_path / "ct", factory.phantom((6, 5, 3)), AFFINES["lps"])
    volume = read_series(tmp_path / "ct")
    labels = np.zeros(volume.array.shape, np.uint8)
    (path,) = write_segmentation(
        labels, volume.affine, tmp_path / "seg", ["dicom-seg"], [LIVER], dicom_series_files=files
    )
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames >= 1 and not seg.pixel_array.any()  # a SEG needs a frame: empty ones are kept
    assert not dciodvfy_errors(path)


def test_dicom_seg_from_anonymized_series(tmp_path: Path) -> None:
    """Sources without the patient/study attributes highdicom copies (dropped by an anonymizer) still work."""
    hd = pytest.importorskip("highdicom", reason="highdicom writes DICOM SEG")
    files = factory.write_series(tmp_path / "ct", factory.phantom((6, 5, 3)), AFFINES["oblique"])
    dropped = ("PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyTime")
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword in dropped:
            delattr(ds, keyword)
        ds.save_as(f, enforce_file_format=True)
    volume = read_series(tmp_path / "ct")
    labels = np.zeros(volume.array.shape, np.uint8)
    labels[1:4, 2:4, 1] = 1
    (path,) = write_segmentation(
        labels, volume.affine, tmp_path / "seg", ["dicom-seg"], [LIVER], dicom_series_files=files
    )
    seg = hd.seg.segread(path)
    assert seg.NumberOfFrames == 1 and seg.PatientID == "PHANTOM1" and seg.PatientBirthDate == ""
    assert not dciodvfy_errors(path)
