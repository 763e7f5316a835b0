"""The HTTP side: OpenAI's Chat Completions (streamed as server-sent events or whole), the
model list, a health check and the web page. Generation runs in the Worker's thread; this
side only parses, queues, relays and notices clients that leave."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from importlib import resources

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from lvb.serve.api import Limits, RequestError, parse_chat_request
from lvb.serve.worker import Job, QueueFull, Result, Worker

log = logging.getLogger("lvb.serve")


def error(status: int, message: str, headers: dict | None = None, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 429: "rate_limit_error"}.get(status,
                                                                     "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status, headers=headers)


class Refused(Exception):
    def __init__(self, response: Response):
        self.response = response


def create_app(worker: Worker, model_name: str, api_key: str | None = None, limits: Limits = Limits()) -> FastAPI:
    app = FastAPI(title="lvb serve", docs_url=None, redoc_url=None, openapi_url=None)
    page = resources.files("lvb.serve").joinpath("page.html").read_text(encoding="utf-8")
    created = int(time.time())

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return e.response

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())):
            raise Refused(error(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                headers={"WWW-Authenticate": "Bearer"}))

    @app.get("/", response_class=HTMLResponse)
    async def index():
        # Static and holds no data: open like /health, so a browser can load it and ask for the key.
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "backend": worker.session.engine.backend,
                "busy": worker.busy.locked(), "pending": worker.pending, "served": worker.served,
                "cancelled": worker.cancelled, "failed": worker.failed}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lvb",
                                            "max_model_len": worker.session.seq}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(request: Request):
        try:
            # Decoding a picture takes a while for a large photo: off the event loop, which streams to others.
            chat = await run_in_threadpool(parse_chat_request, await _json_body(request, limits), limits)
        except RequestError as e:
            return error(e.status, str(e), param=e.param)
        loop = asyncio.get_running_loop()
        job = Job(chat, loop, asyncio.Queue())
        try:
            worker.submit(job)
        except QueueFull as e:
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


async def _json_body(request: Request, limits: Limits):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limits.body_bytes:
        raise RequestError(f"the request body is {int(declared)} bytes, over the {limits.body_bytes} allowed", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limits.body_bytes:
            raise RequestError(f"the request body is over the {limits.body_bytes} bytes allowed", status=413)
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None


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
            "usage": _usage(result)}


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
            elif kind == "done":
                yield chunk({}, value.finish_reason)
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
