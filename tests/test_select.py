"""volseg select: configurations, ensembles and postprocessing chosen by cross-validation of fold runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import save_nifti

from volseg.data.synth import liver_ct_phantom
from volseg.errors import UserError
from volseg.select import keep_largest, load_fold_run, postprocess_steps

LABELS = {"liver": 1, "tumour": 2}


def _case(blob: bool = False, tumour_pieces: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, truth): a liver cube found well, tumour cubes found exactly; optionally a spurious liver blob
    in the prediction, and a tumour in several pieces (in both)."""
    truth = np.zeros((24, 24, 12), np.uint8)
    truth[4:14, 4:14, 2:10] = 1
    for i in range(tumour_pieces):
        truth[16:19, 3 + 8 * i : 6 + 8 * i, 3:6] = 2
    pred = truth.copy()
    pred[4:14, 4:6, 2:10] = 0  # a liver Dice below 1, so that a blob's removal shows
    if blob:
        pred[20:23, 18:22, 8:11] = 1
    return pred, truth


def test_keep_largest_keeps_one_component_per_label() -> None:
    pred, _ = _case(blob=True, tumour_pieces=2)
    out = keep_largest(pred, [1])
    assert (out[20:23, 18:22, 8:11] == 0).all() and (out[4:14, 6:14, 2:10] == 1).all()
    assert (out == 2).sum() == (pred == 2).sum()  # tumour untouched
    assert (pred[20:23, 18:22, 8:11] == 1).all()  # a copy: the input is kept


def test_postprocessing_kept_when_it_removes_a_spurious_blob() -> None:
    cases = [_case(blob=True), _case(blob=True), _case()]
    kept, dice, lines = postprocess_steps(cases, LABELS)
    assert kept == ["liver"]
    assert "largest component of liver: kept" in lines[0]
    assert dice["liver"] > 0.85 and dice["tumour"] == 1.0
    # Tumour is a single piece: keeping its largest component changes nothing, so it is refused (no gain).
    assert "tumour" not in kept and "no gain" in lines[1]


def test_postprocessing_refused_when_a_label_falls() -> None:
    # Tumour in two pieces in the truth: its largest component drops one of them, tumour Dice falls.
    cases = [_case(tumour_pieces=2) for _ in range(3)]
    kept, dice, lines = postprocess_steps(cases, LABELS)
    assert kept == []
    assert dice["tumour"] == 1.0
    assert "largest component of tumour: refused (tumour 1.0000 -> " in lines[1]


def test_postprocessing_refused_when_it_also_removes_true_pieces() -> None:
    # Removing the blob helps liver in two cases, but the third has a liver in two true pieces: liver falls there
    # by more than it rises elsewhere -> refused.
    a, b = _case(blob=True), _case(blob=True)
    pred, truth = _case()
    truth[18:23, 14:23, 1:11] = 1  # a second, true liver piece, smaller than the first
    pred[18:23, 14:23, 1:11] = 1
    kept, _, lines = postprocess_steps([a, b, (pred, truth)], LABELS)
    assert "liver" not in kept and "largest component of liver: refused" in lines[0]


def test_a_run_without_folds_is_refused_in_one_line(tmp_path: Path, capsys) -> None:
    from volseg.cli import main

    run = tmp_path / "single"
    (run / "configs").mkdir(parents=True)
    (run / "models").mkdir()
    (run / "models" / "model.pt").write_bytes(b"")
    with pytest.raises(UserError, match="not a fold run"):
        load_fold_run(run)
    rc = main(["select", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "not a fold run" in err[0] and "--folds" in err[0]


@pytest.mark.slow
def test_select_on_two_fold_runs(tiny_data: Path, tiny_recipe_path: Path, tmp_path: Path, capsys) -> None:
    from volseg.cli import main
    from volseg.folds import train_folds
    from volseg.recipe import load_recipe
    from volseg.trust import check_bundle

    quick = ["train.max_epochs=1", "infer.postprocess.largest_component=[]"]
    runs = []
    for name, seed in (("a", 0), ("b", 1)):
        recipe = load_recipe(tiny_recipe_path, [*quick, f"train.seed={seed}"])
        train_folds(recipe, tiny_data, tmp_path / name, 2, echo=lambda s: None, progress=False)
        runs.append(tmp_path / name)
    capsys.readouterr()
    assert main(["select", str(runs[0]), str(runs[1]), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    # Every configuration is in the table: each run with and without mirroring, and their ensemble (same splits).
    for row in ("a ", "a +mirror", "b ", "b +mirror", "a & b ", "a & b +mirror"):
        assert any(line.startswith(row) for line in out.splitlines()), (row, out)
    chosen = next(line for line in out.splitlines() if line.startswith("chosen: "))
    bundle = tmp_path / chosen.split()[1]
    record = json.loads((bundle / "logs" / "select.json").read_text())
    # The out-of-fold predictions were saved: one per case and mirroring, for both runs.
    for run in runs:
        for variant in ("plain", "mirror"):
            assert len(list((run / "cv" / variant).glob("*.npz"))) == 8
    # The choice is the best single-run configuration of the table, and it is what the bundle now says.
    singles = [c for c in record["configurations"] if "&" not in c["name"]]
    best = max(singles, key=lambda c: c["mean_dice"])
    assert record["chosen"] == best["name"]
    recipe = yaml.safe_load((bundle / "configs" / "volseg_recipe.yaml").read_text())
    assert recipe["infer"]["tta_flips"] == ([0, 1, 2] if best["name"].endswith("+mirror") else [])
    assert recipe["infer"]["postprocess"]["largest_component"] == record["largest_component"]
    for name in record["largest_component"]:
        assert record["dice"][name] >= best["dice"][name]
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["eval_metrics"]["select_cv_mean_dice"] == record["mean_dice"]
    assert "cv_mean_dice" in meta["eval_metrics"]  # the fold figures stay
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    lcc = [t for t in inference["postprocessing"]["transforms"] if t["_target_"] == "KeepLargestConnectedComponentd"]
    assert bool(lcc) == bool(record["largest_component"])
    check_bundle(bundle)  # still exactly volseg's for its (changed) recipe
    # volseg infer runs the chosen bundle.
    ph = liver_ct_phantom(7, shape=(40, 40, 20))
    src = save_nifti(tmp_path / "ct.nii.gz", ph.image, ph.affine)
    args = ["infer", str(src), "--bundle", str(bundle), "--output", str(tmp_path / "pred"), "--device", "cpu"]
    assert main(args) == 0
    assert list((tmp_path / "pred").glob("ct*.nii.gz"))
    # Run again: the saved predictions are used, nothing is predicted.
    capsys.readouterr()
    stamp = {p: p.stat().st_mtime_ns for p in (runs[0] / "cv").rglob("*.npz")}
    assert main(["select", str(runs[0]), "--device", "cpu"]) == 0
    again = capsys.readouterr().out
    assert "predicts" not in again
    assert stamp == {p: p.stat().st_mtime_ns for p in (runs[0] / "cv").rglob("*.npz")}


def test_the_mirrored_configuration_flips_the_axes_training_mirrored() -> None:
    from helpers import TINY_RECIPE

    from volseg.recipe import recipe_from_dict
    from volseg.select import mirror_axes

    raw = json.loads(json.dumps(TINY_RECIPE))
    assert mirror_axes(recipe_from_dict(raw)) == [0, 1, 2]  # trained without mirroring: every axis, for the table
    raw["train"]["augment"].update(flip=0.5, flip_axes=[1])
    assert mirror_axes(recipe_from_dict(raw)) == [1]  # the liver lies on one side: only the axis training flipped
