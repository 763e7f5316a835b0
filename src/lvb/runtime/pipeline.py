"""Multi-turn image chat over any Engine: preprocessing, chat template, masks,
KV bookkeeping, sampling, streaming detokenization and timing.

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

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lvb.contract import NetSpec, block_name, plan
from lvb.errors import LvbError
from lvb.runtime.engine import Engine, Resident
from lvb.runtime.image import ImageProcessorConfig, ProcessedImage, load_image, preprocess
from lvb.runtime.masks import cross_attention_mask, self_attention_mask
from lvb.runtime.memory import resident_buffers
from lvb.runtime.sampling import Sampler, SamplingConfig
from lvb.runtime.text import ChatTemplate, Tokenizer
from lvb.spec import ModelSpec


class ChatError(LvbError):
    """A turn that cannot be answered (too long, bad image, wrong bmodel); the session goes on."""


@dataclass(frozen=True)
class Checkpoint:
    """What the runtime reads from a checkpoint folder: no weights, only the small files."""

    directory: Path
    spec: ModelSpec
    template: ChatTemplate
    tokenizer: Tokenizer
    image_config: ImageProcessorConfig
    generation_config: dict

    @classmethod
    def load(cls, directory: str | Path) -> Checkpoint:
        directory = Path(directory)
        spec = ModelSpec.from_dir(directory)
        image_config = None
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            path = directory / name
            if path.is_file():
                data = json.loads(path.read_text())
                data = data.get(key) if key else data
                if data:
                    image_config = ImageProcessorConfig.from_dict(data)
                    break
        if image_config is None:
            raise ChatError(f"{directory}: no preprocessor_config.json; copy it from the original checkpoint")
        generation_path = directory / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls(directory, spec, ChatTemplate.from_dir(directory), Tokenizer.from_dir(directory), image_config, generation)


@dataclass
class Stats:
    prompt_tokens: int = 0  # the whole rendered conversation
    prefilled_tokens: int = 0  # of which computed in this turn (the rest came from the cache)
    generated_tokens: int = 0
    first_token_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


@dataclass
class Reply:
    text: str
    tokens: list[int]
    stats: Stats
    stop_reason: str  # "stop token", "max new tokens", "sequence full"
    notices: list[str] = field(default_factory=list)


def discover_shapes(engine: Engine) -> tuple[int, int]:
    """(seq, chunk) the engine's nets were built for."""
    try:
        chunk = engine.nets["embed"].inputs[0].shape[1]
        decode = next(n for name, n in engine.nets.items() if name.startswith("block_cache_")
                      and any(t.name == "past_k" for t in n.inputs))
        seq = next(t for t in decode.inputs if t.name == "past_k").shape[1]
    except (KeyError, StopIteration, IndexError) as e:
        raise ChatError("the model file lacks lvb's nets (embed, block_cache_*); build it with `lvb compile`") from e
    return seq, chunk


def check_contract(engine: Engine, nets: list[NetSpec]) -> None:
    """The engine must hold every net of this checkpoint's contract, with its input shapes."""
    for net in nets:
        found = engine.nets.get(net.name)
        if found is None:
            raise ChatError(f"the model file has no net {net.name}: it was built for another checkpoint")
        have = {t.name: t.shape for t in found.inputs}
        for tensor in net.inputs:
            if have.get(tensor.name) != tensor.shape:
                raise ChatError(
                    f"net {net.name} input {tensor.name} is {list(have.get(tensor.name) or [])}, this checkpoint needs "
                    f"{list(tensor.shape)}: the model file was built for another checkpoint or sequence length"
                )


