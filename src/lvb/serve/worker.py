"""One engine, many clients: a single thread owns the engine and answers requests in
arrival order from a bounded queue.

Continuous batching: an engine whose decode nets take B rows (`lvb export --batch`) holds B
conversations, one per cache slot (lvb.runtime.batch). A request takes a free slot as soon as
there is one and comes in piece by piece, as vLLM's chunked prefill does: first its turn is
prepared (its history restored into the slot, the chat rendered, its picture through the vision
tower, the cached prefix kept), then its prompt is prefilled one chunk at a time (the runner's
chunk sizes, the smallest that holds the rest); the running answers take a decode step after
each piece, and after its last chunk it takes its first token and joins them. One newcomer comes
in at a time, so a running answer stalls between two steps for at most one piece: a prefill
chunk, or one picture's vision tower, which is not split (`lvb_decode_stall_seconds` measures
it). An answer that ends, or whose client has gone (before or after its first token), leaves
at the next step, and a chunk that fails fails only its own request. With B = 1 this is one
request at a time, and with a draft (`lvb serve --draft`, B = 1 only) each step is a verify
pass of its proposals.

Each slot's KV cache outlives requests. A request whose earlier turns are the conversation a
free slot last answered (same pictures) continues it there, so only its new turn is prefilled;
any other request restores its own history into a slot, which keeps whatever cached tokens
still agree (Session.restore) and prefills the rest.
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
from lvb.runtime.batch import Batch
from lvb.runtime.pipeline import Answer, Reply, Session
from lvb.runtime.sampling import SamplingConfig
from lvb.runtime.speculative import DraftStats
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
    draft: DraftStats | None = None  # with --draft: what it proposed and the model kept

    def timings(self) -> dict:
        """The server's own figures, as llama.cpp's server sends them (`timings`), for the page."""
        prefilled = self.prompt_tokens - self.cached_tokens
        timings = {"cache_n": self.cached_tokens, "prompt_n": prefilled, "prompt_ms": round(self.first_token_seconds * 1000, 2),
                   "predicted_n": self.completion_tokens, "predicted_ms": round(self.decode_seconds * 1000, 2),
                   "predicted_per_second": round(self.tokens_per_second, 2)}
        if self.draft is not None:
            timings |= {"draft_n": self.draft.proposed, "draft_n_accepted": self.draft.accepted}
        return timings


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


@dataclass
class Slot:
    """What a slot's session holds besides its text: each message's picture digest (None when
    the state is not known to match a request, after an error), and the picture whose K/V the
    slot holds."""

    digests: list[str | None] | None = field(default_factory=list)
    image_digest: str | None = None


@dataclass
class Running:
    """A request being answered in a slot."""

    job: Job
    stops: StopMatcher
    digests: list[str | None]
    turn: object  # the request's last turn
    continued: bool
    started: float  # when the engine took it
    engine_started: float  # when its turn started (its history restored)
    answer: Answer | None = None  # None while its prompt is prefilled


@dataclass
class Newcomer:
    """A request taken from the queue on its way to the running answers: its slot, and once its
    turn is prepared (Batch.prepare), what it runs as."""

    job: Job
    slot: int
    running: Running | None = None


class Worker:
    def __init__(self, session: Session, max_queue: int = 16):
        self.session, self.max_queue = session, max_queue
        self.batch = Batch(session.checkpoint, session.engine, first=session)
        self.metrics = Metrics(speculative=session.draft is not None)
        self.slots = [Slot() for _ in range(self.batch.slots)]
        self.running: dict[int, Running] = {}
        self.newcomer: Newcomer | None = None  # the request coming in, a piece between two steps
        self.pending = 0  # queued + running
        self.admitting = 0  # taken from the queue, not yet running (the newcomer)
        self.served = self.cancelled = self.failed = 0
        self.last_job: Job | None = None
        self.last_result: Result | None = None
        self.busy = threading.Lock()  # held while the engine works (a newcomer's piece or a step)
        self._count = threading.Lock()
        self._durations: deque[float] = deque(maxlen=20)
        self._tokens: deque[tuple[float, int]] = deque()  # (when, tokens) of recent steps, for tokens/s
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="lvb-engine", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests the engine holds: running answers and the one coming in."""
        return len(self.running) + self.admitting

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds."""
        now = time.perf_counter()
        with self._count:
            while self._tokens and self._tokens[0][0] < now - window:
                self._tokens.popleft()
            return sum(n for _, n in self._tokens) / window

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when max_queue requests already wait besides the running ones."""
        with self._count:
            if self.pending >= self.max_queue + max(1, self.in_flight):
                average = sum(self._durations) / len(self._durations) if self._durations else 1.0
                raise QueueFull(max(1, math.ceil(average * self.pending / self.batch.slots)))
            self.pending += 1
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        log.info("engine thread %d ready", threading.get_native_id())  # for per-thread CPU accounting (bench)
        closing = False
        last_step = None  # when the running answers last took a step
        while True:
            job = None
            # One newcomer at a time, and one piece of it between two steps: the running answers' stall bound.
            wanted = self.newcomer is None and not closing and len(self.running) < self.batch.slots
            if wanted and not self.running:
                job = self._jobs.get()  # idle: wait for work
                closing = job is None
            elif wanted:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    job = None
                else:
                    closing = job is None  # close(): finish the running answers and the newcomer, then stop
            if job is not None:
                self._take(job)
            if self.newcomer is not None:
                with self.busy:
                    started = time.perf_counter()
                    self._admit()
                    self._engine_time(started)
            if self.running:
                with self.busy:
                    started = time.perf_counter()
                    if last_step is not None:
                        with self.metrics.lock:
                            self.metrics.stall.observe(started - last_step)
                    self._step()
                    last_step = time.perf_counter()
                    self._engine_time(started)
            else:
                last_step = None  # nobody waits for a step
                if closing and self.newcomer is None:
                    return

    def _engine_time(self, started: float) -> None:
        with self.metrics.lock:
            self.metrics.engine_seconds += time.perf_counter() - started

    def _choose(self, job: Job) -> int:
        """A free slot, the one whose conversation the request continues if any (its cache is reused)."""
        free = [i for i in range(self.batch.slots) if i not in self.running]
        request = job.request
        digests = [t.digest for t in request.turns[:-1]]
        messages = [t.message() for t in request.turns[:-1]]
        for i in free:
            if self.slots[i].digests == digests and self.batch.sessions[i].messages == messages:
                return i
        return free[0]

    def _take(self, job: Job) -> None:
        """The next request off the queue becomes the newcomer."""
        with self._count:
            self.admitting += 1
        self.metrics.queue_time.observe(time.perf_counter() - job.queued_at)
        self.last_job = job
        self.newcomer = Newcomer(job, self._choose(job))

    def _leave(self) -> Newcomer:
        """The newcomer is no longer coming in (it runs, ended, failed or was cancelled)."""
        newcomer, self.newcomer = self.newcomer, None
        with self._count:
            self.admitting -= 1
        return newcomer

    def _admit(self) -> None:
        """One piece of the newcomer: its turn prepared (a picture's vision tower, when it brings
        one, is the piece; otherwise its first chunk follows), or one prefill chunk of it; after
        its last, it takes its first token and runs with the others."""
        job, slot = self.newcomer.job, self.newcomer.slot
        if job.cancelled.is_set():
            prefilling = self.newcomer.running is not None
            if prefilling:
                self.batch.drop(slot)
            self.cancelled += 1
            self.metrics.count("cancelled")
            log.info("%s: the client left while %s; slot %d freed", job.id,
                     "its prompt was prefilled" if prefilling else "queued", slot)
            self._leave()
            self._done(job)
            return
        try:
            if self.newcomer.running is None:
                self.newcomer.running = self._start(job, slot)
                if self.batch.prefills[slot].launches:  # its picture went through the vision tower
                    return
            answer = self.batch.prefill(slot)
        except Exception as e:
            self._leave()
            self._done(job)
            self._fail(job, slot, e)
            return
        if answer is None:
            return
        running = self._leave().running
        running.answer = answer
        if answer.stop_reason is None:
            self.running[slot] = running
        else:
            self._finish(slot, running, answer.end())

    def _step(self) -> None:
        """One decode step of every running answer; answers whose client left end first."""
        for slot, running in list(self.running.items()):
            if running.job.cancelled.is_set():
                self._finish(slot, self.running.pop(slot), self.batch.finish(slot, "stopped"))
        if not self.running:
            return
        answers = [running.answer for running in self.running.values()]
        before = sum(len(a.generated) for a in answers)  # a verify pass yields one token or several
        try:
            ended = self.batch.step()
        except Exception as e:
            for slot, running in list(self.running.items()):
                self.batch.answers.pop(slot, None)
                self._done(running.job)
                self._fail(running.job, slot, e)
            self.running.clear()
            return
        with self._count:
            self._tokens.append((time.perf_counter(), sum(len(a.generated) for a in answers) - before))
        for slot, reply in ended.items():
            self._finish(slot, self.running.pop(slot), reply)

    def _fail(self, job: Job, slot: int, e: Exception) -> None:
        if isinstance(e, RequestError):
            self.metrics.count("refused")
            job.send("error", (e.status, str(e)))
        elif isinstance(e, EngineError):
            self._forget(slot)
            self.failed += 1
            self.metrics.count("failed")
            log.error("%s: engine error: %s", job.id, e)
            job.send("error", (500, f"engine error: {e}"))
        elif isinstance(e, LvbError):  # too long for the sequence, a picture the processor refuses, a template error
            self.metrics.count("refused")
            job.send("error", (400, self._fix(str(e))))
        else:  # a bug; the server goes on with a fresh conversation state
            self._forget(slot)
            self.failed += 1
            self.metrics.count("failed")
            log.error("%s: internal error", job.id, exc_info=e)
            job.send("error", (500, f"internal error: {type(e).__name__}: {e}"))

    def _done(self, job: Job) -> None:
        """The job leaves the count; before its reply goes out, so a client that asks /metrics or
        /health right after its answer never finds it still waiting."""
        ended = time.perf_counter()
        with self._count:
            self.pending -= 1
            self._durations.append(ended - job.queued_at)
        with self.metrics.lock:
            self.metrics.e2e.observe(ended - job.queued_at)

    def _fix(self, message: str) -> str:
        """Session speaks to `lvb chat`'s user: say what lvb serve offers instead."""
        if message.endswith("start a new chat or allow history truncation"):
            return message.removesuffix("allow history truncation") + "start lvb serve with --history truncate"
        return message

    def _forget(self, slot: int) -> None:
        """After a failure mid-turn the slot's cache may hold half-written state: start afresh."""
        self.batch.sessions[slot].reset()
        self.slots[slot] = Slot()

    def _start(self, job: Job, slot: int) -> Running:
        """The request's history restored into the slot and its turn prepared (Batch.prepare):
        what it runs as once its prompt is prefilled."""
        request, session, state = job.request, self.batch.sessions[slot], self.slots[slot]
        started = time.perf_counter()
        history, turn = request.turns[:-1], request.turns[-1]
        messages = [t.message() for t in history]
        digests = [t.digest for t in history]
        continued = state.digests == digests and session.messages == messages
        if not continued:
            pictured = [i for i, t in enumerate(history) if t.digest is not None]
            if len(pictured) > 1:  # one picture in play at a time: the newest stands for all of them
                log.info("%s: rebuilding a conversation of %d pictures with the newest one only", job.id, len(pictured))
            last = pictured[-1] if pictured else None
            # The same picture already holds the cross-attention K/V: hand the session its own copy.
            same = last is not None and digests[last] == state.image_digest and session.image is not None
            image = session.image if same else history[last].image if last is not None else None
            session.restore(messages, image=image, image_turn=last)
            state.digests, state.image_digest = digests, digests[last] if last is not None else None
        sampling = self._sampling(request)
        state.digests = None  # unknown until the turn completes
        stops = StopMatcher(request.stop, job)
        engine_started = time.perf_counter()
        self.batch.prepare(slot, turn.text, image=turn.image, sampling=sampling, max_new_tokens=request.max_tokens,
                           on_text=stops.push)
        if turn.digest is not None:  # the slot holds the turn's picture now, even if the turn goes no further
            state.image_digest = turn.digest
        return Running(job, stops, digests, turn, continued, started, engine_started)

    def _finish(self, slot: int, running: Running, reply: Reply) -> None:
        job, session, state = running.job, self.batch.sessions[slot], self.slots[slot]
        engine_seconds = time.perf_counter() - running.engine_started
        stops, turn, digests = running.stops, running.turn, running.digests
        text = stops.finish()
        if text != reply.text:  # cut at a stop sequence: the conversation holds what the client got
            session.messages[-1] = {"role": "assistant", "content": [{"type": "text", "text": text}]}
        state.digests = digests + [turn.digest, None]
        if turn.digest is not None:
            state.image_digest = turn.digest
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
            if s.speculative is not None:
                m.add_draft(s.speculative)
        request = job.request
        notices = list(reply.notices)
        if request.dropped:
            notices.insert(0, f"left out the {request.dropped} oldest exchange(s), too long for the {session.seq}-token "
                              "sequence")
        log.info("%s: %s, slot %d, prompt %d tokens (%d prefilled), %d generated, first token %.0f ms, %.1f tokens/s, %s",
                 job.id, "continued" if running.continued else "restored", slot, s.prompt_tokens, s.prefilled_tokens,
                 s.generated_tokens, s.first_token_seconds * 1000, s.tokens_per_second, reply.stop_reason)
        finish = "stop" if stops.hit else FINISH_REASONS[reply.stop_reason]
        result = Result(text, finish, s.prompt_tokens, s.prompt_tokens - s.prefilled_tokens, s.generated_tokens,
                        s.first_token_seconds, s.tokens_per_second, engine_seconds, s.decode_seconds, notices, s.speculative)
        self.last_result = result
        self._done(job)
        job.send("done", result)

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
