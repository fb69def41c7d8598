"""Distributed training on torch.distributed through ignite.distributed: 2 processes, gloo, on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import REPO, free_port, save_nifti

from volseg.recipe import load_recipe
from volseg.train import train

pytestmark = pytest.mark.slow

# Deterministic batches: the patch covers every (padded) volume, one patch per volume, no augmentation, and
# instance norm, so that one process with batch 6 and two processes with batch 3 each see the same global batch;
# float32 steps (bf16 autocast rounds the two differently arranged batches differently).
EXACT = [
    "train.amp=false",
    "train.patch_size=[64, 64, 32]",
    "train.samples_per_volume=1",
    "train.max_epochs=2",
    "train.val_interval=1",
    "train.augment={flip: 0, rotate: 0, scale: 0, intensity_shift: 0, intensity_scale: 0, noise: 0}",
    "model.args={channels: [4, 8, 16], strides: [2, 2], num_res_units: 1, norm: instance}",
    "train.scheduler.name=none",
]


def test_two_gloo_processes_match_one_process(tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path) -> None:
    single = train(
        load_recipe(tiny_recipe_path, [*EXACT, "train.batch_size=6"]), tiny_data, tmp_path / "single",
        echo=lambda s: None,
    )  # fmt: skip
    multi = train(
        load_recipe(tiny_recipe_path, [*EXACT, "train.batch_size=3"]), tiny_data, tmp_path / "multi",
        nproc_per_node=2,
    )  # fmt: skip
    assert multi.epochs == single.epochs == 2
    assert multi.losses == pytest.approx(single.losses, rel=1e-3), (multi.losses, single.losses)
    # Two runs that predict nothing would agree too (Dice 0 both): the validation must find some liver
    # (0.13 measured after these 2 epochs; an empty prediction scores 0).
    assert single.per_label_dice["liver"] > 0.05, single.per_label_dice
    assert multi.per_label_dice == pytest.approx(single.per_label_dice, abs=1e-3)
    assert multi.best_mean_dice == pytest.approx(single.best_mean_dice, abs=1e-3)

    info = json.loads((tmp_path / "multi" / "logs" / "distributed.json").read_text())
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["identical"], info["state_digests"]
    # Only rank 0 wrote: one TensorBoard writer per engine, and the checkpoints load in a single process.
    run_info = json.loads((tmp_path / "multi" / "logs" / "run_info.json").read_text())
    assert run_info["world_size"] == 2
    for name in ("checkpoints/last.pt", "models/model.pt"):
        state = torch.load(tmp_path / "multi" / name, weights_only=True)
        weights = state["network"] if "network" in state else state
        assert not any(k.startswith("module.") for k in weights), name
    from volseg.infer import Predictor

    Predictor.from_bundle(tmp_path / "multi", "cpu")  # loads the weights into the plain network


def test_torchrun_launch(tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "volseg", "train", "--config", str(tiny_recipe_path), "--data", str(tiny_data),
        "--out", str(tmp_path / "run"), "--set", "train.max_epochs=1",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("epoch 1/1") == 1  # rank 0 alone reports
    info = json.loads((tmp_path / "run" / "logs" / "distributed.json").read_text())
    assert info["world_size"] == 2 and info["identical"]
    assert (tmp_path / "run" / "models" / "model.ts").is_file()


def test_batch_inference_shards_cases_over_processes(trained_bundle: Path, tmp_path: Path) -> None:
    from volseg.data.synth import liver_ct_phantom
    from volseg.infer import run_inference

    for seed in (31, 32, 33):
        ph = liver_ct_phantom(seed, shape=(40, 36, 20))
        save_nifti(tmp_path / "scans" / f"s{seed}.nii.gz", ph.image, ph.affine)
    written, failures = run_inference(
        [str(tmp_path / "scans")], tmp_path / "out", trained_bundle, "cpu", echo=lambda s: None, nproc_per_node=2
    )
    assert not failures
    assert sorted(p.name for p in written) == ["s31_seg.nii.gz", "s32_seg.nii.gz", "s33_seg.nii.gz"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)


def test_bundle_has_multi_gpu_train_config(trained_bundle: Path) -> None:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(trained_bundle / "configs" / n) for n in ("train.json", "multi_gpu_train.json")])
    assert parser["network#_target_"] == "torch.nn.parallel.DistributedDataParallel"
    assert parser["train#dataloader#sampler"] == "@train#sampler"
    assert parser["train#sampler#_target_"] == "DistributedSampler" and parser["train#dataloader#shuffle"] is False
    assert parser["validate#sampler#even_divisible"] is False
    assert any("init_process_group" in e for e in parser["initialize"])
    assert "$import torch.distributed as dist" in parser["imports"]
