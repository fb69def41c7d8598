"""The ``volseg`` command line.

Each command imports its heavy modules inside the function, so ``volseg --help`` is quick. A user mistake
(:class:`volseg.errors.UserError`) ends with one line on stderr and exit status 2; an internal error exits 1.
``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from volseg.errors import UserError

app = typer.Typer(
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
    help="volseg: 3D and 2D medical image segmentation on MONAI.",
)

_DEBUG = {"on": False}

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _echo(msg: str) -> None:
    typer.echo(msg)


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks for errors")] = False,
) -> None:
    _DEBUG["on"] = debug or os.environ.get("VOLSEG_DEBUG") == "1"


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", module="monai")
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("monai", "ignite", "nvImageCodec"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)


@app.command()
def train(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="recipe YAML (default: plan one from --data)")
    ] = None,
    data: Annotated[Path | None, typer.Option(help="data folder or CSV (default: the recipe's data.root)")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder (default runs/<recipe name>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the run's last checkpoint")] = False,
    skip_check: Annotated[bool, typer.Option("--skip-data-check", help="do not check the data set first")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. train.max_epochs=3")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    nproc_per_node: Annotated[
        int, typer.Option("--nproc-per-node", min=1, help="processes to spawn (one per GPU; gloo on CPU)")
    ] = 1,
    folds: Annotated[
        int | None,
        typer.Option(min=2, help="K-fold cross-validation: train every fold, the run becomes their ensemble"),
    ] = None,
    fold: Annotated[int | None, typer.Option(min=0, help="with --folds: train only this fold")] = None,
    time_budget: Annotated[
        str | None, typer.Option("--time-budget", help="without --config: training time to plan for, e.g. 20m")
    ] = None,
) -> None:
    """Train a recipe; the run folder becomes a MONAI bundle. Without --config, a recipe is planned from --data."""
    from volseg.recipe import load_recipe

    if config is None:
        if data is None:
            raise UserError("give --config RECIPE, or --data DIR to plan a recipe from the data", "--config")
        from volseg.plan import default_name, plan_for_training

        out = out or Path("runs") / default_name(data)
        config = plan_for_training(data, out, resume=resume, device=device, time_budget=time_budget, echo=_echo)
    recipe = load_recipe(config, set_ or [])
    root = data or (Path(recipe.data.root) if recipe.data.root else None)
    if root is None:
        raise UserError("no data given: pass --data DIR or set data.root in the recipe", config)
    _quiet_libraries()
    from volseg.train import TrainingInterrupted
    from volseg.train import train as run_train

    run_dir = out or Path("runs") / recipe.name
    if not skip_check and int(os.environ.get("RANK", "0")) == 0:
        _check_before_training(recipe, root)
    if fold is not None and folds is None:
        raise UserError("--fold k needs --folds K", "--fold")
    try:
        if recipe.cascade is not None:
            if folds is not None:
                raise UserError("--folds is not available for a cascade recipe (two stages) yet", "--folds")
            from volseg.cascade import train_cascade

            stages = train_cascade(
                recipe, root, run_dir, resume=resume, echo=_echo, device=device, overrides=set_ or [],
                nproc_per_node=nproc_per_node,
            )  # fmt: skip
            for stage, r in zip(("coarse", "fine"), stages, strict=True):
                dice = "  ".join(f"{k} {v:.4f}" for k, v in r.per_label_dice.items())
                _echo(f"{stage} stage: {r.epochs} epochs in {r.seconds:.0f} s; validation Dice {dice}")
            _echo(f"bundle: {stages[0].run_dir}")
            return
        if folds is not None:
            from volseg.folds import train_folds

            results = train_folds(
                recipe, root, run_dir, folds, only=fold, resume=resume, echo=_echo, device=device,
                overrides=set_ or [], nproc_per_node=nproc_per_node,
            )  # fmt: skip
            for r in results:
                _echo(f"{r.run_dir.name}: best mean Dice {r.best_mean_dice:.4f} (epoch {r.best_epoch})")
            return
        result = run_train(
            recipe, root, run_dir, resume=resume, device=device, echo=_echo, overrides=set_ or [],
            nproc_per_node=nproc_per_node,
        )  # fmt: skip
    except TrainingInterrupted as stop:
        typer.echo(f"volseg: {stop}; continue with --resume", err=True)
        raise typer.Exit(128 + stop.signum) from None
    import ignite.distributed as idist

    if idist.get_rank() != 0:
        return
    dice = "  ".join(f"{k} {v:.4f}" for k, v in result.per_label_dice.items())
    _echo(
        f"done: {result.epochs} epochs in {result.seconds:.0f} s; best mean Dice {result.best_mean_dice:.4f} "
        f"(epoch {result.best_epoch}); last validation Dice {dice}"
        + ("; the bundle keeps the final weights" if recipe.train.weights == "final" else "")
    )
    _echo(f"bundle: {result.run_dir}")


def _check_before_training(recipe: object, root: Path) -> None:
    """The data check before training: errors stop it, warnings are shown and training goes on."""
    from volseg.data.checks import check_data as run_check

    report = run_check(recipe, root)  # type: ignore[arg-type]
    if report.warnings or report.errors:
        _echo(report.table())
    if not report.ok:
        first = report.errors[0]
        raise UserError(
            f"the data check found {len(report.errors)} error(s), first: {first.path}: {first.problem} "
            "(see the table above; --skip-data-check to train anyway)",
            root,
        )
    _echo(f"data check: {report.n_cases} cases, {len(report.warnings)} warning(s)")


@app.command()
def plan(
    data: Annotated[Path, typer.Option(help="data folder or CSV (MSD, images/ + labels/, CSV)")],
    out: Annotated[Path, typer.Option("--out", "-o", help="recipe to write; NAME.fingerprint.json goes beside it")],
    device: Annotated[str, typer.Option(help="auto, cpu or cuda: the device to plan for")] = "auto",
    memory_gb: Annotated[
        float | None, typer.Option("--memory-gb", help="memory target in GB (default: the GPU's; on cpu half the RAM)")
    ] = None,
    time_budget: Annotated[
        str | None, typer.Option("--time-budget", help="training time to plan for, e.g. 20m, 1.5h")
    ] = None,
    name: Annotated[str | None, typer.Option(help="recipe name (default: the file name of --out)")] = None,
) -> None:
    """Plan a recipe from a data set: its fingerprint, then every decision with the reason in a comment."""
    _quiet_libraries()
    from volseg.plan import run_plan

    run_plan(data, out, device=device, memory_gb=memory_gb, time_budget=time_budget, name=name, echo=_echo)


@app.command()
def infer(
    inputs: Annotated[
        list[str],
        typer.Argument(help="image files, folders, globs, DICOM series folders, or dicomweb(s)://HOST:PORT/PATH"),
    ],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="output folder (default predictions; DICOMweb: none)")
    ] = None,
    bundle: Annotated[Path | None, typer.Option(help="bundle folder (default: the latest run in runs/)")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    format_: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="nifti, nrrd, seg.nrrd, dicom-seg (repeat for several; default nifti, plus dicom-seg for DICOM input)",
        ),
    ] = None,
    series: Annotated[str | None, typer.Option(help="SeriesInstanceUID to segment in a DICOM folder or study")] = None,
    study: Annotated[
        str | None, typer.Option(help="StudyInstanceUID on the DICOMweb server (the SEG is stored back in it)")
    ] = None,
    ca_bundle: Annotated[
        Path | None, typer.Option("--ca-bundle", help="CA certificates (PEM) for a dicomwebs:// server")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="DICOMweb: seconds to wait for a connection; 30x that for an answer")
    ] = 10.0,
    save_probabilities: Annotated[
        bool, typer.Option("--save-probabilities", help="also write class probabilities (NIfTI, 16-bit)")
    ] = False,
    nproc_per_node: Annotated[
        int, typer.Option("--nproc-per-node", min=1, help="processes to shard the cases over (one per GPU)")
    ] = 1,
    engine: Annotated[
        str,
        typer.Option(
            help="fast (volseg's engine, default), onnx (the fast engine with models/model.onnx in onnxruntime; "
            "`volseg export-onnx` writes it) or monai (the bundle's MONAI transform chain)"
        ),
    ] = "fast",
    trust_bundle: Annotated[
        bool,
        typer.Option(
            "--trust-bundle",
            help="let the MONAI chain run configs that are not exactly what volseg writes for the bundle's recipe",
        ),
    ] = False,
    qc: Annotated[bool, typer.Option("--qc", help="also write a PNG montage per case (<case>_seg_qc.png)")] = False,
    precision: Annotated[
        str | None,
        typer.Option(
            help="network arithmetic of the fast engine: auto (bf16 on GPUs and on CPUs with native bf16), fp32 "
            "(exact) or bf16 (default: the bundle recipe's infer.precision, normally auto)"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="change an inference setting of the bundle's recipe for this run (fast engine), e.g. "
            "infer.overlap=0.5, infer.blend=constant, infer.postprocess.largest_component=[], "
            "data.crop_foreground=false",
        ),
    ] = None,
) -> None:
    """Segment images with a trained bundle; outputs are on each input's exact grid."""
    _quiet_libraries()
    from volseg.pacs import is_dicomweb_input, run_dicomweb_inference

    if any(is_dicomweb_input(i, study) for i in inputs) or study is not None:
        if len(inputs) != 1 or not is_dicomweb_input(inputs[0], study):
            raise UserError("--study goes with one DICOMweb URL (dicomweb://HOST:PORT/PATH) as the input", "--study")
        if save_probabilities or qc or nproc_per_node > 1:
            raise UserError("--save-probabilities, --qc and --nproc-per-node are not for DICOMweb input", inputs[0])
        run_dicomweb_inference(
            inputs[0], study, series, bundle, output=output, formats=format_, device=device, engine=engine,
            trust=trust_bundle, precision=precision, overrides=set_, ca_bundle=ca_bundle,
            timeout=(timeout, 30 * timeout), echo=_echo,
        )  # fmt: skip
        return
    from volseg.data.channels import stacked_inputs
    from volseg.infer import run_inference

    with stacked_inputs(inputs, bundle) as cases:  # nnU-Net channel files (<case>_0000, _0001, ...): one case
        written, failures = run_inference(
            cases, output or Path("predictions"), bundle, device, echo=_echo, formats=format_, series_uid=series,
            probabilities=save_probabilities, nproc_per_node=nproc_per_node, engine=engine, trust=trust_bundle,
            qc=qc, precision=precision, overrides=set_,
        )  # fmt: skip
    if failures:
        _echo(f"{len(failures)} of {len(failures) + len(written)} input(s) failed:")
        for src, why in failures:
            typer.echo(f"  {src}: {why}", err=True)
        raise typer.Exit(2)


