"""Network wrappers a bundle needs beyond MONAI's own classes (this file is copied to BUNDLE/scripts/nets.py)."""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNetPlusPlus


class UNetPlusPlusLastHead(BasicUNetPlusPlus):
    """UNet++ that returns only its last (full-depth) head.

    Training uses all heads for deep supervision; inference reads the last one. The state dict is exactly that of
    :class:`monai.networks.nets.BasicUNetPlusPlus`, so weights move between the two without renaming.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[-1]


class LastHeadView(torch.nn.Module):
    """A view of a deep-supervision network that returns only its last head (for validation during training)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[-1] if isinstance(out, (list, tuple)) else out
