#!/usr/bin/env python3
"""Work for the first token and for one decode step at Llama-3.2-11B-Vision widths: lvb's
plan against the reference port's, counted from the nets' shapes, with each one's projected
time on a BM1684X.

What is counted, per net call: FLOPs (2 per multiply-add: every weight matmul, and
attention's QK^T and AV over the keys the net is given, masked or not) and bytes moved
to or from DRAM (weights read, at the bytes per parameter of the net's quantization,
and the net's input and output tensors at their I/O dtypes). Activations inside a net
(attention scores, MLP intermediates) are not counted: both plans have them, and how
much of them spills from local memory is the compiler's business; the hidden states
between the reference's vision layers are, since lvb's per-layer vision nets pay them as I/O.

lvb's plan is `lvb.contract.plan()` for the 11B config (tests/data/llama-3.2-11b-vision.config.json):
the vision nets (as many tiles as the contract's vision nets take), `cross_kv_i` once per
picture, the prompt prefilled in as many chunks as it takes, the LM head and the greedy head
on the device. Shapes and I/O dtypes come from the contract's tensors as the device takes
them (`NetSpec.on_device`: bf16 state), so a change there (tile stages, chunk buckets, bf16
I/O) moves these figures.

The reference is Sophgo's port (sophon-demo sample/Llama3_2_Vision, built by LLM-TPU's
models/Llama3_2-Vision/compile/export_onnx.py and sophon-demo's scripts/gen_bmodel.sh):
one `vit` net (the whole tower and projector, BF16) at max_num_tiles always, prefill of
all 512 positions (`block_i`; a cross-attention block computes the picture's K/V itself
and outputs them repeated to every query head, [1, 32, 6404, 128]), `block_cache_i`
reading those, blocks W4BF16 with `--quant_input --quant_output` (bf16 I/O), the LM head
W4BF16 too, the vision output bf16.

Projected time: each net call takes max(FLOPs / peak, bytes / bandwidth) at the BM1684X's
published peak, 16 TFLOPS BF16 (W4BF16/W8BF16 compute in BF16 after dequantizing) and
64 GB/s; the sum is scaled by the factor that maps the reference's own sum to its measured
first token and tokens/s (common.REFERENCE_*, with their source). Same
factor for lvb: the projection assumes lvb's nets run at the reference's efficiency.

Prints tables; exits 0. No timed assertions.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from common import (PROMPT_TOKENS, REFERENCE_FIRST_TOKEN_S, REFERENCE_SEQ, REFERENCE_SOURCE, REFERENCE_TOKENS_PER_S,  # noqa: E402
                    REPO, record_result, table)

from lvb.contract import Kind, NetSpec, chunk_for, chunk_sizes, padded_patches, plan, vision_nets  # noqa: E402
from lvb.dtypes import tensor_bytes  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402

CONFIG = REPO / "tests" / "data" / "llama-3.2-11b-vision.config.json"

PEAK_FLOPS = 16e12  # BF16/FP16; INT8 is 32 TOPS, unused: W4BF16 / W8BF16 dequantize to BF16
BANDWIDTH = 64e9  # bytes/s, LPDDR4x
PEAK_SOURCE = (
    "BM1684X: 32 TOPS INT8, 16 TFLOPS FP16/BF16, 64 GB/s: tpu-mlir's LLM performance model "
    "https://github.com/sophgo/tpu-mlir/blob/06ee352af9c2d8120d7f0bc338ab8d0348d6d676/python/llm/LlmProfile.py "
    "(bm1684x: tflops = 16., dma_bw = 64.) and tpu-mlir 1.30.2 python/tools/llm_analyse.py (`-c bm1684x -t 16 -b 64`); "
    "32 TOPS INT8 as in Sophgo's product material for the chip (e.g. https://www.iotdt.com/news/chanpingxunxi/1727.html). "
    "Sophgo's own product page was not in the searchable corpora."
)


def weight_bytes_per_param(quant: str, group: int = 64) -> float:
    """Stored bytes per weight: W4/W8 add a bf16 scale and a uint8 zero point per group of
    `group` (as the per-net bmodels bench/decode_bytes.py reads hold them, bench README §2.2)."""
    return {"bf16": 2.0, "int8": 1.0 + 3 / group, "int4": 0.5 + 3 / group}[quant]


@dataclass(frozen=True)
class Call:
    net: str
    flops: float
    weight_bytes: float
    io_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.io_bytes

    def seconds(self) -> float:
        return max(self.flops / PEAK_FLOPS, self.bytes / BANDWIDTH)


# -- parameter counts, from the spec -------------------------------------------------


def vision_layer_params(spec: ModelSpec) -> int:
    W, Wi = spec.vision.hidden_size, spec.vision.intermediate_size
    return 4 * W * W + 2 * W * Wi + Wi + W + 4 * W  # q k v o (no bias), fc1 fc2 (+bias), two LayerNorms


def self_layer_params(spec: ModelSpec) -> int:
    t = spec.text
    D, kv = t.hidden_size, t.num_kv_heads * t.head_dim
    return 2 * D * D + 2 * D * kv + 3 * D * t.intermediate_size + 2 * D


def cross_query_params(spec: ModelSpec) -> int:
    """A cross-attention layer without its K/V projections (they only see the picture)."""
    t = spec.text
    D = t.hidden_size
    return 2 * D * D + 3 * D * t.intermediate_size + 2 * D + t.head_dim


def cross_kv_params(spec: ModelSpec) -> int:
    t = spec.text
    return 2 * t.hidden_size * t.num_kv_heads * t.head_dim + t.head_dim


def vision_embed_params_read(spec: ModelSpec, tiles: int) -> int:
    """Patch convolution, class and position embeddings; of the per-aspect-ratio tables only
    the picture's row is read."""
    v = spec.vision
    W, P = v.hidden_size, v.patches_per_tile
    return v.num_channels * v.patch_size**2 * W + W + P * W + tiles * P * W + tiles * W + 2 * W


