"""PaLM's optimizer (PaLM §5): Adafactor without factorisation, plus an AdamW alternative.

PaLM §5: "Adafactor without factorization ... effectively equivalent to Adam with parameter
scaling", beta1 = 0.9, beta2_k = 1 - k^-0.8, "dynamic weight decay of lr^2.0". The update is
T5X's (`t5x/adafactor.py`, `apply_param_gradient`), term by term, with k = 1, 2, ... the number
of updates including this one:

    v     = beta2_k * v + (1 - beta2_k) * (g^2 + eps1)      beta2_k = 1 - k^-decay_exponent
    u     = g / sqrt(v)
    u     = u / max(1, RMS(u) / clip_threshold)             # Adafactor update clipping, per tensor
    s     = lr * max(RMS(p), eps2) * u                      # parameter scaling
    m     = beta1 * m + (1 - beta1) * s                     # momentum of the *scaled* update
    p     = (1 - wd) * p - m                                # wd = weight_decay * lr^lr_power

As in T5X, weight decay is not multiplied by lr again (lr^2 = 1e-4 per step at lr = 1e-2) and
applies to every parameter, m has no bias correction, and update clipping stays at 1.0 (PaLM does
not say it changed it). PaLM's global gradient-norm clipping at 1.0 is separate
(`palm.distributed.clip_gradients`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from palm.adafactor_update import foreach_update_, fused_update_
from palm.config import OPTIMIZERS, OptimConfig, parse_weight_decay
from palm.dtensor import (
    ROW_BLOCKS,
    ROW_GROUPS,
    any_nonzero,
    dtensor_type,
    global_row_offset,
    local_shard,
    matrix_rows,
    sharded_norms,
    whole_matrix_norms,
)
from palm.errors import ConfigError

__all__ = ["ROW_BLOCKS", "PaLMAdafactor", "build_optimizer", "optimizer_for", "row_blocks"]

# ROW_BLOCKS, a parameter attribute: the row sizes of a weight that fuses several matrices (PaLM's
# in_proj holds q, k, v and both SwiGLU inputs). As in T5X, Adafactor's two statistics (RMS(p)
# for the step size, RMS(u) for update clipping) are then computed per matrix, not across all of
# them. Under tensor parallelism ROW_GROUPS says which blocks make one matrix (palm.dtensor).


def row_blocks(p: Tensor) -> tuple[int, ...]:
    """The row blocks of `p` for Adafactor's statistics: its ROW_BLOCKS, else all its rows."""
    blocks = getattr(p, ROW_BLOCKS, None)
    rows = p.shape[0] if p.dim() else 1
    if blocks is None:
        return (rows,)
    if sum(blocks) != rows:
        raise ConfigError(f"{ROW_BLOCKS} {tuple(blocks)} do not add up to the {rows} rows")
    return tuple(int(b) for b in blocks)


