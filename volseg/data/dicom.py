"""Read a DICOM series (CT or MR, classic or enhanced multi-frame) into a volume with its geometry.

Conventions
-----------
* ``DicomVolume.array`` is float32 with axes ``(i, j, k)``: ``i`` is the column index inside a DICOM image
  (it runs along the first, "row", direction cosine of ImageOrientationPatient), ``j`` the row index (along the
  second, "column", cosine) and ``k`` the slice index. Slices are ordered by ImagePositionPatient projected on
  the slice normal ``n = row_cosine x column_cosine``, ascending, so ``k`` always runs along ``+n``. File names,
  file order, InstanceNumber and the order of frames inside a multi-frame file play no part.
* Values are the stored values through RescaleSlope/RescaleIntercept (Hounsfield units for CT), taken per file
  or, for enhanced multi-frame, per frame (PixelValueTransformationSequence). A Modality LUT Sequence, where a
  file has one instead, is applied through pydicom. Vendor-private scalings (Philips MR) are not applied.
* ``DicomVolume.affine`` maps ``(i, j, k, 1)`` to RAS+ millimetres, the nibabel convention, so
  ``nibabel.Nifti1Image(vol.array, vol.affine)`` is the right NIfTI. It is built from ImageOrientationPatient,
  PixelSpacing, the first slice's ImagePositionPatient and the measured slice step, then turned from DICOM's
  LPS to RAS by negating the first two world axes. A single image gets SpacingBetweenSlices, else
  SliceThickness, else 1 mm as its third voxel size (as dcm2niix does).

Irregular stacks
----------------
* Slice spacing is regular when every slice lies within ``max(POSITION_TOLERANCE * step,
  MIN_TOLERANCE_MM)`` of the evenly spaced position between the first and last slice (1 % of the step,
  at least 0.001 mm). Otherwise (a missing slice, mixed spacings) ``on_irregular="resample"`` interpolates
  linearly along the normal onto the median step, keeping the first and last slice where they are, and says so
  in ``warnings``; ``on_irregular="error"`` raises :class:`~volseg.errors.UserError`.
* Gantry tilt (slice origins drifting in-plane, a sheared grid, beyond 1 % of the smaller pixel spacing or
  0.001 mm) is *resampled*, not refused: each slice is shifted in-plane (bilinear) onto the orthogonal grid of
  the first slice, which is what a NIfTI/ITK affine can describe; voxels that the tilted slices did not cover
  take the series' minimum value, and a warning says by how much the grid was sheared. With
  ``on_irregular="error"`` a tilted series raises instead.

Series choice
-------------
A series is a localizer when any of its images has LOCALIZER, SCOUT or TOPOGRAM in ImageType; when it has at
most ``MAX_LOCALIZER_IMAGES`` images in more than one orientation with none holding more than half of them (a
three-plane localizer); or when it is a single image whose orientation differs from the largest other series in
the folder. (A series with one odd orientation among many is not a localizer: reading it is an error.) Without a UID,
:func:`choose_series` picks the CT or MR series with the most slices that is not a localizer.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from volseg.errors import UserError, one_line
from volseg.imageio import LPS_TO_RAS

__all__ = [
    "DicomVolume",
    "SeriesInfo",
    "choose_series",
    "list_series",
    "read_dataset",
    "read_series",
    "series_from_datasets",
]

#: Largest component difference between two ImageOrientationPatient vectors still taken as the same plane.
ORIENTATION_TOLERANCE = 1e-4
#: Allowed slice-position error, as a fraction of the slice step (spacing) or of the pixel spacing (tilt).
POSITION_TOLERANCE = 0.01
#: Floor of the position tolerances above, in millimetres.
MIN_TOLERANCE_MM = 1e-3
#: ImageType values that mark a localizer (scout, topogram) image.
LOCALIZER_IMAGE_TYPES = frozenset({"LOCALIZER", "SCOUT", "TOPOGRAM"})
#: A series of at most this many images in several orientations, none holding more than half of them, is taken
#: as a (three-plane) localizer.
MAX_LOCALIZER_IMAGES = 15
#: Modalities that :func:`choose_series` picks without an explicit UID.
VOLUME_MODALITIES = ("CT", "MR")

_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
_ON_IRREGULAR = ("resample", "error")

# Packages that give pydicom a decoder for each compressed transfer syntax (any one of them will do).
_JPEG_HINT = "pylibjpeg pylibjpeg-libjpeg (or python-gdcm)"
_J2K_HINT = "pylibjpeg pylibjpeg-openjpeg (or python-gdcm)"
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.50": _JPEG_HINT + " or Pillow",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": _JPEG_HINT,  # JPEG extended
    "1.2.840.10008.1.2.4.57": _JPEG_HINT,  # JPEG lossless
    "1.2.840.10008.1.2.4.70": _JPEG_HINT,  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80": _JPEG_HINT + " or pyjpegls",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": _JPEG_HINT + " or pyjpegls",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": _J2K_HINT,  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": _J2K_HINT,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless (pydicom also decodes it itself)
}

# What reading a malformed element value may raise (pydicom converts values when they are first accessed).
_VALUE_ERRORS = (
    ValueError,
    TypeError,
    OverflowError,
    KeyError,
    IndexError,
    AttributeError,
    NotImplementedError,
    OSError,
    EOFError,
    struct.error,
    BytesLengthException,
)
# What a forced read of a file that only looks like DICOM (no preamble) may raise when it is something else.
_PARSE_ERRORS = (
    InvalidDicomError,
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    struct.error,
    NotImplementedError,
    OverflowError,
    BytesLengthException,
)


@dataclass
class SeriesInfo:
    """One DICOM series found in a folder.

    Attributes:
        uid: SeriesInstanceUID.
        modality: Modality (CT, MR, ...) of its first image.
        description: SeriesDescription ("" when absent).
        n_slices: number of images: files, or frames summed over multi-frame files.
        files: the series' files, sorted by path.
        is_localizer: True for localizer/scout series (see the module notes), never chosen by default.
        is_multiframe: True when the series holds multi-frame (e.g. Enhanced CT/MR) files.
    """

    uid: str
    modality: str
    description: str
    n_slices: int
    files: list[Path]
    is_localizer: bool
    is_multiframe: bool

    def summary(self) -> str:
        """One-line description for listings: UID, modality, size, description."""
        extra = ", localizer" if self.is_localizer else ""
        extra += ", multi-frame" if self.is_multiframe else ""
        return f"{self.uid} ({self.modality}, {self.n_slices} images{extra}, {self.description!r})"


@dataclass
class DicomVolume:
    """A DICOM series as a volume: values, geometry and what was done to get them.

    Attributes:
        array: float32 ``(i, j, k)`` = (column, row, slice), slices ascending along the normal, rescaled values.
        affine: 4x4 voxel-to-world matrix in RAS+ millimetres (nibabel convention).
        series: the series that was read.
        warnings: one line per thing the user should know (resampling, tilt, ignored duplicates).
        skipped: the folder's other series (not read), for the caller to report.
    """

    array: np.ndarray
    affine: np.ndarray
    series: SeriesInfo
    warnings: list[str] = field(default_factory=list)
    skipped: list[SeriesInfo] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------
# Finding series


@dataclass
class _Header:
    path: Path
    series_uid: str
    sop_uid: str
    modality: str
    description: str
    series_number: float
    image_type: tuple[str, ...]
    n_frames: int
    orientations: list[tuple[float, ...]]
    multiframe: bool


def list_series(folder: str | Path) -> list[SeriesInfo]:
    """Find the DICOM image series under ``folder`` (recursively).

    Files that are not DICOM, DICOMDIR files and non-image objects (structured reports, RT structures) are
    ignored. Files without the 128-byte preamble are accepted when they start like a DICOM data set.

    Args:
        folder: a directory.

    Returns:
        The series, ordered by SeriesNumber then UID.

    Raises:
        UserError: the folder does not exist, or a file that says it is DICOM cannot be parsed.
    """
    return _series_infos(_scan(folder))


def series_from_datasets(datasets: Iterable[tuple[Dataset, str | Path]]) -> list[SeriesInfo]:
    """What :func:`list_series` finds, for data sets already parsed (e.g. DICOMweb metadata, no pixel data).

    The same grouping, localizer rules and order as for a folder, so a series is chosen the same way wherever
    it comes from.

    Args:
        datasets: ``(data set, name)`` pairs; the name stands for the file in :attr:`SeriesInfo.files`.

    Raises:
        UserError: a malformed element in a data set (the message names it by its name).
    """
    groups: dict[str, list[_Header]] = {}
    for ds, name in datasets:
        try:
            header = _header(ds, Path(name))
        except _VALUE_ERRORS as exc:
            raise UserError(f"malformed DICOM element ({one_line(exc)})", name) from None
        if header is not None:
            groups.setdefault(header.series_uid, []).append(header)
    return _series_infos(groups)


def choose_series(series: list[SeriesInfo], uid: str | None = None) -> tuple[SeriesInfo, list[SeriesInfo]]:
    """Pick the series to read.

    Args:
        series: what :func:`list_series` found.
        uid: a SeriesInstanceUID to pick that series; without it, the CT or MR series with the most slices
            that is not a localizer (the first in list order on a tie).

    Returns:
        ``(chosen, skipped)``: skipped holds every other series, for the caller to report.

    Raises:
        UserError: no series; ``uid`` not among them (the message lists those present); no CT/MR volume.
    """
    if not series:
        raise UserError("no DICOM image series found")
    if uid is not None:
        uid = uid.strip()
        for info in series:
            if info.uid == uid:
                return info, [s for s in series if s is not info]
        present = "; ".join(s.summary() for s in series)
        raise UserError(f"no series with UID {uid}; series present: {present}")
    candidates = [s for s in series if s.modality in VOLUME_MODALITIES and not s.is_localizer]
    if not candidates:
        present = "; ".join(s.summary() for s in series)
        raise UserError(
            f"no CT or MR series other than localizers (series present: {present}); "
            "pass a series UID to read one of them"
        )
    chosen = max(candidates, key=lambda s: s.n_slices)
    return chosen, [s for s in series if s is not chosen]


def _scan(folder: str | Path) -> dict[str, list[_Header]]:
    root = Path(folder)
    if not root.exists():
        raise UserError("folder does not exist", root)
    if not root.is_dir():
        raise UserError("not a folder (expected a folder of DICOM files)", root)
    groups: dict[str, list[_Header]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if path.name.upper() == "DICOMDIR":
            continue
        ds = read_dataset(path, pixels=False)
        if ds is None:
            continue
        try:
            header = _header(ds, path)
        except _VALUE_ERRORS as exc:
            raise UserError(f"malformed DICOM element ({one_line(exc)})", path) from None
        if header is not None:
            groups.setdefault(header.series_uid, []).append(header)
    return groups


def read_dataset(path: Path, *, pixels: bool) -> Dataset | None:
    """Parse one file, or None when it is not DICOM. A file with the DICM marker that fails is an error (a
    one-line UserError naming it)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as exc:
        raise UserError(f"cannot read file ({exc.strerror})", path) from None
    if len(head) >= 132 and head[128:132] == b"DICM":
        force = False
    elif len(head) >= 8 and head[:2] in (b"\x02\x00", b"\x08\x00"):
        force = True  # no preamble (ACR-NEMA style): starts with a group 0002 or 0008 element
    else:
        return None
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=not pixels, force=force)
    except _PARSE_ERRORS as exc:
        if force:
            return None
        raise UserError(f"damaged DICOM file, cannot be parsed ({one_line(exc)})", path) from None
    if force and "SOPClassUID" not in ds and "SeriesInstanceUID" not in ds:
        return None
    return ds


