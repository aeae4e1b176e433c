"""Decoding speed: ours (eager and compiled) vs litgpt's and transformers' KV caches.

    python benchmarks/decode.py --sizes S M --batches 1 8 --new_tokens 128 512 --rounds 5

Greedy decoding of `new_tokens` tokens after a 32-token prompt; tokens/s counts every row of
the batch (batch x new_tokens / seconds, prompt processing included). Contenders:
- ours: palm.sampling.generate, one position per step against the one-head-wide
  multi-query cache (PaLM §2), eager. It multiplies by copies of the weights in a faster
  layout, made per cache (`transposed_weights`, on by default for CPU float32), and the
  copying is timed too: (in, out) copies of in_proj and of the output projection for one
  sequence (in per-thread column pieces, eager), oneDNN's packed layout of every weight for
  2-64 (palm.kv_cache);
- ours native (--native): the same without those copies (`transposed_weights=False`);
- ours+compile: the same as ours with compile=True (the packed copies for 2-64, their products
  as palm's custom op, which Inductor keeps as a call; no copies for one sequence, whose one-row
  products Inductor lowers to its own reduction), the one-token step under torch.compile with a
  static-shape cache (gpt-fast's approach); compilation happens in an untimed warm-up;
- litgpt: `litgpt.model.GPT` configured PaLM-like as in benchmarks/train_step.py (parallel
  residual, shared LayerNorm, one key/value head, SwiGLU, no biases, tied head), its own
  preallocated KV cache (`set_kv_cache`) and its fastest eager loop (litgpt.generate.base's
  single-sequence path: `input_pos` a tensor, `input_pos_maxp1` so attention reads only the
  filled part of the cache), greedy over the whole batch;
- hf gpt-neox: transformers' GPTNeoXForCausalLM of the same d_model/layers/heads/ffn/vocab
  (rotary on all dims, parallel residual) with generate(use_cache=True, do_sample=False);
- ours recompute (--recompute): every step re-runs the whole sequence (use_cache=False). Its
  cost grows with the length, so with --recompute_every K > 1 only every K-th step's forward
  is timed and the total is K times their sum (labelled "estimated").

Every contender runs `--rounds` times per cell, the order rotated each round (a shared machine
then slows all alike); the table gives medians with (min-max). The fp32 matmul peak is
measured in the same run, before and after (benchmarks/common.py), to place the machine, and
so is the memory read bandwidth (a large sum). Every decoding step multiplies a (batch, d) row
block by every weight matrix once, so the "matmuls only" column times exactly those products,
bare (best of 5 steps' worth, each weight in the fastest of its layouts: nn.Linear's, (in, out),
either in per-thread pieces, oneDNN's packed): the tokens/s no implementation built on these
kernels can pass at that size and batch (prompt, attention and everything else left out).

litgpt's package __init__ and its checkpoint-conversion module import `lightning`, which
nothing here needs (and whose pins conflict with this environment's huggingface-hub), so
without lightning installed only `litgpt.config` and `litgpt.model` are loaded: the model and
its KV cache exactly as published, with the unused conversion helper stubbed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout, like train_step.py
    sys.path.insert(0, str(ROOT))

from benchmarks.common import litgpt_palm_like, matmul_peak_flops
from palm.config import ModelConfig
from palm.cpu_kernels import (
    one_row_pieces,
    onednn_available,
    onednn_linear,
    onednn_pack,
    pieces_product,
    weight_pieces,
)
from palm.kv_cache import transposed
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


def litgpt(size: str):
    torch.manual_seed(0)
    return litgpt_palm_like(SIZES[size], block_size=1024).eval()


@torch.inference_mode()
def time_litgpt(model, prompt: torch.Tensor, new: int) -> float:
    """litgpt.generate.base.generate_fn's loop, greedy for a whole batch."""
    batch, length = prompt.shape
    start = time.perf_counter()
    model.clear_kv_cache()  # (else resizing warns about the previous run's cache)
    model.max_seq_length = length + new
    model.set_kv_cache(batch_size=batch, max_seq_length=length + new)
    logits = model(prompt, torch.arange(length), input_pos_maxp1=length)
    token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    out = [token]
    input_pos, maxp1 = torch.tensor([length]), length
    for _ in range(new - 1):
        maxp1 += 1
        logits = model(token, input_pos, input_pos_maxp1=maxp1)
        input_pos.add_(1)
        token = logits[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    assert torch.cat(out, 1).shape == (batch, new)
    return time.perf_counter() - start


@torch.no_grad()
def time_ours(
    model: PaLM, prompt: torch.Tensor, new: int, compile: bool = False, native: bool = False
) -> float:
    start = time.perf_counter()
    out = generate(
        model,
        prompt,
        new,
        temperature=0.0,
        compile=compile,
        cache_len=PROMPT + new,
        transposed_weights=False if native else None,
    )
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


def read_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Best bytes/s of summing a float32 tensor far larger than any cache (a streaming read)."""
    data = torch.ones(mib * 2**20 // 4)
    data.sum()  # page in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return data.numel() * 4 / best


@torch.no_grad()
def matmuls_only(model: PaLM, batch: int, repeats: int = 5) -> float:
    """Tokens/s of a decoding step that did nothing but its weight matmuls, each weight in the
    fastest of its layouts (nn.Linear's (out, in), an (in, out) copy, either in per-thread
    pieces, and where this torch has oneDNN, a copy packed in oneDNN's layout): best of
    repeats."""
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    weights.append(model.output_weight)  # the tied output projection
    inputs = [torch.randn(batch, w.shape[1]) for w in weights]
    layouts = [
        (weights, lambda x, w: torch.nn.functional.linear(x, w)),
        ([w.t().contiguous() for w in weights], lambda x, w_t: x @ w_t),
    ]
    pieces = [one_row_pieces(w.shape[0]) for w in weights]  # one per thread (palm.cpu_kernels)
    layouts += [
        ([transposed(w, pieces=p) for w, p in zip(weights, pieces)], pieces_product),
        ([weight_pieces(w, p) for w, p in zip(weights, pieces)], pieces_product),
    ]
    if onednn_available():
        layouts.append(([onednn_pack(w) for w in weights], onednn_linear))
    best = [[float("inf")] * len(weights) for _ in layouts]
    for _ in range(repeats + 1):  # the first pass warms up
        for layout, (copies, multiply) in enumerate(layouts):  # a whole step per layout
            for i, (x, w) in enumerate(zip(inputs, copies)):
                start = time.perf_counter()
                multiply(x, w)
                best[layout][i] = min(best[layout][i], time.perf_counter() - start)
    return batch / sum(min(times) for times in zip(*best))


def summary(rates: list[float]) -> str:
    if not rates:
        return "-"
    return f"{statistics.median(rates):,.0f} ({min(rates):,.0f}-{max(rates):,.0f})"


def ratio(rows: dict, a: str, b: str) -> str:
    if not rows.get(a) or not rows.get(b):
        return "-"
    return f"{statistics.median(rows[a]) / statistics.median(rows[b]):.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["S", "M"], choices=tuple(SIZES))
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    p.add_argument("--new_tokens", nargs="+", type=int, default=[128, 512])
    p.add_argument("--rounds", type=int, default=5, help="timed runs per contender and cell")
    p.add_argument("--no_compile", action="store_true", help="leave out ours+compile")
    p.add_argument("--skip_hf", action="store_true", help="no transformers baseline")
    p.add_argument("--skip_litgpt", action="store_true", help="no litgpt baseline")
    p.add_argument("--recompute", action="store_true", help="also time ours without cache")
    p.add_argument(
        "--native", action="store_true", help="also time ours with nn.Linear's layout only"
    )
    p.add_argument(
        "--recompute_every",
        type=int,
        default=1,
        help="time every K-th recompute step and scale by K (1 = all, exact)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    peak_before, bandwidth = matmul_peak_flops(), read_bandwidth()
    print(
        f"# torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, float32, CPU; "
        f"fp32 matmul peak {peak_before / 1e9:.0f} GFLOP/s (before), "
        f"read bandwidth {bandwidth / 1e9:.1f} GB/s",
        flush=True,
    )
    names = ["ours"] + (["ours native"] if args.native else [])
    names += [] if args.no_compile else ["ours+compile"]
    names += [] if args.skip_litgpt else ["litgpt"]
    names += [] if args.skip_hf else ["hf"]
    names += ["recompute"] if args.recompute else []
    header = "| size | batch | new | " + " | ".join(f"{n} tok/s" for n in names)
    header += " | matmuls only tok/s | ours/litgpt | ours+compile/litgpt | ours/hf |"
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|", flush=True)
    results = []
    for size in args.sizes:
        torch._dynamo.reset()  # compiled graphs of the previous size: keep under the limit
        models = {"ours": ours(size)}
        models["ours+compile"] = models["ours native"] = models["ours"]
        if not args.skip_litgpt:
            models["litgpt"] = litgpt(size)
        if not args.skip_hf:
            models["hf"] = neox(size)
        models["recompute"] = models["ours"]

        def run(name: str, prompt: torch.Tensor, new: int, models=models) -> float:
            model = models[name]
            if name in ("ours", "ours+compile", "ours native"):
                native = name == "ours native"
                return time_ours(model, prompt, new, name == "ours+compile", native)
            if name == "litgpt":
                return time_litgpt(model, prompt, new)
            if name == "hf":
                return time_neox(model, prompt, new)
            return time_recompute(model, prompt, new, args.recompute_every)

        for batch in args.batches:
            torch.manual_seed(batch)
            prompt = torch.randint(0, SIZES[size]["vocab_size"], (batch, PROMPT))
            for new in args.new_tokens:
                for name in names:  # warm-up (compilation for this cache shape) untimed
                    run(name, prompt, 8 if name != "ours+compile" else new)
                rates: dict[str, list[float]] = {n: [] for n in names}
                for r in range(args.rounds):
                    order = names[r % len(names) :] + names[: r % len(names)]
                    for name in order:
                        rates[name].append(batch * new / run(name, prompt, new))
                row = {"size": size, "batch": batch, "new_tokens": new, "tokens_per_s": rates}
                results.append(row)
                cells = " | ".join(summary(rates[n]) for n in names)
                bound = matmuls_only(models["ours"], batch)
                row["matmuls_only"] = bound
                print(
                    f"| {size} | {batch} | {new} | {cells} | {bound:,.0f} | "
                    f"{ratio(rates, 'ours', 'litgpt')} | "
                    f"{ratio(rates, 'ours+compile', 'litgpt')} | {ratio(rates, 'ours', 'hf')} |",
                    flush=True,
                )
    peak_after, bandwidth_after = matmul_peak_flops(), read_bandwidth()
    print(
        f"# fp32 matmul peak {peak_after / 1e9:.0f} GFLOP/s (after), "
        f"best {max(peak_before, peak_after) / 1e9:.0f}; read bandwidth "
        f"{bandwidth_after / 1e9:.1f} GB/s (after)"
    )
    if args.json:
        with open(args.json, "w") as handle:
            meta = {
                "matmul_peak_flops": [peak_before, peak_after],
                "read_bandwidth": [bandwidth, bandwidth_after],
            }
            json.dump({"meta": meta, "rows": results}, handle, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
