"""The OpenAI completions protocol as palm serves it: the request schema (pydantic), a request
turned into an engine job, and the engine's events turned into OpenAI's choice objects.

No HTTP here (palm.serve). Refusals are ApiError, with the HTTP status and the field at fault.
A prompt is read after <eod>, as generate.py reads it; `top_k` and `ignore_eos` (generate.py's
--ignore_eod) are extensions, as in vLLM; OpenAI fields palm cannot honour are accepted only at
the value that changes nothing (best_of = n, penalties 0, no logit_bias, no suffix).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from palm.batching import Event, Job, PromptScores, Step, TokenLogprob
from palm.engine import Engine
from palm.errors import PalmError
from palm.tokenizer import Tokenizer

MAX_STOPS = 4  # as OpenAI
UNION_FIELDS = {
    "prompt": "a string or a non-empty list of strings",
    "stop": "a string, a list of strings or null",
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False  # a last chunk with the usage and no choices


class CompletionRequest(BaseModel):
    """POST /v1/completions: OpenAI's fields, plus top_k and ignore_eos as vLLM has them."""

    model_config = ConfigDict(extra="forbid")
    model: str
    prompt: str | Annotated[list[str], Field(min_length=1)]  # "" = unconditional
    max_tokens: int | None = Field(16, ge=0)  # None: up to the cap or the context
    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)  # 0 = off
    n: int = Field(1, ge=1)  # samples per prompt
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)  # None: a fresh random seed
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False  # the prompt is part of each choice's text (and of its logprobs)
    logprobs: int | None = Field(None, ge=0, le=5)  # alternatives reported per token
    ignore_eos: bool = False  # decode past <eod>
    best_of: int | None = Field(None, ge=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None
    user: str | None = None  # accepted, unused


class ApiError(PalmError):
    """A request the API refuses: HTTP status, message naming the field, OpenAI error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str = "") -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code or None


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line and the field at fault for pydantic's errors about a request body."""
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    loc = [str(part) for part in first["loc"] if part != "body"]
    if not loc:
        return f"the request body must be a JSON object ({first['msg']})", None
    param, where = loc[0], ".".join(loc)  # the top-level field; the place inside it
    if first["type"] == "extra_forbidden":
        known = "OpenAI's completion fields, plus top_k and ignore_eos"
        return f"{where}: unknown field (this server takes {known})", param
    if first["type"] == "missing":
        return f"{where}: required", param
    if param in UNION_FIELDS:  # pydantic reports one error per member of the union
        return f"{param}: must be {UNION_FIELDS[param]}", param
    return f"{where}: {first['msg']}", param


@dataclass
class Served:
    """What the app serves: the engine and the model's name, context and limits."""

    engine: Engine
    tokenizer: Tokenizer
    name: str
    max_tokens_cap: int
    created: int = field(default_factory=lambda: int(time.time()))


def make_job(body: CompletionRequest, served: Served, emit) -> tuple[Job, list[str]]:
    """The engine job of a request, and its prompt texts; ApiError for what cannot run."""
    if body.model != served.name:
        message = f"model {body.model!r} is not served here; this one is {served.name!r}"
        raise ApiError(404, message, "model", "model_not_found")
    if body.best_of not in (None, body.n):
        raise ApiError(400, "best_of: only best_of == n is supported (no ranking)", "best_of")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0):
            raise ApiError(400, f"{name}: not supported; leave it 0", name)
    if body.logit_bias or body.suffix:
        name = "logit_bias" if body.logit_bias else "suffix"
        raise ApiError(400, f"{name}: not supported; leave it out", name)
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options: only with stream: true", "stream_options")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} stop strings, got {len(stops)}", "stop")
    texts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    tokenizer, context = served.tokenizer, served.engine.context
    prompts = [[tokenizer.eod_id] + tokenizer.encode(text) for text in texts]
    longest = max(len(ids) for ids in prompts)
    if longest >= context:
        message = f"prompt: {longest} tokens (with the <eod> it is read after) leave no room"
        raise ApiError(400, f"{message} in the model's context of {context} tokens", "prompt")
    max_tokens = body.max_tokens
    if max_tokens is None:
        max_tokens = min(served.max_tokens_cap, context - longest)
    if max_tokens > served.max_tokens_cap:
        message = f"max_tokens: {max_tokens} is over this server's cap of {served.max_tokens_cap}"
        raise ApiError(400, f"{message} (--max_tokens_cap)", "max_tokens")
    if longest + max_tokens > context:
        message = f"max_tokens: prompt ({longest} tokens) + max_tokens ({max_tokens})"
        raise ApiError(400, f"{message} exceed the model's context of {context}", "max_tokens")
    rows = len(prompts) * body.n
    if rows > served.engine.max_rows:
        message = f"n: {len(prompts)} prompts x n {body.n} = {rows} sequences"
        raise ApiError(400, f"{message}, over this server's {served.engine.max_rows}", "n")
    job = Job(
        prompts,
        max_tokens,
        emit,
        n=body.n,
        temperature=body.temperature,
        top_k=body.top_k,
        top_p=body.top_p,
        seed=secrets.randbits(63) if body.seed is None else body.seed,
        stop=tuple(stops),
        logprobs=body.logprobs,
        ignore_eod=body.ignore_eos,
        score_prompts=body.echo and body.logprobs is not None,
    )
    return job, texts


class Choices:
    """The choices of one completion, built up from the engine's events."""

    def __init__(self, texts: list[str], n: int, echo: bool, logprobs: bool) -> None:
        self.n, self.echo = n, echo
        self.base = [texts[row // n] if echo else "" for row in range(len(texts) * n)]
        self.texts = list(self.base)
        self.finish: list[str | None] = [None] * len(self.base)
        self.logprobs = [self._empty() for _ in self.base] if logprobs else None

    @staticmethod
    def _empty() -> dict[str, list]:
        return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def _add(self, target: dict[str, list], entry: TokenLogprob, shift: int) -> None:
        target["tokens"].append(entry.token)
        target["token_logprobs"].append(entry.logprob)
        target["top_logprobs"].append(entry.top)
        target["text_offset"].append(entry.offset + shift)

    def apply(self, event: Event) -> list[dict]:
        """Take in one event; return the streaming deltas (choice objects) it makes."""
        deltas = []
        if isinstance(event, PromptScores) and self.logprobs is not None:
            for row in range(event.prompt * self.n, (event.prompt + 1) * self.n):
                delta = self._empty()
                for entry in event.tokens:
                    self._add(self.logprobs[row], entry, 0)
                    self._add(delta, entry, 0)
                deltas.append({"index": row, "text": "", "logprobs": delta, "finish_reason": None})
        elif isinstance(event, Step):
            for row, (text, entry, finish) in enumerate(
                zip(event.texts, event.logprobs, event.finished)
            ):
                delta = None
                if entry is not None and self.logprobs is not None:
                    self._add(self.logprobs[row], entry, len(self.base[row]))
                    delta = self._empty()
                    self._add(delta, entry, len(self.base[row]))
                self.texts[row] += text
                self.finish[row] = finish or self.finish[row]
                if text or delta or finish:
                    deltas.append(
                        {"index": row, "text": text, "logprobs": delta, "finish_reason": finish}
                    )
        return deltas

    def final(self) -> list[dict]:
        return [
            {
                "index": row,
                "text": text,
                "logprobs": None if self.logprobs is None else self.logprobs[row],
                "finish_reason": self.finish[row] or "length",
            }
            for row, text in enumerate(self.texts)
        ]


def usage(job: Job, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids in job.prompts)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
