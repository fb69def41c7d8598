"""A short training writes a run that is a valid MONAI bundle, runs without volseg, and agrees with volseg infer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import SCHEMA, SCHEMA_MD5, TINY_FLOORS, TINY_LABELS, assert_agreement, require_schema, save_nifti

from volseg.data.synth import liver_ct_phantom
from volseg.infer import run_inference

pytestmark = pytest.mark.slow

ALLOWED_TARGET_PREFIXES = ("monai.", "torch.", "scripts.", "ignite.")


def _targets(node, found: list[str]) -> list[str]:
    if isinstance(node, dict):
        if "_target_" in node:
            found.append(node["_target_"])
        for v in node.values():
            _targets(v, found)
    elif isinstance(node, list):
        for v in node:
            _targets(v, found)
    return found


def _monai_bundle(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", *args], capture_output=True, text=True, timeout=600, cwd=cwd
    )


def test_run_layout_and_loss_decreases(trained_run) -> None:
    run_dir, result = trained_run
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "configs/train.json",
        "configs/logging.conf",
        "configs/volseg_recipe.yaml",
        "models/model.pt",
        "models/model.ts",
        "docs/README.md",
        "LICENSE",
        "checkpoints/last.pt",
        "logs/run_info.json",
    ):
        assert (run_dir / rel).is_file(), rel
    assert list((run_dir / "logs").glob("events.out.tfevents.*")), "no TensorBoard events"
    assert result.losses[-1] < result.losses[0], result.losses
    # Validation also reports the surface metrics in mm (as volseg evaluate does).
    assert set(result.surface) == {"liver", "tumour"}
    assert set(result.surface["liver"]) == {"hd95", "assd", "nsd"}
    hd95 = result.surface["liver"]["hd95"]
    assert hd95 != hd95 or hd95 >= 0.0
    info = json.loads((run_dir / "logs" / "run_info.json").read_text())
    assert info["packages"]["monai"] and info["git_revision"]
    state = torch.load(run_dir / "models" / "model.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert {"network", "optimizer", "trainer", "lr_scheduler"} <= set(ckpt)
    assert ckpt["trainer"]["iteration"] // ckpt["trainer"]["epoch_length"] == result.epochs


def test_metadata_is_valid_and_names_labels(trained_bundle: Path, tmp_path: Path) -> None:
    require_schema()
    schema = tmp_path / SCHEMA.name
    shutil.copyfile(SCHEMA, schema)
    meta_file = trained_bundle / "configs" / "metadata.json"
    proc = _monai_bundle(
        "verify_metadata", "--meta_file", str(meta_file), "--filepath", str(schema), "--hash_val", SCHEMA_MD5
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    meta = json.loads(meta_file.read_text())
    out = meta["network_data_format"]["outputs"]["pred"]
    assert out["channel_def"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert set(meta["network_data_format"]["inputs"]) == {"image"}
    assert "val_mean_dice" in meta["eval_metrics"]
    assert meta["schema"].endswith("meta_schema_20240725.json")


def test_verify_net_in_out(trained_bundle: Path) -> None:
    proc = _monai_bundle(
        "verify_net_in_out",
        "--net_id",
        "network_def",
        "--meta_file",
        str(trained_bundle / "configs" / "metadata.json"),
        "--config_file",
        str(trained_bundle / "configs" / "inference.json"),
        "--bundle_root",
        str(trained_bundle),
        cwd=trained_bundle,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_configs_name_only_monai_torch_and_scripts_targets(trained_bundle: Path) -> None:
    for name in ("inference.json", "train.json"):
        cfg = json.loads((trained_bundle / "configs" / name).read_text())
        for target in _targets(cfg, []):
            assert "." not in target or target.startswith(ALLOWED_TARGET_PREFIXES), (name, target)
        assert "volseg" not in json.dumps(cfg), name


def test_train_json_follows_monai_label_conventions(trained_bundle: Path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(trained_bundle / "configs" / "train.json"))
    for key in ("network", "network_def", "train#trainer", "train#dataset#data", "validate#dataset#data"):
        assert key in parser, key
    assert isinstance(parser["train#handlers"], list)
    assert parser["train#trainer#_target_"] == "SupervisedTrainer"
    parser["bundle_root"] = str(trained_bundle)
    data = parser.get_parsed_content("train#dataset#data")
    assert data and set(data[0]) == {"image", "label"} and Path(data[0]["image"]).is_file()


def test_monai_bundle_run_agrees_with_volseg_infer(trained_bundle: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    truths = {}
    for seed, axcodes in ((21, "LPS"), (22, "RAS")):
        ph = liver_ct_phantom(seed, shape=(56, 48, 24), axcodes=axcodes)
        save_nifti(scans / f"scan{seed}.nii.gz", ph.image, ph.affine)
        truths[f"scan{seed}_seg.nii.gz"] = ph.label
    # A copy of the bundle, run in a process where volseg cannot be imported.
    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle, ignore=shutil.ignore_patterns("checkpoints", "logs"))
    code = (
        "import sys, runpy; sys.modules['volseg'] = None; "
        "sys.argv = ['monai.bundle', 'run', '--config_file', 'configs/inference.json', '--bundle_root', '.', "
        f"'--dataset_dir', {str(scans)!r}, '--output_dir', {str(tmp_path / 'monai_out')!r}]; "
        "runpy.run_module('monai.bundle', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=bundle)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # float32, as the bundle's chain computes (volseg's bf16 default is compared with float32 in test_fastpath.py).
    written, failures = run_inference(
        [str(scans)], tmp_path / "volseg_out", bundle, "cpu", echo=lambda s: None, precision="fp32"
    )
    assert not failures and len(written) == 2
    for path in written:
        ours = nib.load(str(path))
        theirs = nib.load(str(tmp_path / "monai_out" / path.name))
        src = nib.load(str(scans / path.name.replace("_seg", "")))
        assert ours.shape == theirs.shape == src.shape
        np.testing.assert_allclose(theirs.affine, src.affine, atol=1e-4)
        a, b = np.asarray(ours.dataobj), np.asarray(theirs.dataobj)
        assert_agreement(a, b, TINY_LABELS, truth=truths[path.name], floors=TINY_FLOORS, min_dice=0.99)


def test_resume_continues_the_epoch_count(tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path) -> None:
    from volseg.recipe import load_recipe
    from volseg.train import train

    run = tmp_path / "run"
    first = train(load_recipe(tiny_recipe_path, ["train.max_epochs=1"]), tiny_data, run, echo=lambda s: None)
    assert first.epochs == 1
    lines: list[str] = []
    second = train(
        load_recipe(tiny_recipe_path, ["train.max_epochs=2"]), tiny_data, run, resume=True, echo=lines.append
    )
    assert second.epochs == 2
    assert any("resuming" in s and "after epoch 1" in s for s in lines)
    assert [s.split()[1] for s in lines if s.startswith("epoch ")] == ["2/2"]
    assert len(second.losses) == 2
