"""The fast engine's own building blocks reproduce MONAI's (grid, windows, weights) without importing MONAI."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, TINY_FLOORS, TINY_LABELS, assert_agreement, assert_labels_present, save_nifti

from volseg.fastpath import importance_map, model_grid, sliding_window


def _monai_grid(shape, affine, target):
    from monai.data.utils import compute_shape_offset, zoom_affine

    new = zoom_affine(affine, np.asarray(target, dtype=np.float64), diagonal=False)
    out_shape, offset = compute_shape_offset(shape, affine, new)
    new[:3, 3] = offset
    return tuple(int(n) for n in out_shape), new


def _rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


@pytest.mark.parametrize("seed", range(12))
def test_model_grid_matches_monai_spacing(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = tuple(int(n) for n in rng.integers(5, 120, size=3))
    spacing = rng.uniform(0.4, 5.0, size=3)
    rot = np.eye(3) if seed % 3 == 0 else _rotation(rng, float(rng.uniform(1, 40)))
    if seed % 2:
        rot = rot @ np.diag([1, 1, -1]) @ np.diag([1, -1, 1])  # a flipped, still RAS-like, frame
    affine = np.eye(4)
    affine[:3, :3] = rot * spacing
    affine[:3, 3] = rng.uniform(-200, 200, size=3)
    target = tuple(float(v) for v in rng.uniform(0.5, 5.0, size=3))
    ref_shape, ref_affine = _monai_grid(shape, affine, target)
    try:
        out_shape, scale, shift = model_grid(shape, affine, target)
    except ValueError:
        pytest.skip("grid is not a scaling of the input (oblique beyond what the engine handles)")
    assert out_shape == ref_shape
    m = np.linalg.solve(affine, ref_affine)
    np.testing.assert_allclose(scale, np.diag(m)[:3], rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(shift, m[:3, 3], rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize(
    ("shape", "spacing", "target"),
    [
        ((512, 512, 200), (0.7799999713897705, 0.7799999713897705, 2.5), (4.0, 4.0, 5.0)),
        ((64, 80, 31), (1.5, 1.5, 1.5), (3.0, 3.0, 3.0)),
    ],
)
def test_model_grid_rounds_half_voxel_extents_like_monai(shape, spacing, target) -> None:
    """Extents of exactly n + 0.5 output voxels: the shape must round the way MONAI's does."""
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = (-194.88709902763367, -193.65829348564148, -496.6002502441406)  # a benchmark CT's, in RAS
    got = model_grid(shape, affine, target)[0]
    assert got == _monai_grid(shape, affine, target)[0]
    if shape[2] == 200:
        assert got[2] == 100  # 199 x 2.5 / 5 + 1 = 100.5 voxels, rounded to even


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_importance_map_matches_monai(mode: str) -> None:
    from monai.inferers.utils import compute_importance_map

    for roi in [(64, 64, 32), (7, 12, 5), (96, 96)]:
        np.testing.assert_allclose(
            importance_map(roi, mode, torch.device("cpu")).numpy(),
            compute_importance_map(roi, mode=mode).numpy(),
            rtol=1e-6,
            atol=1e-7,
        )


