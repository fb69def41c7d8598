"""bundles/ holds the bundles generated from configs/: regenerating them changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

from helpers import REPO

from volseg.bundle import export_recipe_bundles

# Fields that record the installed package versions, which differ between environments.
VERSION_FIELDS = ("monai_version", "pytorch_version", "numpy_version", "required_packages_version")


def _normalise(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if path.name == "metadata.json":
        meta = json.loads(text)
        for key in VERSION_FIELDS:
            meta.pop(key, None)
        return json.dumps(meta, indent=1, sort_keys=True)
    return text


def _files(root: Path) -> dict[str, Path]:
    return {
        str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts
    }


def test_bundles_match_configs(tmp_path: Path) -> None:
    export_recipe_bundles(REPO / "configs", tmp_path)
    fresh, committed = _files(tmp_path), _files(REPO / "bundles")
    assert sorted(fresh) == sorted(committed), "bundles/ and configs/ list different files: run `make bundles`"
    stale = [rel for rel in fresh if _normalise(fresh[rel]) != _normalise(committed[rel])]
    assert not stale, f"bundles/ drifted from configs/ in {stale}: run `make bundles`"


def test_every_recipe_has_a_bundle() -> None:
    recipes = {p.stem for p in (REPO / "configs").glob("*.yaml")}
    assert recipes == {p.name for p in (REPO / "bundles").iterdir() if p.is_dir()}
