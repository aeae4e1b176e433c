"""Conversion between our PaLM and lucidrains' peers: `palm_pytorch.PaLM` (PyPI palm-pytorch 0.2.2)
and `palm_rlhf_pytorch.PaLM` (PyPI palm-rlhf-pytorch 0.2.1; format described below).

palm_pytorch is an `nn.Sequential`: [Embedding, Residual(ParallelTransformerBlock) x depth,
LayerNorm, Linear tied to the embedding]. Its blocks fuse the same input projection as ours,
row-wise [q | k | v | MLP value | MLP gate], and use the same "rotate half" RoPE, so conversion
is a renaming plus reading the shapes; the peer does not scale logits by 1/sqrt(d_model).

Hugging Face transformers' CohereForCausalLM, PaLM's block under other names, lives in palm.hf;
`from_hf` (a folder or a loaded model) and `to_hf_state_dict` are re-exported here.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from palm.config import ModelConfig
from palm.errors import ConversionError
from palm.hf import from_hf, to_hf_state_dict
from palm.model import PaLM

__all__ = [
    "convert_state_dict",
    "from_hf",
    "from_palm_pytorch",
    "from_palm_rlhf_pytorch",
    "to_hf_state_dict",
    "to_palm_pytorch",
    "to_palm_rlhf_pytorch",
]

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
        raise ConversionError(
            f"not a palm_pytorch.PaLM state dict: key {missing} is missing"
        ) from None
    if block_ids != list(range(1, len(block_ids) + 1)):
        raise ConversionError(f"not a palm_pytorch.PaLM state dict: block indices {block_ids}")
    # fused rows = q (H*Q) + k (Q) + v (Q) + 2 * ffn_hidden
    head_dim = (fused_rows - q_dim - 2 * ffn_hidden) // 2
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=len(block_ids),
        n_heads=q_dim // head_dim,
        head_dim=head_dim,
        ffn_mult=ffn_hidden / d_model,
        max_seq_len=max_seq_len,
        scale_logits=False,
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
        raise ConversionError(
            "palm_pytorch only has the PaLM architecture: parallel block, "
            "multi-query, SwiGLU, tied embeddings"
        )
    if c.scale_logits:
        raise ConversionError(
            "palm_pytorch does not scale logits by 1/sqrt(d_model); "
            "this model's outputs would differ (config.scale_logits is True)"
        )
    if c.xpos_scale_base or not c.final_norm:
        raise ConversionError(
            "palm_pytorch has plain RoPE and a final LayerNorm; this model uses "
            "xPos or no final norm (export it to palm-rlhf-pytorch instead)"
        )
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


# ---------------------------------------------------------------------------------------------
# lucidrains' palm_rlhf_pytorch.PaLM (PyPI palm-rlhf-pytorch), the format of conceptofmind's
# published checkpoints. Keys: token_emb, layers.N.fn.{norm.gamma, norm.beta (zeros buffer),
# rotary_emb.inv_freq, rotary_emb.scale (xPos zeta), fused_attn_ff_proj, attn_out, ff_out.2},
# norm.{gamma, beta}, to_logits (tied). Same fused rows and rotate-half RoPE as ours, plus xPos
# (scale base 512 unless the constructor said otherwise; not stored in the state dict).
# Releases <= 0.2.3 store LayerNorm gains as is; from 0.2.4 (Dec 2024) as gain - 1.
# ---------------------------------------------------------------------------------------------

_RLHF_BLOCK = re.compile(r"^layers\.(\d+)\.fn\.")
RLHF_GAIN_OFFSET_FROM = (0, 2, 4)  # palm-rlhf-pytorch versions storing gamma as gain - 1


def _gain_offset(peer_version: str) -> float:
    parts = tuple(int(p) for p in re.findall(r"\d+", peer_version)[:3])
    return 1.0 if parts >= RLHF_GAIN_OFFSET_FROM else 0.0


def strip_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop DDP's `module.` and torch.compile's `_orig_mod.`: same weights, other names."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}


def palm_rlhf_pytorch_config(
    state_dict: dict[str, Tensor],
    max_seq_len: int = 8192,
    xpos_scale_base: float = 512.0,
    final_norm: bool = True,
) -> ModelConfig:
    """Read the model shape off a palm_rlhf_pytorch.PaLM state dict (qk_rmsnorm=False only)."""
    sd = state_dict
    try:
        vocab_size, d_model = sd["token_emb.weight"].shape
        fused_rows = sd["layers.0.fn.fused_attn_ff_proj.weight"].shape[0]
        q_dim = sd["layers.0.fn.attn_out.weight"].shape[1]
        ffn_hidden = sd["layers.0.fn.ff_out.2.weight"].shape[1]
        half = sd["layers.0.fn.rotary_emb.inv_freq"].shape[0]
    except KeyError as missing:
        raise ConversionError(
            f"not a palm_rlhf_pytorch.PaLM state dict: key {missing} is missing"
        ) from None
    if any(".q_scale" in k or ".k_scale" in k for k in sd):
        raise ConversionError(
            "palm_rlhf_pytorch state dict trained with qk_rmsnorm=True: not "
            "supported (the published checkpoints use qk_rmsnorm=False)"
        )
    if any(k.startswith("finetune_modules.") for k in sd):
        raise ConversionError(
            "palm_rlhf_pytorch state dict holds LoRA finetune_modules; merge them "
            "first (PaLM.merge_finetune_params(scope)) and save again"
        )
    block_ids = sorted({int(m.group(1)) for k in sd if (m := _RLHF_BLOCK.match(k))})
    if block_ids != list(range(len(block_ids))):
        raise ConversionError(f"not a palm_rlhf_pytorch.PaLM state dict: block indices {block_ids}")
    head_dim = 2 * half  # fused rows = q (H*Q) + k (Q) + v (Q) + 2 * ffn_hidden
    if fused_rows != q_dim + 2 * head_dim + 2 * ffn_hidden or q_dim % head_dim:
        raise ConversionError(
            f"palm_rlhf_pytorch state dict: fused projection has {fused_rows} rows, "
            f"not q {q_dim} + 2 x {head_dim} + 2 x {ffn_hidden}"
        )
    return ModelConfig(
        vocab_size=vocab_size,
        d_model=d_model,
        n_layers=len(block_ids),
        n_heads=q_dim // head_dim,
        head_dim=head_dim,
        ffn_mult=ffn_hidden / d_model,
        max_seq_len=max_seq_len,
        scale_logits=False,
        xpos_scale_base=xpos_scale_base,
        final_norm=final_norm,
    )


def final_norm_was_trained(state_dict: dict[str, Tensor]) -> bool:
    """False when the final LayerNorm gain is exactly 1 while the block gains moved.

    palm-rlhf-pytorch <= 0.2.0 computed logits from the un-normalised stream, so the final
    norm got no gradient and AdamW left its gain at its initial ones; a norm in the graph is
    never exactly 1 after training.
    """
    sd = strip_prefixes(state_dict)
    final, block = sd["norm.gamma"], sd["layers.0.fn.norm.gamma"]
    return not (torch.all(final == 1).item() and not torch.all(block == 1).item())


def from_palm_rlhf_pytorch(
    state_dict: dict[str, Tensor],
    max_seq_len: int = 8192,
    xpos_scale_base: float = 512.0,
    final_norm: bool = True,
    peer_version: str = "0.2.1",
) -> PaLM:
    """Build our PaLM holding the weights of a palm_rlhf_pytorch.PaLM state dict."""
    sd = strip_prefixes(state_dict)
    config = palm_rlhf_pytorch_config(sd, max_seq_len, xpos_scale_base, final_norm)
    _check_rotary_buffers(sd, config)
    if "to_logits.weight" in sd and not torch.equal(sd["to_logits.weight"], sd["token_emb.weight"]):
        raise ConversionError(
            "palm_rlhf_pytorch state dict: to_logits differs from token_emb (untied); "
            "only the tied model exists in palm_rlhf_pytorch"
        )
    offset = _gain_offset(peer_version)
    with torch.device("meta"):
        model = PaLM(config)
    ours = {"embedding.weight": sd["token_emb.weight"]}
    for layer in range(config.n_layers):
        peer = f"layers.{layer}.fn."
        if sd[peer + "norm.beta"].abs().max() != 0:  # a zeros buffer; ours has no bias at all
            raise ConversionError(f"palm_rlhf_pytorch state dict: {peer}norm.beta is not zero")
        ours[f"blocks.{layer}.norm.weight"] = sd[peer + "norm.gamma"] + offset
        ours[f"blocks.{layer}.in_proj.weight"] = sd[peer + "fused_attn_ff_proj.weight"]
        ours[f"blocks.{layer}.attn_out.weight"] = sd[peer + "attn_out.weight"]
        ours[f"blocks.{layer}.mlp_out.weight"] = sd[peer + "ff_out.2.weight"]
    ours["final_norm.weight"] = sd["norm.gamma"] + offset
    model.load_state_dict(ours, assign=True, strict=True)
    return model


def _rotary_buffers(head_dim: int) -> tuple[Tensor, Tensor]:
    """inv_freq and xPos zeta exactly as palm_rlhf_pytorch's RotaryEmbedding computes them."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    zeta = (torch.arange(0, head_dim, 2) + 0.4 * head_dim) / (1.4 * head_dim)
    return inv_freq, zeta


