"""The U-Net paper's pixel-wise loss weights (copied to BUNDLE/scripts/weightmap.py; numpy, scipy, torch, monai).

Ronneberger, Fischer and Brox (2015), eq. 2::

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

d1 and d2 are the distances from pixel x to the border of the nearest and of the second-nearest object (cell),
w_c balances the class frequencies. Choices made here, where the paper leaves room:

* The separation term is added on background pixels only (the thin background lines between touching cells are what
  it is for; the paper's Fig. 3d shows it there). Inside a cell, d1 would be 0 and the term would also weigh the cell's
  own rim next to a neighbour.
* w_c(x) = N / (K * N_c) for the class c of x, with N pixels, K classes present and N_c pixels of class c: the
  classes weigh the same in total and the mean of w_c over the image is 1. ``balance=False`` makes w_c = 1.
* Distances are Euclidean in the units of the image's spacing (mm for NIfTI, pixels for PNG/TIFF, whose spacing is
  1), so ``sigma`` is in the same units. Each object's distance is computed in its bounding box grown by
  ``4 * sigma``: beyond it the term is below w0 * exp(-8) and is set to 0.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scipy import ndimage

__all__ = ["UNetWeightMapd", "unet_weight_map"]


def unet_weight_map(
    label: np.ndarray,
    instances: np.ndarray | None = None,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    balance: bool = True,
    spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Pixel weights of the U-Net paper for one label map (2D or 3D, no channel axis).

    Args:
        label: integer label map (0 background).
        instances: object ids (0 background) of the same shape; None takes the face-connected components of
            ``label > 0`` as the objects.
        w0: weight of the separation term.
        sigma: its width, in the units of ``spacing``.
        balance: add the class-frequency weights w_c (else w_c = 1).
        spacing: pixel size along each axis (default 1).

    Returns:
        float32 weights, the shape of ``label``.
    """
    label = np.asarray(label)
    if instances is None:
        instances, _ = ndimage.label(label > 0)
    instances = np.asarray(instances).astype(np.int64, copy=False)
    if instances.shape != label.shape:
        raise ValueError(f"instance mask shape {instances.shape} differs from label shape {label.shape}")
    sp = np.ones(label.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size != label.ndim:
        raise ValueError(f"spacing has {sp.size} values for a {label.ndim}D label")

    weight = np.ones(label.shape, dtype=np.float32)
    if balance:
        values, counts = np.unique(label, return_counts=True)
        per_class = label.size / (len(values) * counts.astype(np.float64))
        weight = per_class[np.searchsorted(values, label)].astype(np.float32)
    if w0 <= 0:
        return weight

    reach = 4.0 * float(sigma)
    d1 = np.full(label.shape, np.inf)
    d2 = np.full(label.shape, np.inf)
    boxes = ndimage.find_objects(instances)
    if sum(b is not None for b in boxes) < 2:
        return weight  # d2 is infinite everywhere: no separation term
    for obj, box in enumerate(boxes, start=1):
        if box is None:
            continue
        grown = tuple(
            slice(max(0, s.start - math.ceil(reach / sp[a])), min(label.shape[a], s.stop + math.ceil(reach / sp[a])))
            for a, s in enumerate(box)
        )
        dist = ndimage.distance_transform_edt(instances[grown] != obj, sampling=sp)
        near1, near2 = d1[grown], d2[grown]  # views
        closer = dist < near1
        near2[...] = np.where(closer, near1, np.minimum(near2, dist))
        near1[...] = np.where(closer, dist, near1)
    term = np.zeros(label.shape, dtype=np.float64)
    finite = np.isfinite(d2) & (label == 0)
    term[finite] = w0 * np.exp(-((d1[finite] + d2[finite]) ** 2) / (2.0 * float(sigma) ** 2))
    return (weight + term).astype(np.float32)


def _spacing(image: Any, ndim: int) -> list[float] | None:
    affine = getattr(image, "affine", None)
    if affine is None:
        return None
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape[0] - 1 < ndim:
        return None
    return np.sqrt((a[:ndim, :ndim] ** 2).sum(axis=0)).tolist()


class UNetWeightMapd(MapTransform):
    """Adds the U-Net paper's weight map of a (channel-first) label as a new key.

    Args:
        keys: the instance-mask key (object ids); when it is missing from the data, the objects are the face-connected
            components of the label's foreground.
        label_key: the label key (class values, shape (1, *spatial)).
        w0: weight of the separation term.
        sigma: its width, in the units of the label's spacing (pixels for PNG/TIFF).
        balance: add the class-frequency weights.
        output_key: where the weights go, shape (1, *spatial), float32, with the label's metadata.
        allow_missing_keys: take the label's components when the instance key is missing (default True).
    """

    def __init__(
        self,
        keys: KeysCollection = "instance",
        label_key: str = "label",
        w0: float = 10.0,
        sigma: float = 5.0,
        balance: bool = True,
        output_key: str = "weight",
        allow_missing_keys: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.w0, self.sigma, self.balance = float(w0), float(sigma), bool(balance)
        self.output_key = output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        label = d[self.label_key]
        lab = np.asarray(label.detach().cpu() if isinstance(label, torch.Tensor) else label)
        if lab.shape[0] != 1:
            raise ValueError(f"UNetWeightMapd needs a one-channel label, got shape {tuple(lab.shape)}")
        instances = None
        for key in self.key_iterator(d):
            inst = d[key]
            instances = np.asarray(inst.detach().cpu() if isinstance(inst, torch.Tensor) else inst)[0]
            break
        weight = unet_weight_map(
            np.rint(lab[0]).astype(np.int64),
            None if instances is None else np.rint(instances).astype(np.int64),
            w0=self.w0,
            sigma=self.sigma,
            balance=self.balance,
            spacing=_spacing(label, lab.ndim - 1),
        )
        out = torch.from_numpy(weight[None])
        if isinstance(label, MetaTensor):
            meta = dict(label.meta)
            meta["affine"] = label.affine.clone()
            d[self.output_key] = MetaTensor(out, meta=meta)
        else:
            d[self.output_key] = out
        return d
