"""MONAI transform chains built from a recipe, as MONAI bundle components.

Each function returns a list of ``{"_target_": "SomeTransformd", ...}`` dicts. The trainer instantiates these
dicts (:func:`instantiate`) for training and validation, and the bundle writer copies them into the bundle's
configs, so that ``monai.bundle run`` and MONAI Label run what volseg trained and validated with; volseg's MONAI
engine builds the inference chain from those configs once they are found exactly volseg's. The fast engine
(:mod:`volseg.fastpath`) does not use them: it computes the same steps itself, and the tests hold it to the chain.
"""

from __future__ import annotations

import math
from typing import Any

from volseg.recipe import CTIntensity, PercentileIntensity, Recipe

Component = dict[str, Any]

WEIGHT_MAP_TARGET = "scripts.weightmap.UNetWeightMapd"
"""The weight-map transform, from the bundle's own scripts/ (volseg/bundle_scripts/weightmap.py)."""

# Axis codes are read in the RAS+ convention (nibabel, NIfTI), whatever reader loaded the image.
RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]


def _interp(nd: int) -> str:
    return "trilinear" if nd == 3 else "bilinear"


def _intensity(recipe: Recipe) -> list[Component]:
    inten = recipe.data.intensity
    if isinstance(inten, PercentileIntensity):
        return [
            {
                "_target_": "ScaleIntensityRangePercentilesd",
                "keys": "image",
                "lower": inten.percentile[0],
                "upper": inten.percentile[1],
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": inten.clip,
                "channel_wise": True,
            }
        ]
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


def _pil_converter(in_channels: int) -> str | None:
    """PIL conversion of 2D images to the recipe's channels: colour to grey for 1 channel, grey to RGB for 3."""
    if in_channels == 1:
        return "$lambda im: im.convert('L') if im.mode in ('RGB', 'RGBA', 'P', 'LA', 'CMYK', 'YCbCr') else im"
    if in_channels == 3:
        return "$lambda im: im if im.mode == 'RGB' else im.convert('RGB')"
    return None


def _load(recipe: Recipe, keys: list[str]) -> list[Component]:
    """Loading. 3D: MONAI picks the reader by file suffix. 2D: Pillow is tried first (PNG, TIFF, JPEG, BMP; arrays
    come out as (x, y), i.e. transposed from Pillow's rows and columns, as MONAI's PILReader does), with NIfTI and
    the rest still read by MONAI's other readers; images are converted to the recipe's ``in_channels``."""
    if recipe.model.spatial_dims == 3:
        return [{"_target_": "LoadImaged", "keys": keys, "image_only": True}]
    image_reader: Component = {"_target_": "PILReader"}
    converter = _pil_converter(recipe.model.in_channels)
    if converter:
        image_reader["converter"] = converter
    chain = [{"_target_": "LoadImaged", "keys": "image", "image_only": True, "reader": image_reader}]
    rest = [k for k in keys if k != "image"]
    if rest:
        chain.append({"_target_": "LoadImaged", "keys": rest, "image_only": True, "reader": "PILReader"})
    return chain


def _label_map(recipe: Recipe) -> list[Component]:
    lm = recipe.data.label_map
    if not lm:
        return []
    pairs = sorted(lm.items())
    return [
        {
            "_target_": "MapLabelValued",
            "keys": "label",
            "orig_labels": [k for k, _ in pairs],
            "target_labels": [v for _, v in pairs],
        }
    ]


def _weight_map(recipe: Recipe) -> list[Component]:
    """The U-Net paper's weight map of each training label, from the case's instance mask when it has one."""
    wm = recipe.train.loss.weight_map
    if wm is None:
        return []
    load = _load(recipe, ["instance"])[-1]
    load["allow_missing_keys"] = True
    return [
        load,
        {"_target_": "EnsureChannelFirstd", "keys": "instance", "allow_missing_keys": True},
        {
            "_target_": WEIGHT_MAP_TARGET,
            "keys": "instance",
            "label_key": "label",
            "w0": wm.w0,
            "sigma": wm.sigma,
            "balance": wm.balance,
            "output_key": "weight",
        },
        {"_target_": "DeleteItemsd", "keys": "instance"},
    ]


def preprocessing(recipe: Recipe, with_label: bool, training: bool = False) -> list[Component]:
    """Deterministic steps: load, channel first, label mapping, orientation, spacing, intensity, foreground crop.

    The output of these steps is what caching keeps. With ``training`` and a weight map in the recipe's loss, the
    weight map is computed here too (right after loading, on the label's own grid) and carried as key ``weight``
    through the spatial steps. Orientation is skipped when ``data.orientation`` is null and resampling when
    ``data.spacing`` is null (2D pixel data, which has no physical grid).
    """
    keys = ["image", "label"] if with_label else ["image"]
    chain: list[Component] = _load(recipe, keys) + [{"_target_": "EnsureChannelFirstd", "keys": keys}]
    if with_label:
        chain += _label_map(recipe)
        if training and recipe.train.loss.weight_map is not None:
            chain += _weight_map(recipe)
            keys = keys + ["weight"]
    modes: Any = ["bilinear"] + ["nearest"] * (len(keys) - 1) if with_label else "bilinear"
    if recipe.data.orientation:
        chain.append(
            {"_target_": "Orientationd", "keys": keys, "axcodes": recipe.data.orientation, "labels": RAS_LABELS}
        )
    if recipe.data.spacing:
        chain.append({"_target_": "Spacingd", "keys": keys, "pixdim": list(recipe.data.spacing), "mode": modes})
    # CT: window first, then crop to the body (air is 0 after windowing). MR and microscopy: crop on the raw image,
    # where the background is 0, then normalise.
    if isinstance(recipe.data.intensity, CTIntensity):
        chain += _intensity(recipe) + _crop(keys, recipe)
    else:
        chain += _crop(keys, recipe) + _intensity(recipe)
    if training and with_label and recipe.train.sampler == "class_balanced":
        chain += _class_indices(recipe, keys)
    return chain


