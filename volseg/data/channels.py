"""Images stored as one file per channel (nnU-Net's ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz``, ...).

A case of such a data set has a list of files as its ``image``; MONAI's ``LoadImaged`` reads a list of files as
one image with the files stacked as channels (channel first). Where volseg reads the image itself, the channel
files must share one grid: :func:`read_channels` checks it and stacks them channels last (a 4D NIfTI's layout);
:func:`stack_channels` writes them as one 4D NIfTI.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
    from volseg.imageio import read_image

    return read_image(path)


def read_channels(paths: Sequence[str | Path]) -> tuple[np.ndarray, np.ndarray]:
    """Channel files (any format :func:`volseg.imageio.read_image` reads) as one float32 array, channels last, and
    the first file's affine.

    Raises:
        UserError: a file cannot be read, is not single-channel, or lies on another grid than the first.
    """
    arrays, affine, shape = [], None, None
    for p in map(Path, paths):
        img = _load(p)
        data = np.asarray(img.array, dtype=np.float32)
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


_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii\.gz|\.nii)$", re.IGNORECASE)


def group_channel_files(paths: Sequence[Path], in_channels: int) -> list[Path | list[Path]]:
    """Inputs for a model of ``in_channels`` channels: files named ``<case>_0000`` ... ``<case>_000{n-1}`` (nnU-Net's
    channel files) become one case (the list of them, in channel order); any other input stays as it is.

    Raises:
        UserError: a case's channel files are not exactly ``0000`` to the model's last channel.
    """
    if in_channels < 2:
        return list(paths)
    groups: dict[tuple[Path, str], dict[int, Path]] = {}
    order: list[Path | tuple[Path, str]] = []
    for p in paths:
        m = _CHANNEL_FILE.match(p.name)
        if m is None or p.is_dir():
            order.append(p)
            continue
        key = (p.parent, m["case"])
        if key not in groups:
            groups[key] = {}
            order.append(key)  # the case's place among the inputs
        groups[key][int(m["channel"])] = p
    out: list[Path | list[Path]] = []
    for item in order:
        if isinstance(item, Path):
            out.append(item)
            continue
        files = groups[item]
        if sorted(files) != list(range(in_channels)):
            where = files[min(files)]
            raise UserError(f"case {item[1]} has channel files {sorted(files)}; the model takes {in_channels}", where)
        out.append([files[k] for k in range(in_channels)])
    return out


@contextmanager
def stacked_inputs(inputs: list[str], bundle: Path | None) -> Iterator[list[str]]:
    """``volseg infer``'s inputs with each case's nnU-Net channel files (``<case>_0000.nii.gz``,
    ``<case>_0001.nii.gz``, ...) stacked into one 4D NIfTI, ``<case>.nii.gz`` in a temporary folder (so the output
    is ``<case>_seg.nii.gz``), when the bundle's model takes several channels; other inputs are kept as given."""
    from volseg.bundle import RECIPE_FILE, read_bundle_recipe
    from volseg.infer import expand_inputs, find_latest_run

    if any("://" in item for item in inputs):
        yield inputs
        return
    root = bundle or find_latest_run()
    n = read_bundle_recipe(root).model.in_channels if (root / RECIPE_FILE).is_file() else 1
    grouped = group_channel_files(expand_inputs(inputs), n) if n > 1 else []
    if not any(isinstance(g, list) for g in grouped):
        yield inputs
        return
    with tempfile.TemporaryDirectory(prefix="volseg-channels-") as tmp:
        out = []
        for i, item in enumerate(grouped):
            if isinstance(item, list):
                m = _CHANNEL_FILE.match(item[0].name)
                case = m["case"] if m else item[0].name
                item = stack_channels(item, Path(tmp) / str(i) / f"{case}.nii.gz")
            out.append(str(item))
        yield out
