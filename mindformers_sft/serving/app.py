"""The OpenAI-compatible app: GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /health and the
chat page at /. One engine (generation/engine.py) owns the model in its scheduler thread; requests wait on their
tokens asynchronously, so concurrent requests are decoded together in one batch.

Every refusal is OpenAI's error JSON with a 4xx status (validation errors are 400, not FastAPI's 422). With an
API key, every request but the page itself needs `Authorization: Bearer KEY` (401 otherwise); the page asks
for the key and sends it with its API calls.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import SFTError
from ..generation.chat import prompt_ids
from ..generation.engine import FINISH_ERROR, FINISH_STOP, SamplingParams
from .protocol import APIError, ChatCompletionRequest, CompletionRequest, error_body, validation_message
from .text import TextStream

PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "chat.html")


class BearerAuth:
    """ASGI middleware: 401 in OpenAI's shape unless `Authorization: Bearer <key>` (the page at / is open)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not (scope["method"] == "GET" and scope["path"] == "/"):
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                msg = ("Incorrect API key provided." if auth else
                       "You didn't provide an API key: send the header 'Authorization: Bearer YOUR_KEY'.")
                resp = JSONResponse(error_body(msg, "invalid_request_error", None, "invalid_api_key"), 401)
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class JSONBody:
    """ASGI middleware: POST bodies are JSON whatever their content type says (curl -d sends form encoding)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def create_app(engine, tokenizer, template, model_name: str, api_key: str = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="mindformers_sft OpenAI-compatible server", lifespan=lifespan)
    app.add_middleware(JSONBody)
    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_req, e: APIError):
        return JSONResponse(e.body(), e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        msg, param = validation_message(e.errors())
        return JSONResponse(error_body(msg, "invalid_request_error", param, None), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(error_body(str(e.detail), "invalid_request_error", None, code), e.status_code)

    @app.exception_handler(Exception)
    async def _internal(_req, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), 500)

    def model_card():
        return {"id": model_name, "object": "model", "created": created, "owned_by": "mindformers_sft",
                "max_model_len": engine.max_context}

    @app.get("/", include_in_schema=False)
    async def page():
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        return {"status": "ok", **engine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    def check_model(name):
        if name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}' "
                                "(GET /v1/models)", "model", "model_not_found")

    def sampling(body, n_prompt: int, what: str) -> SamplingParams:
        ctx = engine.max_context
        max_tokens = body.max_tokens or getattr(body, "max_completion_tokens", None)
        if n_prompt >= ctx or (max_tokens is not None and n_prompt + max_tokens > ctx):
            asked = f"{n_prompt + max_tokens} tokens ({n_prompt} in the {what}, {max_tokens} in the completion)" \
                if max_tokens is not None else f"{n_prompt} tokens in the {what}, leaving none for the completion"
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{asked}. Please reduce the length of the {what} or completion.",
                           "messages" if what == "messages" else "prompt", "context_length_exceeded")
        return SamplingParams(max_tokens=max_tokens or ctx - n_prompt, temperature=body.temperature,
                              top_k=max(body.top_k, 0), top_p=body.top_p, seed=body.seed,
                              ignore_eos=body.ignore_eos)

    def submit(ids, params):
        return engine.submit(ids, params, loop=asyncio.get_running_loop())

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        check_model(body.model)
        body.check_unsupported()
        stops = body.stop_list()
        system, turns = body.conversation()
        try:
            ids = prompt_ids(template, tokenizer, turns, system)
        except SFTError as e:
            raise APIError(400, f"messages: {e}", "messages") from None
        req = submit(ids, sampling(body, len(ids), "messages"))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        ts = TextStream(tokenizer, stops)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_chat_chunks(req, ts, meta, len(ids), include_usage))
        await _collect(req, ts, raw)
        return {**meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ts.text},
                             "finish_reason": _finish(req, ts)}],
                "usage": _usage(len(ids), ts)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        check_model(body.model)
        body.check_unsupported()
        stops = body.stop_list()
        prompts = body.prompts()
        if body.stream and len(prompts) > 1:
            raise APIError(400, f"prompt: streaming takes one prompt, got {len(prompts)}", "prompt")
        vocab = tokenizer.vocab_size
        ids_list = []
        for i, p in enumerate(prompts):
            ids = tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else [int(t) for t in p]
            if not ids or any(not 0 <= t < vocab for t in ids):
                raise APIError(400, f"prompt[{i}]: expected text or token ids in [0, {vocab})", "prompt")
            ids_list.append(ids)
        params = [sampling(body, len(ids), "prompt") for ids in ids_list]
        reqs = [submit(ids, p) for ids, p in zip(ids_list, params)]
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        streams = [TextStream(tokenizer, stops) for _ in reqs]
        if body.stream:
            return _sse(_completion_chunks(reqs[0], streams[0], meta, len(ids_list[0])))
        await asyncio.gather(*(_collect(r, ts, raw) for r, ts in zip(reqs, streams)))
        usage = {"prompt_tokens": sum(map(len, ids_list)), "completion_tokens": sum(len(ts.ids) for ts in streams)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        return {**meta, "object": "text_completion",
                "choices": [{"index": i, "text": ts.text, "logprobs": None, "finish_reason": _finish(r, ts)}
                            for i, (r, ts) in enumerate(zip(reqs, streams))],
                "usage": usage}

    return app


def _usage(n_prompt, ts):
    return {"prompt_tokens": n_prompt, "completion_tokens": len(ts.ids), "total_tokens": n_prompt + len(ts.ids)}


def _finish(req, ts) -> str:
    if req.finish_reason == FINISH_ERROR:
        raise APIError(500, f"generation failed: {req.error}", type_="server_error")
    return "stop" if ts.stopped or req.finish_reason == FINISH_STOP else "length"


async def _tokens(req, ts):
    """Text pieces of `req` as its tokens arrive; cancels it at a stop string (its slot is freed)."""
    async for tok in req:
        piece = ts.push(tok)
        if piece:
            yield piece
        if ts.stopped:
            req.cancel()
            return
    tail = ts.finish()
    if tail:
        yield tail


async def _collect(req, ts, raw: Request):
    """Wait for the whole answer; a client that goes away cancels it."""
    async def watch():
        while True:
            if await raw.is_disconnected():
                req.cancel()
                return
            await asyncio.sleep(0.05)
    watcher = asyncio.create_task(watch())
    try:
        async for _ in _tokens(req, ts):
            pass
    finally:
        watcher.cancel()
        req.cancel()


def _sse(gen):
    return StreamingResponse(gen, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream_events(req, ts, chunk, n_prompt, include_usage=False):
    """SSE events: one chunk per settled text piece, a final chunk with finish_reason, usage if asked, [DONE].
    When the client disconnects, the generator is closed and the request cancelled (its slot freed)."""
    try:
        async for piece in _tokens(req, ts):
            yield _event(chunk(piece, None))
        if req.finish_reason == FINISH_ERROR:
            yield _event(error_body(f"generation failed: {req.error}", "server_error"))
        else:
            yield _event(chunk(None, _finish(req, ts)))
        if include_usage:
            yield _event({**chunk(None, None), "choices": [], "usage": _usage(n_prompt, ts)})
        yield "data: [DONE]\n\n"
    finally:
        req.cancel()


def _chat_chunks(req, ts, meta, n_prompt, include_usage):
    first = [True]

    def chunk(piece, finish):
        delta = {} if piece is None else {"content": piece}
        if first[0] and (piece is not None or finish is not None):
            delta, first[0] = {"role": "assistant", **delta}, False
        return {**meta, "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return _stream_events(req, ts, chunk, n_prompt, include_usage)


def _completion_chunks(req, ts, meta, n_prompt):
    def chunk(piece, finish):
        return {**meta, "object": "text_completion",
                "choices": [{"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}]}
    return _stream_events(req, ts, chunk, n_prompt)
