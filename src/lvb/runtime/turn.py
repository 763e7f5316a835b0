"""A turn on the chip, priced before anyone has a card: the nets the runtime launches for a
first token and for each decode step, times each net's device-time estimate (lvb.devicetime).

The call sequence is not written down a second time: the runtime's own Runner runs against
`DryRunEngine`, which has the contract's nets and shapes and computes nothing, and its launch
record (Runner.launches) is the turn. A real turn's record (Stats.first_token_launches,
Stats.decode_launches) is the same on every backend; tests hold the two together.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from lvb.contract import DEFAULT_BATCH, NetInfo, NetSpec, plan
from lvb.devicetime import DEFAULT_LAUNCH_US, NetEstimates
from lvb.runtime.engine import Engine, Resident
from lvb.runtime.image import ProcessedImage
from lvb.runtime.runner import Row, Runner
from lvb.runtime.sampling import Sampler, SamplingConfig
from lvb.spec import ModelSpec

_IMAGE, _TEXT = 1, 2  # token ids of the dry run's prompt: only where the picture's token is matters


class DryRunEngine(Engine):
    """The contract's nets by name and shape; every launch returns zeros."""

    backend = "dry-run"

    def __init__(self, nets: Sequence[NetSpec], logits_on_host: bool):
        self._nets = {n.name: NetInfo(n.name, n.inputs, n.outputs, tuple(s.inputs for s in n.smaller)) for n in nets}
        self._outputs = {n.name: n.outputs for n in nets}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self.logits_on_host = logits_on_host

    @property
    def nets(self) -> dict[str, NetInfo]:
        return self._nets

    def allocate(self, buffer: str, shape: tuple[int, ...], dtype: str = "float32") -> None:
        self._shapes[buffer] = tuple(shape)

    def read(self, buffer: str) -> np.ndarray:
        return np.zeros(self._shapes[buffer], np.float32)

    def upload(self, buffer: str, array: np.ndarray, slot: int | None = None) -> None:
        pass

    def run(self, net: str, feeds: Mapping[str, np.ndarray | Resident], store: Mapping[int, Resident] | None = None):
        return [None if i in (store or {}) else np.zeros(t.shape, t.dtype) for i, t in enumerate(self._outputs[net])]


def _encode_blank(runner: Runner, spec: ModelSpec, tiles: int) -> None:
    """A picture of `tiles` tiles through the vision nets (its pixels do not change the launches)."""
    v = spec.vision
    runner.encode_image(ProcessedImage(
        pixel_values=np.zeros((1, 1, v.max_num_tiles, 3, v.image_size, v.image_size), np.float32),
        aspect_ratio_ids=np.zeros((1, 1), np.int64), aspect_ratio_mask=np.zeros((1, 1, v.max_num_tiles), np.int64),
        num_tiles=tiles, tile_grid=(1, tiles), resized_size=(v.image_size, v.image_size)))


@dataclass(frozen=True)
class Turn:
    """What the runtime launches, (net, stage) -> calls."""

    first_token: Counter  # the picture (when it brings one), the prompt's prefill and the head
    decode_step: Counter  # one more token


def turn_launches(spec: ModelSpec, seq: int, chunks: Sequence[int], prompt_tokens: int, tiles: int | None,
                  logits_on_host: bool = False, batch: Sequence[int] = DEFAULT_BATCH, verify: int = 0) -> Turn:
    """The launches of a first turn of `prompt_tokens` tokens with a picture of `tiles` tiles
    (None: no picture), greedy; `logits_on_host` False as on the card (the greedy head picks)."""
    engine = DryRunEngine(plan(spec, seq, chunks, batch, verify), logits_on_host)
    runner = Runner(spec, engine, image_token_id=_IMAGE)
    ids = ([_IMAGE] if tiles is not None else []) + [_TEXT] * (prompt_tokens - (tiles is not None))
    sampler = Sampler(SamplingConfig())
    if tiles is not None:
        _encode_blank(runner, spec, tiles)
    token = runner.next_token(runner.prefill(ids, 0, tiles), sampler, ids)
    first = Counter(runner.launches)
    runner.next_token(runner.decode(token, len(ids), tiles), sampler, ids)
    return Turn(first, runner.launches - first)


@dataclass(frozen=True)
class Priced:
    """Launches priced by the estimates: the chip's time (ms) and the launch overhead apart."""

    ms: float
    launches: int
    overhead_ms: float
    by_net: dict[str, float]  # net -> ms over all its calls
    missing: tuple[str, ...]  # nets without an estimate (their time is not in `ms`)

    @property
    def total_ms(self) -> float:
        return self.ms + self.overhead_ms


