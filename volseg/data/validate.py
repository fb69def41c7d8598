"""Check an image file before the MONAI pipeline reads it, so a bad file ends with one clear line.

:func:`check_image_file` reads a NIfTI header itself (the first 540 bytes, through gzip for ``.nii.gz``) and
refuses what nibabel and MONAI would either crash on or read wrongly:

* not a NIfTI file, a NIfTI pair header in a single ``.nii``, a gzip file named ``.nii`` or a ``.nii.gz`` that is
  not gzip, a gzip stream that is damaged or cut short;
* ``dim[0]`` outside 1..7, a dimension of 0 or less, more than :data:`MAX_VOXELS` voxels;
* a datatype other than the integer and float types (complex, RGB, binary, float128);
* ``vox_offset`` that is not finite or points into the header (nibabel would read the header as voxels);
* non-finite ``pixdim``, ``scl_slope``/``scl_inter``, quaternion or ``srow`` values, an unknown
  ``qform_code``/``sform_code``, a quaternion longer than 1, an affine that is not finite or is singular;
* a voxel size (``pixdim[1..3]``) of 0 or below when no sform gives the geometry (the affine then comes from
  ``pixdim``, and nibabel would silently take 1 mm for 0 and the absolute value of a negative size);
* voxel data shorter than the header says.

Voxel values are not read here: :func:`replace_non_finite` is the inference engines' step for NaN and Inf voxels
(``volseg check-data`` reports them as errors in training data).

Other formats: a DICOM series folder goes through :func:`volseg.data.dicom.read_series`; NRRD, MHA/MHD, PNG and
TIFF have their header read by SimpleITK. Every problem is a :class:`~volseg.errors.UserError` with a one-line
message naming the file.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import UserError, one_line

__all__ = ["MAX_VOXELS", "SUPPORTED_DTYPES", "check_image_file", "replace_non_finite", "sitk_reason"]

#: More voxels than this in one file is taken as a garbled header rather than an image.
MAX_VOXELS = 10**9
#: NIfTI datatype codes that nibabel and MONAI read as plain numeric arrays.
SUPPORTED_DTYPES = {
    2: "uint8",
    4: "int16",
    8: "int32",
    16: "float32",
    64: "float64",
    256: "int8",
    512: "uint16",
    768: "uint32",
    1024: "int64",
    1280: "uint64",
}
#: Smallest singular value (mm) of the voxel-to-world matrix before it is called singular.
MIN_VOXEL_SIZE_MM = 1e-6

_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_SITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")
_GZIP_MAGIC = b"\x1f\x8b"
_N1_SINGLE = b"n+1\x00"
_N1_PAIR = b"ni1\x00"
_N2_MAGIC = (b"n+2\x00\r\n\x1a\n", b"ni2\x00\r\n\x1a\n")
_CHUNK = 1 << 20


def check_image_file(path: str | Path, *, verify_data: bool = True) -> None:
    """Refuse an image file that the reading pipeline would crash on or read wrongly.

    Args:
        path: a NIfTI file (``.nii``, ``.nii.gz``), a DICOM series folder, or an NRRD/MHA/MHD/PNG/TIFF file.
        verify_data: also check that the voxel data is all there; for ``.nii.gz`` this decompresses the whole
            stream once (constant memory), which also catches damaged gzip data. Without it only the header
            (and for ``.nii`` the file size) is checked.

    Raises:
        UserError: one line naming the file and what is wrong with it.
    """
    p = Path(path)
    if p.is_dir():
        from volseg.data.dicom import read_series

        read_series(p)
        return
    if not p.exists():
        raise UserError("file not found", p)
    name = p.name.lower()
    if name.endswith(_NIFTI_SUFFIXES):
        _check_nifti(p, verify_data)
    elif name.endswith(_SITK_SUFFIXES):
        _check_sitk(p)
    else:
        raise UserError(f"not an image file volseg reads (expected {', '.join(_NIFTI_SUFFIXES + _SITK_SUFFIXES)})", p)


# --------------------------------------------------------------------------------------------------------
# NIfTI


def _check_nifti(path: Path, verify_data: bool) -> None:
    head, gz = _read_head(path)
    header, needed = _parse_header(path, head)
    if gz:
        if verify_data:
            _check_gzip_stream(path, needed)
    else:
        size = path.stat().st_size
        if size < needed:
            raise UserError(
                f"data shorter than the header says: file has {size} bytes, header needs {needed} "
                f"({_shape_text(header)} {SUPPORTED_DTYPES[int(header['datatype'])]} from byte "
                f"{int(header['vox_offset'])})",
                path,
            )
    _check_with_nibabel(path)


def _read_head(path: Path) -> tuple[bytes, bool]:
    """The first 544 bytes (decompressed for .gz) and whether the file is gzip-compressed."""
    gz = path.name.lower().endswith(".gz")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(544)
        if not gz:
            if raw[:2] == _GZIP_MAGIC:
                raise UserError("file is gzip-compressed but named .nii; rename it to .nii.gz", path)
            return raw, False
        if raw[:2] != _GZIP_MAGIC:
            raise UserError("named .nii.gz but not gzip-compressed (no gzip signature)", path)
        with gzip.open(path, "rb") as fh:
            return fh.read(544), True
    except UserError:
        raise
    except (OSError, EOFError, zlib.error) as exc:
        raise UserError(f"cannot read the NIfTI header: {_gzip_reason(exc)}", path) from None


def _gzip_reason(exc: BaseException) -> str:
    text = one_line(exc)
    if isinstance(exc, EOFError):
        return f"gzip stream is truncated ({text})"
    if isinstance(exc, (zlib.error, gzip.BadGzipFile)):
        return f"damaged gzip data ({text})"
    return text


def _header_kind(path: Path, head: bytes) -> tuple[str, Any, int]:
    """(byte order, nibabel header class, header size) of a single-file NIfTI-1 or NIfTI-2 header."""
    import nibabel as nib

    if len(head) < 348:
        raise UserError(f"too short for a NIfTI header ({len(head)} bytes, a header has 348)", path)
    sizes = {struct.unpack("<i", head[:4])[0]: "<", struct.unpack(">i", head[:4])[0]: ">"}
    if 348 in sizes:
        endian, klass, header_size = sizes[348], nib.Nifti1Header, 348
        magic = head[344:348]
        if magic == _N1_PAIR:
            raise UserError("header of a NIfTI pair (.hdr/.img) in a single-file NIfTI: no voxel data here", path)
        if magic != _N1_SINGLE:
            raise UserError(f"not a NIfTI-1 file (magic {magic!r}, expected {_N1_SINGLE!r})", path)
    elif 540 in sizes:
        endian, klass, header_size = sizes[540], nib.Nifti2Header, 540
        if len(head) < 540:
            raise UserError(f"too short for a NIfTI-2 header ({len(head)} bytes, a header has 540)", path)
        if head[4:12] != _N2_MAGIC[0]:
            raise UserError(f"not a single-file NIfTI-2 file (magic {head[4:12]!r})", path)
    else:
        first = struct.unpack("<i", head[:4])[0]
        raise UserError(f"not a NIfTI file (header size field is {first}, expected 348 or 540)", path)
    return endian, klass, header_size


def _check_sizes(path: Path, raw: Any, header_size: int) -> tuple[int, list[int], int, float]:
    """dim, datatype and vox_offset: (ndim, shape, datatype code, offset)."""
    import nibabel as nib

    dim = [int(v) for v in raw["dim"]]
    ndim = dim[0]
    if not 1 <= ndim <= 7:
        raise UserError(f"dim[0] = {ndim}: the number of dimensions must be 1..7", path)
    shape = dim[1 : ndim + 1]
    for axis, size in enumerate(shape, start=1):
        if size < 1:
            raise UserError(f"dim[{axis}] = {size}: every dimension must be at least 1", path)
    voxels = math.prod(shape)
    if voxels > MAX_VOXELS:
        raise UserError(f"absurd image size {'x'.join(map(str, shape))} ({voxels:.3g} voxels)", path)

    code = int(raw["datatype"])
    if code not in SUPPORTED_DTYPES:
        label = nib.nifti1.data_type_codes.label[code] if code in _known_codes() else "unknown"
        raise UserError(f"unsupported datatype code {code} ({label}); expected an integer or float type", path)

    offset = float(raw["vox_offset"])
    if not math.isfinite(offset) or offset < header_size + 4 or offset > 2**40:
        raise UserError(
            f"vox_offset {offset:g} is impossible for a single-file NIfTI (at least {header_size + 4})", path
        )

    return ndim, shape, code, offset


def _check_geometry(path: Path, raw: Any, ndim: int) -> tuple[int, int]:
    """pixdim, scaling, the qform and the sform: (qform_code, sform_code)."""
    import nibabel as nib

    pixdim = [float(v) for v in raw["pixdim"][1 : min(ndim, 3) + 1]]
    if not all(math.isfinite(v) for v in pixdim):
        raise UserError(f"pixdim {_fmt(pixdim)} is not finite", path)

    slope, inter = float(raw["scl_slope"]), float(raw["scl_inter"])
    if math.isinf(slope):
        raise UserError("scl_slope is infinite", path)
    if slope != 0 and math.isfinite(slope) and not math.isfinite(inter):
        raise UserError(f"scl_inter is {inter} while scl_slope is {slope:g}", path)

    qcode, scode = int(raw["qform_code"]), int(raw["sform_code"])
    codes = nib.nifti1.xform_codes.value_set()
    for key, value in (("qform_code", qcode), ("sform_code", scode)):
        if value not in codes:
            raise UserError(f"unknown {key} {value} (expected 0..{max(codes)})", path)
    if scode <= 0:
        # No sform: the affine is built from pixdim (through the qform, or alone), so pixdim must hold the voxel size.
        for axis, voxel in enumerate(pixdim, start=1):
            if voxel == 0:
                raise UserError(
                    f"voxel size pixdim[{axis}] = 0 and no sform: the spacing is unknown (nibabel and MONAI would "
                    "assume 1 mm); set pixdim or an sform",
                    path,
                )
            if voxel < 0:
                raise UserError(
                    f"voxel size pixdim[{axis}] = {voxel:g} is negative and there is no sform: a voxel size must be "
                    f"positive (nibabel would silently use {-voxel:g}, dropping what the sign may have meant)",
                    path,
                )
    # The quaternion is checked even when qform_code is 0: MONAI's NIfTI reader computes the qform regardless.
    quat = [float(raw[k]) for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y", "qoffset_z")]
    if qcode > 0 and not all(math.isfinite(v) for v in quat):
        raise UserError(f"qform quaternion/offset {_fmt(quat)} is not finite", path)
    if not all(math.isfinite(v) for v in quat[:3]) or math.sqrt(sum(v * v for v in quat[:3])) > 1 + 1e-4:
        bcd = _fmt(quat[:3], ", ")
        raise UserError(f"qform quaternion (b, c, d) = ({bcd}) is not a rotation (longer than 1)", path)
    if scode > 0:
        srow = np.concatenate([np.asarray(raw[k], dtype=np.float64) for k in ("srow_x", "srow_y", "srow_z")])
        if not np.all(np.isfinite(srow)):
            raise UserError(f"sform rows {_fmt(srow)} are not finite", path)

    return qcode, scode


def _header_affine(path: Path, header: Any, ndim: int, qcode: int, scode: int) -> None:
    """The affine nibabel computes from the header: finite and not singular."""
    import nibabel as nib

    try:
        affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    except (ValueError, KeyError, ArithmeticError, nib.spatialimages.HeaderDataError) as exc:
        raise UserError(f"cannot compute the affine from the header ({one_line(exc)})", path) from None
    if not np.all(np.isfinite(affine)):
        raise UserError("the affine from the header is not finite", path)
    spatial = affine[:3, : min(ndim, 3)]
    sv = np.linalg.svd(spatial, compute_uv=False)
    if float(sv.min()) < MIN_VOXEL_SIZE_MM:
        which = "sform" if scode > 0 else "qform" if qcode > 0 else "pixdim"
        raise UserError(
            f"singular affine from the {which} (a voxel axis of length {sv.min():.3g} mm or axes that coincide)",
            path,
        )


def _parse_header(path: Path, head: bytes) -> tuple[Any, int]:
    """Check the raw header fields; return the nibabel header and the bytes the file must hold."""
    endian, klass, header_size = _header_kind(path, head)
    raw = klass(head[:header_size], endianness=endian, check=False)
    ndim, shape, code, offset = _check_sizes(path, raw, header_size)
    qcode, scode = _check_geometry(path, raw, ndim)
    header = _fixed_header(path, klass, head[:header_size], endian)
    _header_affine(path, header, ndim, qcode, scode)
    itemsize = np.dtype(SUPPORTED_DTYPES[code]).itemsize
    return header, int(offset) + math.prod(shape) * itemsize


def _known_codes() -> set[int]:
    import nibabel as nib

    return {int(c) for c in nib.nifti1.data_type_codes.value_set()}


def _fixed_header(path: Path, klass: Any, block: bytes, endian: str) -> Any:
    """The header as nibabel gives it when loading (its fixes applied, its logging kept quiet)."""
    import nibabel as nib

    try:
        with nib.imageglobals.LoggingOutputSuppressor():
            return klass(block, endianness=endian, check=True)
    except (ValueError, KeyError, ArithmeticError, nib.spatialimages.HeaderDataError) as exc:
        raise UserError(f"invalid NIfTI header ({one_line(exc)})", path) from None


def _check_gzip_stream(path: Path, needed: int) -> None:
    """Decompress the stream (every gzip member, CRC checked) in bounded chunks: it must be intact and hold at
    least ``needed`` bytes. Decompression stops 64 MiB past ``needed``: nothing beyond is ever read."""
    limit = needed + 64 * _CHUNK
    total = 0
    try:
        with open(path, "rb") as fh:
            decomp = zlib.decompressobj(wbits=31)
            buf = b""
            while total <= limit:
                if not buf:
                    buf = fh.read(_CHUNK)
                    if not buf:
                        break
                total += len(decomp.decompress(buf, 16 * _CHUNK))
                buf = decomp.unconsumed_tail
                if decomp.eof:
                    # Another member may follow, after optional zero padding (as Python's gzip reads it).
                    buf = decomp.unused_data.lstrip(b"\x00")
                    while not buf:
                        buf = fh.read(_CHUNK)
                        if not buf:
                            break
                        buf = buf.lstrip(b"\x00")
                    if not buf:
                        break
                    decomp = zlib.decompressobj(wbits=31)
            truncated = not decomp.eof and total <= limit
    except (OSError, zlib.error) as exc:
        raise UserError(f"damaged gzip data ({one_line(exc)})", path) from None
    if truncated:
        raise UserError(f"gzip stream is truncated: it ends after {total} bytes (the header needs {needed})", path)
    if total < needed:
        raise UserError(f"data shorter than the header says: {total} bytes uncompressed, header needs {needed}", path)


def _check_with_nibabel(path: Path) -> None:
    """Open the file as MONAI will (nibabel, header only): whatever still fails is reported in one line."""
    from volseg.imageio import nifti_header

    nifti_header(path)


def _shape_text(header: Any) -> str:
    dim = [int(v) for v in header["dim"]]
    return "x".join(str(v) for v in dim[1 : dim[0] + 1])


def _fmt(values: Any, sep: str = " ") -> str:
    return sep.join(f"{float(v):g}" for v in values)


# --------------------------------------------------------------------------------------------------------
# NRRD, MHA/MHD, PNG, TIFF


def _check_sitk(path: Path) -> None:
    from volseg.imageio import sitk_header

    reader = sitk_header(path)
    size = reader.GetSize()
    if not size or min(size) < 1:
        raise UserError(f"image size {size} has an empty dimension", path)
    if math.prod(size) * max(1, reader.GetNumberOfComponents()) > MAX_VOXELS:
        raise UserError(f"absurd image size {'x'.join(map(str, size))}", path)
    geometry = [*reader.GetSpacing(), *reader.GetOrigin(), *reader.GetDirection()]
    if not all(math.isfinite(v) for v in geometry):
        raise UserError("spacing, origin or direction is not finite", path)
    if min(reader.GetSpacing()) <= 0:
        raise UserError(f"spacing {_fmt(reader.GetSpacing())} is not positive", path)


def sitk_reason(exc: BaseException) -> str:
    """The informative line of a SimpleITK/ITK error (they span several lines of C++ context)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    for ln in lines:
        if "ERROR" in ln.upper() and ":" in ln:
            text = ln.split(":", 1)[1].strip() if ln.upper().startswith("ITK ERROR") else ln
            text = text.split("):", 1)[-1].strip() if "):" in text else text
            return text[:200] or type(exc).__name__
    return lines[-1][:200] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------------------------
