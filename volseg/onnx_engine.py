"""ONNX export of a bundle's network and an onnxruntime network for the fast engine (``--engine onnx``).

``volseg export-onnx BUNDLE`` writes ``models/model.onnx`` (MONAI's bundle convention for an ONNX model), the
network the fast engine builds (:func:`volseg.infer.recipe_network`: the recipe's network with the
bundle's weights), exported with ``torch.onnx.export`` with a dynamic batch axis and dynamic spatial axes. The
``torch.export`` (dynamo) exporter is tried first, the TorchScript exporter when it fails; the result is checked
with ``onnx.checker`` and compared with torch on two inputs of different shapes before it is renamed into place.
The file records the SHA-256 of the ``models/model.pt`` it was exported from, so that a model retrained after the
export is not run with the old ONNX weights.

:class:`OnnxNetwork` is a ``torch.nn.Module`` whose forward runs the ONNX model with onnxruntime (CUDA when the
device is a GPU and onnxruntime has the CUDA provider, else the CPU), so the fast engine's whole pipeline
(reading, resampling, sliding window, back to the input grid, writing) is shared with the torch engine and only
the network differs. It computes in float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from volseg.errors import UserError, one_line

ONNX_FILE = Path("models") / "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "logits"
DEFAULT_OPSET = 18
#: The export's own check: onnxruntime's logits against torch's, max |difference| <= TOLERANCE * max(1, max |logit|).
TOLERANCE = 1e-3
_WEIGHTS_KEY = "volseg_weights_sha256"


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how it checked it."""

    path: Path
    exporter: str  # "dynamo" (torch.export) or "torchscript"
    opset: int
    max_abs_diff: float  # onnxruntime vs torch logits over the check inputs
    max_abs_logit: float
    seconds: float


def weights_digest(bundle_dir: Path) -> str:
    """SHA-256 of the bundle's ``models/model.pt``."""
    h = hashlib.sha256()
    with (bundle_dir / "models" / "model.pt").open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _spatial_axes(dims: int) -> dict[int, str]:
    return {0: "batch", **{2 + i: "xyz"[i] for i in range(dims)}}


def _export_dynamo(net: torch.nn.Module, example: torch.Tensor, opset: int) -> Any:
    shapes = ({axis: torch.export.Dim(name) for axis, name in _spatial_axes(example.ndim - 2).items()},)
    program = torch.onnx.export(
        net, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
        dynamo=True, dynamic_shapes=shapes, verbose=False, optimize=True,
    )  # fmt: skip
    assert program is not None  # no file given: the program is returned
    return program.model_proto


def _export_torchscript(net: torch.nn.Module, example: torch.Tensor, opset: int) -> Any:
    import onnx

    axes = _spatial_axes(example.ndim - 2)
    with tempfile.TemporaryDirectory(prefix="volseg-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        torch.onnx.export(
            net, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
            dynamo=False, dynamic_axes={INPUT_NAME: axes, OUTPUT_NAME: axes},
        )  # fmt: skip
        return onnx.load(str(path))


