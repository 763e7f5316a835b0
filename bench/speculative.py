#!/usr/bin/env python3
"""Speculative decoding (lvb.runtime.speculative): what a draft buys.

1. On the toy, end to end (onnxruntime): the toy answers fresh pictures with and without its
   draft (models/toy-draft, scripts/train_toy_draft.py) at k = 1..4; the answers must be the
   same token for token; the acceptance rate and the tokens each check of the toy yields are
   counted by the Session itself (Reply.stats.speculative).
2. On the chip, estimated: tokens/s of one conversation at the 11B's widths (INT4 blocks, INT4
   LM head), plain against speculative with a 1B draft (Llama-3.2-1B's widths), for acceptance
   rates 0.3-0.9 and k = 1..8. Times are tpu-mlir's cost model: the 11B's nets from
   bench/results/device_time.json (label lvb-head-int4: one net of each kind at the real widths,
   layer counts from the published config), the draft's from bench/results/draft_widths.json
   (bench/draft_widths.py). Launch overhead is left out of both sides, as in device_time.json.

   A check of k proposals runs what the runtime launches (Session._step): the draft feeds the
   model's last token (one decode step, or a 2-token prefill chunk after a check that kept
   everything) and decodes k - 1 more, each with its LM head and greedy head. The model then
   runs its prefill nets once over k + 1 tokens: the launches lvb.runtime.turn.check_launches
   counts from the runtime itself, each priced by lvb.runtime.turn.price, for two builds:
   - row at a time: an export without --draft-tokens, at device_time.json's chunk of 32, its
     LM head and greedy head once per position up to the first rejected one (E times on
     average, E = (1 - a^(k+1)) / (1 - a) tokens a check, each proposal kept with probability a);
   - --draft-tokens: the nets bench/check_widths.py priced (bench/results/check_widths.json),
     the smallest priced chunk that holds k + 1 tokens and each head once over all the rows at
     its check stage (an upper bound where chunk or stage hold more than k + 1).
3. Device memory with both models loaded: lvb.runtime.memory's plan of each (the 11B as
   bench/memory_plan.py prices it, the draft from its widths) against an SE7 (NPU heap alone and
   with the VPU/VPP heaps) and SC7 chips of 12 and 16 GB.

Writes bench/results/speculative.json; prints its tables. No timed assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from common import OUT, RESULTS, bmodel_11b_int4_bytes, plan_estimates, record_result, table  # noqa: E402

from lvb.contract import DEFAULT_BATCH, plan  # noqa: E402
from lvb.devicetime import NetEstimates  # noqa: E402
from lvb.runtime.turn import check_launches, price  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402

RESULTS_FILE = RESULTS / "speculative.json"
CONFIG_11B = REPO / "tests" / "data" / "llama-3.2-11b-vision.config.json"
ACCEPTANCE = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
SEQ = 512
CHATS = {"text": None, "picture": 4}  # the picture's tiles
DRAFT_TOKENS = (1, 2, 3, 4, 5, 6, 8)


@cache
def spec_11b() -> ModelSpec:
    """The published 11B config's spec, read once."""
    return ModelSpec.from_config(json.loads(CONFIG_11B.read_text()))


# ----------------------------------------------------------------------------- 1. the toy


def toy(pictures: int, work: Path) -> dict:
    from lvb.export.exporter import export
    from lvb.runtime.backends import open_engine
    from lvb.runtime.pipeline import Checkpoint, Session
    from lvb.tasks import QUESTION, sample

    models = {"toy": REPO / "models" / "toy", "draft": REPO / "models" / "toy-draft"}
    opened = {}
    for name, model in models.items():
        export(model, work / name, seq=128, chunks=(32, 8))
        opened[name] = Checkpoint.load(model), open_engine("onnxruntime", onnx_work=work / name)
    target, engine = opened["toy"]
    drawn = sample(pictures, 4242)
    plain = Session(target, engine)
    expected = []
    for image, _ in drawn:
        plain.reset()
        expected.append(plain.ask(QUESTION, image=image, max_new_tokens=8).tokens)
    rows = {}
    for k in (1, 2, 3, 4):
        session = Session(target, engine, draft=opened["draft"], draft_tokens=k)
        proposed = accepted = steps = tokens = same = right = 0
        for (image, answer), reference in zip(drawn, expected):
            session.reset()
            reply = session.ask(QUESTION, image=image, max_new_tokens=8)
            s = reply.stats.speculative
            proposed, accepted, steps, tokens = (proposed + s.proposed, accepted + s.accepted, steps + s.verify_steps,
                                                 tokens + s.tokens)
            same += reply.tokens == reference
            right += reply.text.strip() == answer
        rows[k] = {"pictures": pictures, "same_tokens": same, "right": right, "proposed": proposed, "accepted": accepted,
                   "acceptance": accepted / proposed, "checks": steps, "tokens_per_check": tokens / steps}
        print(f"toy, k={k}: {same}/{pictures} answers token for token the toy's own, acceptance "
              f"{accepted}/{proposed} = {accepted / proposed:.2f}, {tokens / steps:.2f} tokens per check", flush=True)
    for _, e in opened.values():
        e.close()
    return rows


