"""Test-time mirroring in the bundle's MONAI chain (scripts/inferers.py) agrees with volseg's fast engine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import TINY_RECIPE, save_nifti

from volseg.bundle_scripts.inferers import MirroredInferer
from volseg.errors import UserError
from volseg.recipe import recipe_from_dict


def test_the_mirrored_inferer_averages_the_flipped_passes() -> None:
    from monai.inferers import SimpleInferer

    calls: list[tuple[int, ...]] = []

    def network(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        ramp = torch.arange(x.shape[2], dtype=torch.float32).view(1, 1, -1, 1, 1)
        return x * 0 + ramp  # depends on the position along spatial axis 0 only

    x = torch.zeros(1, 1, 4, 3, 2)
    out = MirroredInferer(SimpleInferer(), [0, 1])(x, network)
    assert len(calls) == 4  # 2^2 passes
    assert out.dtype == torch.float32 and torch.allclose(out, torch.full_like(out, 1.5))  # ramp 0..3 and its mirror
    same = MirroredInferer(SimpleInferer(), [1])(x, network)  # axis 1 does not change this network's output
    assert torch.allclose(same, network(x))
    with pytest.raises(ValueError, match="axes"):
        MirroredInferer(SimpleInferer(), [0, 0])


def _bundle(tmp_path: Path, name: str, flips: list[int], chain_mirroring: bool = True) -> Path:
    from volseg.bundle import bundle_files
    from volseg.nets import build_network, network_config

    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["train"]["augment"].update(flip=0.5, flip_axes=[1])
    raw["infer"] = {"tta_flips": flips, "sw_batch_size": 2}
    recipe = recipe_from_dict(raw)
    bundle = tmp_path / name
    for rel, text in bundle_files(recipe, chain_mirroring=chain_mirroring).items():
        (bundle / rel).parent.mkdir(parents=True, exist_ok=True)
        (bundle / rel).write_text(text, encoding="utf-8")
    torch.manual_seed(3)
    m = recipe.model
    net = build_network(network_config(m.name, 3, m.in_channels, recipe.num_classes, m.args, for_inference=True))
    (bundle / "models").mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), bundle / "models" / "model.pt")
    return bundle


def _scan(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    img = rng.normal(60.0, 40.0, size=(40, 36, 20)).astype(np.float32)
    return save_nifti(tmp_path / "ct.nii.gz", img, np.diag([-1.5, -1.5, 3.0, 1.0]))


def _probs(bundle: Path, src: Path, engine: str) -> np.ndarray:
    from volseg.infer import Predictor

    kw: dict[str, Any] = {"precision": "fp32"} if engine == "fast" else {}
    probs = Predictor.from_bundle(bundle, "cpu", engine, **kw).predict(src, probabilities=True).probabilities
    assert probs is not None
    return np.asarray(probs)


def test_the_chain_mirrors_as_the_fast_engine_does(tmp_path: Path) -> None:
    src = _scan(tmp_path)
    mirrored, plain = _bundle(tmp_path, "mirrored", [1]), _bundle(tmp_path, "plain", [])
    chain_cfg = (mirrored / "configs" / "inference.json").read_text()
    assert "scripts.inferers.MirroredInferer" in chain_cfg and (mirrored / "scripts" / "inferers.py").is_file()
    assert "MirroredInferer" not in (plain / "configs" / "inference.json").read_text()
    fast, chain = _probs(mirrored, src, "fast"), _probs(mirrored, src, "monai")
    assert np.abs(fast - chain).max() < 2e-3  # the same mirrored probabilities from both engines
    assert np.abs(_probs(plain, src, "monai") - chain).max() > 1e-2  # and mirroring changed them


def test_a_bundle_written_before_the_chain_mirrored_is_trusted_and_mirrored_by_volseg(tmp_path: Path) -> None:
    from volseg.trust import check_bundle

    src = _scan(tmp_path)
    old = _bundle(tmp_path, "old", [1], chain_mirroring=False)
    assert "MirroredInferer" not in (old / "configs" / "inference.json").read_text()
    check_bundle(old)  # the form volseg wrote before
    new = _bundle(tmp_path, "new", [1])
    assert np.abs(_probs(old, src, "monai") - _probs(new, src, "monai")).max() < 2e-3  # volseg mirrors it itself
    # Any other change of the chain is refused, naming the file.
    cfg = json.loads((new / "configs" / "inference.json").read_text())
    cfg["inferer"]["axes"] = [0]
    (new / "configs" / "inference.json").write_text(json.dumps(cfg, indent=4) + "\n")
    with pytest.raises(UserError, match="inference.json"):
        check_bundle(new)
