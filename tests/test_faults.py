"""Training killed at any moment resumes from the last complete checkpoint; SIGTERM/SIGINT save one first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO

pytestmark = pytest.mark.slow

SETS = ["--set", "train.iterations_per_epoch=15", "--set", "train.val_interval=2", "--set", "data.cache.kind=none"]


def _start(recipe: Path, data: Path, out: Path, epochs: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "volseg", "train", "--config", str(recipe), "--data", str(data), "--out", str(out),
           "--set", f"train.max_epochs={epochs}", *SETS, *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll (every 20 ms) until ``path`` exists; fail if the process ends first or after ``timeout`` seconds."""
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.02)


def _epochs_done(run: Path) -> int:
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return ckpt["trainer"]["iteration"] // ckpt["trainer"]["epoch_length"]


def test_sigkill_then_resume(tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(tiny_recipe_path, tiny_data, run, 50)
    _wait_for(run / "checkpoints" / "last.pt", proc)  # the first epoch's checkpoint is on disk: kill now
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL  # killed while training, not finished
    done = _epochs_done(run)  # the checkpoint on disk is complete and loadable
    assert 1 <= done < 50  # one is written at the end of each epoch only (no signal handler ran)
    assert not (run / "logs" / "result.json").exists()
    total = done + 2  # resume for two more epochs
    resumed = _start(tiny_recipe_path, tiny_data, run, total, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"after epoch {done}" in out
    epochs = [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")]
    assert epochs == [f"{done + 1}/{total}", f"{total}/{total}"]
    assert _epochs_done(run) == total
    result = json.loads((run / "logs" / "result.json").read_text())
    assert result["epochs"] == total and len(result["losses"]) == total


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint_first(sig: int, tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(tiny_recipe_path, tiny_data, run, 50)
    _wait_for(run / "checkpoints" / "last.pt", proc)
    before = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["trainer"]["iteration"]
    time.sleep(0.5)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, (proc.returncode, err[-2000:])
    assert "checkpoint saved" in err and "--resume" in err and "Traceback" not in err
    after = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert after["trainer"]["iteration"] > before  # saved at the iteration the signal arrived, not the epoch end
