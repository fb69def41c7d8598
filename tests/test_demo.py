"""The demo end to end with a small recipe: two phantom families held out, per-lesion detection, QC pictures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import TINY_RECIPE


@pytest.mark.slow
def test_demo_scores_both_families_and_writes_a_picture_per_case(tmp_path: Path, monkeypatch) -> None:
    from volseg.demo import LESION_SIZES_MM, run_demo
    from volseg.infer import find_latest_run

    raw = json.loads(json.dumps(TINY_RECIPE))
    raw["train"].update(max_epochs=1, iterations_per_epoch=2)
    raw["cascade"] = {"spacing": [6.0, 6.0, 6.0], "patch_size": [16, 16, 16], "roi_labels": ["liver"]}
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(raw))
    lines: list[str] = []
    out = tmp_path / "demo"
    mean = run_demo(out, config, n_train=3, n_test=1, n_torso=1, device="cpu", echo=lines.append)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["stages"] == 2 and (out / "run" / "stages" / "fine" / "models" / "model.pt").is_file()
    assert set(mean) == set(summary["heldout_dice"]) == {"liver", "torso"}
    assert all("liver" in m for m in mean.values())  # both families have a liver to score
    assert [c["family"] for c in summary["cases"]] == ["liver", "torso"]
    bins = summary["lesions_found"]
    assert len(bins) == len(LESION_SIZES_MM) + 1 and all(b["found"] <= b["present"] for b in bins.values())
    assert sum(b["present"] for b in bins.values()) >= 1  # the held-out phantoms have lesions to find
    pictures = sorted(p.name for p in (out / "predictions").glob("*_qc.png"))
    assert len(pictures) == 2 and all((out / "predictions" / p).stat().st_size > 1000 for p in pictures)
    assert any(line.startswith("[5/5]") for line in lines) and any("lesions" in line for line in lines)
    # `volseg infer SCAN` run from the demo's parent folder (no runs/ there) uses the demo's bundle.
    monkeypatch.chdir(tmp_path)
    assert find_latest_run().resolve() == (out / "run").resolve()


def _liver_with_tumour(folder: Path):
    """A writer of 10^3 label volumes: a liver cube with a tumour line of ``tumour`` along axis 0."""
    import nibabel as nib
    import numpy as np

    def save(name: str, tumour: slice) -> Path:
        arr = np.zeros((10, 10, 10), np.uint8)
        arr[1:9, 1:9, 1:9] = 1
        arr[tumour, 4, 4] = 2
        path = folder / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
        return path

    return save


def test_scores_give_the_per_case_mean_and_the_pooled_dice(tmp_path: Path) -> None:
    from volseg.demo import _score

    save = _liver_with_tumour(tmp_path)
    # Case a: 6 tumour voxels each side, 3 shared (Dice 0.5); case b: a 2-voxel lesion missed (Dice 0).
    cases = [
        ("liver", save("a_pred", slice(1, 7)), save("a_ref", slice(4, 10))),
        ("liver", save("b_pred", slice(0, 0)), save("b_ref", slice(2, 4))),
    ]
    mean, pooled, lesions, rows = _score(cases, {"liver": 1, "tumour": 2}, lambda s: None)
    assert mean["liver"]["tumour"] == 0.25
    assert pooled["liver"]["tumour"] == round(2 * 3 / (12 + 2), 4)
    assert rows[1]["tumour"] == 0.0 and sum(b["present"] for b in lesions.values()) == 2


def test_a_lesion_free_case_counts_only_when_the_prediction_holds_tumour(tmp_path: Path) -> None:
    from volseg.demo import _score

    save = _liver_with_tumour(tmp_path)
    # a: Dice 1; b: no lesion, a 2-voxel false positive (Dice 0, counted); c: no tumour on either side (not scored).
    cases = [
        ("liver", save("a_pred", slice(2, 6)), save("a_ref", slice(2, 6))),
        ("liver", save("b_pred", slice(2, 4)), save("b_ref", slice(0, 0))),
        ("liver", save("c_pred", slice(0, 0)), save("c_ref", slice(0, 0))),
    ]
    mean, _, _, rows = _score(cases, {"liver": 1, "tumour": 2}, lambda s: None)
    assert mean["liver"]["tumour"] == 0.5
    assert rows[1]["tumour"] == 0.0 and "tumour" not in rows[2]
    assert rows[1]["lesions"] == "0/0 found, 1 false positive(s)"


def test_the_demo_command_defaults_to_the_demos_case_counts() -> None:
    import inspect

    from volseg import cli
    from volseg.demo import N_TEST, N_TRAIN, run_demo

    command = inspect.signature(cli.demo).parameters
    function = inspect.signature(run_demo).parameters
    assert command["n_train"].default == function["n_train"].default == N_TRAIN == 40
    assert command["n_test"].default == function["n_test"].default == N_TEST == 15
