"""`sllm serve`: an OpenAI-compatible HTTP API and a one-page web chat, on FastAPI + uvicorn.

`/v1/completions` and `/v1/chat/completions` answer plain JSON or Server-Sent Events; `/health`;
the chat page at `/`. Requests are checked before any work (ranges by pydantic: 422; a prompt
over the context or max_tokens over the limit: 400), in OpenAI's error shape. One lock runs
generations one at a time in arrival order, in a thread; a client that hangs up cancels its
generation. Prompts and `n` choices form one batch. The sampling fields are `SamplingParams`'s
(`min_new_tokens` as vLLM's `min_tokens`); one left out takes the run's `sample` section, as
`sllm generate` does (lengths keep OpenAI's defaults). A null field means its default; options this server cannot honour (`logprobs`,
`logit_bias`, tools, ...) are refused, never silently ignored. FastAPI and uvicorn are imported here only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import threading
import time
import typing
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Annotated, Any, Literal

from sllm.errors import UserError
from sllm.infer.chat_template import ChatTemplate, Message, load_chat_template
from sllm.infer.engine import Completion, TextGenerator
from sllm.infer.web import chat_page
from sllm.run import read_run_config
from sllm.sampling import SamplingParams, run_defaults

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
except ImportError as missing:
    raise UserError(
        f"`sllm serve` needs FastAPI and uvicorn ({missing.name} is missing); "
        "install them with `pip install -e '.[serve]'`"
    ) from None


MAX_PROMPTS = 64  # one request's prompts (times n) form one batch
CLIENT_CLOSED_REQUEST = 499  # the status logged for a request whose client hung up
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is there
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


def _request_field(option: dataclasses.Field) -> tuple[Any, Any]:
    """A `SamplingParams` option as an optional request field with its bounds and description;
    unset (None) means the server's default."""
    bounds, allowed = {}, option.metadata["range"]
    if allowed is not None and allowed.low is not None:
        bounds["gt" if allowed.low_open else "ge"] = allowed.low
    if allowed is not None and allowed.high is not None:
        bounds["lt" if allowed.high_open else "le"] = allowed.high
    kind = typing.get_type_hints(SamplingParams)[option.name]
    return kind | None, Field(None, description=option.metadata["help"], **bounds)


