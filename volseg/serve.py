"""The warm inference service (``volseg serve``): models loaded once, images in over HTTP, segmentations out.

Endpoints:

``POST /v1/segment?model=NAME&format=nifti|nrrd|seg.nrrd|dicom-seg[&series=UID]``
    multipart form with one file field ``file``: a NIfTI (``.nii``, ``.nii.gz``), an NRRD or MetaImage with the
    data in the same file (``.nrrd``, ``.mha``), or a ``.zip`` of a DICOM series. The answer is the segmentation
    on the input's exact grid (NIfTI gzip by default; DICOM SEG needs DICOM input), with a media type and a
    ``Content-Disposition`` file name.
``GET /v1/models``
    the loaded models: name, labels, bundle version, engine, device.
``GET /healthz``, ``GET /readyz``
    the process is alive; the models are loaded (503 until then, or with the reason loading failed).

What it guards against:

- **Load.** At most ``workers + max_queue`` requests are admitted at once (uploading, waiting or being segmented);
  one more is answered 503 with ``Retry-After`` before its body is read. Inference runs in a pool of ``workers``
  threads (1 by default: on a small machine one case at a time uses every core), each with its own predictors.
- **Size.** A body over ``max_upload_mb`` is refused with 413 (from ``Content-Length`` before reading, or while
  reading); a zip may hold at most ``max_zip_files`` entries unpacking to at most ``max_unzipped_mb``.
- **Time.** ``timeout_s`` bounds each request from its arrival: 408 while the upload is still coming, 504 while
  waiting or being segmented. A case already being segmented cannot be interrupted: it keeps its place (and its
  folder) until it ends, and its result is dropped.
- **Paths.** Each upload goes to a fresh temporary folder under a server-chosen name and the folder is removed
  when the request ends. The client's file name is used only for its suffix (checked against an allow-list) and,
  cleaned, for the name of the answer. Files that name other files are refused: ``.nhdr``, ``.mhd``, an NRRD
  header with a ``data file`` field or a MetaImage whose ``ElementDataFile`` is not ``LOCAL``. Zip entries with
  absolute paths, ``..``, symbolic links or encryption are refused, and the others are unpacked under names the
  server chooses.

Errors are JSON ``{"error": "one line"}`` with 400, 404, 408, 413, 415, 422, 503 or 504; nothing of the server's
own paths is in them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import queue
import re
import shutil
import signal
import stat
import tempfile
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import Query, Request

from volseg.errors import UserError

log = logging.getLogger("volseg.serve")

#: Upload suffixes accepted, longest first (``.nii.gz`` before ``.nii``).
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".zip")
MEDIA_TYPES = {
    "nifti": "application/gzip",
    "nrrd": "application/octet-stream",
    "seg.nrrd": "application/octet-stream",
    "dicom-seg": "application/dicom",
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UID = re.compile(r"^[0-9]+(\.[0-9]+){0,40}$")


class ServiceError(Exception):
    """An answer other than 200: HTTP status, one line for the client, extra headers."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


@dataclass(frozen=True)
class Limits:
    """The service's bounds (see the module docstring)."""

    max_queue: int = 4
    max_upload_mb: float = 1024.0
    timeout_s: float = 300.0
    workers: int = 1
    max_zip_files: int = 10000
    max_unzipped_mb: float | None = None  # default: 4 x max_upload_mb

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_unzipped_bytes(self) -> int:
        mb = self.max_unzipped_mb if self.max_unzipped_mb is not None else 4 * self.max_upload_mb
        return int(mb * 2**20)


def parse_bundles(items: Sequence[str | Path] | Mapping[str, str | Path]) -> dict[str, Path]:
    """``PATH`` or ``NAME=PATH`` per bundle -> {name: path}; the name defaults to the bundle folder's name.

    Raises:
        UserError: no bundle, a name that is not ``[A-Za-z0-9._-]`` (64 at most), or the same name twice.
    """
    pairs: list[tuple[str, Path]] = []
    if isinstance(items, Mapping):
        pairs = [(str(k), Path(v)) for k, v in items.items()]
    else:
        for item in items:
            text = str(item)
            name, sep, where = text.partition("=")
            if sep and _NAME.match(name) and where:
                pairs.append((name, Path(where)))
            else:
                pairs.append((Path(text).resolve().name, Path(text)))
    if not pairs:
        raise UserError("no bundle given: pass --bundle DIR (repeat for several models)", "--bundle")
    out: dict[str, Path] = {}
    for name, path in pairs:
        if not _NAME.match(name):
            raise UserError(f"model name '{name}' is not letters, digits, '.', '_' or '-'; use NAME=PATH", "--bundle")
        if name in out:
            raise UserError(f"two bundles named '{name}'; name them with NAME=PATH", "--bundle")
        out[name] = path
    return out


