"""Inference with a bundle: the predictor picks an engine, reads each input, writes the outputs.

:meth:`Predictor.from_bundle` reads the bundle's recipe, vets its configs and picks the engine
(:mod:`volseg.engines`: the fast engine of :mod:`volseg.fastpath` when it supports the recipe, else the bundle's
MONAI chain); :meth:`Predictor.predict` reads the input once (:func:`volseg.imageio.read_image`) and has the engine
segment it on the input's grid. :func:`save_prediction` writes the labels on that exact grid (for NIfTI input the
output takes the input's header and affine), :func:`run_inference` does both for every input of ``volseg infer``.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from volseg.data.datalist import IMAGE_SUFFIXES
from volseg.errors import UserError, one_line

if TYPE_CHECKING:
    from volseg.engines import Engine
    from volseg.imageio import Image


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
    image: Image | None = None  # the input as read, when kept for QC pictures


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
    """Segments images with one engine (:mod:`volseg.engines`) and describes the output's segments.

    Made from a bundle by :meth:`from_bundle`; the constructor takes the parts (an engine built elsewhere, e.g. a
    cascade of two, and what the writers need).

    Args:
        engine: what segments each image (``supports``, ``segment``).
        segments: the non-background labels, for the writers (:func:`volseg.data.writers.segments_from_recipe`).
        algorithm: what DICOM SEG records as the algorithm (name, version, bundle, bundle_version).
        recipe: the bundle's recipe, when there is one.
        notes: lines for the user about the model as a whole (printed once by ``volseg infer``).
        device: where the engine computes.
        bundle_dir: the bundle, when made from one.
        folds: the fold models the engine averages (``models/folds/fold_k.pt`` of an ensemble bundle), else [].
    """

    def __init__(
        self,
        engine: Engine,
        *,
        segments: list[Any] | None = None,
        algorithm: dict[str, Any] | None = None,
        recipe: Any = None,
        notes: list[str] | None = None,
        device: torch.device | None = None,
        bundle_dir: Path | None = None,
        folds: list[Path] | None = None,
    ) -> None:
        self.engine = engine
        self.segments = list(segments or [])
        self.algorithm = dict(algorithm or {"name": "volseg"})
        self.recipe = recipe
        self.notes = list(notes or [])
        self.device = device if device is not None else getattr(engine, "device", torch.device("cpu"))
        self.bundle_dir = bundle_dir
        self.folds = list(folds or [])

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | Path,
        device: str | None = None,
        engine: str = "fast",
        trust: bool = False,
        precision: str | None = None,
        overrides: list[str] | None = None,
    ) -> Predictor:
        """A predictor for a trained bundle.

        ``fast`` (the default) runs the fast engine (:mod:`volseg.fastpath`) when it supports the bundle's recipe,
        else falls back to the bundle's MONAI chain; ``onnx`` is the fast engine with the bundle's
        ``models/model.onnx`` run by onnxruntime (float32, :mod:`volseg.onnx_engine`); ``monai`` runs the bundle's
        own MONAI chain (any bundle). Fold ensembles (``models/folds``) are averaged by both engines.

        Args:
            bundle_dir: a bundle with configs/inference.json and models/model.pt.
            device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
            engine: ``fast``, ``onnx`` or ``monai``.
            trust: let the MONAI chain evaluate configs that are not exactly what volseg writes for the bundle's
                recipe (or a bundle without a recipe); see :func:`volseg.trust.check_bundle`.
            precision: ``auto``, ``fp32`` or ``bf16`` (the fast engine's network).
            overrides: ``infer.*`` (and ``data.crop_foreground``) recipe overrides, for the fast engine.
        """
        from volseg.runtime import resolve_device

        bundle = Path(bundle_dir).resolve()
        recipe = _check_bundle_request(bundle, engine, precision, overrides)
        notes: list[str] = []
        # The MONAI chain evaluates the bundle's configs: they must be exactly volseg's for the bundle's recipe. The
        # fast engine evaluates none of them: it reads the recipe through the schema and the weights with
        # weights_only=True, and only warns that other tools would run the configs.
        configs = _vet_configs(bundle, engine, recipe, trust, notes)
        dev = resolve_device(device)
        if recipe is not None and recipe.infer.tta_flips:
            trained = recipe.train.augment.flipped_axes(recipe.model.spatial_dims)
            untrained = sorted(set(recipe.infer.tta_flips) - set(trained))
            if untrained:
                notes.append(
                    f"note: infer.tta_flips mirrors the input along axes {untrained}, but this model was trained "
                    "without flips there (train.augment.flip, flip_axes): on phantoms that lowered Dice "
                    "(docs/benchmarks.md)"
                )
        from volseg.folds import fold_weights

        folds = fold_weights(bundle) if recipe is not None else []
        chosen = _choose_engine(bundle, engine, recipe, dev, precision, overrides, trust, configs, folds, notes)
        if recipe is not None and recipe.cascade is not None:
            # A cascade (volseg.cascade): the bundle is the coarse stage, stages/fine/ the fine one, vetted alike.
            from volseg.bundle import read_bundle_recipe
            from volseg.cascade import CascadeEngine, check_fine_stage

            # The stage check compares the recipes as trained; --set overrides then apply to both stages.
            as_trained = read_bundle_recipe(bundle) if overrides else recipe
            fine_dir = check_fine_stage(as_trained, bundle)
            fine = cls.from_bundle(fine_dir, device, engine, trust, precision, overrides)
            notes += [n for n in fine.notes if n not in notes]
            chosen = CascadeEngine(recipe, chosen, fine.engine)
        return cls(
            chosen,
            segments=_segments(bundle, recipe),
            algorithm=_algorithm(bundle),
            recipe=recipe,
            notes=notes,
            device=dev,
            bundle_dir=bundle,
            folds=folds,
        )

    @property
    def fast(self) -> Any:
        """The fast engine, when that is the engine (else None)."""
        from volseg.fastpath import FastEngine

        return self.engine if isinstance(self.engine, FastEngine) else None

    @property
    def network(self) -> Any:
        """The engine's network (a module, a fold ensemble or an ONNX session)."""
        return getattr(self.engine, "network", None)

    def predict(
        self,
        source: str | Path,
        *,
        series_uid: str | None = None,
        probabilities: bool = False,
        keep_image: bool = False,
    ) -> Prediction:
        """Segment one image (file or DICOM series folder) and return labels on its own grid.

        Args:
            source: an image file or a folder holding a DICOM series.
            series_uid: which series of a DICOM folder (default: the CT/MR series with most slices).
            probabilities: also return the class probabilities on the input grid.
            keep_image: keep the image as read in :attr:`Prediction.image` (for QC pictures, not read again).
        """
        from volseg.engines import MonaiEngine
        from volseg.imageio import read_image

        t0 = time.perf_counter()
        src = Path(source)
        if isinstance(self.engine, MonaiEngine) and self.engine.loads(src):
            from volseg.imageio import is_nifti

            if src.is_file() and is_nifti(src):
                from volseg.data.validate import check_image_file

                check_image_file(src, verify_data=False)
            out = self.engine.segment(src, probabilities)
            affine = out.affine if out.affine is not None else np.eye(4)
            kept = read_image(src) if keep_image else None
            seconds = time.perf_counter() - t0
            return Prediction(src, out.labels, affine, seconds, out.probabilities, None, out.notes, kept)
        image = read_image(src, series_uid)
        out = self.engine.segment(image, probabilities)
        notes = image.notes + out.notes
        seconds = time.perf_counter() - t0
        kept = image if keep_image else None
        return Prediction(src, out.labels, image.affine, seconds, out.probabilities, image.dicom_files, notes, kept)


def _check_bundle_request(bundle: Path, engine: str, precision: str | None, overrides: list[str] | None) -> Any:
    """Refuse what cannot work before anything is built; the bundle's recipe (None for a bundle without one)."""
    from volseg.bundle import read_bundle_recipe

    if not (bundle / "configs" / "inference.json").is_file():
        raise UserError("not a bundle: configs/inference.json is missing", bundle)
    if not (bundle / "models" / "model.pt").is_file():
        raise UserError("bundle has no weights: models/model.pt is missing (train it first)", bundle)
    if engine not in ENGINES:
        raise UserError(f"unknown engine '{engine}'; known: {', '.join(ENGINES)}", "--engine")
    if precision not in (None, "auto", "fp32", "bf16"):
        raise UserError(f"unknown precision '{precision}'; known: auto, fp32, bf16", "--precision")
    _check_infer_overrides(overrides)
    has_recipe = (bundle / "configs" / "volseg_recipe.yaml").is_file()
    if overrides and (engine == "monai" or not has_recipe):
        raise UserError(
            "--set needs the fast engine and a volseg bundle (the MONAI chain is the bundle's own)", "--set"
        )
    return read_bundle_recipe(bundle, overrides) if has_recipe else None


def _vet_configs(bundle: Path, engine: str, recipe: Any, trust: bool, notes: list[str]) -> dict[str, Any] | None:
    """The bundle's configs as compared with volseg's own (:func:`volseg.trust.check_bundle`) when the MONAI chain
    will run them; otherwise None, and a warning when other tools would run configs that are not volseg's."""
    from volseg.trust import bundle_problem, check_bundle

    if engine == "monai" or recipe is None:
        return check_bundle(bundle, trust=trust)
    if not trust:
        problem = bundle_problem(bundle)
        if problem:
            notes.append(
                f"warning: {bundle}: {problem}; the fast engine reads only the recipe and the weights, "
                "but MONAI Label and `python -m monai.bundle run` would evaluate these configs"
            )
    return None


#: ``--engine`` values: the engines tried in order; the first whose ``supports()`` accepts the recipe runs it.
ENGINES = {"fast": ("fast", "monai"), "onnx": ("onnx",), "monai": ("monai",)}


def _choose_engine(
    bundle: Path,
    engine: str,
    recipe: Any,
    device: torch.device,
    precision: str | None,
    overrides: list[str] | None,
    trust: bool,
    configs: dict[str, Any] | None,
    folds: list[Path],
    notes: list[str],
) -> Engine:
    """The first engine of :data:`ENGINES` [``engine``] that supports the recipe, built with its network (the mean
    of the fold models ``folds`` when there are any)."""
    from volseg.engines import MonaiEngine
    from volseg.fastpath import FastEngine

    for name in ENGINES[engine]:
        if name == "monai":
            if configs is None and not trust:
                from volseg.trust import check_bundle

                configs = check_bundle(bundle)
            network = recipe_networks(bundle, recipe, device, folds) if folds else None
            return MonaiEngine(bundle, configs, device, recipe, network)
        reason = FastEngine.supports(recipe) if recipe is not None else "the fast engine runs volseg bundles"
        if reason is not None:
            if overrides:
                raise UserError(f"--set needs the fast engine, and {reason}", "--set")
            if name == "onnx":
                raise UserError("the onnx engine runs 3D volseg bundles (those the fast engine runs)", bundle)
            if recipe is not None and recipe.model.spatial_dims == 3:
                notes.append(f"note: {reason}: the bundle's MONAI chain runs it")
            continue
        if name == "onnx":
            from volseg.onnx_engine import load_onnx_network

            network = load_onnx_network(bundle, device, precision, notes)
            precision = "fp32"
            if folds:
                notes.append("note: the onnx engine runs models/model.onnx (fold 0), not the ensemble")
        else:
            network = recipe_networks(bundle, recipe, device, folds)
        fast = FastEngine(recipe, network, device, precision)
        notes += fast.engine_notes
        return fast
    raise AssertionError(f"no engine for {engine}")  # ENGINES ends with one that supports every recipe


def _weights(path: Path) -> dict[str, Any]:
    from volseg.trust import safe_torch_load

    state = safe_torch_load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def recipe_networks(bundle: Path, recipe: Any, device: torch.device, folds: list[Path] | None = None) -> Any:
    """The recipe's network with the bundle's weights, or the mean of its fold models (:func:`ensembled`)."""
    if not folds:
        return recipe_network(recipe, bundle / "models" / "model.pt", device)
    from volseg.folds import ensembled

    return ensembled([recipe_network(recipe, path, device) for path in folds])


def recipe_network(recipe: Any, weights: Path, device: torch.device) -> torch.nn.Module:
    """The recipe's network with the given weights, built by volseg itself (no bundle config evaluated): in plain
    PyTorch where :mod:`volseg.fastnets` covers it (no MONAI import), else from MONAI's class."""
    from volseg.fastnets import build_inference_network
    from volseg.nets import build_network, network_config

    m = recipe.model
    cfg = network_config(m.name, m.spatial_dims, m.in_channels, recipe.num_classes, m.args, for_inference=True)
    state = _weights(weights)
    net = build_inference_network(cfg)
    if net is not None:
        try:
            net.load_state_dict(state, strict=True)
            return net.to(device).eval()
        except RuntimeError:
            pass  # not the recipe's weights: MONAI's class reports it below, in its own terms
    net = build_network(cfg)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"the weights do not fit the recipe's network ({one_line(exc)})", weights) from None
    return net.to(device).eval()


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
        from volseg.imageio import nifti_header

        ref: Any = nifti_header(pred.source)
        if tuple(ref.shape[: pred.labels.ndim]) != pred.labels.shape:
            raise RuntimeError(
                f"prediction shape {pred.labels.shape} differs from the input's {ref.shape}: "
                "the inverse of the preprocessing did not restore the input grid"
            )
        if not np.allclose(ref.affine, pred.affine, atol=1e-3):
            raise RuntimeError("prediction affine differs from the input's after inversion")
        reference = pred.source
    if pred.labels.ndim == 2:
        return write_segmentation(pred.labels, pred.affine, out_base, ["png"], segments)
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


