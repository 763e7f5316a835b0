"""Multi-turn image chat over any Engine: preprocessing, chat template, which
tokens the cache holds, sampling, streaming detokenization and timing. Running
the nets (masks, buffers, their order) is lvb.runtime.runner's.

The KV cache lives in the engine for the whole conversation. A new turn is
rendered with the checkpoint's own template and tokenized; the tokens that
agree with what the cache already holds are kept and only the rest is
prefilled, in chunks, against the cache. When rendering changes earlier text
(an image arriving after text-only turns removes the template's system block)
the cache is simply kept up to the first difference.

One image is in play at a time. Its cross-attention K/V come from the vision
tower's output kept in the engine. A new image replaces it for the tokens
that follow, as transformers' mask does; tokens before the first image attend
uniformly (transformers' quirk, reproduced) to that image's tokens.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from lvb.runtime.engine import Engine
from lvb.runtime.image import ImageProcessorConfig, ProcessedImage, load_image, preprocess
from lvb.runtime.runner import ChatError, Runner
from lvb.runtime.sampling import Sampler, SamplingConfig, softmax
from lvb.runtime.speculative import DEFAULT_DRAFT_TOKENS, Draft, DraftStats, accept_greedy, accept_sampled
from lvb.spec import ModelSpec
from lvb.text import ChatTemplate, Tokenizer, read_json_object

__all__ = ["Answer", "ChatError", "Checkpoint", "Prefill", "Reply", "Session", "Stats"]


@dataclass(frozen=True)
class Checkpoint:
    """What the runtime reads from a checkpoint folder: no weights, only the small files."""

    directory: Path
    spec: ModelSpec
    template: ChatTemplate
    tokenizer: Tokenizer
    image_config: ImageProcessorConfig | None  # None for a text model
    generation_config: dict

    @classmethod
    def load(cls, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        spec = ModelSpec.from_dir(directory)
        image_config = None if spec.text_only else read_image_config(directory, spec)
        generation = read_json_object(directory / "generation_config.json") or {}
        return cls(directory, spec, ChatTemplate.from_dir(directory), Tokenizer.from_dir(directory), image_config, generation)


def read_image_config(directory: Path, spec: ModelSpec) -> ImageProcessorConfig:
    """The image processor settings where transformers 5 looks first (the nested
    "image_processor" of processor_config.json, then preprocessor_config.json), refused when
    the two files disagree (each library would then preprocess differently) or when the
    tile size or tile count is not the one the vision tower in config.json was built for."""
    found = {}
    nested = (read_json_object(directory / "processor_config.json") or {}).get("image_processor")
    if isinstance(nested, dict):
        found["processor_config.json"] = ImageProcessorConfig.from_dict(nested)
    legacy = read_json_object(directory / "preprocessor_config.json")
    if legacy is not None:
        found["preprocessor_config.json"] = ImageProcessorConfig.from_dict(legacy)
    if not found:
        raise ChatError(f"{directory}: no preprocessor_config.json; copy it from the original checkpoint")
    (first, config), *others = found.items()
    for name, other in others:
        if other != config:
            differ = ", ".join(f"{k} {getattr(config, k)} vs {getattr(other, k)}"
                               for k in vars(config) if getattr(config, k) != getattr(other, k))
            raise ChatError(f"{directory}: {first} and {name} describe different image preprocessing ({differ}); "
                            f"transformers uses {first}: make both the same or delete {name}")
    v = spec.vision
    for setting, got, expected in (("tile size", config.tile_size, v.image_size),
                                   ("max_image_tiles", config.max_num_tiles, v.max_num_tiles)):
        if got != expected:
            raise ChatError(f"{directory / first}: {setting} {got}, but config.json's vision tower expects {expected}; "
                            "the processor config comes from another checkpoint: copy the matching one")
    return config


@dataclass
class Stats:
    prompt_tokens: int = 0  # the whole rendered conversation
    prefilled_tokens: int = 0  # of which computed in this turn (the rest came from the cache)
    generated_tokens: int = 0
    first_token_seconds: float = 0.0
    decode_seconds: float = 0.0
    # The nets launched, (net, stage) -> calls: up to the first token (picture, prefill, head)
    # and for the rest of the answer.
    first_token_launches: Counter = field(default_factory=Counter)
    decode_launches: Counter = field(default_factory=Counter)
    speculative: DraftStats | None = None  # with a draft: what it proposed and the model kept

    @property
    def tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class Reply:
    text: str
    tokens: list[int]
    stats: Stats
    stop_reason: str  # "stop token", "max new tokens", "sequence full", "stopped" (by on_text)
    notices: list[str] = field(default_factory=list)


def _same_image(a: ProcessedImage | None, b: ProcessedImage | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (np.array_equal(a.pixel_values, b.pixel_values) and np.array_equal(a.aspect_ratio_ids, b.aspect_ratio_ids)
                      and np.array_equal(a.aspect_ratio_mask, b.aspect_ratio_mask))


class Answer:
    """An answer being generated: its tokens so far, the text streamed out, and whether it has
    ended (and why). `Session.ask` runs one to the end; `lvb.runtime.batch` steps several at once."""

    def __init__(self, session: Session, messages: list[dict], ids: list[int], sampler: Sampler, limit: int,
                 on_text: Callable[[str], bool | None] | None, stats: Stats, notices: list[str]):
        self.session, self.messages, self.ids, self.sampler, self.limit = session, messages, ids, sampler, limit
        self.on_text, self.stats, self.notices = on_text, stats, notices
        self.generated: list[int] = []
        self.stream = session.checkpoint.tokenizer.stream()
        self.pieces: list[str] = []
        self.stop_reason: str | None = None
        self.decode_started = time.perf_counter()
        self.launched = Counter(session.runner.launches)

    @property
    def token(self) -> int:
        return self.generated[-1]

    @property
    def history(self) -> list[int]:
        return self.ids + self.generated

    def _emit(self, piece: str) -> bool:
        """Pass a piece on; True when the caller wants no more."""
        if not piece:
            return False
        self.pieces.append(piece)
        return bool(self.on_text and self.on_text(piece))

    def push(self, token: int, pending: int = 0) -> bool:
        """Take the next token; True when the answer has ended (a stop token, the caller, the
        token limit or a full sequence). `pending`: tokens a verify pass produced after this one,
        which need no cache row more (speculative decoding)."""
        self.generated.append(token)
        tokenizer, session = self.session.checkpoint.tokenizer, self.session
        if token in tokenizer.stop_ids:
            self.stop_reason = "stop token"
        elif self._emit(self.stream.push(token)):
            self.stop_reason = "stopped"
        elif len(self.generated) >= self.limit:
            self.stop_reason = "max new tokens"
        elif len(session.cached) >= session.seq and not pending:
            self.stop_reason = "sequence full"
            self.notices.append(f"stopped: the {session.seq}-token sequence is full")
        return self.stop_reason is not None

    def end(self, reason: str | None = None) -> Reply:
        """The reply (`reason`: the answer is cut short from outside, e.g. "stopped"), and the
        conversation grown by it."""
        self.stop_reason = reason or self.stop_reason or "stopped"
        if self.stop_reason != "stopped":
            self._emit(self.stream.flush())
        stats, runner = self.stats, self.session.runner
        stats.decode_seconds = time.perf_counter() - self.decode_started
        stats.decode_launches = runner.launches - self.launched
        stats.generated_tokens = len(self.generated)
        reply = "".join(self.pieces)
        self.session.messages = self.messages + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        return Reply(reply, self.generated, stats, self.stop_reason, self.notices)


class Prefill:
    """A turn's prompt on its way into the conversation's cache slot, one chunk per `step`
    (Runner.prefill_chunk: the smallest compiled chunk that holds the rest, the largest while
    more remains). The step that prefills the last chunk takes the next token and returns
    `then(token)` (Session.prepare: the answer); the others return None. `run` takes the steps
    back to back; a server decodes its running answers between two of them
    (lvb.serve.worker), so they wait for one chunk, not for a whole prompt."""

    def __init__(self, session: Session, ids: list[int], start: int, sampler: Sampler,
                 then: Callable[[int], object], launched: Counter | None = None):
        """`launched`: what the turn launched before its first chunk (its picture's vision tower)."""
        self.session, self.ids, self.position, self.sampler, self.then = session, ids, start, sampler, then
        self.launches = Counter(launched or {})  # this turn's launches so far, not those of other conversations

    @property
    def remaining(self) -> int:
        """Tokens still to prefill."""
        return len(self.ids) - self.position

    def step(self):
        """One chunk into the cache; after the last, `then(token)`."""
        session, runner = self.session, self.session.runner
        before = Counter(runner.launches)
        hidden, count = runner.prefill_chunk(self.ids, self.position, session._tiles(), session.slot)
        self.position += count
        session.cached = self.ids[: self.position]  # what the slot holds, should the turn stop here
        token = runner.next_token(hidden, self.sampler, self.ids) if not self.remaining else None
        self.launches += runner.launches - before
        return None if token is None else self.then(token)

    def run(self):
        """Every chunk left, back to back: `then(token)`."""
        while (result := self.step()) is None:
            pass
        return result


class Session:
    def __init__(self, checkpoint: Checkpoint, engine: Engine, truncate_history: bool = False,
                 system: str | None = None, today: datetime | None = None, runner: Runner | None = None,
                 slot: int = 0, draft: tuple[Checkpoint, Engine] | None = None,
                 draft_tokens: int | None = None):
        """`system`: a system message heading every chat. `today`: the date the chat template
        sees (strftime_now), pinned when the session starts so that a chat going on past
        midnight keeps its prompt, and its cache. `runner` and `slot`: a runner shared by the
        conversations of a decode batch, and this conversation's cache slot in it. `draft`: a
        Llama text checkpoint and its engine that propose `draft_tokens` tokens for each pass of
        this model (lvb.runtime.speculative; by default what the model was built to check in one
        launch of its heads, `lvb export --draft-tokens`, else DEFAULT_DRAFT_TOKENS); one
        conversation at a time."""
        self.checkpoint, self.engine, self.truncate_history = checkpoint, engine, truncate_history
        self.system, self.today = system, today or datetime.now()
        self.spec = checkpoint.spec
        self.runner = runner or Runner(self.spec, engine, checkpoint.tokenizer.image_id, checkpoint.tokenizer.pad_id or 0)
        self.slot = slot
        self.seq, self.chunks = self.runner.seq, self.runner.chunks
        self.draft = None
        if draft is not None and (runner is not None or slot):
            raise ChatError("--draft takes one conversation at a time; it does not join a decode batch")
        if draft_tokens is None:
            draft_tokens = self.runner.check_rows - 1 if self.runner.check_rows else DEFAULT_DRAFT_TOKENS
        if draft is not None:
            if not 1 <= draft_tokens < max(self.chunks):
                raise ChatError(f"--draft-tokens {draft_tokens}: the model checks the draft's tokens and one of its own "
                                f"in one prefill chunk of at most {max(self.chunks)}; use 1 to {max(self.chunks) - 1}")
            self.draft = Draft(draft[0].spec, draft[1], draft[0].tokenizer, checkpoint.tokenizer, self.spec,
                               name=f"the draft {draft[0].directory.name}")
        self.draft_tokens = draft_tokens
        self.reset()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        """Close the engines: the model's, and the draft's."""
        if self.draft is not None:
            self.draft.engine.close()
        self.engine.close()

    def reset(self) -> None:
        """Forget the conversation (the buffers stay allocated)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cached: list[int] = []  # token ids whose K/V fill cache slots 0..len-1
        self.image: ProcessedImage | None = None
        self.image_turn: int | None = None  # index in self.messages of the turn that brought it
        self._unencoded = False  # the image's K/V are not in the slot yet (restore)
        if self.draft is not None:
            self.draft.reset()

    def restore(self, messages: list[dict], image=None, image_turn: int | None = None) -> None:
        """Take `messages` (in the form `messages` holds) as the conversation so far, with `image`
        (a path, PIL image or ProcessedImage) brought by message `image_turn`, without computing
        anything yet: the next `ask` keeps the cached tokens that still agree and prefills the rest.
        A server calls this when a request's history is not the conversation last answered."""
        image = self._process_image(image) if image is not None else None
        if not _same_image(image, self.image):
            # Every cached token attended to the old picture (or to none): none of them stays. The
            # new one goes through the vision tower with the next turn, unless that turn brings a
            # picture of its own, which replaces it for every token then prefilled.
            self.cached = []
            self._unencoded = image is not None
        self.messages = list(messages)
        self.image, self.image_turn = image, image_turn if image is not None else None

    # -- the turn --------------------------------------------------------------

    def ask(
        self,
        text: str,
        image=None,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        on_text: Callable[[str], bool | None] | None = None,
    ) -> Reply:
        """Answer one user turn. `image` is a path or a PIL image. `on_text` gets the answer
        piece by piece and may return True to end it there (stop reason "stopped"). Raises
        ChatError and leaves the conversation as it was when the turn cannot be answered.
        `max_new_tokens` None: until a stop token or a full sequence."""
        answer = self.prepare(text, image, sampling, max_new_tokens, on_text).run()
        while answer.stop_reason is None:
            self.advance(answer)
        return answer.end()

    def advance(self, answer: Answer) -> bool:
        """One decode step of `answer`, or with a draft one verify pass: its token(s) pushed, those
        after the answer's end dropped. True when the answer has ended."""
        out = self._step(answer.token, answer.history, answer.sampler, answer.limit - len(answer.generated),
                         answer.stats.speculative)
        for i, token in enumerate(out):
            if answer.push(token, pending=len(out) - 1 - i):
                return True
        return False

    def prepare(
        self,
        text: str,
        image=None,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        on_text: Callable[[str], bool | None] | None = None,
    ) -> Prefill:
        """`ask` up to the prompt's prefill: the chat rendered, the turn's picture through the
        vision tower into this conversation's cross-attention K/V (in one go: the tower is not
        split), the cached tokens that still agree kept. Its steps prefill the rest, a chunk each,
        and the last returns the answer. Raises ChatError as `ask` does."""
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ChatError(f"max_new_tokens {max_new_tokens} is out of range: it must be 1 or more")
        started = time.perf_counter()
        launched = Counter(self.runner.launches)
        new_image = self._process_image(image) if image is not None else None
        content = ([{"type": "image"}] if new_image else []) + [{"type": "text", "text": text}]
        image_turn = len(self.messages) if new_image else self.image_turn
        messages, image_turn, ids, notices = self._fit(self.messages + [{"role": "user", "content": content}], image_turn)
        if new_image is not None:
            notices = [*new_image.notes, *notices]
        sampler = Sampler(sampling or SamplingConfig())
        self._draft_sampler: Sampler | None = None

        # Cached K/V were computed with or without an image in play; transformers runs the
        # cross-attention layers for every token once a chat has an image, so a change either
        # way invalidates the whole cache.
        image = (new_image or self.image) if image_turn is not None else None
        keep = 0
        if (image is None) == (self.image is None):
            while keep < min(len(self.cached), len(ids) - 1) and self.cached[keep] == ids[keep]:
                keep += 1
        if new_image is not None or (self._unencoded and image is not None):
            self.runner.encode_image(image, self.slot)
        self._unencoded = False
        self.image, self.image_turn = image, image_turn
        self.cached = self.cached[:keep]
        stats = Stats(prompt_tokens=len(ids), prefilled_tokens=len(ids) - keep)

        def first(token: int) -> Answer:
            stats.first_token_seconds = time.perf_counter() - started
            stats.first_token_launches = prefill.launches
            answer = Answer(self, messages, ids, sampler, self.seq if max_new_tokens is None else max_new_tokens,
                            on_text, stats, notices)
            if self.draft is not None:
                stats.speculative = DraftStats()
            answer.push(token)
            return answer

        prefill = Prefill(self, ids, keep, sampler, first, self.runner.launches - launched)
        return prefill

    def _process_image(self, image) -> ProcessedImage:
        if self.spec.text_only:
            raise ChatError(f"{self.checkpoint.directory.name} is a text model (no vision tower); ask without an image")
        if isinstance(image, ProcessedImage):
            return image
        if not hasattr(image, "mode"):
            image = load_image(image)
        return preprocess(image, self.checkpoint.image_config)

    def _fit(self, messages: list[dict], image_turn: int | None):
        """Render the chat; when it does not fit and truncation is allowed, drop whole
        exchanges from the oldest on (never part of a turn, never the new turn)."""
        notices: list[str] = []
        dropped = 0
        system = 1 if messages[0]["role"] == "system" else 0
        while True:
            ids = self.checkpoint.tokenizer.encode_chat(self.checkpoint.template, messages, now=self.today)
            if len(ids) < self.seq:  # one slot is left for the answer's first token
                break
            only_the_new_turn = len(messages) - system <= 1
            if only_the_new_turn and dropped and self.image_turn is not None and image_turn is None:
                raise ChatError(
                    f"the chat outgrew the {self.seq}-token sequence, and dropping the exchange that holds the picture "
                    f"leaves a text-only prompt of {len(ids)} tokens (without a picture the chat template adds its system "
                    "block); start a new chat and send the picture with this question, or export with a larger --seq")
            if only_the_new_turn or not self.truncate_history:
                larger = ("export again with a larger --seq" if self.engine.backend == "onnxruntime"
                          else "export and compile again with a larger --seq")
                fix = (f"shorten it or {larger}" if only_the_new_turn
                       else "start a new chat or allow history truncation")
                raise ChatError(
                    f"the {'prompt' if only_the_new_turn else 'conversation'} is {len(ids)} tokens and the model "
                    f"holds {self.seq}, with one more needed to answer; {fix}"
                )
            exchange = 2 if messages[system + 1]["role"] == "assistant" and len(messages) - system > 2 else 1
            if image_turn is not None:
                image_turn = image_turn - exchange if image_turn >= system + exchange else None
            messages = messages[:system] + messages[system + exchange :]
            dropped += 1
        if dropped:
            lost_image = image_turn is None and self.image_turn is not None
            notices.append(f"dropped the {dropped} oldest exchange(s) to fit the {self.seq}-token sequence"
                           + (", and with them the image" if lost_image else ""))
        return messages, image_turn, ids, notices

    # -- tokens into the cache ------------------------------------------------------

    def _tiles(self) -> int | None:
        return self.image.num_tiles if self.image is not None else None

    def _prefill(self, ids: list[int], start: int, sampler: Sampler) -> int:
        """ids[start:] into the cache, to the end: the next token (bench/host_overhead.py times a
        chunk's host work through it)."""
        return Prefill(self, ids, start, sampler, then=lambda token: token).run()

    def _step(self, token: int, history: list[int], sampler: Sampler, room: int, stats: DraftStats | None) -> list[int]:
        """The next token(s) after `token` (history's last, not in the cache yet): one decode step,
        or with a draft, one verify pass over its proposals (at most `room` tokens)."""
        k = 0
        if self.draft is not None:
            k = min(self.draft_tokens, room - 1, self.seq - len(self.cached) - 1, self.draft.room(history))
        if k < 1:
            return [self._decode(token, history, sampler)]
        sampled = sampler.config.do_sample
        if sampled and self._draft_sampler is None:
            self._draft_sampler = Sampler(sampler.config)
        drafts, dists = self.draft.propose(history, k, self._draft_sampler if sampled else None)
        hiddens = self.runner.verify(history + drafts, len(self.cached), self._tiles())
        if sampled:
            logits = self.runner.check_logits(hiddens)

            def target(i: int) -> np.ndarray:
                return softmax(sampler.process(logits(i), history + drafts[:i]))

            out = accept_sampled(drafts, dists, target, sampler._rng, sampler.draw)
            stop = sampler.config.stop_token_ids
            out = [sampler.config.stop_as if t in stop else t for t in out]
        else:
            out = accept_greedy(drafts, self.runner.check_tokens(hiddens, sampler, [history + drafts[:i] for i in range(k + 1)]))
        accepted = len(out) - 1
        # The K/V rows of the rejected proposals stay in both caches, past the position every
        # later pass's mask ends at: forgetting them is counting them out.
        self.cached = history + drafts[:accepted]
        self.draft.keep(self.cached)
        stats.proposed += k
        stats.accepted += accepted
        stats.verify_steps += 1
        stats.tokens += len(out)
        return out

    def _decode(self, token: int, history: list[int], sampler: Sampler) -> int:
        hidden = self.runner.decode(token, len(self.cached), self._tiles(), self.slot)
        self.cached.append(token)
        return self.runner.next_token(hidden, sampler, history)
