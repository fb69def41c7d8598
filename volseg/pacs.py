"""Segmentation next to a PACS: a study in over DICOMweb, a DICOM SEG back; and a watcher for an Orthanc.

The round trip (``volseg infer dicomweb://HOST:PORT/PATH --study UID``):

1. QIDO-RS lists the study's series; WADO-RS series metadata (no pixel data) describes their images, and the series
   is chosen exactly as in a folder (:func:`volseg.data.dicom.choose_series`: the CT/MR series with most slices that
   is not a localizer, or ``--series UID``). Non-image objects (SEG, SR, presentation states, ...) are listed from
   the QIDO answer alone.
2. WADO-RS retrieves the chosen series' instances (as stored, no transcoding) into a temporary folder, which the
   folder reader reads, so geometry is handled exactly as for a local series.
3. The :class:`~volseg.infer.Predictor` segments it; the DICOM SEG (and with ``-o`` the local outputs) is written.
4. STOW-RS stores the SEG in the study. The temporary files are removed.

Credentials come from the environment, never from the command line: ``VOLSEG_DICOMWEB_USER`` and
``VOLSEG_DICOMWEB_PASSWORD`` (HTTP basic) or ``VOLSEG_DICOMWEB_TOKEN`` (bearer). ``dicomwebs://`` (or an
``https://`` URL) uses TLS; ``--ca-bundle`` names the CA certificates of a private PKI. Every request has a
connect and a read timeout; connection failures and the answers 429, 502, 503 and 504 are retried a bounded number
of times with exponential back-off. Each failure is one line naming the server and what failed.

:class:`OrthancWatcher` polls an Orthanc's ``/changes`` feed for ``StableSeries`` events, segments the series that
match its :class:`WatchRules` and stores their SEG back. Its state file records the last change processed and the
series done, written atomically after each series, so that a restart neither segments a series twice nor loses
one; a crash after a SEG was stored and before the state file was written redoes that one series (at most one).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from volseg.errors import UserError, one_line

if TYPE_CHECKING:
    import requests
    from dicomweb_client import DICOMwebClient

    from volseg.data.dicom import SeriesInfo
    from volseg.infer import Predictor

__all__ = [
    "DicomWebError",
    "DicomWebServer",
    "OrthancWatcher",
    "RoundTrip",
    "WatchRules",
    "is_dicomweb_input",
    "run_dicomweb_inference",
]

ENV_USER = "VOLSEG_DICOMWEB_USER"
ENV_PASSWORD = "VOLSEG_DICOMWEB_PASSWORD"
ENV_TOKEN = "VOLSEG_DICOMWEB_TOKEN"
#: (connect, read) timeouts in seconds of every request.
DEFAULT_TIMEOUT = (10.0, 300.0)
#: Retries after the first attempt, for connection failures and the statuses in :data:`RETRY_STATUSES`.
DEFAULT_RETRIES = 3
RETRY_STATUSES = (429, 502, 503, 504)
#: Back-off between retries: 0.5 s, 1 s, 2 s, ...
BACKOFF_SECONDS = 0.5
#: Bytes per read when streaming a series in (one instance at a time is held in memory, not the whole series).
STREAM_CHUNK = 1 << 20
#: Modalities of objects that hold no image volume: described from QIDO without fetching their metadata.
NON_IMAGE_MODALITIES = frozenset({"SEG", "SR", "KO", "PR", "DOC", "RTSTRUCT", "RTPLAN", "RTRECORD", "REG", "OT"})
#: The Manufacturer volseg writes into its DICOM SEG (see :mod:`volseg.data.writers`).
VOLSEG_MANUFACTURER = "volseg"

_SCHEMES = {"dicomweb": "http", "dicomwebs": "https", "http": "http", "https": "https"}
_AUTH_HINT = f"set {ENV_USER} and {ENV_PASSWORD}, or {ENV_TOKEN}"


class DicomWebError(UserError):
    """The server could not be reached or answered with an error (as opposed to a problem with the data).

    Attributes:
        status: the HTTP status, or None when there was no answer.
    """

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        super().__init__(message, url)
        self.status = status


def is_dicomweb_input(text: str, study: str | None = None) -> bool:
    """Whether a ``volseg infer`` input names a DICOMweb server: ``dicomweb(s)://``, or ``http(s)://`` with a study."""
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    return scheme in ("dicomweb", "dicomwebs") or (scheme in ("http", "https") and study is not None)