# ----------------------------------------------------------------------------------------------------------
# Uploads: the multipart body into the request's folder, suffix checks, zips unpacked safely
# ----------------------------------------------------------------------------------------------------------


def upload_suffix(filename: str) -> str:
    """The allowed suffix of a client's file name (lower case), else 415."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for suffix in UPLOAD_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    raise ServiceError(
        415,
        f"unsupported upload '{_clean_name(filename)}': send .nii, .nii.gz, .nrrd, .mha or a .zip of a DICOM series "
        "(detached headers such as .nhdr and .mhd name other files and are refused)",
    )


def _clean_name(filename: str, limit: int = 80) -> str:
    """The base name of a client's file name with anything but [A-Za-z0-9._-] replaced, for messages and answers."""
    base = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)[:limit] or "upload"


def answer_name(filename: str, suffix: str, fmt: str) -> str:
    """``<case>_seg<format suffix>`` from the client's file name (cleaned), e.g. ``scan_seg.nii.gz``."""
    from volseg.data.writers import SUFFIXES

    stem = _clean_name(filename, 200)
    if stem.lower().endswith(suffix):
        stem = stem[: -len(suffix)]
    stem = stem.strip("._")[:80] or "case"
    return f"{stem}_seg{SUFFIXES[fmt]}"


def check_self_contained(path: Path, suffix: str) -> None:
    """Refuse NRRD and MetaImage headers that point at other files (a request must not name a server path)."""
    if suffix not in (".nrrd", ".mha"):
        return
    with path.open("rb") as fh:
        head = fh.read(65536)
    if suffix == ".nrrd":
        if not head.startswith(b"NRRD"):
            raise ServiceError(422, "the .nrrd upload is not an NRRD file (no NRRD magic)")
        header = head.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0]
        for line in header.splitlines():
            key = line.split(b":", 1)[0].strip().lower().replace(b" ", b"")
            if key == b"datafile":
                raise ServiceError(415, "the NRRD header names a separate data file; send the data in the file")
        return
    for line in head.splitlines():
        key, sep, value = line.partition(b"=")
        if sep and key.strip().lower() == b"elementdatafile":
            if value.strip().upper() != b"LOCAL":
                raise ServiceError(415, "the MetaImage header names a separate data file; send ElementDataFile = LOCAL")
            return
    raise ServiceError(422, "the .mha upload has no ElementDataFile = LOCAL line within its first 64 KB")


def extract_zip(archive: Path, dest: Path, max_files: int, max_bytes: int) -> Path:
    """Unpack a zip of a DICOM series into ``dest`` under server-chosen names, refusing what could escape or blow up.

    Refused (400): entries with absolute paths, drive letters or ``..``, symbolic links, encrypted entries;
    (413): more than ``max_files`` entries, or more than ``max_bytes`` unpacked (counted while unpacking, not
    taken from the headers); (422): not a zip archive.
    """
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ServiceError(422, f"the .zip upload is not a readable zip archive ({exc.__class__.__name__})") from None
    with zf:
        infos = zf.infolist()
        if len(infos) > max_files:
            raise ServiceError(413, f"the zip holds {len(infos)} entries; at most {max_files} are accepted")
        for info in infos:
            name = info.filename.replace("\\", "/")
            shown = _clean_name(name, 100) if "/" not in name else re.sub(r"[^A-Za-z0-9._/-]", "_", name)[:100]
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in PurePosixPath(name).parts:
                raise ServiceError(400, f"zip entry '{shown}' points outside the archive (absolute path or '..')")
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ServiceError(400, f"zip entry '{shown}' is a symbolic link; links are refused")
            if info.flag_bits & 0x1:
                raise ServiceError(400, f"zip entry '{shown}' is encrypted")
        files = [i for i in infos if not i.is_dir()]
        declared = sum(i.file_size for i in files)
        limit_mb = max_bytes / 2**20
        if declared > max_bytes:
            raise ServiceError(413, f"the zip would unpack to {declared / 2**20:.0f} MB; at most {limit_mb:.0f} MB")
        dest.mkdir(parents=True, exist_ok=True)
        total = 0
        for k, info in enumerate(files):
            try:
                with zf.open(info) as src, (dest / f"{k:06d}.dcm").open("wb") as dst:
                    while block := src.read(1 << 20):
                        total += len(block)
                        if total > max_bytes:
                            raise ServiceError(413, f"the zip unpacks to more than {limit_mb:.0f} MB")
                        dst.write(block)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError) as exc:
                raise ServiceError(422, f"cannot unpack the zip ({exc.__class__.__name__})") from None
    return dest


