"""DICOM series reading: geometry, values, series choice, irregular stacks, compression, errors.

Every series is built by tests/dicom_factory.py from a numpy volume and a RAS affine, read back with
read_series, and compared with what went in: values exactly, affine to 1e-4 mm. Geometry is also checked
against independent readers: dcm2niix (skipped without it, a failure in CI) and SimpleITK's GDCM series reader.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import dicom_factory as factory
import nibabel as nib
import numpy as np
import pydicom
import pytest
from helpers import require_tool
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from volseg.data import dicom
from volseg.data.dicom import DicomVolume, choose_series, list_series, read_series
from volseg.errors import UserError

AFFINE_TOL = 1e-4
SHAPE = (10, 12, 8)
# JPEG 2000 encoders use 6 wavelet levels by default, which need at least 32 pixels a side.
COMPRESSED_SHAPE = (32, 34, 6)

ORIENTATIONS = {
    "axial": factory.axial_affine(),
    "coronal": factory.coronal_affine(),
    "oblique": factory.oblique_affine(),
    # slices written head to feet: the reader must turn them round (k runs along +normal)
    "axial_reversed": factory.affine_from((1, 0, 0), (0, 1, 0), (0.6, 0.6, 1.0), (-90, -80, 40), (0, 0, -1.25)),
}


def assert_round_trip(vol: DicomVolume, volume: np.ndarray, affine: np.ndarray) -> None:
    want_array, want_affine = factory.expected(volume, affine)
    assert vol.array.dtype == np.float32
    assert vol.array.shape == want_array.shape
    np.testing.assert_array_equal(vol.array, want_array)
    np.testing.assert_allclose(vol.affine, want_affine, rtol=0, atol=AFFINE_TOL)


def encoder_available(transfer_syntax: str) -> bool:
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLosslessSV1):
        return True
    if transfer_syntax == JPEGBaseline8Bit:
        return pytest.importorskip("PIL") is not None
    return bool(pydicom.pixels.get_encoder(transfer_syntax).is_available)


# ----------------------------------------------------------------------------------------------------------
# Geometry and values


@pytest.mark.parametrize("name", sorted(ORIENTATIONS))
def test_round_trip_orientations(tmp_path: Path, name: str) -> None:
    affine = ORIENTATIONS[name]
    volume = factory.phantom(SHAPE, step=0.5)
    files = factory.write_series(tmp_path, volume, affine, slope=0.5, intercept=-1024)

    vol = read_series(tmp_path)

    assert_round_trip(vol, volume, affine)
    assert vol.warnings == []
    assert vol.series.n_slices == SHAPE[2] and vol.series.modality == "CT"
    # the factory shuffles: neither file names nor InstanceNumbers follow the slice position
    positions = [float(pydicom.dcmread(p).SliceLocation) for p in sorted(files)]
    numbers = [int(pydicom.dcmread(p).InstanceNumber) for p in sorted(files)]
    assert positions != sorted(positions) and positions != sorted(positions, reverse=True)
    assert sorted(numbers, key=lambda n: positions[numbers.index(n)]) != sorted(numbers)


def test_affine_is_nibabel_ras(tmp_path: Path) -> None:
    """The first voxel sits at the IPP of the lowest slice, with x and y negated (LPS -> RAS)."""
    affine = factory.axial_affine()
    factory.write_series(tmp_path, factory.phantom(SHAPE), affine)
    vol = read_series(tmp_path)
    ipps = [np.array(pydicom.dcmread(p).ImagePositionPatient, float) for p in tmp_path.iterdir()]
    lowest = min(ipps, key=lambda p: p[2])
    np.testing.assert_allclose(vol.affine[:3, 3], lowest * [-1, -1, 1], atol=AFFINE_TOL)
    assert nib.aff2axcodes(vol.affine) == ("L", "P", "S")
    np.testing.assert_allclose(nib.affines.voxel_sizes(vol.affine), [0.7, 0.8, 2.5], atol=AFFINE_TOL)


def test_mr_and_implicit_vr(tmp_path: Path) -> None:
    affine = factory.sagittal_affine(spacing=(0.9, 0.9, 4.0))
    volume = factory.phantom(SHAPE, low=0, high=4000)
    factory.write_series(tmp_path, volume, affine, modality="MR", transfer_syntax=ImplicitVRLittleEndian)
    vol = read_series(tmp_path)
    assert_round_trip(vol, volume, affine)
    assert vol.series.modality == "MR"


def test_file_without_preamble(tmp_path: Path) -> None:
    """ACR-NEMA style files (no preamble, no file meta) still count as DICOM."""
    volume = factory.phantom(SHAPE)
    affine = factory.axial_affine()
    for path in factory.write_series(tmp_path, volume, affine, transfer_syntax=ImplicitVRLittleEndian):
        ds = pydicom.dcmread(path)
        del ds.file_meta
        ds.preamble = None
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        assert path.read_bytes()[:2] == b"\x08\x00"
    assert_round_trip(read_series(tmp_path), volume, affine)


# ----------------------------------------------------------------------------------------------------------
# Series choice


def build_study(folder: Path) -> dict[str, str]:
    """A main CT, a shorter CT, a lone sagittal scout, a LOCALIZER-typed long series, an MR, and clutter."""
    uids = {key: pydicom.uid.generate_uid() for key in ("main", "short", "scout", "topogram", "mr")}
    study = pydicom.uid.generate_uid()
    factory.write_series(
        folder / "a",
        factory.phantom((10, 12, 12)),
        factory.axial_affine(),
        series_uid=uids["main"],
        study_uid=study,
        series_number=2,
        description="main",
    )
    factory.write_series(
        folder / "a",
        factory.phantom((10, 12, 5), seed=1),
        factory.axial_affine(),
        series_uid=uids["short"],
        study_uid=study,
        series_number=3,
        description="short",
    )
    factory.write_series(
        folder / "b" / "c",
        factory.phantom((10, 12, 1), seed=2),
        factory.sagittal_affine(),
        series_uid=uids["scout"],
        study_uid=study,
        series_number=1,
        description="scout",
    )
    factory.write_series(
        folder / "b",
        factory.phantom((10, 12, 20), seed=3),
        factory.coronal_affine(),
        series_uid=uids["topogram"],
        study_uid=study,
        series_number=4,
        description="topo",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    factory.write_series(
        folder / "mr",
        factory.phantom((10, 12, 30), low=0, seed=4),
        factory.axial_affine(),
        modality="MR",
        series_uid=uids["mr"],
        series_number=5,
        description="other",
    )
    factory.write_clutter(folder)
    factory.write_clutter(folder / "b")
    return uids


def test_list_and_choose_series(tmp_path: Path) -> None:
    uids = build_study(tmp_path)
    series = list_series(tmp_path)

    by_uid = {s.uid: s for s in series}
    assert set(by_uid) == set(uids.values())
    assert [s.description for s in series] == ["scout", "main", "short", "topo", "other"]  # SeriesNumber
    assert by_uid[uids["scout"]].is_localizer  # lone image in another plane
    assert by_uid[uids["topogram"]].is_localizer  # ImageType LOCALIZER
    assert not any(by_uid[uids[k]].is_localizer for k in ("main", "short", "mr"))
    assert by_uid[uids["main"]].n_slices == 12 and len(by_uid[uids["main"]].files) == 12
    assert all(p.suffix == ".dcm" for s in series for p in s.files)

    chosen, skipped = choose_series(series)
    assert chosen.uid == uids["mr"]  # the largest CT or MR series that is not a localizer
    assert {s.uid for s in skipped} == set(uids.values()) - {uids["mr"]}

    chosen, skipped = choose_series(series, uids["short"])
    assert chosen.uid == uids["short"] and len(skipped) == 4

    cts = [s for s in series if s.modality == "CT"]
    assert choose_series(cts)[0].uid == uids["main"]
    assert_round_trip(read_series(tmp_path, uids["main"]), factory.phantom((10, 12, 12)), factory.axial_affine())
    vol = read_series(tmp_path)
    assert vol.series.uid == uids["mr"]
    assert_round_trip(vol, factory.phantom((10, 12, 30), low=0, seed=4), factory.axial_affine())


def test_unknown_uid_lists_present(tmp_path: Path) -> None:
    uids = build_study(tmp_path)
    with pytest.raises(UserError) as info:
        read_series(tmp_path, "1.2.3.4")
    message = str(info.value)
    assert message.startswith(str(tmp_path)) and "1.2.3.4" in message and "\n" not in message
    assert all(uid in message for uid in uids.values())


def test_only_localizers_or_other_modalities(tmp_path: Path) -> None:
    factory.write_series(
        tmp_path, factory.phantom((10, 12, 3)), factory.axial_affine(), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    with pytest.raises(UserError, match="no CT or MR series"):
        read_series(tmp_path)
    uid = list_series(tmp_path)[0].uid
    assert read_series(tmp_path, uid).array.shape == (10, 12, 3)  # an explicit UID reads it anyway


def test_three_plane_localizer(tmp_path: Path) -> None:
    volume = factory.phantom((10, 12, 3))
    uid = pydicom.uid.generate_uid()
    sagittal = factory.geometry(factory.sagittal_affine()).orientation
    coronal = factory.geometry(factory.coronal_affine()).orientation
    factory.write_series(
        tmp_path,
        volume,
        factory.axial_affine(),
        series_uid=uid,
        modality="MR",
        image_type=("ORIGINAL", "PRIMARY", "OTHER"),
        orientation_overrides={0: sagittal, 1: coronal},
    )
    (info,) = list_series(tmp_path)
    assert info.is_localizer


@pytest.mark.parametrize("make", ["missing", "empty", "junk", "file"])
def test_no_dicom(tmp_path: Path, make: str) -> None:
    folder = tmp_path / "scan"
    if make == "empty":
        folder.mkdir()
    elif make == "junk":
        factory.write_clutter(folder)
    elif make == "file":
        folder.write_text("not a folder")
    with pytest.raises(UserError) as info:
        read_series(folder)
    assert str(info.value).startswith(str(folder)) and "\n" not in str(info.value)
    if make in ("empty", "junk"):
        assert "no DICOM" in str(info.value)
        assert list_series(folder) == []


def test_damaged_file_is_named(tmp_path: Path) -> None:
    files = factory.write_series(tmp_path, factory.phantom(SHAPE), factory.axial_affine())
    data = files[3].read_bytes()
    files[3].write_bytes(data[: len(data) - 100])  # truncated inside the pixel data
    with pytest.raises(UserError) as info:
        read_series(tmp_path)
    assert str(files[3]) in str(info.value)


def test_duplicate_files_are_ignored(tmp_path: Path) -> None:
    volume = factory.phantom(SHAPE)
    files = factory.write_series(tmp_path / "a", volume, factory.axial_affine())
    (tmp_path / "copy").mkdir()
    shutil.copy(files[0], tmp_path / "copy" / "again.dcm")
    vol = read_series(tmp_path)
    assert_round_trip(vol, volume, factory.axial_affine())
    assert vol.series.n_slices == SHAPE[2]
    assert len(vol.warnings) == 1 and "duplicate" in vol.warnings[0]


# ----------------------------------------------------------------------------------------------------------
# Inconsistent and irregular stacks


def test_inconsistent_orientation(tmp_path: Path) -> None:
    other = factory.geometry(factory.oblique_affine()).orientation
    files = factory.write_series(
        tmp_path, factory.phantom(SHAPE), factory.axial_affine(), orientation_overrides={4: other}
    )
    with pytest.raises(UserError, match="inconsistent ImageOrientationPatient") as info:
        read_series(tmp_path)
    assert str(info.value).startswith(str(tmp_path))
    assert any(str(p) in str(info.value) for p in files)


def test_several_volumes_in_one_series(tmp_path: Path) -> None:
    uid = pydicom.uid.generate_uid()
    factory.write_series(tmp_path, factory.phantom(SHAPE), factory.axial_affine(), series_uid=uid, seed=1)
    factory.write_series(tmp_path, factory.phantom(SHAPE, seed=5), factory.axial_affine(), series_uid=uid, seed=2)
    with pytest.raises(UserError, match="same slice position"):
        read_series(tmp_path)


def test_missing_slice(tmp_path: Path) -> None:
    volume = factory.phantom(SHAPE, step=0.5)
    affine = factory.oblique_affine()
    factory.write_series(tmp_path, volume, affine, slope=0.5, intercept=-1024, drop=[3])

    vol = read_series(tmp_path)

    want = volume.astype(np.float32).copy()
    want[:, :, 3] = (volume[:, :, 2] + volume[:, :, 4]) / 2  # linear between the neighbours
    np.testing.assert_array_equal(vol.array, want)
    np.testing.assert_allclose(vol.affine, affine, atol=AFFINE_TOL)
    assert len(vol.warnings) == 1
    assert "irregular slice spacing" in vol.warnings[0] and "missing" in vol.warnings[0]
    assert "resampled linearly onto 8 slices" in vol.warnings[0]

    with pytest.raises(UserError, match="irregular slice spacing") as info:
        read_series(tmp_path, on_irregular="error")
    assert str(info.value).startswith(str(tmp_path))
    with pytest.raises(UserError, match="on_irregular"):
        read_series(tmp_path, on_irregular="ignore")


def test_uneven_spacing_resampled(tmp_path: Path) -> None:
    # slices at 0, 2, 4, 6, 9, 12 mm along the normal: two spacings in one series
    volume = factory.phantom((10, 12, 6), step=1)
    uid = pydicom.uid.generate_uid()
    base = factory.axial_affine(spacing=(0.7, 0.8, 1.0))
    for k, z in enumerate([0, 2, 4, 6, 9, 12]):
        shifted = base.copy()
        shifted[:3, 3] = base[:3, :] @ [0, 0, z, 1]
        factory.write_series(tmp_path, volume[:, :, k : k + 1], shifted, series_uid=uid, seed=k)
    vol = read_series(tmp_path)
    # median step 2 mm -> 7 slices 2 mm apart from 0 to 12 mm; 8 mm lies between the 6 and 9 mm slices
    assert vol.array.shape == (10, 12, 7)
    np.testing.assert_allclose(nib.affines.voxel_sizes(vol.affine), [0.7, 0.8, 2.0], atol=AFFINE_TOL)
    np.testing.assert_array_equal(vol.array[:, :, :4], volume[:, :, :4])
    np.testing.assert_allclose(vol.array[:, :, 4], volume[:, :, 3] / 3 + volume[:, :, 4] * 2 / 3, rtol=1e-6)
    np.testing.assert_array_equal(vol.array[:, :, 6], volume[:, :, 5])
    assert "irregular slice spacing" in vol.warnings[0]


def tilted_affine(shift_rows: float) -> np.ndarray:
    """Axial stack whose slice origins move ``shift_rows`` rows posterior per slice (gantry tilt)."""
    geo = factory.geometry(factory.axial_affine())
    slice_vec = geo.normal * 2.5 + geo.col_cos * geo.row_step * shift_rows
    return factory.affine_from(geo.row_cos, geo.col_cos, (geo.col_step, geo.row_step, 2.5), geo.origin, slice_vec)


def test_gantry_tilt_whole_rows(tmp_path: Path) -> None:
    volume = factory.phantom(SHAPE, step=0.5)
    factory.write_series(tmp_path, volume, tilted_affine(1.0), slope=0.5, intercept=-1024)

    vol = read_series(tmp_path)

    want = np.full(SHAPE, volume.min(), dtype=np.float32)
    for k in range(SHAPE[2]):  # slice k moved k rows: on the orthogonal grid, row j holds its row j - k
        want[:, k:, k] = volume[:, : SHAPE[1] - k, k]
    np.testing.assert_array_equal(vol.array, want)
    np.testing.assert_allclose(vol.affine, factory.axial_affine(), atol=AFFINE_TOL)  # orthogonal grid
    assert len(vol.warnings) == 1 and "gantry tilt" in vol.warnings[0]

    with pytest.raises(UserError, match="gantry tilt"):
        read_series(tmp_path, on_irregular="error")


def test_gantry_tilt_fraction(tmp_path: Path) -> None:
    shape = (10, 16, 6)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    volume = (10 * j + 100 * k + i).astype(np.float64)  # linear in j: bilinear resampling is exact
    factory.write_series(tmp_path, volume, tilted_affine(0.4))
    vol = read_series(tmp_path)
    shift = 0.4 * k
    inside = j >= np.ceil(shift)
    np.testing.assert_allclose(vol.array[inside], (10 * (j - shift) + 100 * k + i)[inside], atol=1e-3)
    assert "7.29 degrees" in vol.warnings[0]  # atan(0.4 rows * 0.8 mm / 2.5 mm)


# ----------------------------------------------------------------------------------------------------------
# Enhanced multi-frame


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_enhanced_multiframe(tmp_path: Path, modality: str) -> None:
    volume = factory.phantom(SHAPE, step=0.5)
    affine = factory.oblique_affine()
    intercepts = [-1024.0, -1000.0] * (SHAPE[2] // 2)  # rescale differs per frame
    factory.write_multiframe(
        tmp_path / "enhanced.dcm", volume, affine, modality=modality, slope=0.5, intercept=intercepts
    )
    vol = read_series(tmp_path)
    assert_round_trip(vol, volume, affine)
    assert vol.series.is_multiframe and vol.series.n_slices == SHAPE[2] and len(vol.series.files) == 1
    assert vol.warnings == []


def test_enhanced_multiframe_compressed_shared_rescale(tmp_path: Path) -> None:
    volume = factory.phantom(SHAPE, step=0.5)
    affine = ORIENTATIONS["axial_reversed"]
    factory.write_multiframe(
        tmp_path / "enhanced.dcm",
        volume,
        affine,
        slope=0.5,
        intercept=-1024,
        shared_rescale=True,
        transfer_syntax=RLELossless,
    )
    assert_round_trip(read_series(tmp_path), volume, affine)


def test_enhanced_multiframe_missing_frame_geometry(tmp_path: Path) -> None:
    path = factory.write_multiframe(tmp_path / "enhanced.dcm", factory.phantom(SHAPE), factory.axial_affine())
    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence
    ds.save_as(path)
    with pytest.raises(UserError, match="ImagePositionPatient missing .frame 3."):
        read_series(tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Compressed pixel data

LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1]


@pytest.mark.parametrize("transfer_syntax", LOSSLESS, ids=lambda uid: uid.keyword)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_compressed_lossless(tmp_path: Path, transfer_syntax: str, signed: bool) -> None:
    if not encoder_available(transfer_syntax):
        pytest.skip(f"no pydicom encoder plugin for {transfer_syntax} installed")
    if signed:
        volume, slope, intercept = factory.phantom(COMPRESSED_SHAPE, low=-2000, high=3000), 1.0, 0.0
    else:
        volume, slope, intercept = factory.phantom(COMPRESSED_SHAPE, step=0.5), 0.5, -1024.0
    affine = factory.oblique_affine()
    files = factory.write_series(
        tmp_path, volume, affine, slope=slope, intercept=intercept, transfer_syntax=transfer_syntax
    )
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == transfer_syntax
    assert_round_trip(read_series(tmp_path), volume, affine)


def test_compressed_jpeg_baseline(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    volume = factory.phantom(COMPRESSED_SHAPE, low=-100, high=155)  # 8-bit stored values
    affine = factory.coronal_affine()
    factory.write_series(tmp_path, volume, affine, intercept=-100, transfer_syntax=JPEGBaseline8Bit)
    vol = read_series(tmp_path)
    want_array, want_affine = factory.expected(volume, affine)
    np.testing.assert_allclose(vol.affine, want_affine, atol=AFFINE_TOL)
    error = np.abs(vol.array - want_array)  # lossy: close, not equal
    assert error.max() <= 16 and error.mean() < 3


def test_unsupported_transfer_syntax(tmp_path: Path) -> None:
    files = factory.write_series(tmp_path, factory.phantom(SHAPE), factory.axial_affine())
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.PixelData = encapsulate([bytes(64)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(files[0])
    with pytest.raises(UserError, match="MPEG2") as info:
        read_series(tmp_path)
    assert str(info.value).startswith(str(files[0])) and "\n" not in str(info.value)


def test_missing_decoder_plugin_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not encoder_available(JPEG2000Lossless):
        pytest.skip("no JPEG 2000 encoder")
    volume = factory.phantom(COMPRESSED_SHAPE)
    files = factory.write_series(tmp_path, volume, factory.axial_affine(), transfer_syntax=JPEG2000Lossless)

    class Unavailable:  # what pydicom reports when no plugin for the syntax is installed
        is_available = False

    monkeypatch.setattr(dicom, "get_decoder", lambda uid: Unavailable())
    with pytest.raises(UserError, match="pip install pylibjpeg pylibjpeg-openjpeg") as info:
        read_series(tmp_path)
    assert "JPEG 2000" in str(info.value) and any(str(info.value).startswith(str(p)) for p in files)


# ----------------------------------------------------------------------------------------------------------
# The files pydicom ships


def copy_testdata(tmp_path: Path, name: str) -> Path:
    source = get_testdata_file(name, download=False)
    if source is None:
        pytest.skip(f"{name} not shipped with this pydicom")
    folder = tmp_path / Path(name).stem
    folder.mkdir()
    shutil.copy(source, folder / name)
    return folder


def expected_single(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Values and affine of a one-image file, worked out directly from its attributes."""
    ds = pydicom.dcmread(path)
    values = ds.pixel_array.T.astype(np.float64) * float(ds.get("RescaleSlope", 1))
    values += float(ds.get("RescaleIntercept", 0))
    iop = np.array(ds.ImageOrientationPatient, float)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * dc
    lps[:3, 1] = iop[3:] * dr
    thickness = float(ds.get("SpacingBetweenSlices", ds.SliceThickness))  # dcm2niix's choice too
    lps[:3, 2] = np.cross(iop[:3], iop[3:]) * thickness
    lps[:3, 3] = np.array(ds.ImagePositionPatient, float)
    return values[:, :, np.newaxis].astype(np.float32), factory.LPS @ lps


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm"])
def test_pydicom_test_files(tmp_path: Path, name: str) -> None:
    folder = copy_testdata(tmp_path, name)
    vol = read_series(folder)
    want_array, want_affine = expected_single(folder / name)
    np.testing.assert_array_equal(vol.array, want_array)
    np.testing.assert_allclose(vol.affine, want_affine, atol=AFFINE_TOL)
    assert vol.warnings == [] and not vol.series.is_localizer
    if vol.series.modality == "CT":
        assert -1100 <= np.median(vol.array) <= 1500  # Hounsfield units


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
    ],
)
def test_pydicom_compressed_files_match_uncompressed(tmp_path: Path, name: str) -> None:
    reference = read_series(copy_testdata(tmp_path, "MR_small.dcm"))
    vol = read_series(copy_testdata(tmp_path, name))
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.affine, reference.affine, atol=AFFINE_TOL)


