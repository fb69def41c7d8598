"""volseg's fast inference engine for 3D volumes.

It computes what the bundle's MONAI chain computes (orient, resample to the recipe's spacing, intensity, crop to
the foreground, sliding window, softmax, back to the input grid, argmax, largest component) with less work:

- the input is read once (gzip through ISA-L when ``isal`` is installed) and never copied at full resolution
  more than needed;
- reorientation is an axis permutation and flips of the array (no resampling), the spacing change is a separable
  linear interpolation whose inverse maps the same field of view back;
- the way back to the input grid is done slab by slab: probabilities are upsampled in-plane for a few source slices
  at a time, interpolated along the slice axis and turned into labels at once, so no full-resolution float
  probability volume is ever held (unless probabilities are asked for);
- on a GPU every step runs there, in bfloat16 autocast for the network.

The resampling convention is that of ``torch.nn.functional.interpolate(..., align_corners=False)``: the model grid
covers the same field of view as the input grid, so going there and back is exact in geometry.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg.errors import UserError


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """Read a NIfTI as float32 (scaling applied) with its affine; gzip through ISA-L when available."""
    import nibabel as nib

    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            raw = path.read_bytes()
            try:
                from isal import igzip

                data = igzip.decompress(raw)
            except ImportError:
                import gzip

                data = gzip.decompress(raw)
            img: Any = nib.Nifti1Image.from_bytes(data)
        else:
            img = nib.load(str(path))
        arr = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any reader failure is a problem of the user's file
        raise UserError(
            f"cannot read image ({exc.__class__.__name__}: {str(exc).splitlines()[0][:150]})", path
        ) from None
    return arr, np.asarray(img.affine, dtype=np.float64), img


def model_grid(
    shape: tuple[int, ...], affine: np.ndarray, target: tuple[float, ...]
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """MONAI ``Spacing``'s output grid for an image already in the target orientation.

    MONAI keeps the direction cosines, sets the spacing, sizes the grid with ``compute_shape_offset`` and places
    it either at the first voxel or centred on the input. For the resulting grid, model voxel ``j`` sits at input
    voxel ``scale * j + shift`` (per axis). Returns (shape, scale, shift).
    """
    from monai.data.utils import compute_shape_offset, zoom_affine

    new = zoom_affine(affine, np.asarray(target, dtype=np.float64), diagonal=False)
    out_shape, offset = compute_shape_offset(shape, affine, new)
    new[:3, 3] = offset
    m = np.linalg.solve(affine, new)
    scale, shift = np.diag(m)[:3].copy(), m[:3, 3].copy()
    off = m[:3, :3] - np.diag(scale)
    if np.abs(off).max() > 1e-6 * np.abs(scale).max():
        raise ValueError("the model grid is not a scaling of the input grid")
    return tuple(int(n) for n in out_shape), scale, shift


def downsample(x: torch.Tensor, positions: list[torch.Tensor]) -> torch.Tensor:
    """Trilinear samples of (C, X, Y, Z) at the grid of per-axis positions (input voxel units, border padding).

    ``grid_sample`` reads only the eight neighbours of each output point, so the cost follows the (small) output.
    """
    import torch.nn.functional as F

    n = x.shape[1:]
    norm = [2.0 * p.to(torch.float32) / max(1, m - 1) - 1.0 for p, m in zip(positions, n, strict=True)]
    gx, gy, gz = torch.meshgrid(*norm, indexing="ij")
    grid = torch.stack((gz, gy, gx), dim=-1)[None].to(x.device)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=True)[0]


def _argmax0(t: torch.Tensor) -> torch.Tensor:
    """argmax over the first (class) axis as uint8, first maximum on ties, with contiguous per-class passes."""
    best = t[0].clone()
    idx = torch.zeros(t.shape[1:], dtype=torch.uint8, device=t.device)
    for c in range(1, t.shape[0]):
        better = t[c] > best
        idx[better] = c
        torch.maximum(best, t[c], out=best)
    return idx


def back_to_input(
    probs: torch.Tensor,
    scale: np.ndarray,
    shift: np.ndarray,
    out_shape: tuple[int, int, int],
    chunk: int,
    want_probs: bool = False,
) -> torch.Tensor:
    """The model-grid probabilities (C, X', Y', Z') on every input voxel (input voxel v sits at model coordinate
    (v - shift) / scale), slab by slab along Z: labels (X, Y, Z) uint8, or the probabilities (C, X, Y, Z).

    Each slab is blended along Z at the model's in-plane size, then upsampled in-plane by ``grid_sample`` (four
    reads per output pixel); labels come out without a full-resolution probability volume.
    """
    import torch.nn.functional as F

    dev, dt = probs.device, probs.dtype
    c, xs, ys, zs = probs.shape
    px, py, pz = (
        (torch.arange(m, device=dev, dtype=torch.float64) - float(b)) / float(a)
        for m, a, b in zip(out_shape, scale, shift, strict=True)
    )
    # grid_sample's normalised coordinates (align_corners=True): -1 is index 0, +1 the last index; beyond: border.
    gx = (2.0 * px / max(1, xs - 1) - 1.0).to(dt)
    gy = (2.0 * py / max(1, ys - 1) - 1.0).to(dt)
    # (1, X, Y, 2) with [..., 0] indexing Y' (grid_sample's width) and [..., 1] indexing X' (its height).
    plane_grid = torch.stack(torch.meshgrid(gy, gx, indexing="xy"), dim=-1)[None]
    pz = pz.clamp(0, zs - 1)
    lo = pz.floor().long().clamp(max=zs - 1)
    hi = (lo + 1).clamp(max=zs - 1)
    w = (pz - lo.to(pz.dtype)).to(dt)
    planes = probs.permute(3, 0, 1, 2)  # (Z', C, X', Y')
    if want_probs:
        out = torch.empty((c, *out_shape), dtype=dt, device=dev)
    else:
        out = torch.empty((out_shape[2], out_shape[0], out_shape[1]), dtype=torch.uint8, device=dev)
    for k0 in range(0, out_shape[2], chunk):
        k1 = min(out_shape[2], k0 + chunk)
        # Along Z first, at the model's in-plane size (cheap), then in-plane to every input pixel: the two linear
        # steps commute, so this is trilinear interpolation.
        a = planes.index_select(0, lo[k0:k1])
        b = planes.index_select(0, hi[k0:k1])
        zb = a + (b - a) * w[k0:k1].view(-1, 1, 1, 1)  # (K, C, X', Y')
        slab = F.grid_sample(
            zb, plane_grid.expand(zb.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True
        )  # (K, C, X, Y)
        if want_probs:
            out[..., k0:k1] = slab.permute(1, 2, 3, 0)
        else:
            out[k0:k1] = _argmax0(slab.transpose(0, 1))
    return out if want_probs else out.permute(1, 2, 0)


def _largest_component(labels: np.ndarray, values: list[int]) -> np.ndarray:
    """Keep only the largest face-connected component of each given label (in place; others become 0)."""
    from scipy import ndimage

    for v in values:
        mask = labels == v
        boxes = ndimage.find_objects(mask.astype(np.uint8))
        if not boxes or boxes[0] is None:
            continue
        box = boxes[0]
        sub = mask[box]
        comp, n = ndimage.label(sub)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            region = labels[box]
            region[sub & (comp != sizes.argmax())] = 0
    return labels


class FastEngine:
    """Segments 3D volumes with a volseg bundle's network and recipe.

    Args:
        recipe: the bundle's recipe (preprocessing, inferer and postprocessing settings).
        network: the inference network, weights loaded, on ``device``, in eval mode.
        device: where to compute.
    """

    def __init__(self, recipe: Any, network: torch.nn.Module, device: torch.device) -> None:
        from volseg.recipe import CTIntensity

        if recipe.model.spatial_dims != 3:
            raise ValueError("the fast engine handles 3D recipes")
        self.recipe = recipe
        self.network = network
        self.device = device
        self.ct = isinstance(recipe.data.intensity, CTIntensity)
        self.keep = [recipe.data.labels[n].value for n in recipe.infer.postprocess.largest_component]

    def _orient(self, arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reorient (flip and permute axes, no resampling) to the recipe's axis codes, as MONAI's Orientation does.

        Returns the reoriented view, the orientation transform and the view's affine.
        """
        import nibabel.orientations as nio

        current = nio.io_orientation(affine)
        wanted = nio.axcodes2ornt(tuple(self.recipe.data.orientation))
        ornt = nio.ornt_transform(current, wanted)
        view = arr
        for axis, flip in enumerate(ornt[:, 1]):
            if flip == -1:
                view = np.flip(view, axis=axis)
        perm = [int(i) for i in np.argsort(ornt[:, 0])]
        view = np.transpose(view, perm + list(range(3, arr.ndim)))
        view_affine = affine @ nio.inv_ornt_aff(ornt, arr.shape[:3])
        return view, ornt, view_affine

    @staticmethod
    def _unorient(labels: np.ndarray, ornt: np.ndarray) -> np.ndarray:
        """Undo :meth:`_orient` on a 3D array."""
        inv = np.asarray(ornt[:, 0], dtype=int)  # new axis j holds original axis order
        out = np.transpose(labels, [int(i) for i in inv])
        for axis, flip in enumerate(ornt[:, 1]):
            if flip == -1:
                out = np.flip(out, axis=axis)
        return np.ascontiguousarray(out)

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        inten = self.recipe.data.intensity
        if self.ct:
            return ((x - inten.a_min) / (inten.a_max - inten.a_min)).clamp_(0.0, 1.0)
        out = x.clone()
        for c in range(x.shape[0]):
            sel = x[c] != 0 if inten.nonzero else torch.ones_like(x[c], dtype=torch.bool)
            if sel.any():
                vals = x[c][sel]
                std = vals.std(unbiased=False)
                out[c][sel] = (vals - vals.mean()) / (std if std > 0 else 1.0)
        return out

    def segment(self, arr: np.ndarray, affine: np.ndarray, probabilities: bool = False) -> tuple[np.ndarray, Any]:
        """Labels (uint8, the input array's layout) for a 3D (or 3D + channels) array with its affine."""
        from monai.inferers import sliding_window_inference

        r = self.recipe
        view, ornt, view_affine = self._orient(arr, affine)
        spatial = view.shape[:3]
        model_shape, scale, shift = model_grid(spatial, view_affine, tuple(r.data.spacing))
        dev = self.device
        # Sample the model grid straight from the stored array: model voxel j of view axis p sits at view index
        # scale * j + shift, i.e. on stored axis perm[p], counted from the far end when that axis is flipped.
        perm = [int(i) for i in np.argsort(ornt[:, 0])]
        pos: list[torch.Tensor] = [torch.empty(0)] * 3
        for p_axis, q_axis in enumerate(perm):
            u = torch.arange(model_shape[p_axis], dtype=torch.float64) * float(scale[p_axis]) + float(shift[p_axis])
            pos[q_axis] = (arr.shape[q_axis] - 1 - u) if ornt[q_axis, 1] == -1 else u
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        x = x[None] if x.ndim == 3 else x.permute(3, 0, 1, 2)
        raw_small = downsample(x.to(dev), pos).permute(0, *[1 + q for q in perm]).contiguous()
        del x
        fg: torch.Tensor | None
        if self.ct:
            img = self._intensity(raw_small)
            fg = img.amax(dim=0) > 0
        else:
            fg = raw_small.amax(dim=0) > 0 if r.data.crop_foreground else None
            img = self._intensity(raw_small)
        del raw_small
        lo, hi = [0, 0, 0], list(model_shape)
        if r.data.crop_foreground and fg is not None and bool(fg.any()):
            idx = [torch.nonzero(fg.any(dim=tuple(d for d in range(3) if d != a))).flatten() for a in range(3)]
            lo = [int(i[0]) for i in idx]
            hi = [int(i[-1]) + 1 for i in idx]
        crop = img[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        use_amp = dev.type == "cuda"
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp):
            logits = sliding_window_inference(
                crop[None],
                roi_size=list(r.roi_size),
                sw_batch_size=r.infer.sw_batch_size,
                predictor=self.network,
                overlap=r.infer.overlap,
                mode=r.infer.blend,
                padding_mode=r.infer.padding_mode,
            )
        if isinstance(logits, (tuple, list)):
            logits = logits[-1]
        probs_crop = torch.softmax(logits[0].float(), dim=0)
        n = probs_crop.shape[0]
        # Outside the foreground crop every class gets 0, as MONAI's inverse of the crop pads (argmax: background).
        probs = torch.zeros((n, *model_shape), dtype=torch.float32, device=dev)
        probs[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = probs_crop
        del probs_crop, logits, img, crop
        full_probs = None
        chunk = max(1, min(64, int(2**24 // max(1, n * spatial[0] * spatial[1]))))
        if probabilities:
            full_probs = back_to_input(probs, scale, shift, spatial, chunk, want_probs=True).cpu().numpy()
            labels_t = torch.from_numpy(full_probs.argmax(axis=0).astype(np.uint8))
        else:
            labels_t = back_to_input(probs, scale, shift, spatial, chunk)
        labels = labels_t.cpu().numpy()
        if self.keep:
            labels = _largest_component(labels, self.keep)
        out = self._unorient(labels, ornt)
        if full_probs is not None:
            full_probs = np.stack([self._unorient(p, ornt) for p in full_probs])
            full_probs[0] += np.clip(1.0 - full_probs.sum(axis=0), 0, 1)
        return out, full_probs


def probability_budget_ok(shape: tuple[int, ...], n_classes: int, limit_bytes: float = 8e9) -> bool:
    """Whether full-resolution float32 probabilities fit the budget."""
    return n_classes * math.prod(shape) * 4 < limit_bytes
