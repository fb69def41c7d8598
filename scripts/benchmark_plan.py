#!/usr/bin/env python3
r"""Planned against hand-written recipes: held-out Dice after the same wall-time budget, on three kinds of data.

For each data set the benchmark writes the data (fixed seeds; ``--n-train`` training cases in imagesTr/labelsTr
and ``--n-test`` held-out cases in imagesTs/labelsTs), plans a recipe with
``volseg plan --data DIR -o planned.yaml --device cpu --time-budget B``, trains the planned recipe and the hand
recipe one after the other, each in a child process (``volseg train``, exactly the command line's code path,
cascades included) capped at ``B`` seconds of training, segments the held-out cases with each resulting bundle
(``volseg.infer.Predictor.from_bundle``, the fast engine) and scores them against the held-out labels
(``volseg.metrics.dice_per_label``). The claim tested: the planned recipe ends within 0.02 mean Dice of the hand
recipe, or above it.

The data sets:

* ``ct_iso``: the liver CT phantoms (``volseg synth --task liver_ct --variety hard --spacing S S S``) on an
  isotropic grid (``--ct-spacing``, default 1.5 mm); hand recipe configs/demo_liver_ct.yaml;
* ``mr``: the abdominal MR phantoms (``volseg synth --task mr``: 0.9 x 0.9 x 5 mm, arbitrary units, coil bias,
  Rician noise; liver and kidneys); hand recipe configs/mr_phantom.yaml;
* ``cells``: the 2D fluorescence nuclei (``volseg synth --task cells``); hand recipe configs/cells_2d.yaml.

The cap: the training child adds Ignite handlers to every ``SupervisedTrainer`` it builds (as
scripts/benchmark_train.py does) that count the seconds from the trainer's start (data caching and the data check
before it are not counted; validation inside training is) and terminate the trainer at the end of the iteration
that reaches the cap. A cascade's two trainers share the budget: the coarse one is capped at its planned share
(``volseg.plan.CASCADE_COARSE_SHARE``), the fine one at what is left. A recipe whose own epochs end sooner simply
ends sooner; the hand recipes keep their own epochs. A planned recipe's trainer keeps to its own budget
(``train.time_budget_s``, ``cascade.time_budget_s``: it lowers its epochs when they would overrun it); the child
sets each stage's budget to its cap, since the plan's own leaves out start-up time that the cap does not count. The
bundle then holds the best validated weights, as always.

Usage:
    python scripts/benchmark_plan.py [--datasets ct_iso mr cells] [--budget 4m] [--n-train 10] [--n-test 4] \
        [--ct-spacing 1.5] [--out runs/bench/plan] [--json plan.json] [--md plan.md]
    python scripts/benchmark_plan.py --datasets cells mr --budget 40s --plan-budget 3m --n-train 4 --n-test 2

``--plan-budget`` (default: ``--budget``) is the budget given to ``volseg plan``; the planner refuses budgets
too short to train (about a minute on a CPU), so a quick check of the script plans for longer than it trains.

Reported per data set: Dice per label and their mean for the planned and the hand recipe, the difference
(planned - hand), the training seconds, epochs and iterations of each; and what the planner chose (target spacing,
patch, strides and depth, kernels, widths, batch, normalisation, epochs x iterations, sampler, cascade) with the
reason it gives for each (the ``plan`` section of the fingerprint JSON written beside the planned recipe).
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
    log_tail,
    machine_info,
    machine_lines,
    run_child,
    write_reports,
)

DATASETS: dict[str, dict[str, Any]] = {
    "ct_iso": {"task": "liver_ct", "hand": "configs/demo_liver_ct.yaml", "what": "isotropic liver CT phantoms"},
    "mr": {"task": "mr", "hand": "configs/mr_phantom.yaml", "what": "anisotropic abdominal MR phantoms"},
    "cells": {"task": "cells", "hand": "configs/cells_2d.yaml", "what": "2D fluorescence nuclei"},
}
TOLERANCE = 0.02
"""The planned recipe passes when its mean Dice is at most this much below the hand recipe's."""


