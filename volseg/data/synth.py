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
import numpy.typing as npt
from scipy import ndimage

from volseg.errors import UserError
from volseg.fileio import atomic_path, write_text_atomic

__all__ = [
    "TASKS",
    "CellImage",
    "Phantom",
    "best_window_dice",
    "case_seed",
    "cells_image",
    "VARIETIES",
    "PhantomGeometry",
    "liver_ct_geometry",
    "liver_ct_phantom",
    "write_dataset",
]

TASKS: dict[str, str] = {"liver_ct": "liver", "cells": "cell"}
"""Known synthetic tasks: task name -> file prefix of its cases."""

LABELS: dict[str, str] = {"0": "background", "1": "liver", "2": "tumour"}

_ORIENTATIONS = ("RAS", "LPS", "LAS", "LPI", "RPS", "SLP", "IRA", "PSL")
_AXES = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
_DEMO_MAX_MATRIX = 320
_DEMO_MAX_SLICES = 72
_FULL_MATRIX = 512
_SLAB_VOXELS = 4_000_000
_TUMOUR_MARGIN_MM = 5.0
_INF = math.inf


@dataclass
class Phantom:
    """One synthetic CT case.

    Attributes:
        image: int16 Hounsfield units, array axes (i, j, k) as stored in the NIfTI file.
        label: uint8, 0 background, 1 liver, 2 tumour; same shape as ``image``.
        affine: 4x4 float64 voxel -> world matrix, world in RAS+ millimetres (nibabel convention). Its values
            are exactly representable in float32, so it survives a round trip through a NIfTI header.
        info: What was drawn for this case (spacing, axcodes, noise SD, tumour count, HU values, ...).
    """

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    info: dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Shapes in the patient frame. Each has an axis-aligned bounding box (lo, hi; may be infinite) and an
# ``inside`` test on coordinate arrays that may be broadcastable rather than full (the grid passes 1-D
# broadcast coordinates when its axes are aligned with the patient axes).
# ----------------------------------------------------------------------------------------------------------


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx from angles in degrees."""
    ax, ay, az = np.radians([rx, ry, rz])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rot_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rot_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rot_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rot_z @ rot_y @ rot_x


def _axis_rotation(axis: npt.ArrayLike, deg: float) -> np.ndarray:
    """Rotation by ``deg`` degrees about the unit vector along ``axis`` (Rodrigues' formula)."""
    n = np.asarray(axis, dtype=float)
    n = n / np.linalg.norm(n)
    k = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    a = math.radians(deg)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


def _full_shape(*arrays: np.ndarray) -> tuple[int, ...]:
    return np.broadcast_shapes(*(np.shape(a) for a in arrays))


class _Shape:
    """A region of the patient frame with an axis-aligned bounding box."""

    lo: np.ndarray
    hi: np.ndarray

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Boolean mask of the points (x, y, z) that lie in the region."""
        raise NotImplementedError


class _Box(_Shape):
    """Everything inside an axis-aligned box."""

    def __init__(self, lo: npt.ArrayLike, hi: npt.ArrayLike) -> None:
        self.lo, self.hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return np.full(_full_shape(x, y, z), True)


class _HalfSpace(_Shape):
    """Points whose coordinate along ``axis`` is above (or below) ``level``."""

    def __init__(self, axis: int, level: float, above: bool) -> None:
        self.axis, self.level, self.above = axis, float(level), above
        self.lo, self.hi = np.full(3, -_INF), np.full(3, _INF)
        (self.lo if above else self.hi)[axis] = level

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        c = (x, y, z)[self.axis]
        return c > self.level if self.above else c < self.level


class _Ellipsoid(_Shape):
    """Solid ellipsoid; the columns of ``rotation`` are its axes in the patient frame."""

    def __init__(self, center: npt.ArrayLike, radii: npt.ArrayLike, rotation: np.ndarray | None = None):
        self.c = np.asarray(center, dtype=float)
        self.r = np.asarray(radii, dtype=float)
        self.rot = np.eye(3) if rotation is None else np.asarray(rotation, dtype=float)
        half = np.sqrt(((self.rot * self.r) ** 2).sum(axis=1))
        self.lo, self.hi = self.c - half, self.c + half

    def q(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Squared normalised radius: < 1 inside, 1 on the surface."""
        d = (x - float(self.c[0]), y - float(self.c[1]), z - float(self.c[2]))
        total: np.ndarray | float = 0.0
        for a in range(3):
            u: np.ndarray | float = 0.0
            for w in range(3):
                coef = float(self.rot[w, a] / self.r[a])
                if abs(coef) > 1e-12:
                    u = u + coef * d[w]
            total = total + u * u
        return np.asarray(total)

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.q(x, y, z) <= 1.0

    def distance_bound(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Signed distance estimate in mm (negative inside); inside, its magnitude never exceeds the truth."""
        return (np.sqrt(self.q(x, y, z)) - 1.0) * float(self.r.min())

    def surface_points(self, directions: np.ndarray, grow_mm: float = 0.0) -> np.ndarray:
        """Points on the surface offset outward by ``grow_mm`` along the normal, one per unit direction.

        Args:
            directions: (n, 3) unit vectors in the ellipsoid's own frame.
            grow_mm: Outward offset along the surface normal.

        Returns:
            (n, 3) points in the patient frame.
        """
        local = directions * self.r
        normal = directions / self.r
        normal /= np.linalg.norm(normal, axis=1, keepdims=True)
        return (local + grow_mm * normal) @ self.rot.T + self.c


class _Cylinder(_Shape):
    """Elliptic cylinder along z, rotated by ``angle`` degrees in the axial plane, optionally capped in z."""

    def __init__(
        self,
        cx: float,
        cy: float,
        rx: float,
        ry: float,
        angle: float = 0.0,
        z0: float = -_INF,
        z1: float = _INF,
    ) -> None:
        self.cx, self.cy, self.rx, self.ry, self.z0, self.z1 = cx, cy, rx, ry, z0, z1
        a = math.radians(angle)
        self.ca, self.sa = math.cos(a), math.sin(a)
        hx = math.hypot(rx * self.ca, ry * self.sa)
        hy = math.hypot(rx * self.sa, ry * self.ca)
        self.lo = np.array([cx - hx, cy - hy, z0])
        self.hi = np.array([cx + hx, cy + hy, z1])

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        dx, dy = x - self.cx, y - self.cy
        if self.sa == 0.0:
            u, v = dx, dy
        else:
            u = self.ca * dx + self.sa * dy
            v = self.ca * dy - self.sa * dx
        m = (u / self.rx) ** 2 + (v / self.ry) ** 2 <= 1.0
        if self.z0 > -_INF:
            m = m & (z >= self.z0)
        if self.z1 < _INF:
            m = m & (z <= self.z1)
        return m


class _Capsule(_Shape):
    """Tube of radius ``radius`` around the segment from ``a`` to ``b`` (a vessel)."""

    def __init__(self, a: npt.ArrayLike, b: npt.ArrayLike, radius: float) -> None:
        self.a, self.b, self.radius = np.asarray(a, float), np.asarray(b, float), float(radius)
        self.lo = np.minimum(self.a, self.b) - radius
        self.hi = np.maximum(self.a, self.b) + radius

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        ab = self.b - self.a
        inv = 1.0 / float(ab @ ab)
        d = (x - float(self.a[0]), y - float(self.a[1]), z - float(self.a[2]))
        t = np.clip((d[0] * float(ab[0]) + d[1] * float(ab[1]) + d[2] * float(ab[2])) * inv, 0.0, 1.0)
        dist2 = (d[0] - t * float(ab[0])) ** 2 + (d[1] - t * float(ab[1])) ** 2 + (d[2] - t * float(ab[2])) ** 2
        return np.asarray(dist2 <= self.radius**2)


class _ZBands(_Shape):
    """Periodic slabs ``width`` mm thick every ``pitch`` mm along z (tilted by ``tilt`` mm of z per mm of y)."""

    def __init__(self, z0: float, pitch: float, width: float, zmin: float, zmax: float, tilt: float = 0.0):
        self.z0, self.pitch, self.width, self.tilt = z0, pitch, width, tilt
        slack = abs(tilt) * 400.0
        self.lo = np.array([-_INF, -_INF, zmin - slack])
        self.hi = np.array([_INF, _INF, zmax + slack])
        self.zmin, self.zmax = zmin, zmax

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        w = z - self.z0 - (self.tilt * y if self.tilt else 0.0)
        return (np.mod(w, self.pitch) < self.width) & (w >= self.zmin - self.z0) & (w <= self.zmax - self.z0)


class _Ring(_Shape):
    """Band ``inner``-``outer`` mm outside an axial ellipse, within an angle range (ribs)."""

    def __init__(self, a: float, b: float, inner: float, outer: float, theta0: float, theta1: float) -> None:
        self.a, self.b, self.inner, self.outer = a, b, inner, outer
        self.mean = 0.5 * (a + b)
        self.t0, self.t1 = math.radians(theta0), math.radians(theta1)
        grow = 1.0 + outer / self.mean
        self.lo = np.array([-a * grow, -b * grow, -_INF])
        self.hi = np.array([a * grow, b * grow, _INF])

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        rho = np.sqrt((x / self.a) ** 2 + (y / self.b) ** 2)
        d = (rho - 1.0) * self.mean
        theta = np.arctan2(y, np.abs(x))
        return (d >= self.inner) & (d <= self.outer) & (theta >= self.t0) & (theta <= self.t1)


def _smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum: blends two distance fields over about ``k`` mm."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def _waves(rng: np.random.Generator, n: int, amp: tuple[float, float], wavelength: tuple[float, float]):
    """Random plane waves, rows (amplitude, kx, ky, kz, phase)."""
    out = np.empty((n, 5))
    for i in range(n):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * math.pi / rng.uniform(*wavelength)
        out[i] = (rng.uniform(*amp), *(direction * k), rng.uniform(0, 2 * math.pi))
    return out


def _eval_waves(waves: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    total: np.ndarray | float = 0.0
    for amp, kx, ky, kz, phase in waves:
        total = total + float(amp) * np.sin(float(kx) * x + float(ky) * y + float(kz) * z + float(phase))
    return np.asarray(total)


class _Blobby(_Shape):
    """Smooth union of ellipsoids under a smooth random displacement; ``offset`` < 0 shrinks it (walls)."""

    def __init__(
        self,
        parts: list[_Ellipsoid],
        smooth: float,
        displacement: list[np.ndarray] | None = None,
        offset: float = 0.0,
    ) -> None:
        self.parts, self.smooth, self.offset = parts, smooth, offset
        self.displacement = displacement or []
        pad = self.smooth / 4 + max(offset, 0.0) + 1.0
        if self.displacement:
            pad += max(float(np.abs(w[:, 0]).sum()) for w in self.displacement)
        self.lo = np.min([p.lo for p in parts], axis=0) - pad
        self.hi = np.max([p.hi for p in parts], axis=0) + pad

    def shrunk(self, mm: float) -> _Blobby:
        """The same shape with its surface moved ``mm`` inward."""
        return _Blobby(self.parts, self.smooth, self.displacement, self.offset - mm)

    def field(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Approximate signed distance in mm (negative inside) before the offset."""
        if self.displacement:
            x = x + _eval_waves(self.displacement[0], x, y, z)
            y = y + _eval_waves(self.displacement[1], x, y, z)
            z = z + _eval_waves(self.displacement[2], x, y, z)
        f = self.parts[0].distance_bound(x, y, z)
        for part in self.parts[1:]:
            f = _smooth_min(f, part.distance_bound(x, y, z), self.smooth)
        return f

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return self.field(x, y, z) < self.offset


# ----------------------------------------------------------------------------------------------------------
# Painting: an anatomy is an ordered list of operations applied to a canvas (a voxel grid or a set of points).
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Paint:
    """Set HU and label where ``shape`` and all of ``within`` hold (and the label is ``only_label``)."""

    shape: _Shape
    hu: float
    label: int = 0
    within: tuple[_Shape, ...] = ()
    only_label: int | None = None


@dataclass(frozen=True)
class _AddField:
    """Add a smooth HU field (plane waves) inside ``shape`` (where the label is ``only_label``, if given)."""

    shape: _Shape
    waves: np.ndarray
    only_label: int | None = None


class _Canvas:
    """HU and label arrays over some points of the patient frame."""

    hu: np.ndarray
    label: np.ndarray

    def block(self, lo: np.ndarray, hi: np.ndarray):
        """Index of the points that may lie in the box [lo, hi] and their coordinates, or None if none do."""
        raise NotImplementedError

    def apply(self, op: _Paint | _AddField) -> None:
        """Apply one painting operation in place."""
        within = op.within if isinstance(op, _Paint) else ()
        lo = np.max([op.shape.lo, *(w.lo for w in within)], axis=0)
        hi = np.min([op.shape.hi, *(w.hi for w in within)], axis=0)
        if np.any(lo > hi):
            return
        found = self.block(lo, hi)
        if found is None:
            return
        index, x, y, z = found
        target_shape = self.label[index].shape
        mask = op.shape.inside(x, y, z)
        for w in within:
            mask = mask & w.inside(x, y, z)
        mask = np.broadcast_to(mask, target_shape)
        if op.only_label is not None:
            mask = mask & (self.label[index] == op.only_label)
        if not mask.any():
            return
        hu, label = self.hu[index], self.label[index]
        if isinstance(op, _Paint):
            hu[mask] = op.hu
            label[mask] = op.label
        else:
            values = np.broadcast_to(_eval_waves(op.waves, x, y, z), target_shape)
            hu[mask] += values[mask].astype(np.float32)


class _PointCanvas(_Canvas):
    """A flat list of points (used to place tumours without a grid)."""

    def __init__(self, points: np.ndarray) -> None:
        self.xyz = [np.ascontiguousarray(points[:, a], dtype=np.float32) for a in range(3)]
        self.hu = np.full(len(points), -1000.0, dtype=np.float32)
        self.label = np.zeros(len(points), dtype=np.uint8)

    def block(self, lo: np.ndarray, hi: np.ndarray):
        return slice(None), *self.xyz


class _GridCanvas(_Canvas):
    """A box of voxels [start, stop) of a grid with voxel -> patient-frame matrix ``to_patient``."""

    def __init__(self, to_patient: np.ndarray, start: Sequence[int], stop: Sequence[int]) -> None:
        self.m = np.asarray(to_patient, dtype=float)
        self.inv = np.linalg.inv(self.m)
        self.start = np.asarray(start, dtype=int)
        self.stop = np.asarray(stop, dtype=int)
        shape = tuple(int(n) for n in self.stop - self.start)
        self.hu = np.full(shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(shape, dtype=np.uint8)
        corners = self._corners(self.start - 0.5, self.stop - 0.5)
        world = corners @ self.m[:3, :3].T + self.m[:3, 3]
        self.lo, self.hi = world.min(axis=0), world.max(axis=0)

    @staticmethod
    def _corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return np.array([[(lo, hi)[b >> a & 1][a] for a in range(3)] for b in range(8)], dtype=float)

    def block(self, lo: np.ndarray, hi: np.ndarray):
        lo, hi = np.maximum(lo, self.lo), np.minimum(hi, self.hi)
        if np.any(lo > hi):
            return None
        idx = self._corners(lo, hi) @ self.inv[:3, :3].T + self.inv[:3, 3]
        first = np.maximum(np.floor(idx.min(axis=0)).astype(int), self.start)
        last = np.minimum(np.ceil(idx.max(axis=0)).astype(int) + 1, self.stop)
        if np.any(first >= last):
            return None
        ranges = [np.arange(first[a], last[a], dtype=np.float32) for a in range(3)]
        coords = []
        for w in range(3):
            c: np.ndarray | float = float(self.m[w, 3])
            for a in range(3):
                coef = float(self.m[w, a])
                if coef != 0.0:
                    shape = [1, 1, 1]
                    shape[a] = -1
                    c = c + coef * ranges[a].reshape(shape)
            coords.append(np.asarray(c, dtype=np.float32))
        index = tuple(slice(int(f - s), int(e - s)) for f, e, s in zip(first, last, self.start, strict=True))
        return index, *coords


# ----------------------------------------------------------------------------------------------------------
# The anatomy.
# ----------------------------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    ops: list[_Paint | _AddField]
    liver: _Blobby
    half_x: float  # body half width (mm)
    half_y: float  # body half depth (mm)
    liver_z: tuple[float, float]  # liver extent along z in the patient frame (mm)
    yaw: float  # degrees, patient rotation about S in the scanner
    position: np.ndarray  # world position of the patient-frame origin (mm)
    noise_sd: float
    info: dict[str, object]


def _jitter(rng: np.random.Generator, values: Sequence[float], spread: float) -> np.ndarray:
    return np.asarray(values, dtype=float) + rng.uniform(-spread, spread, size=len(values))


def _z_extent(shape: _Shape, step: float = 3.0) -> tuple[float, float]:
    """Extent along z of a bounded shape, found on a ``step`` mm lattice (and widened by ``step``)."""
    axes = [np.arange(lo, hi + step, step, dtype=np.float32) for lo, hi in zip(shape.lo, shape.hi, strict=True)]
    x, y, z = axes[0][:, None, None], axes[1][None, :, None], axes[2][None, None, :]
    hit = np.broadcast_to(shape.inside(x, y, z), (len(axes[0]), len(axes[1]), len(axes[2]))).any(axis=(0, 1))
    if not hit.any():
        return float(shape.lo[2]), float(shape.hi[2])
    found = axes[2][hit]
    return float(found.min()) - step, float(found.max()) + step


def _build_anatomy(rng: np.random.Generator, clinical: np.random.Generator | None = None) -> _Anatomy:
    """Draw one patient. The number and order of draws is fixed, so a seed always gives the same patient.

    With ``clinical`` (a separate stream), the patient size, fat, contrast phase, HU values, noise and lesions are
    drawn from it over clinical ranges (see :func:`_clinical_protocol`), pelvic and chest landmarks are added, and
    the draws of ``rng`` are still all made, so the hard variety of a seed never changes.
    """
    u = rng.uniform
    s = u(0.9, 1.1)  # patient size
    a, b = s * u(150, 170), s * u(105, 125)  # body half width / depth
    fat, wall = s * u(8, 30), u(8, 14)
    protocol = _clinical_protocol(clinical) if clinical is not None else None
    if protocol is not None:
        scale = protocol.scale / s
        s, a, b = s * scale, a * scale, b * scale
        fat = s * protocol.fat_mm
    ac, bc = a - fat - wall, b - fat - wall  # visceral cavity
    hu = {
        "subcutaneous_fat": u(-110, -90),
        "visceral_fat": u(-100, -80),
        "muscle": u(45, 65),
        "lung": u(-870, -820),
        "bowel_wall": u(70, 110),
        "stomach_content": u(5, 25),
        "kidney": u(140, 170),
        "renal_medulla": u(95, 125),
        "renal_pelvis": u(5, 20),
        "pancreas": u(90, 115),
        "heart": u(120, 150),
        "liver": u(95, 115),
        "vessel_gain": u(40, 70),
        "gallbladder": u(0, 20),
        "ivc": u(120, 150),
        "aorta": u(160, 200),
        "cortical_bone": u(600, 700),
        "cancellous_bone": u(400, 500),
        "rib": u(400, 600),
        "disc": u(70, 100),
        "csf": u(5, 20),
    }
    hu["spleen"] = float(np.clip(hu["liver"] + u(-6, 4), 100, 110))  # close to the liver on purpose
    noise_sd = u(15, 25)
    if protocol is not None:
        hu.update(protocol.hu)
        noise_sd = protocol.noise_sd
    yaw = u(-3, 3)
    position = np.array([u(-20, 20), u(-20, 20), u(-400, 0)])
    cavity = _Cylinder(0, 0, ac, bc)
    ops: list[_Paint | _AddField] = [
        _Paint(_Cylinder(0, 0, a, b), hu["subcutaneous_fat"]),
        _Paint(_Cylinder(0, 0, a - fat, b - fat), hu["muscle"]),
        _Paint(cavity, hu["visceral_fat"]),
    ]

    # Liver: right lobe, left lobe, caudate, inferior tip of the right lobe.
    lobes = [
        ((68, -8, 0), (58, 70, 68)),
        ((-10, 35, 25), (58, 34, 26)),
        ((22, -20, 12), (28, 24, 34)),
        ((78, 8, -42), (34, 42, 38)),
    ]
    parts = [
        _Ellipsoid(s * _jitter(rng, c, 8), s * np.asarray(r) * u(0.88, 1.12, 3), _rotation(*u(-12, 12, 3)))
        for c, r in lobes
    ]
    liver = _Blobby(parts, smooth=12.0, displacement=[_waves(rng, 2, (2, 5), (100, 200)) for _ in range(3)])
    dome = float(max(p.hi[2] for p in parts))
    liver_z = _z_extent(liver)

    # Spine and posterior muscles.
    rv = s * u(16, 19)
    yv = -bc + s * 25
    canal_y = yv - rv - 9 * s
    ops += [
        _Paint(_Cylinder(s * 35, -b + fat + s * 22, s * 28, s * 22), hu["muscle"], within=(_Cylinder(0, 0, a, b),)),
        _Paint(_Cylinder(-s * 35, -b + fat + s * 22, s * 28, s * 22), hu["muscle"], within=(_Cylinder(0, 0, a, b),)),
        _Paint(_Cylinder(s * 38, yv - 2, s * 15, s * 18, z1=-40 * s), hu["muscle"]),
        _Paint(_Cylinder(-s * 38, yv - 2, s * 15, s * 18, z1=-40 * s), hu["muscle"]),
    ]
    lung_r = _Ellipsoid((75 * s, -10 * s, dome + 130 * s), (65 * s, 85 * s, 150 * s))
    lung_l = _Ellipsoid((-72 * s, -10 * s, dome + 120 * s), (62 * s, 85 * s, 150 * s))
    ops += [_Paint(lung_r, hu["lung"], within=(cavity,)), _Paint(lung_l, hu["lung"], within=(cavity,))]

    # Bowel loops: enhancing wall, 0-40 HU content, some with gas on the anterior (non-dependent) side.
    for _ in range(28):
        center = (u(-0.75, 0.75) * ac, u(-0.2, 0.8) * bc, s * u(-320, 10))
        radii = u(12, 28, 3) * s
        loop = _Ellipsoid(center, radii, _rotation(*u(-90, 90, 3)))
        wall_mm = u(2.0, 3.5)
        lumen = _Ellipsoid(center, radii - wall_mm, loop.rot)
        content, gas, level = u(0, 40), u() < 0.35, u(0.1, 0.5)
        ops += [
            _Paint(loop, hu["bowel_wall"], within=(cavity,)),
            _Paint(lumen, content, within=(cavity,)),
        ]
        if gas:
            ops.append(_Paint(lumen, -1000.0, within=(cavity, _HalfSpace(1, center[1] + level * radii[1], True))))

    # Stomach (upper left) with an air-fluid level.
    stomach = _Blobby(
        [
            _Ellipsoid(s * _jitter(rng, (-60, 0, 40), 6), s * np.array([35, 35, 40]) * u(0.85, 1.1)),
            _Ellipsoid(s * _jitter(rng, (-45, 30, 0), 6), s * np.array([30, 30, 45]) * u(0.85, 1.1)),
            _Ellipsoid(s * _jitter(rng, (-5, 45, -25), 6), s * np.array([35, 20, 20]) * u(0.85, 1.1)),
        ],
        smooth=15.0,
    )
    lumen_s = stomach.shrunk(u(3, 5))
    gas_level = s * u(20, 50)
    ops += [
        _Paint(stomach, hu["bowel_wall"], within=(cavity,)),
        _Paint(lumen_s, hu["stomach_content"], within=(cavity,)),
        _Paint(lumen_s, -1000.0, within=(cavity, _HalfSpace(1, gas_level, True))),
    ]

    # Kidneys (right lower than left), with renal sinus fat and pelvis on the medial side.
    for side, zc in ((1.0, -60.0), (-1.0, -45.0)):
        c = np.array([side * 70 * s, yv - 2 * s, zc * s]) + u(-5, 5, 3)
        rot = _rotation(u(-10, 10), side * u(8, 20), side * u(20, 40))
        kidney = _Ellipsoid(c, s * np.array([24, 20, 52]) * u(0.9, 1.1, 3), rot)
        sinus = _Ellipsoid(c + rot @ np.array([-side * 10 * s, 4 * s, 0]), kidney.r * [0.35, 0.45, 0.55], rot)
        pelvis = _Ellipsoid(c + rot @ np.array([-side * 14 * s, 5 * s, -5 * s]), kidney.r * [0.2, 0.25, 0.3], rot)
        ops += [
            _Paint(kidney, hu["kidney"], within=(cavity,)),
            _Paint(_Ellipsoid(c, kidney.r * 0.72, rot), hu["renal_medulla"], within=(cavity,)),
            _Paint(sinus, hu["visceral_fat"], within=(cavity,)),
            _Paint(pelvis, hu["renal_pelvis"], within=(cavity,)),
        ]

    pancreas = _Blobby(
        [
            _Ellipsoid(s * _jitter(rng, (25, 0, -45), 5), s * np.array([18, 16, 22]) * u(0.85, 1.15)),
            _Ellipsoid(s * _jitter(rng, (-10, 5, -30), 5), s * np.array([28, 12, 12]) * u(0.85, 1.15)),
            _Ellipsoid(
                s * _jitter(rng, (-50, -15, -20), 5),
                s * np.array([22, 10, 10]) * u(0.85, 1.15),
                _rotation(0, 0, -30),
            ),
        ],
        smooth=10.0,
    )
    spleen = _Blobby(
        [
            _Ellipsoid(
                s * _jitter(rng, (-85, -35, 15), 6),
                s * np.array([22, 50, 45]) * u(0.8, 1.15, 3),
                _rotation(u(-10, 10), u(-10, 10), u(25, 45)),
            ),
            _Ellipsoid(s * _jitter(rng, (-72, -5, 0), 6), s * np.array([18, 30, 30]) * u(0.8, 1.15, 3)),
        ],
        smooth=10.0,
        displacement=[_waves(rng, 1, (1, 3), (80, 150)) for _ in range(3)],
    )
    heart = _Ellipsoid((-15 * s, 35 * s, dome + 45 * s), s * np.array([65, 50, 55]), _rotation(0, 0, 30))
    ops += [
        _Paint(pancreas, hu["pancreas"], within=(cavity,)),
        _Paint(spleen, hu["spleen"], within=(cavity,)),
        _Paint(heart, hu["heart"], within=(cavity,)),
        _Paint(liver, hu["liver"], 1, within=(cavity,)),
    ]

    # Intrahepatic vessels: portal branches from the hilum, hepatic veins converging on the IVC.
    hilum = s * _jitter(rng, (30, -5, -25), 6)
    ivc_x, ivc_y = 22 * s, yv + rv + 8 * s
    ivc_top = np.array([ivc_x, ivc_y, dome - 15 * s])
    vessels = [(hilum, s * _jitter(rng, t, 10), u(4, 7)) for t in ((85, 15, 10), (80, -35, 5), (-25, 35, 20))]
    vessels += [(ivc_top, s * _jitter(rng, t, 10), u(3, 6)) for t in ((95, -10, 45), (45, 35, 40), (-25, 40, 35))]
    for start, end, radius in list(vessels):  # two smaller branches off each trunk
        trunk = end - start
        for _ in range(2):
            fork = start + u(0.45, 0.9) * trunk
            bend = _axis_rotation(rng.normal(size=3), u(25, 50)) @ (trunk / np.linalg.norm(trunk))
            vessels.append((fork, fork + bend * s * u(30, 60), 0.6 * radius))
    for start, end, radius in vessels:
        ops.append(_Paint(_Capsule(start, end, radius), hu["liver"] + hu["vessel_gain"], 1, only_label=1))

    gallbladder = _Ellipsoid(
        s * _jitter(rng, (42, 28, -48), 6),
        s * np.array([14, 14, 32]) * u(0.8, 1.2),
        _rotation(u(-30, -10), u(-15, 15), 0),
    )
    ops += [
        _Paint(gallbladder, hu["gallbladder"], within=(cavity,)),
        _Paint(_Cylinder(ivc_x, ivc_y, 10 * s, 9 * s, z1=float(ivc_top[2])), hu["ivc"]),
        _Paint(_Cylinder(-12 * s, yv + rv + 10 * s, 11 * s, 11 * s), hu["aorta"]),
    ]

    # Vertebrae (cortex, cancellous core, discs), canal, posterior arch and spinous process; ribs.
    disc_z0, pitch = u(0, 30), 30 * s
    body = _Cylinder(0, yv, rv, rv * 0.85)
    back = _Cylinder(0, 0, a - fat, b - fat)  # the posterior arch stays under the subcutaneous fat
    ops += [
        _Paint(body, hu["cortical_bone"]),
        _Paint(_Cylinder(0, yv, rv - 2, rv * 0.85 - 2), hu["cancellous_bone"]),
        _Paint(_ZBands(disc_z0, pitch, 6 * s, -_INF, _INF), hu["disc"], within=(body,)),
        _Paint(_Cylinder(0, canal_y, 15 * s, 13 * s), hu["cortical_bone"], within=(back,)),
        _Paint(_Cylinder(0, canal_y - 18 * s, 5 * s, 14 * s), hu["cortical_bone"], within=(back,)),
        _Paint(_Cylinder(0, canal_y, 8 * s, 7 * s), hu["csf"]),
        _Paint(
            _Ring(ac, bc, 2.0, 2.0 + 7 * s, -80, 50),
            hu["rib"],
            within=(
                _ZBands(
                    dome + u(0, 25),
                    26 * s,
                    11 * s,
                    liver_z[0] - 20,
                    dome + (60 if protocol is None else 230 * s),
                    tilt=-0.6,
                ),
            ),
        ),
    ]
    if clinical is not None:
        ops += _pelvis_and_chest(clinical, s, a, b, fat, yv, dome, hu)

    # Perfusion gradient inside the liver, then tumours.
    ops.append(_AddField(_Box(liver.lo, liver.hi), _waves(rng, 2, (3.0, 6.0), (60, 150)), 1))
    info: dict[str, object] = {
        "patient_scale": s,
        "noise_sd": noise_sd,
        "hu": {k: round(float(v), 1) for k, v in hu.items() if k != "vessel_gain"},
    }
    if protocol is not None:
        info["variety"] = "clinical"
        info["phase"] = protocol.phase
        info["hu"]["vessel_gain"] = round(float(hu["vessel_gain"]), 1)  # type: ignore[index]
    anatomy = _Anatomy(ops, liver, a, b, liver_z, yaw, position, noise_sd, info)
    if clinical is not None:
        _add_clinical_lesions(anatomy, clinical, hu["liver"])
    else:
        _add_tumours(anatomy, rng, hu["liver"])
    # Residual cupping / scatter: a slow HU drift over the whole body, after the tumours.
    anatomy.ops.append(_AddField(_Cylinder(0, 0, a, b), _waves(rng, 2, (3.0, 6.0), (250, 450))))
    return anatomy


def _sphere_directions(n: int) -> np.ndarray:
    """``n`` nearly uniform unit vectors (Fibonacci sphere)."""
    i = np.arange(n) + 0.5
    polar = np.arccos(1 - 2 * i / n)
    azimuth = math.pi * (1 + 5**0.5) * i
    return np.stack([np.cos(azimuth) * np.sin(polar), np.sin(azimuth) * np.sin(polar), np.cos(polar)], axis=1)


def _add_tumours(anatomy: _Anatomy, rng: np.random.Generator, liver_hu: float) -> None:
    """Place 0-3 tumours whose 5 mm-grown surfaces lie entirely in the (already painted) liver."""
    u = rng.uniform
    wanted = int(rng.integers(0, 4))
    n_candidates = 96
    lo, hi = anatomy.liver.lo, anatomy.liver.hi
    candidates = []
    for _ in range(n_candidates):
        base = u(5, 20)
        radii = np.clip(base * u(0.8, 1.2, 3), 5, 20)
        contrast = u(10, min(25.0, 0.95 * anatomy.noise_sd))
        candidates.append((_Ellipsoid(u(lo, hi), radii, _rotation(*u(-90, 90, 3))), contrast))
    directions = _sphere_directions(160)
    probes = [
        np.concatenate(
            [
                e.surface_points(directions, _TUMOUR_MARGIN_MM),
                e.surface_points(directions[::4], -0.5 * float(e.r.min())),
                e.c[None],
            ]
        )
        for e, _ in candidates
    ]
    canvas = _PointCanvas(np.concatenate(probes))
    for op in anatomy.ops:
        canvas.apply(op)
    ok = np.split(canvas.label == 1, np.cumsum([len(p) for p in probes])[:-1])
    chosen: list[tuple[_Ellipsoid, float]] = []
    for (ellipsoid, contrast), inside in zip(candidates, ok, strict=True):
        if len(chosen) == wanted:
            break
        apart = all(
            np.linalg.norm(ellipsoid.c - e.c) > ellipsoid.r.max() + e.r.max() + 2 * _TUMOUR_MARGIN_MM for e, _ in chosen
        )
        if inside.all() and apart:
            chosen.append((ellipsoid, contrast))
    for ellipsoid, contrast in chosen:
        anatomy.ops.append(_Paint(ellipsoid, liver_hu - contrast, 2, only_label=1))
    anatomy.info["tumours"] = [
        {
            "center_mm": [round(float(v), 1) for v in e.c],
            "radii_mm": [round(float(v), 1) for v in e.r],
            "contrast_hu": round(float(c), 1),
        }
        for e, c in chosen
    ]


# ----------------------------------------------------------------------------------------------------------
# The clinical variety: protocol, extra landmarks and lesions drawn over the ranges seen in clinical CT.
# ----------------------------------------------------------------------------------------------------------

_PHASES: tuple[tuple[str, float], ...] = (
    ("non-contrast", 0.15),
    ("arterial", 0.2),
    ("portal venous", 0.45),
    ("delayed", 0.2),
)
_FOV_KINDS: tuple[tuple[str, float], ...] = (
    ("liver", 0.2),
    ("abdomen", 0.3),
    ("abdomen-pelvis", 0.3),
    ("chest-abdomen-pelvis", 0.2),
)
_MAX_Z_EXTENT_MM = 600.0
_CLINICAL_FOV_MM = (250.0, 500.0)
_CLINICAL_SLICE_MM = (0.6, 5.0)
_CLINICAL_DEMO_MATRIX = 192
_CLINICAL_DEMO_SLICES = 128
_LESION_COUNT_WEIGHTS = (0.15, 0.2, 0.17, 0.13, 0.1, 0.08, 0.07, 0.05, 0.05)  # 0..8 lesions
_LESION_DIAMETER_MM = (5.0, 60.0)
_CLINICAL_MARGIN_MM = 2.0
# Pelvic landmarks along z in the patient frame (mm, times the patient scale); the liver dome is near +70.
_ILIAC_CREST_Z = -150.0
_FEMORAL_HEAD_Z = -270.0
_PUBIS_Z = -300.0
_LUNG_APEX_ABOVE_DOME = 220.0


def _pick(rng: np.random.Generator, table: Sequence[tuple[str, float]]) -> str:
    names = [name for name, _ in table]
    weights = np.array([w for _, w in table], dtype=float)
    return names[int(rng.choice(len(names), p=weights / weights.sum()))]


@dataclass
class _Protocol:
    phase: str
    scale: float
    fat_mm: float
    noise_sd: float
    hu: dict[str, float]


def _clinical_protocol(rng: np.random.Generator) -> _Protocol:
    """Patient size, fat, contrast phase with HU values relative to the liver, and noise, for the clinical variety.

    Liver 60-140 HU over the four phases (non-contrast 60-72, arterial 65-95, portal venous 95-140, delayed
    75-110); the spleen, the intrahepatic vessels, aorta, IVC, heart, kidneys, pancreas and bowel wall follow the
    phase (the spleen brighter than the liver in the arterial phase, the vessels darker than an unenhanced liver).
    Noise SD 8-30 HU; patient scale 0.8-1.3 (body 240-440 mm wide) with 5-50 mm of subcutaneous fat.
    """
    u = rng.uniform
    phase = _pick(rng, _PHASES)
    scale, fat_mm, noise_sd = u(0.8, 1.3), u(5, 50), u(8, 30)
    if phase == "non-contrast":
        liver = u(60, 72)
        rel = {"spleen": -u(2, 12), "vessel_gain": -u(10, 25)}
        absolute = {"aorta": u(35, 50), "ivc": u(35, 50), "heart": u(35, 50), "kidney": u(30, 40)}
        absolute |= {"renal_medulla": u(25, 35), "pancreas": u(40, 50), "bowel_wall": u(35, 50)}
    elif phase == "arterial":
        liver = u(65, 95)
        rel = {"spleen": u(10, 40), "vessel_gain": u(20, 60)}
        absolute = {"aorta": u(250, 400), "ivc": u(60, 100), "heart": u(200, 350), "kidney": u(180, 260)}
        absolute |= {"renal_medulla": u(80, 120), "pancreas": u(100, 150), "bowel_wall": u(80, 130)}
    elif phase == "portal venous":
        liver = u(95, 140)
        rel = {"spleen": u(-10, 15), "vessel_gain": u(30, 70)}
        absolute = {"aorta": u(140, 200), "ivc": u(120, 160), "heart": u(130, 180), "kidney": u(150, 200)}
        absolute |= {"renal_medulla": u(130, 180), "pancreas": u(90, 120), "bowel_wall": u(70, 110)}
    else:
        liver = u(75, 110)
        rel = {"spleen": u(-8, 8), "vessel_gain": u(5, 25)}
        absolute = {"aorta": u(100, 140), "ivc": u(100, 130), "heart": u(100, 130), "kidney": u(110, 160)}
        absolute |= {"renal_medulla": u(120, 180), "pancreas": u(70, 90), "bowel_wall": u(60, 90)}
        absolute["renal_pelvis"] = u(100, 300)  # excreted contrast
    hu = {"liver": liver, "spleen": liver + rel["spleen"], "vessel_gain": rel["vessel_gain"], **absolute}
    return _Protocol(phase, scale, fat_mm, noise_sd, hu)


def _pelvis_and_chest(
    rng: np.random.Generator,
    s: float,
    a: float,
    b: float,
    fat: float,
    yv: float,
    dome: float,
    hu: dict[str, float],
) -> list[_Paint | _AddField]:
    """Coarse pelvic and chest landmarks for long fields of view: iliac wings, sacrum, femora, pubic rami,
    bladder, gluteal muscles and a sternum."""
    u = rng.uniform
    body = _Cylinder(0, 0, a, b)
    bone, core = hu["cortical_bone"], hu["cancellous_bone"]
    ops: list[_Paint | _AddField] = []
    for side in (1.0, -1.0):
        ops.append(
            _Paint(
                _Cylinder(side * 75 * s, -b + fat + 40 * s, 60 * s, 40 * s, z1=_ILIAC_CREST_Z * s),
                hu["muscle"],
                within=(body,),
            )
        )
    for side in (1.0, -1.0):
        wing = _Ellipsoid(
            (side * 85 * s, -25 * s, (_ILIAC_CREST_Z - 50) * s),
            s * np.array([10, 45, 50]) * u(0.9, 1.1, 3),
            _rotation(0, side * u(-10, 10), side * u(20, 40)),
        )
        head_c = np.array([side * 95 * s, -5 * s, _FEMORAL_HEAD_Z * s])
        head_r = 23 * s * u(0.9, 1.1)
        pubis = np.array([side * 12 * s, 55 * s, _PUBIS_Z * s])
        ops += [
            _Paint(wing, bone, within=(body,)),
            _Paint(_Ellipsoid(wing.c, wing.r * 0.6, wing.rot), core, within=(body,)),
            _Paint(_Ellipsoid(head_c, (head_r,) * 3), bone, within=(body,)),
            _Paint(_Ellipsoid(head_c, (head_r - 3,) * 3), core, within=(body,)),
            _Paint(_Cylinder(side * 105 * s, -5 * s, 15 * s, 15 * s, z1=float(head_c[2])), bone, within=(body,)),
            _Paint(_Capsule(head_c + (-side * 10 * s, 10 * s, -5 * s), pubis, 9 * s), bone, within=(body,)),
        ]
    sacrum = _Ellipsoid((0, yv - 5 * s, (_ILIAC_CREST_Z - 70) * s), s * np.array([42, 18, 60]), _rotation(20, 0, 0))
    bladder = _Ellipsoid(
        (0, 45 * s, (_FEMORAL_HEAD_Z + 5) * s), s * u((30, 25, 25), (55, 40, 40)), _rotation(*u(-10, 10, 3))
    )
    wall_y = b - fat - 6 * s
    ops += [
        _Paint(sacrum, bone, within=(body,)),
        _Paint(_Ellipsoid(sacrum.c, sacrum.r * 0.7, sacrum.rot), core, within=(body,)),
        _Paint(bladder, u(0, 15), within=(body,)),
        _Paint(_Cylinder(0, wall_y, 15 * s, 6 * s, z0=dome - 40 * s, z1=dome + 180 * s), bone, within=(body,)),
    ]
    return ops


def _fits_in_liver(anatomy: _Anatomy, ellipsoids: Sequence[_Ellipsoid], margin_mm: float) -> list[bool]:
    """Whether each ellipsoid, grown by ``margin_mm``, lies in the (already painted) liver label."""
    directions = _sphere_directions(160)
    probes = [
        np.concatenate(
            [
                e.surface_points(directions, margin_mm),
                e.surface_points(directions[::4], -0.5 * float(e.r.min())),
                e.c[None],
            ]
        )
        for e in ellipsoids
    ]
    canvas = _PointCanvas(np.concatenate(probes))
    for op in anatomy.ops:
        canvas.apply(op)
    inside = np.split(canvas.label == 1, np.cumsum([len(p) for p in probes])[:-1])
    return [bool(m.all()) for m in inside]


def _lesion_delta(rng: np.random.Generator) -> float:
    """Lesion minus liver HU: mostly 15-70 darker, some faint (2-10 darker), a few brighter (15-60)."""
    r = rng.random()
    if r < 0.12:
        return -float(rng.uniform(2, 10))
    if r < 0.2:
        return float(rng.uniform(15, 60))
    return -float(rng.uniform(15, 70))


def _add_clinical_lesions(anatomy: _Anatomy, rng: np.random.Generator, liver_hu: float) -> None:
    """Place 0-8 lesions 5-60 mm across (log-uniform), 2 mm inside the liver, with LiTS-like contrast.

    Lesions over 30 mm across get a necrotic core 10-30 HU darker than the lesion half of the time (labelled
    tumour as well).
    """
    u = rng.uniform
    counts = np.asarray(_LESION_COUNT_WEIGHTS)
    wanted = int(rng.choice(len(counts), p=counts / counts.sum()))
    lo, hi = anatomy.liver.lo, anatomy.liver.hi
    candidates: list[tuple[_Ellipsoid, float]] = []
    for _ in range(240):
        diameter = math.exp(u(math.log(_LESION_DIAMETER_MM[0]), math.log(_LESION_DIAMETER_MM[1])))
        radii = np.clip(0.5 * diameter * u(0.8, 1.2, 3), 0.5 * _LESION_DIAMETER_MM[0], 0.5 * _LESION_DIAMETER_MM[1])
        candidates.append((_Ellipsoid(u(lo, hi), radii, _rotation(*u(-90, 90, 3))), _lesion_delta(rng)))
    necrotic = [bool(u() < 0.5) for _ in candidates]
    core_delta = [-float(u(10, 30)) for _ in candidates]
    # Cheap first pass on the centres, then full probes in small batches until enough lesions fit.
    centres = _PointCanvas(np.array([e.c for e, _ in candidates]))
    for op in anatomy.ops:
        centres.apply(op)
    survivors = [k for k in range(len(candidates)) if centres.label[k] == 1]
    chosen: list[int] = []
    for b0 in range(0, len(survivors), 16):
        if len(chosen) == wanted:
            break
        batch = survivors[b0 : b0 + 16]
        fits = _fits_in_liver(anatomy, [candidates[k][0] for k in batch], _CLINICAL_MARGIN_MM)
        for k, ok in zip(batch, fits, strict=True):
            if len(chosen) == wanted:
                break
            ellipsoid = candidates[k][0]
            apart = all(
                np.linalg.norm(ellipsoid.c - candidates[j][0].c)
                > ellipsoid.r.max() + candidates[j][0].r.max() + _CLINICAL_MARGIN_MM
                for j in chosen
            )
            if ok and apart:
                chosen.append(k)
    records = []
    for k in chosen:
        ellipsoid, delta = candidates[k]
        anatomy.ops.append(_Paint(ellipsoid, liver_hu + delta, 2, only_label=1))
        diameter = 2.0 * float(np.prod(ellipsoid.r)) ** (1 / 3)
        core = necrotic[k] and diameter > 30.0
        if core:
            inner = _Ellipsoid(ellipsoid.c, ellipsoid.r * 0.5, ellipsoid.rot)
            anatomy.ops.append(_Paint(inner, liver_hu + delta + core_delta[k], 2, only_label=2))
        records.append(
            {
                "center_mm": [round(float(v), 1) for v in ellipsoid.c],
                "radii_mm": [round(float(v), 1) for v in ellipsoid.r],
                "diameter_mm": round(diameter, 1),
                "contrast_hu": round(-delta, 1),
                "necrotic_core": core,
            }
        )
    anatomy.info["tumours"] = records
    anatomy.info["tumours_wanted"] = wanted


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


def _atomic_save(img, path: Path) -> None:
    """Save a nibabel image to a temporary name in the same folder, then rename it into place."""
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def _nifti(data: np.ndarray, affine: np.ndarray):
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    return img


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` in a dataset written with ``seed`` (stable, independent of ``n``)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_dataset(
    out_dir: str | Path,
    task: str = "liver_ct",
    n: int = 10,
    seed: int = 0,
    size: str = "demo",
    n_test: int = 0,
    variety: str = "clinical",
) -> Path:
    """Write synthetic cases in the Medical Segmentation Decathlon layout.

    Cases ``0 .. n-1`` go to ``imagesTr``/``labelsTr`` and cases ``n .. n+n_test-1`` to ``imagesTs`` with their
    labels in ``labelsTs`` (so held-out cases can be scored), named ``liver_XXX.nii.gz``. Case ``i`` is
    ``liver_ct_phantom(case_seed(seed, i), size=size, variety=variety)``. Every file is written under a temporary
    name and renamed when complete; ``dataset.json`` is written last. Files of earlier runs with other names are left.

    The ``cells`` task writes 2D PNGs instead: ``images/cell_XXX.png`` (16-bit fluorescence counts),
    ``labels/cell_XXX.png`` (8-bit, 0 background, 1 cell, touching borders separated) and
    ``instances/cell_XXX.png`` (16-bit instance ids) for training, ``imagesTs``/``labelsTs``/``instancesTs`` for
    the held-out cases; case ``i`` is ``cells_image(case_seed(seed, i))`` and ``size`` is ignored. The
    ``training`` entries of dataset.json carry ``image``, ``label`` and ``instance``.

    Args:
        out_dir: Folder to write (created if missing).
        task: Synthetic task name; see :data:`TASKS`.
        n: Number of training cases.
        seed: Dataset seed.
        size: ``"demo"`` or ``"full"``, see :func:`liver_ct_phantom`.
        n_test: Number of held-out cases.
        variety: ``"clinical"`` (default) or ``"hard"``, see :func:`liver_ct_phantom` (liver_ct only).

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        UserError: Unknown task, size or variety, or negative counts.
    """
    if task not in TASKS:
        raise UserError(f"unknown synthetic task {task!r}; known tasks: {', '.join(sorted(TASKS))}")
    if size not in ("demo", "full"):
        raise UserError(f"size must be 'demo' or 'full', got {size!r}")
    if variety not in VARIETIES:
        raise UserError(f"variety must be one of {', '.join(VARIETIES)}, got {variety!r}")
    if n < 0 or n_test < 0 or n + n_test == 0:
        raise UserError(f"need n >= 0 and n_test >= 0 with at least one case, got n={n}, n_test={n_test}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if task == "cells":
        return _write_cells_dataset(Path(out_dir), n, seed, n_test)
    prefix = TASKS[task]
    root = Path(out_dir)
    folders = {k: root / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for key in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if n_test else ()):
        folders[key].mkdir(parents=True, exist_ok=True)

    training, test = [], []
    for index in range(n + n_test):
        phantom = liver_ct_phantom(case_seed(seed, index), size=size, variety=variety)
        name = f"{prefix}_{index:03d}.nii.gz"
        split = "Tr" if index < n else "Ts"
        _atomic_save(_nifti(phantom.image, phantom.affine), folders[f"images{split}"] / name)
        _atomic_save(_nifti(phantom.label, phantom.affine), folders[f"labels{split}"] / name)
        if split == "Tr":
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")

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


# ----------------------------------------------------------------------------------------------------------
# 2D fluorescence microscopy: many irregular nuclei that touch (the U-Net paper's own kind of task).
# ----------------------------------------------------------------------------------------------------------

CELL_LABELS: dict[str, str] = {"0": "background", "1": "cell"}


@dataclass
class CellImage:
    """One synthetic 2D fluorescence image of cell nuclei.

    Attributes:
        image: uint16 camera counts, array axes (row, column) as stored in the PNG.
        label: uint8 semantic mask, 0 background, 1 cell. Where two cells touch, the one-pixel rim of each cell
            along the contact is background (a two-pixel separating line, as in the U-Net paper's training masks),
            so the connected components of the mask are the cells.
        instances: uint16 instance ids 1..n (0 background); touching cells share a border without a gap.
        info: What was drawn (cell count, touching pairs, blur, photon scale, ...).
    """

    image: np.ndarray
    label: np.ndarray
    instances: np.ndarray
    info: dict[str, object] = field(default_factory=dict)


def _touching_rim(instances: np.ndarray) -> np.ndarray:
    """Pixels of a cell that have a pixel of another cell among their 8 neighbours."""
    padded = np.pad(instances, 1, mode="constant")
    rim = np.zeros(instances.shape, dtype=bool)
    h, w = instances.shape
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di == 0 and dj == 0:
                continue
            nb = padded[1 + di : 1 + di + h, 1 + dj : 1 + dj + w]
            rim |= (nb > 0) & (nb != instances)
    return rim & (instances > 0)


def _touching_pairs(instances: np.ndarray) -> int:
    """Number of distinct pairs of cells that share a border (4-neighbourhood)."""
    pairs: set[tuple[int, int]] = set()
    for a, b in ((instances[:-1, :], instances[1:, :]), (instances[:, :-1], instances[:, 1:])):
        hit = (a > 0) & (b > 0) & (a != b)
        lo, hi = np.minimum(a[hit], b[hit]), np.maximum(a[hit], b[hit])
        pairs.update(zip(lo.tolist(), hi.tolist(), strict=True))
    return len(pairs)


def cells_image(seed: int, shape: tuple[int, int] = (256, 256)) -> CellImage:
    """Make one synthetic fluorescence image of densely packed, irregular, often touching nuclei.

    Each nucleus is a star-convex shape: a randomly elongated and rotated ellipse (mean radius 8-16 px, semi-axes up
    to about 20 px) whose radius is modulated by harmonics 2-5. Half of the nuclei are placed next to an earlier one
    so that their shapes overlap; every pixel goes to the nucleus in whose shape it lies deepest (smallest
    normalised radius), so touching nuclei share a curved border and never overlap. The intensity of a nucleus
    falls off toward its edge (a faint dip along the contact of two nuclei) and carries a fine texture; the field
    has uneven illumination and a background haze, then a Gaussian blur, Poisson photon noise, Gaussian read noise
    and a camera offset.

    Args:
        seed: Non-negative integer; the same seed gives byte-identical arrays.
        shape: (rows, columns) of the image.

    Returns:
        The image (uint16), the semantic mask with touching borders separated, and the instance ids.

    Raises:
        UserError: A negative seed or a shape under 32 pixels.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if len(shape) != 2 or min(shape) < 32:
        raise UserError(f"shape must be two sizes of at least 32 pixels, got {shape!r}")
    h, w = int(shape[0]), int(shape[1])
    rng = np.random.default_rng([int(seed), 7])

    # Placement: centres and mean radii, half of them next to an earlier nucleus.
    n_target = int(rng.integers(28, 48) * (h * w) / 256**2)
    centres: list[np.ndarray] = []
    radii: list[float] = []
    for _ in range(n_target * 60):
        if len(centres) >= n_target:
            break
        r = float(rng.uniform(8.0, 16.0))
        if centres and rng.random() < 0.55:
            j = int(rng.integers(len(centres)))
            angle = rng.uniform(0, 2 * math.pi)
            c = centres[j] + (radii[j] + r) * rng.uniform(0.78, 0.95) * np.array([math.cos(angle), math.sin(angle)])
        else:
            c = rng.uniform([-4.0, -4.0], [h + 4.0, w + 4.0])
        if not (0 <= c[0] < h and 0 <= c[1] < w):
            continue
        if any(np.hypot(*(c - cc)) < 0.74 * (r + rr) for cc, rr in zip(centres, radii, strict=True)):
            continue
        centres.append(c)
        radii.append(r)

    best = np.full((h, w), np.inf)
    owner = np.zeros((h, w), dtype=np.int32)
    for k, (c, r) in enumerate(zip(centres, radii, strict=True), start=1):
        elong = float(rng.uniform(1.0, 1.6))
        a, b = r * math.sqrt(elong), r / math.sqrt(elong)
        alpha = rng.uniform(0, math.pi)
        harmonics = [(kk, rng.uniform(0, 0.16 / kk * 2), rng.uniform(0, 2 * math.pi)) for kk in range(2, 6)]
        reach = a * (1 + sum(x[1] for x in harmonics)) + 2
        r0, r1 = max(0, int(c[0] - reach)), min(h, int(c[0] + reach) + 2)
        c0, c1 = max(0, int(c[1] - reach)), min(w, int(c[1] + reach) + 2)
        yy, xx = np.mgrid[r0:r1, c0:c1].astype(np.float64)
        dy, dx = yy - c[0], xx - c[1]
        u = math.cos(alpha) * dx + math.sin(alpha) * dy
        v = -math.sin(alpha) * dx + math.cos(alpha) * dy
        rho = np.sqrt((u / a) ** 2 + (v / b) ** 2)
        theta = np.arctan2(v / b, u / a)
        bump = 1.0 + sum(amp * np.cos(kk * theta + ph) for kk, amp, ph in harmonics)
        q = rho / bump
        box = (slice(r0, r1), slice(c0, c1))
        take = (q < 1.0) & (q < best[box])
        best[box][take] = q[take]
        owner[box][take] = k

    # Consecutive ids for the nuclei that kept pixels.
    kept = np.unique(owner[owner > 0])
    relabel = np.zeros(len(centres) + 1, dtype=np.uint16)
    relabel[kept] = np.arange(1, kept.size + 1, dtype=np.uint16)
    instances = relabel[owner]
    label = ((instances > 0) & ~_touching_rim(instances)).astype(np.uint8)

    # Intensities: a bright interior falling off toward the edge, with texture.
    brightness = np.concatenate([[0.0], rng.uniform(0.45, 1.0, kept.size)])
    q = np.where(instances > 0, np.minimum(best, 1.0), 1.0)
    texture = ndimage.gaussian_filter(rng.standard_normal((h, w)), 1.2)
    texture /= max(float(texture.std()), 1e-6)
    cells = brightness[instances] * (1.0 - 0.55 * q**3) * (1.0 + 0.12 * texture)
    cells[instances == 0] = 0.0

    # Uneven illumination (a broad off-centre spot and a gradient) and background haze.
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    spot = rng.uniform([0, 0], [h, w])
    width = rng.uniform(0.5, 0.9) * max(h, w)
    tilt = rng.uniform(-0.25, 0.25, 2)
    light = 0.55 + 0.6 * np.exp(-((yy - spot[0]) ** 2 + (xx - spot[1]) ** 2) / (2 * width**2))
    light *= 1.0 + tilt[0] * (yy / h - 0.5) + tilt[1] * (xx / w - 0.5)
    haze = 0.06 + 0.04 * ndimage.gaussian_filter(rng.standard_normal((h, w)), 12.0) * 12.0
    signal = (cells + np.clip(haze, 0.01, None)) * light

    blur = float(rng.uniform(1.0, 1.8))
    signal = ndimage.gaussian_filter(signal, blur, mode="reflect")
    photons = float(rng.uniform(120.0, 500.0))
    read_sd, offset, gain = float(rng.uniform(2.0, 6.0)), 100.0, 2.0
    counts = rng.poisson(np.clip(signal, 0, None) * photons) * gain + rng.normal(0.0, read_sd, (h, w)) + offset
    image = np.clip(np.rint(counts), 0, 65535).astype(np.uint16)
    info: dict[str, object] = {
        "seed": int(seed),
        "shape": [h, w],
        "cells": int(kept.size),
        "touching_pairs": _touching_pairs(instances),
        "blur_sigma_px": round(blur, 3),
        "photons_per_unit": round(photons, 1),
        "read_noise_sd": round(read_sd, 2),
    }
    return CellImage(image=image, label=label, instances=instances, info=info)


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write a 2D array as a PNG (8-bit for uint8, 16-bit for uint16) under a temporary name, then rename."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(array)).save(tmp, format="PNG")


def _write_cells_dataset(root: Path, n: int, seed: int, n_test: int) -> Path:
    """The ``cells`` task of :func:`write_dataset` (PNG files; see there)."""
    sub = {"Tr": ("images", "labels", "instances"), "Ts": ("imagesTs", "labelsTs", "instancesTs")}
    for split, count in (("Tr", n), ("Ts", n_test)):
        if count:
            for folder in sub[split]:
                (root / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(n + n_test):
        cell = cells_image(case_seed(seed, index))
        name = f"{TASKS['cells']}_{index:03d}.png"
        split = "Tr" if index < n else "Ts"
        img_dir, lab_dir, inst_dir = sub[split]
        _save_png(cell.image, root / img_dir / name)
        _save_png(cell.label, root / lab_dir / name)
        _save_png(cell.instances, root / inst_dir / name)
        entry = {"image": f"./{img_dir}/{name}", "label": f"./{lab_dir}/{name}", "instance": f"./{inst_dir}/{name}"}
        if split == "Tr":
            training.append(entry)
        else:
            test.append(entry["image"])
    dataset = {
        "name": "SyntheticCells",
        "description": "Synthetic 2D fluorescence images of touching cell nuclei from volseg (semantic masks with "
        "separated touching borders, and instance masks)",
        "reference": "volseg.data.synth (generated, not patient data)",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "2D",
        "modality": {"0": "fluorescence microscopy"},
        "labels": dict(CELL_LABELS),
        "numTraining": n,
        "numTest": n_test,
        "training": training,
        "test": test,
        "synthetic": {"generator": "volseg.data.synth.cells_image", "seed": int(seed), "shape": [256, 256]},
    }
    return write_text_atomic(root / "dataset.json", json.dumps(dataset, indent=2) + "\n")