# -- lvb's plan ----------------------------------------------------------------------


def io_bytes(net: NetSpec) -> float:
    return sum(tensor_bytes(t.shape, t.dtype) for t in (*net.inputs, *net.outputs))


def shape_of(net: NetSpec, name: str, outputs: bool = False) -> tuple[int, ...]:
    return next(t.shape for t in (net.outputs if outputs else net.inputs) if t.name == name)


def lvb_call(net: NetSpec, spec: ModelSpec, quant: str, head_quant: str) -> Call:
    """FLOPs and bytes of one call of a contract net, from its shapes."""
    t, v = spec.text, spec.vision
    D = t.hidden_size
    k = net.kind
    if k in (Kind.VISION_LAYER, Kind.VISION_GLOBAL):
        _, N, W = shape_of(net, "hidden_states")
        params = vision_layer_params(spec)
        flops = 2 * N * params + 4 * N * N * W
        wb = params * 2
    elif k == Kind.VISION_EMBED:
        T = shape_of(net, "pixel_values")[2]
        patches = T * (v.image_size // v.patch_size) ** 2
        flops = 2 * patches * v.num_channels * v.patch_size**2 * v.hidden_size
        wb = vision_embed_params_read(spec, T) * 2
    elif k == Kind.VISION_POST:
        _, N, W = shape_of(net, "hidden_states")
        flops = 10 * N * W
        wb = (2 * W + N // padded_patches(v.patches_per_tile) * W) * 2
    elif k == Kind.VISION_HEAD:
        _, V, _ = shape_of(net, "cross_states", outputs=True)
        flops = 2 * V * v.output_dim * D
        wb = (v.output_dim * D + D) * 2
    elif k == Kind.CROSS_KV:
        _, V, _ = shape_of(net, "cross_states")
        flops = 2 * V * 2 * D * t.num_kv_heads * t.head_dim
        wb = cross_kv_params(spec) * weight_bytes_per_param(quant)
    elif k in (Kind.EMBED, Kind.EMBED_CACHE):
        _, C = shape_of(net, "input_ids")
        flops, wb = 0, C * D * 2
    elif k in (Kind.SELF_PREFILL, Kind.SELF_DECODE):
        _, C, _ = shape_of(net, "hidden_states")
        keys = shape_of(net, "attention_mask")[-1]
        params = self_layer_params(spec)
        flops = 2 * C * params + 4 * C * keys * D
        wb = params * weight_bytes_per_param(quant)
    elif k in (Kind.CROSS_PREFILL, Kind.CROSS_DECODE):
        _, C, _ = shape_of(net, "hidden_states")
        V = shape_of(net, "cross_k")[1]
        params = cross_query_params(spec)
        flops = 2 * C * params + 4 * C * V * D
        wb = params * weight_bytes_per_param(quant)
    elif k == Kind.LM_HEAD:
        flops = 2 * D * t.vocab_size
        wb = (D * t.vocab_size) * weight_bytes_per_param(head_quant) + D * 2
    elif k == Kind.GREEDY_HEAD:
        flops, wb = t.vocab_size, 0
    else:
        raise ValueError(f"no cost model for {k}")
    return Call(net.name, flops, wb, io_bytes(net))


def stage_of(net: NetSpec, width: int) -> NetSpec:
    """The stage of a prefill net that takes `width` tokens."""
    return next(s for s in net.stages if s.inputs[0].shape[1] == width)


def lvb_first_token(spec: ModelSpec, seq: int, chunks: tuple[int, ...], tiles: int, prompt: int, quant: str,
                    head_quant: str) -> list[Call]:
    """The calls of lvb's first token: the vision nets at the tile count the contract
    gives them, cross K/V once, the prompt in chunks as the runtime picks them
    (lvb.contract.chunk_for), the LM head and greedy head."""
    nets = {n.name: n.on_device() for n in plan(spec, seq, chunks)}
    calls = [lvb_call(nets[n.name], spec, quant, head_quant) for n in vision_nets(spec)]
    calls += [lvb_call(nets[f"cross_kv_{i}"], spec, quant, head_quant) for i in spec.text.cross_attention_layers]
    remaining = prompt
    while remaining > 0:
        width = chunk_for(remaining, chunks)
        calls.append(lvb_call(stage_of(nets["embed"], width), spec, quant, head_quant))
        calls += [lvb_call(stage_of(nets[f"block_{i}"], width), spec, quant, head_quant) for i in range(spec.text.num_layers)]
        remaining -= width
    calls += [lvb_call(nets[name], spec, quant, head_quant) for name in ("lm_head", "greedy_head")]
    return calls


def lvb_decode(spec: ModelSpec, seq: int, chunks: tuple[int, ...], tiles: int, quant: str, head_quant: str) -> list[Call]:
    nets = {n.name: n.on_device() for n in plan(spec, seq, chunks)}
    names = ["embed_cache", *(f"block_cache_{i}" for i in range(spec.text.num_layers)), "lm_head", "greedy_head"]
    return [lvb_call(nets[name], spec, quant, head_quant) for name in names]


# -- the reference port's plan ---------------------------------------------------------


def reference_first_token(spec: ModelSpec, prompt_seq: int = REFERENCE_SEQ) -> list[Call]:
    t, v = spec.text, spec.vision
    D, KV, d, H = t.hidden_size, t.num_kv_heads, t.head_dim, t.num_heads
    T, P = v.max_num_tiles, v.patches_per_tile
    N, V = T * padded_patches(P), T * P
    S, bf16, int4 = prompt_seq, 2, weight_bytes_per_param("int4")
    layers = v.num_layers + v.num_global_layers
    vit_flops = (2 * T * (P - 1) * v.num_channels * v.patch_size**2 * v.hidden_size
                 + layers * (2 * N * vision_layer_params(spec) + 4 * N * N * v.hidden_size)
                 + 2 * V * v.output_dim * D)
    vit_weights = (vision_embed_params_read(spec, T) + layers * vision_layer_params(spec) + v.output_dim * D) * bf16
    # Pixels in (fp32), cross states out (bf16), and between its layers the hidden states
    # written and read back in bf16, as lvb's per-layer nets do at their I/O dtype: at
    # [N, W] they do not fit the chip's local memory.
    vit_io = T * v.num_channels * v.image_size**2 * 4 + 8 + 4 * T + V * D * bf16 + layers * 2 * N * v.hidden_size * bf16
    calls = [Call("vit", vit_flops, vit_weights, vit_io)]
    calls.append(Call("embedding", 0, S * D * bf16, S * 4 + S * D * bf16))
    for layer in range(t.num_layers):
        if t.is_cross(layer):
            flops = 2 * S * cross_query_params(spec) + 2 * V * 2 * D * KV * d + 4 * S * V * D
            weights = (cross_query_params(spec) + cross_kv_params(spec)) * int4
            io = (2 * S * D + V * D + S + S * V + 2 * H * V * d) * bf16  # outputs K/V repeated to H heads
        else:
            flops = 2 * S * self_layer_params(spec) + 4 * S * S * D
            weights = self_layer_params(spec) * int4
            io = (2 * S * D + S * S + 2 * S * KV * d) * bf16 + S * 4
        calls.append(Call(f"block_{layer}", flops, weights, io))
    calls.append(Call("lm_head", 2 * D * t.vocab_size, D * t.vocab_size * int4, D * bf16 + t.vocab_size * 4))
    calls.append(Call("greedy_head", t.vocab_size, 0, t.vocab_size * 4 + 4))
    return calls


def reference_decode(spec: ModelSpec, seq: int = REFERENCE_SEQ) -> list[Call]:
    t, v = spec.text, spec.vision
    D, KV, d, H = t.hidden_size, t.num_kv_heads, t.head_dim, t.num_heads
    V = v.max_num_tiles * v.patches_per_tile
    S, bf16, int4 = seq, 2, weight_bytes_per_param("int4")
    calls = [Call("embedding_cache", 0, D * bf16, 4 + D * bf16)]
    for layer in range(t.num_layers):
        if t.is_cross(layer):
            flops = 2 * cross_query_params(spec) + 4 * V * D
            io = (2 * D + V + 2 * H * V * d) * bf16  # history K/V [1, H, V, d]
            calls.append(Call(f"block_cache_{layer}", flops, cross_query_params(spec) * int4, io))
        else:
            flops = 2 * self_layer_params(spec) + 4 * (S + 1) * D
            io = (2 * D + (S + 1) + 2 * S * KV * d + 2 * KV * d) * bf16 + 4
            calls.append(Call(f"block_cache_{layer}", flops, self_layer_params(spec) * int4, io))
    calls.append(Call("lm_head", 2 * D * t.vocab_size, D * t.vocab_size * int4, D * bf16 + t.vocab_size * 4))
    calls.append(Call("greedy_head", t.vocab_size, 0, t.vocab_size * 4 + 4))
    return calls


# -- report --------------------------------------------------------------------------


def totals(calls: list[Call]) -> tuple[float, float, float]:
    return sum(c.flops for c in calls), sum(c.bytes for c in calls), sum(c.seconds() for c in calls)


def grid_tiles(spec: ModelSpec) -> list[int]:
    """The tile counts a picture can have: those of the config's aspect ratios."""
    return sorted({rows * cols for rows, cols in spec.vision.supported_aspect_ratios})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="an mllama config.json")
    parser.add_argument("--seq", type=int, default=512, help="lvb's compiled sequence")
    parser.add_argument("--chunk", default="128", help="lvb's prefill chunk sizes, e.g. 16,32,64,128 (as `lvb export --chunk`)")
    parser.add_argument("--quant", default="int4", choices=("int4", "int8", "bf16"), help="lvb's decoder blocks")
    parser.add_argument("--head-quant", default="bf16", choices=("int4", "int8", "bf16"), help="lvb's LM head")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS, help="tokens of the first turn")
    args = parser.parse_args()
    spec = ModelSpec.from_config(__import__("json").loads(args.config.read_text()))
    chunks = chunk_sizes([int(c) for c in args.chunk.split(",")], args.seq)

    ref_ft = reference_first_token(spec)
    ref_dec = reference_decode(spec)
    rf_flops, rf_bytes, rf_s = totals(ref_ft)
    rd_flops, rd_bytes, rd_s = totals(ref_dec)
    k_first = REFERENCE_FIRST_TOKEN_S / rf_s
    k_decode = (1 / REFERENCE_TOKENS_PER_S) / rd_s

    print(f"config: {args.config}; lvb: seq {args.seq}, chunk {args.chunk}, blocks {args.quant}, LM head "
          f"{args.head_quant}; prompt {args.prompt_tokens} tokens")
    print(f"peak: {PEAK_FLOPS / 1e12:g} TFLOPS, {BANDWIDTH / 1e9:g} GB/s. {PEAK_SOURCE}")
    print(f"reference measured: {REFERENCE_FIRST_TOKEN_S} s first token, {REFERENCE_TOKENS_PER_S} tokens/s, {REFERENCE_SOURCE}")
    print(f"calibration: the reference's roofline sum is {rf_s:.2f} s for the first token and {rd_s * 1e3:.1f} ms per "
          f"decode step, so measured = {k_first:.2f}x and {k_decode:.2f}x the roofline; lvb is projected with the same "
          f"factors.\n")

    rows = []
    results = {}
    recorded = {"calibration": {"reference_roofline_first_token_s": rf_s, "reference_roofline_decode_step_s": rd_s,
                                "first_token_factor": k_first, "decode_factor": k_decode},
                "first_token": [], "decode_step": []}
    for tiles in grid_tiles(spec):
        calls = lvb_first_token(spec, args.seq, chunks, tiles, args.prompt_tokens, args.quant, args.head_quant)
        flops, moved, seconds = totals(calls)
        vision = sum(c.flops for c in calls if c.net.startswith("vision"))
        results[tiles] = flops / rf_flops
        recorded["first_token"].append({"tiles": tiles, "reference_flops": rf_flops, "flops": flops, "vision_flops": vision,
                                        "reference_bytes": rf_bytes, "bytes": moved, "reference_s": k_first * rf_s,
                                        "projected_s": k_first * seconds})
        rows.append([f"{tiles}", f"{rf_flops / 1e12:.1f}", f"{flops / 1e12:.1f}", f"{vision / 1e12:.1f}",
                     f"{flops / rf_flops:.2f}", f"{rf_bytes / 1e9:.2f}", f"{moved / 1e9:.2f}",
                     f"{k_first * rf_s:.2f}", f"{k_first * seconds:.2f}", f"{seconds / rf_s:.2f}"])
    print("First token (vision, cross K/V, prefill, LM head):")
    print(table(rows, ["tiles", "ref TFLOP", "lvb TFLOP", "of which vision", "lvb/ref FLOPs", "ref GB moved",
                       "lvb GB moved", "ref s (measured; 4 tiles always)", "lvb s projected", "lvb/ref time"]))

    rows = []
    for label, quant, head in (("lvb", args.quant, args.head_quant), ("lvb, --head-quant int4", args.quant, "int4")):
        calls = lvb_decode(spec, args.seq, chunks, spec.vision.max_num_tiles, quant, head)
        flops, moved, seconds = totals(calls)
        weights = sum(c.weight_bytes for c in calls)
        recorded["decode_step"].append({"plan": label, "weight_bytes": weights, "bytes": moved, "vs_reference": moved / rd_bytes,
                                        "projected_tokens_per_s": 1 / (k_decode * seconds)})
        rows.append([label, f"{weights / 1e9:.2f}", f"{(moved - weights) / 1e9:.3f}", f"{moved / 1e9:.2f}",
                     f"{moved / rd_bytes:.3f}", f"{1 / (k_decode * seconds):.2f}"])
    ref_weights = sum(c.weight_bytes for c in ref_dec)
    recorded["decode_step"].insert(0, {"plan": "reference", "weight_bytes": ref_weights, "bytes": rd_bytes, "vs_reference": 1.0,
                                       "projected_tokens_per_s": REFERENCE_TOKENS_PER_S})
    rows.insert(0, ["reference", f"{ref_weights / 1e9:.2f}", f"{(rd_bytes - ref_weights) / 1e9:.3f}", f"{rd_bytes / 1e9:.2f}",
                    "1.000", f"{REFERENCE_TOKENS_PER_S:.2f} (measured)"])
    print(f"\nOne decode step ({spec.vision.max_num_tiles}-tile picture, seq {args.seq}):")
    print(table(rows, ["plan", "weights GB", "I/O GB (KV, cross K/V, ...)", "bytes/token GB", "vs reference",
                       "tokens/s projected"]))

    goals = {4: 0.7, 2: 0.3, 1: 0.15}
    print("\nGoals (issue 17): first-token FLOPs vs the reference")
    for tiles, goal in goals.items():
        if tiles in results:
            print(f"  {tiles} tile(s): {results[tiles]:.3f}x (goal <= {goal}) {'met' if results[tiles] <= goal else 'MISSED'}")
    decode_ratio = float(rows[1][4])
    print(f"  decode bytes/token at {spec.vision.max_num_tiles} tiles: {decode_ratio:.3f}x (goal <= 0.9) "
          f"{'met' if decode_ratio <= 0.9 else 'MISSED'}")
    defaults = (args.config, args.seq, args.quant, args.head_quant, args.prompt_tokens) == (
        CONFIG, 512, "int4", "bf16", PROMPT_TOKENS)
    if defaults:  # the plans the READMEs show, one entry per chunk list
        path = record_result("first_token", recorded, label=f"chunk {','.join(map(str, sorted(chunks)))}")
        print(f"\nresults: {path.relative_to(REPO)} [chunk {','.join(map(str, sorted(chunks)))}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
