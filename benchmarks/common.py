"""Shared helpers for the CPU benchmarks: medians, the fp32 matmul peak, process memory."""

from __future__ import annotations

import importlib.util
import statistics
import sys
import time
import types

import torch


def median(values: list[float]) -> float:
    return statistics.median(values)


def matmul_peak_flops(n: int = 3072, repeats: int = 5) -> float:
    """Best fp32 GEMM FLOP/s of a square torch.mm (n x n) @ (n x n) at the current thread count.

    The best of `repeats` rather than the median: this is the machine's achievable peak, the
    denominator of MFU, and on a shared machine the slower repeats only measure the neighbours.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up: page in, pick the kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def _status_kib(field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/self/status, in KiB (Linux only)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return _status_kib("VmRSS") * 1024


def peak_rss_bytes() -> int:
    """High-water mark of the resident set since the process began or `reset_peak_rss()`."""
    return _status_kib("VmHWM") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (writing 5 to /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def keep_freed_memory() -> bool:
    """Make glibc keep freed blocks for reuse in this process: blocks up to 1 GiB from the heap
    (by default every block above its adaptive mmap threshold, at most 32 MiB, is a fresh mmap,
    new pages the kernel faults in and zeroes on first touch) and the heap's free top never handed
    back. What jemalloc or tcmalloc preloaded would do, for measuring how much of a step is page
    faults. Not for the trainer: with some allocation orders glibc's heap then grows step after
    step (seen with two blocks freed and made again around small allocations). False where the
    C library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # another C library (musl) under that name
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # malloc.h
    return bool(
        libc.mallopt(m_mmap_threshold, 1 << 30) and libc.mallopt(m_trim_threshold, 2**31 - 1)
    )


def write_token_dataset(
    folder,
    splits: dict,
    vocab: int,
    eod_id: int,
    pad_id: int,
    seq_len: int,
    batch_size: int,
    name: str = "synthetic",
):
    """A prepared dataset in download.py's format, from {split: (tokens, n_documents)} and no
    tokenizer: for benchmarks that only need tokens to train on. Returns the folder."""
    from pathlib import Path

    import numpy as np

    from palm.data.manifest import Manifest

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries = {}
    for split, (tokens, n_documents) in splits.items():
        np.asarray(tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
        entries[split] = {"path": f"{split}.bin", "n_tokens": len(tokens), "sha256": ""}
        entries[split]["n_documents"] = n_documents
    manifest = Manifest(
        dataset=name,
        vocab_size=vocab,
        dtype="uint16",
        eod_id=eod_id,
        pad_id=pad_id,
        seq_len=seq_len,
        batch_size=batch_size,
        layout="combined",
        splits=entries,
        tokenizer_sha256="",
    )
    (folder / "meta.json").write_text(manifest.to_json())
    return folder


def import_litgpt():
    """litgpt's Config and GPT; without `lightning`, loaded past the package's __init__."""
    if "litgpt" not in sys.modules and importlib.util.find_spec("litgpt") is None:
        raise SystemExit(
            "error: litgpt is not installed; install the peer with "
            "`pip install litgpt==0.5.13 --no-deps` (README, Dependencies), or leave it out: "
            "train_step.py --models ours,palm-pytorch, decode.py --skip_litgpt"
        )
    try:
        from litgpt.config import Config
        from litgpt.model import GPT

        return Config, GPT
    except ModuleNotFoundError as error:
        if error.name != "lightning" or importlib.util.find_spec("litgpt") is None:
            raise
    for name in [m for m in sys.modules if m == "litgpt" or m.startswith("litgpt.")]:
        del sys.modules[name]
    package = types.ModuleType("litgpt")
    package.__path__ = list(importlib.util.find_spec("litgpt").submodule_search_locations)
    scripts = types.ModuleType("litgpt.scripts")
    convert = types.ModuleType("litgpt.scripts.convert_hf_checkpoint")
    convert.qkv_reassemble = None  # only used to load legacy checkpoints
    sys.modules.update({"litgpt": package, "litgpt.scripts": scripts, convert.__name__: convert})
    from litgpt.config import Config
    from litgpt.model import GPT

    return Config, GPT


def litgpt_palm_like(size: dict, block_size: int):
    """litgpt's GPT configured as PaLM (parallel residual with one shared LayerNorm, SwiGLU,
    multi-query attention, full RoPE, no biases, tied embeddings) at a benchmark size (keys
    vocab_size, d_model, n_layers, n_heads, head_dim; ffn 4x)."""
    Config, GPT = import_litgpt()
    config = Config(
        name="palm-like",
        block_size=block_size,
        vocab_size=size["vocab_size"],
        padded_vocab_size=size["vocab_size"],
        n_layer=size["n_layers"],
        n_head=size["n_heads"],
        n_embd=size["d_model"],
        head_size=size["head_dim"],
        n_query_groups=1,
        rotary_percentage=1.0,
        parallel_residual=True,
        shared_attention_norm=True,
        bias=False,
        norm_class_name="LayerNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=4 * size["d_model"],
    )
    model = GPT(config)
    model.lm_head.weight = model.transformer.wte.weight  # tied, as PaLM (same parameters)
    return model