def _header(ds: Dataset, path: Path) -> _Header | None:
    meta_class = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
    if meta_class == _DICOMDIR_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return None
    if "SeriesInstanceUID" not in ds or "Rows" not in ds or "Columns" not in ds:
        return None  # not an image (SR, RT structure set, presentation state, ...)
    n_frames = _int(ds.get("NumberOfFrames"), 1)
    multiframe = n_frames > 1 or "PerFrameFunctionalGroupsSequence" in ds
    orientations: list[tuple[float, ...]] = []
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None]
        for item in per_frame:
            sub = _functional_group(ds, item, "PlaneOrientationSequence")
            orientations.extend(_orientation(sub))
    else:
        orientations.extend(_orientation(ds))
    image_type = tuple(str(v).upper() for v in _as_list(ds.get("ImageType")))
    return _Header(
        path=path,
        series_uid=str(ds.SeriesInstanceUID),
        sop_uid=str(ds.get("SOPInstanceUID", path)),
        modality=str(ds.get("Modality", "")),
        description=str(ds.get("SeriesDescription", "")),
        series_number=_float(ds.get("SeriesNumber"), math.inf),
        image_type=image_type,
        n_frames=n_frames,
        orientations=orientations,
        multiframe=multiframe,
    )


def _orientation(ds: Dataset | None) -> list[tuple[float, ...]]:
    """ImageOrientationPatient as ``[tuple]``, or ``[]`` when absent or malformed (reading reports those)."""
    values = _as_list(ds.get("ImageOrientationPatient") if ds is not None else None)
    try:
        orientation = tuple(float(v) for v in values)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return []
    return [orientation] if len(orientation) == 6 else []