@dataclass
class _Upload:
    path: Path | None = None
    filename: str = ""
    suffix: str = ""
    fields: int = 0


async def receive_upload(request: Any, folder: Path, max_bytes: int) -> _Upload:
    """Stream a multipart body into ``folder/upload<suffix>``: one file field ``file``, at most ``max_bytes``."""
    from python_multipart.exceptions import FormParserError
    from python_multipart.multipart import MultipartParser, parse_options_header
    from starlette.requests import ClientDisconnect

    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ServiceError(400, "multipart body without a boundary")
    up = _Upload()
    state: dict[str, Any] = {"name": b"", "value": b"", "disposition": b"", "out": None}

    def on_part_begin() -> None:
        state.update(disposition=b"", out=None)

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["name"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        if state["name"].lower() == b"content-disposition":
            state["disposition"] = state["value"]
        state.update(name=b"", value=b"")

    def on_headers_finished() -> None:
        _, opts = parse_options_header(state["disposition"])
        if opts.get(b"name") != b"file":
            up.fields += 1
            if up.fields > 16:
                raise ServiceError(400, "too many form fields; send one file field named 'file'")
            return
        if up.path is not None:
            raise ServiceError(400, "more than one 'file' field; send one image per request")
        filename = opts.get(b"filename", b"").decode("utf-8", "replace")
        if not filename:
            raise ServiceError(415, "the 'file' field has no file name; its suffix says what the file is")
        up.filename, up.suffix = filename, upload_suffix(filename)
        up.path = folder / f"upload{up.suffix}"
        state["out"] = up.path.open("wb")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if state["out"] is not None:
            state["out"].write(data[start:end])

    def on_part_end() -> None:
        if state["out"] is not None:
            state["out"].close()
            state["out"] = None

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    parser = MultipartParser(boundary, callbacks)
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise ServiceError(413, f"upload larger than {max_bytes / 2**20:.0f} MB")
            parser.write(chunk)
        parser.finalize()
    except FormParserError:
        raise ServiceError(400, "malformed multipart body") from None
    except ClientDisconnect:
        raise ServiceError(400, "the client went away during the upload") from None
    finally:
        if state["out"] is not None:
            state["out"].close()
    if up.path is None:
        raise ServiceError(400, "no file: send the image as a multipart form field named 'file'")
    return up


# ----------------------------------------------------------------------------------------------------------
# Models and the service state
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Model:
    """One bundle served: its predictors (one per worker thread), labels and description."""

    name: str
    engine: str
    predictors: queue.SimpleQueue[Any]
    info: dict[str, Any]


def describe(name: str, predictor: Any, engine: str) -> dict[str, Any]:
    """What ``GET /v1/models`` says about one model."""
    labels = {str(s.name): int(s.value) for s in getattr(predictor, "segments", [])}
    algorithm = getattr(predictor, "algorithm", {}) or {}
    used = engine if getattr(predictor, "fast", None) is not None or engine == "monai" else "monai"
    return {
        "name": name,
        "labels": labels,
        "version": str(algorithm.get("bundle_version", "")),
        "bundle": str(algorithm.get("bundle", "")),
        "engine": used,
        "device": str(getattr(predictor, "device", "")),
    }


def warm_up(predictor: Any) -> None:
    """One small case through the predictor and the NIfTI writer, so that the first request pays no first-use
    costs (lazy imports, kernel selection for the window shape). Only for fast-engine predictors."""
    fast = getattr(predictor, "fast", None)
    if fast is None:
        return
    import nibabel as nib
    import numpy as np

    from volseg.infer import save_prediction

    recipe = fast.recipe
    roi = [int(r) for r in recipe.roi_size]
    spacing = [float(s) for s in (recipe.data.spacing or (1.0, 1.0, 1.0))]
    channels = int(recipe.model.in_channels)
    rng = np.random.default_rng(0)
    shape = (*roi, channels) if channels > 1 else tuple(roi)
    arr = rng.normal(40.0, 30.0, shape).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="volseg-warmup-") as tmp:
        path = Path(tmp) / "warmup.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.0])), str(path))
        pred = predictor.predict(path)
        save_prediction(pred, Path(tmp) / "warmup_seg", ["nifti"], predictor.segments, predictor.algorithm)