@app.command()
def synth(
    task: Annotated[
        str,
        typer.Option(
            help="liver_ct (3D CT phantoms), mr (3D abdominal MR phantoms, 0.9 x 0.9 x 5 mm, arbitrary units), "
            "cells (2D fluorescence images) or torso_ct (an independent CT family for held-out evaluation only: its "
            "cases all go to imagesTs/labelsTs)"
        ),
    ] = "liver_ct",
    n: Annotated[int, typer.Option("-n", help="number of training cases (torso_ct: of held-out cases)")] = 10,
    out: Annotated[Path, typer.Option("--out", "-o", help="output folder (MSD layout)")] = Path("data/synth"),
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    size: Annotated[str, typer.Option(help="liver_ct, torso_ct: demo (small, CPU) or full (512x512 slices)")] = "demo",
    n_test: Annotated[int, typer.Option("--n-test", help="held-out cases in imagesTs/labelsTs")] = 0,
    variety: Annotated[
        str,
        typer.Option(help="liver_ct: clinical (clinical fields of view, phases, noise, lesions) or hard (original)"),
    ] = "clinical",
    spacing: Annotated[
        tuple[float, float, float] | None,
        typer.Option(help="liver_ct: the voxel size in mm of every case, e.g. --spacing 1.5 1.5 1.5 (default: drawn)"),
    ] = None,
) -> None:
    """Write a synthetic data set in the Medical Segmentation Decathlon layout."""
    if task == "torso_ct":
        from volseg.data.synth_torso import write_torso_dataset

        count = n_test or n
        if count < 1:
            raise UserError("-n (or --n-test) must be at least 1", "-n")
        path = write_torso_dataset(out, n=count, seed=seed, size=size)
        _echo(f"wrote {count} held-out case(s) (imagesTs/labelsTs; for evaluation, not training): {path}")
        return
    from volseg.data.synth import write_dataset

    if n < 1:
        raise UserError("-n must be at least 1", "-n")
    path = write_dataset(out, task=task, n=n, seed=seed, size=size, n_test=n_test, variety=variety, spacing=spacing)
    _echo(f"wrote {n} training and {n_test} test case(s): {path}")


