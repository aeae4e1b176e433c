"""The training loop (PaLM §5), reading top to bottom like a table of contents.

    set up (data, model, optimizer, run folder, resume)
    for each optimizer step k:
        lr = schedule(k); batch = ramp(k)             # pure functions of k
        micro-batches: forward, loss (+ z-loss), backward, summed by token count
        loss spike? -> roll back and skip batches   # PaLM §5.1
        clip the global gradient norm at 1.0, optimizer step
        log, evaluate, checkpoint, stop on a signal or the time limit

Every batch is a pure function of (data seed, step, rank, world size) and every checkpoint holds
the step, the data offset and the RNG states, so a resumed run is bit-identical to one that
never stopped (PaLM §5 "bitwise determinism").
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from palm.checkpoint import (
    CheckpointError,
    TrainingState,
    capture_rng,
    check_same_model,
    list_checkpoints,
    load_checkpoint,
    load_checkpoint_weights,
    prune_checkpoints,
    restore_rng,
    save_checkpoint,
)
from palm.config import Config
from palm.distributed import (
    full_state_dicts,
    gradient_sync,
    init_distributed,
    load_full_state_dicts,
    wrap_model,
)
from palm.flops import flops_per_token
from palm.guards import SpikeDetector, StopSignal
from palm.loss import IGNORE_INDEX
from palm.metrics import MetricsLogger, peak_flops
from palm.run import (
    RunSetup,
    build_model,
    clip_gradients,
    make_optimizer,
    pick_device,
    prepare_run,
)
from palm.schedules import (
    BatchRamp,
    LRSchedule,
    batch_size_at,
    lr_at,
    micro_batches,
    samples_before,
)

# A test hook: (step, micro_step, loss) -> loss, used to inject loss spikes.
LossHook = Callable[[int, int, Tensor], Tensor]


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    val_loss: float | None
    val_perplexity: float | None
    tokens_per_s: float
    mfu: float
    rollbacks: int
    stopped_by: str  # "max_steps", "time_limit" or "signal"
    sample: str | None = None  # text generated at the end (train.sample_tokens)
    is_main: bool = True  # rank 0 (the only one that prints)


class Trainer:
    def __init__(self, config: Config, loss_hook: LossHook | None = None) -> None:
        self.dist = init_distributed(config.train.parallel, pick_device(config.train.device).type)
        self.setup: RunSetup = prepare_run(config, self.dist)
        self.config = self.setup.config  # resolved: vocabulary, seq_len, batch from the data
        self.loss_hook = loss_hook
        c = self.config
        self.device = self.setup.device
        torch.manual_seed(c.train.seed)  # the same initial weights on every rank
        self.model = build_model(c, self.dist, self.device)
        # What runs forward/backward: the model, wrapped by DDP (FSDP2 shards it in place).
        self.wrapped = (
            self.model
            if self.dist.parallel == "fsdp"
            else wrap_model(self.model, self.dist, self.device)
        )
        self.forward = torch.compile(self.wrapped) if c.train.compile else self.wrapped
        self.optimizer = make_optimizer(c, self.model)
        self.schedule = LRSchedule(
            name=c.optim.schedule,
            peak=c.optim.lr,
            constant_steps=c.optim.constant_steps,
            warmup_steps=c.optim.warmup_steps,
            total_steps=c.train.max_steps,
            min_ratio=c.optim.min_lr_ratio,
        )
        batch = c.data.batch_size
        self.ramp = (
            BatchRamp.paper_shape(batch, c.train.max_steps)
            if c.optim.batch_ramp
            else BatchRamp.constant(batch, c.train.max_steps)
        )
        for _, stage_batch in self.ramp.stages:  # fail now, not at the first ramp boundary
            micro_batches(stage_batch // self.dist.world_size, c.data.micro_batch_size)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.setup.precision == "bfloat16"
            else nullcontext()
        )
        self.state = TrainingState(step=0)
        self.ckpt_root = self.setup.run_dir / "checkpoints"
        self.flops_per_token = flops_per_token(c.model, c.data.seq_len)
        self.peak_flops, self.peak_source = peak_flops(
            self.device, torch.float32 if self.setup.precision == "float32" else torch.bfloat16
        )

    # --- checkpoints --------------------------------------------------------------------------

    def save(self) -> None:
        """Every rank helps gather the full state (FSDP); rank 0 writes it."""
        self.state.rng = capture_rng()
        model_state, optimizer_state = full_state_dicts(self.wrapped, self.optimizer)
        if self.dist.is_main:
            save_checkpoint(
                self.ckpt_root, model_state, optimizer_state, self.state, self.config.to_dict()
            )
            prune_checkpoints(self.ckpt_root, self.config.train.keep_checkpoints)
        self.dist.barrier()  # nobody reads checkpoints/ while rank 0 is still writing

    def load(self, path: Path) -> None:
        loaded = load_checkpoint(path)
        check_same_model(path, loaded.config["model"], self.config.to_dict()["model"])
        load_full_state_dicts(
            self.wrapped, self.optimizer, loaded.model_state, loaded.optimizer_state
        )
        self.state = loaded.state
        restore_rng(self.state.rng)

    def resume(self) -> None:
        checkpoints = list_checkpoints(self.ckpt_root)
        mode = self.config.train.resume
        if checkpoints and mode == "never":
            raise CheckpointError(
                f"{self.ckpt_root} already holds checkpoints; resume it "
                f"(train.resume=auto) or choose another train.name"
            )
        if not checkpoints and mode == "must":
            raise CheckpointError(
                f"no complete checkpoint in {self.ckpt_root} to resume; "
                f"start a new run without --resume"
            )
        if not checkpoints and self.config.train.init_from:
            self.init_weights(self.config.train.init_from)
        if checkpoints and mode in ("auto", "must"):
            self.load(checkpoints[-1])
            if self.dist.is_main:
                print(f"resumed from {checkpoints[-1]} at step {self.state.step}")

    def init_weights(self, source: str) -> None:
        """Fine-tuning: the weights of another checkpoint, with a fresh optimizer and step 0."""
        from palm.inference import resolve_checkpoint

        path = resolve_checkpoint(source, "latest")
        weights = load_checkpoint_weights(path)
        load_full_state_dicts(self.wrapped, self.optimizer, weights, {"state": {}})
        if self.dist.is_main:
            print(f"initialised from {path}")

    def roll_back(self, spike_step: int, loss: float, log: MetricsLogger) -> None:
        """PaLM §5.1: restart ~rollback_steps before the spike and skip the batches around it."""
        t = self.config.train
        if self.state.rollbacks >= t.max_rollbacks:
            raise RuntimeError(
                f"loss spiked again at step {spike_step} after {t.max_rollbacks} "
                f"rollbacks; lower optim.lr or inspect the data"
            )
        candidates = list_checkpoints(self.ckpt_root)
        if not candidates:
            raise RuntimeError(f"loss spike at step {spike_step} but no checkpoint to roll back to")
        target = [p for p in candidates if int(p.name[5:]) <= spike_step - t.rollback_steps]
        path = target[-1] if target else candidates[0]
        rollbacks = self.state.rollbacks + 1
        self.load(path)
        back_to = self.state.step
        skip = max(t.skip_batches, spike_step - back_to + 1)  # never replay the spiking batch
        self.state.sample_offset += samples_before(back_to + skip, self.ramp) - samples_before(
            back_to, self.ramp
        )
        self.state.rollbacks = rollbacks
        log.log(
            {
                "step": spike_step,
                "kind": "event",
                "event": "loss_spike",
                "loss": loss,
                "rolled_back_to": back_to,
                "skipped_batches": skip,
            }
        )
        if self.dist.is_main:
            print(
                f"loss spike at step {spike_step} (loss {loss:.4g}): rolled back to step "
                f"{back_to}, skipping {skip} batches"
            )

    # --- one step -----------------------------------------------------------------------------

    def batch_indices(self, step: int) -> np.ndarray:
        batch = batch_size_at(step, self.ramp)
        first = samples_before(step, self.ramp) + self.state.sample_offset
        return self.setup.rank_indices(first, batch)

    def train_step(self, step: int) -> tuple[float, float, float, int]:
        """Forward/backward over this rank's micro-batches of one step.

        Returns the step's (loss, cross-entropy, z-loss, target tokens) over the global batch.
        """
        indices = self.batch_indices(step)
        micro = self.config.data.micro_batch_size
        n_micro = micro_batches(len(indices), micro)
        batches = [
            self.setup.train.batch(indices[i * micro : (i + 1) * micro]) for i in range(n_micro)
        ]
        # Weight each micro-batch by its share of the global batch's target tokens, so the
        # gradient is that of the mean over the whole batch (padding excluded), however it is
        # split over micro-batches and ranks. DDP/FSDP average over ranks, hence the world size.
        local_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        n_total = int(self.dist.all_reduce_sum([local_tokens], self.device)[0])
        scale = self.dist.world_size / max(n_total, 1)
        ce_sum = z_sum = 0.0
        for micro_step, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with gradient_sync(self.wrapped, self.dist, micro_step == n_micro - 1):
                with self.autocast:
                    # The loss comes out of the model's forward (fused with the output
                    # projection, palm.loss.linear_lm_loss), so DDP/FSDP/compile see it all.
                    out = self.forward(x, targets=y, z_loss_coef=self.config.train.z_loss)
                loss = out.loss
                if self.loss_hook is not None:
                    loss = self.loss_hook(step, micro_step, loss)
                (loss * (out.n_tokens * scale)).backward()
            share = out.n_tokens / max(n_total, 1)
            # Kept on the device: one host sync per step, not one per micro-batch.
            ce_sum = ce_sum + ((out.cross_entropy + loss - out.loss) * share).detach()
            z_sum = z_sum + (out.z_loss * share).detach()
        ce_sum, z_sum = self.dist.all_reduce_sum([float(ce_sum), float(z_sum)], self.device)
        return ce_sum + z_sum, ce_sum, z_sum, n_total

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation cross-entropy over a fixed set of windows (the same every time)."""
        valid = self.setup.valid
        if valid is None:
            return None
        self.model.eval()
        micro = self.config.data.micro_batch_size
        # The same windows whatever the number of ranks, shared out among them.
        n = min(self.config.train.eval_batches * micro, len(valid))
        mine = np.arange(self.dist.rank, n, self.dist.world_size)  # each rank scores a share
        total, count = 0.0, 0
        for start in range(0, max(len(mine), 1), micro):
            chunk = mine[start : start + micro]
            if len(chunk) == 0:  # FSDP: every rank must run the same number of forwards
                chunk = np.arange(1)
            x, y = valid.batch(chunk)
            with self.autocast:
                out = self.forward(x.to(self.device), targets=y.to(self.device), z_loss_coef=0.0)
            if start < len(mine):
                total += float(out.cross_entropy) * float(out.n_tokens)
                count += int(out.n_tokens)
        total, count = self.dist.all_reduce_sum([total, count], self.device)
        self.model.train()
        return total / max(count, 1)

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        c, t = self.config, self.config.train
        self.resume()
        is_main = self.dist.is_main
        log = MetricsLogger(self.setup.run_dir, enabled=is_main)
        if t.spike_detection and not list_checkpoints(self.ckpt_root):
            self.save()  # something to roll back to before the first regular checkpoint
        detector = SpikeDetector(
            t.spike_window, t.spike_sigma, t.spike_ratio, self.state.recent_losses
        )
        params = [p for p in self.model.parameters() if p.requires_grad]
        start_time = interval_start = time.perf_counter()
        interval_tokens, tokens_per_s, mfu, stopped_by = 0, 0.0, 0.0, "max_steps"
        val_loss = None
        progress = self.setup.progress(initial=self.state.step, total=t.max_steps)
        self.model.train()
        with StopSignal() as stop:
            while self.state.step < t.max_steps:
                step = self.state.step
                lr = lr_at(step, self.schedule)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, ce, z, n_tokens = self.train_step(step)
                if t.spike_detection and detector.is_spike(loss):
                    self.optimizer.zero_grad(set_to_none=True)  # never applied
                    self.roll_back(step, loss, log)
                    detector = SpikeDetector(
                        t.spike_window, t.spike_sigma, t.spike_ratio, self.state.recent_losses
                    )
                    progress.n = self.state.step
                    continue
                grad_norm = clip_gradients(params, c.optim.grad_clip)
                if not math.isfinite(grad_norm) or not math.isfinite(loss):
                    raise RuntimeError(
                        f"non-finite loss or gradient at step {step} "
                        f"(enable train.spike_detection to roll back instead)"
                    )
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                detector.losses.append(loss)
                self.state.step = step = step + 1
                self.state.tokens_seen += n_tokens  # global: all ranks
                self.state.recent_losses = list(detector.losses)
                interval_tokens += n_tokens
                progress.update(1)
                over_time = t.max_minutes and time.perf_counter() - start_time > 60 * t.max_minutes
                # All ranks stop together: a signal or the clock seen by any rank counts.
                signalled, over_time = self.dist.all_reduce_sum(
                    [float(stop.received is not None), float(over_time)], self.device
                )
                stopped_by = "signal" if signalled else "time_limit" if over_time else stopped_by
                finished = step >= t.max_steps or stopped_by != "max_steps"
                if step % t.log_every == 0 or finished:
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_tokens / max(elapsed, 1e-9)
                    mfu = tokens_per_s * self.flops_per_token / self.peak_flops
                    log.log(
                        {
                            "step": step,
                            "kind": "train",
                            "tokens": self.state.tokens_seen,
                            "loss": loss,
                            "cross_entropy": ce,
                            "z_loss": z,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "tokens_per_s": tokens_per_s,
                            "mfu": mfu,
                        }
                    )
                    report = dict(
                        loss=f"{loss:.3f}",
                        lr=f"{lr:.2e}",
                        tok_s=f"{tokens_per_s:,.0f}",
                        mfu=f"{mfu:.1%}",
                    )
                    if not progress.disable:
                        progress.set_postfix(report)
                    elif is_main:  # no terminal (a log file, CI): one line per logged step
                        print(
                            f"step {step}/{t.max_steps} "
                            + " ".join(f"{k} {v}" for k, v in report.items()),
                            flush=True,
                        )
                    interval_start, interval_tokens = time.perf_counter(), 0
                if (t.eval_every and step % t.eval_every == 0) or finished:
                    val_loss = self.evaluate()
                    self.state.val_loss = val_loss
                    if val_loss is not None:
                        perplexity = math.exp(min(val_loss, 700))
                        log.log(
                            {
                                "step": step,
                                "kind": "eval",
                                "val_loss": val_loss,
                                "val_perplexity": perplexity,
                            }
                        )
                        if is_main:
                            progress.write(
                                f"step {step}: validation loss {val_loss:.4f}, "
                                f"perplexity {perplexity:.2f}"
                            )
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or finished:
                    self.save()
                self.state.val_loss = None
                if finished:
                    break
        progress.close()
        log.close()
        return TrainResult(
            self.setup.run_dir,
            self.state.step,
            val_loss,
            None if val_loss is None else math.exp(min(val_loss, 700)),
            tokens_per_s,
            mfu,
            self.state.rollbacks,
            stopped_by,
            self.sample() if is_main or self.dist.parallel == "fsdp" else None,
            is_main,
        )

    def sample(self) -> str | None:
        """A short sample from the trained model, so a run shows what it learned."""
        t = self.config.train
        path = self.setup.run_dir / "tokenizer.model"
        if t.sample_tokens <= 0 or not path.is_file():
            return None
        from palm.sampling import generate
        from palm.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(path)
        prompt = [tokenizer.eod_id] + tokenizer.encode(t.sample_prompt)
        room = self.config.model.max_seq_len - len(prompt)
        generator = torch.Generator(self.device).manual_seed(t.seed)
        new = generate(
            self.model,
            torch.tensor([prompt], device=self.device),
            min(t.sample_tokens, room),
            temperature=0.8,
            top_k=40,
            eod_id=tokenizer.eod_id,
            generator=generator,
        )
        return t.sample_prompt + tokenizer.decode(new[0].tolist())


def train(config: Config, loss_hook: LossHook | None = None) -> TrainResult:
    trainer = Trainer(config, loss_hook)
    try:
        return trainer.fit()
    finally:
        trainer.dist.close()
