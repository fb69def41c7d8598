"""Deterministic synthetic abdominal MR phantoms (T1-weighted-like, thick axial slices) with liver and kidney labels.

Unlike the CT phantoms (:mod:`volseg.data.synth_liver`), the intensities are in arbitrary scanner units, not
Hounsfield units: there is no air at -1000 and nothing negative. What a phantom contains (each value and shape
varies with the seed):

* background near 0 (only the noise floor) around an elliptical body, 190-220 mm wide and 140-170 mm deep;
* bright subcutaneous fat (5-18 mm), a muscle wall, a spine (marrow with a dark cortical rim) between paraspinal
  muscles, aorta and inferior vena cava as dark flow voids, visceral tissue with a smooth random texture;
* the liver (label 1): a smooth union of two or three ellipsoids under a low-frequency deformation, on the
  patient's right and upper part of the field of view;
* both kidneys (label 2): ellipsoids with a brighter cortex and a darker medulla, posterior, beside the spine;
* a spleen on the left, unlabelled, its signal between the liver's and the kidneys' so that intensity alone does
  not separate the organs.

The image is the tissue signal (each tissue's level drawn per case within about +-8%) blurred by a partial-volume
model (in-plane: a small Gaussian point spread; along the slice axis: a profile whose FWHM is the slice
thickness), multiplied by a smooth receive-coil bias field (a low-order polynomial in the exponent, covering
about 0.6-1.5 over the body) and a per-case scanner gain (0.6-1.6), and made Rician: the magnitude of the
complex signal plus Gaussian noise in both channels (SD 3-6% of the liver's signal), so the background carries
the Rayleigh noise floor. Values are stored as int16, 0 .. about 2000.

The grid: 0.86-0.94 mm square pixels in-plane and 4.6-5.4 mm slices (slices along the third array axis), a
field of view of about 240 x 190 x 170 mm (about 260 x 205 x 34 voxels), axis directions drawn from RAS, LPS,
LAS and RPS (the slice axis always points superior). Random streams are separate for the anatomy, the grid,
the intensities and the noise.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from volseg.data.synth_base import Phantom, case_seed, write_msd_cases
from volseg.fileio import write_text_atomic

MR_PREFIX = "mr"
"""File prefix of the MR cases."""

MR_LABELS: dict[str, str] = {"0": "background", "1": "liver", "2": "kidney"}
"""Label names of the MR phantoms: value -> name, as in dataset.json."""

_FOV_MM = (240.0, 190.0, 170.0)
_AXCODES = ("RAS", "LPS", "LAS", "RPS")

# Tissue signal before gain and bias (arbitrary units, T1-weighted-like: fat bright, fluid and flow voids dark).
_TISSUE = {
    "fat": 900.0,
    "muscle": 260.0,
    "viscera": 480.0,
    "marrow": 560.0,
    "cortical_bone": 60.0,
    "vessel": 45.0,
    "liver": 420.0,
    "spleen": 330.0,
    "kidney_cortex": 370.0,
    "kidney_medulla": 230.0,
}


def _grid(rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int, int], str, list[np.ndarray]]:
    """Affine, shape, axcodes and the world coordinates (mm, RAS) of each array axis."""
    inplane = round(float(rng.uniform(0.86, 0.94)), 3)
    thick = round(float(rng.uniform(4.6, 5.4)), 2)
    spacing = (inplane, inplane, thick)
    dims = tuple(int(math.ceil(f / s)) for f, s in zip(_FOV_MM, spacing, strict=True))
    codes = _AXCODES[int(rng.integers(len(_AXCODES)))]
    signs = [1.0 if c in "RAS" else -1.0 for c in codes]
    shift = rng.uniform(-8.0, 8.0, size=3)
    coords, origin = [], np.zeros(3)
    for a in range(3):
        half = (dims[a] - 1) * spacing[a] / 2.0
        origin[a] = -signs[a] * half + shift[a]
        coords.append((origin[a] + signs[a] * spacing[a] * np.arange(dims[a])).astype(np.float32))
    affine = np.eye(4)
    affine[:3, :3] = np.diag([s * z for s, z in zip(signs, spacing, strict=True)])
    affine[:3, 3] = origin
    return affine.astype(np.float32).astype(np.float64), dims, codes, coords  # type: ignore[return-value]


def _ellipsoid_q(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Squared normalised distance to an axis-aligned ellipsoid's centre (< 1 inside)."""
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


def _waves(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray, n: int, amp: float,
           wavelength: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """A sum of ``n`` random plane waves (a smooth random field of about ``amp`` amplitude)."""
    field = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.float32)
    for _ in range(n):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        k = 2.0 * math.pi / rng.uniform(*wavelength)
        phase = rng.uniform(0.0, 2.0 * math.pi)
        field += np.float32(amp / math.sqrt(n)) * np.sin(k * (d[0] * x + d[1] * y + d[2] * z) + phase)
    return field


