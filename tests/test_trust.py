"""Which bundles run: exactly volseg's configs for the bundle's own recipe; a corpus of crafted bundles is refused.

Every crafted bundle carries a payload that would create a marker file if any of its code ran. The MONAI chain must
refuse each with one line and exit status 2; the fast engine evaluates no config, so it either refuses (the recipe
or the weights are the payload) or segments with a warning; in no case does the marker appear.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, TINY_RECIPE, save_nifti

from volseg.bundle import RECIPE_FILE, write_bundle_configs
from volseg.errors import UserError
from volseg.nets import create_network
from volseg.recipe import load_recipe, recipe_from_dict
from volseg.trust import bundle_problem, check_bundle, rewrite_bundle, safe_torch_load


def _raw(**model: object) -> dict:
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["model"].update(model)
    return raw


def _write_bundle(root: Path, raw: dict | None = None, **kwargs) -> Path:
    recipe = recipe_from_dict(raw or _raw())
    write_bundle_configs(recipe, root, **kwargs)
    m = recipe.model
    net = create_network(m.name, m.spatial_dims, m.in_channels, recipe.num_classes, m.args, for_inference=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), root / "models" / "model.pt")
    return root


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    return _write_bundle(
        tmp_path / "bundle",
        dataset_dir="/data/liver",
        train_cases=[{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}],
        val_cases=[{"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz"}],
        metrics={"val_mean_dice": 0.91},
        data_note="2 cases",
    )


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    arr = rng.normal(60, 40, (32, 32, 24)).astype(np.float32)
    return save_nifti(tmp_path_factory.mktemp("scan") / "scan.nii.gz", arr, np.diag([7.0, 7.0, 9.0, 1.0]))


def _edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg, indent=2))


def _refused(root: Path, *needles: str) -> str:
    with pytest.raises(UserError) as info:
        check_bundle(root)
    message = str(info.value)
    assert "\n" not in message
    assert str(root) in message and "--trust-bundle" in message
    for needle in needles:
        assert needle in message, message
    return message


# --------------------------------------------------------------------------------------------------------
# volseg's own bundles pass


@pytest.mark.parametrize("recipe_file", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_pass(recipe_file: Path, tmp_path: Path) -> None:
    root = write_bundle_configs(load_recipe(recipe_file), tmp_path / "b")
    configs = check_bundle(root)
    assert configs is not None and "network_def" in configs["configs/inference.json"]


@pytest.mark.parametrize("model", ["basic_unet", "attention_unet", "unet_plusplus"])
def test_every_network_and_scheduler_passes(model: str, tmp_path: Path) -> None:
    raw = _raw()
    raw["model"] = {"name": model}
    raw["train"]["scheduler"] = {"name": "plateau"}
    raw["train"]["early_stopping"] = {"patience": 3}
    root = write_bundle_configs(recipe_from_dict(raw), tmp_path / "b")
    check_bundle(root)
    assert (root / "scripts").is_dir() == (model == "unet_plusplus")


def test_run_record_and_formatting_may_differ(bundle: Path) -> None:
    # What a run records (cases, metrics, versions) is data; key order and indentation are not content.
    def edit(cfg: dict) -> None:
        cfg["eval_metrics"] = {"val_mean_dice": 0.5, "val_dice_liver": 0.7}
        cfg["monai_version"] = "1.5.2"

    _edit_json(bundle / "configs" / "metadata.json", edit)
    cfg = json.loads((bundle / "configs" / "train.json").read_text())
    cfg["train_cases"] = [{"image": f"i/{k}.nii.gz", "label": f"l/{k}.nii.gz"} for k in range(5)]
    (bundle / "configs" / "train.json").write_text(json.dumps(dict(reversed(list(cfg.items())))))
    assert bundle_problem(bundle) is None


def test_bytecode_cache_of_scripts_is_dropped(tmp_path: Path) -> None:
    root = write_bundle_configs(recipe_from_dict(_raw(name="unet_plusplus", args={})), tmp_path / "b")
    cache = root / "scripts" / "__pycache__"
    cache.mkdir()
    (cache / "nets.cpython-311.pyc").write_bytes(b"not what the sources say")
    check_bundle(root)
    assert not any(cache.iterdir())


def test_changed_recipe_value_is_named(bundle: Path) -> None:
    # inference.json no longer says what the recipe says: the first difference is named by its key path.
    _edit_json(bundle / "configs" / "inference.json", lambda c: c["inferer"].update(overlap=0.75))
    _refused(bundle, "configs/inference.json", "inferer#overlap")


def test_missing_and_unknown_files_are_named(bundle: Path) -> None:
    (bundle / "configs" / "multi_gpu_train.json").unlink()
    _refused(bundle, "configs/multi_gpu_train.json is missing")
    write_bundle_configs(load_recipe(bundle / RECIPE_FILE), bundle)
    (bundle / "configs" / "evaluate.json").write_text("{}")
    _refused(bundle, "configs/evaluate.json is not a file volseg writes")


def test_bundle_without_recipe_is_refused(bundle: Path) -> None:
    (bundle / RECIPE_FILE).unlink()
    _refused(bundle, "not written by volseg", RECIPE_FILE)


def test_unparsable_config_is_refused(bundle: Path) -> None:
    (bundle / "configs" / "train.json").write_text("{not json")
    _refused(bundle, "configs/train.json is not valid JSON")


def test_other_volseg_version_gets_the_rewrite_command(bundle: Path) -> None:
    _edit_json(bundle / "configs" / "metadata.json", lambda c: c["supported_apps"].update(volseg="0.0.9"))
    _edit_json(bundle / "configs" / "inference.json", lambda c: c["inferer"].update(sw_batch_size=8))
    message = _refused(bundle, "volseg 0.0.9", "volseg rewrite-bundle")
    assert "inferer#sw_batch_size" in message


def test_rewrite_bundle_keeps_weights_and_run_record(bundle: Path) -> None:
    weights = (bundle / "models" / "model.pt").read_bytes()
    _edit_json(bundle / "configs" / "inference.json", lambda c: c.update(payload="$print('x')"))
    (bundle / "configs" / "extra.yaml").write_text("a: 1\n")
    removed = rewrite_bundle(bundle, echo=lambda s: None)
    assert removed == ["configs/extra.yaml"]
    assert bundle_problem(bundle) is None
    assert (bundle / "models" / "model.pt").read_bytes() == weights
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert train["dataset_dir"] == "/data/liver" and train["train_cases"][0]["image"] == "imagesTr/a.nii.gz"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"] == {"val_mean_dice": 0.91} and meta["data_source"] == "2 cases"


def test_safe_torch_load(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(safe_torch_load(good)["w"], torch.ones(2))
    with pytest.raises(UserError, match="file not found"):
        safe_torch_load(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load weights"):
        safe_torch_load(tmp_path / "bad.pt")


# --------------------------------------------------------------------------------------------------------
# The corpus: crafted bundles, each with a payload that would create a marker file


class _Touch:
    """Pickled, it creates ``path`` when unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _save_py(marker: Path) -> str:
    return f"numpy.savetxt({str(marker)!r}, [1])"


