"""Runtime rules: device choice, distributed backend, a rank's device."""

from __future__ import annotations

import pytest
import torch

from volseg.errors import UserError
from volseg.runtime import distributed_backend, rank_device, resolve_device


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == resolve_device("auto").type == want
    with pytest.raises(UserError, match="'tpu9' is not a device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_backend_and_rank_device_without_a_gpu(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed_backend("cpu") == distributed_backend("auto") == distributed_backend(None) == "gloo"
    assert distributed_backend("cuda:1") == "nccl"  # asked for: the GPU check is resolve_device's
    assert rank_device("cpu", 3) == "cpu" and rank_device(None, 1) is None


def test_one_gpu_per_rank_under_nccl(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed_backend("auto") == "nccl" and distributed_backend("cpu") == "gloo"
    assert [rank_device("auto", r) for r in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert rank_device("cuda", 1) == "cuda:1" and rank_device("cpu", 1) == "cpu"
