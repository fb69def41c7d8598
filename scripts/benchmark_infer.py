#!/usr/bin/env python3
r"""Inference speed, memory and agreement: ``volseg infer`` against MONAI's tutorial pipeline, side by side.

Both pipelines segment the same synthetic CT with the same trained bundle (same network, same weights), each as a
child process timed end to end (interpreter start, imports, model loading, reading, preprocessing, sliding
window, back to the input grid, writing the NIfTI). They run alternately (baseline first in even repeats, volseg
first in odd ones), so that drifting load on a shared machine hits both alike, and every speed figure is quoted
as a ratio of the two runs of one pair.

The baseline is ``/work/shared/bench/monai_baseline_infer.py`` (the spleen tutorial's pipeline, unoptimised on
purpose). It gets the bundle's target spacing and CT window (from the bundle's volseg recipe) and, unless told
otherwise, the bundle's sliding-window size, batch and overlap, so that both do the same work; what still
differs (blending, foreground crop, postprocessing) is listed in the report.

The volumes are ``volseg.data.synth.liver_ct_phantom`` CTs, 512 x 512 x N, int16, LPS, 0.78 mm in-plane;
``--sizes 200,1200`` gives N = 200 at 2.5 mm and N = 1200 at 0.625 mm (a thin-slice 750 mm scan);
``--sizes 1200@2.5`` picks the slice spacing explicitly. They are generated once and cached in ``--work``.

Usage:
    python scripts/benchmark_infer.py --bundle runs/demo_liver_ct [--sizes 200,1200] [--repeats 3 | 3,1] \
        [--device cpu] [--skip-baseline 1200] [--timeout 1800] [--max-rss-gb 18] \
        [--json infer.json] [--md infer.md]

Reported per volume and pipeline: wall time (median, min–max), peak RSS (the child's own, via wait4), peak GPU
memory (CUDA only), the baseline/volseg wall-time and memory ratios pair by pair, the agreement Dice between the
two label maps per label (after checking that both are on the input's grid), and each one's Dice against the
phantom's ground truth.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    REPO,
    code_fingerprint,
    fmt,
    fmt_spread,
    last_json_line,
    log_tail,
    machine_info,
    machine_lines,
    run_child,
    spread,
    write_reports,
)

BASELINE = Path("/work/shared/bench/monai_baseline_infer.py")
INPLANE_MM = 0.78


def parse_sizes(text: str) -> list[tuple[int, float]]:
    """``200,1200`` or ``200@2.5,1200@0.625`` -> [(slices, slice spacing mm)]."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        n, _, sp = item.partition("@")
        slices = int(n)
        out.append((slices, float(sp) if sp else (2.5 if slices <= 400 else 0.625)))
    if not out:
        raise SystemExit("--sizes: give at least one slice count")
    return out


def size_key(slices: int, z: float) -> str:
    return f"512x512x{slices}@{z:g}mm"


def bundle_settings(bundle: Path) -> dict[str, Any]:
    """Spacing, CT window and sliding-window settings the bundle's own pipeline uses."""
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    out: dict[str, Any] = {}
    for t in cfg["preprocessing"]["transforms"]:
        if t.get("_target_") == "Spacingd":
            out["spacing"] = [float(x) for x in t["pixdim"]]
        if t.get("_target_") == "ScaleIntensityRanged":
            out["a_min"], out["a_max"] = float(t["a_min"]), float(t["a_max"])
        if t.get("_target_") == "Orientationd":
            out["orientation"] = t.get("axcodes")
        if t.get("_target_") == "CropForegroundd":
            out["crop_foreground"] = True
    inf = cfg["inferer"]
    out["roi"] = [int(x) for x in inf["roi_size"]]
    out["sw_batch_size"] = int(inf.get("sw_batch_size", 1))
    out["overlap"] = float(inf.get("overlap", 0.25))
    out["blend"] = inf.get("mode", "constant")
    out["postprocessing"] = [t.get("_target_") for t in cfg["postprocessing"]["transforms"]]
    recipe = bundle / "configs" / "volseg_recipe.yaml"
    if recipe.is_file():
        import yaml

        r = yaml.safe_load(recipe.read_text())
        data = r.get("data", {})
        if "spacing" in data:
            out["spacing"] = [float(x) for x in data["spacing"]]
        inten = data.get("intensity") or {}
        if "a_min" in inten:
            out["a_min"], out["a_max"] = float(inten["a_min"]), float(inten["a_max"])
        out["labels"] = {k: (v["value"] if isinstance(v, dict) else int(v)) for k, v in data.get("labels", {}).items()}
    out.setdefault("labels", {"background": 0, "liver": 1, "tumour": 2})
    missing = [k for k in ("spacing", "a_min", "a_max") if k not in out]
    if missing:
        raise SystemExit(f"{bundle}: cannot tell the bundle's {', '.join(missing)}")
    return out