def _check_rotary_buffers(sd: dict[str, Tensor], config: ModelConfig) -> None:
    """The stored RoPE frequencies and xPos zeta must be the ones our config reproduces."""
    inv_freq, zeta = _rotary_buffers(config.head_dim)
    for layer in range(config.n_layers):
        for name, want in (("inv_freq", inv_freq), ("scale", zeta)):
            got = sd.get(f"layers.{layer}.fn.rotary_emb.{name}")
            if got is None or not torch.allclose(got.float(), want, rtol=1e-6, atol=0):
                raise ConversionError(
                    f"palm_rlhf_pytorch state dict: layers.{layer}.fn.rotary_emb."
                    f"{name} is not the base-10000 RoPE / xPos table we reproduce"
                )


def to_palm_rlhf_pytorch(model: PaLM, peer_version: str = "0.2.1") -> dict[str, Tensor]:
    """A state dict palm_rlhf_pytorch.PaLM(num_tokens, dim, depth, dim_head, heads, ff_mult,
    rotary_xpos_scale_base=config.xpos_scale_base) loads strictly, for that peer version."""
    c = model.config
    if not (c.parallel_block and c.multi_query and c.activation == "swiglu" and c.tie_embeddings):
        raise ConversionError(
            "palm_rlhf_pytorch only has the PaLM architecture: parallel block, "
            "multi-query, SwiGLU, tied embeddings"
        )
    problems = []
    if c.scale_logits:
        problems.append("it scales logits by 1/sqrt(d_model) (model.scale_logits)")
    if not c.xpos_scale_base:
        problems.append("it uses plain RoPE, the peer always uses xPos (export to palm-pytorch)")
    if c.rope_base != 10_000 or c.norm_eps != 1e-5 or not c.final_norm:
        problems.append("its rope_base/norm_eps/final_norm differ from the peer's fixed ones")
    if c.ffn_hidden % c.d_model:
        problems.append("its ffn_mult is not an integer")
    if problems:
        raise ConversionError(
            "palm_rlhf_pytorch would compute something else: " + "; ".join(problems)
        )
    offset = _gain_offset(peer_version)
    state = {k: v.detach().clone().float() for k, v in model.state_dict().items()}
    inv_freq, zeta = _rotary_buffers(c.head_dim)
    zeros = torch.zeros(c.d_model)
    out = {"token_emb.weight": state["embedding.weight"]}
    for layer in range(c.n_layers):
        peer = f"layers.{layer}.fn."
        out[peer + "norm.gamma"] = state[f"blocks.{layer}.norm.weight"] - offset
        out[peer + "norm.beta"] = zeros.clone()
        out[peer + "rotary_emb.inv_freq"] = inv_freq.clone()
        out[peer + "rotary_emb.scale"] = zeta.clone()
        out[peer + "fused_attn_ff_proj.weight"] = state[f"blocks.{layer}.in_proj.weight"]
        out[peer + "attn_out.weight"] = state[f"blocks.{layer}.attn_out.weight"]
        out[peer + "ff_out.2.weight"] = state[f"blocks.{layer}.mlp_out.weight"]
    out["norm.gamma"] = state["final_norm.weight"] - offset
    out["norm.beta"] = zeros.clone()
    out["to_logits.weight"] = out["token_emb.weight"]  # tied: one tensor, as the peer saves it
    return out


def convert_state_dict(state_dict: dict[str, Tensor], **options) -> PaLM:
    """Our PaLM from a peer state dict of either format, told apart by its keys.

    palm_pytorch (nn.Sequential: "0.weight", ...) or palm_rlhf_pytorch ("token_emb.weight", ...);
    `options` go to the matching converter (max_seq_len, and for palm_rlhf_pytorch
    xpos_scale_base, final_norm, peer_version).
    """
    sd = strip_prefixes(state_dict)
    if "token_emb.weight" in sd:
        return from_palm_rlhf_pytorch(sd, **options)
    if "0.weight" in sd:
        return from_palm_pytorch(sd, **{k: v for k, v in options.items() if k == "max_seq_len"})
    raise ConversionError(
        "neither a palm_pytorch nor a palm_rlhf_pytorch state dict (no "
        "'0.weight' or 'token_emb.weight' key)"
    )
