"""Network registry: a name and a recipe's arguments give a MONAI network for 2D or 3D.

Every entry is described by a MONAI bundle component (``{"_target_": ..., **args}``). The same description is
instantiated for training here and written into the bundle's ``network_def``, so a network is defined once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class NetworkSpec:
    """How one registered network is described and built."""

    target: str
    defaults: dict[str, Any]
    depth: Callable[[dict[str, Any]], int]
    deep_supervision: bool = False
    infer_target: str | None = None
    """A different target for inference (a wrapper from the bundle's scripts/), if the training one differs."""
    needs_scripts: bool = False
    doc: str = ""


def _strides_depth(args: dict[str, Any], default: int) -> int:
    strides = args.get("strides")
    if strides is None:
        return default
    return sum(1 for s in strides if (s if isinstance(s, int) else max(s)) > 1)


NETWORKS: dict[str, NetworkSpec] = {
    "unet": NetworkSpec(
        target="monai.networks.nets.UNet",
        defaults={
            "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2],
            "num_res_units": 2,
            "norm": "batch",
        },
        depth=lambda a: _strides_depth(a, 4),
        doc="MONAI's residual U-Net",
    ),
    "basic_unet": NetworkSpec(
        target="monai.networks.nets.BasicUNet",
        defaults={"features": [32, 32, 64, 128, 256, 32], "upsample": "deconv"},
        depth=lambda a: 4,
        doc="the classic U-Net (two convolutions per level); upsample 'deconv' or 'nontrainable' (interpolation)",
    ),
    "attention_unet": NetworkSpec(
        target="monai.networks.nets.AttentionUnet",
        defaults={"channels": [16, 32, 64, 128], "strides": [2, 2, 2]},
        depth=lambda a: _strides_depth(a, 3),
        doc="Attention U-Net (Oktay et al. 2018)",
    ),
    "unet_plusplus": NetworkSpec(
        target="monai.networks.nets.BasicUNetPlusPlus",
        defaults={"features": [32, 32, 64, 128, 256, 32], "upsample": "deconv", "deep_supervision": True},
        depth=lambda a: 4,
        deep_supervision=True,
        infer_target="scripts.nets.UNetPlusPlusLastHead",
        needs_scripts=True,
        doc="UNet++ (Zhou et al. 2018) with deep supervision; inference reads the last head",
    ),
}


def _spec(name: str) -> NetworkSpec:
    try:
        return NETWORKS[name]
    except KeyError:
        raise KeyError(f"unknown network '{name}'; known: {', '.join(sorted(NETWORKS))}") from None


def network_config(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    args: dict[str, Any] | None = None,
    *,
    for_inference: bool = False,
) -> dict[str, Any]:
    """The bundle component describing a network.

    Args:
        name: a key of :data:`NETWORKS`.
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: number of classes, background included.
        args: the recipe's ``model.args``, overriding the defaults.
        for_inference: use the inference target (for example UNet++'s last-head wrapper).
    """
    spec = _spec(name)
    target = spec.infer_target if (for_inference and spec.infer_target) else spec.target
    cfg: dict[str, Any] = {
        "_target_": target,
        "spatial_dims": spatial_dims,
        "in_channels": in_channels,
        "out_channels": out_channels,
    }
    cfg.update(spec.defaults)
    cfg.update(args or {})
    return cfg


def _locate(target: str) -> Callable[..., torch.nn.Module]:
    if target.startswith("scripts."):
        target = "volseg.bundle_scripts." + target.removeprefix("scripts.")
    module_name, _, attr = target.rpartition(".")
    import importlib

    return getattr(importlib.import_module(module_name), attr)


def build_network(cfg: dict[str, Any]) -> torch.nn.Module:
    """Instantiate a component made by :func:`network_config`."""
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    return _locate(cfg["_target_"])(**kwargs)


def create_network(
    name: str,
    spatial_dims: int = 3,
    in_channels: int = 1,
    out_channels: int = 2,
    args: dict[str, Any] | None = None,
    *,
    for_inference: bool = False,
) -> torch.nn.Module:
    """Build a registered network (see :func:`network_config` for the arguments).

    Raises:
        KeyError: the name is unknown; the message lists the known names.
    """
    return build_network(
        network_config(name, spatial_dims, in_channels, out_channels, args, for_inference=for_inference)
    )


def export_torchscript(net: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """TorchScript for a bundle's model.ts: scripted where possible, traced otherwise."""
    net = net.eval()
    try:
        return torch.jit.script(net)
    except Exception:  # noqa: BLE001 - scripting fails for some MONAI blocks; tracing is the documented fallback
        with torch.no_grad():
            return torch.jit.trace(net, example)