# ------------------------------------------------------------------------------------------------------------
# The children
# ------------------------------------------------------------------------------------------------------------


def train_child(spec_file: str) -> int:
    """Run ``volseg train`` in this process with every trainer capped; write what was measured to spec['result']."""
    sys.path.insert(0, str(REPO))
    spec = json.loads(Path(spec_file).read_text())
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from volseg.cli import main as volseg_main
    from volseg.plan import CASCADE_COARSE_SHARE
    from volseg.recipe import load_recipe

    budget = float(spec["budget_s"])
    recipe = load_recipe(spec["config"])
    cascade = recipe.cascade is not None
    stages: list[dict[str, Any]] = []
    t_start = time.perf_counter()
    trainer_init = SupervisedTrainer.__init__

    def patched_init(self: Any, *args: Any, **kwargs: Any) -> None:
        trainer_init(self, *args, **kwargs)
        used = sum(s["train_s"] for s in stages)
        cap = budget * CASCADE_COARSE_SHARE if cascade and not stages else max(0.0, budget - used)
        st: dict[str, Any] = {"cap_s": round(cap, 1), "train_s": 0.0, "iterations": 0, "epochs": 0,
                              "stopped_by": None, "t0": None}  # fmt: skip
        stages.append(st)

        @self.on(Events.STARTED)
        def _started(engine: Any) -> None:
            st["t0"] = time.perf_counter()
            st["cache_s"] = round(st["t0"] - t_start, 1)

        @self.on(Events.ITERATION_COMPLETED)
        def _iteration(engine: Any) -> None:
            st["iterations"] += 1
            st["train_s"] = time.perf_counter() - st["t0"]
            if st["train_s"] >= cap and st["stopped_by"] is None:
                st["stopped_by"] = "budget"
                engine.terminate()

        @self.on(Events.COMPLETED | Events.TERMINATE)
        def _end(engine: Any) -> None:
            st["train_s"] = time.perf_counter() - st["t0"]
            st["epochs"] = engine.state.epoch
            st["stopped_by"] = st["stopped_by"] or "max_epochs"

    SupervisedTrainer.__init__ = patched_init  # type: ignore[method-assign]
    argv = ["train", "--config", spec["config"], "--data", spec["data"], "--out", spec["out"],
            "--device", spec["device"]]  # fmt: skip
    if recipe.train.time_budget_s is not None:
        # A planned trainer keeps to its own budget, which leaves out a start-up allowance that the cap here does not
        # count (it runs from the trainer's start): each stage gets its cap as its budget, as the hand recipe does.
        first = budget * CASCADE_COARSE_SHARE if cascade else budget
        argv += ["--set", f"train.time_budget_s={first:g}"]
        if cascade:
            argv += ["--set", f"cascade.time_budget_s={budget - first:g}"]
    rc = volseg_main(argv)
    for st in stages:
        st.pop("t0", None)
        st["train_s"] = round(st["train_s"], 1)
    result = {
        "rc": rc,
        "stages": stages,
        "train_s": round(sum(s["train_s"] for s in stages), 1),
        "iterations": sum(s["iterations"] for s in stages),
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    Path(spec["result"]).write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return int(rc or 0)


def infer_child(spec_file: str) -> int:
    """Segment the held-out cases with a bundle and write the Dice per case and label to spec['result']."""
    sys.path.insert(0, str(REPO))
    spec = json.loads(Path(spec_file).read_text())
    import numpy as np

    from volseg.imageio import read_image
    from volseg.infer import Predictor
    from volseg.metrics import dice_per_label

    predictor = Predictor.from_bundle(spec["bundle"], device=spec["device"])
    values = {name: lab.value for name, lab in predictor.recipe.data.labels.items()}
    names = {int(v): n for v, n in spec["labels"].items()}  # the data set's own values
    cases = []
    t0 = time.perf_counter()
    for image, label in spec["cases"]:
        pred = predictor.predict(image).labels
        ref = np.rint(read_image(label).array).astype(np.int64).reshape(pred.shape)
        per = {}
        for v, name in names.items():
            if v == 0:
                continue
            pv = values.get(name, v)
            per[name] = dice_per_label((pred == pv).astype(np.uint8), (ref == v).astype(np.uint8), {name: 1})[name]
        cases.append({"case": Path(image).name, "dice": {k: round(x, 4) for k, x in per.items()}})
    labels = [n for v, n in sorted(names.items()) if v != 0]
    mean = {n: round(float(np.mean([c["dice"][n] for c in cases])), 4) for n in labels}
    result = {"cases": cases, "dice": mean, "mean_dice": round(float(np.mean(list(mean.values()))), 4),
              "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
    Path(spec["result"]).write_text(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------------------
# The parent
# ------------------------------------------------------------------------------------------------------------


def volseg_cmd(python: str, *args: Any) -> list[Any]:
    return [python, "-m", "volseg", *args]


def make_data(a: argparse.Namespace, name: str, root: Path, logs: Path) -> dict[str, Any]:
    """Write one data set with ``volseg synth`` (kept when it was written before with the same arguments)."""
    task = DATASETS[name]["task"]
    args: list[Any] = ["synth", "--task", task, "-n", a.n_train, "--n-test", a.n_test, "--seed", a.seed, "-o", root]
    if name == "ct_iso":
        args += ["--variety", "hard", "--spacing", a.ct_spacing, a.ct_spacing, a.ct_spacing]
    stamp = root / "benchmark_args.json"
    key = json.dumps([str(x) for x in args])
    if stamp.is_file() and stamp.read_text() == key and not a.regenerate:
        return {"rc": 0, "kept": True, "wall_s": 0.0}
    if root.exists():
        shutil.rmtree(root)
    r = run_child(volseg_cmd(a.python, *args), log=logs / f"{name}_synth.log", timeout=3600)
    if r["rc"] == 0:
        stamp.write_text(key)
    return r


def held_out(root: Path) -> list[list[str]]:
    """(image, label) pairs of imagesTs/labelsTs, matched by name."""
    pairs = []
    for img in sorted((root / "imagesTs").iterdir()):
        lab = root / "labelsTs" / img.name
        if lab.is_file():
            pairs.append([str(img), str(lab)])
    return pairs


def hand_recipe(name: str, root: Path, work: Path) -> Path:
    """The hand recipe with ``data.root`` pointed at the benchmark's data (written beside the planned one)."""
    import yaml

    src = REPO / DATASETS[name]["hand"]
    tree = yaml.safe_load(src.read_text())
    tree["data"]["root"] = str(root)
    out = work / f"hand_{src.name}"
    out.write_text(f"# {src.relative_to(REPO)} with data.root set by the benchmark\n" + yaml.safe_dump(tree))
    return out


def train_and_score(a: argparse.Namespace, which: str, config: Path, root: Path, work: Path) -> dict[str, Any]:
    """Train one recipe under the cap in a child, then score its bundle on the held-out cases in another."""
    run_dir = work / f"run_{which}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    spec = {"config": str(config), "data": str(root), "out": str(run_dir), "device": a.device,
            "budget_s": a.budget_s, "result": str(work / f"train_{which}.json")}  # fmt: skip
    spec_file = work / f"train_{which}.spec.json"
    spec_file.write_text(json.dumps(spec, indent=2) + "\n")
    Path(spec["result"]).unlink(missing_ok=True)
    print(f"  training the {which} recipe (at most {a.budget_s:g} s of training) ...", flush=True)
    fp0 = code_fingerprint()
    r = run_child([a.python, Path(__file__).resolve(), "--train-child", spec_file], log=work / f"train_{which}.log",
                  timeout=a.timeout, max_rss_gb=a.max_rss_gb)  # fmt: skip
    fp1 = code_fingerprint()
    out: dict[str, Any] = {"train": r, "volseg_code": fp0 if fp0 == fp1 else f"{fp0}->{fp1}"}
    res = Path(spec["result"])
    out["train_result"] = json.loads(res.read_text()) if res.is_file() else None
    if r["rc"] != 0 or not (run_dir / "models" / "model.pt").is_file():
        print(f"    FAILED ({r['killed'] or 'exit ' + str(r['rc'])}):\n" + log_tail(Path(r["log"]), 8), flush=True)
        return out
    tr = out["train_result"] or {}
    print(f"    {tr.get('iterations')} iterations in {tr.get('train_s')} s of training", flush=True)
    labels = json.loads((root / "dataset.json").read_text())["labels"]
    ispec = {"bundle": str(run_dir), "device": a.device, "labels": labels, "cases": held_out(root),
             "result": str(work / f"infer_{which}.json")}  # fmt: skip
    ispec_file = work / f"infer_{which}.spec.json"
    ispec_file.write_text(json.dumps(ispec, indent=2) + "\n")
    Path(ispec["result"]).unlink(missing_ok=True)
    ri = run_child([a.python, Path(__file__).resolve(), "--infer-child", ispec_file], log=work / f"infer_{which}.log",
                   timeout=a.timeout, max_rss_gb=a.max_rss_gb)  # fmt: skip
    out["infer"] = ri
    res = Path(ispec["result"])
    out["score"] = json.loads(res.read_text()) if res.is_file() else None
    if out["score"] is None:
        print(f"    inference FAILED:\n{log_tail(Path(ri['log']), 8)}", flush=True)
    else:
        print(f"    held-out Dice {out['score']['dice']} (mean {out['score']['mean_dice']})", flush=True)
    return out


def _flow(value: Any) -> str:
    return json.dumps(value, separators=(", ", ": ")) if value is not None else "none"


def plan_choices(recipe_path: Path) -> list[dict[str, str]]:
    """What the planner chose, one row per decision: ``decision``, ``value`` and ``reason``."""
    import yaml

    r = yaml.safe_load(recipe_path.read_text())
    fp_path = recipe_path.with_name(recipe_path.name.removesuffix(".yaml") + ".fingerprint.json")
    plan = json.loads(fp_path.read_text()).get("plan", {}) if fp_path.is_file() else {}
    why = plan.get("reasons", {})
    d, m, t, c = r["data"], r["model"], r["train"], r.get("cascade")
    args = m["args"]
    casc = plan.get("cascade", {})
    rows = [
        ("modality", d.get("modality"), why.get("data.modality")),
        ("target spacing", d.get("spacing"), why.get("data.spacing")),
        ("patch", t["patch_size"], why.get("train.patch_size")),
        ("strides (depth)", f"{_flow(plan.get('strides', args.get('strides')))} ({len(args['strides'])})",
         why.get("model.args.strides")),
        ("kernels", f"{_flow(args.get('kernel_size', 3))} (per level wanted {_flow(plan.get('kernels_per_level'))})",
         why.get("model.args.kernel_size")),
        ("widths", args.get("channels"), why.get("model.args.channels")),
        ("batch", f"{t['batch_size']} x {t.get('samples_per_volume', 1)}", why.get("train.batch_size")),
        ("normalisation", d.get("intensity"), why.get("data.intensity")),
        ("crop to foreground", d.get("crop_foreground", True), why.get("data.crop_foreground")),
        ("epochs x iterations", f"{t.get('max_epochs')} x {t.get('iterations_per_epoch')}, validation every "
         f"{t.get('val_interval')}", why.get("train.max_epochs")),
        ("sampler", f"{t.get('sampler', 'pos_neg')} (pos {t.get('pos_fraction', '-')})", why.get("train.sampler")),
        ("cascade", "yes" if c else "no", casc.get("reason")),
    ]  # fmt: skip
    if c:
        rows += [
            ("fine stage: spacing, patch", f"{_flow(c.get('spacing'))}, {_flow(c.get('patch_size'))}",
             why.get("cascade.patch_size")),
            ("fine stage: network", _flow(c.get("model_args")), why.get("cascade.model_args")),
        ]  # fmt: skip
    return [{"decision": k, "value": v if isinstance(v, str) else _flow(v), "reason": w or ""} for k, v, w in rows]


def run_dataset(a: argparse.Namespace, name: str) -> dict[str, Any]:
    """Data, plan, both trainings and both scores for one data set."""
    work = a.out / name
    work.mkdir(parents=True, exist_ok=True)
    root = work / "data"
    entry: dict[str, Any] = {"dataset": name, "what": DATASETS[name]["what"], "hand_recipe": DATASETS[name]["hand"]}
    print(f"{name}: writing the data ...", flush=True)
    entry["synth"] = make_data(a, name, root, work)
    if entry["synth"]["rc"] != 0:
        entry["error"] = "volseg synth failed: " + log_tail(Path(entry["synth"]["log"]), 3)
        return entry
    entry["n_train"] = json.loads((root / "dataset.json").read_text())["numTraining"]
    entry["n_test"] = len(held_out(root))
    planned = work / "planned.yaml"
    for stale in (planned, work / "planned.fingerprint.json"):
        stale.unlink(missing_ok=True)
    print(f"{name}: volseg plan --time-budget {a.plan_budget} ...", flush=True)
    plan_cmd = volseg_cmd(a.python, "plan", "--data", root, "-o", planned, "--device", a.device,
                          "--time-budget", a.plan_budget)  # fmt: skip
    entry["plan"] = run_child(plan_cmd, log=work / "plan.log", timeout=a.timeout, max_rss_gb=a.max_rss_gb)
    hand = hand_recipe(name, root, work)
    if entry["plan"]["rc"] == 0 and planned.is_file():
        entry["choices"] = plan_choices(planned)
        if "planned" in a.sides:
            entry["planned"] = train_and_score(a, "planned", planned, root, work)
    else:
        entry["error"] = "volseg plan failed: " + log_tail(Path(entry["plan"]["log"]), 2)
        print(f"  {entry['error']}", flush=True)
    if "hand" in a.sides:
        entry["hand"] = train_and_score(a, "hand", hand, root, work)
    p, h = (entry.get(k, {}).get("score") for k in ("planned", "hand"))
    if p and h:
        entry["difference"] = {k: round(p["dice"][k] - h["dice"][k], 4) for k in h["dice"] if k in p["dice"]}
        entry["mean_difference"] = round(p["mean_dice"] - h["mean_dice"], 4)
        entry["within_tolerance"] = entry["mean_difference"] >= -TOLERANCE
    return entry


def _train_cell(side: dict[str, Any] | None) -> str:
    tr = (side or {}).get("train_result") or {}
    if not tr:
        return "–"
    stages = tr.get("stages") or []
    epochs = "+".join(str(s.get("epochs")) for s in stages)
    stops = "+".join(str(s.get("stopped_by")) for s in stages)
    return f"{fmt(tr.get('train_s'), 0)} s ({tr.get('iterations')} it, {epochs} ep, {stops})"


def markdown(result: dict[str, Any]) -> str:
    a = result["args"]
    lines = ["## Planned against hand-written recipes: held-out Dice in the same training budget", ""]
    lines += machine_lines(result["machine"])
    lines += [
        f"- training budget {a['budget']} ({result['budget_s']:g} s of training per recipe, caching excluded); "
        f"`volseg plan --time-budget {a['plan_budget']} --device {a['device']}`; passes when the planned mean Dice "
        f"is at most {TOLERANCE} below the hand recipe's",
        f"- {a['n_train']} training and {a['n_test']} held-out cases per data set (seed {a['seed']}); "
        f"CT phantoms at {a['ct_spacing']:g} mm isotropic",
        "",
        "| data set | label | planned Dice | hand Dice | planned - hand | planned training | hand training |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in result["datasets"]:
        p, h = (e.get(k, {}).get("score") or {} for k in ("planned", "hand"))
        labels = list((h or p).get("dice", {}))
        tp, th = _train_cell(e.get("planned")), _train_cell(e.get("hand"))
        if not labels:
            lines.append(f"| {e['dataset']} | failed: {e.get('error', 'see the logs')} | | | | {tp} | {th} |")
            continue
        for lab in [*labels, "mean"]:
            pv = p.get("mean_dice") if lab == "mean" else p.get("dice", {}).get(lab)
            hv = h.get("mean_dice") if lab == "mean" else h.get("dice", {}).get(lab)
            diff = fmt(pv - hv, 3) if pv is not None and hv is not None else "–"
            if lab == "mean" and "within_tolerance" in e:
                diff += " (pass)" if e["within_tolerance"] else " (FAIL)"
            name = f"**{lab}**" if lab == "mean" else lab
            lines.append(f"| {e['dataset']} | {name} | {fmt(pv, 3)} | {fmt(hv, 3)} | {diff} | {tp} | {th} |")
    for e in result["datasets"]:
        if not e.get("choices"):
            continue
        lines += ["", f"### What the planner chose: {e['dataset']} ({e['what']}; hand recipe `{e['hand_recipe']}`)",
                  "", "| decision | value | reason |", "| --- | --- | --- |"]  # fmt: skip
        for row in e["choices"]:
            reason = row["reason"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {row['decision']} | `{row['value']}` | {reason} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--train-child", "--infer-child"):
        sys.exit((train_child if sys.argv[1] == "--train-child" else infer_child)(sys.argv[2]))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawTextHelpFormatter,
                                 epilog="\n".join(__doc__.splitlines()[1:]))  # fmt: skip
    ap.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), default=list(DATASETS))
    ap.add_argument("--budget", default="4m", help="training time of each recipe, e.g. 4m, 240s (default 4m)")
    ap.add_argument("--plan-budget", help="the budget volseg plan plans for (default: --budget)")
    ap.add_argument(
        "--sides",
        nargs="+",
        choices=["planned", "hand"],
        default=["planned", "hand"],
        help="which recipes to train (default both; one alone reports no difference)",
    )
    ap.add_argument("--n-train", type=int, default=10, help="training cases per data set (default 10)")
    ap.add_argument("--n-test", type=int, default=4, help="held-out cases per data set (default 4)")
    ap.add_argument("--ct-spacing", type=float, default=1.5, help="isotropic CT voxel size in mm (default 1.5)")
    ap.add_argument("--seed", type=int, default=0, help="data set seed (default 0)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--regenerate", action="store_true", help="write the data again even if it is there")
    ap.add_argument("--timeout", type=float, default=None, help="kill a child after this (default budget + 1800 s)")
    ap.add_argument("--max-rss-gb", type=float, default=None, help="kill a child past this resident memory")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/plan"))
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--md", type=Path)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from volseg.plan import parse_duration

    a.budget_s = parse_duration(a.budget)
    a.plan_budget = a.plan_budget or a.budget
    a.timeout = a.timeout or a.budget_s + 1800
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"benchmark": "plan", "machine": machine_info(a.python), "budget_s": a.budget_s,
                              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                              "datasets": []}  # fmt: skip
    for name in a.datasets:
        result["datasets"].append(run_dataset(a, name))
    write_reports(result, markdown(result), a.json, a.md)


if __name__ == "__main__":
    main()
