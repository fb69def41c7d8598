"""Inference with a bundle: sliding window, back to the input grid, labels written atomically.

The :class:`Predictor` has two engines that compute the same segmentation. The fast engine
(:mod:`volseg.fastpath`) builds the recipe's network itself and evaluates no bundle config; the MONAI chain builds
the bundle's ``configs/inference.json`` components (preprocessing, network, inferer, postprocessing up to the
writer), as ``python -m monai.bundle run`` does, after :func:`volseg.trust.check_bundle` has found them exactly
volseg's for the bundle's recipe. volseg then writes the labels itself on the input's exact grid: for NIfTI input
the output takes the input's header and affine, so shape, affine and axis order are the input's.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
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
    probabilities: np.ndarray | None = None  # (classes, *spatial) on the input grid, when asked for
    dicom_files: list[Path] | None = None  # the source series, for DICOM input
    notes: list[str] = field(default_factory=list)


#: Where `volseg demo` puts its run (a bundle, like those under runs/).
DEMO_RUN = Path("demo") / "run"


def find_latest_run(runs_dir: str | Path = "runs") -> Path:
    """The most recently trained bundle (by models/model.pt): a run under ``runs_dir``, or the demo's run."""
    candidates = list(Path(runs_dir).glob("*/models/model.pt"))
    if Path(runs_dir) == Path("runs") and (DEMO_RUN / "models" / "model.pt").is_file():
        candidates.append(DEMO_RUN / "models" / "model.pt")
    runs = sorted(candidates, key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(
            f"no trained bundle found (in {runs_dir}/ or {DEMO_RUN}/); train one with `volseg train --config RECIPE`"
            " (or `volseg demo`), or pass --bundle DIR",
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


class Predictor:
    """Segments images with a trained bundle.

    Two engines compute the same segmentation. ``fast`` (the default for 3D volseg bundles on NIfTI and DICOM
    input, see :mod:`volseg.fastpath`) avoids full-resolution copies and resamples cheaply; ``monai`` runs the
    bundle's own MONAI transform chain (any bundle, any image format MONAI reads).

    Args:
        bundle_dir: a bundle with configs/inference.json and models/model.pt.
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        engine: ``fast``, ``onnx`` (the fast engine with the bundle's ``models/model.onnx`` run by onnxruntime,
            float32; see :mod:`volseg.onnx_engine`) or ``monai``.
        trust: let the MONAI chain evaluate configs that are not exactly what volseg writes for the bundle's
            recipe (or a bundle without a recipe); see :func:`volseg.trust.check_bundle`.
    """

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | None = None,
        engine: str = "fast",
        trust: bool = False,
        precision: str | None = None,
        overrides: list[str] | None = None,
    ) -> None:
        from volseg.runtime import resolve_device
        from volseg.trust import bundle_problem, check_bundle

        self.bundle_dir = Path(bundle_dir).resolve()
        cfg_file = self.bundle_dir / "configs" / "inference.json"
        weights = self.bundle_dir / "models" / "model.pt"
        if not cfg_file.is_file():
            raise UserError("not a bundle: configs/inference.json is missing", self.bundle_dir)
        if not weights.is_file():
            raise UserError("bundle has no weights: models/model.pt is missing (train it first)", self.bundle_dir)
        if engine not in ("fast", "onnx", "monai"):
            raise UserError(f"unknown engine '{engine}'; known: fast, onnx, monai", "--engine")
        if precision not in (None, "auto", "fp32", "bf16"):
            raise UserError(f"unknown precision '{precision}'; known: auto, fp32, bf16", "--precision")
        _check_infer_overrides(overrides)
        has_recipe = (self.bundle_dir / "configs" / "volseg_recipe.yaml").is_file()
        if overrides and (engine == "monai" or not has_recipe):
            raise UserError(
                "--set needs the fast engine and a volseg bundle (the MONAI chain is the bundle's own)", "--set"
            )
        self.trust = trust
        #: Lines for the user about the bundle as a whole (printed once by ``volseg infer``).
        self.notes: list[str] = []
        # The MONAI chain evaluates the bundle's configs: they must be exactly volseg's for the bundle's recipe
        # (checked when the chain is built). The fast engine evaluates none of them: it reads the recipe through the
        # schema and the weights with weights_only=True, and only warns that other tools would run the configs.
        self._configs: dict[str, Any] | None = None
        if engine == "monai" or not has_recipe:
            self._configs = check_bundle(self.bundle_dir, trust=trust)
        elif not trust:
            problem = bundle_problem(self.bundle_dir)
            if problem:
                self.notes.append(
                    f"warning: {self.bundle_dir}: {problem}; the fast engine reads only the recipe and the weights, "
                    "but MONAI Label and `python -m monai.bundle run` would evaluate these configs"
                )
        self.device = resolve_device(device)
        recipe = None
        if has_recipe:
            from volseg.bundle import read_bundle_recipe

            recipe = read_bundle_recipe(self.bundle_dir, overrides)
        self.recipe = recipe
        if recipe is not None and recipe.infer.tta_flips and not recipe.train.augment.flip:
            self.notes.append(
                "note: infer.tta_flips mirrors the input, but this model was trained without flips "
                "(train.augment.flip 0): on phantoms that lowered Dice (docs/benchmarks.md)"
            )
        self.segments = _segments(self.bundle_dir, recipe)
        self.algorithm = _algorithm(self.bundle_dir)
        self.network: torch.nn.Module | None = None
        self._chain: dict[str, Any] | None = None
        self.fast = None
        from volseg.folds import fold_weights

        #: The fold models of an ensemble bundle (models/folds/fold_k.pt), averaged by both engines; else [].
        self.folds = fold_weights(self.bundle_dir) if recipe is not None else []
        if engine != "monai" and recipe is not None:
            from volseg.fastpath import FastEngine, unsupported_reason

            reason = unsupported_reason(recipe)
            if overrides and reason:
                raise UserError(f"--set needs the fast engine, and {reason}", "--set")
            if reason and recipe.model.spatial_dims == 3:
                self.notes.append(f"note: {reason}: the bundle's MONAI chain runs it")
            if reason is None:
                if engine == "onnx":
                    from volseg.onnx_engine import load_onnx_network

                    self.network = load_onnx_network(self.bundle_dir, self.device, precision, self.notes)
                    precision = "fp32"
                    if self.folds:
                        self.notes.append("note: the onnx engine runs models/model.onnx (fold 0), not the ensemble")
                else:
                    self.network = self._recipe_networks(recipe)
                self.fast = FastEngine(recipe, self.network, self.device, precision)
                self.notes += self.fast.engine_notes
        if engine == "onnx" and self.fast is None:
            raise UserError("the onnx engine runs 3D volseg bundles (those the fast engine runs)", self.bundle_dir)
        if self.fast is None:
            if self.folds and recipe is not None:
                self.network = self._recipe_networks(recipe)
            self._build_chain()

    def _weights(self, path: Path | None = None) -> dict[str, Any]:
        from volseg.trust import safe_torch_load

        state = safe_torch_load(path or self.bundle_dir / "models" / "model.pt")
        if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
            state = state["model"]
        return state

    def _recipe_networks(self, recipe: Any) -> Any:
        """The recipe's network with the bundle's weights, or the mean of its fold models (:func:`ensembled`)."""
        if not self.folds:
            return self._recipe_network(recipe)
        from volseg.folds import ensembled

        return ensembled([self._recipe_network(recipe, path) for path in self.folds])

    def _recipe_network(self, recipe: Any, weights: Path | None = None) -> torch.nn.Module:
        """The recipe's network with the bundle's weights, built by volseg itself (no bundle config evaluated):
        in plain PyTorch where :mod:`volseg.fastnets` covers it (no MONAI import), else from MONAI's class."""
        from volseg.fastnets import build_inference_network
        from volseg.nets import build_network, network_config

        m = recipe.model
        cfg = network_config(m.name, m.spatial_dims, m.in_channels, recipe.num_classes, m.args, for_inference=True)
        state = self._weights(weights)
        net = build_inference_network(cfg)
        if net is not None:
            try:
                net.load_state_dict(state, strict=True)
                return net.to(self.device).eval()
            except RuntimeError:
                pass  # not the recipe's weights: MONAI's class reports it below, in its own terms
        net = build_network(cfg)
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0][:200]
            where = weights or self.bundle_dir / "models" / "model.pt"
            raise UserError(f"the weights do not fit the recipe's network ({first})", where) from None
        return net.to(self.device).eval()

    def _build_chain(self) -> dict[str, Any]:
        """The bundle's MONAI chain (preprocessing, inferer, postprocessing) and, if not built yet, its network.

        Without ``trust`` the chain is built from the configs as compared with volseg's own for the bundle's recipe
        (:func:`volseg.trust.check_bundle`), not from a second read of the files.
        """
        if self._chain is not None:
            return self._chain
        import json
        import sys

        from monai.bundle import ConfigParser

        from volseg.trust import check_bundle

        if self._configs is None and not self.trust:
            self._configs = check_bundle(self.bundle_dir)
        parser = ConfigParser()
        if self._configs is not None:
            parser.read_config(json.loads(json.dumps(self._configs["configs/inference.json"])))
        else:
            parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = f"$torch.device('{self.device}')"
        if (self.bundle_dir / "scripts").is_dir() and str(self.bundle_dir) not in sys.path:
            sys.path.insert(0, str(self.bundle_dir))
        # Everything up to the writer: volseg writes the output itself, on the input's grid.
        post = parser["postprocessing"]["transforms"]
        parser["postprocessing"]["transforms"] = [t for t in post if t.get("_target_") != "SaveImaged"]
        chain = {
            "preprocessing": parser.get_parsed_content("preprocessing"),
            "postprocessing": parser.get_parsed_content("postprocessing"),
            "inferer": parser.get_parsed_content("inferer"),
        }
        if self.network is None:
            net = parser.get_parsed_content("network_def")
            net.load_state_dict(self._weights())
            self.network = net.to(self.device).eval()
        self._chain = chain
        return chain

    @property
    def preprocessing(self) -> Any:
        return self._build_chain()["preprocessing"]

    @property
    def postprocessing(self) -> Any:
        return self._build_chain()["postprocessing"]

    @property
    def inferer(self) -> Any:
        return self._build_chain()["inferer"]

    def _load(self, src: Path, series_uid: str | None) -> tuple[dict[str, Any], Any, list[str]]:
        """Preprocess one input: (data, the DICOM volume or None, notes); DICOM series folders are read by volseg's
        own series reader."""
        if src.is_dir():
            from monai.data import MetaTensor
            from monai.transforms import Compose

            from volseg.data.dicom import choose_series, list_series, read_series

            chosen, skipped = choose_series(list_series(src), series_uid)
            vol = read_series(src, chosen.uid)
            vol.warnings[:0] = [f"chose {chosen.summary()}"] + [f"skipped {s.summary()}" for s in skipped]
            image = MetaTensor(
                torch.from_numpy(np.ascontiguousarray(vol.array, dtype=np.float32)),
                affine=torch.as_tensor(vol.affine, dtype=torch.float64),
                meta={"original_channel_dim": "no_channel", "filename_or_obj": str(src), "space": "RAS"},
            )
            # The bundle's chain after its loader.
            from monai.transforms import LoadImaged

            steps = list(self.preprocessing.transforms)
            first = next((i + 1 for i, t in enumerate(steps) if isinstance(t, LoadImaged)), 0)
            rest = Compose(steps[first:])
            return rest({"image": image}), vol, list(vol.warnings)
        from volseg.monai_compat import preprocess

        try:
            data, note = preprocess(self.preprocessing, {"image": str(src)}, src)
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - reader errors become one line naming the file
            raise UserError(f"cannot read image ({_reason(exc)})", src) from None
        return data, None, [note] if note else []

    def predict(self, source: str | Path, *, series_uid: str | None = None, probabilities: bool = False) -> Prediction:
        """Segment one image (file or DICOM series folder) and return labels on its own grid.

        Args:
            source: an image file or a folder holding a DICOM series.
            series_uid: which series of a DICOM folder (default: the CT/MR series with most slices).
            probabilities: also return the class probabilities on the input grid.
        """
        t0 = time.perf_counter()
        src = Path(source)
        name = src.name.lower()
        if src.is_file() and name.endswith((".nii", ".nii.gz")):
            from volseg.data.validate import check_image_file

            check_image_file(src, verify_data=False)
        if self.fast is not None and (src.is_dir() or name.endswith((".nii", ".nii.gz"))):
            return self._predict_fast(src, series_uid, probabilities, t0)
        from monai.transforms import Invertd

        data, vol, notes = self._load(src, series_uid)
        image = data["image"]
        from volseg.fastpath import mirrored

        flips = self.recipe.infer.tta_flips if self.recipe is not None else ()
        with torch.inference_mode():
            logits = self.inferer(image.unsqueeze(0).to(self.device), mirrored(self.network, flips))
        data["pred"] = logits[0].cpu() if isinstance(logits, torch.Tensor) else logits[-1][0].cpu()
        probs = None
        for t in self.postprocessing.transforms:
            data = t(data)
            if probabilities and isinstance(t, Invertd):
                probs = np.asarray(data["pred"].detach().cpu().numpy(), dtype=np.float32)
                # Outside the foreground crop the inverse pads zeros: that is background.
                probs[0] += np.clip(1.0 - probs.sum(axis=0), 0.0, 1.0)
        pred = data["pred"]
        labels = np.asarray(pred.detach().cpu().numpy())[0].astype(np.uint8)
        affine = np.asarray(pred.affine.cpu().numpy() if hasattr(pred, "affine") else np.eye(4), dtype=np.float64)
        files = None
        if vol is not None:
            affine = vol.affine
            files = list(vol.series.files)
        return Prediction(src, labels, affine, time.perf_counter() - t0, probs, files, notes)

    def _predict_fast(self, src: Path, series_uid: str | None, probabilities: bool, t0: float) -> Prediction:
        from volseg.fastpath import read_nifti

        assert self.fast is not None
        files = None
        notes: list[str] = []
        if src.is_dir():
            from volseg.data.dicom import choose_series, list_series, read_series

            chosen, skipped = choose_series(list_series(src), series_uid)
            vol = read_series(src, chosen.uid)
            arr, affine = vol.array, vol.affine
            files = list(vol.series.files)
            notes = [f"chose {chosen.summary()}"] + [f"skipped {s.summary()}" for s in skipped] + list(vol.warnings)
        else:
            arr, affine, _ = read_nifti(src)
        want = self.fast.recipe.model.in_channels
        channels = arr.shape[3] if arr.ndim == 4 else 1
        if arr.ndim not in (3, 4) or channels != want:
            raise UserError(f"expected a 3D image with {want} channel(s), got shape {arr.shape}", src)
        labels, probs = self.fast.segment(arr, affine, probabilities)
        notes += self.fast.notes
        return Prediction(src, labels, affine, time.perf_counter() - t0, probs, files, notes)


