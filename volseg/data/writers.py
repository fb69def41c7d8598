"""Write label maps and probabilities with their geometry: NIfTI, NRRD, 3D Slicer ``.seg.nrrd`` and DICOM SEG.

Conventions
-----------
* ``labels`` is a uint8 array ``(i, j, k)`` on the input image's grid and ``affine`` maps ``(i, j, k, 1)`` to RAS+
  millimetres (nibabel convention), exactly what the readers return. Every format writes that grid unchanged:
  NRRD and DICOM use LPS, so the first two world axes are negated on the way out, never the voxels.
* Every file is written under a temporary name (``.tmp-<random>-<name>``) in its destination folder and renamed
  when it is complete, so an error or an interrupt leaves neither a partial file nor the temporary one.
* Segments are described by :class:`SegmentInfo`; a label value present in ``labels`` but not described is a
  programming error (``ValueError``), so a viewer never shows an unnamed region.
* Colours: a segment without one gets a fixed colour from :func:`default_color` (the same one in every format).
  Codes: DICOM SEG needs a segmented property category and type; a segment without them gets SNOMED CT
  "Tissue" for the missing one(s). ``.seg.nrrd`` writes a terminology entry only when a segment has codes.

Formats
-------
``nifti`` (``.nii.gz``)
    uint8 NIfTI-1 with qform and sform = ``affine`` (code 1, scanner). With ``reference_nifti`` the reference's
    header is kept (qform/sform matrices and codes, units) and only the data type and scaling are changed.
``nrrd`` (``.nrrd``)
    Plain gzip-compressed labelmap, ``space: left-posterior-superior``.
``seg.nrrd`` (``.seg.nrrd``)
    The same labelmap with 3D Slicer's segmentation fields (one layer, ``SegmentN_*`` per segment, terminology in
    ``SegmentN_Tags``), as described in Slicer's developer guide ("Segmentation labelmap file format").
``dicom-seg`` (``.dcm``)
    A BINARY DICOM Segmentation written by highdicom that references the source series; only frames holding a
    segment are stored. Needs the source series' files (``dicom_series_files``).
``png`` (``.png``)
    A 2D label map as an 8-bit PNG (arrays are ``(x, y)``, MONAI's layout: transposed to rows and columns).

:data:`WRITERS` is the registry: format name -> suffix, spatial dimensions and the function that writes it.
"""

from __future__ import annotations

import colorsys
import gzip
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from volseg import __version__
from volseg.errors import UserError
from volseg.fileio import atomic_path
from volseg.imageio import LPS_TO_RAS, gzip_bytes

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

__all__ = [
    "FORMATS",
    "SUFFIXES",
    "SegmentInfo",
    "default_color",
    "segment_colors",
    "segments_from_recipe",
    "slicer_terminology",
    "write_probabilities",
    "write_segmentation",
]


@dataclass(frozen=True)
class Writer:
    """One output format: the suffix it adds to ``out_base``, the label maps it takes (2D or 3D) and its writer
    ``write(labels, affine, path, context)``; ``context`` holds segments, reference_nifti, dicom_series_files and
    algorithm."""

    suffix: str
    spatial_dims: int
    write: Callable[[np.ndarray, np.ndarray, Path, dict[str, Any]], None]


def _nifti_writer(labels: np.ndarray, affine: np.ndarray, path: Path, ctx: dict[str, Any]) -> None:
    _write_nifti(labels, affine, path, ctx.get("reference_nifti"))


def _nrrd_writer(labels: np.ndarray, affine: np.ndarray, path: Path, ctx: dict[str, Any]) -> None:
    _write_nrrd(path, labels, affine, {})


def _seg_nrrd_writer(labels: np.ndarray, affine: np.ndarray, path: Path, ctx: dict[str, Any]) -> None:
    _write_nrrd(path, labels, affine, _slicer_fields(labels, affine, ctx["segments"]))


def _dicom_seg_writer(labels: np.ndarray, affine: np.ndarray, path: Path, ctx: dict[str, Any]) -> None:
    files = [Path(p) for p in ctx["dicom_series_files"]]
    _write_dicom_seg(labels, affine, path, ctx["segments"], files, ctx.get("algorithm"))


