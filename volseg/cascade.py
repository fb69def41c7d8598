"""Two-stage cascade: a coarse stage over the whole image, a fine stage on a crop around its foreground.

nnU-Net plans a low-resolution stage and a cascade when its patch covers little of the image; TotalSegmentator
runs fine models on regions found by a coarse one. volseg's cascade is the region kind, which on a CPU costs the
fine stage only the region's voxels:

1. the recipe's own network (the coarse stage, ``data.spacing``) segments the whole image;
2. the box around the coarse stage's ``cascade.roi_labels`` (each connected object of the region whose volume is
   at least half that of the largest object of the same label, so that a stray island, say muscle taken for
   liver, does not stretch it), plus ``cascade.margin_mm`` on every side, is cropped from the input at the
   input's own resolution;
3. the fine stage (``cascade.spacing``, ``cascade.patch_size``) segments the crop; inside the box its labels
   are the answer, outside it the coarse labels are kept for the labels that are not region labels.

Both stages live in one bundle: the run folder is the coarse stage's bundle and ``stages/fine/`` is the fine
stage's, whose recipe is :func:`fine_recipe` of the parent's (checked when the bundle is loaded).

Training: the coarse stage trains as any recipe. The fine stage trains on crops of the same cases around their
reference region, each side's margin drawn from ``cascade.train_margin_mm``, at the input resolution (the fine
stage's own preprocessing resamples them), with the coarse stage's train/validation split: the crops are listed in
the cases' own order, so the seeded split picks the same cases (and :func:`train_cascade` checks it does).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import UserError
from volseg.recipe import Recipe, recipe_from_dict

FINE_DIR = "stages/fine"
"""Where the fine stage's bundle lives inside the cascade's bundle."""

KEEP_FRACTION = 0.5
"""Objects of the coarse region smaller than this fraction of the largest one of their label do not widen the box."""


def fine_recipe(recipe: Recipe) -> Recipe:
    """The fine stage's recipe: the recipe with the cascade's spacing, patch, network arguments and schedule."""
    c = recipe.cascade
    if c is None:
        raise ValueError("recipe has no cascade")
    raw = recipe.model_dump(mode="json")
    raw.pop("cascade")
    raw["name"] = f"{recipe.name}_fine"
    raw["description"] = f"Fine stage of {recipe.name}: {recipe.description}".strip()
    raw["data"].update(spacing=list(c.spacing), root=None, source="msd", crop_foreground=False)
    raw["model"]["args"] = {**recipe.model.args, **c.model_args}
    t = raw["train"]
    t.update(patch_size=list(c.patch_size), sampler=c.sampler)
    if c.class_ratios is not None:
        t["class_ratios"] = dict(c.class_ratios)
    elif c.sampler != "class_balanced":
        t["class_ratios"] = None
    if c.class_weights is not None:
        t["loss"]["class_weights"] = dict(c.class_weights)
    if c.calibrate is not None:
        t["calibrate"] = list(c.calibrate)
    if c.max_epochs is not None:
        t["max_epochs"] = c.max_epochs
    for key in ("iterations_per_epoch", "batch_size", "val_interval", "time_budget_s"):
        if getattr(c, key) is not None:
            t[key] = getattr(c, key)
    raw["infer"]["roi_size"] = None
    return recipe_from_dict(raw, f"{recipe.name}: cascade")


def roi_values(recipe: Recipe) -> list[int]:
    """Label values whose union is the fine stage's region."""
    c = recipe.cascade
    names = (c.roi_labels if c is not None else []) or [n for n, lab in recipe.data.labels.items() if lab.value]
    return sorted(recipe.data.labels[n].value for n in names)


def _voxel_sizes(affine: np.ndarray) -> np.ndarray:
    nd = affine.shape[0] - 1
    return np.sqrt((np.asarray(affine[:nd, :nd], dtype=float) ** 2).sum(axis=0))