class Session:
    def __init__(self, checkpoint: Checkpoint, engine: Engine, truncate_history: bool = False):
        self.checkpoint, self.engine, self.truncate_history = checkpoint, engine, truncate_history
        self.spec = checkpoint.spec
        self.seq, self.chunk = discover_shapes(engine)
        self.nets = {n.name: n for n in plan(self.spec, self.seq, self.chunk)}
        check_contract(engine, list(self.nets.values()))
        text = self.spec.text
        self.self_layers = text.self_attention_layers
        self.cross_layers = text.cross_attention_layers
        self._allocate()
        self.reset()

    def _allocate(self) -> None:
        # Hidden states ping-pong between two buffers (hidden, hidden_b; vision, vision_b): a net
        # never writes the buffer it reads, so a device backend binds both instead of copying the
        # output back after every layer. What every layer of a step reads has a buffer of its own.
        for buffer in resident_buffers(self.nets):
            self.engine.allocate(buffer.name, buffer.shape, buffer.dtype)
        self._uploaded: dict[str, np.ndarray] = {}

    def _upload(self, buffer: str, array: np.ndarray) -> Resident:
        """The buffer holding `array`, uploaded only when it differs from what it holds: the
        cross-attention masks stay the same for a whole answer."""
        last = self._uploaded.get(buffer)
        if last is None or last.shape != array.shape or not np.array_equal(last, array):
            self.engine.upload(buffer, array)
            self._uploaded[buffer] = np.array(array, copy=True)
        return Resident(buffer)

    @staticmethod
    def _other(current: str, pair: tuple[str, str]) -> str:
        return pair[1] if current == pair[0] else pair[0]

    def reset(self) -> None:
        """Forget the conversation (the buffers stay allocated)."""
        self.messages: list[dict] = []
        self.cached: list[int] = []  # token ids whose K/V fill cache slots 0..len-1
        self.image: ProcessedImage | None = None
        self.image_turn: int | None = None  # index in self.messages of the turn that brought it

    # -- the turn --------------------------------------------------------------

    def ask(
        self,
        text: str,
        image=None,
        sampling: SamplingConfig | None = None,
        max_new_tokens: int | None = None,
        on_text: Callable[[str], None] | None = None,
    ) -> Reply:
        """Answer one user turn. `image` is a path or a PIL image. Raises ChatError and
        leaves the conversation as it was when the turn cannot be answered."""
        started = time.perf_counter()
        new_image = self._process_image(image) if image is not None else None
        content = ([{"type": "image"}] if new_image else []) + [{"type": "text", "text": text}]
        image_turn = len(self.messages) if new_image else self.image_turn
        messages, image_turn, ids, notices = self._fit(self.messages + [{"role": "user", "content": content}], image_turn)
        sampler = Sampler(sampling or SamplingConfig())

        # Cached K/V were computed with or without an image in play; transformers runs the
        # cross-attention layers for every token once a chat has an image, so a change either
        # way invalidates the whole cache.
        image = (new_image or self.image) if image_turn is not None else None
        keep = 0
        if (image is None) == (self.image is None):
            while keep < min(len(self.cached), len(ids) - 1) and self.cached[keep] == ids[keep]:
                keep += 1
        if new_image is not None:
            self._run_vision(new_image)
        self.image, self.image_turn = image, image_turn
        self.cached = self.cached[:keep]
        stats = Stats(prompt_tokens=len(ids), prefilled_tokens=len(ids) - keep)
        token = self._prefill(ids, keep, sampler)
        stats.first_token_seconds = time.perf_counter() - started

        generated = [token]
        stream = self.checkpoint.tokenizer.stream()
        pieces: list[str] = []

        def emit(piece: str) -> None:
            if piece:
                pieces.append(piece)
                if on_text:
                    on_text(piece)

        stop_reason = "max new tokens"
        decode_started = time.perf_counter()
        limit = max_new_tokens or self.seq
        while True:
            if token in self.checkpoint.tokenizer.stop_ids:
                stop_reason = "stop token"
                break
            emit(stream.push(token))
            if len(generated) >= limit:
                break
            if len(self.cached) >= self.seq:
                stop_reason = "sequence full"
                notices.append(f"stopped: the {self.seq}-token sequence is full")
                break
            token = self._decode(token, ids + generated, sampler)
            generated.append(token)
        emit(stream.flush())
        stats.decode_seconds = time.perf_counter() - decode_started
        stats.generated_tokens = len(generated)
        reply = "".join(pieces)
        self.messages = messages + [{"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        return Reply(reply, generated, stats, stop_reason, notices)

    def _process_image(self, image) -> ProcessedImage:
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
            prompt = self.checkpoint.template.render(messages, add_generation_prompt=True)
            ids = self.checkpoint.tokenizer.encode_prompt(prompt)
            if len(ids) < self.seq:  # one slot is left for the answer's first token
                break
            only_the_new_turn = len(messages) - system <= 1
            if only_the_new_turn or not self.truncate_history:
                fix = ("shorten it or compile with a larger --seq" if only_the_new_turn
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

    # -- nets --------------------------------------------------------------------

    def _run_vision(self, image: ProcessedImage) -> None:
        """The vision tower, layer by layer, then the image's cross-attention K/V for every
        cross-attention layer, once per image."""
        v = self.spec.vision
        ids = image.aspect_ratio_ids.astype(np.int32)
        tiles = image.aspect_ratio_mask.astype(np.int32)
        self.engine.run("vision_embed", {"pixel_values": image.pixel_values.astype(np.float32), "aspect_ratio_ids": ids},
                        store={0: Resident("vision")})
        pair = ("vision", "vision_b")
        current = "vision"
        for j in range(v.num_layers):
            # The layers the head reads later keep their outputs in buffers of their own.
            target = f"vision_layer_{j}" if j in v.kept_layers else self._other(current, pair)
            self.engine.run(f"vision_layer_{j}", {"hidden_states": Resident(current), "aspect_ratio_mask": tiles},
                            store={0: Resident(target)})
            current = target
        target = self._other(current, pair)
        self.engine.run("vision_post", {"hidden_states": Resident(current), "aspect_ratio_ids": ids},
                        store={0: Resident(target)})
        current = target
        for j in range(v.num_global_layers):
            target = self._other(current, pair)
            self.engine.run(f"vision_global_{j}", {"hidden_states": Resident(current), "aspect_ratio_mask": tiles},
                            store={0: Resident(target)})
            current = target
        head = {"hidden_states": Resident(current)} | {f"layer_{j}": Resident(f"vision_layer_{j}") for j in v.kept_layers}
        self.engine.run("vision_head", head, store={0: Resident("cross_states")})
        for layer in self.cross_layers:
            self.engine.run(f"cross_kv_{layer}", {"cross_states": Resident("cross_states")},
                            store={0: Resident(f"ck{layer}"), 1: Resident(f"cv{layer}")})

    def _sees_image(self, ids: Sequence[int], positions: range) -> np.ndarray:
        image_positions = [i for i, t in enumerate(ids) if t == self.checkpoint.tokenizer.image_id]
        first = image_positions[0] if image_positions else len(ids) + self.seq
        return np.array([p >= first for p in positions], dtype=bool)

    def _cross_masks(self, sees: np.ndarray):
        v = self.spec.vision
        return cross_attention_mask(sees, self.image.num_tiles, v.max_num_tiles, v.patches_per_tile)

    def _layers(self, hidden: str, past: int, count: int, width: int, sees: np.ndarray) -> str:
        """Run every layer on `count` tokens at positions past.. (padded to `width`), starting
        from the hidden states in `hidden`; returns the buffer that holds the last layer's."""
        decode = width == 1
        pair = (hidden, f"{hidden}_b")
        positions = self._upload(f"position_ids_{width}", (past + np.arange(width, dtype=np.int32))[None])
        mask = self._upload(f"attention_mask_{width}", self_attention_mask(past, width, self.seq))
        cross_mask = row_mask = None
        if self.image is not None and self.cross_layers:
            masks = self._cross_masks(np.concatenate([sees, np.repeat(sees[-1:], width - len(sees))]))
            cross_mask = self._upload(f"cross_attention_mask_{width}", masks[0])
            row_mask = self._upload(f"text_row_mask_{width}", masks[1])
        current = hidden
        for layer in range(self.spec.text.num_layers):
            name = block_name(layer, decode)
            target = self._other(current, pair)
            if layer in self.cross_layers:
                if self.image is None:
                    continue  # no image in the conversation: transformers skips these layers too
                feeds = {"hidden_states": Resident(current), "cross_k": Resident(f"ck{layer}"),
                         "cross_v": Resident(f"cv{layer}"), "cross_attention_mask": cross_mask, "text_row_mask": row_mask}
                self.engine.run(name, feeds, store={0: Resident(target)})
            else:
                feeds = {"hidden_states": Resident(current), "position_ids": positions, "attention_mask": mask,
                         "past_k": Resident(f"k{layer}"), "past_v": Resident(f"v{layer}")}
                self.engine.run(name, feeds, store={
                    0: Resident(target), 1: Resident(f"k{layer}", past, count), 2: Resident(f"v{layer}", past, count)})
            current = target
        return current

    def _next_token(self, hidden: Resident, sampler: Sampler, history: Sequence[int]) -> int:
        if self.engine.logits_on_host:
            return sampler(self.engine.run("lm_head", {"hidden_states": hidden})[0][0], history)
        self.engine.run("lm_head", {"hidden_states": hidden}, store={0: Resident("logits")})
        config = sampler.config
        if not config.do_sample and config.repetition_penalty == 1.0:
            return int(np.asarray(self.engine.run("greedy_head", {"logits": Resident("logits")})[0]).ravel()[0])
        return sampler(self.engine.read("logits")[0], history)

    def _prefill(self, ids: list[int], start: int, sampler: Sampler) -> int:
        pad = self.checkpoint.tokenizer.pad_id or 0
        position = start
        count = 0
        while position < len(ids):
            count = min(self.chunk, len(ids) - position)
            chunk_ids = np.full((1, self.chunk), pad, dtype=np.int32)
            chunk_ids[0, :count] = ids[position : position + count]
            self.engine.run("embed", {"input_ids": chunk_ids}, store={0: Resident("hidden")})
            last = self._layers("hidden", position, count, self.chunk,
                                self._sees_image(ids, range(position, position + count)))
            self.cached += ids[position : position + count]
            position += count
        return self._next_token(Resident(last, count - 1, 1), sampler, ids)

    def _decode(self, token: int, history: list[int], sampler: Sampler) -> int:
        position = len(self.cached)
        self.engine.run("embed_cache", {"input_ids": np.array([[token]], dtype=np.int32)}, store={0: Resident("hidden1")})
        last = self._layers("hidden1", position, 1, 1, np.array([self.image is not None]))
        self.cached.append(token)
        return self._next_token(Resident(last), sampler, history)
