#!/usr/bin/env python3
"""The runtime's host-side work per prefill chunk and per decode step at 11B widths,
and the same mask work done the way Sophgo's reference demo does it.

Setup: a config-only checkpoint folder with the full Llama-3.2-11B-Vision structure
(40 text layers, cross-attention at 3, 8, ..., 38, hidden 4096, 8 KV heads, vocab
128256; 4 tiles of 1601 patches = 6404 vision tokens), lvb's test tokenizer, chat
template and processor config (no weights). A `NullEngine` stands in for the device:
it holds every net of the contract (seq S, chunk C), returns preallocated zero arrays
of the contract's output shapes (random logits for lm_head), and keeps resident
buffers exactly like lvb's HostBuffers (the onnxruntime and simulator backends), so
storing a net's K/V output into the cache costs a real copy. A `lvb.runtime.pipeline.Session`
runs on it; everything it does besides running nets is host overhead.

Measured (time.perf_counter, median over --reps repetitions after a warm-up):
  * masks: lvb.masks.self_attention_mask and cross_attention_mask for one
    prefill chunk (C x (S+C), C x 6404) and one decode step (1 x (S+1), 1 x 6404),
    and Runner.sees_image (which tokens come after the image);
  * KV bookkeeping: storing one chunk's / one token's K and V of every self-attention
    layer into the resident cache (HostBuffers.store), plus the hidden state;
  * sampling over the full 128256-token vocabulary (lvb.runtime.sampling.Sampler):
    greedy, and temperature 0.6 + top-k 50 + top-p 0.9 (generate()'s defaults with the
    11B's generation_config), top-p alone (a sort of the whole vocabulary), and with a
    repetition penalty over 512 tokens of history;
  * streaming detokenization: StreamDecoder.push per token;
  * whole steps: Session._prefill of one C-token chunk and Session._decode of one token
    with an image in play (every layer's feeds, masks, stores, then sampling), i.e. all
    host work of a step except the nets themselves.
Beside the masks: a faithful small re-implementation of the reference port's way
(sophon-demo sample/Llama3_2_Vision/python/llama3.py: numpy arrays filled element by
element in Python loops) for the same shapes: the decode mask of length S+1, the
prefill causal mask of C x (S+C), the cross mask of C x 6404 element by element and the
way the reference actually fills it (row x tile slices), and the reference's own
whole-prompt S x S causal mask. Loop versions are timed over only --loop-reps repetitions.

Prints a table and the ratios and records them in bench/results/host_overhead.json (the
READMEs' host-work figures are held to it by tests/test_bench_results.py); exits 0.
No timed assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REFERENCE_TOKENS_PER_S, full_model, geometry_11b, machine, record_result, table, write_config_only  # noqa: E402

from lvb.contract import MASK_VALUE, plan  # noqa: E402
from lvb.contract import NetInfo  # noqa: E402
from lvb.runtime.engine import Engine, HostBuffers, Resident  # noqa: E402
from lvb.runtime.runner import Buffers  # noqa: E402
from lvb.masks import cross_attention_mask, self_attention_mask  # noqa: E402
from lvb.runtime.pipeline import Checkpoint, Session  # noqa: E402
from lvb.runtime.sampling import Sampler, SamplingConfig  # noqa: E402


class NullEngine(Engine):
    """Every net of the contract; runs in no time; resident buffers as HostBuffers keeps them."""

    backend = "null"
    logits_on_host = True

    def __init__(self, spec, seq: int, chunk: int, seed: int = 0):
        self._nets = {n.name: NetInfo(n.name, n.inputs, n.outputs) for n in plan(spec, seq, chunk)}
        self._host = HostBuffers()
        rng = np.random.default_rng(seed)
        self._outputs = {}
        for net in self._nets.values():
            outs = [np.zeros(t.shape, dtype=t.dtype) for t in net.outputs]
            if net.name == "lm_head":
                outs = [(rng.standard_normal(net.outputs[0].shape) * 3).astype(np.float32)]
            self._outputs[net.name] = outs
        self.calls = 0

    @property
    def nets(self):
        return self._nets

    def allocate(self, buffer, shape, dtype="float32"):
        self._host.allocate(buffer, shape, dtype)

    def read(self, buffer):
        return self._host.read(buffer)

    def upload(self, buffer, array, slot=None):
        self._host.upload(buffer, array, slot)

    def run(self, net, feeds, store=None):
        self.calls += 1
        for value in feeds.values():  # what a host backend does with its feeds: resolve residents to arrays
            self._host.resolve(value)
        outputs = self._outputs[net]
        store = store or {}
        result = []
        for i, out in enumerate(outputs):
            if i in store:
                self._host.store(out, store[i])
                result.append(None)
            else:
                result.append(out)
        return result


def host_row(row: dict) -> list[str]:
    """One row of the printed table, as bench/README quotes it."""
    ref, lvb = row["reference_us"], row["lvb_us"]
    ratio = (f"{ref / lvb:,.0f}x" if ref / lvb >= 10 else f"{ref / lvb:.2f}x") if ref else ""
    return [row["work"], f"{lvb:,.1f}", f"{ref:,.0f}" if ref else "", ratio, row["how"]]


def median_seconds(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# ----------------------------------------------------------------------------- the reference port's way


def ref_decode_mask(past: int, seq: int) -> np.ndarray:
    """Decode mask of length seq+1 (cache slots, then the new token), element by element."""
    mask = np.zeros(seq + 1, dtype=np.float32)
    for i in range(seq + 1):
        if i < past or i == seq:
            mask[i] = 0
        else:
            mask[i] = MASK_VALUE
    return mask


def ref_prefill_mask(past: int, chunk: int, seq: int) -> np.ndarray:
    """Causal chunk mask of chunk x (seq+chunk), nested loops over every element, as the
    reference's get_first_input does for its seq x seq mask."""
    width = seq + chunk
    mask = np.ones(chunk * width, dtype=np.float32) * MASK_VALUE
    for i in range(chunk):
        for j in range(width):
            if j < past or (seq <= j <= seq + i):
                mask[i * width + j] = 0
    return mask


