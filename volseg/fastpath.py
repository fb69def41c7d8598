"""volseg's fast inference engine for 3D volumes.

It computes what the bundle's MONAI chain computes (orient, resample to the recipe's spacing, intensity, crop to
the foreground, sliding window, softmax, back to the input grid, argmax, largest component) with less work:

- the input is read once (:func:`volseg.imageio.read_image`; NIfTI's gzip through ISA-L when ``isal`` is
  installed) and never copied at full resolution more than needed;
- reorientation is an axis permutation and flips of the array (no resampling), the spacing change is a separable
  linear interpolation whose inverse maps the same field of view back;
- the way back to the input grid is done slab by slab: probabilities are upsampled in-plane for a few source slices
  at a time, interpolated along the slice axis and turned into labels at once, so no full-resolution float
  probability volume is ever held (unless probabilities are asked for);
- on a GPU every step runs there; the network runs in bfloat16 autocast on GPUs and on CPUs with native
  bfloat16 (``infer.precision``, default ``auto``; ``fp32`` for exact float32).

The resampling convention is that of ``torch.nn.functional.interpolate(..., align_corners=False)``: the model grid
covers the same field of view as the input grid, so going there and back is exact in geometry.

Recipes it runs: 3D, any of the CT window, MR z-score and percentile intensities, with or without a target
spacing and orientation (:func:`unsupported_reason` says why it cannot run one). Non-finite input voxels are
replaced as :func:`volseg.data.validate.replace_non_finite` says, and the replacement is reported in
:attr:`FastEngine.notes`; :attr:`FastEngine.engine_notes` holds :func:`monai_drift_warning` when the installed MONAI
is not one the engine was checked against (:data:`TESTED_MONAI`).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
import re
import sys
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from volseg.bundle_scripts.mirroring import mirrored  # noqa: F401 - the engines' test-time mirroring
from volseg.data.validate import replace_non_finite
from volseg.engines import Segmentation
from volseg.errors import UserError
from volseg.imageio import Image
from volseg.runtime import use_bf16

TESTED_MONAI = ("1.5", "1.7")
"""MONAI releases the fast engine was checked against: ``>= TESTED_MONAI[0]`` and ``< TESTED_MONAI[1]``.

