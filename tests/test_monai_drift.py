"""The fast engine against MONAI's own transforms: the model grid against MONAI's ``Spacing`` itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from volseg.fastpath import model_grid


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=np.float64)
    a /= np.linalg.norm(a)
    t = np.deg2rad(degrees)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _affine(directions: np.ndarray, spacing: tuple[float, float, float], origin: tuple[float, float, float]):
    a = np.eye(4)
    a[:3, :3] = np.asarray(directions, dtype=np.float64) * np.asarray(spacing)
    a[:3, 3] = origin
    return a


SAGITTAL = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])  # voxel axes along A, -S, -R
AFFINES = {
    "ras": _affine(np.eye(3), (0.8, 0.8, 2.5), (-100.0, -120.0, 30.0)),
    "lps": _affine(np.diag([-1.0, -1.0, 1.0]), (0.7, 0.7, 3.0), (90.0, 110.0, -40.0)),
    "flipped": _affine(np.diag([-1.0, 1.0, 1.0]), (1.0, 1.2, 1.5), (10.0, -5.0, 0.0)),  # one axis: det < 0
    "anisotropic": _affine(np.eye(3), (0.45, 0.45, 6.0), (0.0, 0.0, 0.0)),
    # 49 x 0.9 mm to 0.6 mm is an extent of exactly 74.5 voxels: it rounds as MONAI's arithmetic rounds it (to 75)
    "oblique": _affine(_rotation((1.0, 0.4, 0.2), 25.0), (1.1, 0.9, 2.0), (-30.0, 12.0, 7.5)),
    "oblique_flipped": _affine(_rotation((0.2, 1.0, 0.5), 17.0) @ np.diag([1, -1, -1]), (0.9, 0.9, 3.3), (5, 6, 7)),
    "sagittal": _affine(SAGITTAL, (1.0, 0.6, 0.6), (40.0, -80.0, 90.0)),
}
SHAPES = [(31, 40, 17), (64, 64, 9), (7, 50, 33)]
TARGETS = [(1.5, 1.5, 2.0), (3.0, 0.6, 5.0)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", sorted(AFFINES))
def test_model_grid_equals_monai_spacing_transform(name: str, shape: tuple[int, ...], target: tuple) -> None:
    """MONAI's ``Spacing`` itself (not only its helpers): the same output shape and affine."""
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    affine = AFFINES[name]
    out = Spacing(pixdim=target)(MetaTensor(torch.zeros(1, *shape), affine=torch.as_tensor(affine)))
    got_shape, scale, shift = model_grid(shape, affine, target)
    assert got_shape == tuple(out.shape[1:])
    m = np.eye(4)
    m[:3, :3], m[:3, 3] = np.diag(scale), shift
    np.testing.assert_allclose(affine @ m, np.asarray(out.affine, dtype=np.float64), rtol=0, atol=1e-6)