def ref_cross_mask_elements(sees: np.ndarray, num_tiles: int, max_tiles: int, patches: int) -> np.ndarray:
    """Cross mask chunk x (tiles*patches), nested loops over every element."""
    rows, width = len(sees), max_tiles * patches
    mask = np.full((rows, width), MASK_VALUE, dtype=np.float32)
    for i in range(rows):
        for j in range(width):
            if not sees[i] or j // patches < num_tiles:
                mask[i, j] = 0
    return mask


def ref_cross_mask_tiles(sees: np.ndarray, tile_ok: list[int], max_tiles: int, patches: int) -> np.ndarray:
    """What the reference actually does for the cross mask: a loop over rows and tiles,
    each (row, tile) slice set at once (forward_first)."""
    rows = len(sees)
    mask = np.full((rows, max_tiles, patches), MASK_VALUE, dtype=np.float32)
    for i in range(rows):
        if not sees[i]:
            mask[i] = 0
            continue
        for j in range(max_tiles):
            if tile_ok[i * max_tiles + j] == 1:
                mask[i, j, :] = 0
            else:
                mask[i, j, :] = MASK_VALUE
    return mask


def ref_prompt_mask(tokens: int, length: int) -> np.ndarray:
    """The reference's own get_first_input mask: length x length for the whole prompt, once per prompt."""
    mask = np.ones(length * length, dtype=np.float32) * MASK_VALUE
    for i in range(tokens):
        for j in range(length):
            if j <= i:
                mask[i * length + j] = 0
    return mask


