"""Does the U-Net paper's weight map help to separate touching cells? Train configs/cells_2d.yaml with and without it.

Both runs get the same recipe, data, seed and budget; only ``train.loss.weight_map`` differs (the recipe's
``{w0: 10, sigma: 5}`` against ``null``, i.e. plain DiceCE). Each trained bundle segments the held-out synthetic
images, whose connected components are scored against the reference instances: object F1 at IoU 0.5 and the number
of merged pairs (volseg.metrics), plus pixel Dice.

    python scripts/compare_weight_map.py --out /tmp/wm --seeds 0 1

writes OUT/results.json and OUT/results.md (and the runs under OUT/runs/). The data set is written by
``volseg.data.synth.write_dataset(task="cells")`` unless --data names an existing one.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "configs" / "cells_2d.yaml"
VARIANTS = {
    "weight map": [],
    "no weight map": ["train.loss.weight_map=null"],
    # Ablation: the class-frequency weights w_c alone, without the separation term.
    "class weights only": ["train.loss.weight_map.w0=0"],
}


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def score_run(run_dir: Path, data: Path, min_size: int) -> dict[str, Any]:
    """Segment the held-out images of ``data`` with the bundle and score the objects."""
    from volseg.infer import Predictor
    from volseg.metrics import dice, instances_from_semantic, merged_pairs, object_f1

    meta = json.loads((data / "dataset.json").read_text())
    predictor = Predictor.from_bundle(run_dir, "cpu")
    per_case = []
    for rel in meta["test"]:
        image = (data / rel).resolve()
        name = image.name
        gt_inst = _read_png(data / "instancesTs" / name).astype(np.int64)
        gt_label = _read_png(data / "labelsTs" / name)
        # MONAI's PNG reader gives (x, y) arrays, the transpose of Pillow's (row, column).
        labels = predictor.predict(image).labels.T
        pred_inst = instances_from_semantic(labels, min_size=min_size)
        f1 = object_f1(pred_inst, gt_inst, 0.5)
        per_case.append(
            {
                "case": name,
                "dice": dice(labels > 0, gt_label > 0),
                "dice_vs_instances": dice(labels > 0, gt_inst > 0),
                "f1": f1["f1"],
                "precision": f1["precision"],
                "recall": f1["recall"],
                "tp": f1["tp"],
                "fp": f1["fp"],
                "fn": f1["fn"],
                "merged_pairs": merged_pairs(pred_inst, gt_inst),
                "gt_cells": int(len(np.unique(gt_inst)) - 1),
                "pred_objects": int(pred_inst.max()),
            }
        )
    tp = sum(c["tp"] for c in per_case)
    fp = sum(c["fp"] for c in per_case)
    fn = sum(c["fn"] for c in per_case)
    return {
        "object_f1_pooled": 2 * tp / max(2 * tp + fp + fn, 1),
        "object_f1_mean": float(np.mean([c["f1"] for c in per_case])),
        "precision_pooled": tp / max(tp + fp, 1),
        "recall_pooled": tp / max(tp + fn, 1),
        "merged_pairs": int(sum(c["merged_pairs"] for c in per_case)),
        "dice_mean": float(np.mean([c["dice"] for c in per_case])),
        "gt_cells": int(sum(c["gt_cells"] for c in per_case)),
        "pred_objects": int(sum(c["pred_objects"] for c in per_case)),
        "cases": per_case,
    }


def _markdown(rows: list[dict[str, Any]], budget: str) -> str:
    lines = [
        "| seed | variant | object F1 (IoU 0.5) | precision | recall | merged pairs | pixel Dice | train s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['variant']} | {r['object_f1_pooled']:.3f} | {r['precision_pooled']:.3f} | "
            f"{r['recall_pooled']:.3f} | {r['merged_pairs']} | {r['dice_mean']:.3f} | {r['train_seconds']:.0f} |"
        )
    means = {}
    for variant in VARIANTS:
        sel = [r for r in rows if r["variant"] == variant]
        if sel:
            means[variant] = (
                float(np.mean([r["object_f1_pooled"] for r in sel])),
                float(np.mean([r["merged_pairs"] for r in sel])),
                float(np.mean([r["dice_mean"] for r in sel])),
            )
    if len({r["seed"] for r in rows}) > 1:
        for variant, (f1, merges, d) in means.items():
            lines.append(f"| mean | {variant} | {f1:.3f} | | | {merges:.1f} | {d:.3f} | |")
    lines += ["", f"Budget per run: {budget}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/compare_weight_map"), help="output folder")
    ap.add_argument("--data", type=Path, default=None, help="cells data set (default: OUT/data, written if missing)")
    ap.add_argument("--n-train", type=int, default=30, help="training images when the data set is written")
    ap.add_argument("--n-test", type=int, default=10, help="held-out images when the data set is written")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the written data set")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (train.seed)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override for both runs")
    ap.add_argument("--min-size", type=int, default=20, help="predicted components under this many pixels dropped")
    ap.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=["weight map", "no weight map"],
        help="which trainings to compare",
    )
    args = ap.parse_args(argv)

    warnings.filterwarnings("ignore")
    logging.getLogger().setLevel(logging.ERROR)
    from volseg.data.synth import write_dataset
    from volseg.recipe import load_recipe
    from volseg.train import train

    out = args.out.resolve()
    data = (args.data or out / "data").resolve()
    if not (data / "dataset.json").is_file():
        write_dataset(data, task="cells", n=args.n_train, seed=args.data_seed, n_test=args.n_test)
    rows: list[dict[str, Any]] = []
    budget = ""
    for seed in args.seeds:
        for variant in args.variants:
            extra = VARIANTS[variant]
            recipe = load_recipe(RECIPE, [f"train.seed={seed}", *args.overrides, *extra])
            t = recipe.train
            budget = (
                f"{t.max_epochs} epochs x {t.iterations_per_epoch} iterations x {t.batch_size} images x "
                f"{t.samples_per_volume} patches of {list(t.patch_size)} px"
            )
            run_dir = out / "runs" / f"seed{seed}_{variant.replace(' ', '_')}"
            if (run_dir / "checkpoints" / "last.pt").exists():
                raise SystemExit(f"{run_dir} already holds a run; choose another --out")
            print(f"== seed {seed}, {variant}: training ({budget})", flush=True)
            t0 = time.perf_counter()
            result = train(recipe, data, run_dir, echo=lambda s: print("   " + s, flush=True), progress=False)
            seconds = time.perf_counter() - t0
            scores = score_run(run_dir, data, args.min_size)
            row = {"seed": seed, "variant": variant, "train_seconds": seconds,
                   "best_val_dice": result.best_mean_dice, **scores}  # fmt: skip
            rows.append(row)
            print(
                f"   object F1 {row['object_f1_pooled']:.3f}  merged pairs {row['merged_pairs']}  "
                f"pixel Dice {row['dice_mean']:.3f}  ({seconds:.0f} s)",
                flush=True,
            )
    summary = {
        "recipe": str(RECIPE.relative_to(REPO)),
        "data": str(data),
        "budget": budget,
        "min_size": args.min_size,
        "overrides": args.overrides,
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(summary, indent=2, default=lambda x: None if math.isnan(x) else x))
    table = _markdown(rows, budget)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
