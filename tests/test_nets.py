"""Every registered network: forward and backward in 2D and 3D, state-dict round trip, TorchScript export."""

from __future__ import annotations

import io

import pytest
import torch

from volseg.nets import NETWORKS, create_network, export_torchscript

SMALL = {
    "unet": {"channels": [4, 8, 16], "strides": [2, 2]},
    "basic_unet": {"features": [4, 4, 8, 8, 16, 4]},
    "attention_unet": {"channels": [4, 8, 16], "strides": [2, 2]},
    "unet_plusplus": {"features": [4, 4, 8, 8, 16, 4]},
}
CASES = [(name, dims) for name in sorted(NETWORKS) for dims in (2, 3)]


def _last(out: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    return out[-1] if isinstance(out, (list, tuple)) else out


@pytest.mark.parametrize("name,dims", CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_forward_backward_and_state_round_trip(name: str, dims: int) -> None:
    torch.manual_seed(0)
    net = create_network(name, dims, 1, 3, SMALL[name])
    x = torch.rand(2, 1, *([32] * dims))
    y = torch.randint(0, 3, (2, *([32] * dims)))
    out = net(x)
    heads = out if isinstance(out, (list, tuple)) else [out]
    assert all(h.shape == (2, 3, *([32] * dims)) for h in heads)
    if NETWORKS[name].deep_supervision:
        assert len(heads) > 1
    loss = sum(torch.nn.functional.cross_entropy(h, y) for h in heads)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)

    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    other = create_network(name, dims, 1, 3, SMALL[name], for_inference=True)
    other.load_state_dict(torch.load(buf, weights_only=True))
    net.eval(), other.eval()
    with torch.no_grad():
        torch.testing.assert_close(_last(net(x)), other(x))


@pytest.mark.parametrize("name,dims", CASES, ids=[f"{n}-{d}d" for n, d in CASES])
def test_torchscript_export_matches_eager(name: str, dims: int) -> None:
    net = create_network(name, dims, 1, 2, SMALL[name], for_inference=True).eval()
    x = torch.rand(1, 1, *([32] * dims))
    ts = export_torchscript(net, x)
    buf = io.BytesIO()
    torch.jit.save(ts, buf)
    buf.seek(0)
    loaded = torch.jit.load(buf)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x))


def test_unknown_network_lists_known_names() -> None:
    with pytest.raises(KeyError, match="known: attention_unet, basic_unet, unet, unet_plusplus"):
        create_network("vnet")


def test_basic_unet_interpolation_upsampling() -> None:
    net = create_network("basic_unet", 2, 1, 2, {**SMALL["basic_unet"], "upsample": "nontrainable"})
    assert not any(isinstance(m, torch.nn.ConvTranspose2d) for m in net.modules())
    deconv = create_network("basic_unet", 2, 1, 2, SMALL["basic_unet"])
    assert any(isinstance(m, torch.nn.ConvTranspose2d) for m in deconv.modules())