def region_box(
    mask: np.ndarray,
    affine: np.ndarray,
    margin_mm: float | Sequence[float] | np.ndarray,
    keep_fraction: float = KEEP_FRACTION,
) -> tuple[slice, ...] | None:
    """The box (one slice per axis) around ``mask``'s objects of at least ``keep_fraction`` of the largest one,
    widened by ``margin_mm`` (a number, or per axis ``(low, high)`` pairs as an (nd, 2) array), clipped to the
    image; None when the mask is empty."""
    from scipy import ndimage

    if not mask.any():
        return None
    if keep_fraction > 0:
        objects, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(objects.ravel())[1:]
            keep = np.flatnonzero(sizes >= keep_fraction * sizes.max()) + 1
            mask = np.isin(objects, keep)
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0) + 1
    margins = np.broadcast_to(
        np.asarray(margin_mm, dtype=float).reshape(-1, 1)
        if np.ndim(margin_mm) == 1
        else np.asarray(margin_mm, dtype=float),
        (mask.ndim, 2),
    )
    pad = np.ceil(margins / _voxel_sizes(affine)[:, None]).astype(int)
    return tuple(
        slice(max(0, int(lo[a] - pad[a, 0])), min(mask.shape[a], int(hi[a] + pad[a, 1]))) for a in range(mask.ndim)
    )


def region_mask(labels: np.ndarray, roi: Sequence[int], keep_fraction: float = KEEP_FRACTION) -> np.ndarray:
    """The region's voxels whose connected object (of the union of the ``roi`` labels) is at least ``keep_fraction``
    of the largest object of its label; an object's label is the region label it holds most of."""
    from scipy import ndimage

    union = np.isin(labels, list(roi))
    objects, n = ndimage.label(union)
    if n <= 1:
        return union
    sizes = np.bincount(objects.ravel(), minlength=n + 1)[1:]
    owner = np.zeros(n, dtype=np.int64)
    most = np.zeros(n, dtype=np.int64)
    for value in roi:
        count = np.bincount(objects[labels == value], minlength=n + 1)[1:]
        take = count > most
        owner[take], most[take] = value, count[take]
    keep = np.zeros(n, dtype=bool)
    for value in np.unique(owner):
        mine = owner == value
        keep[mine] = sizes[mine] >= keep_fraction * sizes[mine].max()
    return np.isin(objects, np.flatnonzero(keep) + 1)


def box_affine(affine: np.ndarray, box: Sequence[slice]) -> np.ndarray:
    """The affine of ``array[box]``: the same axes, the origin moved to the box's first voxel."""
    nd = len(box)
    out = np.array(affine, dtype=float, copy=True)
    out[:nd, nd] = affine[:nd, :nd] @ np.array([s.start for s in box], dtype=float) + affine[:nd, nd]
    return out


def merge(coarse: np.ndarray, fine: np.ndarray, box: Sequence[slice], roi: Sequence[int]) -> np.ndarray:
    """Coarse labels outside the box without the region labels; the fine labels inside the box."""
    out = np.where(np.isin(coarse, list(roi)), 0, coarse).astype(coarse.dtype, copy=False)
    out[tuple(box)] = fine.astype(out.dtype, copy=False)
    return out


