"""`lvb serve` on the trained toy over onnxruntime, driven by the real `openai` client on
loopback: pictures as data URLs, streaming and not, multi-turn chats equal to a Session's
answers token for token with the cache reused across requests, access, limits, the
queue, clients that hang up, and the web page in Chromium."""

from __future__ import annotations

import base64
import http.client
import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections import Counter
from pathlib import Path

import openai
import pytest
import uvicorn

from helpers import CHUNK, SEQ
from lvb.contract import Kind, net_name
from lvb.runtime.backends import open_engine
from lvb.runtime.engine import EngineError
from lvb.runtime.pipeline import Checkpoint, Session
from lvb.serve.api import Limits
from lvb.serve.app import create_app
from lvb.serve.worker import Worker
from lvb.tasks import QUESTION, sample

KEY = "test-key-0123456789"
MAX_QUEUE = 2
LIMITS = Limits(body_bytes=2 * 2**20, image_bytes=2**20, image_pixels=1_000_000)


class Server:
    """uvicorn in a thread of this process, on a free loopback port."""

    def __init__(self, session: Session, api_key: str | None = KEY, max_queue: int = MAX_QUEUE, allow_origins=()):
        self.worker = Worker(session, max_queue=max_queue)
        app = create_app(self.worker, "toy", api_key=api_key, limits=LIMITS, allow_origins=allow_origins)
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "the server to start")
        assert self.server.started, "uvicorn stopped before it started"

    def client(self, key: str | None = KEY, timeout: float = 120) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=timeout)

    def idle(self) -> None:
        wait_for(lambda: not self.worker.pending, "the queue to empty")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join()
        self.worker.close()


@pytest.fixture(scope="module")
def toy(toy_export):
    """(server, reference session): the server's engine and a second engine for `lvb chat`'s answers."""
    checkpoint = Checkpoint.load(Path(__file__).resolve().parent.parent / "models" / "toy")
    engine, reference_engine = (open_engine("onnxruntime", onnx_work=toy_export) for _ in range(2))
    server = Server(Session(checkpoint, engine))
    yield server, Session(checkpoint, reference_engine)
    server.stop()