def http_url(text: str) -> str:
    """``dicomweb://`` as ``http://``, ``dicomwebs://`` as ``https://``; no trailing slash.

    Raises:
        UserError: another scheme, no host, or credentials in the URL (they belong in the environment).
    """
    parts = urlsplit(text.strip())
    scheme = _SCHEMES.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise UserError("expected dicomweb://HOST[:PORT]/PATH, dicomwebs://... or http(s)://...", text)
    if parts.username is not None or parts.password is not None:
        raise UserError(f"credentials do not belong in the URL (they end up in logs): {_AUTH_HINT}", _redact(parts))
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise UserError("malformed port in the URL", text) from None
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def _redact(parts: Any) -> str:
    host = parts.hostname + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _session(env: Mapping[str, str], ca_bundle: str | Path | None, retries: int, url: str) -> requests.Session:
    """A requests session with the environment's credentials, the CA bundle and bounded retries."""
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    session = requests.Session()
    user, password, token = env.get(ENV_USER), env.get(ENV_PASSWORD), env.get(ENV_TOKEN)
    if token and (user or password):
        raise UserError(f"set either {ENV_TOKEN} or {ENV_USER}/{ENV_PASSWORD}, not both", url)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif user or password:
        if not (user and password is not None):
            raise UserError(f"{ENV_USER} and {ENV_PASSWORD} go together: set both", url)
        session.auth = (user, password)
    verify: str | None = None
    if ca_bundle is not None:
        if not Path(ca_bundle).is_file():
            raise UserError("CA bundle not found", ca_bundle)
        verify = session.verify = str(ca_bundle)
    retry = Retry(
        total=retries,
        connect=retries,
        read=min(retries, 1),
        status=retries,
        other=0,
        backoff_factor=BACKOFF_SECONDS,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=None,  # also POST: a STOW of the same SOP instance again is harmless
        raise_on_status=False,
        respect_retry_after_header=False,  # keeps the waits bounded
    )
    adapter = _verifying_adapter(HTTPAdapter, verify)(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _verifying_adapter(base: type, verify: str | None) -> type:
    """An adapter that verifies with ``verify`` (when given) whatever the environment says.

    requests lets REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE override a session's own ``verify``; ``--ca-bundle`` wins here.
    """

    class VerifyingAdapter(base):  # type: ignore[valid-type,misc]
        def send(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            if verify is not None:
                kwargs["verify"] = verify
            return super().send(request, *args, **kwargs)

    return VerifyingAdapter


def _errno_text(exc: BaseException) -> str:
    """The operating system's reason inside a requests connection error ("Connection refused"), else the text."""
    text = str(exc)
    found = re.findall(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found[-1].strip()
    for pattern in (r"(CERTIFICATE_VERIFY_FAILED[^'\")\]]*)", r"(certificate verify failed[^'\")\]]*)"):
        m = re.search(pattern, text)
        if m:
            return m.group(1).strip()
    return one_line(exc, 160)


def _http_reason(response: Any) -> str:
    """Status, reason phrase and the first line of the server's explanation (Orthanc's JSON "Details")."""
    reason = f"HTTP {response.status_code} {response.reason or ''}".strip()
    detail = ""
    try:
        body = response.json()
        if isinstance(body, dict):
            detail = str(body.get("Details") or body.get("Message") or "")
    except ValueError:
        detail = (response.text or "").strip()
        if detail.startswith("<"):
            detail = ""  # an HTML error page says nothing the status does not
    detail = detail.splitlines()[0][:160] if detail else ""
    return f"{reason} ({detail})" if detail else reason


@dataclass
class RoundTrip:
    """One series segmented over DICOMweb.

    Attributes:
        study_uid, series_uid: the source.
        seg_series_uid, seg_sop_uid: the DICOM SEG stored back.
        written: local outputs (with ``-o``).
        seconds: ``fetch`` (QIDO, metadata, WADO and writing the files), ``segment``, ``write`` (the outputs, SEG
            included) and ``push`` (STOW-RS).
        label_counts: voxels per label value.
    """

    study_uid: str
    series_uid: str
    seg_series_uid: str
    seg_sop_uid: str
    written: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    label_counts: list[int] = field(default_factory=list)

    def timing(self) -> str:
        return ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items())


class DicomWebServer:
    """A DICOMweb service (QIDO-RS, WADO-RS, STOW-RS) through dicomweb-client, with volseg's errors.

    Args:
        url: ``dicomweb://HOST[:PORT]/PATH``, ``dicomwebs://...`` or ``http(s)://...``, the DICOMweb root (e.g.
            Orthanc's ``/dicom-web``).
        ca_bundle: CA certificates (PEM) to verify the server's TLS certificate with (default: the system's).
        timeout: ``(connect, read)`` seconds for each request.
        retries: retries after a failed connection or a 429/502/503/504 answer.
        env: where the credentials are read (default ``os.environ``).
    """

    def __init__(
        self,
        url: str,
        *,
        ca_bundle: str | Path | None = None,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.url = http_url(url)
        self.timeout = timeout
        self.session = _session(os.environ if env is None else env, ca_bundle, retries, self.url)
        self._client: DICOMwebClient | None = None

    @property
    def client(self) -> DICOMwebClient:
        if self._client is None:
            from dicomweb_client import DICOMwebClient

            client = DICOMwebClient(self.url, session=self.session, timeout=self.timeout)
            client.set_http_retry_params(retry=False)  # the session retries (bounded, connection errors too)
            client.set_chunk_size(STREAM_CHUNK)
            self._client = client
        return self._client

    @contextlib.contextmanager
    def errors(self, what: str, not_found: str | None = None) -> Iterator[None]:
        """Turn what requests and dicomweb-client raise while doing ``what`` into one line.

        Args:
            what: the operation, for the message ("searching the study's series (QIDO-RS)").
            not_found: the message for an HTTP 404 (a plain :class:`UserError`: the data is missing, the server
                is fine); without it a 404 is a :class:`DicomWebError` like any other status.
        """
        import requests

        timeout = self.timeout if isinstance(self.timeout, tuple) else (self.timeout, self.timeout)
        try:
            yield
        except requests.exceptions.SSLError as exc:
            raise DicomWebError(
                f"TLS failure while {what}: {_errno_text(exc)} (a private CA? pass --ca-bundle FILE)", self.url
            ) from None
        except requests.exceptions.ConnectTimeout:
            raise DicomWebError(
                f"server unreachable: no connection within {timeout[0]:g} s ({what})", self.url
            ) from None
        except requests.exceptions.ReadTimeout:
            raise DicomWebError(f"no answer within {timeout[1]:g} s while {what}", self.url) from None
        except requests.exceptions.ConnectionError as exc:
            raise DicomWebError(f"server unreachable ({_errno_text(exc)}) while {what}", self.url) from None
        except requests.exceptions.HTTPError as exc:
            response = exc.response
            status = response.status_code if response is not None else None
            if status == 404 and not_found is not None:
                raise UserError(not_found, self.url) from None
            reason = _http_reason(response) if response is not None else str(exc)
            hint = f"; {_AUTH_HINT}" if status in (401, 403) else ""
            raise DicomWebError(f"{reason} while {what}{hint}", self.url, status) from None
        except requests.exceptions.RequestException as exc:
            raise DicomWebError(f"request failed while {what}: {_errno_text(exc)}", self.url) from None

    def series_of_study(self, study_uid: str, only: str | None = None) -> list[SeriesInfo]:
        """The study's series as :func:`volseg.data.dicom.list_series` describes a folder's.

        Args:
            study_uid: StudyInstanceUID.
            only: describe only this SeriesInstanceUID from its images (the others from QIDO).

        Raises:
            UserError: the study is not on the server, or the UID is malformed.
            DicomWebError: the server failed.
        """
        import pydicom

        from volseg.data.dicom import SeriesInfo, series_from_datasets

        _check_uid(study_uid, "--study")
        not_found = f"study {study_uid} not found on the server"
        with self.errors("searching the study's series (QIDO-RS)", not_found):
            found = self.client.search_for_series(study_uid, get_remaining=True)
        if not found:
            raise UserError(not_found, self.url)
        infos: list[SeriesInfo] = []
        for item in found:
            ds = pydicom.Dataset.from_json(item)
            uid = str(ds.get("SeriesInstanceUID", ""))
            modality = str(ds.get("Modality", ""))
            fetch = uid == only if only is not None else modality.upper() not in NON_IMAGE_MODALITIES
            if fetch and uid:
                with self.errors(f"reading the metadata of series {uid} (WADO-RS)", f"series {uid} not found"):
                    metadata = self.client.retrieve_series_metadata(study_uid, uid)
                datasets = [pydicom.Dataset.from_json(m, bulk_data_uri_handler=_no_bulk) for m in metadata]
                base = f"{self.url}/studies/{study_uid}/series/{uid}/instances"
                described = series_from_datasets((d, f"{base}/{d.get('SOPInstanceUID')}") for d in datasets)
                if described:
                    infos.extend(described)
                    continue
            count = int(ds.get("NumberOfSeriesRelatedInstances", 0) or 0)
            infos.append(SeriesInfo(uid, modality, str(ds.get("SeriesDescription", "")), count, [], False, False))
        return infos

    def choose(self, study_uid: str, series_uid: str | None = None) -> tuple[SeriesInfo, list[SeriesInfo]]:
        """The series of a study to segment, chosen as in a folder; see :func:`volseg.data.dicom.choose_series`."""
        from volseg.data.dicom import choose_series

        series = self.series_of_study(study_uid)
        if series_uid is not None:
            _check_uid(series_uid, "--series")
            if not any(s.uid == series_uid for s in series):
                present = "; ".join(s.summary() for s in series)
                raise UserError(
                    f"series {series_uid} not found in study {study_uid}; series present: {present}", self.url
                )
        try:
            return choose_series(series, series_uid)
        except UserError as err:
            raise UserError(f"study {study_uid}: {err.message}", self.url) from None

    def fetch_series(self, study_uid: str, series_uid: str, folder: Path) -> list[Path]:
        """Retrieve a series' instances (WADO-RS, as stored) into ``folder``, one file each."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        with self.errors(f"retrieving series {series_uid} (WADO-RS)", f"series {series_uid} not found"):
            stream = self.client.iter_series(study_uid, series_uid, media_types=(("application/dicom", "*"),))
            for n, ds in enumerate(stream):  # written as they arrive
                path = folder / f"{n:06d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                paths.append(path)
        if not paths:
            raise UserError(f"series {series_uid} has no instances on the server", self.url)
        return paths

    def store(self, path: Path, study_uid: str) -> None:
        """Store one DICOM file in a study (STOW-RS); a refusal by the server is an error."""
        from volseg.data.dicom import read_dataset

        ds = read_dataset(path, pixels=True)
        if ds is None:
            raise UserError("not a DICOM file", path)
        client = self.client
        client.set_chunk_size(1 << 40)  # the body sent whole (not chunked), so that a retried POST sends it again
        try:
            with self.errors("storing the DICOM SEG (STOW-RS)"):
                answer = client.store_instances([ds], study_instance_uid=study_uid)
        finally:
            client.set_chunk_size(STREAM_CHUNK)
        failed = answer.get("FailedSOPSequence") or []
        if failed:
            reason = failed[0].get("FailureReason", "?")
            raise DicomWebError(f"the server refused the DICOM SEG (failure reason {reason})", self.url)

    def get_json(self, url: str, what: str, **params: Any) -> Any:
        """GET a JSON resource with this session (for servers' own APIs, e.g. Orthanc's REST)."""
        with self.errors(what):
            response = self.session.get(url, params=params or None, timeout=self.timeout)
            response.raise_for_status()
        try:
            return response.json()
        except ValueError:
            raise DicomWebError(f"the answer to {what} is not JSON", self.url) from None


def _no_bulk(*_: Any) -> bytes:
    return b""  # metadata only: pixel data is never fetched for choosing


def _check_uid(uid: str, option: str) -> None:
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", uid or "") or len(uid) > 64:
        raise UserError(f"'{uid}' is not a DICOM UID (digits and dots, at most 64 characters)", option)


def round_trip(
    server: DicomWebServer,
    predictor: Predictor,
    study_uid: str,
    chosen: SeriesInfo,
    *,
    output: Path | None = None,
    formats: Sequence[str] | None = None,
    echo: Callable[[str], None] = print,
    lock: threading.Lock | None = None,
) -> RoundTrip:
    """Fetch a chosen series, segment it, write the outputs and store the DICOM SEG in its study.

    Args:
        server: the DICOMweb service.
        predictor: the bundle's predictor.
        study_uid: the study holding ``chosen``.
        chosen: from :meth:`DicomWebServer.choose`.
        output: a folder for local outputs (``<SeriesInstanceUID>_seg.*``); without it only the SEG is written,
            to a temporary folder.
        formats: local output formats (default NIfTI); a DICOM SEG is always written and stored.
        echo: where the lines for the user go.
        lock: held while the predictor runs (when it is shared with other threads).
    """
    from volseg.data.dicom import read_dataset
    from volseg.data.writers import label_counts
    from volseg.evaluate import prediction_base
    from volseg.infer import save_prediction

    times: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="volseg-dicomweb-"))
    try:
        t0 = time.perf_counter()
        server.fetch_series(study_uid, chosen.uid, tmp / "series")
        times["fetch"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with lock or contextlib.nullcontext():
            pred = predictor.predict(tmp / "series", series_uid=chosen.uid)
        times["segment"] = time.perf_counter() - t0
        for note in pred.notes:
            if not note.startswith(("chose ", "skipped ")):  # the choice was printed from the server's metadata
                echo(f"{chosen.uid}: {note}")
        t0 = time.perf_counter()
        wanted = list(formats or (["nifti"] if output is not None else []))
        if "dicom-seg" not in wanted:
            wanted.append("dicom-seg")
        base = prediction_base(chosen.uid, output if output is not None else tmp / "out")
        paths = save_prediction(pred, base, wanted, predictor.segments, predictor.algorithm)
        seg_path = next(p for p in paths if p.name.endswith(".dcm"))
        seg = read_dataset(seg_path, pixels=False)
        assert seg is not None  # written just now
        times["write"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        server.store(seg_path, study_uid)
        times["push"] = time.perf_counter() - t0
        written = paths if output is not None else []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return RoundTrip(
        study_uid, chosen.uid, str(seg.SeriesInstanceUID), str(seg.SOPInstanceUID), written, times,
        label_counts(pred.labels, minlength=2).tolist(),
    )  # fmt: skip


def run_dicomweb_inference(
    url: str,
    study_uid: str | None,
    series_uid: str | None,
    bundle_dir: str | Path | None,
    *,
    output: Path | None = None,
    formats: Sequence[str] | None = None,
    device: str | None = None,
    engine: str = "fast",
    trust: bool = False,
    precision: str | None = None,
    overrides: list[str] | None = None,
    ca_bundle: str | Path | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
    echo: Callable[[str], None] = print,
) -> RoundTrip:
    """``volseg infer dicomweb://...``: choose, fetch, segment, write and store one study's series.

    The server and the study are checked (and the series chosen) before the model is loaded.
    """
    from volseg.data.writers import FORMATS

    if not study_uid:
        raise UserError("a DICOMweb input needs --study UID (and optionally --series UID)", url)
    for f in formats or []:
        if f not in FORMATS:
            raise UserError(f"unknown format '{f}'; known: {', '.join(FORMATS)}", "--format")
    if formats and output is None:
        raise UserError(
            "--format names local outputs: give -o DIR as well (the DICOM SEG always goes back)", "--format"
        )
    server = DicomWebServer(url, ca_bundle=ca_bundle, timeout=timeout)
    study_uid = study_uid.strip()
    t0 = time.perf_counter()
    chosen, skipped = server.choose(study_uid, series_uid.strip() if series_uid else None)
    choose_s = time.perf_counter() - t0
    echo(f"{server.url}: study {study_uid}: chose {chosen.summary()}")
    for s in skipped:
        echo(f"{server.url}: study {study_uid}: skipped {s.summary()}")
    from volseg.infer import Predictor, find_latest_run  # torch: after the server has answered

    bundle = Path(bundle_dir) if bundle_dir else find_latest_run()
    predictor = Predictor.from_bundle(bundle, device, engine, trust, precision, overrides)
    echo(f"bundle {bundle}  device {predictor.device}")
    for note in predictor.notes:
        echo(note)
    result = round_trip(server, predictor, study_uid, chosen, output=output, formats=formats, echo=echo)
    result.seconds["fetch"] += choose_s
    shown = "".join(f", {p}" for p in result.written)
    echo(
        f"{chosen.uid}: stored DICOM SEG series {result.seg_series_uid} in study {study_uid}{shown}  "
        f"({result.timing()})  voxels per label {result.label_counts}"
    )
    return result


# ---------------------------------------------------------------------------------------------------------------
# Watching an Orthanc


@dataclass(frozen=True)
class WatchRules:
    """Which new series the watcher segments.

    Attributes:
        modalities: the Modality values to take (upper case).
        series_description: a regular expression searched (case-insensitively) in SeriesDescription; None takes
            every description.

    DICOM SEG series, and any series whose Manufacturer is volseg's, are never taken.
    """

    modalities: tuple[str, ...] = ("CT", "MR")
    series_description: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "modalities", tuple(m.strip().upper() for m in self.modalities if m.strip()))
        if self.series_description is not None:
            try:
                re.compile(self.series_description)
            except re.error as exc:
                raise UserError(f"not a regular expression ({exc})", "--series-description") from None

    def refusal(self, modality: str, description: str, manufacturer: str = "") -> str | None:
        """Why a series is not taken, or None when it is."""
        modality = modality.upper()
        if modality == "SEG":
            return "a segmentation"
        if manufacturer.strip().lower() == VOLSEG_MANUFACTURER:
            return "written by volseg"
        if self.modalities and modality not in self.modalities:
            return f"modality {modality or '(none)'} not in {', '.join(self.modalities)}"
        if self.series_description is not None and not re.search(self.series_description, description, re.IGNORECASE):
            return f"description {description!r} does not match {self.series_description!r}"
        return None


@dataclass
class WatchResult:
    """What the watcher did with one StableSeries change: ``done``, ``skipped`` or ``failed``."""

    change: int
    series_uid: str
    outcome: str
    detail: str = ""
    trip: RoundTrip | None = None


class OrthancWatcher:
    """Segments the new series of an Orthanc and stores their DICOM SEG back.

    Each pass (:meth:`run_once`) reads Orthanc's ``/changes`` feed from the last change processed, and for each
    ``StableSeries`` change whose series the rules take and the state file does not know, segments it over
    DICOMweb (:func:`round_trip`). The state file (JSON, written atomically after each series and at the end of
    each page of changes) holds the last change processed, the series done (with their SEG) and the series that
    failed (a data problem: not retried; remove the entry to retry). When the server fails (unreachable, an HTTP
    error) the pass stops before that change, which the next pass takes again. A crash after a SEG was stored and
    before the state was written redoes that series: at most one duplicate SEG. A lock beside the state file keeps
    two watchers from working on it at the same time.

    Args:
        url: Orthanc's root (``http(s)://HOST:PORT``); its REST API gives the changes.
        predictor: a :class:`~volseg.infer.Predictor`, or a bundle folder to build one from (on ``device``).
        state_path: the JSON state file (created on the first pass).
        rules: which series to take.
        poll_interval: seconds between passes in :meth:`start` / :meth:`run_forever`.
        dicomweb_root: the DICOMweb plugin's path under ``url``.
        output: a folder for local copies of the outputs (default: none, only the SEG is stored back).
        formats: local output formats (with ``output``).
        from_now: with a new state file, start at the current end of the feed instead of its beginning.
        ca_bundle, timeout, retries: as for :class:`DicomWebServer`.
        echo: where the lines for the user go.
        lock: held while the predictor runs (when other threads share it).
        device: for a predictor built from a bundle folder.
        page_size: changes asked for per request.
    """

    def __init__(
        self,
        url: str,
        predictor: Predictor | str | Path,
        state_path: str | Path,
        *,
        rules: WatchRules | None = None,
        poll_interval: float = 10.0,
        dicomweb_root: str = "/dicom-web",
        output: Path | None = None,
        formats: Sequence[str] | None = None,
        from_now: bool = False,
        ca_bundle: str | Path | None = None,
        timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        echo: Callable[[str], None] = print,
        lock: threading.Lock | None = None,
        device: str | None = "cpu",
        page_size: int = 100,
    ) -> None:
        self.url = http_url(url)
        self.server = DicomWebServer(
            self.url + "/" + dicomweb_root.strip("/"), ca_bundle=ca_bundle, timeout=timeout, retries=retries
        )
        self.state_path = Path(state_path)
        self.rules = rules or WatchRules()
        if poll_interval <= 0:
            raise UserError("the poll interval must be positive", "--poll")
        self.poll_interval = float(poll_interval)
        self.output = output
        self.formats = list(formats) if formats else None
        self.from_now = from_now
        self.echo = echo
        self.lock = lock
        self.page_size = max(1, int(page_size))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._load_state()  # a damaged state file is an error now, not in the thread
        if isinstance(predictor, (str, Path)):
            from volseg.infer import Predictor

            # A bundle problem is an error now, not per series.
            predictor = Predictor.from_bundle(Path(predictor), device)
        self.predictor = predictor

    # State

    def _load_state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            return {"orthanc": self.url, "last_change": None, "done": {}, "failed": {}}
        try:
            state = json.loads(self.state_path.read_text(encoding="utf-8"))
            if not isinstance(state, dict) or not isinstance(state.get("done"), dict):
                raise ValueError("not a volseg watch state")
            state.setdefault("failed", {})
            state.setdefault("last_change", None)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read the watch state ({exc}); fix or remove it", self.state_path) from None
        if state.get("orthanc", self.url) != self.url:
            raise UserError(f"this watch state is for {state['orthanc']}, not {self.url}", self.state_path)
        return state

    def _save_state(self, state: dict[str, Any]) -> None:
        from volseg.fileio import write_text_atomic

        write_text_atomic(self.state_path, json.dumps(state, indent=1, sort_keys=True) + "\n")

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        lock_path = self.state_path.with_name(self.state_path.name + ".lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError("another watcher is using this state file", self.state_path) from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # Passes

    def run_once(self) -> list[WatchResult]:
        """One pass over the new changes; returns what was done, skipped or failed (server errors raise).

        Raises:
            DicomWebError: the server failed; the changes before the failing one are recorded.
            UserError: the state file is damaged or in use by another watcher.
        """
        results: list[WatchResult] = []
        with self._exclusive():
            state = self._load_state()
            if state["last_change"] is None:
                start = 0
                if self.from_now:
                    start = int(self._changes(None)["Last"])
                    self.echo(f"watch: {self.url}: starting after change {start}")
                state["last_change"] = start
                self._save_state(state)
            since = int(state["last_change"])
            while not self._stop.is_set():
                page = self._changes(since)
                changes = page.get("Changes") or []
                if not changes and int(page.get("Last", 0)) < since:
                    # The feed is behind the state: a new Orthanc database. The done list still prevents repeats.
                    self.echo(f"watch: {self.url}: the change feed restarted (last {page.get('Last')} < {since})")
                    since = state["last_change"] = 0
                    self._save_state(state)
                    continue
                try:
                    for change in changes:
                        if self._stop.is_set():
                            break
                        seq = int(change["Seq"])
                        result = None
                        if change.get("ChangeType") == "StableSeries":
                            result = self._process(seq, str(change["ID"]), state)
                        state["last_change"] = seq
                        if result is not None:
                            results.append(result)
                            if result.outcome != "skipped":
                                self._save_state(state)  # the series and its change, together
                finally:
                    self._save_state(state)
                if self._stop.is_set() or page.get("Done", True) or not changes:
                    break
                since = int(state["last_change"])
        return results

    def _changes(self, since: int | None) -> dict[str, Any]:
        if since is None:
            page = self.server.get_json(f"{self.url}/changes", "reading Orthanc's change feed", last="")
        else:
            page = self.server.get_json(
                f"{self.url}/changes", "reading Orthanc's change feed", since=since, limit=self.page_size
            )
        if not isinstance(page, dict) or "Last" not in page:
            raise DicomWebError("the change feed's answer is not Orthanc's (no 'Last')", self.url)
        return page

    def _process(self, seq: int, orthanc_id: str, state: dict[str, Any]) -> WatchResult | None:
        """One StableSeries change: look the series up, apply the rules, segment and store (or record why not)."""
        try:
            series = self.server.get_json(f"{self.url}/series/{orthanc_id}", "reading a new series from Orthanc")
            study = self.server.get_json(
                f"{self.url}/studies/{series['ParentStudy']}", "reading a new series' study from Orthanc"
            )
        except DicomWebError as err:
            if err.status == 404:
                return None  # deleted since: nothing to do
            raise
        tags = series.get("MainDicomTags", {})
        uid = str(tags.get("SeriesInstanceUID", ""))
        study_uid = str(study.get("MainDicomTags", {}).get("StudyInstanceUID", ""))
        if not uid or not study_uid:
            return None
        if uid in state["done"] or uid in state["failed"]:
            return None
        why = self.rules.refusal(
            str(tags.get("Modality", "")), str(tags.get("SeriesDescription", "")), str(tags.get("Manufacturer", ""))
        )
        if why is not None:
            self.echo(f"watch: change {seq}: skipped series {uid}: {why}")
            return WatchResult(seq, uid, "skipped", why)
        try:
            infos = self.server.series_of_study(study_uid, only=uid)
            chosen = next((s for s in infos if s.uid == uid), None)
            if chosen is None:
                return None
            if chosen.is_localizer:
                self.echo(f"watch: change {seq}: skipped series {uid}: a localizer")
                return WatchResult(seq, uid, "skipped", "a localizer")
            self.echo(f"watch: change {seq}: segmenting {chosen.summary()} of study {study_uid}")
            trip = round_trip(
                self.server, self.predictor, study_uid, chosen, output=self.output, formats=self.formats,
                echo=self.echo, lock=self.lock,
            )  # fmt: skip
        except DicomWebError:
            raise
        except UserError as err:
            state["failed"][uid] = {"study": study_uid, "change": seq, "reason": str(err), "at": _now()}
            self.echo(f"watch: change {seq}: series {uid} failed: {err}")
            return WatchResult(seq, uid, "failed", str(err))
        state["done"][uid] = {"study": study_uid, "change": seq, "seg": trip.seg_series_uid, "at": _now()}
        self.echo(f"watch: change {seq}: stored SEG {trip.seg_series_uid} for series {uid} ({trip.timing()})")
        return WatchResult(seq, uid, "done", trip.seg_series_uid, trip)

    # Running

    def run_forever(self) -> None:
        """Pass after pass until :meth:`stop`; server failures are reported and retried at the next pass."""
        self._stop.clear()
        while not self._stop.is_set():
            try:
                self.run_once()
            except UserError as err:
                self.echo(f"watch: {err}")
            except Exception as exc:  # noqa: BLE001 - a long-running service reports and goes on
                self.echo(f"watch: internal error: {exc.__class__.__name__}: {exc}")
            self._stop.wait(self.poll_interval)

    def start(self) -> None:
        """Run :meth:`run_forever` in a daemon thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run_forever, name="volseg-orthanc-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Ask the watcher to stop after the series in progress, and wait for its thread (``timeout`` seconds).

        A pass in progress records what it finished and returns; later passes do nothing until :meth:`start` or
        :meth:`run_forever` is called again.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self._thread = None


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
