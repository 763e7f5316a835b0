"""The nets of the contract, run in order on an Engine: the vision tower and an
image's cross-attention K/V, prefill chunks, decode steps and the next token.

The runner owns the resident buffers the nets share: each self-attention
layer's KV cache (S slots), each cross-attention layer's K/V of the image in
play, the vision tower's hidden states, the hidden states of a chunk and of one
token, and the logits. It knows nothing of chats: `Session` (lvb.runtime.pipeline)
keeps the conversation and the tokens the cache holds, and calls it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lvb.contract import Kind, Names, NetInfo, NetSpec, batch_for, block_name, chunk_for, net_name, plan
from lvb.errors import LvbError
from lvb.masks import cross_attention_mask, self_attention_mask
from lvb.runtime.engine import Engine, Resident
from lvb.runtime.image import ProcessedImage
from lvb.runtime.memory import Buffers, resident_buffers
from lvb.runtime.sampling import Sampler
from lvb.spec import ModelSpec


class ChatError(LvbError):
    """A turn that cannot be answered (too long, bad image, wrong bmodel); the session goes on."""


@dataclass(frozen=True)
class Row:
    """One conversation's token in a batched decode step: its cache slot, the token, the
    position it takes, and the real tiles of its picture (None: a chat without one)."""

    slot: int
    token: int
    position: int
    tiles: int | None


def discover_shapes(engine: Engine) -> tuple[int, tuple[int, ...], tuple[int, ...], int]:
    """(seq, prefill chunk sizes largest first, decode batch sizes largest first, rows of a
    speculative check the heads score at once or 0) the engine's nets were built for."""
    try:
        embed = engine.nets[net_name(Kind.EMBED)]
        chunks = tuple(inputs[0].shape[1] for inputs in (embed.inputs, *embed.smaller))
        embed1 = engine.nets[net_name(Kind.EMBED_CACHE)]
        batch = tuple(inputs[0].shape[0] for inputs in (embed1.inputs, *embed1.smaller))
        seq = next(t.shape[1] for net in engine.nets.values() for t in net.inputs if t.name == Names.PAST_K)
        head = engine.nets[net_name(Kind.LM_HEAD)]
        verify = max((inputs[0].shape[1] for inputs in (head.inputs, *head.smaller) if inputs[0].shape[0] == 1), default=1)
    except (KeyError, StopIteration, IndexError) as e:
        raise ChatError("the model file lacks lvb's nets (embed, block_cache_*); build it with `lvb compile`") from e
    return seq, chunks, batch, verify if verify > 1 else 0


def check_contract(engine: Engine, nets: list[NetSpec]) -> None:
    """The engine must hold every net of this checkpoint's contract, with its input shapes."""
    for net in nets:
        found = engine.nets.get(net.name)
        if found is None:
            present = sum(n.name in engine.nets for n in nets)
            raise ChatError(
                f"the model file lacks {len(nets) - present} of this checkpoint's {len(nets)} nets ({net.name} first): "
                + ("it was built for another checkpoint" if present < len(nets) // 2 else
                   "it comes from an unfinished export or compile, or another checkpoint")
                + "; run `lvb export` (and `lvb compile`) for this checkpoint again")
        for stage, inputs in zip(net.stages, (found.inputs, *found.smaller)):
            have = {t.name: t.shape for t in inputs}
            for tensor in stage.inputs:
                if have.get(tensor.name) != tensor.shape:
                    raise ChatError(
                        f"net {net.name} input {tensor.name} is {list(have.get(tensor.name) or [])}, this checkpoint needs "
                        f"{list(tensor.shape)}: the model file was built for another checkpoint or sequence length"
                    )


def declared(net: NetSpec, found: NetInfo) -> NetSpec:
    """The contract's net with the dtypes the engine's net declares: a bmodel's state is bf16
    where it was compiled so (contract.device_dtype), an ONNX net's float32. Inputs match by
    name, outputs by position (a bmodel renames its outputs)."""
    inputs = {t.name: t.dtype for t in found.inputs}

    def stage(s: NetSpec) -> NetSpec:
        return replace(s, inputs=tuple(replace(t, dtype=inputs.get(t.name, t.dtype)) for t in s.inputs),
                       outputs=tuple(replace(t, dtype=o.dtype) for t, o in zip(s.outputs, found.outputs)))

    return replace(stage(net), smaller=tuple(stage(s) for s in net.smaller))


