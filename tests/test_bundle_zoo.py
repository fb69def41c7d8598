"""Every recipe's bundle passes MONAI's and the MONAI model zoo's checks, and names every package it needs.

For each recipe in configs/ a bundle is written with random weights (models/model.pt from the network its
inference.json defines), then checked as the model zoo's CI checks a bundle:

- ``verify_metadata`` against the offline copy of the 2024-07-25 schema;
- ``verify_net_in_out``: the network runs on metadata's smallest ``spatial_shape`` (and on the next size);
- ``ckpt_export`` to TorchScript, which gives the eager network's output;
- ``ConfigWorkflow(...).check_properties()`` for the inference and the train workflow: nothing missing.

The MONAI functions are called in this process (``python -m monai.bundle X`` is a python-fire wrapper around the
same functions, and importing MONAI once per check would take most of the time); the demo's bundle is also checked
through the command line, as the zoo runs it.

``required_packages_version``: MONAI imports every optional package with ``optional_import``, which fails only when
a component that needs it is built or called. So each bundle is also *run* (``python -m monai.bundle run`` of
inference.json on a small synthetic image, one epoch of train.json with validation, TensorBoard and checkpointing)
in an interpreter whose sys.path holds, besides the standard library, only MONAI, torch, numpy, the listed packages
and what their distributions require (``Requires-Dist``, recursively): a folder of links to exactly those
distributions' files replaces site-packages. That is the environment the metadata describes, without installing
one (monai and pytorch-ignite are not in the local package index, so a real one cannot be built offline). A
negative control runs the demo's bundle without scikit-image and tensorboard and expects both steps to fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import REPO, SCHEMA, SCHEMA_MD5

from volseg.bundle import (
    inference_config,
    multi_gpu_train_config,
    required_packages,
    spatial_shape,
    train_config,
    write_bundle_configs,
)
from volseg.recipe import Recipe, load_recipe

RECIPES = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
RUN_TIMEOUT_S = 600

# --------------------------------------------------------------------------------------------------------------
# Helpers


def _recipe(name: str, overrides: list[str] | None = None) -> Recipe:
    return load_recipe(REPO / "configs" / f"{name}.yaml", overrides)


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    """The bundle root on sys.path (for its scripts/), as ``monai.bundle run`` puts it."""
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))


def _network(bundle: Path, config: str = "inference.json") -> torch.nn.Module:
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    with _on_path(bundle):
        return parser.get_parsed_content("network_def")


def _write_bundle(recipe: Recipe, folder: Path) -> Path:
    """The recipe's bundle with random weights in models/model.pt."""
    bundle = write_bundle_configs(recipe, folder)
    torch.manual_seed(0)
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.save(_network(bundle).state_dict(), bundle / "models" / "model.pt")
    return bundle


def _smallest_shape(recipe: Recipe, n: int = 1) -> list[int]:
    return [int(s.split("*")[0]) * n for s in spatial_shape(recipe)]


def _meta(bundle: Path) -> dict[str, Any]:
    return json.loads((bundle / "configs" / "metadata.json").read_text())


def _strings_and_targets(node: Any, found: set[str]) -> set[str]:
    """Every ``_target_`` and ``$import``/``$from`` expression of a config."""
    if isinstance(node, dict):
        if "_target_" in node:
            found.add(node["_target_"])
        for v in node.values():
            _strings_and_targets(v, found)
    elif isinstance(node, list):
        for v in node:
            _strings_and_targets(v, found)
    elif isinstance(node, str) and node.lstrip("$ ").startswith(("import ", "from ")):
        found.add(node)
    return found


def _components(recipe: Recipe) -> set[str]:
    found: set[str] = set()
    for cfg in (inference_config(recipe), train_config(recipe), multi_gpu_train_config(recipe)):
        _strings_and_targets(cfg, found)
    return found


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zoo")
    return {name: _write_bundle(_recipe(name), root / name) for name in RECIPES}


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> Path:
    assert SCHEMA.is_file(), f"offline schema copy missing: {SCHEMA}"
    path = tmp_path_factory.mktemp("schema") / SCHEMA.name
    shutil.copyfile(SCHEMA, path)
    return path