@app.command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="prediction file or folder (NIfTI)")],
    gt: Annotated[Path, typer.Argument(help="ground-truth file or folder (NIfTI)")],
    labels: Annotated[
        list[str] | None,
        typer.Option(
            "--labels",
            help="name=value, repeatable (default: the labels of --config or --bundle; without either, every value "
            "found in the files, named label_N)",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="recipe whose labels to use")] = None,
    bundle: Annotated[Path | None, typer.Option(help="bundle whose recipe's labels to use")] = None,
    tolerance: Annotated[float, typer.Option(help="surface Dice tolerance in mm")] = 2.0,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder for the CSV files")] = Path("evaluation"),
    qc: Annotated[bool, typer.Option("--qc", help="also write a PNG montage per case (prediction and truth)")] = False,
    images: Annotated[
        Path | None, typer.Option(help="folder of the images, for --qc backgrounds (default: the ground truth)")
    ] = None,
) -> None:
    """Dice, IoU, HD95, average surface distance and surface Dice per case and label, with a summary."""
    from volseg.evaluate import evaluate_files, found_labels, pair_files

    names: dict[str, int] = {}
    for item in labels or []:
        name, sep, value = item.partition("=")
        if not sep or not value.strip().isdigit():
            raise UserError(f"'{item}' is not of the form name=value", "--labels")
        names[name.strip()] = int(value)
    if config is not None and bundle is not None:
        raise UserError("give the labels' names by --config or by --bundle, not both", "--bundle")
    if not names and config is not None:
        from volseg.recipe import load_recipe

        names = {n: lab.value for n, lab in load_recipe(config).data.labels.items()}
    if not names and bundle is not None:
        from volseg.bundle import read_bundle_recipe

        names = {n: lab.value for n, lab in read_bundle_recipe(bundle).data.labels.items()}
    pairs = pair_files(pred, gt)
    if not names:
        names = found_labels(pairs)
        _echo(f"labels found in the files: {', '.join(names)} (--labels name=value or --config RECIPE names them)")
    names = {n: v for n, v in names.items() if v != 0}
    rows, summary = evaluate_files(pairs, names, tolerance, out)
    if qc:
        _evaluate_qc(pairs, out, images)
    _echo(f"{len({r['case'] for r in rows})} case(s); per-case metrics and summary in {out}")
    _echo(f"{'label':<16}{'metric':<8}{'mean':>10}{'median':>10}{'std':>10}{'n':>5}{'undef':>7}")
    for r in summary:
        _echo(
            f"{r['label']:<16}{r['metric']:<8}{r['mean']:>10.4f}{r['median']:>10.4f}{r['std']:>10.4f}"
            f"{r['n']:>5}{r['n_undefined']:>7}"
        )