The engine re-implements MONAI's ``Spacing`` grid, ``Orientation``, intensity transforms, sliding-window blending
and UNet; ``tests/test_monai_drift.py`` and ``tests/test_fastpath.py`` compare them with MONAI's own, and passed
with MONAI 1.5.1 and 1.6.1. Outside this range they have not been run: widen it only after running them there.
"""


def _release(version: str) -> tuple[int, ...]:
    """The leading numeric release of a version string: ``1.6.1`` -> (1, 6, 1), ``1.7.0rc1`` -> (1, 7, 0)."""
    parts: list[int] = []
    for piece in version.split("."):
        m = re.match(r"\d+", piece)
        if m is None:
            break
        parts.append(int(m.group()))
        if m.end() < len(piece):
            break
    return tuple(parts)


def monai_drift_warning(version: str | None = None) -> str | None:
    """A one-line warning when the installed MONAI (or ``version``) is outside :data:`TESTED_MONAI`, else None.

    The version is read from the package metadata (``importlib.metadata``): MONAI is not imported. None when MONAI
    is not installed (there is no chain to drift from).
    """
    if version is None:
        try:
            version = importlib.metadata.version("monai")
        except importlib.metadata.PackageNotFoundError:
            return None
    lo, hi = TESTED_MONAI
    if _release(lo) <= _release(version) < _release(hi):
        return None
    return (
        f"warning: MONAI {version} is installed, but the fast engine was checked against MONAI >={lo},<{hi} (it "
        "re-implements MONAI's resampling grid, sliding window and UNet); compare with --engine monai before relying "
        "on it"
    )


def unsupported_reason(recipe: Any) -> str | None:
    """Why :class:`FastEngine` cannot run a recipe, in words; None when it can.

    The engine runs 3D recipes with a CT window, MR z-score or percentile intensity, with or without
    ``data.spacing`` (null: no resampling) and ``data.orientation`` (null: the stored axes), any ``infer`` setting.
    """
    from volseg.recipe import CTIntensity, MRIntensity, PercentileIntensity

    if recipe.model.spatial_dims != 3:
        return f"the fast engine runs 3D recipes; this one is {recipe.model.spatial_dims}D"
    intensity = recipe.data.intensity
    if not isinstance(intensity, (CTIntensity, MRIntensity, PercentileIntensity)):
        return f"the fast engine has no {type(intensity).__name__} intensity step"
    return None


AFFINE_ATOL = 1e-8


def model_grid(
    shape: tuple[int, ...], affine: np.ndarray, target: tuple[float, ...]
) -> tuple[tuple[int, ...], np.ndarray, np.ndarray]:
    """MONAI ``Spacing``'s output grid (``diagonal=False``, ``scale_extent=False``) for an image already in the
    target orientation, computed without MONAI.

    The grid keeps the input's direction cosines (the orthogonal factor of the affine's 3 x 3 part, shear dropped)
    with the target spacing; it is sized to span the centres of the input's corner voxels (rounded), and placed at
    the input corner that comes first along every output axis, or centred on the input when no corner does
    (oblique grids). For the resulting grid, model voxel ``j`` sits at input voxel ``scale * j + shift`` (per
    axis). Returns (shape, scale, shift).
    """
    a = np.asarray(affine, dtype=np.float64)
    d = len(shape)
    rzs = a[:d, :d]
    # The orthogonal factor exactly as MONAI's zoom_affine computes it (Cholesky): another factorisation (QR) gives
    # the same matrix to 1e-16, which is enough to round an oblique extent of exactly n + 0.5 voxels the other way.
    try:
        rotation = rzs @ np.linalg.inv(np.linalg.cholesky(rzs.T @ rzs).T)
    except np.linalg.LinAlgError:
        raise ValueError("the input's affine is singular") from None
    spacing = np.abs(np.asarray(target, dtype=np.float64))
    spacing[spacing == 0] = 1.0
    new = np.eye(d + 1)
    new[:d, :d] = rotation * spacing
    # The input's corner voxel centres, in output voxel units (output origin at the world origin for now).
    ranges = [(0.0, n - 1.0) for n in shape]
    corners = np.stack(np.meshgrid(*ranges, indexing="ij")).reshape(d, -1)
    corners_h = np.vstack([corners, np.ones((1, corners.shape[1]))])
    # Input voxel -> output voxel first, then the corners: this order (MONAI's) decides how extents of exactly
    # n + 0.5 voxels round (to even), e.g. 200 slices of 2.5 mm resampled to 5 mm give 100 slices, not 101.
    out_pts = (np.linalg.solve(new, a) @ corners_h)[:d]
    out_shape = np.round(np.ptp(out_pts, axis=1) + 1.0)
    world = (a @ corners_h)[:d]
    offset = None
    for i in range(corners.shape[1]):
        if np.all(np.abs(np.min(out_pts - out_pts[:, i : i + 1], axis=1)) <= AFFINE_ATOL):
            offset = world[:, i]
            break
    if offset is None:
        offset = rzs @ (np.asarray(shape, dtype=np.float64) / 2.0) + a[:d, d] - new[:d, :d] @ (out_shape / 2.0)
    new[:d, d] = offset
    m = np.linalg.solve(a, new)
    scale, shift = np.diag(m)[:d].copy(), m[:d, d].copy()
    off = m[:d, :d] - np.diag(scale)
    if np.abs(off).max() > 1e-6 * np.abs(scale).max():
        raise ValueError("the model grid is not a scaling of the input grid")
    return tuple(int(n) for n in out_shape), scale, shift


def percentile(x: torch.Tensor, q: float) -> torch.Tensor:
    """The ``q``-th percentile (linear interpolation) of all values of ``x``, computed as MONAI's ``percentile``
    does: NumPy for more than a million values, ``torch.quantile`` otherwise."""
    if x.numel() > 1_000_000:
        value = np.percentile(x.detach().cpu().numpy(), q)
        return torch.as_tensor(value, dtype=x.dtype, device=x.device)
    return torch.quantile(x, torch.tensor(q / 100.0, dtype=x.dtype, device=x.device))


def scale_percentiles(x: torch.Tensor, lower: float, upper: float, clip: bool) -> torch.Tensor:
    """Each channel of (C, *spatial) mapped linearly from its own [lower, upper] percentiles to [0, 1] (clamped
    with ``clip``), as MONAI's ``ScaleIntensityRangePercentiles(b_min=0, b_max=1, channel_wise=True)``: a channel
    whose two percentiles are equal is only shifted (by the lower one), and not clamped."""
    out = torch.empty_like(x)
    for c in range(x.shape[0]):
        a_min, a_max = percentile(x[c], lower), percentile(x[c], upper)
        if bool(a_max - a_min == 0):
            out[c] = x[c] - a_min
            continue
        out[c] = (x[c] - a_min) / (a_max - a_min)
        if clip:
            out[c].clamp_(0.0, 1.0)
    return out


def importance_map(roi: tuple[int, ...], mode: str, device: torch.device) -> torch.Tensor:
    """Window weights for blending: ones (``constant``), or a separable Gaussian centred on the window with
    sigma = 0.125 x its size per axis (``gaussian``), floored at its smallest value (at least 1e-3) so that no
    voxel gets zero weight. The same weights as MONAI's ``compute_importance_map`` defaults."""
    if mode == "constant":
        return torch.ones(roi, dtype=torch.float32, device=device)
    if mode != "gaussian":
        raise ValueError(f"unknown blending mode '{mode}' (constant or gaussian)")
    w = torch.ones((), dtype=torch.float32, device=device)
    for n in roi:
        x = torch.arange(n, dtype=torch.float32, device=device) - (n - 1) / 2.0
        g = torch.exp(-(x**2) / (2.0 * (0.125 * n) ** 2))
        w = w[..., None] * g
    return w.clamp_(min=max(float(w.min()), 1e-3))


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Window start indices along one axis: steps of ``int(roi * (1 - overlap))`` (at least 1; one window when
    the axis is exactly the window), the last window shifted back to end at the border."""
    step = roi if roi == size else max(1, int(roi * (1.0 - overlap)))
    starts = []
    i = 0
    while True:
        starts.append(min(i * step, size - roi))
        if i * step + roi >= size:
            return starts
        i += 1


def sliding_window(
    x: torch.Tensor,
    roi: tuple[int, ...],
    sw_batch_size: int,
    predictor: Any,
    overlap: float,
    mode: str = "gaussian",
    padding_mode: str = "constant",
) -> torch.Tensor:
    """Patch-based inference over a (1, C, *spatial) tensor: windows of ``roi`` with ``overlap``, run
    ``sw_batch_size`` at a time, blended with :func:`importance_map` weights into float32 (1, K, *spatial).

    Axes shorter than the window are padded symmetrically (``constant`` zeros or ``reflect``) and cropped back. A
    predictor returning several outputs (deep supervision) contributes its last one. The windows, weights and
    padding are those of MONAI's ``sliding_window_inference``, so the two agree to float rounding.
    """
    import torch.nn.functional as F

    spatial = tuple(int(n) for n in x.shape[2:])
    roi = tuple(int(r) for r in roi)
    pads = [max(r - n, 0) for r, n in zip(roi, spatial, strict=True)]
    if any(pads):
        flat: list[int] = []
        for p in reversed(pads):  # F.pad wants the last axis first
            flat += [p // 2, p - p // 2]
        x = F.pad(x, flat, mode=padding_mode)
    size = tuple(int(n) for n in x.shape[2:])
    axes = [window_starts(n, r, overlap) for n, r in zip(size, roi, strict=True)]
    corners = [tuple(int(v) for v in c) for c in np.stack(np.meshgrid(*axes, indexing="ij")).reshape(len(roi), -1).T]
    weights = importance_map(roi, mode, x.device)
    out: torch.Tensor | None = None
    count = torch.zeros(size, dtype=torch.float32, device=x.device)
    for b0 in range(0, len(corners), sw_batch_size):
        batch = corners[b0 : b0 + sw_batch_size]
        windows: list[tuple[Any, ...]] = [
            (0, slice(None), *(slice(c, c + r) for c, r in zip(corner, roi, strict=True))) for corner in batch
        ]
        pred = predictor(torch.cat([x[w][None] for w in windows]))
        if isinstance(pred, (tuple, list)):
            pred = pred[-1]
        pred = pred.float()
        if out is None:
            out = torch.zeros((1, pred.shape[1], *size), dtype=torch.float32, device=x.device)
        for k, w in enumerate(windows):
            out[w] += pred[k] * weights
            count[w[2:]] += weights
    assert out is not None
    out /= count
    if any(pads):
        out = out[(slice(None), slice(None), *(slice(p // 2, p // 2 + n) for p, n in zip(pads, spatial, strict=True)))]
    return out


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


def downsample_slabs(
    x: torch.Tensor, positions: list[torch.Tensor], device: torch.device, max_slab_bytes: float
) -> torch.Tensor:
    """:func:`downsample` for an input kept in host memory: slabs along the last axis, each holding the input
    slices that one group of output slices reads, go to ``device`` one at a time (at most ``max_slab_bytes``)."""
    n = x.shape[-1]
    pz = positions[2].clamp(0, n - 1)
    per_slice = max(1, x[..., :1].numel() * 4)
    max_slices = max(2, int(max_slab_bytes // per_slice))
    step = float((pz[1] - pz[0]).abs()) if len(pz) > 1 else 1.0
    group = max(1, int((max_slices - 2) / max(step, 1e-9)) + 1)
    parts = []
    for k in range(0, len(pz), group):
        sel = pz[k : k + group]
        lo = int(math.floor(float(sel.min())))
        hi = min(n - 1, int(math.floor(float(sel.max()))) + 1)
        slab = x[..., lo : hi + 1].to(device, torch.float32)
        parts.append(downsample(slab, [positions[0], positions[1], positions[2][k : k + group] - lo]))
    return torch.cat(parts, dim=3)


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
    out_device: torch.device | None = None,
) -> torch.Tensor:
    """The model-grid probabilities (C, X', Y', Z') on every input voxel (input voxel v sits at model coordinate
    (v - shift) / scale), slab by slab along Z: labels (X, Y, Z) uint8, or the probabilities (C, X, Y, Z).

    Each slab is blended along Z at the model's in-plane size, then upsampled in-plane by ``grid_sample`` (four
    reads per output pixel); labels come out without a full-resolution probability volume.
    """
    import torch.nn.functional as F

    dev, dt = probs.device, probs.dtype
    c, xs, ys, zs = probs.shape
    home = out_device or dev  # where the result is assembled (host memory keeps the device's use bounded)
    start = [-float(b) for b in shift]
    if all(float(a) == 1.0 for a in scale) and all(
        s == round(s) and 0 <= s and s + m <= n for s, m, n in zip(start, out_shape, (xs, ys, zs), strict=True)
    ):
        # The same grid (no resampling, data.spacing null): a crop of the model grid, no interpolation.
        sub = probs[(slice(None), *(slice(int(s), int(s) + m) for s, m in zip(start, out_shape, strict=True)))]
        if want_probs:
            return sub.to(home, copy=True)
        labels = torch.empty((out_shape[2], out_shape[1], out_shape[0]), dtype=torch.uint8, device=home)
        labels.permute(2, 1, 0).copy_(_argmax0(sub))
        return labels.permute(2, 1, 0)
    px, py, pz = (
        (torch.arange(m, device=dev, dtype=torch.float64) - float(b)) / float(a)
        for m, a, b in zip(out_shape, scale, shift, strict=True)
    )
    # grid_sample's normalised coordinates (align_corners=True): -1 is index 0, +1 the last index; beyond: border.
    gx = (2.0 * px / max(1, xs - 1) - 1.0).to(dt)
    gy = (2.0 * py / max(1, ys - 1) - 1.0).to(dt)
    # (1, Y, X, 2) with [..., 0] indexing Y' (grid_sample's width) and [..., 1] indexing X' (its height): slabs
    # come out as (K, C, Y, X), so labels stacked along Z are a Fortran-ordered (X, Y, Z) array, NIfTI's layout.
    plane_grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij"), dim=-1)[None]
    pz = pz.clamp(0, zs - 1)
    lo = pz.floor().long().clamp(max=zs - 1)
    hi = (lo + 1).clamp(max=zs - 1)
    w = (pz - lo.to(pz.dtype)).to(dt)
    planes = probs.permute(3, 0, 1, 2)  # (Z', C, X', Y')
    if want_probs:
        out = torch.empty((c, *out_shape), dtype=dt, device=home)
    else:
        out = torch.empty((out_shape[2], out_shape[1], out_shape[0]), dtype=torch.uint8, device=home)
    for k0 in range(0, out_shape[2], chunk):
        k1 = min(out_shape[2], k0 + chunk)
        # Along Z first, at the model's in-plane size (cheap), then in-plane to every input pixel: the two linear
        # steps commute, so this is trilinear interpolation.
        a = planes.index_select(0, lo[k0:k1])
        b = planes.index_select(0, hi[k0:k1])
        zb = a + (b - a) * w[k0:k1].view(-1, 1, 1, 1)  # (K, C, X', Y')
        slab = F.grid_sample(
            zb, plane_grid.expand(zb.shape[0], -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True
        )  # (K, C, Y, X)
        if want_probs:
            out[..., k0:k1] = slab.permute(1, 3, 2, 0).to(home)
        else:
            out[k0:k1] = _argmax0(slab.transpose(0, 1)).to(home)
    return out if want_probs else out.permute(2, 1, 0)


def _largest_component(labels: np.ndarray, values: list[int], box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Keep only the largest face-connected component of each given label (in place; others become 0).

    ``box``: a region known to hold every voxel of these labels (the work is done there only).
    """
    from scipy import ndimage

    region = labels if box is None else labels[box]
    for v in values:
        mask = region == v
        comp, n = ndimage.label(mask)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            region[mask & (comp != sizes.argmax())] = 0
    return labels


