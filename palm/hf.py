"""Hugging Face transformers format: our PaLM as a native `CohereForCausalLM` folder, and back.

PaLM §2's block is, exactly, Cohere's (Command-R) decoder layer, so a transformers user loads an
exported model with `AutoModelForCausalLM.from_pretrained(folder)` and no custom code:
- parallel block `x + Attn(LN(x)) + MLP(LN(x))` with one shared LayerNorm: `input_layernorm`,
  a scale-only LayerNorm (mean subtracted, no bias), as ours;
- SwiGLU: `down_proj(silu(gate_proj(x)) * up_proj(x))`; our fused input rows are
  [q | k | v | value | gate], so `up_proj` is the value half and `gate_proj` the gate half;
- multi-query attention is `num_key_value_heads=1`; biases off (`attention_bias=false`);
- tied embeddings, a final LayerNorm, and `logit_scale` = PaLM's 1/sqrt(d_model) (§5);
- `head_dim` is read from the config (transformers >= 4.48), so n_heads * head_dim may differ
  from d_model, as in PaLM-540B (48 x 256 = 12288 != 18432).
One layout differs: Cohere's RoPE rotates interleaved pairs (2i, 2i+1) where ours rotates halves
(i, i + head_dim/2). Attention only sees q.k, so permuting each head's q and k rows turns one
into the other exactly (`rope_permutation`). What Cohere cannot compute (xPos, no final norm,
the serial or GELU ablations) is refused with the reason (`unsupported`).

A folder holds config.json, generation_config.json, model.safetensors (or shards and
model.safetensors.index.json) and the tokenizer files (palm.hf_tokenizer). transformers is not
needed to write or read one: only JSON, safetensors and torch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from palm.config import ModelConfig
from palm.errors import ConfigError, ConversionError
from palm.files import fsync_dir, fsync_file, publish_dir, remove, stale, temporary_path
from palm.model import PaLM

ARCHITECTURE = "CohereForCausalLM"
MODEL_TYPE = "cohere"
# Cohere's attention reads config.head_dim from this release on; before it, head_dim was
# hidden_size // num_attention_heads and n_heads * head_dim != d_model was refused.
MIN_TRANSFORMERS = "4.48"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default shard size ("5GB")
WEIGHTS, INDEX = "model.safetensors", "model.safetensors.index.json"
# ---------------------------------------------------------------------------------------------
# The mapping (pure functions on configs and tensors)
# ---------------------------------------------------------------------------------------------


def unsupported(config: ModelConfig) -> list[str]:
    """Why Cohere's layer would compute something else than this model; empty when it maps."""
    reasons = []
    if config.xpos_scale_base:
        reasons.append("it uses xPos rotary embeddings (Cohere has plain RoPE)")
    if not config.final_norm:
        reasons.append("it has no final LayerNorm (model.final_norm=false; Cohere always has one)")
    if not config.parallel_block:
        reasons.append("it uses the serial block (Cohere's block is PaLM's parallel one)")
    if config.activation != "swiglu":
        reasons.append(f"its MLP is {config.activation} (Cohere's is SwiGLU)")
    return reasons


def logit_scale(config: ModelConfig) -> float:
    """What our forward multiplies the logits by (PaLM §5: 1/sqrt(d_model), tied only)."""
    return 1.0 / math.sqrt(config.d_model) if config.scale_logits and config.tie_embeddings else 1.0


def hf_config(config: ModelConfig, special_ids: dict) -> dict:
    """config.json of the CohereForCausalLM that computes what `config` does."""
    if reasons := unsupported(config):
        raise ConversionError("CohereForCausalLM cannot hold this model: " + "; ".join(reasons))
    return {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.ffn_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "layer_norm_eps": config.norm_eps,
        "logit_scale": logit_scale(config),
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_qk_norm": False,
        # transformers 4.x reads rope_theta, 5.x rope_parameters; both name the same base.
        "rope_theta": config.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_base},
        # Always given: Cohere's defaults (bos 5, eos 255001) are no ids of ours.
        "bos_token_id": special_ids.get("bos"),
        "eos_token_id": special_ids.get("eos"),
        "pad_token_id": special_ids.get("pad"),
        "use_cache": True,
        "dtype": "float32",  # what export writes; write_folder states the weights' own dtype
    }


