"""Shared fixtures: tiny synthetic CT data sets, a tiny recipe and a bundle trained on them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import TINY_RECIPE, save_phantom

from volseg.data.synth import liver_ct_phantom

os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

# Fixtures that train a model: every test that needs one (directly or through another fixture) is slow.
TRAINING_FIXTURES = {"trained_run"}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


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
