"""One training step (forward, loss, backward, AdamW), float32 on 2 CPU threads: ours vs peers.

Peers at the same sizes, with the same parameters taking part in the same matmuls:
- palm-pytorch: lucidrains' `palm_pytorch.PaLM` (PyPI palm-pytorch 0.2.2), the same PaLM block;
- litgpt: `litgpt.model.GPT` configured PaLM-like (parallel residual, one shared LayerNorm,
  multi-query attention, SwiGLU "LLaMAMLP", no biases, full RoPE), its output head tied to the
  embedding as PaLM's is, so it has the same parameters (and optimizer work) as the others.

Timing: all models live in one process and are alternated step by step for several rounds
(the order rotated each round); each model's figure is the median of its step times. On a
shared machine this keeps the ratios steady where separate processes swing by +-30%.
MFU = tokens/s * model FLOPs per token (PaLM Appendix B, palm.flops) / fp32 matmul peak, the
best large torch.mm measured at 2 threads in the same run (before and after the steps).

Memory: each model trains in a fresh subprocess; we report the resident set's high-water mark
over a few steady steps (VmHWM, reset via /proc/self/clear_refs after the warm-up steps) minus
the RSS after imports, i.e. what that model's training adds to the process: weights, gradients,
AdamW moments, activations and allocator slack ("the RSS after imports": the model's modules
are imported first, but no model is built, whose freed memory the measured one would reuse).
The whole-run peak (VmHWM including the first step and, with --compile, compilation) is
reported beside it, and so is the allocator-independent peak of live tensors in one step
(the profiler's allocation record replayed, plus weights and optimizer state), and the memory
the kernel faulted in per steady step (minor faults x page size): under glibc's default malloc
every freed block above 32 MiB is unmapped and faulted in again the next step, a cost that
lands in each model's step time; `--host-allocator keep` makes glibc keep such blocks.

The loss is each project's own training loss: cross-entropy on whole logits for the peers;
for ours what palm's trainer runs, `model(tokens, targets=...)`, i.e. cross-entropy plus PaLM's
z-loss fused with the output projection (palm.loss.linear_lm_loss), never whole (B, T, V)
logits.

    python benchmarks/train_step.py --sizes S,M --rounds 5 --steps-per-round 1 --json out.json
    python benchmarks/train_step.py --quick          # smoke test, under a minute
    python benchmarks/train_step.py --sizes S --breakdown   # + where each model's time goes
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import (
    import_litgpt,
    keep_freed_memory,
    litgpt_palm_like,
    matmul_peak_flops,
    median,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
)
from palm.config import ModelConfig
from palm.flops import flops_per_token
from palm.profiling import peak_tensor_bytes

THREADS = 2
SIZES = {
    "S": dict(
        vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, seq_len=256, batch_size=8
    ),
    "M": dict(
        vocab_size=32_000,
        d_model=512,
        n_layers=8,
        n_heads=8,
        head_dim=64,
        seq_len=512,
        batch_size=4,
    ),
}
MODELS = ("ours", "palm-pytorch", "litgpt")
MODULES = {
    "ours": "palm.model",
    "ours-plain": "palm.model",
    "palm-pytorch": "palm_pytorch",
    "litgpt": "litgpt.model",
}
COMPILED = ("ours", "litgpt")  # the variants --compile adds, as "<name>+compile"


def palm_config(size: dict) -> ModelConfig:
    return ModelConfig(
        vocab_size=size["vocab_size"],
        d_model=size["d_model"],
        n_layers=size["n_layers"],
        n_heads=size["n_heads"],
        head_dim=size["head_dim"],
        ffn_mult=4.0,
        max_seq_len=size["seq_len"],
    )


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


LossFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def logits_cross_entropy(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    return cross_entropy(model(tokens), targets)


def palm_loss(model: nn.Module, tokens: Tensor, targets: Tensor) -> Tensor:
    # What palm's trainer runs: PaLM's loss, cross-entropy + 1e-4 * log(Z)^2 (z-loss, §5),
    # fused with the output projection (palm.loss.linear_lm_loss: no whole (B, T, V) logits).
    return model(tokens, targets=targets, z_loss_coef=1e-4).loss


def build(name: str, size: dict) -> tuple[nn.Module, LossFn]:
    """The model and its loss (model, tokens, targets) -> scalar, as each project trains."""
    s = size
    if name in ("ours", "ours-plain"):
        from palm.model import PaLM

        model = PaLM(palm_config(s))
        if name == "ours-plain":  # without eager training's one-node block middle (an A/B)
            for block in model.blocks:
                block.one_node_middle = lambda *args: False
        return model, palm_loss
    if name == "palm-pytorch":
        from palm_pytorch import PaLM as PeerPaLM

        model = PeerPaLM(
            num_tokens=s["vocab_size"],
            dim=s["d_model"],
            depth=s["n_layers"],
            dim_head=s["head_dim"],
            heads=s["n_heads"],
            ff_mult=4,
        )
        return model, logits_cross_entropy
    if name == "litgpt":  # imported also without lightning (benchmarks/common.py)
        return litgpt_palm_like(s, block_size=s["seq_len"]), logits_cross_entropy
    raise ValueError(f"unknown model {name!r}; choose from {MODELS} or ours-plain")


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied one once


def make_step(
    model: nn.Module, loss_fn: LossFn, compile: bool
) -> Callable[[Tensor, Tensor], float]:
    """A full training step: forward, loss, backward, AdamW step, zero the gradients."""
    model.train()
    # Default AdamW, the same for every model: on a CPU its per-parameter loop (PyTorch picks
    # foreach only for CUDA tensors; the profile shows one aten::lerp_ per parameter).
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def forward_loss(tokens: Tensor, targets: Tensor) -> Tensor:
        return loss_fn(model, tokens, targets)

    forward = torch.compile(forward_loss) if compile else forward_loss

    def step(tokens: Tensor, targets: Tensor) -> float:
        loss = forward(tokens, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step.optimizer = optimizer
    return step


def split_label(label: str) -> tuple[str, bool]:
    name, _, suffix = label.partition("+")
    return name, suffix == "compile"


def batch(size: dict) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(0)
    data = torch.randint(
        0, size["vocab_size"], (size["batch_size"], size["seq_len"] + 1), generator=generator
    )
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def warmed_step(label: str, size: dict, tokens: Tensor, targets: Tensor, warmup: int):
    """(model, its training step, the warm-up losses, the warm-up seconds) for `label`, built
    from seed 0 and stepped `warmup` times (compiled: once more, for compilation)."""
    name, compiled = split_label(label)
    torch.manual_seed(0)
    model, loss_fn = build(name, size)
    step = make_step(model, loss_fn, compiled)
    start = time.perf_counter()
    losses = [step(tokens, targets) for _ in range(warmup + (1 if compiled else 0))]
    return model, step, losses, time.perf_counter() - start


def time_models(
    labels: list[str], size: dict, rounds: int, steps_per_round: int, warmup: int
) -> dict[str, dict]:
    """Build every model, warm each up, then alternate them step by step; median step times."""
    tokens, targets = batch(size)
    steps, results = {}, {}
    for label in labels:
        model, steps[label], losses, seconds = warmed_step(label, size, tokens, targets, warmup)
        results[label] = {"params": parameter_count(model), "times": [], "losses": losses}
        results[label]["warmup_s"] = seconds
    for r in range(rounds):
        order = labels[r % len(labels) :] + labels[: r % len(labels)]  # rotate the order
        for label in order:
            for _ in range(steps_per_round):
                start = time.perf_counter()
                loss = steps[label](tokens, targets)
                results[label]["times"].append(time.perf_counter() - start)
                results[label]["losses"].append(loss)
    n_tokens = size["batch_size"] * size["seq_len"]
    for res in results.values():
        res["step_s"] = median(res["times"])
        res["tokens_per_s"] = n_tokens / res["step_s"]
    return results


def memory_worker(label: str, size_name: str, warmup: int, steps: int) -> dict:
    """Run in a fresh process: what training `label` adds to the resident set."""
    torch.set_num_threads(THREADS)
    size = SIZES[size_name]
    name, compiled = split_label(label)
    tokens, targets = batch(size)
    # Import the model's modules (litgpt's alone add ~250 MiB) before taking the baseline, but
    # build nothing: the freed memory of a throwaway model would be reused by the measured one
    # and hide that much of its peak.
    if name == "litgpt":
        import_litgpt()
    else:
        importlib.import_module(MODULES[name])
    baseline = rss_bytes()
    torch.manual_seed(0)
    model, loss_fn = build(name, size)
    step = make_step(model, loss_fn, compiled)
    for _ in range(warmup + (1 if compiled else 0)):  # allocates the AdamW moments, compiles
        step(tokens, targets)
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over fork and exec, so a worker would
    # report its (large) parent's peak; VmHWM belongs to the process's own address space.
    warmup_peak = peak_rss_bytes()
    reset = reset_peak_rss()
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(steps):
        step(tokens, targets)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    steady = peak_rss_bytes()
    return {
        "baseline_rss": baseline,
        "steady_peak": (steady - baseline) if reset else None,
        "run_peak": max(warmup_peak, steady) - baseline,
        "tensor_peak": tensor_peak_bytes(model, step, tokens, targets),
        # Pages the kernel faulted in (and zeroed) per steady step: memory the allocator gave
        # back and took again (glibc unmaps every freed block above 32 MiB).
        "faulted_per_step": faults * resource.getpagesize() / steps,
    }


def tensor_peak_bytes(model: nn.Module, step: Callable, tokens: Tensor, targets: Tensor) -> int:
    """Bytes of tensors alive at the peak of one training step, whatever the allocator keeps.

    The resident set also counts memory that malloc holds after tensors are freed (glibc keeps
    freed blocks under its mmap threshold for reuse, fragmented), which depends on the order
    and sizes of allocations more than on what the model needs. This is the other view: the
    profiler's record of every tensor allocation and free in one step, replayed for its
    maximum, plus what lives between steps (weights, optimizer state).
    """
    return peak_tensor_bytes(lambda: step(tokens, targets)) + persistent_bytes(
        model, step.optimizer
    )


def persistent_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Weights plus the optimizer state held between steps (distinct storages counted once),
    and any tensors a module keeps as attributes between steps (palm's attention keeps its
    probabilities' memory for the next step: palm.attention_autograd)."""
    storages = {}
    tensors = list(model.parameters())
    tensors += [t for state in optimizer.state.values() for t in state.values()]
    for module in model.modules():
        for value in vars(module).values():
            tensors += value if isinstance(value, list) else [value]
    for t in tensors:
        if isinstance(t, Tensor):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure_memory(label: str, size_name: str, warmup: int, steps: int, allocator: str) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--memory-worker",
        label,
        "--sizes",
        size_name,
        "--warmup",
        str(warmup),
        "--memory-steps",
        str(steps),
        "--host-allocator",
        allocator,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