def _set_spatial_dims(expr: str) -> Callable[[Path, Path], None]:
    def craft(root: Path, marker: Path) -> None:
        _edit_json(
            root / "configs" / "inference.json", lambda c: c["network_def"].update(spatial_dims=expr.format(m=marker))
        )

    return craft


def _ref_elsewhere(root: Path, marker: Path) -> None:
    def edit(c: dict) -> None:
        c["payload"] = f"${_save_py(marker)}"
        c["network_def"]["spatial_dims"] = "$@payload or 3"

    _edit_json(root / "configs" / "inference.json", edit)


def _prepend_transform(component: Callable[[Path], dict]) -> Callable[[Path, Path], None]:
    def craft(root: Path, marker: Path) -> None:
        _edit_json(
            root / "configs" / "inference.json",
            lambda c: c["preprocessing"]["transforms"].insert(0, component(marker)),
        )

    return craft


def _macro(root: Path, marker: Path) -> None:
    (root / "payload.json").write_text(json.dumps({"x": f"${_save_py(marker)} or 3"}))
    macro = f"%{root / 'payload.json'}#x"
    _edit_json(root / "configs" / "inference.json", lambda c: c["network_def"].update(spatial_dims=macro))


def _logging_conf(root: Path, marker: Path) -> None:
    conf = root / "configs" / "logging.conf"
    text = conf.read_text().replace("args=(sys.stdout,)", f"args=(open({str(marker)!r}, 'w') and sys.stdout,)")
    conf.write_text(text)


