"""Inference with a bundle: sliding window, back to the input grid, labels written atomically.

The :class:`Predictor` runs the bundle's own ``configs/inference.json`` components (preprocessing, network,
inferer, postprocessing up to the writer), so ``volseg infer`` and ``python -m monai.bundle run`` compute the
same thing. volseg then writes the labels itself on the input's exact grid: for NIfTI input the output takes the
input's header and affine, so shape, affine and axis order are the input's.
"""

from __future__ import annotations

import glob
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg.data.datalist import IMAGE_SUFFIXES, case_id
from volseg.errors import UserError


@dataclass
class Prediction:
    """One segmented case."""

    source: Path
    labels: np.ndarray  # uint8, the input's array layout
    affine: np.ndarray  # 4x4 voxel -> RAS world
    seconds: float


def find_latest_run(runs_dir: str | Path = "runs") -> Path:
    """The most recently finished run (by models/model.pt) under ``runs_dir``."""
    runs = sorted(Path(runs_dir).glob("*/models/model.pt"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(
            "no trained bundle found; train one with `volseg train --config RECIPE` (or `volseg demo`), "
            "or pass --bundle DIR",
            runs_dir,
        )
    return runs[-1].parent.parent


def _is_dicom_dir(path: Path) -> bool:
    for p in path.rglob("*"):
        if p.is_file():
            try:
                with p.open("rb") as fh:
                    fh.seek(128)
                    if fh.read(4) == b"DICM":
                        return True
            except OSError:
                continue
    return False


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files, folders (their image files, or the folder itself if it holds a DICOM series) and globs."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if any(ch in item for ch in "*?[") and not p.exists():
            matches = sorted(Path(m) for m in glob.glob(item, recursive=True))
            if not matches:
                raise UserError("no file matches this pattern", item)
            out.extend(matches)
        elif p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES))
            if files:
                out.extend(files)
            elif _is_dicom_dir(p):
                out.append(p)
            else:
                raise UserError("folder holds no image files and no DICOM series", p)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError("input not found", p)
    return out


def output_path(source: Path, out_dir: Path) -> Path:
    return out_dir / f"{case_id(source)}_seg.nii.gz"


def write_labels(labels: np.ndarray, affine: np.ndarray, path: Path, reference: Any | None = None) -> Path:
    """Write a uint8 label map as NIfTI, to a temporary name first, then renamed.

    Args:
        labels: the label array in the reference's layout.
        affine: voxel -> RAS world.
        path: the output file.
        reference: the input's nibabel image; its header (qform/sform codes, units) is kept.
    """
    import nibabel as nib

    labels = np.asarray(labels, dtype=np.uint8)
    if reference is not None:
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        img = nib.Nifti1Image(labels, reference.affine, header)
        img.set_qform(reference.get_qform(), code=int(reference.header["qform_code"]) or 1)
        img.set_sform(reference.get_sform(), code=int(reference.header["sform_code"]) or 1)
    else:
        img = nib.Nifti1Image(labels, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii.gz")
    os.close(fd)
    try:
        nib.save(img, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


class Predictor:
    """Segments images with a trained bundle.

    Args:
        bundle_dir: a bundle with configs/inference.json and models/model.pt.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """

    def __init__(self, bundle_dir: str | Path, device: str | None = None) -> None:
        import sys

        from monai.bundle import ConfigParser

        from volseg.train import resolve_device

        self.bundle_dir = Path(bundle_dir).resolve()
        cfg_file = self.bundle_dir / "configs" / "inference.json"
        weights = self.bundle_dir / "models" / "model.pt"
        if not cfg_file.is_file():
            raise UserError("not a bundle: configs/inference.json is missing", self.bundle_dir)
        if not weights.is_file():
            raise UserError("bundle has no weights: models/model.pt is missing (train it first)", self.bundle_dir)
        self.device = resolve_device(device)
        parser = ConfigParser()
        parser.read_config(str(cfg_file))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = f"$torch.device('{self.device}')"
        if (self.bundle_dir / "scripts").is_dir() and str(self.bundle_dir) not in sys.path:
            sys.path.insert(0, str(self.bundle_dir))
        # Everything up to the writer: volseg writes the output itself, on the input's grid.
        post = parser["postprocessing"]["transforms"]
        parser["postprocessing"]["transforms"] = [t for t in post if t.get("_target_") != "SaveImaged"]
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        net = parser.get_parsed_content("network_def")
        try:
            state = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint is the user's file problem
            raise UserError(f"cannot load weights ({exc.__class__.__name__})", weights) from None
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        net.load_state_dict(state)
        self.network = net.to(self.device).eval()

    def predict(self, source: str | Path) -> Prediction:
        """Segment one image (file or DICOM folder) and return labels on its own grid."""
        t0 = time.perf_counter()
        src = Path(source)
        try:
            data = self.preprocessing({"image": str(src)})
        except Exception as exc:  # noqa: BLE001 - reader errors become one line naming the file
            raise UserError(f"cannot read image ({_reason(exc)})", src) from None
        image = data["image"]
        with torch.inference_mode():
            logits = self.inferer(image.unsqueeze(0).to(self.device), self.network)
        data["pred"] = logits[0].cpu() if isinstance(logits, torch.Tensor) else logits[-1][0].cpu()
        data["image"] = image
        data = self.postprocessing(data)
        pred = data["pred"]
        labels = np.asarray(pred.detach().cpu().numpy())[0].astype(np.uint8)
        affine = np.asarray(pred.affine.cpu().numpy() if hasattr(pred, "affine") else np.eye(4), dtype=np.float64)
        return Prediction(source=src, labels=labels, affine=affine, seconds=time.perf_counter() - t0)


def _reason(exc: BaseException) -> str:
    """The innermost cause of a (MONAI-wrapped) reader error, as one short line."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    for inner in reversed(seen):
        lines = [ln.strip() for ln in str(inner).strip().splitlines() if ln.strip()]
        if lines and not lines[0].startswith("applying transform"):
            return f"{inner.__class__.__name__}: {lines[0]}"[:200]
    return seen[-1].__class__.__name__


def save_prediction(pred: Prediction, out_path: Path) -> Path:
    """Write a prediction on the input's exact grid (the NIfTI input's header and affine when it has one)."""
    reference = None
    name = pred.source.name.lower()
    if pred.source.is_file() and (name.endswith(".nii") or name.endswith(".nii.gz")):
        import nibabel as nib

        reference = nib.load(str(pred.source))
        if tuple(reference.shape[: pred.labels.ndim]) != pred.labels.shape:
            raise RuntimeError(
                f"prediction shape {pred.labels.shape} differs from the input's {reference.shape}: "
                "the inverse of the preprocessing did not restore the input grid"
            )
        if not np.allclose(reference.affine, pred.affine, atol=1e-3):
            raise RuntimeError("prediction affine differs from the input's after inversion")
    return write_labels(pred.labels, pred.affine, out_path, reference)


def run_inference(
    inputs: list[str],
    out_dir: str | Path,
    bundle_dir: str | Path | None = None,
    device: str | None = None,
    echo: Callable[[str], None] = print,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Segment every input; a bad input is reported and skipped. Returns (written, failures)."""
    bundle = Path(bundle_dir) if bundle_dir else find_latest_run()
    sources = expand_inputs(inputs)
    predictor = Predictor(bundle, device)
    out = Path(out_dir)
    written: list[Path] = []
    failures: list[tuple[Path, str]] = []
    echo(f"bundle {bundle}  device {predictor.device}  {len(sources)} case(s)")
    for i, src in enumerate(sources, 1):
        try:
            pred = predictor.predict(src)
            path = save_prediction(pred, output_path(src, out))
        except UserError as err:
            failures.append((src, err.message))
            echo(f"[{i}/{len(sources)}] {src}: FAILED: {err.message}")
            continue
        written.append(path)
        counts = np.bincount(pred.labels.ravel(), minlength=2)
        echo(f"[{i}/{len(sources)}] {src.name} -> {path}  {pred.seconds:.1f} s  voxels per label {counts.tolist()}")
    return written, failures
