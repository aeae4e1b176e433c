"""Published PaLM-architecture weights: where they are, fetching them, turning them into ours.

The only public PaLM-architecture checkpoints are conceptofmind's (github.com/conceptofmind/PaLM):
plain `torch.save(state_dict)` files of lucidrains' `palm_rlhf_pytorch.PaLM`, trained on C4 with
8192-token sequences and the GPT-NeoX-20B tokenizer (vocabulary padded to 50304), with xPos
rotary embeddings (scale base 512) and multi-query attention. `palm.interop` converts them, and
`palm.hub` fetches them through the Hugging Face cache.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from palm.errors import ConversionError, PretrainedError
from palm.fetch import FetchConfig
from palm.files import write_atomic
from palm.hub import HubFile, file_url, hub_download

# torch and the model are imported inside the functions that convert, so that `download.py`
# (which reads this catalogue for its --help) starts without torch.

DEFAULT_PRETRAINED = "palm-410m"  # the publisher's default (inference.py --model)


@dataclass(frozen=True)
class Pretrained:
    """One published checkpoint and what it needs."""

    weights: HubFile
    d_model: int
    n_layers: int
    n_heads: int = 8
    head_dim: int = 128
    vocab_size: int = 50_304  # GPT-NeoX's 50277 ids padded to a multiple of 128
    max_seq_len: int = 8192  # the training context
    xpos_scale_base: float = 512.0  # palm_rlhf_pytorch's default; the training scripts keep it
    licence: str = "MIT (github.com/conceptofmind/PaLM); see the model card on the hub"


# GPT-NeoX-20B tokenizer (Black et al. 2022), Apache-2.0, used to tokenize the training data.
NEOX_TOKENIZER = HubFile("EleutherAI/gpt-neox-20b", "tokenizer.json")

# conceptofmind/PaLM README and hubconf.py (torch.hub entries palm_{150m,410m,1b}_8k_v0). A 2B
# model was announced as "currently being trained"; no file has been published for it.
PRETRAINED: dict[str, Pretrained] = {
    "palm-150m": Pretrained(HubFile("conceptofmind/palm-150m", "palm_150m_8k_v0.pt"), 768, 12),
    "palm-410m": Pretrained(HubFile("conceptofmind/palm-410m", "palm_410m_8k_v0.pt"), 1024, 24),
    "palm-1b": Pretrained(HubFile("conceptofmind/palm-1b", "palm_1b_8k_v0.pt"), 2048, 16),
}


def lookup(name: str) -> Pretrained:
    if name not in PRETRAINED:
        raise PretrainedError(
            f"unknown --pretrained {name!r}; choose one of: {', '.join(PRETRAINED)}"
        )
    return PRETRAINED[name]


FINAL_NORM_CHOICES = ("auto", "true", "false")


def load_peer_state_dict(path: Path) -> dict:
    """torch.load with weights_only=True: tensors and containers only, never arbitrary objects."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - pickle/zip errors, or a non-weights object refused
        raise PretrainedError(
            f"{path}: not a loadable PyTorch state dict "
            f"({str(error).splitlines()[0][:160]}); delete it and download "
            "it again"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]  # a training checkpoint {"model": ..., "optimizer": ...}
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise PretrainedError(f"{path}: holds no flat state dict of tensors")
    return state


