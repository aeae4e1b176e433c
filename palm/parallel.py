"""How one model is spread over devices, applied from outside the single-device palm.model (PaLM
§4): a ("dp", "tp") DeviceMesh, tensor parallelism over "tp", FSDP2 sharding (or DDP replicas)
over "dp", activation checkpointing and compile.

Tensor parallelism (Megatron-style, with torch.distributed.tensor.parallel): each "tp" rank holds
a share of the query heads and of both SwiGLU halves, and a copy of the one multi-query key/value
head (PaLM §2: it is one head, so it is replicated, not split). The fused input projection keeps
one matmul per rank: its rows are rearranged so that rank r's shard is its own
[q_r | k | v | value_r | gate_r] (palm.dtensor's ROW_GROUPS record which rows belong to which
matrix, for the optimizer, clipping and checkpoints). `attn_out` and `mlp_out` are row-parallel
(one all-reduce each in forward), the input projection column-parallel (one all-reduce of its
input's gradient in backward), and the tied embedding and the output projection + loss
vocabulary-parallel: logits (B, T, V) are never gathered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from palm.config import ModelConfig
from palm.distributed import Distributed
from palm.dtensor import ROW_BLOCKS, ROW_GROUPS, rows_from_canonical
from palm.errors import ConfigError
from palm.loss import LossOutput, vocab_parallel_lm_loss


def check_tensor_parallel(config: ModelConfig, tp: int) -> None:
    """A one-line error unless the model splits evenly over `tp` ranks."""
    if tp == 1:
        return
    needs = {
        "model.n_heads": config.n_heads,
        "the MLP's hidden size (model.ffn_mult * model.d_model)": config.ffn_hidden,
        "model.vocab_size": config.vocab_size,
    }
    for what, size in needs.items():
        if size % tp:
            raise ConfigError(f"train.tensor_parallel={tp} does not divide {what} = {size}")
    if config.n_kv_heads not in (1, config.n_heads):
        raise ConfigError(
            f"train.tensor_parallel needs one key/value head (multi-query, PaLM) or one per "
            f"query head, not model.n_kv_heads={config.n_kv_heads}"
        )
    if not config.parallel_block:
        raise ConfigError("train.tensor_parallel needs model.parallel_block=true")


def device_mesh(ctx: Distributed, device_type: str) -> Any:
    """The job's mesh (also kept in ctx.mesh): ("dp", "tp") with tensor parallelism, ("dp",)
    for FSDP alone. Ranks dp * tp + t are the tp ranks of replica dp (torchrun puts the ranks
    of one node next to each other, so tensor parallelism stays inside a node)."""
    from torch.distributed.device_mesh import init_device_mesh

    if ctx.tensor_parallel == 1:
        ctx.mesh = init_device_mesh(device_type, (ctx.world_size,), mesh_dim_names=("dp",))
    else:
        shape = (ctx.dp_size, ctx.tensor_parallel)
        ctx.mesh = init_device_mesh(device_type, shape, mesh_dim_names=("dp", "tp"))
    return ctx.mesh


def parallelize(
    build: Callable[[], nn.Module],
    ctx: Distributed,
    device: torch.device,
    *,
    meta_init: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> tuple[nn.Module, nn.Module]:
    """Build the model and apply, from outside and in this order: tensor parallelism, FSDP2
    sharding, activation checkpointing, DDP, compile. Returns (model, train_module): the model
    (for parameters, evaluation and sampling) and what training runs forward/backward through
    (the model itself when sharded, which happens in place, or DDP around it).

    `build()` makes the model on the current default device. With `meta_init` and a sharded
    model it is built on the meta device and materialised shard by shard, so a model larger than
    one rank's memory can be built; `reset_parameters()` then draws the initialisation per shard.
    """
    tp = ctx.tensor_parallel
    mesh = (ctx.mesh or device_mesh(ctx, device.type)) if ctx.sharded else None
    meta_init = meta_init and ctx.sharded
    if meta_init:
        with torch.device("meta"):
            model = build()
    else:
        model = build().to(device)
    if tp > 1:
        check_tensor_parallel(model.config, tp)
        tensor_parallelize(model, mesh["tp"])
    if ctx.parallel == "fsdp":
        shard_blocks(model, mesh["dp"] if tp > 1 else mesh)
    if meta_init:
        tags = _tags(model)
        model.to_empty(device=device)  # new parameters: the optimizer's tags are put back
        _retag(model, tags)
        model.reset_parameters()
        if tp > 1:
            _broadcast_copies(model)
    if activation_checkpointing:
        _checkpoint_blocks(model)
    train_module = model
    if ctx.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # No buffer to broadcast each step: RoPE's tables are a function of the config.
        train_module = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    if compile:
        train_module.compile()  # in place: state-dict keys keep no "_orig_mod." prefix
    return model, train_module


def tensor_parallelize(model: nn.Module, mesh: Any) -> None:
    """Split `model` (palm.model.PaLM) over the 1-D tensor-parallel `mesh`, in place."""
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    for block in model.blocks:
        tags = _split_fused_rows(block, mesh)
        plan = {"in_proj": ColwiseParallel(), "attn_out": RowwiseParallel()}
        plan["mlp_out"] = RowwiseParallel()
        parallelize_module(block, mesh, plan)
        vars(block.in_proj.weight).update(tags)  # parallelize_module made a new Parameter
    # The vocabulary's rows split over the ranks; the lookup is ours (torch's RowwiseParallel
    # embedding gathered the whole (V, D) table, 7.9 GiB at 62B, in palm info --simulate).
    for head in (model.embedding, model.lm_head):
        if head is not None:  # an untied head is vocabulary-parallel too (used only below)
            head.weight = nn.Parameter(distribute_tensor(head.weight.detach(), mesh, [Shard(0)]))
    model.embedding.forward = functools.partial(_vocab_parallel_lookup, model.embedding, mesh)
    model.output_loss = functools.partial(_vocab_parallel_loss, model, mesh)
    model.output_logits = functools.partial(_vocab_parallel_logits, model, mesh)


def _split_fused_rows(block: nn.Module, mesh: Any) -> dict[str, tuple]:
    """Replace the fused input projection's weight by a DTensor whose shard r is rank r's
    [q_r | k | v | value_r | gate_r] rows (k, v split too when every head has its own); returns
    the weight's ROW_BLOCKS and ROW_GROUPS attributes."""
    from torch.distributed.tensor import DTensor, Shard

    tp, rank = mesh.size(), mesh.get_local_rank()
    copies = 1 if block.config.n_kv_heads > 1 else tp
    share = [
        (size // tp, 1) if i in (0, 3, 4) else (size // tp * copies, copies)
        for i, size in enumerate(block.row_sizes)
    ]
    blocks = tuple(rows for rows, _ in share) * tp
    groups = tuple((i, c) for i, (_, c) in enumerate(share)) * tp
    full = block.in_proj.weight.detach()
    rows = sum(rows for rows, _ in share)
    local = rows_from_canonical(full, blocks, groups)[rank * rows : (rank + 1) * rows]
    weight = DTensor.from_local(local.contiguous(), mesh, [Shard(0)], run_check=False)
    block.in_proj.weight = nn.Parameter(weight)
    local_sizes = tuple(rows for rows, _ in share)
    block.row_sizes, block.q_dim, block.kv_dim = local_sizes, local_sizes[0], local_sizes[1]
    return {ROW_BLOCKS: blocks, ROW_GROUPS: groups}


def _broadcast_copies(model: nn.Module) -> None:
    """After a per-shard initialisation, give every tensor-parallel rank tp rank 0's copy of the
    replicated rows (each drew its own)."""
    from palm.dtensor import local_rows, replicated_spans

    for block in model.blocks:
        p = block.in_proj.weight
        group = p.device_mesh.get_group("tp")
        for view in local_rows(p, replicated_spans(p)):
            with torch.no_grad():
                copy = view.contiguous()
                dist.broadcast(copy, src=dist.get_global_rank(group, 0), group=group)
                view.copy_(copy)


def _reducer(mesh: Any) -> Callable[[Tensor, str], None]:
    group = mesh.get_group()
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}
    return lambda t, op: dist.all_reduce(t, op=ops[op], group=group)


