"""The YAML recipe: one file describes a task, and everything that trains, validates, infers and is exported is
built from it.

A recipe is validated by the pydantic models below before anything heavy starts. An unknown key, a wrong type or
an impossible value raises :class:`volseg.errors.UserError` with one line naming the file and the key path.

Dotted overrides (``train.max_epochs=3``) are applied to the raw YAML before validation, so they are checked by
the same rules as the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from volseg.errors import UserError

PositiveFloat = Annotated[float, Field(gt=0)]
PositiveInt = Annotated[int, Field(gt=0)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Label(_Strict):
    """One output label: its value in the label maps, an RGB colour, and optional SNOMED CT codes."""

    value: Annotated[int, Field(ge=0, le=255)]
    color: tuple[int, int, int] | None = None
    category: tuple[str, str, str] | None = Field(
        default=None, description="(CodingSchemeDesignator, CodeValue, CodeMeaning) of the segmented category"
    )
    type: tuple[str, str, str] | None = Field(
        default=None, description="(CodingSchemeDesignator, CodeValue, CodeMeaning) of the segmented type"
    )

    @field_validator("color")
    @classmethod
    def _rgb(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and not all(0 <= c <= 255 for c in v):
            raise ValueError("colour components must be within 0..255")
        return v


class CTIntensity(_Strict):
    """CT window in Hounsfield units, mapped linearly to [0, 1] and clipped."""

    a_min: float = -175.0
    a_max: float = 250.0

    @model_validator(mode="after")
    def _order(self) -> CTIntensity:
        if self.a_max <= self.a_min:
            raise ValueError("a_max must be greater than a_min")
        return self


class MRIntensity(_Strict):
    """MR z-score normalisation over the foreground (non-zero voxels), per channel."""

    nonzero: bool = True


class PercentileIntensity(_Strict):
    """Microscopy: the image's own ``percentile`` range (lower, upper) mapped linearly to [0, 1], per channel.

    Robust to uneven exposure between images; ``clip`` clamps values outside the range.
    """

    percentile: tuple[Annotated[float, Field(ge=0, le=100)], Annotated[float, Field(ge=0, le=100)]] = (1.0, 99.0)
    clip: bool = False

    @model_validator(mode="after")
    def _order(self) -> PercentileIntensity:
        if self.percentile[1] <= self.percentile[0]:
            raise ValueError("the upper percentile must be greater than the lower one")
        return self


class Split(_Strict):
    """Train/validation split: a fraction held out, or fold ``fold`` of ``folds`` (k-fold), by seed."""

    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.2
    folds: Annotated[int, Field(ge=2)] | None = None
    fold: Annotated[int, Field(ge=0)] = 0
    seed: int = 0

    @model_validator(mode="after")
    def _fold_in_range(self) -> Split:
        if self.folds is not None and self.fold >= self.folds:
            raise ValueError(f"fold {self.fold} is out of range for {self.folds} folds")
        return self


class Cache(_Strict):
    kind: Literal["none", "memory", "persistent"] = "memory"
    rate: Annotated[float, Field(ge=0, le=1)] = 1.0


class Data(_Strict):
    """Where the cases are and how they are made ready for the network."""

    source: Literal["auto", "msd", "nnunet", "folder", "csv"] = "auto"
    root: str | None = Field(default=None, description="data folder or CSV; --data overrides it")
    modality: Literal["CT", "MR", "microscopy", "other"] = "CT"
    labels: dict[str, Label]
    label_map: dict[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        description="values in the label files mapped to label values before anything else, e.g. {255: 1} for "
        "0/255 masks; keys are file values, values are the recipe's label values",
    )
    spacing: tuple[PositiveFloat, ...] | None = Field(
        default=(1.5, 1.5, 2.0), description="target spacing in mm; null keeps the images' own grid (2D pixel data)"
    )
    orientation: str | None = Field(
        default="RAS", description="axis codes to reorient to; null or 'none' keeps the stored axes (2D pixel data)"
    )
    intensity: CTIntensity | MRIntensity | PercentileIntensity | None = None
    crop_foreground: bool = True
    split: Split = Split()
    cache: Cache = Cache()

    @field_validator("labels", mode="before")
    @classmethod
    def _short_labels(cls, v: Any) -> Any:
        # `liver: 1` is shorthand for `liver: {value: 1}`.
        if isinstance(v, dict):
            return {k: ({"value": x} if isinstance(x, int) and not isinstance(x, bool) else x) for k, x in v.items()}
        return v

    @field_validator("intensity", mode="before")
    @classmethod
    def _intensity_kind(cls, v: Any) -> Any:
        # Pick the intensity model by its keys, so that a mistake is reported by that model alone.
        if not isinstance(v, dict):
            return v
        kinds: list[tuple[str, type[BaseModel]]] = [
            ("percentile", PercentileIntensity),
            ("a_min", CTIntensity),
            ("a_max", CTIntensity),
            ("nonzero", MRIntensity),
        ]
        model = next((m for key, m in kinds if key in v), None)
        if model is None:
            return v
        try:
            return model.model_validate(v)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"].removeprefix("Value error, ")
            raise ValueError(f"{where}: {msg}" if where else msg) from None

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str | None) -> str | None:
        if v is None or v.strip().lower() in ("none", ""):
            return None
        v = v.upper()
        axes = ["LR", "AP", "SI"]
        used = [next((i for i, pair in enumerate(axes) if c in pair), None) for c in v]
        if len(v) not in (2, 3) or None in used or len(set(used)) != len(used):
            raise ValueError(f"'{v}' is not an orientation code such as RAS or LPS")
        return v

    @model_validator(mode="after")
    def _check(self) -> Data:
        values = [lab.value for lab in self.labels.values()]
        if len(set(values)) != len(values):
            raise ValueError("label values must be unique")
        if sorted(values) != list(range(len(values))):
            raise ValueError(f"label values must be 0..{len(values) - 1} without gaps, got {sorted(values)}")
        if self.labels and min(self.labels.items(), key=lambda kv: kv[1].value)[1].value != 0:
            raise ValueError("one label must have value 0 (background)")
        if len(self.labels) < 2:
            raise ValueError("at least two labels are needed: background and one structure")
        if self.intensity is None:
            defaults = {"CT": CTIntensity, "microscopy": PercentileIntensity}
            self.intensity = defaults.get(self.modality, MRIntensity)()
        elif self.modality == "MR" and isinstance(self.intensity, CTIntensity):
            raise ValueError("an MR recipe takes intensity: {nonzero: ...} (z-score), not a CT window")
        if self.label_map:
            unknown = sorted(set(self.label_map.values()) - set(values))
            if unknown:
                raise ValueError(f"label_map maps to {unknown}, which is not a label value (labels: {sorted(values)})")
        return self

    @property
    def label_names(self) -> list[str]:
        """Label names ordered by value, background first."""
        return [k for k, _ in sorted(self.labels.items(), key=lambda kv: kv[1].value)]


class Model(_Strict):
    name: str = "unet"
    spatial_dims: Literal[2, 3] = 3
    in_channels: PositiveInt = 1
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from volseg.nets import NETWORKS

        if v not in NETWORKS:
            raise ValueError(f"unknown network '{v}'; known: {', '.join(sorted(NETWORKS))}")
        return v


class Optimizer(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adamw"
    lr: PositiveFloat = 1e-3
    weight_decay: Annotated[float, Field(ge=0)] = 1e-5
    momentum: Annotated[float, Field(ge=0, lt=1)] = 0.99


class Scheduler(_Strict):
    name: Literal["none", "poly", "cosine", "plateau", "multistep"] = "poly"
    power: PositiveFloat = 0.9
    milestones: list[PositiveInt] = Field(default_factory=list)
    gamma: Annotated[float, Field(gt=0, le=1)] = 0.1
    patience: Annotated[int, Field(ge=0)] = 10
    min_lr: Annotated[float, Field(ge=0)] = 0.0


class WeightMap(_Strict):
    """The U-Net paper's pixel weights: w = w_c + w0 * exp(-(d1 + d2)^2 / (2 sigma^2)) on the background.

    d1 and d2 are the distances (in mm; pixels for PNG/TIFF) to the nearest and second-nearest object, w_c balances
    the class frequencies (``balance``). The objects are the instances of the case's ``instance`` mask when the
    datalist gives one, else the connected components of the label.
    """

    w0: Annotated[float, Field(ge=0)] = 10.0
    sigma: PositiveFloat = 5.0
    balance: bool = True


class Loss(_Strict):
    name: Literal["dice_ce", "dice", "ce"] = "dice_ce"
    lambda_dice: Annotated[float, Field(ge=0)] = 1.0
    lambda_ce: Annotated[float, Field(ge=0)] = 1.0
    deep_supervision_weights: list[Annotated[float, Field(ge=0)]] | None = None
    batch_dice: bool = Field(
        default=False,
        description="the Dice term over the whole batch as one volume (nnU-Net's batch Dice), not per patch: "
        "patches without a small structure then do not pull its Dice term to 0 or 1",
    )
    dice_background: bool = Field(
        default=True, description="the background channel in the Dice term (MONAI's default; nnU-Net leaves it out)"
    )
    weight_map: WeightMap | None = Field(
        default=None, description="the U-Net paper's weight map on the cross-entropy term (null: off)"
    )
    class_weights: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None,
        description="weight of each label's terms in the cross-entropy and the Dice mean, by name (a label not "
        "named gets 1); None: all alike",
    )


class Augment(_Strict):
    """Augmentations of the U-Net paper and its successors, each with its probability."""

    flip: Annotated[float, Field(ge=0, le=1)] = 0.5
    flip_axes: tuple[Annotated[int, Field(ge=0, le=2)], ...] | None = Field(
        default=None,
        description="the axes mirrored (each with probability flip); None: every axis. Leave out an axis along "
        "which the anatomy is not mirror-symmetric (the liver on one side, left and right organs labelled apart)",
    )
    rotate90: Annotated[float, Field(ge=0, le=1)] = 0.0
    rotate: Annotated[float, Field(ge=0, le=1)] = 0.2
    rotate_range_deg: Annotated[float, Field(ge=0, le=180)] = 15.0
    scale: Annotated[float, Field(ge=0, le=1)] = 0.2
    scale_range: Annotated[float, Field(ge=0, lt=1)] = 0.15
    elastic: Annotated[float, Field(ge=0, le=1)] = 0.0
    elastic_sigma: tuple[PositiveFloat, PositiveFloat] = (9.0, 13.0)
    elastic_magnitude: tuple[PositiveFloat, PositiveFloat] = (0.0 + 1e-6, 900.0)
    intensity_shift: Annotated[float, Field(ge=0, le=1)] = 0.5
    intensity_scale: Annotated[float, Field(ge=0, le=1)] = 0.5
    noise: Annotated[float, Field(ge=0, le=1)] = 0.1

    def flipped_axes(self, nd: int) -> list[int]:
        """The axes training mirrors: ``flip_axes`` (every axis when None), none when ``flip`` is 0."""
        if not self.flip:
            return []
        return list(range(nd)) if self.flip_axes is None else sorted(self.flip_axes)


class EarlyStopping(_Strict):
    patience: PositiveInt = 20
    min_delta: Annotated[float, Field(ge=0)] = 0.0


class Train(_Strict):
    patch_size: tuple[PositiveInt, ...] = (96, 96, 96)
    batch_size: PositiveInt = 2
    samples_per_volume: PositiveInt = 4
    sampler: Literal["pos_neg", "class_balanced"] = "pos_neg"
    pos_fraction: Annotated[float, Field(ge=0, le=1)] = 0.67
    class_ratios: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        default=None,
        description="class_balanced sampler: relative share of the crops centred on each label, by name (a label "
        "not named gets 1); None: every label alike",
    )
    max_epochs: PositiveInt = 100
    iterations_per_epoch: PositiveInt | None = Field(
        default=None, description="repeat the training set so that an epoch has this many iterations"
    )
    optimizer: Optimizer = Optimizer()
    scheduler: Scheduler = Scheduler()
    loss: Loss = Loss()
    amp: bool = Field(
        default=True,
        description="mixed precision for the training steps: AMP on CUDA (MONAI's trainer), bfloat16 autocast on CPUs "
        "with native bfloat16 (AVX512-BF16 or AMX); float32 elsewhere or when false",
    )
    val_interval: PositiveInt = 1
    time_budget_s: PositiveFloat | None = Field(
        default=None,
        description="seconds the training (validation included, caching not) may take: after an epoch where the epoch "
        "and validation times measured so far leave too little for max_epochs, max_epochs is lowered to what fits and "
        "a poly or cosine schedule fitted to it (volseg.training.budget); never raised; None: max_epochs as written",
    )
    early_stopping: EarlyStopping | None = None
    calibrate: list[str] = Field(
        default_factory=list,
        description="labels whose infer.label_bias is chosen after training, on the validation cases with the kept "
        "weights (train.weights) (the bias of those tried with the highest mean Dice per case); [] is none",
    )
    weights: Literal["best", "final"] = Field(
        default="best",
        description="the weights the bundle keeps (models/model.pt): those of the epoch with the best mean "
        "validation Dice, or the final ones (nnU-Net's checkpoint_final, what it predicts with by default); the "
        "calibration and the exported TorchScript use the same",
    )
    seed: int = 0
    num_workers: Annotated[int, Field(ge=0)] = 2
    augment: Augment = Augment()


class Postprocess(_Strict):
    largest_component: list[str] = Field(
        default_factory=list, description="labels for which only the largest connected component is kept"
    )


class Infer(_Strict):
    roi_size: tuple[PositiveInt, ...] | None = Field(default=None, description="defaults to train.patch_size")
    overlap: Annotated[float, Field(ge=0, lt=1)] = 0.25
    sw_batch_size: PositiveInt = 4
    blend: Literal["gaussian", "constant"] = "gaussian"
    padding_mode: Literal["constant", "reflect", "replicate"] = "constant"
    mirror_border: Annotated[int, Field(ge=0)] = Field(
        default=0,
        description="pixels (voxels) of mirrored context added around the whole image before the sliding window and "
        "removed from the prediction (the U-Net paper's overlap-tile strategy; inference only)",
    )
    tta_flips: tuple[Annotated[int, Field(ge=0, le=2)], ...] = Field(
        default=(),
        description="test-time mirroring (nnU-Net's): the spatial axes of the model grid to mirror along; the network "
        "runs on every combination of flips of these axes (2^k passes) and the logits are averaged; [] is off",
    )
    precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="the network's arithmetic in volseg's fast engine: auto is bfloat16 autocast on CUDA and on CPUs "
        "with native bfloat16 (AVX512-BF16 or AMX), float32 elsewhere; fp32 always (exact, slower)",
    )
    label_bias: dict[str, PositiveFloat] = Field(
        default_factory=dict,
        description="labels come from the argmax of each class's probability times its bias (1 for a label not "
        "named): a bias above 1 favours a label, as a lower probability threshold would; set by train.calibrate",
    )
    postprocess: Postprocess = Postprocess()

    @field_validator("tta_flips", mode="before")
    @classmethod
    def _flips(cls, v: Any) -> Any:
        # Bundles written before mirroring existed say false.
        if v is False or v is None:
            return ()
        if v is True:
            raise ValueError("give the axes to mirror along, e.g. [0, 1, 2]")
        return v


class Cascade(_Strict):
    """A second, fine stage (nnU-Net's 3d_cascade_fullres, TotalSegmentator's ROI models).

    The recipe's own network is the coarse stage: it segments the whole image at ``data.spacing``. The fine stage
    segments a crop around the coarse stage's foreground (the ``roi_labels``, plus ``margin_mm`` on every side) at
    its own spacing and patch size, and its labels replace the coarse ones inside the crop. It is trained on crops
    around the reference foreground whose margins are drawn from ``train_margin_mm`` per side, so that it has seen
    crops looser and tighter than the coarse stage's. Everything not given here is the recipe's own.
    """

    roi_labels: list[str] = Field(
        default_factory=list, description="labels whose union is the fine stage's region; [] is every foreground label"
    )
    margin_mm: PositiveFloat = Field(default=20.0, description="margin around the coarse foreground at inference")
    train_margin_mm: tuple[PositiveFloat, PositiveFloat] = Field(
        default=(8.0, 40.0), description="range of the per-side margin of the training crops"
    )
    spacing: tuple[PositiveFloat, ...] = Field(description="the fine stage's voxel spacing in mm")
    patch_size: tuple[PositiveInt, ...] = Field(description="the fine stage's training patch")
    model_args: dict[str, Any] = Field(
        default_factory=dict, description="arguments of the fine network that differ from model.args"
    )
    max_epochs: PositiveInt | None = Field(default=None, description="defaults to train.max_epochs")
    iterations_per_epoch: PositiveInt | None = Field(default=None, description="defaults to train's")
    batch_size: PositiveInt | None = Field(default=None, description="defaults to train.batch_size")
    val_interval: PositiveInt | None = Field(default=None, description="defaults to train.val_interval")
    time_budget_s: PositiveFloat | None = Field(
        default=None, description="the fine stage's train.time_budget_s (defaults to train's)"
    )
    sampler: Literal["pos_neg", "class_balanced"] = Field(
        default="class_balanced", description="class_balanced centres patches on every label alike (small lesions)"
    )
    class_ratios: dict[str, Annotated[float, Field(ge=0)]] | None = Field(
        default=None, description="the fine stage's train.class_ratios (defaults to train's)"
    )
    class_weights: dict[str, Annotated[float, Field(gt=0)]] | None = Field(
        default=None, description="the fine stage's train.loss.class_weights (defaults to train's)"
    )
    calibrate: list[str] | None = Field(
        default=None, description="the fine stage's train.calibrate (defaults to train's)"
    )


class Recipe(_Strict):
    """A whole task."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str = ""
    version: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")] = "0.1.0"
    authors: str = "volseg"
    license: str = "Apache-2.0"
    data: Data
    model: Model = Model()
    train: Train = Train()
    infer: Infer = Infer()
    cascade: Cascade | None = Field(
        default=None, description="a fine second stage on a crop around the coarse foreground (3D only)"
    )

    @model_validator(mode="after")
    def _plain_data(self) -> Recipe:
        # Recipe values are copied into the bundle's MONAI configs, where a string starting with "$" is evaluated,
        # "@" is a reference, "%" a macro, and keys such as "_target_" or "_requires_" instantiate or run things.
        problem = config_syntax_problem(self.model_dump(mode="json"), sep=".")
        if problem:
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _dims(self) -> Recipe:
        nd = self.model.spatial_dims
        for key, value in (
            ("data.spacing", self.data.spacing),
            ("train.patch_size", self.train.patch_size),
            ("infer.roi_size", self.infer.roi_size),
        ):
            if value is not None and len(value) != nd:
                raise ValueError(f"{key} has {len(value)} values but model.spatial_dims is {nd}")
        for key, axes in (("infer.tta_flips", self.infer.tta_flips), ("train.augment.flip_axes",
                                                                        self.train.augment.flip_axes)):  # fmt: skip
            if axes is not None and (any(a >= nd for a in axes) or len(set(axes)) != len(axes)):
                raise ValueError(f"{key} {list(axes)}: each axis once, and a {nd}D model's axes are 0-{nd - 1}")
        if self.data.orientation is not None and len(self.data.orientation) != nd:
            raise ValueError(f"data.orientation '{self.data.orientation}' does not have {nd} letters")
        if self.train.loss.weight_map is not None and self.train.loss.name == "dice":
            raise ValueError("train.loss.weight_map weights the cross-entropy term; it needs loss name dice_ce or ce")
        weights = self.train.loss.class_weights
        if weights is not None:
            if self.train.loss.weight_map is not None:
                raise ValueError("train.loss.class_weights and train.loss.weight_map cannot be combined")
            self._check_known("train.loss.class_weights", weights)
        named = [("infer.label_bias", list(self.infer.label_bias)), ("train.calibrate", self.train.calibrate)]
        if self.cascade is not None:
            named.append(("cascade.calibrate", self.cascade.calibrate or []))
        for key, names in named:
            for name in names:
                if name not in self.data.labels or self.data.labels[name].value == 0:
                    raise ValueError(f"{key} names '{name}', which is not a foreground label")
        for name in self.infer.postprocess.largest_component:
            if name not in self.data.labels:
                raise ValueError(f"infer.postprocess.largest_component names unknown label '{name}'")
        self._check_class_ratios("train", self.train.sampler, self.train.class_ratios)
        stride = 2 ** _depth(self.model)
        bad = [p for p in self.train.patch_size if p % stride]
        if bad:
            raise ValueError(f"train.patch_size {list(self.train.patch_size)} must be divisible by {stride}")
        if self.cascade is not None:
            self._check_cascade(self.cascade)
        return self

    def _check_known(self, key: str, names: dict[str, float]) -> None:
        for name in names:
            if name not in self.data.labels:
                raise ValueError(f"{key} names unknown label '{name}'")

    def _check_class_ratios(self, where: str, sampler: str, ratios: dict[str, float] | None) -> None:
        if ratios is None:
            return
        if sampler != "class_balanced":
            raise ValueError(f"{where}.class_ratios needs {where}.sampler class_balanced")
        self._check_known(f"{where}.class_ratios", ratios)
        if not any(ratios.get(n, 1.0) > 0 for n in self.data.labels):
            raise ValueError(f"{where}.class_ratios: at least one label needs a share above 0")

    def _by_value(self, by_name: dict[str, float] | None) -> list[float] | None:
        """Per-label values given by name, as a list indexed by label value (a label not named gets 1)."""
        if by_name is None:
            return None
        out = [1.0] * self.num_classes
        for name, lab in self.data.labels.items():
            out[lab.value] = float(by_name.get(name, 1.0))
        return out

    def class_weight_list(self) -> list[float] | None:
        """``train.loss.class_weights`` indexed by label value (None: all alike)."""
        return self._by_value(self.train.loss.class_weights)

    def label_bias_list(self) -> list[float] | None:
        """``infer.label_bias`` indexed by label value (None: no bias, a plain argmax)."""
        return self._by_value(self.infer.label_bias) if self.infer.label_bias else None

    def class_ratio_list(self) -> list[float] | None:
        """``train.class_ratios`` as the class-balanced crop's ratios, indexed by label value (None: alike)."""
        return self._by_value(self.train.class_ratios)

    def _check_cascade(self, c: Cascade) -> None:
        nd = self.model.spatial_dims
        self._check_class_ratios("cascade", c.sampler, c.class_ratios)
        if nd != 3:
            raise ValueError("cascade needs a 3D model")
        for key, value in (("cascade.spacing", c.spacing), ("cascade.patch_size", c.patch_size)):
            if len(value) != nd:
                raise ValueError(f"{key} has {len(value)} values but model.spatial_dims is {nd}")
        self._check_known("cascade.class_weights", c.class_weights or {})
        for name in c.roi_labels:
            if name not in self.data.labels or self.data.labels[name].value == 0:
                raise ValueError(f"cascade.roi_labels names '{name}', which is not a foreground label")
        if c.train_margin_mm[0] > c.train_margin_mm[1]:
            raise ValueError("cascade.train_margin_mm is (low, high) with low <= high")
        fine = Model(
            name=self.model.name,
            spatial_dims=nd,
            in_channels=self.model.in_channels,
            args={**self.model.args, **c.model_args},
        )
        stride = 2 ** _depth(fine)
        bad = [p for p in c.patch_size if p % stride]
        if bad:
            raise ValueError(f"cascade.patch_size {list(c.patch_size)} must be divisible by {stride}")

    @property
    def num_classes(self) -> int:
        return len(self.data.labels)

    @property
    def roi_size(self) -> tuple[int, ...]:
        return tuple(self.infer.roi_size or self.train.patch_size)


