"""Build small DICOM series for the tests from a numpy volume and a RAS affine.

The volume has axes ``(i, j, k)`` = (column, row, slice) and holds real-world values (HU for CT); the affine
maps ``(i, j, k, 1)`` to RAS millimetres, as in nibabel. The factory turns that into DICOM the way a scanner
would: ImageOrientationPatient from the first two affine columns (in LPS), PixelSpacing from their lengths,
ImagePositionPatient of slice ``k`` from the affine, stored values through RescaleSlope/Intercept. A third
column that is not perpendicular to the first two gives a sheared (gantry-tilted) stack.

:func:`expected` says what a correct reader returns for that input (slices ascending along the normal).

Compressed pixel data: RLE, JPEG-LS lossless and JPEG 2000 lossless through pydicom's own encoders (which need
pylibjpeg-rle or nothing, pyjpegls, and pylibjpeg-openjpeg), JPEG lossless (process 14, first-order
prediction) through :func:`encode_jpeg_lossless` below, written here from ITU-T T.81 annex H, and JPEG
baseline through Pillow (lossy, so only approximately equal).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
ENHANCED_MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
NATIVE = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # RAS <-> LPS (its own inverse)


# ----------------------------------------------------------------------------------------------------------
# Geometry


@dataclass
class Geometry:
    """DICOM geometry of a RAS affine, in LPS."""

    row_cos: np.ndarray  # along i (direction of increasing column index)
    col_cos: np.ndarray  # along j (direction of increasing row index)
    col_step: float  # mm between columns (PixelSpacing[1])
    row_step: float  # mm between rows (PixelSpacing[0])
    slice_vec: np.ndarray  # LPS offset from slice k to slice k+1
    origin: np.ndarray  # LPS position of voxel (0, 0, 0)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cos, self.col_cos)

    @property
    def orientation(self) -> list[float]:
        return [*self.row_cos, *self.col_cos]

    def position(self, k: float) -> np.ndarray:
        return self.origin + k * self.slice_vec


def geometry(affine: np.ndarray) -> Geometry:
    lps = LPS @ np.asarray(affine, dtype=np.float64)
    col_step = float(np.linalg.norm(lps[:3, 0]))
    row_step = float(np.linalg.norm(lps[:3, 1]))
    return Geometry(
        row_cos=lps[:3, 0] / col_step,
        col_cos=lps[:3, 1] / row_step,
        col_step=col_step,
        row_step=row_step,
        slice_vec=lps[:3, 2].copy(),
        origin=lps[:3, 3].copy(),
    )


def affine_from(
    row_cos: Sequence[float],
    col_cos: Sequence[float],
    spacing: Sequence[float],
    origin_lps: Sequence[float],
    slice_vec: Sequence[float] | None = None,
) -> np.ndarray:
    """RAS affine from LPS direction cosines, spacing (along i, j, k) and the LPS origin.

    Without ``slice_vec`` the slices step along ``+row_cos x col_cos`` by ``spacing[2]``.
    """
    r = np.asarray(row_cos, float) / np.linalg.norm(row_cos)
    c = np.asarray(col_cos, float) / np.linalg.norm(col_cos)
    lps = np.eye(4)
    lps[:3, 0] = r * spacing[0]
    lps[:3, 1] = c * spacing[1]
    lps[:3, 2] = np.cross(r, c) * spacing[2] if slice_vec is None else np.asarray(slice_vec, float)
    lps[:3, 3] = origin_lps
    return LPS @ lps


def axial_affine(spacing=(0.7, 0.8, 2.5), origin_lps=(-101.3, -120.25, -50.5)) -> np.ndarray:
    """The usual CT orientation: ImageOrientationPatient 1\\0\\0\\0\\1\\0 (rows go left, columns posterior)."""
    return affine_from((1, 0, 0), (0, 1, 0), spacing, origin_lps)


def coronal_affine(spacing=(0.9, 1.1, 3.0), origin_lps=(-90.0, 30.5, 80.0)) -> np.ndarray:
    """ImageOrientationPatient 1\\0\\0\\0\\0\\-1: columns run down (feet), slices step posterior."""
    return affine_from((1, 0, 0), (0, 0, -1), spacing, origin_lps)


def sagittal_affine(spacing=(1.0, 1.0, 1.0), origin_lps=(0.0, -100.0, 100.0)) -> np.ndarray:
    return affine_from((0, 1, 0), (0, 0, -1), spacing, origin_lps)


def oblique_affine(
    angles_deg=(17.0, -23.0, 31.0), spacing=(0.65, 0.85, 1.7), origin_lps=(-75.123, 12.5, -33.3)
) -> np.ndarray:
    """An oblique plane: the axial directions rotated about x, y and z."""
    ax, ay, az = np.radians(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    rot = rz @ ry @ rx
    return affine_from(rot[:, 0], rot[:, 1], spacing, origin_lps)


def expected(volume: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What read_series should give back: float32 values, slices ascending along the normal (no shear)."""
    geo = geometry(affine)
    array = np.asarray(volume, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64).copy()
    if float(geo.slice_vec @ geo.normal) < 0:
        last = affine @ np.array([0.0, 0.0, volume.shape[2] - 1, 1.0])
        array = array[:, :, ::-1]
        affine[:, 2] = -affine[:, 2]
        affine[:3, 3] = last[:3]
    return np.ascontiguousarray(array), affine


