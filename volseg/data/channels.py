"""Images stored as one file per channel (nnU-Net's ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...).

A case of such a data set has a list of files as its ``image``; MONAI's ``LoadImaged`` reads a list of files as
one image with the files stacked as channels (channel first). Where volseg reads the image itself, the channel
files must share one grid: :func:`read_channels` checks it and stacks them channels last (a 4D NIfTI's layout);
:func:`stack_channels` writes them as one 4D NIfTI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from volseg.errors import UserError

AFFINE_TOLERANCE_MM = 1e-3


def image_files(image: Any) -> list[Path]:
    """The files of a case's ``image``: one path, or the channel files in channel order."""
    return [Path(p) for p in image] if isinstance(image, (list, tuple)) else [Path(image)]


def first_file(image: Any) -> Path:
    """A case image's first (or only) file, which names the case in messages."""
    return image_files(image)[0]


def _load(path: Path) -> Any:
    import nibabel as nib

    try:
        return nib.load(str(path))
    except Exception as exc:  # noqa: BLE001 - any reader failure is a problem of the user's file
        raise UserError(f"cannot read image ({exc.__class__.__name__})", path) from None


def read_channels(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """NIfTI channel files as one float32 array, channels last, and the first file's affine.

    Raises:
        UserError: a file cannot be read, is not single-channel, or lies on another grid than the first.
    """
    arrays, affine, shape = [], None, None
    for p in map(Path, paths):
        img = _load(p)
        data = np.asarray(img.dataobj, dtype=np.float32)
        if data.ndim > 3 and all(s == 1 for s in data.shape[3:]):
            data = data.reshape(data.shape[:3])
        if data.ndim not in (2, 3):
            raise UserError(f"a channel file must hold one channel, this one has shape {data.shape}", p)
        if affine is None:
            affine, shape = np.asarray(img.affine, dtype=np.float64), data.shape
        elif data.shape != shape or float(np.abs(np.asarray(img.affine) - affine).max()) > AFFINE_TOLERANCE_MM:
            raise UserError(f"channel grid differs from the case's first channel {Path(paths[0]).name}", p)
        arrays.append(data)
    if affine is None:
        raise UserError("a case without image files")
    return np.stack(arrays, axis=-1), affine


def stack_channels(paths: Sequence[str | Path], out: str | Path) -> Path:
    """Write channel files as one 4D NIfTI (channels last) with the first file's affine; returns ``out``."""
    import nibabel as nib

    from volseg.fileio import atomic_path

    data, affine = read_channels(paths)
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(out) as tmp:
        nib.save(img, str(tmp))
    return Path(out)
