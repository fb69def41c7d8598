"""Readers never crash or hang on malformed input: they accept the file or raise a one-line UserError.

Hypothesis mutates NIfTI headers, cuts and flips gzip streams, writes random bytes named .nii/.nii.gz, and
garbles DICOM tags and bytes. Each example runs under a time limit (a hang fails the test) and hypothesis's
deadline. Examples are derandomized (the same on every run); ``VOLSEG_FUZZ_EXAMPLES=500`` fuzzes deeper.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import signal
import struct
import tempfile
import warnings
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import dicom_factory as factory
import nibabel as nib
import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from monai.transforms import LoadImage
from pydicom.datadict import dictionary_VR, tag_for_keyword

from volseg.data.dicom import read_series
from volseg.data.validate import check_image_file
from volseg.errors import UserError

# Hypothesis keeps a cache of constants even without an example database: not in the repository.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "volseg-hypothesis")
EXAMPLES = int(os.environ.get("VOLSEG_FUZZ_EXAMPLES", "50"))
TIME_LIMIT_S = 10
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=3),
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
AFFINE = np.array([[-0.8, 0, 0, 30.0], [0, 0.9, 0.1, -20.0], [0, -0.1, 2.5, 10.0], [0, 0, 0, 1]])


class _Hang(BaseException):
    """Raised by the timer; a BaseException so that no `except Exception` in a reader swallows it."""


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def alarm(*_: object) -> None:
        raise _Hang

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    except _Hang:
        raise AssertionError(f"no answer within {seconds} s: the reader hangs") from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(call: Callable[[], object]) -> UserError | None:
    """None when ``call`` accepts the input, the UserError when it refuses it; anything else fails the test."""
    with _time_limit(TIME_LIMIT_S), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            call()
        except UserError as exc:
            text = str(exc)
            assert text.strip() and "\n" not in text, f"not one line: {text!r}"
            return exc
    return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@contextlib.contextmanager
def _fresh(scratch: Path) -> Iterator[Path]:
    """A new folder for one example, removed afterwards; the libraries' warnings about garbage are muted."""
    folder = Path(tempfile.mkdtemp(dir=scratch))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------
# NIfTI


def _nifti_bytes(kind: str = "nifti1") -> bytes:
    data = np.arange(4 * 3 * 2, dtype=np.int16).reshape(4, 3, 2) - 7
    klass = nib.Nifti1Image if kind == "nifti1" else nib.Nifti2Image
    img = klass(data, AFFINE)
    img.set_qform(AFFINE, code=1)
    img.set_sform(AFFINE, code=2)
    return img.to_bytes()


def _readable(path: Path) -> None:
    """What an accepted file must allow: nibabel reads its voxels and MONAI loads it."""
    img = nib.load(path)
    assert np.asanyarray(img.dataobj).shape == img.shape
    LoadImage(image_only=True)(str(path))


def _write(folder: Path, raw: bytes, gz: bool) -> Path:
    path = folder / ("x.nii.gz" if gz else "x.nii")
    path.write_bytes(gzip.compress(raw, mtime=0) if gz else raw)
    return path


_F32 = st.one_of(
    st.floats(width=32, allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-30, 1e30, 352.0, 351.0]),
)
_I16 = st.one_of(st.integers(-3, 8), st.integers(-32768, 32767), st.sampled_from([0, 1, 32767, -32768]))
_FIELDS: dict[str, st.SearchStrategy] = {
    "sizeof_hdr": st.one_of(st.just(540), st.integers(-(2**31), 2**31 - 1)),
    "dim": st.lists(_I16, min_size=8, max_size=8),
    "pixdim": st.lists(_F32, min_size=8, max_size=8),
    "datatype": st.one_of(st.sampled_from([0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1536, 1792, 2048, 2304]), _I16),
    "bitpix": _I16,
    "vox_offset": st.one_of(_F32, st.sampled_from([0.0, 348.0, 352.0, 353.0, 4096.0, 1e12])),
    "scl_slope": _F32,
    "scl_inter": _F32,
    "qform_code": _I16,
    "sform_code": _I16,
    "quatern_b": _F32,
    "quatern_c": _F32,
    "quatern_d": _F32,
    "qoffset_x": _F32,
    "qoffset_z": _F32,
    "srow_x": st.lists(_F32, min_size=4, max_size=4),
    "srow_z": st.lists(_F32, min_size=4, max_size=4),
    "magic": st.sampled_from([b"n+1", b"ni1", b"n+2", b"", b"abc"]),
    "extension": st.binary(min_size=4, max_size=4),
}


