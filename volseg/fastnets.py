"""Inference builds of registry networks in plain PyTorch, for the fast engine.

Importing MONAI costs about 3.5 s on a 2-core machine (its package loads every submodule, Ignite and
``torch.distributed`` included), which is more than the fast engine's whole work on a 512 x 512 x 200 CT. For the
networks listed here volseg builds the same layers with ``torch.nn`` only, with MONAI's parameter names, so a
bundle's ``models/model.pt`` loads into them with ``strict=True`` and the outputs equal MONAI's to float rounding
(``tests/test_fastpath.py`` checks every supported variant against MONAI). Training, the bundle configs and every
network or option not covered here use MONAI's own classes: :func:`build_inference_network` returns None and the
caller builds the bundle's ``network_def``.

Covered: ``unet`` (MONAI ``UNet``) with integer or per-axis strides, integer kernel sizes, ``num_res_units`` >= 0,
``norm`` batch or instance (by name), ``act`` PReLU (by name), any ``dropout`` rate (a no-op in eval mode),
``bias`` and ``adn_ordering``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn


def _conv_cls(dims: int, transposed: bool) -> type[nn.Module]:
    if transposed:
        return {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]


def _norm(name: str, dims: int, channels: int) -> nn.Module:
    if name == "instance":
        return {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dims](channels)
    return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](channels)


class _Options:
    def __init__(self, dims: int, kernel: int, norm: str, dropout: float, bias: bool, ordering: str) -> None:
        self.dims, self.kernel, self.norm, self.dropout, self.bias, self.ordering = (
            dims, kernel, norm, dropout, bias, ordering,
        )  # fmt: skip


def _stride_tuple(stride: int | Sequence[int], dims: int) -> tuple[int, ...]:
    return (int(stride),) * dims if isinstance(stride, int) else tuple(int(s) for s in stride)


def _convolution(
    o: _Options, cin: int, cout: int, stride: Any, kernel: int, transposed: bool = False, conv_only: bool = False
) -> nn.Sequential:
    """A convolution ("conv") followed by norm / dropout / activation ("adn") in the given order."""
    block = nn.Sequential()
    pad = (kernel - 1) // 2
    strides = _stride_tuple(stride, o.dims)
    if transposed:
        conv = _conv_cls(o.dims, True)(
            cin, cout, kernel, stride=strides, padding=pad, output_padding=tuple(s - 1 for s in strides), bias=o.bias
        )
    else:
        conv = _conv_cls(o.dims, False)(cin, cout, kernel, stride=strides, padding=pad, bias=o.bias)
    block.add_module("conv", conv)
    if conv_only:
        return block
    adn = nn.Sequential()
    for item in o.ordering.upper():
        if item == "N":
            adn.add_module("N", _norm(o.norm, o.dims, cout))
        elif item == "D":
            adn.add_module("D", nn.Dropout(o.dropout))
        elif item == "A":
            adn.add_module("A", nn.PReLU())
    block.add_module("adn", adn)
    return block


class _Residual(nn.Module):
    """Convolution units plus a residual path (identity, or a convolution when the shape changes)."""

    def __init__(self, o: _Options, cin: int, cout: int, stride: Any, subunits: int, last_conv_only: bool) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        ch, st = cin, stride
        subunits = max(1, subunits)
        for i in range(subunits):
            self.conv.add_module(
                f"unit{i}", _convolution(o, ch, cout, st, o.kernel, conv_only=last_conv_only and i == subunits - 1)
            )
            ch, st = cout, 1
        self.residual: nn.Module = nn.Identity()
        strides = _stride_tuple(stride, o.dims)
        if int(np.prod(strides)) != 1 or cin != cout:
            k, pad = (o.kernel, (o.kernel - 1) // 2) if int(np.prod(strides)) != 1 else (1, 0)
            self.residual = _conv_cls(o.dims, False)(cin, cout, k, strides, pad, bias=o.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.residual(x)


class _Skip(nn.Module):
    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class UNetInference(nn.Module):
    """MONAI's residual ``UNet`` (down path, skip, up path, nested), same parameter names, for inference."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[Any],
        kernel_size: int = 3,
        up_kernel_size: int = 3,
        num_res_units: int = 0,
        norm: str = "instance",
        dropout: float = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
    ) -> None:
        super().__init__()
        o = _Options(spatial_dims, kernel_size, norm, dropout, bias, adn_ordering)

        def down(cin: int, cout: int, stride: Any) -> nn.Module:
            if num_res_units > 0:
                return _Residual(o, cin, cout, stride, num_res_units, last_conv_only=False)
            return _convolution(o, cin, cout, stride, kernel_size)

        def up(cin: int, cout: int, stride: Any, top: bool) -> nn.Module:
            last = top and not num_res_units  # the top up-convolution is the output layer
            conv = _convolution(o, cin, cout, stride, up_kernel_size, transposed=True, conv_only=last)
            if num_res_units > 0:
                return nn.Sequential(conv, _Residual(o, cout, cout, 1, 1, last_conv_only=top))
            return conv

        def block(cin: int, cout: int, chans: Sequence[int], strides_: Sequence[Any], top: bool) -> nn.Module:
            c, s = chans[0], strides_[0]
            if len(chans) > 2:
                sub, upc = block(c, c, chans[1:], strides_[1:], False), 2 * c
            else:
                sub, upc = down(c, chans[1], 1), c + chans[1]
            return nn.Sequential(down(cin, c, s), _Skip(sub), up(upc, cout, s, top))

        self.model = block(in_channels, out_channels, list(channels), list(strides), True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _unet(cfg: dict[str, Any]) -> nn.Module | None:
    a = {k: v for k, v in cfg.items() if k != "_target_"}
    norm = a.pop("norm", "instance")
    act = a.pop("act", "prelu")
    dropout = a.pop("dropout", 0.0)
    if not isinstance(norm, str) or norm.lower() not in ("instance", "batch"):
        return None
    if not isinstance(act, str) or act.lower() != "prelu":
        return None
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool):
        return None
    if not all(isinstance(a.get(k, 3), int) and a.get(k, 3) % 2 for k in ("kernel_size", "up_kernel_size")):
        return None  # MONAI's "same" padding needs odd kernels
    known = {"spatial_dims", "in_channels", "out_channels", "channels", "strides", "kernel_size", "up_kernel_size",
             "num_res_units", "bias", "adn_ordering"}  # fmt: skip
    if set(a) - known or len(a.get("channels", ())) < 2 or len(a.get("strides", ())) < len(a["channels"]) - 1:
        return None
    a["strides"] = list(a["strides"])[: len(a["channels"]) - 1]
    return UNetInference(norm=norm.lower(), dropout=float(dropout), **a)


_BUILDERS = {"monai.networks.nets.UNet": _unet}


def build_inference_network(cfg: dict[str, Any]) -> nn.Module | None:
    """The network of a bundle component (``network_def`` as :func:`volseg.nets.network_config` writes it) in
    plain PyTorch, untrained, in eval mode; None when the component is not covered here."""
    builder = _BUILDERS.get(str(cfg.get("_target_", "")))
    if builder is None:
        return None
    try:
        net = builder(cfg)
    except (TypeError, ValueError, KeyError):
        return None
    return None if net is None else net.eval()