CONFIG_SYNTAX = ("$", "@", "%")
"""Prefixes that make a string in a MONAI config an expression, a reference or a macro."""


def config_syntax_problem(value: Any, where: str = "", sep: str = "#") -> str | None:
    """Where ``value`` holds MONAI config syntax (a path in MONAI's id notation ``a#b#0`` by default); None for
    plain data.

    Plain data: numbers, booleans, None, strings that do not start with ``$``, ``@`` or ``%``, and lists and
    mappings of those whose keys are strings not starting with ``_`` (``_target_``, ``_requires_``, ``_mode_``, ...).
    """
    if isinstance(value, str):
        return f"{where or 'value'}: {value[:40]!r} is MONAI config syntax" if value.startswith(CONFIG_SYNTAX) else None
    if value is None or isinstance(value, (bool, int, float)):
        return None
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            problem = config_syntax_problem(item, f"{where}{sep}{i}" if where else str(i), sep)
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            at = f"{where}{sep}{key}" if where else str(key)
            if not isinstance(key, str) or key.startswith("_") or key.startswith(CONFIG_SYNTAX):
                return f"{at}: key {key!r} is MONAI config syntax"
            problem = config_syntax_problem(item, at, sep)
            if problem:
                return problem
        return None
    return f"{where or 'value'}: a {type(value).__name__} is not plain data"


