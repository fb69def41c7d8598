"""Shared pieces of the benchmark scripts: child processes with their own peak memory, machine facts, statistics.

The benchmarks run every pipeline as a child process, one at a time, so that each is measured end to end
(interpreter start, imports, reading, computing, writing) and its peak resident memory is its own: the parent
reaps each child with ``os.wait4``, whose resource usage belongs to that child alone (``RUSAGE_CHILDREN`` would
give the maximum over all children so far). A watchdog polls the child's resident memory, so that a run can be
stopped at a memory limit on a shared machine and reported as such rather than taking the machine down.

This file is also a small command line used by the benchmarks themselves:

    python scripts/_bench_common.py phantom --out scan.nii.gz --label-out gt.nii.gz --seed 0 \
        --shape 512 512 200 --spacing 0.78 0.78 2.5 --axcodes LPS
    python scripts/_bench_common.py module --stats stats.json -- volseg infer scan.nii.gz -o out ...

``module`` runs ``python -m MODULE ARGS`` in this process (``runpy``, exactly what ``-m`` does) and then writes
the process's peak RSS and, when CUDA was used, its peak GPU memory to ``--stats``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------------------------
# Child processes
# ------------------------------------------------------------------------------------------------------------


def _rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its descendants, in KiB (0 if gone)."""
    total = 0
    for p in [pid, *_descendants(pid)]:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError):
            continue
    return total


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_child(
    cmd: Sequence[Any],
    *,
    log: Path,
    timeout: float | None = None,
    max_rss_gb: float | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> dict[str, Any]:
    """Run ``cmd`` to completion (or to a limit) and measure it.

    Args:
        cmd: the command line.
        log: where its stdout and stderr go (one file).
        timeout: wall-clock limit in seconds; the process group is killed past it.
        max_rss_gb: resident-memory limit (the process and its descendants); the group is killed past it.
        env: environment (default: this one).
        cwd: working directory (default: the repository).

    Returns:
        ``rc`` (exit status, negative for a signal), ``wall_s``, ``peak_rss_mb`` (the child's own, from
        ``wait4``), ``peak_rss_tree_mb`` (largest sum over the process tree seen by the watchdog, sampled every
        0.2 s), ``killed`` (None, or why the benchmark killed it), and ``log``.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    killed: list[str] = []
    tree_peak = [0]
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(str(c) for c in cmd) + "\n")
        fh.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            [str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(cwd or REPO),
            start_new_session=True,
        )  # fmt: skip
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.2):
                rss = _rss_kb(proc.pid)
                tree_peak[0] = max(tree_peak[0], rss)
                why = None
                if max_rss_gb is not None and rss > max_rss_gb * 2**20:
                    why = f"killed by the benchmark at {rss / 2**20:.1f} GB resident (limit {max_rss_gb:g} GB)"
                elif timeout is not None and time.perf_counter() - t0 > timeout:
                    why = f"killed by the benchmark after {timeout:g} s (timeout)"
                if why:
                    killed.append(why)
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    return

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        done.set()
        watcher.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    rc = proc.returncode
    if rc == -signal.SIGKILL and not killed:
        killed.append("killed by SIGKILL from outside the benchmark (the kernel's out-of-memory killer?)")
    return {
        "rc": rc,
        "wall_s": round(wall, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "peak_rss_tree_mb": round(tree_peak[0] / 1024, 1),
        "killed": killed[0] if killed else None,
        "log": str(log),
    }


def last_json_line(path: Path, key: str | None = None) -> dict[str, Any] | None:
    """The last line of a log that parses as a JSON object (holding ``key``, when given)."""
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict) and (key is None or key in obj):
                return obj
    return None


def log_tail(path: Path, n: int = 6) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


# ------------------------------------------------------------------------------------------------------------
# Facts and statistics
# ------------------------------------------------------------------------------------------------------------


def machine_info(python: str = sys.executable) -> dict[str, Any]:
    """What the figures were measured on: CPUs, memory, load, GPU, package versions, volseg's git revision."""
    info: dict[str, Any] = {"hostname": platform.node(), "platform": platform.platform()}
    info["nproc"] = len(os.sched_getaffinity(0))
    info["cpu_count"] = os.cpu_count()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_total_gb"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    code = (
        "import json, platform, torch, monai, numpy\n"
        "d = {'python': platform.python_version(), 'torch': torch.__version__, 'monai': monai.__version__,"
        " 'numpy': numpy.__version__, 'torch_threads': torch.get_num_threads(),"
        " 'cuda': torch.cuda.is_available()}\n"
        "if d['cuda']: d['gpu'] = torch.cuda.get_device_name(0)\n"
        "print(json.dumps(d))\n"
    )
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, cwd=str(REPO))
        info.update(json.loads(out.stdout.strip().splitlines()[-1]))
    except (OSError, ValueError, IndexError, subprocess.SubprocessError):
        pass
    info["git_revision"] = git_revision()
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return info


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                             timeout=10).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO, timeout=10).stdout.strip()  # fmt: skip
        return rev + (" (with uncommitted changes)" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_fingerprint() -> str:
    """A short hash of volseg's sources as they are on disk now (the tree may change while a benchmark runs)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted((REPO / "volseg").rglob("*.py")):
        h.update(str(path.relative_to(REPO)).encode())
        try:
            h.update(path.read_bytes())
        except OSError:
            continue
    return h.hexdigest()[:12]


def spread(values: Sequence[float | None]) -> dict[str, float | None]:
    """Median, min and max of the values that exist."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": round(statistics.median(v), 3), "min": round(min(v), 3), "max": round(max(v), 3), "n": len(v)}