class Service:
    """The models, the admission counter and the inference pool behind the app."""

    def __init__(
        self,
        bundles: Mapping[str, Path],
        limits: Limits,
        factory: Callable[[Path], Any],
        engine: str,
        work_dir: Path | None,
        warmup: bool,
    ) -> None:
        self.bundles = dict(bundles)
        self.limits = limits
        self.factory = factory
        self.engine = engine
        self.work_dir = work_dir
        self.warmup = warmup
        self.models: dict[str, Model] = {}
        self.state = "loading"
        self.error: str | None = None
        self.ready = threading.Event()
        self._lock = threading.Lock()
        self.inflight = 0
        self.served = 0
        self._mean_s = 0.0
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=limits.workers, thread_name_prefix="volseg-infer")
        #: Held around each inference, by the workers and by a watcher: at most ``workers`` cases at once.
        self.slots = threading.BoundedSemaphore(limits.workers)
        self.on_load_error: Callable[[str], None] | None = None
        self.watcher_factory: Callable[[Any, Any], Any] | None = None
        self.watcher: Any = None

    # loading --------------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Build every predictor (and warm it up); ``state`` becomes ``ready`` or ``failed``."""
        try:
            for name, path in self.bundles.items():
                t0 = time.perf_counter()
                predictors: queue.SimpleQueue[Any] = queue.SimpleQueue()
                first = None
                for _ in range(self.limits.workers):
                    p = self.factory(path)
                    if self.warmup:
                        warm_up(p)
                    first = first or p
                    predictors.put(p)
                self.models[name] = Model(name, self.engine, predictors, describe(name, first, self.engine))
                for note in getattr(first, "notes", []) or []:
                    log.warning("%s: %s", name, note)
                log.info("model %s loaded from %s in %.1f s", name, path, time.perf_counter() - t0)
            if self.watcher_factory is not None:
                # The watcher segments with its own predictor of the default model, sharing the inference slots.
                self.watcher = self.watcher_factory(self.factory(next(iter(self.bundles.values()))), self.slots)
                self.watcher.start()
            self.state = "ready"
            log.info("ready: %s", ", ".join(self.models))
        except UserError as err:
            self._failed(str(err))
        except Exception as exc:  # noqa: BLE001 - reported on /readyz and by the CLI, with the log's traceback
            log.exception("loading the models failed")
            self._failed(f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc) else ''}")
        finally:
            self.ready.set()

    def _failed(self, message: str) -> None:
        self.state, self.error = "failed", message
        log.error("loading the models failed: %s", message)
        if self.on_load_error is not None:
            self.on_load_error(message)

    # admission ------------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.limits.workers + self.limits.max_queue

    def admit(self) -> None:
        with self._lock:
            if self.inflight >= self.capacity:
                wait = max(1, math.ceil(self._mean_s * self.inflight / self.limits.workers))
                raise ServiceError(
                    503,
                    f"busy: {self.inflight} request(s) admitted, the queue is full; retry later",
                    {"Retry-After": str(wait)},
                )
            self.inflight += 1

    def release(self, seconds: float | None = None) -> None:
        with self._lock:
            self.inflight -= 1
            if seconds is not None:
                self.served += 1
                self._mean_s = seconds if self.served == 1 else 0.8 * self._mean_s + 0.2 * seconds

    def model(self, name: str | None) -> Model:
        if name is None:
            return next(iter(self.models.values()))
        if name not in self.models:
            known = ", ".join(self.models)
            raise ServiceError(404, f"unknown model '{_clean_name(name, 64)}'; loaded: {known}")
        return self.models[name]

    # one job, in a worker thread ------------------------------------------------------------------------------
    def run_job(self, model: Model, up: _Upload, folder: Path, fmt: str, series: str | None) -> dict[str, Any]:
        from volseg.infer import save_prediction

        t0 = time.perf_counter()
        assert up.path is not None
        try:
            if up.suffix == ".zip":
                source = extract_zip(
                    up.path, folder / "series", self.limits.max_zip_files, self.limits.max_unzipped_bytes
                )
                up.path.unlink()
            else:
                check_self_contained(up.path, up.suffix)
                source = up.path
            predictor = model.predictors.get()
            try:
                with self.slots:
                    pred = predictor.predict(source, series_uid=series)
                out_base = folder / "out" / "case_seg"
                paths = save_prediction(pred, out_base, [fmt], predictor.segments, predictor.algorithm)
            finally:
                model.predictors.put(predictor)
            data = paths[0].read_bytes()
        except UserError as err:
            raise ServiceError(422, _scrub(f"{_clean_name(up.filename)}: {err.message}", folder)) from None
        return {"data": data, "seconds": time.perf_counter() - t0}


