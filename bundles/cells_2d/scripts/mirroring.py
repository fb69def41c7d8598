"""Test-time mirroring of a network (the recipe's ``infer.tta_flips``): one definition for volseg's engines and
the bundle's own chain (scripts/inferers.py). Only torch: volseg's fast engine imports it without MONAI."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import torch


def mirrored(predictor: Any, axes: Sequence[int]) -> Any:
    """Test-time mirroring as nnU-Net does it: ``predictor`` on the batch flipped along every combination of the
    spatial ``axes`` (none included, so 2^k passes), each output flipped back, logits averaged in float32. A
    predictor returning several outputs (deep supervision) contributes its last one.

    The result is a predictor of the same kind (batch (B, C, *spatial) in, logits out); with no axes, ``predictor``.
    """
    if not axes:
        return predictor
    combos = [tuple(2 + a for a in c) for r in range(len(axes) + 1) for c in combinations(axes, r)]

    def run(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        total: torch.Tensor | None = None
        for dims in combos:
            y = predictor(torch.flip(x, dims) if dims else x, *args, **kwargs)
            if isinstance(y, (tuple, list)):
                y = y[-1]
            y = torch.flip(y.float(), dims) if dims else y.float()
            total = y if total is None else total + y
        assert total is not None
        return total / len(combos)

    return run
