"""Analytic shapes in the liver phantom's patient frame, and the canvases that paint them (points or a voxel grid)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

_INF = math.inf


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