# --------------------------------------------------------------------------------------------------------------
# Fast: what metadata says


@pytest.mark.parametrize("name", RECIPES)
def test_metadata_names_the_derived_packages_and_every_input_channel(name: str) -> None:
    from volseg.bundle import metadata

    recipe = _recipe(name)
    meta = metadata(recipe)
    assert list(meta["required_packages_version"]) == required_packages(recipe)
    # The committed bundles/ (whose versions tests/test_bundles_sync.py ignores) name the same packages.
    committed = json.loads((REPO / "bundles" / recipe.name / "configs" / "metadata.json").read_text())
    assert sorted(committed["required_packages_version"]) == sorted(required_packages(recipe))
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == recipe.model.in_channels == len(image["channel_def"])
    assert sorted(image["channel_def"], key=int) == [str(i) for i in range(recipe.model.in_channels)]


def test_brain_mri_describes_its_four_channels() -> None:
    from volseg.bundle import metadata

    meta = metadata(_recipe("brain_mri"))
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["channel_def"] == {"0": "channel_0", "1": "channel_1", "2": "channel_2", "3": "channel_3"}
    assert meta["image_classes"].startswith("4-channel MR image")


def test_required_packages_follow_the_configs() -> None:
    demo = required_packages(_recipe("demo_liver_ct"))
    assert {"fire", "nibabel", "pytorch-ignite", "scikit-image", "tensorboard"} <= set(demo)
    # No largest-component step, no scikit-image.
    plain = required_packages(_recipe("demo_liver_ct", ["infer.postprocess.largest_component=[]"]))
    assert "scikit-image" not in plain and set(plain) == set(demo) - {"scikit-image"}
    # 2D: Pillow reads and writes PNG; the weight map's distance transforms need scipy.
    cells = required_packages(_recipe("cells_2d"))
    assert {"pillow", "scipy", "tensorboard", "pytorch-ignite"} <= set(cells)
    no_weights = required_packages(_recipe("cells_2d", ["train.loss.weight_map=null"]))
    assert "scipy" not in no_weights and "pillow" in no_weights
    assert "pillow" not in demo and "scipy" not in demo


@pytest.mark.parametrize("name", RECIPES)
def test_spatial_shape_is_twice_the_downsampling(name: str) -> None:
    from volseg.bundle import downsampling

    recipe = _recipe(name)
    assert spatial_shape(recipe) == [f"{2 * f}*n" for f in downsampling(recipe)]


def test_spatial_shape_per_axis_strides() -> None:
    recipe = _recipe("demo_liver_ct", ["model.args.strides=[[2,2,1],[2,2,2],[2,2,1]]"])
    assert spatial_shape(recipe) == ["16*n", "16*n", "4*n"]


