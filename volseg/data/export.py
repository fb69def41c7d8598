"""Writing a data set in another tool's layout: nnU-Net v2's raw data set.

``volseg export-dataset --data DIR --out ROOT --format nnunet`` writes ``ROOT/DatasetXXX_Name/`` with
``imagesTr/<case>_0000.nii.gz`` (one file per channel: a 4D image is split), ``labelsTr/<case>.nii.gz`` and the
``dataset.json`` nnU-Net reads (``channel_names``, ``labels``, ``numTraining``, ``file_ending``). Images keep their
grid: NIfTI is copied (channels split with the header's affine), NRRD and MHA go through SimpleITK, DICOM series
through volseg's series reader. Everything is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from volseg.data.channels import image_files
from volseg.data.datalist import case_id, load_datalist
from volseg.errors import UserError


def _labels(data_root: Path, recipe: Any, label_paths: list[str]) -> dict[str, int]:
    """name -> value: the recipe's, else the source dataset.json's (MSD: value -> name), else the values found."""
    if recipe is not None:
        return {name: lab.value for name, lab in recipe.data.labels.items()}
    js = data_root / "dataset.json"
    if js.is_file():
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
            found = meta.get("labels", {})
            if found and all(str(k).isdigit() for k in found):
                return {str(name): int(value) for value, name in sorted(found.items(), key=lambda kv: int(kv[0]))}
            if found and all(isinstance(v, int) for v in found.values()):
                return {str(k): int(v) for k, v in found.items()}
        except (OSError, ValueError, AttributeError):
            pass
    from volseg.imageio import read_labels

    values: set[int] = set()
    for path in label_paths:
        values |= {int(v) for v in np.unique(read_labels(path)[0])}
    return {"background": 0, **{f"label_{v}": v for v in sorted(values) if v}}


def _write_image(src: Path, out_base: Path) -> int:
    """``src`` as NIfTI channel files ``<out_base>_XXXX.nii.gz``; returns the number of channels."""
    import nibabel as nib

    from volseg.imageio import is_nifti, nifti_header, read_image

    if is_nifti(src):
        img: Any = nifti_header(src)  # kept as stored (type, scaling, header); voxels read below
    else:
        read = read_image(src)  # DICOM folder, NRRD, MHA/MHD: voxels and RAS affine
        img = nib.Nifti1Image(np.asarray(read.array), read.affine)
    channels = img.shape[3] if len(img.shape) == 4 else 1
    for k in range(channels):
        data = np.asarray(img.dataobj[..., k]) if channels > 1 else np.asarray(img.dataobj)
        out = nib.Nifti1Image(data, img.affine, img.header)
        out.set_qform(img.affine, code=1)
        out.set_sform(img.affine, code=1)
        nib.save(out, str(Path(f"{out_base}_{k:04d}.nii.gz")))
    return channels


def export_nnunet(
    data_root: str | Path,
    out_root: str | Path,
    *,
    name: str,
    recipe: Any = None,
    source: str = "auto",
    echo: Callable[[str], None] = print,
) -> Path:
    """Write the labelled cases of a data set as nnU-Net v2's ``out_root/<name>`` (``DatasetXXX_Name``).

    Raises:
        UserError: a bad name, an existing target, or cases whose channel counts differ.
    """
    if not re.fullmatch(r"Dataset\d{3}_[A-Za-z0-9_-]+", name):
        raise UserError("nnU-Net data sets are named DatasetXXX_Name (three digits, e.g. Dataset501_Liver)", "--name")
    data_root = Path(data_root)
    target = Path(out_root) / name
    if target.exists():
        raise UserError("exists already; choose another --name or --out", target)
    cases = load_datalist(data_root, source)
    tmp = target.with_name(f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        channels: set[int] = set()
        for case in cases:
            files = image_files(case["image"])
            cid = case_id(files[0])
            if len(files) == 1:
                channels.add(_write_image(files[0], tmp / "imagesTr" / cid))
            else:  # one file per channel already (an nnU-Net data set): each becomes <case>_000k
                for k, src in enumerate(files):
                    if _write_image(src, tmp / "imagesTr" / f"{cid}.part") != 1:
                        raise UserError("a channel file holds more than one channel", src)
                    (tmp / "imagesTr" / f"{cid}.part_0000.nii.gz").rename(tmp / "imagesTr" / f"{cid}_{k:04d}.nii.gz")
                channels.add(len(files))
            n = _write_image(Path(case["label"]), tmp / "labelsTr" / cid)
            if n != 1:
                raise UserError("a label map has more than one channel", case["label"])
            (tmp / "labelsTr" / f"{cid}_0000.nii.gz").rename(tmp / "labelsTr" / f"{cid}.nii.gz")
        if len(channels) != 1:
            raise UserError(f"cases have different channel counts: {sorted(channels)}", data_root)
        n_channels = channels.pop()
        modality = recipe.data.modality if recipe is not None else "CT" if n_channels == 1 else "MR"
        names = {"0": modality} if n_channels == 1 else {str(k): f"{modality}_{k}" for k in range(n_channels)}
        meta = {
            "channel_names": names,
            "labels": _labels(data_root, recipe, [str(p) for p in sorted((tmp / "labelsTr").iterdir())]),
            "numTraining": len(cases),
            "file_ending": ".nii.gz",
            "name": name,
            "description": f"exported by volseg from {data_root}",
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    echo(f"wrote {len(cases)} case(s), {n_channels} channel(s): {target}")
    return target