def _check_infer_overrides(overrides: list[str] | None) -> None:
    """At inference only the inference settings may change: the network was trained with the rest."""
    from volseg.recipe import parse_override

    for text in overrides or []:
        key, _ = parse_override(text)
        if not (key.startswith("infer.") or key == "data.crop_foreground") or key == "infer.roi_size":
            raise UserError(
                f"'{key}' cannot change at inference; infer.* (but roi_size) and data.crop_foreground can", "--set"
            )


def _segments(bundle_dir: Path, recipe: Any = None) -> list[Any]:
    """Segment names, values, colours and codes: from the volseg recipe (given, or the bundle's), else from the
    metadata's channel_def."""
    import json

    from volseg.data.writers import SegmentInfo, segments_from_recipe

    if recipe is not None:
        return segments_from_recipe(recipe)
    if (bundle_dir / "configs" / "volseg_recipe.yaml").is_file():
        from volseg.bundle import read_bundle_recipe

        return segments_from_recipe(read_bundle_recipe(bundle_dir))
    try:
        meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
        chans = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
        return [
            SegmentInfo(name=str(n), value=int(k))
            for k, n in sorted(chans.items(), key=lambda kv: int(kv[0]))
            if int(k)
        ]
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _algorithm(bundle_dir: Path) -> dict[str, Any]:
    import json

    from volseg import __version__

    info: dict[str, Any] = {"name": "volseg", "version": __version__, "bundle": bundle_dir.name}
    try:
        meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
        info["bundle"] = meta.get("name", bundle_dir.name)
        info["bundle_version"] = meta.get("version", "")
    except (OSError, ValueError):
        pass
    return info


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


