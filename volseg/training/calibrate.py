"""The label bias of ``train.calibrate``: chosen after training, on the validation cases, with the kept weights.

A network trained for a short while on a small structure (a lesion) tends to give it probabilities below one half
at its edges and in its smaller objects: the argmax then under-segments it, with few false positives. nnU-Net
chooses its post-processing from validation results; volseg does the same for the argmax: for each label of
``train.calibrate`` it tries the biases of :data:`BIAS_GRID` (the label's probability is multiplied by the bias
before the argmax, ``infer.label_bias``) and keeps the one with the highest mean Dice per validation case when it
beats no bias (by more than :data:`MIN_GAIN`; else 1: no change), as nnU-Net keeps a post-processing step that
improves its validation Dice. The validation cases are those the run validated on, on the model grid and with the
recipe's test-time mirroring (as the bundle will segment), so the choice costs one more validation pass (2^k with
mirroring along k axes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

#: The biases tried (1 is the plain argmax). For two competing classes a bias b labels a voxel with the biased
#: class where its probability is above 1 / (1 + b): 0.5, 0.4, 0.33, 0.25, 0.2, 0.14, 0.11, 0.08, 0.06.
BIAS_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)
#: A bias is kept only when its mean validation Dice beats the plain argmax's by more than this. Zero: the
#: validation set of a small data set is a few cases, and on the demo's phantoms a bias whose validation gain was
#: 0.006 (run P) still added 0.06 to the held-out tumour Dice per case, since the plain argmax under-segments.
MIN_GAIN = 0.0

Case = tuple[np.ndarray, np.ndarray]  # (probabilities (C, *spatial), reference labels (*spatial))


def case_dice(labels: np.ndarray, ref: np.ndarray, value: int) -> float | None:
    """Dice of one label in one case; None when neither holds it (such a case does not count)."""
    a, b = labels == value, ref == value
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return None
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def biased_labels(probs: np.ndarray, bias: Sequence[float]) -> np.ndarray:
    """argmax over classes of probability times bias (the first class on ties)."""
    w = np.asarray(bias, dtype=probs.dtype).reshape(-1, *([1] * (probs.ndim - 1)))
    return np.asarray((probs * w).argmax(axis=0), dtype=np.uint8)


def mean_dice(cases: Sequence[Case], value: int, bias: Sequence[float]) -> float | None:
    """Mean Dice per case of label ``value`` under ``bias`` (None: no case holds the label)."""
    scores = [case_dice(biased_labels(p, bias), ref, value) for p, ref in cases]
    counted = [s for s in scores if s is not None]
    return float(np.mean(counted)) if counted else None


def choose_bias(
    cases: Sequence[Case], value: int, base: Sequence[float], grid: Sequence[float] = BIAS_GRID
) -> tuple[float, dict[float, float]]:
    """The bias for class ``value`` (the others as in ``base``) and the mean Dice of each tried; 1.0 when no
    validation case holds the label or no bias beats the plain argmax by more than :data:`MIN_GAIN`."""
    table: dict[float, float] = {}
    for b in dict.fromkeys((1.0, *grid)):  # the plain argmax always among the tries
        bias = list(base)
        bias[value] = float(b)
        score = mean_dice(cases, value, bias)
        if score is None:
            return 1.0, {}
        table[float(b)] = score
    best = max(table, key=lambda b: (table[b], -b))  # the smallest bias among the best
    return (best if table[best] > table[1.0] + MIN_GAIN else 1.0), table


def calibrate(
    recipe: Any, cases: Sequence[Case], echo: Callable[[str], None] = print
) -> tuple[dict[str, float], dict[str, dict[float, float]]]:
    """``infer.label_bias`` for ``recipe.train.calibrate`` from validation ``cases`` (one label after the other,
    each with the biases chosen before it), and the table of each label's tries."""
    values = {name: recipe.data.labels[name].value for name in recipe.train.calibrate}
    bias = recipe.label_bias_list() or [1.0] * recipe.num_classes
    chosen: dict[str, float] = dict(recipe.infer.label_bias)
    tables: dict[str, dict[float, float]] = {}
    for name, value in values.items():
        b, table = choose_bias(cases, value, bias)
        tables[name] = table
        if not table:
            echo(f"calibration: no validation case holds {name}; its bias stays 1")
            continue
        bias[value] = b
        tried = ", ".join(f"{k:g}: {v:.3f}" for k, v in table.items())
        echo(f"calibration of {name} on {len(cases)} validation case(s), mean Dice by bias: {tried}; kept {b:g}")
        if b != 1.0:
            chosen[name] = b
        else:
            chosen.pop(name, None)
    return chosen, tables


def validation_cases(recipe: Any, evaluator: Any, model_pt: Any, device: Any) -> list[Case]:
    """The validation cases' probabilities on the model grid (float32, the weights of ``model_pt``, the
    evaluator's sliding window, the recipe's test-time mirroring) and their reference labels."""
    import torch

    from volseg.fastpath import mirrored
    from volseg.training.result import saved_network

    net = saved_network(recipe, model_pt).to(device).eval()
    predictor = mirrored(net, tuple(recipe.infer.tta_flips))  # as the bundle will segment
    out: list[Case] = []
    with torch.inference_mode():
        for batch in evaluator.data_loader:
            x = batch["image"].to(device)
            logits = evaluator.inferer(x, predictor)
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
            ref = batch["label"].cpu().numpy()
            for i in range(probs.shape[0]):
                out.append((probs[i], ref[i, 0].astype(np.int64)))
    return out