# ----------------------------------------------------------------------------------------------------------
# Agreement with independent readers

AGREEMENT_CASES = {
    "axial": dict(affine=factory.axial_affine()),
    "coronal": dict(affine=factory.coronal_affine()),
    "oblique": dict(affine=factory.oblique_affine()),
    "axial_reversed": dict(affine=ORIENTATIONS["axial_reversed"]),
    "rle": dict(affine=factory.oblique_affine(), transfer_syntax=RLELossless),
    "jpeg_lossless": dict(affine=factory.axial_affine(), transfer_syntax=JPEGLosslessSV1),
    "jpeg2000": dict(affine=factory.coronal_affine(), transfer_syntax=JPEG2000Lossless),
    "jpeg_ls": dict(affine=factory.axial_affine(), transfer_syntax=JPEGLSLossless),
    "enhanced": dict(affine=factory.oblique_affine(), multiframe=True),
}


def write_case(folder: Path, case: str) -> str:
    """Write one agreement case; return its transfer syntax."""
    spec = AGREEMENT_CASES[case]
    transfer_syntax = spec.get("transfer_syntax", ExplicitVRLittleEndian)
    if not encoder_available(transfer_syntax):
        pytest.skip(f"no pydicom encoder plugin for {transfer_syntax}")
    volume = factory.phantom(COMPRESSED_SHAPE, step=0.5)
    if spec.get("multiframe"):
        factory.write_multiframe(folder / "enhanced.dcm", volume, spec["affine"], slope=0.5, intercept=-1024)
    else:
        factory.write_series(
            folder, volume, spec["affine"], slope=0.5, intercept=-1024, transfer_syntax=transfer_syntax
        )
    return transfer_syntax