# --------------------------------------------------------------------------------------------------------------
# Slow: MONAI's checks on each recipe's bundle


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_verify_metadata(bundles: dict[str, Path], schema: Path, name: str) -> None:
    from monai.bundle import verify_metadata

    meta_file = bundles[name] / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(schema), hash_val=SCHEMA_MD5)  # raises when invalid


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_verify_net_in_out_on_the_smallest_input(bundles: dict[str, Path], name: str) -> None:
    from monai.bundle import verify_net_in_out

    bundle, recipe = bundles[name], _recipe(name)
    with _on_path(bundle):
        for n in (1, 2):
            verify_net_in_out(
                net_id="network_def",
                meta_file=str(bundle / "configs" / "metadata.json"),
                config_file=str(bundle / "configs" / "inference.json"),
                device="cpu",
                n=n,
                bundle_root=str(bundle),
            )
    # The prediction has the input's size, and the smallest input also trains at batch size 1.
    smallest = _smallest_shape(recipe)
    net = _network(bundle).eval()
    with torch.no_grad():
        out = net(torch.rand(1, recipe.model.in_channels, *smallest))
    assert list(out.shape) == [1, recipe.num_classes, *smallest]
    train_net = _network(bundle, "train.json").train()
    out = train_net(torch.rand(1, recipe.model.in_channels, *smallest))
    (out[-1] if isinstance(out, (list, tuple)) else out).sum().backward()
    # Half of it (the downsampling itself) leaves the deepest level one voxel: no normalisation layer trains on it.
    with pytest.raises(ValueError, match="Expected more than 1"):
        train_net(torch.rand(1, recipe.model.in_channels, *[s // 2 for s in smallest]))


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_ckpt_export_to_torchscript(bundles: dict[str, Path], name: str, tmp_path: Path) -> None:
    from monai.bundle import ckpt_export

    bundle, recipe = bundles[name], _recipe(name)
    ts = tmp_path / "model.ts"
    with _on_path(bundle):
        ckpt_export(
            net_id="network_def",
            filepath=str(ts),
            ckpt_file=str(bundle / "models" / "model.pt"),
            meta_file=str(bundle / "configs" / "metadata.json"),
            config_file=str(bundle / "configs" / "inference.json"),
            bundle_root=str(bundle),
        )
    scripted = torch.jit.load(str(ts), map_location="cpu").eval()
    net = _network(bundle).eval()
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, recipe.model.in_channels, *_smallest_shape(recipe))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("workflow_type", ["infer", "train"])
@pytest.mark.parametrize("name", RECIPES)
def test_config_workflow_has_every_property(
    bundles: dict[str, Path], name: str, workflow_type: str, tmp_path: Path
) -> None:
    from monai.bundle import ConfigWorkflow

    bundle, recipe = bundles[name], _recipe(name)
    config = "inference.json" if workflow_type == "infer" else "train.json"
    override: dict[str, Any] = {"bundle_root": str(bundle)}
    if workflow_type == "train":
        # MONAI Label and users set the case lists; an empty list cannot make a shuffling DataLoader.
        cases = _synthetic_cases(recipe, tmp_path / "data")
        override.update({"train#dataset#data": cases, "validate#dataset#data": cases})
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / config),
        meta_file=str(bundle / "configs" / "metadata.json"),
        logging_file=False,  # logging.conf would reconfigure this process's loggers; the runs below apply it
        workflow_type=workflow_type,
        **override,
    )
    with _on_path(bundle):
        workflow.initialize()
        assert workflow.check_properties() == []