def save_prediction(
    pred: Prediction, out_base: Path, formats: list[str] | None, segments: list[Any], algorithm: dict[str, Any]
) -> list[Path]:
    """Write a prediction on the input's exact grid in the asked formats.

    NIfTI input keeps its own header and affine; DICOM input gets a DICOM SEG referencing its series by default.
    """
    from volseg.data.writers import write_probabilities, write_segmentation

    reference = None
    name = pred.source.name.lower()
    if pred.source.is_file() and (name.endswith(".nii") or name.endswith(".nii.gz")):
        import nibabel as nib

        ref: Any = nib.load(str(pred.source))
        if tuple(ref.shape[: pred.labels.ndim]) != pred.labels.shape:
            raise RuntimeError(
                f"prediction shape {pred.labels.shape} differs from the input's {ref.shape}: "
                "the inverse of the preprocessing did not restore the input grid"
            )
        if not np.allclose(ref.affine, pred.affine, atol=1e-3):
            raise RuntimeError("prediction affine differs from the input's after inversion")
        reference = pred.source
    if pred.labels.ndim == 2:
        return [_write_png_labels(pred.labels, Path(f"{out_base}.png"))]
    if not formats:
        formats = ["nifti", "dicom-seg"] if pred.dicom_files else ["nifti"]
    paths = write_segmentation(
        pred.labels,
        pred.affine,
        out_base,
        formats,
        segments,
        reference_nifti=reference,
        dicom_series_files=pred.dicom_files,
        algorithm=algorithm,
    )
    if pred.probabilities is not None:
        paths.append(write_probabilities(pred.probabilities, pred.affine, Path(f"{out_base}_probabilities.nii.gz")))
    return paths


