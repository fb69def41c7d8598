"""DICOMweb round trip: where the time goes (fetch, segment, write, push), and its cost over a local folder.

Starts a throw-away Orthanc with its DICOMweb plugin (as the tests do: tests/orthanc_server.py, Debian's
``orthanc`` and ``orthanc-dicomweb``), stores a 512 x 512 x N CT phantom in it as a DICOM series (one file per
slice, int16, explicit VR little endian), then runs, one child process at a time and alternating the order:

- ``volseg infer dicomweb://127.0.0.1:PORT/dicom-web --study UID --bundle B``: QIDO-RS, series metadata, WADO-RS
  of the series into a temporary folder, segmentation, DICOM SEG, STOW-RS. volseg prints the split itself
  (``fetch`` = QIDO + metadata + WADO + writing the files, ``segment`` = reading the folder + the engine,
  ``write`` = the DICOM SEG, ``push`` = STOW-RS); the SEG is deleted from Orthanc after each run;
- ``volseg infer FOLDER --format dicom-seg --bundle B``: the same series from a local folder, the same SEG written,
  nothing sent: the reference for what DICOMweb adds.

Each child's wall time is end to end (interpreter start, imports, model loading included).

    python scripts/benchmark_dicomweb.py --bundle runs/bench/full/run --slices 200 --repeats 3 \\
        --json runs/bench/bench_dicomweb.json --md runs/bench/bench_dicomweb.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from _bench_common import (  # noqa: E402
    REPO,
    code_fingerprint,
    git_revision,
    machine_info,
    machine_lines,
    run_child,
    write_reports,
)

STAGES = ("fetch", "segment", "write", "push")


def make_series(folder: Path, slices: int, seed: int) -> tuple[list[Path], str, str, float]:
    """A 512 x 512 x ``slices`` CT phantom (0.78 x 0.78 x 2.5 mm, LPS) as one DICOM file per slice.

    Made in a child process: a child forked from a process holding the phantom would report the phantom's memory
    as its own peak (Linux carries the resident high-water mark over fork and exec).
    """
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--make-series", str(folder), "--slices", str(slices), "--seed", str(seed)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    made = json.loads(proc.stdout.strip().splitlines()[-1])
    return [Path(p) for p in made["paths"]], made["study"], made["series"], time.perf_counter() - t0


def _make_series_here(folder: Path, slices: int, seed: int) -> None:
    import dicom_factory as F
    import numpy as np
    from pydicom.uid import generate_uid

    from volseg.data.synth import liver_ct_phantom

    ph = liver_ct_phantom(seed, size="full", shape=(512, 512, slices), spacing=(0.78, 0.78, 2.5), axcodes="LPS")
    study, series = generate_uid(), generate_uid()
    image = np.round(ph.image).astype(np.float32)
    paths = F.write_series(
        folder, image, ph.affine, study_uid=study, series_uid=series, description="abdomen", seed=seed,
    )  # fmt: skip
    print(json.dumps({"paths": [str(p) for p in paths], "study": study, "series": series}))


def parse_split(log: Path) -> dict[str, float]:
    text = Path(log).read_text(errors="replace")
    m = re.search(r"\((fetch [^)]*)\)", text)
    if not m:
        return {}
    return {k: float(v) for k, v in re.findall(r"(\w+) ([0-9.]+) s", m.group(1))}


def delete_segs(orthanc: Any, study_uid: str) -> int:
    import requests

    found = requests.post(f"{orthanc.url}/tools/find", json={"Level": "Series", "Query": {"Modality": "SEG",
                          "StudyInstanceUID": study_uid}}, auth=orthanc.auth, timeout=30).json()  # fmt: skip
    for ident in found:
        requests.delete(f"{orthanc.url}/series/{ident}", auth=orthanc.auth, timeout=30).raise_for_status()
    return len(found)


def med(values: list[float]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(vals), 2), "min": round(min(vals), 2), "max": round(max(vals), 2)}


def fmt(s: dict[str, Any]) -> str:
    if s["median"] is None:
        return "–"
    return f"{s['median']:.1f} ({s['min']:.1f}–{s['max']:.1f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required="--make-series" not in sys.argv)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one, removed)")
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--make-series", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.make_series is not None:
        _make_series_here(a.make_series, a.slices, a.seed)
        return 0

    from orthanc_server import OrthancServer, environment

    work = a.work or Path(tempfile.mkdtemp(prefix="volseg-bench-dicomweb-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    revision, fingerprint = git_revision(), code_fingerprint()
    paths, study, series, make_s = make_series(work / "series", a.slices, a.seed)
    size_mb = sum(p.stat().st_size for p in paths) / 2**20
    print(f"series: {len(paths)} files, {size_mb:.0f} MiB, made in {make_s:.0f} s", flush=True)
    runs: list[dict[str, Any]] = []
    try:
        with OrthancServer(work / "orthanc") as orthanc:
            t0 = time.perf_counter()
            orthanc.upload(paths)
            upload_s = time.perf_counter() - t0
            print(f"stored in Orthanc (REST POST /instances) in {upload_s:.1f} s", flush=True)
            env = environment()
            url = f"dicomweb://127.0.0.1:{orthanc.port}/dicom-web"
            common = ["--bundle", str(a.bundle), "--device", a.device]
            for r in range(a.repeats):
                order = ["dicomweb", "folder"] if r % 2 == 0 else ["folder", "dicomweb"]
                for kind in order:
                    log = work / "logs" / f"{kind}_{r}.log"
                    if kind == "dicomweb":
                        cmd = [sys.executable, "-m", "volseg", "infer", url, "--study", study, *common]
                    else:
                        out = work / f"out_{r}"
                        cmd = [sys.executable, "-m", "volseg", "infer", str(work / "series"), "-o", str(out),
                               "--format", "dicom-seg", *common]  # fmt: skip
                    res = run_child(cmd, log=log, timeout=a.timeout, env=env)
                    res.update(kind=kind, repeat=r, split=parse_split(log) if kind == "dicomweb" else {})
                    if kind == "dicomweb":
                        res["segs_deleted"] = delete_segs(orthanc, study)
                    else:
                        shutil.rmtree(work / f"out_{r}", ignore_errors=True)
                    runs.append(res)
                    print(f"{kind:9s} repeat {r}: rc {res['rc']}  {res['wall_s']:.1f} s  {res['split']}", flush=True)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if code_fingerprint() != fingerprint:
        print("warning: volseg's sources changed during the benchmark", file=sys.stderr)
    ok = [x for x in runs if x["rc"] == 0]
    web = [x for x in ok if x["kind"] == "dicomweb"]
    local = [x for x in ok if x["kind"] == "folder"]
    pairs = [(w["wall_s"], f["wall_s"]) for w in web for f in local if f["repeat"] == w["repeat"]]
    summary = {
        "dicomweb_wall_s": med([x["wall_s"] for x in web]),
        "folder_wall_s": med([x["wall_s"] for x in local]),
        "overhead_s": med([w - f for w, f in pairs]),
        "ratio": med([w / f for w, f in pairs]),
        **{f"{k}_s": med([x["split"].get(k) for x in web]) for k in STAGES},
        "peak_rss_dicomweb_mb": med([x["peak_rss_mb"] for x in web]),
        "peak_rss_folder_mb": med([x["peak_rss_mb"] for x in local]),
    }
    result = {
        "date": time.strftime("%Y-%m-%d"), "revision": revision, "machine": machine, "slices": a.slices,
        "files": len(paths), "series_mib": round(size_mb, 1), "upload_s": round(upload_s, 2), "device": a.device,
        "bundle": str(a.bundle), "repeats": a.repeats, "runs": runs, "summary": summary,
        "failed": [x for x in runs if x["rc"] != 0],
    }  # fmt: skip
    s = summary
    md = "\n".join(
        [
            f"DICOMweb round trip, 512 x 512 x {a.slices} CT ({len(paths)} files, {size_mb:.0f} MiB), "
            f"{a.repeats} repeat(s), device {a.device}, revision {revision}",
            "",
            *machine_lines(machine),
            "",
            "| | median (min–max), s |",
            "| --- | --- |",
            f"| `volseg infer dicomweb://...` end to end | {fmt(s['dicomweb_wall_s'])} |",
            f"| of which fetch (QIDO, metadata, WADO-RS, files written) | {fmt(s['fetch_s'])} |",
            f"| of which segment (folder read, engine) | {fmt(s['segment_s'])} |",
            f"| of which write (DICOM SEG) | {fmt(s['write_s'])} |",
            f"| of which push (STOW-RS) | {fmt(s['push_s'])} |",
            f"| `volseg infer FOLDER --format dicom-seg` end to end | {fmt(s['folder_wall_s'])} |",
            f"| DICOMweb minus folder, same repeat | {fmt(s['overhead_s'])} |",
            "",
            f"Ratio DICOMweb / folder per repeat: {fmt(s['ratio'])}. Peak RSS: DICOMweb "
            f"{fmt(s['peak_rss_dicomweb_mb'])} MB, folder {fmt(s['peak_rss_folder_mb'])} MB. Storing the series "
            f"in Orthanc (REST, one POST per file, not part of the round trip): {upload_s:.1f} s.",
        ]
    )
    if result["failed"]:
        md += f"\n\n{len(result['failed'])} run(s) failed: " + "; ".join(x["log"] for x in result["failed"])
    write_reports(result, md, a.json, a.md)
    return 0 if not result["failed"] else 1


if __name__ == "__main__":
    os.chdir(REPO)
    sys.exit(main())