def ensure_phantom(work: Path, slices: int, z: float, seed: int, python: str, log_dir: Path) -> dict[str, Any]:
    name = f"ct_512x512x{slices}_z{z:g}_seed{seed}"
    image, label, meta = work / f"{name}.nii.gz", work / f"{name}_gt.nii.gz", work / f"{name}.json"
    if image.is_file() and label.is_file() and meta.is_file():
        return json.loads(meta.read_text())
    print(f"generating {image} ...", flush=True)
    cmd = [
        python,
        str(REPO / "scripts" / "_bench_common.py"),
        "phantom",
        "--out",
        image,
        "--label-out",
        label,
        "--seed",
        seed,
        "--shape",
        512,
        512,
        slices,
        "--spacing",
        INPLANE_MM,
        INPLANE_MM,
        z,
        "--axcodes",
        "LPS",
    ]
    r = run_child(cmd, log=log_dir / f"phantom_{slices}.log")
    info = last_json_line(Path(r["log"]), "phantom")
    if r["rc"] != 0 or info is None:
        raise SystemExit(f"phantom generation failed ({r['killed'] or r['rc']}):\n{log_tail(Path(r['log']), 20)}")
    info.update(image=str(image), label=str(label), generate_s=r["wall_s"], generate_peak_rss_mb=r["peak_rss_mb"])
    meta.write_text(json.dumps(info, indent=2) + "\n")
    return info


def run_baseline(a: argparse.Namespace, s: dict[str, Any], image: str, out: Path, log: Path) -> dict[str, Any]:
    cmd = [a.python, str(a.baseline), "--bundle", a.bundle, "--image", image, "--out", out,
           "--spacing", *s["spacing"], "--a-min", s["a_min"], "--a-max", s["a_max"],
           "--roi", *a.baseline_roi, "--sw-batch-size", a.baseline_sw_batch_size,
           "--overlap", a.baseline_overlap, "--device", a.device]  # fmt: skip
    r = run_child(cmd, log=log, timeout=a.timeout, max_rss_gb=a.max_rss_gb)
    res = last_json_line(log, "pipeline")
    r["pipeline"] = "baseline"
    if res:
        r["stages"] = {k: res[k] for k in ("load_model_s", "preprocess_s", "sliding_window_s", "postprocess_write_s",
                                            "total_s") if k in res}  # fmt: skip
        r["self_reported_peak_rss_mb"] = res.get("peak_rss_mb")
        r["peak_gpu_mb"] = res.get("peak_gpu_mb")
        r["output"] = res.get("output")
    return r


def run_volseg(a: argparse.Namespace, image: str, out: Path, log: Path) -> dict[str, Any]:
    args = ["volseg", "infer", image, "-o", str(out), "--bundle", str(a.bundle), "--device", a.device, *a.volseg_arg]
    stats = log.with_suffix(".stats.json")
    if a.device.startswith("cuda"):
        # The same `python -m volseg` run, in a wrapper that reads torch's peak GPU memory at the end.
        cmd = [a.python, str(REPO / "scripts" / "_bench_common.py"), "module", "--stats", str(stats), "--", *args]
    else:
        cmd = [a.python, "-m", *args]
    r = run_child(cmd, log=log, timeout=a.timeout, max_rss_gb=a.max_rss_gb)
    r["pipeline"] = "volseg"
    if stats.is_file():
        r["peak_gpu_mb"] = json.loads(stats.read_text()).get("peak_gpu_mb")
    outs = sorted(out.glob("*.nii.gz"))
    r["output"] = str(outs[0]) if outs else None
    for line in Path(log).read_text(errors="replace").splitlines():
        if "->" in line and line.rstrip().endswith("]") and " s  voxels per label" in line:
            try:
                r["self_reported_predict_s"] = float(line.split(" s  voxels per label")[0].split()[-1])
            except ValueError:
                pass
    return r


