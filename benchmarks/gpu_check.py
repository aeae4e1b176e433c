"""The first measurements on a GPU (issue 14), in one short run; `benchmarks/gpu_check.sh` calls it.

    python benchmarks/gpu_check.py --out benchmarks/gpu_check      # on a CUDA machine
    python benchmarks/gpu_check.py --cpu-dry-run --out /tmp/check  # every step, toy size, CPU

Measures and prints (and writes OUT.json and OUT.md):
- bf16 training tokens/s and MFU (PaLM Appendix B, against the GPU's dense bf16 data-sheet peak)
  for palm-350m at seq 2048, eager (with and without palm.block_autograd's node) and
  torch.compile'd (the model and PaLM Adafactor's update, as train.compile), and the peak memory;
- which SDPA kernel runs under bf16 (flash / memory-efficient / cuDNN; never the math fallback);
- cached greedy decoding tokens/s at batch 1 and 8, eager and compiled (CUDA graphs);
- the fused output projection + loss at PaLM's 256k vocabulary: time and peak memory per chunk
  size (the sweep behind palm.flops.MIN_CHUNK_TOKENS["cuda"]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm.compiled_decoding import CompiledDecoder
from palm.config import ModelConfig
from palm.flops import flops_per_token
from palm.loss import linear_lm_loss
from palm.metrics import peak_flops
from palm.model import PaLM
from palm.optim import PaLMAdafactor
from palm.sampling import generate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


# The eager rows first (--skip-compile keeps only those two).
TRAINING_VARIANTS = ("eager", "eager, plain block middle", "eager, compiled Adafactor", "compiled")


def training(config, batch, seq, steps, device, variant) -> dict:
    """Tokens/s, MFU and peak memory of bf16 training steps (forward, fused loss, backward,
    clipping, PaLM Adafactor), after warm-up (compilation included there). "eager, plain block
    middle" leaves out palm.block_autograd's node (split + RoPE + SwiGLU as plain ops): an A/B.
    "eager, compiled Adafactor": the eager model with the two-pass compiled update instead of
    the eleven foreach passes (the eager update took 11% of the H200's eager step)."""
    torch.manual_seed(0)
    compiled = variant == "compiled"
    model = PaLM(config).to(device)
    if variant == "eager, plain block middle":
        for block in model.blocks:
            block.one_node_middle = lambda *args: False
    step_module = torch.compile(model) if compiled else model
    # Compiled as train.compile does: the model and the optimizer update.
    compiled_update = compiled or variant == "eager, compiled Adafactor"
    optimizer = PaLMAdafactor(model.parameters(), lr=1e-2, compiled=compiled_update)
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1), device=device)

    def step() -> None:
        with autocast(device):
            out = step_module(tokens[:, :-1], targets=tokens[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for _ in range(2):
        step()
    sync(device)
    warmup = time.perf_counter() - started
    reset_peak(device)
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    tokens_per_s = batch * seq / seconds
    peak, source = peak_flops(device, torch.bfloat16)
    return {
        "variant": variant,
        "batch x seq": f"{batch} x {seq}",
        "step_s_median": round(seconds, 4),
        "step_s_range": [round(min(times), 4), round(max(times), 4)],
        "tokens_per_s": round(tokens_per_s),
        "mfu": round(tokens_per_s * flops_per_token(config, seq) / peak, 4),
        "peak_flops_source": source,
        "peak_memory_gib": peak_gib(device),
        "warmup_s": round(warmup, 1),
    }


def sdpa_backend(config, device) -> str:
    """The attention kernel the bf16 training step runs: the aten op SDPA dispatched to."""
    from torch.profiler import ProfilerActivity, profile

    model = PaLM(config).to(device)
    tokens = torch.randint(0, config.vocab_size, (2, 257), device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with autocast(device):
            model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
        sync(device)
    names = {e.key for e in prof.key_averages()}
    # By the aten op SDPA dispatched to: kernel names mislead (cuDNN's contain "flash").
    found = [
        kernel
        for kernel, op in (
            ("flash", "aten::_scaled_dot_product_flash_attention"),
            ("flash (CPU)", "aten::_scaled_dot_product_flash_attention_for_cpu"),
            ("cudnn", "aten::_scaled_dot_product_cudnn_attention"),
            ("memory-efficient", "aten::_scaled_dot_product_efficient_attention"),
            ("math (fallback)", "aten::_scaled_dot_product_attention_math"),
        )
        if op in names
    ]
    return " + ".join(found) or "unknown"


def shared_head(config, batch, seq, device) -> dict:
    """Multi-query attention's one key/value head given to SDPA as an expanded view (what the
    model does) or with enable_gqa=True: forward + backward seconds of one layer's attention."""
    import torch.nn.functional as F

    shape = (batch, config.n_heads, seq, config.head_dim)
    q = torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=True)
    k, v = (
        torch.randn(
            (batch, 1, seq, config.head_dim),
            device=device,
            dtype=torch.bfloat16,
            requires_grad=True,
        )
        for _ in range(2)
    )

    def run(gqa: bool) -> float:
        times = []
        for _ in range(5):
            started = time.perf_counter()
            if gqa:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(
                    q, k.expand(shape), v.expand(shape), is_causal=True
                )
            out.sum().backward()
            sync(device)
            times.append(time.perf_counter() - started)
        return round(statistics.median(times[1:]), 5)

    return {"expanded_view_s": run(False), "enable_gqa_s": run(True)}


def decoding(config, batch, new_tokens, device, compiled=False) -> dict:
    """Greedy decoding tokens/s (prompt of 32 included), eager or with the compiled one-token
    step (`generate(compile=True)`: CUDA graphs on CUDA; compilation in an untimed warm-up).
    Compiled requests share one long-lived cache (`CompiledDecoder`, as `generate --interactive
    --compile`), so the timed ones replay the graph the warm-up recorded."""
    torch.manual_seed(0)
    model = PaLM(config).to(device).eval()
    prompt = torch.randint(0, config.vocab_size, (batch, 32), device=device)
    decoder = CompiledDecoder(model) if compiled else None

    def run(n: int) -> Tensor:
        return generate(model, prompt, n, temperature=0.0, compile=compiled, decoder=decoder)

    with autocast(device):
        started = time.perf_counter()
        run(new_tokens)  # warm-up (compilation, graph recording): the same lengths as timed
        sync(device)
        warmup = time.perf_counter() - started
        times = []
        for _ in range(3):
            started = time.perf_counter()
            tokens = run(new_tokens)
            sync(device)
            times.append(time.perf_counter() - started)
    seconds = statistics.median(times)
    return {
        "batch": batch,
        "new_tokens": new_tokens,
        "compiled": compiled,
        "tokens_per_s": round(batch * new_tokens / seconds),
        "warmup_s": round(warmup, 1),
        "tokens": tokens.cpu(),
    }


def greedy_agreement(eager: Tensor, compiled: Tensor) -> float:
    """Share of positions, up to each row's first difference, where the compiled path's greedy
    tokens equal eager's (bf16 rounding may flip a near-tie; after that the rows diverge)."""
    same = (eager == compiled).long().cumprod(dim=1)
    return round(same.float().mean().item(), 4)


def decoding_rows(config, new_tokens, device, batches=(1, 8), compiled=True) -> list[dict]:
    """Eager and (unless `compiled` is False) compiled decoding, per batch size."""
    rows = []
    for batch in batches:
        eager = decoding(config, batch, new_tokens, device)
        pair = [eager]
        if compiled:
            fast = decoding(config, batch, new_tokens, device, compiled=True)
            fast["greedy_prefix_agreement"] = greedy_agreement(eager["tokens"], fast["tokens"])
            pair.append(fast)
        for row in pair:
            del row["tokens"]
            rows.append(row)
            print(f"decoding: {row}", flush=True)
    return rows


def chunk_sweep(d_model, vocab, tokens, chunks, device) -> list[dict]:
    """The fused output projection + loss alone (forward and backward) by chunk size."""
    torch.manual_seed(0)
    hidden = torch.randn(tokens, d_model, device=device, requires_grad=True)
    weight = torch.randn(vocab, d_model, device=device, requires_grad=True)
    targets = torch.randint(0, vocab, (tokens,), device=device)
    rows = []
    for chunk in chunks:
        reset_peak(device)
        times = []
        for _ in range(3):
            started = time.perf_counter()
            with autocast(device):
                linear_lm_loss(hidden, weight, targets, chunk_tokens=chunk).loss.backward()
            sync(device)
            times.append(time.perf_counter() - started)
            hidden.grad = weight.grad = None
        rows.append(
            {
                "chunk_tokens": chunk,
                "seconds_median": round(statistics.median(times), 4),
                "peak_memory_gib": peak_gib(device),
            }
        )
    return rows


def markdown(results: dict) -> str:
    lines = [f"GPU check: {results['device']}, torch {results['torch']}", ""]
    if "training" in results:
        lines += [
            "| training (bf16) | step s | tokens/s | MFU | peak GiB |",
            "|---|---|---|---|---|",
        ]
        for row in results["training"]:
            name = f"{results['model']} {row['variant']}"
            lines.append(
                f"| {name}, {row['batch x seq']} | {row['step_s_median']} "
                f"| {row['tokens_per_s']:,} | {row['mfu']:.1%} | {row['peak_memory_gib']} |"
            )
        lines += [""]
    if "sdpa_backend" in results:
        lines += [f"SDPA kernel under bf16: {results['sdpa_backend']}; shared key/value head, "]
        lines[-1] += f"expanded view vs enable_gqa (s, fwd+bwd): {results['shared_kv_head']}"
        lines += [""]
    if "decoding" in results:
        lines += ["| decoding (KV cache, greedy) | tokens/s | warm-up s | greedy agreement |"]
        lines += ["|---|---|---|---|"]
        lines += [
            f"| batch {r['batch']}, {r['new_tokens']} new, "
            f"{'compiled' if r['compiled'] else 'eager'} | {r['tokens_per_s']:,} "
            f"| {r['warmup_s']} | {r.get('greedy_prefix_agreement', '')} |"
            for r in results["decoding"]
        ]
        lines += [""]
    if "chunk_sweep" in results:
        lines += ["| fused loss, chunk tokens | seconds | peak GiB |", "|---|---|---|"]
        lines += [
            f"| {r['chunk_tokens']} | {r['seconds_median']} | {r['peak_memory_gib']} |"
            for r in results["chunk_sweep"]
        ]
    return "\n".join(lines) + "\n"


PARTS = ("training", "sdpa", "decoding", "chunks")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    parser.add_argument("--cpu-dry-run", action="store_true", help="every step at toy size")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile anywhere")
    parser.add_argument(
        "--only", nargs="+", choices=PARTS, default=list(PARTS), help="run these parts alone"
    )
    args = parser.parse_args()
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA GPU here; use --cpu-dry-run to test the script")
    device = torch.device("cpu" if dry else "cuda")
    if dry:
        config = ModelConfig.preset("palm-tiny", max_seq_len=64)
        batch, seq, steps, vocab, sweep_tokens = 2, 64, 2, 4096, 256
        chunks, decode_tokens = [64, 256], 8
    else:
        config = ModelConfig.preset("palm-350m")  # 2048 context, 32k vocabulary
        batch, seq, steps, vocab, sweep_tokens = 8, 2048, 10, 256_000, 8 * 2048
        chunks, decode_tokens = [256, 1024, 4096, 16_384], 256
    results = {
        "device": "cpu (dry run)" if dry else torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": "palm-tiny" if dry else "palm-350m",
    }
    if "training" in args.only:
        results["training"] = []
        for variant in TRAINING_VARIANTS[:2] if args.skip_compile else TRAINING_VARIANTS:
            row = training(config, batch, seq, steps, device, variant)
            results["training"].append(row)
            print(f"training {variant}: {row}", flush=True)
    if "sdpa" in args.only:
        sdpa_config = dataclasses.replace(config, max_seq_len=512)
        results["sdpa_backend"] = sdpa_backend(sdpa_config, device)
        print(f"sdpa: {results['sdpa_backend']}", flush=True)
        results["shared_kv_head"] = shared_head(config, batch, seq, device)
        print(f"shared key/value head: {results['shared_kv_head']}", flush=True)
    if "decoding" in args.only:
        # The dry run decodes batch 1 alone: batch 8 would only compile the step a second time.
        batches = (1,) if dry else (1, 8)
        compiled = not args.skip_compile
        results["decoding"] = decoding_rows(config, decode_tokens, device, batches, compiled)
    if "chunks" in args.only:
        results["chunk_sweep"] = chunk_sweep(config.d_model, vocab, sweep_tokens, chunks, device)
        print(f"chunk sweep: {results['chunk_sweep']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    args.out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
