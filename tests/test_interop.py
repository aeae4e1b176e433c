"""Equivalence with a peer: lucidrains' palm_pytorch.PaLM (PyPI palm-pytorch==0.2.2)."""

from __future__ import annotations

import pytest
import torch

from palm.interop import from_palm_pytorch, palm_pytorch_config, to_palm_pytorch

palm_pytorch = pytest.importorskip("palm_pytorch", reason="pip install palm-pytorch==0.2.2")

CONFIGS = [
    dict(dim=64, num_tokens=101, depth=2, dim_head=16, heads=4),  # heads*dim_head == dim
    dict(dim=48, num_tokens=77, depth=3, dim_head=32, heads=3),  # 96 != 48, as PaLM 540B
    dict(dim=32, num_tokens=50, depth=1, dim_head=8, heads=2, ff_mult=2),
]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_converted_peer_gives_the_same_logits(kwargs):
    torch.manual_seed(0)
    peer = palm_pytorch.PaLM(**kwargs).eval()
    # Random weights everywhere, not just the peer's init (its LayerNorm gains start at 1).
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0, 0.5)
    ours = from_palm_pytorch(peer.state_dict()).eval()
    c = ours.config
    assert (c.d_model, c.n_layers, c.n_heads, c.head_dim) == (
        kwargs["dim"],
        kwargs["depth"],
        kwargs["heads"],
        kwargs["dim_head"],
    )
    tokens = torch.randint(0, kwargs["num_tokens"], (2, 33))
    with torch.no_grad():
        diff = (ours(tokens) - peer(tokens)).abs().max().item()
    assert diff <= 1e-5


def test_export_round_trip_loads_into_the_peer():
    torch.manual_seed(1)
    peer = palm_pytorch.PaLM(dim=48, num_tokens=60, depth=2, dim_head=32, heads=3).eval()
    ours = from_palm_pytorch(peer.state_dict())
    fresh = palm_pytorch.PaLM(dim=48, num_tokens=60, depth=2, dim_head=32, heads=3).eval()
    fresh.load_state_dict(to_palm_pytorch(ours), strict=True)
    tokens = torch.randint(0, 60, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), peer(tokens), atol=0, rtol=0)


def test_not_a_peer_state_dict_is_a_clear_error():
    with pytest.raises(ValueError, match="not a palm_pytorch.PaLM state dict"):
        palm_pytorch_config({"embedding.weight": torch.zeros(3, 4)})
