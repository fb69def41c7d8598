"""Recipes: the shipped ones validate; bad ones stop with one line naming the file and the key path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from volseg.errors import UserError
from volseg.recipe import dump_recipe, load_recipe, recipe_from_dict

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))

MINIMAL = {"name": "t", "data": {"labels": {"background": 0, "liver": 1}}, "train": {"patch_size": [32, 32, 32]}}


def _write(tmp_path: Path, raw: dict | str) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.data.label_names[0] == "background"
    assert len(recipe.roi_size) == recipe.model.spatial_dims


def test_four_recipes_are_shipped() -> None:
    assert {p.stem for p in CONFIGS} >= {"liver_ct", "spleen_ct", "brain_mri", "demo_liver_ct"}


def test_defaults_are_filled_and_resolved_dump_reloads(tmp_path: Path) -> None:
    recipe = recipe_from_dict(MINIMAL)
    assert recipe.data.intensity is not None and recipe.data.intensity.a_min == -175.0
    dumped = _write(tmp_path, dump_recipe(recipe))
    assert load_recipe(dumped) == recipe


def test_dotted_overrides(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL)
    r = load_recipe(p, ["train.max_epochs=3", "train.optimizer.lr=1e-4", "infer.roi_size=[64, 64, 32]"])
    assert r.train.max_epochs == 3 and r.train.optimizer.lr == 1e-4 and r.roi_size == (64, 64, 32)


BAD = [
    ({"train": {"max_epochs": 3, "bogus": 1}}, "train.bogus: unknown key"),
    ({"train": {"batch_size": "two"}}, "train.batch_size: Input should be a valid integer"),
    ({"train": {"optimizer": {"lr": -1}}}, "train.optimizer.lr: Input should be greater than 0"),
    ({"train": {"patch_size": [30, 32, 32]}}, "must be divisible by 16"),
    ({"model": {"name": "resnet"}}, "unknown network 'resnet'; known: attention_unet, basic_unet, unet, unet_plusplus"),
    ({"data": {"labels": {"background": 0, "liver": 2}}}, "label values must be 0..1 without gaps"),
    ({"data": {"labels": {"background": 0, "liver": 1}, "intensity": {"a_min": 100, "a_max": 0}}}, "a_max must be"),
    ({"data": {"labels": {"background": 0, "liver": 1}, "orientation": "RAX"}}, "'RAX' is not an orientation"),
    ({"train": {"patch_size": [32, 32]}}, "train.patch_size has 2 values but model.spatial_dims is 3"),
]


def _merge(base: dict, extra: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in extra.items():
        out[k] = _merge(out.get(k, {}), v) if isinstance(v, dict) and k != "labels" else v
        if k == "data":
            out[k] = {**base["data"], **v}
    return out


@pytest.mark.parametrize("change,expected", BAD, ids=[e for _, e in BAD])
def test_bad_recipe_messages(tmp_path: Path, change: dict, expected: str) -> None:
    p = _write(tmp_path, _merge(MINIMAL, change))
    with pytest.raises(UserError) as err:
        load_recipe(p)
    text = str(err.value)
    assert text.startswith(str(p) + ": ")
    assert expected in text
    assert "\n" not in text


def test_bad_override_and_unknown_override_key(tmp_path: Path) -> None:
    p = _write(tmp_path, MINIMAL)
    with pytest.raises(UserError, match="not of the form"):
        load_recipe(p, ["train.max_epochs"])
    with pytest.raises(UserError, match="train.nope: unknown key"):
        load_recipe(p, ["train.nope=1"])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML at line "):
        load_recipe(_write(tmp_path, "name: x\ndata: [unclosed\n"))
    with pytest.raises(UserError, match="mapping at the top level"):
        load_recipe(_write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("name: t\ndata: {labels: {background: 0, liver: 1}}\ntrain: {epochs: 3}\n", "train.epochs: unknown key"),
        ("name: t\n", "data: Field required"),
        ("name: t\ndata: {labels: {background: 0, liver: 1}, spacing: [1, 0, 1]}\n", "data.spacing.1"),
    ],
)
def test_cli_reports_bad_recipe_in_one_line(tmp_path: Path, text: str, expected: str) -> None:
    p = _write(tmp_path, text)
    for cmd in (["check-recipe", str(p)], ["train", "--config", str(p), "--data", str(tmp_path)]):
        proc = subprocess.run([sys.executable, "-m", "volseg", *cmd], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1, proc.stderr
        assert str(p) in lines[0] and expected in lines[0]
        assert "Traceback" not in proc.stderr
