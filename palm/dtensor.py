"""DTensor shards as the optimizer and gradient clipping see them: a DTensor's local shard and
where it sits, norms of sharded tensors reduced over the mesh, and the row layout of fused
weights (palm.model's in_proj) under tensor parallelism, where each rank holds its own query and
MLP rows plus a copy of the one key/value head (PaLM §2 multi-query attention, §4).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from palm.errors import ConfigError

# Attributes of a fused weight (palm.model's in_proj), read by the optimizer and by the functions
# below. ROW_BLOCKS: the row sizes of the matrices it holds. ROW_GROUPS (set by palm.parallel on
# tensor-parallel weights): per block, (matrix, copies): the blocks of one matrix spread over the
# ranks, and `copies` > 1 for rows every tensor-parallel rank holds (PaLM's one key/value head).
ROW_BLOCKS = "row_blocks"
ROW_GROUPS = "row_groups"


def replicated_spans(p: Tensor) -> list[tuple[int, int]]:
    """(first row, rows) of the blocks of `p` held in several copies, adjacent ones merged."""
    spans: list[tuple[int, int]] = []
    start = 0
    for rows, (_, copies) in zip(getattr(p, ROW_BLOCKS, ()), getattr(p, ROW_GROUPS, ())):
        if copies > 1:
            if spans and spans[-1][0] + spans[-1][1] == start:
                spans[-1] = (spans[-1][0], spans[-1][1] + rows)
            else:
                spans.append((start, rows))
        start += rows
    return spans


def local_rows(t: Tensor, spans: list[tuple[int, int]]) -> list[Tensor]:
    """Views of this rank's shard of `t` at the global row spans (the parts it holds)."""
    local, first = local_shard(t), global_row_offset(t)
    views = []
    for start, rows in spans:
        lo, hi = max(start, first), min(start + rows, first + local.shape[0])
        if hi > lo:
            views.append(local[lo - first : hi - first])
    return views


def matrix_rows(blocks: tuple[int, ...], groups: tuple) -> dict[int, int]:
    """Rows of each whole matrix of a tensor-parallel fused weight, a copied one counted once."""
    rows: dict[int, int] = {}
    copies_of: dict[int, int] = {}
    for size, (group, copies) in zip(blocks, groups):
        rows[group] = rows.get(group, 0) + size
        copies_of[group] = copies
    return {group: total // copies_of[group] for group, total in rows.items()}


def rows_to_canonical(t: Tensor, blocks: tuple[int, ...], groups: tuple) -> Tensor:
    """A tensor-parallel fused weight's rows (ROW_BLOCKS/ROW_GROUPS) in the single-device order:
    each matrix's blocks concatenated, a copied matrix once. The inverse of rows_from_canonical."""
    pieces: dict[int, list[Tensor]] = {}
    for piece, (group, copies) in zip(t.split(list(blocks)), groups):
        if copies == 1 or group not in pieces:
            pieces.setdefault(group, []).append(piece)
    return torch.cat([torch.cat(parts) for parts in pieces.values()])


def rows_from_canonical(t: Tensor, blocks: tuple[int, ...], groups: tuple) -> Tensor:
    """The single-device rows of a fused weight laid out as the tensor-parallel one."""
    sizes = matrix_rows(blocks, groups)
    sections = dict(zip(sizes, t.split(list(sizes.values()))))
    taken = dict.fromkeys(sizes, 0)
    out = []
    for rows, (group, copies) in zip(blocks, groups):
        if copies > 1:
            out.append(sections[group])
        else:
            out.append(sections[group][taken[group] : taken[group] + rows])
            taken[group] += rows
    return torch.cat(out)


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
    # not is_shard(): FSDP2 over tensor parallelism shards with _StridedShard, which is not one
    return tuple(d for d, pl in enumerate(placements) if not pl.is_replicate())


def global_row_offset(t: Tensor) -> int:
    """The global index of the first row of this rank's shard (0 for plain tensors)."""
    if dtensor_type() is None or not isinstance(t, dtensor_type()) or t.dim() == 0:
        return 0
    return _row_offset(tuple(t.shape), t.device_mesh, tuple(t.placements))


@functools.cache
def _row_offset(shape: tuple[int, ...], mesh: Any, placements: tuple[Any, ...]) -> int:
    """Cached: the same for every step, and _StridedShard's needs real (not fake) tensors, so
    palm.simulate computes it before its step under FakeTensorMode."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return int(compute_local_shape_and_global_offset(shape, mesh, placements)[1][0])


def local_shard(t: Tensor) -> Tensor:
    """A DTensor's local shard, the tensor itself (writes go through). `to_local()` is the same
    tensor behind an autograd function that costs microseconds per call, four calls per
    parameter per step."""
    local = getattr(t, "_local_tensor", None)
    if local is None:
        return t.to_local() if hasattr(t, "to_local") else t  # a plain tensor is its own shard
    return local


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


def whole_matrix_norms(
    norms: Callable[..., list[list[Tensor] | None]], matrices: list[tuple[int, int, int]]
) -> Callable[..., list[list[Tensor] | None]]:
    """`norms` (per block, over the mesh), then per matrix: the blocks of one matrix on several
    tensor-parallel ranks combined, a copied block (the key/value head) counted once."""

    def reduce(*norm_lists: list[Tensor] | None) -> list[list[Tensor] | None]:
        out = norms(*norm_lists)
        for values in out:
            if values is None:
                continue
            squares: dict[tuple[int, int], Tensor] = {}
            for value, (param, matrix, copies) in zip(values, matrices):
                key = (param, matrix)
                squares[key] = squares.get(key, 0.0) + value.double().square() / copies
            for i, (param, matrix, _) in enumerate(matrices):
                values[i] = squares[(param, matrix)].sqrt().float()
        return out

    return reduce
