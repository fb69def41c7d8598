"""Reading images: one reader for every format volseg takes, geometry included.

:func:`read_image` reads a scan for inference, QC and the demo: a NIfTI file, an NRRD/NHDR or MHA/MHD file, a 2D
picture (PNG, TIFF) or a folder holding a DICOM series, into an :class:`Image`: float32 values, the 4x4
voxel-to-RAS+ affine (nibabel's convention, what the writers take back), what the reader has to tell
(``notes``) and, for DICOM, the series' files (for a DICOM SEG). :func:`open_image` opens the same formats header
first, with the stored voxels read on demand (the data check reads shape and geometry before any voxel).
:func:`read_labels` reads a label map (evaluation).

Conventions
-----------
* Arrays are ``(i, j, k[, c])``: the first index runs fastest in the file (NIfTI's and ITK's ``x``), channels last.
  NRRD, MHA and DICOM store LPS geometry; :data:`LPS_TO_RAS` turns it into RAS (its own inverse, used by the
  writers on the way out).
* A DICOM folder is scanned once per case (:func:`volseg.data.dicom.read_series`); the notes say which series was
  chosen and which were skipped.
* NIfTI is read through ISA-L's gzip when ``isal`` is installed (:func:`gunzip_bytes`), and scaled in float32 by
  torch: several times faster than nibabel's float64 scaling on a large CT.
* A problem with the file is a :class:`~volseg.errors.UserError` with one line naming it.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import UserError, one_line

__all__ = [
    "LPS_TO_RAS",
    "Image",
    "ImageFile",
    "gunzip_bytes",
    "gzip_bytes",
    "is_nifti",
    "open_image",
    "read_image",
    "read_labels",
    "sitk_header",
]

#: RAS <-> LPS (DICOM, NRRD and ITK world coordinates): the first two world axes negated; its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

NIFTI_SUFFIXES = (".nii", ".nii.gz")
#: 2D picture formats, read with Pillow (as MONAI's PILReader does: arrays transposed to (x, y)).
PICTURE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")

#: What reading a damaged file may raise in nibabel or SimpleITK.
READ_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    zlib.error,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    struct.error,
    RuntimeError,
    MemoryError,
)


@dataclass
class Image:
    """A scan as read: values, geometry and what the reader has to tell.

    Attributes:
        array: float32 ``(i, j, k)`` (3D), ``(i, j, k, c)`` (channels last) or ``(x, y)`` for a 2D picture.
        affine: 4x4 voxel-to-world matrix in RAS+ millimetres.
        meta: ``path`` and ``format`` (``nifti``, ``nrrd``, ``mha``, ``dicom``, ``picture``, ...); for DICOM also
            ``series`` (the :class:`~volseg.data.dicom.SeriesInfo` read).
        notes: one line per thing the user should know (the series chosen and skipped, resampling, tilt).
        dicom_files: the DICOM series' files, for DICOM input.
    """

    array: np.ndarray
    affine: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    dicom_files: list[Path] | None = None

    @property
    def path(self) -> Path:
        return Path(self.meta.get("path", ""))


@dataclass
class ImageFile:
    """An opened image file: its shape and affine from the header, its stored voxels on demand."""

    path: Path
    shape: tuple[int, ...]
    affine: np.ndarray  # 4x4 voxel -> world (RAS mm)
    _load: Callable[[], np.ndarray]
    scaling: tuple[float, float] | None = None  # (slope, intercept) applied to the stored values

    def voxels(self) -> np.ndarray:
        """The stored values (unscaled, in their file type)."""
        return self._load()


def is_nifti(path: str | Path) -> bool:
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


# --------------------------------------------------------------------------------------------------------
# gzip


def gzip_bytes(data: bytes, level: int = 1) -> bytes:
    """gzip through ISA-L when ``isal`` is installed (several times faster than zlib), else the standard library.

    Level 1 is nibabel's own default for .nii.gz.
    """
    try:
        from isal import igzip

        return igzip.compress(data, compresslevel=level)
    except ImportError:
        import gzip

        return gzip.compress(data, compresslevel=level)


def gunzip_bytes(data: bytes) -> bytes:
    """Decompress gzip data through ISA-L when ``isal`` is installed, else the standard library."""
    try:
        from isal import igzip

        return igzip.decompress(data)
    except ImportError:
        import gzip

        return gzip.decompress(data)


# --------------------------------------------------------------------------------------------------------
# Reading a scan


def read_image(path: str | Path, series: str | None = None) -> Image:
    """Read a scan with its geometry: NIfTI, NRRD/NHDR, MHA/MHD, a 2D picture, or a DICOM series folder.

    Args:
        path: the file, or a folder holding a DICOM series.
        series: which series of a DICOM folder (SeriesInstanceUID; default: the CT/MR series with most slices).

    Raises:
        UserError: the file is missing, not an image volseg reads, or cannot be read (one line naming it).
    """
    p = Path(path)
    if p.is_dir():
        return _read_dicom(p, series)
    if not p.exists():
        raise UserError("input not found", p)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        from volseg.data.validate import check_image_file

        check_image_file(p, verify_data=False)
        arr, affine = _read_nifti(p)
        return Image(arr, affine, {"path": str(p), "format": "nifti"})
    if name.endswith(PICTURE_SUFFIXES):
        return _read_picture(p)
    vol = _open_sitk(p)
    arr = vol.voxels().astype(np.float32, copy=False)
    fmt = "nrrd" if name.endswith((".nrrd", ".nhdr")) else "mha" if name.endswith((".mha", ".mhd")) else "itk"
    return Image(arr, vol.affine, {"path": str(p), "format": fmt})


def _read_dicom(folder: Path, series: str | None) -> Image:
    from volseg.data.dicom import read_series

    vol = read_series(folder, series)
    notes = [f"chose {vol.series.summary()}"] + [f"skipped {s.summary()}" for s in vol.skipped] + list(vol.warnings)
    meta = {"path": str(folder), "format": "dicom", "series": vol.series}
    return Image(vol.array, vol.affine, meta, notes, list(vol.series.files))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI as float32 (scaling applied) with its affine; gzip through ISA-L when available.

    The stored integers are converted and scaled by torch (all threads), several times faster than nibabel's
    float64 scaling on a large CT.
    """
    import nibabel as nib

    try:
        if path.name.lower().endswith(".gz"):
            img: Any = nib.Nifti1Image.from_bytes(gunzip_bytes(path.read_bytes()))
        else:
            img = nib.load(str(path))
        stored = np.asarray(img.dataobj.get_unscaled())
        arr = _to_float32(stored, float(img.dataobj.slope), float(img.dataobj.inter))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a problem of the user's file
        raise UserError(f"cannot read image ({exc.__class__.__name__}: {one_line(exc, 150)})", path) from None
    return arr, np.asarray(img.affine, dtype=np.float64)


