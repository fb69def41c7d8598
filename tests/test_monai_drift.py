"""The fast engine against MONAI's own transforms: the model grid against ``Spacing``/``Orientationd``+``Spacingd``
themselves, the recipes it runs against the bundle's MONAI chain, and the warning for an untested MONAI release."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, monai_chain_labels, random_net
from helpers import organ_recipe as _recipe

from volseg.fastpath import TESTED_MONAI, FastEngine, model_grid, monai_drift_warning, unsupported_reason
from volseg.recipe import recipe_from_dict


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a /= np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _affine(directions: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]):
    a = np.eye(4)
    a[:3, :3] = np.asarray(directions, dtype=np.float64) * np.asarray(spacing)
    a[:3, 3] = origin
    return a


SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # voxel axes along A, -S, -R
AFFINES = {
    "ras": _affine(np.eye(3), (0.8, 0.8, 2.5), (-100.0, -120.0, 30.0)),
    "lps": _affine(np.diag([-1.0, -1.0, 1.0]), (0.7, 0.7, 3.0), (90.0, 110.0, -40.0)),
    "flipped": _affine(np.diag([-1.0, 1.0, 1.0]), (1.0, 1.2, 1.5), (10.0, -5.0, 0.0)),  # one axis: det < 0
    "anisotropic": _affine(np.eye(3), (0.45, 0.45, 6.0), (0.0, 0.0, 0.0)),
    # 49 x 0.9 mm to 0.6 mm is an extent of exactly 74.5 voxels: it rounds as MONAI's arithmetic rounds it (to 75)
    "oblique": _affine(_rotation((1.0, 0.4, 0.2), 25.0), (1.1, 0.9, 2.0), (-30.0, 12.0, 7.5)),
    "oblique_flipped": _affine(_rotation((0.2, 1.0, 0.5), 17.0) @ np.diag([1, -1, -1]), (0.9, 0.9, 3.3), (5, 6, 7)),
    "sagittal": _affine(SAGITTAL, (1.0, 0.6, 0.6), (40.0, -80.0, 90.0)),
}
SHAPES = [(31, 40, 17), (64, 64, 9), (7, 50, 33)]
TARGETS = [(1.5, 1.5, 2.0), (3.0, 0.6, 5.0)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_model_grid_equals_monai_spacing_transform(name: str, shape: tuple[int, ...], target: tuple) -> None:
    """MONAI's ``Spacing`` itself (not only its helpers): the same output shape and affine."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    affine = AFFINES[name]
    out = Spacing(pixdim=target)(MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine)))
    got_shape, scale, shift = model_grid(shape, affine, target)
    assert got_shape == tuple(out.shape[1:])
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = np.diag(scale), shift
    np.testing.assert_allclose(affine @ m, np.asarray(out.affine, dtype=np.float64), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["ras", "lps", "oblique", "oblique_flipped", "sagittal", "anisotropic"])
def test_model_grid_image_equals_monai_orientation_and_spacing(name: str) -> None:
    """The fast engine's model-grid image (orientation, spacing, resampling) against the bundle's own
    ``Orientationd`` + ``Spacingd`` components: shape, affine and voxel values."""
    from volseg.data import transforms as T

    recipe = _recipe({"spacing": [1.7, 1.3, 2.9]})
    affine = AFFINES[name]
    rng = np.random.default_rng(1)
    arr = rng.normal(0.0, 100.0, size=(23, 30, 14)).astype(np.float32)
    steps = [c for c in T.preprocessing(recipe, with_label=False) if c["_target_"] in ("Orientationd", "Spacingd")]
    assert [c["_target_"] for c in steps] == ["Orientationd", "Spacingd"]
    from monai.data import MetaTensor

    ref = T.instantiate(steps)({"image": MetaTensor(torch.from_numpy(arr)[None], affine=torch.as_tensor(affine))})
    ref_img = ref["image"]
    engine = FastEngine(recipe, torch.nn.Identity(), torch.device("cpu"), "fp32")
    raw, grid = engine.to_model_grid(arr, affine)
    assert grid.shape == tuple(ref_img.shape[1:])
    np.testing.assert_allclose(grid.affine, np.asarray(ref_img.affine, dtype=np.float64), rtol=0, atol=1e-6)
    np.testing.assert_allclose(raw.numpy(), np.asarray(ref_img), rtol=0, atol=2e-3)


# ---------------------------------------------------------------------------------------------------------------
# Recipes: which the fast engine runs, and that it computes what the MONAI chain computes for them


def test_unsupported_reason() -> None:
    two_d = recipe_from_dict(
        {
            "name": "cells",
            "data": {"modality": "microscopy", "labels": {"background": 0, "cell": 1}, "spacing": None,
                     "orientation": None},
            "model": {"spatial_dims": 2, "args": {"channels": [8, 16], "strides": [2]}},
            "train": {"patch_size": [16, 16]},
        }
    )  # fmt: skip
    reason = unsupported_reason(two_d)
    assert reason is not None and "3D" in reason and "2D" in reason
    with pytest.raises(ValueError, match="3D"):
        FastEngine(two_d, torch.nn.Identity(), torch.device("cpu"))
    for data in (
        {},
        {"modality": "MR", "intensity": {"nonzero": False}},
        {"modality": "microscopy", "intensity": {"percentile": [1, 99], "clip": True}},
        {"spacing": None},
        {"orientation": None},
        {"spacing": None, "orientation": None, "modality": "MR"},
    ):
        assert unsupported_reason(_recipe(data)) is None, data
    unknown = SimpleNamespace(model=SimpleNamespace(spatial_dims=3), data=SimpleNamespace(intensity=object()))
    assert "no object intensity step" in (unsupported_reason(unknown) or "")