def _series_infos(groups: dict[str, list[_Header]]) -> list[SeriesInfo]:
    infos: list[tuple[float, SeriesInfo, list[tuple[float, ...]]]] = []
    for uid, headers in groups.items():
        unique = _unique_instances(headers)
        orientations = [o for h in unique for o in h.orientations]
        flagged = any(LOCALIZER_IMAGE_TYPES.intersection(h.image_type) for h in unique)
        n_slices = sum(h.n_frames for h in unique)
        distinct, counts = _distinct_orientations(orientations)
        if len(distinct) > 1 and n_slices <= MAX_LOCALIZER_IMAGES and 2 * max(counts) <= len(orientations):
            flagged = True  # a few images in several planes, none holding most of them: a 3-plane localizer
        info = SeriesInfo(
            uid=uid,
            modality=unique[0].modality,
            description=unique[0].description,
            n_slices=n_slices,
            files=sorted({h.path for h in headers}),
            is_localizer=flagged,
            is_multiframe=any(h.multiframe for h in unique),
        )
        infos.append((min(h.series_number for h in unique), info, distinct))
    infos.sort(key=lambda t: (t[0], t[1].uid))
    # A lone image lying in another plane than the largest series is a scout.
    others = [t for t in infos if not t[1].is_localizer and t[1].n_slices > 1]
    if others:
        reference = max(others, key=lambda t: t[1].n_slices)[2]
        for _, info, distinct in infos:
            if info.n_slices == 1 and distinct and reference:
                if not _same_orientation(distinct[0], reference[0]):
                    info.is_localizer = True
    return [t[1] for t in infos]