def _evaluate_qc(pairs: list[tuple[Path, Path]], out: Path, images: Path | None) -> None:
    import numpy as np

    from volseg.evaluate import case_image, case_name
    from volseg.imageio import read_image, read_labels
    from volseg.qc import write_montage

    for pred_path, gt_path in pairs:
        case = case_name(gt_path)
        pred_arr, _ = read_labels(pred_path)
        gt_arr, gt_affine = read_labels(gt_path)
        background = gt_arr.astype(np.float32)
        found = case_image(images, case) if images is not None else None
        if found is not None:
            image = read_image(found).array
            background = image[..., 0] if image.ndim == 4 else image
        path = write_montage(background, gt_affine, pred_arr, out / f"{case}_qc.png", ground_truth=gt_arr, title=case)
        _echo(f"qc: {path}")


@app.command("check-data")
def check_data(
    config: Annotated[Path, typer.Option("--config", "-c", help="recipe YAML")],
    data: Annotated[Path | None, typer.Option(help="data folder or CSV (default: the recipe's data.root)")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="recipe override")] = None,
) -> None:
    """Check a data set against a recipe: pairs, geometry, label values, NaNs, dimensions, duplicates."""
    from volseg.data.checks import run_check_data

    rc = run_check_data(config, data, set_ or [], _echo)
    if rc:
        raise typer.Exit(rc)


