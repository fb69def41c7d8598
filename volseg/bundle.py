"""MONAI bundles: the configs volseg writes from a recipe, and the files of a finished run.

A training run directory *is* a bundle::

    RUN/configs/metadata.json      valid against MONAI's 2024-07-25 bundle schema
    RUN/configs/inference.json     image in, pred out; only MONAI and torch targets (or scripts/)
    RUN/configs/train.json         MONAI Label conventions: network, train#trainer, train#handlers, ...
    RUN/configs/logging.conf
    RUN/configs/volseg_recipe.yaml the resolved recipe (read by volseg, ignored by MONAI)
    RUN/models/model.pt            best weights (state dict); model.ts (TorchScript)
    RUN/docs/README.md, RUN/LICENSE
    RUN/checkpoints/, RUN/logs/    volseg's resumable checkpoints and TensorBoard events

The transform chains, network and inferer in these configs come from :mod:`volseg.data.transforms` and
:mod:`volseg.nets`: the same components volseg instantiates itself.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from volseg import __version__
from volseg.data import transforms as T
from volseg.errors import UserError
from volseg.fastpath import TESTED_MONAI
from volseg.fileio import write_text_atomic
from volseg.nets import NETWORKS, network_config
from volseg.recipe import CTIntensity, PercentileIntensity, Recipe, dump_recipe

SCHEMA_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
RECIPE_FILE = "configs/volseg_recipe.yaml"

LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""

LICENSE_TEXT = """Copyright (c) {authors}

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle except
in compliance with the License. You may obtain a copy of the License at

    http://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is distributed
on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for
the specific language governing permissions and limitations under the License.

