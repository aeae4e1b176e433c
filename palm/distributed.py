"""Everything that touches torch.distributed: process groups, DDP/FSDP2 wrapping, reductions and
full state dicts. The model and the training loop stay single-device code.

One `init_distributed()` reads the torchrun environment once (RANK, WORLD_SIZE, LOCAL_RANK) and
returns a `Distributed` context that the trainer passes around; no other module reads it.
PaLM §4 trained with data parallelism across pods and fully sharded data parallelism inside; here
`parallel=ddp` replicates the model on every rank and `parallel=fsdp` shards parameters,
gradients and optimizer state (FSDP2, `torch.distributed.fsdp.fully_shard`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "none", "ddp" or "fsdp"
    initialized: bool = False  # whether this module created a process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def device(self, kind: str) -> torch.device:
        """The rank's device: cuda:LOCAL_RANK under CUDA, else the CPU."""
        if kind == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(kind)

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a few floats over the ranks (one collective)."""
        if not self.enabled or self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized = False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(parallel: str, device_kind: str) -> Distributed:
    """Read the torchrun environment and start the process group when one is needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and parallel == "none":
        raise ValueError(
            f"running {world_size} processes (torchrun) but train.parallel=none; "
            f"set train.parallel=ddp or train.parallel=fsdp"
        )
    ctx = Distributed(rank, world_size, local_rank, parallel)
    if parallel == "none":
        return ctx
    if not dist.is_available():
        raise ValueError("train.parallel needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        backend = "nccl" if device_kind == "cuda" else "gloo"
        timeout = timedelta(minutes=30)
        if "MASTER_ADDR" in os.environ:
            # After an elastic restart (torchrun --max-restarts) the rendezvous store still
            # holds the dead workers' addresses; a prefix per attempt keeps gloo/NCCL from
            # dialing them.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                world_size,
                is_master=rank == 0 and not agent_hosts,
                timeout=timeout,
                wait_for_workers=False,
            )
            dist.init_process_group(
                backend,
                store=dist.PrefixStore(f"palm/{attempt}", store),
                rank=rank,
                world_size=world_size,
                timeout=timeout,
            )
        else:  # one process without torchrun: a private rendezvous on the loopback interface
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
            )
        ctx.initialized = True
    return ctx


def wrap_model(model: nn.Module, ctx: Distributed, device: torch.device) -> nn.Module:
    """DDP or FSDP2 around a single-device model; the model itself is returned unchanged."""
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    if ctx.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (ctx.world_size,))
        for block in model.blocks:  # one all-gather per block, overlapped with compute
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    return model


def gradient_sync(model: nn.Module, ctx: Distributed, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    from contextlib import nullcontext

    if ctx.parallel == "ddp" and not enabled:
        return model.no_sync()
    if ctx.parallel == "fsdp":
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Unsharded model and optimizer state (optimizer keyed by parameter name), on the CPU.

    Collective under FSDP: every rank must call it. Keyed by names, so a checkpoint written by N
    ranks loads into M ranks (or one process) unchanged.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    if not optimizer.state:  # nothing yet (before the first step); DCP would run a dummy step
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return model_state, {"state": {}, "param_groups": groups}
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state_dicts(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict,
) -> None:
    """Inverse of `full_state_dicts`: every rank loads (and shards) the full states."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, strict=True)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state["state"]:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
