"""`palm info`: what a model costs before it is built (parameters, FLOPs, memory)."""

from __future__ import annotations

import argparse
import json
import sys

from palm.cli import run
from palm.config import PARALLEL, PRESETS, ModelConfig, load_model_config
from palm.flops import (
    DTYPE_BYTES,
    flops_per_token,
    parameter_counts,
    per_device_memory_bytes,
    training_memory_bytes,
)


def describe(config: ModelConfig, seq_len: int, dtype: str) -> dict:
    counts = parameter_counts(config)
    memory = training_memory_bytes(config, param_bytes=DTYPE_BYTES[dtype])
    return {
        "config": config.to_dict(),
        "parameters": counts,
        "seq_len": seq_len,
        "flops_per_token": flops_per_token(config, seq_len),
        "memory_bytes": {"dtype": dtype, **memory},
    }


def human(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def format_report(name: str, info: dict) -> str:
    p, m = info["parameters"], info["memory_bytes"]
    gib = lambda b: f"{b / 2**30:,.2f} GiB"  # noqa: E731
    c = info["config"]
    lines = [
        f"model {name}: {c['n_layers']} layers, d_model {c['d_model']}, "
        f"{c['n_heads']} heads x {c['head_dim']}, d_ff {int(c['ffn_mult'] * c['d_model'])}, "
        f"vocab {c['vocab_size']}",
        f"  parameters        {p['total']:>18,}  ({human(p['total'])})",
        f"  non-embedding     {p['non_embedding']:>18,}",
        f"  embedding         {p['embedding']:>18,}  (tied: {c['tie_embeddings']})",
        f"  FLOPs per token   {info['flops_per_token']:>18,.0f}  "
        f"(6N + 12LHQT at seq_len {info['seq_len']}, PaLM App. B)",
        f"  memory ({m['dtype']} weights/grads, float32 optimizer state):",
        f"    weights   {gib(m['weights'])}",
        f"    gradients {gib(m['gradients'])}",
        f"    optimizer {gib(m['optimizer'])}",
        f"    total     {gib(m['total'])}  (activations not included)",
    ]
    if "per_gpu" in info:
        g = info["per_gpu"]
        lines.append(
            f"  per GPU ({g['gpus']} GPUs, {g['parallel']}, micro-batch {g['micro_batch']}"
            f" x {info['seq_len']} tokens):"
        )
        lines += [f"    {k:<11} {gib(v)}" for k, v in g["bytes"].items()]
        verdict = "fits" if g["fits"] else "does NOT fit"
        lines.append(f"    -> {verdict} a {g['gpu_memory_gib']:g} GiB GPU")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palm info", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a named preset")
    source.add_argument("--config", help="a YAML config file (its `model` section)")
    parser.add_argument(
        "--seq_len",
        type=int,
        help="sequence length for the attention FLOPs (default: the model's max_seq_len)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_BYTES),
        default="float32",
        help="dtype of weights and gradients (default float32)",
    )
    plan = parser.add_argument_group("per-GPU memory of a data-parallel run")
    plan.add_argument("--gpus", type=int, default=0, help="devices the run is spread over")
    plan.add_argument("--parallel", choices=PARALLEL, default="fsdp")
    plan.add_argument("--micro_batch", type=int, default=1, help="sequences per device per pass")
    plan.add_argument("--activation_checkpointing", action="store_true")
    plan.add_argument("--gpu_memory_gib", type=float, default=80.0, help="memory of one GPU")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    args = parser.parse_args(argv)
    if args.gpus and args.parallel == "none" and args.gpus != 1:
        parser.error("--parallel none means one GPU; use ddp or fsdp for several")
    return run(lambda: report(args))


def report(args: argparse.Namespace) -> None:
    config = ModelConfig.preset(args.preset) if args.preset else load_model_config(args.config)
    seq_len = args.seq_len or config.max_seq_len
    info = describe(config, seq_len, args.dtype)
    if args.gpus:
        per_gpu = per_device_memory_bytes(
            config,
            args.gpus,
            args.parallel,
            args.micro_batch,
            seq_len,
            param_bytes=DTYPE_BYTES[args.dtype],
            act_bytes=2 if args.dtype != "float32" else 4,
            checkpointing=args.activation_checkpointing,
        )
        limit = args.gpu_memory_gib * 2**30
        info["per_gpu"] = {
            "gpus": args.gpus,
            "parallel": args.parallel,
            "micro_batch": args.micro_batch,
            "bytes": per_gpu,
            "gpu_memory_gib": args.gpu_memory_gib,
            "fits": per_gpu["total"] <= limit,
        }
    if args.json:
        json.dump({"name": args.preset or args.config, **info}, sys.stdout, indent=2)
        print()
    else:
        print(format_report(args.preset or args.config, info))


if __name__ == "__main__":
    sys.exit(main())