class PaLMAdafactor(torch.optim.Optimizer):
    """Adafactor without factorisation, as PaLM §5 trained with (T5X semantics, see module doc).

    Args:
        params: parameters or parameter groups.
        lr: learning rate; the trainer overwrites `param_group["lr"]` every step from the
            schedule (PaLM §5: 1e-2 for 10k steps, then 1/sqrt(k)).
        beta1: momentum of the scaled update (PaLM: 0.9); None or 0 keeps no first moment.
        decay_exponent: beta2_k = 1 - k^-decay_exponent (PaLM: 0.8).
        eps1: added to g^2 (Adafactor: 1e-30).
        eps2: floor of the parameter RMS (PaLM: 1e-3), so zero-initialised tensors still move.
        clip_threshold: Adafactor update clipping d on RMS(u); None disables (T5X default 1.0).
        weight_decay: "lr^2" (PaLM: decay rate lr^2 at every step), a constant rate per step
            (T5X `weight_decay_rate`, not multiplied by lr), or 0.
        multiply_by_parameter_scale: scale the step by max(RMS(p), eps2) (PaLM: yes).
        compiled: run the update of plain (non-DTensor) parameters as one torch.compile'd
            function: two fused passes over p, g, v and m instead of about eleven foreach
            passes (the same math; float rounding may differ in the last bit). The first step
            compiles (seconds, a C++ compiler on a CPU); train.compile turns it on.

    State per parameter (tensors only, safe for `torch.load(weights_only=True)`): `step` (int64,
    on CPU), `exp_avg_sq` (v) and, with momentum, `exp_avg` (m), both float32 whatever the
    parameter dtype.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-2,
        beta1: float | None = 0.9,
        decay_exponent: float = 0.8,
        eps1: float = 1e-30,
        eps2: float = 1e-3,
        clip_threshold: float | None = 1.0,
        weight_decay: float | str = "lr^2",
        multiply_by_parameter_scale: bool = True,
        compiled: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ConfigError(f"lr must be >= 0, got {lr}")
        if beta1 is not None and not 0.0 <= beta1 < 1.0:
            raise ConfigError(f"beta1 must be None or in [0, 1), got {beta1}")
        if decay_exponent <= 0.0:
            raise ConfigError(f"decay_exponent must be > 0, got {decay_exponent}")
        if eps1 < 0.0 or eps2 < 0.0:
            raise ConfigError(f"eps1 and eps2 must be >= 0, got {eps1}, {eps2}")
        if clip_threshold is not None and clip_threshold <= 0.0:
            raise ConfigError(f"clip_threshold must be None or > 0, got {clip_threshold}")
        wd, wd_power = parse_weight_decay(weight_decay)
        # Only numbers, bools and None in the groups, so the state_dict stays weights_only-safe.
        defaults = {
            "lr": lr,
            "beta1": beta1 or 0.0,
            "decay_exponent": decay_exponent,
            "eps1": eps1,
            "eps2": eps2,
            "clip_threshold": clip_threshold,
            "weight_decay": wd,
            "weight_decay_lr_power": wd_power,
            "multiply_by_parameter_scale": multiply_by_parameter_scale,
        }
        super().__init__(params, defaults)
        # The fused update (torch.compile of adafactor_update.fused_update_), made on first use; an
        # attribute of this optimizer, not of the module, so nothing is shared between runs.
        self.compiled = compiled
        self._fused_update: Callable[..., None] | None = None

    def __getstate__(self) -> dict[str, Any]:
        """torch's (defaults, state, groups) and `compiled`; the compiled function is remade."""
        return {**super().__getstate__(), "compiled": self.compiled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("compiled", False)
        self.__dict__.setdefault("_fused_update", None)

    @staticmethod
    def decay_rate(group: dict[str, Any]) -> float:
        """Fraction of every parameter removed this step: weight_decay * lr^power (PaLM §5)."""
        return group["weight_decay"] * float(group["lr"]) ** group["weight_decay_lr_power"]

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One update of every parameter that has a gradient (PaLM §5 Adafactor)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        dtensor = dtensor_type()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if p.grad.is_sparse or p.is_complex():
                    raise ConfigError("PaLMAdafactor supports dense real parameters only")
            if self._only_initialise(group, params):
                continue
            # Parameters skipped on some steps have fewer updates; bucket by their own k (and
            # DTensor or not: those need the norms reduced across ranks).
            buckets: dict[tuple[int, bool], list[Tensor]] = {}
            for p in params:
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(group, p)
                state["step"] += 1
                is_dtensor = dtensor is not None and isinstance(p, dtensor)
                buckets.setdefault((int(state["step"]), is_dtensor), []).append(p)
            for (k, is_dtensor), bucket in buckets.items():
                if is_dtensor:
                    self._update_dtensors(group, k, bucket)
                else:
                    self._update(group, k, bucket)
        return loss

    def _init_state(self, group: dict[str, Any], p: Tensor) -> None:
        """step 0 and zero float32 moments, DTensors placed like `p` when `p` is one."""
        state = self.state[p]
        state["step"] = torch.tensor(0, dtype=torch.int64)
        state["exp_avg_sq"] = torch.zeros_like(
            p, dtype=torch.float32, memory_format=torch.preserve_format
        )
        if group["beta1"] > 0.0:
            state["exp_avg"] = torch.zeros_like(
                p, dtype=torch.float32, memory_format=torch.preserve_format
            )

    def _only_initialise(self, group: dict[str, Any], params: list[Tensor]) -> bool:
        """torch.distributed.checkpoint creates missing state by stepping once with lr = 0 and
        zero gradients; that must neither move the parameters nor count as an update, so only
        create the state (at step 0). A real first step always has a non-zero gradient."""
        if float(group["lr"]) != 0.0 or any(self.state.get(p) for p in params):
            return False
        if any_nonzero([p.grad for p in params]):
            return False
        for p in params:
            self._init_state(group, p)
        return True

    def _update(self, group: dict[str, Any], k: int, params: list[Tensor]) -> None:
        """The T5X update for plain-tensor parameters that all take their k-th step."""
        # float32 views of params and grads: the same tensors when already float32.
        p32 = [p if p.dtype == torch.float32 else p.float() for p in params]
        g32 = [p.grad if p.grad.dtype == torch.float32 else p.grad.float() for p in params]
        v = [self.state[p]["exp_avg_sq"] for p in params]
        m = [self.state[p]["exp_avg"] for p in params] if group["beta1"] > 0.0 else None
        # A fused weight is its row blocks, one matrix each for the statistics (views: the
        # elementwise update writes through to the whole tensors).
        blocks = [row_blocks(p) for p in params]

        def split(tensors: list[Tensor]) -> list[Tensor]:
            return [
                b for t, rows in zip(tensors, blocks) for b in (t.split(rows) if t.dim() else (t,))
            ]

        cols = [math.prod(p.shape[1:]) for p in params]
        numel_sqrt = [math.sqrt(max(r * c, 1)) for rows, c in zip(blocks, cols) for r in rows]
        self._apply(group, k, split(p32), split(g32), split(v), split(m) if m else None, numel_sqrt)
        for p, q in zip(params, p32):
            if q is not p:  # low-precision parameter: round once, at the end, as T5X does
                p.copy_(q)

    def _update_dtensors(self, group: dict[str, Any], k: int, params: list[Tensor]) -> None:
        """The same update for DTensor parameters (FSDP2 Shard(0), tensor parallel, Replicate),
        giving the single-process result: elementwise math on each rank's local shard, and the
        two norms (RMS(p), RMS(u)) of each matrix (each row block of a fused weight) as sums of
        squares all-reduced over the mesh dimensions the parameter is sharded on, all tensors of
        a step in one collective. The state is placed like its parameter, so
        `torch.distributed.checkpoint.state_dict` works."""
        p_local, g_local, v_local, m_local, layouts, numel_sqrt = [], [], [], [], [], []
        matrices: list[tuple[int, int, int]] = []  # per block: (parameter, matrix, copies)
        for p in params:
            grad, mesh, placements = p.grad, p.device_mesh, p.placements
            if grad.placements != placements or (
                grad.device_mesh is not mesh and grad.device_mesh != mesh
            ):
                grad = grad.redistribute(mesh, placements)  # e.g. Partial (unreduced) gradients
            state = self.state[p]
            tensors = [p, grad, state["exp_avg_sq"]]
            if group["beta1"] > 0.0:
                tensors.append(state["exp_avg"])
            local = [local_shard(t) for t in tensors]
            # Each rank cuts its rows by the global row blocks (a block may have none here).
            first, cols = (
                global_row_offset(p),
                math.prod(p.shape[1:]),
            )  # p[0] would gather a DTensor
            here = local[0].shape[0] if p.dim() else 1
            blocks = row_blocks(p)
            groups = getattr(p, ROW_GROUPS, None) or [(i, 1) for i in range(len(blocks))]
            whole_rows = matrix_rows(blocks, groups)  # of each whole matrix, counted once
            begin = 0
            for rows, (matrix, copies) in zip(blocks, groups):
                lo, hi = max(begin, first), min(begin + rows, first + here)
                views = [t[lo - first : max(hi, lo) - first] if p.dim() else t for t in local]
                p_local.append(views[0])
                g_local.append(views[1])
                v_local.append(views[2])
                if group["beta1"] > 0.0:
                    m_local.append(views[3])
                layouts.append((mesh, placements))
                matrices.append((id(p), matrix, copies))
                numel_sqrt.append(math.sqrt(max(whole_rows[matrix] * cols, 1)))  # global size
                begin += rows
        p32 = [p if p.dtype == torch.float32 else p.float() for p in p_local]
        g32 = [g if g.dtype == torch.float32 else g.float() for g in g_local]
        m = m_local if group["beta1"] > 0.0 else None
        norms = sharded_norms(layouts)
        if any(getattr(p, ROW_GROUPS, None) for p in params):
            norms = whole_matrix_norms(norms, matrices)
        self._apply(group, k, p32, g32, v_local, m, numel_sqrt, norms)
        for p, q in zip(p_local, p32):
            if q is not p:
                p.copy_(q)

    @staticmethod
    def _placed_like(value: Tensor, p: Tensor) -> Tensor:
        """`value` as a float32 DTensor with `p`'s mesh and placements (a no-op when it is)."""
        dtensor = dtensor_type()
        if isinstance(value, dtensor):
            if value.device_mesh == p.device_mesh and tuple(value.placements) == tuple(
                p.placements
            ):
                return value
            return value.redistribute(p.device_mesh, p.placements)
        # A full plain tensor (a checkpoint loaded without DCP): keep this rank's shard, no comms.
        from torch.distributed.tensor import distribute_tensor

        local = value.to(p.to_local().device, torch.float32)
        return distribute_tensor(local, p.device_mesh, p.placements, src_data_rank=None)

    def _apply(
        self,
        group: dict[str, Any],
        k: int,
        p32: list[Tensor],
        g32: list[Tensor],
        v: list[Tensor],
        m: list[Tensor] | None,
        numel_sqrt: list[float],
        global_norms: Callable[..., list[list[Tensor] | None]] | None = None,
    ) -> None:
        """The T5X update on float32 tensors (whole tensors, or local shards with
        `global_norms` turning shard norms into whole-tensor norms); p32, v and m in place."""
        beta2 = 1.0 - k ** -group["decay_exponent"]  # 0 at k = 1: v starts at g^2 (no bias fix)
        decay = self.decay_rate(group)
        if not self.compiled or global_norms is not None:
            foreach_update_(group, beta2, decay, p32, g32, v, m, numel_sqrt, global_norms)
            return
        if self._fused_update is None:
            self._fused_update = torch.compile(fused_update_, dynamic=False)
        # What changes every step goes in as 0-d tensors, so that one graph serves every step
        # (torch.compile would make a new graph for each new Python float).
        scalars = torch.tensor([beta2, float(group["lr"]), decay], dtype=torch.float32)
        self._fused_update(
            p32,
            g32,
            v,
            m or [],
            scalars.to(p32[0].device, non_blocking=True),
            numel_sqrt,
            eps1=group["eps1"],
            eps2=group["eps2"],
            beta1=group["beta1"],
            clip_threshold=group["clip_threshold"],
            scaled=group["multiply_by_parameter_scale"],
        )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load like torch (PaLM §5 bitwise resume), but keep float32 moments and copy them.

        torch's Optimizer casts floating state to the parameter dtype (which would round the
        float32 moments of bf16 parameters) and may share tensors with `state_dict`. For DTensor
        parameters the moments become DTensors placed like the parameter (a full plain tensor is
        cut to this rank's shard; DCP's set_optimizer_state_dict already hands DTensors).
        """
        dtensor = dtensor_type()
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params):
            for key, value in state_dict["state"].get(pid, {}).items():
                if key == "step":
                    self.state[p][key] = value.detach().to("cpu", torch.int64, copy=True)
                elif dtensor is not None and isinstance(p, dtensor):
                    placed = self._placed_like(value.detach(), p)
                    self.state[p][key] = placed.to(torch.float32, copy=True)
                else:
                    self.state[p][key] = value.detach().to(p.device, torch.float32, copy=True)


def build_optimizer(name: str, params: Iterable[Tensor], **kwargs: Any) -> torch.optim.Optimizer:
    """The optimizer named `name` over the trainable `params`.

    "adafactor": PaLMAdafactor (PaLM §5), weight decay on every parameter as in T5X.
    "adamw": torch AdamW with weight decay only on >= 2-D tensors (matrices and embeddings, not
    norms or biases), nanoGPT's convention; torch multiplies its weight_decay by lr. Defaults
    betas=(0.9, 0.95), weight_decay=0.1 (nanoGPT / GPT-3).
    """
    params = [p for p in params if p.requires_grad]
    if name == "adafactor":
        return PaLMAdafactor(params, **kwargs)
    if name == "adamw":
        kwargs.setdefault("betas", (0.9, 0.95))
        weight_decay = kwargs.pop("weight_decay", 0.1)
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], **kwargs)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def optimizer_for(
    optim: OptimConfig, params: Iterable[Tensor], compiled: bool = False
) -> torch.optim.Optimizer:
    """The optimizer a run's `optim` config section asks for (PaLM §5 by default); `compiled`
    (train.compile) runs PaLM Adafactor's update compiled (AdamW stays torch's own)."""
    if optim.name == "adafactor":
        return build_optimizer(
            "adafactor",
            params,
            lr=optim.lr,
            beta1=optim.beta1,
            weight_decay=optim.weight_decay,
            compiled=compiled,
        )
    return build_optimizer(
        "adamw",
        params,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        weight_decay=float(optim.weight_decay),
    )