@FUZZ
@given(
    mutations=st.dictionaries(st.sampled_from(sorted(_FIELDS)), st.none(), min_size=1, max_size=4).flatmap(
        lambda keys: st.fixed_dictionaries({k: _FIELDS[k] for k in keys})
    ),
    gz=st.booleans(),
    kind=st.sampled_from(["nifti1", "nifti1", "nifti2"]),
)
def test_nifti_header_mutations(scratch: Path, mutations: dict, gz: bool, kind: str) -> None:
    raw = bytearray(_nifti_bytes(kind))
    size = 348 if kind == "nifti1" else 540
    hdr = (nib.Nifti1Header if kind == "nifti1" else nib.Nifti2Header)(bytes(raw[:size]), check=False)
    for field, value in mutations.items():
        if field == "extension":
            raw[size : size + 4] = value  # the extension flag bytes nibabel reads after the header
        elif field == "magic" and kind == "nifti2":
            hdr[field] = value + b"\0\r\n\x1a\n"
        elif field == "vox_offset" and kind == "nifti2":  # an int64 in NIfTI-2
            hdr[field] = int(np.clip(np.nan_to_num(value), -(2**62), 2**62))
        else:
            hdr[field] = value
    raw[:size] = hdr.binaryblock
    with _fresh(scratch) as folder:
        path = _write(folder, bytes(raw), gz)
        if _outcome(lambda: check_image_file(path)) is None:
            _readable(path)


@FUZZ
@given(cut=st.floats(0, 1, exclude_max=True), kind=st.sampled_from(["nifti1", "nifti2"]))
def test_truncated_gzip_is_refused(scratch: Path, cut: float, kind: str) -> None:
    stream = gzip.compress(_nifti_bytes(kind) + bytes(64), mtime=0)
    with _fresh(scratch) as folder:
        path = folder / "cut.nii.gz"
        path.write_bytes(stream[: int(cut * len(stream))])
        assert _outcome(lambda: check_image_file(path)) is not None


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6))
def test_gzip_byte_flips(scratch: Path, flips: list[tuple[float, int]]) -> None:
    stream = bytearray(gzip.compress(_nifti_bytes(), mtime=0))
    for where, value in flips:
        stream[int(where * len(stream))] = value
    with _fresh(scratch) as folder:
        path = folder / "flipped.nii.gz"
        path.write_bytes(bytes(stream))
        if _outcome(lambda: check_image_file(path)) is None:
            _readable(path)


@FUZZ
@given(
    data=st.one_of(
        st.binary(max_size=1500),
        st.binary(max_size=400).map(lambda tail: _nifti_bytes()[:352] + tail),
        st.binary(max_size=400).map(lambda tail: _nifti_bytes("nifti2")[:544] + tail),
    ),
    name=st.sampled_from(["r.nii", "r.nii.gz", "r.nrrd", "r.mha"]),
    compress=st.booleans(),
)
def test_random_bytes(scratch: Path, data: bytes, name: str, compress: bool) -> None:
    with _fresh(scratch) as folder:
        path = folder / name
        path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
        if _outcome(lambda: check_image_file(path)) is None and name.endswith((".nii", ".nii.gz")):
            _readable(path)


