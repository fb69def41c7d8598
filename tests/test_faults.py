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

from tests.conftest import REPO

pytestmark = pytest.mark.slow

SETS = ["--set", "train.iterations_per_epoch=15", "--set", "train.val_interval=2", "--set", "data.cache.kind=none"]


def _start(recipe: Path, data: Path, out: Path, epochs: int, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "volseg", "train", "--config", str(recipe), "--data", str(data), "--out", str(out),
           "--set", f"train.max_epochs={epochs}", *SETS, *extra]  # fmt: skip
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.2)


def _epochs_done(run: Path) -> int:
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return ckpt["trainer"]["iteration"] // ckpt["trainer"]["epoch_length"]


def test_sigkill_then_resume(tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _start(tiny_recipe_path, tiny_data, run, 4)
    _wait_for(run / "checkpoints" / "last.pt", proc)
    time.sleep(1.0)  # somewhere in the middle of a later epoch, or of writing a checkpoint
    proc.kill()
    proc.wait()
    done = _epochs_done(run)  # the checkpoint on disk is complete and loadable
    assert 1 <= done < 4
    resumed = _start(tiny_recipe_path, tiny_data, run, 4, "--resume")
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert f"after epoch {done}" in out
    epochs = [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")]
    assert epochs == [f"{e}/4" for e in range(done + 1, 5)]
    assert _epochs_done(run) == 4
    result = json.loads((run / "logs" / "result.json").read_text())
    assert result["epochs"] == 4 and len(result["losses"]) == 4


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
