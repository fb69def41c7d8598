"""A throw-away Orthanc with the DICOMweb plugin, for the PACS tests and the DICOMweb benchmark.

:class:`OrthancServer` writes a configuration into a folder of its own (storage and index there too), starts
Debian's ``Orthanc`` on a free loopback port with no DICOM port and HTTP basic authentication, waits for
``/system`` to answer, and stops the process again. Debian's packages: ``apt-get install orthanc
orthanc-dicomweb`` (the system service they install need not run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import requests
from helpers import free_port

#: Where Debian's orthanc-dicomweb package puts the plugin.
PLUGIN_PATHS = (
    Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so"),
    Path("/usr/lib/orthanc/libOrthancDicomWeb.so"),
)
USER = "volseg"
PASSWORD = "s3cret-test"


def find_orthanc() -> tuple[str | None, Path | None]:
    """The Orthanc executable and the DICOMweb plugin, each None when not installed."""
    exe = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc",) if Path(p).is_file()), None)
    plugin = next(
        (p for p in (*PLUGIN_PATHS, *sorted(Path("/usr/lib/orthanc").glob("libOrthancDicomWeb.so*"))) if p.is_file()),
        None,
    )
    return exe, plugin


class OrthancServer:
    """One Orthanc process on 127.0.0.1, its storage under ``folder``.

    Args:
        folder: an empty folder for the configuration, storage, index and log.
        stable_age: seconds without a new instance after which Orthanc calls a series stable (``StableSeries``).
        exe, plugin: the Orthanc executable and DICOMweb plugin (default: :func:`find_orthanc`).
    """

    def __init__(
        self,
        folder: Path,
        *,
        stable_age: int = 1,
        exe: str | None = None,
        plugin: Path | None = None,
    ):
        found_exe, found_plugin = find_orthanc()
        self.exe = exe or found_exe
        self.plugin = plugin or found_plugin
        if self.exe is None or self.plugin is None:
            raise RuntimeError(
                "Orthanc or its DICOMweb plugin is not installed (apt-get install orthanc orthanc-dicomweb)"
            )
        self.folder = Path(folder)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        self.auth = (USER, PASSWORD)
        self.stable_age = stable_age
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.folder / "orthanc.log"

    def config(self) -> dict[str, Any]:
        return {
            "Name": "volseg-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "index"),
            "HttpPort": self.port,
            "HttpServerEnabled": True,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {USER: PASSWORD},
            "Plugins": [str(self.plugin)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False, "Host": "127.0.0.1"},
            "StableAge": self.stable_age,
            "SaveJobs": False,
            "HttpThreadsCount": 8,
            "StorageCompression": False,
        }

    def start(self, timeout: float = 30.0) -> OrthancServer:
        self.folder.mkdir(parents=True, exist_ok=True)
        cfg = self.folder / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log, "wb")  # noqa: SIM115 - kept open for the process's lifetime
        self.process = subprocess.Popen(
            [self.exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with status {self.process.returncode}: {self.log_tail()}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).ok:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout} s: {self.log_tail()}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        self.process = None

    def log_tail(self, n: int = 20) -> str:
        try:
            return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # Orthanc's own REST API, for setting up and checking.

    def upload(self, paths: list[Path]) -> None:
        """POST each DICOM file to /instances."""
        with requests.Session() as s:
            s.auth = self.auth
            for p in paths:
                r = s.post(f"{self.url}/instances", data=Path(p).read_bytes(), timeout=30)
                r.raise_for_status()

    def get(self, path: str, **params: Any) -> Any:
        r = requests.get(f"{self.url}{path}", params=params, auth=self.auth, timeout=30)
        r.raise_for_status()
        return r.json()

    def wait_stable(self, series_uid: str, timeout: float = 30.0) -> None:
        """Wait until Orthanc has marked the series stable (a ``StableSeries`` change)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = requests.post(f"{self.url}/tools/lookup", data=series_uid, auth=self.auth, timeout=10).json()
            ids = [f["ID"] for f in found if f.get("Type") == "Series"]
            if ids and self.get(f"/series/{ids[0]}").get("IsStable"):
                return
            time.sleep(0.2)
        raise TimeoutError(f"series {series_uid} not stable after {timeout} s")


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by itself: (a PEM with the certificate and its key; the CA bundle).

    (Debian's Orthanc 1.10.1 crashes on its first HTTPS connection, so the HTTPS tests use a TLS server of their own.)
    """
    folder.mkdir(parents=True, exist_ok=True)
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    both = folder / "orthanc.pem"
    both.write_bytes(cert.read_bytes() + key.read_bytes())
    return both, cert


def environment() -> dict[str, str]:
    """os.environ plus the test server's credentials in volseg's variables."""
    env = dict(os.environ)
    env.pop("VOLSEG_DICOMWEB_TOKEN", None)
    env["VOLSEG_DICOMWEB_USER"] = USER
    env["VOLSEG_DICOMWEB_PASSWORD"] = PASSWORD
    return env


def started_orthanc(storage: Path) -> OrthancServer:
    """An OrthancServer to enter (``with started_orthanc(dir) as server``); without Orthanc and its DICOMweb plugin
    the test skips with how to install them, and fails when CI is set."""
    import pytest

    exe, plugin = find_orthanc()
    if exe is None or plugin is None:
        how = "apt-get install orthanc orthanc-dicomweb"
        if os.environ.get("CI"):
            pytest.fail(f"Orthanc with its DICOMweb plugin is not installed; CI must provide it ({how})", pytrace=False)
        pytest.skip(f"Orthanc with its DICOMweb plugin is not installed ({how})")
    return OrthancServer(storage)
