#!/usr/bin/env python3
r"""Training throughput and time to a Dice target: volseg against MONAI's tutorial training loop, side by side.

Both train the same network (the recipe's, freshly initialised) on the same phantom set with the same patch size,
the same number of volumes per iteration and 4 patches per volume, the same number of DataLoader workers, the same
target spacing and CT window, and they validate on the same held-out cases: the baseline
(``/work/shared/bench/monai_baseline_train.py``, the spleen tutorial's loop) holds out the last cases of its
sorted list, so it is given a copy of the data set (symbolic links) whose names sort volseg's validation cases
last. Everything else is each pipeline's own choice (volseg: the recipe's loss, optimiser, schedule, sampling,
augmentation and epoch length; the baseline: DiceLoss, Adam 1e-4, pos/neg 1:1, no augmentation). Each run stops
at ``--max-seconds`` (counted from before the data are cached, as the baseline counts) or when the target label's
validation Dice first reaches ``--target-dice``. The pipelines run alternately, one at a time, as child processes.

volseg runs in-process in a child (``volseg.train.train``, exactly what ``volseg train`` calls) with a few
Ignite handlers added to its trainer and evaluator: they time each training step the way the baseline does (from
the batch in hand to the optimiser step done, so data loading waits are excluded), record each validation, and
stop the run at the time limit or the target.

Usage:
    python scripts/benchmark_train.py --config configs/demo_liver_ct.yaml --data runs/bench/data \
        [--batch-size 2] [--patch 64 64 32] [--max-seconds 300] [--target-dice 0.9] [--target-label liver] \
        [--repeats 1] [--device cpu] [--set train.x=y ...] [--json train.json] [--md train.md]

Reported per pipeline: iterations per second over training steps only (the baseline's definition) and over the
whole run after caching (validation and data waits included), the time to the target (null if not reached), the
best and last validation Dice per label, peak RSS; and the volseg/baseline ratios pair by pair.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import (  # noqa: E402
    REPO,
    code_fingerprint,
    fmt,
    last_json_line,
    log_tail,
    machine_info,
    machine_lines,
    run_child,
    spread,
    write_reports,
)

BASELINE = Path("/work/shared/bench/monai_baseline_train.py")
SAMPLES_PER_VOLUME = 4  # fixed in the baseline (RandCropByPosNegLabeld num_samples=4)


# ------------------------------------------------------------------------------------------------------------
# The volseg child
# ------------------------------------------------------------------------------------------------------------


def volseg_child(spec_file: str) -> int:
    """Train with volseg in this process and write what was measured to spec['result']."""
    import resource

    sys.path.insert(0, str(REPO))
    spec = json.loads(Path(spec_file).read_text())
    from ignite.engine import Events
    from monai.engines import SupervisedEvaluator, SupervisedTrainer

    from volseg.recipe import load_recipe
    from volseg.train import train

    recipe = load_recipe(spec["config"], spec["overrides"])
    names = recipe.data.label_names
    target_idx = names.index(spec["target_label"]) - 1  # the metrics leave the background out
    max_s, target = float(spec["max_seconds"]), spec["target_dice"]
    m: dict[str, Any] = {"iterations": 0, "step_s": 0.0, "validations": [], "reached_at_s": None, "stopped_by": None,
                         "cache_s": None, "run_end_s": None}  # fmt: skip
    engines: dict[str, Any] = {}
    t_start = time.perf_counter()

    def elapsed() -> float:
        return time.perf_counter() - t_start

    trainer_init = SupervisedTrainer.__init__
    evaluator_init = SupervisedEvaluator.__init__

    def patched_trainer_init(self: Any, *args: Any, **kwargs: Any) -> None:
        trainer_init(self, *args, **kwargs)
        engines["trainer"] = self
        tick: list[float] = [0.0]

        @self.on(Events.STARTED)
        def _started(engine: Any) -> None:
            if m["cache_s"] is None:
                m["cache_s"] = round(elapsed(), 2)

        @self.on(Events.ITERATION_STARTED)
        def _it_start(engine: Any) -> None:
            tick[0] = time.perf_counter()

        @self.on(Events.ITERATION_COMPLETED)
        def _it_done(engine: Any) -> None:
            if str(spec["device"]).startswith("cuda"):
                import torch

                torch.cuda.synchronize()
            m["step_s"] += time.perf_counter() - tick[0]
            m["iterations"] += 1
            if elapsed() >= max_s and m["stopped_by"] is None:
                m["stopped_by"] = "max_seconds"
                engine.terminate()

        @self.on(Events.COMPLETED | Events.TERMINATE)
        def _end(engine: Any) -> None:
            m["run_end_s"] = round(elapsed(), 2)
            m["epochs"] = engine.state.epoch

    def patched_evaluator_init(self: Any, *args: Any, **kwargs: Any) -> None:
        evaluator_init(self, *args, **kwargs)

        @self.on(Events.COMPLETED)
        def _validated(engine: Any) -> None:
            v = engine.state.metrics.get("val_dice")
            vals = [float(x) for x in (v.flatten().tolist() if hasattr(v, "flatten") else [v])] if v is not None else []
            t = round(elapsed(), 1)
            tr = engines.get("trainer")
            m["validations"].append({"epoch": tr.state.epoch if tr else None,
                                     "iteration": tr.state.iteration if tr else None,
                                     "seconds": t, "dice": [round(x, 4) for x in vals]})  # fmt: skip
            if (target is not None and m["reached_at_s"] is None and len(vals) > target_idx
                    and vals[target_idx] >= target):  # fmt: skip
                m["reached_at_s"] = t
                m["stopped_by"] = "target"
                if tr is not None:
                    tr.terminate()

    SupervisedTrainer.__init__ = patched_trainer_init  # type: ignore[method-assign]
    SupervisedEvaluator.__init__ = patched_evaluator_init  # type: ignore[method-assign]

    def echo(line: str) -> None:
        print(f"[{elapsed():7.1f} s] {line}", flush=True)

    error = None
    try:
        train(recipe, spec["data"], spec["out"], device=spec["device"], progress=False, echo=echo,
              overrides=spec["overrides"])  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - reported in the result, the parent decides
        error = f"{exc.__class__.__name__}: {exc}"
        import traceback

        traceback.print_exc()
    if m["run_end_s"] is None:
        m["run_end_s"] = round(elapsed(), 2)
    if m["stopped_by"] is None:
        m["stopped_by"] = "max_epochs" if error is None else "error"
    step = m["step_s"]
    result = {
        "pipeline": "volseg-train",
        "iterations": m["iterations"],
        "train_step_s": round(step, 1),
        "iterations_per_s": round(m["iterations"] / step, 3) if step else None,
        "cache_s": m["cache_s"],
        "seconds": m["run_end_s"],
        "epochs": m.get("epochs"),
        "validations": m["validations"],
        "target": {"label": spec["target_label"], "dice": target, "reached_at_s": m["reached_at_s"]},
        "stopped_by": m["stopped_by"],
        "error": error,
        "labels": names[1:],
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "total_with_bundle_export_s": round(elapsed(), 1),
    }
    Path(spec["result"]).write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return 0 if error is None else 1


# ------------------------------------------------------------------------------------------------------------
# The parent
# ------------------------------------------------------------------------------------------------------------


def baseline_data(work: Path, val_cases: list[dict[str, str]], train_cases: list[dict[str, str]]) -> Path:
    """An MSD folder of links whose sorted order puts volseg's validation cases last (the baseline holds those out)."""
    root = work / "baseline_data"
    if root.exists():
        shutil.rmtree(root)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    entries = []
    for prefix, cases in (("a_", train_cases), ("z_", val_cases)):
        for c in cases:
            e = {}
            for key, sub in (("image", "imagesTr"), ("label", "labelsTr")):
                src = Path(c[key]).resolve()
                link = root / sub / (prefix + src.name)
                link.symlink_to(src)
                e[key] = f"./{sub}/{link.name}"
            entries.append(e)
    (root / "dataset.json").write_text(json.dumps({"name": "benchmark", "training": entries}, indent=2) + "\n")
    return root