# ----------------------------------------------------------------------------- 2. the chip


def expected_tokens(a: float, k: int) -> float:
    """Tokens one check yields when each proposal is kept with probability a."""
    return float(k + 1) if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


# Llama-3.2-1B's published widths (its config.json), what bench/draft_widths.py compiles.
WIDTHS_1B = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 128256}


def layer_parameters(hidden: int, heads: int, kv_heads: int, intermediate: int) -> int:
    """The weights of one Llama decoder layer's projections (q, k, v, o and the MLP)."""
    head_dim = hidden // heads
    return 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * intermediate


def scaled_draft(kinds: dict) -> dict:
    """The draft's nets priced from the 11B's by their weight bytes (a decode step reads every
    weight once, at the same bandwidth): used only without bench/results/draft_widths.json."""
    config = json.loads(CONFIG_11B.read_text())["text_config"]
    w = WIDTHS_1B
    layer = (layer_parameters(w["hidden"], w["heads"], w["kv_heads"], w["intermediate"])
             / layer_parameters(config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"],
                                config["intermediate_size"]))
    head = w["hidden"] / config["hidden_size"]  # the same vocabulary
    return {"block_cache_0": kinds["self_decode"] * layer, "block_0": kinds["self_prefill"] * layer,
            "lm_head": kinds["lm_head"] * head, "greedy_head": kinds["greedy_head"], "embed": kinds["embed"],
            "embed_cache": kinds["embed_cache"]}


def estimates(label: str) -> tuple[dict, dict, dict, str]:
    """(11B per-kind ms, draft per-net ms, layer counts, where the draft's figures come from)."""
    device = json.loads((RESULTS / "device_time.json").read_text())[label]
    kinds = {kind: entry["stages"][0]["cycles"] / 1e6 for kind, entry in device["kinds"].items()}
    config = json.loads(CONFIG_11B.read_text())["text_config"]
    counts = {"self": config["num_hidden_layers"] - len(config["cross_attention_layers"]),
              "cross": len(config["cross_attention_layers"]), "draft": WIDTHS_1B["layers"]}
    path = RESULTS / "draft_widths.json"
    if path.is_file():
        draft = {name: stages[0] for name, stages in json.loads(path.read_text())["ms"].items()}
        return kinds, draft, counts, "bench/draft_widths.py: the 1B's nets compiled at its widths (cost model)"
    return kinds, scaled_draft(kinds), counts, "the 11B's nets scaled by weight bytes (bench/draft_widths.py not run)"


