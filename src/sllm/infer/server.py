"""`sllm serve`: an OpenAI-compatible HTTP API and a one-page web chat, on FastAPI + uvicorn.

- `/v1/completions` and `/v1/chat/completions`, plain JSON or Server-Sent Events
  (`stream: true`, ending with `data: [DONE]`); `/health`; the chat page at `/`.
- Requests are validated before any work: field ranges by pydantic (422), a prompt over the
  context or max_tokens over the server's limit by us (400); both answer OpenAI's error shape.
- One model, one worker: each request generates in a thread while holding one lock, so
  concurrent requests queue in arrival order and never share the KV cache. Pieces reach the
  event loop through a queue, so a client that hangs up cannot leave the lock held.
- A list of prompts in one completion request is generated as one batch.
FastAPI and uvicorn are the optional `serve` extra, imported here only.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from sllm.errors import UserError
from sllm.infer.chat import ChatTemplate, Message, load_chat_template
from sllm.infer.engine import Completion, TextGenerator
from sllm.infer.sampling import SamplingParams
from sllm.infer.web import chat_page

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
    from pydantic import BaseModel, Field
except ImportError as missing:
    raise UserError(
        f"`sllm serve` needs FastAPI and uvicorn ({missing.name} is missing); "
        "install them with `pip install -e '.[serve]'`"
    ) from None


MAX_PROMPTS = 64  # one request's prompts form one batch
SAMPLING_KEYS = {
    "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed",
}  # fmt: skip


class SamplingFields(BaseModel):
    model: str | None = None
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, lt=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False

    def params(self, extra_stop: tuple[str, ...] = ()) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        fields = self.model_dump(include=SAMPLING_KEYS)
        return SamplingParams(max_new_tokens=self.max_tokens, stop=(*stop, *extra_stop), **fields)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(min_length=1)


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
        """(row, piece) items, then the list of completions as the last item."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def work() -> None:
            with self.lock:
                try:
                    stream = self.generator.stream_batch(prompts, params, strict=True)
                    for item in stream:
                        loop.call_soon_threadsafe(queue.put_nowait, item)
                    loop.call_soon_threadsafe(queue.put_nowait, stream.completions())
                except Exception as error:  # handed to the request's task, which re-raises it
                    loop.call_soon_threadsafe(queue.put_nowait, error)

        task = loop.run_in_executor(None, work)
        while True:
            item = await queue.get()
            if isinstance(item, Exception):
                raise item
            yield item
            if isinstance(item, list):
                break
        await task

    async def complete(self, prompts: list[str], params: SamplingParams) -> list[Completion]:
        async for item in self.stream(prompts, params):
            if isinstance(item, list):
                return item
        raise AssertionError("the stream ended without completions")


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _usage(completions: list[Completion]) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def create_app(
    generator: TextGenerator, template: ChatTemplate, model_name: str, max_tokens_limit: int = 1024
) -> FastAPI:
    app = FastAPI(title="sllm", docs_url=None, redoc_url=None)
    worker = ModelWorker(generator)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
        return _error(422, problems)

    @app.exception_handler(UserError)
    async def user_error(_: Request, error: UserError) -> JSONResponse:
        return _error(400, str(error))

    def check(
        request: SamplingFields, prompts: list[str], extra_stop: tuple[str, ...] = ()
    ) -> SamplingParams:
        if len(prompts) > MAX_PROMPTS:
            raise UserError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}; split the list")
        if request.max_tokens > max_tokens_limit:
            raise UserError(f"max_tokens must be at most {max_tokens_limit}, got {request.max_tokens}")
        for prompt in prompts:
            generator.encode_prompt(prompt, strict=True)
        return request.params(extra_stop)

    def header(kind: str) -> dict[str, Any]:
        return {"id": f"{kind}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}

    def event_stream(
        prompts: list[str], params: SamplingParams, chunk: Callable[[int, str | None, str | None], dict]
    ) -> StreamingResponse:
        """SSE: one chunk per text piece, a closing chunk per row with its finish reason, [DONE]."""

        async def events() -> AsyncIterator[str]:
            async for item in worker.stream(prompts, params):
                if isinstance(item, list):
                    for row, completion in enumerate(item):
                        yield _sse(chunk(row, None, completion.finish_reason))
                else:
                    yield _sse(chunk(item[0], item[1], None))
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "context_tokens": generator.context_tokens}

    page_html = chat_page(max_tokens_limit)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return page_html

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        params = check(request, prompts)
        head = {**header("cmpl"), "object": "text_completion"}

        def chunk(row: int, text: str | None, reason: str | None) -> dict[str, Any]:
            return {**head, "choices": [{"index": row, "text": text or "", "finish_reason": reason}]}

        if request.stream:
            return event_stream(prompts, params, chunk)
        done = await worker.complete(prompts, params)
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason} for i, c in enumerate(done)]
        return {**head, "choices": choices, "usage": _usage(done)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest):
        messages = [Message(m.role, m.content) for m in request.messages]
        prompts = [template.render(messages)]
        params = check(request, prompts, template.stop)
        head = header("chatcmpl")

        def chunk(row: int, text: str | None, reason: str | None) -> dict[str, Any]:
            delta = {} if text is None else {"role": "assistant", "content": text}
            choice = {"index": row, "delta": delta, "finish_reason": reason}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        if request.stream:
            return event_stream(prompts, params, chunk)
        [done] = await worker.complete(prompts, params)
        message = {"role": "assistant", "content": done.text}
        choice = {"index": 0, "message": message, "finish_reason": done.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage([done])}

    return app


def build_app(
    run_dir: str | Path,
    device: str = "auto",
    checkpoint: str = "latest",
    max_tokens_limit: int = 1024,
    compile_step: bool = False,
):
    generator = TextGenerator.from_run(run_dir, device, checkpoint, compile_step)
    return create_app(generator, load_chat_template(run_dir), Path(run_dir).name, max_tokens_limit)


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