def phantom(shape=(10, 12, 8), *, seed=0, low=-1024, high=2000, step=1.0) -> np.ndarray:
    """Values ``low + n * step`` on a smooth ramp plus noise: distinct per slice, so order mistakes show."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    count = int((high - low) / step)
    ramp = (i * 7 + j * 13 + k * 101) % (count // 2)
    noise = rng.integers(0, count // 2, size=shape)
    return (low + (ramp + noise) * step).astype(np.float64)


# ----------------------------------------------------------------------------------------------------------
# Writing


def write_series(
    folder: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str = "CT",
    slope: float = 1.0,
    intercept: float = 0.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    study_uid: str | None = None,
    series_number: int = 1,
    description: str = "test series",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    drop: Sequence[int] = (),
    orientation_overrides: Mapping[int, Sequence[float]] | None = None,
    seed: int = 0,
) -> list[Path]:
    """Write one file per slice, in shuffled order, with random names and misleading InstanceNumbers.

    Args:
        folder: created if needed; several series may share it.
        volume: ``(i, j, k)`` real-world values; ``(value - intercept) / slope`` must be whole numbers.
        affine: RAS voxel-to-world.
        drop: slice indices not to write (a missing slice).
        orientation_overrides: ImageOrientationPatient to write instead for some slice indices.

    Returns:
        The files written, in the order they were written (not the spatial order).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    geo = geometry(affine)
    stored = _stored(volume, slope, intercept, transfer_syntax)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference = generate_uid()
    slices = [k for k in range(volume.shape[2]) if k not in set(drop)]
    order = rng.permutation(len(slices))
    numbers = rng.permutation(len(slices)) + 1  # InstanceNumber unrelated to position
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    paths = []
    for n, idx in enumerate(order):
        k = slices[idx]
        ds = _base_dataset(sop_class, transfer_syntax, modality, study_uid, series_uid, series_number)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        ds.InstanceNumber = int(numbers[n])
        orientation = (orientation_overrides or {}).get(k, geo.orientation)
        ds.ImageOrientationPatient = _ds(orientation)
        ds.ImagePositionPatient = _ds(geo.position(k))
        ds.SliceLocation = format_number_as_ds(float(geo.position(k) @ geo.normal))
        ds.PixelSpacing = _ds([geo.row_step, geo.col_step])
        ds.SliceThickness = format_number_as_ds(float(np.linalg.norm(geo.slice_vec)))
        _set_rescale(ds, modality, slope, intercept)
        _set_pixels(ds, stored[:, :, k].T[np.newaxis], transfer_syntax)
        path = folder / f"IM{rng.integers(0, 16**8):08x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(
    path: str | Path,
    volume: np.ndarray,
    affine: np.ndarray,
    *,
    modality: str = "CT",
    slope: float | Sequence[float] = 1.0,
    intercept: float | Sequence[float] = 0.0,
    transfer_syntax: str = ExplicitVRLittleEndian,
    series_uid: str | None = None,
    description: str = "enhanced test series",
    shared_rescale: bool = False,
    seed: int = 0,
) -> Path:
    """Write an Enhanced CT/MR Image Storage file, frames in shuffled order.

    Geometry goes in functional groups: PixelMeasuresSequence and PlaneOrientationSequence shared,
    PlanePositionSequence and FrameContentSequence per frame. ``slope``/``intercept`` may be given per slice
    (PixelValueTransformationSequence per frame); with ``shared_rescale`` a scalar pair is shared instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    geo = geometry(affine)
    n = volume.shape[2]
    slopes = np.broadcast_to(np.asarray(slope, dtype=float), (n,))
    intercepts = np.broadcast_to(np.asarray(intercept, dtype=float), (n,))
    stored = _stored(volume, slopes, intercepts, transfer_syntax)
    sop_class = ENHANCED_CT_IMAGE_STORAGE if modality == "CT" else ENHANCED_MR_IMAGE_STORAGE
    ds = _base_dataset(sop_class, transfer_syntax, modality, generate_uid(), series_uid or generate_uid(), 3)
    ds.FrameOfReferenceUID = generate_uid()
    ds.SeriesDescription = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.ContentDate = "20240101"
    ds.ContentTime = "120000"
    ds.AcquisitionDateTime = "20240101120000"
    order = rng.permutation(n)  # frame f of the file holds slice order[f]
    ds.NumberOfFrames = n

    dimension_uid = generate_uid()
    ds.DimensionOrganizationSequence = [_item(DimensionOrganizationUID=dimension_uid)]
    ds.DimensionIndexSequence = [
        _item(
            DimensionOrganizationUID=dimension_uid,
            DimensionIndexPointer=0x00209056,  # StackID
            FunctionalGroupPointer=0x00209111,  # FrameContentSequence
        ),
        _item(
            DimensionOrganizationUID=dimension_uid,
            DimensionIndexPointer=0x00209057,  # InStackPositionNumber
            FunctionalGroupPointer=0x00209111,
        ),
    ]
    shared = _item(
        PixelMeasuresSequence=[
            _item(
                PixelSpacing=_ds([geo.row_step, geo.col_step]),
                SliceThickness=format_number_as_ds(float(np.linalg.norm(geo.slice_vec))),
            )
        ],
        PlaneOrientationSequence=[_item(ImageOrientationPatient=_ds(geo.orientation))],
    )
    if shared_rescale:
        shared.PixelValueTransformationSequence = [_rescale_item(modality, slopes[0], intercepts[0])]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in order:
        frame = _item(
            FrameContentSequence=[
                _item(StackID="1", InStackPositionNumber=int(k) + 1, DimensionIndexValues=[1, int(k) + 1])
            ],
            PlanePositionSequence=[_item(ImagePositionPatient=_ds(geo.position(k)))],
        )
        if not shared_rescale:
            frame.PixelValueTransformationSequence = [_rescale_item(modality, slopes[k], intercepts[k])]
        per_frame.append(frame)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    frames = np.stack([stored[:, :, k].T for k in order])
    _set_pixels(ds, frames, transfer_syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_clutter(folder: str | Path) -> list[Path]:
    """Files a reader must skip: text, a fake NIfTI, a DICOMDIR and a DICOM object that is no image."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    readme = folder / "README.txt"
    readme.write_text("exported by a PACS\n")
    nifti = folder / "scan.nii"
    nifti.write_bytes(b"\x5c\x01\x00\x00" + bytes(400))

    dicomdir = Dataset()
    dicomdir.file_meta = _file_meta(MEDIA_STORAGE_DIRECTORY, generate_uid(), ExplicitVRLittleEndian)
    dicomdir.FileSetID = "TEST"
    dicomdir.DirectoryRecordSequence = []
    dicomdir_path = folder / "DICOMDIR"
    dicomdir.save_as(dicomdir_path, enforce_file_format=True)

    report = _base_dataset(
        "1.2.840.10008.5.1.4.1.1.88.11", ExplicitVRLittleEndian, "SR", generate_uid(), generate_uid(), 99
    )
    report_path = folder / "report.dcm"
    report.save_as(report_path, enforce_file_format=True)
    return [readme, nifti, dicomdir_path, report_path]