def output_base(source: Path, out_dir: Path) -> Path:
    """OUT/<case>_seg (each format adds its suffix): :func:`volseg.evaluate.prediction_base`."""
    from volseg.evaluate import prediction_base

    return prediction_base(source, out_dir)


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
    predictor = Predictor.from_bundle(bundle, device, job.engine, job.trust, job.precision, job.overrides)
    written: list[Path] = []
    failures: list[tuple[Path, str]] = []
    echo(f"bundle {bundle}  device {predictor.device}  {len(sources)} case(s)")
    for note in predictor.notes:
        echo(note)
    for i, src in enumerate(sources, 1):
        try:
            pred = predictor.predict(src, series_uid=job.series_uid, probabilities=job.probabilities, keep_image=job.qc)
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


def _write_qc(pred: Prediction, out_base: Path, segments: list[Any], series_uid: str | None) -> Path:
    """Axial, coronal and sagittal slices through the segmentation, outlined in the label colours."""
    from volseg.data.writers import segment_colors
    from volseg.imageio import read_image
    from volseg.qc import write_montage

    image = pred.image if pred.image is not None else read_image(pred.source, series_uid)
    arr = image.array[..., 0] if image.array.ndim == 4 else image.array
    colors = segment_colors(segments)
    path = Path(f"{out_base}_qc.png")
    return write_montage(arr, image.affine, pred.labels, path, colors=colors, title=pred.source.name)


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