def _patch_header(field: str, value: object, kind: str = "nifti1") -> bytes:
    raw = bytearray(_nifti_bytes(kind))
    size = 348 if kind == "nifti1" else 540
    klass = nib.Nifti1Header if kind == "nifti1" else nib.Nifti2Header
    hdr = klass(bytes(raw[:size]), check=False)
    hdr[field] = value
    raw[:size] = hdr.binaryblock
    return bytes(raw)


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("dim", [3, 4, 0, 2, 1, 1, 1, 1], "dim[2] = 0: every dimension must be at least 1"),
        ("dim", [9, 4, 3, 2, 1, 1, 1, 1], "dim[0] = 9: the number of dimensions must be 1..7"),
        ("dim", [3, 32767, 32767, 32767, 1, 1, 1, 1], "absurd image size"),
        ("datatype", 32, "unsupported datatype code 32 (complex64)"),
        ("datatype", 999, "unsupported datatype code 999 (unknown)"),
        ("vox_offset", 0.0, "vox_offset 0 is impossible"),
        ("vox_offset", float("nan"), "vox_offset nan is impossible"),
        ("vox_offset", 4096.0, "data shorter than the header says"),
        ("pixdim", [1, 1, float("inf"), 1, 1, 1, 1, 1], "pixdim 1 inf 1 is not finite"),
        ("scl_slope", float("inf"), "scl_slope is infinite"),
        ("scl_inter", float("nan"), "scl_inter is nan while scl_slope is"),
        ("qform_code", 77, "unknown qform_code 77"),
        ("quatern_b", 3.0, "is not a rotation (longer than 1)"),
        ("srow_x", [0, 0, 0, 0], "singular affine from the sform"),
        ("srow_z", [0, float("nan"), 1, 0], "sform rows"),
        ("magic", b"ni1", "header of a NIfTI pair"),
        ("magic", b"xyz", "not a NIfTI-1 file"),
        ("sizeof_hdr", 1234, "not a NIfTI file (header size field is 1234"),
    ],
)
def test_known_bad_headers(tmp_path: Path, field: str, value: object, words: str) -> None:
    for gz in (False, True):
        path = _write(tmp_path, _patch_header(field, value), gz)
        with pytest.raises(UserError) as info:
            check_image_file(path)
        assert words in str(info.value) and str(path) in str(info.value)


def test_valid_files_pass(tmp_path: Path) -> None:
    for kind in ("nifti1", "nifti2"):
        for gz in (False, True):
            path = _write(tmp_path, _nifti_bytes(kind), gz)
            check_image_file(path)
            _readable(path)
    multi = tmp_path / "multi.nii.gz"  # several gzip members with zero padding, as some tools write
    raw = _nifti_bytes()
    multi.write_bytes(gzip.compress(raw[:400]) + gzip.compress(raw[400:]) + bytes(16))
    check_image_file(multi)
    nifti2 = _patch_header("dim", [3, 10**6, 10**6, 10**6, 1, 1, 1, 1], "nifti2")
    with pytest.raises(UserError, match="absurd image size"):
        check_image_file(_write(tmp_path, nifti2, False))


def test_misnamed_compression(tmp_path: Path) -> None:
    raw = _nifti_bytes()
    (tmp_path / "a.nii").write_bytes(gzip.compress(raw))
    with pytest.raises(UserError, match="gzip-compressed but named .nii"):
        check_image_file(tmp_path / "a.nii")
    (tmp_path / "b.nii.gz").write_bytes(raw)
    with pytest.raises(UserError, match="not gzip-compressed"):
        check_image_file(tmp_path / "b.nii.gz")


# --------------------------------------------------------------------------------------------------------
# DICOM

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}


