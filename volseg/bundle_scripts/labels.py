"""Labels from class probabilities with a per-class bias (the recipe's ``infer.label_bias``)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.transforms import MapTransform


class BiasedArgmaxd(MapTransform):
    """The label of each voxel: the class whose probability times ``bias[class]`` is largest (the first on ties),
    as MONAI's ``AsDiscreted(argmax=True)`` gives it (a channel axis of one kept); a bias of 1 for every class is
    that argmax."""

    def __init__(self, keys: Any, bias: Sequence[float], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not bias or any(not float(b) > 0 for b in bias):
            raise ValueError(f"bias must hold one positive value per class, got {list(bias)}")
        self.bias = [float(b) for b in bias]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] != len(self.bias):
                raise ValueError(f"{key}: {pred.shape[0]} classes but {len(self.bias)} bias values")
            w = torch.as_tensor(self.bias, dtype=pred.dtype, device=pred.device).view(-1, *([1] * (pred.ndim - 1)))
            d[key] = (pred * w).argmax(dim=0, keepdim=True).to(pred.dtype)
        return d