RECIPES = {
    "percentile_clip": {"modality": "microscopy", "intensity": {"percentile": [2, 98], "clip": True}},
    "percentile": {"modality": "microscopy", "intensity": {"percentile": [1, 90]}},
    "no_spacing": {"spacing": None},
    "no_orientation": {"orientation": None},
    "no_grid_mr": {"spacing": None, "orientation": None, "modality": "MR"},
    # z-score over the foreground crop (MONAI crops first): the background zeros outside the box do not count
    "mr_whole_crop": {"modality": "MR", "intensity": {"nonzero": False}},
    # nor do negative voxels outside the box (not foreground, but non-zero)
    "mr_nonzero": {"modality": "MR", "intensity": {"nonzero": True}},
}


def _head_image() -> tuple[np.ndarray, np.ndarray]:
    """A 'head' of noisy tissue with a darker core inside zero background, a negative corner outside it."""
    rng = np.random.default_rng(0)
    img = np.zeros((30, 28, 12), np.float32)
    img[4:26, 5:24, 2:10] = rng.normal(100.0, 30.0, size=(22, 19, 8))
    img[10:20, 10:18, 4:8] -= 200.0
    img[:2, :2, :2] = -50.0
    affine = AFFINES["lps"].copy()
    affine[:3, :3] = np.diag([-1.2, -1.1, 2.5])
    return img, affine


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_fast_engine_equals_the_monai_chain_on_recipe(name: str, tmp_path: Path) -> None:
    recipe = _recipe(RECIPES[name])
    net = random_net(recipe)
    img, affine = _head_image()
    src = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), src)
    ref = monai_chain_labels(recipe, net, {"image": str(src)})
    engine = FastEngine(recipe, net, torch.device("cpu"), "fp32")
    ours, _ = engine.segment_array(img, affine)
    assert ours.shape == ref.shape == img.shape
    head = img > 0
    for labels in (ours, ref):  # both classes, in quantity: not empty against empty
        assert 0.05 < (labels[head] == 1).mean() < 0.95
    assert (ours == ref)[head].mean() > 0.999
    # Beyond the crop the chain's inverse leaves rounding noise (about 1e-8 per class) that its argmax labels;
    # the fast engine has exact zeros there: background. Nowhere else may they differ.
    differ = ours != ref
    assert (ours[differ & ~head] == 0).all() and differ[head].sum() <= 2


# ---------------------------------------------------------------------------------------------------------------
# The MONAI release


def test_tested_monai_range_holds_the_installed_release() -> None:
    import importlib.metadata

    lo, hi = TESTED_MONAI
    assert tuple(int(v) for v in lo.split(".")) < tuple(int(v) for v in hi.split("."))
    installed = importlib.metadata.version("monai")
    assert monai_drift_warning() is None, installed  # the suite runs on a checked release


@pytest.mark.parametrize(
    ("version", "warns"),
    [("1.6.0", False), ("1.6.1", False), ("1.6.9.dev2501", False), ("1.7.0", True), ("1.7.0rc1", True),
     ("1.5.2", True), ("2.0", True), ("0.9.1", True)],
)  # fmt: skip
def test_monai_drift_warning_outside_the_range(version: str, warns: bool, monkeypatch) -> None:
    import volseg.fastpath as fp

    monkeypatch.setattr(fp, "TESTED_MONAI", ("1.6", "1.7"))  # a range to test against
    text = monai_drift_warning(version)
    assert (text is not None) == warns
    if text:
        assert version in text and ">=1.6,<1.7" in text and "--engine monai" in text


def test_monai_drift_warning_does_not_import_monai() -> None:
    code = (
        "import sys\n"
        "import volseg.fastpath as fp\n"
        "fp.TESTED_MONAI = ('0.1', '0.2')\n"
        "print('WARNING', fp.monai_drift_warning())\n"
        "print('LOADED', 'monai' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED False" in out.stdout
    assert "WARNING warning: MONAI 1." in out.stdout  # the installed version, read from the package metadata


def test_fast_engine_tells_the_drift_once(monkeypatch) -> None:
    import volseg.fastpath as fp

    monkeypatch.setattr(fp, "TESTED_MONAI", ("0.1", "0.2"))
    recipe = _recipe()
    engine = FastEngine(recipe, random_net(recipe), torch.device("cpu"), "fp32")
    assert len(engine.engine_notes) == 1
    assert engine.engine_notes[0].startswith("warning: MONAI 1.")
    assert "fast engine was checked against MONAI >=0.1,<0.2" in engine.engine_notes[0]
    img, affine = _head_image()
    engine.segment_array(img, affine)
    assert engine.notes == []  # per image: only what concerns the image
    monkeypatch.setattr(fp, "TESTED_MONAI", ("0.0", "99"))
    assert FastEngine(recipe, random_net(recipe), torch.device("cpu"), "fp32").engine_notes == []