@app.command("export-bundles")
def export_bundles(
    configs: Annotated[Path, typer.Option(help="folder of recipes")] = REPO_CONFIGS,
    out: Annotated[Path, typer.Option(help="folder of bundles")] = REPO_CONFIGS.parent / "bundles",
) -> None:
    """Regenerate bundles/ from configs/ (configs, docs and LICENSE; weights come from training)."""
    from volseg.bundle import export_recipe_bundles

    for path in export_recipe_bundles(configs, out):
        _echo(f"wrote {path}")


@app.command("export-dataset")
def export_dataset(
    data: Annotated[Path, typer.Option(help="data folder or CSV (any layout volseg reads)")],
    out: Annotated[Path, typer.Option(help="folder to write the data set into")],
    name: Annotated[str, typer.Option(help="the data set's name, e.g. Dataset501_Liver")],
    format_: Annotated[str, typer.Option("--format", help="nnunet (nnU-Net v2's raw data set)")] = "nnunet",
    config: Annotated[Path | None, typer.Option(help="recipe whose labels and modality to record")] = None,
) -> None:
    """Write a labelled data set in another tool's layout (nnU-Net v2 raw: imagesTr, labelsTr, dataset.json)."""
    if format_ != "nnunet":
        raise UserError(f"unknown format '{format_}'; known: nnunet", "--format")
    from volseg.data.export import export_nnunet
    from volseg.recipe import load_recipe

    recipe = load_recipe(config) if config else None
    export_nnunet(data, out, name=name, recipe=recipe, source=recipe.data.source if recipe else "auto", echo=_echo)


@app.command("select")
def select_(
    runs: Annotated[list[Path], typer.Argument(help="fold runs (trained with --folds K) to compare")],
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
) -> None:
    """Choose mirroring and postprocessing by cross-validation (nnU-Net's find_best_configuration); ensembles of
    two runs are compared too. The choice is written into the best run's bundle."""
    _quiet_libraries()
    from volseg.select import run_select

    run_select(runs, device=device, echo=_echo)


@app.command("rewrite-bundle")
def rewrite_bundle(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (a volseg run)")],
) -> None:
    """Write a bundle's configs anew from its recipe (configs/volseg_recipe.yaml), keeping weights and run record.

    For a bundle written by another volseg version, or whose configs were edited: afterwards they are exactly what
    this volseg writes, and files it does not write under configs/ and scripts/ are removed.
    """
    from volseg.trust import bundle_problem
    from volseg.trust import rewrite_bundle as rewrite

    rewrite(bundle, echo=_echo)
    problem = bundle_problem(bundle)
    if problem:
        raise UserError(problem, bundle)
    _echo(f"rewrote the configs of {bundle} from its recipe")


@app.command("check-recipe")
def check_recipe(
    config: Annotated[Path, typer.Argument(help="recipe YAML")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override, e.g. train.max_epochs=3")] = None,
) -> None:
    """Validate a recipe and print it with every default filled in."""
    from volseg.recipe import dump_recipe, load_recipe

    _echo(dump_recipe(load_recipe(config, set_ or [])))


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="demo folder")] = Path("demo"),
    config: Annotated[
        Path | None, typer.Option(help="a recipe instead of the plan (e.g. configs/demo_liver_ct.yaml)")
    ] = None,
    time_budget: Annotated[
        str, typer.Option("--time-budget", help="training time the plan is made for (both stages), e.g. 14m")
    ] = "14m",
    n_train: Annotated[int, typer.Option("--n-train", help="synthetic training cases")] = 40,
    n_test: Annotated[int, typer.Option("--n-test", help="held-out phantoms of the training generator")] = 15,
    n_torso: Annotated[int, typer.Option("--n-torso", help="held-out phantoms of the other family (torso_ct)")] = 2,
    set_: Annotated[list[str] | None, typer.Option("--set", help="recipe override")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
) -> None:
    """Synthesise CT phantoms, plan for a time budget, train, segment held-out phantoms of two families, score."""
    _quiet_libraries()
    from volseg.demo import run_demo

    run_demo(out, config, n_train, n_test, set_ or [], device, echo=_echo, n_torso=n_torso, time_budget=time_budget)