The weights in models/ were trained on the data described in docs/README.md; check that data's licence before use.
"""

DEVICE_EXPR = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"


def _compose(transforms: list[dict[str, Any]] | str) -> dict[str, Any]:
    return {"_target_": "Compose", "transforms": transforms}


# MONAI Label 0.8.5 puts the request's image path into the data dictionary as "image_path" (a str). MONAI >= 1.6's
# Spacingd, after resampling key "image" of a NIfTI, calls .update(meta) on every key that starts with "image_",
# which fails on that str. The path is moved to a key that does not start with "image_" before anything else and
# moved back at the end of the postprocessing, because MONAI Label's writer takes the result's file extension from
# "image_path". Under `monai.bundle run` (no "image_path" in the dictionary) these steps do nothing.
STASH_IMAGE_PATH: list[dict[str, Any]] = [
    {"_target_": "CopyItemsd", "keys": "image_path", "names": "source_image_path", "allow_missing_keys": True},
    {"_target_": "DeleteItemsd", "keys": "image_path"},
]
RESTORE_IMAGE_PATH: list[dict[str, Any]] = [
    {"_target_": "CopyItemsd", "keys": "source_image_path", "names": "image_path", "allow_missing_keys": True},
]


def needs_scripts(recipe: Recipe, chain_mirroring: bool = True) -> bool:
    """Whether the bundle's configs name targets in its own scripts/ (a network wrapper, the weight map, the label
    bias, test-time mirroring)."""
    return (NETWORKS[recipe.model.name].needs_scripts or recipe.train.loss.weight_map is not None
            or bool(recipe.infer.label_bias) or chain_mirroring and bool(recipe.infer.tta_flips))  # fmt: skip


def inference_inferer(recipe: Recipe, chain_mirroring: bool = True) -> dict[str, Any]:
    """The inference chain's inferer: the sliding window, inside scripts/inferers.py's ``MirroredInferer`` when
    the recipe mirrors at test time (``chain_mirroring`` False: the sliding window alone, as bundles written before
    the chain mirrored have it)."""
    window = T.sliding_window(recipe)
    if not (chain_mirroring and recipe.infer.tta_flips):
        return window
    return {"_target_": "scripts.inferers.MirroredInferer", "inferer": window, "axes": list(recipe.infer.tta_flips)}


# 2D bundles read PNG, TIFF and NIfTI files and write PNG label maps (values 0..K-1, the input's pixel grid).
DATALIST_3D = "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))"
DATALIST_2D = (
    "$list(sorted(f for e in ('*.png', '*.tif', '*.tiff', '*.nii', '*.nii.gz') "
    "for f in glob.glob(os.path.join(@dataset_dir, e))))"
)


def inference_preprocessing(recipe: Recipe) -> list[dict[str, Any]]:
    """The inference preprocessing as written into a bundle (with the MONAI Label ``image_path`` workaround)."""
    return STASH_IMAGE_PATH + T.infer_preprocessing(recipe)


def inference_config(
    recipe: Recipe, dataset_dir: str = "/workspace/data", chain_mirroring: bool = True
) -> dict[str, Any]:
    """configs/inference.json: segments every NIfTI (2D: also PNG and TIFF) in ``dataset_dir`` into ``output_dir``.

    3D predictions are written as NIfTI; 2D ones as 8-bit PNG label maps on the input's pixel grid. With
    ``infer.tta_flips`` the chain mirrors at test time (``chain_mirroring`` False: the form of bundles written before
    it did, which :mod:`volseg.trust` still accepts).
    """
    spec = NETWORKS[recipe.model.name]
    two_d = recipe.model.spatial_dims == 2
    writer: dict[str, Any] = {
        "_target_": "SaveImaged",
        "keys": "pred",
        "output_dir": "@output_dir",
        "output_postfix": "seg",
        "output_dtype": "$numpy.uint8",
        "resample": False,
        "separate_folder": False,
        "squeeze_end_dims": True,
    }
    if two_d:
        writer.update({"output_ext": ".png", "writer": "PILWriter", "scale": None})
    post = T.infer_postprocessing(recipe) + RESTORE_IMAGE_PATH + [writer]
    cfg: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import numpy", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": dataset_dir,
        "datalist": DATALIST_2D if two_d else DATALIST_3D,
        "device": DEVICE_EXPR,
        "network_def": network_config(
            recipe.model.name,
            recipe.model.spatial_dims,
            recipe.model.in_channels,
            recipe.num_classes,
            recipe.model.args,
            for_inference=True,
        ),
        "network": "$@network_def.to(@device)",
        "preprocessing": _compose(inference_preprocessing(recipe)),
        "dataset": {
            "_target_": "Dataset",
            "data": "$[{'image': i} for i in @datalist]",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": inference_inferer(recipe, chain_mirroring),
        "postprocessing": _compose(post),
        "handlers": [
            {
                "_target_": "CheckpointLoader",
                "load_path": "$@bundle_root + '/models/model.pt'",
                "load_dict": {"model": "@network"},
                "map_location": "@device",
            },
            {"_target_": "StatsHandler", "iteration_log": False},
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": "$torch.cuda.is_available()",
        },
        "initialize": ["$monai.utils.set_determinism(seed=0)"],
        "run": ["$@evaluator.run()"],
    }
    if spec.needs_scripts:
        cfg["imports"].append("$import scripts.nets")
    return cfg


def _loss(recipe: Recipe) -> dict[str, Any]:
    loss = recipe.train.loss
    lam_dice, lam_ce = {"dice_ce": (loss.lambda_dice, loss.lambda_ce), "dice": (1.0, 0.0), "ce": (0.0, 1.0)}[loss.name]
    base = {
        "_target_": "DiceCELoss",
        "to_onehot_y": True,
        "softmax": True,
        "squared_pred": False,
        "lambda_dice": lam_dice,
        "lambda_ce": lam_ce,
    }
    if loss.weight_map is not None:
        # The target carries the weight map as its second channel (see volseg.data.transforms.train_sampling).
        base = {
            "_target_": "scripts.losses.WeightedDiceCELoss",
            "squared_pred": False,
            "lambda_dice": lam_dice,
            "lambda_ce": lam_ce,
        }
    # Written only when not MONAI's defaults, so that the configs of recipes without them stay as they were.
    if loss.batch_dice:
        base["batch"] = True
    if not loss.dice_background:
        base["include_background"] = False
    weights = recipe.class_weight_list()
    if weights is not None:
        # MONAI's DiceCELoss takes a tensor (the cross-entropy's class weights; without the background's for the
        # Dice term when that leaves the background out).
        base["weight"] = "$torch.tensor([" + ", ".join(f"{w!r}" for w in weights) + "], device=@device)"
    if NETWORKS[recipe.model.name].deep_supervision:
        ds: dict[str, Any] = {"_target_": "DeepSupervisionLoss", "loss": base, "weight_mode": "exp"}
        if loss.deep_supervision_weights:
            ds["weights"] = loss.deep_supervision_weights
        return ds
    return base


def _optimizer(recipe: Recipe) -> dict[str, Any]:
    o = recipe.train.optimizer
    target = {"adam": "torch.optim.Adam", "adamw": "torch.optim.AdamW", "sgd": "torch.optim.SGD"}[o.name]
    cfg: dict[str, Any] = {"_target_": target, "params": "$@network.parameters()", "lr": o.lr}
    cfg["weight_decay"] = o.weight_decay
    if o.name == "sgd":
        cfg.update({"momentum": o.momentum, "nesterov": True})
    return cfg


def _scheduler(recipe: Recipe) -> dict[str, Any] | None:
    s = recipe.train.scheduler
    epochs = recipe.train.max_epochs
    if s.name == "none":
        return None
    if s.name == "poly":
        return {"_target_": "torch.optim.lr_scheduler.PolynomialLR", "optimizer": "@optimizer",
                "total_iters": epochs, "power": s.power}  # fmt: skip
    if s.name == "cosine":
        return {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "optimizer": "@optimizer",
                "T_max": epochs, "eta_min": s.min_lr}  # fmt: skip
    if s.name == "multistep":
        return {"_target_": "torch.optim.lr_scheduler.MultiStepLR", "optimizer": "@optimizer",
                "milestones": s.milestones, "gamma": s.gamma}  # fmt: skip
    return {"_target_": "torch.optim.lr_scheduler.ReduceLROnPlateau", "optimizer": "@optimizer", "mode": "max",
            "factor": s.gamma, "patience": s.patience, "min_lr": s.min_lr}  # fmt: skip


#: The validation metrics of a run as the trainer's evaluator names them: the key metric (the mean Dice over the
#: foreground labels, which picks the best epoch) and the per-label Dice and IoU.
KEY_METRIC = "val_mean_dice"
DICE_METRIC = "val_dice"
IOU_METRIC = "val_iou"

#: Training handlers that only rank 0 runs in a distributed training (it alone logs and writes).
RANK0_HANDLERS = ("StatsHandler", "TensorBoardStatsHandler", "CheckpointSaver")


def run_metrics(
    best_mean_dice: float,
    per_label_dice: dict[str, float],
    per_label_iou: dict[str, float],
    surface: dict[str, dict[str, float]],
) -> dict[str, float]:
    """metadata.json's ``eval_metrics`` of a finished run: the best epoch's mean Dice, and the last validation's
    per-label Dice, IoU and defined surface metrics (``val_hd95_liver``, ...), rounded to 4 places."""
    metrics: dict[str, float] = {KEY_METRIC: round(best_mean_dice, 4)}
    metrics.update({f"{DICE_METRIC}_{k}": round(v, 4) for k, v in per_label_dice.items()})
    metrics.update({f"{IOU_METRIC}_{k}": round(v, 4) for k, v in per_label_iou.items()})
    for k, vals in surface.items():
        for metric, v in vals.items():
            if v == v:  # defined
                metrics[f"val_{metric}_{k}"] = round(v, 4)
    return metrics


def _case_list(name: str, channel_files: bool = False) -> str:
    if channel_files:  # several input channels may be stored one file each: an image is then a list of files
        join = "[os.path.join(@dataset_dir, x) for x in v] if isinstance(v, list) else os.path.join(@dataset_dir, v)"
        return f"$[{{k: {join} for k, v in c.items()}} for c in @{name}]"
    return f"$[{{k: os.path.join(@dataset_dir, v) for k, v in c.items()}} for c in @{name}]"


def _dataset(recipe: Recipe, split: str, transform: str) -> dict[str, Any]:
    cache, t = recipe.data.cache, recipe.train
    data = _case_list(f"{split}_cases", recipe.model.in_channels > 1)
    if cache.kind == "memory":
        return {"_target_": "CacheDataset", "data": data, "transform": transform,
                "cache_rate": cache.rate, "num_workers": t.num_workers}  # fmt: skip
    if cache.kind == "persistent":
        return {"_target_": "PersistentDataset", "data": data, "transform": transform,
                "cache_dir": "$@bundle_root + '/cache'"}  # fmt: skip
    return {"_target_": "Dataset", "data": data, "transform": transform}


def _train_loader(recipe: Recipe) -> dict[str, Any]:
    t = recipe.train
    train_loader: dict[str, Any] = {
        "_target_": "DataLoader",
        "dataset": "@train#dataset",
        "batch_size": t.batch_size,
        "shuffle": True,
        "num_workers": t.num_workers,
    }
    if t.iterations_per_epoch:
        # An epoch of a fixed number of iterations, drawing volumes with replacement.
        train_loader["shuffle"] = False
        train_loader["sampler"] = {
            "_target_": "torch.utils.data.RandomSampler",
            "data_source": "@train#dataset",
            "replacement": True,
            "num_samples": t.iterations_per_epoch * t.batch_size,
        }
    return train_loader


def _handlers(recipe: Recipe) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The trainer's and the evaluator's handlers (validation, logging, best checkpoint, LR schedule)."""
    loss_only = "$monai.handlers.from_engine(['loss'], first=True)"
    train_handlers: list[dict[str, Any]] = [
        {"_target_": "ValidationHandler", "validator": "@validate#evaluator", "epoch_level": True,
         "interval": "@val_interval"},
        {"_target_": "StatsHandler", "tag_name": "train_loss", "output_transform": loss_only, "iteration_log": False},
        {"_target_": "TensorBoardStatsHandler", "log_dir": "@log_dir", "tag_name": "train_loss",
         "output_transform": loss_only},
    ]  # fmt: skip
    val_handlers: list[dict[str, Any]] = [
        {"_target_": "StatsHandler", "iteration_log": False},
        {"_target_": "TensorBoardStatsHandler", "log_dir": "@log_dir", "iteration_log": False},
    ]
    saver: dict[str, Any] = {"_target_": "CheckpointSaver", "save_dir": "@ckpt_dir", "save_dict": {"model": "@network"}}
    if recipe.train.weights == "final":
        # the weights when the trainer completes (or stops), as nnU-Net's checkpoint_final
        train_handlers.append({**saver, "save_final": True, "final_filename": "model.pt"})
    else:
        val_handlers.append({**saver, "save_key_metric": True, "key_metric_filename": "model.pt"})
    if _scheduler(recipe) is not None:
        if recipe.train.scheduler.name == "plateau":
            step = f"$lambda engine: engine.state.metrics['{KEY_METRIC}']"
            val_handlers.append(
                {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler", "step_transform": step}
            )  # noqa: E501
        else:
            train_handlers.insert(0, {"_target_": "LrScheduleHandler", "lr_scheduler": "@lr_scheduler",
                                      "print_lr": False})  # fmt: skip
    return train_handlers, val_handlers


def _train_section(recipe: Recipe, handlers: list[dict[str, Any]]) -> dict[str, Any]:
    t = recipe.train
    return {
        "deterministic_transforms": T.preprocessing(recipe, with_label=True, training=True),
        "random_transforms": T.train_sampling(recipe),
        "preprocessing": _compose("$@train#deterministic_transforms + @train#random_transforms"),
        "dataset": _dataset(recipe, "train", "@train#preprocessing"),
        "dataloader": _train_loader(recipe),
        "inferer": {"_target_": "SimpleInferer"},
        "handlers": handlers,
        "trainer": {
            "_target_": "SupervisedTrainer",
            "max_epochs": t.max_epochs,
            "device": "@device",
            "train_data_loader": "@train#dataloader",
            "network": "@network",
            "loss_function": "@loss",
            "optimizer": "@optimizer",
            "inferer": "@train#inferer",
            "train_handlers": "@train#handlers",
            "amp": f"$torch.cuda.is_available() and {t.amp}",
        },
    }


def _validate_section(recipe: Recipe, handlers: list[dict[str, Any]]) -> dict[str, Any]:
    t, n = recipe.train, recipe.num_classes
    pred_label = "$monai.handlers.from_engine(['pred', 'label'])"
    return {
        "preprocessing": _compose(T.val_transforms(recipe)),
        "dataset": _dataset(recipe, "val", "@validate#preprocessing"),
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@validate#dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": min(t.num_workers, 2),
        },  # fmt: skip
        "inferer": T.sliding_window(recipe),
        "postprocessing": _compose(
            [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "AsDiscreted",
                    "keys": ["pred", "label"],
                    "argmax": [True, False],
                    "to_onehot": n,
                },  # fmt: skip
            ]
        ),
        "handlers": handlers,
        "key_metric": {
            KEY_METRIC: {
                "_target_": "MeanDice",
                "include_background": False,
                "output_transform": pred_label,
            },  # fmt: skip
        },
        "additional_metrics": {
            DICE_METRIC: {
                "_target_": "MeanDice",
                "include_background": False,
                "reduction": "mean_batch",
                "output_transform": pred_label,
            },
            IOU_METRIC: {
                "_target_": "MeanIoUHandler",
                "include_background": False,
                "reduction": "mean_batch",
                "output_transform": pred_label,
            },
        },  # fmt: skip
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "inferer": "@validate#inferer",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": "@validate#key_metric",
            "additional_metrics": "@validate#additional_metrics",
            "val_handlers": "@validate#handlers",
            "amp": f"$torch.cuda.is_available() and {t.amp}",
        },
    }