class Runner:
    def __init__(self, spec: ModelSpec, engine: Engine, image_token_id: int, pad_id: int = 0):
        self.spec, self.engine = spec, engine
        self.image_token_id, self.pad_id = image_token_id, pad_id
        self.seq, self.chunks, self.batch, self.check_rows = discover_shapes(engine)
        # Conversations the buffers hold (KV cache and cross K/V slots on axis 0).
        self.slots = max(self.batch)
        if self.slots > 1 and engine.backend == "sail":
            raise ChatError(f"the model file decodes batches of up to {self.slots} conversations (--batch), which the "
                            "sail backend does not run yet; compile an export made with --batch 1 for the card, or use "
                            "the simulator or onnxruntime")
        nets = plan(spec, self.seq, self.chunks, self.batch, self.check_rows)
        check_contract(engine, nets)
        self.nets = {n.name: declared(n, engine.nets[n.name]) for n in nets}
        # What this runner launched, (net, stage) -> calls; stage 0 is a net's largest. The
        # device-time model (lvb.runtime.turn) prices a turn from the same sequence.
        self.launches: Counter[tuple[str, int]] = Counter()
        self._allocate()

    def _run(self, net: str, feeds, store=None, stage: int = 0):
        self.launches[net, stage] += 1
        return self.engine.run(net, feeds, store)

    def _allocate(self) -> None:
        # Hidden states ping-pong between two buffers (hidden, hidden_b; vision, vision_b): a net
        # never writes the buffer it reads, so a device backend binds both instead of copying the
        # output back after every layer. What every layer of a step reads has a buffer of its own.
        # Each buffer takes the dtype its nets declare: bf16 state on a bmodel, float32 on ONNX.
        for buffer in resident_buffers(self.nets):
            self.engine.allocate(buffer.name, buffer.shape, buffer.dtype)
        self._uploaded: dict[str, np.ndarray] = {}
        # The slots whose cross V are zeros (a chat without a picture in a batch with pictures).
        self._blank_cross: set[int] = set()

    def _in(self, buffer: str, slot: int, start: int = 0, count: int | None = None) -> Resident:
        """One conversation's part of a buffer (all of it when the buffers hold one)."""
        if self.slots == 1:
            return Resident(buffer, start, count)
        return Resident(buffer, start, count, slot=slot, slots=1)

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

    def encode_image(self, image: ProcessedImage, slot: int = 0) -> None:
        """The vision tower, layer by layer, then the image's cross-attention K/V for every
        cross-attention layer, once per image, into the conversation's `slot`."""
        self._blank_cross.discard(slot)
        v, n, b, run = self.spec.vision, Names, Buffers, self._run
        ids = image.aspect_ratio_ids.astype(np.int32)
        tiles = image.aspect_ratio_mask.astype(np.int32)
        run(net_name(Kind.VISION_EMBED), {n.PIXEL_VALUES: image.pixel_values.astype(np.float32), n.ASPECT_RATIO_IDS: ids},
            store={0: Resident(b.VISION)})
        pair = (b.VISION, b.VISION_B)
        current = b.VISION
        for j in range(v.num_layers):
            # The layers the head reads later keep their outputs in buffers of their own.
            target = b.kept(j) if j in v.kept_layers else self._other(current, pair)
            run(net_name(Kind.VISION_LAYER, j), {n.HIDDEN: Resident(current), n.ASPECT_RATIO_MASK: tiles},
                store={0: Resident(target)})
            current = target
        target = self._other(current, pair)
        run(net_name(Kind.VISION_POST), {n.HIDDEN: Resident(current), n.ASPECT_RATIO_IDS: ids}, store={0: Resident(target)})
        current = target
        for j in range(v.num_global_layers):
            target = self._other(current, pair)
            run(net_name(Kind.VISION_GLOBAL, j), {n.HIDDEN: Resident(current), n.ASPECT_RATIO_MASK: tiles},
                store={0: Resident(target)})
            current = target
        head = {n.HIDDEN: Resident(current)} | {n.kept_layer(j): Resident(b.kept(j)) for j in v.kept_layers}
        run(net_name(Kind.VISION_HEAD), head, store={0: Resident(b.CROSS_STATES)})
        for layer in self.spec.text.cross_attention_layers:
            cross_k, cross_v = b.cross_kv(layer)
            run(net_name(Kind.CROSS_KV, layer), {n.CROSS_STATES: Resident(b.CROSS_STATES)},
                store={0: self._in(cross_k, slot), 1: self._in(cross_v, slot)})

    def sees_image(self, ids: Sequence[int], positions: range) -> np.ndarray:
        """Which of `positions` come at or after the first image token of `ids`."""
        image_positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        first = image_positions[0] if image_positions else len(ids) + self.seq
        return np.array([p >= first for p in positions], dtype=bool)

    def _layers(self, hidden: tuple[str, str], past: int, count: int, width: int, sees: np.ndarray,
                tiles: int | None, stage: int = 0, slot: int = 0) -> str:
        """Run every layer on `count` tokens at positions past.. (padded to `width`), from the
        hidden states in hidden[0], ping-ponging with hidden[1]; `tiles`: the real tiles of the
        image in play, None without one; `stage`: the blocks' stage of that width. Returns the
        buffer holding the last layer's output."""
        n, b, vision = Names, Buffers, self.spec.vision
        decode = width == 1
        positions = self._upload(b.step(n.POSITION_IDS, width), (past + np.arange(width, dtype=np.int32))[None])
        mask = self._upload(b.step(n.ATTENTION_MASK, width), self_attention_mask(past, width, self.seq))
        cross_layers = self.spec.text.cross_attention_layers
        cross_mask = row_mask = None
        if tiles is not None and cross_layers:
            padded = np.concatenate([sees, np.repeat(sees[-1:], width - len(sees))])
            masks = cross_attention_mask(padded, tiles, vision.max_num_tiles, vision.patches_per_tile)
            cross_mask = self._upload(b.step(n.CROSS_MASK, width), masks[0])
            row_mask = self._upload(b.step(n.TEXT_ROW_MASK, width), masks[1])
        current = hidden[0]
        for layer in range(self.spec.text.num_layers):
            name = block_name(layer, decode)
            if layer in cross_layers:
                if tiles is None:
                    continue  # no image in the conversation: transformers skips these layers too
                target = self._other(current, hidden)
                k, v = b.cross_kv(layer)
                feeds = {n.HIDDEN: Resident(current, 0, width), n.CROSS_K: self._in(k, slot), n.CROSS_V: self._in(v, slot),
                         n.CROSS_MASK: cross_mask, n.TEXT_ROW_MASK: row_mask}
                self._run(name, feeds, {0: Resident(target)}, stage)
            else:
                target = self._other(current, hidden)
                k, v = b.kv(layer)
                feeds = {n.HIDDEN: Resident(current, 0, width), n.POSITION_IDS: positions, n.ATTENTION_MASK: mask,
                         n.PAST_K: self._in(k, slot), n.PAST_V: self._in(v, slot)}
                self._run(name, feeds, {0: Resident(target), 1: self._in(k, slot, past, count),
                                        2: self._in(v, slot, past, count)}, stage)
            current = target
        return current

    def prefill(self, ids: Sequence[int], start: int, tiles: int | None, slot: int = 0) -> Resident:
        """ids[start:] into cache positions start.. of conversation `slot`, chunk after chunk
        (prefill_chunk); the last token's hidden state."""
        position = start
        while True:
            hidden, count = self.prefill_chunk(ids, position, tiles, slot)
            position += count
            if position == len(ids):
                return hidden

    def prefill_chunk(self, ids: Sequence[int], position: int, tiles: int | None, slot: int = 0) -> tuple[Resident, int]:
        """The next chunk of ids[position:] into cache positions position.. of conversation `slot`:
        the smallest compiled chunk that holds the rest (the largest while more remains). (The
        hidden state of its last token, its tokens.) A chunk leaves nothing for the next but its
        K/V rows in the slot's cache, so a batch's running answers may decode between two chunks
        of a newcomer's prompt."""
        last, count = self._chunk(ids, position, tiles, slot)
        return Resident(last, count - 1, 1), count

    def verify(self, ids: Sequence[int], start: int, tiles: int | None) -> list[Resident]:
        """ids[start:] (at most the largest chunk) into cache slots start.. in one pass, as a
        prefill chunk: the hidden state of every one of them (speculative decoding's check of a
        draft's tokens). Slots past those a caller keeps are never read again: every later
        pass's mask stops at its own position."""
        if not 0 < len(ids) - start <= max(self.chunks):
            raise ValueError(f"verify takes 1 to {max(self.chunks)} tokens, got {len(ids) - start}")
        last, count = self._chunk(ids, start, tiles)
        return [Resident(last, i, 1) for i in range(count)]

    def _chunk(self, ids: Sequence[int], position: int, tiles: int | None, slot: int = 0) -> tuple[str, int]:
        """(the buffer holding the chunk's hidden states, the chunk's real tokens)."""
        if not 0 <= position < len(ids):
            raise ValueError(f"nothing to prefill: position {position} of {len(ids)} tokens")
        width = chunk_for(len(ids) - position, self.chunks)
        count = min(width, len(ids) - position)
        chunk_ids = np.full((1, width), self.pad_id, dtype=np.int32)
        chunk_ids[0, :count] = ids[position : position + count]
        stage = self.chunks.index(width)
        self._run(net_name(Kind.EMBED), {Names.INPUT_IDS: chunk_ids}, {0: Resident(Buffers.HIDDEN)}, stage)
        last = self._layers((Buffers.HIDDEN, Buffers.HIDDEN_B), position, count, width,
                            self.sees_image(ids, range(position, position + count)), tiles, stage, slot)
        return last, count

    def decode(self, token: int, position: int, tiles: int | None, slot: int = 0) -> Resident:
        """One token into cache position `position` of conversation `slot`; its hidden state."""
        if self.slots == 1:
            self._run(net_name(Kind.EMBED_CACHE), {Names.INPUT_IDS: np.array([[token]], dtype=np.int32)},
                      {0: Resident(Buffers.HIDDEN1)})
            last = self._layers((Buffers.HIDDEN1, Buffers.HIDDEN1_B), position, 1, 1, np.array([tiles is not None]), tiles)
            return Resident(last)
        hidden = self.decode_rows([Row(slot, token, position, tiles)])
        return Resident(hidden.buffer, slot=slot, slots=1)

    def decode_rows(self, rows: Sequence[Row]) -> Resident:
        """One token of each of several conversations in one batched step (the smallest batch
        stage that holds the highest slot); the hidden states of the stage's slots (a slot no
        row names computes a throwaway row and keeps its cache as it was)."""
        n, b, vision = Names, Buffers, self.spec.vision
        by_slot = {row.slot: row for row in rows}
        if len(by_slot) != len(rows) or not rows or min(by_slot) < 0 or max(by_slot) >= self.slots:
            raise ValueError(f"rows {[r.slot for r in rows]}: one row per slot, slots 0..{self.slots - 1}")
        B = batch_for(max(by_slot) + 1, self.batch)
        stage = self.batch.index(B)
        slots = [by_slot.get(s) for s in range(B)]
        # Only a batched engine's buffers have slots; a one-conversation engine runs as `decode` always has.
        def part(buffer: str) -> Resident:
            return Resident(buffer, slots=B) if self.slots > 1 else Resident(buffer)

        ids = np.array([[r.token if r else self.pad_id] for r in slots], dtype=np.int32)
        self._run(net_name(Kind.EMBED_CACHE), {n.INPUT_IDS: ids}, {0: part(b.HIDDEN1)}, stage)
        pasts = [r.position if r else 0 for r in slots]
        positions = self._upload(b.step(n.POSITION_IDS, 1, B), np.array(pasts, dtype=np.int32)[:, None])
        mask = self._upload(b.step(n.ATTENTION_MASK, 1, B),
                            np.concatenate([self_attention_mask(p, 1, self.seq) for p in pasts]))
        starts = tuple(r.position if r else None for r in slots)
        cross_layers = self.spec.text.cross_attention_layers
        # No row with a picture: the cross-attention layers are skipped, as for one conversation.
        pictures = any(r is not None and r.tiles is not None for r in slots) and cross_layers
        if pictures:
            cross, row_masks = [], []
            for slot, r in enumerate(slots):
                if r is None or r.tiles is None:
                    # Without a picture the row's cross-attention must add nothing: zero V makes the
                    # attention's output zero (no bias), a text-row mask of 0 the MLP's. A free
                    # slot's row is thrown away: its K/V stay for the conversation's next turn.
                    if r is not None:
                        self._blank(slot)
                    cross.append(np.zeros((1, 1, 1, vision.tokens_per_image), np.float32))
                    row_masks.append(np.zeros((1, 1, 1, 1), np.float32))
                else:
                    masks = cross_attention_mask(np.array([True]), r.tiles, vision.max_num_tiles, vision.patches_per_tile)
                    cross.append(masks[0])
                    row_masks.append(masks[1])
            cross_mask = self._upload(b.step(n.CROSS_MASK, 1, B), np.concatenate(cross))
            row_mask = self._upload(b.step(n.TEXT_ROW_MASK, 1, B), np.concatenate(row_masks))
        pair = (b.HIDDEN1, b.HIDDEN1_B)
        current = pair[0]
        for layer in range(self.spec.text.num_layers):
            name = block_name(layer, decode=True)
            target = self._other(current, pair)
            if layer in cross_layers:
                if not pictures:
                    continue
                k, v = b.cross_kv(layer)
                feeds = {n.HIDDEN: part(current), n.CROSS_K: part(k), n.CROSS_V: part(v),
                         n.CROSS_MASK: cross_mask, n.TEXT_ROW_MASK: row_mask}
                self._run(name, feeds, {0: part(target)}, stage)
            else:
                k, v = b.kv(layer)
                feeds = {n.HIDDEN: part(current), n.POSITION_IDS: positions, n.ATTENTION_MASK: mask,
                         n.PAST_K: part(k), n.PAST_V: part(v)}
                if self.slots == 1:
                    new_k, new_v = Resident(k, pasts[0], 1), Resident(v, pasts[0], 1)
                else:
                    new_k, new_v = (Resident(x, count=1, slots=B, starts=starts) for x in (k, v))
                self._run(name, feeds, {0: part(target), 1: new_k, 2: new_v}, stage)
            current = target
        return part(current)

    def _blank(self, slot: int) -> None:
        """Zero the cross K/V of a conversation without a picture, once."""
        if slot in self._blank_cross:
            return
        for layer in self.spec.text.cross_attention_layers:
            for buffer in Buffers.cross_kv(layer):
                shape = self.nets[block_name(layer, decode=True)].inputs[1].shape
                self.engine.upload(buffer, np.zeros((1, *shape[1:]), np.float32), slot)
        self._blank_cross.add(slot)

    def _head_stage(self, kind: Kind, rows: tuple[int, ...]) -> int:
        """The stage of a head whose first input's leading axes are `rows`: [B, R] hidden states
        for the LM head, [B * R] logits for the greedy head."""
        return [s.inputs[0].shape[: len(rows)] for s in self.nets[net_name(kind)].stages].index(rows)

    def next_tokens(self, hidden: Resident, rows: Sequence[Row], samplers: Sequence[Sampler],
                    histories: Sequence[Sequence[int]]) -> list[int]:
        """The next token of each row of a batched step (`hidden` from decode_rows), each with
        its own sampler."""
        B = hidden.slots or 1
        stage, pick = self._head_stage(Kind.LM_HEAD, (B, 1)), self._head_stage(Kind.GREEDY_HEAD, (B,))
        lm_head, feeds = net_name(Kind.LM_HEAD), {Names.HIDDEN: hidden}
        if self.engine.logits_on_host:
            logits = self._run(lm_head, feeds, stage=stage)[0]
        else:
            target = Resident(Buffers.LOGITS, slots=B) if self.slots > 1 else Resident(Buffers.LOGITS)
            self._run(lm_head, feeds, {0: target}, stage)
            if not any(s.config.needs_logits for s in samplers):
                greedy = np.asarray(self._run(net_name(Kind.GREEDY_HEAD), {Names.LOGITS: target}, stage=pick)[0])
                return [int(greedy.reshape(B, -1)[r.slot, 0]) for r in rows]
            logits = self.engine.read(Buffers.LOGITS)
        return [sampler(logits[r.slot], history) for r, sampler, history in zip(rows, samplers, histories)]

    def logits(self, hidden: Resident) -> np.ndarray:
        """The LM head's logits of one hidden state, on the host."""
        lm_head, feeds = net_name(Kind.LM_HEAD), {Names.HIDDEN: hidden}
        stage = self._head_stage(Kind.LM_HEAD, (1, 1))
        if self.engine.logits_on_host:
            return np.asarray(self._run(lm_head, feeds, stage=stage)[0][0])
        self._run(lm_head, feeds, {0: Resident(Buffers.LOGITS)}, stage)
        return self.engine.read(Buffers.LOGITS)[0]

    def next_token(self, hidden: Resident, sampler: Sampler, history: Sequence[int]) -> int:
        lm_head, feeds = net_name(Kind.LM_HEAD), {Names.HIDDEN: hidden}
        stage = self._head_stage(Kind.LM_HEAD, (1, 1))
        if self.engine.logits_on_host:
            return sampler(self._run(lm_head, feeds, stage=stage)[0][0], history)
        self._run(lm_head, feeds, {0: Resident(Buffers.LOGITS)}, stage)
        config = sampler.config
        if not config.needs_logits:
            greedy = self._run(net_name(Kind.GREEDY_HEAD), {Names.LOGITS: Resident(Buffers.LOGITS)},
                               stage=self._head_stage(Kind.GREEDY_HEAD, (1,)))
            return int(np.asarray(greedy[0]).ravel()[0])
        return sampler(self.engine.read(Buffers.LOGITS)[0], history)

    def _scores_at_once(self, hiddens: Sequence[Resident]) -> bool:
        """Whether the heads have a stage for a check's rows (`lvb export --draft-tokens`): the
        rows `verify` returned lie at the start of one buffer, which that stage reads as they lie."""
        return 0 < len(hiddens) <= self.check_rows

    def _check_logits(self, hiddens: Sequence[Resident], read: bool = True) -> np.ndarray | None:
        """The logits after each of a check's hidden states, in one launch of the LM head; on a
        device left in their buffer unless `read`."""
        lm_head, feeds = net_name(Kind.LM_HEAD), {Names.HIDDEN: Resident(hiddens[0].buffer, 0, self.check_rows)}
        stage = self._head_stage(Kind.LM_HEAD, (1, self.check_rows))
        if self.engine.logits_on_host:
            return np.asarray(self._run(lm_head, feeds, stage=stage)[0])[: len(hiddens)]
        self._run(lm_head, feeds, {0: Resident(Buffers.CHECK_LOGITS)}, stage)
        return self.engine.read(Buffers.CHECK_LOGITS)[: len(hiddens)] if read else None

    def check_logits(self, hiddens: Sequence[Resident]) -> Callable[[int], np.ndarray]:
        """logits(i): the LM head's logits after the i-th of a check's hidden states (`verify`'s),
        on the host. All rows in one launch when the heads have a stage for them, else each row
        when it is asked for (a check stops at its first rejection)."""
        if not self._scores_at_once(hiddens):
            return lambda i: self.logits(hiddens[i])
        return self._check_logits(hiddens).__getitem__

    def check_tokens(self, hiddens: Sequence[Resident], sampler: Sampler,
                     histories: Sequence[Sequence[int]]) -> Callable[[int], int]:
        """pick(i): the next token after the i-th of a check's hidden states, `histories[i]`
        before it; one launch of each head for all rows when they have a stage for them, else
        each row's when it is asked for."""
        if not self._scores_at_once(hiddens):
            return lambda i: self.next_token(hiddens[i], sampler, histories[i])
        if self.engine.logits_on_host or sampler.config.needs_logits:
            logits = self._check_logits(hiddens)
            return lambda i: sampler(logits[i], histories[i])
        self._check_logits(hiddens, read=False)
        greedy = self._run(net_name(Kind.GREEDY_HEAD), {Names.LOGITS: Resident(Buffers.CHECK_LOGITS)},
                           stage=self._head_stage(Kind.GREEDY_HEAD, (self.check_rows,)))
        tokens = [int(t) for t in np.asarray(greedy[0]).ravel()]
        return tokens.__getitem__
