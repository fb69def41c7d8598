"""`volseg serve --watch-orthanc`: the service answers requests while its watcher stores SEGs for new series.

Against a real Orthanc with its DICOMweb plugin (tests/orthanc_server.py); skipped without it, a failure in CI.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dicom_factory as F
import numpy as np
import pytest
from helpers import REPO, free_port, save_nifti, stop_process, write_random_bundle
from orthanc_server import OrthancServer, environment, started_orthanc
from pydicom.uid import generate_uid

from volseg.data.synth import liver_ct_phantom

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    with started_orthanc(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_serve_with_an_orthanc_watcher(orthanc: OrthancServer, tmp_path: Path) -> None:
    from volseg.pacs import DicomWebServer

    bundle = write_random_bundle(tmp_path / "tiny", seed=7)
    state = tmp_path / "watch.json"
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    cmd = [
        sys.executable, "-m", "volseg", "serve", "--bundle", str(bundle), "--port", str(port), "--device", "cpu",
        "--watch-orthanc", orthanc.url, "--watch-state", str(state), "--watch-modality", "CT",
        "--watch-series-description", "^served abdomen$", "--watch-poll", "0.3", "--watch-from-now",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=environment())
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                ready = _get_json(f"{base}/readyz")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() - t0 < 120, "not ready after 120 s"
                time.sleep(0.2)
        assert ready["watching"] == orthanc.url
        assert json.loads(state.read_text())["last_change"] is not None  # --watch-from-now started at the end
        ph = liver_ct_phantom(41, shape=(40, 36, 20), axcodes="LPS")
        study_uid, series_uid = generate_uid(), generate_uid()
        files = F.write_series(
            tmp_path / "series", ph.image.astype(np.float32), ph.affine, study_uid=study_uid, series_uid=series_uid,
            series_number=3, description="served abdomen",
        )  # fmt: skip
        orthanc.upload(files)
        # Meanwhile the service answers a request of its own.
        scan = save_nifti(tmp_path / "scan.nii.gz", ph.image, ph.affine)
        boundary = "b0undary"
        body = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="scan.nii.gz"\r\n\r\n'.encode()
            + scan.read_bytes()
            + f"\r\n--{boundary}--\r\n".encode()
        )
        req = urllib.request.Request(
            f"{base}/v1/segment", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            assert r.status == 200 and r.read()[:2] == b"\x1f\x8b"
        server = DicomWebServer(orthanc.dicomweb, env=environment())
        deadline = time.monotonic() + 180
        segs: list = []
        while not segs and time.monotonic() < deadline:
            segs = server.client.search_for_series(study_uid, search_filters={"Modality": "SEG"})
            time.sleep(0.5)
        assert len(segs) == 1, (tmp_path / "serve.log").read_text()
        assert series_uid in json.loads(state.read_text())["done"]
    finally:
        rc = stop_process(proc, signal.SIGTERM, 60)
        log.close()
    assert rc == 0, (tmp_path / "serve.log").read_text()