SamplingFields = create_model(
    "SamplingFields",
    __base__=RequestFields,
    **{REQUEST_NAMES.get(f.name, f.name): _request_field(f) for f in REQUEST_OPTIONS},
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


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error"}}, status)


class ModelWorker:
    """Runs generations one at a time, in arrival order, off the event loop."""

    def __init__(self, generator: TextGenerator) -> None:
        self.generator = generator
        self.lock = threading.Lock()

    async def stream(
        self, prompts: list[str], params: SamplingParams
    ) -> AsyncIterator[tuple[int, str] | list[Completion]]:
        """(row, piece) items, then the list of completions as the last item. Closing or
        cancelling the iterator early (the client went away) cancels the generation."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stream = self.generator.stream_batch(prompts, params, strict=True)

        def work() -> None:
            with self.lock:
                try:
                    for item in stream:
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                    loop.call_soon_threadsafe(queue.put_nowait, stream.completions())
                except Exception as error:  # handed to the request's task, which re-raises it
                    loop.call_soon_threadsafe(queue.put_nowait, error)

        task = loop.run_in_executor(None, work)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = isinstance(item, list)
                yield item
        finally:
            if not finished:
                stream.cancel()
        await task

    async def complete(
        self, request: Request, prompts: list[str], params: SamplingParams
    ) -> list[Completion] | None:
        """The completions, or None if `request`'s client hung up first (the generation is
        then cancelled)."""
        work = asyncio.ensure_future(self._last(self.stream(prompts, params)))
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
    max_tokens_limit: int = 1024,
    defaults: SamplingParams | None = None,
) -> FastAPI:
    """The app; `defaults` (else `SamplingParams`'s) are the options of requests that leave them out."""
    defaults = defaults or SamplingParams()
    app = FastAPI(title="sllm", docs_url=None, redoc_url=None)
    worker = ModelWorker(generator)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, "; ".join(_problem(e) for e in error.errors()))

    @app.exception_handler(UserError)
    async def user_error(_: Request, error: UserError) -> JSONResponse:
        return _error(400, str(error))

    def rows_and_params(
        request: SamplingFields, prompts: list[str], extra_stop: tuple[str, ...] = ()
    ) -> tuple[list[str], SamplingParams]:
        """The batch to generate (each prompt n times, choices of one prompt side by side, as
        OpenAI numbers them) and its sampling parameters, after every check."""
        unsupported = request.unsupported()
        if unsupported:
            raise UserError(f"not supported by this server: {', '.join(unsupported)}; leave them out")
        rows = [prompt for prompt in prompts for _ in range(request.n)]
        if len(rows) > MAX_PROMPTS:
            raise UserError(
                f"at most {MAX_PROMPTS} prompts per request, counting n choices each, got {len(rows)}; "
                "split the request"
            )
        if request.new_tokens > max_tokens_limit:
            field = "max_tokens" if request.max_completion_tokens is None else "max_completion_tokens"
            raise UserError(f"{field} must be at most {max_tokens_limit}, got {request.new_tokens}")
        for prompt in prompts:
            generator.encode_prompt(prompt, strict=True)
        return rows, request.params(defaults, extra_stop)

    def header(kind: str, kind_object: str) -> dict[str, Any]:
        head = {"id": f"{kind}-{uuid.uuid4().hex}", "object": kind_object, "created": int(time.time())}
        return {**head, "model": model_name}

    async def respond(
        request: SamplingFields,
        http: Request,
        rows: list[str],
        params: SamplingParams,
        chunk: Callable[[int, str | None, str | None], dict],
        choice: Callable[[str, Completion], dict],
        echoed: list[str] | None = None,
    ) -> Any:
        """A streaming request gets SSE: the echoed prompts if asked, one chunk per text piece, a
        closing chunk per row with its finish reason, the usage if asked, [DONE]. Any other gets
        the completions as one object (`choice` turns a row's prompt and completion into its
        fields), or status 499 when its client hung up first."""

        async def events() -> AsyncIterator[str]:
            for row, prompt in enumerate(echoed or []):
                yield _sse(chunk(row, prompt, None))
            async with contextlib.aclosing(worker.stream(rows, params)) as items:
                async for item in items:
                    if isinstance(item, list):
                        for row, completion in enumerate(item):
                            yield _sse(chunk(row, None, completion.finish_reason))
                        if request.stream_options and request.stream_options.include_usage:
                            yield _sse(
                                {**chunk(0, None, None), "choices": [], "usage": _usage(item, request.n)}
                            )
                    else:
                        yield _sse(chunk(item[0], item[1], None))
            yield _sse("[DONE]")

        if request.stream:
            return StreamingResponse(events(), media_type="text/event-stream")
        done = await worker.complete(http, rows, params)
        if done is None:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        choices = [
            {"index": index, **choice(prompt, c), "finish_reason": c.finish_reason}
            for index, (prompt, c) in enumerate(zip(rows, done, strict=True))
        ]
        return {**chunk(0, None, None), "choices": choices, "usage": _usage(done, request.n)}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "context_tokens": generator.context_tokens}

    page_html = chat_page(max_tokens_limit)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        rows, params = rows_and_params(request, prompts)
        head = header("cmpl", "text_completion")

        def chunk(row: int, text: str | None, reason: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": row, "text": text or "", "finish_reason": reason}]}

        def choice(prompt: str, completion: Completion) -> dict[str, Any]:
            return {"text": prompt + completion.text if request.echo else completion.text}

        return await respond(request, http, rows, params, chunk, choice, rows if request.echo else None)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        messages = [Message(m.role, m.content) for m in request.messages]
        rows, params = rows_and_params(request, [template.render(messages)], template.stop)
        head = header("chatcmpl", "chat.completion.chunk" if request.stream else "chat.completion")

        def chunk(row: int, text: str | None, reason: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"role": "assistant", "content": text}
            return {**head, "choices": [{"index": row, "delta": delta, "finish_reason": reason}]}

        def choice(_: str, completion: Completion) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": completion.text}}

        return await respond(request, http, rows, params, chunk, choice)

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
    max_tokens_limit: int = 1024,
    compile_step: bool = False,
):
    generator = TextGenerator.from_run(run_dir, device, checkpoint, compile_step)
    template, defaults = load_chat_template(run_dir), run_defaults(read_run_config(Path(run_dir)).sample)
    return create_app(generator, template, Path(run_dir).name, max_tokens_limit, defaults)


def serve(
    run_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    device: str = "auto",
    checkpoint: str = "latest",
    max_tokens_limit: int = 1024,
    compile_step: bool = False,
) -> None:
    """Serve a run until interrupted."""
    listening = _listening_socket(host, port)
    app = build_app(run_dir, device, checkpoint, max_tokens_limit, compile_step)
    print(f"serving {run_dir} at http://{host}:{port}/ (API under /v1)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listening])


def _listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before the model loads, so a taken port or an unknown
    address is one line at once rather than uvicorn's log after the load."""
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