def compare_outputs(a_path: str, b_path: str, image: str, gt: str, labels: dict[str, int]) -> dict[str, Any]:
    """Grid checks and per-label Dice: A against B, and each against the ground truth."""
    import nibabel as nib
    import numpy as np

    ref: Any = nib.load(image)
    imgs: dict[str, Any] = {"baseline": nib.load(a_path), "volseg": nib.load(b_path)}
    out: dict[str, Any] = {"grid": {}}
    for name, img in imgs.items():
        same_shape = tuple(img.shape[:3]) == tuple(ref.shape[:3]) and all(d == 1 for d in img.shape[3:])
        same_affine = bool(np.allclose(img.affine, ref.affine, atol=1e-3))
        out["grid"][name] = {"shape": list(img.shape), "same_shape_as_input": same_shape,
                             "same_affine_as_input": same_affine}  # fmt: skip
    if not all(g["same_shape_as_input"] and g["same_affine_as_input"] for g in out["grid"].values()):
        out["dice"] = None
        out["note"] = "not on the same grid: no Dice computed"
        return out
    arrays = {k: np.asarray(v.dataobj).reshape(ref.shape[:3]) for k, v in imgs.items()}
    gt_img: Any = nib.load(gt)
    truth = np.asarray(gt_img.dataobj)

    def dice(x: Any, y: Any, value: int) -> float | None:
        mx, my = x == value, y == value
        den = int(mx.sum()) + int(my.sum())
        return None if den == 0 else round(2.0 * int(np.logical_and(mx, my).sum()) / den, 4)

    out["dice"] = {}
    for name, value in labels.items():
        if value == 0:
            continue
        out["dice"][name] = {
            "baseline_vs_volseg": dice(arrays["baseline"], arrays["volseg"], value),
            "baseline_vs_truth": dice(arrays["baseline"], truth, value),
            "volseg_vs_truth": dice(arrays["volseg"], truth, value),
            "voxels": {"baseline": int((arrays["baseline"] == value).sum()),
                       "volseg": int((arrays["volseg"] == value).sum()), "truth": int((truth == value).sum())},
        }  # fmt: skip
    out["identical_voxels_fraction"] = round(float((arrays["baseline"] == arrays["volseg"]).mean()), 6)
    return out


def summarise(runs: list[dict[str, Any]], repeats: int) -> dict[str, Any]:
    ok = {p: [r for r in runs if r["pipeline"] == p and r["rc"] == 0] for p in ("baseline", "volseg")}
    summ: dict[str, Any] = {}
    for p, rs in ok.items():
        all_p = [r for r in runs if r["pipeline"] == p]
        summ[p] = {
            "runs": len(all_p),
            "ok": len(rs),
            "wall_s": spread([r["wall_s"] for r in rs]),
            "peak_rss_mb": spread([r["peak_rss_mb"] for r in rs]),
            "peak_gpu_mb": spread([r.get("peak_gpu_mb") for r in rs]),
            "failures": [
                {
                    "repeat": r["repeat"],
                    "rc": r["rc"],
                    "killed": r["killed"],
                    "wall_s": r["wall_s"],
                    "peak_rss_mb": max(r["peak_rss_mb"], r["peak_rss_tree_mb"]),
                    "log": r["log"],
                }
                for r in all_p
                if r["rc"] != 0
            ],  # fmt: skip
        }
        if p == "baseline":
            summ[p]["stages"] = {k: spread([r["stages"].get(k) for r in rs if r.get("stages")])
                                 for k in ("load_model_s", "preprocess_s", "sliding_window_s", "postprocess_write_s",
                                           "total_s")}  # fmt: skip
    pairs = []
    for i in range(repeats):
        b = next((r for r in ok["baseline"] if r["repeat"] == i), None)
        v = next((r for r in ok["volseg"] if r["repeat"] == i), None)
        if b and v:
            pairs.append({"repeat": i, "first": b["order"] == 0 and "baseline" or "volseg",
                          "wall_ratio": round(b["wall_s"] / v["wall_s"], 3),
                          "rss_ratio": round(b["peak_rss_mb"] / v["peak_rss_mb"], 3)})  # fmt: skip
    summ["pairs"] = pairs
    summ["wall_ratio"] = spread([p["wall_ratio"] for p in pairs])
    summ["rss_ratio"] = spread([p["rss_ratio"] for p in pairs])
    return summ