def wait_for(condition, what: str, seconds: float = 60) -> None:
    """Until `condition()` holds; fails naming `what` after `seconds` (generous: the machine may be busy)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"waited {seconds} s for {what}"
        time.sleep(0.01)


def call(method: str, url: str, body: bytes | None = None, key: str | None = KEY) -> tuple[int, bytes]:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers, method=method), timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def data_url(image, kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return f"data:image/{kind.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, image=None, kind: str = "PNG") -> dict:
    """A user message; `image` is a PIL picture or a URL string."""
    if image is None:
        return {"role": "user", "content": text}
    url = image if isinstance(image, str) else data_url(image, kind)
    return {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}


def ask(client: openai.OpenAI, messages: list[dict], stream: bool, **options):
    """(text, finish reason, usage, response headers) through the openai client."""
    if not stream:
        raw = client.chat.completions.with_raw_response.create(model="toy", messages=messages, **options)
        reply = raw.parse()
        return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage, raw.headers
    chunks = list(client.chat.completions.create(model="toy", messages=messages, stream=True,
                                                 stream_options={"include_usage": True}, **options))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and chunks[-1].usage is not None
    return text, finish[0], chunks[-1].usage, None


@pytest.mark.parametrize("stream", [False, True])
def test_pictures_as_data_urls_are_named(toy, stream):
    server, _ = toy
    client = server.client()
    for (image, answer), kind in zip(sample(3, seed=4242), ("PNG", "JPEG", "WEBP")):
        text, finish, usage, _ = ask(client, [user(QUESTION, image, kind)], stream)
        assert text == answer, (kind, text)
        assert finish == "stop" and usage.completion_tokens == len(answer.split()) + 1  # the words and <|eot_id|>


def test_a_conversation_equals_the_sessions_answers_and_reuses_the_cache(toy):
    """Each turn resends the whole history; the answers equal a Session's (what `lvb chat` runs)
    token for token, a follow-up prefills only its own turn, and a conversation interrupted by
    another one is restored from its history."""
    server, reference = toy
    client = server.client()
    (first, _), (other, _) = sample(2, seed=77)
    questions = [(QUESTION, first), ("What colour is it?", None), ("And the shape?", None)]
    reference.reset()
    history, previous_prompt = [], 0
    for i, (question, image) in enumerate(questions):
        expected = reference.ask(question, image=image, max_new_tokens=12)
        history.append(user(question, image))
        text, finish, usage, headers = ask(client, history, stream=i == 1, max_tokens=12)
        assert text == expected.text and usage.completion_tokens == len(expected.tokens)
        assert usage.prompt_tokens == expected.stats.prompt_tokens
        if i:  # all the previous request computed is reused: its prompt and answer but the final
            # <|eot_id|>, which ended the answer without being fed back; only the new turn is prefilled
            prefilled = usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens
            assert usage.prompt_tokens_details.cached_tokens == previous_prompt - 1
            assert prefilled == expected.stats.prefilled_tokens
            if headers is not None:
                assert int(headers["x-lvb-prefilled-tokens"]) == prefilled
        previous_prompt = usage.prompt_tokens + usage.completion_tokens
        history.append({"role": "assistant", "content": text})

    # Another conversation takes the engine; the first one then comes back with its history.
    assert ask(client, [user(QUESTION, other)], stream=False)[0]
    expected = reference.ask("Is it big?", max_new_tokens=12)
    history.append(user("Is it big?"))
    text, _, usage, headers = ask(client, history, stream=False, max_tokens=12)
    assert text == expected.text and usage.completion_tokens == len(expected.tokens)
    assert int(headers["x-lvb-prefilled-tokens"]) == usage.prompt_tokens  # nothing of it was cached


def test_a_restored_picture_that_the_turn_replaces_is_never_encoded(toy):
    """A history restored with its picture, whose new turn brings another: every token is
    prefilled against the new picture, so the old one never goes through the vision tower (a
    newcomer's preparation runs one picture's vision tower at most), and the answer is the one
    the history restored without its picture gets."""
    _, reference = toy
    (old, _), (new, _) = sample(2, seed=5)
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]},
               {"role": "assistant", "content": [{"type": "text", "text": "a thing"}]}]
    runner = reference.runner
    reference.reset()
    before = Counter(runner.launches)
    reference.restore(history, image=old, image_turn=0)
    reply = reference.ask(QUESTION, image=new, max_new_tokens=8)
    assert (runner.launches - before)[net_name(Kind.VISION_EMBED), 0] == 1
    reference.reset()
    reference.restore(history)
    assert reference.ask(QUESTION, image=new, max_new_tokens=8).tokens == reply.tokens


def test_sampling_options_are_honoured(toy):
    server, reference = toy
    client = server.client()
    image, _ = sample(1, seed=5)[0]
    from lvb.runtime.sampling import SamplingConfig

    reference.reset()
    config = SamplingConfig.from_generation_config(reference.checkpoint.generation_config, do_sample=True,
                                                   temperature=2.5, top_p=0.9, seed=11)
    expected = reference.ask(QUESTION, image=image, sampling=config, max_new_tokens=3)
    text, finish, usage, _ = ask(client, [user(QUESTION, image)], stream=True, temperature=2.5, top_p=0.9, seed=11,
                                 max_completion_tokens=3)
    assert text == expected.text and usage.completion_tokens == len(expected.tokens)
    assert finish == ("length" if expected.stop_reason == "max new tokens" else "stop")
    greedy = ask(client, [user(QUESTION, image)], stream=False, temperature=0)[0]
    # A stop sequence ends the answer before it, and the finish reason says stop.
    words = greedy.split()
    text, finish, _, _ = ask(client, [user(QUESTION, image)], stream=True, stop=[" " + words[-1]])
    assert text == " ".join(words[:-1]) and finish == "stop"
    text, finish, usage, _ = ask(client, [user(QUESTION, image)], stream=False, max_tokens=1)
    assert text == words[0] and finish == "length" and usage.completion_tokens == 1


def test_access_needs_the_key_but_health_and_the_page_do_not(toy):
    server, _ = toy
    for key in (None, "wrong-key"):
        with pytest.raises(openai.AuthenticationError):
            server.client(key).models.list()
        with pytest.raises(openai.AuthenticationError):
            server.client(key).chat.completions.create(model="toy", messages=[user("hi")])
    assert [m.id for m in server.client().models.list().data] == ["toy"]
    assert json.loads(call("GET", server.url + "/health", key=None)[1])["status"] == "ok"
    assert b"<html" in call("GET", server.url + "/", key=None)[1]


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels and holds none: decoding it would fail, so a
    refusal that names the pixel count shows the size was checked before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.parametrize("change, status, message", [
    ({"n": 2}, 400, "`n` > 1 is not supported"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "`tools` is not supported"),
    ({"logprobs": True}, 400, "`logprobs` is not supported"),
    ({"messages": [user("x", "https://example.com/a.png")]}, 400, "remote image URLs are not fetched"),
    ({"messages": [user("x", "file:///etc/passwd")]}, 400, "must be a data: URL"),
    ({"messages": [user("x", "data:image/png;base64," + base64.b64encode(png_header_only(3000, 3000)).decode())]},
     400, "3000x3000 = 9000000 pixels, over the 1000000 allowed"),
    ({"messages": [user("x", "data:image/png;base64," + base64.b64encode(png_header_only(60000, 60000)).decode())]},
     400, "too many pixels"),
    ({"messages": [user("x", "data:image/png;base64," + "A" * (4 * (2**20 // 3 + 8)))]}, 413, "over 1 MiB"),
    ({"messages": [user("x", "data:image/png;base64,not base64!")]}, 400, "not valid base64"),
    ({"messages": [user("word " * SEQ)]}, 400, f"tokens and the model holds {SEQ}"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "the last message must be the user's"),
    ({"messages": [{"role": "tool", "content": "1"}, user("x")]}, 400, "role 'tool' is not supported"),
    ({"max_tokens": 0}, 400, "`max_tokens`: input should be greater than or equal to 1"),
    ({"temperature": -1}, 400, "`temperature`: input should be greater than or equal to 0"),
    ({"stream": True, "messages": [user("word " * SEQ)]}, 400, "tokens and the model holds"),
])
def test_requests_lvb_cannot_honour_are_refused_with_the_reason(toy, change, status, message):
    server, _ = toy
    body = {"model": "toy", "messages": [user("hi")], **change}
    code, reply = call("POST", server.url + "/v1/chat/completions", json.dumps(body).encode())
    assert code == status, reply
    assert message in json.loads(reply)["error"]["message"]
    assert "\n" not in json.loads(reply)["error"]["message"]
    assert json.loads(call("GET", server.url + "/health")[1])["status"] == "ok"


def test_a_body_over_the_cap_is_refused_before_it_is_read(toy):
    server, _ = toy
    connection = http.client.HTTPConnection(*server.url.rsplit("/", 1)[1].split(":"), timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                        ("Content-Length", str(LIMITS.body_bytes + 1))):
        connection.putheader(name, value)
    connection.endheaders()  # and not one byte of the body: the answer must come anyway
    response = connection.getresponse()
    assert response.status == 413 and "over the" in json.loads(response.read())["error"]["message"]
    connection.close()


def test_a_full_queue_answers_429_and_every_accepted_request_is_answered(toy):
    """The test holds the engine, so MAX_QUEUE + 1 requests (one running, the rest waiting) fill
    the queue whatever the timing; the next gets 429 with Retry-After, then all the others finish."""
    server, _ = toy
    pictures = sample(MAX_QUEUE + 2, seed=99)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = ask(server.client(), [user(QUESTION, pictures[i][0])], stream=i % 2 == 0)[0]
        except openai.RateLimitError as e:
            results[i] = e

    with server.worker.busy:
        threads = []
        for i in range(MAX_QUEUE + 1):
            threads.append(threading.Thread(target=call, args=(i,)))
            threads[-1].start()
        wait_for(lambda: server.worker.pending == MAX_QUEUE + 1, "the queue to fill")
        # Retry-After is the recent requests' mean time times the requests ahead, rounded up:
        # with 0.7 s recorded (no request ends while the engine is held), 3 ahead make 3 s
        # (not the 2 of rounding down or of counting only those waiting, not the floor of 1 s).
        recorded = list(server.worker._durations)
        server.worker._durations.clear()
        server.worker._durations.extend([0.7] * 5)
        try:
            call(MAX_QUEUE + 1)
        finally:
            server.worker._durations.clear()
            server.worker._durations.extend(recorded)
        refused = results.pop(MAX_QUEUE + 1)
        assert isinstance(refused, openai.RateLimitError)
        assert refused.response.headers["Retry-After"] == "3" and MAX_QUEUE + 1 == 3
    for thread in threads:
        thread.join()
    assert results == {i: pictures[i][1] for i in range(MAX_QUEUE + 1)}  # each answer names its own picture


@pytest.fixture(scope="module")
def babbler(export_factory, checkpoint_factory):
    """A server on a random-weight fixture, whose answers run on to max_tokens: long enough to hang up in."""
    name = "gqa2-cross-last"
    server = Server(Session(Checkpoint.load(checkpoint_factory(name)), open_engine("onnxruntime", onnx_work=export_factory(name))))
    yield server
    server.stop()


def test_a_client_that_hangs_up_frees_the_engine_within_a_token(babbler):
    server = babbler
    body = {"model": "toy", "messages": [user("Hello")], "max_tokens": SEQ, "stream": True}
    connection = http.client.HTTPConnection(*server.url.rsplit("/", 1)[1].split(":"), timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    events = [line for line in (response.readline() for _ in range(6)) if line.startswith(b"data: ")]
    assert len(events) == 3 and b"[DONE]" not in events[-1]
    connection.close()  # mid-answer
    server.idle()
    job = server.worker.last_job
    assert job.cancelled.is_set() and server.worker.cancelled == 1
    assert job.pieces_after_cancel <= 1
    # The engine is free and the conversation state is sound: the next request is answered in full.
    text, finish, usage, _ = ask(server.client(), [user("Hello")], stream=False, max_tokens=8)
    assert finish == "length" and usage.completion_tokens == 8

    # A client that leaves while waiting in the queue costs the engine nothing.
    submitted = []  # the jobs as the server queues them, to wait on the queued one's cancel
    submit = server.worker.submit
    server.worker.submit = lambda job: (submitted.append(job), submit(job))[-1]
    with server.worker.busy:
        payload = json.dumps(body).encode()
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:  # no answer comes while the engine is held
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
            wait_for(lambda: server.worker.pending, "the request to be queued")
            assert server.worker.pending == 1 and len(submitted) == 1
        wait_for(submitted[0].cancelled.is_set, "the server to notice the hang-up")
    del server.worker.submit
    server.idle()
    assert server.worker.cancelled == 2 and server.worker.last_job.pieces_after_cancel == 0


# A prompt of several prefill chunks (the fixtures' tokenizer spells it nearly letter by letter).
LONG = "Tell me everything you can see in this picture: every colour, every shape and where it sits. "


def test_a_client_that_leaves_during_its_prefill_frees_the_slot(babbler):
    """The engine is held inside the second prefill chunk of a long prompt while its client
    hangs up: the prompt's later chunks are never run, the slot is free, and the chunks it did
    prefill stay in the cache for the next request that starts the same way."""
    server = babbler
    worker, runner = server.worker, server.worker.session.runner
    engine = runner.engine
    cancelled, served = worker.cancelled, worker.served
    worker.batch.sessions[0].reset()  # an empty cache (the server is idle): all it holds later is this prompt's
    gated = runner.engine = GatedEngine(engine, after=1, net=net_name(Kind.EMBED))
    try:
        body = json.dumps({"model": "toy", "messages": [user(LONG)], "max_tokens": 4, "stream": True}).encode()
        port = int(server.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as raw:  # its first token never comes: no reply to read
            raw.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            wait_for(lambda: gated.calls == 2, "the second prefill chunk")
        job = worker.last_job
        wait_for(job.cancelled.is_set, "the server to notice the hang-up")
        gated.go.set()
        server.idle()
    finally:
        gated.go.set()
        runner.engine = engine
    assert worker.cancelled == cancelled + 1 and worker.served == served
    assert gated.calls == 2  # no chunk after the hang-up was run
    assert worker.newcomer is None and not worker.running and worker.batch.free_slot() == 0
    text, finish, usage, _ = ask(server.client(), [user(LONG)], stream=False, max_tokens=4)
    assert finish == "length" and usage.completion_tokens == 4
    assert usage.prompt_tokens > 2 * CHUNK and usage.prompt_tokens_details.cached_tokens == 2 * CHUNK


def test_the_lean_runtime_does_not_import_the_server():
    code = ("import sys, lvb.cli, lvb.runtime.pipeline, lvb.runtime.backends; "
            "print(sorted(m for m in ('fastapi', 'uvicorn', 'starlette', 'lvb.serve') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


CHROMIUM = "/usr/bin/chromium"  # Debian's, installed by `make setup`; Playwright's own download needs the internet


def test_the_page_answers_a_picture_in_chromium(toy, tmp_path):
    """The page at / in a real headless Chromium: enter the key it asks for, pick a picture, ask,
    read the streamed answer and the server's own figures; a reload keeps the chat; a system
    prompt with a picture gets a note instead of a refused request. The screenshot stays as the
    test's artifact."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: run `make setup` (it installs Debian's chromium)"
    server, _ = toy
    image, answer = sample(1, seed=31)[0]
    picture, screenshot = tmp_path / "picture.png", tmp_path / "page.png"
    image.save(picture)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 640})
            page.goto(server.url + "/")
            page.wait_for_selector("#key-row.shown")  # the page found out that the server needs a key
            page.fill("#key", KEY)
            page.click("#save-key")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('toy')")
            page.set_input_files("#file", str(picture))
            page.wait_for_selector("#preview")
            page.fill("#prompt", QUESTION)
            page.click("#send")
            page.wait_for_selector(".message.assistant.done", timeout=60_000)
            text = page.inner_text(".message.assistant .text")
            stats = page.inner_text(".message.assistant .stats")
            result = server.worker.last_result  # what the server measured for this answer
            page.fill("#prompt", "What colour is it?")  # a follow-up without a picture
            page.keyboard.press("Enter")
            page.wait_for_selector(".message.assistant.done >> nth=1", timeout=60_000)
            shown = page.locator(".message .text").all_inner_texts()
            page.reload()  # the chat is kept in the browser's local storage
            page.wait_for_selector(".message.assistant.done >> nth=1")
            assert page.locator(".message .text").all_inner_texts() == shown and len(shown) == 4
            page.click("#system-toggle")  # a system prompt in a chat with a picture: the template refuses it
            page.fill("#system", "Answer in one word.")
            page.wait_for_selector("#note.shown")
            note = page.inner_text("#note")
            page.fill("#prompt", "And now?")
            page.click("#send")
            assert page.locator(".message").count() == 4  # not sent
            page.screenshot(path=str(screenshot))
            page.click("#new-chat")
            assert page.locator(".message").count() == 0 and not page.is_visible("#note")
            page.reload()
            page.wait_for_function("document.getElementById('model').textContent.startsWith('toy')")
            assert page.locator(".message").count() == 0
        finally:
            browser.close()
    print(f"\nscreenshot of the page: {screenshot}")
    assert text == answer
    assert "does not take a system prompt together with a picture" in note
    # The figures are the server's (sent with the stream), not the browser's guess from bursty arrivals.
    first = re.search(r"first token (\d+) ms", stats)
    rate = re.search(r"([\d.]+) tokens/s", stats)
    assert first and rate, stats
    assert abs(int(first[1]) - result.first_token_seconds * 1000) <= 1, (stats, result)
    assert abs(float(rate[1]) - result.tokens_per_second) <= 0.06, (stats, result)
    assert f"{result.completion_tokens} tokens" in stats and f"({result.cached_tokens} cached)" in stats