def smallest_baseline_case(cases: list[dict[str, str]], spacing: list[float], a_min: float, a_max: float) -> list[int]:
    """Smallest training volume after the baseline's deterministic chain (it crops patches without padding)."""
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureChannelFirstd,
        LoadImaged,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    keys = ["image", "label"]
    chain = Compose([
        LoadImaged(keys=keys), EnsureChannelFirstd(keys=keys),
        ScaleIntensityRanged(keys=["image"], a_min=a_min, a_max=a_max, b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=spacing, mode=("bilinear", "nearest")),
    ])  # fmt: skip
    shapes = [list(chain(dict(c))["label"].shape[1:]) for c in cases]
    return [min(s[d] for s in shapes) for d in range(len(shapes[0]))]


def per_run_summary(r: dict[str, Any], labels: list[str], target_label: str) -> dict[str, Any]:
    res = r.get("result") or {}
    vals = res.get("validations") or []
    idx = labels.index(target_label) if target_label in labels else 0
    series = [v["dice"][idx] for v in vals if len(v.get("dice", [])) > idx]
    after_cache = (res.get("seconds") or 0) - (res.get("cache_s") or 0)
    return {
        "ok": r["rc"] == 0 and bool(res),
        "iterations": res.get("iterations"),
        "iterations_per_s": res.get("iterations_per_s"),
        "iterations_per_s_overall": round(res["iterations"] / after_cache, 3)
        if res.get("iterations") and after_cache > 0
        else None,
        "cache_s": res.get("cache_s"),
        "seconds": res.get("seconds"),
        "epochs": res.get("epochs"),
        "validations": len(vals),
        "reached_at_s": (res.get("target") or {}).get("reached_at_s"),
        "best_target_dice": max(series) if series else None,
        "last_dice": dict(zip(labels, vals[-1]["dice"], strict=False)) if vals else {},
        "peak_rss_mb": r["peak_rss_mb"],
        "peak_rss_tree_mb": r["peak_rss_tree_mb"],
        "wall_s": r["wall_s"],
        "killed": r["killed"],
        "rc": r["rc"],
    }


