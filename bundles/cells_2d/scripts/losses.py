"""Losses a bundle needs beyond MONAI's own (copied to BUNDLE/scripts/losses.py; imports torch and monai only)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss

__all__ = ["WeightedDiceCELoss"]


class WeightedDiceCELoss(torch.nn.Module):
    """Dice plus pixel-weighted cross-entropy, for targets that carry the U-Net paper's weight map.

    The target is ``(B, 2, *spatial)``: channel 0 the class index of each pixel, channel 1 its weight (from
    ``scripts.weightmap.UNetWeightMapd``). A ``(B, 1, *spatial)`` target is taken with weight 1 everywhere, which
    makes the loss MONAI's ``DiceCELoss(to_onehot_y=True, softmax=True)``.

    loss = lambda_dice * Dice(softmax(input), label) + lambda_ce * mean_x(w(x) * CE(x))

    The cross-entropy is averaged over all pixels (not divided by the sum of the weights), so the weights raise the
    pixels they are meant to raise rather than only re-distributing a fixed total; pixels of weight 0 (padding
    added by the spatial augmentations) do not count. The Dice term is unweighted.

    Args:
        include_background: Dice over the background channel too (as MONAI's DiceCELoss default).
        lambda_dice: weight of the Dice term.
        lambda_ce: weight of the cross-entropy term.
        smooth_nr: Dice numerator smoothing.
        smooth_dr: Dice denominator smoothing.
        squared_pred: squared terms in the Dice denominator.
        batch: the Dice term over the whole batch as one volume (nnU-Net's batch Dice), not per sample.
    """

    def __init__(
        self,
        include_background: bool = True,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        smooth_nr: float = 1e-5,
        smooth_dr: float = 1e-5,
        squared_pred: bool = False,
        batch: bool = False,
    ) -> None:
        super().__init__()
        if lambda_dice < 0 or lambda_ce < 0:
            raise ValueError("lambda_dice and lambda_ce must be >= 0")
        self.lambda_dice, self.lambda_ce = float(lambda_dice), float(lambda_ce)
        self.dice = DiceLoss(
            include_background=include_background,
            to_onehot_y=True,
            softmax=True,
            squared_pred=squared_pred,
            smooth_nr=smooth_nr,
            smooth_dr=smooth_dr,
            batch=batch,
        )

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:  # noqa: A002 - torch's name
        if hasattr(target, "as_tensor"):
            target = target.as_tensor()
        if hasattr(input, "as_tensor"):
            input = input.as_tensor()  # noqa: A001
        if target.ndim != input.ndim or target.shape[1] not in (1, 2):
            raise ValueError(
                f"target must be (B, 1 or 2, *spatial) for input {tuple(input.shape)}, got {tuple(target.shape)}"
            )
        label = target[:, :1]
        total = input.new_zeros(())
        if self.lambda_dice > 0:
            total = total + self.lambda_dice * self.dice(input, label)
        if self.lambda_ce > 0:
            ce = F.cross_entropy(input.float(), label[:, 0].long(), reduction="none")
            if target.shape[1] == 2:
                ce = ce * target[:, 1].to(ce.dtype)
            total = total + self.lambda_ce * ce.mean()
        return total