class _SumOverRanks(torch.autograd.Function):
    """y = the sum of x over the ranks; every rank's y feeds the same loss, so each x gets
    y's gradient as it is (an all-reduce of it would count it tp times)."""

    @staticmethod
    def forward(ctx, x: Tensor, reduce: Callable[[Tensor, str], None]) -> Tensor:
        y = x.clone()
        reduce(y, "sum")
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def _vocab_parallel_lookup(embedding: nn.Module, mesh: Any, tokens: Tensor) -> Tensor:
    """Embedding rows (B, T, D) from this rank's block of the vocabulary, zeros for tokens
    outside it, summed over the ranks."""
    shard = embedding.weight.to_local()  # (V / tp, D)
    local = tokens - mesh.get_local_rank() * shard.shape[0]
    outside = (local < 0) | (local >= shard.shape[0])
    rows = F.embedding(local.masked_fill(outside, 0), shard).masked_fill(outside[..., None], 0.0)
    return _SumOverRanks.apply(rows, _reducer(mesh))


def _vocab_parallel_loss(
    model: nn.Module, mesh: Any, x: Tensor, targets: Tensor, z_loss_coef: float
) -> LossOutput:
    shard = model.output_weight.to_local()  # this rank's rows of the vocabulary (V / tp)
    start = mesh.get_local_rank() * shard.shape[0]  # check_tensor_parallel: tp divides V
    return vocab_parallel_lm_loss(x, shard, start, targets, _reducer(mesh), z_loss_coef=z_loss_coef)


def _vocab_parallel_logits(model: nn.Module, mesh: Any, x: Tensor) -> Tensor:
    """Logits (..., V) for sampling: each rank's vocabulary block, gathered (no gradient)."""
    from torch.distributed.tensor import DTensor, Shard

    local = torch.nn.functional.linear(x, model.output_weight.to_local())
    return DTensor.from_local(local, mesh, [Shard(local.dim() - 1)]).full_tensor()


def shard_blocks(model: nn.Module, mesh: Any) -> None:
    """FSDP2 on each block, then on the model (one all-gather per block, overlapped with
    compute). Parameter attributes the optimizer reads (row blocks of fused weights) are carried
    over to the sharded parameters, which FSDP2 creates anew."""
    from torch.distributed.fsdp import fully_shard

    tags = _tags(model)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    _retag(model, tags)


def _tags(model: nn.Module) -> dict[str, dict]:
    """The attributes set on parameters (ROW_BLOCKS, ROW_GROUPS), by parameter name."""
    return {name: vars(p).copy() for name, p in model.named_parameters() if vars(p)}


def _retag(model: nn.Module, tags: dict[str, dict]) -> None:
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
