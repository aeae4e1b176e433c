"""Devices and everything that touches torch.distributed: process groups, `parallelize` (DDP or
FSDP2, activation checkpointing, compile), reductions, full state dicts, and the collectives of
the optimizer's DTensor path. The model and the training loop stay single-device code.

One `init_distributed()` reads the torchrun environment once (RANK, WORLD_SIZE, LOCAL_RANK) and
returns a `Distributed` context that the trainer passes around; no other module reads it.
PaLM §4 trained with data parallelism across pods and fully sharded data parallelism inside; here
`parallel=ddp` replicates the model on every rank and `parallel=fsdp` shards parameters,
gradients and optimizer state (FSDP2, `torch.distributed.fsdp.fully_shard`).
"""

from __future__ import annotations

import math
import os
import socket
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from palm.dtensor import (
    ROW_GROUPS,
    dtensor_type,
    local_rows,
    local_shard,
    replicated_spans,
    rows_from_canonical,
    rows_to_canonical,
    sharded_norms,
)
from palm.errors import ConfigError


@dataclass
class Distributed:
    """This process's place in the job (one process without torchrun: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "none", "ddp" or "fsdp"
    tensor_parallel: int = 1  # ranks that share one model replica (PaLM §4 "model parallelism")
    mesh: Any = None  # the ("dp", "tp") DeviceMesh, made by palm.parallel.device_mesh
    # Whether *this* object created the process group (and so must destroy it in close());
    # `enabled` says whether any process group exists, e.g. one a caller started.
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel degree: model replicas, each reading its own share of the batch."""
        return self.world_size // self.tensor_parallel

    @property
    def dp_rank(self) -> int:
        """This rank's replica; ranks rank // tp share one, as the ("dp", "tp") mesh lays out."""
        return self.rank // self.tensor_parallel

    @property
    def sharded(self) -> bool:
        """Whether the model's parameters are split over ranks (every rank runs every forward)."""
        return self.parallel == "fsdp" or self.tensor_parallel > 1

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    def print(self, *args: Any, **kwargs: Any) -> None:
        """print() on rank 0 only: every rank-0-only message goes through here."""
        if self.is_main:
            print(*args, **kwargs)

    def device(self, kind: str) -> torch.device:
        """The rank's device: cuda:LOCAL_RANK under CUDA, else the CPU."""
        if kind == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return torch.device(kind)

    def all_reduce_sum(self, values: list[float], device: torch.device) -> list[float]:
        """Sum a few floats over the model replicas (one collective). The tensor-parallel ranks
        of a replica hold the same values, so the sum over all ranks is divided by their number
        (a flag raised on any one rank still gives a sum > 0 everywhere)."""
        if not self.enabled or self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return (tensor / self.tensor_parallel).tolist()

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.initialized and dist.is_initialized():
            dist.destroy_process_group()
            self.initialized = False


def pick_device(name: str, option: str = "train.device") -> torch.device:
    """ "auto" = CUDA if available, else the CPU; an unavailable device is an error naming
    `option`, the setting the user gave it with."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{option}={name} but this torch build sees no CUDA GPU; use auto or cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{option}=mps but MPS is not available; use cpu")
    return torch.device(name)


def pick_precision(name: str, device: torch.device) -> str:
    """bf16 autocast on GPUs, float32 on CPUs (PaLM trained in bf16 on TPUs)."""
    if name == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if name == "bfloat16" and device.type != "cuda":
        raise ConfigError(
            f"train.precision=bfloat16 is only supported on CUDA here, not on "
            f"{device.type}; use train.precision=float32"
        )
    return name


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed(parallel: str, device_kind: str, tensor_parallel: int = 1) -> Distributed:
    """Read the torchrun environment and start the process group when one is needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    tp = tensor_parallel
    if world_size % tp:
        raise ConfigError(
            f"train.tensor_parallel={tp} does not divide the {world_size} processes; run "
            f"torchrun --nproc_per_node with a multiple of {tp}"
        )
    if world_size > tp and parallel == "none":
        raise ConfigError(
            f"running {world_size} processes (torchrun) but train.parallel=none"
            + (f" with train.tensor_parallel={tp}" if tp > 1 else "")
            + "; set train.parallel=ddp or train.parallel=fsdp"
        )
    if tp > 1 and parallel == "ddp":
        raise ConfigError(
            "train.tensor_parallel > 1 shards the model, which DDP cannot replicate; use "
            "train.parallel=fsdp (or none, for tensor parallelism alone)"
        )
    ctx = Distributed(rank, world_size, local_rank, parallel, tp)
    if parallel == "none" and tp == 1:
        return ctx
    if not dist.is_available():
        raise ConfigError("train.parallel needs torch.distributed, which this torch build lacks")
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