def code_lines(result: dict[str, Any]) -> list[str]:
    # Only volseg's runs depend on volseg's sources.
    prints = sorted(
        {r["volseg_code"] for v in result["volumes"].values() for r in v["runs"] if r["pipeline"] == "volseg"}
    )
    extra = result["args"].get("volseg_arg") or []
    cmd = "python -m volseg infer IMAGE -o OUT --bundle B --device D" + "".join(" " + x for x in extra)
    lines = [f"- volseg command: `{cmd}`"]
    if len(prints) > 1:
        lines.append(f"- WARNING: volseg's sources changed during the benchmark (fingerprints {', '.join(prints)})")
    elif prints:
        lines.append(f"- volseg sources fingerprint {prints[0]} (unchanged through the benchmark)")
    return lines


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    s = result["bundle_settings"]
    lines = ["## Inference: `volseg infer` against the MONAI tutorial pipeline", ""]
    lines += machine_lines(result["machine"])
    lines += [
        f"- bundle `{a['bundle']}`: target spacing {s['spacing']} mm, CT window [{s['a_min']:g}, {s['a_max']:g}], "
        f"window {s['roi']}, sw batch {s['sw_batch_size']}, overlap {s['overlap']:g}, {s['blend']} blending "
        f"(baseline: window {a['baseline_roi']}, sw batch {a['baseline_sw_batch_size']}, "
        f"overlap {a['baseline_overlap']:g}, constant blending)",
        f"- device {a['device']}; {a['repeats']} alternating repeat(s) per volume (in --sizes order); times are "
        "end to end (child process start to output written)",
        *code_lines(result),
        "",
        "| volume | pipeline | runs ok | wall s, median (min–max) | peak RSS GB | peak GPU GB |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, v in result["volumes"].items():
        for p in ("baseline", "volseg"):
            sm = v["summary"][p]
            if sm["runs"] == 0:
                lines.append(f"| {key} | {p} | skipped | – | – | – |")
                continue
            rss = sm["peak_rss_mb"]["max"]
            gpu = sm["peak_gpu_mb"]["max"]
            cell_rss = fmt(rss / 1024 if rss else None, 2)
            if sm["failures"]:
                f = sm["failures"][0]
                why = f["killed"] or f"exit {f['rc']}"
                cell_rss += f"; failed run: {why}, at {f['peak_rss_mb'] / 1024:.1f} GB after {f['wall_s']:.0f} s"
            lines.append(
                f"| {key} | {p} | {sm['ok']}/{sm['runs']} | {fmt_spread(sm['wall_s'])} | {cell_rss} | "
                f"{fmt(gpu / 1024 if gpu else None, 2)} |"
            )
    lines += ["", "Ratios, baseline / volseg, per alternating pair (> 1: volseg faster or smaller):", "",
              "| volume | wall-time ratio per pair | median | peak-RSS ratio per pair | median |",
              "| --- | --- | --- | --- | --- |"]  # fmt: skip
    for key, v in result["volumes"].items():
        sm = v["summary"]
        if not sm["pairs"]:
            lines.append(f"| {key} | no complete pair | – | – | – |")
            continue
        w = ", ".join(f"{p['wall_ratio']:.2f}" for p in sm["pairs"])
        r = ", ".join(f"{p['rss_ratio']:.2f}" for p in sm["pairs"])
        lines.append(f"| {key} | {w} | {fmt(sm['wall_ratio']['median'])} | {r} | {fmt(sm['rss_ratio']['median'])} |")
    lines += ["", "Baseline stage times (its own report, medians, s; imports excluded):", "",
              "| volume | load model | preprocess | sliding window | invert + write | total |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for key, v in result["volumes"].items():
        st = v["summary"]["baseline"].get("stages") or {}
        cells = [
            fmt((st.get(k) or {}).get("median"), 1)
            for k in ("load_model_s", "preprocess_s", "sliding_window_s", "postprocess_write_s", "total_s")
        ]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += ["", "volseg's own per-case time (its log line: reading to labels; start-up, model loading and writing "
              "not included):", ""]  # fmt: skip
    for key, v in result["volumes"].items():
        own = spread(
            [r.get("self_reported_predict_s") for r in v["runs"] if r["pipeline"] == "volseg" and r["rc"] == 0]
        )
        lines.append(f"- {key}: {fmt_spread(own)} s")
    lines += ["", "Agreement (Dice between the two label maps, both checked to be on the input's grid) and each "
              "against the phantom's ground truth:", "",
              "| volume | label | baseline vs volseg | baseline vs truth | volseg vs truth | "
              "million voxels: baseline / volseg / truth |",
              "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for key, v in result["volumes"].items():
        cmp_ = v.get("agreement")
        if not cmp_ or not cmp_.get("dice"):
            note = (cmp_ or {}).get("note", "no pair of outputs to compare")
            lines.append(f"| {key} | – | {note} | – | – | – |")
            continue
        for label, d in cmp_["dice"].items():
            vox = d["voxels"]
            pair = fmt(d["baseline_vs_volseg"], 3) if d["baseline_vs_volseg"] is not None else "both empty"
            counts = f"{vox['baseline'] / 1e6:.2f} / {vox['volseg'] / 1e6:.2f} / {vox['truth'] / 1e6:.2f}"
            lines.append(f"| {key} | {label} | {pair} | {fmt(d['baseline_vs_truth'], 3)} "
                         f"| {fmt(d['volseg_vs_truth'], 3)} | {counts} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))  # fmt: skip
    ap.add_argument("--bundle", required=True, type=Path, help="a trained volseg bundle (run folder)")
    ap.add_argument("--sizes", default="200,1200", help="slice counts, optionally N@SLICE_MM (default 200,1200)")
    ap.add_argument(
        "--repeats",
        default="3",
        help="alternating runs of each pipeline per volume; one per size, e.g. 3,1 (default 3)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument(
        "--skip-baseline",
        nargs="?",
        const="all",
        default="",
        help="slice counts whose baseline is not run (e.g. 1200), or no value for all",
    )
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is killed")
    ap.add_argument(
        "--max-rss-gb",
        type=float,
        default=None,
        help="kill a run whose resident memory passes this (default: 80%% of MemAvailable at start)",
    )
    ap.add_argument("--seed", type=int, default=0, help="phantom seed")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/infer"), help="volumes, outputs, logs")
    ap.add_argument("--baseline", type=Path, default=BASELINE, help="the baseline script")
    ap.add_argument("--baseline-roi", type=int, nargs=3, help="baseline window (default: the bundle's)")
    ap.add_argument("--baseline-overlap", type=float, help="baseline overlap (default: the bundle's)")
    ap.add_argument("--baseline-sw-batch-size", type=int, help="baseline window batch (default: the bundle's)")
    ap.add_argument(
        "--volseg-arg",
        action="append",
        default=[],
        help="extra argument for `volseg infer` (repeatable), e.g. --volseg-arg=--engine=monai",
    )
    ap.add_argument("--python", default=sys.executable, help="interpreter for the children")
    ap.add_argument("--json", type=Path, help="write the full result here")
    ap.add_argument("--md", type=Path, help="write the Markdown tables here")
    a = ap.parse_args()

    a.bundle = a.bundle.resolve()
    if not (a.bundle / "models" / "model.pt").is_file():
        raise SystemExit(f"{a.bundle}: no models/model.pt (train a bundle first)")
    s = bundle_settings(a.bundle)
    a.baseline_roi = a.baseline_roi or s["roi"]
    a.baseline_overlap = s["overlap"] if a.baseline_overlap is None else a.baseline_overlap
    a.baseline_sw_batch_size = a.baseline_sw_batch_size or s["sw_batch_size"]
    if a.max_rss_gb is None:
        avail = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                     if ln.startswith("MemAvailable:"))  # fmt: skip
        a.max_rss_gb = round(0.8 * avail / 2**20, 1)
    sizes = parse_sizes(a.sizes)
    reps = [int(x) for x in str(a.repeats).split(",") if x.strip()]
    if len(reps) not in (1, len(sizes)) or min(reps) < 1:
        raise SystemExit("--repeats: one positive count, or one per size")
    reps = reps * len(sizes) if len(reps) == 1 else reps
    skip = {"all"} if a.skip_baseline == "all" else {x.strip() for x in a.skip_baseline.split(",") if x.strip()}
    a.work.mkdir(parents=True, exist_ok=True)
    logs = a.work / "logs"

    result: dict[str, Any] = {
        "benchmark": "inference",
        "machine": machine_info(a.python),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "bundle_settings": s,
        "volumes": {},
    }
    for (slices, z), repeats in zip(sizes, reps, strict=True):
        key = size_key(slices, z)
        vol = ensure_phantom(a.work, slices, z, a.seed, a.python, logs)
        skip_b = "all" in skip or str(slices) in skip
        runs: list[dict[str, Any]] = []
        for i in range(repeats):
            order = ["baseline", "volseg"] if i % 2 == 0 else ["volseg", "baseline"]
            for j, p in enumerate(order):
                if p == "baseline" and skip_b:
                    continue
                out = a.work / "out" / key / f"{p}_{i}"
                if out.exists():
                    for f in out.iterdir():
                        f.unlink()
                log = logs / f"{key}_{p}_{i}.log"
                print(f"[{key}] repeat {i + 1}/{repeats}: {p} ...", flush=True)
                fp0 = code_fingerprint()
                r = (
                    run_baseline(a, s, vol["image"], out, log)
                    if p == "baseline"
                    else run_volseg(a, vol["image"], out, log)
                )
                fp1 = code_fingerprint()
                r.update(repeat=i, order=j, volseg_code=fp0 if fp0 == fp1 else f"{fp0}->{fp1}")
                runs.append(r)
                state = "ok" if r["rc"] == 0 else f"FAILED ({r['killed'] or 'exit ' + str(r['rc'])})"
                print(f"    {state}: {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mb'] / 1024:.2f} GB", flush=True)
                if r["rc"] != 0:
                    print("    " + log_tail(Path(r["log"]), 4).replace("\n", "\n    "), flush=True)
        entry: dict[str, Any] = {"volume": vol, "baseline_skipped": skip_b, "runs": runs,
                                 "repeats": repeats, "summary": summarise(runs, repeats)}  # fmt: skip
        b_out = next((r["output"] for r in runs if r["pipeline"] == "baseline" and r["rc"] == 0 and r.get("output")),
                     None)  # fmt: skip
        v_out = next((r["output"] for r in runs if r["pipeline"] == "volseg" and r["rc"] == 0 and r.get("output")),
                     None)  # fmt: skip
        if b_out and v_out and os.path.exists(b_out) and os.path.exists(v_out):
            entry["agreement"] = compare_outputs(b_out, v_out, vol["image"], vol["label"], s["labels"])
        result["volumes"][key] = entry
        if a.json:  # keep what is done, in case a later volume is interrupted
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=2) + "\n")
    write_reports(result, markdown(result), a.json, a.md)


if __name__ == "__main__":
    main()