def train_config(
    recipe: Recipe,
    dataset_dir: str = "/workspace/data",
    train_cases: list[dict[str, str]] | None = None,
    val_cases: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """configs/train.json in MONAI Label's conventions.

    Case paths are stored relative to ``dataset_dir`` in ``train_cases`` and ``val_cases``; MONAI Label replaces
    ``train#dataset#data`` and ``validate#dataset#data`` with its own lists.
    """
    t, m = recipe.train, recipe.model
    train_handlers, val_handlers = _handlers(recipe)
    sched = _scheduler(recipe)
    cfg: dict[str, Any] = {
        "imports": ["$import glob", "$import os", "$import ignite", "$import torch", "$import monai"],
        "bundle_root": ".",
        "ckpt_dir": "$@bundle_root + '/models'",
        "log_dir": "$@bundle_root + '/logs'",
        "dataset_dir": dataset_dir,
        "train_cases": train_cases or [],
        "val_cases": val_cases or [],
        "val_interval": t.val_interval,
        "device": DEVICE_EXPR,
        "network_def": network_config(m.name, m.spatial_dims, m.in_channels, recipe.num_classes, m.args),
        "network": "$@network_def.to(@device)",
        "loss": _loss(recipe),
        "optimizer": _optimizer(recipe),
        "train": _train_section(recipe, train_handlers),
        "validate": _validate_section(recipe, val_handlers),
        "initialize": [f"$monai.utils.set_determinism(seed={t.seed})"],
        "run": ["$@train#trainer.run()"],
    }
    if sched is not None:
        cfg["lr_scheduler"] = sched
    if NETWORKS[recipe.model.name].deep_supervision:
        # Validation reads the last head of the deep-supervision outputs.
        cfg["imports"].append("$from scripts.nets import LastHeadView")
        cfg["validate"]["network"] = "$LastHeadView(@network)"
        cfg["validate"]["evaluator"]["network"] = "@validate#network"
    return cfg


def _validation_sampler(even_divisible: bool) -> dict[str, Any]:
    return {"_target_": "DistributedSampler", "dataset": "@validate#dataset", "even_divisible": even_divisible,
            "shuffle": False}  # fmt: skip


def distributed_overrides(
    recipe: Recipe,
    cfg: dict[str, Any] | None = None,
    *,
    rank: int | None = None,
    world: int | None = None,
    cuda: bool = True,
) -> dict[str, Any]:
    """The overrides of train.json that make a training distributed, for both setups.

    In each, the trainer runs the network in DDP, validation is split over the ranks by a DistributedSampler
    (MONAI's metric handlers gather the metrics) and ranks above 0 drop the handlers of :data:`RANK0_HANDLERS`.

    * ``rank=None``: ``configs/multi_gpu_train.json`` under ``torchrun`` (see :func:`multi_gpu_train_config`). The
      rank is read at run time; every rank reads the whole training list through a DistributedSampler
      (reshuffled each epoch by MONAI's workflow); validation is split without padding.
    * ``rank`` and ``world`` given: one process of volseg's own multi-process run over ``cfg`` (its train.json
      content). Each rank caches only its share of the training cases (padded to equal length, so that every
      rank runs the same number of iterations); validation is split without padded duplicates unless there are
      fewer cases than ranks; the evaluator uses the plain module (no collective in its forward). ``cuda``: DDP
      gets the rank's device (``device_ids``), else none (CPU, gloo).

    Returns:
        Config ids (``train#dataloader#sampler``, ...) -> content, for ``ConfigParser.__setitem__`` or as a
        config file of overrides.
    """
    if rank is None:
        return {
            "device": "$torch.device(f'cuda:{dist.get_rank()}')",
            "network": {
                "_target_": "torch.nn.parallel.DistributedDataParallel",
                "module": "$@network_def.to(@device)",
                "device_ids": ["@device"],
            },
            "train#sampler": {
                "_target_": "DistributedSampler",
                "dataset": "@train#dataset",
                "even_divisible": True,
                "shuffle": True,
            },
            "train#dataloader#sampler": "@train#sampler",
            "train#dataloader#shuffle": False,
            "train#trainer#train_handlers": "$@train#handlers[: -2 if dist.get_rank() > 0 else None]",
            "validate#sampler": _validation_sampler(False),
            "validate#dataloader#sampler": "@validate#sampler",
            "validate#evaluator#val_handlers": "$None if dist.get_rank() > 0 else @validate#handlers",
        }
    from monai.data import partition_dataset

    if cfg is None or world is None:
        raise ValueError("a rank's overrides need the train.json content and the world size")
    val_cases = cfg["val_cases"]
    ids = "[@device]" if cuda else "None"
    overrides: dict[str, Any] = {
        "train_cases": partition_dataset(cfg["train_cases"], num_partitions=world, even_divisible=True)[rank],
        "validate#dataloader#sampler": _validation_sampler(len(val_cases) < world),
        "train#trainer#network": f"$torch.nn.parallel.DistributedDataParallel(@network, device_ids={ids})",
    }
    if rank > 0:  # only rank 0 logs and writes
        for key, section in (("train#handlers", "train"), ("validate#handlers", "validate")):
            overrides[key] = [h for h in cfg[section]["handlers"] if h.get("_target_") not in RANK0_HANDLERS]
    return overrides


def multi_gpu_train_config(recipe: Recipe) -> dict[str, Any]:
    """configs/multi_gpu_train.json: overrides of train.json for ``torchrun`` (one process per GPU), as MONAI
    Label and the MONAI model zoo use it::

        torchrun --nproc_per_node=N -m monai.bundle run \\
            --config_file "['configs/train.json','configs/multi_gpu_train.json']"

    Every rank reads the whole training list through a DistributedSampler (reshuffled each epoch by MONAI's
    workflow); validation is split without padding; only rank 0 logs and saves (see
    :func:`distributed_overrides`, which also builds volseg's own multi-process setup).
    """
    imports = train_config(recipe)["imports"] + ["$import torch.distributed as dist"]
    return {
        "imports": imports,
        **distributed_overrides(recipe),
        "initialize": [
            "$dist.is_initialized() or dist.init_process_group(backend='nccl')",
            "$torch.cuda.set_device(@device)",
            f"$monai.utils.set_determinism(seed={recipe.train.seed})",
        ],
        "run": ["$@train#trainer.run()"],
        "finalize": ["$dist.is_initialized() and dist.destroy_process_group()"],
    }


#: The packages whose versions a run records in logs/run_info.json.
RUN_INFO_PACKAGES = ("monai", "torch", "numpy", "pytorch-ignite", "nibabel", "SimpleITK", "itk", "pydicom", "pyyaml")


def _versions(packages: tuple[str, ...] | list[str] | None = None) -> dict[str, str]:
    """Installed versions of ``packages`` (default :data:`RUN_INFO_PACKAGES`); those not installed are left out."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in RUN_INFO_PACKAGES if packages is None else packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            continue
    return out


# --------------------------------------------------------------------------------------------------------------
# What a bundle needs besides MONAI: metadata's required_packages_version
#
# MONAI itself requires only torch and numpy. Everything else it imports with optional_import, which fails only when
# a component that needs the package is built or called: a missing package shows up mid-run (MONAI Label answers
# POST /train/ with 500 "TensorBoardHandler requires tensorboard"). So the list is derived from what the generated
# configs name, with the tables below; tests/test_bundle_zoo.py runs every recipe's bundle where nothing but MONAI,
# torch, numpy and the listed packages can be imported.

#: PyPI distributions a config component needs, by its ``_target_`` (MONAI's short name as the configs write it, or
#: a dotted path) or by a component name given as a string argument (``reader: "PILReader"``). Components that are
#: not listed need only MONAI, torch and numpy.
COMPONENT_PACKAGES: dict[str, tuple[str, ...]] = {
    # monai.engines and monai.handlers are Ignite engines and handlers.
    "SupervisedTrainer": ("pytorch-ignite",),
    "SupervisedEvaluator": ("pytorch-ignite",),
    "StatsHandler": ("pytorch-ignite",),
    "CheckpointLoader": ("pytorch-ignite",),
    "CheckpointSaver": ("pytorch-ignite",),
    "ValidationHandler": ("pytorch-ignite",),
    "LrScheduleHandler": ("pytorch-ignite",),
    "EarlyStopHandler": ("pytorch-ignite",),
    "MeanDice": ("pytorch-ignite",),
    "MeanIoUHandler": ("pytorch-ignite",),
    # torch.utils.tensorboard.SummaryWriter, created when the handler is built.
    "TensorBoardStatsHandler": ("pytorch-ignite", "tensorboard"),
    # skimage.measure.label (cucim on CUDA when installed, else scikit-image).
    "KeepLargestConnectedComponentd": ("scikit-image",),
    "PILReader": ("pillow",),
    "PILWriter": ("pillow",),
    "NibabelReader": ("nibabel",),
    "NibabelWriter": ("nibabel",),
    # The bundle's own scripts/ (volseg/bundle_scripts/): the weight map's distance transforms.
    "scripts.weightmap.UNetWeightMapd": ("scipy",),
    "scripts.labels.BiasedArgmaxd": (),
    "scripts.inferers.MirroredInferer": (),
}

#: Distributions of the top-level modules that ``$import``/``$from ... import`` expressions name (others: the standard
#: library, torch, numpy, monai, the bundle's scripts/).
IMPORT_PACKAGES: dict[str, tuple[str, ...]] = {"ignite": ("pytorch-ignite",)}

#: The reader MONAI's LoadImaged picks by file suffix (and SaveImaged's writer), and the distribution it needs.
SUFFIX_PACKAGES: dict[str, tuple[str, ...]] = {
    ".nii": ("nibabel",),
    ".nii.gz": ("nibabel",),
    ".png": ("pillow",),
    ".tif": ("pillow",),
    ".tiff": ("pillow",),
    ".jpg": ("pillow",),
    ".jpeg": ("pillow",),
}

#: `python -m monai.bundle run ...`, the command in every bundle's docs/README.md, is a python-fire CLI.
ENTRY_POINT_PACKAGES = ("fire",)

_SUFFIX_RE = re.compile(r"\.(?:nii(?:\.gz)?|png|tiff?|jpe?g)\b")
_IMPORT_RE = re.compile(r"^\$\s*(?:import|from)\s+([A-Za-z_]\w*)")


def _config_strings(node: Any) -> list[str]:
    if isinstance(node, dict):
        return [s for v in node.values() for s in _config_strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _config_strings(v)]
    return [node] if isinstance(node, str) else []


def _image_suffixes(inference: dict[str, Any]) -> set[str]:
    """File suffixes the bundle reads (its inference datalist) and writes (SaveImaged's ``output_ext``)."""
    suffixes = set(_SUFFIX_RE.findall(inference["datalist"]))
    for step in inference["postprocessing"]["transforms"]:
        if step.get("_target_") == "SaveImaged":
            suffixes.add(step.get("output_ext", ".nii.gz"))  # MONAI's default
    return suffixes


def required_packages(recipe: Recipe) -> list[str]:
    """The PyPI distributions the bundle of ``recipe`` needs besides monai, torch and numpy, sorted.

    Derived from the configs volseg writes (inference.json, train.json, multi_gpu_train.json): the packages of every
    component they name (:data:`COMPONENT_PACKAGES`), of every module they import (:data:`IMPORT_PACKAGES`), of the
    readers and writers of the image files the bundle reads and writes (:data:`SUFFIX_PACKAGES`; training reads the
    same kind of files as inference), and of the ``monai.bundle`` command line (:data:`ENTRY_POINT_PACKAGES`).
    Files read by training come from MONAI Label's or the user's data list and are taken to be of the same kinds.
    """
    inference = inference_config(recipe)
    configs = [inference, train_config(recipe), multi_gpu_train_config(recipe)]
    needed = set(ENTRY_POINT_PACKAGES)
    for text in (s for cfg in configs for s in _config_strings(cfg)):
        needed.update(COMPONENT_PACKAGES.get(text, ()))
        match = _IMPORT_RE.match(text)
        if match:
            needed.update(IMPORT_PACKAGES.get(match.group(1), ()))
    for suffix in _image_suffixes(inference):
        needed.update(SUFFIX_PACKAGES.get(suffix, ()))
    return sorted(needed, key=str.lower)


# --------------------------------------------------------------------------------------------------------------
# metadata.json


def downsampling(recipe: Recipe) -> list[int]:
    """How many times the recipe's network shrinks each spatial axis down to its deepest level.

    The product of the strides per axis (an entry of ``strides`` is one stride for every axis or one per axis), for
    networks that take ``strides``; ``2**depth`` per axis for the others (BasicUNet and UNet++ pool by 2 four times).
    """
    m = recipe.model
    cfg = network_config(m.name, m.spatial_dims, m.in_channels, recipe.num_classes, m.args)
    strides = cfg.get("strides")
    if strides is None:
        return [2 ** NETWORKS[m.name].depth(m.args)] * m.spatial_dims
    if "channels" in cfg:  # UNet and AttentionUnet use one stride per level below the first
        strides = list(strides)[: len(cfg["channels"]) - 1]
    factors = [1] * m.spatial_dims
    for s in strides:
        per_axis = [s] * m.spatial_dims if isinstance(s, int) else list(s)
        factors = [f * int(k) for f, k in zip(factors, per_axis, strict=False)]
    return factors


def spatial_shape(recipe: Recipe) -> list[str]:
    """metadata's ``spatial_shape``: each axis a multiple of twice the network's downsampling along it.

    The smallest input (n=1 in MONAI's ``"16*n"`` notation, which ``verify_net_in_out`` uses by default) leaves the
    deepest level 2 voxels along every axis. One voxel (``downsampling*n``) is not enough: instance norm needs more
    than one spatial element, and batch norm in training more than one value per channel at batch size 1. Sizes are
    multiples of the downsampling so that the decoder's upsampled features match the skip connections.
    """
    return [f"{2 * f}*n" for f in downsampling(recipe)]


def input_channel_def(recipe: Recipe) -> dict[str, str]:
    """metadata's input ``channel_def``: ``image`` for one channel, ``channel_0`` ... for several.

    The recipe does not name its input channels, so several channels are numbered in the order they are stored.
    """
    n = recipe.model.in_channels
    return {"0": "image"} if n == 1 else {str(i): f"channel_{i}" for i in range(n)}


def metadata(recipe: Recipe, metrics: dict[str, float] | None = None, data_source: str = "") -> dict[str, Any]:
    """configs/metadata.json, valid against MONAI's 2024-07-25 bundle metadata schema."""
    v = _versions(("monai", "torch", "numpy"))
    required = required_packages(recipe)
    installed = _versions(required)
    names = recipe.data.label_names
    nd = recipe.model.spatial_dims
    shape = spatial_shape(recipe)
    channels = input_channel_def(recipe)
    ct = isinstance(recipe.data.intensity, CTIntensity)
    fmt = "hounsfield" if ct else "magnitude"
    window = _intensity_text(recipe)
    grid = _grid_text(recipe)
    return {
        "schema": SCHEMA_URL,
        "version": recipe.version,
        "changelog": {recipe.version: f"trained with volseg {__version__}"},
        "monai_version": v.get("monai", ""),
        "pytorch_version": v.get("torch", "").split("+")[0],
        "numpy_version": v.get("numpy", ""),
        # A package that is not installed here is still named (with no version): the bundle needs it all the same.
        "required_packages_version": {k: installed.get(k, "") for k in required},
        "supported_apps": {"volseg": __version__},
        # The MONAI versions volseg's fast engine (its own Spacing grid and UNet) was checked against.
        "volseg_fast_engine_checked_monai": f">={TESTED_MONAI[0]},<{TESTED_MONAI[1]}",
        "name": recipe.name,
        "task": recipe.description or f"{recipe.name} segmentation",
        "description": (
            f"{recipe.model.name} ({nd}D) segmenting {', '.join(names[1:])} on {recipe.data.modality}. "
            f"Images are {grid}, {window}; predictions are returned on the input grid."
        ),
        "authors": recipe.authors,
        "copyright": f"Copyright (c) {recipe.authors}",
        "data_source": data_source or "see docs/README.md",
        "data_type": "pil" if nd == 2 else "nibabel",
        "image_classes": (
            f"single channel {recipe.data.modality} image, {window}"
            if len(channels) == 1
            else f"{len(channels)}-channel {recipe.data.modality} image ({', '.join(channels.values())}), {window}"
        ),
        "label_classes": "; ".join(f"{i}: {n}" for i, n in enumerate(names)),
        "pred_classes": "; ".join(f"{i}: {n}" for i, n in enumerate(names)),
        "eval_metrics": dict(metrics or {}),
        "intended_use": "Research use only; not for clinical diagnosis.",
        "references": [
            "Ronneberger O, Fischer P, Brox T. U-Net: Convolutional Networks for Biomedical Image Segmentation. "
            "MICCAI 2015."
        ],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": fmt,
                    "modality": recipe.data.modality,
                    "num_channels": recipe.model.in_channels,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": [0, 1] if ct or isinstance(recipe.data.intensity, PercentileIntensity) else [-5, 5],
                    "is_patch_data": True,
                    "channel_def": channels,
                }
            },
            "outputs": {
                "pred": {
                    "type": "image",
                    "format": "segmentation",
                    "num_channels": recipe.num_classes,
                    "spatial_shape": shape,
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {str(i): n for i, n in enumerate(names)},
                }
            },
        },
    }