def fmt_spread(s: dict[str, Any], digits: int = 1) -> str:
    if s.get("median") is None:
        return "–"
    if s.get("n", 1) == 1 or s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def fmt(x: float | None, digits: int = 2, unit: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{unit}"


def machine_lines(m: dict[str, Any]) -> list[str]:
    """The machine as Markdown bullet lines."""
    gpu = m.get("gpu") or "none (CPU only)"
    return [
        f"- date: {m.get('date_utc')}; volseg revision {m.get('git_revision')}",
        f"- CPU: {m.get('cpu_model', '?')}, `nproc` = {m.get('nproc')}; memory {m.get('mem_total_gb')} GB; GPU: {gpu}",
        f"- Python {m.get('python')}, torch {m.get('torch')} ({m.get('torch_threads')} threads), "
        f"MONAI {m.get('monai')}, numpy {m.get('numpy')}",
        f"- load average when the benchmark started: {m.get('load_average')} (the machine is shared)",
    ]


# ------------------------------------------------------------------------------------------------------------
# Subcommands run as children
# ------------------------------------------------------------------------------------------------------------


def write_reports(result: dict[str, Any], md: str, json_path: Path | None, md_path: Path | None) -> None:
    """Print the Markdown table and write the JSON and Markdown reports where asked."""
    print()
    print(md)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if md_path:
        md_path.parent.mkdir(parents=True, exist_ok=True)
        md_path.write_text(md)


def _cmd_phantom(argv: list[str]) -> int:
    import argparse

    import nibabel as nib
    import numpy as np

    from volseg.data.synth import liver_ct_phantom

    ap = argparse.ArgumentParser(prog="_bench_common.py phantom")
    ap.add_argument("--out", required=True)
    ap.add_argument("--label-out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shape", type=int, nargs=3, required=True)
    ap.add_argument("--spacing", type=float, nargs=3, required=True)
    ap.add_argument("--axcodes", default="LPS")
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    ph = liver_ct_phantom(a.seed, size="full", shape=tuple(a.shape), spacing=tuple(a.spacing), axcodes=a.axcodes)
    for data, path in ((ph.image, a.out), (ph.label, a.label_out)):
        img = nib.Nifti1Image(np.asarray(data), ph.affine)
        img.header.set_data_dtype(data.dtype)
        img.set_sform(ph.affine, code=1)
        img.set_qform(ph.affine, code=1)
        img.header.set_xyzt_units(xyz="mm")
        tmp = Path(path).with_name(".tmp." + Path(path).name)
        nib.save(img, str(tmp))
        os.replace(tmp, path)
    counts = np.bincount(ph.label.ravel(), minlength=3).tolist()
    print(json.dumps({"phantom": a.out, "shape": list(ph.image.shape), "spacing": ph.info.get("spacing"),
                      "axcodes": a.axcodes, "seed": a.seed, "label_voxels": counts,
                      "seconds": round(time.perf_counter() - t0, 1)}))  # fmt: skip
    return 0


def _cmd_module(argv: list[str]) -> int:
    import runpy

    stats = None
    if argv and argv[0] == "--stats":
        stats, argv = argv[1], argv[2:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        sys.exit("usage: _bench_common.py module [--stats FILE] -- MODULE [ARGS...]")
    sys.argv = [argv[0], *argv[1:]]
    code: int = 0
    try:
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    if stats:
        out: dict[str, Any] = {"peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        Path(stats).write_text(json.dumps(out) + "\n")
    return code


if __name__ == "__main__":
    if str(REPO) not in sys.path:  # volseg from this checkout, as `python -m volseg` run in the repository sees it
        sys.path.insert(0, str(REPO))
    cmds = {"phantom": _cmd_phantom, "module": _cmd_module}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(cmds)}}} ...")
    sys.exit(cmds[sys.argv[1]](sys.argv[2:]))
