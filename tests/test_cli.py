"""The command line: the main commands run, and user mistakes end in one line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import REPO, save_nifti

from volseg.data.synth import liver_ct_phantom


def volseg(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "volseg", *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env
    )


def _one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    err = [line for line in proc.stderr.splitlines() if line.startswith("volseg: error:")]
    assert len(err) == 1, proc.stderr
    for needle in needles:
        assert needle in err[0], err[0]


def test_help_lists_the_commands() -> None:
    proc = volseg("--help")
    assert proc.returncode == 0
    for cmd in ("train", "infer", "synth", "demo", "export-bundles", "check-recipe"):
        assert cmd in proc.stdout


def test_infer_without_a_bundle_says_how_to_get_one(tmp_path: Path) -> None:
    scan = save_nifti(tmp_path / "scan.nii.gz", np.zeros((8, 8, 8), np.int16), np.eye(4))
    _one_line_error(volseg("infer", str(scan), cwd=tmp_path), "no trained bundle found", "volseg train")


def test_infer_missing_input_and_bundle_without_weights(tmp_path: Path, trained_bundle: Path) -> None:
    _one_line_error(
        volseg("infer", str(tmp_path / "nope.nii.gz"), "--bundle", str(trained_bundle)),
        "nope.nii.gz",
        "input not found",
    )
    empty = tmp_path / "empty_bundle"
    (empty / "configs").mkdir(parents=True)
    (empty / "configs" / "inference.json").write_text((trained_bundle / "configs" / "inference.json").read_text())
    scan = save_nifti(tmp_path / "scan.nii.gz", np.zeros((8, 8, 8), np.int16), np.eye(4))
    _one_line_error(volseg("infer", str(scan), "--bundle", str(empty)), str(empty), "models/model.pt is missing")


def test_infer_bad_device(tmp_path: Path, trained_bundle: Path) -> None:
    scan = save_nifti(tmp_path / "scan.nii.gz", np.zeros((8, 8, 8), np.int16), np.eye(4))
    _one_line_error(volseg("infer", str(scan), "--bundle", str(trained_bundle), "--device", "tpu:3"), "--device")


@pytest.mark.slow
def test_infer_goes_on_past_a_bad_input(tmp_path: Path, trained_bundle: Path) -> None:
    ph = liver_ct_phantom(5, shape=(40, 40, 20))
    good = save_nifti(tmp_path / "in" / "good.nii.gz", ph.image, ph.affine)
    (tmp_path / "in" / "bad.nii").write_text("this is not a NIfTI file\n")
    proc = volseg("infer", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--bundle", str(trained_bundle))
    assert proc.returncode == 2, proc.stderr
    assert "bad.nii" in proc.stderr and "Traceback" not in proc.stderr
    out = tmp_path / "out" / "good_seg.nii.gz"
    assert out.is_file() and nib.load(str(out)).shape == nib.load(str(good)).shape
    assert not list((tmp_path / "out").glob("bad*")) and not list((tmp_path / "out").glob(".*"))


@pytest.mark.slow
def test_train_and_infer_commands(tmp_path: Path, tiny_data: Path, tiny_recipe_path: Path) -> None:
    proc = volseg(
        "train", "--config", str(tiny_recipe_path), "--data", str(tiny_data), "--out", str(tmp_path / "runs" / "t"),
        "--set", "train.max_epochs=2", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "epoch 2/2" in proc.stdout and "bundle:" in proc.stdout
    ph = liver_ct_phantom(9, shape=(40, 40, 20), axcodes="LPS")
    scan = save_nifti(tmp_path / "scan.nii.gz", ph.image, ph.affine)
    # Without --bundle, the latest run under ./runs is used.
    proc = volseg("infer", str(scan), "-o", str(tmp_path / "pred"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(str(tmp_path / "pred" / "scan_seg.nii.gz"))
    assert out.shape == ph.image.shape
    np.testing.assert_allclose(out.affine, ph.affine, atol=1e-4)
    # Training again into the same folder without --resume is refused.
    proc = volseg(
        "train", "--config", str(tiny_recipe_path), "--data", str(tiny_data), "--out", str(tmp_path / "runs" / "t")
    )
    _one_line_error(proc, "--resume")


def test_synth_writes_msd_layout(tmp_path: Path) -> None:
    proc = volseg("synth", "--task", "liver_ct", "-n", "1", "-o", str(tmp_path / "d"))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["numTraining"] == 1 and (tmp_path / "d" / meta["training"][0]["image"]).is_file()
    _one_line_error(volseg("synth", "--task", "knee_mr", "-n", "1", "-o", str(tmp_path / "e")), "knee_mr")


def test_evaluate_command(tmp_path: Path) -> None:
    ref = np.zeros((20, 20, 10), np.uint8)
    ref[5:15, 5:15, 2:8] = 1
    pred = np.roll(ref, 1, axis=0)
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    save_nifti(tmp_path / "pred" / "c1_seg.nii.gz", pred, aff)
    save_nifti(tmp_path / "gt" / "c1.nii.gz", ref, aff)
    proc = volseg(
        "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", "liver=1", "-o", str(tmp_path / "ev")
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "ev" / "metrics_per_case.csv").is_file() and (tmp_path / "ev" / "metrics_summary.csv").is_file()
    dice_line = next(line for line in proc.stdout.splitlines() if line.startswith("liver") and " dice " in line)
    assert abs(float(dice_line.split()[2]) - 0.9) < 1e-3  # one-voxel shift of a 10-voxel-wide box
    found = volseg("evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "-o", str(tmp_path / "ev2"))
    assert found.returncode == 0 and "labels found in the files: label_1 " in found.stdout, found.stderr


@pytest.mark.slow
def test_infer_refuses_a_changed_bundle_unless_trusted(tmp_path: Path, trained_bundle: Path) -> None:
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(trained_bundle, bundle)
    cfg = bundle / "configs" / "inference.json"
    cfg.write_text(cfg.read_text().replace('"overlap": 0.25', '"overlap": 0.5'))
    scan = save_nifti(tmp_path / "scan.nii.gz", liver_ct_phantom(3, shape=(32, 32, 16)).image, np.diag([8, 8, 8, 1.0]))
    # The MONAI chain would evaluate the changed config: refused, nothing written.
    chain = ("--engine", "monai", "-o", str(tmp_path / "o"))
    _one_line_error(volseg("infer", str(scan), "--bundle", str(bundle), *chain), "inferer#overlap", "--trust-bundle")
    assert not (tmp_path / "o").exists()
    proc = volseg("infer", str(scan), "--bundle", str(bundle), *chain, "--trust-bundle")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "o" / "scan_seg.nii.gz").is_file()
    # The fast engine evaluates no config: it segments, and warns that other tools would run the changed one.
    proc = volseg("infer", str(scan), "--bundle", str(bundle), "-o", str(tmp_path / "f"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    warnings = [line for line in proc.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "inferer#overlap" in warnings[0] and "monai.bundle run" in warnings[0]
    assert (tmp_path / "f" / "scan_seg.nii.gz").is_file()
    # rewrite-bundle makes the configs volseg's again (the recipe says 0.25); then nothing is refused.
    assert volseg("rewrite-bundle", str(bundle)).returncode == 0
    proc = volseg("infer", str(scan), "--bundle", str(bundle), "--engine", "monai", "-o", str(tmp_path / "r"))
    assert proc.returncode == 0 and "warning" not in proc.stdout, proc.stderr[-2000:]


def test_check_data_and_training_refuses_bad_data(tmp_path: Path, tiny_recipe_path: Path) -> None:
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    for i in range(3):
        img = np.full((16, 16, 8), -100 + i, np.int16)  # distinct files (identical bytes are duplicates)
        lab = np.zeros((16, 16, 8), np.uint8)
        lab[4:10, 4:10, 2:6] = 255 if i == 1 else 1  # case 1: a 0/255 mask
        save_nifti(tmp_path / "d" / "images" / f"c{i}.nii.gz", img, aff)
        save_nifti(tmp_path / "d" / "labels" / f"c{i}.nii.gz", lab, aff)
    proc = volseg("check-data", "--config", str(tiny_recipe_path), "--data", str(tmp_path / "d"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "c1.nii.gz" in proc.stdout and "0/255" in proc.stdout and "3 cases checked: 1 error" in proc.stdout
    proc = volseg(
        "train", "--config", str(tiny_recipe_path), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "r")
    )
    _one_line_error(proc, "data check found 1 error", "c1.nii.gz")
    assert not (tmp_path / "r").exists()


def test_full_disk_is_one_line_and_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import errno

    import volseg.cli as cli

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/case_seg.nii.gz")

    monkeypatch.setattr("volseg.data.synth.write_dataset", full)
    assert cli.main(["synth", "-n", "1", "-o", "/data/out"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["volseg: error: /data/out/case_seg.nii.gz: No space left on device (nothing half-written was left)"]


@pytest.mark.slow
def test_qc_pictures_from_infer_evaluate_and_training(tmp_path: Path, trained_run) -> None:
    from PIL import Image

    run_dir, _ = trained_run
    curves = run_dir / "logs" / "training_curves.png"
    assert curves.is_file() and Image.open(curves).size[0] > 200
    ph = liver_ct_phantom(4, shape=(40, 36, 20), axcodes="LPS")
    scan = save_nifti(tmp_path / "img" / "scan.nii.gz", ph.image, ph.affine)
    save_nifti(tmp_path / "gt" / "scan.nii.gz", ph.label, ph.affine)
    proc = volseg("infer", str(scan), "--bundle", str(run_dir), "-o", str(tmp_path / "pred"), "--qc")
    assert proc.returncode == 0, proc.stderr[-2000:]
    montage = Image.open(tmp_path / "pred" / "scan_seg_qc.png")
    assert montage.size[0] > 300 and len(set(montage.convert("L").getdata())) > 20
    proc = volseg(
        "evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"), "--labels", "liver=1", "-o", str(tmp_path / "ev"),
        "--qc", "--images", str(tmp_path / "img"),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "ev" / "scan_qc.png").is_file()


def test_infer_finds_the_demo_bundle(tmp_path: Path) -> None:
    """After `volseg demo`, `volseg infer scan.nii.gz` (the README's usage) segments with the demo's run."""
    from helpers import write_random_bundle

    write_random_bundle(tmp_path / "demo" / "run")
    scan = save_nifti(tmp_path / "scan.nii.gz", np.zeros((20, 20, 12), np.int16), np.diag([4.0, 4.0, 5.0, 1.0]))
    proc = volseg("infer", str(scan), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "bundle demo/run" in proc.stdout and (tmp_path / "predictions" / "scan_seg.nii.gz").is_file()
