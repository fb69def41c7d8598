"""The warm service (`volseg serve`): API surface, same answers as the predictor, limits, safety, clean-up."""

from __future__ import annotations

import gzip
import io
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path
from typing import Any

import dicom_factory as F
import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, assert_labels_present, free_port, save_nifti, stop_process, write_random_bundle

from volseg.data.synth import liver_ct_phantom
from volseg.errors import UserError
from volseg.infer import Predictor

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from volseg.serve import create_app, parse_bundles, upload_suffix  # noqa: E402

LABELS = {"liver": 1, "tumour": 2}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_bundle(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def phantom():
    return liver_ct_phantom(21, shape=(40, 36, 20), axcodes="LPS")


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory, phantom) -> Path:
    return save_nifti(tmp_path_factory.mktemp("scan") / "scan.nii.gz", phantom.image, phantom.affine)


@pytest.fixture(scope="module")
def expected(bundle: Path, scan: Path) -> np.ndarray:
    """What the predictor gives for the scan; it must hold every label, or comparing with it checks little."""
    labels = Predictor.from_bundle(bundle, "cpu").predict(scan).labels
    assert_labels_present(LABELS, labels, min_voxels=20)
    return labels


def wait_ready(client: Any, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        r = client.get("/readyz")
        if r.status_code == 200:
            return
        assert "error" not in r.json(), r.json()
        time.sleep(0.05)
    raise AssertionError("the service did not become ready")


@pytest.fixture()
def work(tmp_path: Path) -> Path:
    d = tmp_path / "work"
    d.mkdir()
    return d


@pytest.fixture()
def client(bundle: Path, work: Path):
    app = create_app([f"tiny={bundle}"], device="cpu", work_dir=work)
    with TestClient(app) as c:
        wait_ready(c)
        yield c
    assert list(work.iterdir()) == [], "request folders left behind"


def post(client: Any, path: Path | bytes, filename: str, **params: str) -> Any:
    data = path.read_bytes() if isinstance(path, Path) else path
    return client.post("/v1/segment", params=params, files={"file": (filename, data, "application/octet-stream")})


def nifti_from(content: bytes) -> Any:
    return nib.Nifti1Image.from_bytes(gzip.decompress(content))


def one_line_error(r: Any, status: int, *needles: str) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    message = body["error"]
    assert "\n" not in message and message
    for needle in needles:
        assert needle in message, message
    return message


# --------------------------------------------------------------------------------------------------------
# API surface


def test_health_ready_and_models(client: Any) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready", "models": ["tiny"]}
    models = client.get("/v1/models").json()["models"]
    assert len(models) == 1
    m = models[0]
    assert m["name"] == "tiny" and m["default"] is True
    assert m["labels"] == LABELS
    assert m["engine"] == "fast" and m["device"] == "cpu"
    assert "version" in m
    one_line_error(client.get("/v1/nothing"), 404)


def test_segment_nifti_equals_the_predictor_on_the_input_grid(client: Any, scan: Path, expected: np.ndarray) -> None:
    r = post(client, scan, "patient 7/scan.nii.gz")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    assert r.headers["content-disposition"] == 'attachment; filename="scan_seg.nii.gz"'
    assert r.headers["x-volseg-model"] == "tiny"
    out = nifti_from(r.content)
    src: Any = nib.load(str(scan))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.dataobj), expected)
    # The model named explicitly gives the same.
    r2 = post(client, scan, "scan.nii.gz", model="tiny")
    np.testing.assert_array_equal(np.asarray(nifti_from(r2.content).dataobj), expected)


def test_segment_seg_nrrd(client: Any, scan: Path, expected: np.ndarray, tmp_path: Path) -> None:
    nrrd = pytest.importorskip("nrrd")
    r = post(client, scan, "scan.nii.gz", format="seg.nrrd")
    assert r.status_code == 200, r.text
    assert r.headers["content-disposition"] == 'attachment; filename="scan_seg.seg.nrrd"'
    path = tmp_path / "answer.seg.nrrd"
    path.write_bytes(r.content)
    arr, header = nrrd.read(str(path))
    assert {header["Segment0_Name"], header["Segment1_Name"]} == {"liver", "tumour"}
    np.testing.assert_array_equal(arr, expected)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nib.load(str(scan)).affine  # type: ignore[attr-defined]
    np.testing.assert_allclose(np.asarray(header["space directions"], float), lps[:3, :3].T, atol=1e-5)


