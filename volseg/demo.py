"""The main job, end to end: synthetic CT phantoms -> training -> bundle -> inference on held-out cases -> Dice."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from volseg.errors import UserError


def run_demo(
    out: Path,
    config: Path,
    n_train: int = 10,
    n_test: int = 3,
    overrides: list[str] | None = None,
    device: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, float]:
    """Synthesise, train, infer and score. Returns the mean held-out Dice per label.

    ``out`` gets ``data/`` (the phantoms, MSD layout), ``run/`` (the trained bundle) and ``predictions/``.
    A previous demo's run in the same folder is replaced.
    """
    import nibabel as nib

    from volseg.data.synth import write_dataset
    from volseg.fileio import write_text_atomic
    from volseg.infer import run_inference
    from volseg.metrics import dice_per_label
    from volseg.recipe import load_recipe
    from volseg.train import train

    t0 = time.perf_counter()
    recipe = load_recipe(config, overrides or [])
    out = Path(out)
    data_dir, run_dir, pred_dir = out / "data", out / "run", out / "predictions"
    for d in (run_dir, pred_dir):
        if d.exists():
            if not (d / "configs" / "volseg_recipe.yaml").exists() and d == run_dir:
                raise UserError("exists and is not a volseg run; choose another --out", d)
            shutil.rmtree(d)

    echo(f"[1/4] synthesising {n_train} training and {n_test} held-out CT phantoms in {data_dir}")
    t = time.perf_counter()
    dataset_json = write_dataset(data_dir, task="liver_ct", n=n_train, seed=0, size="demo", n_test=n_test)
    echo(f"      {time.perf_counter() - t:.0f} s")

    echo(f"[2/4] training {recipe.name} ({recipe.model.name}, {recipe.train.max_epochs} epochs) into {run_dir}")
    result = train(recipe, data_dir, run_dir, device=device, echo=lambda s: echo("      " + s))

    meta = json.loads(dataset_json.read_text())
    tests = [data_dir / p for p in meta.get("test", [])]
    echo(f"[3/4] segmenting {len(tests)} held-out phantoms into {pred_dir}")
    written, failures = run_inference(
        [str(p) for p in tests], pred_dir, run_dir, device, echo=lambda s: echo("      " + s)
    )
    if failures:
        raise RuntimeError(f"inference failed on {len(failures)} held-out case(s)")

    echo("[4/4] held-out Dice per label")
    labels = {n: lab.value for n, lab in recipe.data.labels.items()}
    # A label absent from both the reference and the prediction is not scored (its Dice would be 1 by rule).
    scores: dict[str, list[float]] = {n: [] for n, v in labels.items() if v}
    for img, pred_path in zip(tests, written, strict=True):
        ref_path = data_dir / "labelsTs" / img.name
        pred = np.asarray(nib.load(str(pred_path)).dataobj)  # type: ignore[attr-defined]
        ref = np.asarray(nib.load(str(ref_path)).dataobj)  # type: ignore[attr-defined]
        per_label = dice_per_label(pred, ref, labels)
        shown = []
        for k, v in per_label.items():
            if (ref == labels[k]).any() or (pred == labels[k]).any():
                scores[k].append(v)
                shown.append(f"{k} {v:.3f}")
            else:
                shown.append(f"{k} absent")
        echo(f"      {img.name}: " + "  ".join(shown))
    mean = {k: float(np.mean(v)) for k, v in scores.items() if v}
    echo("      mean:  " + "  ".join(f"{k} {v:.3f} (n={len(scores[k])})" for k, v in mean.items()))
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(result.seconds, 1),
        "epochs": result.epochs,
        "heldout_dice": {k: round(v, 4) for k, v in mean.items()},
    }
    write_text_atomic(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    echo(f"done in {summary['seconds']:.0f} s")
    echo(f"bundle:      {run_dir}  (python -m monai.bundle run --config_file {run_dir}/configs/inference.json ...)")
    echo(f"predictions: {pred_dir}")
    return mean