@pytest.mark.slow
def test_demo_bundle_passes_the_command_line_checks(bundles: dict[str, Path], schema: Path, tmp_path: Path) -> None:
    """The checks as the model zoo runs them: ``python -m monai.bundle ...`` in the bundle folder."""
    bundle = bundles["demo_liver_ct"]
    meta, infer = "configs/metadata.json", "configs/inference.json"
    commands = [
        ["verify_metadata", "--meta_file", meta, "--filepath", str(schema), "--hash_val", SCHEMA_MD5],
        ["verify_net_in_out", "--net_id", "network_def", "--meta_file", meta, "--config_file", infer,
         "--bundle_root", ".", "--device", "cpu"],
        ["ckpt_export", "--net_id", "network_def", "--filepath", str(tmp_path / "model.ts"), "--ckpt_file",
         "models/model.pt", "--meta_file", meta, "--config_file", infer, "--bundle_root", "."],
    ]  # fmt: skip
    for args in commands:
        proc = subprocess.run(
            [sys.executable, "-m", "monai.bundle", *args],
            cwd=bundle,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert proc.returncode == 0, f"{args[0]}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert (tmp_path / "model.ts").is_file()


# --------------------------------------------------------------------------------------------------------------
# Slow: each bundle runs with exactly MONAI, torch, numpy and the listed packages


def _synthetic_cases(recipe: Recipe, folder: Path, shape: list[int] | None = None) -> list[dict[str, str]]:
    """One small image and label map of the recipe's kind (NIfTI, 4D NIfTI for several channels, PNG for 2D)."""
    shape = shape or [s + s // 2 for s in _smallest_shape(recipe)]
    rng = np.random.default_rng(0)
    label = np.zeros(shape, dtype=np.uint8)
    for k in range(1, recipe.num_classes):  # nested boxes, one per label value
        lo = [s * k // (2 * recipe.num_classes) + 1 for s in shape]
        label[tuple(slice(a, s - a) for a, s in zip(lo, shape, strict=True))] = k
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    if recipe.model.spatial_dims == 2:
        from PIL import Image

        image = (40 + 150 * (label > 0) + rng.normal(0, 10, shape)).clip(0, 255).astype(np.uint8)
        paths = folder / "images" / "case0.png", folder / "labels" / "case0.png"
        Image.fromarray(image).save(paths[0])
        Image.fromarray(label).save(paths[1])
    else:
        affine = np.diag([*(recipe.data.spacing or (1.0, 1.0, 1.0)), 1.0])
        if recipe.data.modality == "CT":
            image = 40.0 + 60.0 * label + rng.normal(0, 10, shape)
        else:
            image = 100.0 + 50.0 * label + rng.normal(0, 5, shape)
        if recipe.model.in_channels > 1:  # channels last, as MSD Task01 stores them
            image = np.stack([image * (1 + 0.1 * c) for c in range(recipe.model.in_channels)], axis=-1)
        paths = folder / "images" / "case0.nii.gz", folder / "labels" / "case0.nii.gz"
        nib.save(nib.Nifti1Image(image.astype(np.float32), affine), str(paths[0]))
        nib.save(nib.Nifti1Image(label, affine), str(paths[1]))
    return [{"image": str(paths[0]), "label": str(paths[1])}]


def _small(name: str) -> Recipe:
    """The recipe with patch and window at the network's smallest input, one case per step, one epoch."""
    recipe = _recipe(name)
    smallest = json.dumps(_smallest_shape(recipe))
    overrides = [
        f"train.patch_size={smallest}",
        f"infer.roi_size={smallest}",
        "train.batch_size=1",
        "train.samples_per_volume=1",
        "train.max_epochs=1",
        "train.val_interval=1",
        "train.num_workers=0",
        "infer.sw_batch_size=1",
    ]
    if recipe.train.iterations_per_epoch:
        overrides.append("train.iterations_per_epoch=1")
    return _recipe(name, overrides)


# Runs in a fresh interpreter: sys.argv[1] is a JSON file {"allowed": [distributions], "jobs": [...], "view": DIR};
# writes the result of each step to the file sys.argv[2]. Before anything else it builds the environment: DIR, with
# links to the files of the allowed distributions and of what they require (recursively, extras left out), replaces
# site-packages on sys.path, so that every other package is absent, as in a virtual environment holding only these.
RUNNER = r"""
import importlib, importlib.metadata as md, json, os, re, runpy, sys, sysconfig, traceback

spec, report = json.load(open(sys.argv[1])), sys.argv[2]


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


allowed, todo = set(), [norm(d) for d in spec["allowed"]]
while todo:
    dist = todo.pop()
    if dist in allowed:
        continue
    allowed.add(dist)
    try:
        requires = md.requires(dist) or []
    except md.PackageNotFoundError:
        continue
    for req in requires:
        if not re.search(r"\bextra\s*==", req):
            todo.append(norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0)))

view = spec["view"]
os.makedirs(view)
for dist in sorted(allowed):
    try:
        files = md.distribution(dist).files or []
    except md.PackageNotFoundError:  # a requirement of another platform
        continue
    for f in files:
        top = f.parts[0]
        src = os.path.join(str(f.locate().parents[len(f.parts) - 1]), top)
        if top != ".." and os.path.exists(src) and not os.path.lexists(os.path.join(view, top)):
            os.symlink(src, os.path.join(view, top))

site = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") not in site] + [view]


def editable(hook):  # finders of editable installs (volseg's own), installed by .pth files
    return (hook if isinstance(hook, type) else type(hook)).__module__.startswith("__editable__")


sys.meta_path[:] = [f for f in sys.meta_path if not editable(f)]
sys.path_hooks[:] = [h for h in sys.path_hooks if not editable(h)]
sys.path_importer_cache.clear()
for name, module in list(sys.modules.items()):  # imported at start-up from site-packages (.pth files)
    path = getattr(module, "__file__", None) or ""
    if any(os.path.realpath(path).startswith(s + os.sep) for s in site):
        del sys.modules[name]
importlib.invalidate_caches()
assert importlib.util.find_spec("volseg") is None

results = []
for job in spec["jobs"]:
    result = {"bundle": job["bundle"]}
    try:
        sys.argv = ["monai.bundle", "run", "--config_file", job["bundle"] + "/configs/inference.json",
                    "--meta_file", job["bundle"] + "/configs/metadata.json", "--bundle_root", job["bundle"],
                    "--dataset_dir", job["images"], "--output_dir", job["out"]]
        runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
        result["infer"] = "ok"
    except BaseException as exc:
        result["infer"] = "".join(traceback.format_exception(exc))[-20000:]
    try:
        import monai.bundle

        monai.bundle.run(
            run_id="run", config_file=job["bundle"] + "/configs/train.json",
            meta_file=job["bundle"] + "/configs/metadata.json", logging_file=job["bundle"] + "/configs/logging.conf",
            bundle_root=job["bundle"], **{"train#dataset#data": job["cases"], "validate#dataset#data": job["cases"]},
        )
        result["train"] = "ok"
    except BaseException as exc:
        result["train"] = "".join(traceback.format_exception(exc))[-20000:]
    results.append(result)
json.dump({"results": results, "installed": sorted(os.listdir(view))}, open(report, "w"))
"""


def _run_with_only(allowed: list[str], jobs: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "runner.py").write_text(RUNNER)
    spec = {"allowed": allowed, "jobs": jobs, "view": str(folder / "site-packages")}
    (folder / "spec.json").write_text(json.dumps(spec))
    out = folder / "results.json"
    cmd = [sys.executable, str(folder / "runner.py"), str(folder / "spec.json"), str(out)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, cwd=folder, env=env)
    assert proc.returncode == 0 and out.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def _job(name: str, folder: Path) -> dict[str, Any]:
    recipe = _small(name)
    assert _components(recipe) == _components(_recipe(name)), "the small run must use the recipe's components"
    bundle = _write_bundle(recipe, folder / "bundle")
    cases = _synthetic_cases(recipe, folder / "data")
    return {"bundle": str(bundle), "images": str(folder / "data" / "images"), "out": str(folder / "out"),
            "cases": cases}  # fmt: skip


def _groups() -> list[list[str]]:
    """Recipes grouped by their package list (one interpreter per list)."""
    by_list: dict[tuple[str, ...], list[str]] = {}
    for name in RECIPES:
        by_list.setdefault(tuple(required_packages(_recipe(name))), []).append(name)
    return list(by_list.values())


BASE = ["monai", "torch", "numpy"]


@pytest.mark.slow
@pytest.mark.parametrize("names", _groups(), ids=lambda names: "+".join(names))
def test_bundle_runs_with_exactly_the_listed_packages(names: list[str], tmp_path: Path) -> None:
    jobs = [_job(name, tmp_path / name) for name in names]
    allowed = BASE + list(_meta(Path(jobs[0]["bundle"]))["required_packages_version"])
    report = _run_with_only(allowed, jobs, tmp_path / "run")
    for name, job, result in zip(names, jobs, report["results"], strict=True):
        assert result["infer"] == "ok", f"{name}: inference failed with only {allowed}:\n{result['infer'][-4000:]}"
        assert result["train"] == "ok", f"{name}: training failed with only {allowed}:\n{result['train'][-4000:]}"
        suffix = ".png" if _recipe(name).model.spatial_dims == 2 else ".nii.gz"
        assert len(list(Path(job["out"]).glob(f"*_seg{suffix}"))) == 1, name
        assert list((Path(job["bundle"]) / "logs").glob("events.out.tfevents.*")), name


@pytest.mark.slow
def test_without_scikit_image_and_tensorboard_the_demo_bundle_fails(tmp_path: Path) -> None:
    """The guard is real: the packages the demo's bundle used to leave out are the ones it then misses."""
    job = _job("demo_liver_ct", tmp_path / "demo")
    listed = list(_meta(Path(job["bundle"]))["required_packages_version"])
    allowed = BASE + [p for p in listed if p not in ("scikit-image", "tensorboard")]
    report = _run_with_only(allowed, [job], tmp_path / "run")
    (result,) = report["results"]
    assert "skimage" in result["infer"].lower(), result["infer"]
    assert "tensorboard" in result["train"].lower(), result["train"]
    assert not {"skimage", "tensorboard"} & set(report["installed"])
