"""A second, independently built family of synthetic torso CT scans, for held-out evaluation only.

Do not train on these cases. They exist so that "the model generalises" can be measured on images that
:mod:`volseg.data.synth` did not make: the anatomy, the intensity model and the scanner model are all built
differently, and share only the label contract (0 background, 1 liver, 2 tumour) and the file layout.

How they differ from :mod:`volseg.data.synth`:

* Shapes are voxelised on a patient-frame model lattice (1.5 mm for ``size="full"``, 2.5 mm for ``"demo"``) in
  the DICOM LPS patient frame (x toward the patient's left, y posterior, z superior), as soft occupancies: the
  fraction of 8 sub-points per lattice voxel inside the shape (partial volume from supersampling).
* The liver is a union of superquadrics (exponents 2.3-3.4, boxier than ellipsoids) whose implicit function is
  displaced by a smoothed random field drawn on a coarse 15 mm grid and upsampled; the spleen and stomach are
  superquadrics, the kidneys superquadrics with a medial hilar notch and a distinct medulla; aorta and IVC are
  wavy tubes, vertebrae are stacked superquadric blocks with discs and posterior elements, the ribs are tilted
  toroidal arcs, bowel is a thresholded smooth random field (fluid and gas), the body a superellipse with a
  fat layer thicker in front, the lungs sit above a curved diaphragm with the heart between them, and long
  scans reach the iliac wings and the bladder.
* Intensities: tissue means drawn per case (liver 50-150 HU, spleen the liver -20 to +35 HU), each tissue with
  its own amount of a shared correlated texture (filtered noise, 3-4 mm), beam-hardening-like streaks radiating
  from the vertebral body in a few directions, a slice-profile average of 3 samples across the slice thickness,
  and noise whose SD (6-35 HU at the body centre) falls toward the skin, as the photon count through the body
  does.
* Lesions (0-5 per liver, 8-50 mm across, lobulated): plain hypodense (20-80 HU below the liver), cysts
  (0-15 HU), rim-enhancing (a 2-4 mm rim 10-40 HU above the liver around a core 30-70 HU below it), necrotic
  (a wall 15-35 HU below the liver around a 10-25 HU core) or hyperdense (20-60 HU above the liver). They are
  placed by the distance transform of the liver mask, at least 3 mm inside it. Everything within a lesion is
  label 2.
* The grid: the array axes are LPS or RAS, tilted 1-6 degrees about a random axis (oblique), anisotropic voxels
  (``"full"``: 512 x 512, 0.55-0.95 mm in-plane, 1.5-5 mm slices; ``"demo"``: at most 192 x 192 x 96), with the
  patient rotated up to 4 degrees and off-centre in the field of view. Fields of view run from the liver dome
  (plus 15-60 mm) down 40-250 mm below the liver.

On a busy 2-core machine a full case (512 x 512 x 266) took 50 s with a peak of 0.85 GB, a demo case
(192 x 192 x 96) 3-5 s and 0.3 GB.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from volseg.data.synth_base import LABELS, Phantom
from volseg.errors import UserError
from volseg.fileio import atomic_path, write_text_atomic

__all__ = ["TORSO_PREFIX", "torso_case_seed", "torso_ct_phantom", "write_torso_dataset"]

TORSO_PREFIX = "torso"
"""File prefix of the cases written by :func:`write_torso_dataset`."""

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_SUB = 2  # sub-points per axis for the occupancies
_INSIDE_LESION_MARGIN_MM = 3.0
_DEMO_MATRIX = 192
_DEMO_SLICES = 96
_FULL_MATRIX = 512

Inside = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


@dataclass
class _Lattice:
    """Model lattice in the LPS patient frame: voxel (a, b, c) has centre ``lo + h * (a, b, c)``."""

    lo: np.ndarray
    h: float
    shape: tuple[int, int, int]

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        first = np.maximum(np.floor((np.asarray(lo) - self.lo) / self.h).astype(int) - 1, 0)
        last = np.minimum(np.ceil((np.asarray(hi) - self.lo) / self.h).astype(int) + 2, self.shape)
        if np.any(first >= last):
            return None
        return (slice(first[0], last[0]), slice(first[1], last[1]), slice(first[2], last[2]))

    def coords(self, box: tuple[slice, slice, slice], offset: np.ndarray):
        axes = []
        for a in range(3):
            idx = np.arange(box[a].start, box[a].stop, dtype=np.float32)
            c = (self.lo[a] + self.h * idx + offset[a]).astype(np.float32)
            shape = [1, 1, 1]
            shape[a] = -1
            axes.append(c.reshape(shape))
        return axes


def _occupancy(lattice: _Lattice, inside: Inside, lo, hi) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
    """Fraction of the 8 sub-points of each lattice voxel in the bounding box (lo, hi) that lie inside."""
    box = lattice.box(np.asarray(lo, float), np.asarray(hi, float))
    if box is None:
        return None
    shape = tuple(s.stop - s.start for s in box)
    occ = np.zeros(shape, dtype=np.float32)
    steps = (np.arange(_SUB) + 0.5) / _SUB - 0.5
    for dx in steps:
        for dy in steps:
            for dz in steps:
                x, y, z = lattice.coords(box, lattice.h * np.array([dx, dy, dz]))
                occ += np.broadcast_to(inside(x, y, z), shape)
    occ /= _SUB**3
    return box, occ


def _superquadric(c, r, e: float, rot: np.ndarray | None = None):
    """Normalised radius of a superquadric (< 1 inside): (|u/a|^e + |v/b|^e + |w/c|^e)^(1/e)."""
    c = np.asarray(c, float)
    r = np.asarray(r, float)
    rot = np.eye(3) if rot is None else rot

    cx, cy, cz = (float(v) for v in c)
    coef = [[float(rot[w, a] / r[a]) for w in range(3)] for a in range(3)]  # Python floats keep float32 math

    def g(x, y, z):
        d = (x - cx, y - cy, z - cz)
        total = 0.0
        for a in range(3):
            u = coef[a][0] * d[0] + coef[a][1] * d[1] + coef[a][2] * d[2]
            total = total + np.abs(u) ** float(e)
        return total ** (1.0 / float(e))

    half = np.abs(rot) @ r + 1.0  # the shape lies in its own box [-r, r]^3 (e >= 2)
    return g, c - half, c + half


def _level(g: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], level: float) -> Inside:
    """The region where ``g`` is below ``level``."""

    def inside(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return g(x, y, z) < level

    return inside


def _rot(axis, deg: float) -> np.ndarray:
    n = np.asarray(axis, float)
    n = n / np.linalg.norm(n)
    k = np.array([[0, -n[2], n[1]], [n[2], 0, -n[0]], [-n[1], n[0], 0]])
    a = math.radians(deg)
    return np.eye(3) + math.sin(a) * k + (1 - math.cos(a)) * (k @ k)


class _Field:
    """A smooth random scalar field: Gaussian-filtered noise on a coarse grid, upsampled linearly."""

    def __init__(self, rng: np.random.Generator, lo, hi, step: float, smooth: float) -> None:
        self.lo = np.asarray(lo, float) - 2 * step
        self.step = step
        n = np.ceil((np.asarray(hi, float) + 2 * step - self.lo) / step).astype(int) + 1
        raw = ndimage.gaussian_filter(rng.standard_normal(tuple(n)), smooth, mode="wrap")
        self.grid = (raw / max(float(raw.std()), 1e-6)).astype(np.float32)

    def __call__(self, x, y, z) -> np.ndarray:
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        pts = [np.broadcast_to((v - self.lo[a]) / self.step, shape).ravel() for a, v in enumerate((x, y, z))]
        return ndimage.map_coordinates(self.grid, pts, order=1, mode="nearest").reshape(shape)


@dataclass
class _Model:
    lattice: _Lattice
    hu: np.ndarray  # float32 intensity on the lattice
    liver: np.ndarray  # float32 liver occupancy (lesions included)
    lesion: np.ndarray  # float32 lesion occupancy
    body_axes: tuple[float, float]
    spine_xy: tuple[float, float]
    liver_z: tuple[float, float]
    info: dict[str, object]


def _paint(model_hu: np.ndarray, box, occ: np.ndarray, value) -> None:
    """hu = hu * (1 - occ) + value * occ inside ``box`` (value: a number or an array of the box's shape)."""
    region = model_hu[box]
    region += occ * (np.asarray(value, dtype=np.float32) - region)


def _near(
    cx: float, cy: float, rx: float, ry: float, z_lo: float = -1e9, z_hi: float = 1e9
) -> tuple[np.ndarray, np.ndarray]:
    """The box around (cx, cy) with half sides (rx, ry), from z_lo to z_hi."""
    return np.array([cx - rx, cy - ry, z_lo]), np.array([cx + rx, cy + ry, z_hi])


@dataclass
class _Torso:
    """The drawn patient: scale, body outline and the visceral cavity, and where the spine lies."""

    scale: float
    A: float  # body half width (mm)
    B: float  # body half depth (mm)
    p_body: float  # superellipse exponent of the body outline
    shift: float  # the inner outlines' shift toward the back (fat thicker in front)
    cav_a: float
    cav_b: float
    spine_x: float
    spine_y: float

    def superellipse(self, ax: float, bx: float) -> Inside:
        p_body = self.p_body

        def inside(x, y, z):
            waist = 1.0 + 0.04 * np.sin(z / 140.0)
            return (np.abs(x / (ax * waist)) ** p_body + np.abs(y / (bx * waist)) ** p_body) <= 1.0

        return inside

    def shifted(self, ax: float, bx: float) -> Inside:
        base, shift = self.superellipse(ax, bx), self.shift
        return lambda x, y, z: base(x, y - shift, z)

    def cavity(self, x, y, z) -> np.ndarray:
        return self.shifted(self.cav_a, self.cav_b)(x, y, z)


class _Painter:
    """Paints tissues into the model lattice. Once the liver is painted, later paints take their voxels away from
    the liver occupancy."""

    def __init__(self, lattice: _Lattice, hu: dict[str, float], texture_amp: dict[str, float]) -> None:
        self.lattice = lattice
        self.hu = hu
        self.texture_amp = texture_amp
        shape = lattice.shape
        self.model_hu = np.full(shape, -1000.0, dtype=np.float32)
        self.liver_occ = np.zeros(shape, dtype=np.float32)
        self.lesion_occ = np.zeros(shape, dtype=np.float32)
        self.texture = np.zeros(0, dtype=np.float32)
        self.after_liver = False

    def draw_texture(self, rng: np.random.Generator) -> None:
        """The shared correlated texture (filtered noise, 3.5 mm)."""
        shape, h = self.lattice.shape, self.lattice.h
        texture = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 3.5 / h, mode="wrap")
        texture /= max(float(texture.std()), 1e-6)
        self.texture = texture

    def paint(self, inside: Inside, lo_, hi_, name: str, value: float | None = None, textured: bool = False):
        found = _occupancy(self.lattice, inside, lo_, hi_)
        if found is None:
            return None
        box, occ = found
        v = self.hu[name] if value is None else value
        painted = (v + self.texture_amp.get(name, 3.0) * self.texture[box]).astype(np.float32) if textured else v
        _paint(self.model_hu, box, occ, painted)
        if self.after_liver:
            self.liver_occ[box] *= 1.0 - occ
        return box, occ