# ----------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--reps", type=int, default=200, help="repetitions of each vectorised measurement")
    parser.add_argument("--step-reps", type=int, default=50, help="repetitions of whole prefill chunks / decode steps")
    parser.add_argument("--loop-reps", type=int, default=3, help="repetitions of each Python-loop (reference-style) mask")
    parser.add_argument("--out", type=Path, default=OUT, help="where the config-only checkpoint folder goes")
    args = parser.parse_args()
    S, C = args.seq, args.chunk

    full = full_model("11b")
    geometry = geometry_11b(full["text_layers"], full["vision_layers"], full["global_layers"], cross=full["cross_layers"])
    folder = write_config_only(args.out.resolve() / "config-11b", geometry)
    checkpoint = Checkpoint.load(folder)
    spec = checkpoint.spec
    v, t = spec.vision, spec.text
    V = v.tokens_per_image
    engine = NullEngine(spec, S, C)
    session = Session(checkpoint, engine)
    print(f"model: {len(t.self_attention_layers)} self + {len(t.cross_attention_layers)} cross layers, hidden {t.hidden_size}, "
          f"{t.num_kv_heads} KV heads x {t.head_dim}, vocab {t.vocab_size}, vision tokens {v.max_num_tiles} x "
          f"{v.patches_per_tile} = {V}; seq {S}, chunk {C}")

    # A realistic state: a 1000x750 photo (2x2 tiles of 4, so the cross mask has masked tiles) and a first turn.
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (750, 1000, 3), dtype=np.uint8))
    started = time.perf_counter()
    session.ask("Describe this picture in detail.", image=photo, max_new_tokens=4)
    first_turn = time.perf_counter() - started
    preprocess_s = median_seconds(lambda: session._process_image(photo), 5, warmup=1)
    rows: list[list] = []
    recorded: list[dict] = []

    def add(label, seconds, ref=None, note=""):
        recorded.append({"work": label, "lvb_us": seconds * 1e6, "reference_us": ref * 1e6 if ref else None, "how": note})
        rows.append(host_row(recorded[-1]))

    past = S // 2
    # -- masks, lvb vs the reference's loops ---------------------------------------------------
    sees_chunk = np.arange(C) >= 5  # a few tokens before the image token, as in a chat
    num_tiles = session.image.num_tiles
    tile_ok = [1 if (sees_chunk[i] and j < num_tiles) else 0 for i in range(C) for j in range(v.max_num_tiles)]
    lvb_self_prefill = median_seconds(lambda: self_attention_mask(past - C, C, S), args.reps)
    lvb_self_decode = median_seconds(lambda: self_attention_mask(past, 1, S), args.reps)
    lvb_cross_prefill = median_seconds(lambda: cross_attention_mask(sees_chunk, num_tiles, v.max_num_tiles, v.patches_per_tile), args.reps)
    lvb_cross_decode = median_seconds(lambda: cross_attention_mask(np.array([True]), num_tiles, v.max_num_tiles, v.patches_per_tile), args.reps)
    ref_self_prefill = median_seconds(lambda: ref_prefill_mask(past - C, C, S), args.loop_reps, warmup=0)
    ref_self_decode = median_seconds(lambda: ref_decode_mask(past, S), args.loop_reps, warmup=0)
    ref_cross_prefill = median_seconds(lambda: ref_cross_mask_elements(sees_chunk, num_tiles, v.max_num_tiles, v.patches_per_tile), args.loop_reps, warmup=0)
    ref_cross_decode = median_seconds(lambda: ref_cross_mask_elements(np.array([True]), num_tiles, v.max_num_tiles, v.patches_per_tile), args.loop_reps, warmup=0)
    ref_cross_tiles = median_seconds(lambda: ref_cross_mask_tiles(sees_chunk, tile_ok, v.max_num_tiles, v.patches_per_tile), args.loop_reps, warmup=0)
    ref_prompt = median_seconds(lambda: ref_prompt_mask(S - 1, S), args.loop_reps, warmup=0)
    # The loop versions must build the same masks as lvb's.
    assert np.array_equal(ref_prefill_mask(past - C, C, S).reshape(C, S + C), self_attention_mask(past - C, C, S)[0, 0])
    assert np.array_equal(ref_decode_mask(past, S), self_attention_mask(past, 1, S)[0, 0, 0])
    assert np.array_equal(ref_cross_mask_elements(sees_chunk, num_tiles, v.max_num_tiles, v.patches_per_tile),
                          cross_attention_mask(sees_chunk, num_tiles, v.max_num_tiles, v.patches_per_tile)[0][0, 0])
    ids = session.cached + [1] * 200
    sees_prefill = median_seconds(lambda: session.runner.sees_image(ids, range(len(ids) - C, len(ids))), args.reps)
    sees_decode = median_seconds(lambda: session.runner.sees_image(ids, range(len(ids), len(ids) + 1)), args.reps)

    add(f"self-attention mask, prefill chunk [{C} x {S + C}]", lvb_self_prefill, ref_self_prefill, "nested loops, every element")
    add(f"self-attention mask, decode [1 x {S + 1}]", lvb_self_decode, ref_self_decode, "loop, every element")
    add(f"cross-attention mask, prefill chunk [{C} x {V}]", lvb_cross_prefill, ref_cross_prefill, "nested loops, every element")
    add(f"  (same, the reference's row x tile loop)", lvb_cross_prefill, ref_cross_tiles, "row x tile slices, as llama3.py")
    add(f"cross-attention mask, decode [1 x {V}]", lvb_cross_decode, ref_cross_decode, "loop, every element")
    add(f"  (reference: whole-prompt mask [{S} x {S}], once per prompt)", lvb_self_prefill * (S // C), ref_prompt,
        f"lvb: {S // C} chunk masks")
    add(f"which tokens see the image (Runner.sees_image), per chunk", sees_prefill)
    add(f"which tokens see the image (Runner.sees_image), per step", sees_decode)

    # -- KV bookkeeping --------------------------------------------------------------------
    hb = engine._host
    # Row shapes from the buffers the Session allocated, so the figures follow the contract's layouts.
    kv_rows = hb.buffers[Buffers.kv(t.self_attention_layers[0])[0]].shape[2:]
    k_chunk = np.zeros((1, C, *kv_rows), np.float32)
    k_one = np.zeros((1, 1, *kv_rows), np.float32)
    hidden_chunk = np.zeros((1, C, t.hidden_size), np.float32)

    def store_chunk():
        for layer in t.self_attention_layers:
            for name in Buffers.kv(layer):
                hb.store(k_chunk, Resident(name, past - C, C))
        hb.store(hidden_chunk, Resident(Buffers.HIDDEN))

    def store_one():
        for layer in t.self_attention_layers:
            for name in Buffers.kv(layer):
                hb.store(k_one, Resident(name, past, 1))
        hb.store(hidden_chunk[:, :1], Resident(Buffers.HIDDEN1))

    add(f"KV bookkeeping, prefill chunk ({len(t.self_attention_layers)} layers' K+V rows + hidden)", median_seconds(store_chunk, args.reps))
    add(f"KV bookkeeping, decode step", median_seconds(store_one, args.reps))
    cross_name = Buffers.cross_kv(t.cross_attention_layers[0])[0]
    cross_kv = np.zeros(hb.buffers[cross_name].shape, np.float32)
    cross_bytes = hb.buffers[cross_name].nbytes  # as held: bf16 bits when the contract keeps the state in bf16

    def store_cross():  # what Runner.encode_image stores for every cross layer, once per image
        for layer in t.cross_attention_layers:
            for name in Buffers.cross_kv(layer):
                hb.store(cross_kv, Resident(name))

    add(f"cross K/V stored per image ({len(t.cross_attention_layers)} layers x K+V, "
        f"{2 * len(t.cross_attention_layers) * cross_bytes / 1e6:.0f} MB)", median_seconds(store_cross, max(10, args.reps // 10)),
        note="(once per image, by cross_kv_i)")

    # -- sampling over the full vocabulary ---------------------------------------------------
    logits = (rng.standard_normal(t.vocab_size) * 3).astype(np.float32)
    history = list(rng.integers(0, t.vocab_size, 512))
    samplers = [
        ("sampling: greedy", SamplingConfig()),
        ("sampling: T 0.6, top-k 50, top-p 0.9 (11B defaults)", SamplingConfig(do_sample=True, temperature=0.6, top_k=50, top_p=0.9, seed=0)),
        ("sampling: T 0.6, top-p 0.9, no top-k", SamplingConfig(do_sample=True, temperature=0.6, top_k=0, top_p=0.9, seed=0)),
        ("sampling: greedy + repetition penalty 1.1 over 512", SamplingConfig(repetition_penalty=1.1)),
    ]
    for label, config in samplers:
        sampler = Sampler(config)
        add(label + f" [{t.vocab_size}]", median_seconds(lambda: sampler(logits, history), args.reps))

    # -- streaming detokenization -----------------------------------------------------------
    tokenizer = checkpoint.tokenizer
    text_ids = tokenizer.encode_prompt("The quick brown fox jumps over the lazy dog. Café, naïve, 東京, 😀 — unicode text "
                                       "must round-trip. " * 4, add_special_tokens=False)
    stream = tokenizer.stream()
    position = [0]

    def push():
        stream.push(text_ids[position[0] % len(text_ids)])
        position[0] += 1

    add("streaming detokenization, per token", median_seconds(push, max(args.reps, 500)))

    # -- whole steps through the Session -------------------------------------------------------
    greedy = Sampler(SamplingConfig())
    prompt = list(session.cached)
    base = len(prompt)
    chunk_ids = prompt + [int(x) for x in rng.integers(0, 300, C)]

    def prefill_one_chunk():
        session.cached = prompt[:]
        session._prefill(chunk_ids, base, greedy)

    def decode_one_step():
        session.cached = prompt[:]
        session._decode(42, prompt, greedy)

    calls = engine.calls
    prefill_s = median_seconds(prefill_one_chunk, args.step_reps)
    decode_s = median_seconds(decode_one_step, args.step_reps)
    per_step_calls = (engine.calls - calls) // (2 * (args.step_reps + 2))
    session.cached = prompt[:]
    add(f"whole prefill chunk via Session._prefill ({C} tokens, all layers, greedy)", prefill_s, note="all host work of a chunk")
    add(f"whole decode step via Session._decode (all layers, greedy)", decode_s, note="all host work of a step")
    sampler = Sampler(samplers[1][1])

    def decode_sampled():
        session.cached = prompt[:]
        session._decode(42, prompt, sampler)

    add(f"whole decode step, T 0.6 / top-k 50 / top-p 0.9", median_seconds(decode_sampled, args.step_reps))

    print("\n" + table(rows, ["host work", "lvb median µs", "reference-style µs", "ratio", "how the reference does it"]))
    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores; Python {m['python']}, numpy {np.__version__}")
    print(f"image preprocessing (1000x750 photo -> {v.max_num_tiles} tiles of {v.image_size} px): "
          f"{preprocess_s * 1e3:.1f} ms per image; first turn end to end with the null engine: {first_turn * 1e3:.0f} ms")
    device_step = 1 / REFERENCE_TOKENS_PER_S
    print(f"decode step host overhead {decode_s * 1e3:.2f} ms = {decode_s / device_step:.1%} of a {device_step * 1e3:.0f} ms step "
          f"at the reference's {REFERENCE_TOKENS_PER_S} tokens/s; prefill chunk host overhead {prefill_s * 1e3:.2f} ms")
    mask_ref = ref_self_decode + ref_cross_decode
    mask_lvb = lvb_self_decode + lvb_cross_decode
    print(f"masks per decode step: lvb {mask_lvb * 1e6:.0f} µs vs element loops {mask_ref * 1e3:.1f} ms "
          f"({mask_ref / mask_lvb:,.0f}x); per prefill chunk: lvb {(lvb_self_prefill + lvb_cross_prefill) * 1e3:.2f} ms vs "
          f"{(ref_self_prefill + ref_cross_prefill):.2f} s ({(ref_self_prefill + ref_cross_prefill) / (lvb_self_prefill + lvb_cross_prefill):,.0f}x)")
    print(f"(loop versions: median of {args.loop_reps}; others: median of {args.reps}, whole steps of {args.step_reps}; "
          f"the null engine is called {per_step_calls} times per step)")
    path = record_result("host_overhead", {
        "seq": S, "chunk": C, "reps": args.reps, "step_reps": args.step_reps, "loop_reps": args.loop_reps,
        "numpy": np.__version__, "rows": recorded, "decode_step_ms": decode_s * 1e3, "prefill_chunk_ms": prefill_s * 1e3,
        "decode_step_share": decode_s / device_step, "image_preprocess_ms": preprocess_s * 1e3,
        "first_turn_ms": first_turn * 1e3, "net_calls_per_step": per_step_calls,
        "masks": {"decode": {"lvb_us": mask_lvb * 1e6, "reference_us": mask_ref * 1e6},
                  "prefill": {"lvb_us": (lvb_self_prefill + lvb_cross_prefill) * 1e6,
                              "reference_us": (ref_self_prefill + ref_cross_prefill) * 1e6}}})
    print(f"recorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
