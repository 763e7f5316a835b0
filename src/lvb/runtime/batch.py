"""Continuous batching: several conversations decode in one step.

A decode step reads every weight of the model once; on the BM1684X that read, not the
arithmetic, is the step's time. Nets exported with `--batch` take B rows, one token of each
of B conversations, so one read serves B answers. `Batch` holds one Runner, whose KV caches
and cross-attention K/V have a slot per conversation, and a Session per slot. A conversation
is prefilled alone (its chunks into its own slot, as `Session.ask` does), one chunk per
`prefill` call so that a server can decode the running answers between two of them; then its
answer joins the running ones: `step` decodes one token of every running answer at once, and an
answer that ends leaves at that step. Each row keeps its own position, masks, picture (or
none), sampler and stop conditions, so a greedy answer is the one the conversation gets alone.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from lvb.runtime.engine import Engine
from lvb.runtime.pipeline import Answer, Checkpoint, Prefill, Reply, Session
from lvb.runtime.runner import ChatError, Row, Runner
from lvb.runtime.sampling import SamplingConfig


class Batch:
    def __init__(self, checkpoint: Checkpoint, engine: Engine, system: str | None = None,
                 today: datetime | None = None, first: Session | None = None):
        """`first`: a session to be slot 0 (its runner, settings and conversation are kept)."""
        tokenizer = checkpoint.tokenizer
        self.runner = first.runner if first else Runner(checkpoint.spec, engine, tokenizer.image_id, tokenizer.pad_id or 0)
        if first is not None and first.draft is not None and self.runner.slots > 1:
            # The draft proposes for one conversation and its verify pass is a prefill, not a batched step.
            raise ChatError(f"--draft takes one conversation at a time, and the model's nets decode {self.runner.slots} "
                            "at once (`lvb export --batch`); serve it without --draft for continuous batching, or "
                            "with --draft from an export with --batch 1")
        if first is not None:
            system, today, truncate = first.system, first.today, first.truncate_history
        else:
            today, truncate = today or datetime.now(), False
        self.sessions = [first] if first else []
        self.sessions += [Session(checkpoint, engine, truncate, system=system, today=today, runner=self.runner, slot=slot)
                          for slot in range(len(self.sessions), self.runner.slots)]
        self.answers: dict[int, Answer] = {}  # running answers by slot
        self.prefills: dict[int, Prefill] = {}  # turns being prefilled by slot

    @property
    def slots(self) -> int:
        return self.runner.slots

    def free_slot(self) -> int | None:
        """The lowest slot without a running answer or a turn being prefilled (a low slot keeps the
        step's batch stage small)."""
        return next((slot for slot in range(self.slots) if slot not in self.answers and slot not in self.prefills), None)

    def begin(self, slot: int, text: str, image=None, sampling: SamplingConfig | None = None,
              max_new_tokens: int | None = None, on_text: Callable[[str], bool | None] | None = None) -> Answer:
        """`prepare` and `prefill` to the end: the answer, which runs with the others from the next
        `step` unless it has already ended."""
        self.prepare(slot, text, image, sampling, max_new_tokens, on_text)
        while (answer := self.prefill(slot)) is None:
            pass
        return answer

    def prepare(self, slot: int, text: str, image=None, sampling: SamplingConfig | None = None,
                max_new_tokens: int | None = None, on_text: Callable[[str], bool | None] | None = None) -> Prefill:
        """One turn of the conversation in `slot` prepared (Session.prepare: rendered, its picture
        encoded into the slot, the cached prefix kept); `prefill` runs its chunks."""
        if slot in self.answers or slot in self.prefills:
            raise ValueError(f"slot {slot} is answering already")
        prefill = self.prefills[slot] = self.sessions[slot].prepare(text, image, sampling, max_new_tokens, on_text)
        return prefill

    def prefill(self, slot: int) -> Answer | None:
        """One chunk of the turn prepared in `slot`; after its last, the first token taken, the
        answer, which runs with the others from the next `step` unless it has already ended. A
        chunk that fails ends the turn (its slot is free)."""
        try:
            answer = self.prefills[slot].step()
        except BaseException:
            del self.prefills[slot]
            raise
        if answer is None:
            return None
        del self.prefills[slot]
        if answer.stop_reason is None:
            self.answers[slot] = answer
        return answer

    def drop(self, slot: int) -> None:
        """Give up the turn being prefilled in `slot` (its client has gone): the slot is free. Its
        cache keeps the chunks prefilled so far, and Session.cached names them."""
        del self.prefills[slot]

    def step(self) -> dict[int, Reply]:
        """One token of every running answer, in one batched pass (with a draft, the tokens of one
        verify pass); the replies of the answers that ended, by slot (their slots are free again)."""
        if not self.answers:
            return {}
        if self.sessions[0].draft is not None:  # the one conversation: a verify pass of its draft's proposals
            return {0: self.finish(0)} if self.sessions[0].advance(self.answers[0]) else {}
        slots = sorted(self.answers)
        sessions = [self.sessions[s] for s in slots]
        answers = [self.answers[s] for s in slots]
        rows = [Row(s, a.token, len(session.cached), session._tiles()) for s, a, session in zip(slots, answers, sessions)]
        hidden = self.runner.decode_rows(rows)
        for session, answer in zip(sessions, answers):
            session.cached.append(answer.token)
        tokens = self.runner.next_tokens(hidden, rows, [a.sampler for a in answers], [a.history for a in answers])
        ended = {}
        for slot, answer, token in zip(slots, answers, tokens):
            if answer.push(token):
                ended[slot] = self.finish(slot)
        return ended

    def finish(self, slot: int, reason: str | None = None) -> Reply:
        """End the answer in `slot` now (`reason`: why, when it is cut short, e.g. a client gone)."""
        return self.answers.pop(slot).end(reason)
