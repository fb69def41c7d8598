"""SIGINT and SIGTERM during training: noted, so that the run saves a checkpoint and stops after the iteration."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training; a checkpoint was saved first."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by signal {signum}; checkpoint saved to {checkpoint}")


@contextmanager
def caught_signals(received: list[int]) -> Iterator[list[int]]:
    """Within the block, SIGINT and SIGTERM are appended to ``received`` instead of acting (main thread only;
    elsewhere nothing is caught); the previous handlers come back on leaving."""
    previous: dict[signal.Signals, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