# oneDNN's linear (palm.cpu_kernels: the fused loss's logits on CPU) is a GEMM too.
LINEAR_OP = "mkldnn::_linear_pointwise"
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_", LINEAR_OP)


def gemm_flops(op: str, shapes: list) -> float:
    """2 M K N (times the batch) of one GEMM call from the profiler's input shapes."""
    if op in ("aten::addmm", "aten::addmm_", "aten::baddbmm"):
        shapes = shapes[1:]  # (input to add, a, b)
    a, b = shapes[0], shapes[1]
    if op == LINEAR_OP:  # x (M, K) @ w (N, K).T
        return 2.0 * a[0] * a[1] * b[0]
    if len(a) == 3:  # bmm / baddbmm: (batch, M, K) @ (batch, K, N)
        return 2.0 * a[0] * a[1] * a[2] * b[2]
    return 2.0 * a[0] * a[1] * b[1]


# SDPA; palm.attention_autograd as an autograd Function (eager) and as a custom op (compiled)
ATTENTION_OPS = ("scaled_dot_product", "_CausalMQA", "palm::causal_mqa")


def in_attention(event) -> bool:
    """Whether a profiled op is attention: an attention op or one called inside it (the
    batched matmuls and softmax of palm's multi-query tiles count as attention, not GEMMs)."""
    while event is not None:
        if any(name in event.name for name in ATTENTION_OPS):
            return True
        event = event.cpu_parent
    return False


