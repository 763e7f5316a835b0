"""The HTTP side: OpenAI's Chat Completions (streamed as server-sent events or whole), the
model list, vLLM's /tokenize and /detokenize, Prometheus' /metrics, a health check and the
web page. Generation runs in the Worker's thread; this side only parses (api), queues,
relays and notices clients that leave. Every error, 404 and 405 included, has OpenAI's
shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from lvb.errors import LvbError
from lvb.serve.api import (DetokenizeRequest, Limits, PixelBudget, RequestError, TokenizeRequest, check_model,
                           map_large_allocations, parse_chat_request, release_memory, validate)
from lvb.serve.worker import Job, QueueFull, Result, Worker, served_model

log = logging.getLogger("lvb.serve")


def error(status: int, message: str, headers: dict | None = None, param: str | None = None,
          code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
        status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def check_api_key(api_key: str | None) -> None:
    """A key the page and curl can send: printable ASCII without spaces; an empty one is a mistake."""
    if api_key is not None and not (api_key and api_key.isascii() and api_key.isprintable() and " " not in api_key):
        raise LvbError("the API key must be printable ASCII without spaces (it travels in an HTTP header), and not "
                       "empty; give one, or leave --api-key and LVB_API_KEY out to serve without a key")


class Refused(Exception):
    def __init__(self, response: Response):
        self.response = response


def create_app(worker: Worker, model_name: str, api_key: str | None = None, limits: Limits = Limits(),
               allow_origins: tuple[str, ...] = ()) -> FastAPI:
    """`allow_origins`: web origins whose pages may call the API (CORS), "*" for any; none by default."""
    check_api_key(api_key)
    map_large_allocations()
    app = FastAPI(title="lvb serve", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("lvb.serve").joinpath("page.html").read_text(encoding="utf-8")
    created = int(time.time())
    model = served_model(worker.session, model_name)
    budget = PixelBudget(limits.decode_pixels)
    metrics = worker.metrics
    if allow_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "HEAD", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600,
                           expose_headers=["Retry-After", "x-lvb-prompt-tokens", "x-lvb-prefilled-tokens",
                                           "x-lvb-first-token-ms", "x-lvb-engine-ms"])

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return e.response

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        message = {404: f"no such endpoint: {request.url.path[:200]}",
                   405: f"{request.method} is not allowed on {request.url.path[:200]}"}.get(e.status_code, str(e.detail))
        return error(e.status_code, message, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception):  # a bug: logged with its traceback, answered in the one shape
        log.exception("internal error on %s %s", request.method, request.url.path[:200])
        return error(500, f"internal error: {type(e).__name__}: {e}"[:500])

    def refuse(e: RequestError) -> JSONResponse:
        metrics.count("busy" if e.status in (429, 503) else "refused")
        return error(e.status, str(e), param=e.param, code=e.code)

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())):
            raise Refused(error(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"}))

    # HEAD wherever GET is, as HTTP asks (uvicorn sends the headers only).
    @app.api_route("/", methods=["GET", "HEAD"], response_class=HTMLResponse)
    async def index():
        # Static and holds no data: open like /health, so a browser can load it and ask for the key.
        return HTMLResponse(page)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        draft = metrics.draft_counts()
        return {"status": "ok", "model": model_name, "backend": worker.session.engine.backend,
                "busy": worker.busy.locked(), "pending": worker.pending, "running": worker.in_flight,
                "slots": worker.batch.slots, "tokens_per_second": round(worker.tokens_per_second(), 2),
                "served": worker.served, "cancelled": worker.cancelled, "failed": worker.failed,
                "draft": None if draft is None else {"draft_tokens": worker.session.draft_tokens, **draft}}

    @app.api_route("/metrics", methods=["GET", "HEAD"], dependencies=[Depends(authorized)])
    async def prometheus():
        running = worker.in_flight
        return PlainTextResponse(metrics.render(running, max(0, worker.pending - running), budget.used,
                                                worker.tokens_per_second()),
                                 media_type="text/plain; version=0.0.4")

    @app.api_route("/v1/models", methods=["GET", "HEAD"], dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lvb",
                                            "max_model_len": worker.session.seq,
                                            "lvb": {"system_with_picture": model.system_with_picture,
                                                    "history": model.history}}]}

    async def answer_off_the_loop(request: Request, handler):
        try:
            answer = await run_in_threadpool(_refusal_or, handler, await _json_body(request, limits), model, worker)
        except RequestError as e:
            return refuse(e)
        return refuse(answer) if isinstance(answer, RequestError) else answer

    @app.post("/tokenize", dependencies=[Depends(authorized)])
    async def tokenize(request: Request):
        return await answer_off_the_loop(request, _tokenize)

    @app.post("/detokenize", dependencies=[Depends(authorized)])
    async def detokenize(request: Request):
        return await answer_off_the_loop(request, _detokenize)

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        body = bytearray()
        try:
            body = await _json_body(request, limits)
            # Decoding a picture takes a while for a large photo: off the event loop, which streams to others.
            chat = await run_in_threadpool(_refusal_or, parse_chat_request, body, limits, model, budget)
        except RequestError as e:
            return refuse(e)
        finally:
            if len(body) >= 4 * 2**20:  # megabytes of body and of its parse, freed: give them back
                body = None
                release_memory()
        if isinstance(chat, RequestError):
            return refuse(chat)
        loop = asyncio.get_running_loop()
        job = Job(chat, loop, asyncio.Queue())
        try:
            worker.submit(job)
        except QueueFull as e:
            metrics.count("busy")
            return error(429, f"the server is busy ({worker.max_queue} requests already wait); retry after "
                              f"{e.retry_after} s", headers={"Retry-After": str(e.retry_after)})
        event = await _first_event(request, job)
        if event is None:
            return Response(status_code=499)  # nobody to answer
        kind, value = event
        if kind == "error":
            status, message = value
            return error(status, message)
        if not chat.stream:
            return JSONResponse(_completion(job, model_name, value), headers=_headers(value))
        return StreamingResponse(_stream(job, model_name, event), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _refusal_or(parse, body, *args):
    """`parse(body, *args)`, or its refusal returned bare: raised through the thread pool, its
    traceback (and the ValidationError it came from, which quotes the input) would keep the
    body alive in the pool's thread until that thread's next job: 32 MB after 16 MB of text."""
    try:
        return parse(body, *args)
    except RequestError as e:
        e.__traceback__ = e.__context__ = e.__cause__ = None
        return e


def _tokenize(body: bytes, model, worker: Worker) -> dict:
    """vLLM's /tokenize: a prompt as the processor tokenizes it, or a chat as the session renders it."""
    request = validate(TokenizeRequest, body)
    check_model(request.model, model)
    checkpoint = worker.session.checkpoint
    tokenizer = checkpoint.tokenizer
    texts = [request.prompt] if request.prompt is not None else [
        p if isinstance(p, str) else p.text for m in request.messages
        for p in ([m.content] if isinstance(m.content, str) else m.content or []) if isinstance(p, str) or p.type == "text"]
    if sum(map(len, texts)) > model.max_text_chars:
        raise RequestError(f"the text is {sum(map(len, texts))} characters, more than the {model.seq}-token sequence "
                           f"can hold (a token covers at most {model.max_token_chars}); it is not tokenized")
    try:
        if request.prompt is not None:
            ids = tokenizer.encode_prompt(request.prompt, add_special_tokens=request.add_special_tokens)
        else:
            messages = [{"role": "system" if m.role == "developer" else m.role,
                         "content": m.content if isinstance(m.content, str) else
                         [{"type": "image"} if p.type == "image_url" else {"type": "text", "text": p.text}
                          for p in m.content or []]} for m in request.messages]
            ids = tokenizer.encode_chat(checkpoint.template, messages, add_generation_prompt=request.add_generation_prompt,
                                        now=worker.session.today)
    except LvbError as e:
        raise RequestError(str(e)) from None
    out = {"count": len(ids), "max_model_len": model.seq, "tokens": ids}
    if request.return_token_strs:
        out["token_strs"] = [tokenizer.decode([i], skip_special_tokens=False) for i in ids]
    return out


