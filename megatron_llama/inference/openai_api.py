"""The chat server's HTTP app (FastAPI): OpenAI's completions and chat completions API, and a chat web page.

    app = build_app(engine, tokenizer, chat_template, model_name="run1", policy=ServerPolicy(api_key=None))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: POST /v1/completions, POST /v1/chat/completions (OpenAI's request and response schema; "stream": true
answers with server-sent events ending in `data: [DONE]`), GET /v1/models, GET /health, GET / (the page).
Sampling: temperature (0 = greedy; OpenAI's default 1; at most 2), top_p, seed (in [0, 2**63)), stop (up to 4),
max_tokens, and the extension top_k; frequency_penalty and presence_penalty are refused unless 0. Every number
must be finite and in range and every string encodable as UTF-8, checked here before a job reaches any tensor rank.
Every bad request gets a 4xx answer with OpenAI's error body {"error": {"message", "type", "param", "code"}}:
wrong types and bad values 400, a missing or wrong key 401, an unknown model 404, a foreign Host 421, a body over
the limit 413 (request_guards.py). Prompts are tokenized on a worker thread, so a long one does not hold up other
requests. Requests run one at a time on the engine (serving.py); a client that goes away, streaming or not,
cancels its generation.
"""
from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from pathlib import Path
from typing import Annotated, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from megatron_llama.data.chat_template import ChatTemplate
from megatron_llama.inference.api_errors import APIError, error_response
from megatron_llama.inference.generator import encode_prompt
from megatron_llama.inference.request_guards import RequestGuards, ServerPolicy
from megatron_llama.inference.sampling import SEED_LIMIT, SamplingParams
from megatron_llama.inference.serving import Finished, Job, ServingEngine

CHAT_PAGE = Path(__file__).with_name("chat_page.html")
MAX_STOP_STRINGS = 4  # OpenAI's limit
INT32_MAX = 2 ** 31 - 1