def _scrub(message: str, folder: Path) -> str:
    """One line without the server's temporary folder in it."""
    line = " ".join(message.split())
    return line.replace(str(folder), "upload")[:400]


# ----------------------------------------------------------------------------------------------------------
# The app
# ----------------------------------------------------------------------------------------------------------


def create_app(
    bundles: Sequence[str | Path] | Mapping[str, str | Path],
    max_queue: int = 4,
    max_upload_mb: float = 1024.0,
    timeout_s: float = 300.0,
    workers: int = 1,
    *,
    device: str | None = None,
    engine: str = "fast",
    precision: str | None = None,
    max_zip_files: int = 10000,
    max_unzipped_mb: float | None = None,
    predictor_factory: Callable[[Path], Any] | None = None,
    work_dir: str | Path | None = None,
    warmup: bool = True,
    watcher_factory: Callable[[Any, Any], Any] | None = None,
) -> Any:
    """The FastAPI app serving ``bundles`` (``PATH`` or ``NAME=PATH`` each, or a {name: path} mapping).

    The models are built in a background thread when the app starts (``/readyz`` answers 503 until then); each
    worker thread gets its own predictor per model.

    Args:
        bundles: the bundles to serve; the first is the default model.
        max_queue: requests admitted beyond those being segmented (waiting or uploading); one more gets 503.
        max_upload_mb: the largest request body.
        timeout_s: per request, from arrival to answer (408 while uploading, 504 afterwards).
        workers: inference threads.
        device, engine, precision: as for ``volseg infer`` (engine ``fast``, ``onnx`` or ``monai``).
        max_zip_files, max_unzipped_mb: bounds for a zipped DICOM series (default 4 x ``max_upload_mb``).
        predictor_factory: builds a predictor from a bundle path (default :class:`volseg.infer.Predictor`).
        work_dir: where the per-request temporary folders go (default: the system's temporary folder).
        warmup: run one small case through each predictor at start-up.
        watcher_factory: called with a predictor of the default model and the inference slots (a semaphore to
            hold around each case) once the models are loaded; returns an object with ``start()`` and
            ``stop(timeout)`` (a :class:`volseg.pacs.OrthancWatcher`), started then and stopped at shutdown.
    """
    from fastapi import FastAPI

    _check_limits(engine, max_queue, workers, max_zip_files, max_upload_mb, timeout_s)
    named = parse_bundles(bundles)
    limits = Limits(max_queue, max_upload_mb, timeout_s, workers, max_zip_files, max_unzipped_mb)

    if predictor_factory is None:
        from volseg.infer import Predictor

        def predictor_factory(path: Path) -> Any:
            return Predictor.from_bundle(path, device, engine, precision=precision)

    service = Service(named, limits, predictor_factory, engine, Path(work_dir) if work_dir else None, warmup)
    service.watcher_factory = watcher_factory

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=service.load, name="volseg-load", daemon=True).start()
        yield
        if service.watcher is not None:
            service.watcher.stop(timeout=limits.timeout_s)
        service.pool.shutdown(wait=True, cancel_futures=True)

    app = FastAPI(title="volseg", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service = service

    _add_error_handlers(app)
    _add_status_routes(app, service)
    _add_segment_route(app, service, limits)
    return app


def _check_limits(engine: str, max_queue: int, workers: int, max_zip_files: int, max_upload_mb: float,
                  timeout_s: float) -> None:  # fmt: skip
    """The serve options a person gave, checked (one line naming the option when wrong)."""
    if engine not in ("fast", "onnx", "monai"):
        raise UserError(f"unknown engine '{engine}'; known: fast, onnx, monai", "--engine")
    for label, value, low in (
        ("max-queue", max_queue, 0),
        ("workers", workers, 1),
        ("max-zip-files", max_zip_files, 1),
    ):
        if value < low:
            raise UserError(f"--{label} must be at least {low}", f"--{label}")
    if max_upload_mb <= 0 or timeout_s <= 0:
        raise UserError("--max-upload-mb and --timeout must be positive", "--timeout")


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Any:
    """The JSON error answer: ``{"error": message}``."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


def _add_error_handlers(app: Any) -> None:
    """Every refusal as one JSON line: service errors, HTTP errors and invalid requests."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> Any:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Any:
        text = exc.detail if isinstance(exc.detail, str) else "request refused"
        return _error(exc.status_code, " ".join(text.split()), exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Any:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error(422, f"{where}: {first.get('msg', 'invalid request')}"[:300])


def _add_status_routes(app: Any, service: Service) -> None:
    """``/healthz``, ``/readyz`` and ``/v1/models``."""
    from fastapi.responses import JSONResponse

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> Any:
        if service.state == "ready":
            out: dict[str, Any] = {"status": "ready", "models": list(service.models)}
            if service.watcher is not None:
                out["watching"] = str(getattr(service.watcher, "url", ""))
            return out
        if service.state == "failed":
            return _error(503, f"loading the models failed: {service.error}")
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})

    @app.get("/v1/models")
    async def models() -> Any:
        _require_ready(service)
        default = next(iter(service.models))
        return {"models": [{**m.info, "default": m.name == default} for m in service.models.values()]}