def _intensity_text(recipe: Recipe) -> str:
    inten = recipe.data.intensity
    if isinstance(inten, CTIntensity):
        return f"CT window [{inten.a_min:g}, {inten.a_max:g}] HU scaled to [0, 1]"
    if isinstance(inten, PercentileIntensity):
        lo, hi = inten.percentile
        return f"percentiles {lo:g}-{hi:g} of each image scaled to [0, 1]"
    if inten is not None and not inten.nonzero:
        return "z-score normalised over the whole image"
    return "z-score normalised over the foreground"


def _grid_text(recipe: Recipe) -> str:
    d = recipe.data
    orient = f"reoriented to {d.orientation}" if d.orientation else "kept in their stored axis order"
    if d.spacing:
        return f"{orient}, resampled to " + " x ".join(f"{s:g}" for s in d.spacing) + " mm"
    return f"{orient} on their own pixel grid"


def bundle_readme(recipe: Recipe, metrics: dict[str, float] | None, data_note: str) -> str:
    names = recipe.data.label_names
    lines = [
        f"# {recipe.name}",
        "",
        recipe.description or f"Segmentation of {', '.join(names[1:])} on {recipe.data.modality}.",
        "",
        "## What it segments",
        "",
        "| value | label |",
        "| --- | --- |",
        *[f"| {i} | {n} |" for i, n in enumerate(names)],
        "",
        "## Model and preprocessing",
        "",
        f"- Network: `{recipe.model.name}` ({recipe.model.spatial_dims}D), "
        f"{recipe.model.in_channels} input channel(s), {recipe.num_classes} output channels.",
        f"- Orientation {recipe.data.orientation or 'as stored'}, "
        f"spacing {list(recipe.data.spacing) if recipe.data.spacing else 'as stored (no resampling)'}"
        f"{' mm' if recipe.data.spacing else ''}, "
        f"intensity: {recipe.data.intensity.model_dump() if recipe.data.intensity else 'none'}.",
        f"- Sliding window {list(recipe.roi_size)}, overlap {recipe.infer.overlap}, {recipe.infer.blend} blending; "
        "predictions are resampled back to the input grid.",
        *(
            [
                f"- Test-time mirroring along axes {list(recipe.infer.tta_flips)} of the model grid "
                f"({2 ** len(recipe.infer.tta_flips)} passes per window, logits averaged; `scripts/inferers.py`).",
            ]
            if recipe.infer.tta_flips
            else []
        ),
        *(
            []
            if recipe.cascade is None
            else [
                f"- Two stages: this network is the coarse stage; `stages/fine/` is the fine stage's bundle (spacing "
                f"{list(recipe.cascade.spacing)} mm), run on the crop around the coarse stage's region plus "
                f"{recipe.cascade.margin_mm:g} mm. `volseg infer` runs both; `monai.bundle run` with "
                "configs/inference.json runs the coarse stage only.",
            ]
        ),
        "",
        "## Training data",
        "",
        data_note
        or "Not trained yet: this bundle holds the configs generated from the recipe; weights come from "
        "`volseg train`.",
        "",
        "## Measured metrics (validation)",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *[f"| {k} | {v:.4f} |" for k, v in metrics.items()]]
    else:
        lines.append("None yet.")
    lines += [
        "",
        "## Use",
        "",
        "```",
        "python -m monai.bundle run --config_file configs/inference.json --bundle_root . \\",
        "    --dataset_dir /path/to/niftis --output_dir /path/to/out",
        "volseg infer scan.nii.gz --bundle .",
        "```",
        "",
        "Generated by volseg from the recipe in configs/volseg_recipe.yaml.",
        "",
    ]
    return "\n".join(lines)