def _png_writer(labels: np.ndarray, affine: np.ndarray, path: Path, ctx: dict[str, Any]) -> None:
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(labels.T.astype(np.uint8))).save(tmp, format="PNG")


#: The output formats, in the order they are documented.
WRITERS: dict[str, Writer] = {
    "nifti": Writer(".nii.gz", 3, _nifti_writer),
    "nrrd": Writer(".nrrd", 3, _nrrd_writer),
    "seg.nrrd": Writer(".seg.nrrd", 3, _seg_nrrd_writer),
    "dicom-seg": Writer(".dcm", 3, _dicom_seg_writer),
    "png": Writer(".png", 2, _png_writer),
}
#: The formats of 3D label maps (``volseg infer --format``).
FORMATS = tuple(name for name, w in WRITERS.items() if w.spatial_dims == 3)
#: File name suffix each format adds to ``out_base``.
SUFFIXES = {name: w.suffix for name, w in WRITERS.items()}

#: (CodingSchemeDesignator, CodeValue, CodeMeaning) used when a segment has no category or type code.
TISSUE = ("SCT", "85756007", "Tissue")
#: Terminology context names written in Slicer's TerminologyEntry tag.
SLICER_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
SLICER_ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"

_GZIP_LEVEL = 6
_CHUNK = 1 << 24  # bytes per write into the gzip stream
_PROBABILITY_SCALE = 65535  # probabilities are stored as uint16 with scl_slope 1/65535
_POSITION_TOLERANCE = 0.01  # fraction of the smallest voxel size within which a slice matches a source image
_MIN_TOLERANCE_MM = 1e-3
_LO_MAX = 64  # DICOM LO value length
# Patient and study attributes highdicom copies from the first source image (type 2: present, may be empty).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
)


@dataclass
class SegmentInfo:
    """One segment (non-background label) of a segmentation.

    Attributes:
        name: label name, shown to users (Slicer segment name, DICOM SegmentLabel).
        value: its value in the label map (1..255).
        color: RGB 0..255 display colour, or None for :func:`default_color`.
        category: (CodingSchemeDesignator, CodeValue, CodeMeaning) of the segmented property category.
        type: (CodingSchemeDesignator, CodeValue, CodeMeaning) of the segmented property type.
    """

    name: str
    value: int
    color: tuple[int, int, int] | None = None
    category: tuple[str, str, str] | None = None
    type: tuple[str, str, str] | None = None


def segments_from_recipe(recipe: Any) -> list[SegmentInfo]:
    """The recipe's labels except background (value 0), ordered by value.

    Args:
        recipe: a :class:`volseg.recipe.Recipe` (anything with ``data.labels``: name -> Label).
    """
    labels = recipe.data.labels
    segments = []
    for name, label in sorted(labels.items(), key=lambda kv: kv[1].value):
        if label.value == 0:
            continue
        segments.append(
            SegmentInfo(
                name=name,
                value=int(label.value),
                color=_tuple(label.color, int),
                category=_tuple(label.category, str),
                type=_tuple(label.type, str),
            )
        )
    return segments


def segment_colors(segments: Sequence[SegmentInfo]) -> dict[int, tuple[int, int, int]]:
    """Label value -> display colour for every segment: its own, else :func:`default_color` of its position. The
    one rule for every output (``.seg.nrrd``, DICOM SEG, QC pictures)."""
    return {
        int(s.value): tuple(int(c) for c in s.color) if s.color is not None else default_color(n)  # type: ignore[misc]
        for n, s in enumerate(segments)
    }


def default_color(index: int) -> tuple[int, int, int]:
    """A display colour for the ``index``-th segment (0-based) that has none: hues spread by the golden ratio."""
    hue = (0.08 + 0.618033988749895 * index) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.6, 0.9)
    return (round(r * 255), round(g * 255), round(b * 255))


# --------------------------------------------------------------------------------------------------------
# Entry points