def breakdown(labels: list[str], size: dict, warmup: int, steps: int = 5) -> dict[str, dict]:
    """Where the time of a step goes (profiler, self CPU time, of `steps` profiled steps per
    model the one with the median total, the models alternated step by step so that a slow spell
    of a shared machine hits all of them; a mean let one slow step move a model's GEMM time by
    10%): GEMMs of the output projection (those with a vocabulary-sized dimension) and of the
    rest, each with its FLOPs and so its GFLOP/s, attention kernels, everything else.

    The GEMMs are the same FLOPs in all three models, and attention is one fused kernel or a
    few batched matmuls, so GEMM + attention is a floor that no eager rewrite of the rest of
    the model can go below; the GFLOP/s say whether a model's GEMMs are slower (shapes,
    layouts, fresh memory) or merely more.
    """
    from torch.profiler import ProfilerActivity, profile

    tokens, targets = batch(size)
    keys = ("gemm_s", "gemm_flops", "head_gemm_s", "head_gemm_flops", "attention_s", "total_s")
    steps_of = {label: warmed_step(label, size, tokens, targets, warmup)[1] for label in labels}
    profiled: dict[str, list[dict]] = {label: [] for label in labels}
    for _ in range(steps):
        for label in labels:
            with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
                steps_of[label](tokens, targets)
            totals = dict.fromkeys(keys, 0.0)
            for event in prof.events():
                seconds = event.self_cpu_time_total / 1e6
                totals["total_s"] += seconds
                if in_attention(event):
                    totals["attention_s"] += seconds
                elif event.name in GEMM_OPS:
                    dims = {d for shape in event.input_shapes for d in shape}
                    part = "head_gemm" if size["vocab_size"] in dims else "gemm"
                    totals[f"{part}_s"] += seconds
                    totals[f"{part}_flops"] += gemm_flops(event.name, event.input_shapes)
            profiled[label].append(totals)
    return {
        label: sorted(runs, key=lambda totals: totals["total_s"])[len(runs) // 2]
        for label, runs in profiled.items()
    }


def breakdown_report(size_name: str, results: dict) -> str:
    lines = [
        f"**{size_name}**, profiled steps per model (self CPU time per step, s; GEMM GFLOP/s):",
        "",
        "| model | total | GEMMs | of which output projection | GEMM GFLOP/s (block, output "
        "projection) | attention | rest | GEMM + attention share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, res in results.items():
        b = res.get("breakdown")
        if b is None:
            continue
        gemm = b["gemm_s"] + b["head_gemm_s"]
        rest = b["total_s"] - gemm - b["attention_s"]
        share = (gemm + b["attention_s"]) / b["total_s"]
        rate = lambda f, t: f"{f / t / 1e9:.0f}" if t else "-"
        lines.append(
            f"| {label} | {b['total_s']:.3f} | {gemm:.3f} | {b['head_gemm_s']:.3f} | "
            f"{rate(b['gemm_flops'], b['gemm_s'])}, {rate(b['head_gemm_flops'], b['head_gemm_s'])}"
            f" | {b['attention_s']:.3f} | {rest:.3f} | {share:.0%} |"
        )
    ours = results.get("ours", {}).get("breakdown")
    if ours:
        # The profiler slows every op a little; scale the floor to the timed step.
        floor_s = ours["gemm_s"] + ours["head_gemm_s"] + ours["attention_s"]
        floor = results["ours"]["step_s"] * floor_s / ours["total_s"]
        lines.append("")
        for peer in ("palm-pytorch", "litgpt"):
            if peer in results:
                lines.append(
                    f"Ours with everything but its GEMMs and attention free ({floor:.3f} s a "
                    f"step) would be {results[peer]['step_s'] / floor:.2f}x {peer}'s timed step."
                )
    return "\n".join(lines)


def mib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.0f}"


def report(size_name: str, size: dict, results: dict, peak: float, reference: str) -> str:
    config = palm_config(size)
    fpt = flops_per_token(config, size["seq_len"])
    ref = results[reference]["tokens_per_s"] if reference in results else None
    pp = results["palm-pytorch"]["tokens_per_s"] if "palm-pytorch" in results else None
    lines = [
        f"**{size_name}**: vocab {size['vocab_size']}, d_model {size['d_model']}, "
        f"{size['n_layers']} layers, {size['n_heads']} heads x {size['head_dim']}, ffn 4x, "
        f"seq {size['seq_len']}, batch {size['batch_size']}; "
        f"{fpt / 1e6:.1f} MFLOP/token (6N + 12LHQT)",
        "",
        "| model | params | step (s, median) | tokens/s | MFU | vs palm-pytorch | vs litgpt "
        "eager | peak RSS, steady (MiB) | peak RSS, whole run (MiB) | peak tensors (MiB) | "
        "page faults per step (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ratio = lambda tps, base: f"{tps / base:.2f}x" if base else "-"
    for label, res in results.items():
        tps = res["tokens_per_s"]
        mem = res.get("memory", {})
        lines.append(
            f"| {label} | {res['params'] / 1e6:.2f}M | {res['step_s']:.3f} | {tps:,.0f} | "
            f"{tps * fpt / peak:.1%} | {ratio(tps, pp)} | {ratio(tps, ref)} | "
            f"{mib(mem.get('steady_peak'))} | {mib(mem.get('run_peak'))} | "
            f"{mib(mem.get('tensor_peak'))} | {mib(mem.get('faulted_per_step'))} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="S,M", help="comma-separated: S, M")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-round", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model")
    parser.add_argument(
        "--compile", action="store_true", help=f"also time torch.compile'd {', '.join(COMPILED)}"
    )
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=5,
        help="steady steps per memory subprocess (0: skip memory)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also profile 5 steps per model (compiled ones too), the median one: GEMM, "
        "attention, other time",
    )
    parser.add_argument(
        "--host-allocator",
        choices=("system", "keep"),
        default="system",
        help="keep: glibc keeps freed blocks for reuse (no page faults per step), for every model "
        "alike (benchmarks.common.keep_freed_memory)",
    )
    parser.add_argument("--json", type=Path, help="write all figures here")
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: size S, 2 rounds of 1 step, 1 memory step"
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.host_allocator == "keep" and not keep_freed_memory():
        parser.error("--host-allocator keep needs glibc's mallopt (Linux with glibc)")
    if args.memory_worker:
        print(
            json.dumps(
                memory_worker(args.memory_worker, args.sizes, args.warmup, args.memory_steps)
            )
        )
        return
    if args.quick:
        args.sizes, args.rounds, args.steps_per_round, args.memory_steps = "S", 2, 1, 1

    torch.set_num_threads(THREADS)
    labels = args.models.split(",")
    if args.compile:
        labels += [f"{name}+compile" for name in COMPILED if name in labels]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, host allocator "
        f"{args.host_allocator}; models: {', '.join(labels)}",
        flush=True,
    )
    peak_before = matmul_peak_flops()
    print(f"fp32 matmul peak (before): {peak_before / 1e9:.1f} GFLOP/s", flush=True)
    all_results, tables = {}, []
    for size_name in args.sizes.split(","):
        size = SIZES[size_name]
        results = time_models(labels, size, args.rounds, args.steps_per_round, args.warmup)
        for label, res in results.items():
            print(
                f"  {size_name} {label}: {res['params']:,} params, median step "
                f"{res['step_s']:.3f}s of {[round(t, 3) for t in res['times']]}",
                flush=True,
            )
        all_results[size_name] = results
    peak_after = matmul_peak_flops()
    peak = max(peak_before, peak_after)
    print(f"fp32 matmul peak (after): {peak_after / 1e9:.1f} GFLOP/s", flush=True)
    if args.memory_steps:
        for size_name, results in all_results.items():
            for label in results:
                results[label]["memory"] = measure_memory(
                    label, size_name, args.warmup, args.memory_steps, args.host_allocator
                )
    if args.breakdown:
        for size_name, results in all_results.items():
            parts = breakdown(list(results), SIZES[size_name], args.warmup)
            for label, part in parts.items():
                results[label]["breakdown"] = part
    for size_name, results in all_results.items():
        tables.append(report(size_name, SIZES[size_name], results, peak, "litgpt"))
        if args.breakdown:
            tables.append(breakdown_report(size_name, results))
    print(
        f"\nfp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (best of torch.mm 3072^3, "
        f"{THREADS} threads; before {peak_before / 1e9:.1f}, after {peak_after / 1e9:.1f})\n"
    )
    print("\n\n".join(tables))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "threads": THREADS,
                    "torch": torch.__version__,
                    "matmul_peak_flops": peak,
                    "matmul_peak_before": peak_before,
                    "matmul_peak_after": peak_after,
                    "command": " ".join(sys.argv),
                    "sizes": {k: SIZES[k] for k in all_results},
                    "results": all_results,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
