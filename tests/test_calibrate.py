"""train.calibrate and infer.label_bias: the bias chosen on validation cases, and both engines applying it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_RECIPE, save_nifti

from volseg.recipe import recipe_from_dict
from volseg.training import calibrate as C


def _under_segmented_case(seed: int, p_inside: float) -> tuple[np.ndarray, np.ndarray]:
    """Background / organ / lesion: the lesion's probability is ``p_inside`` inside it (the rest organ), so the
    plain argmax misses it when that is below one half."""
    rng = np.random.default_rng(seed)
    ref = np.zeros((20, 20, 10), np.int64)
    ref[4:16, 4:16, 2:8] = 1
    ref[8:12, 8:12, 4:7] = 2
    probs = np.zeros((3, *ref.shape), np.float32)
    probs[0] = np.where(ref == 0, 0.9, 0.05)
    probs[2] = np.where(ref == 2, p_inside, 0.02) + rng.uniform(0, 0.02, ref.shape)
    probs[1] = 1.0 - probs[0] - probs[2]
    return probs, ref


def test_an_under_segmented_label_gets_a_bias_and_a_calibrated_one_none() -> None:
    cases = [_under_segmented_case(s, 0.3) for s in range(2)]
    bias, table = C.choose_bias(cases, 2, [1.0, 1.0, 1.0])
    assert table[1.0] == pytest.approx(0.0)  # the plain argmax finds no lesion voxel
    assert bias > 1.0 and table[bias] > 0.95  # 0.3 x bias beats the organ's 0.65 from a bias of 3 on
    assert bias == min(b for b, d in table.items() if d == table[bias])  # the smallest of the best
    good = [_under_segmented_case(s, 0.8) for s in range(2)]
    bias, table = C.choose_bias(good, 2, [1.0, 1.0, 1.0])
    assert bias == 1.0 and table[1.0] > 0.95  # nothing to gain: no bias
    empty = [(p, np.where(r == 2, 1, r)) for p, r in good]
    empty = [(np.stack([p[0], p[1] + p[2], 0 * p[2]]), r) for p, r in empty]
    assert C.choose_bias(empty, 2, [1.0, 1.0, 1.0]) == (1.0, {})  # no case holds the label


def test_biased_labels_is_the_argmax_of_the_scaled_probabilities() -> None:
    probs = np.array([[0.5, 0.2], [0.3, 0.5], [0.2, 0.3]], np.float32)[:, :, None]
    assert C.biased_labels(probs, [1, 1, 1]).ravel().tolist() == [0, 1]
    assert C.biased_labels(probs, [1, 1, 2]).ravel().tolist() == [0, 2]
    assert C.biased_labels(probs, [1, 1, 3]).ravel().tolist() == [2, 2]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"infer": {"label_bias": {"background": 2.0}}}, "not a foreground label"),
        ({"infer": {"label_bias": {"spleen": 2.0}}}, "not a foreground label"),
        ({"infer": {"label_bias": {"tumour": 0.0}}}, "greater than 0"),
        ({"train": {"calibrate": ["kidney"]}}, "not a foreground label"),
        ({"cascade": {"calibrate": ["background"]}}, "cascade.calibrate names 'background'"),
    ],
)
def test_bad_bias_and_calibration_labels_are_refused(override: dict[str, Any], message: str) -> None:
    from volseg.errors import UserError

    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["cascade"] = {"spacing": [4.0, 4.0, 4.0], "patch_size": [16, 16, 16]}
    recipe_from_dict(raw)  # the base is a valid recipe
    for key, value in override.items():
        raw[key].update(value)
    with pytest.raises(UserError, match=message):
        recipe_from_dict(raw)


def test_both_engines_apply_the_label_bias(tmp_path: Path) -> None:
    """The fast engine (bias before the way back) and the bundle's MONAI chain (scripts/labels.py, after it) give
    the same labels, and the bias changes them."""
    from volseg.bundle import write_bundle_configs
    from volseg.infer import Predictor
    from volseg.nets import build_network, network_config

    raw = json.loads(json.dumps(TINY_RECIPE))
    labels: dict[str, np.ndarray] = {}
    for name, bias in (("plain", {}), ("biased", {"tumour": 4.0})):
        raw["infer"] = {"label_bias": bias, "sw_batch_size": 2}
        recipe = recipe_from_dict(raw)
        bundle = tmp_path / name
        write_bundle_configs(recipe, bundle)
        torch.manual_seed(5)
        m = recipe.model
        net = build_network(network_config(m.name, 3, m.in_channels, recipe.num_classes, m.args, for_inference=True))
        (bundle / "models").mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), bundle / "models" / "model.pt")
        if bias:
            chain_cfg = (bundle / "configs" / "inference.json").read_text()
            assert "scripts.labels.BiasedArgmaxd" in chain_cfg and (bundle / "scripts" / "labels.py").is_file()
        rng = np.random.default_rng(0)
        img = rng.normal(60.0, 40.0, size=(40, 36, 20)).astype(np.float32)
        src = save_nifti(tmp_path / "ct.nii.gz", img, np.diag([-1.5, -1.5, 3.0, 1.0]))
        fast = Predictor.from_bundle(bundle, "cpu", precision="fp32").predict(src).labels
        chain = Predictor.from_bundle(bundle, "cpu", "monai").predict(src).labels
        assert (fast == chain).mean() > 0.995, name
        labels[name] = fast
    plain, biased = (labels["plain"] == 2).sum(), (labels["biased"] == 2).sum()
    assert biased > plain + 100  # an untrained network: the bias moves voxels to the tumour


def test_training_calibrates_and_the_bundle_holds_the_bias(tiny_data: Path, tmp_path: Path, monkeypatch) -> None:
    """A run with train.calibrate: the validation pass runs on the real validation cases; with probabilities that
    under-segment the tumour the bias is kept in the bundle's recipe and configs, which both engines load."""
    from volseg.infer import Predictor
    from volseg.train import train

    real = C.validation_cases
    seen: dict[str, Any] = {}

    def crafted(recipe: Any, evaluator: Any, model_pt: Any, device: Any) -> list[C.Case]:
        cases = real(recipe, evaluator, model_pt, device)
        seen["shapes"] = [(p.shape, r.shape) for p, r in cases]
        seen["sums"] = [float(p.sum(axis=0).mean()) for p, _ in cases]
        return [_under_segmented_case(s, 0.3) for s in range(2)]

    monkeypatch.setattr(C, "validation_cases", crafted)
    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["train"].update(max_epochs=1, calibrate=["tumour"])
    lines: list[str] = []
    run = tmp_path / "run"
    train(recipe_from_dict(raw), tiny_data, run, echo=lines.append, progress=False)
    assert len(seen["shapes"]) == 2  # the two validation cases of the tiny data (val_fraction 0.25 of 8)
    assert all(p[0] == 3 and p[1:] == r for p, r in seen["shapes"]) and seen["sums"] == pytest.approx([1.0, 1.0])
    assert any("calibration of tumour" in line and "kept" in line for line in lines)
    from volseg.bundle import read_bundle_recipe

    held = read_bundle_recipe(run)
    assert held.infer.label_bias.get("tumour", 1.0) > 1.0 and held.train.calibrate == ["tumour"]
    assert "BiasedArgmaxd" in (run / "configs" / "inference.json").read_text()
    src = next((tiny_data / "imagesTr").glob("*.nii.gz"))
    chain = Predictor.from_bundle(run, "cpu", "monai").predict(src).labels  # the trust check passes
    fast = Predictor.from_bundle(run, "cpu", precision="fp32").predict(src).labels
    assert chain.shape == fast.shape and (chain == fast).mean() > 0.99