def _to_float32(stored: np.ndarray, slope: float, inter: float) -> np.ndarray:
    """``stored * slope + inter`` as float32 (NIfTI's scaling; nibabel treats a 0 or NaN slope as 1)."""
    import torch

    if not math.isfinite(slope) or slope == 0:
        slope = 1.0
    if not math.isfinite(inter):
        inter = 0.0
    if stored.dtype in (np.uint8, np.int8, np.int16, np.uint16, np.float32) and min(stored.strides) > 0:
        import warnings

        with warnings.catch_warnings():  # a read-only buffer: only read here, the result is a new tensor
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(stored)  # any positive strides (NIfTI arrays are Fortran-ordered): no copy
        out = t.to(torch.float32, copy=True)
        if slope != 1.0:
            out.mul_(slope)
        if inter != 0.0:
            out.add_(inter)
        return out.numpy()
    # Wide integers and float64 keep their precision through the scaling before the conversion.
    return (stored.astype(np.float64) * slope + inter).astype(np.float32)


def _read_picture(path: Path) -> Image:
    """A 2D picture as grey float32 ``(x, y)`` (Pillow's rows and columns transposed), identity affine."""
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as pic:
            arr = np.asarray(pic.convert("L"), dtype=np.float32).T
    except (OSError, ValueError, SyntaxError) as exc:
        raise UserError(f"cannot read image ({one_line(exc)})", path) from None
    return Image(np.ascontiguousarray(arr), np.eye(4), {"path": str(path), "format": "picture"})


# --------------------------------------------------------------------------------------------------------
# Header first: the data check


