"""The MONAI chain's side of what volseg's fast engine does on its own, so that both engines see the same input.

:func:`preprocess` runs a bundle's preprocessing (a MONAI ``Compose``) with non-finite voxels replaced as soon as the
image is read and made channel-first, exactly as :class:`volseg.fastpath.FastEngine` replaces them
(:func:`volseg.data.validate.replace_non_finite`: NaN and -Inf by each channel's smallest finite value, +Inf by its
largest), and returns the note that says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from volseg.data.validate import replace_non_finite


def preprocess(
    preprocessing: Any, data: dict[str, Any], path: str | Path | None = None
) -> tuple[dict[str, Any], str | None]:
    """Run ``preprocessing`` on ``data`` with the image's non-finite voxels replaced right after
    ``EnsureChannelFirstd`` (before orientation, resampling and intensity), as the fast engine does.

    The chain is run in two parts of the same transform objects, so ``Invertd`` with the whole ``preprocessing``
    still inverts it.

    Args:
        preprocessing: a MONAI ``Compose`` holding an ``EnsureChannelFirstd`` (every volseg bundle's does).
        data: the input dict, e.g. ``{"image": "scan.nii.gz"}`` (or an image already loaded, for a chain that starts
            after its loader).
        path: the file, for messages.

    Returns:
        (the preprocessed dict, a one-line note when voxels were replaced, else None).

    Raises:
        UserError: a channel of the image has no finite voxel.
        ValueError: the chain has no ``EnsureChannelFirstd``.
    """
    from monai.transforms import Compose, EnsureChannelFirstd

    steps = list(preprocessing.transforms)
    split = next((i + 1 for i, t in enumerate(steps) if isinstance(t, EnsureChannelFirstd)), None)
    if split is None:
        raise ValueError("the preprocessing has no EnsureChannelFirstd to replace non-finite voxels after")
    options = {k: getattr(preprocessing, k) for k in ("map_items", "unpack_items", "log_stats", "lazy", "overrides")}
    data = Compose(steps[:split], **options)(data)
    data["image"], note = replace_non_finite(data["image"], path)
    return Compose(steps[split:], **options)(data), note
