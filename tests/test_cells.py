"""2D cells: synthetic nuclei, 2D loading (PNG, TIFF, RGB, 0/255 masks), the U-Net weight map and its loss,
object-level metrics, and the cells recipe's bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import REPO, assert_labels_present
from PIL import Image

from volseg.bundle_scripts.losses import WeightedDiceCELoss
from volseg.bundle_scripts.weightmap import UNetWeightMapd, unet_weight_map
from volseg.data import transforms as T
from volseg.data.synth import cells_image, write_dataset
from volseg.errors import UserError
from volseg.metrics import instances_from_semantic, merged_pairs, object_f1
from volseg.recipe import load_recipe, recipe_from_dict

CELLS = REPO / "configs" / "cells_2d.yaml"


def _cells_recipe(*overrides: str):
    return load_recipe(CELLS, list(overrides))


def _raw_cells() -> dict:
    return yaml.safe_load(CELLS.read_text())


# ---------------------------------------------------------------------------------------------------------------
# Synthetic cells


def test_cells_are_deterministic_touching_and_separated_in_the_label() -> None:
    a, b, c = cells_image(5), cells_image(5), cells_image(6)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.instances, b.instances)
    assert not np.array_equal(a.image, c.image)
    assert a.image.dtype == np.uint16 and a.label.dtype == np.uint8 and a.instances.dtype == np.uint16
    assert a.image.shape == a.label.shape == a.instances.shape == (256, 256)
    touching = [cells_image(s).info["touching_pairs"] for s in range(4)]
    assert min(touching) >= 10, touching  # dense: many cells share a border
    for cell in (a, c):
        n = int(cell.instances.max())
        assert 25 <= n <= 60
        assert set(np.unique(cell.label)) == {0, 1}
        # Touching borders are background in the label, so its components are the cells, one for one.
        comps = instances_from_semantic(cell.label)
        assert object_f1(comps, cell.instances)["f1"] == 1.0
        assert merged_pairs(comps, cell.instances) == 0
        # Whereas the union of the instances merges neighbours.
        assert merged_pairs(instances_from_semantic(cell.instances > 0), cell.instances) >= 5
    # Cells are brighter than the background despite the uneven illumination.
    assert a.image[a.label > 0].mean() > 2 * a.image[a.instances == 0].mean()


def test_write_cells_dataset(tmp_path: Path) -> None:
    path = write_dataset(tmp_path / "cells", task="cells", n=2, seed=3, n_test=1)
    meta = json.loads(path.read_text())
    assert meta["labels"] == {"0": "background", "1": "cell"}
    assert meta["training"][1] == {
        "image": "./images/cell_001.png",
        "label": "./labels/cell_001.png",
        "instance": "./instances/cell_001.png",
    }
    assert meta["test"] == ["./imagesTs/cell_002.png"]
    root = tmp_path / "cells"
    for folder in ("images", "labels", "instances", "imagesTs", "labelsTs", "instancesTs"):
        assert (root / folder).is_dir()
    with Image.open(root / "images" / "cell_000.png") as im:
        assert im.mode == "I;16" and im.size == (256, 256)
    with Image.open(root / "labels" / "cell_000.png") as im:
        assert set(np.unique(np.asarray(im))) == {0, 1}
    with Image.open(root / "instances" / "cell_000.png") as im:
        assert np.asarray(im).max() > 10
    assert not [f for f in root.rglob("*") if f.name.startswith(".")]
    with pytest.raises(UserError, match="cells"):
        write_dataset(tmp_path / "x", task="nuclei", n=1)


# ---------------------------------------------------------------------------------------------------------------
# Recipe options for 2D


def test_cells_recipe_is_2d_without_orientation_or_spacing() -> None:
    r = _cells_recipe()
    assert r.model.spatial_dims == 2 and r.data.orientation is None and r.data.spacing is None
    chain = [c["_target_"] for c in T.preprocessing(r, with_label=True)]
    assert "Orientationd" not in chain and "Spacingd" not in chain
    assert "ScaleIntensityRangePercentilesd" in chain
    assert _cells_recipe("data.orientation=none").data.orientation is None


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.label_map={255: 2}", "label_map maps to \\[2\\]"),
        ("data.label_map={-1: 1}", "label_map"),
        ("data.intensity={percentile: [99, 1]}", "upper percentile"),
        ("train.loss.name=dice", "weight_map"),
        ("data.spacing=[1.0, 1.0, 1.0]", "data.spacing has 3 values"),
    ],
)
def test_bad_2d_options_are_user_errors(override: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        _cells_recipe(override)


def test_microscopy_defaults_to_percentile_scaling() -> None:
    raw = _raw_cells()
    del raw["data"]["intensity"]
    r = recipe_from_dict(raw)
    assert r.data.intensity is not None and r.data.intensity.model_dump() == {"percentile": (1.0, 99.0), "clip": False}


def _write(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


@pytest.fixture()
def pngs(tmp_path: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    gray = (rng.random((40, 56)) * 60000).astype(np.uint16)
    rgb = (rng.random((40, 56, 3)) * 255).astype(np.uint8)
    mask = np.zeros((40, 56), np.uint8)
    mask[5:20, 10:30] = 255
    return {
        "gray_png": _write(tmp_path / "gray.png", gray),
        "gray_tif": _write(tmp_path / "gray.tif", gray),
        "rgb_png": _write(tmp_path / "rgb.png", rgb),
        "rgb_tif": _write(tmp_path / "rgb.tif", rgb),
        "mask255": _write(tmp_path / "mask.png", mask),
    }


@pytest.mark.parametrize("key", ["gray_png", "gray_tif", "rgb_png", "rgb_tif"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_2d_images_load_with_the_recipes_channels(pngs: dict[str, Path], key: str, in_channels: int) -> None:
    r = _cells_recipe(f"model.in_channels={in_channels}", "data.label_map={255: 1}")
    chain = T.instantiate(T.preprocessing(r, with_label=True))
    out = chain({"image": str(pngs[key]), "label": str(pngs["mask255"])})
    # MONAI's layout for pixel data: (channel, x, y), x along the picture's width.
    assert tuple(out["image"].shape) == (in_channels, 56, 40)
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0}
    assert out["label"][0, 15, 10] == 1 and out["label"][0, 5, 30] == 0


def test_0_255_mask_without_label_map_keeps_255_for_the_data_check(pngs: dict[str, Path]) -> None:
    chain = T.instantiate(T.preprocessing(_cells_recipe(), with_label=True))
    out = chain({"image": str(pngs["gray_png"]), "label": str(pngs["mask255"])})
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 255.0}
    mapped = T.preprocessing(_cells_recipe("data.label_map={255: 1}"), with_label=True)
    assert {"_target_": "MapLabelValued", "keys": "label", "orig_labels": [255], "target_labels": [1]} in mapped


def test_2d_nifti_still_loads_in_a_2d_recipe(tmp_path: Path) -> None:
    import nibabel as nib

    arr = np.arange(30 * 20, dtype=np.float32).reshape(30, 20)
    nib.save(nib.Nifti1Image(arr, np.diag([0.5, 0.5, 1, 1])), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image((arr > 300).astype(np.uint8), np.diag([0.5, 0.5, 1, 1])), str(tmp_path / "lab.nii.gz"))
    chain = T.instantiate(T.preprocessing(_cells_recipe(), with_label=True))
    out = chain({"image": str(tmp_path / "img.nii.gz"), "label": str(tmp_path / "lab.nii.gz")})
    assert tuple(out["image"].shape) == (1, 30, 20)
    assert torch.equal(out["label"][0] > 0, torch.from_numpy(arr > 300))


def test_mirror_border_is_undone_on_the_way_back(pngs: dict[str, Path]) -> None:
    from monai.transforms import Invertd

    r = _cells_recipe("infer.mirror_border=8")
    chain = T.instantiate(T.infer_preprocessing(r))
    data = chain({"image": str(pngs["gray_png"])})
    assert tuple(data["image"].shape) == (1, 56 + 16, 40 + 16)
    img = data["image"]
    assert torch.allclose(img[0, 7, 8:-8], img[0, 9, 8:-8])  # reflected about the first column
    data["pred"] = img.clone()
    back = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=False)(data)
    assert tuple(back["pred"].shape) == (1, 56, 40)


# ---------------------------------------------------------------------------------------------------------------
# The weight map


def test_weight_map_formula_on_two_objects() -> None:
    label = np.zeros((9, 12), np.int64)
    label[2:7, 1:5] = 1
    label[2:7, 7:11] = 1  # two boxes, columns 5 and 6 between them
    w0, sigma = 10.0, 3.0
    w = unet_weight_map(label, w0=w0, sigma=sigma)
    n, n_fg = label.size, int(label.sum())
    wc_bg, wc_fg = n / (2 * (n - n_fg)), n / (2 * n_fg)
    assert w[4, 2] == pytest.approx(wc_fg)  # inside a cell: class weight only
    # Column 5: 1 px from the left box, 2 px from the right one.
    assert w[4, 5] == pytest.approx(wc_bg + w0 * math.exp(-((1 + 2) ** 2) / (2 * sigma**2)), rel=1e-5)
    # Corner (0, 0): the nearest pixels of the boxes are (2, 1) and (2, 7).
    d1, d2 = math.hypot(2, 1), math.hypot(2, 7)
    assert w[0, 0] == pytest.approx(wc_bg + w0 * math.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), rel=1e-5)
    mean_wc = unet_weight_map(label, w0=0.0).mean()
    assert mean_wc == pytest.approx(1.0)
    assert np.all(unet_weight_map(label, w0=0.0, balance=False) == 1.0)
    # One object only: no separation term.
    one = np.zeros_like(label)
    one[2:7, 1:5] = 1
    assert np.allclose(unet_weight_map(one, w0=w0, sigma=sigma), unet_weight_map(one, w0=0.0))


def test_weight_map_uses_spacing_and_peaks_between_touching_cells() -> None:
    cell = cells_image(2)
    w = unet_weight_map(cell.label, cell.instances)
    gap = (cell.label == 0) & (cell.instances > 0)
    far = cell.instances == 0
    assert w[gap].mean() > 8.0 > 2.0 > np.median(w[far])
    label = np.zeros((20, 20), np.int64)
    label[5:15, 2:6] = 1
    label[5:15, 10:14] = 1
    # Distances in mm: doubling the spacing is the same as halving sigma.
    assert np.allclose(
        unet_weight_map(label, sigma=4.0, spacing=[2.0, 2.0]), unet_weight_map(label, sigma=2.0), atol=1e-5
    )


def test_weight_map_transform_uses_instances_or_label_components() -> None:
    from monai.data import MetaTensor

    cell = cells_image(1)
    label = MetaTensor(torch.from_numpy(cell.label[None].astype(np.float32)), affine=torch.eye(4))
    inst = torch.from_numpy(cell.instances[None].astype(np.float32))
    t = UNetWeightMapd(keys="instance", label_key="label", w0=10, sigma=5)
    with_inst = t({"label": label, "instance": inst})["weight"]
    from_label = t({"label": label})["weight"]
    assert tuple(with_inst.shape) == (1, 256, 256) and isinstance(with_inst, MetaTensor)
    assert np.allclose(with_inst[0].numpy(), unet_weight_map(cell.label, cell.instances))
    assert np.allclose(from_label[0].numpy(), unet_weight_map(cell.label))


def test_weighted_loss_matches_dice_ce_and_weights_the_ce_term() -> None:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 16, 16, requires_grad=True)
    label = torch.randint(0, 3, (2, 1, 16, 16)).float()
    ref = DiceCELoss(to_onehot_y=True, softmax=True)(logits, label)
    loss = WeightedDiceCELoss()
    assert torch.allclose(loss(logits, label), ref, atol=1e-6)
    assert torch.allclose(loss(logits, torch.cat([label, torch.ones_like(label)], 1)), ref, atol=1e-6)
    ce_only = WeightedDiceCELoss(lambda_dice=0.0)
    doubled = ce_only(logits, torch.cat([label, 2 * torch.ones_like(label)], 1))
    assert torch.allclose(doubled, 2 * ce_only(logits, label), atol=1e-6)
    weight = torch.zeros_like(label)
    weight[..., :8] = 1.0
    part = ce_only(logits, torch.cat([label, weight], 1))
    manual = torch.nn.functional.cross_entropy(logits, label[:, 0].long(), reduction="none")[..., :8].sum() / (
        2 * 16 * 16
    )
    assert torch.allclose(part, manual, atol=1e-6)
    part.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="target"):
        loss(logits, torch.zeros(2, 3, 16, 16))


def test_training_chain_carries_the_weight_as_a_second_label_channel(tmp_path: Path) -> None:
    write_dataset(tmp_path / "cells", task="cells", n=1, seed=0)
    r = _cells_recipe("train.samples_per_volume=2")
    case = {k: str((tmp_path / "cells" / v).resolve()) for k, v in
            json.loads((tmp_path / "cells" / "dataset.json").read_text())["training"][0].items()}  # fmt: skip
    samples = T.instantiate(T.train_transforms(r))(case)
    assert len(samples) == 2
    for s in samples:
        assert tuple(s["image"].shape) == (1, 128, 128) and tuple(s["label"].shape) == (2, 128, 128)
        assert set(torch.unique(s["label"][0]).tolist()) <= {0.0, 1.0}
        assert float(s["label"][1].max()) > 5.0  # the separation weights came along
        assert "weight" not in s and "instance" not in s
    val = T.instantiate(T.val_transforms(r))(case)
    assert tuple(val["label"].shape) == (1, 256, 256)
    plain = _cells_recipe("train.loss.weight_map=null")
    assert not any("weight" in json.dumps(c) for c in T.train_transforms(plain))


def test_bundle_of_the_cells_recipe(tmp_path: Path) -> None:
    from volseg.bundle import inference_config, train_config, write_bundle_configs

    r = _cells_recipe()
    root = write_bundle_configs(r, tmp_path / "b")
    for name in ("__init__.py", "nets.py", "weightmap.py", "losses.py"):
        assert (root / "scripts" / name).is_file()
    train = train_config(r)
    assert train["loss"]["_target_"] == "scripts.losses.WeightedDiceCELoss"
    assert "UNetWeightMapd" in json.dumps(train["train"]["deterministic_transforms"])
    assert "weight" not in json.dumps(train["validate"])
    inf = inference_config(r)
    assert "weight" not in json.dumps(inf["preprocessing"])
    writer = inf["postprocessing"]["transforms"][-1]
    assert writer["output_ext"] == ".png" and writer["writer"] == "PILWriter"
    targets = _targets(train) + _targets(inf)
    assert all(t.split(".")[0] in ("scripts", "torch", "monai") or "." not in t for t in targets), targets
    # No weight map, no scripts for a plain basic_unet.
    plain = write_bundle_configs(_cells_recipe("train.loss.weight_map=null"), tmp_path / "p")
    assert not (plain / "scripts").exists()
    assert train_config(_cells_recipe("train.loss.weight_map=null"))["loss"]["_target_"] == "DiceCELoss"


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [node["_target_"]] if isinstance(node.get("_target_"), str) else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Object metrics


def test_object_f1_and_merged_pairs_by_hand() -> None:
    gt = np.zeros((20, 30), np.int32)
    gt[2:8, 2:8], gt[2:8, 8:14], gt[2:8, 14:20] = 1, 2, 3  # three touching cells in a row
    gt[12:18, 22:28] = 4
    perfect = object_f1(gt, gt)
    assert perfect == {**perfect, "precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 4, "fp": 0, "fn": 0}
    merged = np.zeros_like(gt)
    merged[2:8, 2:20] = 1  # one object over cells 1-3
    merged[12:18, 22:28] = 2
    merged[0, 0] = 3  # a speck
    s = object_f1(merged, gt)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 2, 3)
    assert s["precision"] == pytest.approx(1 / 3) and s["recall"] == pytest.approx(1 / 4)
    assert s["f1"] == pytest.approx(2 / (2 + 2 + 3))
    assert merged_pairs(merged, gt) == 2  # one object covering three cells: two merges
    assert merged_pairs(gt, gt) == 0
    # A prediction covering less than half of a cell does not merge it.
    partial = np.zeros_like(gt)
    partial[2:8, 2:10] = 1  # cell 1 whole, a third of cell 2
    assert merged_pairs(partial, gt) == 0
    # Components of a semantic mask, with specks dropped.
    comps = instances_from_semantic(merged > 0, min_size=2)
    assert comps.max() == 2
    assert instances_from_semantic(np.eye(4, dtype=bool)).max() == 4  # corners do not connect
    assert instances_from_semantic(np.eye(4, dtype=bool), connectivity=2).max() == 1
    # Empty cases.
    empty = np.zeros_like(gt)
    assert object_f1(empty, empty)["f1"] == 1.0
    none_found = object_f1(empty, gt)
    assert none_found["f1"] == 0.0 and none_found["recall"] == 0.0 and none_found["fn"] == 4
    assert object_f1(gt, empty)["precision"] == 0.0
    with pytest.raises(ValueError, match="shape"):
        object_f1(gt, gt[:5])


def test_object_f1_matches_one_to_one_at_the_threshold() -> None:
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 1
    pred = np.zeros_like(gt)
    pred[0:4, 0:2] = 1  # IoU 0.5 exactly
    pred[0:4, 2:4] = 2  # IoU 0.5 too, but the cell can match only one
    s = object_f1(pred, gt, 0.5)
    assert (s["tp"], s["fp"], s["fn"]) == (1, 1, 0)
    assert object_f1(pred, gt, 0.6)["tp"] == 0


# ---------------------------------------------------------------------------------------------------------------
# End to end (slow): train a few iterations on cells, segment a PNG, write the bundle's PNG output


@pytest.mark.slow
def test_cells_train_and_infer_png(tmp_path: Path) -> None:
    from volseg.infer import Predictor
    from volseg.train import train

    data = tmp_path / "cells"
    write_dataset(data, task="cells", n=4, seed=0, n_test=1)
    r = _cells_recipe("train.max_epochs=1", "train.iterations_per_epoch=2", "train.batch_size=2",
                      "train.val_interval=1", "model.args.features=[8, 8, 16, 16, 32, 8]")  # fmt: skip
    result = train(r, data, tmp_path / "run", echo=lambda s: None, progress=False)
    assert result.epochs == 1
    assert (tmp_path / "run" / "scripts" / "weightmap.py").is_file()
    pred = Predictor.from_bundle(tmp_path / "run", "cpu").predict(data / "imagesTs" / "cell_004.png")
    assert pred.labels.shape == (256, 256) and pred.labels.dtype == np.uint8
    # volseg infer writes a PNG label map in the input's row/column layout.
    from PIL import Image

    from volseg.infer import run_inference

    written, failures = run_inference(
        [str(data / "imagesTs" / "cell_004.png")], tmp_path / "out", tmp_path / "run", "cpu", echo=lambda s: None,
        qc=True,
    )  # fmt: skip
    assert not failures and written[0].name == "cell_004_seg.png"
    png = np.asarray(Image.open(written[0]))
    source = np.asarray(Image.open(data / "imagesTs" / "cell_004.png"))
    assert png.shape == source.shape and png.dtype == np.uint8
    # An all-background map would match too: after these 2 iterations the net labels some pixels as cell
    # (1719 of 65536 measured).
    assert_labels_present({"cell": 1}, pred.labels, png, min_voxels=100)
    np.testing.assert_array_equal(png, pred.labels.T)
    assert (tmp_path / "out" / "cell_004_seg_qc.png").is_file()
