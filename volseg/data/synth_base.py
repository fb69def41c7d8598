"""What the synthetic tasks share: the CT case record, the liver label names, case seeds and NIfTI writing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from volseg.fileio import atomic_path

LABELS: dict[str, str] = {"0": "background", "1": "liver", "2": "tumour"}
"""Label names of the CT phantoms (both families): value -> name, as in dataset.json."""


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


def write_msd_cases(
    root: Path, prefix: str, n: int, n_test: int, make: Callable[[int], Phantom]
) -> tuple[list[dict[str, str]], list[str]]:
    """Cases ``0 .. n-1`` of ``make(index)`` into ``imagesTr``/``labelsTr`` and ``n .. n+n_test-1`` into
    ``imagesTs``/``labelsTs`` of an MSD folder, named ``PREFIX_XXX.nii.gz``; returns dataset.json's ``training``
    entries and ``test`` list."""
    folders = {k: root / k for k in ("imagesTr", "labelsTr", "imagesTs", "labelsTs")}
    for key in ("imagesTr", "labelsTr") + (("imagesTs", "labelsTs") if n_test else ()):
        folders[key].mkdir(parents=True, exist_ok=True)
    training: list[dict[str, str]] = []
    test: list[str] = []
    for index in range(n + n_test):
        phantom = make(index)
        name = f"{prefix}_{index:03d}.nii.gz"
        split = "Tr" if index < n else "Ts"
        _atomic_save(_nifti(phantom.image, phantom.affine), folders[f"images{split}"] / name)
        _atomic_save(_nifti(phantom.label, phantom.affine), folders[f"labels{split}"] / name)
        if split == "Tr":
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            test.append(f"./imagesTs/{name}")
    return training, test
