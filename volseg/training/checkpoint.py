"""The resumable last checkpoint (``checkpoints/last.pt``): written atomically after every epoch and on a signal,
read back by ``--resume``."""

from __future__ import annotations

import ast
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg.fileio import atomic_path


def save_torch_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, renamed into place when complete."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def rng_state() -> dict[str, Any]:
    """torch, numpy and Python random states, as tensors and plain values (loadable with ``weights_only``)."""
    np_state: Any = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": repr(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` recorded."""
    torch.set_rng_state(state["torch"])
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, state["numpy_pos"], 0, 0.0))
    py = ast.literal_eval(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))


class Checkpointer:
    """Saves and restores everything a run needs to continue: the objects with a state dict (network, optimizer,
    trainer, scheduler, early stopping), the best-model saver's record, volseg's own counters and the RNGs.

    Args:
        path: The checkpoint file.
        objects: Name -> object with ``state_dict``/``load_state_dict``.
        saver: MONAI's CheckpointSaver of the best model (or None).
        progress: Returns what volseg keeps across a resume (``losses``, ``best``, ``best_epoch``), saved by
            :meth:`save` and returned by :meth:`load`.
        enabled: Whether this process writes (rank 0 only).
    """

    def __init__(self, path: Path, objects: dict[str, Any], saver: Any, progress: Callable[[], dict[str, Any]],
                 enabled: bool = True) -> None:  # fmt: skip
        self.path = path
        self.objects = objects
        self.saver = saver
        self.progress = progress
        self.enabled = enabled

    def _best_checkpoint(self) -> Any:
        return self.saver._key_metric_checkpoint if self.saver is not None else None

    def save(self) -> None:
        if not self.enabled:
            return
        ckpt: dict[str, Any] = {k: v.state_dict() for k, v in self.objects.items()}
        best = self._best_checkpoint()
        ckpt["best_saver"] = best.state_dict() if best is not None else {}
        ckpt["volseg"] = self.progress()
        ckpt["rng"] = rng_state()
        save_torch_atomic(ckpt, self.path)

    def load(self, device: torch.device, restore_rng: bool) -> dict[str, Any]:
        """Load the checkpoint into the objects; returns volseg's counters (``losses``, ``best``, ``best_epoch``)."""
        ckpt = torch.load(self.path, map_location=device, weights_only=True)
        for k, obj in self.objects.items():
            if k in ckpt:
                obj.load_state_dict(ckpt[k])
        best = self._best_checkpoint()
        if ckpt.get("best_saver") and best is not None:
            best.load_state_dict(ckpt["best_saver"])
        if "rng" in ckpt and restore_rng:
            set_rng_state(ckpt["rng"])
        return dict(ckpt.get("volseg", {}))
