"""Next-token selection with the semantics of transformers' ``generate``.

The pipeline is generate's for these options: MinNewTokensLengthLogitsProcessor (the end
tokens held back until min_new_tokens are generated), RepetitionPenaltyLogitsProcessor
(over prompt + generated ids, greedy included), then, only when sampling,
TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper and MinPLogitsWarper
(min_tokens_to_keep=1), then argmax or a draw from the softmax. Two serving options come
on top (vLLM's ignore_eos and stop_token_ids): `suppress_ids` are never picked, and a pick
in `stop_token_ids` is returned as `stop_as`, a token the caller stops on. Scores are float64 throughout; removed tokens
are -inf, as transformers' filter_value.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from lvb.errors import LvbError


class SamplingError(LvbError, ValueError):
    """A sampling option out of range; the message names it."""


class NotANumberError(LvbError, ArithmeticError):
    """The net gave logits that are not numbers: nothing can be chosen from them."""


_LARGEST_LOGIT = float(np.finfo(np.float32).max)  # what a float32 net can hand the sampler

# What generate() uses for an option the checkpoint's generation_config.json leaves out
# (GenerationConfig._get_default_generation_params); note top_k 50, not "off".
GENERATE_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "min_p": 0.0,  # transformers' None: off
}


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # 1.0: off
    seed: int | None = None  # None: fresh entropy each run
    min_p: float = 0.0  # 0.0: off
    min_new_tokens: int = 0  # eos_ids are held back until this many tokens are generated
    eos_ids: tuple[int, ...] = ()
    suppress_ids: tuple[int, ...] = ()  # never picked
    stop_token_ids: tuple[int, ...] = ()  # picked, they are returned as stop_as
    stop_as: int | None = None

    @property
    def needs_logits(self) -> bool:
        """Whether picking a token needs the logits (on a device, else its greedy head does)."""
        return (self.do_sample or self.repetition_penalty != 1.0 or bool(self.suppress_ids) or bool(self.stop_token_ids)
                or (self.min_new_tokens > 0 and bool(self.eos_ids)))

    def __post_init__(self) -> None:
        if self.do_sample and not (0 < self.temperature < math.inf):
            raise SamplingError(
                f"temperature must be a positive number when sampling, got {self.temperature!r} "
                "(for greedy decoding turn sampling off instead)"
            )
        if self.do_sample and not math.isfinite(_LARGEST_LOGIT / self.temperature):
            raise SamplingError(
                f"temperature {self.temperature!r} is so small that a logit divided by it is no longer a number; "
                "use 1e-6 or more (for greedy decoding turn sampling off instead)"
            )
        if isinstance(self.top_k, bool) or not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise SamplingError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p!r}")
        if not (0 < self.repetition_penalty < math.inf):
            raise SamplingError(f"repetition_penalty must be a positive number (1 turns it off), got {self.repetition_penalty!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not _is_int(self.seed) or self.seed < 0):
            raise SamplingError(f"seed must be an integer >= 0, got {self.seed!r}")
        if not (0 <= self.min_p <= 1):
            raise SamplingError(f"min_p must be in [0, 1] (0 turns it off), got {self.min_p!r}")
        if isinstance(self.min_new_tokens, bool) or not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise SamplingError(f"min_new_tokens must be an integer >= 0, got {self.min_new_tokens!r}")
        if self.stop_token_ids and self.stop_as is None:
            raise SamplingError("stop_token_ids needs stop_as, the token the caller stops on")

    @classmethod
    def from_generation_config(cls, generation_config: Mapping[str, Any], **overrides: Any) -> SamplingConfig:
        """The checkpoint's generation_config.json settings, with generate()'s defaults for missing
        ones, then every override that is not None (e.g. CLI options left unset)."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise SamplingError(f"unknown sampling option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        values = {k: generation_config.get(k) for k in GENERATE_DEFAULTS}
        values = {k: GENERATE_DEFAULTS[k] if v is None else v for k, v in values.items()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _is_int(value: Any) -> bool:
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def apply_repetition_penalty(scores: np.ndarray, history: Sequence[int], penalty: float) -> np.ndarray:
    """RepetitionPenaltyLogitsProcessor: each seen token once, negative scores x penalty, others / penalty.

    Ids outside the scores (the image token sits past the LM head) are ignored, as transformers does.
    """
    scores = np.array(scores, dtype=np.float64)
    ids = np.asarray(history, dtype=np.int64).reshape(-1)
    ids = np.unique(ids[(ids >= 0) & (ids < scores.shape[-1])])
    seen = scores[ids]
    scores[ids] = np.where(seen < 0, seen * penalty, seen / penalty)
    return scores


def top_k_filter(scores: np.ndarray, top_k: int) -> np.ndarray:
    """TopKLogitsWarper: -inf below the k-th highest score; ties with it all survive."""
    n = scores.shape[-1]
    k = min(max(top_k, 1), n)
    kth = np.partition(scores, n - k)[n - k]
    return np.where(scores < kth, -np.inf, scores)


# Tokens top-p sorts before falling back to the whole vocabulary: a language model's
# nucleus almost always sits inside a few thousand tokens, and a sort of the whole vocabulary
# costs more than the rest of a host step (bench/host_overhead.py).
TOP_P_HEAD = 4096


def top_p_filter(scores: np.ndarray, top_p: float) -> np.ndarray:
    """TopPLogitsWarper: drop, in ascending order, tokens whose cumulative probability is <= 1 - top_p;
    the most likely token always stays. Stable sort, so among ties the lower id goes first, as torch does."""
    live = np.flatnonzero(scores > -np.inf)  # -inf tokens add 0 to the cumsum and are gone already
    probs = softmax(scores[live])
    out = scores.copy()
    below = 0.0  # probability of the tokens dropped before sorting
    if live.size > TOP_P_HEAD:
        kth = np.partition(scores[live], -TOP_P_HEAD)[-TOP_P_HEAD]
        head = scores[live] >= kth  # ties with the k-th stay in, so all the tail ranks strictly below
        tail_mass = float(probs[~head].sum())
        if tail_mass <= 1 - top_p:  # the whole tail goes whatever its order: sort only the head
            out[live[~head]] = -np.inf
            live, probs, below = live[head], probs[head], tail_mass
    order = np.argsort(scores[live], kind="stable")
    cumulative = below + np.cumsum(probs[order])
    remove = cumulative <= 1 - top_p
    remove[-1:] = False
    out[live[order[remove]]] = -np.inf
    return out


def min_p_filter(scores: np.ndarray, min_p: float) -> np.ndarray:
    """MinPLogitsWarper: -inf for tokens less likely than min_p x the most likely one's probability."""
    probs = softmax(scores)
    return np.where(probs < min_p * probs.max(), -np.inf, scores)


def _ids_in(ids: Sequence[int], scores: np.ndarray) -> np.ndarray:
    ids = np.asarray(ids, dtype=np.int64)
    return ids[(ids >= 0) & (ids < scores.shape[-1])]


def softmax(scores: np.ndarray) -> np.ndarray:
    top = np.max(scores)
    if not np.isfinite(top):
        raise ValueError(f"cannot sample from scores whose maximum is {top}")
    e = np.exp(scores - top)
    return e / e.sum()


class Sampler:
    """``sampler(logits, history) -> token id``; one Generator per sampler, so a seed gives a reproducible run."""

    def __init__(self, config: SamplingConfig | None = None):
        self.config = config if config is not None else SamplingConfig()
        self._rng = np.random.default_rng(self.config.seed)
        self._prompt_length: int | None = None

    def process(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """The scores generate() would choose from (float64, -inf for removed tokens)."""
        c = self.config
        scores = np.array(logits, dtype=np.float64).reshape(-1)
        if np.isnan(scores).any() or np.isposinf(scores).any():  # argmax of NaNs is token 0: "!!!!" and exit 0
            bad = int(np.isnan(scores).sum()), int(np.isposinf(scores).sum())
            raise NotANumberError(
                f"the model's logits hold {bad[0]} NaN and {bad[1]} +infinite values of {scores.size}: the nets "
                "compute garbage; run `lvb verify` on this export or bmodel to find the net that does")
        if self._prompt_length is None:  # the first call sees the prompt only
            self._prompt_length = len(history)
        if c.suppress_ids:
            scores[_ids_in(c.suppress_ids, scores)] = -np.inf
        if c.min_new_tokens and len(history) - self._prompt_length < c.min_new_tokens:
            scores[_ids_in(c.eos_ids, scores)] = -np.inf
        if c.repetition_penalty != 1.0:
            scores = apply_repetition_penalty(scores, history, c.repetition_penalty)
        if c.do_sample:
            if c.temperature != 1.0:
                scores = scores / c.temperature
            if c.top_k != 0:
                scores = top_k_filter(scores, c.top_k)
            if c.top_p < 1.0:
                scores = top_p_filter(scores, c.top_p)
            if c.min_p > 0.0:
                scores = min_p_filter(scores, c.min_p)
        return scores

    def __call__(self, logits: np.ndarray, history: Sequence[int]) -> int:
        token = self._pick(self.process(logits, history))
        return self.config.stop_as if token in self.config.stop_token_ids else token

    def _pick(self, scores: np.ndarray) -> int:
        if not self.config.do_sample:
            return int(np.argmax(scores))
        return self.draw(softmax(scores))

    def draw(self, probs: np.ndarray) -> int:
        """A token drawn from a distribution, with this sampler's generator."""
        cdf = np.cumsum(probs)
        # side="right" never lands on a zero-probability token; rounding can only push past the end.
        index = int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"))
        if index >= probs.size:
            index = int(np.flatnonzero(probs)[-1])
        return index
