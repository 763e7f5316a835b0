"""One engine, many clients: a single thread owns the Session and answers requests in
arrival order from a bounded queue.

The Session's KV cache outlives requests. A request whose earlier turns are the
conversation the session last answered (same pictures) continues it, so only its new
turn is prefilled; any other request restores its own history into the session, which
keeps whatever cached tokens still agree (Session.restore) and prefills the rest.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from lvb.errors import LvbError
from lvb.runtime.engine import EngineError
from lvb.runtime.image import preprocess
from lvb.runtime.pipeline import Session
from lvb.runtime.sampling import SamplingConfig
from lvb.serve.api import ChatRequest, RequestError, ServedModel
from lvb.serve.metrics import Metrics

log = logging.getLogger("lvb.serve")

FINISH_REASONS = {"stop token": "stop", "stopped": "stop", "max new tokens": "length", "sequence full": "length"}


def served_model(session: Session, name: str) -> ServedModel:
    """What the request checks need to know about the session's model."""
    checkpoint = session.checkpoint
    tokenizer = checkpoint.tokenizer
    try:  # the chat template may refuse a system message when the chat has a picture (Llama 3.2 Vision's does)
        checkpoint.template.render([{"role": "system", "content": "x"},
                                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}])
        system_with_picture = True
    except LvbError:
        system_with_picture = False
    return ServedModel(name=name, seq=session.seq, max_token_chars=tokenizer.max_token_chars(),
                       vocab_size=tokenizer.vocab_size, stop_ids=tuple(sorted(tokenizer.stop_ids)),
                       system_with_picture=system_with_picture,
                       prepare=lambda image: preprocess(image, checkpoint.image_config),
                       history="truncate" if session.truncate_history else "refuse")


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy: {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Result:
    text: str
    finish_reason: str  # stop or length
    prompt_tokens: int
    cached_tokens: int  # of the prompt, reused from the previous request's cache
    completion_tokens: int
    first_token_seconds: float
    tokens_per_second: float
    engine_seconds: float  # the whole Session.ask (restoring the history not included)
    decode_seconds: float = 0.0  # after the first token
    notices: list[str] = field(default_factory=list)  # what the session did that the client should know

    def timings(self) -> dict:
        """The server's own figures, as llama.cpp's server sends them (`timings`), for the page."""
        prefilled = self.prompt_tokens - self.cached_tokens
        return {"cache_n": self.cached_tokens, "prompt_n": prefilled, "prompt_ms": round(self.first_token_seconds * 1000, 2),
                "predicted_n": self.completion_tokens, "predicted_ms": round(self.decode_seconds * 1000, 2),
                "predicted_per_second": round(self.tokens_per_second, 2)}


@dataclass
class Job:
    """One request on its way through the queue; events go back to the event loop that waits for them."""

    request: ChatRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    cancelled: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.perf_counter)
    pieces_after_cancel: int = 0  # how far generation went once the client had gone

    def cancel(self) -> None:
        self.cancelled.set()

    def send(self, kind: str, value) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the server is shutting down: nobody waits any more
            pass


