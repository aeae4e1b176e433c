"""How a training run saves and restores its state, in one of two layouts (palm.checkpoint lists,
verifies and removes both):

- full: every tensor gathered whole, `model.safetensors` + `optimizer.safetensors` written by
  rank 0 (one process, DDP; what inference tools read);
- sharded (FSDP, tensor parallel, or train.async_checkpoint): `state/`, written with
  torch.distributed.checkpoint, where every rank writes its own shards and nothing is gathered.
  Tensors are stored in their single-device shapes, so a checkpoint saved under one mesh loads
  under another (dp 2 x tp 2 -> dp 4, -> one process). The fused input projection, whose
  tensor-parallel layout depends on the degree, is stored as its five matrices
  ("<name>@0" ... "@4"), each sharded over the ranks like the weight itself.

Both go through the same crash-safe scheme: everything is written into a temporary folder that
is renamed to `step_*` once complete (sharded: by rank 0, after every rank's shards and DCP's
`.metadata` are on disk). With train.async_checkpoint the shards are written in the background
(`dcp.async_save`, after a synchronous copy of the state to host memory) while training goes
on; at most one save is in flight, and it is finished before the next one, before any
checkpoint is read or removed, and at exit. A `kill -9` meanwhile leaves only the temporary
folder, so the previous checkpoint stays the newest complete one.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from palm import checkpoint
from palm.checkpoint import STATE, TrainingState, is_sharded, sharded_files
from palm.distributed import Distributed, full_state_dicts, load_full_state_dicts
from palm.dtensor import ROW_BLOCKS, ROW_GROUPS, dtensor_type, matrix_rows
from palm.errors import CheckpointError, CorruptCheckpointError
from palm.files import fsync_dir, fsync_file, publish_dir, remove, sha256_file, temporary_path

# --- the fused weight as separate matrices ------------------------------------------------------


def _layout(p: Tensor) -> tuple[tuple[int, ...], tuple, int, int]:
    """(this rank's row blocks, their (matrix, copies), tp degree, tp rank) of fused `p`."""
    blocks = tuple(getattr(p, ROW_BLOCKS))
    groups = tuple(getattr(p, ROW_GROUPS, None) or [(i, 1) for i in range(len(blocks))])
    mesh = getattr(p, "device_mesh", None)
    if mesh is None or "tp" not in (mesh.mesh_dim_names or ()):
        return blocks, groups, 1, 0
    tp, rank = mesh.size(mesh.mesh_dim_names.index("tp")), mesh.get_local_rank("tp")
    n = len(blocks) // tp
    return blocks[rank * n : (rank + 1) * n], groups[rank * n : (rank + 1) * n], tp, rank


def _dp(mesh: Any) -> tuple[int, int, int | None]:
    """(dp degree, dp rank, mesh dim) of a parameter's mesh: FSDP shards over "dp"."""
    names = mesh.mesh_dim_names or ()
    if "dp" not in names:
        return 1, 0, None
    dim = names.index("dp")
    return mesh.size(dim), mesh.get_local_rank("dp"), dim


def _replica_rows(value: Tensor, p: Tensor) -> Tensor:
    """All rows of `value` (laid out like `p`) that this rank's tensor-parallel position holds:
    FSDP's dp shards gathered (one weight at a time)."""
    if not isinstance(value, dtensor_type() or ()):
        return value
    from torch.distributed.tensor import Replicate

    _, _, dim = _dp(value.device_mesh)
    if dim is None:
        return value.to_local()
    placements = list(value.placements)
    placements[dim] = Replicate()
    return value.redistribute(value.device_mesh, placements).to_local()


def _chunk(t: Tensor, parts: int, index: int) -> Tensor:
    """torch.chunk's `index`-th piece (empty when it has fewer): how DTensor shards rows."""
    pieces = torch.chunk(t, parts) if t.shape[0] else ()
    return pieces[index] if index < len(pieces) else t[:0]


def to_matrices(value: Tensor, p: Tensor) -> list[Tensor]:
    """A fused tensor (the weight `p` or a moment laid out like it) as its matrices, each in its
    single-device shape and sharded over the ranks like `p` (DTensors when `p` is one)."""
    blocks, groups, tp, _ = _layout(p)
    rows = _replica_rows(value, p)
    pieces = rows.split(list(blocks))
    if not isinstance(value, dtensor_type() or ()):
        return [piece.clone() for piece in pieces]
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = value.device_mesh
    dp, dp_rank, dp_dim = _dp(mesh)
    out = []
    for piece, (_, copies) in zip(pieces, groups):
        shape = (piece.shape[0] * (tp if copies == 1 else 1), *piece.shape[1:])
        placements = []
        for name in mesh.mesh_dim_names:
            if name == "tp":
                placements.append(Shard(0) if copies == 1 else Replicate())
            elif tp > 1 and copies == 1:  # dp inside each tp rank's rows, as FSDP2 does
                placements.append(_StridedShard(0, split_factor=tp))
            else:
                placements.append(Shard(0))
        local = _chunk(piece, dp, dp_rank) if dp_dim is not None else piece
        stride = torch.empty(shape, device="meta").stride()
        out.append(
            DTensor.from_local(local.clone(), mesh, placements, shape=shape, stride=stride,
                               run_check=False)
        )  # fmt: skip
    return out


def from_matrices(pieces: list[Tensor], p: Tensor) -> Tensor:
    """The inverse of `to_matrices`: a tensor laid out like `p` (a DTensor when `p` is one)."""
    if not isinstance(p, dtensor_type() or ()):
        return torch.cat(pieces)
    from torch.distributed.tensor import DTensor

    rows = torch.cat([_replica_rows(piece, piece) for piece in pieces])
    dp, dp_rank, dp_dim = _dp(p.device_mesh)
    local = _chunk(rows, dp, dp_rank) if dp_dim is not None else rows
    return DTensor.from_local(
        local.contiguous(), p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
        run_check=False,
    )  # fmt: skip


def _fused(model: nn.Module) -> dict[str, Tensor]:
    return {name: p for name, p in model.named_parameters() if hasattr(p, ROW_BLOCKS)}


def _split_fused(model_state: dict, optimizer_state: dict, fused: dict[str, Tensor]) -> None:
    """Replace the fused weights (and their moments) by their matrices, in place."""
    for name, p in fused.items():
        for i, piece in enumerate(to_matrices(model_state.pop(name), p)):
            model_state[f"{name}@{i}"] = piece
        # A copy: DCP's state dict may hold the optimizer's own per-parameter dicts.
        per_param = optimizer_state[name] = dict(optimizer_state.get(name, {}))
        for key in [k for k, v in per_param.items() if isinstance(v, Tensor) and v.dim()]:
            for i, piece in enumerate(to_matrices(per_param.pop(key), p)):
                per_param[f"{key}@{i}"] = piece


def _join_fused(model_state: dict, optimizer_state: dict, fused: dict[str, Tensor]) -> None:
    """The inverse of `_split_fused`."""
    for name, p in fused.items():
        n = len(matrix_rows(*_layout(p)[:2]))
        model_state[name] = from_matrices([model_state.pop(f"{name}@{i}") for i in range(n)], p)
        per_param = optimizer_state.get(name, {})
        # sorted: every rank must run the same collectives in the same order
        for key in sorted({k.rsplit("@", 1)[0] for k in per_param if "@" in k}):
            pieces = [per_param.pop(f"{key}@{i}") for i in range(n)]
            per_param[key] = from_matrices(pieces, p)


# --- saving and loading -------------------------------------------------------------------------


def _sharded_states(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    model_state = get_model_state_dict(model)
    optimizer_state = get_optimizer_state_dict(model, optimizer)  # creates missing state first
    return model_state, optimizer_state


class Checkpointer:
    """Saves and restores one run's training state under `root` (`runs/NAME/checkpoints`)."""

    def __init__(self, root: Path, world: Distributed, sharded: bool, asynchronous: bool) -> None:
        self.root, self.world = root, world
        self.sharded = sharded or asynchronous
        self.asynchronous = asynchronous
        self.pending: tuple | None = None  # (future, tmp, final, meta, began, keep, abandon)
        # Background saves run their collectives in a thread: on a group of their own, so
        # they never interleave with training's on the default one.
        self.async_group = None
        if asynchronous and world.enabled and world.world_size > 1:
            import torch.distributed as dist

            self.async_group = dist.new_group(backend="gloo")

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        state: TrainingState,
        config: dict[str, Any],
        keep: int,
        abandon_after: int | None = None,
    ) -> list[dict[str, Any]]:
        """One checkpoint of step `state.step`. Returns records for the run's log: "checkpoint"
        (wall-clock `time` it began, `seconds` training waited) and, for each save completed
        meanwhile, "checkpoint_written" (`time` it was complete, `seconds` it took in all)."""
        began, wall = time.perf_counter(), time.time()
        records = self.finish()  # at most one save in flight
        if not self.sharded:
            model_state, optimizer_state = full_state_dicts(model, optimizer)
            if self.world.is_main:
                checkpoint.save_checkpoint(self.root, model_state, optimizer_state, state, config)
            self._tidy(keep, abandon_after)
            seconds = time.perf_counter() - began
            written = {"step": state.step, "kind": "checkpoint_written", "time": time.time()}
            started = {"step": state.step, "kind": "checkpoint", "time": wall}
            return [*records, {**started, "seconds": seconds}, {**written, "seconds": seconds}]
        final = checkpoint.checkpoint_dir(self.root, state.step)
        tmp = self._shared_temporary(final)
        model_state, optimizer_state = _sharded_states(model, optimizer)
        groups = optimizer_state.pop("param_groups")
        _split_fused(model_state, optimizer_state["state"], _fused(model))
        meta = {
            "format": checkpoint.FORMAT,
            "layout": "sharded",
            "state": json.loads(json.dumps(state.__dict__)),  # as of now: training goes on
            "optimizer": {"param_groups": groups, "scalars": {}},
            "config": config,
            "mesh": {"dp": self.world.dp_size, "tp": self.world.tensor_parallel},
        }
        content = {"model": model_state, "optimizer": optimizer_state["state"]}
        try:
            import torch.distributed.checkpoint as dcp

            where = {"checkpoint_id": str(tmp / STATE), "no_dist": not self.world.enabled}
            if self.asynchronous:
                future = dcp.async_save(content, process_group=self.async_group, **where)
            else:
                dcp.save(content, **where)
                future = None
        except OSError as error:
            raise _write_error(final, error) from None
        self.pending = (future, tmp, final, meta, began, keep, abandon_after)
        started = {"step": state.step, "kind": "checkpoint", "time": wall}
        records.append({**started, "seconds": time.perf_counter() - began})
        if future is None or abandon_after is not None:  # a rollback's save: finished now
            records += self.finish()
        return records

    def _shared_temporary(self, final: Path) -> Path:
        """One temporary folder name for all ranks (rank 0's), created by rank 0."""
        tmp = temporary_path(final)
        if self.world.enabled and self.world.world_size > 1:
            import torch.distributed as dist

            names = [str(tmp)]
            dist.broadcast_object_list(names, src=0)
            tmp = Path(names[0])
        if self.world.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            remove(tmp)
            tmp.mkdir()
        self.world.barrier()
        return tmp

    def finish(self) -> list[dict[str, Any]]:
        """Wait for the save in flight (if any) and publish it: meta.json with the sha256 of
        every file, fsynced, then the rename that makes it a checkpoint. Returns its
        "checkpoint_written" record (none if nothing was in flight)."""
        if self.pending is None:
            return []
        future, tmp, final, meta, began, keep, abandon_after = self.pending
        self.pending = None
        try:
            if future is not None:
                future.result()
            self.world.barrier()  # every rank's shards are on disk
            if self.world.is_main:
                files = sorted(f for f in (tmp / STATE).iterdir() if f.is_file())
                meta["sha256"] = {f"{STATE}/{f.name}": sha256_file(f) for f in files}
                (tmp / "meta.json").write_text(json.dumps(meta))
                for f in [*files, tmp / "meta.json"]:
                    fsync_file(f)
                fsync_dir(tmp / STATE)
                fsync_dir(tmp)
                publish_dir(tmp, final)
        except OSError as error:
            remove(tmp)
            raise _write_error(final, error) from None
        self._tidy(keep, abandon_after)  # pruned only once the new one is complete
        step, seconds = meta["state"]["step"], time.perf_counter() - began
        return [
            {"step": step, "kind": "checkpoint_written", "time": time.time(), "seconds": seconds}
        ]

    def _tidy(self, keep: int, abandon_after: int | None) -> None:
        """Remove abandoned (after a rollback) and old checkpoints; rank 0 only. The save in
        flight is not one of them (it is no `step_*` folder yet)."""
        if self.world.is_main:
            if abandon_after is not None:
                checkpoint.discard_after(self.root, abandon_after)
            checkpoint.prune_checkpoints(self.root, keep)
        self.world.barrier()  # nobody reads checkpoints/ while rank 0 is still changing it

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainingState:
        """Restore a checkpoint of either layout into this run's (possibly sharded) model and
        optimizer, verified against its sha256s (CorruptCheckpointError if it is not)."""
        self.finish()
        if not is_sharded(path):
            with checkpoint.verifying(path):  # hashes while the state is restored
                loaded = checkpoint.load_checkpoint(path, verify=False)
                load_full_state_dicts(model, optimizer, loaded.model_state, loaded.optimizer_state)
            return loaded.state
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        # DCP's .metadata is a pickle: verified before anything reads it; the shards are hashed
        # while they load.
        checkpoint.verify_checkpoint(path, (f"{STATE}/.metadata",))
        with checkpoint.verifying(path, sharded_files(path)) as meta:
            model_state, optimizer_state = _sharded_states(model, optimizer)
            groups = optimizer_state.pop("param_groups")
            fused = _fused(model)
            _split_fused(model_state, optimizer_state["state"], fused)
            content = {"model": model_state, "optimizer": optimizer_state["state"]}
            read_sharded(path, content)
            _join_fused(model_state, optimizer_state["state"], fused)
            options = StateDictOptions(strict=True)
            set_model_state_dict(model, model_state, options=options)
            full = {"state": optimizer_state["state"], "param_groups": groups}
            set_optimizer_state_dict(model, optimizer, full, options=options)
        try:
            return TrainingState(**meta["state"])
        except TypeError as error:
            raise CorruptCheckpointError(f"checkpoint {path}: meta.json: {error}") from None


def read_sharded(path: Path, content: dict[str, Any]) -> None:
    """Fill `content` (tensors or DTensors, any sharding) from a sharded checkpoint."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    alone = not (dist.is_available() and dist.is_initialized())  # e.g. generate.py
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp.load(content, checkpoint_id=str(path / STATE), no_dist=alone)
    except Exception as error:  # noqa: BLE001 (DCP raises CheckpointException, RuntimeError)
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else repr(error)
        raise CorruptCheckpointError(
            f"checkpoint {path}: {STATE}/ does not load ({first})"
        ) from None


def _consolidated_weights(path: Path) -> dict[str, Tensor]:
    """A sharded checkpoint's weights as one single-device state dict, read in this process;
    the fused weights' matrices ("name@0", "name@1", ...) joined again."""
    from torch.distributed.checkpoint import FileSystemReader

    checkpoint.verify_checkpoint(path, sharded_files(path))
    try:
        metadata = FileSystemReader(str(path / STATE)).read_metadata().state_dict_metadata
    except Exception as error:  # noqa: BLE001
        raise CorruptCheckpointError(f"checkpoint {path}: {STATE}/.metadata: {error}") from None
    model = {
        key[len("model.") :]: torch.empty(item.size, dtype=item.properties.dtype)
        for key, item in metadata.items()
        if key.startswith("model.") and hasattr(item, "size")
    }
    read_sharded(path, {"model": model})
    weights: dict[str, Tensor] = {}
    for key in sorted(model, key=lambda k: (k.partition("@")[0], int(k.partition("@")[2] or 0))):
        name = key.partition("@")[0]
        weights[name] = torch.cat((weights[name], model[key])) if name in weights else model[key]
    return weights


def load_checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """Only the weights of a checkpoint folder (inference, fine-tuning), verified; a sharded
    checkpoint is consolidated."""
    if is_sharded(path):
        return _consolidated_weights(path)
    checkpoint.verify_checkpoint(path, ("model.safetensors",))
    return checkpoint._load_tensors(path, "model.safetensors")


def _write_error(final: Path, error: OSError) -> CheckpointError:
    import errno

    if error.errno == errno.ENOSPC:
        return CheckpointError(
            f"disk full while writing checkpoint {final}; free space (older checkpoints are "
            f"intact) and resume"
        )
    return CheckpointError(f"cannot write checkpoint {final}: {error.strerror or error}")
