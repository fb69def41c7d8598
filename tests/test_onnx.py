"""ONNX: `volseg export-onnx` writes a checked models/model.onnx; `--engine onnx` gives the fast engine's labels.

Tolerances: onnxruntime's float32 logits differ from torch's float32 logits by at most 1e-3 (measured: about
1e-6 on these random networks); the labels of `volseg infer --engine onnx` and `volseg infer --precision fp32`
are identical in at least 99.99 % of the voxels and agree at Dice >= 0.999 per label (they differ only where two
classes tie to float rounding). The networks have random weights, whose logits are small (|logit| < 1), so ties
are more common than with a trained model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import assert_agreement, save_nifti, write_random_bundle

from volseg.cli import main
from volseg.data.synth import liver_ct_phantom
from volseg.errors import UserError
from volseg.infer import Predictor

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from volseg import onnx_engine  # noqa: E402

LABELS = {"liver": 1, "tumour": 2}

pytestmark = pytest.mark.slow  # each export traces the network (10-30 s on 2 cores)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bundle = write_random_bundle(tmp_path_factory.mktemp("onnx") / "tiny", seed=3)
    assert main(["export-onnx", str(bundle)]) == 0
    return bundle


def test_export_is_checked_and_has_dynamic_axes(exported: Path) -> None:
    model = onnx.load(str(exported / "models" / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "x", "y", "z"]
    props = {p.key: p.value for p in model.metadata_props}
    assert props["volseg_weights_sha256"] == onnx_engine.weights_digest(exported)
    assert props["volseg_exporter"] == "dynamo"
    assert not list((exported / "models").glob(".tmp-*")), "temporary file left behind"


def test_onnxruntime_logits_equal_torch_in_float32(exported: Path) -> None:
    torch_net = Predictor.from_bundle(exported, "cpu", precision="fp32").network
    ort_net = Predictor.from_bundle(exported, "cpu", engine="onnx").network
    assert isinstance(ort_net, onnx_engine.OnnxNetwork)
    gen = torch.Generator().manual_seed(1)
    for shape in [(1, 1, 16, 16, 16), (3, 1, 32, 16, 24), (2, 1, 48, 32, 16)]:
        x = torch.rand(shape, generator=gen) * 2 - 0.5
        with torch.inference_mode():
            ref = torch_net(x)
            got = ort_net(x)
        assert got.shape == ref.shape and got.dtype == torch.float32
        assert float(ref.abs().max()) > 0.01  # the network computes something
        assert float((got - ref).abs().max()) < 1e-3


def test_infer_engine_onnx_equals_the_fast_engine_in_float32(exported: Path, tmp_path: Path) -> None:
    ph = liver_ct_phantom(31, shape=(48, 44, 28), axcodes="LPS")
    scan = save_nifti(tmp_path / "scan.nii.gz", ph.image, ph.affine)
    base = ["infer", str(scan), "--bundle", str(exported), "--device", "cpu"]
    assert main([*base, "-o", str(tmp_path / "fast"), "--precision", "fp32"]) == 0
    assert main([*base, "-o", str(tmp_path / "onnx"), "--engine", "onnx"]) == 0
    a: nib.Nifti1Image = nib.load(str(tmp_path / "onnx" / "scan_seg.nii.gz"))  # type: ignore[assignment]
    b: nib.Nifti1Image = nib.load(str(tmp_path / "fast" / "scan_seg.nii.gz"))  # type: ignore[assignment]
    assert a.shape == ph.image.shape
    np.testing.assert_allclose(a.affine, ph.affine, atol=1e-4)
    la, lb = np.asarray(a.dataobj), np.asarray(b.dataobj)
    assert_agreement(la, lb, LABELS, min_dice=0.999, min_voxels=20)  # both hold every label, then agree
    assert np.mean(la == lb) >= 0.9999


def test_missing_stale_or_bf16_onnx_is_one_line(exported: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "copy"
    shutil.copytree(exported, bundle)
    with pytest.raises(UserError, match="bf16|float32"):
        Predictor.from_bundle(bundle, "cpu", engine="onnx", precision="bf16")
    # Retrained after the export: the ONNX file no longer holds the bundle's weights.
    write_random_bundle(bundle, seed=4)
    with pytest.raises(UserError, match="not exported from this bundle's models/model.pt") as info:
        Predictor.from_bundle(bundle, "cpu", engine="onnx")
    assert "volseg export-onnx" in str(info.value) and "\n" not in str(info.value)
    (bundle / "models" / "model.onnx").unlink()
    with pytest.raises(UserError, match=r"run `volseg export-onnx .*` first"):
        Predictor.from_bundle(bundle, "cpu", engine="onnx")


def test_torchscript_exporter_when_dynamo_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = write_random_bundle(tmp_path / "tiny", seed=5)

    def broken(*args: object) -> None:
        raise RuntimeError("no dynamo here")

    monkeypatch.setattr(onnx_engine, "_export_dynamo", broken)
    result = onnx_engine.export_onnx(bundle)
    assert result.exporter == "torchscript"
    assert result.max_abs_diff < 1e-3 and result.max_abs_logit > 0.01
    model = onnx.load(str(result.path))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 1, "x", "y", "z"]
    assert Predictor.from_bundle(bundle, "cpu", engine="onnx").fast is not None