def compare_grids(ours: DicomVolume, affine: np.ndarray, data: np.ndarray) -> tuple[float, bool]:
    """Match another reader's voxel grid to ours (it may flip or permute axes) and compare.

    Returns the largest distance in mm between the world positions that the two affines give to the corners
    of the volume, and whether every voxel holds the same value at the same place.
    """
    mapping = np.linalg.inv(affine) @ ours.affine  # our voxel index -> theirs
    rounded = np.round(mapping)
    assert np.abs(mapping - rounded).max() < 1e-3, f"grids do not line up:\n{mapping}"
    assert sorted(np.abs(rounded[:3, :3]).sum(axis=0)) == [1, 1, 1]  # a signed permutation
    shape = ours.array.shape
    corners = np.array(
        [[x, y, z, 1.0] for x in (-0.5, shape[0] - 0.5) for y in (-0.5, shape[1] - 0.5) for z in (-0.5, shape[2] - 0.5)]
    ).T
    distance = float(np.abs(ours.affine @ corners - affine @ (rounded @ corners)).max())
    index = np.indices(shape).reshape(3, -1)
    theirs = rounded[:3, :3].astype(int) @ index + rounded[:3, 3:].astype(int)
    if np.any(theirs < 0) or np.any(theirs >= np.array(data.shape[:3])[:, None]):
        return distance, False
    values = data[theirs[0], theirs[1], theirs[2]].reshape(shape)
    return distance, bool(np.array_equal(values.astype(np.float32), ours.array))