def _write_png_labels(labels: np.ndarray, path: Path) -> Path:
    """A 2D label map as an 8-bit PNG (MONAI's 2D arrays are (x, y): transposed to rows and columns)."""
    from PIL import Image

    from volseg.fileio import atomic_path

    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(labels.T.astype(np.uint8))).save(tmp, format="PNG")
    return path


def output_base(source: Path, out_dir: Path) -> Path:
    """OUT/<case>_seg (each format adds its suffix)."""
    return out_dir / f"{case_id(source)}_seg"


@dataclass(frozen=True)
class InferJob:
    """What to compute and write for every case of one ``volseg infer`` (passed whole to sharded workers)."""

    formats: list[str] | None = None
    series_uid: str | None = None
    probabilities: bool = False
    engine: str = "fast"
    trust: bool = False
    qc: bool = False
    precision: str | None = None
    overrides: list[str] | None = None


def run_inference(
    inputs: list[str],
    out_dir: str | Path,
    bundle_dir: str | Path | None = None,
    device: str | None = None,
    echo: Callable[[str], None] = print,
    *,
    formats: list[str] | None = None,
    series_uid: str | None = None,
    probabilities: bool = False,
    nproc_per_node: int = 1,
    engine: str = "fast",
    trust: bool = False,
    qc: bool = False,
    precision: str | None = None,
    overrides: list[str] | None = None,
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Segment every input; a bad input is reported and skipped.

    With ``nproc_per_node`` > 1 (or under torchrun), the cases are sharded across processes, one per GPU.

    Returns:
        (the written NIfTI, or first written file, per good case; (input, reason) per failed case).
    """
    from volseg.data.writers import FORMATS

    for f in formats or []:
        if f not in FORMATS:
            raise UserError(f"unknown format '{f}'; known: {', '.join(FORMATS)}", "--format")
    job = InferJob(formats, series_uid, probabilities, engine, trust, qc, precision, overrides)
    bundle = Path(bundle_dir) if bundle_dir else find_latest_run()
    sources = expand_inputs(inputs)
    if nproc_per_node > 1:
        return _spawn_inference(sources, out_dir, bundle, device, nproc_per_node, job)
    # Under torchrun (or a spawned worker), each rank segments its own share of the cases.
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        sources = sources[rank::world]
        from volseg.runtime import rank_device

        device = rank_device(device, int(os.environ.get("LOCAL_RANK", rank)))
        echo(f"rank {rank}/{world}: {len(sources)} case(s)")
    return _segment(sources, Path(out_dir), bundle, device, echo, job)


def _segment(
    sources: list[Path], out: Path, bundle: Path, device: str | None, echo: Callable[[str], None], job: InferJob
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Segment the given cases one after the other with one predictor."""
    predictor = Predictor(bundle, device, job.engine, job.trust, job.precision, job.overrides)
    written: list[Path] = []
    failures: list[tuple[Path, str]] = []
    echo(f"bundle {bundle}  device {predictor.device}  {len(sources)} case(s)")
    for note in predictor.notes:
        echo(note)
    for i, src in enumerate(sources, 1):
        try:
            pred = predictor.predict(src, series_uid=job.series_uid, probabilities=job.probabilities)
            paths = save_prediction(pred, output_base(src, out), job.formats, predictor.segments, predictor.algorithm)
        except UserError as err:
            failures.append((src, str(err)))
            echo(f"[{i}/{len(sources)}] {src}: FAILED: {err.message}")
            continue
        if job.qc:
            paths.append(_write_qc(pred, output_base(src, out), predictor.segments, job.series_uid))
        written.append(paths[0])
        from volseg.data.writers import label_counts

        counts = label_counts(pred.labels, minlength=2)
        for note in pred.notes:
            echo(f"[{i}/{len(sources)}] {src.name}: {note}")
        shown = ", ".join(str(p) for p in paths)
        echo(f"[{i}/{len(sources)}] {src.name} -> {shown}  {pred.seconds:.1f} s  voxels per label {counts.tolist()}")
    return written, failures


def read_image_for_display(src: Path, series_uid: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The input image (first channel) and its affine, for pictures."""
    if src.is_dir():
        from volseg.data.dicom import read_series

        vol = read_series(src, series_uid)
        return vol.array, vol.affine
    if src.name.lower().endswith((".png", ".tif", ".tiff")):
        from PIL import Image

        return np.asarray(Image.open(src).convert("L"), dtype=np.float32).T, np.eye(4)
    import nibabel as nib

    img: Any = nib.load(str(src))
    arr = np.asarray(img.dataobj, dtype=np.float32)
    return (arr[..., 0] if arr.ndim == 4 else arr), np.asarray(img.affine, dtype=np.float64)


def _write_qc(pred: Prediction, out_base: Path, segments: list[Any], series_uid: str | None) -> Path:
    """Axial, coronal and sagittal slices through the segmentation, outlined in the label colours."""
    from volseg.qc import write_montage

    image, affine = read_image_for_display(pred.source, series_uid)
    colors = {s.value: s.color for s in segments if s.color}
    return write_montage(image, affine, pred.labels, Path(f"{out_base}_qc.png"), colors=colors, title=pred.source.name)


def _spawn_inference(
    sources: list[Path], out_dir: str | Path, bundle: Path, device: str | None, nproc: int, job: InferJob
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Shard the cases over ``nproc`` processes started by ignite.distributed; gather what each wrote."""
    import json
    import tempfile

    import ignite.distributed as idist

    from volseg.runtime import distributed_backend

    backend = distributed_backend(device)
    with tempfile.TemporaryDirectory(prefix="volseg-infer-") as reports:
        with idist.Parallel(backend=backend, nproc_per_node=nproc) as parallel:
            parallel.run(_infer_worker, [str(s) for s in sources], str(out_dir), str(bundle), device, job, reports)
        written: list[Path] = []
        failures: list[tuple[Path, str]] = []
        for report in sorted(Path(reports).glob("rank*.json")):
            data = json.loads(report.read_text())
            written += [Path(p) for p in data["written"]]
            failures += [(Path(a), b) for a, b in data["failures"]]
    return written, failures


def _infer_worker(
    local_rank: int, sources: list[str], out_dir: str, bundle: str, device: str | None, job: InferJob, reports: str
) -> None:
    import json

    import ignite.distributed as idist

    from volseg.fileio import write_text_atomic
    from volseg.runtime import rank_device

    rank, world = idist.get_rank(), idist.get_world_size()
    device = rank_device(device, local_rank)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    mine = sources[rank::world]

    def echo(line: str) -> None:
        print(f"[rank {rank}] {line}", flush=True)

    written, failures = (
        _segment([Path(p) for p in mine], Path(out_dir), Path(bundle), device, echo, job) if mine else ([], [])
    )
    report = {"written": [str(p) for p in written], "failures": [(str(a), b) for a, b in failures]}
    write_text_atomic(Path(reports) / f"rank{rank}.json", json.dumps(report))