class GatedEngine:
    """The real engine, whose LM head (or `net`) stops after a few launches until the test lets
    it go on: the Stop button is clicked while the answer is surely still running."""

    def __init__(self, engine, after: int, net: str = net_name(Kind.LM_HEAD)):
        self.engine, self.after, self.net, self.calls = engine, after, net, 0
        self.go = threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, net, feeds, store=None):
        if net == self.net:
            self.calls += 1
            if self.calls > self.after:
                assert self.go.wait(timeout=120)
        return self.engine.run(net, feeds, store)


def test_the_pages_stop_button_ends_the_answer_and_keeps_the_chat(babbler):
    from playwright.sync_api import sync_playwright

    server = babbler
    runner = server.worker.session.runner
    engine = runner.engine
    gated = runner.engine = GatedEngine(engine, after=6)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                page = browser.new_page()
                page.goto(server.url + "/")
                page.evaluate(f"localStorage.setItem('lvb-api-key', '{KEY}')")
                page.reload()
                page.wait_for_function("document.getElementById('model').textContent.includes('sequence')")
                page.fill("#prompt", "Hello")
                page.keyboard.press("Enter")
                page.wait_for_function("document.querySelector('.message.assistant .text')?.textContent.length > 0")
                page.click("#stop")
                page.wait_for_selector(".message.assistant.done")
                partial = page.inner_text(".message.assistant .text")
                stats = page.inner_text(".message.assistant .stats")
                kept = page.evaluate("JSON.parse(localStorage.getItem('lvb-chat')).history")
                gated.go.set()
                server.idle()
                assert page.is_enabled("#send") and not page.is_enabled("#stop")
            finally:
                browser.close()
    finally:
        gated.go.set()
        runner.engine = engine
    assert partial and stats == "stopped"
    assert [(m["role"], m["text"]) for m in kept] == [("user", "Hello"), ("assistant", partial)]
    job = server.worker.last_job
    assert job.cancelled.is_set() and job.pieces_after_cancel <= 1  # the engine was freed within a token