def chip(label: str) -> dict:
    kinds, draft, n, source = estimates(label)
    head = kinds["lm_head"] + kinds["greedy_head"]
    # One step of the 11B without a draft, as lvb.runtime.turn prices it (text-only chat, and
    # a chat with a picture: the cross-attention layers run too).
    plain = {"text": kinds["embed_cache"] + n["self"] * kinds["self_decode"] + head}
    plain["picture"] = plain["text"] + n["cross"] * kinds["cross_decode"]
    # The two builds' nets: device_time.json's (one prefill chunk of 32, heads of one row) and
    # the check build's (bench/check_widths.py), each net of the full plan priced as the net of
    # its kind that was compiled.
    device = json.loads((RESULTS / "device_time.json").read_text())[label]["kinds"]
    builds = {"row at a time": CheckBuild.of({kind: entry["stages"] for kind, entry in device.items()}, (32,), 0)}
    record = check_record()
    if record is not None:
        chunks = tuple(shape[1] for shape in next(r for r in record["nets"].values() if r["kind"] == "self_prefill")["first_input"])
        builds["--draft-tokens"] = CheckBuild.of({r["kind"]: r["device"] for r in record["nets"].values()}, chunks,
                                                 record["settings"]["draft_tokens"] + 1)
    # The row-at-a-time check pass without its heads, for the printout.
    verify = {chat: builds["row at a time"].check(k=1, tiles=tiles, tokens=0.0) for chat, tiles in CHATS.items()}
    draft_head = draft["lm_head"] + draft["greedy_head"]
    draft_step = draft["embed_cache"] + n["draft"] * draft["block_cache_0"] + draft_head
    draft_prefill = draft["embed"] + n["draft"] * draft["block_0"] + draft_head
    grid = []
    for chat in ("text", "picture"):
        for a in ACCEPTANCE:
            for k in DRAFT_TOKENS:
                tokens = expected_tokens(a, k)
                everything = a ** k  # the last check kept every proposal: the draft feeds two tokens
                drafting = (k - 1) * draft_step + everything * draft_prefill + (1 - everything) * draft_step
                for build, priced in builds.items():
                    check = priced.check(k, CHATS[chat], tokens)
                    ms = drafting + check
                    grid.append({"build": build, "chat": chat, "acceptance": a, "k": k, "tokens_per_check": tokens,
                                 "draft_ms": drafting, "check_ms": check, "tokens_per_s": 1000 * tokens / ms,
                                 "plain_tokens_per_s": 1000 / plain[chat], "speedup": plain[chat] * tokens / ms})
    return {"label": label, "draft_source": source, "plain_step_ms": plain, "verify_pass_ms": verify, "draft_step_ms": draft_step,
            "draft_prefill_ms": draft_prefill, "head_ms": head, "check_nets": record and record["ms"], "grid": grid}


def check_record() -> dict | None:
    """The 11B's nets as `lvb export --draft-tokens` builds them (bench/results/check_widths.json),
    or None before bench/check_widths.py has run."""
    path = RESULTS / "check_widths.json"
    return json.loads(path.read_text()) if path.is_file() else None


@cache
def launches_of(chunks: tuple[int, ...], verify: int, k: int, tiles: int | None) -> dict:
    """A check's launches depend on the build, k and the picture, not on the acceptance rate:
    one dry run of the Runner for each."""
    return check_launches(spec_11b(), SEQ, chunks, verify, k, tiles)


@dataclass(frozen=True)
class CheckBuild:
    """An 11B build's check, priced from the runtime's own launches (lvb.runtime.turn.check_launches):
    the prefill nets once over k + 1 tokens at the smallest chunk that holds them, and the heads
    once over every row at the check's stage, or, without one, once a row."""

    chunks: tuple[int, ...]
    verify: int  # rows of the heads' check stage, 0 for none
    estimates: NetEstimates

    @classmethod
    def of(cls, by_kind: dict[str, list[dict]], chunks: tuple[int, ...], verify: int) -> CheckBuild:
        return cls(chunks, verify, plan_estimates(plan(spec_11b(), SEQ, chunks, DEFAULT_BATCH, verify), by_kind))

    def check(self, k: int, tiles: int | None, tokens: float) -> float:
        """ms of a check of k proposals that yields `tokens` on average: heads that score one row a
        time run up to the first rejected row, `tokens` times, not all k + 1."""
        launches = launches_of(self.chunks, self.verify, k, tiles)
        priced = price(launches, self.estimates, launch_us=0.0)
        if priced.missing:
            raise SystemExit(f"no estimate for {', '.join(priced.missing)}")
        calls = sum(c for (net, _), c in launches.items() if net == "lm_head")
        heads = priced.by_net["lm_head"] + priced.by_net["greedy_head"]
        return priced.ms - heads + heads * tokens / calls if calls > 1 else priced.ms


# ----------------------------------------------------------------------------- 3. memory


def memory(draft_weights: float, seq: int = 512) -> dict:
    from lvb.contract import plan
    from lvb.runtime.memory import CARDS, MemoryPlan, resident_buffers, scratch_tensors
    from lvb.spec import ModelSpec
    from memory_plan import CONFIG, activations

    target_spec = ModelSpec.from_config(json.loads(CONFIG.read_text()))
    draft_spec = ModelSpec.from_config(draft_config())
    activation, _ = activations(None)
    plans = {}
    for name, spec, weights in (("11B INT4", target_spec, bmodel_11b_int4_bytes()), ("1B draft INT4", draft_spec, draft_weights)):
        nets = {n.name: n.on_device() for n in plan(spec, seq, 32)}
        # bmruntime shares one activation buffer per loaded bmodel: the 11B's largest (vision_head),
        # and for the draft its own largest, which a text block's chunk of 32 tokens bounds far below.
        plans[name] = MemoryPlan(int(weights), 0, {"largest net": activation if name.startswith("11B") else 0},
                                 resident_buffers(nets), scratch_tensors(nets))
    total = sum(p.total for p in plans.values())
    return {"seq": seq, "plans": {name: {"weights": p.weights, "activations": p.activation, "engine": p.overhead - p.activation,
                                         "total": p.total} for name, p in plans.items()},
            "total": total, "spare": {card: size - total for card, size in CARDS.items()}}


