"""Deterministic synthetic abdominal CT phantoms, written in the Medical Segmentation Decathlon layout.

The anatomy is defined analytically in a patient frame measured in millimetres (x toward the patient's Right,
y Anterior, z Superior, i.e. nibabel's RAS+ convention, where x increases from the patient's left to right).
The patient frame is placed in world (scanner) space by a small random rotation about the superior axis and a
random translation; a voxel grid (spacing, axis order, orientation, optional oblique tilt) is then chosen
independently and the anatomy is sampled at the voxel centres. The orientation and the spacing therefore change
the array layout only, never the anatomy: the same seed under ``axcodes="RAS"`` and ``axcodes="LPS"`` gives
label arrays that are flips of each other.

What a phantom contains (each value and shape varies with the seed):

* air outside an elliptical body; subcutaneous fat, an abdominal muscle wall, paraspinal and psoas muscles,
  visceral fat;
* a spine (vertebral bodies with discs, spinal canal, posterior arch) and ribs, bone 400-700 HU;
* aorta, inferior vena cava, kidneys with renal sinus, pancreas, stomach with an air-fluid level, bowel loops
  (enhancing wall, 0-40 HU content, some with gas), gallbladder, lung bases and the bottom of the heart;
* a spleen at 100-110 HU, deliberately within the liver's range so that no HU window separates the two;
* the liver (label 1, 95-115 HU): a smooth union of four ellipsoids under a random low-frequency deformation,
  upper right, with brighter intrahepatic vessels (labelled liver) and a gentle perfusion gradient;
* 0-3 tumours (label 2): ellipsoids of 5-20 mm radius at least 5 mm inside the liver, 10-25 HU darker than the
  liver and always less contrast than the noise standard deviation.

The intensity image is blurred by a Gaussian partial-volume model before noise is added: in-plane the variance
is that of a 1 mm FWHM point spread function plus the voxel's own box profile; along the slice axis the FWHM
equals the slice spacing (slice thickness = spacing). The noise is Gaussian, 15-25 HU standard deviation, and
slightly correlated in-plane like reconstructed CT noise; a slow HU drift of up to about 10 HU over the body
stands for residual cupping. Labels stay crisp: they are the tissue at each voxel centre.

Difficulty, measured on demo seeds 0-99: the best single HU window (exhaustive at 1 HU) reaches a liver Dice of
0.59-0.79 (median 0.70); after a 1-voxel Gaussian smoothing, 0.69-0.82 (median 0.77).

Sizes: ``size="demo"`` covers the whole body in-plane (rectangular field of view, body plus 8-25 mm) and the
liver plus 5-25 mm above and below (140-220 mm in z). The in-plane matrix is at most 320, so the drawn
0.6-1.0 mm in-plane spacing is coarsened to fit the body: in practice 1.0-1.25 mm. At most 72 slices are
kept, so the drawn 1-5 mm slice spacing is raised where it would give more: in practice 2.2-5 mm, median 3.3.
A demo case has 2-6 million voxels and takes about 0.3 s to make. ``size="full"`` uses a square 512 x 512
matrix (0.6-1.0 mm, raised where the body would not fit) and the drawn slice spacing, and reaches 100-250 mm
below the liver and 30-60 mm above it (up to about 90 million voxels, 15 s and 1.5 GB of memory).

Random streams are separate for the anatomy, the grid and the noise, so overriding the grid (spacing, axcodes,
shape, oblique tilt) never changes the anatomy of a seed.

Varieties. Everything above describes ``variety="hard"``, the default of :func:`liver_ct_phantom` and the
phantoms of earlier versions (kept byte for byte). ``variety="clinical"``, the default of :func:`write_dataset`,
draws the scan and the patient over the ranges of clinical CT instead (its own random streams; the organ shapes
of a seed are those of the hard variety, scaled to the drawn patient size):

* field of view: liver only (liver +- 5-25 mm, 20%), abdomen (dome + 20-50 mm to the iliac crest, 30%),
  abdomen-pelvis (to below the pubis, 30%) or chest-abdomen-pelvis (lung apex to below the pubis, 20%); z extent
  at most 600 mm (about 160-600 mm); square in-plane field of view 250-500 mm (the body plus 10-90 mm, so wide
  patients are cut at the sides); the patient 0-30 mm off the scanner's centre in x and y; the voxel axes
  tilted 1-5 degrees in 40% of cases (``oblique_deg`` unless given); coarse pelvic
  landmarks (iliac wings, sacrum, femoral heads and necks, pubic rami, bladder, gluteal muscles) and a sternum,
  and ribs up to the lung apex;
* patient scale 0.8-1.3 (body 240-440 mm wide), subcutaneous fat 5-50 mm;
* contrast phase: non-contrast (15%), arterial (20%), portal venous (45%) or delayed (20%), liver 60-140 HU
  over the phases, spleen, intrahepatic vessels, aorta, IVC, heart, kidneys, pancreas and bowel wall set for the
  phase (relative to the liver where physiology ties them to it);
* noise SD 8-30 HU; slice spacing 0.6-5 mm (``size="full"``: 512 x 512 matrix, so 0.49-0.98 mm in-plane);
* 0-8 lesions per liver, 5-60 mm across (log-uniform, equivalent diameter), at least 2 mm inside the liver;
  lesion minus liver: 15-70 HU darker (80%), 2-10 HU darker (faint, 12%) or 15-60 HU brighter (8%); over
  30 mm, half have a necrotic core 10-30 HU darker still (labelled tumour too). ``info["tumours"]`` lists each
  lesion's centre, radii, ``diameter_mm`` and ``contrast_hu`` (liver minus lesion: negative when brighter).

``size="demo"`` keeps the drawn field of view and coarsens the voxels (at most 192 x 192 in-plane and 128
slices: 1.3-2.6 mm in-plane, 1.3-4.7 mm slices), so demo cases of a long scan have slices without liver;
``size="full"`` uses the drawn slice spacing, up to 512 x 512 x 1000 voxels. The clinical variety is sampled,
blurred and given noise slab by slab: its memory is the int16 image and uint8 label (3 bytes a voxel, 0.8 GB
for 512 x 512 x 1000) plus one slab. :func:`liver_ct_geometry` gives the grid and the drawn parameters of a
phantom without making its voxels.

``volseg.data.synth_torso`` is a second, independently built family (other shapes, organs and intensity
model) for held-out evaluation only.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from volseg.data.synth_base import LABELS, Phantom, case_seed, write_msd_cases
from volseg.data.synth_liver_anatomy import (
    _CLINICAL_DEMO_MATRIX,
    _CLINICAL_DEMO_SLICES,
    _CLINICAL_FOV_MM,
    _CLINICAL_SLICE_MM,
    _FOV_KINDS,
    _ILIAC_CREST_Z,
    _LUNG_APEX_ABOVE_DOME,
    _MAX_Z_EXTENT_MM,
    _PUBIS_Z,
    _Anatomy,
    _build_anatomy,
    _pick,
)
from volseg.data.synth_shapes import _axis_rotation, _GridCanvas, _rotation
from volseg.errors import UserError
from volseg.fileio import write_text_atomic

_ORIENTATIONS = ("RAS", "LPS", "LAS", "LPI", "RPS", "SLP", "IRA", "PSL")
_AXES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
_DEMO_MAX_MATRIX = 320
_DEMO_MAX_SLICES = 72
_FULL_MATRIX = 512
_SLAB_VOXELS = 4_000_000


# ----------------------------------------------------------------------------------------------------------
# The grid.
# ----------------------------------------------------------------------------------------------------------


def _parse_axcodes(axcodes: str) -> list[tuple[int, float]]:
    codes = str(axcodes).upper()
    parsed = [_AXES.get(c) for c in codes]
    if len(codes) != 3 or None in parsed or len({p[0] for p in parsed if p}) != 3:
        raise UserError(
            f"axcodes {axcodes!r} must be three letters naming each of R/L, A/P and S/I once, e.g. 'RAS' or 'LPS'"
        )
    return [p for p in parsed if p is not None]


def _check_triple(name: str, value: Sequence[float], integer: bool) -> tuple[float, float, float]:
    values = tuple(value)
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"{name} must be three positive numbers, got {value!r}")
    if integer and not all(float(v).is_integer() for v in values):
        raise UserError(f"{name} must be three positive integers, got {value!r}")
    return values  # type: ignore[return-value]


def _voxel_grid(
    need: np.ndarray,
    axes: list[tuple[int, float]],
    spacing: Sequence[float] | None,
    shape: Sequence[int] | None,
    inplane: float,
    thick: float,
) -> tuple[np.ndarray, np.ndarray, int, list[int]]:
    """Voxel size and matrix covering ``need`` (mm along world x, y, z) on the voxel ``axes``: from the given
    ``spacing`` or ``shape``, else ``inplane`` and ``thick``. Returns (spacing, dims, slice axis, in-plane axes)."""
    world_axis = [w for w, _ in axes]
    slice_axis = world_axis.index(2)
    inplane_axes = [a for a in range(3) if a != slice_axis]
    if spacing is not None:
        sp = np.array(_check_triple("spacing", spacing, integer=False), dtype=float)
    elif shape is not None:
        n = _check_triple("shape", shape, integer=True)
        sp = np.empty(3)
        sp[inplane_axes] = max(need[world_axis[a]] / n[a] for a in inplane_axes)
        sp[slice_axis] = need[2] / n[slice_axis]
    else:
        sp = np.empty(3)
        sp[inplane_axes], sp[slice_axis] = inplane, thick
    if shape is not None:
        dims = np.array(_check_triple("shape", shape, integer=True), dtype=int)
    else:
        dims = np.array([math.ceil(need[world_axis[a]] / sp[a] - 1e-6) for a in range(3)])
    return sp, dims, slice_axis, inplane_axes


def _grid(
    anatomy: _Anatomy,
    rng: np.random.Generator,
    size: str,
    spacing: Sequence[float] | None,
    axcodes: str | None,
    shape: Sequence[int] | None,
    oblique_deg: float,
) -> tuple[np.ndarray, tuple[int, int, int], str, float]:
    """Voxel -> world affine, array shape, axcodes and slice spacing of the scan of ``anatomy``."""
    u = rng.uniform
    inplane0, slice0 = u(0.6, 1.0), u(1.0, 5.0)
    code0 = _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
    margin_xy = u(8, 25)
    margins_demo = (u(5, 25), u(5, 25))
    margins_full = (u(100, 250), u(30, 60))
    codes = str(axcodes).upper() if axcodes is not None else code0
    axes = _parse_axcodes(codes)

    yaw = math.radians(anatomy.yaw)
    half_x = math.hypot(anatomy.half_x * math.cos(yaw), anatomy.half_y * math.sin(yaw)) + margin_xy
    half_y = math.hypot(anatomy.half_x * math.sin(yaw), anatomy.half_y * math.cos(yaw)) + margin_xy
    below, above = margins_demo if size == "demo" else margins_full
    z0, z1 = anatomy.liver_z[0] - below, anatomy.liver_z[1] + above
    if size == "full":
        half_x = half_y = max(half_x, half_y)
    need = np.array([2 * half_x, 2 * half_y, z1 - z0])
    inplane, thick = inplane0, slice0
    if size == "demo":
        inplane = max(inplane, max(need[0], need[1]) / _DEMO_MAX_MATRIX)
        thick = max(thick, need[2] / _DEMO_MAX_SLICES)
    else:
        inplane = max(inplane, need[0] / _FULL_MATRIX)
    sp, dims, slice_axis, inplane_axes = _voxel_grid(need, axes, spacing, shape, inplane, thick)
    if shape is None and size == "full" and spacing is None:
        dims[inplane_axes] = _FULL_MATRIX

    pose = _rotation(0, 0, anatomy.yaw)
    center = anatomy.position + pose @ np.array([0.0, 0.0, 0.5 * (z0 + z1)])
    affine = _affine(axes, sp, dims, oblique_deg, center)
    return affine, (int(dims[0]), int(dims[1]), int(dims[2])), codes, float(sp[slice_axis])


def _affine(
    axes: list[tuple[int, float]], sp: np.ndarray, dims: np.ndarray, oblique_deg: float, center: np.ndarray
) -> np.ndarray:
    """Voxel -> world affine with the field-of-view centre at ``center`` (float32-exact values)."""
    direction = np.zeros((3, 3))
    for a, (w, sign) in enumerate(axes):
        direction[w, a] = sign
    direction = _axis_rotation((1.0, 1.0, 1.0), oblique_deg) @ direction
    affine = np.eye(4)
    affine[:3, :3] = direction * sp
    affine[:3, 3] = center - affine[:3, :3] @ ((dims - 1) / 2.0)
    return affine.astype(np.float32).astype(np.float64)  # what a NIfTI header stores, exactly


def _clinical_z_range(rng: np.random.Generator, kind: str, liver_z: tuple[float, float], s: float):
    """Scan range along z (patient frame, mm) of a clinical field of view of ``kind``."""
    u = rng.uniform
    bottom, top = liver_z
    if kind == "liver":
        z0, z1 = bottom - u(5, 25), top + u(5, 25)
    elif kind == "abdomen":
        z0, z1 = _ILIAC_CREST_Z * s - u(0, 40), top + u(20, 50)
    elif kind == "abdomen-pelvis":
        z0, z1 = _PUBIS_Z * s - u(10, 40), top + u(20, 50)
    else:
        z0, z1 = _PUBIS_Z * s - u(10, 40), top + _LUNG_APEX_ABOVE_DOME * s + u(0, 30)
    return z0, min(z1, z0 + _MAX_Z_EXTENT_MM)


def _grid_clinical(
    anatomy: _Anatomy,
    rng: np.random.Generator,
    size: str,
    spacing: Sequence[float] | None,
    axcodes: str | None,
    shape: Sequence[int] | None,
    oblique_deg: float,
) -> tuple[np.ndarray, tuple[int, int, int], str, float, dict[str, object]]:
    """The clinical variety's grid: drawn field of view (kind, z range, square in-plane FOV, table offset).

    ``size="full"``: a 512 x 512 matrix over a 250-500 mm field of view and the drawn 0.6-5 mm slices.
    ``size="demo"``: the same field of view with coarser voxels (at most 192 x 192 x 128), so that a demo case
    still holds the slices without liver of a long scan. ``spacing`` and ``shape`` override as in :func:`_grid`.
    """
    u = rng.uniform
    kind = _pick(rng, _FOV_KINDS)
    s = float(anatomy.info["patient_scale"])  # type: ignore[arg-type]
    z0, z1 = _clinical_z_range(rng, kind, anatomy.liver_z, s)
    yaw = math.radians(anatomy.yaw)
    body = 2 * max(
        math.hypot(anatomy.half_x * math.cos(yaw), anatomy.half_y * math.sin(yaw)),
        math.hypot(anatomy.half_x * math.sin(yaw), anatomy.half_y * math.cos(yaw)),
    )
    fov = float(np.clip(body + u(10, 90), *_CLINICAL_FOV_MM))
    table = np.array([u(-30, 30), u(-30, 30), 0.0])  # patient off the scanner's centre
    thick0 = u(*_CLINICAL_SLICE_MM)
    code0 = _ORIENTATIONS[int(rng.integers(len(_ORIENTATIONS)))]
    codes = str(axcodes).upper() if axcodes is not None else code0
    axes = _parse_axcodes(codes)
    need = np.array([fov, fov, z1 - z0])
    inplane, thick = fov / _FULL_MATRIX, thick0
    if size == "demo":
        inplane = max(inplane, fov / _CLINICAL_DEMO_MATRIX)
        thick = max(thick, need[2] / _CLINICAL_DEMO_SLICES)
    sp, dims, slice_axis, inplane_axes = _voxel_grid(need, axes, spacing, shape, inplane, thick)

    pose = _rotation(0, 0, anatomy.yaw)
    center = anatomy.position + pose @ np.array([0.0, 0.0, 0.5 * (z0 + z1)]) + table
    affine = _affine(axes, sp, dims, oblique_deg, center)
    fov_info: dict[str, object] = {
        "fov_kind": kind,
        "fov_mm": [round(float(v), 1) for v in need],
        "scan_z_mm": [round(float(z0), 1), round(float(z1), 1)],
        "table_offset_mm": [round(float(v), 1) for v in table[:2]],
    }
    return affine, (int(dims[0]), int(dims[1]), int(dims[2])), codes, float(sp[slice_axis]), fov_info


def _gaussian_noise_gain(sigmas: Sequence[float], truncate: float) -> float:
    """Standard deviation of white unit noise after ``scipy.ndimage.gaussian_filter`` (away from the edges)."""
    gain = 1.0
    for sigma in sigmas:
        if sigma <= 0:
            continue
        radius = int(truncate * float(sigma) + 0.5)
        x = np.arange(-radius, radius + 1, dtype=float)
        w = np.exp(-0.5 * (x / float(sigma)) ** 2)
        w /= w.sum()
        gain *= math.sqrt(float((w * w).sum()))
    return gain


def _render_slabbed(
    anatomy: _Anatomy,
    affine: np.ndarray,
    dims: tuple[int, int, int],
    blur: Sequence[float],
    corr: Sequence[float],
    noise_rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample, blur and add noise slab by slab along array axis 0; memory: the int16/uint8 outputs plus a slab.

    Each slab is sampled with a halo of rows on both sides, wide enough for both Gaussian filters, so the result
    equals filtering the whole volume (up to the edges of the array). The noise is drawn row by row in order from
    one stream, so slabs join without seams.
    """
    truncate = 3.0
    pose = np.eye(4)
    pose[:3, :3] = _rotation(0, 0, anatomy.yaw)
    pose[:3, 3] = anatomy.position
    to_patient = np.linalg.inv(pose) @ affine
    n0, n1, n2 = dims
    halo = max(int(truncate * float(blur[0]) + 0.5), int(truncate * float(corr[0]) + 0.5)) + 1
    step = max(4 * halo, _SLAB_VOXELS // max(1, n1 * n2))
    gain = _gaussian_noise_gain(corr, truncate)
    scale = np.float32(anatomy.noise_sd / max(gain, 1e-6))
    image = np.empty(dims, dtype=np.int16)
    label = np.empty(dims, dtype=np.uint8)
    raw = np.empty((0, n1, n2), dtype=np.float32)  # noise rows [raw_start, raw_start + len(raw)) drawn so far
    raw_start = 0
    noise_modes = ["nearest", "wrap", "wrap"]
    for i0 in range(0, n0, step):
        i1 = min(n0, i0 + step)
        e0, e1 = max(0, i0 - halo), min(n0, i1 + halo)
        canvas = _GridCanvas(to_patient, (e0, 0, 0), (e1, n1, n2))
        for op in anatomy.ops:
            canvas.apply(op)
        core = slice(i0 - e0, i1 - e0)
        label[i0:i1] = canvas.label[core]
        slab = ndimage.gaussian_filter(canvas.hu, sigma=blur, truncate=truncate, mode="nearest")
        del canvas
        drawn = raw_start + len(raw)
        if e1 > drawn:
            raw = np.concatenate([raw, noise_rng.standard_normal((e1 - drawn, n1, n2), dtype=np.float32)])
        raw = raw[e0 - raw_start :]
        raw_start = e0
        noise = ndimage.gaussian_filter(raw[: e1 - e0], sigma=corr, truncate=truncate, mode=noise_modes)
        slab += noise * scale
        np.rint(slab, out=slab)
        np.clip(slab, -1024, 3071, out=slab)
        image[i0:i1] = slab[core]
    return image, label


def _sample(anatomy: _Anatomy, affine: np.ndarray, dims: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """HU and label of every voxel centre, painted in slabs to bound memory."""
    pose = np.eye(4)
    pose[:3, :3] = _rotation(0, 0, anatomy.yaw)
    pose[:3, 3] = anatomy.position
    to_patient = np.linalg.inv(pose) @ affine
    hu = np.empty(dims, dtype=np.float32)
    label = np.empty(dims, dtype=np.uint8)
    step = max(1, _SLAB_VOXELS // max(1, dims[1] * dims[2]))
    for i0 in range(0, dims[0], step):
        i1 = min(dims[0], i0 + step)
        canvas = _GridCanvas(to_patient, (i0, 0, 0), (i1, dims[1], dims[2]))
        for op in anatomy.ops:
            canvas.apply(op)
        hu[i0:i1], label[i0:i1] = canvas.hu, canvas.label
    return hu, label


VARIETIES = ("clinical", "hard")
"""Phantom varieties of the liver CT task: ``"clinical"`` (ranges of clinical CT) and ``"hard"`` (the original)."""


@dataclass
class PhantomGeometry:
    """The grid of a phantom and what was drawn for it, without its voxels.

    Attributes:
        affine: 4x4 voxel -> RAS+ world matrix, as :attr:`Phantom.affine`.
        shape: Array shape.
        info: What was drawn (as :attr:`Phantom.info`, tumours included).
    """

    affine: np.ndarray
    shape: tuple[int, int, int]
    info: dict[str, object] = field(default_factory=dict)


def _check_phantom_args(seed: int, size: str, variety: str, oblique_deg: float | None) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if size not in ("demo", "full"):
        raise UserError(f"size must be 'demo' or 'full', got {size!r}")
    if variety not in VARIETIES:
        raise UserError(f"variety must be one of {', '.join(VARIETIES)}, got {variety!r}")
    if oblique_deg is not None and not np.isfinite(oblique_deg):
        raise UserError(f"oblique_deg must be a finite number of degrees, got {oblique_deg!r}")


def _plan_phantom(
    seed: int,
    size: str,
    variety: str,
    spacing: Sequence[float] | None,
    axcodes: str | None,
    shape: Sequence[int] | None,
    oblique_deg: float | None,
) -> tuple[_Anatomy, np.ndarray, tuple[int, int, int], str, float, dict[str, object]]:
    """Anatomy and grid of a phantom (everything but the voxels)."""
    _check_phantom_args(seed, size, variety, oblique_deg)
    if oblique_deg is None:  # hard: axis-aligned; clinical: 60% axis-aligned, else a 1-5 degree tilt
        tilt = np.random.default_rng([int(seed), 6])
        drawn = float(tilt.uniform(1.0, 5.0) * tilt.choice((-1.0, 1.0)))
        oblique_deg = drawn if variety == "clinical" and tilt.random() < 0.4 else 0.0
    if variety == "hard":
        anatomy = _build_anatomy(np.random.default_rng([int(seed), 1]))
        affine, dims, codes, thickness = _grid(
            anatomy, np.random.default_rng([int(seed), 2]), size, spacing, axcodes, shape, oblique_deg
        )
        fov_info: dict[str, object] = {}
    else:
        anatomy = _build_anatomy(np.random.default_rng([int(seed), 1]), np.random.default_rng([int(seed), 4]))
        affine, dims, codes, thickness, fov_info = _grid_clinical(
            anatomy, np.random.default_rng([int(seed), 5]), size, spacing, axcodes, shape, oblique_deg
        )
    info = dict(anatomy.info)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    info.update(
        seed=int(seed),
        size=size,
        variety=variety,
        axcodes=codes,
        spacing=[round(float(z), 4) for z in zooms],
        shape=list(dims),
        oblique_deg=float(oblique_deg),
        **fov_info,
    )
    return anatomy, affine, dims, codes, thickness, info


def liver_ct_geometry(
    seed: int,
    *,
    size: str = "demo",
    variety: str = "hard",
    spacing: tuple[float, float, float] | None = None,
    axcodes: str | None = None,
    shape: tuple[int, int, int] | None = None,
    oblique_deg: float | None = None,
) -> PhantomGeometry:
    """The grid and drawn parameters of ``liver_ct_phantom`` with the same arguments, without making the voxels.

    Cheap (about 0.1-0.2 s): the anatomy is defined analytically and only a few thousand points are probed to
    place the tumours. See :func:`liver_ct_phantom` for the arguments.
    """
    _, affine, dims, _, _, info = _plan_phantom(seed, size, variety, spacing, axcodes, shape, oblique_deg)
    return PhantomGeometry(affine=affine, shape=dims, info=info)


def liver_ct_phantom(
    seed: int,
    *,
    size: str = "demo",
    variety: str = "hard",
    spacing: tuple[float, float, float] | None = None,
    axcodes: str | None = None,
    shape: tuple[int, int, int] | None = None,
    oblique_deg: float | None = None,
) -> Phantom:
    """Make one synthetic contrast-enhanced abdominal CT with liver and liver-tumour labels.

    The anatomy depends on ``seed`` (and ``variety``) only; the grid arguments change how it is sampled, never
    what it is.

    Args:
        seed: Non-negative integer; the same seed and arguments give byte-identical arrays.
        size: ``"demo"`` (small matrices for a CPU) or ``"full"`` (512 x 512 slices). For the hard variety the
            demo size covers the liver plus a margin in z (matrix <= 320 x 320 x 72); for the clinical variety it
            keeps the drawn field of view and coarsens the voxels (matrix <= 192 x 192 x 128).
        variety: ``"hard"`` (the default here; the original phantoms: liver-sized fields of view, faint lesions,
            see the module notes) or ``"clinical"`` (fields of view from liver-only to chest-abdomen-pelvis,
            contrast phases, LiTS-like lesions; see the module notes).
        spacing: Voxel size in mm along each array axis (i, j, k), as in the NIfTI zooms. Default: drawn,
            0.6-1.0 mm in-plane and 1-5 mm between slices (clinical: the field of view over 512 pixels and
            0.6-5 mm), coarsened to respect the demo matrix limits.
        axcodes: Direction each array axis points to, nibabel style (``"RAS"``, ``"LPS"``, ``"SLP"``...).
            Default: drawn from RAS, LPS, LAS, LPI, RPS, SLP, IRA, PSL.
        shape: Array shape. Without ``spacing``, the spacing is chosen so that the field of view still covers
            the body in-plane (square pixels) and the liver plus its margin in z (clinical: the drawn field of
            view). With ``spacing`` too, the field of view is ``shape * spacing`` centred on the usual centre,
            and may cut the body.
        oblique_deg: Rotation of the voxel axes about the world axis (1, 1, 1) around the field-of-view centre
            (all three axes tilt). Default: 0 for the hard variety; for the clinical variety 0 (60% of seeds) or
            a drawn 1-5 degrees either way. ``nibabel.aff2axcodes`` still returns ``axcodes`` below about 30 degrees.

    Returns:
        The phantom: int16 HU image, uint8 label (0 background, 1 liver, 2 tumour) and the voxel -> RAS+ affine.

    Raises:
        UserError: A negative seed, an unknown size or variety, or malformed spacing/axcodes/shape.
    """
    anatomy, affine, dims, codes, thickness, info = _plan_phantom(
        seed, size, variety, spacing, axcodes, shape, oblique_deg
    )
    # Partial volume: Gaussian PSF (1 mm FWHM) plus voxel box in-plane; slice profile FWHM = slice spacing.
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    slice_axis = [_AXES[c][0] for c in codes].index(2)
    fwhm = 2.0 * math.sqrt(2.0 * math.log(2.0))
    sigma = [math.sqrt((1.0 / fwhm) ** 2 + z**2 / 12.0) / z for z in zooms]
    sigma[slice_axis] = thickness / fwhm / float(zooms[slice_axis])
    # Noise, correlated in-plane over about 0.7 mm, scaled to the drawn standard deviation.
    noise_rng = np.random.default_rng([int(seed), 3])
    corr = [0.7 / float(z) for z in zooms]
    corr[slice_axis] = 0.0
    if variety == "clinical":
        image16, label = _render_slabbed(anatomy, affine, dims, sigma, corr, noise_rng)
        return Phantom(image=image16, label=label, affine=affine, info=info)

    hu, label = _sample(anatomy, affine, dims)
    image = ndimage.gaussian_filter(hu, sigma=sigma, truncate=3.0, mode="nearest")
    noise = noise_rng.standard_normal(dims, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, sigma=corr, truncate=3.0, mode="wrap")
    noise *= np.float32(anatomy.noise_sd / max(float(noise.std()), 1e-6))
    image += noise
    np.rint(image, out=image)
    np.clip(image, -1024, 3071, out=image)
    return Phantom(image=image.astype(np.int16), label=label, affine=affine, info=info)


# ----------------------------------------------------------------------------------------------------------
# Writing a dataset.
# ----------------------------------------------------------------------------------------------------------

LIVER_PREFIX = "liver"
"""File prefix of the liver CT cases."""


def write_liver_dataset(
    root: Path,
    task: str,
    n: int,
    seed: int,
    size: str,
    n_test: int,
    variety: str,
    spacing: tuple[float, float, float] | None = None,
) -> Path:
    """The ``liver_ct`` task of :func:`volseg.data.synth.write_dataset` (NIfTI files; arguments checked there).

    Cases ``0 .. n-1`` go to ``imagesTr``/``labelsTr`` and cases ``n .. n+n_test-1`` to ``imagesTs`` with their
    labels in ``labelsTs``, named ``liver_XXX.nii.gz``; case ``i`` is
    ``liver_ct_phantom(case_seed(seed, i), size=size, variety=variety, spacing=spacing)`` (``spacing``: the same
    voxel size for every case, None to draw it). ``dataset.json`` is written last.
    """
    prefix = LIVER_PREFIX

    def make(index: int) -> Phantom:
        return liver_ct_phantom(case_seed(seed, index), size=size, variety=variety, spacing=spacing)

    training, test = write_msd_cases(root, prefix, n, n_test, make)

    dataset = {
        "name": f"Synthetic{task.title().replace('_', '')}",
        "description": "Synthetic contrast-enhanced abdominal CT phantoms (liver, liver tumours) from volseg",
        "reference": "volseg.data.synth (generated, not patient data)",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": n,
        "numTest": n_test,
        "training": training,
        "test": test,
        "synthetic": {
            "generator": "volseg.data.synth.liver_ct_phantom",
            "seed": int(seed),
            "size": size,
            "variety": variety,
            **({"spacing": [float(v) for v in spacing]} if spacing is not None else {}),
        },
    }
    return write_text_atomic(root / "dataset.json", json.dumps(dataset, indent=2) + "\n")


def best_window_dice(image: np.ndarray, mask: np.ndarray) -> tuple[float, int, int]:
    """Best Dice any single HU window ``lo <= image <= hi`` reaches against ``mask`` (exhaustive, 1 HU steps).

    Args:
        image: Integer HU image.
        mask: Boolean target mask, same shape.

    Returns:
        (best Dice, lo, hi).
    """
    values = np.asarray(image).astype(np.int64).ravel()
    target = np.asarray(mask, dtype=bool).ravel()
    n_target = int(target.sum())
    if n_target == 0:
        return 0.0, 0, 0
    vmin, vmax = int(values[target].min()), int(values[target].max())
    inside = (values >= vmin) & (values <= vmax)
    bins = vmax - vmin + 1
    all_hist = np.bincount(values[inside] - vmin, minlength=bins)
    hit_hist = np.bincount(values[target] - vmin, minlength=bins)
    all_cum = np.concatenate([[0], np.cumsum(all_hist)])
    hit_cum = np.concatenate([[0], np.cumsum(hit_hist)])
    lo, hi = np.meshgrid(np.arange(bins), np.arange(bins), indexing="ij")
    valid = hi >= lo
    tp = hit_cum[hi + 1] - hit_cum[lo]
    predicted = all_cum[hi + 1] - all_cum[lo]
    dice = np.zeros(tp.shape)
    np.divide(2.0 * tp, n_target + predicted, out=dice, where=valid)
    best = np.unravel_index(int(np.argmax(dice)), dice.shape)
    return float(dice[best]), int(best[0]) + vmin, int(best[1]) + vmin
