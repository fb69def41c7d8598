"""Planning: a data set's fingerprint, and from it a recipe whose every decision says why.

The structure and the rules follow nnU-Net v2's experiment planner: a fingerprint of the data set (per case the
spacing, the shape and the shape after cropping to the nonzero region; per channel the foreground intensity
statistics; per label the voxel fraction and the connected objects), then one ``determine_*`` function per
decision, each returning ``(value, reason)``. What nnU-Net lacks is added: the plan is made for a device (a GPU
with a memory target, or the CPU), and for a time budget, from a measured training step.

The result is an ordinary recipe (the schema in :mod:`volseg.recipe` is the one contract), written as YAML with a
comment above every decided field, and the fingerprint is written as JSON beside it
(``NAME.yaml`` -> ``NAME.fingerprint.json``).

The recipe schema has one network stage. When nnU-Net would plan a low-resolution stage and a cascade, the plan
says so (in the recipe's header and in the fingerprint's ``plan.cascade``) and trains the full-resolution stage.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from volseg.data.channels import first_file
from volseg.errors import UserError

__all__ = [
    "Plan",
    "determine_augmentation",
    "determine_batch_size",
    "determine_cascade",
    "determine_crop",
    "determine_normalization",
    "determine_orientation",
    "determine_patch_size",
    "determine_postprocess",
    "determine_sampling",
    "determine_schedule",
    "determine_target_spacing",
    "determine_topology",
    "determine_widths",
    "estimate_training_bytes",
    "fingerprint",
    "fingerprint_dataset",
    "measure_step_seconds",
    "parse_duration",
    "plan_recipe",
    "recipe_yaml",
    "write_plan",
]

FINGERPRINT_VERSION = 1
#: Foreground voxels sampled per case and channel for the intensity statistics (nnU-Net samples 10,000).
VOXELS_PER_CASE = 10_000
#: nnU-Net's anisotropy threshold: an axis whose spacing is more than 3x the others' is treated apart.
ANISOTROPY_THRESHOLD = 3.0
#: An axis is not down-sampled while its spacing is more than 2x the finest one (nnU-Net).
POOL_SPACING_RATIO = 2.0
#: Down-sampling stops when an axis would fall below this many voxels (nnU-Net: 4).
MIN_FEATURE_MAP = 4
MAX_DEPTH = 5
#: Cropping to the nonzero region must keep less than this fraction of the median volume for the MR z-score to be
#: computed inside the nonzero mask (nnU-Net: 3/4).
NONZERO_MASK_SHRINK = 0.75
#: A patch covering less than this fraction of the median image calls for a coarse stage (nnU-Net: 1/4).
CASCADE_COVERAGE = 0.25
#: A cascade's crop: the labelled region plus this margin on every side (the coarse stage's error is a few voxels).
CASCADE_MARGIN_MM = 20.0
#: A cascade is planned only when its crops are at most this fraction of the median image.
CASCADE_MAX_ROI_FRACTION = 0.5
#: The coarse stage's share of a time budget (it only has to find the region).
CASCADE_COARSE_SHARE = 0.25
#: An object narrower than this many voxels at the target spacing counts as small.
SMALL_OBJECT_VOXELS = 6.0
#: Class-balanced crops: a small label's share relative to every other label's (train.class_ratios).
SMALL_LABEL_CROP_WEIGHT = 3.0
#: A small label's weight in the loss (train.loss.class_weights): its cross-entropy and its Dice term.
SMALL_LABEL_LOSS_WEIGHT = 3.0
#: A label whose largest object holds at least this share of it in every case counts as one object (the rest are
#: specks) for largest-component filtering.
SINGLE_OBJECT_SHARE = 0.95
#: Mirroring is decided from where the labels lie only with at least this many cases holding the label ...
MIRROR_MIN_CASES = 5
#: ... and an axis is one-sided for a label when its centre lies on one side of the middle in every case, by at
#: least this fraction of the image's extent on the median (the liver phantoms: 0.06-0.19 left-right).
ONE_SIDED_OFFSET = 0.05
#: Bytes kept for the backward pass per feature-map element (float32, about 12 tensors per element for MONAI's
#: residual U-Net: convolution, normalisation and activation outputs of two sub-units, the concatenation,
#: the up-convolution); AMP keeps about 60% of that.
ACTIVATION_BYTES = 4 * 12
AMP_FACTOR = 0.6
#: Memory not available to the training step: the CUDA context and allocator slack, the Python process on a CPU.
RESERVED_BYTES = {"cuda": 1.5e9, "cpu": 1.0e9}
#: nnU-Net's reference GPU memory target when the GPU cannot be asked.
DEFAULT_GPU_GB = 8.0
#: On a CPU the activations are kept this small (the step time, not the RAM, is what limits).
CPU_ACTIVATION_GB = 2.0
#: Share of the time budget left for validation, and the fixed cost of a training run (s): caching the data,
#: building the engines, exporting the bundle.
VALIDATION_SHARE = 0.1
FIXED_SECONDS = 20.0
#: A training iteration against the measured network step: loading and augmentation run in a loader process beside
#: the step, which on a small CPU takes a share of its cores, and the engines add their own work. Measured on 2
#: cores: the MR phantoms' planned recipe (128 x 128 x 32, 0.404 s measured) trained at 0.545 s per iteration
#: between validations (1.35x); the trainer keeps to its budget either way (``train.time_budget_s``).
LOADING_OVERHEAD = 1.35
#: On a CPU with a time budget the patch shrinks (re-measured) until the budget gives this many iterations.
MIN_ITERATIONS = 500
#: A cascade's fine stage with small objects: its patch is fitted to leave this many iterations in its budget.
#: Measured on the demo's liver phantoms (2 cores, 10 to 14 minutes): the tumour's Dice per case followed the fine
#: stage's iterations more than its patch (80 x 80 x 32 for 2268 iterations 0.575; 96 x 96 x 48 for 1260-2000
#: iterations 0.35-0.48), since each iteration is one more set of crops centred on the small label.
FINE_MIN_ITERATIONS = 2500
#: A cascade's coarse stage: its patch is fitted to leave this many iterations in its share of the budget.
COARSE_MIN_ITERATIONS = 1000
#: The CPU budget fit shrinks no patch axis below this (by dimension): a slow or busy machine then gets fewer
#: iterations rather than a patch too small to hold any context.
MIN_CPU_PATCH = {2: 64, 3: 32}
#: A cascade's stages: the CPU budget fit keeps each stage's patch at least this fraction of its median image (the
#: whole image for the coarse stage, the crop for the fine one); a slower machine gets fewer iterations instead.
#: On the demo's liver phantoms (2 cores) the patches that did well covered 44% (coarse 48^3, fine 80 x 80 x 32);
#: on a CPU 2.2x slower the fit for the same iterations shrank them to 20-21% (32 x 32 x 48, 48 x 64 x 32), and the
#: fine stage's liver leaked 30-40 mm into its neighbours (held-out liver Dice 0.92, precision 0.84-0.90).
CASCADE_MIN_COVERAGE = 0.4
#: ... but only while that leaves at least this share of the stage's iterations (a very slow machine, or a crop much
#: larger than the liver's, still shrinks the patch rather than train a few hundred steps).
CASCADE_MIN_ITERATION_SHARE = 0.5
#: A fine stage for small objects, on a CPU with a budget: its patch covers at most this fraction of the median crop,
#: so that the class-balanced crops centred on a small object still choose what the patch holds (a patch as large
#: as the crop holds the whole crop wherever it is centred), and the budget buys more iterations instead. On the
#: demo's liver phantoms the fine patches that covered 43% of the crop gave tumour Dice per case 0.55-0.61 (4 runs,
#: one machine), 55% 0.48-0.59 (another), 66-80% 0.44-0.47 (a third, 3 runs), and on that third machine, capped at
#: 45%, 0.56-0.59 (2 runs) with the liver unchanged.
FINE_MAX_COVERAGE = 0.45
#: A cascade's coarse stage multiplies the finest target spacing by at least this much.
COARSE_FACTOR = 3.0

Reason = str
Fingerprint = dict[str, Any]
StepTimer = Callable[[dict[str, Any], tuple[int, ...], int], float]
Floats = Sequence[float] | np.ndarray


# --------------------------------------------------------------------------------------------------------
# Fingerprint


def _dataset_meta(root: Path) -> dict[str, Any]:
    """Modality, channel names and label names from an MSD or nnU-Net ``dataset.json`` (empty when absent)."""
    js = root / "dataset.json" if root.is_dir() else None
    if js is None or not js.is_file():
        return {}
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, Any] = {"name": meta.get("name")}
    channels = meta.get("modality") or meta.get("channel_names") or {}
    if isinstance(channels, dict):
        out["channels"] = [str(channels[k]) for k in sorted(channels, key=lambda k: int(k) if str(k).isdigit() else 0)]
    labels = meta.get("labels")
    if isinstance(labels, dict):
        names: dict[int, str] = {}
        for k, v in labels.items():
            if str(k).isdigit():  # MSD: {"0": "background"}
                names[int(k)] = str(v)
            elif isinstance(v, int):  # nnU-Net v2: {"background": 0}
                names[v] = str(k)
        out["labels"] = names
    return out


def _ras_order(affine: np.ndarray, nd: int) -> list[int]:
    """For each stored axis, the world axis (R, A, S) it runs along most; the identity when that is ambiguous."""
    if nd != 3:
        return list(range(nd))
    order = [int(np.argmax(np.abs(affine[:3, i]))) for i in range(3)]
    return order if sorted(order) == [0, 1, 2] else [0, 1, 2]


def _nonzero_shape(image: np.ndarray, nd: int) -> list[int]:
    mask = image != 0
    if mask.ndim > nd:
        mask = mask.any(axis=tuple(range(nd, mask.ndim)))
    if not mask.any():
        return list(mask.shape)
    out = []
    for axis in range(nd):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(nd) if a != axis)))
        out.append(int(hit[-1] - hit[0] + 1))
    return out


def _foreground_mm(label: np.ndarray, spacing: np.ndarray, ras: list[int]) -> list[float]:
    """Extent in mm (RAS axis order) of the box around every labelled voxel; zeros when there is none."""
    fg = label > 0
    extent = []
    for a in ras:
        others = tuple(x for x in range(label.ndim) if x != a)
        hit = np.flatnonzero(fg.any(axis=others))
        extent.append(round(float((hit[-1] - hit[0] + 1) * spacing[a]), 2) if hit.size else 0.0)
    return extent


def _objects(mask: np.ndarray, spacing: Sequence[float]) -> list[float]:
    """Equivalent diameters (mm) of the connected objects of one label's mask."""
    from scipy import ndimage

    comp, n = ndimage.label(mask)
    if n == 0:
        return []
    sizes = np.bincount(comp.ravel())[1:].astype(np.float64) * float(np.prod(spacing))
    if mask.ndim == 3:
        return [float(d) for d in np.cbrt(6.0 * sizes / math.pi)]
    return [float(d) for d in np.sqrt(4.0 * sizes / math.pi)]


_CHUNK = 1 << 24  # voxels per block when sampling: bounds the index arrays


