"""Synthetic data sets for tests, demos and benchmarks, one module per task, written by :func:`write_dataset`.

* ``liver_ct`` (:mod:`volseg.data.synth_liver`): deterministic abdominal CT phantoms with liver and liver-tumour
  labels, ``variety="clinical"`` (clinical fields of view, phases, lesions) or ``"hard"`` (the original phantoms);
  the patient is drawn in :mod:`volseg.data.synth_liver_anatomy` from the shapes of :mod:`volseg.data.synth_shapes`.
* ``cells`` (:mod:`volseg.data.synth_cells`): 2D fluorescence images of touching nuclei.
* ``mr`` (:mod:`volseg.data.synth_mr`): abdominal MR phantoms (arbitrary units, coil bias field, Rician noise,
  0.9 x 0.9 x 5 mm voxels) with liver and kidney labels.

What the tasks share (the :class:`Phantom` record, label names, case seeds, NIfTI writing) is in
:mod:`volseg.data.synth_base`. ``volseg.data.synth_torso`` is a second, independently built CT family for
held-out evaluation only. The names below are re-exported here, where callers import them from.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from volseg.data.synth_base import LABELS, Phantom, case_seed
from volseg.data.synth_cells import CELL_LABELS, CELL_PREFIX, CellImage, cells_image, write_cells_dataset
from volseg.data.synth_liver import (
    LIVER_PREFIX,
    VARIETIES,
    PhantomGeometry,
    best_window_dice,
    liver_ct_geometry,
    liver_ct_phantom,
    write_liver_dataset,
)
from volseg.data.synth_mr import MR_LABELS, MR_PREFIX, mr_phantom, write_mr_dataset
from volseg.errors import UserError

__all__ = [
    "CELL_LABELS",
    "LABELS",
    "MR_LABELS",
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
    "mr_phantom",
    "write_dataset",
]

TASKS: dict[str, str] = {"liver_ct": LIVER_PREFIX, "cells": CELL_PREFIX, "mr": MR_PREFIX}
"""Known synthetic tasks: task name -> file prefix of its cases."""


def write_dataset(
    out_dir: str | Path,
    task: str = "liver_ct",
    n: int = 10,
    seed: int = 0,
    size: str = "demo",
    n_test: int = 0,
    variety: str = "clinical",
    spacing: tuple[float, float, float] | None = None,
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

    The ``mr`` task writes ``mr_XXX.nii.gz``, case ``i`` being ``mr_phantom(case_seed(seed, i))``, with
    modality MR in dataset.json; ``size`` and ``variety`` are ignored.

    Args:
        out_dir: Folder to write (created if missing).
        task: Synthetic task name; see :data:`TASKS`.
        n: Number of training cases.
        seed: Dataset seed.
        size: ``"demo"`` or ``"full"``, see :func:`liver_ct_phantom`.
        n_test: Number of held-out cases.
        variety: ``"clinical"`` (default) or ``"hard"``, see :func:`liver_ct_phantom` (liver_ct only).
        spacing: Voxel size in mm along each array axis for every case, e.g. ``(1.5, 1.5, 1.5)`` for isotropic
            phantoms (liver_ct only; default: drawn per case). The field of view stays the drawn one, so fine
            spacings make large arrays (the clinical variety's long fields of view especially).

    Returns:
        Path of the written ``dataset.json``.

    Raises:
        UserError: Unknown task, size or variety, negative counts, or a spacing for another task than liver_ct.
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
    if spacing is not None and task != "liver_ct":
        raise UserError(f"a spacing can be given for the liver_ct task only, not {task!r}")
    if task == "cells":
        return write_cells_dataset(Path(out_dir), n, seed, n_test)
    if task == "mr":
        return write_mr_dataset(Path(out_dir), n, seed, n_test)
    return write_liver_dataset(Path(out_dir), task, n, seed, size, n_test, variety, spacing)
