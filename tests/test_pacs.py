"""DICOMweb round trip and the Orthanc watcher, against a real Orthanc with its DICOMweb plugin.

The Orthanc (Debian's ``orthanc`` and ``orthanc-dicomweb``) runs on a free loopback port with its storage in a
temporary folder, no DICOM port and HTTP basic authentication (tests/orthanc_server.py). Without it the tests
that need it are skipped, and fail in CI.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from helpers import REPO, TINY_FLOORS, assert_real_overlap, dciodvfy_errors, free_port, require_tool
from orthanc_server import PASSWORD, OrthancServer, environment, self_signed_certificate, started_orthanc
from pydicom.uid import generate_uid

from volseg.data.synth import liver_ct_phantom
from volseg.errors import UserError
from volseg.pacs import DicomWebError, DicomWebServer, OrthancWatcher, WatchRules, http_url, is_dicomweb_input

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


# ---------------------------------------------------------------------------------------------------------------
# Without a server


def test_urls() -> None:
    assert http_url("dicomweb://pacs.example:8042/dicom-web/") == "http://pacs.example:8042/dicom-web"
    assert http_url("dicomwebs://pacs.example/dicom-web") == "https://pacs.example/dicom-web"
    assert http_url("https://pacs.example/dicom-web") == "https://pacs.example/dicom-web"
    assert is_dicomweb_input("dicomweb://h/x") and is_dicomweb_input("http://h/x", study="1.2")
    assert not is_dicomweb_input("http://h/x") and not is_dicomweb_input("scan.nii.gz", study="1.2")
    with pytest.raises(UserError, match="credentials do not belong in the URL") as err:
        http_url("dicomweb://bob:hunter2@pacs:8042/dicom-web")
    assert "hunter2" not in str(err.value)
    with pytest.raises(UserError, match="expected dicomweb://"):
        http_url("ftp://pacs/dicom-web")


def test_credentials_from_the_environment() -> None:
    basic = DicomWebServer("dicomweb://h:1/dw", env={"VOLSEG_DICOMWEB_USER": "u", "VOLSEG_DICOMWEB_PASSWORD": "p"})
    assert basic.session.auth == ("u", "p")
    bearer = DicomWebServer("dicomweb://h:1/dw", env={"VOLSEG_DICOMWEB_TOKEN": "t0k"})
    assert bearer.session.headers["Authorization"] == "Bearer t0k"
    with pytest.raises(UserError, match="not both"):
        DicomWebServer("dicomweb://h:1/dw", env={"VOLSEG_DICOMWEB_TOKEN": "t", "VOLSEG_DICOMWEB_USER": "u"})
    with pytest.raises(UserError, match="go together"):
        DicomWebServer("dicomweb://h:1/dw", env={"VOLSEG_DICOMWEB_USER": "u"})
    with pytest.raises(UserError, match="CA bundle not found"):
        DicomWebServer("dicomwebs://h:1/dw", env={}, ca_bundle="/nonexistent/ca.pem")


def test_watch_rules() -> None:
    rules = WatchRules(("ct",), r"abdomen|liver")
    assert rules.refusal("CT", "Abdomen 5mm") is None
    assert "modality MR" in (rules.refusal("MR", "liver") or "")
    assert "does not match" in (rules.refusal("CT", "head") or "")
    assert rules.refusal("SEG", "liver") == "a segmentation"
    assert rules.refusal("CT", "liver", manufacturer="volseg") == "written by volseg"
    with pytest.raises(UserError, match="not a regular expression"):
        WatchRules(series_description="(")


@contextlib.contextmanager
def fake_server(statuses: list[int], certificate: Path | None = None) -> Iterator[tuple[int, list[str]]]:
    """A loopback HTTP(S) server answering each GET with the next status of ``statuses`` (the last one repeats),
    with an empty QIDO result for 200; yields its port and the paths asked for."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    asked: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            asked.append(self.path)
            status = statuses[min(len(asked), len(statuses)) - 1]
            body = b"[]" if status == 200 else b'{"Details": "busy"}'
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json" if status == 200 else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    class Quiet(ThreadingHTTPServer):
        def handle_error(self, request: object, client_address: object) -> None:
            pass  # refused TLS handshakes

    httpd = Quiet(("127.0.0.1", 0), Handler)
    if certificate is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certificate)
        httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1]), asked
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_https_with_a_ca_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    require_tool("openssl", "openssl")
    served, ca = self_signed_certificate(tmp_path / "tls")
    # requests would let these override a session's CA bundle: --ca-bundle must win.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/certs/ca-certificates.crt")
    with fake_server([200], certificate=served) as (port, _):
        url = f"dicomwebs://127.0.0.1:{port}/dicom-web"
        study = generate_uid()
        # With the CA bundle the connection is made and the server's (empty) answer understood.
        with pytest.raises(UserError, match=f"study {study} not found") as answered:
            DicomWebServer(url, ca_bundle=ca, env={}).series_of_study(study)
        assert not isinstance(answered.value, DicomWebError)
        # Without it the certificate cannot be verified: one line that says what to do.
        with pytest.raises(DicomWebError, match=r"TLS failure.*--ca-bundle"):
            DicomWebServer(url, env={}, retries=0).series_of_study(study)


