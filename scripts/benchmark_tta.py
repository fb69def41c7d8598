"""Test-time mirroring: what it costs per case and what it changes in Dice, on held-out phantoms.

Segments every image of one or more held-out folders (``imagesTs``/``labelsTs`` of an MSD-layout data set, e.g.
``demo/data`` after ``make demo`` and ``volseg synth --task torso_ct``) with one bundle and each mirroring setting,
in one process with one warm predictor per setting, alternating the settings case by case, and prints a Markdown
table: seconds per case (median over cases, after one warm-up case), Dice per label against the truth (mean over
the cases that hold the label).

    python scripts/benchmark_tta.py --bundle demo/run --data demo/data data/torso --flips none 0,1,2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np


def _cases(folder: Path) -> list[tuple[Path, Path]]:
    images = sorted((folder / "imagesTs").glob("*.nii*"))
    return [(img, folder / "labelsTs" / img.name) for img in images if (folder / "labelsTs" / img.name).is_file()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="MSD-layout folders with imagesTs/labelsTs")
    ap.add_argument("--flips", nargs="+", default=["none", "0,1,2"], help="settings: none or comma-separated axes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()

    from volseg.infer import Predictor
    from volseg.metrics import dice_per_label

    settings = {f: [] if f == "none" else [int(a) for a in f.split(",")] for f in args.flips}
    predictors = {
        f: Predictor.from_bundle(args.bundle, args.device, overrides=[f"infer.tta_flips={json.dumps(axes)}"])
        for f, axes in settings.items()
    }
    some = next(iter(predictors.values()))
    assert some.recipe is not None
    labels = {n: lab.value for n, lab in some.recipe.data.labels.items() if lab.value}
    cases = [c for folder in args.data for c in _cases(folder)]
    if not cases:
        raise SystemExit("no imagesTs/labelsTs pairs found")
    for p in predictors.values():  # warm-up: first-call costs out of the timings
        p.predict(cases[0][0])
    seconds: dict[str, list[float]] = {f: [] for f in settings}
    dice: dict[str, dict[str, list[float]]] = {f: {n: [] for n in labels} for f in settings}
    order = list(settings)
    for i, (img, lab) in enumerate(cases):
        truth = np.asarray(nib.load(str(lab)).dataobj)
        for f in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            pred = predictors[f].predict(img).labels
            seconds[f].append(time.perf_counter() - t0)
            for name, d in dice_per_label(pred, truth, labels).items():
                if (truth == labels[name]).any():
                    dice[f][name].append(d)
        print(f"{img.parent.parent.name}/{img.name}: " + "  ".join(
            f"{f} " + " ".join(f"{n} {dice[f][n][-1]:.3f}" for n in labels if dice[f][n]) for f in order
        ), flush=True)  # fmt: skip
    print()
    print("| mirroring | passes | s per case (median) | " + " | ".join(f"{n} Dice (n)" for n in labels) + " |")
    print("| --- | --- | --- | " + " | ".join("---" for _ in labels) + " |")
    for f, axes in settings.items():
        cells = [f"{statistics.mean(v):.3f} ({len(v)})" if v else "-" for v in dice[f].values()]
        print(f"| {f} | {2 ** len(axes)} | {statistics.median(seconds[f]):.2f} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"seconds": seconds, "dice": dice, "cases": [str(c[0]) for c in cases]}))


if __name__ == "__main__":
    main()