def _unique_instances(headers: list[_Header]) -> list[_Header]:
    seen: dict[str, _Header] = {}
    for h in headers:
        seen.setdefault(h.sop_uid, h)
    return list(seen.values())


def _distinct_orientations(
    orientations: Iterable[tuple[float, ...]],
) -> tuple[list[tuple[float, ...]], list[int]]:
    """The different orientations (first seen first) and how many images have each."""
    distinct: list[tuple[float, ...]] = []
    counts: list[int] = []
    for o in orientations:
        for n, d in enumerate(distinct):
            if _same_orientation(o, d):
                counts[n] += 1
                break
        else:
            distinct.append(o)
            counts.append(1)
    return distinct, counts


def _same_orientation(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> bool:
    if len(a) != 6 or len(b) != 6:
        return False
    return max(abs(float(x) - float(y)) for x, y in zip(a, b, strict=True)) <= ORIENTATION_TOLERANCE


# --------------------------------------------------------------------------------------------------------
# Reading a series


@dataclass
class _Frame:
    path: Path
    number: int  # frame number inside a multi-frame file, 1-based; 0 for a single-frame file
    position: np.ndarray  # ImagePositionPatient, LPS mm
    orientation: np.ndarray  # ImageOrientationPatient (6,)
    spacing: np.ndarray  # PixelSpacing: (between rows, between columns) mm
    slope: float
    intercept: float
    thickness: float | None
    pixels: np.ndarray  # (rows, columns), already through the modality transform, float32


def read_series(folder: str | Path, series_uid: str | None = None, *, on_irregular: str = "resample") -> DicomVolume:
    """Read one series under ``folder`` into a volume with its RAS affine.

    Args:
        folder: a directory holding the series (searched recursively; other series may be there too).
        series_uid: the SeriesInstanceUID to read; without it :func:`choose_series` picks one.
        on_irregular: ``"resample"`` (default) to resample irregular spacing, missing slices and gantry tilt
            onto a regular orthogonal grid with a warning, or ``"error"`` to refuse such series.

    Returns:
        The volume; see the module notes for axis order, values and affine. The folder is scanned once (headers
        only), the series chosen from that scan, and only its files are read again with their pixels; the series
        not chosen are in ``DicomVolume.skipped``.

    Raises:
        UserError: no DICOM in the folder, unknown UID, inconsistent or missing geometry, irregular spacing
            or tilt with ``on_irregular="error"``, pixel data that cannot be decoded (naming what to install).
    """
    if on_irregular not in _ON_IRREGULAR:
        raise UserError(f"on_irregular must be one of {', '.join(_ON_IRREGULAR)}, not {on_irregular!r}")
    root = Path(folder)
    groups = _scan(root)
    if not groups:
        raise UserError("no DICOM image files found in this folder", root)
    try:
        chosen, skipped = choose_series(_series_infos(groups), series_uid)
    except UserError as exc:
        raise UserError(exc.message, exc.path or root) from None

    warnings: list[str] = []
    headers = groups[chosen.uid]
    unique = _unique_instances(headers)
    if len(unique) < len(headers):
        warnings.append(
            f"{len(headers) - len(unique)} duplicate file(s) of the same image (same SOPInstanceUID) ignored"
        )
    frames: list[_Frame] = []
    for header in sorted(unique, key=lambda h: h.path):
        try:
            frames.extend(_read_frames(header.path))
        except _VALUE_ERRORS as exc:
            raise UserError(f"malformed DICOM element ({one_line(exc)})", header.path) from None
    array, affine = _assemble(frames, chosen.uid, root, on_irregular, warnings)
    return DicomVolume(array=array, affine=affine, series=chosen, warnings=warnings, skipped=skipped)


def _read_frames(path: Path) -> list[_Frame]:
    ds = read_dataset(path, pixels=True)
    if ds is None:  # it was readable a moment ago
        raise UserError("file is no longer readable as DICOM", path)
    samples = _int(ds.get("SamplesPerPixel"), 1)
    if samples != 1:
        raise UserError(f"colour image (SamplesPerPixel={samples}): only greyscale CT/MR is supported", path)
    stored = _decode(ds, path)
    n_frames = _int(ds.get("NumberOfFrames"), 1)
    rows, columns = _int(ds.get("Rows"), 0), _int(ds.get("Columns"), 0)
    if min(n_frames, rows, columns) < 1 or stored.size != n_frames * rows * columns:
        raise UserError(
            f"pixel data holds {stored.size} values but NumberOfFrames x Rows x Columns is "
            f"{n_frames} x {rows} x {columns}",
            path,
        )
    stored = stored.reshape(n_frames, rows, columns)
    functional = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    if n_frames > 1 and not functional:
        raise UserError(
            f"multi-frame file ({n_frames} frames) without per-frame functional groups "
            f"(SOP class {ds.get('SOPClassUID', '?')}): only Enhanced CT/MR style multi-frame is supported",
            path,
        )
    if not functional:
        position = _vector(ds, "ImagePositionPatient", 3, path)
        orientation = _vector(ds, "ImageOrientationPatient", 6, path)
        spacing = _vector(ds, "PixelSpacing", 2, path)
        slope = _float(ds.get("RescaleSlope"), 1.0)
        intercept = _float(ds.get("RescaleIntercept"), 0.0)
        _check_rescale(slope, intercept, path)
        pixels = _modality_transform(ds, stored[0], slope, intercept)
        thickness = _float(ds.get("SpacingBetweenSlices"), _float(ds.get("SliceThickness"), math.nan))
        return [_Frame(path, 0, position, orientation, spacing, slope, intercept, _nan_none(thickness), pixels)]

    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if per_frame and len(per_frame) != n_frames:
        raise UserError(f"PerFrameFunctionalGroupsSequence has {len(per_frame)} items for {n_frames} frames", path)
    frames = []
    for f in range(n_frames):
        item = per_frame[f] if per_frame else None
        where = f"frame {f + 1}"
        position = _vector(_functional_group(ds, item, "PlanePositionSequence"), "ImagePositionPatient", 3, path, where)
        orientation = _vector(
            _functional_group(ds, item, "PlaneOrientationSequence"), "ImageOrientationPatient", 6, path, where
        )
        measures = _functional_group(ds, item, "PixelMeasuresSequence")
        spacing = _vector(measures, "PixelSpacing", 2, path, where)
        transform = _functional_group(ds, item, "PixelValueTransformationSequence")
        source = transform if transform is not None else ds
        slope = _float(source.get("RescaleSlope"), 1.0)
        intercept = _float(source.get("RescaleIntercept"), 0.0)
        _check_rescale(slope, intercept, path, where)
        pixels = (stored[f].astype(np.float64) * slope + intercept).astype(np.float32)
        thickness = math.nan
        if measures is not None:
            thickness = _float(measures.get("SpacingBetweenSlices"), _float(measures.get("SliceThickness"), math.nan))
        frames.append(
            _Frame(path, f + 1, position, orientation, spacing, slope, intercept, _nan_none(thickness), pixels)
        )
    return frames


def _decode(ds: Dataset, path: Path) -> np.ndarray:
    if "PixelData" not in ds:
        raise UserError("image without pixel data (PixelData missing)", path)
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:  # no file meta (ACR-NEMA style): use the encoding it was read with
        implicit, little = ds.original_encoding
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
        )
    ts = UID(str(meta.TransferSyntaxUID))
    label = f"{ts.name} ({ts})" if ts.name != ts else str(ts)
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise UserError(
            f"pixel data in transfer syntax {label} cannot be decoded (no decoder for it in pydicom); "
            "convert the series to an uncompressed transfer syntax first (e.g. dcmdjpeg, gdcmconv --raw)",
            path,
        ) from None
    if not decoder.is_available:
        hint = _DECODER_HINTS.get(str(ts), "a pydicom pixel-data plugin for it")
        raise UserError(f"pixel data compressed as {label}; to decode it, pip install {hint}", path)
    try:
        return np.asarray(ds.pixel_array)
    except (
        ValueError,
        RuntimeError,
        NotImplementedError,
        OSError,
        EOFError,
        KeyError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        raise UserError(f"cannot decode pixel data ({label}): {one_line(exc, 10**6)}", path) from None


def _modality_transform(ds: Dataset, stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Stored values to real-world values, computed in float64 and kept as float32."""
    if "ModalityLUTSequence" in ds and "RescaleSlope" not in ds:
        return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def _functional_group(ds: Dataset, per_frame_item: Dataset | None, name: str) -> Dataset | None:
    """The first item of functional group ``name`` for one frame: per-frame first, then shared."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    containers = [per_frame_item, shared[0] if shared else None]
    for container in containers:
        if container is not None and name in container and len(container[name].value) > 0:
            item: Dataset = container[name].value[0]
            return item
    return None


def _assemble(
    frames: list[_Frame], uid: str, root: Path, on_irregular: str, warnings: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    first = frames[0]
    for frame in frames[1:]:
        if not _same_orientation(frame.orientation, first.orientation):
            raise UserError(
                f"inconsistent ImageOrientationPatient within series {uid}: "
                f"{_fmt(first.orientation)} in {_where(first)} but {_fmt(frame.orientation)} in {_where(frame)}",
                root,
            )
        if frame.pixels.shape != first.pixels.shape:
            raise UserError(
                f"images of different sizes within series {uid}: {first.pixels.shape} in {_where(first)} "
                f"but {frame.pixels.shape} in {_where(frame)}",
                root,
            )
        if np.max(np.abs(frame.spacing - first.spacing)) > ORIENTATION_TOLERANCE * float(np.max(np.abs(first.spacing))):
            raise UserError(
                f"inconsistent PixelSpacing within series {uid}: {_fmt(first.spacing)} in {_where(first)} "
                f"but {_fmt(frame.spacing)} in {_where(frame)}",
                root,
            )
    row_cos, col_cos = first.orientation[:3], first.orientation[3:]
    if not all(0.5 <= float(np.linalg.norm(v)) <= 2.0 for v in (row_cos, col_cos)):
        raise UserError(f"invalid ImageOrientationPatient {_fmt(first.orientation)} in {_where(first)}", root)
    row_cos = row_cos / np.linalg.norm(row_cos)
    col_cos = col_cos / np.linalg.norm(col_cos)
    if abs(float(row_cos @ col_cos)) > 1e-3:
        raise UserError(f"ImageOrientationPatient {_fmt(first.orientation)} in {_where(first)} is not orthogonal", root)
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    row_step, col_step = float(first.spacing[0]), float(first.spacing[1])  # between rows, between columns
    if min(row_step, col_step) <= 0:
        raise UserError(f"PixelSpacing {_fmt(first.spacing)} in {_where(first)} is not positive", root)

    along = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    along = along[order]
    volume = np.stack([f.pixels.T for f in frames], axis=-1)  # (columns, rows, slices) = (i, j, k)
    origin = frames[0].position

    if len(frames) == 1:
        step = first.thickness if first.thickness and first.thickness > 0 else 1.0
    else:
        steps = np.diff(along)
        span = float(along[-1] - along[0])
        tolerance = max(POSITION_TOLERANCE * span / (len(frames) - 1), MIN_TOLERANCE_MM)
        duplicates = int(np.sum(steps <= tolerance))
        if duplicates:
            k = int(np.argmax(steps <= tolerance))
            raise UserError(
                f"series {uid} has {duplicates + 1} or more images at the same slice position "
                f"({along[k]:.3f} mm along the normal: {_where(frames[k])} and {_where(frames[k + 1])}); "
                "several volumes (echoes, phases, time points) in one series are not supported",
                root,
            )
        volume, origin = _correct_tilt(
            volume, frames, normal, row_cos, col_cos, (col_step, row_step), uid, root, on_irregular, warnings
        )
        volume, along, step = _regularise(volume, along, tolerance, uid, root, on_irregular, warnings)

    lps = np.eye(4)
    lps[:3, 0] = row_cos * col_step
    lps[:3, 1] = col_cos * row_step
    lps[:3, 2] = normal * step
    lps[:3, 3] = origin
    return np.ascontiguousarray(volume, dtype=np.float32), LPS_TO_RAS @ lps


def _correct_tilt(
    volume: np.ndarray,
    frames: list[_Frame],
    normal: np.ndarray,
    row_cos: np.ndarray,
    col_cos: np.ndarray,
    voxel: tuple[float, float],
    uid: str,
    root: Path,
    on_irregular: str,
    warnings: list[str],
) -> tuple[np.ndarray, np.ndarray]:
    """Shift each slice in-plane onto the orthogonal grid of the first one when the stack is sheared."""
    origin = frames[0].position
    offsets = np.stack([f.position - origin for f in frames])
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    tolerance = max(POSITION_TOLERANCE * min(voxel), MIN_TOLERANCE_MM)
    if float(drift.max()) <= tolerance:
        return volume, origin
    depth = float(offsets[-1] @ normal)
    angle = math.degrees(math.atan2(float(drift[-1]), depth)) if depth > 0 else float("nan")
    what = (
        f"slice positions drift up to {drift.max():.3f} mm off the slice normal "
        f"(gantry tilt or sheared stack, about {angle:.2f} degrees)"
    )
    if on_irregular == "error":
        raise UserError(f"series {uid}: {what}", root)
    from scipy import ndimage  # only needed for tilted series

    fill = float(volume.min())
    shifted = np.empty_like(volume)
    for k in range(volume.shape[2]):
        shift = tuple(
            _snap(float(in_plane[k] @ axis) / size) for axis, size in ((row_cos, voxel[0]), (col_cos, voxel[1]))
        )
        if shift == (0.0, 0.0):
            shifted[:, :, k] = volume[:, :, k]
        else:
            shifted[:, :, k] = ndimage.shift(volume[:, :, k], shift, order=1, mode="constant", cval=fill)
    warnings.append(f"{what}: resampled in-plane (bilinear) onto an orthogonal grid; uncovered voxels set to {fill:g}")
    return shifted, origin


def _regularise(
    volume: np.ndarray,
    along: np.ndarray,
    tolerance: float,
    uid: str,
    root: Path,
    on_irregular: str,
    warnings: list[str],
) -> tuple[np.ndarray, np.ndarray, float]:
    """Return the volume on evenly spaced slices, resampling linearly along the normal if needed."""
    n = len(along)
    span = float(along[-1] - along[0])
    step = span / (n - 1)
    error = np.abs(along - (along[0] + step * np.arange(n)))
    if float(error.max()) <= tolerance:
        return volume, along, step
    steps = np.diff(along)
    median = float(np.median(steps))
    gaps = int(np.sum(steps > 1.5 * median))
    what = (
        f"irregular slice spacing in series {uid}: steps from {steps.min():.4g} to {steps.max():.4g} mm "
        f"(a slice is {error.max():.4g} mm off an even grid; tolerance {tolerance:.3g} mm)"
    )
    if gaps:
        what += f", {gaps} gap(s) where slices seem to be missing"
    if on_irregular == "error":
        raise UserError(what, root)
    count = max(int(round(span / median)) + 1, 2)
    new_step = span / (count - 1)
    targets = along[0] + new_step * np.arange(count)
    targets[-1] = along[-1]
    below = np.clip(np.searchsorted(along, targets, side="right") - 1, 0, n - 2)
    weight = (targets - along[below]) / (along[below + 1] - along[below])
    weight[np.abs(weight) < 1e-6] = 0.0
    weight[np.abs(weight - 1.0) < 1e-6] = 1.0
    resampled = volume[:, :, below] * (1.0 - weight) + volume[:, :, below + 1] * weight
    warnings.append(f"{what}: resampled linearly onto {count} slices {new_step:.4g} mm apart")
    return resampled, targets, new_step


# --------------------------------------------------------------------------------------------------------
# Small helpers


def _vector(ds: Dataset | None, keyword: str, size: int, path: Path, where: str = "") -> np.ndarray:
    value = ds.get(keyword) if ds is not None else None
    values = _as_list(value)
    context = f" ({where})" if where else ""
    if len(values) != size:
        problem = "missing" if not values else f"has {len(values)} values instead of {size}"
        raise UserError(f"{keyword} {problem}{context}: no patient geometry to build a volume from", path)
    try:
        array = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(f"{keyword} is not numeric{context}: {value}", path) from None
    if not np.all(np.isfinite(array)):
        raise UserError(f"{keyword} is not finite{context}: {value}", path)
    return array


def _check_rescale(slope: float, intercept: float, path: Path, where: str = "") -> None:
    if not (math.isfinite(slope) and math.isfinite(intercept)):
        context = f" ({where})" if where else ""
        raise UserError(f"RescaleSlope {slope:g} / RescaleIntercept {intercept:g} is not finite{context}", path)


def _as_list(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        return [value]
    return list(value)


def _float(value: object, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return default


def _int(value: object, default: int) -> int:
    number = _float(value, math.nan)
    return int(number) if math.isfinite(number) else default


def _snap(value: float) -> float:
    """Round a voxel shift that is a whole number but for floating-point noise, so it moves values exactly."""
    nearest = round(value)
    return float(nearest) if abs(value - nearest) < 1e-6 else value


def _nan_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _fmt(values: np.ndarray) -> str:
    return "\\".join(f"{v:.6g}" for v in values)


def _where(frame: _Frame) -> str:
    return f"{frame.path} frame {frame.number}" if frame.number else str(frame.path)