def encodable(text: str) -> str:
    """The text, unless it holds a lone surrogate (JSON's "\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"holds {text[error.start]!r} at character {error.start}, which is not valid Unicode text "
                         "(a lone surrogate); send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(encodable)]


class SamplingFields(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    model: Text
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(0, ge=0, le=INT32_MAX)
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_STRINGS)] | None = None
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    stream: bool = False
    n: Literal[1] = 1

    def check_supported(self) -> None:
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) != 0:
                raise APIError(400, f"{name}: this server does not apply penalties; leave it 0 or unset", name,
                               "unsupported_parameter")

    def sampling(self) -> SamplingParams:
        seed = self.seed if self.seed is not None else secrets.randbits(31)
        return SamplingParams(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=seed)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text]
    max_tokens: int = Field(16, ge=1, le=INT32_MAX)


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, ge=1, le=INT32_MAX)


def build_app(engine: ServingEngine, tokenizer, chat_template: ChatTemplate, model_name: str,
              policy: ServerPolicy = ServerPolicy()) -> FastAPI:
    app = FastAPI(title="megatron_llama chat server")
    app.add_middleware(RequestGuards, policy=policy)
    generator = engine.generator

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        first = error.errors()[0]
        # the field's path, without pydantic's names of union members ("list[str]", "function-after[...]")
        where = ".".join(str(part) for part in first["loc"][1:] if isinstance(part, int) or part.isidentifier())
        return error_response(400, f"{where or 'body'}: {first['msg']}", param=where or None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error.status, error.message, error.param, error.code)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "megatron_llama"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return CHAT_PAGE.read_text(encoding="utf-8")

    def check_request(request: SamplingFields) -> None:
        if request.model != model_name:
            raise APIError(404, f"model {request.model!r} does not exist; this server serves {model_name!r}", "model",
                           "model_not_found")
        request.check_supported()

    def submit(job: Job) -> tuple[asyncio.Queue, threading.Event]:
        events: asyncio.Queue = asyncio.Queue()
        loop, cancelled = asyncio.get_running_loop(), threading.Event()
        try:
            engine.submit(job, lambda event: loop.call_soon_threadsafe(events.put_nowait, event), cancelled)
        except ValueError as error:
            raise APIError(400, str(error)) from None
        return events, cancelled

    async def events_of(events: asyncio.Queue, cancelled: threading.Event):
        """The job's delta lists, then its Finished; a client gone (task cancelled) cancels the generation."""
        try:
            while True:
                event = await events.get()
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            cancelled.set()

    async def cancel_on_disconnect(request: Request, cancelled: threading.Event) -> None:
        """Wait for the client to go away (the body is read: the next message is the disconnect), then cancel."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancelled.set()

    async def finished(request: Request, events: asyncio.Queue, cancelled: threading.Event) -> Finished:
        watcher = asyncio.create_task(cancel_on_disconnect(request, cancelled))
        try:
            async for event in events_of(events, cancelled):
                if isinstance(event, Finished):
                    if event.error is not None:
                        raise APIError(400, f"generation failed: {event.error}")
                    return event
        finally:
            watcher.cancel()

    def usage(result: Finished) -> dict:
        prompt = sum(c.prompt_tokens for c in result.completions)
        completion = sum(len(c.tokens) for c in result.completions)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def sse(events: asyncio.Queue, cancelled: threading.Event, chunks) -> StreamingResponse:
        async def body():
            async for event in events_of(events, cancelled):
                if isinstance(event, Finished):
                    if event.error is not None:
                        yield f"data: {json.dumps({'error': {'message': str(event.error)}})}\n\n"
                    break
                for chunk in chunks(event):
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest, http: Request):
        check_request(request)
        texts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not texts:
            raise APIError(400, "prompt: give a string or a non-empty list of strings", "prompt")
        if len(texts) > policy.max_prompts_per_request:
            raise APIError(400, f"prompt: {len(texts)} prompts exceed this server's limit of "
                                f"{policy.max_prompts_per_request} per request; split them over several requests",
                           "prompt")
        prompts = await asyncio.to_thread(lambda: [encode_prompt(tokenizer, text) for text in texts])
        events, cancelled = submit(Job(prompts, request.max_tokens, request.sampling(), request.stop_strings()))
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if request.stream:
            return sse(events, cancelled, lambda deltas: [
                {**head, "choices": [{"index": d.row, "text": d.text, "finish_reason": d.finish_reason,
                                      "logprobs": None}]} for d in deltas])
        result = await finished(http, events, cancelled)
        choices = [{"index": row, "text": c.text, "finish_reason": c.finish_reason, "logprobs": None}
                   for row, c in enumerate(result.completions)]
        return {**head, "choices": choices, "usage": usage(result)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatRequest, http: Request):
        check_request(request)
        messages = [message.model_dump() for message in request.messages]
        prompt = await asyncio.to_thread(chat_template.encode, messages, tokenizer)
        max_tokens = request.max_completion_tokens or request.max_tokens or max(generator.max_length - len(prompt), 1)
        stop = request.stop_strings() + list(chat_template.stop)
        events, cancelled = submit(Job([prompt], max_tokens, request.sampling(), stop))
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion", "created": int(time.time()),
                "model": model_name}
        if request.stream:
            chunk_head = {**head, "object": "chat.completion.chunk"}

            def chunks(deltas):
                for delta in deltas:
                    if delta.text:
                        yield {**chunk_head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": delta.text},
                                                          "finish_reason": None}]}
                    if delta.finish_reason:
                        yield {**chunk_head, "choices": [{"index": 0, "delta": {},
                                                          "finish_reason": delta.finish_reason}]}
            return sse(events, cancelled, chunks)
        result = await finished(http, events, cancelled)
        [completion] = result.completions
        return {**head, "choices": [{"index": 0, "message": {"role": "assistant", "content": completion.text},
                                     "finish_reason": completion.finish_reason}], "usage": usage(result)}

    return app