def convert_file(
    path: Path,
    spec: Pretrained | None = None,
    final_norm: str = "auto",
    peer_version: str = "0.2.1",
):
    """Our PaLM (float32) from a peer checkpoint file, and the conversion choices made."""
    import torch

    from palm.interop import convert_state_dict, final_norm_was_trained, strip_prefixes

    if final_norm not in FINAL_NORM_CHOICES:
        raise PretrainedError(f"final_norm must be one of {FINAL_NORM_CHOICES}, got {final_norm!r}")
    state = load_peer_state_dict(path)
    choices: dict = {"peer": "palm_pytorch"}
    options: dict = {"max_seq_len": spec.max_seq_len if spec else 8192}
    if "token_emb.weight" in strip_prefixes(state):
        trained = final_norm_was_trained(state)
        use = trained if final_norm == "auto" else final_norm == "true"
        choices = {
            "peer": "palm_rlhf_pytorch",
            "peer_version": peer_version,
            "final_norm": use,
            "final_norm_gain_trained": trained,
        }
        options.update(
            final_norm=use,
            peer_version=peer_version,
            xpos_scale_base=spec.xpos_scale_base if spec else 512.0,
        )
        if not use:
            print(
                f"convert: {path.name}: the final LayerNorm gain was never trained (exactly 1), "
                "so this model was trained without it (palm-rlhf-pytorch <= 0.2.0); "
                "model.final_norm=False",
                file=sys.stderr,
            )
    try:
        model = convert_state_dict({k: v.float() for k, v in state.items()}, **options)
    except ConversionError as error:
        raise PretrainedError(f"{path}: {error}") from None
    c = model.config
    if spec and (c.d_model, c.n_layers, c.n_heads, c.head_dim, c.vocab_size) != (
        spec.d_model,
        spec.n_layers,
        spec.n_heads,
        spec.head_dim,
        spec.vocab_size,
    ):
        raise PretrainedError(
            f"{path}: shape d_model={c.d_model} n_layers={c.n_layers} "
            f"n_heads={c.n_heads} head_dim={c.head_dim} vocab={c.vocab_size} "
            "is not the published one; delete it and download it again"
        )
    with torch.no_grad():
        model = model.float().eval()
    return model, choices


def write_pretrained(run_dir: Path, model, tokenizer_bytes: bytes | None, provenance: dict) -> Path:
    """A run folder like train.py's: checkpoints/step_00000000/ (+ tokenizer, provenance)."""
    from palm.checkpoint import TrainingState, save_checkpoint
    from palm.config import Config, TrainConfig

    config = Config(model=model.config, train=TrainConfig(name=run_dir.name))
    run_dir.mkdir(parents=True, exist_ok=True)
    if tokenizer_bytes is not None:
        # The project's tokenizer file name; its content (JSON here) selects the backend.
        write_atomic(run_dir / "tokenizer.model", tokenizer_bytes)
    path = save_checkpoint(
        run_dir / "checkpoints",
        model.state_dict(),
        {"state": {}, "param_groups": []},
        TrainingState(step=0),
        config.to_dict(),
    )
    write_atomic(run_dir / "pretrained.json", json.dumps(provenance, indent=2))
    return path


def install(
    name: str,
    root: Path,
    environ: dict[str, str],
    fetch_config: FetchConfig,
    final_norm: str = "auto",
) -> Path:
    """Download `name` and its tokenizer, convert, write root/pretrained/<name>/; its checkpoint."""
    from palm.tokenizer import Tokenizer

    spec = lookup(name)
    weights, weights_sha = hub_download(spec.weights, environ, fetch_config)
    tok_path, tok_sha = hub_download(NEOX_TOKENIZER, environ, fetch_config)
    tokenizer = Tokenizer(tok_path.read_bytes(), str(tok_path))
    model, choices = convert_file(weights, spec, final_norm)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise PretrainedError(
            f"{tok_path}: {tokenizer.vocab_size} tokens, more than the model's "
            f"{model.config.vocab_size}; not the GPT-NeoX tokenizer"
        )
    provenance = {
        "name": name,
        "licence": spec.licence,
        "conversion": choices,
        "weights": {
            "url": file_url(spec.weights, environ),
            "sha256": weights_sha,
            "verified": "pinned sha256" if spec.weights.sha256 else "hub LFS sha256",
        },
        "tokenizer": {"url": file_url(NEOX_TOKENIZER, environ), "sha256": tok_sha},
    }
    path = write_pretrained(root / "pretrained" / name, model, tokenizer.model_bytes, provenance)
    print(f"pretrained: {name} ({model.num_parameters() / 1e6:.0f}M parameters) -> {path}")
    return path