class FailingEngine:
    """The real onnxruntime engine, made to fail the next vision run when told to: the server's
    handling of an engine failure is under test here, not the engine."""

    def __init__(self, engine):
        self.engine, self.fail_next = engine, False

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, net, feeds, store=None):
        if self.fail_next and net == "vision_embed":
            self.fail_next = False
            raise EngineError("vision_embed: device returned error 3 (stand-in failure)")
        return self.engine.run(net, feeds, store)


def test_an_engine_error_is_a_500_and_the_server_goes_on(babbler):
    server = babbler
    runner = server.worker.session.runner  # runs every net of the session
    engine = runner.engine
    failing = FailingEngine(engine)
    runner.engine = failing
    try:
        image, _ = sample(1, seed=8)[0]
        failing.fail_next = True
        code, reply = call("POST", server.url + "/v1/chat/completions",
                           json.dumps({"model": "toy", "messages": [user(QUESTION, image)], "max_tokens": 4}).encode())
        message = json.loads(reply)["error"]["message"]
        assert code == 500 and "device returned error 3" in message and "\n" not in message
        text, finish, usage, _ = ask(server.client(), [user(QUESTION, image)], stream=True, max_tokens=4)
        assert usage.completion_tokens == 4 and usage.prompt_tokens_details.cached_tokens == 0
    finally:
        runner.engine = engine
    assert server.worker.failed == 1


