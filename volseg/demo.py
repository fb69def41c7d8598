"""The main job, end to end: synthetic CT phantoms -> plan -> training -> bundle -> held-out inference -> scores.

The held-out cases are of two families: phantoms of the training generator (clinical fields of view, from
liver-only to chest-abdomen-pelvis) and phantoms of :mod:`volseg.data.synth_torso`, built independently (other
shapes, organs and intensity model) and never trained on, so that "generalises" is measured.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from volseg.errors import UserError

DEFAULT_BUDGET = "14m"
"""Training time the demo plans for (both stages together), so that the whole demo fits 15 minutes on 2 CPU cores."""

N_TRAIN = 40
"""Training phantoms of the demo. The planned iterations do not grow with the cases, so more cases cost only their
synthesis, planning and caching (about 20 s more for 40 than for 10 on 2 CPU cores) and give the fine stage more
lesions to learn from: on the same 15 held-out cases a 10-case training gave a tumour Dice per case of 0.454, a
40-case one 0.502 (docs/benchmarks.md, Demo)."""

N_TEST = 15
"""Held-out phantoms of the training generator: their lesion count is 0-8 per liver, so a mean over a handful of
cases swings with one case (one bundle's tumour Dice per case: 0.556 on five cases, 0.396 on 15)."""

LESION_SIZES_MM = (10.0, 20.0)
"""Size bins of the per-lesion detection table: < 10 mm, 10-20 mm, >= 20 mm (equivalent diameter)."""


def _fresh(out: Path) -> tuple[Path, Path, Path, Path]:
    data_dir, torso_dir, run_dir, pred_dir = out / "data", out / "torso", out / "run", out / "predictions"
    for d in (run_dir, pred_dir):
        if d.exists():
            if d == run_dir and not (d / "configs" / "volseg_recipe.yaml").exists() and any(d.iterdir()):
                raise UserError("exists and is not a volseg run; choose another --out", d)
            shutil.rmtree(d)
    return data_dir, torso_dir, run_dir, pred_dir


def _recipe(config: Path | None, data_dir: Path, out: Path, overrides: list[str], budget: str, device: str | None,
            echo: Callable[[str], None]) -> Any:  # fmt: skip
    """The hand-written recipe, or the plan for the synthesised data and the time budget."""
    from volseg.recipe import load_recipe

    if config is not None:
        return load_recipe(config, overrides)
    from volseg.plan import run_plan

    path = out / "plan" / "demo_liver_ct.yaml"
    dev = "cuda" if device and device.startswith("cuda") else "cpu"
    run_plan(data_dir, path, device=dev, time_budget=budget, name="demo_liver_ct", echo=None)
    recipe = load_recipe(path, overrides)
    for line in _plan_lines(recipe):
        echo("      " + line)
    echo(f"      recipe: {path} (every decision explained in its comments)")
    return recipe


def _plan_lines(recipe: Any) -> list[str]:
    t = recipe.train
    lines = [f"coarse stage: spacing {list(recipe.data.spacing)} mm, patch {list(t.patch_size)}, "
             f"{t.max_epochs} epochs x {t.iterations_per_epoch} iterations"]  # fmt: skip
    c = recipe.cascade
    if c is not None:
        lines.append(
            f"fine stage: spacing {list(c.spacing)} mm on a crop around the liver (+{c.margin_mm:g} mm), patch "
            f"{list(c.patch_size)}, {c.max_epochs or t.max_epochs} epochs x "
            f"{c.iterations_per_epoch or t.iterations_per_epoch} iterations"
        )
    return lines


def _train(recipe: Any, data_dir: Path, run_dir: Path, device: str | None, echo: Callable[[str], None]) -> float:
    from volseg.train import train

    say = lambda s: echo("      " + s)  # noqa: E731
    if recipe.cascade is not None:
        from volseg.cascade import train_cascade

        stages = train_cascade(recipe, data_dir, run_dir, device=device, echo=say)
        return float(sum(r.seconds for r in stages))
    return float(train(recipe, data_dir, run_dir, device=device, echo=say).seconds)


Scores = dict[str, dict[str, float]]


def _score(
    cases: list[tuple[str, Path, Path]], labels: dict[str, int], echo: Callable[[str], None]
) -> tuple[Scores, Scores, dict[str, Any], list[dict[str, Any]]]:
    """Dice per label per case (a label absent from both sides is not scored) and its mean per family; the pooled
    ("global") Dice per family, over all its cases' voxels at once (LiTS reports both); pooled per-lesion
    detection."""
    from volseg.imageio import read_labels
    from volseg.metrics import dice_per_label, lesion_detection

    tumour = labels.get("tumour")
    scores: dict[str, dict[str, list[float]]] = {}
    overlap: dict[str, dict[str, np.ndarray]] = {}  # per family and label: [2 x intersection, |pred| + |ref|]
    pooled: dict[str, dict[str, int]] = {}
    rows = []
    for family, pred_path, ref_path in cases:
        pred, _ = read_labels(pred_path)
        ref, affine = read_labels(ref_path)
        per_label = dice_per_label(pred, ref, labels)
        row: dict[str, Any] = {"case": ref_path.name, "family": family}
        for name, value in per_label.items():
            p, r = pred == labels[name], ref == labels[name]
            sums = overlap.setdefault(family, {}).setdefault(name, np.zeros(2, np.int64))
            sums += (2 * int(np.count_nonzero(p & r)), int(np.count_nonzero(p)) + int(np.count_nonzero(r)))
            if r.any() or p.any():
                scores.setdefault(family, {}).setdefault(name, []).append(value)
                row[name] = round(float(value), 4)
        if tumour is not None:
            spacing = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
            det = lesion_detection(pred, ref, tumour, spacing, LESION_SIZES_MM)
            by_size = cast(dict[str, dict[str, int]], det["by_size"])
            for size, counts in by_size.items():
                bin_ = pooled.setdefault(size, {"present": 0, "found": 0})
                bin_["present"] += int(counts["present"])
                bin_["found"] += int(counts["found"])
            row["lesions"] = f"{det['found']}/{det['present']} found, {det['false_positives']} false positive(s)"
        rows.append(row)
        shown = [f"{k} {row[k]:.3f}" if k in row else f"{k} absent" for k in per_label]
        echo(f"      {family:>6} {ref_path.name}: " + "  ".join(shown) + (f"  lesions {row['lesions']}"
                                                                            if "lesions" in row else ""))  # fmt: skip
    mean = {f: {k: round(float(np.mean(v)), 4) for k, v in s.items()} for f, s in scores.items()}
    pooled_dice = {f: {k: round(float(c[0] / c[1]), 4) for k, c in per.items() if c[1]} for f, per in overlap.items()}
    return mean, pooled_dice, pooled, rows


def _qc_pictures(cases: list[tuple[str, Path, Path]], images: list[Path], colors: dict[int, Any]) -> list[Path]:
    """One picture per held-out case: the prediction's outlines, the reference dashed."""
    from volseg.imageio import read_image, read_labels
    from volseg.qc import write_montage

    out = []
    for (family, pred_path, ref_path), img_path in zip(cases, images, strict=True):
        image = read_image(img_path)
        pred, _ = read_labels(pred_path)
        ref, _ = read_labels(ref_path)
        path = pred_path.parent / f"{ref_path.name.split('.')[0]}_qc.png"
        title = f"{family} {ref_path.name}: prediction solid, reference dashed"
        write_montage(image.array, image.affine, pred, path, ground_truth=ref, colors=colors, window=(-160, 240),
                      title=title)  # fmt: skip
        out.append(path)
    return out


def run_demo(
    out: Path,
    config: Path | None = None,
    n_train: int = N_TRAIN,
    n_test: int = N_TEST,
    overrides: list[str] | None = None,
    device: str | None = None,
    echo: Callable[[str], None] = print,
    *,
    n_torso: int = 2,
    time_budget: str = DEFAULT_BUDGET,
) -> dict[str, dict[str, float]]:
    """Synthesise, plan (or use ``config``), train, infer and score. Returns the mean held-out Dice per label for
    each phantom family.

    ``out`` gets ``data/`` (the training generator's phantoms, MSD layout), ``torso/`` (the other family),
    ``plan/`` (the planned recipe and fingerprint), ``run/`` (the trained bundle), ``predictions/`` (labels and a
    QC picture per held-out case) and ``demo_summary.json``. A previous demo's run in the same folder is replaced.
    """
    from volseg.data.synth import write_dataset
    from volseg.data.synth_torso import write_torso_dataset
    from volseg.fileio import write_text_atomic
    from volseg.infer import run_inference

    t0 = time.perf_counter()
    out = Path(out)
    data_dir, torso_dir, run_dir, pred_dir = _fresh(out)
    echo(f"[1/5] synthesising {n_train} training and {n_test} held-out CT phantoms in {data_dir}, "
         f"{n_torso} held-out phantoms of the other family in {torso_dir}")  # fmt: skip
    t = time.perf_counter()
    dataset_json = write_dataset(data_dir, task="liver_ct", n=n_train, seed=0, size="demo", n_test=n_test)
    torso_json = write_torso_dataset(torso_dir, n=n_torso, seed=0, size="demo") if n_torso else None
    echo(f"      {time.perf_counter() - t:.0f} s")

    echo(f"[2/5] {'recipe ' + str(config) if config else 'planning for a training budget of ' + time_budget}")
    recipe = _recipe(config, data_dir, out, overrides or [], time_budget, device, echo)

    stages = "two stages" if recipe.cascade is not None else "one stage"
    echo(f"[3/5] training {recipe.name} ({recipe.model.name}, {stages}) into {run_dir}")
    train_seconds = _train(recipe, data_dir, run_dir, device, echo)

    held_out: list[tuple[str, Path, Path]] = []
    for family, js in (("liver", dataset_json), ("torso", torso_json)):
        if js is not None:
            root = js.parent
            held_out += [(family, root / p, root / "labelsTs" / Path(p).name)
                         for p in json.loads(js.read_text()).get("test", [])]  # fmt: skip
    echo(f"[4/5] segmenting {len(held_out)} held-out phantoms into {pred_dir}")
    written, failures = run_inference(
        [str(img) for _, img, _ in held_out], pred_dir, run_dir, device, echo=lambda s: echo("      " + s)
    )
    if failures:
        raise RuntimeError(f"inference failed on {len(failures)} held-out case(s)")

    echo("[5/5] held-out Dice per label, lesions found by size, QC pictures")
    labels = {n: lab.value for n, lab in recipe.data.labels.items() if lab.value}
    cases = [(f, p, ref) for (f, _, ref), p in zip(held_out, written, strict=True)]
    mean, pooled_dice, lesions, rows = _score(cases, labels, echo)
    for family, m in mean.items():
        echo(f"      mean ({family}): " + "  ".join(f"{k} {v:.3f}" for k, v in m.items()))
        echo(f"      pooled ({family}): " + "  ".join(f"{k} {v:.3f}" for k, v in pooled_dice[family].items()))
    for size, c in lesions.items():
        echo(f"      lesions {size}: {c['found']}/{c['present']} found")
    colors = {lab.value: lab.color for lab in recipe.data.labels.values() if lab.color}
    pictures = _qc_pictures(cases, [img for _, img, _ in held_out], colors)
    summary = {
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(train_seconds, 1),
        "stages": 2 if recipe.cascade is not None else 1,
        "recipe": recipe.name,
        "heldout_dice": mean,
        "heldout_dice_pooled": pooled_dice,
        "lesions_found": lesions,
        "cases": rows,
    }
    write_text_atomic(out / "demo_summary.json", json.dumps(summary, indent=2) + "\n")
    echo(f"done in {summary['seconds']:.0f} s")
    echo(f"bundle:      {run_dir}  (volseg infer SCAN finds it; python -m monai.bundle run --config_file "
         f"{run_dir}/configs/inference.json ...)")  # fmt: skip
    echo(f"predictions: {pred_dir} (QC pictures: {len(pictures)} *_qc.png)")
    return mean
