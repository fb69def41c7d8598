"""Test-time mirroring in the bundle's own chain (the recipe's ``infer.tta_flips``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Any

import torch
from monai.inferers import Inferer


class MirroredInferer(Inferer):
    """``inferer`` (a sliding window) whose network runs on each window flipped along every combination of the
    spatial ``axes`` (none included, so 2^k passes); each output is flipped back and the logits are averaged in
    float32, as nnU-Net mirrors and as volseg's own engines do. A network returning several outputs (deep
    supervision) contributes its last one."""

    def __init__(self, inferer: Inferer, axes: Sequence[int]) -> None:
        super().__init__()
        if len(set(axes)) != len(axes) or any(int(a) < 0 or int(a) > 2 for a in axes):
            raise ValueError(f"axes must be distinct spatial axes 0-2, got {list(axes)}")
        self.inferer = inferer
        self.axes = tuple(int(a) for a in axes)

    def _mirrored(self, network: Callable[..., Any]) -> Callable[..., torch.Tensor]:
        combos = [tuple(2 + a for a in c) for r in range(len(self.axes) + 1) for c in combinations(self.axes, r)]

        def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            total: torch.Tensor | None = None
            for dims in combos:
                y = network(torch.flip(x, dims) if dims else x, *args, **kwargs)
                if isinstance(y, (tuple, list)):
                    y = y[-1]
                y = torch.flip(y.float(), dims) if dims else y.float()
                total = y if total is None else total + y
            assert total is not None
            return total / len(combos)

        return run

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.inferer(inputs, self._mirrored(network), *args, **kwargs)
