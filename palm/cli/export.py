"""`palm export --checkpoint DIR --to TARGET OUT`: a checkpoint for Hugging Face transformers,
for lucidrains' peers, or as one safetensors file of its weights (a sharded one consolidated).

- hf: OUT is a folder `AutoModelForCausalLM.from_pretrained(OUT)` and
  `AutoTokenizer.from_pretrained(OUT)` load with no custom code (transformers >= 4.48): a
  CohereForCausalLM, whose block is PaLM's (palm.hf), and the run's tokenizer (palm.hf_tokenizer);
  weights sharded above --max_shard_size. xPos, no-final-norm, serial and GELU models are refused.
- palm-rlhf-pytorch / palm-pytorch: OUT is a plain state dict file (`torch.save`), loadable with
  `torch.load(weights_only=True)`: palm-rlhf-pytorch `PaLM(num_tokens, dim, depth, dim_head,
  heads, ff_mult, rotary_xpos_scale_base).load_state_dict(...)`; the model must use xPos
  (converted ones do); palm-pytorch `PaLM(num_tokens, dim, depth, dim_head, heads, ff_mult)`;
  plain RoPE only. The constructor arguments to use are printed.
Everything is written atomically. Exit status: 0 written; 1 the model cannot be expressed in that
format or the checkpoint is unusable (one `error:` line); 2 bad command line.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from palm.cli import run
from palm.errors import ConfigError, ConversionError, PalmError
from palm.files import atomic_file

TARGETS = ("hf", "palm-rlhf-pytorch", "palm-pytorch", "safetensors")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_size(text: str) -> int:
    """Bytes of a size such as "5GB" (decimal, as transformers), "500MiB" or "1000000"."""
    match = _SIZE.match(str(text))
    if not match or (match.group(2) or "").upper() not in _UNITS:
        raise ConfigError(f"--max_shard_size {text!r} is not a size; use e.g. 5GB, 500MB, 2GiB")
    size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").upper()])
    if size < 1:
        raise ConfigError(f"--max_shard_size {text!r} must be at least one byte")
    return size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="palm export", allow_abbrev=False, description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="checkpoint folder, or a run folder (its best checkpoint)",
    )
    p.add_argument("--to", required=True, choices=TARGETS, help="format to write")
    p.add_argument(
        "--peer_version",
        default="0.2.1",
        help="palm-rlhf-pytorch release to load it with: from 0.2.4 its LayerNorm "
        "stores gain - 1, which the file then does too",
    )
    p.add_argument(
        "--max_shard_size",
        default="5GB",
        help="hf: largest model-*.safetensors file (e.g. 5GB, 500MB, 2GiB); more weights "
        "than that are split into shards listed by model.safetensors.index.json",
    )
    p.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="hf: the tokenizer to convert (default: the run's tokenizer.model)",
    )
    p.add_argument(
        "out", type=Path, help="hf: output folder; peers: output .pt file; safetensors: the file"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: export(args))


def export(args: argparse.Namespace) -> None:
    import torch

    if args.to == "hf":
        return export_hf(args)
    from palm.interop import to_palm_pytorch, to_palm_rlhf_pytorch
    from palm.runs import load_model

    model = load_model(
        args.checkpoint, device="cpu", dtype=torch.float32, require_tokenizer=False
    ).model
    if args.to == "safetensors":
        return _write_safetensors(model, args.out)
    try:
        if args.to == "palm-rlhf-pytorch":
            state = to_palm_rlhf_pytorch(model, args.peer_version)
        else:
            state = to_palm_pytorch(model)
    except ConversionError as error:
        raise ConversionError(f"{args.checkpoint}: {error}") from None
    c = model.config
    try:
        with atomic_file(args.out) as handle:
            torch.save(state, handle)
    except OSError as error:
        raise PalmError(f"cannot write {args.out}: {error.strerror or error}") from None
    ff_mult = c.ffn_hidden // c.d_model
    extra = (
        f", rotary_xpos_scale_base={c.xpos_scale_base:g}" if args.to == "palm-rlhf-pytorch" else ""
    )
    print(
        f"wrote {args.out}: load with PaLM(num_tokens={c.vocab_size}, dim={c.d_model}, "
        f"depth={c.n_layers}, dim_head={c.head_dim}, heads={c.n_heads}, ff_mult={ff_mult}"
        f"{extra}).load_state_dict(torch.load(path, weights_only=True))"
    )


def _write_safetensors(model, out: Path) -> None:
    """The single-device state dict (tied embedding once), as palm's own checkpoints store it."""
    from safetensors.torch import save

    from palm.files import write_atomic

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    try:
        write_atomic(out, save(state))
    except OSError as error:
        raise PalmError(f"cannot write {out}: {error.strerror or error}") from None
    print(f"wrote {out}: {len(state)} tensors, {model.num_parameters():,} parameters")


def export_hf(args: argparse.Namespace) -> None:
    import torch

    from palm.hf import MIN_TRANSFORMERS, write_folder
    from palm.hf_tokenizer import tokenizer_files
    from palm.runs import load_model

    max_shard_bytes = parse_size(args.max_shard_size)  # a bad size fails before any loading
    loaded = load_model(
        args.checkpoint, device="cpu", dtype=torch.float32, tokenizer=args.tokenizer
    )
    model, tok = loaded.model, loaded.tokenizer
    try:
        files, special_ids = tokenizer_files(tok, model.config.max_seq_len)
        written = write_folder(model, args.out, files, special_ids, max_shard_bytes)
    except ConversionError as error:
        raise ConversionError(f"{loaded.path}: {error}") from None
    print(
        f"wrote {args.out}/ ({', '.join(written)}): CohereForCausalLM; load with "
        f"transformers>={MIN_TRANSFORMERS} AutoModelForCausalLM.from_pretrained({str(args.out)!r}) "
        f"and AutoTokenizer.from_pretrained({str(args.out)!r})"
    )


if __name__ == "__main__":
    sys.exit(main())