def code_lines(result: dict[str, Any]) -> list[str]:
    prints = sorted({r["volseg_code"] for r in result["runs"] if r["pipeline"] == "volseg"})
    if len(prints) > 1:
        return [f"- WARNING: volseg's sources changed during the benchmark (fingerprints {', '.join(prints)})"]
    return [f"- volseg sources fingerprint {prints[0]} (unchanged through the benchmark)"] if prints else []


def markdown(result: dict[str, Any]) -> str:
    a, s = result["args"], result["settings"]
    lines = ["## Training: volseg against the MONAI tutorial loop", ""]
    lines += machine_lines(result["machine"])
    lines += [
        f"- recipe `{a['config']}` ({s['network']}), data `{a['data']}`: {s['n_train']} training and {s['n_val']} "
        f"validation cases (the same held-out cases for both)",
        f"- both: patch {s['patch']}, {s['batch_size']} volumes x {SAMPLES_PER_VOLUME} patches per iteration, "
        f"{s['num_workers']} DataLoader worker(s), spacing {s['spacing']} mm, CT window [{s['a_min']:g}, "
        f"{s['a_max']:g}], device {a['device']}",
        *([f"- {s['patch_note']}"] if s.get("patch_note") else []),
        f"- volseg: {s['volseg_method']}",
        f"- baseline: {s['baseline_method']}",
        f"- stop: {a['max_seconds']:g} s (caching included) or {a['target_label']} Dice >= {a['target_dice']}; "
        f"{a['repeats']} alternating pair(s)",
        *code_lines(result),
        "",
        "| pipeline | run | it/s (steps only) | it/s (whole run after caching) | iterations | caching s | "
        f"validations | time to {a['target_label']} Dice {a['target_dice']} | best {a['target_label']} Dice | "
        "last validation Dice | peak RSS GB (main; tree) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["runs"]:
        sm = r["summary"]
        if not sm["ok"]:
            lines.append(f"| {r['pipeline']} | {r['repeat']} | failed: {sm['killed'] or 'exit ' + str(sm['rc'])} "
                         "| | | | | | | | |")  # fmt: skip
            continue
        reached = f"{sm['reached_at_s']:.0f} s" if sm["reached_at_s"] is not None else \
            f"not reached in {sm['seconds']:.0f} s"  # fmt: skip
        last = ", ".join(f"{k} {v:.3f}" for k, v in sm["last_dice"].items()) or "–"
        lines.append(
            f"| {r['pipeline']} | {r['repeat']} | {fmt(sm['iterations_per_s'], 3)} | "
            f"{fmt(sm['iterations_per_s_overall'], 3)} | {sm['iterations']} | {fmt(sm['cache_s'], 1)} | "
            f"{sm['validations']} | {reached} | {fmt(sm['best_target_dice'], 3)} | {last} | "
            f"{sm['peak_rss_mb'] / 1024:.2f}; {sm['peak_rss_tree_mb'] / 1024:.2f} |"
        )
    lines += ["", "Ratios per alternating pair (> 1: volseg faster):", "",
              "| pair | it/s volseg / baseline (steps) | it/s volseg / baseline (whole run) | "
              "time to target baseline / volseg |", "| --- | --- | --- | --- |"]  # fmt: skip
    for p in result["pairs"]:
        lines.append(f"| {p['repeat']} | {fmt(p['its_ratio'])} | {fmt(p['its_overall_ratio'])} | "
                     f"{p['time_to_target_ratio_text']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _precision_note(amp: bool, device: str) -> str:
    """How volseg's training steps run with this amp setting on this device."""
    from volseg.runtime import cpu_has_native_bf16

    if device.startswith("cuda"):
        return "CUDA AMP" if amp else "float32"
    if not amp:
        return "float32, channels-last"
    return "bf16 autocast, channels-last" if cpu_has_native_bf16() else "float32, channels-last (no native bf16)"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--volseg-child":
        sys.exit(volseg_child(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))  # fmt: skip
    ap.add_argument("--config", type=Path, default=REPO / "configs" / "demo_liver_ct.yaml", help="volseg recipe")
    ap.add_argument("--data", type=Path, default=Path("runs/bench/data"), help="MSD folder (volseg synth)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override (repeatable)")
    ap.add_argument("--patch", type=int, nargs="+", help="patch size for both (default: the recipe's)")
    ap.add_argument("--batch-size", type=int, help="volumes per iteration for both (default: the recipe's)")
    ap.add_argument("--num-workers", type=int, help="DataLoader workers for both (default: the recipe's)")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="time budget of each run (default 300)")
    ap.add_argument("--target-dice", type=float, default=0.9)
    ap.add_argument("--target-label", default="liver", help="label name in the recipe (default liver)")
    ap.add_argument("--baseline-val-interval", type=int, default=2, help="baseline validation interval, epochs")
    ap.add_argument("--repeats", type=int, default=1, help="alternating pairs (baseline first in even ones)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=None, help="kill a run after this (default max-seconds + 600)")
    ap.add_argument("--max-rss-gb", type=float, default=None, help="kill a run past this resident memory")
    ap.add_argument("--work", type=Path, default=Path("runs/bench/train"))
    ap.add_argument("--baseline", type=Path, default=BASELINE)
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from volseg.bundle import write_bundle_configs
    from volseg.data.datalist import load_datalist, split_cases
    from volseg.recipe import CTIntensity, load_recipe

    base = load_recipe(a.config, a.sets)
    patch = a.patch or list(base.train.patch_size)
    batch = a.batch_size or base.train.batch_size
    workers = base.train.num_workers if a.num_workers is None else a.num_workers
    overrides = [*a.sets, f"train.patch_size={json.dumps(list(patch))}", f"train.batch_size={batch}",
                 f"train.samples_per_volume={SAMPLES_PER_VOLUME}", f"train.num_workers={workers}"]  # fmt: skip
    recipe = load_recipe(a.config, overrides)
    window = recipe.data.intensity
    if not isinstance(window, CTIntensity):
        raise SystemExit("the baseline takes a CT window: use a CT recipe")
    names = recipe.data.label_names
    if a.target_label not in names[1:]:
        raise SystemExit(f"--target-label: '{a.target_label}' is not one of {names[1:]}")
    a.work.mkdir(parents=True, exist_ok=True)
    logs = a.work / "logs"

    cases = load_datalist(a.data, recipe.data.source)
    sp = recipe.data.split
    train_cases, val_cases = split_cases(cases, sp.val_fraction, sp.folds, sp.fold, sp.seed)
    # The baseline (like the tutorial) has no SpatialPadd before RandCropByPosNegLabeld, so a patch larger than
    # a cropped, resampled training volume stops it; fit the patch of both to the smallest volume if needed.
    smallest = smallest_baseline_case(train_cases, list(recipe.data.spacing), window.a_min,
                                      window.a_max)  # fmt: skip
    patch_note = ""
    if any(p > m for p, m in zip(patch, smallest, strict=True)):
        fitted = [p if p <= m else max(16, m // 16 * 16) for p, m in zip(patch, smallest, strict=True)]
        if a.patch:
            print(f"warning: patch {list(patch)} is larger than the smallest training volume {smallest} after the "
                  "baseline's preprocessing; the baseline will fail (it does not pad)", flush=True)  # fmt: skip
        else:
            patch_note = (
                f"patch reduced from the recipe's {list(patch)} to {fitted} for both: the smallest training "
                f"volume after the baseline's preprocessing is {smallest} and the baseline does not pad"
            )
            print(patch_note, flush=True)
            patch = fitted
            overrides = [*a.sets, f"train.patch_size={json.dumps(list(patch))}", f"train.batch_size={batch}",
                         f"train.samples_per_volume={SAMPLES_PER_VOLUME}", f"train.num_workers={workers}"]  # fmt: skip
            recipe = load_recipe(a.config, overrides)
    bdata = baseline_data(a.work, val_cases, train_cases)
    bbundle = a.work / "baseline_bundle"
    if bbundle.exists():
        shutil.rmtree(bbundle)
    write_bundle_configs(recipe, bbundle)  # configs/inference.json carries the recipe's network_def
    t = recipe.train
    settings = {
        "network": f"{recipe.model.name} {recipe.model.args}",
        "n_train": len(train_cases), "n_val": len(val_cases),
        "val_cases": [Path(c["image"]).name for c in val_cases],
        "patch": list(patch), "batch_size": batch, "num_workers": workers,
        "spacing": list(recipe.data.spacing), "a_min": window.a_min,
        "a_max": window.a_max,
        "volseg_method": f"{t.loss.name} loss, {t.optimizer.name} lr {t.optimizer.lr:g}, {t.scheduler.name} schedule "
                         f"over {t.max_epochs} epochs of {t.iterations_per_epoch or 'one pass'} iterations, "
                         f"{t.sampler} sampling (pos {t.pos_fraction:g}), validation every {t.val_interval} epoch(s), "
                         f"amp {t.amp} ({_precision_note(t.amp, a.device)})",
        "baseline_method": f"DiceLoss, Adam lr 1e-4, pos/neg 1:1, no augmentation, epochs of one pass over the "
                           f"{len(train_cases)} training volumes, validation every {a.baseline_val_interval} epochs",
        "volseg_overrides": overrides,
        "smallest_training_volume": smallest,
        "patch_note": patch_note,
    }  # fmt: skip
    timeout = a.timeout or a.max_seconds + 600
    result: dict[str, Any] = {"benchmark": "training", "machine": machine_info(a.python),
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                              "settings": settings, "runs": [], "pairs": []}  # fmt: skip

    for i in range(a.repeats):
        order = ["baseline", "volseg"] if i % 2 == 0 else ["volseg", "baseline"]
        for p in order:
            log = logs / f"{p}_{i}.log"
            out_json = a.work / f"{p}_{i}.json"
            out_json.unlink(missing_ok=True)
            print(f"repeat {i + 1}/{a.repeats}: {p} (up to {a.max_seconds:g} s) ...", flush=True)
            fp0 = code_fingerprint()
            if p == "baseline":
                cmd = [a.python, a.baseline, "--bundle", bbundle, "--data", bdata, "--spacing", *recipe.data.spacing,
                       "--a-min", window.a_min, "--a-max", window.a_max,
                       "--patch", *patch, "--batch-size", batch, "--num-workers", workers,
                       "--val-fraction", len(val_cases) / len(cases), "--val-interval", a.baseline_val_interval,
                       "--max-seconds", a.max_seconds, "--target-dice", a.target_dice,
                       "--target-label", names.index(a.target_label), "--seed", t.seed, "--device", a.device,
                       "--json", out_json]  # fmt: skip
            else:
                run_dir = a.work / f"volseg_run_{i}"
                if run_dir.exists():
                    shutil.rmtree(run_dir)
                spec = {"config": str(a.config), "overrides": overrides, "data": str(a.data), "out": str(run_dir),
                        "device": a.device, "max_seconds": a.max_seconds, "target_dice": a.target_dice,
                        "target_label": a.target_label, "result": str(out_json)}  # fmt: skip
                spec_file = a.work / f"volseg_{i}.spec.json"
                spec_file.write_text(json.dumps(spec, indent=2) + "\n")
                cmd = [a.python, Path(__file__).resolve(), "--volseg-child", spec_file]
            r = run_child(cmd, log=log, timeout=timeout, max_rss_gb=a.max_rss_gb)
            fp1 = code_fingerprint()
            r.update(pipeline=p, repeat=i, volseg_code=fp0 if fp0 == fp1 else f"{fp0}->{fp1}")
            r["result"] = json.loads(out_json.read_text()) if out_json.is_file() else last_json_line(log, "pipeline")
            r["summary"] = per_run_summary(r, names[1:], a.target_label)
            result["runs"].append(r)
            sm = r["summary"]
            if sm["ok"]:
                print(f"    {sm['iterations']} iterations, {fmt(sm['iterations_per_s'], 3)} it/s (steps), "
                      f"target at {sm['reached_at_s']} s, best {a.target_label} Dice {fmt(sm['best_target_dice'], 3)}",
                      flush=True)  # fmt: skip
            else:
                print(f"    FAILED ({r['killed'] or 'exit ' + str(r['rc'])}):\n" + log_tail(log, 8), flush=True)
        b = next(r["summary"] for r in result["runs"] if r["repeat"] == i and r["pipeline"] == "baseline")
        v = next(r["summary"] for r in result["runs"] if r["repeat"] == i and r["pipeline"] == "volseg")
        pair: dict[str, Any] = {"repeat": i, "its_ratio": None, "its_overall_ratio": None, "time_to_target_ratio": None}
        if b["ok"] and v["ok"]:
            if b["iterations_per_s"] and v["iterations_per_s"]:
                pair["its_ratio"] = round(v["iterations_per_s"] / b["iterations_per_s"], 3)
            if b["iterations_per_s_overall"] and v["iterations_per_s_overall"]:
                pair["its_overall_ratio"] = round(v["iterations_per_s_overall"] / b["iterations_per_s_overall"], 3)
            tb, tv = b["reached_at_s"], v["reached_at_s"]
            if tb is not None and tv is not None:
                pair["time_to_target_ratio"] = round(tb / tv, 3)
                text = f"{tb / tv:.2f} ({tb:.0f} s / {tv:.0f} s)"
            elif tv is not None:
                text = f"> {b['seconds'] / tv:.2f} (baseline not there in {b['seconds']:.0f} s; volseg {tv:.0f} s)"
            elif tb is not None:
                text = f"< {tb / v['seconds']:.2f} (volseg not there in {v['seconds']:.0f} s; baseline {tb:.0f} s)"
            else:
                text = "neither reached it"
            pair["time_to_target_ratio_text"] = text
        else:
            pair["time_to_target_ratio_text"] = "a run failed"
        result["pairs"].append(pair)
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps(result, indent=2) + "\n")
    result["summary"] = {
        "its_ratio": spread([p["its_ratio"] for p in result["pairs"]]),
        "its_overall_ratio": spread([p["its_overall_ratio"] for p in result["pairs"]]),
        "time_to_target_ratio": spread([p["time_to_target_ratio"] for p in result["pairs"]]),
    }
    write_reports(result, markdown(result), a.json, a.md)


if __name__ == "__main__":
    main()
