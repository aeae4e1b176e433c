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
            f"  per GPU ({g['gpus']} GPUs, {g['parallel']}, tensor parallel "
            f"{g['tensor_parallel']}, micro-batch {g['micro_batch']} x {info['seq_len']} tokens):"
        )
        lines += [f"    {k:<11} {gib(v)}" for k, v in g["bytes"].items()]
        verdict = "fits" if g["fits"] else "does NOT fit"
        lines.append(f"    -> {verdict} a {g['gpu_memory_gib']:g} GiB GPU")
    if "simulated" in info:
        s = info["simulated"]
        lines.append(f"  simulated peak of rank 0 (2 training steps, {s['seconds']:.0f} s here):")
        lines += [f"    {k:<19} {gib(v)}" for k, v in s["peak_bytes"].items()]
        analytic = info["per_gpu"]["bytes"]["total"]
        ratio = s["peak_bytes"]["total"] / max(analytic, 1)
        lines.append(f"    simulated / analytic total: {ratio:.2f}")
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
    plan.add_argument(
        "--tensor_parallel",
        type=int,
        default=1,
        help="ranks splitting each layer (train.tensor_parallel)",
    )
    plan.add_argument(
        "--simulate",
        action="store_true",
        help="also run two real training steps of rank 0 on this CPU (fake process group, "
        "FakeTensorMode, PyTorch's memory tracker) and print its peak by category",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    args = parser.parse_args(argv)
    if args.gpus and args.parallel == "none" and args.gpus != args.tensor_parallel:
        parser.error("--parallel none means one model replica: --gpus = --tensor_parallel")
    if args.simulate and not args.gpus:
        parser.error("--simulate needs --gpus (the size of the world to simulate)")
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
            # The trainer keeps float32 weights under bf16 autocast: so does the simulation.
            param_bytes=4 if args.simulate else DTYPE_BYTES[args.dtype],
            act_bytes=2 if args.dtype != "float32" else 4,
            checkpointing=args.activation_checkpointing,
            tensor_parallel=args.tensor_parallel,
        )
        limit = args.gpu_memory_gib * 2**30
        info["per_gpu"] = {
            "gpus": args.gpus,
            "parallel": args.parallel,
            "micro_batch": args.micro_batch,
            "bytes": per_gpu,
            "gpu_memory_gib": args.gpu_memory_gib,
            "fits": per_gpu["total"] <= limit,
            "tensor_parallel": args.tensor_parallel,
        }
    if args.simulate:
        from palm.simulate import simulate

        run_ = simulate(
            config,
            args.gpus,
            args.parallel,
            args.tensor_parallel,
            args.micro_batch,
            seq_len,
            args.activation_checkpointing,
            bf16=args.dtype != "float32",
        )
        info["simulated"] = {"peak_bytes": run_.peak_bytes, "seconds": run_.seconds}
    if args.json:
        json.dump({"name": args.preset or args.config, **info}, sys.stdout, indent=2)
        print()
    else:
        print(format_report(args.preset or args.config, info))


if __name__ == "__main__":
    sys.exit(main())
