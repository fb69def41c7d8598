"""Inference engines as peers behind one interface.

An engine segments one image read by :func:`volseg.imageio.read_image`:

* ``supports(recipe) -> str | None``: why it cannot run a recipe, in words, or None when it can;
* ``segment(image, probabilities=False) -> Segmentation``: labels (and probabilities when asked) on the input's
  exact grid, and the notes about this input.

Two engines compute the same segmentation. :class:`volseg.fastpath.FastEngine` (``fast``, and ``onnx`` with the
ONNX network) builds the recipe's network itself and evaluates no bundle config; :class:`MonaiEngine` (``monai``)
runs the bundle's own MONAI components from ``configs/inference.json`` (preprocessing, network, inferer,
postprocessing up to the writer), as ``python -m monai.bundle run`` does, once :func:`volseg.trust.check_bundle`
has found them exactly volseg's for the bundle's recipe. :class:`volseg.infer.Predictor` picks the first engine
whose ``supports()`` accepts the recipe, so a recipe the fast engine cannot run falls back to the MONAI chain.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from volseg.errors import UserError, one_line

if TYPE_CHECKING:
    import torch

    from volseg.imageio import Image

__all__ = ["Engine", "MonaiEngine", "Segmentation"]


@dataclass
class Segmentation:
    """What an engine computed for one image, on its input grid.

    Attributes:
        labels: uint8, the input array's spatial layout.
        probabilities: (classes, *spatial) float32, when asked for.
        notes: one line per thing the user should know about this input (non-finite voxels replaced).
        affine: the labels' voxel-to-RAS affine when the engine read the input itself (the bundle's own 2D loader),
            else None: the input image's.
    """

    labels: np.ndarray
    probabilities: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)
    affine: np.ndarray | None = None


class Engine(Protocol):
    """The interface every inference engine has."""

    name: str

    def supports(self, recipe: Any) -> str | None: ...

    def segment(self, image: Image, probabilities: bool = False) -> Segmentation: ...


class MonaiEngine:
    """The bundle's own MONAI chain (preprocessing, inferer, postprocessing up to the writer) around a network.

    The input is what :func:`volseg.imageio.read_image` read, given to the chain after its loader; 2D recipes (and
    2D pictures) keep the bundle's loader (``LoadImaged`` with Pillow and the recipe's channel conversion).

    Args:
        bundle_dir: the bundle.
        configs: the bundle's configs as :func:`volseg.trust.check_bundle` compared them (None with ``trust``: the
            files are read as they are).
        device: where to compute.
        recipe: the bundle's volseg recipe, or None for another bundle.
        network: the network to run (e.g. a fold ensemble built by volseg); None: the bundle's ``network_def`` with
            ``models/model.pt``.
    """

    def __init__(
        self,
        bundle_dir: Path,
        configs: dict[str, Any] | None,
        device: torch.device,
        recipe: Any = None,
        network: Any = None,
    ) -> None:
        self.name = "monai"
        self.bundle_dir = Path(bundle_dir)
        self.device = device
        self.recipe = recipe
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        if configs is not None:
            parser.read_config(json.loads(json.dumps(configs["configs/inference.json"])))
        else:
            parser.read_config(str(self.bundle_dir / "configs" / "inference.json"))
        parser["bundle_root"] = str(self.bundle_dir)
        parser["device"] = f"$torch.device('{device}')"
        if (self.bundle_dir / "scripts").is_dir() and str(self.bundle_dir) not in sys.path:
            sys.path.insert(0, str(self.bundle_dir))
        # Everything up to the writer: volseg writes the output itself, on the input's grid.
        post = parser["postprocessing"]["transforms"]
        parser["postprocessing"]["transforms"] = [t for t in post if t.get("_target_") != "SaveImaged"]
        self.preprocessing = parser.get_parsed_content("preprocessing")
        self.postprocessing = parser.get_parsed_content("postprocessing")
        self.inferer = parser.get_parsed_content("inferer")
        if network is None:
            from volseg.trust import safe_torch_load

            network = parser.get_parsed_content("network_def")
            state = safe_torch_load(self.bundle_dir / "models" / "model.pt")
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]
            network.load_state_dict(state)
            network = network.to(device).eval()
        self.network = network

    @staticmethod
    def supports(recipe: Any) -> str | None:
        """The bundle's chain runs any recipe (and bundles without one)."""
        return None

    def loads(self, path: Path) -> bool:
        """Whether the bundle's own loader reads this input (2D recipes and 2D pictures) instead of read_image."""
        from volseg.imageio import PICTURE_SUFFIXES

        if self.recipe is not None and self.recipe.model.spatial_dims == 2:
            return True
        return path.is_file() and path.name.lower().endswith(PICTURE_SUFFIXES)

    def _preprocess(self, source: Image | Path) -> tuple[dict[str, Any], list[str]]:
        """The preprocessed data dict and the notes: from the image read by volseg, after the chain's loader; or
        from the file by the bundle's loader."""
        from monai.transforms import Compose, CopyItemsd, DeleteItemsd, LoadImaged

        from volseg.monai_compat import preprocess

        steps = list(self.preprocessing.transforms)
        loader = next((i for i, t in enumerate(steps) if isinstance(t, LoadImaged)), None)
        # Before its loader a volseg chain only moves MONAI Label's image_path key aside (STASH_IMAGE_PATH).
        own_start = loader is not None and all(isinstance(t, (CopyItemsd, DeleteItemsd)) for t in steps[:loader])
        if not isinstance(source, Path) and not own_start and source.path.is_file():
            # A chain that does something before (or instead of) loading, e.g. a trusted bundle from elsewhere:
            # run it whole, from the file, as `monai.bundle run` would.
            source = source.path
        if isinstance(source, Path):
            try:
                data, note = preprocess(self.preprocessing, {"image": str(source)}, source)
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - reader errors become one line naming the file
                raise UserError(f"cannot read image ({_reason(exc)})", source) from None
            return data, [note] if note else []
        import torch
        from monai.data import MetaTensor

        arr = source.array
        image = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)),
            affine=torch.as_tensor(source.affine, dtype=torch.float64),
            meta={
                "original_channel_dim": "no_channel" if arr.ndim == 3 else -1,
                "filename_or_obj": str(source.path),
                "space": "RAS",
            },
        )
        first = next((i + 1 for i, t in enumerate(steps) if isinstance(t, LoadImaged)), 0)
        keys = ("map_items", "unpack_items", "log_stats", "lazy", "overrides")
        options = {k: getattr(self.preprocessing, k) for k in keys}
        data, note = preprocess(Compose(steps[first:], **options), {"image": image}, source.path)
        return data, [note] if note else []

    def segment(self, image: Image | Path, probabilities: bool = False) -> Segmentation:
        """Labels on the input grid (the chain's ``Invertd`` undoes its preprocessing), and probabilities when
        asked. ``image`` is what read_image read, or the path of an input the bundle's loader reads
        (:meth:`loads`)."""
        import torch
        from monai.transforms import Invertd

        from volseg.fastpath import mirrored

        data, notes = self._preprocess(image)
        flips = self.recipe.infer.tta_flips if self.recipe is not None else ()
        if type(self.inferer).__name__ == "MirroredInferer":
            flips = ()  # the chain mirrors itself (scripts/inferers.py); older bundles' chains do not
        with torch.inference_mode():
            logits = self.inferer(data["image"].unsqueeze(0).to(self.device), mirrored(self.network, flips))
        data["pred"] = logits[0].cpu() if isinstance(logits, torch.Tensor) else logits[-1][0].cpu()
        probs = None
        for t in self.postprocessing.transforms:
            data = t(data)
            if probabilities and isinstance(t, Invertd):
                probs = np.asarray(data["pred"].detach().cpu().numpy(), dtype=np.float32)
                # Outside the foreground crop the inverse pads zeros: that is background.
                probs[0] += np.clip(1.0 - probs.sum(axis=0), 0.0, 1.0)
        pred = data["pred"]
        labels = np.asarray(pred.detach().cpu().numpy())[0].astype(np.uint8)
        affine = None
        if isinstance(image, Path):
            affine = np.asarray(pred.affine.cpu().numpy() if hasattr(pred, "affine") else np.eye(4), dtype=np.float64)
        return Segmentation(labels, probs, notes, affine)


def _reason(exc: BaseException) -> str:
    """The innermost cause of a (MONAI-wrapped) reader error, as one short line."""
    seen = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    for inner in reversed(seen):
        line = one_line(inner)
        if str(inner).strip() and not line.startswith("applying transform"):
            return f"{inner.__class__.__name__}: {line}"[:200]
    return seen[-1].__class__.__name__