def _stored(
    volume: np.ndarray, slope: float | np.ndarray, intercept: float | np.ndarray, transfer_syntax: str
) -> np.ndarray:
    """Stored values; slope and intercept may be per slice (arrays along k)."""
    raw = (np.asarray(volume, dtype=np.float64) - intercept) / slope
    stored = np.round(raw)
    if not np.array_equal(stored, raw):
        raise ValueError("volume values are not whole numbers of the slope above the intercept")
    if transfer_syntax == JPEGBaseline8Bit:
        dtype: type = np.uint8
    elif stored.min() < 0:
        dtype = np.int16
    else:
        dtype = np.uint16
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(f"stored values {stored.min()}..{stored.max()} do not fit {np.dtype(dtype).name}")
    return stored.astype(dtype)


def _base_dataset(
    sop_class: str, transfer_syntax: str, modality: str, study_uid: str, series_uid: str, series_number: int
) -> Dataset:
    ds = Dataset()
    sop_uid = generate_uid()
    ds.file_meta = _file_meta(sop_class, sop_uid, transfer_syntax)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Test^Phantom"
    ds.PatientID = "PHANTOM1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.SeriesDate = "20240101"
    ds.SeriesTime = "120000"
    ds.AcquisitionTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Manufacturer = "volseg tests"
    ds.SeriesNumber = series_number
    if modality == "MR":
        ds.EchoTime = "10"
        ds.RepetitionTime = "500"
        ds.MagneticFieldStrength = "3"
    return ds


