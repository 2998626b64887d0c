"""`sllm serve`: an OpenAI-compatible HTTP API and a one-page web chat, on FastAPI + uvicorn.

Completions and chat completions as JSON or Server-Sent Events, `/v1/models`, `/health`, the
page at `/`. One request cannot stall the others: its body is capped before it is read, its
sizes are checked against `ServerLimits` before anything is allocated, tokenizing runs in a
worker thread, and generations run one at a time behind a bounded queue (429 when full). Every
refusal is OpenAI's error body; a failure inside a stream is an error event before `[DONE]`; a
client that hangs up cancels its generation. Sampling fields are `SamplingParams`'s (null or
absent: the run's `sample` section); options this server cannot honour are refused, never ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import time
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

from sllm.errors import UserError
from sllm.infer.chat_template import ChatTemplate, Message, load_chat_template
from sllm.infer.engine import Completion, TextGenerator
from sllm.infer.server_limits import ServerLimits
from sllm.infer.web import chat_page
from sllm.run import read_run_config
from sllm.sampling import SamplingParams, run_defaults

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
    from starlette.exceptions import HTTPException as StarletteHTTPException
except ImportError as missing:
    raise UserError(
        f"`sllm serve` needs FastAPI and uvicorn ({missing.name} is missing); "
        "install them with `pip install -e '.[serve]'`"
    ) from None


CLIENT_CLOSED_REQUEST = 499  # the status logged for a request whose client hung up
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there
RETRY_AFTER_S = 1  # what a request refused for a full queue is told to wait
# The options of `SamplingParams` a request sets by name (the length and `stop` have OpenAI's fields).
REQUEST_OPTIONS = [f for f in dataclasses.fields(SamplingParams) if f.name not in ("max_new_tokens", "stop")]
REQUEST_NAMES = {"min_new_tokens": "min_tokens"}  # vLLM's name, which OpenAI clients send as extra_body
# OpenAI options that change what comes back and that this server does not implement: refused
# when set, so a client never takes their absence for their effect. (`user`, `metadata` and
# the like change nothing and are ignored.)
UNSUPPORTED = (
    "logprobs", "top_logprobs", "logit_bias", "suffix", "tools", "functions", "tool_choice",
    "function_call", "response_format", "best_of",
)  # fmt: skip


class StreamOptions(BaseModel):
    include_usage: bool = False


class RequestFields(BaseModel):
    """What every request has besides the sampling options (added from `SamplingParams` below)."""

    model_config = ConfigDict(extra="allow")  # unknown fields are kept to be checked, not used

    model: str | None = None
    n: int = Field(1, ge=1)
    max_tokens: int = Field(16, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)  # the newer name; it wins when set
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="before")
    @classmethod
    def nulls_mean_defaults(cls, data: Any) -> Any:
        """OpenAI's clients send `"temperature": null` and the like for "not set"."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @property
    def new_tokens(self) -> int:
        return self.max_tokens if self.max_completion_tokens is None else self.max_completion_tokens

    def unsupported(self) -> list[str]:
        """The options set in this request that the server cannot honour."""
        extra = self.model_extra or {}
        return [name for name in UNSUPPORTED if name in extra and _asks_for_something(name, extra[name])]

    def params(self, defaults: SamplingParams, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        """`defaults` with the options this request sets."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        given = {f.name: getattr(self, REQUEST_NAMES.get(f.name, f.name)) for f in REQUEST_OPTIONS}
        chosen = {name: value for name, value in given.items() if value is not None}
        return dataclasses.replace(
            defaults, max_new_tokens=self.new_tokens, stop=(*stop, *extra_stop), **chosen
        )


# Each option optional (None: the server's default); `SamplingParams` checks its range, in the
# same words as for `sllm generate`.
SamplingFields = create_model(
    "SamplingFields",
    __base__=RequestFields,
    **{
        REQUEST_NAMES.get(f.name, f.name): (
            typing.get_type_hints(SamplingParams)[f.name] | None,
            Field(None, description=f.metadata["help"]),
        )
        for f in REQUEST_OPTIONS
    },
)


def _asks_for_something(option: str, value: Any) -> bool:
    """Whether an `UNSUPPORTED` option holds more than its do-nothing default."""
    if option == "best_of":
        return value != 1
    if option == "response_format":
        return not (isinstance(value, dict) and value.get("type", "text") == "text")
    if option == "logprobs":  # completions' `logprobs: 0` still asks for the sampled tokens'
        return value is not False
    if option == "tool_choice":
        return value != "none"
    return value not in (False, "", [], {})  # null was dropped already


class CompletionRequest(SamplingFields):
    prompt: str | Annotated[list[str], Field(min_length=1)]
    echo: bool = False


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int = Field(256, ge=0)


class Refusal(UserError):
    """A request refused, with OpenAI's error fields: HTTP status, the `param` at fault, a `code`."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """OpenAI's error response (for a 400 its `openai` client raises BadRequestError)."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else None
    error = {"message": message, "type": kind, "param": param, "code": code}
    return JSONResponse({"error": error}, status, headers)


class BodyLimit:
    """ASGI middleware refusing a body over `limit_bytes` with 413, by Content-Length or as it arrives."""

    def __init__(self, app: Any, limit_bytes: int) -> None:
        self.app, self.limit_bytes = app, limit_bytes

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        message = (
            f"the request body is larger than {self.limit_bytes:,} bytes; send less or raise --max-body-bytes"
        )
        if int(dict(scope["headers"]).get(b"content-length", 0)) > self.limit_bytes:
            return await _error(413, message)(scope, receive, send)
        received = 0

        async def counted() -> dict[str, Any]:
            nonlocal received
            event = await receive()
            received += len(event.get("body", b""))
            if received > self.limit_bytes:  # FastAPI passes an HTTPException from here to its handler
                raise HTTPException(413, message)
            return event

        await self.app(scope, counted, send)


class ModelWorker:
    """Runs generations one at a time, in order, in a thread; at most `max_queue` wait (more: 429)."""

    def __init__(self, generator: TextGenerator, max_queue: int) -> None:
        self.generator = generator
        self.max_queue = max_queue
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="sllm-generate")
        self.pending = 0  # generations queued or running; changed on the event loop only

    @property
    def waiting(self) -> int:
        return max(0, self.pending - 1)

    def check_room(self) -> None:
        """Refuses (429) when `max_queue` generations wait already."""
        if self.pending > self.max_queue:
            raise Refusal(
                f"the server is busy: {self.waiting} requests wait for the model (--max-queue "
                f"{self.max_queue}); retry after {RETRY_AFTER_S} s",
                code="rate_limit_exceeded", status=429,
            )  # fmt: skip

    def start(
        self, prompt_ids: list[list[int]], params: SamplingParams
    ) -> AsyncIterator[tuple[int, str] | list[Completion]]:
        """Queues a generation (429 if the queue is full) and returns its items: (row, piece), then the
        completions. Closing the iterator early (the client went away) cancels the generation."""
        self.check_room()
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()
        stream = self.generator.stream_ids(prompt_ids, params)

        def work() -> None:
            try:
                for item in stream:
                    loop.call_soon_threadsafe(items.put_nowait, item)
                loop.call_soon_threadsafe(items.put_nowait, stream.completions())
            except Exception as error:  # handed to the request's task, which re-raises it
                loop.call_soon_threadsafe(items.put_nowait, error)

        self.pending += 1
        loop.run_in_executor(self.thread, work).add_done_callback(self._finished)
        return self._items(items, stream)

    def _finished(self, _: asyncio.Future) -> None:
        self.pending -= 1

    @staticmethod
    async def _items(items: asyncio.Queue, stream: Any) -> AsyncIterator[tuple[int, str] | list[Completion]]:
        finished = False
        try:
            while not finished:
                item = await items.get()
                if isinstance(item, Exception):
                    raise item
                finished = isinstance(item, list)
                yield item
        finally:
            if not finished:
                stream.cancel()

    async def complete(
        self, request: Request, prompt_ids: list[list[int]], params: SamplingParams
    ) -> list[Completion] | None:
        """The completions, or None if the client hung up first (the generation is then cancelled)."""
        work = asyncio.ensure_future(self._last(self.start(prompt_ids, params)))
        try:
            while not work.done():
                await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
                if not work.done() and await request.is_disconnected():
                    work.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await work
                    return None
        except asyncio.CancelledError:  # the handler itself was cancelled (a shutdown, say)
            work.cancel()
            raise
        return work.result()

    @staticmethod
    async def _last(items: AsyncIterator[tuple[int, str] | list[Completion]]) -> list[Completion]:
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, list):
                    return item
        raise AssertionError("the stream ended without completions")


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(completions: list[Completion], n: int) -> dict[str, int]:
    """Token counts; a prompt's tokens count once however many choices it has."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def create_app(
    generator: TextGenerator,
    template: ChatTemplate,
    model_name: str,
    limits: ServerLimits | None = None,
    defaults: SamplingParams | None = None,
) -> FastAPI:
    """The app; `defaults` (else `SamplingParams`'s) are the options of requests that leave them out."""
    limits, defaults = limits or ServerLimits(), defaults or SamplingParams()
    app = FastAPI(title="sllm", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit, limit_bytes=limits.max_body_bytes)
    worker, created = ModelWorker(generator, limits.max_queue), int(time.time())

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]  # OpenAI's `param`: the field at fault, None for the body
        param = str(first["loc"][1]) if first["type"] != "json_invalid" and len(first["loc"]) > 1 else None
        return _error(400, "; ".join(map(_problem, error.errors())), param)

    @app.exception_handler(UserError)
    async def refused(_: Request, error: UserError) -> JSONResponse:
        if isinstance(error, Refusal):
            return _error(error.status, str(error), error.param, error.code)
        return _error(400, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        cause = f" ({error.__cause__})" if error.__cause__ else ""  # why FastAPI could not parse a body
        return _error(error.status_code, f"{error.detail}{cause}")

    @app.exception_handler(Exception)  # a bug: the client gets JSON, the log the traceback
    async def server_error(_: Request, error: Exception) -> JSONResponse:
        return _error(500, f"the server failed: {error!r}")

    def encode(prompts: list[str], field: str) -> list[list[int]]:
        try:
            return [generator.encode_prompt(prompt, strict=True) for prompt in prompts]
        except UserError as error:
            raise Refusal(str(error), field, "context_length_exceeded") from None

    async def prepare(
        request: SamplingFields, prompts: list[str], field: str, extra_stop: tuple[str, ...] = ()
    ) -> tuple[list[list[int]], SamplingParams]:
        """The batch (each prompt's ids n times, side by side, as OpenAI numbers choices) and its
        sampling parameters; the checks allocate nothing, the encoding runs off the event loop."""
        unsupported = request.unsupported()
        if unsupported:
            message = f"not supported by this server: {', '.join(unsupported)}; leave them out"
            raise Refusal(message, unsupported[0], "unsupported_parameter")
        rows = len(prompts) * request.n
        if rows > limits.max_batch:
            message = f"at most {limits.max_batch} prompts per request, counting n choices each, got {rows}"
            raise Refusal(f"{message}; split the request", "n" if request.n > 1 else field)
        if request.new_tokens > limits.max_tokens_limit:
            name = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
            raise Refusal(f"{name} must be at most {limits.max_tokens_limit}, got {request.new_tokens}", name)
        try:
            params = request.params(defaults, extra_stop)
        except UserError as error:  # SamplingParams' messages begin with the option's name
            option = str(error).split()[0]
            name = REQUEST_NAMES.get(option, option)
            raise Refusal(name + str(error).removeprefix(option), name) from None
        worker.check_room()
        prompt_ids = await asyncio.to_thread(encode, prompts, field)
        return [ids for ids in prompt_ids for _ in range(request.n)], params

    def header(kind: str, kind_object: str) -> dict[str, Any]:
        head = {"id": f"{kind}-{uuid.uuid4().hex}", "object": kind_object, "created": int(time.time())}
        return {**head, "model": model_name}

    async def respond(
        request: SamplingFields,
        http: Request,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        chunk: Callable[[int, str | None, str | None], dict],
        choice: Callable[[int, Completion], dict],
        echoed: list[str] | None = None,
    ) -> Any:
        """SSE for a streaming request: echoed prompts if asked, a chunk per text piece, a closing chunk
        per row, the usage if asked, [DONE] (a failure: an error event before it). Else one object, or
        status 499 when the client hung up first."""

        async def events(items: AsyncIterator[tuple[int, str] | list[Completion]]) -> AsyncIterator[str]:
            for row, prompt in enumerate(echoed or []):
                yield _sse(chunk(row, prompt, None))
            try:
                async with contextlib.aclosing(items):
                    async for item in items:
                        if not isinstance(item, list):
                            yield _sse(chunk(item[0], item[1], None))
                            continue
                        for row, completion in enumerate(item):
                            yield _sse(chunk(row, None, completion.finish_reason))
                        if request.stream_options and request.stream_options.include_usage:
                            usage = _usage(item, request.n)
                            yield _sse({**chunk(0, None, None), "choices": [], "usage": usage})
            except Exception as error:  # status 200 is sent already: the failure becomes an event
                yield _sse(_error(500, f"the generation failed: {error!r}").body.decode())
            yield _sse("[DONE]")

        if request.stream:  # queued here, so a full queue is still a 429
            return StreamingResponse(events(worker.start(prompt_ids, params)), media_type="text/event-stream")
        done = await worker.complete(http, prompt_ids, params)
        if done is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            {"index": row, **choice(row, c), "finish_reason": c.finish_reason} for row, c in enumerate(done)
        ]
        return {**chunk(0, None, None), "choices": choices, "usage": _usage(done, request.n)}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        context = generator.context_tokens
        return {"status": "ok", "model": model_name, "context_tokens": context, "waiting": worker.waiting}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        served = {"id": model_name, "object": "model", "created": created, "owned_by": "sllm"}
        return {"object": "list", "data": [served]}

    page_html = chat_page(limits.max_tokens_limit)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        prompt_ids, params = await prepare(request, prompts, "prompt")
        rows = [prompt for prompt in prompts for _ in range(request.n)]
        head = header("cmpl", "text_completion")

        def chunk(row: int, text: str | None, reason: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": row, "text": text or "", "finish_reason": reason}]}

        def choice(row: int, completion: Completion) -> dict[str, Any]:
            return {"text": rows[row] + completion.text if request.echo else completion.text}

        return await respond(request, http, prompt_ids, params, chunk, choice, rows if request.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        messages = [Message(m.role, m.content) for m in request.messages]
        prompt_ids, params = await prepare(request, [template.render(messages)], "messages", template.stop)
        head = header("chatcmpl", "chat.completion.chunk" if request.stream else "chat.completion")

        def chunk(row: int, text: str | None, reason: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"role": "assistant", "content": text}
            return {**head, "choices": [{"index": row, "delta": delta, "finish_reason": reason}]}

        def choice(_: int, completion: Completion) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": completion.text}}

        return await respond(request, http, prompt_ids, params, chunk, choice)

    return app


def _problem(error: dict[str, Any]) -> str:
    """One validation error as `field: message`; a body that is no JSON object says how to send it."""
    field = ".".join(map(str, error["loc"][1:]))
    if not field or error["type"] == "json_invalid":  # the location of bad JSON is a character offset
        how = "send a JSON object with Content-Type: application/json"
        return f"the request body is not a JSON object ({error['msg']}); {how}"
    return f"{field}: {error['msg']}"


def build_app(
    run_dir: str | Path,
    device: str = "auto",
    checkpoint: str = "latest",
    limits: ServerLimits | None = None,
    compile_step: bool = False,
):
    generator = TextGenerator.from_run(run_dir, device, checkpoint, compile_step)
    template, defaults = load_chat_template(run_dir), run_defaults(read_run_config(Path(run_dir)).sample)
    return create_app(generator, template, Path(run_dir).name, limits, defaults)


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    checkpoint: str = "latest",
    limits: ServerLimits | None = None,
    compile_step: bool = False,
) -> None:
    """Serve a run until interrupted."""
    listening = _listening_socket(host, port)
    app = build_app(run_dir, device, checkpoint, limits, compile_step)
    print(f"serving {run_dir} at http://{host}:{port}/ (API under /v1)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])


def _listening_socket(host: str, port: int) -> socket.socket:
    """The socket, bound before the model loads, so a taken port is one line at once."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listening = socket.socket(family, socket.SOCK_STREAM)
    except OSError as error:
        raise UserError(f"cannot listen on {host}:{port} ({error}); check --host") from None
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listening.bind((host, port))
    except OSError as error:
        listening.close()
        raise UserError(
            f"cannot listen on {host}:{port} ({error.strerror}); choose another --port or stop what uses it"
        ) from None
    return listening
