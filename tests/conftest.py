"""Shared fixtures: tiny synthetic CT data sets, a tiny recipe and a bundle trained on them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from volseg.data.synth import Phantom, liver_ct_phantom

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO.parent / "shared" / "bundle" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

TINY_RECIPE = {
    "name": "tiny_liver",
    "description": "test recipe",
    "data": {
        "labels": {"background": 0, "liver": {"value": 1, "color": [221, 130, 101]}, "tumour": 2},
        "spacing": [8.0, 8.0, 8.0],
        "intensity": {"a_min": -175, "a_max": 250},
        "split": {"val_fraction": 0.25, "seed": 0},
    },
    "model": {"name": "unet", "args": {"channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}},
    "train": {
        "patch_size": [16, 16, 16],
        "batch_size": 2,
        "samples_per_volume": 2,
        "max_epochs": 4,
        "val_interval": 1,
        "num_workers": 0,
        "optimizer": {"lr": 0.01},
        "augment": {"flip": 0.0, "rotate": 0.0, "scale": 0.0, "noise": 0.0},
    },
    "infer": {"sw_batch_size": 2, "postprocess": {"largest_component": ["liver"]}},
}


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def save_phantom(folder: Path, name: str, ph: Phantom) -> tuple[Path, Path]:
    return (
        save_nifti(folder / "imagesTr" / f"{name}.nii.gz", ph.image, ph.affine),
        save_nifti(folder / "labelsTr" / f"{name}.nii.gz", ph.label, ph.affine),
    )


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight small CT phantoms (48x48x24, random orientation and spacing) in MSD layout."""
    root = tmp_path_factory.mktemp("tiny_data")
    items = []
    for i in range(8):
        img, lab = save_phantom(root, f"liver_{i:03d}", liver_ct_phantom(100 + i, shape=(48, 48, 24)))
        items.append({"image": f"./imagesTr/{img.name}", "label": f"./labelsTr/{lab.name}"})
    meta = {"name": "tiny", "labels": {"0": "background", "1": "liver", "2": "tumour"}, "training": items}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="session")
def tiny_recipe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("recipe") / "tiny_liver.yaml"
    p.write_text(yaml.safe_dump(TINY_RECIPE))
    return p


@pytest.fixture(scope="session")
def trained_run(tiny_data: Path, tiny_recipe_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A run (= bundle) trained for a few epochs on the tiny phantoms; returns (run_dir, TrainResult)."""
    from volseg.recipe import load_recipe
    from volseg.train import train

    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = train(load_recipe(tiny_recipe_path), tiny_data, run_dir, echo=lambda s: None, progress=False)
    return run_dir, result


@pytest.fixture(scope="session")
def trained_bundle(trained_run) -> Path:
    return trained_run[0]