def _depth(model: Model) -> int:
    """Number of down-sampling steps of a network, for patch-size divisibility."""
    from volseg.nets import NETWORKS

    return NETWORKS[model.name].depth(model.args)


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"override '{dotted}': '{part}' is not a section", source)
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.path=value``; the value is read as YAML (``3``, ``1e-4``, ``[96, 96, 64]``, ``false``)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override '{text}' is not of the form key.path=value", "--set")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"override '{text}': value is not valid YAML ({exc.__class__.__name__})", "--set") from None
    return key.strip(), value


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p[0].isupper()))
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    msg = msg.removeprefix("Value error, ")
    more = len(err.errors()) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{loc}: {msg}{suffix}" if loc else f"{msg}{suffix}"


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as a dict, raising a one-line :class:`UserError`."""
    if not isinstance(raw, dict):
        raise UserError("a recipe must be a YAML mapping at the top level", source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(_format_error(err), source) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: the YAML file.
        overrides: ``key.path=value`` strings applied before validation.

    Raises:
        UserError: the file is missing or unreadable, is not YAML, or breaks the schema.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("recipe file not found", path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe ({exc.__class__.__name__})", path) from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"YAML tag not allowed{where} ({exc.problem}); a recipe is plain data", path) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"not valid YAML{where}", path) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError("a recipe must be a YAML mapping at the top level", path)
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(raw, key, value, str(path))
    return recipe_from_dict(raw, str(path))


def dump_recipe(recipe: Recipe) -> str:
    """The resolved recipe as YAML (defaults filled in), for saving with a run."""
    data = recipe.model_dump(mode="json")
    return yaml.safe_dump(data, sort_keys=False)