def export_onnx(
    bundle_dir: str | Path, opset: int = DEFAULT_OPSET, echo: Callable[[str], None] | None = None
) -> ExportResult:
    """Export the network of a 3D volseg bundle to ``BUNDLE/models/model.onnx`` (written atomically).

    Args:
        bundle_dir: a bundle the fast engine runs (a 3D volseg bundle with ``configs/volseg_recipe.yaml``).
        opset: the ONNX opset (18 by default; onnxruntime 1.17 and later run it).
        echo: where to print progress lines (none by default).

    Raises:
        UserError: not a bundle, no weights, or a bundle the fast engine does not run.
        RuntimeError: neither exporter produced a model whose outputs match torch's.
    """
    import onnx

    from volseg.fileio import atomic_path
    from volseg.infer import Predictor

    t0 = time.perf_counter()
    bundle = Path(bundle_dir).resolve()
    predictor = Predictor.from_bundle(bundle, device="cpu", engine="fast", precision="fp32")
    if predictor.fast is None or predictor.network is None:
        raise UserError("ONNX export covers 3D volseg bundles (those the fast engine runs)", bundle)
    recipe = predictor.fast.recipe
    net = predictor.network.float().eval()
    gen = torch.Generator().manual_seed(0)
    roi = tuple(int(r) for r in recipe.roi_size)
    channels = int(recipe.model.in_channels)
    example = torch.rand((1, channels, *roi), generator=gen)
    # A second shape, batch and spatial axes changed, shows that the axes are dynamic in the exported graph.
    other = torch.rand((2, channels, roi[0] * 2, *roi[1:]), generator=gen)
    failures: list[str] = []
    for exporter, fn in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
        try:
            with _quiet_exporters():
                proto = fn(net, example, opset)
            onnx.checker.check_model(proto, full_check=True)
            diff, peak = _compare(proto, net, [example, other])
        except Exception as exc:  # noqa: BLE001 - each exporter may fail on some network; the next is tried
            failures.append(f"{exporter}: {exc.__class__.__name__}: {one_line(exc)}")
            continue
        if diff > TOLERANCE * max(1.0, peak):
            failures.append(f"{exporter}: onnxruntime differs from torch by {diff:.3g} (largest logit {peak:.3g})")
            continue
        meta = {
            _WEIGHTS_KEY: weights_digest(bundle),
            "volseg_recipe": recipe.name,
            "volseg_exporter": exporter,
            "volseg_version": predictor.algorithm.get("version", ""),
        }
        onnx.helper.set_model_props(proto, meta)
        path = bundle / ONNX_FILE
        with atomic_path(path) as tmp:
            onnx.save_model(proto, str(tmp))
        return ExportResult(path, exporter, opset, diff, peak, time.perf_counter() - t0)
    raise RuntimeError("ONNX export failed: " + "; ".join(failures))


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence the exporters' deprecation notes and log lines (torchvision absent, training-mode notes)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _compare(proto: Any, net: torch.nn.Module, inputs: list[torch.Tensor]) -> tuple[float, float]:
    """Max |onnxruntime - torch| over the inputs, and the largest |logit|."""
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    diff = peak = 0.0
    for x in inputs:
        with torch.inference_mode():
            ref = net(x)
        ref = (ref[-1] if isinstance(ref, (list, tuple)) else ref).float().numpy()
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"onnxruntime output shape {got.shape} differs from torch's {ref.shape}")
        diff = max(diff, float(np.abs(got - ref).max()))
        peak = max(peak, float(np.abs(ref).max()))
    return diff, peak


class OnnxNetwork(torch.nn.Module):
    """An ONNX model run by onnxruntime, called like the torch network: (B, C, *spatial) -> logits (B, K, ...).

    Inputs are computed in float32 wherever they come from; the logits come back on the input's device.

    Args:
        path: the ``.onnx`` file.
        device: CUDA devices use onnxruntime's CUDA provider when it is installed (then the CPU), others the CPU.
        threads: onnxruntime's intra-op threads (default: torch's thread count).
    """

    def __init__(self, path: str | Path, device: torch.device, threads: int | None = None) -> None:
        super().__init__()
        import onnxruntime as ort

        providers: list[Any] = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or torch.get_num_threads()
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        self.providers = list(self.session.get_providers())
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.session.run(None, {self.input_name: arr})[0]
        return torch.from_numpy(out).to(x.device)


def load_onnx_network(
    bundle_dir: Path, device: torch.device, precision: str | None = None, notes: list[str] | None = None
) -> OnnxNetwork:
    """The bundle's ``models/model.onnx`` as an :class:`OnnxNetwork`, checked to come from ``models/model.pt``.

    Raises:
        UserError: no ``models/model.onnx`` (run ``volseg export-onnx``), one exported from other weights, one
            that onnxruntime cannot load, or ``--precision bf16`` (the ONNX engine computes in float32).
    """
    import onnx

    if precision == "bf16":
        raise UserError("the onnx engine computes in float32; use --precision fp32 or auto", "--precision")
    path = bundle_dir / ONNX_FILE
    if not path.is_file():
        raise UserError(f"no {ONNX_FILE}: run `volseg export-onnx {bundle_dir}` first", bundle_dir)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file is the user's to replace
        raise UserError(f"cannot read {ONNX_FILE} ({exc.__class__.__name__}); export it again", bundle_dir) from None
    props = {p.key: p.value for p in model.metadata_props}
    if props.get(_WEIGHTS_KEY) != weights_digest(bundle_dir):
        raise UserError(
            f"{ONNX_FILE} was not exported from this bundle's models/model.pt; run `volseg export-onnx {bundle_dir}`",
            bundle_dir,
        )
    del model
    try:
        net = OnnxNetwork(path, device)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own message, as one line
        raise UserError(f"onnxruntime cannot load {ONNX_FILE} ({one_line(exc)})", bundle_dir) from None
    if device.type == "cuda" and net.providers[0] != "CUDAExecutionProvider" and notes is not None:
        notes.append("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu): the network runs on the CPU")
    return net
