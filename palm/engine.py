"""The serving engine behind `palm serve`: one worker thread owns the model, completion jobs wait
in a bounded queue, and admitted jobs decode in batches (palm.batching).

Batches interleave one token at a time, so a long job does not hold up a later short one. Jobs
are admitted while their rows fit under `max_rows` beside the running ones, those admitted
together with equal batch keys as one batch; an idle worker first waits `gather_s` (5 ms) for
company, so that requests sent together start together. A full queue is a BusyError (HTTP 429).
A failure inside one batch fails only its jobs, with a message each; the worker goes on. No HTTP
here (palm.serve).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable

from palm.batching import Batch, Done, Failed, Job, PromptScores, Step, score_prompt, send
from palm.errors import BusyError, ConfigError, PalmError, warn
from palm.kv_cache import weight_copies
from palm.model import PaLM
from palm.sampling import check_sampling
from palm.tokenizer import Tokenizer

# ---------------------------------------------------------------------------------------------
# The worker and its queue
# ---------------------------------------------------------------------------------------------


class Engine:
    """A bounded queue of jobs and the one thread that decodes them."""

    def __init__(
        self,
        model: PaLM,
        tokenizer: Tokenizer,
        max_queue: int = 64,
        max_rows: int = 32,
        batching: bool = True,
        gather_s: float = 0.005,
        transposed_weights: bool | None = None,
    ) -> None:
        if max_queue < 1 or max_rows < 1:
            raise ConfigError(f"max_queue and max_rows must be >= 1, got {max_queue}, {max_rows}")
        self.model, self.tokenizer = model.eval(), tokenizer
        # One set of decoding's weight copies for every batch, made once here (at M: 80-130 ms
        # a set, more than a short request's whole decoding); None: where measured to pay for
        # batches of up to max_rows (palm.kv_cache.weight_copies_pay: oneDNN's packed ones
        # on CPU; the (in, out) copies where batches are one row (in per-thread pieces), or
        # may be over 64).
        rows = None if 1 < max_rows <= 64 else max_rows
        self.transposed = weight_copies(model, transposed_weights, rows)
        self.max_queue, self.max_rows, self.batching = max_queue, max_rows, batching
        self.gather_s = gather_s if batching else 0.0  # seconds an idle worker waits for company
        self.context = model.config.max_seq_len
        self._pending: deque[Job] = deque()
        self._batches: list[Batch] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "batches": 0}
        self.largest_batch = 0  # most jobs that have shared one batch

    # -- the caller's side -----------------------------------------------------------------

    def submit(self, job: Job) -> None:
        """Queue a job; BusyError when the queue is full, ConfigError when it cannot run."""
        check_sampling(job.temperature, job.top_k, job.top_p)
        rows, longest = len(job.rows), max(len(p) for p in job.prompts)
        if rows > self.max_rows:
            raise ConfigError(f"{rows} sequences (prompts x n) exceed the server's {self.max_rows}")
        if min(len(p) for p in job.prompts) < 1 or longest + job.max_tokens > self.context:
            raise ConfigError(
                f"prompt ({longest} tokens) + max_tokens ({job.max_tokens}) exceeds "
                f"the model's context of {self.context} tokens"
            )
        with self._wake:
            if self._stopping:
                raise BusyError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise BusyError(
                    f"the request queue is full ({self.max_queue} waiting); retry shortly"
                )
            self._pending.append(job)
            self._wake.notify()

    def stats(self) -> dict[str, int | bool]:
        """Whether the worker runs; jobs queued and running; totals since the start."""
        with self._wake:
            queued = len(self._pending)
            running = sum(len(b.jobs) for b in self._batches)
        alive = self._thread is not None and self._thread.is_alive()
        counts = {**self.counts, "largest_batch": self.largest_batch}
        return {"alive": alive, "queued": queued, "running": running, **counts}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="palm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish nothing more: queued and running jobs fail with a shutdown message."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # -- the worker's side -----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._batches and not self._stopping:
                    self._wake.wait()
                if not self._batches:
                    self._gather()
                if self._stopping:
                    leftover = list(self._pending) + [j for b in self._batches for j in b.jobs]
                    self._pending.clear()
                    break
                admitted = self._admit()
            self._start_batches(admitted)
            for batch in list(self._batches):
                self._guarded(batch.jobs, lambda batch=batch: self._step(batch))
        for job in leftover:
            send(job, Failed("the server is shutting down"))

    def _gather(self) -> None:
        """From idle, wait `gather_s` for more requests (under the lock's wait), so that
        requests sent together start as one batch; while batches run, a step is the window."""
        deadline = time.monotonic() + self.gather_s
        while not self._stopping and sum(len(j.rows) for j in self._pending) < self.max_rows:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self._wake.wait(left)

    def _admit(self) -> list[Job]:
        """Jobs from the head of the queue while their rows fit beside the running ones."""
        free = self.max_rows - sum(r.size for b in self._batches for r in b.running)
        admitted = []
        while self._pending and len(self._pending[0].rows) <= free:
            job = self._pending.popleft()
            free -= len(job.rows)
            admitted.append(job)
        return admitted

    def _start_batches(self, jobs: list[Job]) -> None:
        """Prefill the admitted jobs, those with equal batch keys as one batch."""
        groups: dict[tuple[int, bool], list[Job]] = {}
        for job in jobs:
            if job.score_prompts and not self._guarded([job], lambda job=job: self._score(job)):
                continue  # failed (already told)
            if job.cancelled.is_set():
                self.counts["cancelled"] += 1
            elif job.max_tokens == 0:  # scoring only: every row ends at once
                rows = len(job.rows)
                send(job, Step([""] * rows, [None] * rows, ["length"] * rows))
                send(job, Done(0))
                self.counts["completed"] += 1
            else:
                key = job.batch_key if self.batching else (id(job), False)
                groups.setdefault(key, []).append(job)
        for group in groups.values():
            batch = self._guarded(
                group,
                lambda group=group: Batch(self.model, self.tokenizer, group, self.transposed),
            )
            if batch is not None:
                with self._wake:
                    self._batches.append(batch)
                self.counts["batches"] += 1
                self.largest_batch = max(self.largest_batch, len(group))

    def _score(self, job: Job) -> bool:
        for index, ids in enumerate(job.prompts):
            entries = score_prompt(self.model, self.tokenizer, ids, job.logprobs or 0)
            send(job, PromptScores(index, entries))
        return True

    def _step(self, batch: Batch) -> None:
        done, cancelled = batch.step()
        self.counts["completed"] += len(done)
        self.counts["cancelled"] += len(cancelled)
        if not batch.running:
            with self._wake:
                self._batches.remove(batch)

    def _guarded(self, jobs: list[Job], work: Callable):
        """Run `work`; if it fails, its jobs fail (one message each) and the worker goes on."""
        try:
            return work()
        except Exception as error:  # noqa: BLE001 - never let one request end the server
            if isinstance(error, PalmError):
                message = str(error)
            else:
                message = f"internal error: {type(error).__name__}: {error}"
                warn(f"engine: {message}\n{traceback.format_exc()}")
            for job in jobs:
                send(job, Failed(message))
            self.counts["failed"] += len(jobs)
            with self._wake:
                self._batches = [b for b in self._batches if not any(j in jobs for j in b.jobs)]
            return None
