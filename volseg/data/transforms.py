"""MONAI transform chains built from a recipe, as MONAI bundle components.

Each function returns a list of ``{"_target_": "SomeTransformd", ...}`` dicts. volseg instantiates these same
dicts for training and inference (:func:`instantiate`), and the bundle writer copies them into the bundle's
configs, so what a bundle runs is exactly what volseg trained and validated with.
"""

from __future__ import annotations

import math
from typing import Any

from volseg.recipe import CTIntensity, Recipe

Component = dict[str, Any]

# Axis codes are read in the RAS+ convention (nibabel, NIfTI), whatever reader loaded the image.
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


def _interp(nd: int) -> str:
    return "trilinear" if nd == 3 else "bilinear"


def _intensity(recipe: Recipe) -> list[Component]:
    inten = recipe.data.intensity
    if isinstance(inten, CTIntensity):
        return [
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": inten.a_min,
                "a_max": inten.a_max,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            }
        ]
    nonzero = inten.nonzero if inten is not None else True
    return [{"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": nonzero, "channel_wise": True}]


def _crop(keys: list[str], recipe: Recipe) -> list[Component]:
    if not recipe.data.crop_foreground:
        return []
    return [{"_target_": "CropForegroundd", "keys": keys, "source_key": "image", "allow_smaller": True}]


def preprocessing(recipe: Recipe, with_label: bool) -> list[Component]:
    """Deterministic steps: load, channel first, orientation, spacing, intensity, foreground crop.

    The output of these steps is what caching keeps.
    """
    keys = ["image", "label"] if with_label else ["image"]
    modes: Any = ["bilinear", "nearest"] if with_label else "bilinear"
    chain: list[Component] = [
        {"_target_": "LoadImaged", "keys": keys, "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": keys},
        {"_target_": "Orientationd", "keys": keys, "axcodes": recipe.data.orientation, "labels": RAS_LABELS},
        {"_target_": "Spacingd", "keys": keys, "pixdim": list(recipe.data.spacing), "mode": modes},
    ]
    # CT: window first, then crop to the body (air is 0 after windowing). MR: crop on the raw image, where the
    # background is 0, then normalise over the foreground.
    if isinstance(recipe.data.intensity, CTIntensity):
        chain += _intensity(recipe) + _crop(keys, recipe)
    else:
        chain += _crop(keys, recipe) + _intensity(recipe)
    return chain


