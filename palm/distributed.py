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

import functools
import os
import socket
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from palm.errors import ConfigError


@dataclass
class Distributed:
    """This process's place in the job (one process without torchrun: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "none"  # "none", "ddp" or "fsdp"
    # Whether *this* object created the process group (and so must destroy it in close());
    # `enabled` says whether any process group exists, e.g. one a caller started.
    initialized: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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


def init_distributed(parallel: str, device_kind: str) -> Distributed:
    """Read the torchrun environment and start the process group when one is needed."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1 and parallel == "none":
        raise ConfigError(
            f"running {world_size} processes (torchrun) but train.parallel=none; "
            f"set train.parallel=ddp or train.parallel=fsdp"
        )
    ctx = Distributed(rank, world_size, local_rank, parallel)
    if parallel == "none":
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


def parallelize(
    build: Callable[[], nn.Module],
    ctx: Distributed,
    device: torch.device,
    *,
    meta_init: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """Build the model and apply, from outside and in this order: FSDP2 sharding, activation
    checkpointing, DDP, compile. Returns (model, train_module): the single-device model (for
    parameters, evaluation and sampling) and what training runs forward/backward through (the
    model itself under FSDP2, which shards in place, or DDP around it; compiled in place).

    `build()` makes the model on the current default device. With FSDP and `meta_init` it is
    built on the meta device and materialised shard by shard, so a model larger than one rank's
    memory can be built; `reset_parameters()` then draws the initialisation per shard.
    """
    if ctx.parallel == "fsdp" and meta_init:
        with torch.device("meta"):
            model = build()
        _fully_shard(model, ctx, device)  # shards the (empty) parameters
        model.to_empty(device=device)
        model.reset_parameters()
    else:
        model = build().to(device)
        if ctx.parallel == "fsdp":
            _fully_shard(model, ctx, device)
    if activation_checkpointing:
        _checkpoint_blocks(model)
    train_module = model
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        train_module = DistributedDataParallel(model, device_ids=ids)
    if compile:
        train_module.compile()  # in place: state-dict keys keep no "_orig_mod." prefix
    return model, train_module


def _fully_shard(model: nn.Module, ctx: Distributed, device: torch.device) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    shard_blocks(model, init_device_mesh(device.type, (ctx.world_size,)))


def shard_blocks(model: nn.Module, mesh: Any) -> None:
    """FSDP2 on each block, then on the model (one all-gather per block, overlapped with
    compute). Parameter attributes the optimizer reads (row blocks of fused weights) are carried
    over to the sharded parameters, which FSDP2 creates anew."""
    from torch.distributed.fsdp import fully_shard

    tags = {name: vars(p).copy() for name, p in model.named_parameters() if vars(p)}
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name, attributes in tags.items():
        vars(model.get_parameter(name)).update(attributes)


def _checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations during backward instead of storing them (PaLM §4)."""
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        plain = block.forward

        def forward(*args, _plain=plain, **kwargs):
            return checkpoint(_plain, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def gradient_sync(train_module: nn.Module, ctx: Distributed, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if ctx.parallel == "ddp" and not enabled:
        return train_module.no_sync()
    if ctx.parallel == "fsdp":
        train_module.set_requires_gradient_sync(enabled)
    return nullcontext()


def clip_gradients(params: list[Tensor], max_norm: float) -> float:
    """Global gradient-norm clipping (PaLM §5: 1.0); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


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


# --- DTensor collectives of palm.optim.PaLMAdafactor --------------------------------------------


def dtensor_type() -> type | None:
    """torch's DTensor class if it is loaded; if not, no parameter can be a DTensor (and importing
    torch.distributed.tensor would cost seconds for single-process runs)."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


@functools.cache
def _sharded_mesh_dims(placements: tuple[Any, ...]) -> tuple[int, ...]:
    """The mesh dimensions a DTensor with these placements is split over (Shard, _StridedShard)."""
    if any(pl.is_partial() for pl in placements):
        raise ConfigError(f"PaLMAdafactor: parameters cannot be Partial, got {placements}")
    return tuple(d for d, pl in enumerate(placements) if pl.is_shard())


def global_row_offset(t: Tensor) -> int:
    """The global index of the first row of this rank's shard (0 for plain tensors)."""
    if dtensor_type() is None or not isinstance(t, dtensor_type()) or t.dim() == 0:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return int(compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)[1][0])


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard, the tensor itself (writes go through). `to_local()` is the same
    tensor behind an autograd function that costs microseconds per call, four calls per
    parameter per step."""
    local = getattr(t, "_local_tensor", None)
    return t.to_local() if local is None else local


def sharded_norms(layouts: list[tuple[Any, Any]]) -> Callable[..., list[list[Tensor] | None]]:
    """For DTensor parameters laid out as `layouts` ((mesh, placements) each): a function mapping
    per-shard norms to whole-tensor norms.

    Each argument is None or a list of 0-D norms of the local shards, aligned with `layouts`. The
    squares are summed over every mesh dimension where the parameter is sharded (Replicate needs
    nothing), in float64, with one all-reduce per (mesh, sharded dims) for all lists together.
    """
    plans: dict[tuple[Any, tuple[int, ...]], list[int]] = {}
    for i, (mesh, placements) in enumerate(layouts):
        dims = _sharded_mesh_dims(placements)
        if dims:
            plans.setdefault((mesh, dims), []).append(i)

    def reduce(*norm_lists: list[Tensor] | None) -> list[list[Tensor] | None]:
        out = [None if norms is None else list(norms) for norms in norm_lists]
        lists = [norms for norms in out if norms is not None]
        for (mesh, dims), idx in plans.items():
            flat = torch.stack([norms[i] for norms in lists for i in idx])
            wide = torch.float32 if flat.device.type == "mps" else torch.float64
            squares = flat.to(wide).square_()
            for dim in dims:
                dist.all_reduce(squares, group=mesh.get_group(dim))
            values = squares.sqrt_().to(torch.float32).unbind()
            j = 0
            for norms in lists:
                for i in idx:
                    norms[i] = values[j]
                    j += 1
        return out

    return reduce


def any_nonzero(tensors: list[Tensor]) -> bool:
    """Whether any element of `tensors` (plain or DTensor, over all ranks holding them) is != 0."""
    dtensor = dtensor_type()
    local = [t.to_local() if dtensor and isinstance(t, dtensor) else t for t in tensors]
    flag = torch.stack([t.ne(0).any() for t in local]).any().to(torch.int32)
    meshes = []
    for t in tensors:
        if dtensor and isinstance(t, dtensor) and t.device_mesh not in meshes:
            meshes.append(t.device_mesh)
    if meshes:  # the same decision on every rank, or the collectives in the step would hang
        for mesh in meshes:
            for dim in range(mesh.ndim):
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=mesh.get_group(dim))
    return bool(flag)