def test_the_calibration_segments_the_validation_cases_as_the_bundle_will(monkeypatch) -> None:
    """With infer.tta_flips the validation probabilities are those of the mirrored network (logits averaged), so
    the bias is chosen for the inference the bundle runs."""
    from types import SimpleNamespace

    from volseg.training import result

    class Ramp(torch.nn.Module):  # logits that depend on the position along axis 0: mirroring changes them
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            ramp = torch.linspace(0.0, 3.0, x.shape[2]).view(1, 1, -1, 1, 1).expand_as(x)
            return torch.cat([x, x + ramp], dim=1)

    monkeypatch.setattr(result, "saved_network", lambda recipe, model_pt: Ramp())
    image = torch.zeros(1, 1, 8, 4, 4)
    evaluator = SimpleNamespace(
        data_loader=[{"image": image, "label": torch.zeros(1, 1, 8, 4, 4)}], inferer=lambda x, net: net(x)
    )

    def probs(flips: list[int]) -> np.ndarray:
        raw = json.loads(json.dumps(TINY_RECIPE))
        raw["data"]["labels"] = {"background": {"value": 0}, "organ": {"value": 1}}
        raw["infer"] = {"tta_flips": flips}
        return C.validation_cases(recipe_from_dict(raw), evaluator, None, "cpu")[0][0]

    plain, mirrored = probs([]), probs([0])
    assert plain[1, 0].max() < 0.51 and plain[1, -1].min() > 0.95  # the ramp: 0 at one end, 3 at the other
    expected = float(torch.sigmoid(torch.tensor(1.5)))  # the mean of the ramp and its mirror image is 1.5 everywhere
    assert mirrored[1] == pytest.approx(np.full((8, 4, 4), expected), abs=1e-5)