def _extra_scripts_module(root: Path, marker: Path) -> None:
    (root / "scripts").mkdir(exist_ok=True)
    (root / "scripts" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def _changed_scripts_module(root: Path, marker: Path) -> None:
    nets = root / "scripts" / "nets.py"
    nets.write_text(nets.read_text() + f"\nopen({str(marker)!r}, 'w').close()\n")


def _pickled_weights(root: Path, marker: Path) -> None:
    torch.save({"model": _Touch(str(marker))}, root / "models" / "model.pt")


def _python_tag_in_recipe(root: Path, marker: Path) -> None:
    recipe = root / RECIPE_FILE
    recipe.write_text(recipe.read_text() + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")


def _requires_key(root: Path, marker: Path) -> None:
    _edit_json(
        root / "configs" / "inference.json", lambda c: c["network_def"].update(_requires_=f"${_save_py(marker)}")
    )


def _recipe_expression(root: Path, marker: Path) -> None:
    # A recipe whose model argument is an expression, and configs regenerated to match it exactly.
    recipe = root / RECIPE_FILE
    expr = f"$1 if {_save_py(marker)} else 1"
    text = recipe.read_text().replace("num_res_units: 1", f"num_res_units: {json.dumps(expr)}")
    assert text != recipe.read_text()
    recipe.write_text(text)
    _edit_json(
        root / "configs" / "inference.json",
        lambda c: c["network_def"].update(num_res_units=expr),
    )


def _case_component(root: Path, marker: Path) -> None:
    cmd = {"_target_": "monai.utils.misc.run_cmd", "cmd_list": ["touch", str(marker)]}
    _edit_json(root / "configs" / "train.json", lambda c: c["train_cases"].append(cmd))


def _dataset_dir_expression(root: Path, marker: Path) -> None:
    _edit_json(root / "configs" / "train.json", lambda c: c.update(dataset_dir=f"${_save_py(marker)} or '/d'"))


def _metrics_expression(root: Path, marker: Path) -> None:
    _edit_json(root / "configs" / "metadata.json", lambda c: c["eval_metrics"].update(x=f"${_save_py(marker)}"))


def _extra_config(root: Path, marker: Path) -> None:
    (root / "configs" / "evaluate.json").write_text(json.dumps({"run": [f"${_save_py(marker)}"]}))


def _code_at_root(root: Path, marker: Path) -> None:
    (root / "numpy.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def _symlinked_config(root: Path, marker: Path) -> None:
    evil = root.parent / "evil_inference.json"
    cfg = json.loads((root / "configs" / "inference.json").read_text())
    cfg["network_def"]["spatial_dims"] = f"${_save_py(marker)} or 3"
    evil.write_text(json.dumps(cfg))
    (root / "configs" / "inference.json").unlink()
    (root / "configs" / "inference.json").symlink_to(evil)


UNET_PLUSPLUS = {
    "model": {"name": "unet_plusplus", "args": {"features": [8, 8, 16, 16, 32, 8]}},
    "train": {"patch_size": [32, 32, 32]},
}
# (case id, how it is crafted, recipe sections to update, what the fast engine does: "runs" with a warning or "refuses",
# and a word the MONAI chain's refusal names)
CORPUS = [
    ("comprehension-receiver", _set_spatial_dims("$[t.savetxt('{m}', [1]) for t in [numpy]][0] or 3"), {},
     "runs", "network_def#spatial_dims"),
    ("lambda-parameter", _set_spatial_dims("$(lambda m: m.savetxt('{m}', [1]))(numpy) or 3"), {},
     "runs", "network_def#spatial_dims"),
    ("direct-call", _set_spatial_dims("$numpy.savetxt('{m}', [1]) or 3"), {}, "runs", "network_def#spatial_dims"),
    ("reference-to-expression", _ref_elsewhere, {}, "runs", "network_def#spatial_dims"),
    ("run_cmd-target", _prepend_transform(
        lambda m: {"_target_": "monai.utils.misc.run_cmd", "cmd_list": ["touch", str(m)]}), {},
     "runs", "preprocessing#transforms#0"),
    ("collect_env-target", _prepend_transform(
        lambda m: {"_target_": "torch.utils.collect_env.run", "command": f"touch {m}"}), {},
     "runs", "preprocessing#transforms#0"),
    ("lambdad-side-effect", _prepend_transform(
        lambda m: {"_target_": "Lambdad", "keys": "image",
                   "func": f"$lambda x: (numpy.savetxt({str(m)!r}, [1]), x)[1]"}), {},
     "runs", "preprocessing#transforms#0"),
    ("file-macro", _macro, {}, "runs", "network_def#spatial_dims"),
    ("logging-conf", _logging_conf, {}, "runs", "configs/logging.conf"),
    ("extra-scripts-module", _extra_scripts_module, {}, "runs", "scripts/__init__.py"),
    ("changed-scripts-module", _changed_scripts_module, UNET_PLUSPLUS,
     "runs", "scripts/nets.py"),
    ("pickled-weights", _pickled_weights, {}, "refuses", "cannot load weights"),
    ("python-tag-in-recipe", _python_tag_in_recipe, {}, "refuses", RECIPE_FILE),
    ("requires-key", _requires_key, {}, "runs", "network_def#_requires_"),
    ("expression-in-recipe", _recipe_expression, {}, "refuses", "MONAI config syntax"),
    ("component-in-case-list", _case_component, {}, "runs", "train_cases#1#_target_"),
    ("expression-as-dataset-dir", _dataset_dir_expression, {}, "runs", "dataset_dir"),
    ("expression-in-metrics", _metrics_expression, {}, "runs", "eval_metrics#x"),
    ("extra-config-file", _extra_config, {}, "runs", "configs/evaluate.json"),
    ("python-at-bundle-root", _code_at_root, {}, "runs", "numpy.py"),
    ("symlinked-config", _symlinked_config, {}, "runs", "symbolic link"),
]  # fmt: skip


def _crafted(tmp_path: Path, craft: Callable[[Path, Path], None], sections: dict) -> tuple[Path, Path]:
    raw = _raw()
    for section, values in sections.items():
        raw[section].update(values)
    root = _write_bundle(tmp_path / "crafted", raw, train_cases=[{"image": "a.nii.gz", "label": "b.nii.gz"}])
    marker = tmp_path / "marker"
    craft(root, marker)
    assert not marker.exists()
    return root, marker


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from volseg.cli import main

    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize(("case", "craft", "recipe", "fast", "needle"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_monai_chain_refuses(case, craft, recipe, fast, needle, tmp_path: Path, scan: Path, capsys) -> None:
    root, marker = _crafted(tmp_path, craft, recipe)
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "infer", str(scan), "--bundle", str(root), "--engine", "monai", "-o", str(out))
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("volseg: error:"), err
    assert needle in lines[0], lines[0]
    assert not marker.exists()
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize(("case", "craft", "recipe", "fast", "needle"), CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus_fast_engine_runs_nothing(case, craft, recipe, fast, needle, tmp_path: Path, scan: Path, capsys) -> None:
    root, marker = _crafted(tmp_path, craft, recipe)
    out = tmp_path / "out"
    rc, stdout, err = _cli(capsys, "infer", str(scan), "--bundle", str(root), "-o", str(out))
    assert not marker.exists()
    if fast == "refuses":
        assert rc == 2, (stdout, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and needle in lines[0], err
    else:
        assert rc == 0, (stdout, err)
        warning = [line for line in stdout.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and "monai.bundle run" in warning[0], stdout
        seg = nib.load(str(out / "scan_seg.nii.gz"))
        assert seg.shape == (32, 32, 24)
    # Nothing the bundle holds ran, and the MONAI chain still refuses it afterwards.
    assert not marker.exists()
    if fast == "runs":
        _refused(root)


# The payloads are live: what the MONAI chain evaluates does run when the check is skipped (so the refusals above
# are what keeps the marker away). logging.conf, scripts/__init__.py, other config files, the run record and code
# at the bundle root are evaluated by other tools (MONAI Label, `monai.bundle run`), not by volseg's chain.
LIVE_IN_VOLSEG_CHAIN = {
    "comprehension-receiver", "lambda-parameter", "direct-call", "reference-to-expression", "run_cmd-target",
    "collect_env-target", "lambdad-side-effect", "file-macro", "requires-key", "symlinked-config",
}  # fmt: skip


@pytest.mark.parametrize(
    ("case", "craft", "recipe"),
    [c[:3] for c in CORPUS if c[0] in LIVE_IN_VOLSEG_CHAIN],
    ids=[c[0] for c in CORPUS if c[0] in LIVE_IN_VOLSEG_CHAIN],
)
def test_corpus_payloads_run_when_trusted(case, craft, recipe, tmp_path: Path, scan: Path, capsys) -> None:
    root, marker = _crafted(tmp_path, craft, recipe)
    out = tmp_path / "out"
    _cli(capsys, "infer", str(scan), "--bundle", str(root), "--engine", "monai", "--trust-bundle", "-o", str(out))
    assert marker.exists()


def test_fold_bundles_inside_an_ensemble_may_hold_volsegs_scripts_only(tmp_path: Path) -> None:
    raw = _raw(name="unet_plusplus", args={})
    root = write_bundle_configs(recipe_from_dict(raw), tmp_path / "ensemble")
    write_bundle_configs(recipe_from_dict(raw), root / "folds" / "fold_0")
    assert (root / "folds" / "fold_0" / "scripts" / "nets.py").is_file()
    check_bundle(root)
    nets = root / "folds" / "fold_0" / "scripts" / "nets.py"
    nets.write_text(nets.read_text() + "\nprint('hello')\n")
    _refused(root, "folds/fold_0/scripts/nets.py is Python code outside scripts/")


def test_a_scripts_module_no_config_names_may_be_missing(tmp_path: Path) -> None:
    # A bundle written before scripts/labels.py existed (a network that needs scripts/, no label bias) still
    # passes; once its configs name the module (infer.label_bias), it must be there.
    raw = _raw(name="unet_plusplus", args={})
    root = write_bundle_configs(recipe_from_dict(raw), tmp_path / "b")
    (root / "scripts" / "labels.py").unlink()
    assert bundle_problem(root) is None
    (root / "scripts" / "nets.py").unlink()
    _refused(root, "scripts/nets.py is missing")
    raw["infer"] = {"label_bias": {"tumour": 2.0}}
    root = write_bundle_configs(recipe_from_dict(raw), tmp_path / "c")
    (root / "scripts" / "labels.py").unlink()
    _refused(root, "scripts/labels.py is missing")