def test_bounded_retries() -> None:
    study = generate_uid()
    # Two "busy" answers, then the answer: retried through.
    with fake_server([503, 503, 200]) as (port, asked):
        with pytest.raises(UserError, match="not found"):
            DicomWebServer(f"dicomweb://127.0.0.1:{port}/dw", env={}, retries=2).series_of_study(study)
        assert len(asked) == 3
    # Always busy: given up after the retries, with the status and the server's reason in one line.
    with fake_server([503]) as (port, asked):
        with pytest.raises(DicomWebError, match=r"HTTP 503 Service Unavailable \(busy\) while searching") as err:
            DicomWebServer(f"dicomweb://127.0.0.1:{port}/dw", env={}, retries=2).series_of_study(study)
        assert len(asked) == 3 and err.value.status == 503
    # Not retried: a 4xx other than 429.
    with fake_server([400]) as (port, asked):
        with pytest.raises(DicomWebError, match="HTTP 400"):
            DicomWebServer(f"dicomweb://127.0.0.1:{port}/dw", env={}, retries=2).series_of_study(study)
        assert len(asked) == 1


# ---------------------------------------------------------------------------------------------------------------
# Against Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with started_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def upload_series(
    orthanc: OrthancServer,
    folder: Path,
    *,
    seed: int = 11,
    study_uid: str | None = None,
    description: str = "abdomen",
    modality: str = "CT",
    series_number: int = 2,
    shape: tuple[int, int, int] = (40, 36, 20),
):
    """A phantom series written by the DICOM factory and stored in Orthanc; returns (study, series, phantom)."""
    ph = liver_ct_phantom(seed, shape=shape, axcodes="LPS")
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    files = F.write_series(
        folder, ph.image.astype(np.float32), ph.affine, modality=modality, study_uid=study_uid, series_uid=series_uid,
        series_number=series_number, description=description, seed=seed,
    )  # fmt: skip
    orthanc.upload(files)
    return study_uid, series_uid, ph