@dataclass(frozen=True)
class ModelGrid:
    """Where the network sees an image: the recipe's orientation and spacing applied to the input grid.

    Attributes:
        ornt: nibabel orientation transform from the stored axes to the recipe's (identity without one).
        perm: view axis p is stored axis ``perm[p]``.
        spatial: the input's spatial shape in view axis order.
        shape: the model grid's shape.
        scale, shift: model voxel ``j`` sits at view voxel ``scale * j + shift`` (per axis).
        view_affine: the reoriented input's voxel-to-world affine.
    """

    ornt: np.ndarray
    perm: list[int]
    spatial: tuple[int, int, int]
    shape: tuple[int, ...]
    scale: np.ndarray
    shift: np.ndarray
    view_affine: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        """The model grid's voxel-to-world affine (what MONAI's ``Spacingd`` gives the resampled image)."""
        m = np.eye(4)
        m[:3, :3] = np.diag(self.scale)
        m[:3, 3] = self.shift
        return self.view_affine @ m


class FastEngine:
    """Segments 3D volumes with a volseg bundle's network and recipe (an engine of :mod:`volseg.engines`).

    :meth:`segment` runs three stages: the model grid (:meth:`to_model_grid`), the network
    (:meth:`model_probabilities`, whose :meth:`run_network` is where fold ensembles, test-time mirroring and
    other backends plug in) and the input grid (:meth:`to_input_grid`).

    Args:
        recipe: the bundle's recipe (preprocessing, inferer and postprocessing settings); one that
            :func:`unsupported_reason` refuses raises ValueError.
        network: the inference network (or any module or callable mapping a batch to logits: a fold ensemble, an
            ONNX session), weights loaded, on ``device``, in eval mode.
        device: where to compute.

    Attributes:
        engine_notes: lines about the engine as a whole, to tell once (:func:`monai_drift_warning`).
        notes: what the last :meth:`segment` call has to tell about its input (non-finite voxels replaced), one
            line each.
    """

    def __init__(
        self, recipe: Any, network: torch.nn.Module, device: torch.device, precision: str | None = None
    ) -> None:
        from volseg.recipe import CTIntensity, PercentileIntensity

        reason = unsupported_reason(recipe)
        if reason is not None:
            raise ValueError(reason)
        self.name = "fast"
        self.recipe = recipe
        self.network = network
        self.device = device
        self.ct = isinstance(recipe.data.intensity, CTIntensity)
        self.percentiles = isinstance(recipe.data.intensity, PercentileIntensity)
        drift = monai_drift_warning()
        self.engine_notes: list[str] = [drift] if drift else []
        self.notes: list[str] = []
        self.keep = [recipe.data.labels[n].value for n in recipe.infer.postprocess.largest_component]
        bias = recipe.label_bias_list()
        #: ``infer.label_bias`` by class (None: a plain argmax). Interpolation is linear, so scaling the model-grid
        #: probabilities by it before the way back gives the labels of the MONAI chain, which scales after it.
        self.bias = None if bias is None else torch.tensor(bias, dtype=torch.float32)
        self.plan = "whole"
        self.slab_bytes = 256 * 2**20
        self.force_plan: str | None = None  # "whole" or "slabs" (tests); None: chosen from free GPU memory
        self.precision = precision or recipe.infer.precision
        self.bf16 = use_bf16(self.precision, device)
        if self.keep and "scipy.ndimage" not in sys.modules:
            # Importing scipy.ndimage takes about 0.4 s; let it happen while the image is read and segmented.
            threading.Thread(target=importlib.import_module, args=("scipy.ndimage",), daemon=True).start()

    def _plan(self, input_values: int, input_voxels: int, model_voxels: int) -> str:
        """``whole``: the input goes to the device at once and labels are assembled there (fastest); ``slabs``:
        the input stays in host memory and goes to the device a slab at a time, labels are assembled in host
        memory, so the device holds the model grid and one slab, whatever the input's size.

        On CUDA, ``whole`` when the input, the labels and the model-grid arrays need less than half of the free
        memory (``torch.cuda.mem_get_info``); on the CPU there is nothing to bound.
        """
        if self.force_plan is not None:
            return self.force_plan
        if self.device.type != "cuda":
            return "whole"
        n = self.recipe.num_classes
        need = 4 * input_values + input_voxels + 4 * model_voxels * (2 + 3 * n) + 8 * 2**20 * n
        free, _ = torch.cuda.mem_get_info(self.device)
        return "whole" if need < 0.5 * free else "slabs"

    def _orient(self, arr: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Reorient (flip and permute axes, no resampling) to the recipe's axis codes, as MONAI's Orientation does.

        Returns the reoriented view, the orientation transform and the view's affine. Without a recipe orientation
        (null), the stored axes are kept.
        """
        import nibabel.orientations as nio

        if self.recipe.data.orientation is None:
            return arr, np.array([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]), np.asarray(affine, dtype=np.float64)
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
        """Undo :meth:`_orient` on a 3D array; the result is Fortran-ordered (NIfTI's layout, written by a copy)."""
        inv = np.asarray(ornt[:, 0], dtype=int)  # new axis j holds original axis order
        out = np.transpose(labels, [int(i) for i in inv])
        for axis, flip in enumerate(ornt[:, 1]):
            if flip == -1:
                out = np.flip(out, axis=axis)
        return np.asfortranarray(out)

    def _intensity(self, x: torch.Tensor) -> torch.Tensor:
        inten = self.recipe.data.intensity
        if self.ct:
            return ((x - inten.a_min) / (inten.a_max - inten.a_min)).clamp_(0.0, 1.0)
        if self.percentiles:
            return scale_percentiles(x, inten.percentile[0], inten.percentile[1], inten.clip)
        out = x.clone()
        for c in range(x.shape[0]):
            sel = x[c] != 0 if inten.nonzero else torch.ones_like(x[c], dtype=torch.bool)
            if sel.any():
                vals = x[c][sel]
                std = vals.std(unbiased=False)
                out[c][sel] = (vals - vals.mean()) / (std if std > 0 else 1.0)
        return out

    def to_model_grid(self, arr: np.ndarray, affine: np.ndarray) -> tuple[torch.Tensor, ModelGrid]:
        """The image on the model grid, (C, *model shape) float32 on the device, before intensity and cropping: what
        MONAI's ``Orientationd`` and ``Spacingd`` give. Non-finite voxels are replaced first (noted in :attr:`notes`).
        """
        r = self.recipe
        view, ornt, view_affine = self._orient(arr, affine)
        spatial = (int(view.shape[0]), int(view.shape[1]), int(view.shape[2]))
        model_shape: tuple[int, ...] = spatial
        if r.data.spacing is None:  # no resampling: the model grid is the (reoriented) input grid
            scale, shift = np.ones(3), np.zeros(3)
        else:
            model_shape, scale, shift = model_grid(spatial, view_affine, tuple(r.data.spacing))
        perm = [int(i) for i in np.argsort(ornt[:, 0])]
        grid = ModelGrid(ornt, perm, spatial, model_shape, scale, shift, view_affine)
        dev = self.device
        # Sample the model grid straight from the stored array: model voxel j of view axis p sits at view index
        # scale * j + shift, i.e. on stored axis perm[p], counted from the far end when that axis is flipped.
        pos: list[torch.Tensor] = [torch.empty(0)] * 3
        for p_axis, q_axis in enumerate(grid.perm):
            u = torch.arange(model_shape[p_axis], dtype=torch.float64) * float(scale[p_axis]) + float(shift[p_axis])
            pos[q_axis] = (arr.shape[q_axis] - 1 - u) if ornt[q_axis, 1] == -1 else u
        x = torch.from_numpy(np.asarray(arr, dtype=np.float32))
        x = x[None] if x.ndim == 3 else x.permute(3, 0, 1, 2)
        x, note = replace_non_finite(x)
        if note:
            self.notes.append(note)
        self.plan = self._plan(x.numel(), int(np.prod(spatial)), int(np.prod(model_shape)))
        if r.data.spacing is None:
            flips = [1 + q for q in range(3) if ornt[q, 1] == -1]
            raw = (x.flip(flips) if flips else x).to(dev)
        elif self.plan == "whole":
            raw = downsample(x.to(dev), pos)
        else:
            raw = downsample_slabs(x, pos, dev, self.slab_bytes)
        return raw.permute(0, *[1 + q for q in grid.perm]).contiguous(), grid

    @staticmethod
    def supports(recipe: Any) -> str | None:
        """Why this engine cannot run ``recipe`` (:func:`unsupported_reason`), or None."""
        return unsupported_reason(recipe)

    def segment(self, image: Image, probabilities: bool = False) -> Segmentation:
        """Labels (uint8, the input array's layout) and, when asked, probabilities on the input grid of a 3D image
        (3D, or 3D with channels last). Non-finite voxels are replaced first (the image is not changed); the notes
        say so."""
        arr = image.array
        want = self.recipe.model.in_channels
        channels = arr.shape[3] if arr.ndim == 4 else 1
        if arr.ndim not in (3, 4) or channels != want:
            raise UserError(f"expected a 3D image with {want} channel(s), got shape {arr.shape}", image.path)
        labels, probs = self.segment_array(arr, image.affine, probabilities)
        return Segmentation(labels, probs, list(self.notes))

    def segment_array(
        self, arr: np.ndarray, affine: np.ndarray, probabilities: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """:meth:`segment` for an array and its affine: (labels, probabilities or None); :attr:`notes` is reset.

        The three stages: :meth:`to_model_grid` (orientation and spacing), :meth:`model_probabilities`
        (intensity, foreground crop, the network stage :meth:`run_network`, softmax) and :meth:`to_input_grid`.
        """
        self.notes = []
        raw_small, grid = self.to_model_grid(arr, affine)
        probs, _ = self.model_probabilities(raw_small)
        del raw_small
        return self.to_input_grid(probs, grid, tuple(arr.shape[:3]), probabilities)

    def model_probabilities(self, raw: torch.Tensor) -> tuple[torch.Tensor, tuple[list[int], list[int]]]:
        """Class probabilities (K, *model shape) on the model grid for the image there, before intensity; zero for
        every class outside the foreground crop (as MONAI's inverse of the crop pads). Also returns the crop box."""
        r = self.recipe
        model_shape = tuple(int(n) for n in raw.shape[1:])
        fg: torch.Tensor | None
        if self.ct:  # window first, then crop to the body (air is 0 after windowing)
            img = self._intensity(raw)
            fg = img.amax(dim=0) > 0
        else:  # crop on the raw image, then normalise the crop (MONAI's chain: CropForegroundd, then intensity)
            fg = raw.amax(dim=0) > 0 if r.data.crop_foreground else None
            img = raw
        lo, hi = [0, 0, 0], list(model_shape)
        if r.data.crop_foreground and fg is not None and bool(fg.any()):
            idx = [torch.nonzero(fg.any(dim=tuple(d for d in range(3) if d != a))).flatten() for a in range(3)]
            lo = [int(i[0]) for i in idx]
            hi = [int(i[-1]) + 1 for i in idx]
        crop = img[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        if not self.ct:
            crop = self._intensity(crop)
        del img, fg
        probs_crop = torch.softmax(self.run_network(crop).float(), dim=0)
        n = probs_crop.shape[0]
        probs = torch.zeros((n, *model_shape), dtype=torch.float32, device=self.device)
        probs[:, lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = probs_crop
        return probs, (lo, hi)

    def network_stage(self) -> Any:
        """The batch predictor the sliding window runs: (B, C, *roi) -> logits. The network (a fold ensemble
        :func:`volseg.folds.ensembled`, or the ONNX network of :mod:`volseg.onnx_engine`, both built by the
        Predictor) under test-time mirroring (:func:`mirrored`, ``infer.tta_flips``)."""
        return mirrored(self.network, self.recipe.infer.tta_flips)

    def run_network(self, crop: torch.Tensor) -> torch.Tensor:
        """The network stage: logits (K, *spatial) for a preprocessed (C, *spatial) image on the model grid, by the
        recipe's sliding window over :meth:`network_stage`, with ``infer.mirror_border`` voxels of mirrored context
        (the overlap-tile strategy) added around it and removed after."""
        import torch.nn.functional as F

        r = self.recipe
        border = int(r.infer.mirror_border)
        if border:
            crop = F.pad(crop[None], [border] * 6, mode="reflect")[0]
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = sliding_window(
                crop[None],
                tuple(r.roi_size),
                r.infer.sw_batch_size,
                self.network_stage(),
                r.infer.overlap,
                r.infer.blend,
                r.infer.padding_mode,
            )
        if border:
            logits = logits[..., border:-border, border:-border, border:-border]
        return logits[0]

    def to_input_grid(
        self, probs: torch.Tensor, grid: ModelGrid, input_shape: tuple[int, ...], probabilities: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Model-grid probabilities back on the input grid, in the stored axis order: labels (uint8, the largest
        component kept for ``infer.postprocess.largest_component``) and, with ``probabilities``, the probabilities
        (K, *input shape), float32."""
        ornt, perm, spatial = grid.ornt, grid.perm, grid.spatial
        scale, shift = grid.scale, grid.shift
        n = probs.shape[0]
        full_probs = None
        box: tuple[slice, ...] | None = None
        if probabilities:
            chunk = max(1, min(64, int(2**24 // max(1, n * spatial[0] * spatial[1]))))
            host = torch.device("cpu")
            full_probs = back_to_input(probs, scale, shift, spatial, chunk, True, host).numpy()
            scores = full_probs if self.bias is None else full_probs * self.bias.numpy()[:, None, None, None]
            labels_t = torch.from_numpy(scores.argmax(axis=0).astype(np.uint8))
            del scores
        else:
            home = torch.device("cpu") if self.plan == "slabs" else None
            if self.bias is not None:
                probs = probs * self.bias.to(probs.device).view(-1, *([1] * (probs.ndim - 1)))
            labels_t, box = self._labels_on_input(probs, scale, shift, spatial, home)
        del probs
        out = self._unorient(labels_t.cpu().numpy(), ornt)
        if self.keep:  # in the input's layout (face connectivity does not see orientation)
            stored_box = None
            if box is not None:  # the foreground box, from view axes to stored axes
                stored = [slice(0, 0)] * 3
                for p_axis, q_axis in enumerate(perm):
                    b, n_q = box[p_axis], input_shape[q_axis]
                    stored[q_axis] = slice(n_q - b.stop, n_q - b.start) if ornt[q_axis, 1] == -1 else b
                stored_box = tuple(stored)
            out = _largest_component(out, self.keep, stored_box)
        if full_probs is not None:
            full_probs = np.stack([self._unorient(p, ornt) for p in full_probs])
            full_probs[0] += np.clip(1.0 - full_probs.sum(axis=0), 0, 1)
        return out, full_probs

    @staticmethod
    def _labels_on_input(
        probs: torch.Tensor,
        scale: np.ndarray,
        shift: np.ndarray,
        spatial: tuple[int, ...],
        out_device: torch.device | None = None,
    ) -> tuple[torch.Tensor, tuple[slice, ...]]:
        """Labels on the input grid, computed only inside the box that can hold foreground (returned too).

        Interpolation is a convex combination: where background wins at all eight model voxels around an input
        voxel, it wins there too. So input voxels farther than one model voxel from every model voxel where a
        foreground class beats background are background, and only the box around those (one model voxel of
        margin, plus one for rounding) is resampled. The result equals resampling everything.
        """
        n = probs.shape[0]
        home = out_device or probs.device
        labels = torch.zeros(tuple(spatial[::-1]), dtype=torch.uint8, device=home).permute(2, 1, 0)
        empty = (slice(0, 0),) * 3
        fg = (probs[1:] > probs[:1]).any(dim=0)
        if not bool(fg.any()):
            return labels, empty
        lo, hi, box = [], [], []
        for axis in range(3):
            idx = torch.nonzero(fg.any(dim=tuple(d for d in range(3) if d != axis))).flatten()
            a, b = int(idx[0]) - 2, int(idx[-1]) + 2
            v0 = max(0, math.ceil(float(scale[axis]) * a + float(shift[axis])))
            v1 = min(spatial[axis] - 1, math.floor(float(scale[axis]) * b + float(shift[axis])))
            if v1 < v0:
                return labels, empty
            lo.append(v0)
            hi.append(v1 + 1)
            box.append(slice(v0, v1 + 1))
        sub = (hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2])
        chunk = max(1, min(64, int(2**24 // max(1, n * sub[0] * sub[1]))))
        labels[tuple(box)] = back_to_input(
            probs, scale, shift - np.asarray(lo, dtype=np.float64), sub, chunk, out_device=home
        )
        return labels, tuple(box)