def model_config(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a CohereForCausalLM config.json; anything that would compute
    differently from our model is refused, naming the key."""
    if hf.get("model_type") != MODEL_TYPE:
        raise ConversionError(
            f"{where}: model_type {hf.get('model_type')!r}; only {ARCHITECTURE} "
            f"({MODEL_TYPE!r}, what `palm export --to hf` writes) converts to PaLM"
        )
    shape = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
    if missing := [k for k in (*shape, "intermediate_size") if k not in hf]:
        raise ConversionError(f"{where}: key {missing[0]!r} is missing")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta")}
    fixed = {
        "hidden_act": ("silu", hf.get("hidden_act", "silu")),
        "attention_bias": (False, hf.get("attention_bias", False)),
        "use_qk_norm": (False, hf.get("use_qk_norm", False)),
        "rope_parameters.rope_type": ("default", rope.get("rope_type", "default")),
    }
    for key, (want, got) in fixed.items():
        if got != want:
            raise ConversionError(f"{where}: {key} is {got!r}; PaLM has only {want!r}")
    d_model, n_heads = hf["hidden_size"], hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    if n_kv not in (1, n_heads):
        raise ConversionError(
            f"{where}: num_key_value_heads {n_kv} is grouped-query attention; PaLM has "
            f"multi-query (1) or, as an ablation, multi-head ({n_heads})"
        )
    tied = hf.get("tie_word_embeddings", True)
    scale = hf.get("logit_scale", 1.0)
    if scale not in (1.0, 1.0 / math.sqrt(d_model)) or (scale != 1.0 and not tied):
        raise ConversionError(
            f"{where}: logit_scale {scale} is neither 1 nor 1/sqrt(hidden_size) with tied "
            f"embeddings; PaLM scales logits only by 1/sqrt(d_model) (§5)"
        )
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            head_dim=hf.get("head_dim") or d_model // n_heads,
            ffn_mult=hf["intermediate_size"] / d_model,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            rope_base=float(rope.get("rope_theta") or 10_000.0),
            norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
            scale_logits=scale != 1.0,
            multi_query=n_kv == 1,
            tie_embeddings=tied,
        )
    except ConfigError as error:
        raise ConversionError(f"{where}: no PaLM has this shape ({error})") from None


def rope_permutation(head_dim: int) -> Tensor:
    """Row order (head_dim,) taking one head's rotate-half rows to Cohere's interleaved ones:
    Cohere's row 2i is our row i and its row 2i+1 our row i + head_dim/2 (the pair that
    rotates together at frequency i)."""
    half = head_dim // 2
    return torch.stack((torch.arange(half), torch.arange(half, head_dim)), dim=1).reshape(-1)


def _per_head(weight: Tensor, head_dim: int, order: Tensor) -> Tensor:
    """Reorder the rows of every head of a (heads * head_dim, d_model) projection."""
    rows, cols = weight.shape
    return weight.reshape(rows // head_dim, head_dim, cols)[:, order].reshape(rows, cols)


def to_hf_state_dict(model: PaLM) -> dict[str, Tensor]:
    """Our weights under CohereForCausalLM's names (tied: the embedding only, as transformers
    saves it)."""
    c = model.config
    if reasons := unsupported(c):
        raise ConversionError("CohereForCausalLM cannot hold this model: " + "; ".join(reasons))
    to_cohere = rope_permutation(c.head_dim)
    state = model.state_dict()
    out = {"model.embed_tokens.weight": state["embedding.weight"]}
    for i in range(c.n_layers):
        ours, hf = f"blocks.{i}.", f"model.layers.{i}."
        q, k, v, value, gate = state[ours + "in_proj.weight"].split(model.blocks[i].row_sizes)
        out[hf + "input_layernorm.weight"] = state[ours + "norm.weight"]
        out[hf + "self_attn.q_proj.weight"] = _per_head(q, c.head_dim, to_cohere)
        out[hf + "self_attn.k_proj.weight"] = _per_head(k, c.head_dim, to_cohere)
        out[hf + "self_attn.v_proj.weight"] = v
        out[hf + "self_attn.o_proj.weight"] = state[ours + "attn_out.weight"]
        out[hf + "mlp.gate_proj.weight"] = gate
        out[hf + "mlp.up_proj.weight"] = value
        out[hf + "mlp.down_proj.weight"] = state[ours + "mlp_out.weight"]
    out["model.norm.weight"] = state["final_norm.weight"]
    if not c.tie_embeddings:
        out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.detach().contiguous() for k, v in out.items()}


def from_hf_state_dict(state: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our state dict from CohereForCausalLM weights (the inverse of `to_hf_state_dict`)."""
    to_ours = torch.argsort(rope_permutation(config.head_dim))
    names = set(state)

    def take(name: str) -> Tensor:
        if name not in state:
            raise ConversionError(f"CohereForCausalLM weights lack {name}")
        names.discard(name)
        return state[name]

    embedding = take("model.embed_tokens.weight")
    ours = {"embedding.weight": embedding}
    for i in range(config.n_layers):
        hf = f"model.layers.{i}."
        q = _per_head(take(hf + "self_attn.q_proj.weight"), config.head_dim, to_ours)
        k = _per_head(take(hf + "self_attn.k_proj.weight"), config.head_dim, to_ours)
        rows = (q, k, take(hf + "self_attn.v_proj.weight"))
        rows += (take(hf + "mlp.up_proj.weight"), take(hf + "mlp.gate_proj.weight"))
        ours[f"blocks.{i}.norm.weight"] = take(hf + "input_layernorm.weight")
        ours[f"blocks.{i}.in_proj.weight"] = torch.cat(rows)
        ours[f"blocks.{i}.attn_out.weight"] = take(hf + "self_attn.o_proj.weight")
        ours[f"blocks.{i}.mlp_out.weight"] = take(hf + "mlp.down_proj.weight")
    ours["final_norm.weight"] = take("model.norm.weight")
    if not config.tie_embeddings:
        ours["lm_head.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in names:  # some writers store the tied head too: it must be a copy
        if not torch.equal(take("lm_head.weight"), embedding):
            raise ConversionError(
                "CohereForCausalLM weights: lm_head differs from embed_tokens "
                "although tie_word_embeddings is true"
            )
    names = {n for n in names if not n.endswith("rotary_emb.inv_freq")}  # old non-persistent
    if names:
        raise ConversionError(
            f"CohereForCausalLM weights hold unknown tensors: {sorted(names)[:3]}"
        )
    return ours


def build(config: ModelConfig, state: dict[str, Tensor], where: str = "") -> PaLM:
    """Our PaLM holding exactly these tensors (no copy, no cast: a round trip is bit-exact)."""
    with torch.device("meta"):
        model = PaLM(config)
    try:
        model.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as error:
        detail = " ".join(str(error).split("\n\t")[1:2]) or str(error)
        raise ConversionError(
            f"{where or 'CohereForCausalLM'}: weights do not fit its config ({detail[:300]})"
        ) from None
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


def is_hf_folder(path: str | Path) -> bool:
    """A transformers model folder (config.json plus safetensors weights)?"""
    path = Path(path)
    weights = (path / WEIGHTS).is_file() or (path / INDEX).is_file()
    return (path / "config.json").is_file() and weights


def read_config(folder: Path) -> ModelConfig:
    where = folder / "config.json"
    try:
        values = json.loads(where.read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"{where}: unreadable ({error}); export it again") from None
    return model_config(values, str(where))


def read_weights(folder: Path) -> dict[str, Tensor]:
    """CohereForCausalLM tensors of a folder: model.safetensors, or the shards its index names."""
    files = [WEIGHTS]
    if (folder / INDEX).is_file():
        try:
            files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError) as error:
            raise ConversionError(f"{folder / INDEX}: unreadable ({error})") from None
    state: dict[str, Tensor] = {}
    for name in files:
        try:
            state.update(load_file(folder / name))
        except Exception as error:  # noqa: BLE001 (safetensors has its own error types)
            raise ConversionError(f"{folder / name}: not readable safetensors ({error})") from None
    return state


