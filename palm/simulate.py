"""A dry run of a training plan on one CPU (`palm info --simulate`): PaLM §4's scale without its
chips. This process plays rank 0 of a world of `gpus` ranks on PyTorch's fake process group
(collectives return at once); the real model and the real parallelisation (palm.parallel:
tensor parallel, FSDP2) are built on the meta device, then real training steps (forward, the
fused loss, backward, PaLM Adafactor) run under FakeTensorMode, where tensors have shapes and
devices but no storage and no arithmetic. PyTorch's memory tracker (FSDPMemTracker under FSDP,
else MemTracker) records what that one rank would hold at its peak, by category.

What it cannot see: allocator fragmentation and caching, communication buffers the fake
process group never allocates, and CUDA kernels' workspaces; it runs on the CPU, so the fused
loss uses the CPU's chunk size (palm.flops.CHUNK_BYTES).
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from palm.config import ModelConfig
from palm.distributed import Distributed
from palm.dtensor import global_row_offset
from palm.errors import ConfigError
from palm.model import PaLM
from palm.optim import build_optimizer
from palm.parallel import (
    _broadcast_copies,
    _checkpoint_blocks,
    check_tensor_parallel,
    device_mesh,
    shard_blocks,
    tensor_parallelize,
)

# The tracker's categories, as `palm info` names them.
CATEGORIES = {
    "Sharded Param": "parameters",
    "Unsharded Param": "gathered parameters",
    "Buffer": "parameters",
    "Parameter": "parameters",
    "Sharded Grad": "gradients",
    "Unsharded Grad": "gradients",
    "Gradient": "gradients",
    "Reduce Scatter": "gradients",
    "OptState": "optimizer",
    "Optstate": "optimizer",
    "Other": "temporaries",
    "Activation": "activations",
    "Inputs": "activations",
    "Temp": "temporaries",
    "All Gather": "temporaries",
}


@dataclass
class Simulation:
    peak_bytes: dict[str, int]  # category -> bytes on the simulated rank at its peak, + "total"
    seconds: float  # wall time of the whole dry run


def simulate(
    config: ModelConfig,
    gpus: int,
    parallel: str = "fsdp",
    tensor_parallel: int = 1,
    micro_batch: int = 1,
    seq_len: int | None = None,
    activation_checkpointing: bool = False,
    bf16: bool = False,
    steps: int = 2,
    fake: bool = True,
) -> Simulation:
    """Peak memory of rank 0 of a `gpus`-rank run of `config`, by category (see module doc).
    Two steps by default: the optimizer's state exists from the first update on.

    With `fake=False` the same steps run for real, with real tensors, in the process group
    torchrun started (`gpus` must be its world size): what the dry run is checked against."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore

    began = time.perf_counter()
    if dist.is_initialized() == fake:
        raise ConfigError(
            "palm info --simulate needs a process without a process group"
            if fake
            else "a real measurement runs under torchrun"
        )
    if gpus < 1 or gpus % tensor_parallel:
        raise ConfigError(f"--tensor_parallel {tensor_parallel} does not divide --gpus {gpus}")
    if parallel == "none" and gpus != tensor_parallel:
        raise ConfigError("--parallel none runs one model replica: --gpus = --tensor_parallel")
    check_tensor_parallel(config, tensor_parallel)
    seq_len = seq_len or config.max_seq_len
    if fake:
        dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=gpus)
    try:
        ctx = Distributed(dist.get_rank(), gpus, 0, parallel, tensor_parallel)
        mesh = device_mesh(ctx, "cpu") if ctx.sharded else None
        with torch.device("meta"):
            model = PaLM(config)
        if tensor_parallel > 1:
            tensor_parallelize(model, mesh["tp"])
        fsdp = parallel == "fsdp"
        if fsdp:
            shard_blocks(model, mesh["dp"] if tensor_parallel > 1 else mesh)
        for p in model.parameters():  # computed on real tensors (palm.dtensor._row_offset)
            global_row_offset(p)
        with FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext():
            model.to_empty(device="cpu")
            if not fake:
                model.reset_parameters()
            if tensor_parallel > 1:
                _broadcast_copies(model)
            if activation_checkpointing:
                _checkpoint_blocks(model)
            optimizer = build_optimizer("adafactor", model.parameters())
            tracker = FSDPMemTracker(model, optimizer) if fsdp else MemTracker()
            tokens = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
            if fsdp:
                tracker.track_inputs((tokens,))
            else:
                tracker.track_external(model, optimizer, tokens)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
            # The peak of the last step only: entering the tracker resets it, so the first
            # step's one-off work (FSDP2's lazy initialisation, the optimizer creating its
            # state) does not count; the state it created does.
            for step in range(steps):
                with tracker:
                    if step:
                        tracker.reset_mod_stats()
                    with autocast:
                        out = model(tokens, targets=tokens)
                    out.loss.backward()
                    optimizer.step()  # gradient clipping needs values: left out (foreach norms)
                    optimizer.zero_grad(set_to_none=True)  # as the trainer does
            snapshot = tracker.get_tracker_snapshot("peak")
    finally:
        if fake:
            dist.destroy_process_group()
    peak: dict[str, int] = {}
    for kind, size in next(iter(snapshot.values())).items():
        name = CATEGORIES.get(getattr(kind, "value", str(kind)))
        if name is not None:
            peak[name] = peak.get(name, 0) + int(size)
    peak["total"] = sum(peak.values())
    return Simulation(peak, time.perf_counter() - began)
