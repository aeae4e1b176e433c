"""Decoding speed: the key/value cache vs recomputing the whole sequence vs transformers' GPT-NeoX.

    python benchmarks/decode.py --sizes S M --batches 1 8 --new_tokens 128 512

Greedy decoding of `new_tokens` tokens after a 32-token prompt; tokens/s counts every row of
the batch (batch x new_tokens / seconds, prompt processing included). Three contenders:
- ours+cache: palm.sampling.generate, one position per step against the one-head-wide
  multi-query cache (PaLM §2);
- ours recompute: every step re-runs the whole sequence (use_cache=False). Its cost grows
  with the length, so with --recompute_every K > 1 only every K-th step's forward is timed and
  the total is K times their sum (labelled "estimated"), which keeps CPU runs short;
- hf gpt-neox: transformers' GPTNeoXForCausalLM of the same d_model/layers/heads/ffn/vocab
  (rotary on all dims, parallel residual) with generate(use_cache=True, do_sample=False).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout, like train_step.py
    sys.path.insert(0, str(ROOT))

from palm.config import ModelConfig
from palm.model import PaLM
from palm.sampling import generate

# The model benchmark's sizes (benchmarks/train_step.py): ffn 4x, head_dim 64.
SIZES = {
    "S": {"vocab_size": 8192, "d_model": 256, "n_layers": 4, "n_heads": 4, "head_dim": 64},
    "M": {"vocab_size": 32_000, "d_model": 512, "n_layers": 8, "n_heads": 8, "head_dim": 64},
}
PROMPT = 32


def ours(size: str) -> PaLM:
    torch.manual_seed(0)
    return PaLM(ModelConfig(**SIZES[size], ffn_mult=4.0, max_seq_len=1024)).eval()


def neox(size: str):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    s = SIZES[size]
    config = GPTNeoXConfig(
        vocab_size=s["vocab_size"],
        hidden_size=s["d_model"],
        num_hidden_layers=s["n_layers"],
        num_attention_heads=s["n_heads"],
        intermediate_size=4 * s["d_model"],
        rotary_pct=1.0,
        use_parallel_residual=True,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return GPTNeoXForCausalLM(config).eval()


@torch.no_grad()
def time_cached(model: PaLM, prompt: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    out = generate(model, prompt, new, temperature=0.0)
    assert out.shape[1] == new
    return time.perf_counter() - start


@torch.no_grad()
def time_recompute(model: PaLM, prompt: torch.Tensor, new: int, every: int) -> float:
    if every == 1:
        start = time.perf_counter()
        generate(model, prompt, new, temperature=0.0, use_cache=False)
        return time.perf_counter() - start
    total, batch = 0.0, prompt.shape[0]
    for step in range(0, new, every):  # step k re-runs PROMPT + k tokens
        tokens = torch.randint(0, model.config.vocab_size, (batch, PROMPT + step))
        start = time.perf_counter()
        model(tokens)[:, -1].argmax(-1)
        total += time.perf_counter() - start
    return total * every


@torch.no_grad()
def time_neox(model, prompt: torch.Tensor, new: int) -> float:
    start = time.perf_counter()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
    )
    assert out.shape[1] == PROMPT + new
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["S", "M"], choices=tuple(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new_tokens", nargs="+", type=int, default=[128, 512])
    p.add_argument(
        "--recompute_every",
        type=int,
        default=1,
        help="time every K-th recompute step and scale by K (1 = all, exact)",
    )
    p.add_argument("--skip_hf", action="store_true", help="no transformers baseline")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, float32, CPU"
    )
    rows = []
    print(
        "| size | batch | new | ours+cache tok/s | ours recompute tok/s | speed-up | "
        "hf gpt-neox tok/s | ours/hf |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        model = ours(size)
        hf = None if args.skip_hf else neox(size)
        for batch in args.batches:
            prompt = torch.randint(0, SIZES[size]["vocab_size"], (batch, PROMPT))
            time_cached(model, prompt, 8)  # warm-up: allocator, kernels
            if hf is not None:
                time_neox(hf, prompt, 8)
            for new in args.new_tokens:
                tokens = batch * new
                cached = tokens / time_cached(model, prompt, new)
                recompute = tokens / time_recompute(model, prompt, new, args.recompute_every)
                hf_rate = tokens / time_neox(hf, prompt, new) if hf is not None else float("nan")
                note = "" if args.recompute_every == 1 else " (est.)"
                row = {
                    "size": size,
                    "batch": batch,
                    "new_tokens": new,
                    "cached": cached,
                    "recompute": recompute,
                    "hf": hf_rate,
                    "recompute_estimated": args.recompute_every > 1,
                }
                rows.append(row)
                print(
                    f"| {size} | {batch} | {new} | {cached:,.0f} | {recompute:,.0f}{note} | "
                    f"{cached / recompute:.1f}x | {hf_rate:,.0f} | {cached / hf_rate:.2f}x |",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
