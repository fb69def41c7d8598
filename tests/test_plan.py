"""The planner: its decisions on small synthetic fingerprints, the YAML it writes, and `volseg plan` end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml

from volseg import plan as P
from volseg.cli import main
from volseg.errors import UserError
from volseg.recipe import load_recipe, recipe_from_dict


def _label(name: str, fraction: float, diameter_mm: float, n_cases: int, objects: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "voxel_fraction": fraction,
        "cases_present": n_cases,
        "objects_per_case_max": objects,
        "objects_per_case_median": float(objects),
        "object_diameter_mm": {"median": diameter_mm, "p10": 0.8 * diameter_mm, "min": 0.5 * diameter_mm},
    }


def make_fp(
    spacings: list[tuple[float, ...]],
    shapes: list[tuple[int, ...]],
    *,
    kept: float = 1.0,
    channels: int = 1,
    hu: bool = False,
    labels: dict[str, Any] | None = None,
    channel_names: list[str] | None = None,
    modality: str | None = None,
    foreground_mm: tuple[float, ...] | None = None,
) -> dict[str, Any]:
    """A fingerprint as :func:`volseg.plan.fingerprint` writes it; ``kept`` is the volume fraction that cropping to
    the nonzero region keeps; ``foreground_mm`` the labelled box of every case (default: the whole image)."""
    nd = len(shapes[0])
    cases = [
        {
            "case": f"case{i}",
            "spacing": list(sp),
            "shape": list(sh),
            "cropped_shape": [max(1, round(s * kept ** (1 / nd))) for s in sh],
            "foreground_mm": list(foreground_mm or [a * b for a, b in zip(sp, sh, strict=True)]),
        }
        for i, (sp, sh) in enumerate(zip(spacings, shapes, strict=True))
    ]
    if hu:
        ch = {"mean": 100.0, "std": 40.0, "p00_5": -60.0, "p99_5": 240.0, "image_p00_5": -1000.0, "image_min": -1024.0}
    else:
        ch = {"mean": 300.0, "std": 80.0, "p00_5": 20.0, "p99_5": 900.0, "image_p00_5": 0.0, "image_min": 0.0}
    n = len(cases)
    return {
        "version": 1,
        "name": "test",
        "spatial_dims": nd,
        "n_channels": channels,
        "channel_names": channel_names,
        "modality": modality,
        "n_cases": n,
        "cases": cases,
        "channels": [{"name": f"channel_{c}", **ch} for c in range(channels)],
        "labels": labels or {"0": {"name": "background", "voxel_fraction": 0.9}, "1": _label("organ", 0.1, 80.0, n)},
    }


def constant_timer(seconds: float = 0.5) -> P.StepTimer:
    return lambda model, patch, batch: seconds


def plan(fp: dict[str, Any], **kw: Any) -> P.Plan:
    kw.setdefault("step_timer", constant_timer())
    kw.setdefault("device", "cuda")
    if kw["device"] == "cuda":
        kw.setdefault("memory_gb", 8.0)
    result = P.plan_recipe(fp, **kw)
    recipe_from_dict(result.recipe)  # a plan is a recipe
    return result


def commented_keys(text: str) -> set[str]:
    """Dotted keys of the YAML text that have a comment line directly above them."""
    found, stack, prev_comment = set(), [], False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            prev_comment = True
            continue
        if not stripped:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key = stripped.split(":", 1)[0].strip('"')
        stack = stack[:depth] + [key]
        if prev_comment:
            found.add(".".join(stack))
        prev_comment = False
    return found


# --------------------------------------------------------------------------------------------------------
# Decisions


def test_isotropic_ct() -> None:
    fp = make_fp([(0.8, 0.8, 1.0)] * 6 + [(0.7, 0.7, 1.0)] * 4, [(512, 512, 200)] * 10, hu=True, kept=0.7)
    spacing, why = P.determine_target_spacing(fp)
    assert spacing == [0.8, 0.8, 1.0] and "median" in why
    result = plan(fp)
    data, model, train = result.recipe["data"], result.recipe["model"], result.recipe["train"]
    assert data["modality"] == "CT" and "Hounsfield" in result.reasons["data.modality"]
    assert data["intensity"] == {"a_min": -60.0, "a_max": 240.0}  # the foreground's 0.5 / 99.5 percentiles
    assert data["orientation"] == "RAS"
    assert model["args"]["strides"] == [2] * len(model["args"]["strides"]) and "kernel_size" not in model["args"]
    assert len(model["args"]["channels"]) == len(model["args"]["strides"]) + 1 <= P.MAX_DEPTH + 1
    assert model["args"]["channels"][0] == 32 and max(model["args"]["channels"]) <= 320
    depth = len(model["args"]["strides"])
    assert all(p % 2**depth == 0 for p in train["patch_size"])
    batch = train["batch_size"] * train["samples_per_volume"]
    assert batch >= 2
    strides = [[2, 2, 2]] * depth
    need = P.estimate_training_bytes(train["patch_size"], strides, model["args"]["channels"], 1, 2, batch)
    assert need + P.RESERVED_BYTES["cuda"] <= 8e9


def test_anisotropic_mr_skips_the_thick_axis_first() -> None:
    fp = make_fp([(0.9, 0.9, 5.0)] * 10, [(256, 256, 30)] * 10, kept=0.5, channel_names=["T2"], modality="MR")
    spacing, _ = P.determine_target_spacing(fp)
    assert spacing == [0.9, 0.9, 5.0]  # every case is 5 mm thick: the 10th percentile is 5 mm too
    strides, kernels, why = P.determine_topology([192, 192, 32], spacing)
    assert strides[0] == [2, 2, 1] and strides[1] == [2, 2, 1]  # z waits until x and y catch up (3.6 vs 5 mm)
    assert strides[2] == [2, 2, 2]
    assert kernels[0] == [3, 3, 1] and kernels[1] == [3, 3, 1] and kernels[2] == [3, 3, 3]
    assert "axis 2 not down-sampled" in why
    result = plan(fp)
    assert result.recipe["data"]["intensity"] == {"nonzero": True}  # cropping keeps half the volume
    first = result.recipe["model"]["args"]["strides"][0]
    assert first == [2, 2, 1]
    assert result.decisions["kernels_per_level"][0] == [3, 3, 1]


def test_anisotropic_target_spacing_takes_the_10th_percentile() -> None:
    fp = make_fp([(0.9, 0.9, 5.0)] * 8 + [(0.9, 0.9, 2.5)] * 2, [(256, 256, 30)] * 10)
    spacing, why = P.determine_target_spacing(fp)
    assert spacing == [0.9, 0.9, 2.5] and "10th percentile" in why
    # Thick slices but as many voxels along z as in-plane: nnU-Net's rule does not apply, the median stays.
    fp = make_fp([(0.9, 0.9, 5.0)] * 8 + [(0.9, 0.9, 2.5)] * 2, [(256, 256, 200)] * 10)
    spacing, why = P.determine_target_spacing(fp)
    assert spacing == [0.9, 0.9, 5.0] and "10th percentile" not in why


def test_2d_pixel_data() -> None:
    fp = make_fp([(1.0, 1.0)] * 6, [(600, 400)] * 6)
    result = plan(fp, device="cpu", time_budget_s=1200)
    r = result.recipe
    assert r["model"]["spatial_dims"] == 2 and len(r["train"]["patch_size"]) == 2
    assert r["data"]["spacing"] is None and r["data"]["orientation"] is None
    assert r["model"]["args"]["channels"][0] == 16  # smaller on a CPU
    assert max(r["model"]["args"]["channels"]) <= 256
    assert all(p <= 640 for p in r["train"]["patch_size"])
    # Fluorescence microscopy (as dataset.json names it): each image's own percentiles, no crop.
    fp["modality"] = "microscopy"
    r = plan(fp, device="cpu").recipe
    assert r["data"]["modality"] == "microscopy" and r["data"]["intensity"] == {"percentile": [1.0, 99.5]}
    assert r["data"]["crop_foreground"] is False


def test_multichannel_mr() -> None:
    names = ["FLAIR", "T1w", "T1gd", "T2w"]
    fp = make_fp([(1.0, 1.0, 1.0)] * 5, [(240, 240, 155)] * 5, channels=4, kept=0.4, channel_names=names)
    fp["modality"] = None
    modality, _ = P.determine_modality({**fp, "modality": "MR"})
    assert modality == "MR"
    result = plan({**fp, "modality": "MR"}, device="cpu", time_budget_s=3600)
    r = result.recipe
    assert r["model"]["in_channels"] == 4 and r["data"]["modality"] == "MR"
    assert r["data"]["intensity"] == {"nonzero": True}
    assert "per channel" in result.reasons["data.intensity"]
    # Without dataset.json and with MR-like intensities: per-case z-score too, never a CT window.
    assert "a_min" not in plan(fp, device="cpu").recipe["data"]["intensity"]


def _liver_and_lesions(n: int = 8) -> dict[str, Any]:
    return {
        "0": {"name": "background", "voxel_fraction": 0.95},
        "1": _label("liver", 0.05, 150.0, n),
        "2": _label("lesion", 0.0005, 4.0, n, objects=5),
    }


def test_small_objects_in_a_small_region_plan_a_cascade() -> None:
    # 358 x 358 x 400 mm images, the liver's box 200 x 180 x 200 mm: with 20 mm margins the crop is 26% of the image.
    fp = make_fp([(0.7, 0.7, 1.0)] * 8, [(512, 512, 400)] * 8, hu=True, labels=_liver_and_lesions(),
                 foreground_mm=(200.0, 180.0, 200.0))  # fmt: skip
    result = plan(fp, time_budget_s=3600.0)
    cascade = result.decisions["cascade"]
    assert "lesion" in cascade["small_labels"] and "liver" not in cascade["small_labels"]
    assert cascade["stages"] == 2 and cascade["applied"] is True
    assert 0.2 < cascade["roi_fraction"] < 0.3
    r = result.recipe
    target = cascade["fine_spacing"]
    assert r["cascade"]["spacing"] == target
    # The coarse stage: the finest axis times COARSE_FACTOR at least, and every axis at least as coarse as the target.
    coarse = r["data"]["spacing"]
    assert min(coarse) >= P.COARSE_FACTOR * min(target) - 1e-6 and all(
        c >= t for c, t in zip(coarse, target, strict=True)
    )
    # The fine stage's patch is no larger than its crops at the target spacing (plus rounding to the strides).
    crop_vox = [(f + 2 * P.CASCADE_MARGIN_MM) / t for f, t in zip((200.0, 180.0, 200.0), target, strict=True)]
    assert all(p <= c + 32 for p, c in zip(r["cascade"]["patch_size"], crop_vox, strict=True))
    assert r["cascade"]["sampler"] == "class_balanced" and r["train"]["sampler"] == "pos_neg"
    assert any("Cascade" in h and "coarse stage" in h for h in result.header)
    assert all(f"cascade.{k}" in result.reasons for k in r["cascade"])  # every fine-stage value explained
    # The plan is a recipe, and its fine stage one too.
    from volseg.cascade import fine_recipe
    from volseg.recipe import recipe_from_dict

    fine = fine_recipe(recipe_from_dict(r))
    assert list(fine.data.spacing) == target and fine.train.sampler == "class_balanced"
    # The small lesions get more of the fine stage's crops and more weight in its loss; the coarse stage neither.
    assert fine.train.class_ratios == {"lesion": P.SMALL_LABEL_CROP_WEIGHT}
    assert fine.train.loss.class_weights == {"lesion": P.SMALL_LABEL_LOSS_WEIGHT}
    assert "class_ratios" not in r["train"] and "class_weights" not in r["train"]["loss"]
    assert "lesion" in result.reasons["cascade.class_weights"]
    # the fine stage chooses the lesion's label bias on its validation cases; the coarse stage does not calibrate
    assert fine.train.calibrate == ["lesion"] and "calibrate" not in r["train"]
    assert "label bias" in result.reasons["cascade.calibrate"]
    # both stages keep their final weights (nnU-Net's checkpoint_final), not the noisy best validation epoch
    assert r["train"]["weights"] == "final" and fine.train.weights == "final"
    assert "final" in result.reasons["train.weights"]
    assert result.recipe["infer"]["postprocess"]["largest_component"] == ["liver"]
    flips = r["train"]["augment"].get("flip_axes", [0, 1, 2]) if r["train"]["augment"]["flip"] else []
    assert r["infer"]["tta_flips"] == flips and "infer.tta_flips" in result.reasons
    # Each stage's trainer keeps to its share of the budget, less the start-up cost.
    coarse_s = 3600.0 * P.CASCADE_COARSE_SHARE
    assert r["train"]["time_budget_s"] == pytest.approx(coarse_s - P.FIXED_SECONDS)
    assert fine.train.time_budget_s == pytest.approx(3600.0 - coarse_s - P.FIXED_SECONDS)
    assert "caching" in result.reasons["train.time_budget_s"] and "cascade.time_budget_s" in result.reasons


def test_the_cpu_fit_holds_a_cascade_stages_patch_near_its_coverage_floor() -> None:
    def measure(patch: list[int], strides: Any, kernels: Any) -> float:
        return float(np.prod(patch)) / 1e6  # 100^3 voxels: 1 s

    start, sp = [128, 128, 64], [1.0, 1.0, 2.0]
    budget, its = 600.0, 1000
    allowed = P._budget_step(budget, its)
    alone = allowed * 1e6  # the volume the budget alone allows
    free, *_ = P._fit_cpu_budget(start, sp, 3, budget, measure, its)
    assert np.prod(free) <= alone
    # A coverage floor above that volume holds the patch near the floor: a slower step, fewer iterations.
    held, _, _, step, why = P._fit_cpu_budget(start, sp, 3, budget, measure, its, min_voxels=1.6 * alone)
    assert 0.6 * 1.6 * alone <= np.prod(held) <= 1.6 * alone and step > allowed
    assert "fewer iterations instead" in why and "fewer iterations instead" not in P._fit_cpu_budget(
        start, sp, 3, budget, measure, its)[4]  # fmt: skip
    # ... but never below half the iterations: a floor far above the budget is capped at twice its volume.
    capped, _, _, step, _ = P._fit_cpu_budget(start, sp, 3, budget, measure, its, min_voxels=50 * alone)
    assert np.prod(capped) <= 2 * alone and step <= allowed / P.CASCADE_MIN_ITERATION_SHARE


def test_the_cpu_fit_caps_a_patch_at_max_voxels_and_spends_the_budget_on_iterations() -> None:
    def measure(patch: list[int], strides: Any, kernels: Any) -> float:
        return float(np.prod(patch)) / 1e8  # a fast machine: the budget alone would keep the whole patch

    start, sp = [128, 128, 64], [1.0, 1.0, 2.0]
    free, *_ = P._fit_cpu_budget(start, sp, 3, 600.0, measure, 1000, min_voxels=0.4 * np.prod(start))
    assert free == start
    cap = 0.45 * float(np.prod(start))
    capped, _, _, step, why = P._fit_cpu_budget(
        start, sp, 3, 600.0, measure, 1000, min_voxels=0.4 * np.prod(start), max_voxels=cap
    )
    assert 0.5 * cap <= np.prod(capped) <= cap and step < P._budget_step(600.0, 1000)
    assert "at most 45%" in why


def test_a_fast_cpu_caps_a_small_label_fine_stage_at_its_crop_coverage() -> None:
    fp = make_fp([(0.7, 0.7, 1.0)] * 8, [(512, 512, 400)] * 8, hu=True, labels=_liver_and_lesions(),
                 foreground_mm=(100.0, 90.0, 100.0))  # fmt: skip

    def fast(model: dict[str, Any], patch: tuple[int, ...], batch: int) -> float:
        return float(np.prod(patch)) / 1e9

    result = plan(fp, device="cpu", time_budget_s=3600.0, step_timer=fast)
    r = result.recipe
    target = result.decisions["cascade"]["fine_spacing"]
    crop = [(f + 2 * P.CASCADE_MARGIN_MM) / t for f, t in zip((100.0, 90.0, 100.0), target, strict=True)]
    coverage = np.prod(np.minimum(r["cascade"]["patch_size"], crop)) / np.prod(crop)
    assert coverage <= P.FINE_MAX_COVERAGE + 0.02
    assert "at most 45% of its median crop" in result.reasons["cascade.patch_size"]
    # the coarse stage (no small objects to choose crops for) is not capped
    assert "median crop" not in result.reasons["train.patch_size"]


def test_a_slow_cpu_keeps_more_of_a_cascade_stages_patch_and_gives_up_iterations() -> None:
    fp = make_fp([(0.7, 0.7, 1.0)] * 8, [(512, 512, 400)] * 8, hu=True, labels=_liver_and_lesions(),
                 foreground_mm=(200.0, 180.0, 200.0))  # fmt: skip
    div = 2e6

    def slow(model: dict[str, Any], patch: tuple[int, ...], batch: int) -> float:
        return float(np.prod(patch)) / div

    result = plan(fp, device="cpu", time_budget_s=840.0, step_timer=slow)
    from volseg.cascade import fine_recipe

    fine = fine_recipe(recipe_from_dict(result.recipe))
    fine_budget = 840.0 * (1 - P.CASCADE_COARSE_SHARE)
    alone = P._budget_step(fine_budget, P.FINE_MIN_ITERATIONS) * div  # the patch volume the budget alone allows
    assert np.prod(fine.train.patch_size) > 1.2 * alone
    assert "fewer iterations instead" in result.reasons["cascade.patch_size"]
    iterations = fine.train.max_epochs * fine.train.iterations_per_epoch
    assert P.CASCADE_MIN_ITERATION_SHARE * P.FINE_MIN_ITERATIONS * 0.8 <= iterations < P.FINE_MIN_ITERATIONS


def test_small_objects_filling_the_image_keep_one_stage() -> None:
    # The labelled box is the whole image: a crop saves nothing, the small objects are flagged, one stage.
    fp = make_fp([(0.7, 0.7, 1.0)] * 8, [(512, 512, 400)] * 8, hu=True, labels=_liver_and_lesions())
    result = plan(fp)
    cascade = result.decisions["cascade"]
    assert cascade["stages"] == 1 and cascade["applied"] is False and "lesion" in cascade["small_labels"]
    assert "cascade" not in result.recipe
    assert "would not save" in cascade["reason"]
    assert result.recipe["train"]["sampler"] == "class_balanced"
    assert result.recipe["train"]["class_ratios"] == {"lesion": P.SMALL_LABEL_CROP_WEIGHT}
    assert result.recipe["train"]["loss"]["class_weights"] == {"lesion": P.SMALL_LABEL_LOSS_WEIGHT}
    assert result.recipe["train"]["calibrate"] == ["lesion"] and "label bias" in result.reasons["train.calibrate"]
    # A single object per case gets largest-component filtering; a label with several objects does not.
    assert result.recipe["infer"]["postprocess"]["largest_component"] == ["liver"]


def test_two_dimensional_data_never_cascade() -> None:
    labels = {"0": {"name": "background", "voxel_fraction": 0.9}, "1": _label("cell", 0.1, 3.0, 6, objects=40)}
    fp = make_fp([(1.0, 1.0)] * 6, [(2048, 2048)] * 6, labels=labels, foreground_mm=(100.0, 100.0))
    result = plan(fp)
    assert result.decisions["cascade"]["applied"] is False and "cascade" not in result.recipe
    assert "time_budget_s" not in result.recipe["train"]  # no budget: the planned epochs as written


def test_time_budget_sets_the_epochs() -> None:
    fp = make_fp([(1.0, 1.0, 1.0)] * 10, [(128, 128, 128)] * 10)
    kw = {"step_seconds": 0.5, "patch": [96, 96, 96], "spacing": [1.0, 1.0, 1.0], "val_fraction": 0.2}
    short, why = P.determine_schedule(fp, budget_seconds=P.parse_duration("20m"), **kw)
    long, _ = P.determine_schedule(fp, budget_seconds=P.parse_duration("2h"), **kw)
    iters = (1200 * (1 - P.VALIDATION_SHARE) - P.FIXED_SECONDS) / (0.5 * P.LOADING_OVERHEAD)
    bare = iters * P.LOADING_OVERHEAD  # what the budget holds at the bare step: the most the trainer may train
    ipe = short["iterations_per_epoch"]
    assert bare - ipe <= short["max_epochs"] * ipe <= bare
    assert ipe == int(iters // 20)  # epochs sized so that about 20 remain at the expected step
    assert "max_epochs" in why and "trainer's budget" in why
    assert long["max_epochs"] * long["iterations_per_epoch"] > 5 * short["max_epochs"] * short["iterations_per_epoch"]
    assert short["iterations_per_epoch"] <= 250 and short["max_epochs"] >= 20
    assert "20 min" in why
    none, why = P.determine_schedule(fp, budget_seconds=None, **kw)
    assert none == {"max_epochs": 1000, "iterations_per_epoch": 250, "val_interval": 10} and "nnU-Net" in why
    with pytest.raises(UserError):
        P.determine_schedule(fp, budget_seconds=20, **kw)


def test_cpu_budget_shrinks_a_slow_patch() -> None:
    fp = make_fp([(1.0, 1.0, 1.0)] * 6, [(160, 160, 160)] * 6)
    timed: list[tuple[int, ...]] = []

    def timer(model: dict[str, Any], patch: tuple[int, ...], batch: int) -> float:
        timed.append(patch)
        return float(np.prod(patch)) / 2e5  # seconds grow with the patch volume

    unlimited = plan(fp, device="cpu", step_timer=timer)
    timed.clear()
    result = plan(fp, device="cpu", time_budget_s=600, step_timer=timer)
    patch = result.recipe["train"]["patch_size"]
    assert np.prod(patch) < np.prod(unlimited.recipe["train"]["patch_size"])
    assert len(timed) >= 2 and list(timed[-1]) == patch  # a reference patch, then the chosen one (per spacing tried)
    assert "shrank" in result.reasons["train.patch_size"]
    assert timer({}, tuple(patch), 2) <= P._budget_step(600)
    # A generous budget keeps the memory model's patch.
    roomy = plan(fp, device="cpu", time_budget_s=100 * 3600, step_timer=timer)
    assert roomy.recipe["train"]["patch_size"] == unlimited.recipe["train"]["patch_size"]


def test_a_slow_cpu_gets_fewer_iterations_not_a_tiny_patch() -> None:
    def slow(model: dict[str, Any], patch: tuple[int, ...], batch: int) -> float:
        return float(np.prod(patch)) / 2e3  # a busy machine: 64^2 pixels take 2 s

    flat = plan(make_fp([(1.0, 1.0)] * 6, [(512, 512)] * 6), device="cpu", time_budget_s=240, step_timer=slow)
    assert min(flat.recipe["train"]["patch_size"]) >= P.MIN_CPU_PATCH[2]
    cube = plan(make_fp([(1.0, 1.0, 1.0)] * 6, [(160, 160, 160)] * 6), device="cpu", time_budget_s=240,
                step_timer=lambda m, p, b: float(np.prod(p)) / 4e3)  # fmt: skip  # 32^3 voxels: 8 s
    assert min(cube.recipe["train"]["patch_size"]) >= P.MIN_CPU_PATCH[3]
    # The schedule follows the slow step: far fewer than the 500 iterations a fast machine would get.
    sched = cube.recipe["train"]
    assert sched["max_epochs"] * sched["iterations_per_epoch"] < P.MIN_ITERATIONS


def test_a_cpu_budget_too_small_for_the_target_spacing_coarsens_the_fine_axes() -> None:
    # MR-like: 0.9 x 0.9 x 5 mm, 260 x 210 x 36 voxels, one large organ (no cascade: its box is most of the image).
    fp = make_fp([(0.9, 0.9, 5.0)] * 8, [(260, 210, 36)] * 8)

    def timer(model: dict[str, Any], patch: tuple[int, ...], batch: int) -> float:
        return float(np.prod(patch)) / 5e5  # 64 x 96 x 32 voxels: 0.4 s

    tight = plan(fp, device="cpu", time_budget_s=240, step_timer=timer)
    sp = tight.recipe["data"]["spacing"]
    assert sp[0] > 0.9 * 1.2 and sp[0] == sp[1] and sp[2] == pytest.approx(5.0)  # in-plane only, z kept
    assert "coarsened" in tight.reasons["data.spacing"]
    assert "cascade" not in tight.recipe
    median = np.array([260 * 0.9 / sp[0], 210 * 0.9 / sp[1], 36.0])
    coverage = np.prod(np.minimum(tight.recipe["train"]["patch_size"], median)) / np.prod(median)
    assert coverage > 0.15  # the target spacing's patch covered under 10%
    # A budget that affords the patch, or a GPU, keeps the target spacing.
    roomy = plan(fp, device="cpu", time_budget_s=100 * 3600, step_timer=timer)
    assert roomy.recipe["data"]["spacing"][0] == pytest.approx(0.9)
    assert plan(fp).recipe["data"]["spacing"][0] == pytest.approx(0.9)  # cuda


def test_parse_duration() -> None:
    assert P.parse_duration("20m") == 1200 and P.parse_duration("1h30m") == 5400
    assert P.parse_duration("90") == 90 and P.parse_duration("1.5h") == 5400
    with pytest.raises(UserError):
        P.parse_duration("soon")


def test_yaml_round_trip_and_a_comment_on_every_decision() -> None:
    labels = {
        "0": {"name": "background", "voxel_fraction": 0.9},
        "255": _label("Left Atrium: wall", 0.1, 40.0, 4),  # gaps in the values, and a name needing quotes
    }
    result = plan(make_fp([(1.25, 1.25, 2.5)] * 4, [(160, 160, 90)] * 4, labels=labels), device="cpu")
    text = P.recipe_yaml(result)
    assert yaml.safe_load(text) == result.recipe
    assert result.recipe["data"]["label_map"] == {255: 1}
    missing = set(result.reasons) - commented_keys(text)
    assert not missing
    assert all(len(line) <= 120 for line in text.splitlines())


# --------------------------------------------------------------------------------------------------------
# End to end


def _phantoms(root: Path, n: int = 4) -> Path:
    from volseg.data.synth import liver_ct_phantom

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(n):
        ph = liver_ct_phantom(i, shape=(40, 40, 24))
        nib.save(nib.Nifti1Image(ph.image, ph.affine), root / "images" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(ph.label, ph.affine), root / "labels" / f"case{i}.nii.gz")
    return root


def test_fingerprint_of_phantoms(tmp_path: Path) -> None:
    fp = P.fingerprint_dataset(_phantoms(tmp_path / "ds"))
    assert fp["n_cases"] == 4 and fp["spatial_dims"] == 3 and fp["n_channels"] == 1
    assert set(fp["labels"]) == {"0", "1", "2"}
    assert all(len(c["spacing"]) == 3 and c["shape"] for c in fp["cases"])
    assert fp["labels"]["1"]["objects_per_case_max"] == 1
    assert P.determine_modality(fp)[0] == "CT"  # HU-like intensities, no dataset.json
    ch = fp["channels"][0]
    assert ch["p00_5"] < ch["mean"] < ch["p99_5"]
    # The labelled extent in mm, RAS order: the box of the label's voxels times the spacing.
    import nibabel as nib

    lab = nib.load(tmp_path / "ds" / "labels" / "case0.nii.gz")
    idx = np.argwhere(np.asarray(lab.dataobj) > 0)
    stored = (idx.max(0) - idx.min(0) + 1) * np.asarray(lab.header.get_zooms()[:3])
    ornt = nib.orientations.io_orientation(lab.affine)[:, 0].astype(int)  # stored axis -> RAS axis
    ras = np.zeros(3)
    ras[ornt] = stored
    np.testing.assert_allclose(fp["cases"][0]["foreground_mm"], ras, atol=0.02)
    assert all(
        0 < f <= s * n + 1e-6 for f, s, n in zip(ras, fp["cases"][0]["spacing"], fp["cases"][0]["shape"], strict=True)
    )
    # The same cases listed in a CSV give the same fingerprint, named after the CSV.
    rows = [f"images/case{i}.nii.gz,labels/case{i}.nii.gz" for i in range(4)]
    (tmp_path / "ds" / "cases.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    from_csv = P.fingerprint_dataset(tmp_path / "ds" / "cases.csv")
    assert from_csv["name"] == "cases" and from_csv["cases"] == fp["cases"] and from_csv["labels"] == fp["labels"]


def test_volseg_plan_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "measure_step_seconds", lambda *a, **k: 0.05)
    data = _phantoms(tmp_path / "liver")
    out = tmp_path / "configs" / "liver_plan.yaml"
    rc = main(["plan", "--data", str(data), "-o", str(out), "--device", "cpu", "--time-budget", "10m"])
    assert rc == 0
    recipe = load_recipe(out)
    assert recipe.name == "liver_plan" and recipe.data.modality == "CT"  # named after the file
    fp_path = tmp_path / "configs" / "liver_plan.fingerprint.json"
    fp = json.loads(fp_path.read_text())
    assert fp["n_cases"] == 4 and "cascade" in fp["plan"]
    missing = set(fp["plan"]["reasons"]) - commented_keys(out.read_text())
    assert not missing
    assert main(["check-recipe", str(out)]) == 0


def test_train_without_config_needs_data() -> None:
    assert main(["train"]) == 2


@pytest.mark.slow
def test_train_plans_when_no_recipe_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _phantoms(tmp_path / "liver")
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--out", str(run), "--device", "cpu", "--time-budget", "5m"]
    args += ["--set", "train.max_epochs=1", "--set", "train.iterations_per_epoch=2", "--set", "train.num_workers=0"]
    # The phantoms' tumours are small objects: the plan has two stages, and the fine one has its own schedule.
    args += ["--set", "cascade.max_epochs=1", "--set", "cascade.iterations_per_epoch=2"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"recipe: {run / P.PLAN_FILE}" in printed
    assert (run / P.PLAN_FILE).is_file() and (run / "volseg_plan.fingerprint.json").is_file()
    assert (run / "models" / "model.pt").is_file() and (run / "stages" / "fine" / "models" / "model.pt").is_file()


def test_whole_image_z_score_is_not_cropped() -> None:
    fp = make_fp([(1.0, 1.0, 1.0)] * 4, [(100, 100, 100)] * 4, kept=0.85)
    intensity, _ = P.determine_normalization(fp, "MR", 0.85)
    assert intensity == {"nonzero": False}  # cropping keeps more than 3/4: z-score over the whole image
    crop, kept, why = P.determine_crop(fp, intensity)
    assert crop is False and kept == pytest.approx(0.85, abs=0.02) and "above the mean" in why
    assert P.determine_crop(fp, {"nonzero": True})[0] is True


def _msd_brain(root: Path, n: int = 3) -> Path:
    """A 4-channel MR data set in the MSD layout (one 4D NIfTI per case), background zero outside a box."""
    rng = np.random.default_rng(0)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    affine = np.diag([1.2, 1.2, 2.0, 1.0])
    training = []
    for i in range(n):
        image = np.zeros((24, 24, 12, 4), np.float32)
        image[4:20, 4:20, 2:10] = rng.normal(100, 10, (16, 16, 8, 4)) + np.array([0, 200, 400, 600])
        label = np.zeros((24, 24, 12), np.uint8)
        label[8:14, 8:14, 4:8] = 1
        label[10:12, 10:12, 5:7] = 2
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"brain_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"brain_{i}.nii.gz")
        training.append({"image": f"./imagesTr/brain_{i}.nii.gz", "label": f"./labelsTr/brain_{i}.nii.gz"})
    meta = {
        "name": "BrainTumour",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "enhancing tumour"},
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_fingerprint_and_plan_of_multichannel_msd(tmp_path: Path) -> None:
    fp = P.fingerprint_dataset(_msd_brain(tmp_path / "Task01"))
    assert fp["n_channels"] == 4 and fp["modality"] == "MR" and fp["name"] == "BrainTumour"
    means = [c["mean"] for c in fp["channels"]]
    assert means == sorted(means) and means[3] - means[0] > 500  # per-channel statistics
    assert fp["cases"][0]["cropped_shape"] == [16, 16, 8]
    assert fp["labels"]["2"]["name"] == "enhancing tumour"
    result = plan(fp, device="cpu")
    r = result.recipe
    assert r["model"]["in_channels"] == 4 and r["data"]["modality"] == "MR"
    assert list(r["data"]["labels"]) == ["background", "edema", "enhancing tumour"]
    assert r["data"]["intensity"] == {"nonzero": True} and r["data"]["crop_foreground"] is True
    assert r["data"]["spacing"] == [1.2, 1.2, 2.0]
    assert yaml.safe_load(P.recipe_yaml(result)) == r


@pytest.mark.slow
def test_measured_step() -> None:
    model = {"name": "unet", "spatial_dims": 2, "in_channels": 1, "args": {"channels": [8, 16], "strides": [2]}}
    seconds = P.measure_step_seconds(model, (32, 32), 2, n_classes=2, steps=1)
    assert 0 < seconds < 60


def test_foreground_sampling_is_uniform_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "_CHUNK", 1000)  # several blocks
    rng = np.random.default_rng(0)
    mask = rng.random(10_500) < 0.3
    picked = P._sample_nonzero(mask, 500, rng)
    assert picked.size == 500 and np.unique(picked).size == 500 and mask[picked].all()
    assert abs(np.mean(picked) - np.mean(np.flatnonzero(mask))) < 400  # spread over all blocks
    everything = P._sample_nonzero(mask, 10**6, rng)
    assert np.array_equal(np.sort(everything), np.flatnonzero(mask))
    assert P._sample_nonzero(np.zeros(10, bool), 5, rng).size == 0


def test_plan_of_2d_microscopy_pngs(tmp_path: Path) -> None:
    from volseg.data.synth import write_dataset

    root = write_dataset(tmp_path / "cells", task="cells", n=3, seed=0)
    root = root.parent if root.is_file() else root
    fp = P.fingerprint_dataset(root)
    assert fp["spatial_dims"] == 2 and fp["modality"] == "microscopy"
    r = plan(fp, device="cpu").recipe
    assert r["model"]["spatial_dims"] == 2 and r["data"]["spacing"] is None and r["data"]["orientation"] is None
    assert r["data"]["labels"] == {"background": {"value": 0}, "cell": {"value": 1}}


def test_training_plan_is_kept_on_resume_and_never_replanned_over_a_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from volseg.train import LAST

    run = tmp_path / "run"
    (run / LAST).parent.mkdir(parents=True)
    (run / LAST).write_bytes(b"checkpoint")
    (run / P.PLAN_FILE).write_text("name: old\n")

    def no_planning(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("planned again")

    monkeypatch.setattr(P, "run_plan", no_planning)
    assert P.plan_for_training(tmp_path / "data", run, resume=True) == run / P.PLAN_FILE
    with pytest.raises(UserError, match="already holds a training"):
        P.plan_for_training(tmp_path / "data", run, resume=False)
    assert (run / P.PLAN_FILE).read_text() == "name: old\n"


def test_unet_kernel_takes_the_majority_per_axis() -> None:
    kernel, why = P._kernel_for_unet([[3, 3, 1], [3, 3, 1], [3, 3, 1], [3, 3, 3]])
    assert kernel == [3, 3, 1] and "one size" in why
    assert P._kernel_for_unet([[3, 3, 1], [3, 3, 3], [3, 3, 3]])[0] == 3


@pytest.mark.slow
def test_planned_anisotropic_network_runs() -> None:
    import torch

    from volseg.nets import create_network

    fp = make_fp([(0.5, 0.5, 6.0)] * 6, [(320, 320, 20)] * 6, kept=0.5)
    result = plan(fp, device="cpu", memory_gb=2.0)
    model, patch = result.recipe["model"], result.recipe["train"]["patch_size"]
    assert model["args"]["strides"][0] == [2, 2, 1] and model["args"]["kernel_size"] == [3, 3, 1]
    args = {**model["args"], "channels": [4 * (i + 1) for i in range(len(model["args"]["channels"]))]}
    net = create_network("unet", 3, 1, 2, args)
    with torch.no_grad():
        out = net(torch.zeros(1, 1, *patch))
    assert tuple(out.shape) == (1, 2, *patch)


def test_largest_component_filtering_ignores_specks_but_not_second_organs() -> None:
    # The liver's largest object holds 99% of it in every case (specks at its edge): still one object. The
    # kidneys are two objects of similar size: never filtered.
    liver = {**_label("liver", 0.05, 120.0, 6, objects=3), "largest_object_share_min": 0.99}
    kidney = {**_label("kidney", 0.01, 45.0, 6, objects=2), "largest_object_share_min": 0.52}
    vessel = {**_label("vessel", 0.01, 20.0, 6, objects=4), "largest_object_share_min": P.SINGLE_OBJECT_SHARE - 0.01}
    fp_labels = {"0": {"name": "background", "voxel_fraction": 0.93}, "1": liver, "2": kidney, "3": vessel}
    keep, why = P.determine_postprocess({"labels": fp_labels})
    assert keep == ["liver"] and "specks" in why
    # A fingerprint without the share (written by an older volseg) counts objects only.
    old = {"0": fp_labels["0"], "1": _label("liver", 0.05, 120.0, 6, objects=3)}
    assert P.determine_postprocess({"labels": old})[0] == []


def test_fingerprint_records_the_largest_objects_share(tmp_path: Path) -> None:
    import nibabel as nib

    root = tmp_path / "ds"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(2):
        label = np.zeros((40, 40, 20), np.uint8)
        label[5:25, 5:25, 5:15] = 1  # 4000 voxels
        label[30:32, 30:32, 2:3] = 1  # a 4-voxel speck apart from it
        image = np.where(label > 0, 100.0, 0.0).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "images" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labels" / f"case{i}.nii.gz")
    fp = P.fingerprint_dataset(root)
    lab = fp["labels"]["1"]
    assert lab["objects_per_case_max"] == 2
    assert lab["largest_object_share_min"] == pytest.approx(4000 / 4004, rel=1e-6)
    assert P.determine_postprocess(fp)[0] == [lab["name"]]


def _sided_fp(centres: list[list[float]], nd: int = 3) -> dict:
    return {
        "spatial_dims": nd,
        "labels": {
            "0": {"name": "background"},
            "1": {"name": "organ", "cases_present": len(centres), "centre_fraction_per_case": centres},
        },
    }


def test_mirroring_skips_axes_where_a_label_is_always_on_one_side() -> None:
    from volseg.plan import determine_augmentation

    # Always right of the middle along axis 0 and above it along axis 2; either side along axis 1.
    centres = [[0.62, 0.45, 0.7], [0.66, 0.55, 0.6], [0.58, 0.52, 0.65], [0.7, 0.47, 0.72], [0.6, 0.53, 0.68]]
    aug, why = determine_augmentation(_sided_fp(centres), [1.0, 1.0, 1.0], [64, 64, 64])
    assert aug["flip_axes"] == [1] and aug["flip"] == 0.5
    assert "left-right" in why and "superior-inferior" in why and "organ" in why
    # Test-time mirroring along the axes training mirrors (nnU-Net's), and none without mirrored training.
    assert P.determine_test_mirroring(aug, 3)[0] == [1]
    assert P.determine_test_mirroring({"flip": 0.5}, 3)[0] == [0, 1, 2]
    # Every axis one-sided: no mirroring at all.
    aug, _ = determine_augmentation(_sided_fp([[0.7, 0.3, 0.8]] * 5), [1.0, 1.0, 1.0], [64, 64, 64])
    assert aug["flip"] == 0.0 and aug["flip_axes"] == []
    mirror, why = P.determine_test_mirroring(aug, 3)
    assert mirror == [] and "does not mirror" in why


def test_mirroring_kept_for_centred_labels_few_cases_and_old_fingerprints() -> None:
    from volseg.plan import determine_augmentation

    centred = [[0.5 + 0.03 * (-1) ** i, 0.51, 0.49 + 0.02 * (-1) ** i] for i in range(6)]
    aug, _ = determine_augmentation(_sided_fp(centred), [1.0] * 3, [64] * 3)
    assert aug["flip"] == 0.5 and "flip_axes" not in aug
    # One side every time, but only 3 cases (chance): mirrored.
    aug, _ = determine_augmentation(_sided_fp([[0.7, 0.5, 0.5]] * 3), [1.0] * 3, [64] * 3)
    assert "flip_axes" not in aug
    # Just off the middle (median offset below the threshold): mirrored.
    aug, _ = determine_augmentation(_sided_fp([[0.52, 0.5, 0.5]] * 6), [1.0] * 3, [64] * 3)
    assert "flip_axes" not in aug
    # A fingerprint written before the centres were recorded: every axis, as before.
    fp = _sided_fp([[0.7, 0.5, 0.5]] * 6)
    del fp["labels"]["1"]["centre_fraction_per_case"]
    aug, _ = determine_augmentation(fp, [1.0] * 3, [64] * 3)
    assert "flip_axes" not in aug
    # 2D: the stored axes.
    aug, why = determine_augmentation(_sided_fp([[0.8, 0.5]] * 6, nd=2), [1.0, 1.0], [128, 128])
    assert aug["flip_axes"] == [1] and "axis 0" in why


def test_centre_fraction_follows_the_world_axes() -> None:
    from volseg.plan import _centre_fraction

    mask = np.zeros((10, 8, 6), bool)
    mask[7:9, 0:2, 2:4] = True  # high stored index along axis 0, low along axis 1
    ras = np.diag([2.0, 2.0, 3.0, 1.0])
    c = _centre_fraction(mask, ras)
    assert c == [0.8, 0.125, 0.5]
    lps = np.diag([-2.0, -2.0, 3.0, 1.0])  # stored axes 0 and 1 run towards -R and -A
    c = _centre_fraction(mask, lps)
    assert c == [0.2, 0.875, 0.5]


def test_flip_axes_reach_the_training_chain_and_are_checked() -> None:
    from volseg.data.transforms import train_sampling

    cfg = Path(__file__).resolve().parents[1] / "configs" / "liver_ct.yaml"

    def flipped(overrides: list[str]) -> list[int]:
        chain = train_sampling(load_recipe(cfg, ["train.augment.flip=0.5", *overrides]))
        return [t["spatial_axis"] for t in chain if t["_target_"] == "RandFlipd"]

    assert flipped(["train.augment.flip_axes=[1]"]) == [1]
    assert flipped([]) == [0, 1, 2]
    with pytest.raises(Exception, match="flip_axes"):
        load_recipe(cfg, ["train.augment.flip_axes=[0,0]"])