def read_folder(folder: str | Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """Our config and state dict from a CohereForCausalLM folder (for train.init_from)."""
    folder = Path(folder)
    config = read_config(folder)
    try:
        return config, from_hf_state_dict(read_weights(folder), config)
    except ConversionError as error:
        raise ConversionError(f"{folder}: {error}") from None


def from_hf(source) -> PaLM:
    """Our PaLM from a CohereForCausalLM: a folder (config.json + safetensors; transformers not
    needed) or a loaded `transformers.CohereForCausalLM` object."""
    if isinstance(source, (str, Path)):
        if not is_hf_folder(source):
            raise ConversionError(
                f"{source}: not a transformers folder (config.json and {WEIGHTS} or {INDEX})"
            )
        return build(*read_folder(source), where=str(source))
    hf = getattr(source, "config", None)
    if hf is None or not hasattr(source, "state_dict"):
        raise ConversionError(f"from_hf takes a folder or a CohereForCausalLM, not {type(source)}")
    config = model_config(hf.to_dict(), f"{type(source).__name__}.config")
    return build(config, from_hf_state_dict(dict(source.state_dict()), config))


def shards(state: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Tensors in order, cut into groups of at most max_bytes (a larger tensor goes alone)."""
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = tensor
        size += nbytes
    return groups


def write_folder(
    model: PaLM,
    out: str | Path,
    files: dict[str, bytes],
    special_ids: dict,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> list[str]:
    """Write the transformers folder `out` (config, generation config, weights, and `files`,
    e.g. the tokenizer's) into a temporary folder, then publish it whole; the names written.
    `special_ids` {"bos", "eos", "pad"} go to config.json and generation_config.json."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not is_hf_folder(out):
        raise ConversionError(
            f"{out} exists and is not a transformers folder; choose a new output folder "
            "(an earlier export there would be replaced, anything else is never deleted)"
        )
    config = hf_config(model.config, special_ids)
    config["dtype"] = str(model.embedding.weight.dtype).removeprefix("torch.")
    state = {k: v.cpu() for k, v in to_hf_state_dict(model).items()}
    generation = {f"{k}_token_id": special_ids.get(k) for k in ("bos", "eos", "pad")}
    groups = shards(state, max_shard_bytes)
    names = (
        [WEIGHTS]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    texts = {"config.json": config, "generation_config.json": generation}
    if len(groups) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: name for name, group in zip(names, groups) for k in group}
        texts[INDEX] = {"metadata": {"total_size": total}, "weight_map": weight_map}
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in stale(out.parent):  # what interrupted exports of dead writers left
        remove(leftover)
    tmp = temporary_path(out)
    try:
        tmp.mkdir()
        for name, group in zip(names, groups):
            save_file(group, tmp / name, metadata={"format": "pt"})  # transformers wants "pt"
        for name, value in texts.items():
            (tmp / name).write_text(json.dumps(value, indent=2) + "\n")
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        written = sorted(p.name for p in tmp.iterdir())
        for name in written:
            fsync_file(tmp / name)
        fsync_dir(tmp)
        publish_dir(tmp, out)
    except OSError as error:
        remove(tmp)
        raise ConversionError(f"cannot write {out}: {error.strerror or error}") from None
    return written