def _sample_nonzero(mask: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` distinct flat indices of the True voxels of a flat mask, uniformly, block by block (never an
    index array of the whole foreground)."""
    n = int(np.count_nonzero(mask))
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ranks = np.sort(rng.choice(n, min(k, n), replace=False))
    out, seen = [], 0
    for start in range(0, mask.size, _CHUNK):
        idx = np.flatnonzero(mask[start : start + _CHUNK])
        lo, hi = np.searchsorted(ranks, [seen, seen + idx.size])
        out.append(idx[ranks[lo:hi] - seen] + start)
        seen += idx.size
    return np.concatenate(out)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # The data check's reader: header first, every format volseg reads, one-line errors.
    from volseg.imageio import open_image as _open

    vol = _open(path)
    array = vol.voxels()
    if vol.scaling is not None:
        slope, inter = vol.scaling
        array = array.astype(np.float32) * np.float32(slope) + np.float32(inter)
    return array, vol.affine


def _read_case_image(image: Any) -> tuple[np.ndarray, np.ndarray]:
    """A case's image and affine; an image stored one file per channel (a list) is stacked channels last."""
    if not isinstance(image, list):
        return _read(Path(image))
    parts = [_read(Path(p)) for p in image]
    for (array, _), p in zip(parts[1:], image[1:], strict=True):
        if array.shape != parts[0][0].shape:
            raise UserError(f"channel shape {array.shape} differs from the first channel's {parts[0][0].shape}", p)
    return np.stack([array for array, _ in parts], axis=-1), parts[0][1]


def _read_case(
    case: dict[str, Any], nd_seen: int | None, n_channels: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A case's (channels-last image, squeezed label, affine), checked against the cases read before."""
    image, affine = _read_case_image(case["image"])
    label, _ = _read(Path(case["label"]))
    label = np.squeeze(label) if label.ndim > 2 else label
    nd = label.ndim
    if nd not in (2, 3):
        raise UserError(f"a label must be 2D or 3D, this one has shape {label.shape}", case["label"])
    if nd_seen is not None and nd != nd_seen:
        raise UserError(f"the labels mix {nd_seen}D and {nd}D", case["label"])
    if tuple(image.shape[:nd]) != tuple(label.shape):
        raise UserError(
            f"image shape {image.shape} does not match label shape {label.shape}", first_file(case["image"])
        )
    chans = image.reshape(image.shape[:nd] + (-1,)) if image.ndim > nd else image[..., None]
    if n_channels is not None and chans.shape[-1] != n_channels:
        raise UserError(f"{chans.shape[-1]} channel(s), the first case has {n_channels}", first_file(case["image"]))
    return chans, label, affine


def _case_geometry(case: dict[str, Any], chans: np.ndarray, label: np.ndarray, affine: np.ndarray) -> dict[str, Any]:
    """Spacing, shape, shape cropped to nonzero and labelled extent, in RAS axis order."""
    nd = label.ndim
    spacing = np.sqrt((affine[:nd, :nd] ** 2).sum(axis=0))
    ras = [0] * nd
    for stored, world in enumerate(_ras_order(affine, nd)):
        ras[world] = stored
    cropped = _nonzero_shape(chans, nd)
    return {
        "case": first_file(case["image"]).name,
        "spacing": [round(float(spacing[a]), 6) for a in ras],
        "shape": [int(label.shape[a]) for a in ras],
        "cropped_shape": [int(cropped[a]) for a in ras],
        "foreground_mm": _foreground_mm(label, spacing, ras),
    }


def _centre_fraction(mask: np.ndarray, affine: np.ndarray) -> list[float]:
    """Where a non-empty label's centre of mass lies in the image, as a fraction of its extent along each axis: RAS
    axes, each measured towards +R, +A, +S (3D), or the stored axes (2D). 0.5 is the middle."""
    from scipy import ndimage

    nd = mask.ndim
    centre = [0.5] * nd
    for stored, (com, world) in enumerate(zip(ndimage.center_of_mass(mask), _ras_order(affine, nd), strict=True)):
        frac = (float(com) + 0.5) / mask.shape[stored]
        centre[world] = round(1.0 - frac if nd == 3 and affine[world, stored] < 0 else frac, 4)
    return centre


def _count_labels(label: np.ndarray, affine: np.ndarray, stats: dict[int, dict[str, Any]], where: str) -> None:
    """Add a case's voxels per label value and its objects' sizes to ``stats``."""
    nd = label.ndim
    spacing = np.sqrt((affine[:nd, :nd] ** 2).sum(axis=0))
    # Integer labels are counted in their own type (no int64 copy of a large volume).
    values = label if np.issubdtype(label.dtype, np.integer) else np.rint(label).astype(np.int32)
    found, counts = np.unique(values, return_counts=True)
    if found.size and found[0] < 0:
        raise UserError("label values must not be negative", where)
    if found.size > 1000:
        raise UserError(f"{found.size} distinct label values: is this an image?", where)
    for value, count in zip(found.tolist(), counts.tolist(), strict=True):
        s = stats.setdefault(
            int(value), {"voxels": 0, "cases": 0, "objects": [], "per_case": [], "largest_share": [], "centre": []}
        )
        s["voxels"] += int(count)
        if value == 0:
            continue
        mask = values == value
        diam = _objects(mask, spacing)
        s["cases"] += 1
        s["objects"].extend(diam)
        s["per_case"].append(len(diam))
        sizes = np.asarray(diam, dtype=np.float64) ** nd  # proportional to each object's volume (area in 2D)
        s["largest_share"].append(float(sizes.max() / sizes.sum()))
        s["centre"].append(_centre_fraction(mask, affine))


def _channel_summary(fg: list[np.ndarray], everything: list[np.ndarray], name: str) -> dict[str, Any]:
    fgv = np.concatenate(fg) if fg else np.zeros(0)
    allv = np.concatenate(everything)
    src = fgv if fgv.size else allv
    return {
        "name": name,
        "mean": float(src.mean()),
        "std": float(src.std()),
        "p00_5": float(np.percentile(src, 0.5)),
        "p99_5": float(np.percentile(src, 99.5)),
        "image_p00_5": float(np.percentile(allv, 0.5)),
        "image_min": float(allv.min()),
    }


def _label_summary(value: int, s: dict[str, Any], name: str, total_voxels: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "voxel_fraction": s["voxels"] / total_voxels}
    if value:
        obj = np.asarray(s["objects"])
        entry.update(
            {
                "cases_present": s["cases"],
                "objects_per_case_max": int(max(s["per_case"])),
                "objects_per_case_median": float(np.median(s["per_case"])),
                # The smallest share of a case's label that its largest object holds (1: one object everywhere).
                "largest_object_share_min": float(min(s["largest_share"])),
                # Per case, where the label's centre lies (fractions of the image along each axis): mirroring
                # along an axis where it always lies on one side makes anatomy that never occurs.
                "centre_fraction_per_case": s["centre"],
                "object_diameter_mm": {
                    "median": float(np.median(obj)),
                    "p10": float(np.percentile(obj, 10)),
                    "min": float(obj.min()),
                },
            }
        )
    return entry


def _modality_from_names(channel_names: list[str] | None) -> str | None:
    if not channel_names:
        return None
    if len(channel_names) == 1 and channel_names[0].upper() == "CT":
        return "CT"
    if any(w in n.lower() for n in channel_names for w in ("microscop", "fluoresc")):
        return "microscopy"
    mr = ("MR", "MRI", "T1", "T2", "FLAIR", "T1W", "T2W", "T1GD", "ADC", "DWI")
    return "MR" if any(n.upper() in mr for n in channel_names) else "other"


def fingerprint(
    cases: Sequence[dict[str, str]],
    *,
    max_voxels: int = VOXELS_PER_CASE,
    seed: int = 0,
    meta: dict[str, Any] | None = None,
    echo: Callable[[str], None] | None = None,
) -> Fingerprint:
    """The data set's fingerprint, reading one case at a time.

    Args:
        cases: ``{"image", "label"}`` paths (as :func:`volseg.data.datalist.load_datalist` gives them).
        max_voxels: foreground voxels sampled per case and channel (and as many from the whole image), which bounds
            the memory of the intensity statistics.
        seed: seed of the voxel sampling.
        meta: what ``dataset.json`` says (modality, channel and label names), if anything.
        echo: progress lines.

    Returns:
        A JSON-ready dict: ``spatial_dims``, ``n_channels``, ``modality`` and ``channel_names`` (None when not
        given), ``cases`` (per case, in RAS axis order for 3D: ``spacing``, ``shape``, ``cropped_shape``,
        ``foreground_mm``: the extent of the labelled voxels),
        ``channels`` (foreground ``mean``, ``std``, ``p00_5``, ``p99_5``, and ``image_p00_5`` over the whole
        image), ``labels`` (per value: ``name``, ``voxel_fraction``, ``cases_present``, ``objects_per_case_max``,
        ``largest_object_share_min``, ``centre_fraction_per_case``, ``object_diameter_mm`` median, p10 and min).
    """
    meta = meta or {}
    rng = np.random.default_rng(seed)
    per_case: list[dict[str, Any]] = []
    fg_samples: list[list[np.ndarray]] = []
    all_samples: list[list[np.ndarray]] = []
    label_stats: dict[int, dict[str, Any]] = {}
    nd_seen: int | None = None
    n_channels: int | None = None
    total_voxels = 0
    for i, case in enumerate(cases):
        chans, label, affine = _read_case(case, nd_seen, n_channels)
        if nd_seen is None:
            nd_seen, n_channels = label.ndim, int(chans.shape[-1])
            fg_samples, all_samples = [[] for _ in range(n_channels)], [[] for _ in range(n_channels)]
        per_case.append(_case_geometry(case, chans, label, affine))
        pick_fg = _sample_nonzero(label.ravel() > 0, max_voxels, rng)
        pick_all = rng.integers(0, label.size, min(max_voxels, label.size))
        flat = chans.reshape(-1, chans.shape[-1])
        for c in range(chans.shape[-1]):
            fg_samples[c].append(np.asarray(flat[pick_fg, c], dtype=np.float64))
            all_samples[c].append(np.asarray(flat[pick_all, c], dtype=np.float64))
        total_voxels += label.size
        _count_labels(label, affine, label_stats, case["label"])
        del chans, label, flat
        if echo is not None:
            echo(f"fingerprint: case {i + 1}/{len(cases)} {first_file(case['image']).name}")
    if not per_case or n_channels is None:
        raise UserError("no cases to fingerprint")
    channel_names = meta.get("channels")
    names = meta.get("labels") or {}
    return {
        "version": FINGERPRINT_VERSION,
        "name": meta.get("name"),
        "spatial_dims": nd_seen,
        "n_channels": n_channels,
        "channel_names": channel_names,
        "modality": _modality_from_names(channel_names),
        "n_cases": len(per_case),
        "max_voxels_per_case": max_voxels,
        "cases": per_case,
        "channels": [
            _channel_summary(
                fg_samples[c],
                all_samples[c],
                channel_names[c] if channel_names and c < len(channel_names) else f"channel_{c}",
            )
            for c in range(n_channels)
        ],  # fmt: skip
        "labels": {
            str(v): _label_summary(
                v, label_stats[v], names.get(v, "background" if v == 0 else f"label_{v}"), total_voxels
            )
            for v in sorted(label_stats)
        },  # fmt: skip
    }


def fingerprint_dataset(
    root: str | Path, source: str = "auto", *, echo: Callable[[str], None] | None = None
) -> Fingerprint:
    """:func:`fingerprint` of a data folder or CSV in any layout volseg reads (dataset.json read when present)."""
    from volseg.data.datalist import load_datalist

    root = Path(root)
    cases = load_datalist(root, source)
    meta = _dataset_meta(root)
    fp = fingerprint(cases, meta=meta, echo=echo)
    fp["root"] = str(root)
    if not fp.get("name"):
        fp["name"] = (root.stem if root.is_file() else root.resolve().name) or "dataset"
    return fp


# --------------------------------------------------------------------------------------------------------
# Decisions: each returns (value, reason)


def _fmt(values: Floats) -> str:
    return " x ".join(f"{v:g}" for v in values)


def _median(fp: Fingerprint, key: str) -> np.ndarray:
    return np.median(np.asarray([c[key] for c in fp["cases"]], dtype=np.float64), axis=0)


def _pixel_data(fp: Fingerprint) -> bool:
    """2D data without a physical grid (every spacing 1): PNG/TIFF pixels."""
    return fp["spatial_dims"] == 2 and all(np.allclose(c["spacing"], 1.0) for c in fp["cases"])


def determine_target_spacing(fp: Fingerprint) -> tuple[list[float] | None, Reason]:
    """nnU-Net's rule: the median spacing; when one axis is both > 3x coarser than the others and has < 1/3 of their
    voxels, that axis takes the 10th percentile of its spacings (never finer than the other axes)."""
    if _pixel_data(fp):
        return None, "2D pixel data (every spacing is 1): no physical grid, no resampling"
    spacings = np.asarray([c["spacing"] for c in fp["cases"]], dtype=np.float64)
    shapes = np.asarray([c["shape"] for c in fp["cases"]], dtype=np.float64)
    target = np.median(spacings, axis=0)
    size = np.median(shapes, axis=0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    aniso_spacing = target[worst] > ANISOTROPY_THRESHOLD * min(target[others])
    aniso_voxels = size[worst] * ANISOTROPY_THRESHOLD < min(size[others])
    reason = f"median spacing of {len(spacings)} cases ({_fmt(np.round(target, 4))} mm)"
    if aniso_spacing and aniso_voxels:
        p10 = float(np.percentile(spacings[:, worst], 10))
        p10 = max(p10, float(max(target[others])) + 1e-5)
        if p10 < target[worst]:
            reason += (
                f"; axis {worst} is > {ANISOTROPY_THRESHOLD:g}x coarser than the others with < 1/3 of their voxels, "
                f"so it takes the 10th percentile of its spacings, {p10:.4g} mm (nnU-Net's rule)"
            )
        target[worst] = min(p10, target[worst])
    return [round(float(t), 4) for t in target], reason


def determine_orientation(fp: Fingerprint) -> tuple[str | None, Reason]:
    """RAS for 3D (every case's axes then mean the same); the stored axes for 2D."""
    if fp["spatial_dims"] == 3:
        return "RAS", "3D: every case reoriented to RAS, so that axis k, its spacing and the patch's axis k agree"
    return None, "2D: the stored axes are kept"


def _looks_like_hu(ch: dict[str, Any]) -> bool:
    # Air at about -1000 HU in the image and a foreground within the HU range of tissue, contrast and bone.
    return ch["image_p00_5"] <= -500.0 and -1100.0 <= ch["p00_5"] and ch["p99_5"] <= 4000.0


def determine_modality(fp: Fingerprint) -> tuple[str, Reason]:
    if fp.get("modality") in ("CT", "MR", "microscopy", "other"):
        return fp["modality"], f"dataset.json names the channels {fp['channel_names']}"
    if fp["n_channels"] == 1 and _looks_like_hu(fp["channels"][0]):
        ch = fp["channels"][0]
        return "CT", (
            f"intensities look like Hounsfield units (0.5th percentile of the image {ch['image_p00_5']:.0f}, "
            f"foreground {ch['p00_5']:.0f}..{ch['p99_5']:.0f})"
        )
    return "other", "no modality given and intensities unlike CT's: treated as MR-like (per-case z-score)"


def determine_crop(fp: Fingerprint, intensity: dict[str, Any] | None = None) -> tuple[bool, float, Reason]:
    """Crop to the nonzero region unless it removes almost nothing; also the median kept volume fraction.

    volseg crops after normalising, to the box around the voxels above 0: after a CT window, those above its lower
    end (here the foreground's 0.5th percentile, so the box holds the labels); after a z-score inside the nonzero
    mask, much the nonzero region; after a z-score over the whole image, the voxels brighter than the mean, which
    may cut the labels: no crop then.
    """
    kept = float(np.median([np.prod(c["cropped_shape"]) / max(1, np.prod(c["shape"])) for c in fp["cases"]]))
    if kept > 0.95:
        return False, kept, f"cropping to the nonzero region keeps {kept:.0%} of the median volume: not worth it"
    if intensity is not None and "percentile" in intensity:
        return False, kept, "microscopy: objects anywhere in the field, and nearly every pixel above 0 once scaled"
    if intensity is not None and intensity.get("nonzero") is False:
        return (
            False,
            kept,
            (
                f"cropping to the nonzero region would keep {kept:.0%} of the median volume, but the crop follows the "
                "whole-image z-score, after which it would cut to the voxels above the mean"
            ),
        )
    return True, kept, f"cropping to the nonzero region keeps {kept:.0%} of the median volume"


def determine_normalization(fp: Fingerprint, modality: str, kept: float) -> tuple[dict[str, Any], Reason]:
    """CT: clip to the foreground 0.5/99.5 percentiles and scale with those (nnU-Net clips, then z-scores with the
    foreground mean and SD: the same up to a fixed affine map, which the first convolution absorbs). Otherwise a
    per-case, per-channel z-score, inside the nonzero mask when cropping shrinks the volume a lot."""
    if modality == "CT" and fp["n_channels"] == 1:
        ch = fp["channels"][0]
        lo, hi = round(ch["p00_5"], 1), round(ch["p99_5"], 1)
        if hi <= lo:
            hi = lo + 1.0
        return {"a_min": lo, "a_max": hi}, (
            f"CT: clipped to the foreground's 0.5/99.5 percentiles ({lo:g}..{hi:g} HU) and mapped to [0, 1]; "
            f"nnU-Net then z-scores with the foreground mean {ch['mean']:.1f} and SD {ch['std']:.1f}, the same up "
            "to a fixed affine map"
        )
    if modality == "microscopy":
        return {"percentile": [1.0, 99.5]}, (
            "microscopy: each image's own 1st/99.5th percentiles mapped to [0, 1], per channel (robust to uneven "
            "exposure between images)"
        )
    nonzero = kept < NONZERO_MASK_SHRINK
    per = f"per case and per channel ({fp['n_channels']} channels)" if fp["n_channels"] > 1 else "per case"
    where = (
        f"inside the nonzero mask (cropping keeps {kept:.0%} < {NONZERO_MASK_SHRINK:.0%} of the volume)"
        if nonzero
        else f"over the whole image (cropping keeps {kept:.0%} of the volume)"
    )
    return {"nonzero": nonzero}, f"{modality}: z-score {per}, {where}"


def determine_widths(spatial_dims: int, depth: int, device: str) -> tuple[list[int], Reason]:
    """32 features doubling per level, capped at 320 (3D) or 512 (2D); 16 capped at 128/256 on a CPU."""
    base, cap = (32, 320 if spatial_dims == 3 else 512) if device == "cuda" else (16, 128 if spatial_dims == 3 else 256)
    widths = [min(base * 2**level, cap) for level in range(depth + 1)]
    return widths, f"{base} features doubling per level, capped at {cap} ({device}, {spatial_dims}D)"


def determine_topology(
    patch: Sequence[int], spacing: Floats, max_depth: int = MAX_DEPTH
) -> tuple[list[list[int]], list[list[int]], Reason]:
    """nnU-Net's pooling and kernels: an axis is halved only while its feature map has >= 2x4 voxels and its
    spacing is < 2x the finest of the axes still pooled; a kernel is 1 along an axis > 2x coarser than the finest.

    Returns:
        strides per down-sampling step, kernel sizes per resolution (one more than the strides), and the reason.
    """
    size = [int(p) for p in patch]
    sp = [float(s) for s in spacing]
    strides: list[list[int]] = []
    kernels: list[list[int]] = [[3 if s / min(sp) < POOL_SPACING_RATIO else 1 for s in sp]]
    while len(strides) < max_depth:
        valid = [a for a in range(len(size)) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not valid:
            break
        finest = min(sp[a] for a in valid)
        axes = [a for a in valid if sp[a] / finest < POOL_SPACING_RATIO]
        stride = [2 if a in axes else 1 for a in range(len(size))]
        strides.append(stride)
        size = [s // st for s, st in zip(size, stride, strict=True)]
        sp = [s * st for s, st in zip(sp, stride, strict=True)]
        kernels.append([3 if s / min(sp) < POOL_SPACING_RATIO else 1 for s in sp])
    skipped = [a for a in range(len(patch)) if strides and strides[0][a] == 1]
    reason = f"{len(strides)} down-sampling steps, until a feature map is about {MIN_FEATURE_MAP} voxels (at most "
    reason += f"{max_depth})"
    if skipped:
        n_skip = [sum(1 for s in strides if s[a] == 1) for a in skipped]
        reason += "; axis " + ", ".join(
            f"{a} not down-sampled in {n} step(s)" for a, n in zip(skipped, n_skip, strict=True)
        )
        reason += f" until the others' spacing catches up (> {POOL_SPACING_RATIO:g}x the finest)"
    return strides, kernels, reason


def _kernel_for_unet(kernels: list[list[int]]) -> tuple[int | list[int], Reason]:
    """MONAI's UNet takes one kernel size for every level: per axis, the one most levels want."""
    per_axis = [1 if sum(1 for k in kernels if k[a] == 1) * 2 > len(kernels) else 3 for a in range(len(kernels[0]))]
    wanted = "; ".join(_fmt(k) for k in kernels)
    if all(k == 3 for k in per_axis):
        ones = sum(1 for k in kernels if 1 in k)
        why = f"per level nnU-Net would use {wanted}; MONAI's UNet takes one size, 3 on every axis"
        if ones:
            why += f" (kernel 1 is wanted in {ones} of {len(kernels)} levels only)"
        return 3, why
    return per_axis, f"per level nnU-Net would use {wanted}; MONAI's UNet takes one size: {_fmt(per_axis)}"


def estimate_training_bytes(
    patch: Sequence[int],
    strides: Sequence[Sequence[int]],
    widths: Sequence[int],
    in_channels: int,
    n_classes: int,
    batch: int,
    *,
    amp: bool = True,
) -> float:
    """Memory of one training step of MONAI's residual U-Net: activations kept for the backward pass (per patch:
    every level's feature map times its width times :data:`ACTIVATION_BYTES`, input and output included) plus the
    weights, gradients and Adam moments."""
    size = np.asarray(patch, dtype=np.float64)
    elems = float(np.prod(size)) * (in_channels + 2 * n_classes)
    for level, stride in enumerate(strides):
        size = np.maximum(1, size // np.asarray(stride))
        elems += float(np.prod(size)) * widths[level]
    elems += float(np.prod(size)) * widths[len(strides)]
    act = elems * ACTIVATION_BYTES * (AMP_FACTOR if amp else 1.0) * batch
    k = 3 ** len(patch)
    params = sum(k * a * b * 3 for a, b in zip(widths[:-1], widths[1:], strict=False)) + k * in_channels * widths[0]
    return act + params * 4 * 4


def _memory_target(device: str, memory_gb: float | None) -> tuple[float, Reason]:
    if memory_gb is not None:
        return memory_gb * 1e9, f"--memory-gb {memory_gb:g}"
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                total = torch.cuda.get_device_properties(0).total_memory
                return 0.85 * total, f"85% of the GPU's {total / 1e9:.0f} GB"
        except (ImportError, RuntimeError):
            pass
        return DEFAULT_GPU_GB * 1e9, f"nnU-Net's reference {DEFAULT_GPU_GB:g} GB (no GPU to ask)"
    avail = _available_ram()
    target = min(0.5 * avail, CPU_ACTIVATION_GB * 1e9 + RESERVED_BYTES["cpu"])
    return target, (
        f"CPU: half the available RAM ({avail / 1e9:.0f} GB) but at most {CPU_ACTIVATION_GB:g} GB of activations, "
        "since the step time limits first"
    )


def _available_ram() -> float:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8e9


def _median_shape_at(fp: Fingerprint, spacing: Sequence[float] | None, cropped: bool) -> np.ndarray:
    key = "cropped_shape" if cropped else "shape"
    if spacing is None:
        return _median(fp, key)
    return np.median([np.asarray(c[key]) * np.asarray(c["spacing"]) / np.asarray(spacing) for c in fp["cases"]], axis=0)


def _fit_depth(patch: list[int], spacing: Floats) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Topology for a patch, then the patch rounded to the nearest multiple of 2^depth on every axis (the schema's
    rule); the depth is lowered while that rounding would pad an axis by more than half."""
    strides, kernels, _ = determine_topology(patch, spacing)
    for _ in range(MAX_DEPTH + 1):
        while strides and 2 ** len(strides) > 1.5 * min(patch):
            strides, kernels = strides[:-1], kernels[:-1]
        div = 2 ** len(strides)
        rounded = [max(div, int(math.floor(p / div + 0.5)) * div) for p in patch]
        if rounded == patch:
            break
        patch = rounded
        new_strides, new_kernels, _ = determine_topology(patch, spacing, max_depth=len(strides))
        strides, kernels = new_strides, new_kernels
    div = 2 ** len(strides)  # divisible whatever the loop did (every step halves some axis)
    return [max(div, int(math.ceil(p / div)) * div) for p in patch], strides, kernels


def determine_patch_size(
    fp: Fingerprint,
    spacing: Sequence[float] | None,
    *,
    device: str,
    budget_bytes: float,
    n_classes: int,
    cropped: bool = True,
    amp: bool = True,
    batch: int = 2,
) -> tuple[list[int], list[list[int]], list[list[int]], Reason]:
    """nnU-Net's patch: start from a cube of 256^3 voxels (2048^2 in 2D) shaped by the spacing and clipped to the
    median image at the target spacing; while a step of ``batch`` patches does not fit the memory target, shrink the
    axis that is largest in mm by one multiple of 2^depth.

    Returns:
        patch size, strides, kernel sizes per level, and the reason.
    """
    nd = fp["spatial_dims"]
    sp = np.asarray(spacing if spacing is not None else [1.0] * nd, dtype=np.float64)
    median = _median_shape_at(fp, spacing, cropped)
    inv = 1.0 / sp
    start = inv * ((256.0**3 if nd == 3 else 2048.0**2) / float(np.prod(inv))) ** (1.0 / nd)
    patch = [max(1, int(round(min(a, b)))) for a, b in zip(start, median, strict=True)]
    patch, strides, kernels = _fit_depth(patch, sp)
    widths, _ = determine_widths(nd, len(strides), device)
    shrunk = 0
    reserve = RESERVED_BYTES[device]
    while estimate_training_bytes(patch, strides, widths, fp["n_channels"], n_classes, batch, amp=amp) + reserve > (
        budget_bytes
    ):
        div = 2 ** len(strides)
        mm = [p * s if p > div else 0.0 for p, s in zip(patch, sp, strict=True)]
        if max(mm) == 0.0:
            break
        axis = int(np.argmax(mm))
        patch[axis] -= div
        patch, strides, kernels = _fit_depth(patch, sp)
        widths, _ = determine_widths(nd, len(strides), device)
        shrunk += 1
    est = estimate_training_bytes(patch, strides, widths, fp["n_channels"], n_classes, batch, amp=amp) + reserve
    reason = (
        f"median image at the target spacing {_fmt(np.round(median, 1))} voxels; patch {_fmt(patch)} "
        f"({_fmt(np.round(np.asarray(patch) * sp, 1))} mm), each axis a multiple of 2^{len(strides)}"
    )
    if shrunk:
        reason += f"; shrunk {shrunk} time(s), largest axis in mm first, to fit the memory model"
    reason += f" (about {est / 1e9:.1f} GB for {batch} patches, target {budget_bytes / 1e9:.1f} GB)"
    return patch, strides, kernels, reason


def determine_batch_size(
    fp: Fingerprint,
    patch: Sequence[int],
    strides: Sequence[Sequence[int]],
    widths: Sequence[int],
    *,
    device: str,
    budget_bytes: float,
    n_classes: int,
    spacing: Sequence[float] | None,
    amp: bool = True,
) -> tuple[int, Reason]:
    """GPU: as many patches as the memory model allows (at least 2, nnU-Net's minimum), but no more than 5% of the
    data set's voxels per step (nnU-Net). CPU: 2 patches, the fewest that keep instance statistics and batch
    variety; more would only slow each step, and the time budget buys steps."""
    one = estimate_training_bytes(patch, strides, widths, fp["n_channels"], n_classes, 1, amp=amp)
    fixed = estimate_training_bytes(patch, strides, widths, fp["n_channels"], n_classes, 0, amp=amp)
    per = max(one - fixed, 1.0)
    room = budget_bytes - RESERVED_BYTES[device] - fixed
    fits = max(1, int(room // per))
    if device != "cuda":
        batch = 2 if fits >= 2 else 1
        return batch, f"CPU: {batch} patch(es) per step ({fits} would fit the RAM target); the step time decides"
    total = float(np.sum(np.prod(_median_shape_at(fp, spacing, True)))) * fp["n_cases"]
    cap = max(1, int(0.05 * total / float(np.prod(patch))))
    batch = max(2, min(fits, cap)) if fits >= 2 else 1
    reason = (
        f"memory model: {fits} patch(es) fit the target, 5% of the data set's voxels allow {cap}, "
        "and nnU-Net's minimum is 2"
    )
    if fits < 2:
        reason += "; only 1 fits: raise --memory-gb or accept a batch of 1"
    return batch, reason


def parse_duration(text: str) -> float:
    """``90s``, ``20m``, ``1.5h``, ``1h30m`` or a number of seconds, as seconds."""
    t = text.strip().lower().replace(" ", "")
    if re.fullmatch(r"\d+(\.\d+)?", t):
        return float(t)
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", t)
    if not parts or "".join(a + b for a, b in parts) != t:
        raise UserError(f"'{text}' is not a duration such as 90s, 20m, 1.5h or 1h30m", "--time-budget")
    return sum(float(a) * {"h": 3600, "m": 60, "s": 1}[b] for a, b in parts)


def determine_schedule(
    fp: Fingerprint,
    *,
    step_seconds: float,
    budget_seconds: float | None,
    patch: Sequence[int],
    spacing: Sequence[float] | None,
    val_fraction: float,
) -> tuple[dict[str, int], Reason]:
    """Epochs, iterations per epoch and validation interval from the time budget and the measured step.

    Without a budget: nnU-Net's 1000 epochs of 250 iterations. With one: the budget less a fixed start-up cost and
    validation (at most 10% of it) buys ``budget / step`` iterations at the expected step (the step measured, times
    :data:`LOADING_OVERHEAD` for loading and augmentation), cut into epochs of up to 250 iterations and at least
    20 epochs where possible. ``max_epochs`` is what the budget holds at the bare measured step, the most the run
    can train: the trainer's own budget (``train.time_budget_s``) lowers it to what its measured epochs allow, so
    the budget is used whether the epochs run at the bare step or slower.
    """
    step = step_seconds * LOADING_OVERHEAD
    n_val = max(1, round(fp["n_cases"] * val_fraction))
    median = _median_shape_at(fp, spacing, True)
    windows = float(np.prod([max(1, math.ceil(m / (p * 0.75))) for m, p in zip(median, patch, strict=True)]))
    val_once = n_val * windows * step_seconds / 2.0  # a forward pass is about a third of a step of 2 patches
    if budget_seconds is None:
        hours = (1000 * 250 * step) / 3600
        sched = {"max_epochs": 1000, "iterations_per_epoch": 250, "val_interval": 10}
        return sched, (
            f"no time budget: nnU-Net's 1000 epochs x 250 iterations, about {hours:.1f} h of training at the measured "
            f"{step_seconds:.3g} s per step (give --time-budget to plan for a time)"
        )
    train_s = budget_seconds * (1.0 - VALIDATION_SHARE) - FIXED_SECONDS
    if train_s <= step * 10:
        raise UserError(
            f"a time budget of {budget_seconds:.0f} s leaves no time to train at {step:.2f} s per step", "--time-budget"
        )
    total = int(train_s // step)
    ipe = int(min(250, max(10, total // 20)))
    epochs = max(1, total // ipe)
    most = max(epochs, int(train_s // step_seconds) // ipe)
    val_budget = budget_seconds * VALIDATION_SHARE
    interval = max(1, math.ceil(epochs * val_once / max(val_budget, 1e-9)))
    interval = min(interval, epochs)
    sched = {"max_epochs": most, "iterations_per_epoch": ipe, "val_interval": interval}
    reason = (
        f"time budget {budget_seconds / 60:.0f} min: {train_s:.0f} s of training at {step:.3g} s per step "
        f"({step_seconds:.3g} s measured + {LOADING_OVERHEAD - 1:.0%} loading) = {total} iterations = {epochs} "
        f"epochs x {ipe}; max_epochs {most} is what the bare measured step would allow, and the trainer's budget "
        f"lowers it to what the epochs it measures hold; validation ({n_val} case(s), about {val_once:.1f} s each "
        f"time) every {interval} epoch(s) stays within {VALIDATION_SHARE:.0%} of the budget"
    )
    return sched, reason


def _small_labels(fp: Fingerprint, spacing: Sequence[float] | None) -> dict[str, float]:
    """Labels whose median object is narrower than :data:`SMALL_OBJECT_VOXELS` at the target spacing."""
    coarse = float(max(spacing)) if spacing is not None else 1.0
    out = {}
    for value, lab in fp["labels"].items():
        if value == "0" or "object_diameter_mm" not in lab:
            continue
        vox = lab["object_diameter_mm"]["median"] / coarse
        if vox < SMALL_OBJECT_VOXELS:
            out[lab["name"]] = round(vox, 2)
    return out


def determine_sampling(fp: Fingerprint, spacing: Sequence[float] | None) -> tuple[dict[str, Any], Reason]:
    """Foreground oversampling: MONAI's positive/negative crops (2/3 centred on foreground, since its negative crops
    are centred on background, unlike nnU-Net's random ones); crops centred on each class in turn when a label is
    rare (< 1/10 of the most common one's voxels) or its objects are small."""
    fg = {lab["name"]: lab["voxel_fraction"] for v, lab in fp["labels"].items() if v != "0"}
    small = _small_labels(fp, spacing)
    rare = [n for n, f in fg.items() if fg and f < 0.1 * max(fg.values())]
    if len(fg) > 1 and (rare or small):
        why = ", ".join(sorted(set(rare) | set(small)))
        if not small:
            return {"sampler": "class_balanced"}, f"crops centred on each class in turn: {why} rare"
        ratios = {name: SMALL_LABEL_CROP_WEIGHT for name in sorted(small)}
        return {"sampler": "class_balanced", "class_ratios": ratios}, (
            f"crops centred on each class in turn: {why} rare or small; {SMALL_LABEL_CROP_WEIGHT:g}x as many centred "
            f"on the small objects ({', '.join(sorted(small))}), which a short training otherwise learns last"
        )
    if small:
        return {"sampler": "pos_neg", "pos_fraction": 0.8}, (
            f"small objects ({', '.join(small)}): 80% of the crops centred on foreground"
        )
    return {"sampler": "pos_neg", "pos_fraction": 0.67}, (
        "2/3 of the crops centred on foreground (MONAI's negative crops are centred on background)"
    )


_RAS_AXIS_NAMES = ("left-right", "anterior-posterior", "superior-inferior")


def _one_sided_axes(fp: Fingerprint) -> dict[int, str]:
    """Axes along which some label's centre lies on the same side of the image's middle in every case (at least
    :data:`MIRROR_MIN_CASES` of them, by at least :data:`ONE_SIDED_OFFSET` of the extent on the median): the
    anatomy is not mirror-symmetric there (the liver on the right, a left and a right kidney labelled apart).
    Maps each such axis to the reason."""
    nd = fp["spatial_dims"]
    out: dict[int, str] = {}
    for v, lab in fp["labels"].items():
        centres = lab.get("centre_fraction_per_case")
        if v == "0" or not centres or len(centres) < MIRROR_MIN_CASES:
            continue
        c = np.asarray(centres, dtype=np.float64) - 0.5
        for axis in range(nd):
            side = np.sign(c[:, axis])
            if axis in out or not (np.all(side > 0) or np.all(side < 0)):
                continue
            if float(np.median(np.abs(c[:, axis]))) >= ONE_SIDED_OFFSET:
                lo, hi = float(c[:, axis].min()) + 0.5, float(c[:, axis].max()) + 0.5
                out[axis] = f"{lab['name']}'s centre at {lo:.2f}-{hi:.2f} of the image in all {len(c)} cases"
    return out


def determine_test_mirroring(aug: dict[str, Any], nd: int) -> tuple[list[int], Reason]:
    """nnU-Net's test-time mirroring, along the axes that training mirrors (none when it does not)."""
    from volseg.recipe import Augment

    axes = Augment.model_validate(aug).flipped_axes(nd)
    if not axes:
        return [], "no test-time mirroring: training does not mirror"
    return axes, (
        f"test-time mirroring along the axes training mirrors ({axes}), as nnU-Net does: the logits of "
        f"{2 ** len(axes)} passes averaged ({2 ** len(axes)}x the inference time; "
        "--set 'infer.tta_flips=[]' for one pass); on the demo's liver phantoms mirroring along axis 1 added "
        "0.009-0.017 to the tumour's held-out Dice per case (0.001-0.006 less on the other phantom family)"
    )


def determine_augmentation(
    fp: Fingerprint, spacing: Sequence[float] | None, patch: Sequence[int]
) -> tuple[dict[str, Any], Reason]:
    """nnU-Net's augmentation probabilities: mirroring 0.5, rotation 0.2, scaling 0.2, noise 0.1, brightness and
    contrast; rotation kept to 15 degrees for anisotropic patches, where out-of-plane rotation mixes thick slices.

    Mirroring only where the anatomy allows: not along an axis on which a label always lies on one side
    (:func:`_one_sided_axes`). Mirrored, such anatomy never occurs in the data, and labels named by side would
    swap; a short training spends iterations on learning the mirror images."""
    nd = fp["spatial_dims"]
    sp = np.asarray(spacing if spacing is not None else [1.0] * nd)
    mm = np.asarray(patch) * sp
    aniso = nd == 3 and max(float(mm.max() / mm.min()), float(sp.max() / sp.min())) > ANISOTROPY_THRESHOLD
    aug: dict[str, Any] = {
        "flip": 0.5,
        "rotate": 0.2,
        "rotate_range_deg": 15.0 if aniso else 30.0,
        "scale": 0.2,
        "scale_range": 0.15,
        "elastic": 0.0,
        "intensity_shift": 0.5,
        "intensity_scale": 0.5,
        "noise": 0.1,
    }
    why = "nnU-Net's probabilities (mirror 0.5, rotate 0.2, scale 0.2, noise 0.1; no elastic)"
    why += "; rotation within 15 degrees: anisotropic data" if aniso else "; rotation within 30 degrees"
    one_sided = _one_sided_axes(fp)
    if one_sided:
        kept = [a for a in range(nd) if a not in one_sided]
        aug = {"flip": 0.5 if kept else 0.0, "flip_axes": kept, **{k: v for k, v in aug.items() if k != "flip"}}
        why += "; no mirroring along " + "; ".join(
            f"axis {a}{f' ({_RAS_AXIS_NAMES[a]})' if nd == 3 else ''}: {one_sided[a]}" for a in sorted(one_sided)
        )
        why += ", where the anatomy is not mirror-symmetric"
    return aug, why


def _one_object(lab: dict[str, Any]) -> bool:
    """One connected object in every case, up to specks: the largest object holds at least
    :data:`SINGLE_OBJECT_SHARE` of the label in each case (a label's edge on thick slices leaves a few voxels
    apart). Fingerprints written before the share was recorded count objects only."""
    if lab.get("objects_per_case_max") == 1:
        return True
    share = lab.get("largest_object_share_min")
    return share is not None and float(share) >= SINGLE_OBJECT_SHARE


def determine_postprocess(fp: Fingerprint) -> tuple[list[str], Reason]:
    """Keep only the largest component of a label that is one object in every case that has it (specks aside)."""
    labels = [lab for v, lab in fp["labels"].items() if v != "0" and lab.get("cases_present", 0) >= 2]
    single = [lab["name"] for lab in labels if _one_object(lab)]
    if single:
        specks = [lab["name"] for lab in labels if _one_object(lab) and lab.get("objects_per_case_max") != 1]
        why = f"{', '.join(single)}: one connected object in every case"
        if specks:
            why += (f" ({', '.join(specks)}: its largest object holds >= {SINGLE_OBJECT_SHARE:.0%} of it in each case; "
                    "the rest are specks)")  # fmt: skip
        return single, why + ", so stray islands are errors"
    return [], "no label is a single object in every case: no component filtering"


def _roi_fingerprint(fp: Fingerprint, margin_mm: float) -> Fingerprint:
    """The fingerprint of the crops a cascade's fine stage sees: each case's labelled box plus the margin on every
    side (clipped to the image), as its shape; cases without labels keep their whole image."""
    cases = []
    for c in fp["cases"]:
        sp, shape = np.asarray(c["spacing"], dtype=np.float64), np.asarray(c["shape"], dtype=np.float64)
        fg = np.asarray(c.get("foreground_mm") or [0.0] * len(shape), dtype=np.float64)
        roi = shape if not fg.any() else np.minimum(np.ceil((fg + 2.0 * margin_mm) / sp), shape)
        cases.append({**c, "shape": [int(v) for v in roi], "cropped_shape": [int(v) for v in roi]})
    return {**fp, "cases": cases}


def _coverage(fp: Fingerprint, spacing: Sequence[float] | None, patch: Sequence[int], cropped: bool) -> float:
    """The fraction of the median image (at ``spacing``) that one patch covers."""
    median = _median_shape_at(fp, spacing, cropped)
    return float(np.prod(np.minimum(np.asarray(patch, dtype=np.float64), median)) / np.prod(median))


def determine_cascade(
    fp: Fingerprint, spacing: Sequence[float] | None, patch: Sequence[int], cropped: bool
) -> tuple[dict[str, Any], Reason]:
    """Two stages when nnU-Net would plan a cascade (the patch covers less than 1/4 of the median image) or a label's
    objects are small at the target spacing, and the labelled region is a small part of the image (a crop around it
    saves at least half the voxels): a coarse stage finds the region over the whole image, and a fine stage at the
    target spacing segments the crop around it (:mod:`volseg.cascade`). The coarse spacing is the finest axis times
    :data:`COARSE_FACTOR` (or more, until the patch covers a quarter of the image); axes already coarser keep
    theirs."""
    coverage = _coverage(fp, spacing, patch, cropped)
    small = _small_labels(fp, spacing)
    decision: dict[str, Any] = {"stages": 1, "coverage": round(coverage, 4), "small_labels": small, "applied": False}
    parts = [f"the patch covers {coverage:.0%} of the median image"]
    if small:
        parts.append("small objects at the target spacing (" + ", ".join(f"{n}: {v:g} voxels across"
                                                                          for n, v in small.items()) + ")")  # fmt: skip
    if fp["spatial_dims"] != 3 or spacing is None or (coverage >= CASCADE_COVERAGE and not small):
        return decision, "; ".join(parts) + ": one stage"
    roi = _roi_fingerprint(fp, CASCADE_MARGIN_MM)
    fraction = float(np.median([np.prod(r["shape"]) / max(1, np.prod(c["shape"]))
                                for r, c in zip(roi["cases"], fp["cases"], strict=True)]))  # fmt: skip
    decision["roi_fraction"] = round(fraction, 4)
    if fraction > CASCADE_MAX_ROI_FRACTION:
        return decision, "; ".join(parts) + (
            f"; but the labelled region plus {CASCADE_MARGIN_MM:g} mm is {fraction:.0%} of the median image, so a "
            "crop would not save enough: one stage"
        )
    factor = max(
        COARSE_FACTOR, (CASCADE_COVERAGE / coverage) ** (1.0 / len(patch)) if coverage < CASCADE_COVERAGE else 1
    )
    finest = float(min(spacing))
    coarse = [round(max(float(s), finest * factor), 4) for s in spacing]
    decision.update(stages=2, applied=True, coarse_spacing=coarse, fine_spacing=list(spacing),
                    margin_mm=CASCADE_MARGIN_MM)  # fmt: skip
    parts.append(
        f"the labelled region plus {CASCADE_MARGIN_MM:g} mm is {fraction:.0%} of the median image: a coarse stage at "
        f"{_fmt(coarse)} mm finds it, a fine stage at the target spacing segments the crop around it "
        f"({CASCADE_COARSE_SHARE:.0%} / {1 - CASCADE_COARSE_SHARE:.0%} of the time budget)"
    )
    return decision, "; ".join(parts)


def _cascade_stages(
    fp: Fingerprint,
    spacing: list[float] | None,
    cascade: dict[str, Any],
    plan_stage: Callable[..., _Stage],
    crop: bool,
    time_budget_s: float | None,
) -> tuple[_Stage, _Stage]:
    """A cascade's coarse stage (its share of the budget, crops 2/3 on foreground) and fine stage (the target
    spacing on the crops around the labelled region)."""
    share = None if time_budget_s is None else time_budget_s * CASCADE_COARSE_SHARE
    stage = plan_stage(
        fp,
        cascade["coarse_spacing"],
        crop=crop,
        time_budget_s=share,
        iterations=COARSE_MIN_ITERATIONS,
        min_coverage=CASCADE_MIN_COVERAGE,
    )
    stage.sampling = {"sampler": "pos_neg", "pos_fraction": 0.67}
    stage.why["sampling"] = "the coarse stage finds the region: 2/3 of the crops centred on foreground"
    fine_budget = None if time_budget_s is None or share is None else time_budget_s - share
    # Small objects learn from many class-balanced crops; the crop around the region bounds the context.
    its = FINE_MIN_ITERATIONS if cascade["small_labels"] else MIN_ITERATIONS
    roi_fp = _roi_fingerprint(fp, CASCADE_MARGIN_MM)
    fine = plan_stage(
        roi_fp,
        spacing,
        crop=False,
        time_budget_s=fine_budget,
        iterations=its,
        min_coverage=CASCADE_MIN_COVERAGE,
        max_coverage=FINE_MAX_COVERAGE if cascade["small_labels"] else None,
    )
    return stage, fine


def _coarser_for_cpu(
    fp: Fingerprint,
    spacing: Sequence[float] | None,
    stage: _Stage,
    cascade: dict[str, Any],
    replan: Callable[[list[float]], _Stage],
    cropped: bool,
) -> tuple[_Stage, Reason]:
    """One stage on a CPU with a time budget whose patch covers less than :data:`CASCADE_COVERAGE` of the median
    image (and no small objects to lose): the finer axes are coarsened (as nnU-Net's low-resolution stage, without
    the cascade that would not pay here), so that the patch the budget allows sees more of the anatomy. Up to three
    re-plans, each factor from the coverage reached, at most :data:`COARSE_FACTOR` in all."""
    if spacing is None or cascade["small_labels"] or cascade["coverage"] >= CASCADE_COVERAGE:
        return stage, ""
    coverage, finest = float(cascade["coverage"]), float(min(spacing))
    current, factor = stage, 1.0
    for _ in range(3):
        k = sum(1 for sp in spacing if sp < finest * factor * 1.5) or 1  # the axes a larger factor coarsens
        factor = min(COARSE_FACTOR, factor * (CASCADE_COVERAGE / max(coverage, 1e-6)) ** (1.0 / k))
        coarse = [round(max(float(sp), finest * factor), 4) for sp in spacing]
        current = replan(coarse)
        coverage = _coverage(fp, coarse, current.patch, cropped)
        if coverage >= CASCADE_COVERAGE or factor >= COARSE_FACTOR:
            break
    return current, (
        f"; on this CPU the patch the time budget allows covered {cascade['coverage']:.0%} of the median image at that "
        f"spacing, so the finer axes were coarsened to {_fmt(current.spacing or [])} mm (the patch then covers "
        f"{coverage:.0%})"
    )


def measure_step_seconds(
    model: dict[str, Any], patch: Sequence[int], batch: int, *, n_classes: int, device: str = "cpu", steps: int = 3
) -> float:
    """Seconds of one training step (forward, DiceCE, backward, AdamW) of the planned network on a random
    batch, after two warm-up steps; in the arithmetic and memory layout training uses."""
    import torch
    from monai.losses import DiceCELoss

    from volseg.nets import create_network

    dev = torch.device("cuda" if device == "cuda" and torch.cuda.is_available() else "cpu")
    net = create_network(model["name"], model["spatial_dims"], model["in_channels"], n_classes, model["args"]).to(dev)
    if dev.type == "cpu" and len(patch) == 3:
        net.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]  # as training does on a CPU
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    from volseg.runtime import cpu_has_native_bf16

    # As training runs: CUDA AMP, bfloat16 autocast on CPUs with native bf16, float32 otherwise.
    autocast = dev.type == "cuda" or cpu_has_native_bf16()
    dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    x = torch.randn(batch, model["in_channels"], *patch, device=dev)
    y = torch.randint(0, n_classes, (batch, 1, *patch), device=dev)
    times = []
    warmup = 2  # the first steps build the convolution primitives
    i = 0
    while i < warmup + steps:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype, enabled=autocast):
            loss = loss_fn(net(x), y)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
        elif i == 1 and elapsed > 5.0:
            steps = 1  # a slow step is measured once: the plan should not cost minutes
        i += 1
    return float(min(times))  # the fastest: on a shared machine, noise only ever adds


# --------------------------------------------------------------------------------------------------------
# The plan


def _budget_step(budget_s: float, iterations: int = MIN_ITERATIONS) -> float:
    """The longest measured step that still gives ``iterations`` iterations in the budget."""
    return max(1e-3, (budget_s * (1 - VALIDATION_SHARE) - FIXED_SECONDS) / (iterations * LOADING_OVERHEAD))


def _shrink_to(patch: list[int], spacing: Floats, volume: float, div: int, floor: int = 0) -> list[int]:
    """The patch made smaller, largest axis in mm first, until its volume is at most ``volume``; no axis goes
    below ``div`` or (when it starts above) ``floor`` voxels."""
    patch = list(patch)
    low = max(div, floor)
    while np.prod(patch) > volume and max(patch) > low:
        axis = int(np.argmax([p * s if p > low else 0 for p, s in zip(patch, spacing, strict=True)]))
        patch[axis] -= div
    return patch


def _fit_cpu_budget(
    patch: list[int],
    spacing: Sequence[float] | None,
    nd: int,
    budget_s: float,
    measure: Callable[[list[int], list[list[int]], list[list[int]]], float],
    iterations: int = MIN_ITERATIONS,
    min_voxels: float = 0.0,
    max_voxels: float | None = None,
) -> tuple[list[int], list[list[int]], list[list[int]], float, Reason]:
    """On a CPU with a time budget: the largest patch (up to the memory model's) whose measured step leaves
    ``iterations`` iterations, but not (much) smaller than ``min_voxels`` while that leaves at least
    :data:`CASCADE_MIN_ITERATION_SHARE` of them. The step is measured on a reference patch
    of at most 64^3 voxels (128^2 in 2D), extrapolated by volume, and measured again on the chosen patch (once more
    if that still misses by half). ``max_voxels``: the patch is first made at most that large."""
    sp = np.asarray(spacing if spacing is not None else [1.0] * nd, dtype=np.float64)
    allowed = _budget_step(budget_s, iterations)
    _, strides, _ = _fit_depth(list(patch), sp)
    capped = ""
    if max_voxels is not None and float(np.prod(patch)) > max_voxels:
        smaller, strides, _ = _fit_depth(_shrink_to(patch, sp, max_voxels, 2 ** len(strides), MIN_CPU_PATCH[nd]), sp)
        capped = f"; a fine stage for small objects covers at most {FINE_MAX_COVERAGE:.0%} of its median crop: " \
            f"{_fmt(patch)} -> {_fmt(smaller)}"  # fmt: skip
        patch = smaller
        min_voxels = min(min_voxels, float(np.prod(patch)))
    start = list(patch)
    ref, ref_strides, ref_kernels = _fit_depth(_shrink_to(patch, sp, 64.0**3 if nd == 3 else 128.0**2, 8), sp)
    ref_step = measure(ref, ref_strides, ref_kernels)
    why = f"{capped}; on this CPU a step of patch {_fmt(ref)} took {ref_step:.3g} s"
    target = float(np.prod(ref)) * allowed / max(ref_step, 1e-6)
    floor_voxels = min(min_voxels, target / CASCADE_MIN_ITERATION_SHARE)
    limit = allowed * max(1.0, floor_voxels / target)  # the step the (held) patch may take
    floor = MIN_CPU_PATCH[nd]
    div = 2 ** len(strides)
    held = _shrink_to(start, sp, max(target, floor_voxels), div, floor) != _shrink_to(start, sp, target, div, floor)
    target = max(target, floor_voxels)
    patch, strides, kernels = _fit_depth(_shrink_to(start, sp, target, div, floor), sp)
    step = ref_step if patch == ref else measure(patch, strides, kernels)
    if step > 1.5 * limit and max(patch) > 2 ** len(strides):
        again, a_strides, a_kernels = _fit_depth(
            _shrink_to(patch, sp, float(np.prod(patch)) * limit / step, 2 ** len(strides), floor), sp
        )
        if again != patch:
            patch, strides, kernels = again, a_strides, a_kernels
            step = measure(patch, strides, kernels)
    if patch != start:
        why += (
            f"; the budget allows about {allowed:.3g} s per step ({iterations} iterations), so the patch shrank "
            f"from {_fmt(start)} to {_fmt(patch)}, largest axis in mm first ({step:.3g} s per step)"
        )
    else:
        why += f"; the budget allows {allowed:.3g} s per step: patch kept ({step:.3g} s per step)"
    if held:
        why += (
            f"; a cascade stage's patch keeps about {CASCADE_MIN_COVERAGE:.0%} of its median image while that leaves "
            f"half the iterations: fewer iterations instead of a smaller patch"
        )
    return patch, strides, kernels, step, why


@dataclass
class Plan:
    """A planned recipe (a dict that passes the schema), the reason for each decided field (by dotted key), the
    header lines of the YAML file and the decisions to record in the fingerprint."""

    recipe: dict[str, Any]
    reasons: dict[str, str]
    header: list[str] = field(default_factory=list)
    decisions: dict[str, Any] = field(default_factory=dict)


def _recipe_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.-")
    return name or "dataset"


SPLIT_VAL = 0.2
"""The validation fraction a plan holds out (one case in five)."""


@dataclass
class _Stage:
    """One network stage of a plan: its spacing, patch, network, batch and schedule, and why."""

    spacing: list[float] | None
    patch: list[int]
    strides: list[list[int]]
    kernels: list[list[int]]
    batch: int
    model: dict[str, Any]
    step: float
    sched: dict[str, int]
    sampling: dict[str, Any]
    aug: dict[str, Any]
    why: dict[str, str]
    budget_s: float | None = None  # the stage's share of the time budget


def _model_for(
    fp: Fingerprint, strides: list[list[int]], kernels: list[list[int]], device: str
) -> tuple[dict[str, Any], str, str]:
    """MONAI's residual U-Net for a topology: (model section, why the widths, why the kernels)."""
    nd = fp["spatial_dims"]
    w, why_width = determine_widths(nd, len(strides), device)
    kernel, why_kernel = _kernel_for_unet(kernels)
    all_two = all(all(s == 2 for s in st) for st in strides)
    args: dict[str, Any] = {
        "channels": w,
        "strides": [2 for _ in strides] if all_two else strides,
        "num_res_units": 2,
        "norm": "instance",
    }
    if kernel != 3:
        args["kernel_size"] = kernel
    return {"name": "unet", "spatial_dims": nd, "in_channels": fp["n_channels"], "args": args}, why_width, why_kernel


def _plan_stage(
    fp: Fingerprint,
    spacing: list[float] | None,
    *,
    crop: bool,
    device: str,
    budget: float,
    n_classes: int,
    time_budget_s: float | None,
    timer: StepTimer,
    iterations: int = MIN_ITERATIONS,
    min_coverage: float = 0.0,
    max_coverage: float | None = None,
) -> _Stage:
    """Patch (memory model, then the CPU time budget), network, batch, measured step, schedule, sampling and
    augmentation for one stage at ``spacing``."""
    nd = fp["spatial_dims"]
    patch, strides, kernels, why_patch = determine_patch_size(
        fp, spacing, device=device, budget_bytes=budget, n_classes=n_classes, cropped=crop, amp=True
    )
    widths, _ = determine_widths(nd, len(strides), device)
    batch, why_batch = determine_batch_size(
        fp, patch, strides, widths, device=device, budget_bytes=budget, n_classes=n_classes, spacing=spacing, amp=True
    )
    model, why_w, why_k = _model_for(fp, strides, kernels, device)
    if device == "cpu" and time_budget_s is not None:
        image_voxels = float(np.prod(_median_shape_at(fp, spacing, crop)))
        patch, strides, kernels, step, why_fit = _fit_cpu_budget(
            patch,
            spacing,
            nd,
            time_budget_s,
            lambda p, st, k: timer(_model_for(fp, st, k, device)[0], tuple(p), batch),
            iterations,
            min_coverage * image_voxels,
            None if max_coverage is None else max_coverage * image_voxels,
        )
        model, why_w, why_k = _model_for(fp, strides, kernels, device)
        why_patch += why_fit
    else:
        step = timer(model, tuple(patch), batch)
    _, _, why_topo = determine_topology(patch, spacing if spacing is not None else [1.0] * nd)
    sched, why_sched = determine_schedule(
        fp, step_seconds=step, budget_seconds=time_budget_s, patch=patch, spacing=spacing, val_fraction=SPLIT_VAL
    )
    sampling, why_samp = determine_sampling(fp, spacing)
    aug, why_aug = determine_augmentation(fp, spacing, patch)
    why = {
        "patch": why_patch,
        "batch": why_batch,
        "widths": why_w,
        "kernels": why_k,
        "topology": why_topo,
        "schedule": why_sched,
        "sampling": why_samp,
        "augment": why_aug,
        "step": f"measured {step:.3g} s per step of {batch} patch(es) {_fmt(patch)} on {device}",
    }
    return _Stage(spacing, patch, strides, kernels, batch, model, step, sched, sampling, aug, why, time_budget_s)


def _plan_labels(fp: Fingerprint) -> tuple[dict[str, Any], dict[int, int], list[int], Reason]:
    """Consecutive label values 0..K-1 (a label_map when the files' values have gaps, e.g. 0/255 masks)."""
    values = sorted(int(v) for v in fp["labels"])
    if 0 not in values:
        values = [0, *values]
    labels: dict[str, Any] = {}
    label_map: dict[int, int] = {}
    for new, old in enumerate(values):
        lab = fp["labels"].get(str(old), {"name": "background"})
        key = lab["name"] if lab["name"] not in labels else f"{lab['name']}_{old}"
        labels[key] = {"value": new}
        if new != old:
            label_map[old] = new
    if len(labels) < 2:
        raise UserError("the labels hold only background: nothing to segment", fp.get("root"))
    named = any(lab["name"] != f"label_{v}" for v, lab in fp["labels"].items() if v != "0")
    return labels, label_map, values, "the label values found in the data set" + (", named by dataset.json" * named)


def _train_section(stage: _Stage, device: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A stage's ``train`` section and the reasons of its keys."""
    total_iters = stage.sched["max_epochs"] * stage.sched["iterations_per_epoch"]
    if total_iters >= 10_000:
        optimizer = {"name": "sgd", "lr": 0.01, "momentum": 0.99, "weight_decay": 3e-5}
        why_opt = f"{total_iters} iterations: nnU-Net's SGD (lr 0.01, momentum 0.99, weight decay 3e-5)"
    else:
        optimizer = {"name": "adamw", "lr": 0.003, "weight_decay": 3e-5}
        why_opt = f"{total_iters} iterations (< 10000): AdamW at 3e-3 converges faster in a short run than SGD"
    spv = 2 if stage.batch % 2 == 0 else 1
    train: dict[str, Any] = {
        "patch_size": stage.patch,
        "batch_size": stage.batch // spv,
        "samples_per_volume": spv,
        **stage.sampling,
        **stage.sched,
        "optimizer": optimizer,
        "scheduler": {"name": "poly", "power": 0.9},
        "loss": {"name": "dice_ce", "batch_dice": True, "dice_background": False, **_loss_weights(stage)},
        "amp": True,
        "num_workers": 1 if device == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1)),
        "augment": stage.aug,
        "weights": "final",
    }
    if stage.budget_s is not None:
        train["time_budget_s"] = _trainer_budget(stage.budget_s)
    small = list(stage.sampling.get("class_ratios") or {})
    if small:
        train["calibrate"] = small
    why = {
        "train.patch_size": stage.why["patch"],
        "train.batch_size": stage.why["batch"]
        + f"; {stage.batch} patches = {stage.batch // spv} volume(s) x {spv} samples",
        "train.samples_per_volume": "two crops per loaded volume halve the loading cost"
        if spv == 2
        else "one crop per volume (odd batch)",
        "train.sampler": stage.why["sampling"],
        "train.max_epochs": stage.why["schedule"],
        "train.iterations_per_epoch": "see max_epochs",
        "train.val_interval": "see max_epochs",
        "train.optimizer": why_opt,
        "train.scheduler": "nnU-Net's poly learning-rate decay (power 0.9)",
        "train.loss": "Dice + cross-entropy, the Dice term over the whole batch and without the background "
        "(nnU-Net's batch Dice, do_bg=False): a patch without a small structure does not swing its Dice term"
        + _loss_weights_why(stage),
        "train.amp": "mixed precision: CUDA AMP, or bfloat16 on CPUs that have it natively",
        "train.num_workers": "one loader process on a CPU, which the training step needs"
        if device == "cpu"
        else "loader processes for the GPU",
        "train.augment": stage.why["augment"],
        "train.weights": "the final weights, as nnU-Net predicts with its final checkpoint: the poly schedule ends at "
        "a learning rate of 0, while the best epoch by the mean Dice of a few validation cases is a noisy pick (on "
        "the demo's phantoms one fine stage's best came at epoch 6 of 18, its validation liver Dice 0.920 there and "
        "0.951 at the end)",
        "train.time_budget_s": _trainer_budget_why(stage),
        "train.calibrate": _calibrate_why(small),
    }
    for key in ("pos_fraction", "class_ratios"):
        if key in stage.sampling:
            why[f"train.{key}"] = "see sampler"
    return train, why


def _calibrate_why(small: list[str]) -> str:
    if not small:
        return ""
    return (f"the small objects ({', '.join(small)}) come out under-segmented by the argmax after a short training "
            "(on the demo's liver phantoms 89-100% of the lesion voxels predicted were right, but 32-79% of the "
            "lesions' voxels were found): after training, the label bias with the best validation Dice is chosen "
            "for them (infer.label_bias, volseg.training.calibrate; none unless it gains)")  # fmt: skip


def _trainer_budget(stage_budget_s: float) -> float:
    """The trainer's own budget (``train.time_budget_s``): the stage's share less the fixed start-up cost."""
    return round(max(stage_budget_s * 0.5, stage_budget_s - FIXED_SECONDS), 1)


def _trainer_budget_why(stage: _Stage) -> str:
    if stage.budget_s is None:
        return ""
    return (f"the stage's {stage.budget_s:.0f} s less {FIXED_SECONDS:.0f} s for caching and export: the trainer lowers "
            "max_epochs (and fits the schedule) when the epochs it measures would overrun, so that the budget holds on "
            "a slower or busier machine than the one step measured here")  # fmt: skip


def _loss_weights(stage: _Stage) -> dict[str, Any]:
    """The small labels' loss weights (the labels the sampler weights: see :func:`determine_sampling`)."""
    small = stage.sampling.get("class_ratios") or {}
    return {"class_weights": {name: SMALL_LABEL_LOSS_WEIGHT for name in small}} if small else {}


def _loss_weights_why(stage: _Stage) -> str:
    weights = _loss_weights(stage).get("class_weights")
    if not weights:
        return ""
    return (f"; the small objects' terms ({', '.join(weights)}) weigh {SMALL_LABEL_LOSS_WEIGHT:g}x, since a short "
            "training otherwise leaves them under-segmented")  # fmt: skip


def _cascade_section(fine: _Stage, train: dict[str, Any], margin: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The ``cascade`` section for a fine stage: its values where they differ from the coarse stage's."""
    fine_train, _ = _train_section(fine, "cpu")
    section: dict[str, Any] = {
        "margin_mm": margin,
        "spacing": fine.spacing,
        "patch_size": fine.patch,
        "model_args": fine.model["args"],
        "sampler": fine.sampling["sampler"],
    }
    if "class_ratios" in fine.sampling:
        section["class_ratios"] = fine.sampling["class_ratios"]
    section.update(_loss_weights(fine))
    if fine_train.get("calibrate"):
        section["calibrate"] = fine_train["calibrate"]
    for key in ("max_epochs", "iterations_per_epoch", "batch_size", "val_interval", "time_budget_s"):
        if fine_train.get(key) != train.get(key):
            section[key] = fine_train.get(key)
    why = {
        "cascade": "two stages (see the header): the coarse stage above finds the region, this fine stage segments "
        "the crop around it",
        "cascade.margin_mm": f"{margin:g} mm of context around the coarse stage's region",
        "cascade.spacing": "the target spacing (the one-stage plan's)",
        "cascade.patch_size": "the crops' median size at the target spacing; " + fine.why["patch"],
        "cascade.model_args": fine.why["topology"] + "; " + fine.why["widths"],
        "cascade.sampler": fine.why["sampling"],
        "cascade.class_ratios": "see sampler",
        "cascade.class_weights": "the fine stage's loss weights" + _loss_weights_why(fine),
        "cascade.calibrate": _calibrate_why(list(fine_train.get("calibrate") or [])),
        "cascade.max_epochs": fine.why["schedule"] + f"; {fine.why['step']}",
        "cascade.iterations_per_epoch": fine.why["schedule"] + f"; {fine.why['step']}",
        "cascade.val_interval": "see iterations_per_epoch",
        "cascade.batch_size": fine.why["batch"],
        "cascade.time_budget_s": _trainer_budget_why(fine),
    }
    if "max_epochs" in section:
        why["cascade.iterations_per_epoch"] = why["cascade.val_interval"] = "see max_epochs"
    return section, {k: v for k, v in why.items() if k.split(".")[-1] in section or k == "cascade"}


def _data_section(
    fp: Fingerprint, labels: dict[str, Any], label_map: dict[int, int], data_root: str | None, picks: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """The ``data`` section from the decided values (``picks``), and the resampled data set's size in bytes."""
    resampled = float(np.prod(_median_shape_at(fp, picks["spacing"], picks["crop"]))) * fp["n_cases"] * 4
    resampled *= fp["n_channels"] + 1
    cache = {"kind": "memory" if resampled < 0.25 * _available_ram() else "persistent", "rate": 1.0}
    data: dict[str, Any] = {"source": "auto"}
    if data_root is not None:
        data["root"] = data_root
    data.update({"modality": picks["modality"], "labels": labels})
    if label_map:
        data["label_map"] = label_map
    data.update(
        {
            "spacing": picks["spacing"],
            "orientation": picks["orientation"],
            "intensity": picks["intensity"],
            "crop_foreground": picks["crop"],
            "split": {"val_fraction": SPLIT_VAL, "seed": 0},
            "cache": cache,
        }
    )
    return data, resampled


DATA_REASONS = {
    "data.source": "the layout is recognised when loading (dataset.json, images/ + labels/, or a CSV)",
    "data.root": "the data set this plan was made from (--data overrides it)",
    "data.split": "one case in five held out for validation",
}


def _model_reasons(fp: Fingerprint, stage: _Stage) -> dict[str, str]:
    return {
        "model.name": "MONAI's residual U-Net, the network volseg's fast engine rebuilds",
        "model.spatial_dims": f"the labels are {fp['spatial_dims']}D",
        "model.in_channels": f"{fp['n_channels']} image channel(s)",
        "model.args.channels": stage.why["widths"],
        "model.args.strides": stage.why["topology"],
        "model.args.num_res_units": "two residual units per level (MONAI's default)",
        "model.args.norm": "instance normalisation (nnU-Net), batch statistics are poor with small batches",
        "model.args.kernel_size": stage.why["kernels"],
    }


def plan_recipe(
    fp: Fingerprint,
    *,
    name: str | None = None,
    device: str = "cpu",
    memory_gb: float | None = None,
    time_budget_s: float | None = None,
    step_timer: StepTimer | None = None,
    data_root: str | None = None,
) -> Plan:
    """Every decision from the fingerprint, as a recipe (with a ``cascade`` section when two stages are planned).

    Args:
        fp: a fingerprint (:func:`fingerprint`).
        name: recipe name (default: the data set's).
        device: ``cpu`` or ``cuda``: which memory model, widths and step time.
        memory_gb: memory target (GPU memory on cuda, RAM on cpu); default the GPU's, or half the free RAM.
        time_budget_s: training time to plan for (both stages together); None plans nnU-Net's schedule.
        step_timer: ``(model, patch, batch) -> seconds`` of one training step; default
            :func:`measure_step_seconds` on ``device``.
        data_root: written as ``data.root``.
    """
    if device not in ("cpu", "cuda"):
        raise UserError(f"device '{device}' is not cpu or cuda", "--device")
    labels, label_map, values, why_labels = _plan_labels(fp)
    n_classes = len(labels)
    modality, why_mod = determine_modality(fp)
    spacing, why_sp = determine_target_spacing(fp)
    orientation, why_or = determine_orientation(fp)
    _, kept, _ = determine_crop(fp)
    intensity, why_int = determine_normalization(fp, modality, kept)
    crop, kept, why_crop = determine_crop(fp, intensity)
    budget, why_mem = _memory_target(device, memory_gb)
    timer = step_timer or (
        lambda m, p, b: measure_step_seconds(m, p, b, n_classes=n_classes, device=device)  # noqa: E731
    )
    plan_stage = functools.partial(_plan_stage, device=device, budget=budget, n_classes=n_classes, timer=timer)
    stage = plan_stage(fp, spacing, crop=crop, time_budget_s=time_budget_s)
    cascade, why_casc = determine_cascade(fp, spacing, stage.patch, crop)
    if not cascade["applied"] and device == "cpu" and time_budget_s is not None:
        replan = functools.partial(plan_stage, fp, crop=crop, time_budget_s=time_budget_s)
        stage, why_low = _coarser_for_cpu(fp, spacing, stage, cascade, replan, crop)
        why_sp += why_low
    fine = None
    if cascade["applied"]:
        stage, fine = _cascade_stages(fp, spacing, cascade, plan_stage, crop, time_budget_s)
    largest, why_post = determine_postprocess(fp)
    mirror, why_mirror = determine_test_mirroring(stage.aug, fp["spatial_dims"])
    picks = {
        "modality": modality,
        "spacing": stage.spacing,
        "orientation": orientation,
        "intensity": intensity,
        "crop": crop,
    }
    data, resampled = _data_section(fp, labels, label_map, data_root, picks)
    train, why_train = _train_section(stage, device)
    recipe: dict[str, Any] = {
        "name": _recipe_name(name or fp.get("name") or "dataset"),
        "description": f"planned by volseg plan from {fp['n_cases']} cases of {fp.get('name') or 'a data set'}",
        "data": data,
        "model": stage.model,
        "train": train,
        "infer": {"tta_flips": mirror, "postprocess": {"largest_component": largest}},
    }
    reasons = {
        "data.labels": why_labels,
        **DATA_REASONS,
        "data.label_map": f"the files' label values {values} mapped to 0..{n_classes - 1}",
        "data.modality": why_mod,
        "data.spacing": why_sp
        if fine is None
        else (
            f"the coarse stage's spacing (the target spacing, for the fine stage: {_fmt(spacing or [])} mm; {why_sp})"
        ),
        "data.orientation": why_or,
        "data.intensity": why_int,
        "data.crop_foreground": why_crop,
        "data.cache": f"the resampled data set is about {resampled / 1e9:.2f} GB; "
        + ("kept in memory" if data["cache"]["kind"] == "memory" else "more than a quarter of the RAM: cached on disk"),
        **_model_reasons(fp, stage),
        **why_train,
        "infer.tta_flips": why_mirror,
        "infer.postprocess.largest_component": why_post,
    }
    if fine is not None:
        recipe["cascade"], why_fine = _cascade_section(fine, train, CASCADE_MARGIN_MM)
        reasons.update(why_fine)
    reasons = {k: v for k, v in reasons.items() if _has_key(recipe, k)}
    header = _header(fp, device, time_budget_s, why_mem, stage, fine, why_casc)
    decisions = {
        "device": device, "memory_target_bytes": budget, "step_seconds": stage.step, "time_budget_s": time_budget_s,
        "kernels_per_level": stage.kernels, "strides": stage.strides, "cascade": {**cascade, "reason": why_casc},
        "reasons": reasons,
    }  # fmt: skip
    return Plan(recipe, reasons, header, decisions)


def _header(fp: Fingerprint, device: str, budget_s: float | None, why_mem: str, stage: _Stage, fine: _Stage | None,
            why_cascade: str) -> list[str]:  # fmt: skip
    return [
        f"Planned by `volseg plan` for {device}"
        + (f" and a time budget of {budget_s / 60:.0f} min" if budget_s else "")
        + f" from {fp['n_cases']} cases; the fingerprint is beside this file.",
        f"Memory target: {why_mem}.",
        f"Step time: {stage.why['step']}" + (f"; fine stage: {fine.why['step']}." if fine else "."),
        f"Network kernels: {stage.why['kernels']}.",
        f"Cascade: {why_cascade}.",
    ]


def _has_key(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


# --------------------------------------------------------------------------------------------------------
# Writing


def _wrap(text: str, indent: str, width: int = 118) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width=width - len(indent) - 2, break_on_hyphens=False) or [""]


def recipe_yaml(plan: Plan) -> str:
    """The recipe as YAML with ``# why`` comment lines above every decided key (``yaml.safe_load`` of the text gives
    back ``plan.recipe``)."""
    lines = [f"# {line}" for h in plan.header for line in _wrap(h, "")]

    def emit(node: dict[str, Any], path: str, depth: int) -> None:
        indent = "  " * depth
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else str(key)
            why = plan.reasons.get(dotted)
            if why:
                lines.extend(f"{indent}# {w}" for w in _wrap(why, indent))
            k = _key(key)
            flow = f"{indent}{k}: {_flow(value)}"
            nested = isinstance(value, dict) and value
            if nested and (len(flow) > 118 or not all(isinstance(v, (int, float)) for v in value.values())):
                lines.append(f"{indent}{k}:")
                emit(value, dotted, depth + 1)
            else:
                lines.append(flow)

    emit(plan.recipe, "", 0)
    return "\n".join(lines) + "\n"


def _key(key: Any) -> str:
    plain = isinstance(key, str) and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key)
    if plain and key.lower() not in ("y", "n", "yes", "no", "on", "off", "true", "false", "null"):
        return key
    return json.dumps(key)


def _flow(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)}: {_flow(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flow(v) for v in value) + "]"
    if isinstance(value, str) and _key(value) == value:
        return value
    if isinstance(value, float):
        # YAML 1.1 (PyYAML) reads 3e-05 as a string: the mantissa needs a point.
        mantissa, e, exponent = repr(value).partition("e")
        return (mantissa if "." in mantissa else mantissa + ".0") + e + exponent
    return json.dumps(value)


def fingerprint_path(recipe_path: str | Path) -> Path:
    """``configs/NAME.yaml`` -> ``configs/NAME.fingerprint.json``."""
    p = Path(recipe_path)
    stem = p.name[: -len(p.suffix)] if p.suffix in (".yaml", ".yml") else p.name
    return p.with_name(stem + ".fingerprint.json")


def write_plan(plan: Plan, fp: Fingerprint, out: str | Path) -> tuple[Path, Path]:
    """Write the recipe YAML and the fingerprint JSON beside it (each to a temporary name, then renamed); the
    recipe is checked by the schema first."""
    import yaml

    from volseg.fileio import write_text_atomic
    from volseg.recipe import recipe_from_dict

    out = Path(out)
    text = recipe_yaml(plan)
    recipe_from_dict(yaml.safe_load(text), str(out))
    fp_out = fingerprint_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(fp_out, json.dumps({**fp, "plan": plan.decisions}, indent=1) + "\n")
    write_text_atomic(out, text)
    return out, fp_out


def plan_summary(plan: Plan) -> list[str]:
    """A few lines naming the main decisions, for the terminal."""
    r = plan.recipe
    d, m, t = r["data"], r["model"], r["train"]
    spacing = "the images' own grid" if d["spacing"] is None else f"{_fmt(d['spacing'])} mm"
    cascade = plan.decisions.get("cascade", {})
    lines = [
        f"plan {r['name']}: {m['spatial_dims']}D, {m['in_channels']} channel(s), {len(d['labels']) - 1} label(s), "
        f"{d['modality']}",
        f"  spacing {spacing}; intensity {_flow(d['intensity'])}; crop {str(d['crop_foreground']).lower()}",
        f"  patch {_fmt(t['patch_size'])}; {len(m['args']['strides'])} levels, widths {_flow(m['args']['channels'])}",
        f"  {t['batch_size'] * t['samples_per_volume']} patch(es) per step; {t['max_epochs']} epochs x "
        f"{t['iterations_per_epoch']} iterations, validation every {t['val_interval']}; sampler {t['sampler']}",
    ]
    if cascade.get("stages", 1) > 1 or cascade.get("small_labels"):
        lines.append(f"  note: {cascade.get('reason', '')}")
    return lines


def run_plan(
    data: str | Path,
    out: str | Path,
    *,
    device: str = "auto",
    memory_gb: float | None = None,
    time_budget: str | None = None,
    name: str | None = None,
    source: str = "auto",
    echo: Callable[[str], None] | None = None,
) -> tuple[Path, Path, Plan]:
    """``volseg plan``: fingerprint the data set, plan, write the recipe and the fingerprint beside it.

    Args:
        data: data folder or CSV, in any layout volseg reads.
        out: the recipe to write (``NAME.yaml``); the fingerprint goes to ``NAME.fingerprint.json``.
        device: ``auto``, ``cpu`` or ``cuda`` (``cuda:N`` counts as cuda).
        memory_gb: memory target (see :func:`plan_recipe`).
        time_budget: training time to plan for, e.g. ``20m`` (see :func:`parse_duration`).
        name: recipe name (default: the file name of ``out`` without its suffix).
        source: datalist kind, as ``data.source``.
        echo: progress and summary lines.
    """
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = "cuda" if device.startswith("cuda") else device
    budget = parse_duration(time_budget) if time_budget else None
    if memory_gb is not None and memory_gb <= 0:
        raise UserError("--memory-gb must be positive", "--memory-gb")
    fp = fingerprint_dataset(data, source)
    name = name or fingerprint_path(out).name.removesuffix(".fingerprint.json")
    plan = plan_recipe(fp, name=name, device=device, memory_gb=memory_gb, time_budget_s=budget, data_root=str(data))
    recipe_path, fp_path = write_plan(plan, fp, out)
    if echo is not None:
        for line in plan_summary(plan):
            echo(line)
        echo(f"recipe: {recipe_path} (every decision explained in its comments)")
        echo(f"fingerprint: {fp_path}")
    return recipe_path, fp_path, plan


PLAN_FILE = "volseg_plan.yaml"
"""Where ``volseg train --data DIR`` without a recipe writes its plan, in the run folder."""


def default_name(data: str | Path) -> str:
    """A recipe name from a data folder's or CSV's name."""
    p = Path(data)
    return _recipe_name(p.stem if p.is_file() else p.resolve().name)


def plan_for_training(
    data: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    time_budget: str | None = None,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """The recipe for ``volseg train --data DIR`` without ``--config``: planned into the run folder
    (``RUN/volseg_plan.yaml``, the fingerprint beside it), or the plan already there when resuming."""
    from volseg.train import check_run_dir

    path = Path(run_dir) / PLAN_FILE
    check_run_dir(Path(run_dir), resume)  # before planning: a finished run keeps its plan
    if resume and path.is_file():
        if echo is not None:
            echo(f"resuming with the plan {path}")
        return path
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("plan first (volseg plan --data DIR -o RECIPE), then launch the processes with --config", data)
    run_plan(data, path, device=device, time_budget=time_budget, name=Path(run_dir).name, echo=echo)
    return path