JPEG_LS = {str(JPEGLSLossless), str(JPEGLSNearLossless)}


def dcm2niix(folder: Path, out: Path, transfer_syntax: str) -> nib.Nifti1Image:
    """Convert ``folder`` with dcm2niix (skip without it, fail in CI).

    The one skip kept in CI too: a dcm2niix build without JPEG-LS support, saying so for JPEG-LS data (a known
    limitation of such builds); any other failure to convert fails the test.
    """
    exe = require_tool("dcm2niix", "dcm2niix")
    out.mkdir()
    run = subprocess.run(
        [exe, "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    niftis = sorted(out.glob("*.nii"))
    if not niftis and transfer_syntax in JPEG_LS and "Unsupported transfer syntax" in run.stdout:
        pytest.skip("this dcm2niix build cannot decode JPEG-LS")
    assert len(niftis) == 1, run.stdout + run.stderr
    image: nib.Nifti1Image = nib.load(niftis[0])
    return image


@pytest.mark.parametrize("case", sorted(AGREEMENT_CASES))
def test_agrees_with_dcm2niix(tmp_path: Path, case: str) -> None:
    folder = tmp_path / "dicom"
    transfer_syntax = write_case(folder, case)
    image = dcm2niix(folder, tmp_path / "nifti", transfer_syntax)

    distance, same = compare_grids(read_series(folder), image.affine, np.asarray(image.get_fdata()))

    assert distance < 1e-3
    assert same


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "693_J2KI.dcm"])
def test_pydicom_test_files_agree_with_dcm2niix(tmp_path: Path, name: str) -> None:
    folder = copy_testdata(tmp_path, name)
    image = dcm2niix(folder, tmp_path / "nifti", str(pydicom.dcmread(folder / name).file_meta.TransferSyntaxUID))

    distance, same = compare_grids(read_series(folder), image.affine, np.asarray(image.get_fdata()))

    assert distance < 1e-3
    assert same


@pytest.mark.parametrize("case", sorted(set(AGREEMENT_CASES) - {"enhanced"}))
def test_agrees_with_simpleitk(tmp_path: Path, case: str) -> None:
    sitk = pytest.importorskip("SimpleITK")
    folder = tmp_path / "dicom"
    write_case(folder, case)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    image = reader.Execute()
    lps = np.eye(4)
    lps[:3, :3] = np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    data = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # ITK arrays are (k, j, i)

    distance, same = compare_grids(read_series(folder), factory.LPS @ lps, data)

    assert distance < 1e-3
    assert same
