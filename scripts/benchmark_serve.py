#!/usr/bin/env python3
r"""The warm service against a cold ``volseg infer``, throughput under concurrent clients, onnxruntime against torch.

One run measures, on the same 512 x 512 x N CT phantom (``benchmark_infer.py``'s, cached in ``--work``) and the
same bundle:

1. **Cold** ``volseg infer`` as a child process, end to end (interpreter start, imports, model loading, reading,
   segmenting, writing), for the torch engine with the bundle's precision (bf16 autocast on CPUs with native
   bf16), the torch engine in float32 (``--precision fp32``) and the onnxruntime engine (``--engine onnx``,
   float32), alternating their order between repeats. The per-case time each prints (reading to labels) is
   recorded too.
2. **Warm** ``volseg serve`` on loopback for each of the three: the time from start to ``/readyz``, then
   sequential requests (``POST /v1/segment``, the NIfTI in, the NIfTI gzip labels out), each timed at the client
   from the first byte sent to the last byte received. Every answer is decoded and compared voxel by voxel with
   the cold run's output of the same engine.
3. **Throughput** of the default service with 1, 2 and 4 concurrent clients (threads, one connection per
   request), ``--requests`` requests per level in all, so it stops by itself. An answer counts as right when it is
   a 200 whose labels equal the single-request answer; the report gives the number lost (no answer, or not 200)
   and wrong.

``volseg export-onnx`` runs first (timed) so that the ONNX file belongs to the bundle's weights.

Usage:
    python scripts/benchmark_serve.py --bundle runs/bench/full/run [--slices 200] [--repeats 3] \
        [--requests 8] [--clients 1,2,4] [--json serve.json] [--md serve.md]
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    REPO,
    code_fingerprint,
    fmt_spread,
    log_tail,
    machine_info,
    machine_lines,
    run_child,
    spread,
    write_reports,
)
from benchmark_infer import ensure_phantom  # noqa: E402

ENGINES = {  # name -> extra arguments of volseg infer / volseg serve
    "torch (bundle precision)": [],
    "torch fp32": ["--precision", "fp32"],
    "onnxruntime fp32": ["--engine", "onnx"],
}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def labels_of(content: bytes) -> Any:
    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image.from_bytes(gzip.decompress(content))
    return np.asarray(img.dataobj), np.asarray(img.affine)


def labels_file(path: str) -> Any:
    import nibabel as nib
    import numpy as np

    img: Any = nib.load(path)
    return np.asarray(img.dataobj), np.asarray(img.affine)


def agreement(a: Any, b: Any, values: dict[str, int]) -> dict[str, Any]:
    import numpy as np

    out: dict[str, Any] = {"identical_fraction": float(np.mean(a == b))}
    for name, v in values.items():
        x, y = a == v, b == v
        total = int(x.sum()) + int(y.sum())
        out[f"dice_{name}"] = None if total == 0 else 2.0 * int((x & y).sum()) / total
        out[f"voxels_{name}"] = [int(x.sum()), int(y.sum())]
    return out


# ----------------------------------------------------------------------------------------------------------
# The service


class Service:
    """``volseg serve`` as a child process on a free loopback port."""

    def __init__(self, python: str, bundle: Path, extra: list[str], log: Path, max_queue: int) -> None:
        self.port = free_port()
        self.log = log
        cmd = [python, "-m", "volseg", "serve", "--bundle", str(bundle), "--port", str(self.port), "--device", "cpu",
               "--max-queue", str(max_queue), *extra]  # fmt: skip
        log.parent.mkdir(parents=True, exist_ok=True)
        self._fh = log.open("w")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, stdout=self._fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        self.ready_s = self._wait_ready()

    def _wait_ready(self, timeout: float = 600) -> float:
        while time.perf_counter() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise SystemExit(f"volseg serve exited ({self.proc.returncode}):\n{log_tail(self.log, 20)}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/readyz")
                if conn.getresponse().status == 200:
                    return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"volseg serve not ready after {timeout} s:\n{log_tail(self.log, 20)}")

    def post(self, body: bytes, ctype: str, timeout: float = 600) -> dict[str, Any]:
        t0 = time.perf_counter()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            conn.request("POST", "/v1/segment?format=nifti", body=body, headers={"Content-Type": ctype})
            resp = conn.getresponse()
            data = resp.read()
            conn.close()
        except OSError as exc:
            return {"status": None, "error": f"{exc.__class__.__name__}: {exc}", "latency_s": time.perf_counter() - t0}
        return {
            "status": resp.status,
            "data": data,
            "latency_s": time.perf_counter() - t0,
            "server_s": float(resp.getheader("X-Volseg-Seconds") or "nan"),
        }

    def peak_rss_mb(self) -> float | None:
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:
            return None
        return None

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            rc = self.proc.wait()
        self._fh.close()
        return rc


def multipart(image: Path) -> tuple[bytes, str]:
    boundary = "volsegbenchmarkboundary0123456789"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{image.name}"\r\n\r\n'
    return head.encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode(), (
        f"multipart/form-data; boundary={boundary}"
    )


def load_test(service: Service, body: bytes, ctype: str, clients: int, requests: int) -> dict[str, Any]:
    """``requests`` requests over ``clients`` threads; each thread sends its next one when its last is answered."""
    lock = threading.Lock()
    left = [requests]
    results: list[dict[str, Any]] = []

    def client() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            r = service.post(body, ctype)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": requests, "wall_s": round(wall, 3), "results": results}


# ----------------------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench")
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--slice-mm", type=float, default=2.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=3, help="cold runs per engine, and sequential warm requests")
    ap.add_argument("--requests", type=int, default=8, help="requests per concurrency level")
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()
    import numpy as np

    levels = [int(c) for c in a.clients.split(",") if c.strip()]
    work = a.work
    logs = work / "serve_logs"
    result: dict[str, Any] = {"machine": machine_info(a.python), "code_before": code_fingerprint()}
    ph = ensure_phantom(work, a.slices, a.slice_mm, a.seed, a.python, logs)
    image = Path(ph["image"])
    result["volume"] = {"shape": ph["shape"], "spacing": ph.get("spacing"), "nii_gz_mb": image.stat().st_size / 2**20}
    recipe_labels = {"liver": 1, "tumour": 2}

    print("exporting the ONNX model ...", flush=True)
    r = run_child([a.python, "-m", "volseg", "export-onnx", str(a.bundle)], log=logs / "export_onnx.log")
    if r["rc"] != 0:
        raise SystemExit(f"export-onnx failed:\n{log_tail(Path(r['log']), 20)}")
    result["export_onnx"] = {"wall_s": r["wall_s"], "line": log_tail(Path(r["log"]), 1)}

    # 1. Cold runs, alternating the engines' order.
    cold: dict[str, list[dict[str, Any]]] = {e: [] for e in ENGINES}
    names = list(ENGINES)
    for rep in range(a.repeats):
        order = names if rep % 2 == 0 else names[::-1]
        for engine in order:
            out = work / "serve_cold" / f"{names.index(engine)}_{rep}"
            cmd = [a.python, "-m", "volseg", "infer", str(image), "-o", str(out), "--bundle", str(a.bundle),
                   "--device", "cpu", *ENGINES[engine]]  # fmt: skip
            print(f"cold {engine} #{rep + 1} ...", flush=True)
            run = run_child(cmd, log=logs / f"cold_{names.index(engine)}_{rep}.log", timeout=1800)
            for line in Path(run["log"]).read_text(errors="replace").splitlines():
                if " s  voxels per label" in line:
                    run["predict_s"] = float(line.split(" s  voxels per label")[0].split()[-1])
            outs = sorted(out.glob("*.nii.gz"))
            run["output"] = str(outs[0]) if outs else None
            cold[engine].append(run)
    reference = {e: labels_file(runs[0]["output"]) for e, runs in cold.items() if runs and runs[0]["output"]}
    truth = labels_file(ph["label"])[0]
    result["cold"] = {
        e: {"wall_s": spread([x["wall_s"] for x in runs if x["rc"] == 0]),
            "predict_s": spread([x.get("predict_s") for x in runs if x["rc"] == 0]),
            "peak_rss_mb": spread([x["peak_rss_mb"] for x in runs if x["rc"] == 0]),
            "ok": sum(x["rc"] == 0 for x in runs), "runs": len(runs)}
        for e, runs in cold.items()
    }  # fmt: skip
    result["agreement"] = {
        "onnx_vs_torch_fp32": agreement(reference["onnxruntime fp32"][0], reference["torch fp32"][0], recipe_labels),
        "onnx_vs_torch_default": agreement(
            reference["onnxruntime fp32"][0], reference["torch (bundle precision)"][0], recipe_labels
        ),
        "torch_default_vs_truth": agreement(reference["torch (bundle precision)"][0], truth, recipe_labels),
    }

    # 2. Warm services, sequential requests; 3. throughput on the default one.
    body, ctype = multipart(image)
    warm: dict[str, Any] = {}
    for engine in names:
        print(f"warm {engine} ...", flush=True)
        svc = Service(a.python, a.bundle, ENGINES[engine], logs / f"serve_{names.index(engine)}.log", max(levels))
        runs = [svc.post(body, ctype) for _ in range(a.repeats + 1)]
        ref, ref_affine = reference[engine]
        checks = []
        for x in runs:
            if x["status"] != 200:
                checks.append(False)
                continue
            lab, aff = labels_of(x["data"])
            checks.append(bool(lab.shape == ref.shape and np.array_equal(lab, ref) and np.allclose(aff, ref_affine)))
        entry: dict[str, Any] = {
            "ready_s": round(svc.ready_s, 2),
            "first_s": round(runs[0]["latency_s"], 3),
            "latency_s": spread([x["latency_s"] for x in runs[1:] if x["status"] == 200]),
            "server_s": spread([x.get("server_s") for x in runs[1:] if x["status"] == 200]),
            "statuses": [x["status"] for x in runs],
            "equal_to_cold": checks,
        }
        if engine == names[0]:
            single = labels_of(runs[0]["data"])[0] if runs[0]["status"] == 200 else None
            levels_out = []
            for c in levels:
                print(f"  {c} client(s), {a.requests} requests ...", flush=True)
                lt = load_test(svc, body, ctype, c, a.requests)
                ok = [x for x in lt["results"] if x["status"] == 200]
                wrong = sum(
                    1 for x in ok if single is None or not np.array_equal(labels_of(x["data"])[0], single)
                )  # checked after the timed part
                levels_out.append({
                    "clients": c, "requests": a.requests, "answered_200": len(ok),
                    "lost": a.requests - len(ok), "wrong": wrong, "wall_s": lt["wall_s"],
                    "per_s": round(len(ok) / lt["wall_s"], 3),
                    "latency_s": spread([x["latency_s"] for x in ok]),
                    "other_statuses": sorted({str(x["status"]) for x in lt["results"] if x["status"] != 200}),
                })  # fmt: skip
            entry["throughput"] = levels_out
        entry["peak_rss_mb"] = svc.peak_rss_mb()
        entry["exit_status"] = svc.stop()
        warm[engine] = entry
    result["warm"] = warm
    result["code_after"] = code_fingerprint()
    if result["code_after"] != result["code_before"]:
        print("warning: volseg's sources changed during the benchmark", file=sys.stderr)
    write_reports(result, markdown(result), a.json, a.md)


def markdown(r: dict[str, Any]) -> str:
    v = r["volume"]
    shape = "×".join(str(n) for n in v["shape"])
    export = r["export_onnx"]
    lines = [f"Volume {shape}, spacing {v['spacing']}, NIfTI gzip {v['nii_gz_mb']:.0f} MB", "",
             *machine_lines(r["machine"]), "", f"ONNX export: {export['line']} (child wall {export['wall_s']:.1f} s)",
             ""]  # fmt: skip
    lines += [
        "| engine | cold `volseg infer` wall s | its per-case s | warm service: ready after s | first request s "
        "| later requests s (client) | server s | answers equal to cold | service peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e, c in r["cold"].items():
        w = r["warm"][e]
        eq = f"{sum(w['equal_to_cold'])}/{len(w['equal_to_cold'])}"
        lines.append(
            f"| {e} | {fmt_spread(c['wall_s'], 2)} | {fmt_spread(c['predict_s'], 2)} | {w['ready_s']:.1f} | "
            f"{w['first_s']:.2f} | {fmt_spread(w['latency_s'], 2)} | {fmt_spread(w['server_s'], 2)} | {eq} | "
            f"{w['peak_rss_mb']} |"
        )
    tp = r["warm"][next(iter(r["warm"]))].get("throughput", [])
    lines += ["", "| clients | requests | answered 200 | lost | wrong | wall s | cases/s | latency s, median (min–max) "
              "|", "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for t in tp:
        lines.append(
            f"| {t['clients']} | {t['requests']} | {t['answered_200']} | {t['lost']} | {t['wrong']} | "
            f"{t['wall_s']:.2f} | {t['per_s']:.2f} | {fmt_spread(t['latency_s'], 2)} |"
        )
    lines += ["", "| labels compared | identical voxels | Dice liver | Dice tumour | voxels liver (a / b) |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for k, ag in r["agreement"].items():
        d = [ag.get(f"dice_{n}") for n in ("liver", "tumour")]
        ds = ["both empty" if x is None else f"{x:.4f}" for x in d]
        lines.append(
            f"| {k} | {ag['identical_fraction']:.6f} | {ds[0]} | {ds[1]} | {ag['voxels_liver'][0]} / "
            f"{ag['voxels_liver'][1]} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