def write_segmentation(
    labels: np.ndarray,
    affine: np.ndarray,
    out_base: str | Path,
    formats: Sequence[str],
    segments: list[SegmentInfo],
    *,
    reference_nifti: str | Path | None = None,
    dicom_series_files: Sequence[str | Path] | None = None,
    algorithm: dict[str, Any] | None = None,
) -> list[Path]:
    """Write a label map in one or more formats, each with the input's geometry.

    Args:
        labels: uint8 (or other integer type with values 0..255) array ``(i, j, k)`` on the input grid.
        affine: 4x4 voxel-to-RAS+ matrix of that grid.
        out_base: output path without suffix (``OUT/case_seg``); each format adds its suffix (:data:`SUFFIXES`).
            Missing folders are created.
        formats: some of :data:`FORMATS`; each is written once, in the order given.
        segments: the non-background labels (:func:`segments_from_recipe`); every non-zero value in
            ``labels`` must be among them.
        reference_nifti: the input NIfTI, whose header (and exact affine) the ``nifti`` output keeps.
        dicom_series_files: the source DICOM series' files (``DicomVolume.series.files``), needed by
            ``dicom-seg``.
        algorithm: ``{"name": "volseg", "version": ..., "bundle": ..., "bundle_version": ...}`` identifying the
            model for DICOM SEG; missing keys default to volseg and its version.

    Returns:
        The files written, one per format in the order of ``formats``.

    Raises:
        UserError: an unknown format; ``dicom-seg`` without DICOM input or without highdicom installed; a
            reference file that cannot be read or does not match the labels' grid.
        ValueError: malformed arguments (array shapes, undescribed label values, duplicate segments).
    """
    wanted = _check_formats(formats)
    out_base = Path(out_base)
    if wanted == ["png"]:  # a 2D picture: no geometry, no segment descriptions
        labels = _check_labels(labels, 2)
    else:
        labels = _check_labels(labels)
        affine = _check_affine(affine)
        segments = _check_segments(segments, labels)
    if "dicom-seg" in wanted:
        if not dicom_series_files:
            raise UserError(
                "DICOM SEG output needs DICOM input (a folder holding the source series); for this input choose "
                "nifti, nrrd or seg.nrrd"
            )
        _require_highdicom()
    out_base.parent.mkdir(parents=True, exist_ok=True)
    context = {
        "segments": segments,
        "reference_nifti": reference_nifti,
        "dicom_series_files": dicom_series_files,
        "algorithm": algorithm,
    }
    written = []
    for fmt in wanted:
        path = out_base.with_name(out_base.name + SUFFIXES[fmt])
        WRITERS[fmt].write(labels, affine, path, context)
        written.append(path)
    return written