def gradient_sync(train_module: nn.Module, ctx: Distributed, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if ctx.parallel == "ddp" and not enabled:
        return train_module.no_sync()
    if ctx.parallel == "fsdp":
        train_module.set_requires_gradient_sync(enabled)
    return nullcontext()


def clip_gradients(params: list[Tensor], max_norm: float) -> float:
    """Global gradient-norm clipping (PaLM §5: 1.0); returns the norm before clipping.

    Under tensor parallelism the rows every rank holds a copy of (ROW_GROUPS) first get their
    partial gradients summed, and count once in the norm, as in the single-device model."""
    if any(getattr(p, ROW_GROUPS, None) for p in params):
        return _clip_tensor_parallel([p for p in params if p.grad is not None], max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _clip_tensor_parallel(params: list[Tensor], max_norm: float) -> float:
    dtensor = dtensor_type()
    fused = [p for p in params if getattr(p, ROW_GROUPS, None)]
    copies = max(c for p in fused for _, c in getattr(p, ROW_GROUPS))
    copied = [local_rows(p.grad, replicated_spans(p)) for p in fused]
    for p, views in zip(fused, copied):  # each copy saw only its own ranks' heads: sum them
        for view in views:
            dist.all_reduce(view, group=p.device_mesh.get_group("tp"))
    local = [local_shard(p.grad) for p in params]
    norms = list(torch._foreach_norm(local))
    where = [i for i, p in enumerate(params) if isinstance(p, dtensor)]
    # The copies' norms too, their squares summed over all ranks (each holds other rows).
    extra = [
        torch.cat([v.flatten() for v in views]).norm() if views else norms[0] * 0
        for views in copied
    ]
    layouts = [(params[i].device_mesh, params[i].placements) for i in where]
    layouts += [(p.device_mesh, p.placements) for p in fused]
    reduced = sharded_norms(layouts)([norms[i] for i in where] + extra)[0]
    for i, value in zip(where, reduced):
        norms[i] = value
    duplicated = sum(float(e) ** 2 for e in reduced[len(where) :])
    total_sq = sum(float(n) ** 2 for n in norms) - duplicated * (copies - 1) / copies
    total = math.sqrt(max(total_sq, 0.0))
    if max_norm > 0 and max_norm / (total + 1e-6) < 1.0:
        torch._foreach_mul_(local, max_norm / (total + 1e-6))
    return total


def _relayout(state: dict[str, Any], model: nn.Module, forward: bool) -> None:
    """Tensor-parallel fused weights (and their moments) to (forward) or from the canonical
    single-device layout, in place in `state` (keyed by parameter name, as DCP's state dicts)."""
    for name, p in model.named_parameters():
        groups = getattr(p, ROW_GROUPS, None)
        if not groups or name not in state:
            continue
        convert = rows_to_canonical if forward else rows_from_canonical
        if isinstance(state[name], dict):  # optimizer state of the parameter
            for key, value in state[name].items():
                if isinstance(value, Tensor) and value.dim():
                    state[name][key] = convert(value, p.row_blocks, groups)
        else:
            state[name] = convert(state[name], p.row_blocks, groups)


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
    _relayout(model_state, model, forward=True)
    if not optimizer.state:  # nothing yet (before the first step); DCP would run a dummy step
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        return model_state, {"state": {}, "param_groups": groups}
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options)
    _relayout(optimizer_state.get("state", {}), model, forward=True)  # rank 0's alone
    return model_state, optimizer_state


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
    model_state = dict(model_state)
    _relayout(model_state, model, forward=False)
    set_model_state_dict(model, model_state, options=options)
    if optimizer_state["state"]:
        per_param = {name: dict(value) for name, value in optimizer_state["state"].items()}
        _relayout(per_param, model, forward=False)
        optimizer_state = {**optimizer_state, "state": per_param}
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
