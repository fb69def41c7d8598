"""K-fold cross-validation and fold ensembles."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import TINY_LABELS, assert_labels_present, save_nifti

from volseg.folds import ensembled, fold_weights


def test_ensembled_gives_the_mean_softmax_after_the_softmax() -> None:
    torch.manual_seed(0)
    nets = [torch.nn.Conv3d(1, 3, 3, padding=1).eval() for _ in range(3)]
    x = torch.randn(2, 1, 6, 5, 4)
    assert ensembled(nets[:1]) is nets[0]
    with torch.no_grad():
        got = torch.softmax(ensembled(nets)(x), dim=1)
        want = sum(torch.softmax(n(x), dim=1) for n in nets) / 3
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_fold_weights_are_ordered_by_fold(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "folds"
    folder.mkdir(parents=True)
    for name in ("fold_10.pt", "fold_2.pt", "fold_0.pt", "fold_x.pt", "other.pt"):
        (folder / name).write_bytes(b"")
    assert [p.name for p in fold_weights(tmp_path)] == ["fold_0.pt", "fold_2.pt", "fold_10.pt"]
    assert fold_weights(tmp_path / "nothing") == []


def test_fold_without_folds_is_refused(tmp_path: Path, capsys) -> None:
    from volseg.cli import main

    rc = main(["train", "--config", str(tmp_path / "r.yaml"), "--fold", "1"])
    assert rc == 2 and "volseg: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_two_folds_make_an_ensemble_bundle(tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path) -> None:
    from volseg.data.datalist import load_datalist
    from volseg.data.synth import liver_ct_phantom
    from volseg.folds import train_folds
    from volseg.infer import Predictor
    from volseg.recipe import load_recipe
    from volseg.trust import check_bundle

    recipe = load_recipe(tiny_recipe_path, ["train.max_epochs=2"])
    run = tmp_path / "run"
    lines: list[str] = []
    results = train_folds(recipe, tiny_data, run, 2, echo=lines.append, progress=False)
    assert [r.run_dir.name for r in results] == ["fold_0", "fold_1"]
    assert [p.name for p in fold_weights(run)] == ["fold_0.pt", "fold_1.pt"]
    fold0, fold1 = ((run / "models" / "folds" / f"fold_{k}.pt").read_bytes() for k in (0, 1))
    assert (run / "models" / "model.pt").read_bytes() == fold0 != fold1
    # The splits: every case validated exactly once, saved with the run.
    record = json.loads((run / "logs" / "folds.json").read_text())
    validated = [c["image"] for split in record["splits"] for c in split["validation"]]
    assert len(validated) == len(set(validated)) == len(load_datalist(tiny_data))
    meta = json.loads((run / "configs" / "metadata.json").read_text())
    assert {"cv_mean_dice", "fold0_mean_dice", "fold1_mean_dice"} <= set(meta["eval_metrics"])
    assert "models/folds" in meta["data_source"]
    check_bundle(run)  # the ensemble bundle is exactly volseg's, fold folders included
    # Both engines average the two folds and agree.
    ph = liver_ct_phantom(9, shape=(48, 40, 20), axcodes="LPS")
    src = save_nifti(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    fast, chain = Predictor.from_bundle(run, "cpu", precision="fp32"), Predictor.from_bundle(run, "cpu", "monai")
    assert len(fast.folds) == len(chain.folds) == 2
    a, b = fast.predict(src).labels, chain.predict(src).labels
    body = ph.image > -500
    assert_labels_present({"liver": TINY_LABELS["liver"]}, a[body], b[body], min_voxels=50)
    assert (a == b)[body].mean() > 0.99
    # Run again: both folds are found finished, nothing is trained.
    again: list[str] = []
    train_folds(recipe, tiny_data, run, 2, echo=again.append, progress=False)
    assert sum("finished earlier" in line for line in again) == 2
