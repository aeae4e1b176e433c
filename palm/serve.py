"""`palm serve`'s HTTP side: an OpenAI-compatible API (FastAPI on uvicorn) over palm.engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions (server-sent events with
`stream`), and POST /v1/chat/completions, which answers 400: a base model has no chat template.
Every error is a JSON body in OpenAI's shape {"error": {"message", "type", "param", "code"}}:
400 for a bad request (the message names the field), 404 for another model or an unknown path,
429 when the queue is full, 500 when decoding fails. No request can stop the server.

A completion decodes as generate.py does (palm.batching): the prompt is read after <eod>, and
the same seed and options give the same text. `top_k` and `ignore_eos` (generate.py's
--ignore_eod) are extensions, as in vLLM; OpenAI fields palm cannot honour are accepted only at
the value that changes nothing (best_of = n, penalties 0, no logit_bias, no suffix).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from palm.batching import Done, Event, Failed, Job, PromptScores, Step, TokenLogprob
from palm.engine import Engine
from palm.errors import BusyError, ConfigError, PalmError
from palm.tokenizer import Tokenizer

MAX_STOPS = 4  # as OpenAI
UNION_FIELDS = {"prompt": "a string or a non-empty list of strings",
                "stop": "a string, a list of strings or null"}  # fmt: skip


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


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = {429: "rate_limit_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    kind = "server_error" if status >= 500 else kind
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """One line and the field at fault for pydantic's errors about a request body."""
    first = errors[0]
    if first["type"] == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON ({detail})", None
    loc = [str(part) for part in first["loc"] if part != "body"]
    param = loc[0] if loc else None
    if not loc:
        return f"the request body must be a JSON object ({first['msg']})", None
    if first["type"] == "extra_forbidden":
        return f"{param}: unknown field (see GET /v1/models and the README for the API)", param
    if first["type"] == "missing":
        return f"{param}: required", param
    if param in UNION_FIELDS:  # pydantic reports one error per member of the union
        return f"{param}: must be {UNION_FIELDS[param]}", param
    return f"{param}: {first['msg']}", param


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
        prompts, max_tokens, emit, n=body.n, temperature=body.temperature, top_k=body.top_k,
        top_p=body.top_p, seed=secrets.randbits(63) if body.seed is None else body.seed,
        stop=tuple(stops), logprobs=body.logprobs, ignore_eod=body.ignore_eos,
        score_prompts=body.echo and body.logprobs is not None,
    )  # fmt: skip
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
            {"index": row, "text": text, "logprobs": None if self.logprobs is None
             else self.logprobs[row], "finish_reason": self.finish[row] or "length"}
            for row, text in enumerate(self.texts)
        ]  # fmt: skip


class Channel:
    """Events from the engine's thread into the request's event loop."""

    def __init__(self) -> None:
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(self, event: Event) -> None:  # called from the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self, job: Job, request: Request) -> AsyncIterator[Event]:
        """The job's events up to its end; a client that has gone away cancels the job."""
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
                continue
            yield event
            if isinstance(event, Done | Failed):
                return


def usage(job: Job, completion_tokens: int) -> dict[str, int]:
    prompt_tokens = sum(len(ids) for ids in job.prompts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_completion(job, choices, head, channel, request, include_usage):
    """Server-sent events: one chunk per decoding step, then `data: [DONE]`."""
    try:
        if choices.echo:
            echo = [{"index": row, "text": text, "logprobs": None, "finish_reason": None}
                    for row, text in enumerate(choices.base)]  # fmt: skip
            yield sse({**head, "choices": echo})
        async for event in channel.events(job, request):
            if isinstance(event, Failed):
                yield sse(error_body(event.message, "server_error"))
                return
            deltas = choices.apply(event)
            if deltas:
                yield sse({**head, "choices": deltas})
            if isinstance(event, Done) and include_usage:
                yield sse({**head, "choices": [], "usage": usage(job, event.completion_tokens)})
        yield sse("[DONE]")
    finally:
        job.cancelled.set()  # the client left mid-stream (or the job is over: then a no-op)


def create_app(served: Served) -> FastAPI:
    """The FastAPI app; its lifespan starts and stops the engine's worker."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="palm serve", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, error: RequestValidationError):
        message, param = validation_message(error.errors())
        return _error_response(400, message, param)

    @app.exception_handler(ApiError)
    async def refused(request: Request, error: ApiError):
        return _error_response(error.status, str(error), error.param, error.code)

    @app.exception_handler(PalmError)
    async def palm_error(request: Request, error: PalmError):
        busy = isinstance(error, BusyError)
        code = "queue_full" if busy else None
        return _error_response(429 if busy else 400, str(error), None, code)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = f"{request.method} {request.url.path}: {error.detail}"
        return _error_response(error.status_code, message)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        return _error_response(500, f"internal error: {type(error).__name__}: {error}")

    @app.get("/health")
    async def health():
        stats = served.engine.stats()
        status = 200 if stats["alive"] else 503
        body = {"status": "ok" if stats["alive"] else "engine stopped", "model": served.name}
        return JSONResponse({**body, **stats}, status_code=status)

    @app.get("/v1/models")
    async def models():
        card = {"id": served.name, "object": "model", "created": served.created,
                "owned_by": "palm", "max_model_len": served.engine.context}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(400, f"{served.name} is a base model without a chat template: use "
                       "/v1/completions with a plain-text prompt", "messages",
                       "no_chat_template")  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        channel = Channel()
        job, texts = make_job(body, served, channel.put)
        served.engine.submit(job)  # BusyError: 429
        choices = Choices(texts, body.n, body.echo, body.logprobs is not None)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": int(time.time()), "model": served.name}  # fmt: skip
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream_completion(job, choices, head, channel, request, include_usage)
            return StreamingResponse(events, media_type="text/event-stream")
        completion_tokens = 0
        try:
            async for event in channel.events(job, request):
                if isinstance(event, Failed):
                    return _error_response(500, event.message)
                if isinstance(event, Done):
                    completion_tokens = event.completion_tokens
                choices.apply(event)
        finally:
            job.cancelled.set()  # a no-op once the job is done
        return {**head, "choices": choices.final(), "usage": usage(job, completion_tokens)}

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one)."""
    try:
        return socket.create_server((host, port))
    except OSError as error:
        raise ConfigError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); "
            "pass another --port or --host"
        ) from None


def run(app: FastAPI, sock: socket.socket, log_level: str = "info") -> None:
    """Serve `app` on `sock` until interrupted (uvicorn, one process)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