def write_probabilities(probs: np.ndarray, affine: np.ndarray, path: str | Path, *, channel_axis: int = 0) -> Path:
    """Write class probabilities as a 4D NIfTI ``(i, j, k, c)``, 2 bytes per value.

    NIfTI has no float16 type, so values are stored as uint16 with ``scl_slope = 1/65535`` (a uniform step of
    1.5e-5, finer than float16 near 1); every NIfTI reader (nibabel ``get_fdata``, ITK, Slicer) applies the
    scaling and gets floats in [0, 1].

    Args:
        probs: probabilities in [0, 1] with one channel axis and the spatial axes ``(i, j, k)`` in order;
            channel-first ``(c, i, j, k)`` as MONAI returns them by default.
        affine: 4x4 voxel-to-RAS+ matrix of the ``(i, j, k)`` grid.
        path: the output file (``.nii.gz`` or ``.nii``).
        channel_axis: where the channel axis is in ``probs`` (0, or -1/3 for channels-last input).

    Returns:
        ``path``.
    """
    import nibabel as nib

    probs = np.asarray(probs)
    if probs.ndim != 4:
        raise ValueError(f"probabilities must be 4D (one channel axis and i, j, k), got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise ValueError(f"probabilities must be floating point, got {probs.dtype}")
    data = np.moveaxis(probs, channel_axis, -1)
    low, high = float(np.nanmin(data)), float(np.nanmax(data))
    if np.isnan(low) or low < -1e-3 or high > 1.0 + 1e-3:
        raise ValueError(f"probabilities must lie within [0, 1], got {low:g}..{high:g} (pass softmax output)")
    stored = np.rint(np.clip(data, 0.0, 1.0) * _PROBABILITY_SCALE).astype(np.uint16)
    affine = _check_affine(affine)
    img = nib.Nifti1Image(stored, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_slope_inter(1.0 / _PROBABILITY_SCALE, 0.0)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"volseg class probabilities"
    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path


# --------------------------------------------------------------------------------------------------------
# Checks


def _check_formats(formats: Sequence[str]) -> list[str]:
    if isinstance(formats, str):
        formats = [formats]
    wanted: list[str] = []
    for fmt in formats:
        name = str(fmt).strip().lower()
        if name not in WRITERS:
            raise UserError(f"unknown output format {fmt!r}; valid formats: {', '.join(FORMATS)}")
        if name not in wanted:
            wanted.append(name)
    if not wanted:
        raise UserError(f"no output format given; valid formats: {', '.join(FORMATS)}")
    if "png" in wanted and len(wanted) > 1:
        raise UserError("png is the format of 2D label maps; it cannot go with the 3D formats")
    return wanted


def _check_labels(labels: np.ndarray, ndim: int = 3) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != ndim:
        axes = "(i, j, k)" if ndim == 3 else "(x, y)"
        raise ValueError(f"labels must be a {ndim}D {axes} array, got shape {labels.shape}")
    if labels.dtype == np.uint8:
        return labels
    if labels.dtype != np.bool_ and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer array, got {labels.dtype}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > 255):
        raise ValueError(f"label values must lie within 0..255, got {labels.min()}..{labels.max()}")
    return labels.astype(np.uint8)


def _check_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got shape {affine.shape}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ValueError("affine is singular")
    return affine


def label_counts(labels: np.ndarray, minlength: int = 0) -> np.ndarray:
    """Voxels per label value (index = value) of a non-negative integer label map.

    ``torch.bincount`` counts uint8 directly; ``np.bincount`` first converts the whole map to int64, which on a
    512 x 512 x 200 map costs ten times as long.
    """
    import torch

    if labels.size and labels.dtype in (np.uint8, np.int16, np.int32, np.int64) and labels.min() >= 0:
        flat = torch.from_numpy(np.ravel(labels, order="K"))  # a view for C- or Fortran-ordered maps
        return torch.bincount(flat, minlength=minlength).numpy()
    return np.bincount(np.asarray(labels, dtype=np.int64).ravel(), minlength=minlength)


def _check_segments(segments: Sequence[SegmentInfo], labels: np.ndarray) -> list[SegmentInfo]:
    segments = list(segments)
    values = [int(s.value) for s in segments]
    names = [s.name for s in segments]
    if any(not 1 <= v <= 255 for v in values):
        raise ValueError(f"segment values must lie within 1..255 (0 is background), got {values}")
    if len(set(values)) != len(values) or len(set(names)) != len(names):
        raise ValueError(f"segment names and values must be unique, got {list(zip(names, values, strict=True))}")
    present = np.flatnonzero(label_counts(labels))
    missing = sorted(set(int(v) for v in present) - {0} - set(values))
    if missing:
        raise ValueError(f"label values {missing} are in the label map but have no segment description")
    return segments


def _tuple(value: Any, kind: type) -> Any:
    return None if value is None else tuple(kind(v) for v in value)


# --------------------------------------------------------------------------------------------------------
# NIfTI


def _write_nifti(labels: np.ndarray, affine: np.ndarray, path: Path, reference: str | Path | None) -> None:
    import nibabel as nib

    if reference is None:
        img = nib.Nifti1Image(labels, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    else:
        ref = _load_reference(Path(reference))
        if tuple(ref.shape[:3]) != labels.shape:
            raise UserError(
                f"reference image has shape {tuple(ref.shape)} but the labels {labels.shape}: not the same grid",
                reference,
            )
        if not np.allclose(ref.affine, affine, rtol=0.0, atol=1e-3):
            raise UserError("reference image's affine differs from the labels' affine: not the same grid", reference)
        header = nib.Nifti1Header.from_header(ref.header)
        qform, qcode = ref.header.get_qform(coded=True)
        sform, scode = ref.header.get_sform(coded=True)
        img = nib.Nifti1Image(labels, None, header=header)
        # Keep both transforms and their codes exactly as the reference has them.
        img.set_qform(qform, code=int(qcode) if qform is not None else 0)
        img.set_sform(sform, code=int(scode) if sform is not None else 0)
    hdr = img.header
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(1.0, 0.0)
    hdr["cal_min"] = 0
    hdr["cal_max"] = 0
    hdr.set_intent("label")
    hdr["descrip"] = b"volseg segmentation"
    hdr["aux_file"] = b""
    with atomic_path(path) as tmp:
        if path.name.endswith(".gz"):
            tmp.write_bytes(gzip_bytes(img.to_bytes()))
        else:
            nib.save(img, tmp)


def _load_reference(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(path)
    except FileNotFoundError:
        raise UserError("reference image does not exist", path) from None
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for unreadable files
        raise UserError(f"cannot read reference image ({exc})", path) from None


# --------------------------------------------------------------------------------------------------------
# NRRD and Slicer .seg.nrrd


def _fmt(x: float) -> str:
    """Shortest text that reads back as the same double (no "-0")."""
    return repr(float(x) + 0.0)


def _vector(v: Sequence[float]) -> str:
    return "(" + ",".join(_fmt(x) for x in v) + ")"


def _escape(value: str) -> str:
    """NRRD key/value escaping: backslash and newline."""
    return value.replace("\\", "\\\\").replace("\n", "\\n")


def _write_nrrd(path: Path, labels: np.ndarray, affine: np.ndarray, fields: dict[str, str]) -> None:
    lps = LPS_TO_RAS @ affine
    lines = [
        "NRRD0004",
        "# Complete NRRD file format specification at:",
        "# http://teem.sourceforge.net/nrrd/format.html",
        "type: unsigned char",
        "dimension: 3",
        "space: left-posterior-superior",
        "sizes: " + " ".join(str(n) for n in labels.shape),
        "space directions: " + " ".join(_vector(lps[:3, a]) for a in range(3)),
        "kinds: domain domain domain",
        "encoding: gzip",
        "space origin: " + _vector(lps[:3, 3]),
    ]
    lines += [f"{key}:={_escape(value)}" for key, value in fields.items()]
    header = ("\n".join(lines) + "\n\n").encode("utf-8")
    data = np.ravel(labels, order="F").data  # NRRD: first axis (i) fastest
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(header)
            with gzip.GzipFile(fileobj=f, mode="wb", compresslevel=_GZIP_LEVEL, mtime=0) as gz:
                for start in range(0, len(data), _CHUNK):
                    gz.write(data[start : start + _CHUNK])


def _extents(labels: np.ndarray, segments: Sequence[SegmentInfo]) -> list[tuple[int, ...]]:
    """Voxel bounding box ``(i0, i1, j0, j1, k0, k1)`` (inclusive) of each segment; ``(0, -1) * 3`` when empty."""
    from scipy import ndimage

    boxes = ndimage.find_objects(labels, max_label=255)
    extents: list[tuple[int, ...]] = []
    for seg in segments:
        box = boxes[seg.value - 1]
        if box is None:
            extents.append((0, -1, 0, -1, 0, -1))
        else:
            extents.append(tuple(v for s in box for v in (int(s.start), int(s.stop) - 1)))
    return extents


def _code_text(code: Sequence[str]) -> str:
    """A code triplet for a Slicer terminology string; the separators (~ ^ |) may not appear inside."""
    return "^".join(str(part).translate(str.maketrans("~^|", "-- ")).strip() for part in code)


def slicer_terminology(segment: SegmentInfo) -> str | None:
    """Slicer's TerminologyEntry value for a segment with codes, or None when it has neither category nor type."""
    if segment.category is None and segment.type is None:
        return None
    category = segment.category or TISSUE
    kind = segment.type or TISSUE
    parts = [
        SLICER_TERMINOLOGY_CONTEXT,
        _code_text(category),
        _code_text(kind),
        "^^",  # type modifier
        SLICER_ANATOMIC_CONTEXT,
        "^^",  # anatomic region
        "^^",  # anatomic region modifier
    ]
    return "~".join(parts)


def _segment_colors(segments: Sequence[SegmentInfo]) -> list[tuple[tuple[int, int, int], bool]]:
    """(RGB, auto_generated) per segment."""
    colors = segment_colors(segments)
    return [(colors[s.value], s.color is None) for s in segments]


def _slicer_fields(labels: np.ndarray, affine: np.ndarray, segments: Sequence[SegmentInfo]) -> dict[str, str]:
    fields: dict[str, str] = {}
    extents = _extents(labels, segments)
    for n, (seg, extent, (rgb, auto_color)) in enumerate(
        zip(segments, extents, _segment_colors(segments), strict=True)
    ):
        key = f"Segment{n}_"
        terminology = slicer_terminology(seg)
        fields[key + "Color"] = " ".join(_fmt(round(c / 255.0, 6)) for c in rgb)
        fields[key + "ColorAutoGenerated"] = "1" if auto_color else "0"
        fields[key + "Extent"] = " ".join(str(v) for v in extent)
        fields[key + "ID"] = _single_line(seg.name)
        fields[key + "LabelValue"] = str(int(seg.value))
        fields[key + "Layer"] = "0"
        fields[key + "Name"] = _single_line(seg.name)
        fields[key + "NameAutoGenerated"] = "0"
        fields[key + "Tags"] = f"TerminologyEntry:{terminology}|" if terminology else ""
    ni, nj, nk = labels.shape
    geometry = "".join(f"{_fmt(v)};" for v in affine.ravel()) + f"0;{ni - 1};0;{nj - 1};0;{nk - 1};"
    fields["Segmentation_ContainedRepresentationNames"] = "Binary labelmap|"
    fields["Segmentation_ConversionParameters"] = (
        f"Reference image geometry|{geometry}|Geometry (image-to-RAS matrix and extent) of the image that was "
        "segmented&"
    )
    fields["Segmentation_MasterRepresentation"] = "Binary labelmap"
    fields["Segmentation_ReferenceImageExtentOffset"] = "0 0 0"
    fields["Segmentation_SourceRepresentation"] = "Binary labelmap"  # the name newer Slicer versions use
    return fields


def _single_line(text: str) -> str:
    return " ".join(str(text).split("\n"))


# --------------------------------------------------------------------------------------------------------
# DICOM SEG


def _require_highdicom() -> None:
    try:
        import highdicom  # noqa: F401
    except ImportError:
        raise UserError("DICOM SEG output needs the highdicom package: pip install highdicom") from None


@dataclass
class _SourcePlane:
    dataset: Dataset
    frame: int  # 1-based frame number in a multi-frame file, 0 for a single-frame image
    position: np.ndarray  # ImagePositionPatient (LPS mm), as stored


def _read_sources(files: Sequence[Path]) -> list[Dataset]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    datasets: dict[str, Dataset] = {}
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"cannot read source DICOM file for the DICOM SEG ({exc})", path) from None
        if "SOPInstanceUID" not in ds or "SeriesInstanceUID" not in ds:
            raise UserError("source DICOM file has no SOPInstanceUID/SeriesInstanceUID", path)
        for keyword in _TYPE2_COPIED:  # highdicom copies these from the source; anonymizers may drop them
            if keyword not in ds:
                setattr(ds, keyword, "")
        datasets.setdefault(str(ds.SOPInstanceUID), ds)  # duplicate files of one image count once
    sources = list(datasets.values())
    series = {str(ds.SeriesInstanceUID) for ds in sources}
    if len(series) != 1:
        raise UserError(
            f"DICOM SEG source files belong to {len(series)} series; pass the files of one series", files[0]
        )
    if "FrameOfReferenceUID" not in sources[0]:
        raise UserError("source series has no FrameOfReferenceUID; a DICOM SEG cannot be placed on it", files[0])
    return sources


def _planes(ds: Dataset) -> list[_SourcePlane]:
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None:
        return [_SourcePlane(ds, 0, np.array([float(v) for v in ds.ImagePositionPatient]))]
    shared = ds.get("SharedFunctionalGroupsSequence") or [None]
    planes = []
    for f, item in enumerate(per_frame):
        container = item if "PlanePositionSequence" in item else shared[0]
        if container is None or not container.get("PlanePositionSequence"):
            raise UserError(f"frame {f + 1} has no PlanePositionSequence", ds.filename)
        position = container.PlanePositionSequence[0].ImagePositionPatient
        planes.append(_SourcePlane(ds, f + 1, np.array([float(v) for v in position])))
    return planes


def _orientation(ds: Dataset) -> list[float]:
    if "ImageOrientationPatient" in ds:
        return [float(v) for v in ds.ImageOrientationPatient]
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(group) or []
        if items and "PlaneOrientationSequence" in items[0]:
            return [float(v) for v in items[0].PlaneOrientationSequence[0].ImageOrientationPatient]
    return []


def _lo(text: str) -> str:
    """A DICOM LO value: one line, at most 64 characters, no backslash."""
    text = " ".join(str(text).replace("\\", "/").split())
    return text if len(text) <= _LO_MAX else text[: _LO_MAX - 3] + "..."


def _seg_geometry(labels: np.ndarray, affine: np.ndarray, sources: list[Any]) -> dict[str, Any]:
    """The SEG's frames: source images in frame order, their positions, orientation and steps in LPS."""
    ni, nj, nk = labels.shape
    first = sources[0]
    # Geometry of the labels' grid in LPS: i runs along the row cosine, j along the column cosine.
    lps = LPS_TO_RAS @ affine
    col_step, row_step = float(np.linalg.norm(lps[:3, 0])), float(np.linalg.norm(lps[:3, 1]))
    row_cos, col_cos = lps[:3, 0] / col_step, lps[:3, 1] / row_step
    slice_step = float(np.linalg.norm(lps[:3, 2]))
    positions = lps[:3, 3][np.newaxis, :] + np.arange(nk)[:, np.newaxis] * lps[:3, 2][np.newaxis, :]

    # Each slice k of the labels is matched to the source plane at its position. Matched slices keep the
    # source's exact ImagePositionPatient (so highdicom references that image per frame); slices that match
    # none (the reader resampled an irregular or tilted series) are placed where the affine puts them.
    planes = [p for ds in sources for p in _planes(ds)]
    source_positions = np.stack([p.position for p in planes])
    tolerance = max(_POSITION_TOLERANCE * min(col_step, row_step, slice_step), _MIN_TOLERANCE_MM)
    distances = np.linalg.norm(positions[:, np.newaxis, :] - source_positions[np.newaxis, :, :], axis=-1)
    nearest = distances.argmin(axis=1)
    matched = distances[np.arange(nk), nearest] <= tolerance
    frame_positions = np.where(matched[:, np.newaxis], source_positions[nearest], positions)

    # Single-frame sources in slice order (k), the unmatched ones after them; a multi-frame source goes first.
    rank = {id(planes[int(nearest[k])].dataset): k for k in range(nk) if matched[k]}
    multiframe = [ds for ds in sources if "PerFrameFunctionalGroupsSequence" in ds]
    if multiframe:
        source_images = [multiframe[0]]
        further = [ds for ds in sources if ds is not multiframe[0]]
    else:
        source_images = sorted(sources, key=lambda ds: rank[id(ds)] if id(ds) in rank else nk)
        further = []
        # highdicom wants one identical ImageOrientationPatient string in every image; the reader accepted
        # differences below 1e-4, so give these in-memory copies (never written back) the first one's value.
        for ds in source_images[1:]:
            ds.ImageOrientationPatient = source_images[0].ImageOrientationPatient
    orientation = [*row_cos, *col_cos]
    source_orientation = _orientation(first)
    if len(source_orientation) == 6 and np.max(np.abs(np.subtract(orientation, source_orientation))) <= 1e-4:
        orientation = source_orientation

    return {"source_images": source_images, "further": further, "orientation": orientation,
            "frame_positions": frame_positions, "row_step": row_step, "col_step": col_step,
            "slice_step": slice_step}  # fmt: skip


def _seg_descriptions(
    segments: Sequence[SegmentInfo], algorithm: dict[str, Any] | None
) -> tuple[list[Any], dict[str, Any]]:
    """highdicom's segment descriptions, and the algorithm's name, version, bundle and bundle version."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algo = {"name": "volseg", "version": __version__, **(algorithm or {})}
    name, version = str(algo.get("name") or "volseg"), str(algo.get("version") or __version__)
    bundle, bundle_version = algo.get("bundle"), algo.get("bundle_version")
    parameters = {"bundle": str(bundle)} if bundle else {}
    if bundle_version:
        parameters["bundle_version"] = str(bundle_version)
    identification = hd.AlgorithmIdentificationSequence(
        name=_lo(name),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(version),
        parameters=parameters or None,
    )
    descriptions = []
    for number, (seg, (rgb, _)) in enumerate(zip(segments, _segment_colors(segments), strict=True), start=1):
        category = seg.category or TISSUE
        kind = seg.type or TISSUE
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=_lo(seg.name),
                segmented_property_category=hd.sr.CodedConcept(category[1], category[0], _lo(category[2])),
                segmented_property_type=hd.sr.CodedConcept(kind[1], kind[0], _lo(kind[2])),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=identification,
                tracking_uid=hd.UID(),
                tracking_id=_lo(seg.name),
                display_color=hd.color.CIELabColor.from_rgb(*rgb),
            )
        )

    return descriptions, {"name": name, "version": version, "bundle": bundle, "bundle_version": bundle_version}


def _write_dicom_seg(
    labels: np.ndarray,
    affine: np.ndarray,
    path: Path,
    segments: Sequence[SegmentInfo],
    files: Sequence[Path],
    algorithm: dict[str, Any] | None,
) -> None:
    import highdicom as hd

    sources = _read_sources(files)
    ni, nj, _ = labels.shape
    first = sources[0]
    if (int(first.Rows), int(first.Columns)) != (nj, ni):
        raise UserError(
            f"source images are {first.Rows} rows x {first.Columns} columns but the labels have {nj} rows x "
            f"{ni} columns: not the same grid",
            files[0],
        )
    g = _seg_geometry(labels, affine, sources)
    source_images, further, orientation = g["source_images"], g["further"], g["orientation"]
    frame_positions, row_step, col_step, slice_step = (
        g["frame_positions"],
        g["row_step"],
        g["col_step"],
        g["slice_step"],
    )
    # Label map remapped to segment numbers 1..N, as (frames, rows, columns) = (k, j, i).
    lut = np.zeros(256, dtype=np.uint8)
    for number, seg in enumerate(segments, start=1):
        lut[seg.value] = number
    pixels = np.ascontiguousarray(lut[labels].transpose(2, 1, 0))

    descriptions, algo = _seg_descriptions(segments, algorithm)
    name, version, bundle, bundle_version = algo["name"], algo["version"], algo["bundle"], algo["bundle_version"]
    model = f"{bundle} {bundle_version}".strip() if bundle else name
    description = _lo(f"{name} {version}" + (f": {model}" if bundle else ""))
    thickness = first.get("SliceThickness")
    try:
        series_number = int(first.get("SeriesNumber") or 0) + 1000
    except (TypeError, ValueError):
        series_number = 1000
    segmentation = hd.seg.Segmentation(
        source_images=source_images,
        further_source_images=further or None,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="volseg",
        manufacturer_model_name=_lo(model),
        software_versions=_lo(f"{name} {version}"),
        device_serial_number="0",
        content_description=description,
        content_label="VOLSEG",
        series_description=description,
        pixel_measures=hd.PixelMeasuresSequence(
            pixel_spacing=[row_step, col_step],
            slice_thickness=float(thickness) if thickness not in (None, "") else slice_step,
            spacing_between_slices=slice_step,
        ),
        plane_orientation=hd.PlaneOrientationSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT, image_orientation=orientation
        ),
        plane_positions=[
            hd.PlanePositionSequence(coordinate_system=hd.CoordinateSystemNames.PATIENT, image_position=p)
            for p in frame_positions
        ],
        omit_empty_frames=bool(pixels.any()),  # a SEG needs at least one frame: keep them all when none holds any
    )
    with atomic_path(path) as tmp:
        segmentation.save_as(tmp, enforce_file_format=True)
