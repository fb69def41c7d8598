"""What a multi-process run adds after each epoch and at the end: one state on every rank, and a record of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from volseg.fileio import write_text_atomic


def average_buffers(net: torch.nn.Module, idist: Any) -> None:
    """Average floating-point buffers (batch-norm running statistics) over ranks, so every rank holds one state.

    DDP keeps parameters equal; running statistics are updated by each rank's own forward passes.
    """
    for buf in net.buffers():
        if buf.is_floating_point():
            buf.copy_(idist.all_reduce(buf.detach().clone()) / idist.get_world_size())


def state_digest(net: torch.nn.Module) -> str:
    """SHA-256 of a network's state dict (names and values)."""
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def record_states(net: torch.nn.Module, run_dir: Path, idist: Any) -> None:
    """Gather every rank's state digest; rank 0 writes logs/distributed.json (identical: every rank ended equal)."""
    digests: Any = idist.all_gather(state_digest(net))
    if idist.get_rank() == 0:
        record = {"world_size": idist.get_world_size(), "backend": idist.backend(), "state_digests": digests,
                  "identical": len(set(digests)) == 1}  # fmt: skip
        write_text_atomic(run_dir / "logs" / "distributed.json", json.dumps(record, indent=2) + "\n")