def _draw_tissues(rng: np.random.Generator) -> tuple[float, tuple[float, ...], dict[str, float], dict[str, float]]:
    """Patient scale, the body's shape numbers (A, B, p_body, fat_side, fat_front, wall), HU and texture tables."""
    u = rng.uniform
    scale = u(0.85, 1.2)
    A, B = scale * u(145, 185), scale * u(100, 130)  # body half width / depth (mm)
    p_body = u(2.0, 2.6)
    fat_side, fat_front = scale * u(6, 30), scale * u(10, 45)
    wall = u(7, 13)
    liver_hu = u(50, 150)
    hu = {
        "fat": u(-125, -85),
        "visceral_fat": u(-115, -70),
        "muscle": u(35, 65),
        "liver": liver_hu,
        "spleen": liver_hu + u(-20, 35),
        "kidney": u(120, 220),
        "medulla": u(60, 160),
        "aorta": u(120, 350),
        "ivc": u(80, 200),
        "portal": liver_hu + u(15, 70),
        "bone": u(700, 1100),
        "marrow": u(150, 300),
        "disc": u(60, 100),
        "lung": u(-900, -750),
        "heart": u(40, 250),
        "gallbladder": u(0, 25),
        "bowel_fluid": u(0, 35),
        "stomach": u(5, 40),
        "bladder": u(0, 20),
    }
    texture_amp = {"liver": u(4, 10), "spleen": u(3, 8), "muscle": u(3, 8), "fat": u(5, 12), "kidney": u(5, 12)}
    return scale, (A, B, p_body, fat_side, fat_front, wall), hu, texture_amp