def _set_raw(path: Path, keyword: str, value: bytes | None) -> None:
    """Put raw bytes into a top-level element of an explicit-VR little-endian file (None deletes it).

    pydicom refuses to write invalid values, so the element is written valid and its bytes replaced.
    """
    tag = tag_for_keyword(keyword)
    ds = pydicom.dcmread(path, force=True)
    if value is None:
        if tag in ds:
            del ds[tag]
            ds.save_as(path)
        return
    vr = dictionary_VR(tag).split(" or ")[-1]
    if tag not in ds:
        ds.add_new(tag, vr, 0 if vr in ("US", "SS", "UL", "SL") else b"\0\0" if vr in _LONG_VRS else "0")
        ds.save_as(path)
    vr = ds.get_item(tag).VR
    data = path.read_bytes()
    key = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    pos = data.index(key, 132)
    if len(value) % 2:
        value += b"\0" if vr in _LONG_VRS else b" "
    if vr in _LONG_VRS:
        end = pos + 12 + struct.unpack("<I", data[pos + 8 : pos + 12])[0]
        element = key + b"\0\0" + struct.pack("<I", len(value)) + value
    else:
        end = pos + 8 + struct.unpack("<H", data[pos + 6 : pos + 8])[0]
        element = key + struct.pack("<H", len(value)) + value
    path.write_bytes(data[:pos] + element + data[end:])


def _us(n: int) -> bytes:
    return struct.pack("<H", n)


_TEXT = st.sampled_from(
    [b"", b"abc", b"nan", b"inf", b"-inf", b"1e400", b"-1", b"0", b"1e-300", b"\\\\", b"1\\2", b"\xff\xfe"]
)
_DS_LISTS = st.lists(_TEXT | st.sampled_from([b"1", b"0", b"0.5"]), min_size=1, max_size=7).map(b"\\".join)
_TAGS: dict[str, st.SearchStrategy] = {
    "ImagePositionPatient": st.none() | _DS_LISTS,
    "ImageOrientationPatient": st.none()
    | _DS_LISTS
    | st.sampled_from([b"0\\0\\0\\0\\0\\0", b"1\\0\\0\\1\\0\\0", b"1e308\\1e308\\0\\0\\1\\0"]),
    "PixelSpacing": st.none() | _DS_LISTS | st.sampled_from([b"0\\0", b"-1\\-1", b"0\\1", b"-0.5\\0.5"]),
    "SliceThickness": st.none() | _TEXT,
    "SpacingBetweenSlices": st.none() | _TEXT,
    "RescaleSlope": st.none() | _TEXT,
    "RescaleIntercept": st.none() | _TEXT,
    "NumberOfFrames": _TEXT | st.sampled_from([b"2", b"1000", b"1e10"]),
    "SeriesNumber": st.none() | _TEXT,
    "Rows": st.none() | st.integers(0, 65535).map(_us),
    "Columns": st.none() | st.integers(0, 65535).map(_us),
    "BitsAllocated": st.none() | st.sampled_from([0, 1, 7, 8, 12, 16, 24, 32, 64, 65535]).map(_us),
    "BitsStored": st.none() | st.integers(0, 70).map(_us),
    "HighBit": st.none() | st.integers(0, 70).map(_us),
    "PixelRepresentation": st.none() | st.integers(0, 3).map(_us),
    "SamplesPerPixel": st.none() | st.integers(0, 4).map(_us),
    "PhotometricInterpretation": st.sampled_from([b"RGB", b"PALETTE COLOR", b"YBR_FULL", b"", b"MONOCHROME1"]),
    "PixelData": st.none() | st.binary(max_size=80),
    "SeriesInstanceUID": st.none() | st.sampled_from([b"", b"1.2.3"]),
    "SOPInstanceUID": st.none() | st.sampled_from([b"", b"1.2.3"]),
    "ImageType": st.sampled_from([b"\\\\", b"LOCALIZER", b"ORIGINAL\\PRIMARY\\LOCALIZER"]),
}
_VOLUME = factory.phantom((6, 5, 3))


