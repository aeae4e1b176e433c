"""`palm serve`'s HTTP side: an OpenAI-compatible API (FastAPI on uvicorn) over palm.engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions (server-sent events with
`stream`), and POST /v1/chat/completions, which answers 400: a base model has no chat template.
Every error is a JSON body in OpenAI's shape {"error": {"message", "type", "param", "code"}}:
400 for a bad request (the message names the field), 404 for another model or an unknown path,
429 when the queue is full, 500 when decoding fails. No request can stop the server.

The protocol itself (schema, jobs, choices) is palm.protocol. The engine's worker thread emits
events into the request's event loop (`Channel`); a streaming client that disconnects cancels
its job, and so does a non-streaming one, noticed within half a second.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from palm.batching import Done, Event, Failed, Job
from palm.errors import BusyError, ConfigError, PalmError
from palm.protocol import (
    ApiError,
    Choices,
    CompletionRequest,
    Served,
    error_body,
    make_job,
    usage,
    validation_message,
)

CHECK_EVERY = 0.5  # seconds between looks at whether a waiting client is still there


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None):
    kind = {429: "rate_limit_error", 404: "not_found_error"}.get(status, "invalid_request_error")
    kind = "server_error" if status >= 500 else kind
    return JSONResponse(error_body(message, kind, param, code), status_code=status)


class Channel:
    """Events from the engine's thread into the request's event loop."""

    def __init__(self) -> None:
        self.loop, self.queue = asyncio.get_running_loop(), asyncio.Queue()

    def put(self, event: Event) -> None:  # called from the engine's thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def events(self, job: Job, request: Request) -> AsyncIterator[Event]:
        """The job's events up to its end; a client that has gone away (looked at every
        `CHECK_EVERY` seconds) cancels the job."""
        check_at = time.monotonic() + CHECK_EVERY
        while True:
            try:
                event = await asyncio.wait_for(self.queue.get(), timeout=CHECK_EVERY)
            except asyncio.TimeoutError:
                event = None
            if time.monotonic() >= check_at:
                check_at = time.monotonic() + CHECK_EVERY
                if await request.is_disconnected():
                    job.cancelled.set()
                    return
            if event is None:
                continue
            yield event
            if isinstance(event, Done | Failed):
                return


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def stream_completion(job, choices, head, channel, request, include_usage):
    """Server-sent events: one chunk per decoding step, then `data: [DONE]`."""
    try:
        if choices.echo:
            echo = [
                {"index": row, "text": text, "logprobs": None, "finish_reason": None}
                for row, text in enumerate(choices.base)
            ]
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
        card = {
            "id": served.name,
            "object": "model",
            "created": served.created,
            "owned_by": "palm",
            "max_model_len": served.engine.context,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat():
        raise ApiError(
            400,
            f"{served.name} is a base model without a chat template: use "
            "/v1/completions with a plain-text prompt",
            "messages",
            "no_chat_template",
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        channel = Channel()
        job, texts = make_job(body, served, channel.put)
        served.engine.submit(job)  # BusyError: 429
        choices = Choices(texts, body.n, body.echo, body.logprobs is not None)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": served.name,
        }
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