#: Voxel indices kept per class for the class-balanced crop's centres (evenly thinned beyond this), so that the
#: cache holds at most this many int64 values per class and case.
MAX_INDICES_PER_CLASS = 1 << 20
#: Key of the cached per-class voxel indices (``ClassesToIndicesd``'s default name for key "label").
CLASS_INDICES_KEY = "label_cls_indices"


def _class_indices(recipe: Recipe, keys: list[str]) -> list[Component]:
    """The class-balanced crop's per-class voxel indices, computed once per case with the cached preprocessing
    rather than on every draw (on a CPU that search was most of the sampling time). The indices are flat indices on
    the grid they were computed on, so the padding to the patch size comes first, here."""
    return [
        {"_target_": "SpatialPadd", "keys": keys, "spatial_size": list(recipe.train.patch_size)},
        {
            "_target_": "ClassesToIndicesd",
            "keys": "label",
            "num_classes": recipe.num_classes,
            "max_samples_per_class": MAX_INDICES_PER_CLASS,
        },
    ]


def train_sampling(recipe: Recipe) -> list[Component]:
    """Random patch sampling and the augmentations, applied after the cached preprocessing."""
    t = recipe.train
    a = t.augment
    nd = recipe.model.spatial_dims
    keys = ["image", "label"]
    weighted = t.loss.weight_map is not None
    # The weight map (key "weight", from the preprocessing) is cropped with the label, then joined to it as its
    # second channel, so that every spatial augmentation moves both alike (nearest interpolation for both).
    crop_keys = keys + ["weight"] if weighted else keys
    patch = list(t.patch_size)
    chain: list[Component] = []
    if t.sampler == "pos_neg":
        chain.append({"_target_": "SpatialPadd", "keys": crop_keys, "spatial_size": patch})
        chain.append(
            {
                "_target_": "RandCropByPosNegLabeld",
                "keys": crop_keys,
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
                "keys": crop_keys,
                "label_key": "label",
                "spatial_size": patch,
                "num_classes": recipe.num_classes,
                "num_samples": t.samples_per_volume,
                "indices_key": CLASS_INDICES_KEY,  # from the cached preprocessing (padded there)
            }
        )
        ratios = recipe.class_ratio_list()
        if ratios is not None:  # written only when given, so that other recipes' configs stay as they were
            chain[-1]["ratios"] = ratios
    if weighted:
        chain += [
            {"_target_": "ConcatItemsd", "keys": ["label", "weight"], "name": "label", "dim": 0},
            {"_target_": "DeleteItemsd", "keys": "weight"},
        ]
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
    for axis in a.flipped_axes(nd):
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
    """The whole training chain: cached preprocessing then random sampling and augmentation.

    With a weight map, the training label has two channels: class values and the weight of each pixel.
    """
    return preprocessing(recipe, with_label=True, training=True) + train_sampling(recipe)


def val_transforms(recipe: Recipe) -> list[Component]:
    """Validation: the preprocessing only; the evaluator runs a sliding window over whole volumes."""
    return preprocessing(recipe, with_label=True) + [{"_target_": "EnsureTyped", "keys": ["image", "label"]}]


def infer_preprocessing(recipe: Recipe) -> list[Component]:
    """Inference preprocessing: invertible, so that predictions go back to the input grid.

    ``infer.mirror_border`` pads the image by mirroring before the sliding window (the inverse removes it again).
    """
    chain = preprocessing(recipe, with_label=False)
    border = recipe.infer.mirror_border
    if border:
        chain.append({"_target_": "BorderPadd", "keys": "image", "spatial_border": border, "mode": "reflect"})
    return chain + [{"_target_": "EnsureTyped", "keys": "image"}]


def infer_postprocessing(recipe: Recipe, invert_ref: str = "@preprocessing") -> list[Component]:
    """From logits to labels on the input grid (softmax, invert the preprocessing, argmax, postprocess).

    With ``infer.label_bias`` the argmax is over the probabilities times each class's bias (the bundle's
    ``scripts/labels.py``).

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
    ]
    bias = recipe.label_bias_list()
    if bias is None:
        chain.append({"_target_": "AsDiscreted", "keys": "pred", "argmax": True})
    else:
        chain.append({"_target_": "scripts.labels.BiasedArgmaxd", "keys": "pred", "bias": bias})
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

    # Targets in the bundle's own scripts/ are volseg's bundle_scripts package when volseg runs them itself.
    components = _local_scripts(components)
    if isinstance(components, list):
        parser = ConfigParser({"chain": {"_target_": "Compose", "transforms": components}})
        return parser.get_parsed_content("chain")
    parser = ConfigParser({"c": components})
    return parser.get_parsed_content("c")


def _local_scripts(node: Any) -> Any:
    """A copy of ``node`` with ``scripts.X`` targets renamed ``volseg.bundle_scripts.X``."""
    if isinstance(node, dict):
        out = {k: _local_scripts(v) for k, v in node.items()}
        target = out.get("_target_")
        if isinstance(target, str) and target.startswith("scripts."):
            out["_target_"] = "volseg.bundle_scripts." + target.removeprefix("scripts.")
        return out
    if isinstance(node, list):
        return [_local_scripts(v) for v in node]
    return node
