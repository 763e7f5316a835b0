"""Speculative decoding: a small text model (the draft) proposes k tokens, the model answering
(the target) checks all of them in one prefill-chunk pass and keeps the longest prefix it agrees
with plus a token of its own, so every kept token is one the target itself would have produced.

Greedy, the answer is the target's token for token: the target's pick after each proposed prefix
is computed by the same nets and the same sampler as in plain decoding. Sampling follows the
standard rejection rule (Leviathan et al. 2023, Chen et al. 2023): a proposal d drawn from the
draft's distribution q is kept with probability min(1, p(d) / q(d)), else a token is drawn from
max(0, p - q) renormalised, so every token is distributed as the target's p.

Both caches keep only what was accepted: the session's count of cached tokens goes back to the
accepted prefix, and every later pass's mask ends at that position, so the K/V rows written for
rejected tokens are never read (tests/test_speculative.py poisons them to show it).

The draft sees the conversation's token ids with the image token replaced by padding (a text
model has no picture; Gagrani et al. 2024 draft a vision model's answers with a text model).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lvb.runtime.engine import Engine, Resident
from lvb.runtime.runner import ChatError, Runner
from lvb.runtime.sampling import Sampler, SamplingConfig, softmax
from lvb.spec import ModelSpec
from lvb.text import Tokenizer

# What `--draft-tokens` is unless the model was built for a k (`lvb export --draft-tokens`): near
# the best k of bench/speculative.py's chip estimates over the acceptance rates a useful draft reaches.
DEFAULT_DRAFT_TOKENS = 3


@dataclass
class DraftStats:
    proposed: int = 0  # draft tokens the target checked
    accepted: int = 0  # of which it kept
    verify_steps: int = 0  # target passes over a draft
    tokens: int = 0  # tokens those passes produced (accepted + the target's own)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_step(self) -> float:
        return self.tokens / self.verify_steps if self.verify_steps else 0.0


def same_vocabulary(target: Tokenizer, draft: Tokenizer) -> str | None:
    """None when every token means the same id in both tokenizers (the target's image token
    aside, which a text model lacks); else the first difference."""
    ours, theirs = (t._tok.get_vocab(with_added_tokens=True) for t in (target, draft))
    for token in (target.image_token, draft.image_token):
        ours.pop(token, None), theirs.pop(token, None)
    if ours == theirs:
        return None
    differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])
    return f"token {differ[0][0]!r} is id {ours.get(differ[0][0])} in the model and {theirs.get(differ[0][0])} in the draft"


class Draft:
    """The draft model's runner and the tokens its cache holds."""

    def __init__(self, spec: ModelSpec, engine: Engine, tokenizer: Tokenizer, target: Tokenizer, target_spec: ModelSpec,
                 name: str = "the draft"):
        if not spec.text_only:
            raise ChatError(f"{name} is a vision model; a draft is a Llama text checkpoint (LlamaForCausalLM)")
        if spec.text.vocab_size != target_spec.text.vocab_size:
            raise ChatError(f"{name}'s LM head scores {spec.text.vocab_size} tokens and the model's "
                            f"{target_spec.text.vocab_size}; a draft must share the model's vocabulary")
        problem = same_vocabulary(target, tokenizer)
        if problem:
            raise ChatError(f"{name} has another tokenizer than the model ({problem}); a draft must share the "
                            "model's tokenizer (Llama-3.2-1B-Instruct for Llama-3.2-Vision)")
        self.engine = engine
        self.pad_id = tokenizer.pad_id or 0
        self.image_id = target.image_id
        self.runner = Runner(spec, engine, image_token_id=None, pad_id=self.pad_id)
        self.seq = self.runner.seq
        self.cached: list[int] = []
        self.greedy = Sampler(SamplingConfig())

    def reset(self) -> None:
        self.cached = []

    def _text(self, ids: Sequence[int]) -> list[int]:
        return [self.pad_id if t == self.image_id else int(t) for t in ids]

    def room(self, history: Sequence[int]) -> int:
        """How many tokens the draft can still propose after `history`."""
        return self.seq - len(history) + 1

    def _feed(self, ids: list[int]) -> Resident:
        """Bring the cache to `ids` (reusing the prefix it already holds); the last one's hidden state."""
        keep = min(shared_prefix(self.cached, ids), len(ids) - 1)  # the last token is fed again
        if len(ids) - keep == 1:  # one token: the decode nets, as plain decoding runs them
            hidden = self.runner.decode(ids[-1], keep, None)
        else:
            hidden = self.runner.prefill(ids, keep, None)
        self.cached = list(ids)
        return hidden

    def propose(self, history: Sequence[int], k: int, sampler: Sampler | None = None) -> tuple[list[int], list[np.ndarray]]:
        """k tokens after `history`, greedy (or drawn by `sampler`, with the distributions they
        were drawn from); the draft's cache then holds history and all but the last proposal."""
        ids = self._text(history)
        tokens, dists = [], []
        for _ in range(k):
            hidden = self._feed(ids + tokens)
            if sampler is None:
                tokens.append(self.runner.next_token(hidden, self.greedy, ids + tokens))
            else:
                probs = softmax(sampler.process(self.runner.logits(hidden), history + tokens))
                tokens.append(sampler.draw(probs))
                dists.append(probs)
        return tokens, dists

    def keep(self, history: Sequence[int]) -> None:
        """Forget what the cache holds past the accepted tokens."""
        self.cached = self.cached[:shared_prefix(self.cached, self._text(history))]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def accept_greedy(drafts: Sequence[int], pick) -> list[int]:
    """The tokens one verify pass yields: `pick(i)` is the target's token after the first i
    proposals; proposals are kept while they are what the target picks, then its own pick."""
    kept: list[int] = []
    for i, proposal in enumerate(drafts):
        token = pick(i)
        if token != proposal:
            return kept + [token]
        kept.append(token)
    return kept + [pick(len(drafts))]


def accept_sampled(drafts: Sequence[int], draft_probs: Sequence[np.ndarray], target_probs, rng: np.random.Generator,
                   draw) -> list[int]:
    """The rejection rule: `target_probs(i)` is the target's distribution after the first i
    proposals, `draw(probs)` a token drawn from one."""
    kept: list[int] = []
    for i, (proposal, q) in enumerate(zip(drafts, draft_probs)):
        p = target_probs(i)
        if rng.random() * q[proposal] < p[proposal]:  # kept with probability min(1, p/q)
            kept.append(proposal)
            continue
        residual = np.maximum(p - q, 0.0)
        total = residual.sum()
        return kept + [draw(residual / total if total > 0 else p)]
    return kept + [draw(target_probs(len(drafts)))]