@app.command("watch-orthanc")
def watch_orthanc(
    url: Annotated[str, typer.Argument(help="Orthanc's root, http(s)://HOST:PORT (DICOMweb under /dicom-web)")],
    state: Annotated[Path, typer.Option(help="JSON state file: the last change processed and the series done")],
    bundle: Annotated[Path | None, typer.Option(help="bundle folder (default: the latest run in runs/)")] = None,
    modality: Annotated[
        list[str] | None, typer.Option("--modality", help="modality to segment (repeat; default CT and MR)")
    ] = None,
    series_description: Annotated[
        str | None, typer.Option("--series-description", help="regular expression the SeriesDescription must match")
    ] = None,
    poll: Annotated[float, typer.Option(min=0.1, help="seconds between looks at the change feed")] = 10.0,
    once: Annotated[bool, typer.Option("--once", help="process the new changes once and exit")] = False,
    from_now: Annotated[
        bool, typer.Option("--from-now", help="with a new state file: ignore the series already on the server")
    ] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="also keep local outputs here")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    ca_bundle: Annotated[Path | None, typer.Option("--ca-bundle", help="CA certificates (PEM) for https")] = None,
    timeout: Annotated[
        float, typer.Option(min=1, help="seconds to wait for a connection; 30x that for an answer")
    ] = 10.0,
) -> None:
    """Segment the new series of an Orthanc (its /changes feed) and store each DICOM SEG back.

    Credentials come from VOLSEG_DICOMWEB_USER and VOLSEG_DICOMWEB_PASSWORD, or VOLSEG_DICOMWEB_TOKEN.
    """
    import signal

    _quiet_libraries()
    from volseg.infer import Predictor, find_latest_run
    from volseg.pacs import OrthancWatcher, WatchRules

    rules = WatchRules(tuple(modality) if modality else ("CT", "MR"), series_description)
    predictor = Predictor.from_bundle(bundle or find_latest_run(), device)
    watcher = OrthancWatcher(
        url, predictor, state, rules=rules, poll_interval=poll, output=output, from_now=from_now,
        ca_bundle=ca_bundle, timeout=(timeout, 30 * timeout), echo=_echo,
    )  # fmt: skip
    _echo(f"watching {watcher.url} (state {state}; bundle {predictor.bundle_dir}, device {predictor.device})")
    if once:
        results = watcher.run_once()
        done = sum(r.outcome == "done" for r in results)
        failed = sum(r.outcome == "failed" for r in results)
        _echo(f"{done} series segmented, {failed} failed, {len(results) - done - failed} skipped")
        if failed:
            raise typer.Exit(2)
        return
    signal.signal(signal.SIGTERM, lambda *_: watcher.stop())
    try:
        watcher.run_forever()
    except KeyboardInterrupt:
        watcher.stop()
    _echo("stopped")


@app.command("export-onnx")
def export_onnx(
    bundle: Annotated[Path, typer.Argument(help="bundle folder (a 3D volseg run)")],
    opset: Annotated[int, typer.Option(min=13, help="ONNX opset")] = 18,
) -> None:
    """Write the bundle's network as models/model.onnx (dynamic batch and spatial axes) for `--engine onnx`."""
    _quiet_libraries()
    from volseg.onnx_engine import export_onnx as run_export

    result = run_export(bundle, opset)
    _echo(
        f"wrote {result.path} ({result.exporter} exporter, opset {result.opset}, {result.seconds:.1f} s); "
        f"onnxruntime vs torch on two inputs: max |difference| {result.max_abs_diff:.2g} "
        f"(largest logit {result.max_abs_logit:.3g})"
    )