class Worker:
    def __init__(self, session: Session, max_queue: int = 16):
        self.session, self.max_queue = session, max_queue
        self.metrics = Metrics()
        # What the session's messages hold, besides their text: each message's picture digest.
        # None when the session's state is not known to match a request (after an error).
        self.digests: list[str | None] | None = []
        self.image_digest: str | None = None  # the picture whose K/V the engine holds
        self.pending = 0  # queued + running
        self.served = self.cancelled = self.failed = 0
        self.last_job: Job | None = None
        self.last_result: Result | None = None
        self.busy = threading.Lock()  # held while a request runs on the engine
        self._count = threading.Lock()
        self._durations: deque[float] = deque(maxlen=20)
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lvb-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when max_queue requests already wait besides the running one."""
        with self._count:
            if self.pending > self.max_queue:
                average = sum(self._durations) / len(self._durations) if self._durations else 1.0
                raise QueueFull(max(1, math.ceil(average * self.pending)))
            self.pending += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        log.info("engine thread %d ready", threading.get_native_id())  # for per-thread CPU accounting (bench)
        while (job := self._jobs.get()) is not None:
            started = time.perf_counter()
            try:
                with self.busy:
                    self.metrics.queue_time.observe(time.perf_counter() - job.queued_at)
                    self._answer(job)
            finally:
                ended = time.perf_counter()
                with self._count:
                    self.pending -= 1
                    self._durations.append(ended - started)
                with self.metrics.lock:
                    self.metrics.engine_seconds += ended - started
                    self.metrics.e2e.observe(ended - job.queued_at)

    def _answer(self, job: Job) -> None:
        self.last_job = job
        if job.cancelled.is_set():
            self.cancelled += 1
            self.metrics.count("cancelled")
            log.info("%s: the client left while queued; skipped", job.id)
            return
        try:
            result = self._generate(job)
        except RequestError as e:
            self.metrics.count("refused")
            job.send("error", (e.status, str(e)))
        except EngineError as e:
            self._forget()
            self.failed += 1
            self.metrics.count("failed")
            log.error("%s: engine error: %s", job.id, e)
            job.send("error", (500, f"engine error: {e}"))
        except LvbError as e:  # too long for the sequence, a picture the processor refuses, a template error
            self.metrics.count("refused")
            job.send("error", (400, self._fix(str(e))))
        except Exception as e:  # a bug; the server goes on with a fresh conversation state
            self._forget()
            self.failed += 1
            self.metrics.count("failed")
            log.exception("%s: internal error", job.id)
            job.send("error", (500, f"internal error: {type(e).__name__}: {e}"))
        else:
            self.last_result = result
            job.send("done", result)

    def _fix(self, message: str) -> str:
        """Session speaks to `lvb chat`'s user: say what lvb serve offers instead."""
        if message.endswith("start a new chat or allow history truncation"):
            return message.removesuffix("allow history truncation") + "start lvb serve with --history truncate"
        return message

    def _forget(self) -> None:
        """After a failure mid-turn the cache may hold half-written state: start afresh."""
        self.session.reset()
        self.digests, self.image_digest = [], None

    def _generate(self, job: Job) -> Result:
        request, session = job.request, self.session
        history, turn = request.turns[:-1], request.turns[-1]
        messages = [t.message() for t in history]
        digests = [t.digest for t in history]
        continued = self.digests == digests and session.messages == messages
        if not continued:
            pictured = [i for i, t in enumerate(history) if t.digest is not None]
            if len(pictured) > 1:  # one picture in play at a time: the newest stands for all of them
                log.info("%s: rebuilding a conversation of %d pictures with the newest one only", job.id, len(pictured))
            last = pictured[-1] if pictured else None
            # The same picture already holds the cross-attention K/V: hand the session its own copy.
            same = last is not None and digests[last] == self.image_digest and session.image is not None
            image = session.image if same else history[last].image if last is not None else None
            session.restore(messages, image=image, image_turn=last)
            self.digests, self.image_digest = digests, digests[last] if last is not None else None
        sampling = self._sampling(request)
        self.digests = None  # unknown until the turn completes
        stops = StopMatcher(request.stop, job)
        started = time.perf_counter()
        reply = session.ask(turn.text, image=turn.image, sampling=sampling, max_new_tokens=request.max_tokens,
                            on_text=stops.push)
        engine_seconds = time.perf_counter() - started
        text = stops.finish()
        if text != reply.text:  # cut at a stop sequence: the conversation holds what the client got
            session.messages[-1] = {"role": "assistant", "content": [{"type": "text", "text": text}]}
        self.digests = digests + [turn.digest, None]
        if turn.digest is not None:
            self.image_digest = turn.digest
        s = reply.stats
        if job.cancelled.is_set():
            self.cancelled += 1
            self.metrics.count("cancelled")
            log.info("%s: the client left; engine freed after %d more piece(s)", job.id, job.pieces_after_cancel)
        else:
            self.served += 1
            self.metrics.count("served")
        with self.metrics.lock:
            m = self.metrics
            m.prompt_tokens += s.prompt_tokens
            m.cached_tokens += s.prompt_tokens - s.prefilled_tokens
            m.generation_tokens += s.generated_tokens
            m.first_token.observe(s.first_token_seconds)
            if s.generated_tokens > 1:
                m.per_token.observe(s.decode_seconds / (s.generated_tokens - 1), s.generated_tokens - 1)
        notices = list(reply.notices)
        if request.dropped:
            notices.insert(0, f"left out the {request.dropped} oldest exchange(s), too long for the {session.seq}-token "
                              "sequence")
        log.info("%s: %s, prompt %d tokens (%d prefilled), %d generated, first token %.0f ms, %.1f tokens/s, %s",
                 job.id, "continued" if continued else "restored", s.prompt_tokens, s.prefilled_tokens,
                 s.generated_tokens, s.first_token_seconds * 1000, s.tokens_per_second, reply.stop_reason)
        finish = "stop" if stops.hit else FINISH_REASONS[reply.stop_reason]
        return Result(text, finish, s.prompt_tokens, s.prompt_tokens - s.prefilled_tokens, s.generated_tokens,
                      s.first_token_seconds, s.tokens_per_second, engine_seconds, s.decode_seconds, notices)

    def _sampling(self, request: ChatRequest) -> SamplingConfig:
        """OpenAI's knobs over the checkpoint's generation_config: temperature 0 is greedy, any
        other temperature or a top_p below 1 samples; nothing given keeps the checkpoint's choice."""
        sample = None
        if request.temperature == 0:
            sample = False
        elif request.temperature is not None or (request.top_p is not None and request.top_p < 1):
            sample = True
        ends = tuple(sorted(self.session.checkpoint.tokenizer.stop_ids))
        try:
            return SamplingConfig.from_generation_config(
                self.session.checkpoint.generation_config, do_sample=sample,
                temperature=request.temperature if request.temperature else None, top_p=request.top_p,
                top_k=request.top_k, repetition_penalty=request.repetition_penalty, seed=request.seed,
                min_p=request.min_p, min_new_tokens=request.min_tokens or None,
                eos_ids=ends + request.stop_token_ids if request.min_tokens else None,
                suppress_ids=ends if request.ignore_eos else None,
                stop_token_ids=request.stop_token_ids or None, stop_as=ends[0] if request.stop_token_ids and ends else None)
        except ValueError as e:
            raise RequestError(str(e)) from None


class StopMatcher:
    """Passes the answer on as it grows, holding back text that may be the start of a stop
    sequence; ends the answer (returns True to Session.ask) at a stop sequence or a cancel."""

    def __init__(self, stops: tuple[str, ...], job: Job):
        self.stops, self.job = stops, job
        self.text = ""
        self.sent = 0
        self.hit = False

    def push(self, piece: str) -> bool:
        if self.job.cancelled.is_set():
            self.job.pieces_after_cancel += 1
            return True
        self.text += piece
        if self.stops:
            found = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
            if found:
                self.text, self.hit = self.text[: min(found)], True
                self._send(len(self.text))
                return True
            held = max((k for s in self.stops for k in range(1, min(len(s), len(self.text) + 1))
                        if self.text.endswith(s[:k])), default=0)
            self._send(len(self.text) - held)
        else:
            self._send(len(self.text))
        return False

    def finish(self) -> str:
        self._send(len(self.text))
        return self.text

    def _send(self, end: int) -> None:
        if end > self.sent and self.job.request.stream:
            self.job.send("text", self.text[self.sent : end])
        self.sent = max(self.sent, end)