def _draw_liver(rng: np.random.Generator, scale: float):
    """The liver's implicit function (a union of superquadrics plus a bump field) and its bounds."""
    u = rng.uniform
    e_liver = u(2.3, 3.4)
    lobes = [
        ((-62, 0, 0), (60, 74, 74), (1, 0.2, 0.1), u(-15, 15)),
        ((18, -42, 22), (55, 28, 26), (0.1, 0.3, 1), u(-20, 20)),
        ((-18, 8, 8), (24, 22, 30), (0, 0, 1), u(-15, 15)),
        ((-70, -10, -48), (32, 44, 36), (0.3, 1, 0), u(-15, 15)),
    ]
    parts = []
    for c, r, axis, deg in lobes:
        cc = scale * (np.asarray(c, float) + u(-7, 7, 3))
        rr = scale * np.asarray(r, float) * u(0.85, 1.15, 3)
        parts.append(_superquadric(cc, rr, e_liver, _rot(axis, deg)))
    lo = np.min([p[1] for p in parts], axis=0)
    hi = np.max([p[2] for p in parts], axis=0)
    bumps = _Field(rng, lo, hi, 15.0, 1.0)
    bump_amp = u(0.07, 0.14)

    def liver_g(x, y, z, bump):
        g = parts[0][0](x, y, z)
        for p in parts[1:]:
            g = np.minimum(g, p[0](x, y, z))
        return g + bump_amp * bump

    return liver_g, bumps, lo, hi


def _paint_walls(painter: _Painter, t: _Torso, full_lo: np.ndarray, full_hi: np.ndarray, inner) -> None:
    """Body layers (fat thicker in front, i.e. at negative y; muscle wall; visceral cavity), paraspinal muscles
    and psoas."""
    s, paint = t.scale, painter.paint
    paint(t.superellipse(t.A, t.B), full_lo, full_hi, "fat", textured=True)
    paint(t.shifted(*inner), full_lo, full_hi, "muscle", textured=True)
    paint(t.cavity, full_lo, full_hi, "visceral_fat")
    spine_y = t.spine_y
    for side in (1.0, -1.0):
        px, py = side * 38 * s, spine_y + 40 * s
        para = _superquadric((px, py, 0), (30 * s, 24 * s, 1e4), 2.2)
        paint(_level(para[0], 1.0), *_near(px, py, 31 * s, 25 * s), "muscle", textured=True)

        def psoas(x, y, z, side=side):
            r = s * (12 + np.clip(-(z + 40) * 0.08, 0, 14))
            return ((x - side * 42 * s) ** 2 + (y - spine_y + 5) ** 2 <= r**2) & (z < -40 * s)

        box_lo, box_hi = _near(side * 42 * s, spine_y - 5, 27 * s, 27 * s, z_hi=-40 * s)
        paint(psoas, box_lo, box_hi, "muscle", textured=True)