# Voxel values


def replace_non_finite(image: Any, path: str | Path | None = None) -> tuple[Any, str | None]:
    """NaN and Inf voxels of a channel-first image replaced by finite values, with a note saying so.

    NaN marks missing data in float images (voxels outside the field of view after registration or resampling,
    undefined values of parametric MR maps); left in, it spreads through resampling, normalisation and every
    convolution window it touches, and the segmentation comes out as background without a word. Per channel,
    NaN and -Inf become the channel's smallest finite value (no signal) and +Inf its largest. Both inference
    engines call this on the image as read, before any resampling, so they see the same values.

    Args:
        image: a float ``torch.Tensor`` (or MONAI ``MetaTensor``) of shape (C, *spatial), as read (any strides).
        path: the file, for the error message.

    Returns:
        ``(image, None)``, the same object, when every voxel is finite (one pass over the data, nothing copied);
        otherwise ``(a corrected copy, note)``, the note one line: the counts and the values put in.

    Raises:
        UserError: a channel has no finite voxel at all.
    """
    import torch

    if not image.is_floating_point() or bool(torch.isfinite(image.sum())):
        return image, None  # a finite sum means finite voxels (NaN and Inf propagate); an overflow is checked below
    out = image.clone()
    n_nan = n_neg = n_pos = 0
    low: list[str] = []
    high: list[str] = []
    multi = out.shape[0] > 1
    for c in range(out.shape[0]):
        channel = out[c]
        finite = torch.isfinite(channel)
        if bool(finite.all()):
            continue
        if not bool(finite.any()):
            which = f"channel {c} has" if multi else "it has"
            raise UserError(f"no finite voxel: {which} only NaN or Inf values", path)
        values = channel[finite]
        lo, hi = values.min(), values.max()
        nan, inf = torch.isnan(channel), torch.isinf(channel)
        neg, pos = inf & (channel < 0), inf & (channel > 0)
        counts = int(nan.sum()), int(neg.sum()), int(pos.sum())
        n_nan, n_neg, n_pos = n_nan + counts[0], n_neg + counts[1], n_pos + counts[2]
        channel[nan | neg] = lo
        channel[pos] = hi
        where = f"channel {c}: " if multi else ""
        if counts[0] or counts[1]:
            low.append(f"{where}{float(lo):g}")
        if counts[2]:
            high.append(f"{where}{float(hi):g}")
    total = n_nan + n_neg + n_pos
    if not total:
        return image, None  # the sum overflowed; the voxels are finite
    found = " and ".join(f"{n} {kind}" for n, kind in ((n_nan, "NaN"), (n_neg, "-Inf"), (n_pos, "+Inf")) if n)
    whose = "the channel's" if multi else "the"
    put = []
    if low:
        kinds = " and ".join(kind for n, kind in ((n_nan, "NaN"), (n_neg, "-Inf")) if n)
        put.append(f"{kinds} by {whose} smallest finite value ({', '.join(low)})")
    if high:
        put.append(f"+Inf by {whose} largest ({', '.join(high)})")
    plural = "s" if total > 1 else ""
    return out, f"{found} voxel{plural} (of {image.numel()}) replaced: {'; '.join(put)}"
