"""The liver CT phantom's patient: organs, vessels, bones and lesions drawn from a seed (hard and clinical varieties).

See :mod:`volseg.data.synth_liver` for what a phantom contains and how it is sampled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from volseg.data.synth_shapes import (
    _AddField,
    _axis_rotation,
    _Blobby,
    _Box,
    _Capsule,
    _Cylinder,
    _Ellipsoid,
    _HalfSpace,
    _Paint,
    _PointCanvas,
    _Ring,
    _rotation,
    _Shape,
    _waves,
    _ZBands,
)

_TUMOUR_MARGIN_MM = 5.0
_INF = math.inf


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


@dataclass
class _Body:
    """The drawn patient's frame: size, body and cavity half axes, HU table, and the cavity shape."""

    s: float  # patient scale
    a: float  # body half width (mm)
    b: float  # body half depth (mm)
    fat: float  # subcutaneous fat (mm)
    ac: float  # visceral cavity half width (mm)
    bc: float  # visceral cavity half depth (mm)
    hu: dict[str, float]
    noise_sd: float
    protocol: _Protocol | None
    cavity: _Cylinder


@dataclass
class _Spine:
    """Where the vertebral bodies sit (the kidneys, vessels and spine are placed from it)."""

    rv: float  # vertebral body radius (mm)
    yv: float  # vertebral body centre, y (mm)
    canal_y: float  # spinal canal centre, y (mm)