def _file_meta(sop_class: str, sop_uid: str, transfer_syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    return meta


def _set_rescale(ds: Dataset, modality: str, slope: float, intercept: float) -> None:
    if modality == "CT" or (slope, intercept) != (1.0, 0.0):
        ds.RescaleSlope = format_number_as_ds(float(slope))
        ds.RescaleIntercept = format_number_as_ds(float(intercept))
        ds.RescaleType = "HU" if modality == "CT" else "US"


def _rescale_item(modality: str, slope: float, intercept: float) -> Dataset:
    return _item(
        RescaleSlope=format_number_as_ds(float(slope)),
        RescaleIntercept=format_number_as_ds(float(intercept)),
        RescaleType="HU" if modality == "CT" else "US",
    )


def _set_pixels(ds: Dataset, frames: np.ndarray, transfer_syntax: str) -> None:
    """Pixel module attributes and PixelData for ``frames`` (n, rows, columns), encoded as asked."""
    _, rows, columns = frames.shape
    bits = frames.dtype.itemsize * 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if np.issubdtype(frames.dtype, np.signedinteger) else 0
    frames = np.ascontiguousarray(frames)
    ts = UID(transfer_syntax)
    if ts in NATIVE:
        ds.PixelData = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
        return
    if ts == JPEGLosslessSV1:
        encoded = [encode_jpeg_lossless(f, bits) for f in frames]
    elif ts == JPEGBaseline8Bit:
        encoded = [encode_jpeg_baseline(f) for f in frames]
        ds.LossyImageCompression = "01"
    else:  # RLE, JPEG-LS, JPEG 2000: pydicom's encoders
        ds.PixelData = frames.tobytes()
        ds["PixelData"].VR = "OW" if bits > 8 else "OB"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        arr = frames if len(frames) > 1 else frames[0]
        ds.compress(ts, arr, generate_instance_uid=False)
        return
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = ts


def encode_jpeg_lossless(image: np.ndarray, precision: int) -> bytes:
    """Encode one greyscale frame as JPEG lossless, process 14, predictor 1 (ITU-T T.81 annex H).

    Signed data is coded as its two's complement bit pattern, which is what DICOM decoders expect.
    One Huffman table codes the 17 difference categories with 5-bit codes (category ``s`` -> code ``s``).
    """
    rows, columns = image.shape
    mask = (1 << precision) - 1
    x = image.astype(np.int64) & mask
    prediction = np.empty_like(x)
    prediction[0, 0] = 1 << (precision - 1)
    prediction[0, 1:] = x[0, :-1]  # first line: left neighbour
    prediction[1:, 0] = x[:-1, 0]  # first column: the sample above
    prediction[1:, 1:] = x[1:, :-1]  # predictor 1: left neighbour
    difference = (x - prediction) % 65536
    difference[difference >= 32768] -= 65536

    out = bytearray()
    acc = 0
    nbits = 0
    for d in difference.ravel().tolist():
        category = abs(d).bit_length() if d != -32768 else 16
        extra = 0 if category in (0, 16) else (d if d > 0 else d - 1) & ((1 << category) - 1)
        length = 5 + (category if category < 16 else 0)
        acc = (acc << length) | (category << (length - 5)) | extra
        nbits += length
        while nbits >= 8:
            nbits -= 8
            byte = (acc >> nbits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)  # byte stuffing
        acc &= (1 << nbits) - 1
    if nbits:
        byte = ((acc << (8 - nbits)) | ((1 << (8 - nbits)) - 1)) & 0xFF  # pad with 1-bits
        out.append(byte)
        if byte == 0xFF:
            out.append(0x00)

    def segment(marker: int, payload: bytes) -> bytes:
        return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload

    sof3 = bytes([precision]) + rows.to_bytes(2, "big") + columns.to_bytes(2, "big") + bytes([1, 1, 0x11, 0])
    counts = [0] * 16
    counts[4] = 17  # 17 codes of length 5
    dht = bytes([0x00]) + bytes(counts) + bytes(range(17))
    sos = bytes([1, 1, 0x00, 1, 0, 0])  # one component, table 0, predictor 1, Se 0, point transform 0
    return b"\xff\xd8" + segment(0xC3, sof3) + segment(0xC4, dht) + segment(0xDA, sos) + bytes(out) + b"\xff\xd9"


def encode_jpeg_baseline(image: np.ndarray, quality: int = 95) -> bytes:
    """Encode an 8-bit greyscale frame as baseline JPEG with Pillow (lossy)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _ds(values: Sequence[float] | np.ndarray) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]


def _item(**elements: object) -> Dataset:
    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item