def test_segment_nrrd_input(client: Any, scan: Path) -> None:
    """An NRRD with its data attached: read with its geometry (volseg.imageio), answered on the NRRD's grid."""
    src: Any = nib.load(str(scan))
    img = np.asarray(src.dataobj).astype(np.int16)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ src.affine
    dirs = " ".join("(" + ",".join(f"{v:.10g}" for v in lps[:3, i]) + ")" for i in range(3))
    origin = "(" + ",".join(f"{v:.10g}" for v in lps[:3, 3]) + ")"
    header = (
        "NRRD0004\ntype: int16\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {img.shape[0]} {img.shape[1]} {img.shape[2]}\nspace directions: {dirs}\nspace origin: {origin}\n"
        "endian: little\nencoding: raw\n\n"
    )
    r = post(client, header.encode() + img.tobytes(order="F"), "scan.nrrd")
    assert r.status_code == 200, r.text
    out = nifti_from(r.content)
    labels = np.asarray(out.dataobj)
    assert labels.shape == img.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-4)
    # NRRD is read like NIfTI and segmented by the same engine: the same labels as for the NIfTI.
    want = Predictor.from_bundle(client.app.state.service.bundles["tiny"], "cpu").predict(scan).labels
    assert_labels_present(LABELS, want, min_voxels=20)
    np.testing.assert_array_equal(labels, want)


def test_dicom_seg_from_a_zipped_series(client: Any, phantom, tmp_path: Path) -> None:
    pytest.importorskip("highdicom")
    import highdicom as hd

    series = tmp_path / "series"
    files = F.write_series(series, phantom.image.astype(np.float32), phantom.affine, series_number=2)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in files:
            zf.write(f, f"study/ct/{f.name}")
    r = post(client, archive.getvalue(), "study.zip", format="dicom-seg")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom"
    assert r.headers["content-disposition"] == 'attachment; filename="study_seg.dcm"'
    path = tmp_path / "answer.dcm"
    path.write_bytes(r.content)
    seg = hd.seg.segread(str(path))
    assert {s.SegmentLabel for s in seg.SegmentSequence} <= {"liver", "tumour"}
    source_uids = {str(nib_ds.SeriesInstanceUID) for nib_ds in [_dcm(files[0])]}
    assert {str(ds.SeriesInstanceUID) for ds in seg.ReferencedSeriesSequence} == source_uids
    # The same series as NIfTI: labels on the series' grid, equal to the predictor's on the folder.
    r = post(client, archive.getvalue(), "study.zip")
    assert r.status_code == 200, r.text
    labels = np.asarray(nifti_from(r.content).dataobj)
    want = Predictor.from_bundle(client.app.state.service.bundles["tiny"], "cpu").predict(series).labels
    assert_labels_present(LABELS, want, min_voxels=20)
    np.testing.assert_array_equal(labels, want)


def _dcm(path: Path) -> Any:
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


# --------------------------------------------------------------------------------------------------------
# Refusals


def test_request_errors_are_one_line_json(client: Any, scan: Path) -> None:
    one_line_error(post(client, scan, "scan.nii.gz", model="other"), 404, "unknown model", "tiny")
    one_line_error(post(client, scan, "scan.nii.gz", format="png"), 400, "unknown format")
    one_line_error(post(client, scan, "scan.nii.gz", series="../x"), 400, "series")
    one_line_error(post(client, scan, "scan.nhdr"), 415, ".nhdr")
    one_line_error(post(client, scan, "scan.mhd"), 415)
    one_line_error(post(client, scan, "scan.png"), 415, "unsupported upload")
    one_line_error(client.post("/v1/segment", content=scan.read_bytes()), 415, "multipart")
    one_line_error(client.post("/v1/segment", files={"image": ("scan.nii.gz", b"x")}), 400, "'file'")
    one_line_error(post(client, scan, "scan.nii.gz", format="dicom-seg"), 422, "DICOM")
    message = one_line_error(post(client, b"not an image", "junk.nii.gz"), 422, "junk.nii.gz")
    assert "volseg-serve-" not in message and "/tmp" not in message, message