def price(launches: Counter, estimates: NetEstimates, launch_us: float = DEFAULT_LAUNCH_US) -> Priced:
    by_net: dict[str, float] = {}
    missing = []
    for (net, stage), calls in launches.items():
        estimate = estimates.of(net, stage)
        if estimate is None:
            missing.append(net)
            continue
        by_net[net] = by_net.get(net, 0.0) + estimate.ms * calls
    count = sum(launches.values())
    return Priced(sum(by_net.values()), count, count * launch_us / 1000, by_net, tuple(sorted(set(missing))))


@dataclass(frozen=True)
class TurnTime:
    tiles: int | None  # the picture's tiles, None without one
    first_token: Priced
    decode_step: Priced

    @property
    def tokens_per_second(self) -> float:
        return 1000 / self.decode_step.ms if self.decode_step.ms else 0.0


def turn_times(spec: ModelSpec, seq: int, chunks: Sequence[int], estimates: NetEstimates, prompt_tokens: int,
               launch_us: float = DEFAULT_LAUNCH_US, batch: Sequence[int] = DEFAULT_BATCH, verify: int = 0) -> list[TurnTime]:
    """A first turn of `prompt_tokens` tokens without a picture and with one of every tile
    count, on the card (greedy). Every decode step launches the same static nets, so one
    step's time holds at any position."""
    times = []
    for tiles in (None, *range(1, spec.vision.max_num_tiles + 1)):
        turn = turn_launches(spec, seq, chunks, prompt_tokens, tiles, batch=batch, verify=verify)
        times.append(TurnTime(tiles, price(turn.first_token, estimates, launch_us), price(turn.decode_step, estimates, launch_us)))
    return times


def batch_step_launches(spec: ModelSpec, seq: int, chunks: Sequence[int], batch: Sequence[int], rows: int,
                        pictures: bool, verify: int = 0) -> Counter:
    """The launches of one batched decode step of `rows` conversations (slots 0..rows-1), each
    with a one-tile picture or, `pictures` False, none, on the card (the greedy head picks)."""
    engine = DryRunEngine(plan(spec, seq, chunks, batch, verify), logits_on_host=False)
    runner = Runner(spec, engine, image_token_id=_IMAGE)
    step = [Row(slot, _TEXT, 1, 1 if pictures else None) for slot in range(rows)]
    sampler = Sampler(SamplingConfig())
    runner.next_tokens(runner.decode_rows(step), step, [sampler] * rows, [[_TEXT]] * rows)
    return runner.launches


@dataclass(frozen=True)
class BatchStepTime:
    rows: int  # conversations in the step
    pictures: bool  # each with a picture, or none
    step: Priced

    @property
    def tokens_per_second(self) -> float:
        """All rows together."""
        return self.rows * 1000 / self.step.ms if self.step.ms else 0.0

    @property
    def per_conversation(self) -> float:
        return 1000 / self.step.ms if self.step.ms else 0.0


def batch_step_times(spec: ModelSpec, seq: int, chunks: Sequence[int], batch: Sequence[int], estimates: NetEstimates,
                     launch_us: float = DEFAULT_LAUNCH_US, verify: int = 0) -> list[BatchStepTime]:
    """A decode step at every batch size the nets were built for, with and without pictures."""
    return [BatchStepTime(rows, pictures, price(batch_step_launches(spec, seq, chunks, batch, rows, pictures, verify),
                                                estimates, launch_us))
            for rows in sorted(batch) for pictures in (True, False)]


def check_launches(spec: ModelSpec, seq: int, chunks: Sequence[int], verify: int, draft_tokens: int,
                   tiles: int | None) -> Counter:
    """The model's launches for one speculative check of `draft_tokens` proposals (its token and
    the proposals in one prefill chunk, then its heads over every row), greedy on the card, with
    a picture of `tiles` tiles or none. Heads without a stage for the rows (`verify` 0) run once a
    row, all rows here: a check that keeps every proposal."""
    engine = DryRunEngine(plan(spec, seq, chunks, DEFAULT_BATCH, verify), logits_on_host=False)
    runner = Runner(spec, engine, image_token_id=_IMAGE)
    ids = ([_IMAGE] if tiles is not None else []) + [_TEXT] * 8
    if tiles is not None:
        _encode_blank(runner, spec, tiles)
    runner.prefill(ids, 0, tiles)
    runner.launches.clear()
    rows = draft_tokens + 1
    hiddens = runner.verify(ids + [_TEXT] * rows, len(ids), tiles)
    pick = runner.check_tokens(hiddens, Sampler(SamplingConfig()), [ids] * rows)
    for i in range(rows):
        pick(i)
    return Counter(runner.launches)