def _paint_bowel(rng: np.random.Generator, painter: _Painter, t: _Torso, bottom: float) -> None:
    """A thresholded smooth random field on the lattice below the liver (soft edges), fluid and gas."""
    lattice, hu, model_hu = painter.lattice, painter.hu, painter.model_hu
    shape, h = lattice.shape, lattice.h
    bowel_top = bottom + 30 * t.scale
    bowel_field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 7.0 / h, mode="wrap")
    bowel_field /= max(float(bowel_field.std()), 1e-6)
    gas_field = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), 9.0 / h, mode="wrap")
    gas_field /= max(float(gas_field.std()), 1e-6)
    gas_cut = rng.uniform(0.6, 1.2)
    everything = (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    x_all, y_all, z_all = lattice.coords(everything, np.zeros(3))
    room = (t.cavity(x_all, y_all, z_all) & (z_all < bowel_top) & (y_all < t.spine_y - 25)).astype(np.float32)
    bowel_occ = np.clip((bowel_field - 0.3) / 0.25 + 0.5, 0, 1) * room
    _paint(model_hu, everything, bowel_occ, hu["bowel_fluid"])
    _paint(model_hu, everything, bowel_occ * np.clip((gas_field - gas_cut) / 0.25 + 0.5, 0, 1), -1000.0)


def _paint_stomach_kidneys_spleen(rng: np.random.Generator, painter: _Painter, t: _Torso) -> None:
    """Stomach (patient left, anterior) with gas anteriorly (negative y); kidneys with a medial hilar notch and a
    medulla; spleen."""
    u, s, paint, cavity = rng.uniform, t.scale, painter.paint, t.cavity
    st = _superquadric(s * np.array([55, -35, 25]) + u(-6, 6, 3), s * np.array([38, 30, 45]), 2.0)
    st_level = st[1][1] + (st[2][1] - st[1][1]) * u(0.25, 0.5)
    paint(lambda x, y, z: st[0](x, y, z) < 1, st[1], st[2], "stomach")
    paint(lambda x, y, z: (st[0](x, y, z) < 0.88) & (y < st_level), st[1], st[2], "stomach", -1000.0)
    for side, zc in ((-1.0, -62.0), (1.0, -48.0)):
        kc = np.array([side * 72 * s, t.spine_y - 5, zc * s]) + u(-5, 5, 3)
        kr = s * np.array([26, 22, 54]) * u(0.9, 1.1, 3)
        k = _superquadric(kc, kr, 2.2, _rot((0.2, 1.0, 0.1), side * u(10, 30)))
        notch = kc + np.array([-side * kr[0] * 0.95, 0, 0])
        g_kidney, notch_r = k[0], float(kr[0] * 0.55)

        def kidney(x, y, z, g=g_kidney, n=notch, rr=notch_r):
            return (g(x, y, z) < 1) & ((x - n[0]) ** 2 + (y - n[1]) ** 2 + (z - n[2]) ** 2 > rr**2)

        def medulla(x, y, z, g=g_kidney, whole=kidney):
            return whole(x, y, z) & (g(x, y, z) < 0.7)

        paint(kidney, k[1], k[2], "kidney", textured=True)
        paint(medulla, k[1], k[2], "medulla")
    sp = _superquadric(
        s * np.array([88, 30, 12]) + u(-6, 6, 3),
        s * np.array([22, 52, 46]) * u(0.8, 1.15, 3),
        2.0,
        _rot((0, 0, 1), u(-40, -20)),
    )
    paint(lambda x, y, z: (sp[0](x, y, z) < 1) & cavity(x, y, z), sp[1], sp[2], "spleen", textured=True)


def _paint_liver(painter: _Painter, t: _Torso, liver_g, bumps: _Field, lo: np.ndarray, hi: np.ndarray):
    """The liver; its smooth displacement is looked up at the nearest lattice voxel (it varies over ~15 mm).
    Returns the liver's (bottom, dome) in z, from its voxels."""
    lattice = painter.lattice
    lat_lo, h = lattice.lo, lattice.h
    liver_lo, liver_hi = lo - 0.2 * (hi - lo), hi + 0.2 * (hi - lo)
    bump_box = lattice.box(liver_lo, liver_hi)
    if bump_box is None:
        raise RuntimeError("liver outside the model lattice")
    bump_lat = bumps(*lattice.coords(bump_box, np.zeros(3))).astype(np.float32)

    def liver_inside(x, y, z):
        index = [
            np.clip(np.rint((np.ravel(v) - lat_lo[a]) / h).astype(int) - bump_box[a].start, 0, bump_lat.shape[a] - 1)
            for a, v in enumerate((x, y, z))
        ]
        return (liver_g(x, y, z, bump_lat[np.ix_(*index)]) < 1) & t.cavity(x, y, z)

    found = painter.paint(liver_inside, liver_lo, liver_hi, "liver", textured=True)
    if found is None:
        raise RuntimeError("liver outside the model lattice")
    box, occ = found
    painter.liver_occ[box] = occ
    painter.after_liver = True
    bottom, dome = float(lo[2]), float(hi[2])
    rows = np.flatnonzero((painter.liver_occ > 0.5).any(axis=(0, 1)))
    if rows.size:  # the liver's real extent in z, from its voxels
        bottom, dome = float(lat_lo[2] + h * rows[0]), float(lat_lo[2] + h * rows[-1])
    return bottom, dome


def _paint_vessels(rng: np.random.Generator, painter: _Painter, t: _Torso, dome: float) -> None:
    """Intrahepatic portal branches (labelled liver), gallbladder, IVC and aorta (not liver)."""
    u, s, paint, lattice = rng.uniform, t.scale, painter.paint, painter.lattice
    hilum = s * np.array([-28, 5, -20]) + u(-5, 5, 3)
    for _ in range(int(rng.integers(4, 8))):
        direction = np.array([u(-1, 0.3), u(-0.6, 0.6), u(-0.3, 0.7)])
        direction /= np.linalg.norm(direction)
        length, radius = s * u(40, 90), u(2.5, 6)
        end = hilum + direction * length

        def branch(x, y, z, a=hilum, b=end, r=radius):
            ab = b - a
            f = np.clip(((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / float(ab @ ab), 0, 1)
            return (x - a[0] - f * ab[0]) ** 2 + (y - a[1] - f * ab[1]) ** 2 + (z - a[2] - f * ab[2]) ** 2 <= r**2

        found = _occupancy(lattice, branch, np.minimum(hilum, end) - radius, np.maximum(hilum, end) + radius)
        if found is not None:
            bbox, bocc = found
            _paint(painter.model_hu, bbox, bocc * (painter.liver_occ[bbox] > 0.5), painter.hu["portal"])
    gb = _superquadric(s * np.array([-38, -38, -42]) + u(-5, 5, 3), s * np.array([14, 14, 34]), 2.0)
    paint(lambda x, y, z: gb[0](x, y, z) < 1, gb[1], gb[2], "gallbladder")
    ivc_x, ivc_y = -22 * s, t.spine_y - 22 * s

    def ivc(x, y, z):
        return ((x - ivc_x) ** 2 + (y - ivc_y) ** 2 <= (s * 11) ** 2) & (z < dome - 5)

    paint(ivc, *_near(ivc_x, ivc_y, 12 * s, 12 * s), "ivc")
    wobble = u(3, 8)
    aorta_y = t.spine_y - 25 * s

    def aorta(x, y, z):
        cx = 14 * s + wobble * np.sin(z / 70.0)
        return (x - cx) ** 2 + (y - aorta_y) ** 2 <= (s * 12) ** 2

    paint(aorta, *_near(14 * s, aorta_y, wobble + 13 * s, 13 * s), "aorta")


def _paint_chest(painter: _Painter, t: _Torso, dome: float, full_lo: np.ndarray, full_hi: np.ndarray) -> None:
    """Lungs above a curved diaphragm, heart between them."""
    s, cavity = t.scale, t.cavity
    dome_level = dome - 8

    def lungs(x, y, z):
        return cavity(x, y, z) & (z > dome_level + 0.0025 * (x**2 + (y - 20) ** 2))

    painter.paint(lungs, np.array([full_lo[0], full_lo[1], dome_level]), full_hi, "lung")
    heart = _superquadric(s * np.array([15, -25, 0]) + [0, 0, dome + 55 * s], s * np.array([62, 48, 55]), 2.0)
    painter.paint(lambda x, y, z: (heart[0](x, y, z) < 1) & cavity(x, y, z), heart[1], heart[2], "heart")


def _paint_bones(
    rng: np.random.Generator, painter: _Painter, t: _Torso, bottom: float, z_bottom: float, full: tuple
) -> None:
    """Spine: stacked superquadric blocks with discs, posterior elements; ribs; iliac wings and bladder."""
    u, s, paint = rng.uniform, t.scale, painter.paint
    spine_x, spine_y, shift, cav_a, cav_b = t.spine_x, t.spine_y, t.shift, t.cav_a, t.cav_b
    full_lo, full_hi = full
    pitch = s * u(27, 32)
    phase = u(0, pitch)

    def vertebra(x, y, z, shrink: float = 0.0):
        w = np.mod(z - phase, pitch)
        in_block = (w > 3.5 * s + shrink) & (w < pitch - 3.5 * s - shrink)
        rx, ry = s * 20 - shrink, s * 16 - shrink
        body = (np.abs((x - spine_x) / rx) ** 3 + np.abs((y - spine_y) / ry) ** 3) <= 1
        return body & in_block

    def vert_body(x, y, z):
        return (np.abs((x - spine_x) / (s * 20)) ** 3 + np.abs((y - spine_y) / (s * 16)) ** 3) <= 1

    spine_lo, spine_hi = _near(spine_x, spine_y + 15 * s, 22 * s, 32 * s)
    paint(vert_body, spine_lo, spine_hi, "disc")
    paint(vertebra, spine_lo, spine_hi, "bone")
    paint(lambda x, y, z: vertebra(x, y, z, 2.0), spine_lo, spine_hi, "marrow", textured=True)

    def posterior(x, y, z):
        arch = (np.abs(x - spine_x) < s * 14) & (y > spine_y + 17 * s) & (y < spine_y + 45 * s)
        hole = (x - spine_x) ** 2 + (y - spine_y - 27 * s) ** 2 < (s * 8) ** 2
        w = np.mod(z - phase, pitch)
        return arch & ~hole & (w > 5 * s) & (w < pitch - 2 * s)

    paint(posterior, *_near(spine_x, spine_y + 31 * s, 15 * s, 15 * s), "bone")
    rib_pitch, rib_r, tilt = s * u(24, 30), s * u(3.5, 5.5), u(0.4, 0.8)
    rib_mean = 0.5 * (cav_a + cav_b)

    def ribs(x, y, z):
        rho = np.sqrt((x / cav_a) ** 2 + ((y - shift) / cav_b) ** 2)
        radial = (rho - 1.0) * rib_mean - rib_r - 1.5
        w = np.mod(z + tilt * y - phase, rib_pitch) - 0.5 * rib_pitch
        band = (z > bottom - 5 * s) & (np.arctan2(-(y - shift), np.abs(x)) > math.radians(-55))
        return (radial**2 + w**2 <= rib_r**2) & band

    paint(ribs, np.array([full_lo[0], full_lo[1], bottom - 5 * s - 60]), full_hi, "bone")
    if z_bottom < bottom - 100 * s:
        for side in (1.0, -1.0):
            il = _superquadric(
                np.array([side * 88, 15, 0]) * s + [0, 0, bottom - 150 * s],
                s * np.array([12, 55, 50]),
                2.4,
                _rot((0, 0, 1), side * u(20, 35)),
            )
            paint(_level(il[0], 1.0), il[1], il[2], "bone")
            paint(_level(il[0], 0.7), il[1], il[2], "marrow")
        bl = _superquadric(s * np.array([0, -40, 0]) + [0, 0, bottom - 230 * s], s * np.array([42, 32, 32]), 2.0)
        paint(lambda x, y, z: bl[0](x, y, z) < 1, bl[1], bl[2], "bladder")


def _add_streaks(rng: np.random.Generator, painter: _Painter, t: _Torso) -> int:
    """Beam-hardening-like streaks radiating from the vertebral body, within the body; returns their number."""
    u, lattice = rng.uniform, painter.lattice
    lat_lo, h, shape = lattice.lo, lattice.h, lattice.shape
    n_streaks = int(rng.integers(2, 6))
    angles = u(0, 2 * math.pi, n_streaks)
    amps = u(-45, 25, n_streaks)
    xs = lat_lo[0] + h * np.arange(shape[0], dtype=np.float32)
    ys = lat_lo[1] + h * np.arange(shape[1], dtype=np.float32)
    X, Y = np.meshgrid(xs - t.spine_x, ys - t.spine_y, indexing="ij")
    streak = np.zeros(X.shape, dtype=np.float32)
    r = np.hypot(X, Y)
    for ang, amp in zip(angles, amps, strict=True):
        d = np.abs(-np.sin(ang) * X + np.cos(ang) * Y)
        along = np.cos(ang) * X + np.sin(ang) * Y
        streak += (amp * np.exp(-((d / 1.5) ** 2)) * np.exp(-r / 120.0) * (along > 0)).astype(np.float32)
    body2d = (np.abs(xs[:, None] / t.A) ** t.p_body + np.abs(ys[None, :] / t.B) ** t.p_body) <= 1.0
    painter.model_hu += (streak * body2d)[:, :, None]
    return n_streaks


def _build_model(rng: np.random.Generator, h: float) -> _Model:
    u = rng.uniform
    scale, (A, B, p_body, fat_side, fat_front, wall), hu, texture_amp = _draw_tissues(rng)
    # The liver first: it fixes the scan range.
    liver_g, bumps, lo, hi = _draw_liver(rng, scale)
    dome, bottom = float(hi[2]), float(lo[2])  # bounds; refined from the voxels below

    # Scan range in z (patient frame) and the model lattice over the body.
    z_top = dome + u(15, 60)
    z_bottom = bottom - u(40, 250)
    lat_lo = np.array([-A - 5, -B - 5, z_bottom - 15])
    lat_hi = np.array([A + 5, B + 5, z_top + 15])
    shape = tuple(int(v) for v in np.ceil((lat_hi - lat_lo) / h).astype(int) + 1)
    lattice = _Lattice(lat_lo, h, shape)  # type: ignore[arg-type]
    painter = _Painter(lattice, hu, texture_amp)
    painter.draw_texture(rng)

    inner_a, inner_b = A - fat_side, B - 0.5 * (fat_side + fat_front)
    shift = 0.5 * (fat_front - fat_side)
    cav_a, cav_b = inner_a - wall, inner_b - wall
    t = _Torso(scale, A, B, p_body, shift, cav_a, cav_b, 0.0, shift + cav_b - scale * 32)
    _paint_walls(painter, t, lat_lo, lat_hi, (inner_a, inner_b))
    _paint_bowel(rng, painter, t, bottom)
    _paint_stomach_kidneys_spleen(rng, painter, t)
    bottom, dome = _paint_liver(painter, t, liver_g, bumps, lo, hi)
    _paint_vessels(rng, painter, t, dome)
    _paint_chest(painter, t, dome, lat_lo, lat_hi)
    _paint_bones(rng, painter, t, bottom, z_bottom, (lat_lo, lat_hi))

    # The liver's z extent from the voxels, then lesions.
    liver_z = (bottom, dome)
    records = _add_lesions(rng, lattice, painter.model_hu, painter.liver_occ, painter.lesion_occ, hu["liver"])
    n_streaks = _add_streaks(rng, painter, t)
    info: dict[str, object] = {
        "family": "torso",
        "patient_scale": round(float(scale), 3),
        "liver_hu": round(float(hu["liver"]), 1),
        "hu": {k: round(float(v), 1) for k, v in hu.items()},
        "tumours": records,
        "streaks": n_streaks,
    }
    return _Model(
        lattice, painter.model_hu, painter.liver_occ, painter.lesion_occ, (A, B), (t.spine_x, t.spine_y), liver_z, info
    )


def _add_lesions(
    rng: np.random.Generator,
    lattice: _Lattice,
    model_hu: np.ndarray,
    liver_occ: np.ndarray,
    lesion_occ: np.ndarray,
    liver_hu: float,
) -> list[dict[str, object]]:
    """Place 0-5 lobulated lesions of five kinds, at least 3 mm inside the liver (distance transform)."""
    u = rng.uniform
    h = lattice.h
    wanted = int(rng.choice(6, p=[0.1, 0.3, 0.25, 0.15, 0.1, 0.1]))
    mask = liver_occ > 0.5
    if not mask.any():
        return []
    nz = np.nonzero(mask)
    first = np.array([int(v.min()) for v in nz]) - 1
    first = np.maximum(first, 0)
    crop = tuple(slice(int(f), int(v.max()) + 2) for f, v in zip(first, nz, strict=True))
    depth = ndimage.distance_transform_edt(mask[crop]) * h
    records: list[dict[str, object]] = []
    placed: list[tuple[np.ndarray, float]] = []
    kinds = ["hypodense", "cyst", "rim", "necrotic", "hyperdense"]
    for _ in range(wanted):
        diameter = float(u(8, 50))
        radius = 0.5 * diameter
        where = np.flatnonzero(depth > radius * 1.15 + _INSIDE_LESION_MARGIN_MM)
        if where.size == 0:
            diameter, radius = 10.0, 5.0
            where = np.flatnonzero(depth > radius * 1.15 + _INSIDE_LESION_MARGIN_MM)
            if where.size == 0:
                break
        c = None
        for _try in range(40):
            idx = np.array(np.unravel_index(int(where[int(rng.integers(where.size))]), depth.shape)) + first
            cand = lattice.lo + h * idx
            if all(np.linalg.norm(cand - pc) > 1.3 * (radius + pr) + 3.0 for pc, pr in placed):
                c = cand
                break
        if c is None:
            continue
        placed.append((c, radius))
        kind = kinds[int(rng.choice(5, p=[0.4, 0.15, 0.2, 0.15, 0.1]))]
        lobes = [(int(rng.integers(2, 5)), u(0, 2 * math.pi), u(0, math.pi), u(0.04, 0.1)) for _ in range(3)]

        def radial(x, y, z, c=c, lobes=lobes):
            dx, dy, dz = x - c[0], y - c[1], z - c[2]
            dist = np.sqrt(dx * dx + dy * dy + dz * dz)
            theta = np.arctan2(dy, dx)
            phi = np.arccos(np.clip(dz / np.maximum(dist, 1e-6), -1, 1))
            bump = 1.0
            for k, a, b, amp in lobes:
                bump = bump + amp * np.sin(k * theta + a) * np.sin(k * phi + b)
            return dist / bump

        lo, hi = c - radius * 1.4 - 2 * h, c + radius * 1.4 + 2 * h
        outer = _occupancy(lattice, _level(radial, radius), lo, hi)
        if outer is None:
            continue
        box, occ = outer
        occ *= liver_occ[box] > 0.5
        if kind == "hypodense":
            values = [(1.0, liver_hu - u(20, 80))]
        elif kind == "cyst":
            values = [(1.0, u(0, 15))]
        elif kind == "rim":
            rim = u(2, 4)
            values = [(1.0, liver_hu + u(10, 40)), ((radius - rim) / radius, liver_hu - u(30, 70))]
        elif kind == "necrotic":
            values = [(1.0, liver_hu - u(15, 35)), (u(0.4, 0.7), u(10, 25))]
        else:
            values = [(1.0, liver_hu + u(20, 60))]
        _paint(model_hu, box, occ, values[0][1])
        for frac, value in values[1:]:
            inner = _occupancy(lattice, _level(radial, radius * frac), lo, hi)
            if inner is not None:
                _paint(model_hu, inner[0], inner[1] * (liver_occ[inner[0]] > 0.5), value)
        lesion_occ[box] = np.maximum(lesion_occ[box], occ)
        records.append(
            {
                "kind": kind,
                "center_mm": [round(float(v), 1) for v in c],
                "diameter_mm": round(diameter, 1),
                "hu": [round(float(v), 1) for _, v in values],
            }
        )
    return records


def torso_case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a torso data set written with ``seed`` (independent of the liver phantoms')."""
    return int(np.random.SeedSequence([int(seed), int(index), 0x7015]).generate_state(1)[0])


def _check(seed: int, size: str) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if size not in ("demo", "full"):
        raise UserError(f"size must be 'demo' or 'full', got {size!r}")


def _scan_grid(grid_rng: np.random.Generator, model: _Model, size: str) -> dict[str, Any]:
    """The scan grid: square in-plane FOV over the body, z over the lattice's scan range, LPS or RAS, oblique."""
    lat = model.lattice
    u = grid_rng.uniform
    A, B = model.body_axes
    fov = float(np.clip(2 * max(A, B) + u(20, 70), 280, 480))
    z0, z1 = float(lat.lo[2] + 15), float(lat.lo[2] + lat.h * (lat.shape[2] - 1) - 15)
    inplane, thick = u(0.55, 0.95), u(1.5, 5.0)
    if size == "demo":
        inplane, thick = max(inplane, fov / _DEMO_MATRIX), max(thick, (z1 - z0) / _DEMO_SLICES)
    else:
        inplane = fov / _FULL_MATRIX
    n_xy = int(math.ceil(fov / inplane))
    n_z = int(math.ceil((z1 - z0) / thick))
    codes = "LPS" if grid_rng.random() < 0.5 else "RAS"
    flip = np.diag([1.0, 1.0, 1.0]) if codes == "LPS" else np.diag([-1.0, -1.0, 1.0])
    tilt_axis = grid_rng.normal(size=3)
    tilt = _rot(tilt_axis, u(1, 6))
    yaw = _rot((0, 0, 1), u(-4, 4))
    direction_lps = tilt @ flip  # columns: the array axes in the scanner's LPS frame
    spacing = np.array([inplane, inplane, thick])
    dims = np.array([n_xy, n_xy, n_z])
    patient_offset = np.array([u(-25, 25), u(-25, 25), u(-200, 200)])  # patient origin in the scanner frame
    centre_patient = np.array([u(-15, 15), u(-15, 15), 0.5 * (z0 + z1)])
    centre_scanner = yaw @ centre_patient + patient_offset
    m = direction_lps * spacing
    origin = centre_scanner - m @ ((dims - 1) / 2.0)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ m
    affine[:3, 3] = _LPS_TO_RAS @ origin
    affine = affine.astype(np.float32).astype(np.float64)
    # voxel -> patient LPS: p = yaw^T (scanner - offset), scanner = LPS of the affine.
    to_scanner = np.eye(4)
    to_scanner[:3, :3] = _LPS_TO_RAS @ affine[:3, :3]
    to_scanner[:3, 3] = _LPS_TO_RAS @ affine[:3, 3]
    to_patient = yaw.T @ np.hstack([to_scanner[:3, :3], (to_scanner[:3, 3] - patient_offset)[:, None]])
    slice_normal = to_patient[:, 2] / float(np.linalg.norm(to_patient[:, 2]))

    return {"affine": affine, "to_patient": to_patient, "slice_normal": slice_normal, "dims": dims,
            "codes": codes, "fov": fov, "z0": z0, "z1": z1, "inplane": inplane, "thick": thick}  # fmt: skip


def _resample(
    model: _Model, grid: dict[str, Any], noise_sd0: float, noise_rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Resample slab by slab (whole slices): slice profile = mean of 3 samples across the thickness."""
    lat = model.lattice
    A, B = model.body_axes
    to_patient, slice_normal, dims = grid["to_patient"], grid["slice_normal"], grid["dims"]
    thick, inplane = grid["thick"], grid["inplane"]
    nx, ny, nz = (int(v) for v in dims)
    image = np.empty((nx, ny, nz), dtype=np.int16)
    label = np.zeros((nx, ny, nz), dtype=np.uint8)
    ii, jj = np.meshgrid(np.arange(nx, dtype=np.float32), np.arange(ny, dtype=np.float32), indexing="ij")
    per_slab = max(1, 4_000_000 // (nx * ny))
    for k0 in range(0, nz, per_slab):
        k1 = min(nz, k0 + per_slab)
        kk = np.arange(k0, k1, dtype=np.float32)
        pts = (
            to_patient[:, 0, None, None, None] * ii[None, :, :, None]
            + to_patient[:, 1, None, None, None] * jj[None, :, :, None]
            + to_patient[:, 2, None, None, None] * kk[None, None, None, :]
            + to_patient[:, 3, None, None, None]
        ).astype(np.float32)
        idx = (pts - lat.lo[:, None, None, None].astype(np.float32)) / np.float32(lat.h)
        flat = idx.reshape(3, -1)
        hu = np.zeros(flat.shape[1], dtype=np.float32)
        for offset in (-thick / 3.0, 0.0, thick / 3.0):
            shifted = flat + (slice_normal * offset / lat.h).astype(np.float32)[:, None]
            hu += ndimage.map_coordinates(model.hu, shifted, order=1, mode="constant", cval=-1000.0)
        hu /= 3.0
        liver = ndimage.map_coordinates(model.liver, flat, order=1, mode="constant", cval=0.0) > 0.5
        lesion = ndimage.map_coordinates(model.lesion, flat, order=1, mode="constant", cval=0.0) > 0.5
        shape = (nx, ny, k1 - k0)
        lab = np.where(liver, np.where(lesion, 2, 1), 0).astype(np.uint8).reshape(shape)
        # Noise: SD highest at the body centre (longest paths), correlated in-plane.
        px, py = pts[0], pts[1]
        rho2 = np.clip((px / A) ** 2 + ((py - 0.0) / B) ** 2, 0, 1.5)
        sd = noise_sd0 * (1.0 - 0.35 * rho2)
        white = noise_rng.standard_normal(shape, dtype=np.float32)
        corr = 0.8 / inplane
        white = ndimage.gaussian_filter(white, sigma=(corr, corr, 0.0), truncate=3.0, mode="wrap")
        white *= np.float32(1.0 / max(float(white.std()), 1e-6))
        img = hu.reshape(shape) + white * sd.astype(np.float32)
        np.rint(img, out=img)
        np.clip(img, -1024, 3071, out=img)
        image[:, :, k0:k1] = img.astype(np.int16)
        label[:, :, k0:k1] = lab

    return image, label


def torso_ct_phantom(seed: int, *, size: str = "demo") -> Phantom:
    """Make one torso CT of the held-out family (see the module notes); labels 0 background, 1 liver, 2 tumour.

    Args:
        seed: Non-negative integer; the same seed and size give byte-identical arrays.
        size: ``"demo"`` (at most 192 x 192 x 96 voxels) or ``"full"`` (512 x 512 slices).

    Returns:
        int16 HU image, uint8 label and the voxel -> RAS+ affine (as :class:`volseg.data.synth.Phantom`).

    Raises:
        UserError: A negative seed or an unknown size.
    """
    _check(seed, size)
    rng = np.random.default_rng([int(seed), 11])
    grid_rng = np.random.default_rng([int(seed), 12])
    noise_rng = np.random.default_rng([int(seed), 13])
    # The model lattice: 1.5 mm (full) or 2.5 mm (demo), coarser when the demo matrix is capped lower.
    h = 1.5 if size == "full" else max(2.5, 0.75 * 480.0 / _DEMO_MATRIX)
    model = _build_model(rng, h)
    grid = _scan_grid(grid_rng, model, size)
    noise_sd0 = grid_rng.uniform(6, 35)
    image, label = _resample(model, grid, noise_sd0, noise_rng)
    affine, codes, fov, z0, z1 = grid["affine"], grid["codes"], grid["fov"], grid["z0"], grid["z1"]
    nx, ny, nz = (int(v) for v in grid["dims"])

    info = dict(model.info)
    info.update(
        seed=int(seed),
        size=size,
        axcodes=codes,
        spacing=[round(float(v), 4) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0))],
        shape=[nx, ny, nz],
        fov_mm=[round(fov, 1), round(fov, 1), round(z1 - z0, 1)],
        noise_sd_centre=round(float(noise_sd0), 1),
        liver_z_mm=[round(v, 1) for v in model.liver_z],
    )
    return Phantom(image=image, label=label, affine=affine, info=info)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_data_dtype(data.dtype)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units(xyz="mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def write_torso_dataset(root: str | Path, n: int, seed: int = 0, size: str = "demo") -> Path:
    """Write ``n`` held-out torso cases in the MSD layout: ``imagesTs``/``labelsTs`` and ``dataset.json``.

    Held-out evaluation only: ``numTraining`` is 0 and ``training`` is empty, so no volseg recipe can train on
    the folder by mistake. Case ``i`` is ``torso_ct_phantom(torso_case_seed(seed, i), size=size)``, named
    ``torso_XXX.nii.gz``. Files are written under temporary names and renamed; ``dataset.json`` last.

    Args:
        root: Folder to write (created if missing).
        n: Number of cases (at least 1).
        seed: Data-set seed.
        size: ``"demo"`` or ``"full"``, see :func:`torso_ct_phantom`.

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        UserError: A bad count, seed or size.
    """
    _check(seed, size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise UserError(f"n must be a positive integer, got {n!r}")
    out = Path(root)
    for folder in ("imagesTs", "labelsTs"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    test = []
    for index in range(int(n)):
        phantom = torso_ct_phantom(torso_case_seed(seed, index), size=size)
        name = f"{TORSO_PREFIX}_{index:03d}.nii.gz"
        _save(phantom.image, phantom.affine, out / "imagesTs" / name)
        _save(phantom.label, phantom.affine, out / "labelsTs" / name)
        test.append(f"./imagesTs/{name}")
    dataset = {
        "name": "SyntheticTorsoHeldOut",
        "description": "Synthetic torso CT from volseg.data.synth_torso, a generator independent of the training "
        "phantoms (other shapes, organs and intensity model): for held-out evaluation only, do not train on it",
        "reference": "volseg.data.synth_torso (generated, not patient data)",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": dict(LABELS),
        "numTraining": 0,
        "numTest": int(n),
        "training": [],
        "test": test,
        "synthetic": {
            "generator": "volseg.data.synth_torso.torso_ct_phantom",
            "seed": int(seed),
            "size": size,
            "held_out_only": True,
        },
    }
    return write_text_atomic(out / "dataset.json", json.dumps(dataset, indent=2) + "\n")
