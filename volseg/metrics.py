"""Overlap metrics on label maps.

Rules for empty masks: when both prediction and reference are empty for a label, Dice and IoU are 1.0 (nothing
to find, nothing found); when only one is empty they are 0.0.
"""

from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    total = int(p.sum()) + int(r.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, r).sum()) / total


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union of two boolean masks (1.0 when both are empty)."""
    p, r = np.asarray(pred, bool), np.asarray(ref, bool)
    union = int(np.logical_or(p, r).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(p, r).sum()) / union


def dice_per_label(pred: np.ndarray, ref: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """Dice for each named label value (background excluded when its value is 0)."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return {name: dice(pred == v, ref == v) for name, v in labels.items() if v != 0}


def iou_per_label(pred: np.ndarray, ref: np.ndarray, labels: dict[str, int]) -> dict[str, float]:
    """IoU for each named label value (background excluded when its value is 0)."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return {name: iou(pred == v, ref == v) for name, v in labels.items() if v != 0}