def open_image(path: str | Path) -> ImageFile:
    """Open one image (header only where the format allows it: NIfTI, NRRD, MHA); a problem is a one-line
    UserError. A DICOM folder is read whole."""
    p = Path(path)
    if p.is_dir():
        from volseg.data.dicom import read_series

        vol = read_series(p)
        array = vol.array
        return ImageFile(p, tuple(array.shape), np.asarray(vol.affine, dtype=np.float64), lambda: array)
    if p.name.lower().endswith(NIFTI_SUFFIXES):
        return _open_nifti(p)
    return _open_sitk(p)


def nifti_header(path: Path) -> Any:
    """The nibabel image of a NIfTI file, header read (no voxels), opened as MONAI's NibabelReader does; whatever
    fails is one UserError line."""
    import nibabel as nib

    errors: tuple[type[BaseException], ...] = (
        *READ_ERRORS,
        ArithmeticError,
        nib.filebasedimages.ImageFileError,
        nib.spatialimages.HeaderDataError,
    )
    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            img: Any = nib.load(str(path))
            # What MONAI's NibabelReader asks of the header (it compares qform, sform and zooms).
            _ = img.shape, img.affine, img.dataobj.slope, img.dataobj.inter, img.header.get_zooms()
            _ = img.get_qform(), img.get_sform()
    except errors as exc:
        raise UserError(f"nibabel cannot open it ({one_line(exc)})", path) from None
    return img


def _open_nifti(path: Path) -> ImageFile:
    from volseg.data.validate import check_image_file

    check_image_file(path, verify_data=False)
    img = nifti_header(path)
    proxy = img.dataobj
    slope, inter = float(proxy.slope), float(proxy.inter)
    scaling = None if (slope, inter) == (1.0, 0.0) else (slope, inter)

    def load() -> np.ndarray:
        try:
            return np.asarray(proxy.get_unscaled())
        except READ_ERRORS as exc:
            raise UserError(f"cannot read the voxel data ({read_reason(exc)})", path) from None

    return ImageFile(path, tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64), load, scaling)


def sitk_header(path: Path) -> Any:
    """A SimpleITK reader with the file's header read (no voxels); an unreadable header is a UserError."""
    import SimpleITK as sitk

    from volseg.data.validate import sitk_reason

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise UserError(f"cannot read the image header ({sitk_reason(exc)})", path) from None
    return reader


def _open_sitk(path: Path) -> ImageFile:
    """NRRD, MHA/MHD and the other formats ITK reads: the geometry from the header (LPS turned into RAS)."""
    import SimpleITK as sitk

    from volseg.data.validate import sitk_reason

    reader = sitk_header(path)
    size = tuple(int(s) for s in reader.GetSize())
    ncomp = int(reader.GetNumberOfComponents())
    shape = size + ((ncomp,) if ncomp > 1 else ())
    nd = len(size)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(nd, nd)
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)
    origin = np.asarray(reader.GetOrigin(), dtype=np.float64)
    lps = np.eye(4)
    k = min(nd, 3)
    lps[:k, :k] = (direction * spacing)[:k, :k]
    lps[:k, 3] = origin[:k]
    affine = LPS_TO_RAS @ lps

    def load() -> np.ndarray:
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise UserError(f"cannot read the voxel data ({sitk_reason(exc)})", path) from None
        array = sitk.GetArrayFromImage(image)  # (z, y, x[, c])
        axes = tuple(range(nd))[::-1] + ((nd,) if array.ndim > nd else ())
        return np.transpose(array, axes)

    return ImageFile(path, shape, affine, load)


def read_reason(exc: BaseException) -> str:
    """One line for a reading failure, naming truncation and damaged gzip data as such."""
    if isinstance(exc, EOFError):
        return f"file is truncated: {one_line(exc)}"
    if isinstance(exc, zlib.error):
        return f"damaged gzip data: {one_line(exc)}"
    return one_line(exc)


# --------------------------------------------------------------------------------------------------------
# Label maps


def read_labels(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """The integer label array and the 4x4 affine of a NIfTI label map.

    Raises:
        UserError: the file cannot be read as NIfTI, or holds non-integer values.
    """
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.spatialimages.SpatialImage):
            raise TypeError(f"nibabel read it as {type(img).__name__}")
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many kinds on damaged or foreign files
        raise UserError(f"cannot read as NIfTI: {exc}", path) from exc
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise UserError("holds non-integer values; expected a label map", path)
        data = data.astype(np.int64)
    elif data.dtype.kind not in "iub":
        raise UserError(f"has data type {data.dtype}; expected an integer label map", path)
    return data, np.asarray(img.affine, dtype=np.float64)