def _draw_hu(u: Callable[..., Any]) -> dict[str, float]:
    return {
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


def _draw_body(rng: np.random.Generator, clinical: np.random.Generator | None) -> _Body:
    """Patient size, body, fat and cavity, the HU table and the noise (the clinical protocol where given)."""
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
    hu = _draw_hu(u)
    hu["spleen"] = float(np.clip(hu["liver"] + u(-6, 4), 100, 110))  # close to the liver on purpose
    noise_sd = u(15, 25)
    if protocol is not None:
        hu.update(protocol.hu)
        noise_sd = protocol.noise_sd
    return _Body(s, a, b, fat, ac, bc, hu, noise_sd, protocol, _Cylinder(0, 0, ac, bc))


def _draw_liver(rng: np.random.Generator, s: float) -> tuple[_Blobby, float]:
    """The liver: right lobe, left lobe, caudate, inferior tip of the right lobe; and the dome's z."""
    u = rng.uniform
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
    return liver, float(max(p.hi[2] for p in parts))


def _draw_back_and_lungs(rng: np.random.Generator, body: _Body, dome: float) -> tuple[_Spine, list[_Paint]]:
    """The spine's position, the paraspinal and psoas muscles, and the lung bases."""
    u = rng.uniform
    s, a, b, fat, hu, cavity = body.s, body.a, body.b, body.fat, body.hu, body.cavity
    rv = s * u(16, 19)
    yv = -body.bc + s * 25
    canal_y = yv - rv - 9 * s
    ops = [
        _Paint(_Cylinder(s * 35, -b + fat + s * 22, s * 28, s * 22), hu["muscle"], within=(_Cylinder(0, 0, a, b),)),
        _Paint(_Cylinder(-s * 35, -b + fat + s * 22, s * 28, s * 22), hu["muscle"], within=(_Cylinder(0, 0, a, b),)),
        _Paint(_Cylinder(s * 38, yv - 2, s * 15, s * 18, z1=-40 * s), hu["muscle"]),
        _Paint(_Cylinder(-s * 38, yv - 2, s * 15, s * 18, z1=-40 * s), hu["muscle"]),
    ]
    lung_r = _Ellipsoid((75 * s, -10 * s, dome + 130 * s), (65 * s, 85 * s, 150 * s))
    lung_l = _Ellipsoid((-72 * s, -10 * s, dome + 120 * s), (62 * s, 85 * s, 150 * s))
    ops += [_Paint(lung_r, hu["lung"], within=(cavity,)), _Paint(lung_l, hu["lung"], within=(cavity,))]
    return _Spine(rv, yv, canal_y), ops


def _draw_bowel(rng: np.random.Generator, body: _Body) -> list[_Paint]:
    """Bowel loops: enhancing wall, 0-40 HU content, some with gas on the anterior (non-dependent) side."""
    u = rng.uniform
    s, ac, bc, hu, cavity = body.s, body.ac, body.bc, body.hu, body.cavity
    ops: list[_Paint] = []
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
    return ops


def _draw_stomach_and_kidneys(rng: np.random.Generator, body: _Body, spine: _Spine) -> list[_Paint]:
    """The stomach (upper left) with an air-fluid level; the kidneys (right lower than left), with renal sinus
    fat and pelvis on the medial side."""
    u = rng.uniform
    s, hu, cavity = body.s, body.hu, body.cavity
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
    ops = [
        _Paint(stomach, hu["bowel_wall"], within=(cavity,)),
        _Paint(lumen_s, hu["stomach_content"], within=(cavity,)),
        _Paint(lumen_s, -1000.0, within=(cavity, _HalfSpace(1, gas_level, True))),
    ]
    for side, zc in ((1.0, -60.0), (-1.0, -45.0)):
        c = np.array([side * 70 * s, spine.yv - 2 * s, zc * s]) + u(-5, 5, 3)
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
    return ops


def _draw_upper_organs(rng: np.random.Generator, body: _Body, dome: float, liver: _Blobby) -> list[_Paint]:
    """Pancreas, spleen and heart, then the liver painted over them."""
    u = rng.uniform
    s, hu, cavity = body.s, body.hu, body.cavity
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
    return [
        _Paint(pancreas, hu["pancreas"], within=(cavity,)),
        _Paint(spleen, hu["spleen"], within=(cavity,)),
        _Paint(heart, hu["heart"], within=(cavity,)),
        _Paint(liver, hu["liver"], 1, within=(cavity,)),
    ]


def _draw_vessels(rng: np.random.Generator, body: _Body, spine: _Spine, dome: float) -> list[_Paint]:
    """Intrahepatic vessels (portal branches from the hilum, hepatic veins converging on the IVC), the
    gallbladder, the IVC and the aorta."""
    u = rng.uniform
    s, hu, cavity = body.s, body.hu, body.cavity
    hilum = s * _jitter(rng, (30, -5, -25), 6)
    ivc_x, ivc_y = 22 * s, spine.yv + spine.rv + 8 * s
    ivc_top = np.array([ivc_x, ivc_y, dome - 15 * s])
    vessels = [(hilum, s * _jitter(rng, t, 10), u(4, 7)) for t in ((85, 15, 10), (80, -35, 5), (-25, 35, 20))]
    vessels += [(ivc_top, s * _jitter(rng, t, 10), u(3, 6)) for t in ((95, -10, 45), (45, 35, 40), (-25, 40, 35))]
    for start, end, radius in list(vessels):  # two smaller branches off each trunk
        trunk = end - start
        for _ in range(2):
            fork = start + u(0.45, 0.9) * trunk
            bend = _axis_rotation(rng.normal(size=3), u(25, 50)) @ (trunk / np.linalg.norm(trunk))
            vessels.append((fork, fork + bend * s * u(30, 60), 0.6 * radius))
    ops = [_Paint(_Capsule(start, end, radius), hu["liver"] + hu["vessel_gain"], 1, only_label=1)
           for start, end, radius in vessels]  # fmt: skip
    gallbladder = _Ellipsoid(
        s * _jitter(rng, (42, 28, -48), 6),
        s * np.array([14, 14, 32]) * u(0.8, 1.2),
        _rotation(u(-30, -10), u(-15, 15), 0),
    )
    ops += [
        _Paint(gallbladder, hu["gallbladder"], within=(cavity,)),
        _Paint(_Cylinder(ivc_x, ivc_y, 10 * s, 9 * s, z1=float(ivc_top[2])), hu["ivc"]),
        _Paint(_Cylinder(-12 * s, spine.yv + spine.rv + 10 * s, 11 * s, 11 * s), hu["aorta"]),
    ]
    return ops


def _draw_spine_and_ribs(
    rng: np.random.Generator, body: _Body, spine: _Spine, dome: float, liver_z: tuple[float, float]
) -> list[_Paint]:
    """Vertebrae (cortex, cancellous core, discs), canal, posterior arch and spinous process; ribs."""
    u = rng.uniform
    s, hu, rv, yv, canal_y = body.s, body.hu, spine.rv, spine.yv, spine.canal_y
    disc_z0, pitch = u(0, 30), 30 * s
    vertebra = _Cylinder(0, yv, rv, rv * 0.85)
    back = _Cylinder(0, 0, body.a - body.fat, body.b - body.fat)  # the posterior arch stays under the fat
    return [
        _Paint(vertebra, hu["cortical_bone"]),
        _Paint(_Cylinder(0, yv, rv - 2, rv * 0.85 - 2), hu["cancellous_bone"]),
        _Paint(_ZBands(disc_z0, pitch, 6 * s, -_INF, _INF), hu["disc"], within=(vertebra,)),
        _Paint(_Cylinder(0, canal_y, 15 * s, 13 * s), hu["cortical_bone"], within=(back,)),
        _Paint(_Cylinder(0, canal_y - 18 * s, 5 * s, 14 * s), hu["cortical_bone"], within=(back,)),
        _Paint(_Cylinder(0, canal_y, 8 * s, 7 * s), hu["csf"]),
        _Paint(
            _Ring(body.ac, body.bc, 2.0, 2.0 + 7 * s, -80, 50),
            hu["rib"],
            within=(
                _ZBands(
                    dome + u(0, 25),
                    26 * s,
                    11 * s,
                    liver_z[0] - 20,
                    dome + (60 if body.protocol is None else 230 * s),
                    tilt=-0.6,
                ),
            ),
        ),
    ]


def _build_anatomy(rng: np.random.Generator, clinical: np.random.Generator | None = None) -> _Anatomy:
    """Draw one patient. The number and order of draws is fixed, so a seed always gives the same patient.

    With ``clinical`` (a separate stream), the patient size, fat, contrast phase, HU values, noise and lesions are
    drawn from it over clinical ranges (see :func:`_clinical_protocol`), pelvic and chest landmarks are added, and
    the draws of ``rng`` are still all made, so the hard variety of a seed never changes.
    """
    u = rng.uniform
    body = _draw_body(rng, clinical)
    s, a, b, hu = body.s, body.a, body.b, body.hu
    yaw = u(-3, 3)
    position = np.array([u(-20, 20), u(-20, 20), u(-400, 0)])
    ops: list[_Paint | _AddField] = [
        _Paint(_Cylinder(0, 0, a, b), hu["subcutaneous_fat"]),
        _Paint(_Cylinder(0, 0, a - body.fat, b - body.fat), hu["muscle"]),
        _Paint(body.cavity, hu["visceral_fat"]),
    ]
    liver, dome = _draw_liver(rng, s)
    liver_z = _z_extent(liver)
    spine, back = _draw_back_and_lungs(rng, body, dome)
    ops += back
    ops += _draw_bowel(rng, body)
    ops += _draw_stomach_and_kidneys(rng, body, spine)
    ops += _draw_upper_organs(rng, body, dome, liver)
    ops += _draw_vessels(rng, body, spine, dome)
    ops += _draw_spine_and_ribs(rng, body, spine, dome, liver_z)
    if clinical is not None:
        ops += _pelvis_and_chest(clinical, s, a, b, body.fat, spine.yv, dome, hu)

    # Perfusion gradient inside the liver, then tumours.
    ops.append(_AddField(_Box(liver.lo, liver.hi), _waves(rng, 2, (3.0, 6.0), (60, 150)), 1))
    info: dict[str, object] = {
        "patient_scale": s,
        "noise_sd": body.noise_sd,
        "hu": {k: round(float(v), 1) for k, v in hu.items() if k != "vessel_gain"},
    }
    if body.protocol is not None:
        info["variety"] = "clinical"
        info["phase"] = body.protocol.phase
        info["hu"]["vessel_gain"] = round(float(hu["vessel_gain"]), 1)  # type: ignore[index]
    anatomy = _Anatomy(ops, liver, a, b, liver_z, yaw, position, body.noise_sd, info)
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