@FUZZ
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(sorted(_TAGS)), st.booleans()).flatmap(
            lambda kw: st.tuples(st.just(kw[0]), _TAGS[kw[0]], st.just(kw[1]))
        ),
        min_size=1,
        max_size=3,
    ),
    which=st.integers(0, 2),
)
def test_dicom_tag_mutations(scratch: Path, changes: list, which: int) -> None:
    with _fresh(scratch) as folder:
        files = sorted(factory.write_series(folder, _VOLUME, factory.axial_affine()))
        for keyword, value, everywhere in changes:
            for path in files if everywhere else [files[which]]:
                _set_raw(path, keyword, value)
        result = _outcome(lambda: check_image_file(folder))
        if result is None:
            vol = read_series(folder)
            assert np.all(np.isfinite(vol.affine))


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "insert"]),
            st.floats(0, 1, exclude_max=True),
            st.binary(min_size=1, max_size=6),
        ),
        min_size=1,
        max_size=6,
    ),
    multiframe=st.booleans(),
    header_only=st.booleans(),
)
def test_dicom_byte_mutations(scratch: Path, edits: list, multiframe: bool, header_only: bool) -> None:
    with _fresh(scratch) as folder:
        if multiframe:
            files = [factory.write_multiframe(folder / "mf.dcm", _VOLUME, factory.oblique_affine())]
        else:
            files = sorted(factory.write_series(folder, _VOLUME, factory.axial_affine()))
        for n, (op, where, payload) in enumerate(edits):
            path = files[n % len(files)]
            data = bytearray(path.read_bytes())
            span = min(len(data), 1500) if header_only else len(data)
            pos = int(where * span)
            if op == "flip" and data:
                data[min(pos, len(data) - 1)] = payload[0]
            elif op == "cut":
                data = data[:pos]
            else:
                data[pos:pos] = payload
            path.write_bytes(bytes(data))
        _outcome(lambda: check_image_file(folder))


@pytest.mark.parametrize(
    ("keyword", "value", "everywhere", "words"),
    [
        ("ImagePositionPatient", None, False, "ImagePositionPatient missing"),
        ("ImagePositionPatient", b"abc\\1\\2", False, "ImagePositionPatient is not numeric"),
        ("ImagePositionPatient", b"1e400\\0\\0", False, "ImagePositionPatient is not finite"),
        ("ImageOrientationPatient", b"0\\0\\0\\0\\0\\0", True, "invalid ImageOrientationPatient"),
        ("ImageOrientationPatient", b"1e308\\1e308\\0\\0\\1\\0", True, "invalid ImageOrientationPatient"),
        ("PixelSpacing", b"0\\0", True, "is not positive"),
        ("PixelSpacing", b"-1\\-1", True, "is not positive"),
        ("Rows", _us(7), False, "pixel data is less than expected"),
        ("BitsAllocated", _us(12), False, "'Bits Allocated' value of '12' is invalid"),
        ("NumberOfFrames", b"0", False, "NumberOfFrames x Rows x Columns is 0 x 5 x 6"),
        ("RescaleSlope", b"nan", False, "RescaleSlope nan / RescaleIntercept 0 is not finite"),
        ("SeriesNumber", b"1e400", False, "malformed DICOM element"),
        ("SamplesPerPixel", None, True, "Samples per Pixel"),
    ],
)
def test_known_bad_dicom_tags(tmp_path: Path, keyword: str, value: bytes | None, everywhere: bool, words: str) -> None:
    files = sorted(factory.write_series(tmp_path, _VOLUME, factory.axial_affine()))
    for path in files if everywhere else files[1:2]:
        _set_raw(path, keyword, value)
    with warnings.catch_warnings(), pytest.raises(UserError) as info:
        warnings.simplefilter("ignore")
        check_image_file(tmp_path)
    assert words in str(info.value) and "\n" not in str(info.value)