def _add_segment_route(app: Any, service: Service, limits: Limits) -> None:
    """``POST /v1/segment``: admit, receive the upload within the deadline, segment on a worker, answer the file."""
    from fastapi.responses import Response

    @app.post("/v1/segment")
    async def segment(
        request: Request,
        model: str | None = Query(None, description="model name (default: the first bundle)"),
        format_: str = Query("nifti", alias="format", description="nifti, nrrd, seg.nrrd or dicom-seg"),
        series: str | None = Query(None, description="SeriesInstanceUID to segment in a zipped DICOM folder"),
    ) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.timeout_s
        _require_ready(service)
        chosen = service.model(model)
        if format_ not in MEDIA_TYPES:
            raise ServiceError(400, f"unknown format '{_clean_name(format_, 32)}'; known: {', '.join(MEDIA_TYPES)}")
        if series is not None and not _UID.match(series):
            raise ServiceError(400, "series must be a DICOM UID (digits and dots)")
        ctype = request.headers.get("content-type", "").lower()
        if not ctype.startswith("multipart/form-data"):
            raise ServiceError(415, "send the image as multipart/form-data with one file field named 'file'")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_upload_bytes:
            raise ServiceError(413, f"upload of {int(declared) / 2**20:.0f} MB; at most {limits.max_upload_mb:g} MB")
        service.admit()
        handed_off, seconds = False, None
        folder = Path(tempfile.mkdtemp(prefix="volseg-serve-", dir=service.work_dir))
        try:
            try:
                up = await asyncio.wait_for(
                    receive_upload(request, folder, limits.max_upload_bytes), max(0.0, deadline - loop.time())
                )
            except asyncio.TimeoutError:
                raise ServiceError(408, f"the upload did not arrive within {limits.timeout_s:g} s") from None
            job = service.pool.submit(service.run_job, chosen, up, folder, format_, series)
            waiter = asyncio.wrap_future(job)
            try:
                result = await asyncio.wait_for(asyncio.shield(waiter), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                waiter.add_done_callback(_retrieve)
                if not job.cancel():  # already running: it keeps its place and folder until it ends
                    handed_off = True
                    job.add_done_callback(lambda f: _finish(service, folder, f))
                raise ServiceError(504, f"no result within {limits.timeout_s:g} s") from None
            except ServiceError:
                raise
            except Exception as exc:
                log.exception("segmenting an upload failed")
                detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                raise ServiceError(500, _scrub(f"internal error: {exc.__class__.__name__}: {detail}", folder)) from None
            fmt, seconds = format_, result["seconds"]
            name = answer_name(up.filename, up.suffix, fmt)
            log.info("%s %s -> %s in %.2f s", chosen.name, _clean_name(up.filename), fmt, result["seconds"])
            return Response(
                content=result["data"],
                media_type=MEDIA_TYPES[fmt],
                headers={
                    "Content-Disposition": f'attachment; filename="{name}"',
                    "X-Volseg-Model": chosen.name,
                    "X-Volseg-Seconds": f"{result['seconds']:.3f}",
                },
            )
        finally:
            if not handed_off:
                shutil.rmtree(folder, ignore_errors=True)
                service.release(seconds)


def _retrieve(fut: Any) -> None:
    """Mark an abandoned future's outcome as seen (no 'exception was never retrieved' log)."""
    if not fut.cancelled():
        fut.exception()


def _finish(service: Service, folder: Path, fut: concurrent.futures.Future[Any]) -> None:
    """A timed-out job has ended: its folder goes and its place is freed."""
    shutil.rmtree(folder, ignore_errors=True)
    service.release()


def _require_ready(service: Service) -> None:
    if service.state == "failed":
        raise ServiceError(503, f"no models: loading failed ({service.error})")
    if service.state != "ready":
        raise ServiceError(503, "the models are still loading; retry shortly", {"Retry-After": "5"})


def _version() -> str:
    from volseg import __version__

    return str(__version__)


def serve(
    bundles: Sequence[str],
    host: str = "127.0.0.1",
    port: int = 8000,
    echo: Callable[[str], None] = print,
    *,
    watch: Mapping[str, Any] | None = None,
    **options: Any,
) -> None:
    """Run the service with uvicorn until SIGINT/SIGTERM (``volseg serve``).

    Args:
        bundles, options: as for :func:`create_app`.
        host, port: where to listen (loopback by default; there is no authentication).
        echo: where the start-up lines go.
        watch: also watch an Orthanc (:class:`volseg.pacs.OrthancWatcher`) with the default model: ``url``,
            ``state`` (the state file), and optionally ``modalities``, ``series_description``, ``poll``,
            ``from_now``.

    Raises:
        UserError: a model (or the watcher) failed to load; the server stops first.
    """
    import uvicorn

    if watch is not None:
        from volseg.pacs import OrthancWatcher, WatchRules

        rules = WatchRules(tuple(watch.get("modalities") or ("CT", "MR")), watch.get("series_description"))

        def make_watcher(predictor: Any, slots: Any) -> Any:
            return OrthancWatcher(
                str(watch["url"]), predictor, Path(watch["state"]), rules=rules,
                poll_interval=float(watch.get("poll", 10.0)), from_now=bool(watch.get("from_now", False)),
                echo=lambda line: log.info("%s", line), lock=slots,
            )  # fmt: skip

        options["watcher_factory"] = make_watcher
    for name, path in parse_bundles(bundles).items():  # before listening: a wrong folder is a mistake, not a load
        if not (path / "configs" / "inference.json").is_file():
            raise UserError(f"model {name}: not a bundle (no configs/inference.json)", path)
    app = create_app(bundles, **options)
    service: Service = app.state.service
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=True, lifespan="on")
    server = uvicorn.Server(config)

    def stop(message: str) -> None:
        server.should_exit = True

    service.on_load_error = stop
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s volseg: %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    if host not in ("127.0.0.1", "localhost", "::1"):
        echo(f"warning: listening on {host}: anyone who reaches this port can send images (there is no authentication)")
    echo(f"volseg serve: loading {len(service.bundles)} model(s): {', '.join(service.bundles)}")
    # uvicorn stops on SIGINT/SIGTERM and then raises the signal again for the handler it found; a no-op handler
    # there makes a requested stop a normal exit (status 0).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    echo("volseg serve: stopped")
    if service.error:
        raise UserError(f"no model could be served: {service.error}")