def test_the_simulator_backend_serves(compile_factory, checkpoint_factory):
    """One short exchange on the BM1684X simulator (the bmodel test_runtime compiles too)."""
    name = "gqa2-cross-last"
    with open_engine("cmodel", bmodel=compile_factory(name, "int8")) as engine:
        server = Server(Session(Checkpoint.load(checkpoint_factory(name)), engine))
        try:
            image, _ = sample(1, seed=9)[0]
            history = [user(QUESTION, image)]
            client = server.client(timeout=1800)  # a guard only: the simulator is slow on a busy machine
            first = ask(client, history, stream=True, max_tokens=3)
            assert first[1] == "length" and first[2].completion_tokens == 3
            history += [{"role": "assistant", "content": first[0]}, user("More?")]
            text, finish, usage, headers = ask(client, history, stream=False, max_tokens=2)
            assert usage.completion_tokens == 2
            assert int(headers["x-lvb-prefilled-tokens"]) <= usage.prompt_tokens - first[2].prompt_tokens
        finally:
            server.stop()


def declared_body(url: str, length: int) -> tuple[int, str]:
    """(status, error message) for a POST whose headers declare `length` bytes and send none."""
    connection = http.client.HTTPConnection(*url.rsplit("/", 1)[1].split(":"), timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"), ("Content-Length", str(length))):
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    try:
        return response.status, json.loads(response.read())["error"]["message"]
    finally:
        connection.close()


def test_the_command_warns_when_it_listens_beyond_loopback_without_a_key(toy_export):
    """`--host 0.0.0.0` without a key: the note comes before the server binds. The port is held
    (bound, never listening: nothing is exposed), so the server stops there."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "LVB_API_KEY"}
    with socket.socket() as held:
        held.bind(("0.0.0.0", 0))
        result = subprocess.run([sys.executable, "-m", "lvb.cli", "serve", "--model", str(Path(__file__).resolve().parent.parent / "models" / "toy"),
                                 "--onnx", str(toy_export), "--host", "0.0.0.0", "--port", str(held.getsockname()[1])],
                                env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    output = " ".join((result.stdout + result.stderr).split())
    assert "listening on 0.0.0.0 without --api-key: anyone who reaches it can use the model" in output, output[-2000:]


def test_the_command_serves_with_the_key_from_the_environment(toy_export, tmp_path):
    """`lvb serve` itself, as a subprocess on loopback, with LVB_API_KEY."""
    import os

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    model = Path(__file__).resolve().parent.parent / "models" / "toy"
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-m", "lvb.cli", "serve", "--model", str(model), "--onnx", str(toy_export),
                                    "--port", str(port), "--max-queue", "1"],
                                   env=dict(os.environ, LVB_API_KEY=KEY), stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if call("GET", url + "/health", key=None)[0] == 200:
                    break
            except urllib.error.URLError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        assert call("GET", url + "/v1/models", key=None)[0] == 401
        # The command's own limits are the defaults the README states (Limits() in this file's
        # servers is set smaller): a body declared one byte over 32 MiB is refused unread.
        code, reply = declared_body(url, 32 * 2**20 + 1)
        assert code == 413 and f"over the {32 * 2**20} allowed" in reply
        image, answer = sample(1, seed=12)[0]
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert ask(client, [user(QUESTION, image)], stream=True)[0] == answer
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert "prefilled" in log.read_text()  # the per-request log line


# -- hostile and unusual requests: never a 500, every option honoured or refused ---------------------------------

from lvb.serve.api import NOT_USED, ChatCompletionRequest  # noqa: E402


def post(server, path: str, body, key: str | None = KEY) -> tuple[int, dict]:
    code, reply = call("POST", server.url + path, body if isinstance(body, bytes) else json.dumps(body).encode(), key=key)
    return code, json.loads(reply)


def assert_refused(code: int, reply: dict, status: int, *words: str) -> None:
    assert code == status, reply
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"} and "\n" not in error["message"], error
    for word in words:
        assert word in error["message"], error


def wrong(annotation) -> object:
    """A value of the wrong JSON type for a field: a number where text goes, text elsewhere."""
    import types
    import typing

    takes_text = annotation is str or (typing.get_origin(annotation) in (typing.Union, types.UnionType)
                                       and str in typing.get_args(annotation))
    return 5 if takes_text else "x"


HOSTILE = [  # (body, words the refusal names)
    (b"[" * 1500 + b"]" * 1500, ["not valid JSON", "recursion"]),
    (b'{"model": "toy", "messages": ' + b"[" * 1500 + b"]" * 1500 + b"}", ["not valid JSON"]),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', ["not valid JSON"]),
    (b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', ["not valid JSON"]),
    (b"", ["not valid JSON"]),
    (b"[]", ["a JSON object"]),
    (b'"hi"', ["a JSON object"]),
    (b'{"messages": []}', ["`messages`"]),
    (b'{"messages": [5]}', ["`messages[0]`"]),
    (b'{"messages": [{"role": 5, "content": "x"}]}', ["`messages[0].role`"]),
    (b'{"messages": [{"role": "user", "content": 5}]}', ["`messages[0].content`"]),
    (b'{"messages": [{"role": "user", "content": [5]}]}', ["`messages[0].content[0]`"]),
    (b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}', ["`messages[0].content[0].text`"]),
    (b'{"messages": [{"role": "user", "content": [{"type": "audio"}]}]}', ["`messages[0].content[0]`"]),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]}',
     ["`messages[0].content[0].image_url`"]),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]}]}',
     ["`messages[0].content[0].image_url.url`"]),
    (b'{"messages": [{"role": "user", "content": "x", "name": "bob"}]}', ["`messages[0].name`"]),
    (b'{"messages": [{"role": "user", "content": "x", "extra": 1}]}', ["`messages[0].extra`"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": "yes"}}',
     ["`stream_options.include_usage`"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "modalities": 5}', ["`modalities`"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}',
     ["`response_format.type`"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop_token_ids": [100000000]}', ["not a token id"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": 1e400}', ["`seed`"]),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', ["`temperature`"]),
]


@pytest.mark.parametrize("body, words", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_bodies_get_a_400_naming_the_problem(toy, body, words):
    server, _ = toy
    failed = server.worker.failed
    assert_refused(*post(server, "/v1/chat/completions", body), 400, *words)
    assert server.worker.failed == failed  # nothing reached the engine, the cache was not reset


@pytest.mark.parametrize("name", sorted(ChatCompletionRequest.model_fields))
def test_every_field_of_the_wrong_type_is_a_400_naming_it(toy, name):
    server, _ = toy
    body = {"messages": [user("hi")], "max_tokens": 1, name: wrong(ChatCompletionRequest.model_fields[name].annotation)}
    assert_refused(*post(server, "/v1/chat/completions", body), 400, f"`{name}")


@pytest.mark.parametrize("name", sorted(NOT_USED))
def test_every_option_lvb_cannot_honour_is_refused_by_name(toy, name):
    server, _ = toy
    code, reply = post(server, "/v1/chat/completions", {"messages": [user("hi")], name: "on"})
    assert_refused(code, reply, 400, f"`{name}`", "leave it out")


def test_options_at_their_unused_values_and_unknown_ones(toy):
    server, _ = toy
    neutral = {name: values[0] for name, (values, _) in NOT_USED.items() if values}
    code, reply = post(server, "/v1/chat/completions", {"messages": [user("hi")], "max_tokens": 2, **neutral})
    assert code == 200, reply
    assert_refused(*post(server, "/v1/chat/completions", {"messages": [user("hi")], "lora": "x"}), 400,
                   "`lora` is not an option lvb serve knows")
    # vLLM answers an unknown model with 404 in OpenAI's shape; the openai client raises NotFoundError.
    code, reply = post(server, "/v1/chat/completions", {"model": "gpt-4", "messages": [user("hi")]})
    assert_refused(code, reply, 404, "`gpt-4` does not exist", "`toy`")
    assert reply["error"]["code"] == "model_not_found" and reply["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-4", messages=[user("hi")])


def test_the_cheap_vllm_options_are_honoured(toy):
    """ignore_eos, min_tokens, stop_token_ids and min_p, against a Session given the same sampling."""
    from lvb.runtime.sampling import SamplingConfig

    server, reference = toy
    client = server.client()
    image, answer = sample(1, seed=21)[0]
    messages = [user(QUESTION, image)]
    reference.reset()
    greedy = reference.ask(QUESTION, image=image, sampling=SamplingConfig())
    ends = tuple(sorted(reference.checkpoint.tokenizer.stop_ids))
    assert greedy.text == answer and greedy.tokens[-1] in ends
    n = len(greedy.tokens)

    text, finish, usage, _ = ask(client, messages, stream=False, temperature=0, extra_body={"ignore_eos": True},
                                 max_tokens=n + 3)
    assert finish == "length" and usage.completion_tokens == n + 3 and text.startswith(answer)

    reference.reset()
    expected = reference.ask(QUESTION, image=image, max_new_tokens=n + 2,
                             sampling=SamplingConfig(min_new_tokens=n + 1, eos_ids=ends))
    text, finish, usage, _ = ask(client, messages, stream=True, temperature=0, extra_body={"min_tokens": n + 1},
                                 max_tokens=n + 2)
    assert text == expected.text and usage.completion_tokens == len(expected.tokens) > n

    # A stop token id ends the answer there, as the model's own end token does.
    text, finish, usage, _ = ask(client, messages, stream=True, temperature=0,
                                 extra_body={"stop_token_ids": [greedy.tokens[1]]})
    assert finish == "stop" and usage.completion_tokens == 2
    assert text == reference.checkpoint.tokenizer.decode(greedy.tokens[:1])

    # min_p 1 keeps only the most likely token: sampling at any temperature is then greedy.
    assert ask(client, messages, stream=False, temperature=3.0, seed=1, extra_body={"min_p": 1.0})[0] == answer


def test_a_system_message_and_a_picture_are_refused_before_decoding(toy):
    server, _ = toy
    picture = "data:image/png;base64," + base64.b64encode(png_header_only(50, 50)).decode()  # no pixels: not decodable
    body = {"messages": [{"role": "system", "content": "Be brief."}, user(QUESTION, picture)]}
    assert_refused(*post(server, "/v1/chat/completions", body), 400, "system message together with a picture")
    models = json.loads(call("GET", server.url + "/v1/models")[1])
    assert models["data"][0]["lvb"]["system_with_picture"] is False


def test_base64_with_line_breaks_is_read(toy):
    server, _ = toy
    image, answer = sample(1, seed=23)[0]
    url = data_url(image)
    head, payload = url.split(",", 1)
    wrapped = head + "," + "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))  # base64 -w76, MIME's
    assert ask(server.client(), [user(QUESTION, wrapped)], stream=False)[0] == answer


def test_text_longer_than_the_sequence_can_hold_is_refused_without_tokenizing(toy, monkeypatch):
    server, _ = toy
    tokenizer = server.worker.session.checkpoint.tokenizer
    calls = []
    monkeypatch.setattr(tokenizer, "encode_chat", lambda *a, **k: calls.append(1))
    monkeypatch.setattr(tokenizer, "encode_prompt", lambda *a, **k: calls.append(1))
    limit = SEQ * tokenizer.max_token_chars()
    long = "x" * (limit + 1)
    assert_refused(*post(server, "/v1/chat/completions", {"messages": [user(long)]}), 400,
                   f"{limit + 1} characters", f"{SEQ}-token sequence")
    history = [user(long[:limit]), {"role": "assistant", "content": "ok"}, user("and?")]
    assert_refused(*post(server, "/v1/chat/completions", {"messages": history}), 400, "--history truncate")
    assert_refused(*post(server, "/tokenize", {"prompt": long}), 400, "characters")
    assert not calls


def test_tokenize_and_detokenize(toy):
    server, reference = toy
    tokenizer = reference.checkpoint.tokenizer
    code, reply = post(server, "/tokenize", {"model": "toy", "prompt": QUESTION, "return_token_strs": True})
    assert code == 200 and reply["tokens"] == tokenizer.encode_prompt(QUESTION) and reply["max_model_len"] == SEQ
    assert reply["count"] == len(reply["tokens"]) == len(reply["token_strs"])
    messages = [{"role": "user", "content": [{"type": "text", "text": QUESTION}, {"type": "image"}]}]
    code, reply = post(server, "/tokenize", {"messages": [user(QUESTION, "data:image/png;base64,AAAA")]})
    assert code == 200 and reply["tokens"] == tokenizer.encode_chat(reference.checkpoint.template, messages,
                                                                    now=server.worker.session.today)
    code, reply = post(server, "/detokenize", {"tokens": tokenizer.encode_prompt(QUESTION, add_special_tokens=False)})
    assert code == 200 and reply["prompt"].endswith(QUESTION)  # after <|begin_of_text|>, which encode_prompt adds
    assert_refused(*post(server, "/detokenize", {"tokens": [-1]}), 400, "not a token id")
    assert_refused(*post(server, "/detokenize", {"tokens": "1 2"}), 400, "`tokens`")
    assert_refused(*post(server, "/tokenize", {"prompt": "x", "messages": [user("x")]}), 400, "either `prompt`")
    assert_refused(*post(server, "/tokenize", {"prompt": "x"}, key=None), 401)


def metric_values(server) -> dict[str, float]:
    """GET /metrics as {series: value}."""
    code, text = call("GET", server.url + "/metrics")
    assert code == 200
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.decode().splitlines()
            if line and not line.startswith("#")}


def test_metrics_head_and_error_shapes(toy):
    server, _ = toy
    ask(server.client(), [user("hi")], stream=True, max_tokens=3)
    metrics = metric_values(server)
    assert not any("spec_decode" in name for name in metrics)  # no draft, no draft counts
    assert json.loads(call("GET", server.url + "/health")[1])["draft"] is None
    assert metrics['lvb_requests_total{outcome="served"}'] >= 1 and metrics["lvb_generation_tokens_total"] >= 3
    for name in ("lvb_time_to_first_token_seconds", "lvb_time_per_output_token_seconds"):
        assert metrics[f'{name}_bucket{{le="+Inf"}}'] == metrics[f"{name}_count"] >= 1
    assert metrics["lvb_num_requests_waiting"] == 0 and metrics["lvb_engine_seconds_total"] > 0
    assert call("GET", server.url + "/metrics", key=None)[0] == 401
    for path in ("/", "/health", "/v1/models", "/metrics"):
        assert call("HEAD", server.url + path) == (200, b""), path
    code, reply = call("GET", server.url + "/v1/nothing")
    assert_refused(code, json.loads(reply), 404, "no such endpoint: /v1/nothing")
    code, reply = call("GET", server.url + "/v1/chat/completions")
    assert_refused(code, json.loads(reply), 405, "GET is not allowed")


def test_an_empty_or_unsendable_api_key_is_refused(toy):
    from lvb.errors import LvbError

    server, _ = toy
    for key in ("", "two words", "clé"):
        with pytest.raises(LvbError, match="printable ASCII"):
            create_app(server.worker, "toy", api_key=key)


@pytest.fixture(scope="module")
def truncating(toy_export):
    """A second toy server, as `lvb serve --history truncate --allow-origin http://app.test` without a key."""
    checkpoint = Checkpoint.load(Path(__file__).resolve().parent.parent / "models" / "toy")
    session = Session(checkpoint, open_engine("onnxruntime", onnx_work=toy_export), truncate_history=True)
    server = Server(session, api_key=None, allow_origins=("http://app.test",))
    yield server
    server.stop()


def test_history_truncate_drops_the_oldest_exchanges(truncating, toy):
    server = truncating
    image, answer = sample(1, seed=25)[0]
    filler = [m for i in range(12) for m in (user(f"Tell me about the number {i} please."),
                                             {"role": "assistant", "content": "It is a number " * 4})]
    code, reply = post(server, "/v1/chat/completions", {"messages": filler + [user(QUESTION, image)]}, key=None)
    assert code == 200, reply
    assert any("oldest exchange" in notice for notice in reply["lvb"]["notices"]), reply["lvb"]
    # An exchange longer than the sequence could hold is left out without tokenizing it.
    limit = SEQ * server.worker.session.checkpoint.tokenizer.max_token_chars()
    huge = [user("x" * limit), {"role": "assistant", "content": "ok"}]
    code, reply = post(server, "/v1/chat/completions", {"messages": huge + [user(QUESTION, image)]}, key=None)
    assert code == 200 and reply["choices"][0]["message"]["content"] == answer
    assert "left out the 1 oldest exchange(s)" in reply["lvb"]["notices"][0]
    # The refusing server says which option would have helped.
    toy_server, _ = toy
    code, reply = post(toy_server, "/v1/chat/completions", {"messages": filler + [user(QUESTION, image)]})
    assert_refused(code, reply, 400, "tokens and the model holds", "start lvb serve with --history truncate")


def test_cors_is_off_unless_an_origin_is_allowed(truncating, toy):
    def preflight(server, origin):
        request = urllib.request.Request(server.url + "/v1/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.headers.get("access-control-allow-origin")
        except urllib.error.HTTPError as e:
            return e.headers.get("access-control-allow-origin")

    assert preflight(truncating, "http://app.test") == "http://app.test"
    assert preflight(truncating, "http://evil.test") is None
    assert preflight(toy[0], "http://app.test") is None


# -- speculative decoding: `lvb serve --draft` ----------------------------------------------------------------

TOY = Path(__file__).resolve().parent.parent / "models" / "toy"
TOY_DRAFT = TOY.parent / "toy-draft"


@pytest.fixture(scope="module")
def drafting(toy_export, toy_draft_export):
    """(server, reference session): the toy served with its draft (models/toy-draft, 3 tokens a
    check), as `lvb serve --draft` loads it, and `lvb chat --draft`'s session on engines of its own."""
    toy = Checkpoint.load(TOY)

    def session() -> Session:
        draft = Checkpoint.load(TOY_DRAFT), open_engine("onnxruntime", onnx_work=toy_draft_export)
        return Session(toy, open_engine("onnxruntime", onnx_work=toy_export), draft=draft, draft_tokens=3)

    server, reference = Server(session()), session()
    yield server, reference
    server.stop()
    for s in (server.worker.session, reference):
        s.__exit__(None, None, None)


def test_a_draft_changes_no_greedy_answer_and_its_proposals_are_counted(drafting, toy):
    """Greedy answers of a server with a draft, streamed or not, with a picture or without, and a
    follow-up that continues the cached conversation, equal a Session's without a draft token for
    token; each answer's timings, /metrics and /health count the proposals, and agree."""
    server, _ = drafting
    plain = toy[1]
    client = server.client()
    pictures = sample(3, seed=606)
    for i, (image, _) in enumerate(pictures):
        plain.reset()
        expected = plain.ask(QUESTION, image)
        text, _, usage, _ = ask(client, [user(QUESTION, image)], stream=i % 2 == 1, temperature=0)
        assert text == expected.text and usage.completion_tokens == len(expected.tokens), i
    history = [user(QUESTION, pictures[-1][0]), {"role": "assistant", "content": text}, user("Tell me more.")]
    expected = plain.ask("Tell me more.", max_new_tokens=10)
    text, _, usage, headers = ask(client, history, stream=False, temperature=0, max_tokens=10)
    assert text == expected.text and usage.completion_tokens == len(expected.tokens)
    assert int(headers["x-lvb-prefilled-tokens"]) < usage.prompt_tokens  # the conversation went on in the cache

    code, reply = post(server, "/v1/chat/completions", {"messages": [user(QUESTION, pictures[0][0])], "temperature": 0})
    assert code == 200 and reply["choices"][0]["message"]["content"] == pictures[0][1]
    timings = reply["timings"]  # llama.cpp's names
    assert 0 < timings["draft_n"] and 0 <= timings["draft_n_accepted"] <= timings["draft_n"]
    metrics = metric_values(server)
    proposed = metrics["lvb_spec_decode_num_draft_tokens_total"]
    accepted = metrics["lvb_spec_decode_num_accepted_tokens_total"]
    assert proposed >= timings["draft_n"] and metrics["lvb_spec_decode_num_drafts_total"] > 0
    assert 0 < accepted <= proposed  # the trained draft knows the answers' form: some proposals are kept
    assert metrics["lvb_spec_decode_draft_acceptance_rate"] == pytest.approx(accepted / proposed)
    health = json.loads(call("GET", server.url + "/health")[1])["draft"]
    assert (health["proposed"], health["accepted"], health["draft_tokens"]) == (proposed, accepted, 3)


def test_sampled_answers_with_a_draft_are_lvb_chats(drafting, toy):
    """Seeded sampled requests to a server with a draft get the answers `lvb chat --draft` samples
    with the same options: the rejection rule runs with the request's sampler. Without a picture the
    toy's answers are free, and the draft's draws make at least one of them another sample than the
    model alone draws: a server that left its draft out would not pass."""
    from lvb.runtime.sampling import SamplingConfig

    server, reference = drafting
    plain = toy[1]
    without_draft = []
    for seed in (11, 12):
        config = SamplingConfig.from_generation_config(reference.checkpoint.generation_config, do_sample=True,
                                                       temperature=1.0, top_p=0.9, seed=seed)
        reference.reset()
        expected = reference.ask("Hello there", sampling=config, max_new_tokens=6)
        assert expected.stats.speculative.proposed > 0
        text, _, usage, _ = ask(server.client(), [user("Hello there")], stream=seed % 2 == 0, temperature=1.0,
                                top_p=0.9, seed=seed, max_tokens=6)
        assert text == expected.text and usage.completion_tokens == len(expected.tokens), seed
        plain.reset()
        without_draft.append(plain.ask("Hello there", sampling=config, max_new_tokens=6).text != text)
    assert any(without_draft)


def test_serve_refuses_a_bad_draft_before_serving(toy_export, toy_draft_export, tmp_path):
    """--draft-tokens out of range, a vision model as the draft and a draft with another
    tokenizer: one line naming the problem and the fix, exit 1, before the server listens (the
    port is held, so a server that started would fail differently)."""
    from helpers import one_error_line

    other = tmp_path / "other-tokenizer"
    other.mkdir()
    for f in TOY_DRAFT.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["!"], vocab['"'] = vocab['"'], vocab["!"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        serve = ["serve", "--model", TOY, "--onnx", toy_export, "--port", held.getsockname()[1]]
        draft = ["--draft", TOY_DRAFT, "--draft-onnx", toy_draft_export]
        for tokens, words in (("0", "--draft-tokens 0 is out of range"), ("32", "use 1 to 31")):
            assert words in " ".join(one_error_line(serve + draft + ["--draft-tokens", tokens]).split())
        output = " ".join(one_error_line(serve + ["--draft", TOY, "--draft-onnx", toy_export]).split())
        assert "is a vision model; a draft is a Llama text checkpoint" in output
        output = " ".join(one_error_line(serve + ["--draft", other, "--draft-onnx", toy_draft_export]).split())
        assert "another tokenizer than the model" in output and "must share the model's tokenizer" in output