#: The files of a bundle that volseg generates from its recipe (relative POSIX paths), configs first.
CONFIG_FILES = (
    "configs/metadata.json",
    "configs/inference.json",
    "configs/train.json",
    "configs/multi_gpu_train.json",
    "configs/logging.conf",
)
SCRIPTS_SOURCE = Path(__file__).parent / "bundle_scripts"


def _json_text(obj: Any) -> str:
    return json.dumps(obj, indent=4) + "\n"


def bundle_files(
    recipe: Recipe,
    *,
    dataset_dir: str | None = None,
    train_cases: list[dict[str, str]] | None = None,
    val_cases: list[dict[str, str]] | None = None,
    metrics: dict[str, float] | None = None,
    data_note: str = "",
    chain_mirroring: bool = True,
) -> dict[str, str]:
    """Every text file volseg writes into a bundle for ``recipe`` (relative path -> content), scripts/ included.

    This is the one generator: :func:`write_bundle_configs` writes its result and :mod:`volseg.trust` compares a
    bundle against it (and against its form without the chain's mirroring, ``chain_mirroring`` False, for bundles
    written before the chain mirrored).
    """
    ddir = dataset_dir or "/workspace/data"
    files = {
        "configs/metadata.json": _json_text(metadata(recipe, metrics, data_note)),
        "configs/inference.json": _json_text(inference_config(recipe, chain_mirroring=chain_mirroring)),
        "configs/train.json": _json_text(train_config(recipe, ddir, train_cases, val_cases)),
        "configs/multi_gpu_train.json": _json_text(multi_gpu_train_config(recipe)),
        "configs/logging.conf": LOGGING_CONF,
        RECIPE_FILE: dump_recipe(recipe),
        "docs/README.md": bundle_readme(recipe, metrics, data_note),
        "LICENSE": LICENSE_TEXT.format(authors=recipe.authors),
    }
    if needs_scripts(recipe, chain_mirroring):
        # Every module, so that one `scripts` package imported in a process serves whichever bundle comes next.
        for src in sorted(SCRIPTS_SOURCE.glob("*.py")):
            files[f"scripts/{src.name}"] = src.read_text(encoding="utf-8")
    return files