def _detokenize(body: bytes, model, worker: Worker) -> dict:
    request = validate(DetokenizeRequest, body)
    check_model(request.model, model)
    if len(request.tokens) > model.seq:
        raise RequestError(f"{len(request.tokens)} tokens, more than the {model.seq} the sequence holds", param="tokens")
    bad = [t for t in request.tokens if not 0 <= t < model.vocab_size]
    if bad:
        raise RequestError(f"`tokens`: {bad[0]} is not a token id (0 to {model.vocab_size - 1})", param="tokens")
    return {"prompt": worker.session.checkpoint.tokenizer.decode(request.tokens, skip_special_tokens=False)}


async def _json_body(request: Request, limits: Limits) -> bytearray:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.body_bytes:
        raise RequestError(f"the request body is {int(declared)} bytes, over the {limits.body_bytes} allowed", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.body_bytes:
            raise RequestError(f"the request body is over the {limits.body_bytes} bytes allowed", status=413)
    return body


async def _first_event(request: Request, job: Job):
    """The job's first event (a piece of text, the whole result or an error), or None when the
    client leaves first; then the job is cancelled and frees the engine at its next piece."""
    get = asyncio.ensure_future(job.events.get())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if get.done():
        return get.result()
    get.cancel()
    job.cancel()
    return None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _headers(result: Result) -> dict:
    return {"x-lvb-prompt-tokens": str(result.prompt_tokens),
            "x-lvb-prefilled-tokens": str(result.prompt_tokens - result.cached_tokens),
            "x-lvb-first-token-ms": f"{result.first_token_seconds * 1000:.2f}",
            "x-lvb-engine-ms": f"{result.engine_seconds * 1000:.2f}"}


def _usage(result: Result) -> dict:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_tokens}}


def _completion(job: Job, model: str, result: Result) -> dict:
    return {"id": job.id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                         "finish_reason": result.finish_reason, "logprobs": None}],
            "usage": _usage(result), "timings": result.timings(), "lvb": {"notices": result.notices}}


async def _stream(job: Job, model: str, first):
    """Server-sent events: a role chunk, one chunk per piece of text (whole characters only:
    the session's decoder never splits one), the finish reason, usage if asked, [DONE]."""
    created = int(time.time())

    def chunk(delta: dict, finish: str | None = None, **extra) -> bytes:
        body = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    try:
        yield chunk({"role": "assistant", "content": ""})
        event = first
        while True:
            kind, value = event
            if kind == "text":
                yield chunk({"content": value})
            elif kind == "done":  # with the server's own timings (llama.cpp's `timings`) and notices
                yield chunk({}, value.finish_reason, timings=value.timings(), lvb={"notices": value.notices})
                if job.request.include_usage:
                    body = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [], "usage": _usage(value)}
                    yield b"data: " + json.dumps(body).encode() + b"\n\n"
                break
            else:  # an engine failure after the first piece: the status is sent already
                yield b"data: " + json.dumps({"error": {"message": value[1], "type": "server_error"}}).encode() + b"\n\n"
                break
            event = await job.events.get()
        yield b"data: [DONE]\n\n"
    finally:
        job.cancel()  # a no-op when the answer is complete; otherwise the client has gone