@pytest.mark.parametrize(
    ("shape", "roi", "overlap", "mode", "padding"),
    [
        ((50, 41, 23), (16, 16, 8), 0.25, "gaussian", "constant"),
        ((50, 41, 23), (16, 16, 8), 0.5, "constant", "constant"),
        ((10, 41, 5), (16, 16, 8), 0.25, "gaussian", "reflect"),  # axes shorter than the window are padded
        ((16, 16, 8), (16, 16, 8), 0.25, "gaussian", "constant"),
        ((33, 20), (8, 8), 0.6, "gaussian", "replicate"),
    ],
)
def test_sliding_window_matches_monai(shape, roi, overlap, mode, padding) -> None:
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    conv = (torch.nn.Conv3d if len(shape) == 3 else torch.nn.Conv2d)(2, 3, 3, padding=1)
    net = torch.nn.Sequential(conv, torch.nn.Tanh())
    x = torch.randn(1, 2, *shape)
    with torch.no_grad():
        ours = sliding_window(x, roi, 3, net, overlap, mode, padding)
        ref = sliding_window_inference(x, roi, 3, net, overlap=overlap, mode=mode, padding_mode=padding)
    assert ours.shape == ref.shape == (1, 3, *shape)
    np.testing.assert_allclose(ours.numpy(), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_sliding_window_takes_the_last_deep_supervision_head() -> None:
    class TwoHeads(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return x * 0, x + 1

    out = sliding_window(torch.zeros(1, 1, 20, 20, 10), (8, 8, 8), 2, TwoHeads(), 0.25)
    np.testing.assert_allclose(out.numpy(), 1.0, rtol=1e-6)


UNET_VARIANTS = [
    (3, {"channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 1, "norm": "instance"}),
    (3, {"channels": [8, 16, 32, 64, 64], "strides": [2, 2, 2, 2], "num_res_units": 2, "norm": "batch"}),
    (3, {"channels": [8, 16, 32], "strides": [[2, 2, 1], 2], "num_res_units": 0, "norm": "batch"}),
    (
        3,
        {
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 2,
            "kernel_size": 5,
            "up_kernel_size": 3,
            "dropout": 0.2,
            "bias": False,
            "adn_ordering": "AN",
        },
    ),
    (2, {"channels": [8, 16, 32, 64], "strides": [2, 2, 2], "num_res_units": 0, "norm": "INSTANCE"}),
    (2, {"channels": [8, 16], "strides": [2, 2, 2], "num_res_units": 3, "norm": "batch"}),  # extra strides unused
]


@pytest.mark.parametrize(("dims", "args"), UNET_VARIANTS)
def test_plain_torch_unet_equals_monai(dims: int, args: dict) -> None:
    from volseg.fastnets import build_inference_network
    from volseg.nets import build_network, network_config

    cfg = network_config("unet", dims, 2, 3, args, for_inference=True)
    torch.manual_seed(1)
    ref = build_network(cfg)
    with torch.no_grad():  # non-trivial norm statistics and PReLU slopes
        for name, buf in ref.named_buffers():
            if "running_var" in name:
                buf.uniform_(0.5, 2.0)
            elif "running_mean" in name:
                buf.normal_()
        for name, p in ref.named_parameters():
            if name.endswith("A.weight"):
                p.uniform_(0.0, 0.5)
    ref.eval()
    ours = build_inference_network(cfg)
    assert ours is not None
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 2, *([32] * dims))
    with torch.no_grad():
        np.testing.assert_allclose(ours(x).numpy(), ref(x).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "cfg",
    [
        {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
         "channels": [8, 16], "strides": [2], "act": ("leakyrelu", {"negative_slope": 0.1})},
        {"_target_": "monai.networks.nets.UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
         "channels": [8, 16], "strides": [2], "norm": "group"},
        {"_target_": "monai.networks.nets.BasicUNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2},
    ],
)  # fmt: skip
def test_networks_not_covered_fall_back(cfg: dict) -> None:
    from volseg.fastnets import build_inference_network

    assert build_inference_network(cfg) is None


def test_fast_inference_does_not_import_monai(trained_bundle, tmp_path) -> None:
    """Importing MONAI costs seconds; the fast engine's whole path (read, segment, write) must not need it."""
    from volseg.data.synth import liver_ct_phantom

    ph = liver_ct_phantom(3, shape=(48, 40, 20), axcodes="LPS")
    src = save_nifti(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    code = (
        "import sys\n"
        "from volseg.infer import run_inference\n"
        f"w, f = run_inference([{str(src)!r}], {str(tmp_path / 'out')!r}, {str(trained_bundle)!r}, 'cpu',"
        " echo=print)\n"
        "assert w and not f, (w, f)\n"
        "print('LOADED', sorted(m for m in ('monai', 'ignite', 'scipy.signal') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "LOADED []" in out.stdout, out.stdout
    assert (tmp_path / "out" / "ct_seg.nii.gz").is_file()


@pytest.mark.parametrize("seed", range(6))
def test_labels_only_in_the_foreground_box_equal_resampling_everything(seed: int) -> None:
    """The box shortcut of the way back to the input grid is exact, not an approximation."""
    from volseg.fastpath import FastEngine, back_to_input

    rng = np.random.default_rng(seed)
    model = tuple(int(n) for n in rng.integers(12, 30, size=3))
    logits = torch.full((3, *model), -4.0)
    logits[0] = 4.0
    c = [int(rng.integers(3, n - 3)) for n in model]
    logits[1, c[0] - 3 : c[0] + 2, c[1] - 2 : c[1] + 3, c[2] - 2 : c[2] + 1] = 6.0 + torch.rand(5, 5, 3)
    logits[2, c[0], c[1], c[2]] = 9.0
    logits += 0.5 * torch.randn_like(logits)
    probs = torch.softmax(logits, dim=0)
    scale = rng.uniform(1.2, 4.0, size=3)  # model voxel j sits at input voxel scale * j + shift
    shift = rng.uniform(-0.5, 0.5, size=3)
    spatial = tuple(int(np.floor(s * (m - 1) + b)) + 1 for m, s, b in zip(model, scale, shift, strict=True))
    full = back_to_input(probs, scale, shift, spatial, chunk=7)
    boxed, box = FastEngine._labels_on_input(probs, scale, shift, spatial)
    assert torch.equal(full, boxed)
    assert int((full > 0).sum()) > 0
    inside = torch.zeros_like(full, dtype=torch.bool)
    inside[box] = True
    assert not bool((full[~inside] > 0).any())
    assert inside.float().mean() < 0.6  # the box is a fraction of the volume


def test_read_nifti_applies_scaling_in_float32(tmp_path) -> None:
    import nibabel as nib

    from volseg.imageio import read_image

    data = np.arange(-60, 60, dtype=np.int16).reshape(4, 5, 6)
    img = nib.Nifti1Image(data, np.diag([0.7, 0.8, 2.5, 1.0]))
    img.header.set_slope_inter(0.5, -1024.0)
    nib.save(img, tmp_path / "s.nii.gz")
    image = read_image(tmp_path / "s.nii.gz")
    assert image.array.dtype == np.float32
    np.testing.assert_array_equal(image.array, data * 0.5 - 1024.0)
    np.testing.assert_allclose(image.affine, np.diag([0.7, 0.8, 2.5, 1.0]))
    nib.save(nib.Nifti1Image(data.astype(np.int32) * 1000, np.eye(4)), tmp_path / "i32.nii")
    np.testing.assert_array_equal(read_image(tmp_path / "i32.nii").array, data.astype(np.float32) * 1000)


def test_label_counts_any_layout() -> None:
    from volseg.data.writers import label_counts

    lab = np.zeros((7, 8, 9), np.uint8, order="F")
    lab[1:3, 2:5, 3:4] = 2
    lab[0, 0, 0] = 1
    for a in (lab, np.ascontiguousarray(lab), lab[::-1], lab.astype(np.int16)):
        assert label_counts(a, minlength=4).tolist() == [7 * 8 * 9 - 7, 1, 6, 0]


def test_precision_setting(monkeypatch) -> None:
    import volseg.runtime as rt

    cpu = torch.device("cpu")
    assert rt.use_bf16("bf16", cpu) and not rt.use_bf16("fp32", cpu)
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: False)
    assert not rt.use_bf16("auto", cpu)
    monkeypatch.setattr(rt, "cpu_has_native_bf16", lambda: True)
    assert rt.use_bf16("auto", cpu)


def test_fp32_and_bf16_agree(trained_bundle, tmp_path) -> None:
    from volseg.data.synth import liver_ct_phantom
    from volseg.errors import UserError
    from volseg.infer import Predictor

    ph = liver_ct_phantom(5, shape=(56, 48, 24), axcodes="LPS")
    exact = Predictor.from_bundle(trained_bundle, "cpu", precision="fp32")
    half = Predictor.from_bundle(trained_bundle, "cpu", precision="bf16")
    assert exact.fast is not None and not exact.fast.bf16 and half.fast.bf16
    a, _ = exact.fast.segment_array(ph.image.astype(np.float32), ph.affine)
    b, _ = half.fast.segment_array(ph.image.astype(np.float32), ph.affine)
    assert (a == b).mean() > 0.995
    assert_agreement(a, b, TINY_LABELS, truth=ph.label, floors=TINY_FLOORS, min_dice=0.98)
    with pytest.raises(UserError, match="precision"):
        Predictor.from_bundle(trained_bundle, "cpu", precision="fp8")


def test_inference_overrides(trained_bundle) -> None:
    from volseg.data.synth import liver_ct_phantom
    from volseg.errors import UserError
    from volseg.infer import Predictor

    sets = ["infer.blend=constant", "infer.postprocess.largest_component=[]", "data.crop_foreground=false",
            "infer.mirror_border=4"]  # fmt: skip
    p = Predictor.from_bundle(trained_bundle, "cpu", overrides=sets)
    r = p.fast.recipe
    assert (r.infer.blend, r.infer.postprocess.largest_component, r.data.crop_foreground) == ("constant", [], False)
    assert p.fast.keep == [] and r.infer.mirror_border == 4
    ph = liver_ct_phantom(5, shape=(48, 40, 20), axcodes="LPS")
    labels, _ = p.fast.segment_array(ph.image.astype(np.float32), ph.affine)
    plain, _ = Predictor.from_bundle(trained_bundle, "cpu").fast.segment_array(ph.image.astype(np.float32), ph.affine)
    assert labels.shape == ph.image.shape and (labels == plain).mean() > 0.9  # fragments kept, no crop
    assert_agreement(labels, plain, TINY_LABELS, truth=ph.label, floors=TINY_FLOORS, min_dice=0.9)
    for bad, why in [(["model.name=unet"], "cannot change at inference"), (["infer.roi_size=[8,8,8]"], "roi_size"),
                     (["infer.blend=box"], "blend")]:  # fmt: skip
        with pytest.raises(UserError, match=why):
            Predictor.from_bundle(trained_bundle, "cpu", overrides=bad)
    with pytest.raises(UserError, match="fast engine"):
        Predictor.from_bundle(trained_bundle, "cpu", engine="monai", overrides=["infer.overlap=0.5"])


def test_folder_inference_matches_single_cases(trained_bundle, tmp_path) -> None:
    """A folder with a bad file among good ones: each good case as when segmented alone, the bad one reported."""
    import nibabel as nib

    from volseg.data.synth import liver_ct_phantom
    from volseg.infer import Predictor, run_inference

    folder = tmp_path / "in"
    folder.mkdir()
    truths = []
    for k, axcodes in enumerate(["LPS", "RAS", "LAS"]):
        ph = liver_ct_phantom(20 + k, shape=(48, 40, 20), axcodes=axcodes)
        save_nifti(folder / f"case{k}.nii.gz", ph.image, ph.affine)
        truths.append(ph.label)
    (folder / "case1b.nii.gz").write_bytes(b"not a nifti")  # sorts between case1 and case2
    lines: list[str] = []
    written, failures = run_inference([str(folder)], tmp_path / "out", trained_bundle, "cpu", echo=lines.append)
    assert [p.name for p in written] == ["case0_seg.nii.gz", "case1_seg.nii.gz", "case2_seg.nii.gz"]
    assert [f.name for f, _ in failures] == ["case1b.nii.gz"] and "gzip" in failures[0][1]
    one = Predictor.from_bundle(trained_bundle, "cpu")
    for k in range(3):
        alone = one.predict(folder / f"case{k}.nii.gz").labels
        batch = np.asarray(nib.load(str(written[k])).dataobj)
        assert_agreement(batch, alone, TINY_LABELS, truth=truths[k], floors=TINY_FLOORS, min_dice=1.0)
        np.testing.assert_array_equal(batch, alone)


@pytest.mark.parametrize("flip", [False, True])
def test_downsample_in_slabs_equals_whole(flip: bool) -> None:
    from volseg.fastpath import downsample, downsample_slabs

    torch.manual_seed(0)
    x = torch.randn(2, 30, 20, 41)
    pos = [torch.linspace(-0.5, 29.7, 9, dtype=torch.float64), torch.linspace(0, 19, 5, dtype=torch.float64),
           torch.arange(0, 14, dtype=torch.float64) * 3.1 - 0.4]  # fmt: skip
    if flip:
        pos[2] = 40 - pos[2]
    whole = downsample(x, pos)
    slabs = downsample_slabs(x, pos, torch.device("cpu"), max_slab_bytes=2 * 30 * 20 * 4 * 7)  # 7 slices a slab
    assert slabs.shape == whole.shape == (2, 9, 5, 14)
    np.testing.assert_allclose(slabs.numpy(), whole.numpy(), rtol=1e-5, atol=1e-5)


def test_slab_plan_gives_the_whole_plans_labels(trained_bundle) -> None:
    """The bounded-memory plan (input to the device slab by slab, labels assembled in host memory)."""
    from volseg.data.synth import liver_ct_phantom
    from volseg.infer import Predictor

    ph = liver_ct_phantom(6, shape=(56, 48, 30), axcodes="LPS")
    eng = Predictor.from_bundle(trained_bundle, "cpu", precision="fp32").fast
    assert eng._plan(10**9, 10**9, 10**6) == "whole"  # nothing to bound on the CPU
    eng.force_plan = "whole"
    whole, _ = eng.segment_array(ph.image.astype(np.float32), ph.affine)
    eng.force_plan, eng.slab_bytes = "slabs", 56 * 48 * 4 * 5
    slabs, _ = eng.segment_array(ph.image.astype(np.float32), ph.affine)
    assert eng.plan == "slabs"
    assert (whole == slabs).mean() > 0.9999
    assert_agreement(whole, slabs, TINY_LABELS, truth=ph.label, floors=TINY_FLOORS, min_dice=0.999)


def test_fast_engine_agrees_with_the_bundle_chain_on_multichannel_mr(tmp_path) -> None:
    """An MR recipe (z-score on non-zero voxels, 2 channels in a 4D NIfTI, no CT window) through both engines."""
    import nibabel as nib

    from volseg.bundle import write_bundle_configs
    from volseg.infer import Predictor
    from volseg.nets import build_network, network_config
    from volseg.recipe import recipe_from_dict

    recipe = recipe_from_dict(
        {
            "name": "tiny_mr",
            "data": {
                "modality": "MR",
                "labels": {"background": 0, "edema": 1, "tumour": 2},
                "spacing": [2.0, 2.0, 3.0],
                "intensity": {"nonzero": True},
            },
            "model": {"name": "unet", "in_channels": 2, "args": {"channels": [8, 16, 32], "strides": [2, 2]}},
            "train": {"patch_size": [16, 16, 16]},
            "infer": {"sw_batch_size": 2},
        }
    )
    bundle = tmp_path / "bundle"
    write_bundle_configs(recipe, bundle)
    torch.manual_seed(3)
    m = recipe.model
    net = build_network(network_config(m.name, 3, m.in_channels, recipe.num_classes, m.args, for_inference=True))
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")

    rng = np.random.default_rng(0)
    img = np.zeros((40, 36, 14, 2), np.float32)
    img[6:34, 5:31, 2:12] = rng.normal(300.0, 60.0, size=(28, 26, 10, 2))  # a head inside zero background
    img[15:25, 12:22, 4:9, 1] += 250.0
    affine = np.diag([-1.2, -1.1, 2.5, 1.0])
    affine[:3, 3] = (20.0, 30.0, -10.0)
    src = tmp_path / "mr.nii.gz"
    nib.save(nib.Nifti1Image(img, affine), src)
    fast = Predictor.from_bundle(bundle, "cpu", precision="fp32")
    chain = Predictor.from_bundle(bundle, "cpu", "monai")
    assert fast.fast is not None and type(fast.network).__name__ == "UNetInference"
    a, b = fast.predict(src), chain.predict(src)
    assert a.labels.shape == b.labels.shape == img.shape[:3]
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-4)
    head = img[..., 0] != 0
    # No reference here: an untrained network (this seed) labels every class inside the head, in both engines
    # (edema 4752 and tumour 444 voxels measured), and inside the head the two agree.
    labels = {"edema": 1, "tumour": 2}
    assert_labels_present(labels, a.labels[head], b.labels[head], min_voxels=100)
    assert (a.labels == b.labels)[head].mean() > 0.995
    assert_agreement(np.where(head, a.labels, 0), np.where(head, b.labels, 0), labels, min_dice=0.99)
    # Outside the head the chain's inverse leaves every class at rounding level (about 1e-8) in a rim beyond the
    # crop, and its argmax labels that noise; the fast engine has exact zeros there: background.
    differ = a.labels != b.labels
    assert (a.labels[differ & ~head] == 0).all()


# ---------------------------------------------------------------------------------------------------------------
# Test-time mirroring


def test_mirrored_averages_the_logits_of_every_flip_combination() -> None:
    from itertools import combinations

    from volseg.fastpath import mirrored

    torch.manual_seed(0)
    net = torch.nn.Conv3d(2, 3, 3, padding=1).eval()
    x = torch.randn(2, 2, 8, 6, 5)
    assert mirrored(net, ()) is net
    with torch.no_grad():
        got = mirrored(net, (0, 2))(x)
        want = (
            sum(
                torch.flip(net(torch.flip(x, dims)), dims) if dims else net(x)
                for dims in [tuple(2 + a for a in c) for r in range(3) for c in combinations((0, 2), r)]
            )
            / 4
        )
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, net(x), atol=1e-4)  # a kernel that is not symmetric: the flips matter
        # A network that commutes with flips gives its own output back.
        sym = torch.nn.Conv3d(2, 3, 1).eval()
        torch.testing.assert_close(mirrored(sym, (0, 1, 2))(x), sym(x))


@pytest.mark.parametrize(
    ("value", "want"), [([0, 1, 2], (0, 1, 2)), ([2], (2,)), (False, ()), ([], ()), ([3], None), ([0, 0], None),
                        (True, None)],
)  # fmt: skip
def test_tta_flips_in_the_recipe(value, want) -> None:
    import json

    from helpers import TINY_RECIPE

    from volseg.errors import UserError
    from volseg.recipe import recipe_from_dict

    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["infer"]["tta_flips"] = value
    if want is None:
        with pytest.raises(UserError, match="tta_flips"):
            recipe_from_dict(raw)
    else:
        assert recipe_from_dict(raw).infer.tta_flips == want


def test_mirroring_runs_on_both_engines_alike(tmp_path) -> None:
    import json

    from helpers import TINY_RECIPE, write_random_bundle

    from volseg.data.synth import liver_ct_phantom
    from volseg.infer import Predictor

    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["infer"]["tta_flips"] = [0, 1, 2]
    raw["infer"]["postprocess"] = {"largest_component": []}
    bundle = write_random_bundle(tmp_path / "bundle", seed=10, recipe=raw)
    ph = liver_ct_phantom(7, shape=(48, 40, 20), axcodes="LPS")
    src = save_nifti(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    mirrored = Predictor.from_bundle(bundle, "cpu", precision="fp32")
    assert any("trained without flips" in n for n in mirrored.notes)  # TINY_RECIPE trains with flip 0
    fast = mirrored.predict(src).labels
    chain = Predictor.from_bundle(bundle, "cpu", "monai").predict(src).labels
    plain = Predictor.from_bundle(bundle, "cpu", precision="fp32", overrides=["infer.tta_flips=[]"]).predict(src).labels
    # An untrained network (this seed) labels both classes inside the body; mirrored, the two engines agree, and
    # the mirrored labels are not the plain ones.
    body = ph.image > -500
    assert_labels_present(TINY_LABELS, fast[body], chain[body], min_voxels=100)
    assert (fast == chain)[body].mean() > 0.995
    assert (fast != plain)[body].mean() > 0.01