@app.command()
def serve(
    bundle: Annotated[
        list[str] | None,
        typer.Option(
            help="bundle folder, or NAME=FOLDER; repeat to serve several, the first is the default model "
            "(default: the latest run in runs/)"
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="address to listen on (no authentication: keep it on loopback)")] = (
        "127.0.0.1"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    engine: Annotated[str, typer.Option(help="fast (default), onnx or monai, as for volseg infer")] = "fast",
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16, as for volseg infer")] = None,
    workers: Annotated[int, typer.Option(min=1, help="cases segmented at once (each gets its own predictors)")] = 1,
    max_queue: Annotated[
        int, typer.Option("--max-queue", min=0, help="requests admitted beyond those being segmented; then 503")
    ] = 4,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="largest request body")] = 1024,
    timeout: Annotated[float, typer.Option(min=0.1, help="seconds per request, arrival to answer (then 504)")] = 300,
    watch_orthanc: Annotated[
        str | None,
        typer.Option("--watch-orthanc", help="also segment the new series of this Orthanc (http(s)://HOST:PORT)"),
    ] = None,
    watch_state: Annotated[
        Path | None, typer.Option("--watch-state", help="the watcher's JSON state file (needed with --watch-orthanc)")
    ] = None,
    watch_modality: Annotated[
        list[str] | None, typer.Option("--watch-modality", help="modality the watcher takes (repeat; default CT, MR)")
    ] = None,
    watch_series_description: Annotated[
        str | None,
        typer.Option("--watch-series-description", help="regular expression the SeriesDescription must match"),
    ] = None,
    watch_poll: Annotated[float, typer.Option("--watch-poll", min=0.1, help="seconds between looks at /changes")] = 10,
    watch_from_now: Annotated[
        bool, typer.Option("--watch-from-now", help="with a new state file: ignore the series already there")
    ] = False,
) -> None:
    """A warm HTTP service: POST /v1/segment (an image in, its segmentation out), GET /v1/models, /healthz, /readyz.

    Optionally it also watches an Orthanc (--watch-orthanc) with the default model, as `volseg watch-orthanc` does.
    """
    _quiet_libraries()
    from volseg.infer import find_latest_run
    from volseg.serve import serve as run_serve

    watch = None
    if watch_orthanc is not None:
        if watch_state is None:
            raise UserError("--watch-orthanc needs --watch-state FILE (where the watcher records its progress)")
        watch = {
            "url": watch_orthanc, "state": watch_state, "modalities": watch_modality,
            "series_description": watch_series_description, "poll": watch_poll, "from_now": watch_from_now,
        }  # fmt: skip
    run_serve(
        bundle or [str(find_latest_run())], host, port, _echo, watch=watch, device=device, engine=engine,
        precision=precision, workers=workers, max_queue=max_queue, max_upload_mb=max_upload_mb, timeout_s=timeout,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    """Entry point: runs the app and turns errors into exit codes."""
    try:
        rc = app(args=argv, standalone_mode=False)
    except UserError as err:
        if _DEBUG["on"]:
            raise
        typer.echo(f"volseg: error: {err}", err=True)
        return 2
    except typer.Exit as ex:
        return int(ex.exit_code or 0)
    except KeyboardInterrupt:
        typer.echo("volseg: interrupted", err=True)
        return 130
    except OSError as exc:
        import errno

        # The machine's problems that the user can fix: a full disk, a quota, a read-only or forbidden place.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES) and not _DEBUG["on"]:
            where = exc.filename or "output"
            typer.echo(f"volseg: error: {where}: {exc.strerror or exc} (nothing half-written was left)", err=True)
            return 2
        if _DEBUG["on"]:
            raise
        typer.echo(f"volseg: internal error: {exc.__class__.__name__}: {exc} (run with --debug for details)", err=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - the one place where internal errors become exit 1
        # Usage errors of the command-line parser (click's, vendored by typer): they print themselves.
        show, code = getattr(exc, "show", None), getattr(exc, "exit_code", None)
        if callable(show) and isinstance(code, int):
            show()
            return code
        if exc.__class__.__name__ == "Abort":
            return 1
        if _DEBUG["on"]:
            raise
        typer.echo(f"volseg: internal error: {exc.__class__.__name__}: {exc} (run with --debug for details)", err=True)
        return 1
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":
    sys.exit(main())
