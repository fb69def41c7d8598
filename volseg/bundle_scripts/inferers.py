"""Test-time mirroring in the bundle's own chain (the recipe's ``infer.tta_flips``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer

from .mirroring import mirrored


class MirroredInferer(Inferer):
    """``inferer`` (a sliding window) whose network runs mirrored on each window (:func:`.mirroring.mirrored`,
    the same as in volseg's own engines)."""

    def __init__(self, inferer: Inferer, axes: Sequence[int]) -> None:
        super().__init__()
        if len(set(axes)) != len(axes) or any(int(a) < 0 or int(a) > 2 for a in axes):
            raise ValueError(f"axes must be distinct spatial axes 0-2, got {list(axes)}")
        self.inferer = inferer
        self.axes = tuple(int(a) for a in axes)

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.inferer(inputs, mirrored(network, self.axes), *args, **kwargs)
