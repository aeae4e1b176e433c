"""`palm export --checkpoint DIR --to palm-rlhf-pytorch OUT.pt`: weights for lucidrains' peers;
`--to safetensors OUT.safetensors`: one file of a checkpoint's weights (a sharded one consolidated).

The file is a plain state dict (`torch.save`), loadable with `torch.load(weights_only=True)`:
- palm-rlhf-pytorch: `PaLM(num_tokens, dim, depth, dim_head, heads, ff_mult,
  rotary_xpos_scale_base).load_state_dict(...)`; the model must use xPos (converted ones do);
- palm-pytorch: `PaLM(num_tokens, dim, depth, dim_head, heads, ff_mult)`; plain RoPE only.
The constructor arguments to use are printed. Exit status: 0 written; 1 the model cannot be
expressed in that peer or the checkpoint is unusable (one `error:` line); 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from palm.cli import run
from palm.errors import ConversionError, PalmError
from palm.files import atomic_file

TARGETS = ("palm-rlhf-pytorch", "palm-pytorch", "safetensors")


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
    p.add_argument("--to", required=True, choices=TARGETS, help="peer implementation")
    p.add_argument(
        "--peer_version",
        default="0.2.1",
        help="palm-rlhf-pytorch release to load it with: from 0.2.4 its LayerNorm "
        "stores gain - 1, which the file then does too",
    )
    p.add_argument("out", type=Path, help="output .pt file (written atomically)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(lambda: export(args))


def export(args: argparse.Namespace) -> None:
    import torch

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


if __name__ == "__main__":
    sys.exit(main())
