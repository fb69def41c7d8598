"""Datalists: which image goes with which label, and the deterministic train/validation split.

Four sources are understood:

- an nnU-Net v2 raw data set (``DatasetXXX_Name/`` with a ``dataset.json`` holding ``channel_names``, ``labels`` and
  ``file_ending``; ``imagesTr/<case>_0000<file_ending>`` and ``labelsTr/<case><file_ending>``); with several
  channels (``<case>_0000``, ``<case>_0001``, ...) a case's ``image`` is the list of its channel files, in order;
- an MSD-style folder with ``dataset.json`` (``training``: list of ``{"image", "label"}``, paths relative to the
  folder), as in the Medical Segmentation Decathlon;
- a folder with ``images/`` and ``labels/`` (or ``imagesTr/`` and ``labelsTr/``) whose files are matched by name;
  an nnU-Net channel suffix ``_0000`` on the image is ignored when matching;
- a CSV file with ``image`` and ``label`` columns (paths relative to the CSV).

A DICOM series is given as a folder in place of an image file.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from volseg.errors import UserError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".tif", ".tiff")

Case = dict[str, str]

# Per-case files besides image and label that an MSD dataset.json may list (instance masks for the weight map).
EXTRA_FILE_KEYS = ("instance",)


def case_id(path: str | Path) -> str:
    """The case name of an image or label path: file name without its image suffix (and nnU-Net's _0000)."""
    name = Path(path).name
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if name.endswith("_0000"):
        name = name[: -len("_0000")]
    return name


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not path.name.startswith(".")


def _resolve(base: Path, rel: str, source: Path) -> str:
    p = (base / rel).resolve()
    if not p.exists():
        raise UserError(f"listed file {rel} does not exist", source)
    return str(p)


def _dataset_json(root: Path) -> dict:
    js = root / "dataset.json"
    try:
        meta = json.loads(js.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"cannot read dataset.json ({exc.__class__.__name__})", js) from None
    if not isinstance(meta, dict):
        raise UserError("dataset.json is not a JSON object", js)
    return meta


def _from_msd(root: Path) -> list[Case]:
    js = root / "dataset.json"
    meta = _dataset_json(root)
    items = meta.get("training")
    if not isinstance(items, list) or not items:
        raise UserError("dataset.json has no 'training' list", js)
    cases = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise UserError(f"training[{i}] needs 'image' and 'label'", js)
        case = {"image": _resolve(root, item["image"], js), "label": _resolve(root, item["label"], js)}
        # Other per-case files (e.g. "instance" masks for the U-Net weight map) come along, resolved alike.
        for key in EXTRA_FILE_KEYS:
            if isinstance(item.get(key), str):
                case[key] = _resolve(root, item[key], js)
        cases.append(case)
    return cases


def is_nnunet_dataset(meta: object) -> bool:
    """Whether a parsed dataset.json is nnU-Net v2's (``channel_names`` and ``file_ending``, no ``training`` list)."""
    return isinstance(meta, dict) and "channel_names" in meta and "file_ending" in meta and "training" not in meta


def _from_nnunet(root: Path, meta: dict) -> list[Case]:
    """Cases of an nnU-Net v2 raw data set, checked as nnU-Net's integrity check does (channels, numTraining)."""
    js = root / "dataset.json"
    ending = meta["file_ending"]
    channels = meta["channel_names"]
    if not isinstance(ending, str) or not ending.startswith(".") or not isinstance(channels, dict) or not channels:
        raise UserError("dataset.json needs 'file_ending' (e.g. \".nii.gz\") and a non-empty 'channel_names'", js)
    regions = [name for name, v in (meta.get("labels") or {}).items() if isinstance(v, (list, tuple))]
    if regions:
        raise UserError(f"region-based labels ({regions[0]}: a list of values) are not supported; give each label "
                        "one value", js)  # fmt: skip
    for folder in ("imagesTr", "labelsTr"):
        if not (root / folder).is_dir():
            raise UserError(f"{folder}/ is missing", root)
    labels = {p.name[: -len(ending)]: p for p in sorted((root / "labelsTr").iterdir()) if p.name.endswith(ending)}
    images: dict[str, dict[int, Path]] = {}
    for p in sorted((root / "imagesTr").iterdir()):
        stem = p.name[: -len(ending)] if p.name.endswith(ending) else ""
        case, _, index = stem.rpartition("_")
        if case and len(index) == 4 and index.isdigit():
            images.setdefault(case, {})[int(index)] = p
    if not images:
        raise UserError(f"no images named <case>_0000{ending}", root / "imagesTr")
    n = len(channels)
    for case, files in images.items():
        missing = [i for i in range(n) if i not in files]
        if missing or len(files) != n:
            raise UserError(f"case {case} has channels {sorted(files)}, dataset.json names {n}", root / "imagesTr")
    declared = meta.get("numTraining")
    if isinstance(declared, int) and declared != len(images):
        raise UserError(f"dataset.json says numTraining {declared}, imagesTr holds {len(images)} cases", js)
    cases = _paired({k: v[0] for k, v in images.items()}, labels, root / "imagesTr", root / "labelsTr")
    if n > 1:  # one file per channel: the image is the list of them, which MONAI's LoadImaged stacks as channels
        by_first = {str(files[0].resolve()): files for files in images.values()}
        for item in cases:
            files = by_first[item["image"]]
            item["image"] = [str(files[i].resolve()) for i in range(n)]  # type: ignore[assignment]
    return cases


def _paired(images: dict[str, Path], labels: dict[str, Path], img_dir: Path, lab_dir: Path) -> list[Case]:
    """Cases from images and labels keyed by case name; every image needs its label and every label its image."""
    missing = sorted(set(images) - set(labels))
    if missing:
        raise UserError(f"{len(missing)} image(s) without a label, first: {missing[0]}", lab_dir)
    extra = sorted(set(labels) - set(images))
    if extra:
        raise UserError(f"{len(extra)} label(s) without an image, first: {extra[0]}", img_dir)
    if not images:
        raise UserError("no images found", img_dir)
    return [{"image": str(images[k].resolve()), "label": str(labels[k].resolve())} for k in sorted(images)]


def _from_folder(root: Path) -> list[Case]:
    for img_dir, lab_dir in (("images", "labels"), ("imagesTr", "labelsTr")):
        if (root / img_dir).is_dir() and (root / lab_dir).is_dir():
            break
    else:
        raise UserError("expected dataset.json, images/ + labels/, or imagesTr/ + labelsTr/ in the folder", root)
    images = {case_id(p): p for p in sorted((root / img_dir).iterdir()) if _is_image(p) or p.is_dir()}
    labels = {case_id(p): p for p in sorted((root / lab_dir).iterdir()) if _is_image(p)}
    return _paired(images, labels, root / img_dir, root / lab_dir)


def _from_csv(path: Path) -> list[Case]:
    try:
        with path.open(newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read CSV ({exc.__class__.__name__})", path) from None
    if not rows or not {"image", "label"} <= set(rows[0]):
        raise UserError("CSV needs a header with 'image' and 'label' columns and at least one row", path)
    return [
        {"image": _resolve(path.parent, r["image"], path), "label": _resolve(path.parent, r["label"], path)}
        for r in rows
    ]


def load_datalist(root: str | Path, source: str = "auto") -> list[Case]:
    """All labelled cases of a data set, sorted, with absolute paths.

    Args:
        root: a folder (MSD or image/label pairs) or a CSV file.
        source: ``auto``, ``msd``, ``nnunet``, ``folder`` or ``csv``.

    Raises:
        UserError: the folder or file is missing, or the datalist is inconsistent.
    """
    root = Path(root)
    if not root.exists():
        raise UserError("data folder or file not found", root)
    if source == "auto":
        if root.is_file() and root.suffix.lower() == ".csv":
            source = "csv"
        elif (root / "dataset.json").is_file():
            source = "nnunet" if is_nnunet_dataset(_dataset_json(root)) else "msd"
        else:
            source = "folder"
    if source == "csv":
        cases = _from_csv(root)
    elif source == "nnunet":
        cases = _from_nnunet(root, _dataset_json(root))
    elif source == "msd":
        cases = _from_msd(root)
    else:
        cases = _from_folder(root)
    images = [c["image"] if isinstance(c["image"], str) else c["image"][0] for c in cases]
    if len(set(images)) != len(images):
        dup = next(x for x in images if images.count(x) > 1)
        raise UserError(f"image listed twice: {dup}", root)
    return cases


def split_cases(
    cases: list[Case], val_fraction: float = 0.2, folds: int | None = None, fold: int = 0, seed: int = 0
) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split by seed: a held-out fraction, or fold ``fold`` of ``folds``.

    At least one case goes to each side when there are two or more cases.
    """
    if len(cases) < 2:
        raise UserError(f"need at least 2 labelled cases to split into training and validation, got {len(cases)}")
    order = np.random.default_rng(seed).permutation(len(cases))
    if folds is not None:
        if folds > len(cases):
            raise UserError(f"{folds} folds need at least {folds} cases, got {len(cases)}")
        val_idx = set(order[fold::folds].tolist())
    else:
        n_val = min(max(1, round(len(cases) * val_fraction)), len(cases) - 1)
        val_idx = set(order[:n_val].tolist())
    train = [c for i, c in enumerate(cases) if i not in val_idx]
    val = [c for i, c in enumerate(cases) if i in val_idx]
    return train, val
