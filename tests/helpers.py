"""What tests import: paths, the tiny recipe, file writers, reference-tool guards and prediction checks.

Import with ``from helpers import ...`` (and ``import dicom_factory``, ``from orthanc_server import ...``), from
any working directory: ``pythonpath = ["tests"]`` in pyproject.toml's pytest settings puts ``tests/`` on
``sys.path``. conftest.py holds only the fixtures and hooks; no test imports from it.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import nibabel as nib
import numpy as np
import pytest

from volseg.data.synth import Phantom

if TYPE_CHECKING:
    import torch

REPO = Path(__file__).resolve().parent.parent
SCHEMA = REPO.parent / "shared" / "bundle" / "meta_schema_20240725.json"
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"

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

# The label values of TINY_RECIPE, and the Dice against the phantom's own label that the model trained on it
# (the `trained_run` fixture: 4 epochs of 6 iterations) must reach before two of its predictions are compared.
# Measured on the phantoms the tests use: liver 0.32-0.58 (it labels the liver and some soft tissue around it;
# the same with train.amp=false); an empty prediction scores 0.0 and labelling everything about 0.1 on most of
# these grids. Tumour is not learned in 4 epochs (Dice 0.0 on every case), so it gets no floor and is compared
# between the two sides only where there is enough of it.
TINY_LABELS = {"liver": 1, "tumour": 2}
TINY_FLOORS = {"liver": 0.25}


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on at the moment (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------------------------------------------
# Reference tools and files: skipped on a developer's machine without them, a failure in CI (CI set)


def _missing(message: str, how: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must provide it ({how})", pytrace=False)
    pytest.skip(f"{message} ({how})")


def require_tool(name: str, debian_package: str) -> str:
    """The path of reference tool ``name``; skip the test without it, or fail it when ``CI`` is set."""
    exe = shutil.which(name)
    if exe is None:
        _missing(f"reference tool {name} is not on PATH", f"apt-get install {debian_package}")
    return exe


def require_file(path: Path, how: str) -> Path:
    """``path`` when it is a file; skip the test without it, or fail it when ``CI`` is set."""
    if not path.is_file():
        _missing(f"reference file {path} is missing", how)
    return path


def require_schema() -> Path:
    """The offline copy of MONAI's bundle metadata schema, in ../shared beside the clone."""
    return require_file(SCHEMA, f"a checkout of the shared folder beside the repository, holding {SCHEMA.name}")


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines dciodvfy (dicom3tools) prints for a file (skip without it; fail in CI)."""
    import subprocess

    exe = require_tool("dciodvfy", "dicom3tools")
    run = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    assert output.strip(), f"dciodvfy printed nothing for {path} (exit status {run.returncode})"
    return [line for line in output.splitlines() if line.startswith("Error")]


# ---------------------------------------------------------------------------------------------------------------
# Comparing predictions: two empty label maps agree perfectly, so first make sure there is something to compare


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.logical_and(a, b).sum()) / total if total else 1.0


def assert_labels_present(labels: Mapping[str, int], *arrays: np.ndarray, min_voxels: int = 1) -> None:
    """Each of ``arrays`` holds at least ``min_voxels`` voxels of every label in ``labels``."""
    for n, arr in enumerate(arrays):
        counts = {name: int(np.count_nonzero(arr == v)) for name, v in labels.items()}
        short = {name: c for name, c in counts.items() if c < min_voxels}
        assert not short, f"output {n} has (almost) none of {sorted(short)}: voxel counts {counts}"


def assert_real_overlap(
    pred: np.ndarray, truth: np.ndarray, labels: Mapping[str, int], min_dice: float | Mapping[str, float]
) -> dict[str, float]:
    """Every label in ``labels`` is in ``truth`` and ``pred`` finds it: Dice against ``truth`` >= its floor.

    Returns the Dice of each label.
    """
    assert pred.shape == truth.shape, (pred.shape, truth.shape)
    out = {}
    for name, v in labels.items():
        floor = min_dice[name] if isinstance(min_dice, Mapping) else min_dice
        ref = truth == v
        assert ref.any(), f"the reference has no {name} (value {v}): nothing would be checked"
        out[name] = _dice(pred == v, ref)
        assert out[name] >= floor, f"{name}: Dice {out[name]:.3f} against the reference, below {floor}"
    return out


def assert_agreement(
    a: np.ndarray,
    b: np.ndarray,
    labels: Mapping[str, int],
    *,
    truth: np.ndarray | None = None,
    floors: Mapping[str, float] | None = None,
    min_dice: float = 0.98,
    min_voxels: int = 50,
) -> dict[str, float]:
    """Two label maps that must agree, checked to hold what they are meant to before they are compared.

    With ``truth``: both ``a`` and ``b`` find each label of ``floors`` with Dice against ``truth`` at least its
    floor (:func:`assert_real_overlap`). Without: both hold every label in ``labels``. Then the Dice of ``a``
    against ``b`` is at least ``min_dice`` for each label checked so, and for any other label of ``labels`` of
    which ``b`` has at least ``min_voxels`` voxels.

    Returns the Dice of ``a`` against ``b`` for each label.
    """
    assert a.shape == b.shape, (a.shape, b.shape)
    if truth is not None:
        assert floors, "with a reference, say which labels must be found and how well (floors)"
        required = {name: labels[name] for name in floors}
        for side in (a, b):
            assert_real_overlap(side, truth, required, floors)
    else:
        required = dict(labels)
        assert_labels_present(required, a, b)
    out = {name: _dice(a == v, b == v) for name, v in labels.items()}
    for name, v in labels.items():
        if name in required or int(np.count_nonzero(b == v)) >= min_voxels:
            assert out[name] >= min_dice, f"{name}: Dice {out[name]:.4f} between the two, below {min_dice}"
    return out


def write_random_bundle(root: Path, seed: int = 0, recipe: Mapping | None = None) -> Path:
    """A volseg bundle of ``recipe`` (default TINY_RECIPE) with random weights: configs exactly volseg's, the
    network's state dict as models/model.pt. Its outputs are arbitrary but deterministic for a seed."""
    import json

    import torch

    from volseg.bundle import write_bundle_configs
    from volseg.nets import create_network
    from volseg.recipe import recipe_from_dict

    parsed = recipe_from_dict(json.loads(json.dumps(recipe or TINY_RECIPE)))
    write_bundle_configs(parsed, root)
    m = parsed.model
    torch.manual_seed(seed)
    net = create_network(m.name, m.spatial_dims, m.in_channels, parsed.num_classes, m.args, for_inference=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


def stop_process(proc, sig: int, timeout: float = 30) -> int:
    """Send ``sig`` to a server started by a test and wait for it (killed past ``timeout``); its exit status."""
    import subprocess

    proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ----- The fast engine against the bundle's MONAI chain: a recipe, a random network, the chain -----


def organ_recipe(data: dict[str, Any] | None = None, **sections: Any) -> Any:
    """A small one-organ 3D recipe (2 x 2 x 3 mm, a 16^3 patch); ``data`` keys and whole sections override it."""
    raw: dict[str, Any] = {
        "name": "drift",
        "data": {"labels": {"background": 0, "organ": 1}, "spacing": [2.0, 2.0, 3.0], **(data or {})},
        "model": {"name": "unet", "args": {"channels": [8, 16, 32], "strides": [2, 2]}},
        "train": {"patch_size": [16, 16, 16]},
        "infer": {"sw_batch_size": 2},
    }
    raw.update(sections)
    from volseg.recipe import recipe_from_dict

    return recipe_from_dict(raw)


def random_net(recipe: Any, seed: int = 3) -> torch.nn.Module:
    """The recipe's network with random weights (an untrained network still gives both classes here)."""
    import torch

    from volseg.nets import build_network, network_config

    torch.manual_seed(seed)
    m = recipe.model
    cfg = network_config(m.name, m.spatial_dims, m.in_channels, recipe.num_classes, m.args, for_inference=True)
    return build_network(cfg).eval()


def monai_chain(recipe: Any) -> tuple[Any, Any, Any]:
    """The bundle's MONAI chain for a recipe (the components a bundle's inference.json holds): pre, inferer, post."""
    from monai.bundle import ConfigParser

    from volseg.data import transforms as T

    parser = ConfigParser(
        {
            "preprocessing": {"_target_": "Compose", "transforms": T.infer_preprocessing(recipe)},
            "postprocessing": {"_target_": "Compose", "transforms": T.infer_postprocessing(recipe)},
            "inferer": T.sliding_window(recipe),
        }
    )
    return tuple(parser.get_parsed_content(k) for k in ("preprocessing", "inferer", "postprocessing"))


def monai_chain_labels(recipe: Any, net: torch.nn.Module, data: dict[str, Any]) -> np.ndarray:
    """Labels on the input grid from the MONAI chain, for ``{"image": path}`` (or a dict already loaded)."""
    import torch

    pre, inferer, post = monai_chain(recipe)
    data = pre(data)
    with torch.inference_mode():
        data["pred"] = inferer(data["image"][None], net)[0]
    return np.asarray(post(data)["pred"][0]).astype(np.uint8)
