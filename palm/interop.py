"""Conversion between our PaLM and lucidrains' `palm_pytorch.PaLM` (PyPI palm-pytorch 0.2.2).

The peer is an `nn.Sequential`: [Embedding, Residual(ParallelTransformerBlock) x depth,
LayerNorm, Linear tied to the embedding]. Its blocks fuse the same input projection as ours,
row-wise [q | k | v | MLP value | MLP gate], and use the same "rotate half" RoPE, so conversion
is a renaming plus reading the shapes; the peer does not scale logits by 1/sqrt(d_model).
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from palm.config import ModelConfig
from palm.model import PaLM

_BLOCK_KEY = re.compile(r"^(\d+)\.fn\.")


def palm_pytorch_config(state_dict: dict[str, Tensor], max_seq_len: int = 2048) -> ModelConfig:
    """Read the model shape off a palm_pytorch.PaLM state dict."""
    try:
        vocab_size, d_model = state_dict["0.weight"].shape
        block_ids = sorted({int(m.group(1)) for k in state_dict if (m := _BLOCK_KEY.match(k))})
        fused_rows = state_dict["1.fn.fused_attn_ff_proj.weight"].shape[0]
        q_dim = state_dict["1.fn.attn_out.weight"].shape[1]
        ffn_hidden = state_dict["1.fn.ff_out.1.weight"].shape[1]
    except KeyError as missing:
        raise ValueError(f"not a palm_pytorch.PaLM state dict: key {missing} is missing") from None
    if block_ids != list(range(1, len(block_ids) + 1)):
        raise ValueError(f"not a palm_pytorch.PaLM state dict: block indices {block_ids}")
    # fused rows = q (H*Q) + k (Q) + v (Q) + 2 * ffn_hidden
    head_dim = (fused_rows - q_dim - 2 * ffn_hidden) // 2
    return ModelConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=len(block_ids),
        n_heads=q_dim // head_dim, head_dim=head_dim, ffn_mult=ffn_hidden / d_model,
        max_seq_len=max_seq_len, scale_logits=False,
    )


def from_palm_pytorch(state_dict: dict[str, Tensor], max_seq_len: int = 2048) -> PaLM:
    """Build our PaLM holding the weights of a palm_pytorch.PaLM state dict."""
    config = palm_pytorch_config(state_dict, max_seq_len)
    with torch.device("meta"):
        model = PaLM(config)
    ours = {"embedding.weight": state_dict["0.weight"]}
    for layer in range(config.n_layers):
        peer = f"{layer + 1}.fn."
        ours[f"blocks.{layer}.norm.weight"] = state_dict[peer + "norm.gamma"]
        ours[f"blocks.{layer}.in_proj.weight"] = state_dict[peer + "fused_attn_ff_proj.weight"]
        ours[f"blocks.{layer}.attn_out.weight"] = state_dict[peer + "attn_out.weight"]
        ours[f"blocks.{layer}.mlp_out.weight"] = state_dict[peer + "ff_out.1.weight"]
    ours["final_norm.weight"] = state_dict[f"{config.n_layers + 1}.gamma"]
    model.load_state_dict(ours, assign=True, strict=True)
    return model


def to_palm_pytorch(model: PaLM) -> dict[str, Tensor]:
    """A state dict that palm_pytorch.PaLM(dim, num_tokens, depth, dim_head, heads) loads."""
    c = model.config
    if not (c.parallel_block and c.multi_query and c.activation == "swiglu" and c.tie_embeddings):
        raise ValueError("palm_pytorch only has the PaLM architecture: parallel block, "
                         "multi-query, SwiGLU, tied embeddings")
    if c.scale_logits:
        raise ValueError("palm_pytorch does not scale logits by 1/sqrt(d_model); "
                         "this model's outputs would differ (config.scale_logits is True)")
    state = model.state_dict()
    out = {"0.weight": state["embedding.weight"]}
    for layer in range(c.n_layers):
        peer = f"{layer + 1}.fn."
        out[peer + "norm.gamma"] = state[f"blocks.{layer}.norm.weight"]
        out[peer + "norm.beta"] = torch.zeros_like(state[f"blocks.{layer}.norm.weight"])
        out[peer + "fused_attn_ff_proj.weight"] = state[f"blocks.{layer}.in_proj.weight"]
        out[peer + "attn_out.weight"] = state[f"blocks.{layer}.attn_out.weight"]
        out[peer + "ff_out.1.weight"] = state[f"blocks.{layer}.mlp_out.weight"]
        out[peer + "rotary_emb.inv_freq"] = 1.0 / (
            10000 ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim)
        )
    out[f"{c.n_layers + 1}.gamma"] = state["final_norm.weight"]
    out[f"{c.n_layers + 1}.beta"] = torch.zeros_like(state["final_norm.weight"])
    out[f"{c.n_layers + 2}.weight"] = state["embedding.weight"]
    return out
