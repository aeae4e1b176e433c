"""The training loop (PaLM §5), reading top to bottom like a table of contents.

    set up (data, model, optimizer, run folder, resume)
    for each optimizer step k:
        lr = schedule(k); batch = ramp(k)             # pure functions of k
        micro-batches: forward, loss (+ z-loss), backward; clip the gradient norm at 1.0
        loss spike? -> roll back and skip batches; else the optimizer step   # PaLM §5.1
        log, evaluate, checkpoint, stop on a signal or the time limit

Every batch is a pure function of (data seed, step, rank, world size) and every checkpoint holds
the step, data offset and RNG states: a resumed run is bit-identical (PaLM §5 "bitwise").
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from palm import checkpoint
from palm.checkpoint import TrainingState
from palm.config import Config
from palm.data import open_windows, rank_sample_indices
from palm.distributed import (
    clip_gradients,
    gradient_sync,
    init_distributed,
    load_full_state_dicts,
    pick_device,
    pick_precision,
)
from palm.errors import CheckpointError, CorruptCheckpointError, TrainingError, warn
from palm.guards import SpikeDetector, StopSignal, recent_repeat, rollback_target
from palm.loss import IGNORE_INDEX, LossOutput, perplexity_of
from palm.metrics import Console, Eta, MetricsLogger, Throughput, TrainResult, peak_flops, plan_line
from palm.model import PaLM
from palm.optim import optimizer_for
from palm.parallel import parallelize
from palm.perplexity import validation_loss
from palm.runs import init_weights, prepare_run_dir, resolve_run, saved_config
from palm.sampling import sample_run
from palm.saving import Checkpointer
from palm.schedules import (
    BatchRamp,
    LRSchedule,
    batch_size_at,
    kept_ramp,
    lr_at,
    micro_batches,
    samples_before,
)


class Trainer:
    """One run of PaLM §5 training: built from a Config, run by `fit()`.

    Holds two handles to the network: `model`, the single-device PaLM (parameters, evaluation,
    sampling), and `train_module`, what forward/backward run through (the model itself, or DDP
    around it; compiled in place with train.compile).
    """

    def __init__(self, config: Config) -> None:
        t = config.train
        self.world = init_distributed(t.parallel, pick_device(t.device).type, t.tensor_parallel)
        self.device = self.world.device(pick_device(config.train.device).type)
        self.precision = pick_precision(config.train.precision, self.device)
        self.config, note = resolve_run(config, self.world.dp_size)
        c = self.config
        if note:
            self.world.print(note)
        self.run_dir, tokenizer_sha256 = prepare_run_dir(c, self.world.is_main)
        self.train_data, self.valid_data = open_windows(c.data.path, c.data.seq_len, c.data.seed)
        self.train_data.check_compatible(tokenizer_sha256, c.model.vocab_size)
        if self.valid_data is None:
            self.world.print(
                f"note: {c.data.path} has no validation tokens, so this run reports no "
                f"validation loss; prepare held-out splits with download.py --split True"
            )
        torch.manual_seed(c.train.seed)  # the same initial weights on every rank
        self.model, self.train_module = parallelize(
            lambda: PaLM(c.model),
            self.world,
            self.device,
            meta_init=c.train.meta_init,
            activation_checkpointing=c.train.activation_checkpointing,
            compile=c.train.compile,
        )
        self.optimizer = optimizer_for(c.optim, self.model.parameters(), compiled=c.train.compile)
        self.schedule = LRSchedule.from_config(c)
        self.ramp = self.checked_ramp(BatchRamp.from_config(c))
        bf16 = self.precision == "bfloat16"
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else nullcontext()
        self.state = TrainingState(step=0)
        self.spikes = SpikeDetector(c.train.spike_window, c.train.spike_sigma, c.train.spike_ratio)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.checkpointer = Checkpointer(
            self.ckpt_root, self.world, self.world.sharded, c.train.async_checkpoint
        )
        self.peak_flops, self.peak_source = peak_flops(
            self.device, torch.bfloat16 if bf16 else torch.float32
        )

    def checked_ramp(self, ramp: BatchRamp) -> BatchRamp:
        """`ramp`, once each stage's batch splits into this run's micro-batches (checked now)."""
        for _, stage_batch in ramp.stages:
            micro_batches(stage_batch // self.world.dp_size, self.config.data.micro_batch_size)
        return ramp

    def save(self, abandon_after: int | None = None, log: MetricsLogger | None = None) -> None:
        """A checkpoint of this step (palm.saving: gathered by rank 0, or every rank its shards,
        maybe in the background); then the ones after step `abandon_after` (a rollback's
        abandoned ones) are removed and old ones pruned."""
        self.state.rng = checkpoint.capture_rng()
        self.state.recent_losses = self.spikes.state_dict()
        records = self.checkpointer.save(
            self.train_module,
            self.optimizer,
            self.state,
            self.config.to_dict(),
            self.config.train.keep_checkpoints,
            abandon_after,
        )
        for record in records if log is not None else ():
            log.log(record)

    def load(self, path: Path) -> None:
        """Restore a checkpoint of this run (verified; CorruptCheckpointError if it is not)."""
        checkpoint.check_same_model(path, saved_config(path).model, self.config.model)
        self.state = self.checkpointer.load(path, self.train_module, self.optimizer)
        self.spikes.load_state_dict(self.state.recent_losses)
        checkpoint.restore_rng(self.state.rng)

    def resume(self) -> None:
        """Continue the newest checkpoint that verifies (train.resume), or start a new run
        (from train.init_from's weights when fine-tuning); fix the batch ramp for the run."""
        t = self.config.train
        if self.world.is_main:
            if removed := checkpoint.clean_stale(self.ckpt_root):
                print(f"removed {len(removed)} unfinished checkpoint folder(s) of dead runs")
            for path in checkpoint.incomplete_checkpoints(self.ckpt_root):
                kept = checkpoint.set_aside(path, "incomplete")
                warn(f"checkpoint {path} lacks files; moved to {kept.name} (kept for inspection)")
        self.world.barrier()
        candidates = checkpoint.checkpoints_to_resume(self.ckpt_root, t.resume)
        for path in candidates:
            try:
                self.load(path)
            except CorruptCheckpointError as error:
                if self.world.is_main:
                    kept = checkpoint.set_aside(path)
                    warn(f"{error}; skipped and moved to {kept.name} (kept for inspection)")
                self.world.barrier()
                continue
            self.world.print(f"resumed from {path} at step {self.state.step}")
            break
        else:
            if candidates:
                raise CheckpointError(f"every checkpoint in {self.ckpt_root} is corrupt")
            if t.init_from:  # fine-tuning: another run's weights, a fresh optimizer, step 0
                source, weights = init_weights(t.init_from)
                load_full_state_dicts(self.train_module, self.optimizer, weights, {"state": {}})
                self.world.print(f"initialised from {source}")
        self.ramp = self.checked_ramp(kept_ramp(self.state.ramp, self.ramp, self.ckpt_root))
        self.state.ramp = [list(stage) for stage in self.ramp.stages]

    def guard(self, step: int, loss: float, grad_norm: float, log, console) -> str:
        """PaLM §5.1 on one step: "apply"; "skip" (a non-finite gradient, finite loss: counted);
        "rolled_back" (a loss spike, a non-finite loss, or a second non-finite gradient within
        the spike window). Without train.spike_detection: "apply" (non-finite stops the run)."""
        if not self.config.train.spike_detection:
            return "apply"
        if self.spikes.is_spike(loss):
            self.roll_back(step, f"loss spike (loss {loss:.4g})", log, console)
            return "rolled_back"
        if math.isfinite(grad_norm):
            return "apply"
        repeat = recent_repeat(self.state.nonfinite_steps, step, self.config.train.spike_window)
        self.state.nonfinite_steps.append(step)
        log.log({"step": step, "kind": "event", "event": "nonfinite_gradient", "loss": loss})
        if repeat:
            self.roll_back(step, "non-finite gradient norm again", log, console)
            return "rolled_back"
        console.write(f"non-finite gradient norm at step {step} (loss {loss:.4g}): update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        return "skip"

    def roll_back(self, spike_step: int, why: str, log: MetricsLogger, console: Console) -> None:
        """PaLM §5.1: restart ~rollback_steps before the spike and skip the batches around it,
        saving that state as the newest checkpoint before the abandoned ones are removed."""
        t = self.config.train
        self.optimizer.zero_grad(set_to_none=True)  # the spiking gradient is never applied
        if self.state.rollbacks >= t.max_rollbacks:
            raise TrainingError(
                f"{why} at step {spike_step} after {t.max_rollbacks} "
                f"rollbacks; lower optim.lr or inspect the data"
            )
        path = rollback_target(
            checkpoint.list_checkpoints(self.ckpt_root), spike_step, t.rollback_steps
        )
        rollbacks = self.state.rollbacks + 1
        self.load(path)
        back_to = self.state.step
        skip = max(t.skip_batches, spike_step - back_to + 1)  # never replay the spiking batch
        skipped = samples_before(back_to + skip, self.ramp) - samples_before(back_to, self.ramp)
        self.state.sample_offset += skipped
        self.state.rollbacks = rollbacks
        self.save(abandon_after=back_to)
        event = {"event": "loss_spike", "reason": why, "rolled_back_to": back_to}
        log.log({"step": spike_step, "kind": "event", **event, "skipped_batches": skip})
        console.write(
            f"{why} at step {spike_step}: rolled back to step {back_to}, skipping {skip} batches"
        )
        console.advance(back_to)

    def batch_indices(self, step: int) -> np.ndarray:
        """This rank's global sample numbers for optimizer step `step` (PaLM §5 batch ramp)."""
        batch = batch_size_at(step, self.ramp)
        first = samples_before(step, self.ramp) + self.state.sample_offset
        return rank_sample_indices(first, batch, self.world.dp_rank, self.world.dp_size)

    def loss(self, step: int, micro_step: int, out: LossOutput) -> Tensor:
        """The loss to backpropagate for one micro-batch: the model's (cross-entropy + z-loss).
        A seam for subclasses (the tests inject loss spikes here)."""
        return out.loss

    def train_step(self, step: int) -> tuple[float, float, float, int]:
        """Forward/backward over this rank's micro-batches of one step.

        Returns the step's (loss, cross-entropy, z-loss, target tokens) over the global batch.
        """
        indices = self.batch_indices(step)
        micro = self.config.data.micro_batch_size
        n_micro = micro_batches(len(indices), micro)
        batches = [
            self.train_data.batch(indices[i * micro : (i + 1) * micro]) for i in range(n_micro)
        ]
        # Weight each micro-batch by its share of the global batch's target tokens, so the
        # gradient is that of the mean over the whole batch (padding excluded), however it is
        # split over micro-batches and ranks. DDP/FSDP average over replicas, hence dp_size.
        local_tokens = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
        n_total = int(self.world.all_reduce_sum([local_tokens], self.device)[0])
        scale = self.world.dp_size / max(n_total, 1)
        ce_sum = z_sum = 0.0
        for micro_step, (x, y) in enumerate(batches):
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with gradient_sync(self.train_module, self.world, micro_step == n_micro - 1):
                with self.autocast:
                    # The loss comes out of the model's forward (fused with the output
                    # projection, palm.loss.linear_lm_loss), so DDP/FSDP/compile see it all.
                    out = self.train_module(x, targets=y, z_loss_coef=self.config.train.z_loss)
                loss = self.loss(step, micro_step, out)
                (loss * (out.n_tokens * scale)).backward()
            share = out.n_tokens / max(n_total, 1)
            # Whatever `loss()` added to the model's loss is reported as cross-entropy (zero
            # unless a subclass changed it). Kept on the device: one host sync per step.
            ce_sum = ce_sum + ((out.cross_entropy + loss - out.loss) * share).detach()
            z_sum = z_sum + (out.z_loss * share).detach()
        ce_sum, z_sum = self.world.all_reduce_sum([float(ce_sum), float(z_sum)], self.device)
        return ce_sum + z_sum, ce_sum, z_sum, n_total

    def clip_gradients(self) -> float:
        """Global gradient-norm clipping (PaLM §5: 1.0); returns the norm before clipping."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        return clip_gradients(params, self.config.optim.grad_clip)

    def optimizer_step(self, step: int, loss: float, grad_norm: float) -> None:
        if not math.isfinite(grad_norm) or not math.isfinite(loss):
            raise TrainingError(
                f"non-finite loss or gradient at step {step} "
                f"(enable train.spike_detection to roll back instead)"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fit(self) -> TrainResult:
        """Train to train.max_steps (or a signal, or train.max_minutes): PaLM §5's loop."""
        t = self.config.train
        self.resume()
        log = MetricsLogger(self.run_dir, enabled=self.world.is_main)
        console = self.start_console()
        if t.spike_detection and not checkpoint.list_checkpoints(self.ckpt_root):
            self.save()  # something to roll back to before the first regular checkpoint
        meter = Throughput(self.config, self.peak_flops)
        val_loss, stopped_by, start = None, "max_steps", time.perf_counter()
        self.model.train()
        with StopSignal() as stop:
            while self.state.step < t.max_steps:
                step = self.state.step
                lr = self.set_lr(step)
                loss, ce, z, n_tokens = self.train_step(step)
                grad_norm = self.clip_gradients()
                verdict = self.guard(step, loss, grad_norm, log, console)
                if verdict == "rolled_back":
                    continue
                if verdict == "apply":
                    self.optimizer_step(step, loss, grad_norm)
                    self.spikes.record(loss)
                self.state.step = step = step + 1
                self.state.tokens_seen += n_tokens  # global: all ranks
                meter.tokens += n_tokens
                console.advance(step)
                stopped_by = stop.reason(start, t.max_minutes, self.world, self.device)
                finished = step >= t.max_steps or stopped_by != "max_steps"
                if step % t.log_every == 0 or finished:
                    metrics = dict(
                        loss=loss, cross_entropy=ce, z_loss=z, lr=lr, grad_norm=grad_norm
                    )
                    self.log_train(step, metrics, meter, log, console)
                if (t.eval_every and step % t.eval_every == 0) or finished:
                    with meter.paused():  # throughput counts training steps only
                        val_loss = self.evaluate(step, log, console)
                if (t.checkpoint_every and step % t.checkpoint_every == 0) or finished:
                    with meter.paused():
                        self.save(log=log)
                self.state.val_loss = None
                if finished:
                    break
        for record in self.checkpointer.finish():  # the save in flight, if any
            log.log(record)
        console.close()
        log.close()
        return self.result(val_loss, meter, stopped_by)

    def start_console(self) -> Console:
        """The run's console: the plan first, the ETA once measured (rank 0 only)."""
        t, d, first, world = self.config.train, self.config.data, self.state.step, self.world
        eta = Eta(first, t.max_steps, d.batch_size * d.seq_len, self.device.type)
        console = Console(first, t.max_steps, world.is_main, eta)
        parameters = self.model.num_parameters()
        console.write(plan_line(self.config, parameters, first, world.dp_size, self.device.type))
        return console

    def set_lr(self, step: int) -> float:
        """PaLM §5: the learning rate of update `step`, a pure function of it."""
        lr = lr_at(step, self.schedule)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def log_train(
        self, step: int, metrics: dict, meter: Throughput, log: MetricsLogger, console: Console
    ) -> None:
        tokens_per_s, step_mfu = meter.lap()
        record = {"step": step, "kind": "train", "time": time.time(), **metrics}
        record["tokens"] = self.state.tokens_seen
        log.log({**record, "tokens_per_s": tokens_per_s, "mfu": step_mfu})
        console.train(step, metrics["loss"], metrics["lr"], tokens_per_s, step_mfu)

    def evaluate(self, step: int, log: MetricsLogger, console: Console) -> float | None:
        """Mean validation cross-entropy over a fixed set of windows (the same every time)."""
        if self.valid_data is None:
            return None
        d, n = self.config.data, self.config.train.eval_batches * self.config.data.micro_batch_size
        self.model.eval()
        began = time.perf_counter()
        with self.autocast:
            val_loss = validation_loss(
                self.train_module, self.valid_data, n, d.micro_batch_size, self.world, self.device
            )
        self.model.train()
        self.state.val_loss = val_loss
        record = {"step": step, "kind": "eval", "val_loss": val_loss}
        record.update(val_perplexity=perplexity_of(val_loss), seconds=time.perf_counter() - began)
        log.log(record)
        console.evaluation(step, val_loss)
        return val_loss

    def result(self, val_loss: float | None, meter: Throughput, stopped_by: str) -> TrainResult:
        t = self.config.train  # FSDP: every rank takes part in the forwards, rank 0 keeps it
        sampling = t.sample_tokens > 0 and (self.world.is_main or self.world.sharded)
        sample = sample_run(self.model, self.run_dir / "tokenizer.model", t) if sampling else None
        return TrainResult(
            self.run_dir,
            self.state.step,
            val_loss,
            None if val_loss is None else perplexity_of(val_loss),
            meter.tokens_per_s,
            meter.mfu,
            self.state.rollbacks,
            stopped_by,
            sample,
            self.world.is_main,
        )


def train(config: Config) -> TrainResult:
    """Train one run from its config; the process group (if any) is closed afterwards."""
    trainer = Trainer(config)
    try:
        return trainer.fit()
    finally:
        trainer.world.close()