def test_headers_that_name_other_files_are_refused(client: Any, tmp_path: Path) -> None:
    target = tmp_path / "secret.raw"
    target.write_bytes(np.zeros(8, np.int16).tobytes())
    nhdr_like = (f"NRRD0004\ntype: int16\ndimension: 3\nsizes: 2 2 2\nencoding: raw\ndata file: {target}\n\n").encode()
    one_line_error(post(client, nhdr_like, "scan.nrrd"), 415, "data file")
    mha = f"ObjectType = Image\nNDims = 3\nDimSize = 2 2 2\nElementType = MET_SHORT\nElementDataFile = {target}\n"
    one_line_error(post(client, mha.encode(), "scan.mha"), 415, "ElementDataFile")


def test_upload_larger_than_the_limit_is_413(bundle: Path, work: Path) -> None:
    app = create_app([bundle], max_upload_mb=0.05, device="cpu", work_dir=work)
    with TestClient(app) as c:
        wait_ready(c)
        one_line_error(post(c, os.urandom(200_000), "big.nii.gz"), 413, "MB")

        def chunks():  # no Content-Length: the limit applies while reading
            boundary = "b0undary"
            yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.nii.gz"\r\n\r\n'.encode()
            for _ in range(10):
                yield os.urandom(20_000)
            yield f"\r\n--{boundary}--\r\n".encode()

        r = c.post("/v1/segment", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b0undary"})
        one_line_error(r, 413, "larger than")
    assert list(work.iterdir()) == []


def _zip(entries: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16) | 0
            zf.writestr(info, target)
    return buf.getvalue()


def test_zip_path_traversal_and_links_refused(client: Any, tmp_path: Path, work: Path) -> None:
    marker = f"escaped-{uuid.uuid4().hex[:8]}.dcm"
    for name in (f"../{marker}", f"ok/../../{marker}", f"/tmp/{marker}", f"C:/{marker}", f"..\\{marker}"):
        one_line_error(post(client, _zip({"a.dcm": b"x", name: b"payload"}), "s.zip"), 400, "outside the archive")
    one_line_error(post(client, _zip({"a.dcm": b"x"}, {"link.dcm": "/etc/passwd"}), "s.zip"), 400, "symbolic link")
    for where in (work, work.parent, Path("/tmp"), Path.cwd()):
        assert not (where / marker).exists()
    one_line_error(post(client, b"PK\x03\x04 not really", "s.zip"), 422, "zip")
    one_line_error(post(client, _zip({"readme.txt": b"hello"}), "s.zip"), 422)


def test_zip_bomb_refused(bundle: Path, work: Path) -> None:
    app = create_app([bundle], max_upload_mb=1, max_unzipped_mb=4, max_zip_files=50, device="cpu", work_dir=work)
    bomb = _zip({"zeros.dcm": bytes(20 * 2**20)})
    assert len(bomb) < 100_000
    with TestClient(app) as c:
        wait_ready(c)
        one_line_error(post(c, bomb, "bomb.zip"), 413, "unpack")
        one_line_error(post(c, _zip({f"{i}.dcm": b"x" for i in range(51)}), "many.zip"), 413, "entries")
        # A header that lies about the size is caught while unpacking.
        lying = bytearray(_zip({"zeros.dcm": bytes(6 * 2**20)}))
        central = lying.rfind(b"PK\x01\x02")
        lying[central + 24 : central + 28] = (1000).to_bytes(4, "little")  # uncompressed size in the central dir
        r = post(c, bytes(lying), "lying.zip")
        assert r.status_code in (413, 422), r.text
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------------------------------------
# Load, time-outs, readiness


class BlockingPredictor:
    """Wraps a real predictor; predict waits for ``go`` (and tells ``started``)."""

    def __init__(self, inner: Predictor, go: threading.Event, started: threading.Semaphore) -> None:
        self.inner, self.go, self.started = inner, go, started
        self.segments, self.algorithm, self.device, self.notes = inner.segments, inner.algorithm, inner.device, []

    def predict(self, source: Path, **kw: Any) -> Any:
        self.started.release()
        assert self.go.wait(30)
        return self.inner.predict(source, **kw)


def test_queue_full_is_503_and_nothing_is_lost(bundle: Path, scan: Path, expected: np.ndarray, work: Path) -> None:
    go, started = threading.Event(), threading.Semaphore(0)
    app = create_app(
        [bundle], max_queue=1, workers=1, work_dir=work,
        predictor_factory=lambda p: BlockingPredictor(Predictor.from_bundle(p, "cpu"), go, started),
    )  # fmt: skip
    service = app.state.service
    results: list[Any] = []
    with TestClient(app) as c:
        wait_ready(c)
        threads = [threading.Thread(target=lambda: results.append(post(c, scan, "scan.nii.gz"))) for _ in range(2)]
        threads[0].start()
        assert started.acquire(timeout=30)  # the first is being segmented
        threads[1].start()
        t0 = time.monotonic()
        while service.inflight < 2 and time.monotonic() - t0 < 30:  # the second waits in the queue
            time.sleep(0.01)
        assert service.inflight == 2
        r = post(c, scan, "scan.nii.gz")
        one_line_error(r, 503, "queue is full")
        assert int(r.headers["retry-after"]) >= 1
        go.set()
        for t in threads:
            t.join(60)
        assert [x.status_code for x in results] == [200, 200]
        for x in results:
            np.testing.assert_array_equal(np.asarray(nifti_from(x.content).dataobj), expected)
        assert service.inflight == 0
    assert list(work.iterdir()) == []


def test_timeout_is_504_and_the_folder_goes_when_the_case_ends(bundle: Path, scan: Path, work: Path) -> None:
    go, started = threading.Event(), threading.Semaphore(0)
    app = create_app(
        [bundle], timeout_s=0.5, work_dir=work,
        predictor_factory=lambda p: BlockingPredictor(Predictor.from_bundle(p, "cpu"), go, started),
    )  # fmt: skip
    service = app.state.service
    with TestClient(app) as c:
        wait_ready(c)
        one_line_error(post(c, scan, "scan.nii.gz"), 504, "no result within")
        assert service.inflight == 1 and len(list(work.iterdir())) == 1  # still being segmented
        go.set()
        t0 = time.monotonic()
        while (service.inflight or list(work.iterdir())) and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        assert service.inflight == 0
    assert list(work.iterdir()) == []


def test_readyz_waits_for_the_models_and_reports_a_failed_load(bundle: Path, tmp_path: Path) -> None:
    release = threading.Event()

    def slow(path: Path) -> Predictor:
        assert release.wait(30)
        return Predictor.from_bundle(path, "cpu")

    with TestClient(create_app([bundle], predictor_factory=slow, warmup=False)) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        one_line_error(c.post("/v1/segment"), 503, "loading")
        release.set()
        wait_ready(c)
    empty = tmp_path / "empty"
    empty.mkdir()
    with TestClient(create_app([empty])) as c:
        t0 = time.monotonic()
        while c.get("/readyz").json().get("status") == "loading" and time.monotonic() - t0 < 30:
            time.sleep(0.02)
        one_line_error(c.get("/readyz"), 503, "not a bundle")


def test_bundle_names() -> None:
    assert list(parse_bundles(["a=/x/b1", "/y/b2"])) == ["a", "b2"]
    with pytest.raises(UserError, match="two bundles named"):
        parse_bundles(["/x/b", "/y/b"])
    with pytest.raises(UserError, match="no bundle"):
        parse_bundles([])
    assert upload_suffix("A.NII.GZ") == ".nii.gz" and upload_suffix("x/y.nii") == ".nii"


# --------------------------------------------------------------------------------------------------------
# The real command


def _multipart(path: Path, boundary: str = "volsegtestboundary") -> tuple[bytes, str]:
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n\r\n'.encode()
    return head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


@pytest.mark.slow
def test_volseg_serve_subprocess(bundle: Path, scan: Path, expected: np.ndarray, tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "volseg", "serve", "--bundle", str(bundle), "--port", str(port), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                with urllib.request.urlopen(f"{base}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() - t0 < 120, "not ready after 120 s"
            time.sleep(0.2)
        body, ctype = _multipart(scan)
        req = urllib.request.Request(f"{base}/v1/segment?format=nifti", data=body, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200
            content = r.read()
        np.testing.assert_array_equal(np.asarray(nifti_from(content).dataobj), expected)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{base}/v1/models?x=1", data=b"")  # POST to a GET route
        assert info.value.code == 405
    finally:
        rc = stop_process(proc, signal.SIGINT, 30)
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()
    assert not list(tmp_path.glob("volseg-serve-*")), "request folders left behind"