def draft_weights() -> float:
    """The 1B draft's device weights: compiled (bench/draft_widths.py), else counted: INT4
    blocks (half a byte a weight, a bf16 scale per 64), each layer in its prefill and its decode
    net; the BF16 table in embed and embed_cache; the INT4 tied head."""
    path = RESULTS / "draft_widths.json"
    if path.is_file():
        return json.loads(path.read_text())["weight_bytes_16_layers"]
    w = WIDTHS_1B
    int4 = 0.5 + 2 / 64
    layer = layer_parameters(w["hidden"], w["heads"], w["kv_heads"], w["intermediate"]) * int4
    table = w["vocab"] * w["hidden"]
    return 2 * w["layers"] * layer + 2 * table * 2 + table * int4


def draft_config() -> dict:
    widths = WIDTHS_1B
    return {"model_type": "llama", "num_hidden_layers": widths["layers"], "hidden_size": widths["hidden"],
            "intermediate_size": widths["intermediate"], "num_attention_heads": widths["heads"],
            "num_key_value_heads": widths["kv_heads"], "vocab_size": widths["vocab"], "rms_norm_eps": 1e-5,
            "max_position_embeddings": 131072, "rope_theta": 500000.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictures", type=int, default=50)
    parser.add_argument("--label", default="lvb-head-int4", help="device_time.json's build to price the 11B with")
    parser.add_argument("--work", type=Path, default=OUT / "speculative")
    parser.add_argument("--skip-toy", action="store_true", help="keep the toy's figures already in the results")
    args = parser.parse_args()
    previous = json.loads(RESULTS_FILE.read_text()) if RESULTS_FILE.exists() else {}
    toy_rows = previous.get("toy") if args.skip_toy else toy(args.pictures, args.work)
    if not args.skip_toy:  # kept while the chip's figures wait for bench/draft_widths.py
        record_result("speculative", previous | {"toy": toy_rows})
    estimate = chip(args.label)
    mem = memory(draft_weights())
    print(f"draft's figures: {estimate['draft_source']}")
    print(f"\n11B step without a draft: {estimate['plain_step_ms']['text']:.1f} ms (text), "
          f"{estimate['plain_step_ms']['picture']:.1f} ms (picture); check pass {estimate['verify_pass_ms']['text']:.1f} / "
          f"{estimate['verify_pass_ms']['picture']:.1f} ms + {estimate['head_ms']:.2f} ms a head; 1B draft step "
          f"{estimate['draft_step_ms']:.2f} ms")
    for build in sorted({g["build"] for g in estimate["grid"]}):
        for chat in ("text", "picture"):
            rows = []
            for a in ACCEPTANCE:
                cells = {g["k"]: g for g in estimate["grid"]
                         if g["chat"] == chat and g["acceptance"] == a and g["build"] == build}
                rows.append([f"{a:.1f}"] + [f"{cells[k]['tokens_per_s']:.2f} ({cells[k]['speedup']:.2f}x)" for k in DRAFT_TOKENS])
            plain = 1000 / estimate["plain_step_ms"][chat]
            print(f"\n{chat} chat, check {build}: tokens/s (x plain {plain:.2f}) by acceptance and k")
            print(table(rows, ["acceptance"] + [f"k={k}" for k in DRAFT_TOKENS]))
    print("\ndevice memory, both models loaded (seq 512)")
    rows = [[name, f"{p['weights'] / 1e9:.2f} GB", f"{p['total'] / 1e9:.2f} GB"] for name, p in mem["plans"].items()]
    rows += [["both", "", f"{mem['total'] / 1e9:.2f} GB"]]
    rows += [[f"spare on {card}", "", f"{spare / 1e9:.2f} GB"] for card, spare in mem["spare"].items()]
    print(table(rows, ["", "weights", "total"]))
    record_result("speculative", {"toy": toy_rows, "chip": estimate, "memory": mem})
    return 0


if __name__ == "__main__":
    sys.exit(main())