def _body(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, dict]:
    """Tissue classes of the body wall and spine: an int8 class map (-1 outside) and the drawn sizes."""
    a, b = rng.uniform(95.0, 110.0), rng.uniform(70.0, 85.0)
    fat = rng.uniform(5.0, 18.0)
    wall = rng.uniform(5.0, 9.0)
    wobble = 1.0 + 0.03 * np.sin(z / 40.0 + rng.uniform(0, 6.3))
    r = np.sqrt((x / (a * wobble)) ** 2 + (y / (b * wobble)) ** 2)  # 1 on the skin
    mean_r = (a + b) / 2.0
    cls = np.full(r.shape, -1, dtype=np.int8)
    cls[r < 1.0] = 0  # fat
    cls[r < 1.0 - fat / mean_r] = 1  # muscle wall
    cls[r < 1.0 - (fat + wall) / mean_r] = 2  # viscera
    spine_y = -b + fat + wall + rng.uniform(12.0, 18.0)
    rv = rng.uniform(14.0, 18.0)
    d_spine = np.broadcast_to(np.sqrt(x**2 + (y - spine_y) ** 2), cls.shape)
    for side in (-1.0, 1.0):  # paraspinal muscles
        q = ((x - side * 1.6 * rv) / (0.9 * rv)) ** 2 + ((y - spine_y + 0.4 * rv) / (1.1 * rv)) ** 2
        cls[(q < 1.0) & (cls >= 1)] = 1  # broadcasts against the full class map
    cls[d_spine < rv] = 4  # cortical rim
    cls[d_spine < rv - 2.5] = 3  # marrow
    aorta = np.sqrt((x + 0.25 * rv) ** 2 + (y - spine_y - rv - 10.0) ** 2) < rng.uniform(9.0, 12.0)
    ivc = np.sqrt((x - rv - 12.0) ** 2 + (y - spine_y - rv - 6.0) ** 2) < rng.uniform(8.0, 11.0)
    cls[(aorta | ivc) & (cls == 2)] = 5  # flow voids (broadcast as above)
    return cls, {"body_mm": [round(2 * a, 1), round(2 * b, 1)], "spine_y": float(spine_y), "fat_mm": round(fat, 1)}