def train_sampling(recipe: Recipe) -> list[Component]:
    """Random patch sampling and the augmentations, applied after the cached preprocessing."""
    t = recipe.train
    a = t.augment
    nd = recipe.model.spatial_dims
    keys = ["image", "label"]
    patch = list(t.patch_size)
    chain: list[Component] = [{"_target_": "SpatialPadd", "keys": keys, "spatial_size": patch}]
    if t.sampler == "pos_neg":
        chain.append(
            {
                "_target_": "RandCropByPosNegLabeld",
                "keys": keys,
                "label_key": "label",
                "spatial_size": patch,
                "pos": t.pos_fraction,
                "neg": round(1.0 - t.pos_fraction, 6),
                "num_samples": t.samples_per_volume,
                "image_key": "image",
                "image_threshold": 0,
            }
        )
    else:
        chain.append(
            {
                "_target_": "RandCropByLabelClassesd",
                "keys": keys,
                "label_key": "label",
                "spatial_size": patch,
                "num_classes": recipe.num_classes,
                "num_samples": t.samples_per_volume,
            }
        )
    if a.elastic > 0:
        if nd == 3:
            chain.append(
                {
                    "_target_": "Rand3DElasticd",
                    "keys": keys,
                    "prob": a.elastic,
                    "sigma_range": list(a.elastic_sigma),
                    "magnitude_range": list(a.elastic_magnitude),
                    "mode": ["bilinear", "nearest"],
                    "padding_mode": "zeros",
                }
            )
        else:
            # The U-Net paper: displacements on a coarse 3x3 grid, smoothly interpolated.
            chain.append(
                {
                    "_target_": "Rand2DElasticd",
                    "keys": keys,
                    "prob": a.elastic,
                    "spacing": [max(1, p // 3) for p in patch],
                    "magnitude_range": [1.0, 2.0],
                    "mode": ["bilinear", "nearest"],
                    "padding_mode": "reflection",
                }
            )
    if a.rotate > 0 and a.rotate_range_deg > 0:
        rad = math.radians(a.rotate_range_deg)
        rot: Component = {"_target_": "RandRotated", "keys": keys, "prob": a.rotate, "range_x": rad}
        if nd == 3:
            rot.update({"range_y": rad, "range_z": rad})
        rot.update({"mode": ["bilinear", "nearest"], "padding_mode": "zeros", "keep_size": True})
        chain.append(rot)
    if a.scale > 0 and a.scale_range > 0:
        chain.append(
            {
                "_target_": "RandZoomd",
                "keys": keys,
                "prob": a.scale,
                "min_zoom": 1.0 - a.scale_range,
                "max_zoom": 1.0 + a.scale_range,
                "mode": [_interp(nd), "nearest"],
                "keep_size": True,
            }
        )
    if a.rotate90 > 0:
        chain.append({"_target_": "RandRotate90d", "keys": keys, "prob": a.rotate90, "max_k": 3})
    if a.flip > 0:
        for axis in range(nd):
            chain.append({"_target_": "RandFlipd", "keys": keys, "prob": a.flip, "spatial_axis": axis})
    if a.intensity_scale > 0:
        chain.append({"_target_": "RandScaleIntensityd", "keys": "image", "factors": 0.1, "prob": a.intensity_scale})
    if a.intensity_shift > 0:
        chain.append({"_target_": "RandShiftIntensityd", "keys": "image", "offsets": 0.1, "prob": a.intensity_shift})
    if a.noise > 0:
        chain.append({"_target_": "RandGaussianNoised", "keys": "image", "prob": a.noise, "std": 0.02})
    chain.append({"_target_": "EnsureTyped", "keys": keys, "track_meta": False})
    return chain


def train_transforms(recipe: Recipe) -> list[Component]:
    """The whole training chain: cached preprocessing then random sampling and augmentation."""
    return preprocessing(recipe, with_label=True) + train_sampling(recipe)


def val_transforms(recipe: Recipe) -> list[Component]:
    """Validation: the preprocessing only; the evaluator runs a sliding window over whole volumes."""
    return preprocessing(recipe, with_label=True) + [{"_target_": "EnsureTyped", "keys": ["image", "label"]}]


def infer_preprocessing(recipe: Recipe) -> list[Component]:
    """Inference preprocessing: invertible, so that predictions go back to the input grid."""
    return preprocessing(recipe, with_label=False) + [{"_target_": "EnsureTyped", "keys": "image"}]


def infer_postprocessing(recipe: Recipe, invert_ref: str = "@preprocessing") -> list[Component]:
    """From logits to labels on the input grid (softmax, invert the preprocessing, argmax, postprocess).

    Probabilities are resampled back (linear), and only then turned into labels, which keeps thin structures.
    """
    chain: list[Component] = [
        {"_target_": "Activationsd", "keys": "pred", "softmax": True},
        {
            "_target_": "Invertd",
            "keys": "pred",
            "transform": invert_ref,
            "orig_keys": "image",
            "nearest_interp": False,
            "to_tensor": True,
        },
        {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
    ]
    keep = [recipe.data.labels[n].value for n in recipe.infer.postprocess.largest_component]
    if keep:
        chain.append(
            {
                "_target_": "KeepLargestConnectedComponentd",
                "keys": "pred",
                "applied_labels": keep,
                "is_onehot": False,
                "independent": True,
            }
        )
    return chain


def sliding_window(recipe: Recipe) -> Component:
    """The sliding-window inferer component."""
    i = recipe.infer
    return {
        "_target_": "SlidingWindowInferer",
        "roi_size": list(recipe.roi_size),
        "sw_batch_size": i.sw_batch_size,
        "overlap": i.overlap,
        "mode": i.blend,
        "padding_mode": i.padding_mode,
    }


def instantiate(components: list[Component] | Component) -> Any:
    """Instantiate bundle components with MONAI's own config parser (the same code path as a bundle run)."""
    from monai.bundle import ConfigParser

    if isinstance(components, list):
        parser = ConfigParser({"chain": {"_target_": "Compose", "transforms": components}})
        return parser.get_parsed_content("chain")
    parser = ConfigParser({"c": components})
    return parser.get_parsed_content("c")