def volseg(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "volseg", *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env=env if env is not None else environment(),
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("volseg: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert PASSWORD not in lines[0]
    return lines[0]


def seg_series(orthanc: OrthancServer, study_uid: str) -> list[dict]:
    """The study's SEG series, by QIDO-RS."""
    server = DicomWebServer(orthanc.dicomweb, env=environment())
    found = server.client.search_for_series(study_uid, search_filters={"Modality": "SEG"})
    return [pydicom.Dataset.from_json(f) for f in found]


def retrieve_seg(orthanc: OrthancServer, study_uid: str, seg_uid: str, folder: Path) -> Path:
    server = DicomWebServer(orthanc.dicomweb, env=environment())
    paths = server.fetch_series(study_uid, seg_uid, folder)
    assert len(paths) == 1
    return paths[0]


@pytest.mark.slow  # six command-line runs, one of them waiting out the retries
def test_error_lines(orthanc: OrthancServer, tmp_path: Path) -> None:
    study_uid, series_uid, _ = upload_series(orthanc, tmp_path / "ct", shape=(12, 10, 4))
    url = f"dicomweb://127.0.0.1:{orthanc.port}/dicom-web"
    nobundle = str(tmp_path / "no-bundle")  # every error below comes before the bundle is read
    # Nothing listens on the port.
    dead = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    one_line_error(volseg("infer", dead, "--study", study_uid, "--bundle", nobundle), "server unreachable", dead[11:])
    # A wrong password.
    env = environment() | {"VOLSEG_DICOMWEB_PASSWORD": "wrong"}
    line = one_line_error(volseg("infer", url, "--study", study_uid, "--bundle", nobundle, env=env), "HTTP 401")
    assert "VOLSEG_DICOMWEB_USER" in line and "wrong" not in line
    # An unknown study, an unknown series, a malformed UID.
    unknown = generate_uid()
    one_line_error(volseg("infer", url, "--study", unknown, "--bundle", nobundle), f"study {unknown} not found")
    line = one_line_error(
        volseg("infer", url, "--study", study_uid, "--series", unknown, "--bundle", nobundle),
        f"series {unknown} not found", series_uid,
    )  # fmt: skip
    one_line_error(volseg("infer", url, "--study", "not-a-uid", "--bundle", nobundle), "not a DICOM UID")
    one_line_error(volseg("infer", str(tmp_path), "--study", study_uid), "--study goes with one DICOMweb URL")


def test_error_classes(orthanc: OrthancServer, tmp_path: Path) -> None:
    study_uid, series_uid, _ = upload_series(orthanc, tmp_path / "ct", shape=(12, 10, 4))
    env = environment()
    server = DicomWebServer(orthanc.dicomweb, env=env, retries=0)
    (info,) = server.series_of_study(study_uid)
    assert (info.uid, info.modality, info.n_slices, info.is_localizer) == (series_uid, "CT", 4, False)
    with pytest.raises(UserError, match="not found") as missing:
        server.series_of_study(generate_uid())
    assert not isinstance(missing.value, DicomWebError)  # the data is missing; the server is fine
    bad = DicomWebServer(orthanc.dicomweb, env=env | {"VOLSEG_DICOMWEB_PASSWORD": "x"}, retries=0)
    with pytest.raises(DicomWebError, match="HTTP 401") as denied:
        bad.series_of_study(study_uid)
    assert denied.value.status == 401
    gone = DicomWebServer(f"http://127.0.0.1:{free_port()}/dicom-web", env=env, retries=1)
    with pytest.raises(DicomWebError, match="server unreachable"):
        gone.series_of_study(study_uid)


def test_round_trip_through_the_cli(orthanc: OrthancServer, trained_bundle: Path, tmp_path: Path) -> None:
    import highdicom as hd

    study_uid, series_uid, ph = upload_series(orthanc, tmp_path / "ct")
    # A smaller series and a scout in the same study: the CT series with most slices is chosen, as in a folder.
    upload_series(orthanc, tmp_path / "small", study_uid=study_uid, series_number=3, shape=(40, 36, 5))
    url = f"dicomweb://127.0.0.1:{orthanc.port}/dicom-web"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = environment() | {"TMPDIR": str(tmpdir)}
    out = tmp_path / "out"
    proc = volseg("infer", url, "--study", study_uid, "--bundle", str(trained_bundle), "-o", str(out), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"chose {series_uid} (CT, 20 images" in proc.stdout, proc.stdout
    assert proc.stdout.count("skipped") == 1, proc.stdout
    assert all(word in proc.stdout for word in ("fetch", "segment", "write", "push")), proc.stdout
    assert list(tmpdir.iterdir()) == [], "temporary files left behind"
    # The local outputs, on the series' grid.
    import nibabel as nib

    labels = np.asarray(nib.load(str(out / f"{series_uid}_seg.nii.gz")).dataobj)
    assert_real_overlap(labels, ph.label, {"liver": 1}, TINY_FLOORS)
    assert (out / f"{series_uid}_seg.dcm").is_file()
    # Orthanc now holds one SEG in the study, referencing the source series.
    (seg_info,) = seg_series(orthanc, study_uid)
    seg_path = retrieve_seg(orthanc, study_uid, seg_info.SeriesInstanceUID, tmp_path / "seg")
    ds = pydicom.dcmread(seg_path)
    assert ds.SOPClassUID == SEG_STORAGE and ds.StudyInstanceUID == study_uid
    assert [item.SeriesInstanceUID for item in ds.ReferencedSeriesSequence] == [series_uid]
    errors = dciodvfy_errors(seg_path)
    assert not errors, "\n".join(errors)
    seg = hd.seg.segread(str(seg_path))
    assert "liver" in {s.SegmentLabel for s in seg.SegmentSequence}
    source_sops = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in (tmp_path / "ct").iterdir()}
    referenced = seg.get_source_image_uids()
    assert referenced and {(st, se) for st, se, _ in referenced} == {(study_uid, series_uid)}
    assert {sop for _, _, sop in referenced} <= source_sops


def test_watcher(orthanc: OrthancServer, trained_bundle: Path, tmp_path: Path, monkeypatch) -> None:
    from volseg.infer import Predictor

    for key, value in environment().items():
        if key.startswith("VOLSEG_DICOMWEB"):
            monkeypatch.setenv(key, value)
    predictor = Predictor.from_bundle(trained_bundle, "cpu")
    state = tmp_path / "watch.json"
    lines: list[str] = []

    def watcher(from_now: bool = False) -> OrthancWatcher:
        rules = WatchRules(("CT",), "^watched abdomen$")  # other tests' series ("abdomen") are not taken
        return OrthancWatcher(
            orthanc.url, predictor, state, rules=rules, echo=lines.append, from_now=from_now, poll_interval=0.2
        )

    first = watcher(from_now=True)
    assert first.run_once() == []  # a new state file starts at the end of the feed
    study_uid, series_uid, _ = upload_series(orthanc, tmp_path / "a", seed=21, description="watched abdomen")
    _, head_uid, _ = upload_series(
        orthanc, tmp_path / "b", seed=22, study_uid=study_uid, description="head", series_number=4
    )  # fmt: skip
    orthanc.wait_stable(series_uid)
    orthanc.wait_stable(head_uid)
    results = first.run_once()
    done = [r for r in results if r.outcome == "done"]
    assert [r.series_uid for r in done] == [series_uid], lines
    assert any(r.series_uid == head_uid and r.outcome == "skipped" for r in results)
    (seg,) = seg_series(orthanc, study_uid)
    assert seg.SeriesInstanceUID == done[0].detail
    # A restart with the same state file does nothing new (the SEG series it stored is skipped as a segmentation).
    orthanc.wait_stable(seg.SeriesInstanceUID)
    again = watcher().run_once()
    assert not [r for r in again if r.outcome == "done"], again
    assert len(seg_series(orthanc, study_uid)) == 1
    # A new series is segmented once; a server failure while storing its SEG loses nothing: the next pass does it.
    _, second_uid, _ = upload_series(
        orthanc, tmp_path / "c", seed=23, study_uid=study_uid, series_number=5, description="watched abdomen"
    )  # fmt: skip
    orthanc.wait_stable(second_uid)
    w = watcher()
    real_store = w.server.store
    calls = {"n": 0}

    def failing_store(path: Path, study: str) -> None:
        calls["n"] += 1
        raise DicomWebError("HTTP 503 Service Unavailable while storing the DICOM SEG (STOW-RS)", w.server.url, 503)

    monkeypatch.setattr(w.server, "store", failing_store)
    with pytest.raises(DicomWebError, match="503"):
        w.run_once()
    assert calls["n"] == 1 and len(seg_series(orthanc, study_uid)) == 1
    monkeypatch.setattr(w.server, "store", real_store)
    results = w.run_once()
    assert [r.series_uid for r in results if r.outcome == "done"] == [second_uid]
    assert len(seg_series(orthanc, study_uid)) == 2
    assert [r for r in watcher().run_once() if r.outcome == "done"] == []
    # In a thread, as a service runs it: a new series gets its SEG without being asked for.
    _, third_uid, _ = upload_series(
        orthanc, tmp_path / "d", seed=24, study_uid=study_uid, series_number=6, description="watched abdomen"
    )  # fmt: skip
    background = watcher()
    background.start()
    try:
        deadline = time.monotonic() + 120
        while len(seg_series(orthanc, study_uid)) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        background.stop(timeout=120)
    assert background._thread is None, "the watcher's thread did not stop"
    segs = seg_series(orthanc, study_uid)
    assert len(segs) == 3, lines
    assert third_uid in json.loads(state.read_text())["done"]
    # The command line, once: nothing new to do.
    proc = volseg(
        "watch-orthanc", orthanc.url, "--state", str(state), "--bundle", str(trained_bundle), "--modality", "CT",
        "--series-description", "^watched abdomen$", "--once", "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 series segmented, 0 failed" in proc.stdout, proc.stdout


def test_watcher_server_failures(orthanc: OrthancServer, tmp_path: Path) -> None:
    class NoModel:  # the passes below fail before any series would be segmented
        def predict(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("nothing should be segmented")

    state = tmp_path / "state.json"
    dead = OrthancWatcher(f"http://127.0.0.1:{free_port()}", NoModel(), state, retries=0)  # type: ignore[arg-type]
    with pytest.raises(DicomWebError, match="server unreachable"):
        dead.run_once()
    assert not state.exists() or '"last_change": 0' in state.read_text()
    # A state file is for one server.
    with pytest.raises(UserError, match="this watch state is for"):
        OrthancWatcher(orthanc.url, NoModel(), state)  # type: ignore[arg-type]
    # Without credentials: the HTTP status, and nothing recorded.
    state = tmp_path / "state-2.json"
    no_auth = OrthancWatcher(orthanc.url, NoModel(), state, retries=0)  # type: ignore[arg-type]
    no_auth.server.session.auth = None
    with pytest.raises(DicomWebError, match="HTTP 401"):
        no_auth.run_once()
    # A damaged state file is refused before anything is done.
    state.write_text("{not json")
    with pytest.raises(UserError, match="cannot read the watch state"):
        OrthancWatcher(orthanc.url, NoModel(), state)  # type: ignore[arg-type]