def write_bundle_configs(
    recipe: Recipe,
    bundle_dir: str | Path,
    *,
    dataset_dir: str | None = None,
    train_cases: list[dict[str, str]] | None = None,
    val_cases: list[dict[str, str]] | None = None,
    metrics: dict[str, float] | None = None,
    data_note: str = "",
) -> Path:
    """Write everything of a bundle but the weights: configs, scripts/, docs, LICENSE (each file atomically)."""
    root = Path(bundle_dir)
    files = bundle_files(
        recipe,
        dataset_dir=dataset_dir,
        train_cases=train_cases,
        val_cases=val_cases,
        metrics=metrics,
        data_note=data_note,
    )
    for rel, text in files.items():
        write_text_atomic(root / rel, text)
    return root


def update_bundle_metrics(recipe: Recipe, bundle_dir: str | Path, metrics: dict[str, float], data_note: str) -> None:
    """Record a finished run's metrics and data in metadata.json and docs/README.md."""
    root = Path(bundle_dir)
    write_text_atomic(root / "configs" / "metadata.json", _json_text(metadata(recipe, metrics, data_note)))
    write_text_atomic(root / "docs" / "README.md", bundle_readme(recipe, metrics, data_note))


def export_recipe_bundles(configs_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the bundle of every recipe in ``configs_dir`` to ``out_dir/<recipe name>`` (no weights)."""
    from volseg.recipe import load_recipe

    written = []
    for path in sorted(Path(configs_dir).glob("*.yaml")):
        recipe = load_recipe(path)
        written.append(write_bundle_configs(recipe, Path(out_dir) / recipe.name, dataset_dir=recipe.data.root))
    return written


def read_bundle_recipe(bundle_dir: str | Path, overrides: list[str] | None = None) -> Recipe:
    """The recipe a volseg bundle was made from (with ``key.path=value`` overrides, if given)."""
    from volseg.recipe import load_recipe

    path = Path(bundle_dir) / RECIPE_FILE
    if not path.is_file():
        raise UserError(f"not a volseg bundle: {RECIPE_FILE} is missing", bundle_dir)
    return load_recipe(path, overrides)
