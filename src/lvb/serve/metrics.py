"""What `GET /metrics` tells Prometheus, in its text format (no client library needed): request
counts by outcome, the queue, tokens, engine time, first-token and per-token latency
histograms, and with a draft its proposed and kept tokens, named like vLLM's (with an `lvb_`
prefix)."""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from dataclasses import fields

from lvb.runtime.speculative import DraftStats

# Seconds; a board's first token takes from tens of ms (a cached follow-up) to tens of s (a
# picture on the simulator), a token from ms to seconds.
FIRST_TOKEN_BUCKETS = (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
PER_TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
REQUEST_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)


class Histogram:
    def __init__(self, name: str, help: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum, self.count = 0.0, 0

    def observe(self, value: float, times: int = 1) -> None:
        """`times` observations of `value` (a request's mean time per token, once per token)."""
        if times > 0:
            self.counts[bisect.bisect_left(self.buckets, value)] += times
            self.sum += value * times
            self.count += times

    def lines(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        total = 0
        for bound, n in zip((*map(repr, self.buckets), "+Inf"), self.counts):
            total += n
            out.append(f'{self.name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{self.name}_sum {self.sum!r}", f"{self.name}_count {self.count}"]


class Metrics:
    """Updated by the worker's thread and the event loop; read by /metrics."""

    def __init__(self, speculative: bool = False):
        """`speculative`: the server decodes with a draft (`lvb serve --draft`), whose counts are kept."""
        self.lock = threading.Lock()
        self.draft = DraftStats() if speculative else None
        self.requests: Counter[str] = Counter()  # by outcome
        self.prompt_tokens = self.cached_tokens = self.generation_tokens = 0
        self.engine_seconds = 0.0
        self.first_token = Histogram("lvb_time_to_first_token_seconds", "Time from the engine taking a request to its "
                                     "first token (prefill included, queue not).", FIRST_TOKEN_BUCKETS)
        self.per_token = Histogram("lvb_time_per_output_token_seconds", "Time per generated token after the first "
                                   "(each request's mean, counted once per token).", PER_TOKEN_BUCKETS)
        self.queue_time = Histogram("lvb_request_queue_time_seconds", "Time a request waited for the engine.",
                                    REQUEST_BUCKETS)
        self.stall = Histogram("lvb_decode_stall_seconds", "Time between two decode steps of the running answers "
                               "(at most one piece of a newcomer: its preparation or one prefill chunk).", PER_TOKEN_BUCKETS + (5.0, 10.0, 20.0))
        self.e2e = Histogram("lvb_e2e_request_latency_seconds", "Time from a request's arrival in the queue to its "
                             "last token.", REQUEST_BUCKETS)

    def count(self, outcome: str) -> None:
        with self.lock:
            self.requests[outcome] += 1

    def add_draft(self, stats: DraftStats) -> None:
        """An answer's draft counts into the server's (the caller holds the lock)."""
        for f in fields(DraftStats):
            setattr(self.draft, f.name, getattr(self.draft, f.name) + getattr(stats, f.name))

    def draft_counts(self) -> dict | None:
        """What the draft proposed and the model kept since the start (None without a draft)."""
        with self.lock:
            d = self.draft
            return None if d is None else {"proposed": d.proposed, "accepted": d.accepted, "checks": d.verify_steps,
                                           "acceptance": round(d.acceptance, 4)}

    def render(self, running: int, waiting: int, decoding_pixels: int, tokens_per_second: float = 0.0) -> str:
        with self.lock:
            lines = ["# HELP lvb_requests_total Requests by outcome: served, cancelled (the client left), "
                     "failed (engine or internal error), refused (4xx), busy (429 or 503).",
                     "# TYPE lvb_requests_total counter"]
            for outcome in ("served", "cancelled", "failed", "refused", "busy"):
                lines.append(f'lvb_requests_total{{outcome="{outcome}"}} {self.requests[outcome]}')
            for name, kind, help, value in (
                ("lvb_num_requests_running", "gauge", "Requests on the engine (up to the decode batch).", running),
                ("lvb_num_requests_waiting", "gauge", "Requests queued for the engine.", waiting),
                ("lvb_decoding_pixels", "gauge", "Pixels of the pictures being decoded now.", decoding_pixels),
                ("lvb_prompt_tokens_total", "counter", "Prompt tokens of answered requests.", self.prompt_tokens),
                ("lvb_cached_prompt_tokens_total", "counter", "Of which reused from the cache.", self.cached_tokens),
                ("lvb_generation_tokens_total", "counter", "Generated tokens.", self.generation_tokens),
                ("lvb_generation_tokens_per_second", "gauge", "Tokens the decode steps of the last 10 s generated, "
                 "per second (all running answers).", tokens_per_second),
                ("lvb_engine_seconds_total", "counter", "Time the engine spent on requests.", self.engine_seconds),
            ):
                lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value!r}"]
            if self.draft is not None:  # vLLM's names for speculative decoding
                d = self.draft
                for name, kind, help, value in (
                    ("lvb_spec_decode_num_drafts_total", "counter", "Verify passes: the model checking the draft's "
                     "proposals in one pass.", d.verify_steps),
                    ("lvb_spec_decode_num_draft_tokens_total", "counter", "Tokens the draft proposed.", d.proposed),
                    ("lvb_spec_decode_num_accepted_tokens_total", "counter", "Of which the model kept.", d.accepted),
                    ("lvb_spec_decode_draft_acceptance_rate", "gauge", "Kept over proposed tokens since the start.",
                     d.acceptance),
                ):
                    lines += [f"# HELP {name} {help}", f"# TYPE {name} {kind}", f"{name} {value!r}"]
            for histogram in (self.first_token, self.per_token, self.queue_time, self.stall, self.e2e):
                lines += histogram.lines()
        return "\n".join(lines) + "\n"