def refine(
    recipe: Recipe,
    coarse: np.ndarray,
    image: np.ndarray,
    affine: np.ndarray,
    segment_fine: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> tuple[np.ndarray, str | None]:
    """Run the fine stage on the box around the coarse labels' region (``image``, ``coarse`` and the result on the
    input grid; ``image`` may have channels after the spatial axes). Returns (labels, a note when the coarse stage
    found no region)."""
    c = recipe.cascade
    assert c is not None
    roi = roi_values(recipe)
    box = region_box(region_mask(coarse, roi), affine, c.margin_mm, keep_fraction=0.0)
    if box is None:
        return coarse, "the coarse stage found none of the fine stage's region; its labels are the answer"
    spatial = tuple(box) + (slice(None),) * (image.ndim - coarse.ndim)
    fine = segment_fine(np.ascontiguousarray(image[spatial]), box_affine(affine, box))
    return merge(coarse, fine, box, roi), None


class CascadeEngine:
    """The two stages as one engine (:mod:`volseg.engines`): the coarse engine on the whole image, the fine engine
    on the crop around its region. Labels only: the stages' probabilities live on different grids."""

    name = "cascade"

    def __init__(self, recipe: Recipe, coarse: Any, fine: Any) -> None:
        self.recipe = recipe
        self.coarse = coarse
        self.fine = fine
        self.device = getattr(coarse, "device", None)
        self.network = getattr(coarse, "network", None)
        self.engine_notes: list[str] = []

    @staticmethod
    def supports(recipe: Any) -> str | None:
        return None if getattr(recipe, "cascade", None) is not None else "the recipe has no cascade"

    def segment(self, image: Any, probabilities: bool = False) -> Any:
        from volseg.engines import Segmentation
        from volseg.imageio import Image

        if probabilities:
            raise UserError("a cascade bundle gives labels, not probabilities (its stages have different grids)",
                            image.path)  # fmt: skip
        first = self.coarse.segment(image)
        notes = list(first.notes)

        def segment_fine(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
            crop = Image(array, affine, meta=dict(image.meta), notes=[])
            out = self.fine.segment(crop)
            notes.extend(n for n in out.notes if n not in notes)
            return out.labels

        labels, note = refine(self.recipe, first.labels, image.array, image.affine, segment_fine)
        if note:
            notes.append(f"note: {note}")
        return Segmentation(labels=labels, notes=notes, affine=first.affine)


def check_fine_stage(recipe: Recipe, bundle_dir: Path) -> Path:
    """The fine stage's bundle of a cascade bundle: present, and its recipe exactly :func:`fine_recipe` of the
    parent's (its configs are then compared with volseg's as any bundle's)."""
    from volseg.bundle import read_bundle_recipe

    fine_dir = Path(bundle_dir) / FINE_DIR
    if not (fine_dir / "configs").is_dir():
        raise UserError(f"the recipe has a cascade but {FINE_DIR}/ holds no bundle", bundle_dir)
    got = read_bundle_recipe(fine_dir).model_dump(mode="json")
    expected = fine_recipe(recipe).model_dump(mode="json")
    if recipe.infer.label_bias == {}:
        # the fine stage's own calibration (train.calibrate) chose its label bias after it was trained
        expected["infer"]["label_bias"] = got.get("infer", {}).get("label_bias", {})
    if got != expected:
        raise UserError(f"{FINE_DIR}/configs/volseg_recipe.yaml is not the fine stage of the bundle's recipe",
                        bundle_dir)  # fmt: skip
    return fine_dir


# --------------------------------------------------------------------------------------------------------
# Training


def _read_case_image(image: str | list[str]) -> tuple[list[np.ndarray], np.ndarray]:
    """A training case's image, one (i, j, k) array per channel file, and the affine (RAS)."""
    from volseg.imageio import read_image

    arrays, affine = [], None
    for path in image if isinstance(image, list) else [image]:
        read = read_image(path)
        arr = read.array if read.array.ndim == 3 else read.array.reshape(read.array.shape[:3] + (-1,))
        arrays += [arr] if arr.ndim == 3 else [arr[..., c] for c in range(arr.shape[-1])]
        affine = read.affine if affine is None else affine
    assert affine is not None
    return arrays, np.asarray(affine, dtype=float)


def _read_case_label(path: str) -> np.ndarray:
    from volseg.imageio import is_nifti, read_image, read_labels

    if is_nifti(path):
        return np.asarray(read_labels(path)[0])
    return np.rint(read_image(path).array).astype(np.int32)


def write_fine_dataset(recipe: Recipe, cases: list[dict[str, Any]], out_dir: Path, seed: int = 0
                       ) -> tuple[Path, list[str]]:  # fmt: skip
    """Crops of ``cases`` around their reference region, as an MSD data set in ``out_dir`` (the cases' order).

    Every case gets its own per-side margins, drawn from ``cascade.train_margin_mm``; a case whose label holds
    none of the region is cropped to the whole image. Returns (the data set folder, the case names).
    """
    import nibabel as nib

    c = recipe.cascade
    assert c is not None
    roi = roi_values(recipe)
    rng = np.random.default_rng(seed)
    for sub in ("imagesTr", "labelsTr"):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    items, names = [], []
    for i, case in enumerate(cases):
        channels, affine = _read_case_image(case["image"])
        label = np.squeeze(_read_case_label(case["label"]))
        if label.shape != channels[0].shape:
            raise UserError(f"label shape {label.shape} differs from the image's {channels[0].shape}", case["label"])
        margins = rng.uniform(c.train_margin_mm[0], c.train_margin_mm[1], size=(3, 2))
        box = region_box(np.isin(label, roi), affine, margins, 0.0) or tuple(slice(0, n) for n in label.shape)
        crop_affine = box_affine(affine, box)
        files = []
        for k, arr in enumerate(channels):
            name = f"case_{i:04d}_{k:04d}.nii.gz" if len(channels) > 1 else f"case_{i:04d}.nii.gz"
            nib.save(nib.Nifti1Image(np.ascontiguousarray(arr[box]), crop_affine), str(out_dir / "imagesTr" / name))
            files.append(f"./imagesTr/{name}")
        lab = np.ascontiguousarray(label[box]).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, crop_affine), str(out_dir / "labelsTr" / f"case_{i:04d}.nii.gz"))
        items.append({"image": files if len(files) > 1 else files[0], "label": f"./labelsTr/case_{i:04d}.nii.gz"})
        names.append(_first(case["image"]).name)
    meta = {
        "name": f"{recipe.name}_fine",
        "description": f"crops around {', '.join(map(str, roi))} for the fine stage of {recipe.name}",
        "labels": {str(lab.value): n for n, lab in recipe.data.labels.items()},
        "numTraining": len(items),
        "training": items,
    }
    (out_dir / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out_dir, names


def train_cascade(
    recipe: Recipe,
    data_root: str | Path,
    run_dir: str | Path,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = print,
    **train_kwargs: Any,
) -> tuple[Any, Any]:
    """Train the coarse stage into ``run_dir``, then the fine stage into ``run_dir/stages/fine``.

    A stage already finished (its ``logs/result.json`` written) is kept; with ``resume`` an interrupted stage
    continues. Returns the two stages' TrainResults.
    """
    import tempfile

    from volseg.data.datalist import load_datalist, split_cases
    from volseg.train import LAST, _read_result, split_run_cases, train

    if recipe.cascade is None:
        raise ValueError("recipe has no cascade")
    run_dir = Path(run_dir).resolve()
    fine = fine_recipe(recipe)
    fine_dir = run_dir / FINE_DIR
    s = recipe.data.split
    results = []
    for stage, stage_dir in (("coarse", run_dir), ("fine", fine_dir)):
        if (stage_dir / "logs" / "result.json").is_file() and (stage_dir / LAST).is_file() and resume:
            echo(f"{stage} stage: finished earlier ({stage_dir})")
            results.append(_read_result(stage_dir))
            continue
        started = resume and (stage_dir / LAST).is_file()
        if stage == "coarse":
            echo(f"coarse stage ({recipe.model.name}, spacing {list(recipe.data.spacing or [])} mm)")
            results.append(train(recipe, data_root, stage_dir, resume=started, echo=echo, **train_kwargs))
            continue
        ordered = load_datalist(data_root, recipe.data.source)
        _, val_cases = split_cases(ordered, s.val_fraction, s.folds, s.fold, s.seed)
        with tempfile.TemporaryDirectory(prefix="volseg-fine-") as tmp:
            echo(f"fine stage: cropping {len(ordered)} cases around labels {roi_values(recipe)}")
            fine_root, names = write_fine_dataset(recipe, ordered, Path(tmp), seed=recipe.train.seed)
            f_train, f_val, _ = split_run_cases(fine, fine_root)
            picked = [names[int(Path(c["label"]).name[5:9])] for c in f_val]
            if picked != [_first(c["image"]).name for c in val_cases]:
                raise RuntimeError("the fine stage's validation split differs from the coarse stage's")
            echo(f"fine stage ({fine.model.name}, spacing {list(fine.data.spacing or [])} mm) into {fine_dir}")
            results.append(train(fine, fine_root, fine_dir, resume=started, echo=echo, **train_kwargs))
    return results[0], results[1]


def _first(image: str | list[str]) -> Path:
    return Path(image[0] if isinstance(image, list) else image)
