"""`palm export --checkpoint DIR --to palm-rlhf-pytorch OUT.pt`: weights for lucidrains' peers.

The file is a plain state dict (`torch.save`), loadable with `torch.load(weights_only=True)`:
- palm-rlhf-pytorch: `PaLM(num_tokens, dim, depth, dim_head, heads, ff_mult,
  rotary_xpos_scale_base).load_state_dict(...)`; the model must use xPos (converted ones do);
- palm-pytorch: `PaLM(num_tokens, dim, depth, dim_head, heads, ff_mult)`; plain RoPE only.
The constructor arguments to use are printed. Exit status: 0 written; 1 the model cannot be
expressed in that peer or the checkpoint is unusable (one `error:` line); 2 bad command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

TARGETS = ("palm-rlhf-pytorch", "palm-pytorch")


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
    import torch

    from palm.checkpoint import CheckpointError
    from palm.inference import load_model_for_inference
    from palm.interop import to_palm_pytorch, to_palm_rlhf_pytorch

    try:
        model = load_model_for_inference(
            args.checkpoint, device="cpu", dtype=torch.float32, require_tokenizer=False
        ).model
        if args.to == "palm-rlhf-pytorch":
            state = to_palm_rlhf_pytorch(model, args.peer_version)
        else:
            state = to_palm_pytorch(model)
    except (CheckpointError, ValueError) as error:
        print(f"error: {args.checkpoint}: {error}", file=sys.stderr)
        return 1
    c = model.config
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + f".tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, args.out)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        print(f"error: cannot write {args.out}: {error.strerror or error}", file=sys.stderr)
        return 1
    ff_mult = c.ffn_hidden // c.d_model
    extra = (
        f", rotary_xpos_scale_base={c.xpos_scale_base:g}" if args.to == "palm-rlhf-pytorch" else ""
    )
    print(
        f"wrote {args.out}: load with PaLM(num_tokens={c.vocab_size}, dim={c.d_model}, "
        f"depth={c.n_layers}, dim_head={c.head_dim}, heads={c.n_heads}, ff_mult={ff_mult}"
        f"{extra}).load_state_dict(torch.load(path, weights_only=True))"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