def _organs(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray, spine_y: float,
            body: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Liver, kidney (cortex and medulla) and spleen masks."""
    half_w = body["body_mm"][0] / 2.0
    zc = rng.uniform(25.0, 40.0)
    centres = [np.array([0.38 * half_w, 0.0, zc])]
    radii = [np.array([rng.uniform(50, 60), rng.uniform(45, 55), rng.uniform(45, 60)])]
    for _ in range(int(rng.integers(1, 3))):
        centres.append(centres[0] + rng.uniform([-35, -15, -25], [10, 20, 15]))
        radii.append(radii[0] * rng.uniform(0.5, 0.8, size=3))
    q = np.min([_ellipsoid_q(x, y, z, c, r) for c, r in zip(centres, radii, strict=True)], axis=0)
    liver = (q + _waves(rng, x, y, z, 4, 0.25, (60.0, 140.0))) < 1.0
    liver &= (x > -0.15 * half_w) & (y > spine_y)
    kidney_cortex = np.zeros(liver.shape, dtype=bool)
    kidney_medulla = np.zeros(liver.shape, dtype=bool)
    kz = zc - rng.uniform(45.0, 65.0)
    for side in (-1.0, 1.0):
        c = np.array([side * rng.uniform(55.0, 62.0), spine_y + rng.uniform(10.0, 18.0), kz + rng.uniform(-8, 8)])
        r = np.array([rng.uniform(18.0, 22.0), rng.uniform(15.0, 19.0), rng.uniform(40.0, 50.0)])
        qk = _ellipsoid_q(x, y, z, c, r)
        kidney_cortex |= qk < 1.0
        kidney_medulla |= qk < 0.35
    spleen_c = np.array([-0.5 * half_w, spine_y + rng.uniform(20.0, 30.0), zc + rng.uniform(-10.0, 10.0)])
    spleen = _ellipsoid_q(x, y, z, spleen_c, np.array([28.0, 40.0, 45.0]) * rng.uniform(0.8, 1.1, size=3)) < 1.0
    kidney = kidney_cortex & ~liver
    return liver, kidney & ~kidney_medulla, kidney_medulla & kidney, spleen & ~liver & ~kidney_cortex


def _bias_field(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A smooth multiplicative receive-coil bias: exp of a random second-order polynomial, mean 1 near the centre."""
    u, v, w = x / 120.0, y / 95.0, z / 85.0
    c = rng.normal(0.0, 1.0, size=6) * np.array([0.16, 0.16, 0.1, 0.08, 0.08, 0.06])
    expo = c[0] * u + c[1] * v + c[2] * w + c[3] * u * u + c[4] * v * v + c[5] * u * v
    expo = expo + np.float32(0.15) * (u * u + v * v)  # the surface coils: brighter at the periphery
    return np.exp(expo).astype(np.float32)


def mr_phantom(seed: int, *, bias: bool = True) -> Phantom:
    """Make one synthetic abdominal MR (T1-weighted-like) with liver and kidney labels.

    Args:
        seed: Non-negative integer; the same seed gives byte-identical arrays.
        bias: multiply by the drawn coil bias field (False leaves everything else as it is, for tests).

    Returns:
        The phantom: int16 image in arbitrary units (0 .. about 2000), uint8 label (0 background, 1 liver,
        2 kidney) and the voxel -> RAS+ affine; ``info`` holds the drawn spacing, axcodes, gain, noise SD and the
        bias field's range over the body.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    affine, dims, codes, (cx, cy, cz) = _grid(np.random.default_rng([int(seed), 11]))
    x, y, z = cx[:, None, None], cy[None, :, None], cz[None, None, :]
    anatomy = np.random.default_rng([int(seed), 12])
    cls, body = _body(anatomy, x, y, z)
    liver, cortex, medulla, spleen = _organs(anatomy, x, y, z, body["spine_y"], body)
    inside = cls == 2
    liver &= inside
    cortex &= inside
    medulla &= inside
    spleen &= inside
    tone = np.random.default_rng([int(seed), 13])
    level = {k: v * float(tone.uniform(0.92, 1.08)) for k, v in _TISSUE.items()}
    signal = np.zeros(dims, dtype=np.float32)
    for value, name in enumerate(("fat", "muscle", "viscera", "marrow", "cortical_bone", "vessel")):
        signal[cls == value] = level[name]
    texture = _waves(tone, x, y, z, 6, 0.18, (15.0, 45.0))
    signal[inside] *= 1.0 + texture[inside]
    for mask, name in ((liver, "liver"), (spleen, "spleen"), (cortex, "kidney_cortex"), (medulla, "kidney_medulla")):
        signal[mask] = level[name]
    zooms = np.abs(np.diag(affine)[:3])
    fwhm = 2.0 * math.sqrt(2.0 * math.log(2.0))
    sigma = [0.5 / float(zooms[0]), 0.5 / float(zooms[1]), 1.0 / fwhm]  # slice profile FWHM = slice spacing
    signal = ndimage.gaussian_filter(signal, sigma=sigma, truncate=3.0, mode="nearest")
    field = _bias_field(tone, x, y, z) if bias else np.ones((1, 1, 1), dtype=np.float32)
    gain = float(np.exp(tone.uniform(math.log(0.6), math.log(1.6))))
    signal *= field * np.float32(gain)
    noise = np.random.default_rng([int(seed), 14])
    sd = float(tone.uniform(0.03, 0.06)) * level["liver"] * gain
    real = signal + noise.standard_normal(dims, dtype=np.float32) * np.float32(sd)
    imag = noise.standard_normal(dims, dtype=np.float32) * np.float32(sd)
    image = np.sqrt(real * real + imag * imag)
    np.rint(image, out=image)
    np.clip(image, 0, 32767, out=image)
    label = np.zeros(dims, dtype=np.uint8)
    label[liver] = 1
    label[cortex | medulla] = 2
    body_field = np.broadcast_to(field, dims)[cls >= 0]
    info = {
        "spacing": [round(float(s), 4) for s in zooms],
        "shape": list(dims),
        "axcodes": codes,
        "gain": round(gain, 3),
        "noise_sd": round(sd, 2),
        "bias_range": [round(float(body_field.min()), 3), round(float(body_field.max()), 3)],
        **body,
    }
    return Phantom(image=image.astype(np.int16), label=label, affine=affine, info=info)


def write_mr_dataset(root: Path, n: int, seed: int, n_test: int) -> Path:
    """The ``mr`` task of :func:`volseg.data.synth.write_dataset` (NIfTI files; arguments checked there).

    Cases ``0 .. n-1`` go to ``imagesTr``/``labelsTr`` and cases ``n .. n+n_test-1`` to ``imagesTs`` with their
    labels in ``labelsTs``, named ``mr_XXX.nii.gz``; case ``i`` is ``mr_phantom(case_seed(seed, i))``.
    ``dataset.json`` (modality MR) is written last.
    """
    training, test = write_msd_cases(root, MR_PREFIX, n, n_test, lambda i: mr_phantom(case_seed(seed, i)))
    dataset = {
        "name": "SyntheticMr",
        "description": "Synthetic T1-weighted-like abdominal MR phantoms (liver, kidneys) with thick slices, a "
        "coil bias field and Rician noise, from volseg",
        "reference": "volseg.data.synth (generated, not patient data)",
        "licence": "CC0-1.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "MR"},
        "labels": dict(MR_LABELS),
        "numTraining": n,
        "numTest": n_test,
        "training": training,
        "test": test,
        "synthetic": {"generator": "volseg.data.synth_mr.mr_phantom", "seed": int(seed)},
    }
    return write_text_atomic(root / "dataset.json", json.dumps(dataset, indent=2) + "\n")
