"""Geometry is a contract: outputs have exactly the input's grid, and labels survive the round trip."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, TINY_FLOORS, TINY_LABELS, assert_agreement, save_nifti

from volseg.data import transforms as T
from volseg.data.synth import liver_ct_phantom
from volseg.infer import run_inference
from volseg.metrics import dice_per_label
from volseg.recipe import load_recipe

GRIDS = {
    "RAS": {"axcodes": "RAS"},
    "LPS": {"axcodes": "LPS"},
    "oblique": {"axcodes": "LPS", "oblique_deg": 17.0},
    "anisotropic": {"axcodes": "LAS", "spacing": (0.7, 1.1, 5.0)},
    "slice-first": {"axcodes": "SLP"},
}


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
def test_infer_output_has_the_input_grid(grid: str, trained_bundle: Path, tmp_path: Path) -> None:
    ph = liver_ct_phantom(7, shape=(40, 36, 20), **GRIDS[grid])
    src = save_nifti(tmp_path / f"{grid}.nii.gz", ph.image, ph.affine)
    assert nib.aff2axcodes(ph.affine) == tuple(GRIDS[grid]["axcodes"])
    written, failures = run_inference([str(src)], tmp_path / "out", trained_bundle, "cpu", echo=lambda s: None)
    assert not failures
    out = nib.load(str(written[0]))
    inp = nib.load(str(src))
    assert out.shape == inp.shape
    np.testing.assert_allclose(out.affine, inp.affine, atol=1e-4)
    np.testing.assert_allclose(out.header.get_qform(), inp.header.get_qform(), atol=1e-4)
    assert out.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}


def _round_trip(recipe_path: Path, image: Path, label: Path) -> np.ndarray:
    """Take a label through the inference preprocessing and back, as perfect logits would travel."""
    from monai.bundle import ConfigParser

    recipe = load_recipe(recipe_path)
    parser = ConfigParser(
        {
            "preprocessing": {"_target_": "Compose", "transforms": T.preprocessing(recipe, with_label=True)},
            "postprocessing": {"_target_": "Compose", "transforms": T.infer_postprocessing(recipe)},
        }
    )
    pre, post = parser.get_parsed_content("preprocessing"), parser.get_parsed_content("postprocessing")
    data = pre({"image": str(image), "label": str(label)})
    lab = data["label"][0].long()
    onehot = torch.nn.functional.one_hot(lab, recipe.num_classes).movedim(-1, 0).float() * 20.0
    data["pred"] = onehot
    out = post(data)
    return np.asarray(out["pred"][0].numpy())


@pytest.mark.slow
@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
def test_label_survives_preprocessing_and_back(grid: str, tmp_path: Path) -> None:
    """With the liver_ct recipe (1 x 1 x 1.5 mm, RAS) on realistic phantom grids."""
    kwargs = dict(GRIDS[grid])
    kwargs.setdefault("spacing", (0.8, 0.8, 2.5))
    ph = liver_ct_phantom(3, **kwargs)
    img = save_nifti(tmp_path / "img.nii.gz", ph.image, ph.affine)
    lab = save_nifti(tmp_path / "lab.nii.gz", ph.label, ph.affine)
    back = _round_trip(REPO / "configs" / "liver_ct.yaml", img, lab)
    assert back.shape == ph.label.shape
    d = dice_per_label(back, ph.label, {"liver": 1, "tumour": 2})
    assert d["liver"] >= 0.98, d
    assert d["tumour"] >= 0.95, d


@pytest.mark.parametrize("grid", list(GRIDS), ids=list(GRIDS))
def test_fast_engine_agrees_with_the_bundle_chain(grid: str, trained_bundle: Path, tmp_path: Path) -> None:
    from volseg.infer import Predictor

    ph = liver_ct_phantom(8, shape=(56, 48, 24), **GRIDS[grid])
    src = save_nifti(tmp_path / f"{grid}.nii.gz", ph.image, ph.affine)
    fast = Predictor.from_bundle(trained_bundle, "cpu", "fast")
    chain = Predictor.from_bundle(trained_bundle, "cpu", "monai")
    assert fast.fast is not None and chain.fast is None
    a, b = fast.predict(src), chain.predict(src)
    assert a.labels.shape == b.labels.shape == ph.image.shape
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    agree = (a.labels == b.labels).mean()
    assert agree > 0.995, agree
    # Both find the liver of the phantom before they are compared; tumour is compared where there is enough.
    assert_agreement(a.labels, b.labels, TINY_LABELS, truth=ph.label, floors=TINY_FLOORS, min_dice=0.98)
