#!/usr/bin/env python3
"""The reference port's layout priced by tpu-mlir's cost model: Sophgo's sophon-demo
sample/Llama3_2_Vision (measured figures: common.REFERENCE_*), one
net of each kind at the Llama-3.2-11B-Vision widths, compiled by the same tpu-mlir as lvb.

How: each kind is a small torch module that repeats, op for op, what the reference exports
(its tools/export_onnx.py wrappers around its patched tools/.../modeling_mllama.py): the same
inputs, outputs, shapes and tensor layouts (self-attention K/V as [1, seq, 8, 128], cross K/V
repeated to the 32 query heads, [1, 32, 6404, 128] per tensor, the full 512-position prefill
block), with random weights at the widths of tests/data/llama-3.2-11b-vision.config.json. It is
exported to ONNX (TorchScript exporter), then model_transform.py + model_deploy.py --chip bm1684x
with the flags of the reference's scripts/gen_bmodel.sh; the deploy's compiler_profile_0.txt is
read by lvb.devicetime. No simulator check: the cost model is what is wanted.

The reference compiles its whole vision tower as one net; here one local encoder layer over the
4 tiles (4 x 1608 patches, the padded 1601) stands for all 40 (32 local + 8 global layers of the
same shapes; a global layer adds two tanh gates), so the tower's figure is 40 x that layer's plus
its projector (priced as a net of its own), the patch embedding and position embeddings left out.
greedy_head's TopK runs as a dynamic subnet, which the cost model does not price: it is recorded
as unpriced.

Writes bench/results/reference_layout.json (kinds already there are kept unless --remeasure),
prints a table, and the sums the reference's call sequence implies for the first token and for
one decode step (cost model only: no launch, host or DDR-contention time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CONFIGS, OUT, REFERENCE_FIRST_TOKEN_S, REFERENCE_SEQ, REFERENCE_SOURCE, REFERENCE_TOKENS_PER_S,  # noqa: E402
                    REPO, RESULTS, mb, save_json, stamp, table)

from lvb.compile.tpumlir import TRANSFORM_OPTIONS  # noqa: E402
from lvb.devicetime import Estimate, ProfileError, read_profile  # noqa: E402
from lvb.toolchain import find_toolchain  # noqa: E402

OUTPUT = RESULTS / "reference_layout.json"
WORK = OUT / "reference"
# model_transform.py's ONNX simplifier holds many times a net's weights; each transform waits for
# this much free memory (the machine is shared with other compiles).
NEED_AVAILABLE = 12 << 30

SOPHON_DEMO = "https://github.com/sophgo/sophon-demo/blob/9c23c4d9fa1f0ce7e7e5b6ba9a209de74e829195/sample/Llama3_2_Vision/"
SOPHON_DEMO_MODELING = ("https://github.com/sophgo/sophon-demo/blob/8f1f03afcc0d3308e3ca404f9e1528c9418828ee/sample/"
                        "Llama3_2_Vision/tools/Llama-3.2-11B-Vision-Instruct/modeling_mllama.py")
SOPHON_DEMO_RUNTIME = ("https://github.com/sophgo/sophon-demo/blob/57d893328a0cec972480bb45488a2fa9536c4701/sample/"
                       "Llama3_2_Vision/python/llama3.py")
GEN = SOPHON_DEMO + "scripts/gen_bmodel.sh"

EXPORT = SOPHON_DEMO + "tools/export_onnx.py"

# Where each choice comes from; line numbers are those of the files at the commits in the URLs.
CITE = {
    "seq": (GEN, "L24", "seq_length=512: the README's bmodel is llama3.2-11b-vision_int4_512seq.bmodel"),
    "w4": (GEN, "L91-L92", "mode int4 -> quantize_args=\"--quantize W4BF16 --q_group_size 64\""),
    "block_flags": (GEN, "L201-L239", "process_block: block_$i with $quantize_args --quant_input --quant_output; "
                    "block_cache_$i the same plus $addr_args; one loop over all 40 layers, self- and cross-attention alike"),
    "addr": (GEN, "L20, L107-L109", "addr_args=\"--addr_mode io_alone\" by default, so every block_cache gets it"),
    "lm_flags": (GEN, "L156-L168", "lm_head: --input_shapes [[1,4096]], $quantize_args (W4BF16, group 64) --quant_input"),
    "greedy_flags": (GEN, "L171-L179", "greedy_head: no --quantize, so model_deploy.py's default F32"),
    "embed_flags": (GEN, "L115-L143", "embedding [[1,512]] / embedding_cache [[1,1]], int32 ids, BF16 --quant_output"),
    "vit_flags": (GEN, "L268-L278", "vit: the whole tower one net, BF16 --quant_output"),
    "block_io": (EXPORT, "L105-L122, L251-L263", "Block / convert_block: input_states [1,512,4096], position_ids [1,512], "
                 "attention_mask [1,1,512,512] -> hidden_states, past_k, past_v; cos/sin for the 512 positions are constants"),
    "block_cache_io": (EXPORT, "L125-L143, L265-L284", "BlockCache / convert_block_cache: input_states [1,1,4096], "
                       "position_ids [1,1], attention_mask [1,1,1,513], history_k/v [1,512,8,128] -> hidden_states, "
                       "past_k/v [1,1,8,128]"),
    "cross_io": (EXPORT, "L146-L162, L286-L300", "CrossBlock / convert_cross_block: input_states [1,512,4096], "
                 "cross_attention_states [4,1601,4096], text_row_mask [1,512,1], attention_mask [1,1,512,6404] -> "
                 "hidden_states, past_k, past_v"),
    "cross_cache_io": (EXPORT, "L165-L180, L302-L316", "CrossBlockCache / convert_cross_block_cache: input_states [1,1,4096], "
                       "attention_mask [1,1,1,6404], history_k/v [1,32,6404,128] -> hidden_states"),
    "lm_io": (EXPORT, "L183-L191, L325-L330", "LmHead / convert_lm_head: norm + lm_head on [1,4096]"),
    "greedy_io": (EXPORT, "L194-L201, L332-L343", "GreedyHead / convert_greedy_head: topk(m_logits.float(), 1) on [1,128256]"),
    "embed_io": (EXPORT, "L96-L102, L318-L323", "Embedding / convert_embedding: embed_tokens on int32 ids [1,512]"),
    "vit_io": (EXPORT, "L85-L93, L234-L249", "VisionTransformer / convert_vision_transformer: pixel_values [4,3,560,560] "
               "through the whole tower and projector"),
    "tiles": (EXPORT, "L72-L77", "4 tiles of 560 px, NUM_PATCHES = (560 // 14) ** 2 + 1 = 1601, PADDING_PATCHES = 7"),
    "self_attn": (SOPHON_DEMO_MODELING, "L741-L817 (MllamaTextSelfAttention), L697-L738 (apply_rotary_pos_emb, repeat_kv)",
                  "K/V kept as [1, s, 8, 128]; past_kv = the new positions' K/V; decode concatenates the history on dim 1, "
                  "then repeat_kv to 32 heads; eager matmul + mask + fp32 softmax"),
    "cross_attn": (SOPHON_DEMO_MODELING, "L494-L591 (MllamaTextCrossAttention; L537-L548 the K/V)",
                   "k/v_proj on [4,1601,4096] viewed [1,6404,8,128], repeat_kv to [1,32,6404,128], k_norm after the repeat, "
                   "past_kv = the repeated K/V; decode takes them as inputs"),
    "cross_layer": (SOPHON_DEMO_MODELING, "L1006-L1064 (MllamaCrossAttentionDecoderLayer)",
                    "tanh gates on attention and MLP, full_text_row_masked_out_mask on the MLP output"),
    "vision_layer": (SOPHON_DEMO_MODELING, "L337-L383 (MllamaVisionEncoderLayer), L238-L286 (MllamaVisionAttention), "
                     "L127-L159 (_prepare_aspect_ratio_attention_mask)",
                     "LayerNorm, 16-head eager attention over 4 x 1608 positions with a [1,1,6432,6432] additive mask, "
                     "fp32 softmax, fc1-gelu-fc2"),
    "vision_model": (SOPHON_DEMO_MODELING, "MllamaVisionModel.forward (past the lines counted here)",
                     "num_padding_patches = 7 appended by torch.cat, the 4 tiles viewed as one [1, 6432, 1280] sequence, "
                     "one attention mask for the 32 local and the 8 global (gated) layers"),
    "embed_table": (SOPHON_DEMO_MODELING, "MllamaTextModel.__init__ (past the lines counted here)",
                    "embed_tokens = nn.Embedding(config.vocab_size + 8, config.hidden_size, ...)"),
    "projector": (EXPORT, "L85-L93 (VisionTransformer.forward)", "linear(out).reshape(NUM_TILES, NUM_PATCHES, HIDDEN_SIZE): "
                  "the multi_modal_projector, 7680 -> 4096 on 4 x 1601 positions, inside the vit net"),
    "runtime": (SOPHON_DEMO_RUNTIME, "L170-L207 (forward_first), forward_next",
                "prefill: vit, embedding over length = SEQLEN (512) positions unless the bmodel is dynamic, the 40 blocks, "
                "lm_head at the last token, greedy_head; decode: embedding_cache, the 40 block_caches, lm_head, greedy_head"),
}


def text_widths() -> dict:
    config = json.loads(CONFIGS["11b"].read_text())
    t, v = config["text_config"], config["vision_config"]
    patches = (v["image_size"] // v["patch_size"]) ** 2 + 1
    return {"hidden": t["hidden_size"], "heads": t["num_attention_heads"], "kv_heads": t["num_key_value_heads"],
            "head_dim": t["hidden_size"] // t["num_attention_heads"], "mlp": t["intermediate_size"], "vocab": t["vocab_size"],
            "eps": t["rms_norm_eps"], "theta": t["rope_theta"], "layers": t["num_hidden_layers"],
            "cross_layers": len(t["cross_attention_layers"]),
            "v_hidden": v["hidden_size"], "v_heads": v["attention_heads"], "v_mlp": v["intermediate_size"],
            "v_eps": v["norm_eps"], "tiles": v["max_num_tiles"], "patches": patches,
            "padded": patches + (8 - patches % 8) % 8,
            "v_layers": v["num_hidden_layers"] + v["num_global_layers"]}


def modules(w: dict, seq: int):
    """The reference's nets as torch modules, keyed by kind."""
    import torch
    from torch import nn

    H, NH, KV, D, M = w["hidden"], w["heads"], w["kv_heads"], w["head_dim"], w["mlp"]
    cross_len = w["tiles"] * w["patches"]

    class RMSNorm(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

        def forward(self, x):
            x = x.float()
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + w["eps"]))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(H, M, bias=False), nn.Linear(H, M, bias=False)
            self.down_proj = nn.Linear(M, H, bias=False)

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    def repeat_kv(x, n):  # [1, s, kv, d] -> [1, kv * n, s, d], as the reference writes it
        b, s, kv, d = x.shape
        return x[:, :, :, None, :].expand(b, s, kv, n, d).reshape(b, s, kv * n, d).transpose(1, 2)

    def rotate_half(x):
        return torch.cat((-x[..., D // 2:], x[..., :D // 2]), dim=-1)

    def attend(q, k, v, mask, q_len):  # q [1, s, NH, D]; k, v [1, NH, L, D]
        scores = torch.matmul(q.transpose(1, 2), k.transpose(2, 3)) / math.sqrt(D) + mask
        probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
        return torch.matmul(probs, v).transpose(1, 2).contiguous().reshape(1, q_len, H)

    class SelfLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(H), RMSNorm(H)
            self.q_proj, self.o_proj = nn.Linear(H, NH * D, bias=False), nn.Linear(NH * D, H, bias=False)
            self.k_proj, self.v_proj = nn.Linear(H, KV * D, bias=False), nn.Linear(H, KV * D, bias=False)
            self.mlp = MLP()
            # The reference computes cos/sin for every position once and gathers them by position_ids.
            inv = 1.0 / (w["theta"] ** (torch.arange(0, D, 2).float() / D))
            freqs = torch.outer(torch.arange(seq).float(), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            self.register_buffer("cos", emb.cos()), self.register_buffer("sin", emb.sin())

        def forward(self, hidden_states, position_ids, attention_mask, past_k=None, past_v=None):
            s = hidden_states.shape[1]
            x = self.input_layernorm(hidden_states)
            q = self.q_proj(x).view(1, s, NH, D)
            k = self.k_proj(x).view(1, s, KV, D)
            v = self.v_proj(x).view(1, s, KV, D)
            cos = self.cos[position_ids].unsqueeze(1).transpose(1, 2)
            sin = self.sin[position_ids].unsqueeze(1).transpose(1, 2)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            present_k, present_v = k, v
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=1), torch.cat([past_v, v], dim=1)
            h = hidden_states + self.o_proj(attend(q, repeat_kv(k, NH // KV), repeat_kv(v, NH // KV), attention_mask, s))
            return h + self.mlp(self.post_attention_layernorm(h)), present_k, present_v

    class CrossLayer(nn.Module):
        def __init__(self, decode: bool):
            super().__init__()
            self.decode = decode
            self.input_layernorm, self.post_attention_layernorm = RMSNorm(H), RMSNorm(H)
            self.q_proj, self.o_proj = nn.Linear(H, NH * D, bias=False), nn.Linear(NH * D, H, bias=False)
            self.k_proj, self.v_proj = nn.Linear(H, KV * D, bias=False), nn.Linear(H, KV * D, bias=False)
            self.q_norm, self.k_norm = RMSNorm(D), RMSNorm(D)
            self.cross_attn_attn_gate = nn.Parameter(torch.full((1,), 0.8))
            self.cross_attn_mlp_gate = nn.Parameter(torch.full((1,), 0.8))
            self.mlp = MLP()

        def forward(self, hidden_states, *args):
            if self.decode:
                attention_mask, k, v = args
                row_mask = None
            else:
                cross_states, row_mask, attention_mask = args
            s = hidden_states.shape[1]
            x = self.input_layernorm(hidden_states)
            q = self.q_norm(self.q_proj(x).view(1, s, NH, D))
            if not self.decode:
                k = repeat_kv(self.k_proj(cross_states).view(1, -1, KV, D), NH // KV)
                v = repeat_kv(self.v_proj(cross_states).view(1, -1, KV, D), NH // KV)
                k = self.k_norm(k)
            h = hidden_states + self.cross_attn_attn_gate.tanh() * self.o_proj(attend(q, k, v, attention_mask, s))
            m = self.mlp(self.post_attention_layernorm(h))
            if row_mask is not None:
                m = row_mask * m
            h = h + self.cross_attn_mlp_gate.tanh() * m
            return h if self.decode else (h, k, v)

    class VisionLayer(nn.Module):
        def __init__(self):
            super().__init__()
            E, VH = w["v_hidden"], w["v_heads"]
            self.heads, self.dim = VH, E // VH
            self.input_layernorm = nn.LayerNorm(E, eps=w["v_eps"])
            self.post_attention_layernorm = nn.LayerNorm(E, eps=w["v_eps"])
            self.q_proj, self.k_proj = nn.Linear(E, E, bias=False), nn.Linear(E, E, bias=False)
            self.v_proj, self.o_proj = nn.Linear(E, E, bias=False), nn.Linear(E, E, bias=False)
            self.fc1, self.fc2 = nn.Linear(E, w["v_mlp"]), nn.Linear(w["v_mlp"], E)

        def forward(self, hidden_state, attention_mask):
            b, s, e = hidden_state.shape
            x = self.input_layernorm(hidden_state)
            q = self.q_proj(x).view(b, s, self.heads, self.dim).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.heads, self.dim).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.heads, self.dim).transpose(1, 2)
            scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.dim) + attention_mask
            probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32)
            attn = torch.matmul(probs, v).transpose(1, 2).contiguous().reshape(b, s, e)
            h = hidden_state + self.o_proj(attn)
            return h + self.fc2(nn.functional.gelu(self.fc1(self.post_attention_layernorm(h))))

    class Projector(nn.Module):  # the vit net's last op: the concatenated vision states to the text width
        def __init__(self):
            super().__init__()
            self.multi_modal_projector = nn.Linear(w["v_hidden"] * 6, H)

        def forward(self, vision_states):
            return self.multi_modal_projector(vision_states).reshape(w["tiles"], w["patches"], H)

    class LmHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.lm_head = RMSNorm(H), nn.Linear(H, w["vocab"], bias=False)

        def forward(self, hidden_states):
            return self.lm_head(self.norm(hidden_states))

    class GreedyHead(nn.Module):
        def forward(self, m_logits):
            return torch.topk(m_logits.float(), 1)[1]

    class Embedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(w["vocab"] + 8, H)  # mllama's table has rows past the vocabulary

        def forward(self, input_ids):
            return self.embed_tokens(input_ids)

    f32, i64, i32 = torch.float32, torch.int64, torch.int32
    P, T = w["padded"] * w["tiles"], w["tiles"]
    return {
        "block_cache": (SelfLayer, {"input_states": ((1, 1, H), f32), "position_ids": ((1, 1), i64),
                                    "attention_mask": ((1, 1, 1, seq + 1), f32), "history_k": ((1, seq, KV, D), f32),
                                    "history_v": ((1, seq, KV, D), f32)}, ["hidden_states", "past_k", "past_v"]),
        "cross_block_cache": (lambda: CrossLayer(True), {"input_states": ((1, 1, H), f32),
                                                         "attention_mask": ((1, 1, 1, cross_len), f32),
                                                         "history_k": ((1, NH, cross_len, D), f32),
                                                         "history_v": ((1, NH, cross_len, D), f32)}, ["hidden_states"]),
        "block": (SelfLayer, {"input_states": ((1, seq, H), f32), "position_ids": ((1, seq), i64),
                              "attention_mask": ((1, 1, seq, seq), f32)}, ["hidden_states", "past_k", "past_v"]),
        "cross_block": (lambda: CrossLayer(False), {"input_states": ((1, seq, H), f32),
                                                    "cross_attention_states": ((T, w["patches"], H), f32),
                                                    "text_row_mask": ((1, seq, 1), f32),
                                                    "attention_mask": ((1, 1, seq, cross_len), f32)},
                        ["hidden_states", "past_k", "past_v"]),
        "vit_layer": (VisionLayer, {"hidden_state": ((1, P, w["v_hidden"]), f32), "attention_mask": ((1, 1, P, P), f32)},
                      ["hidden_state_out"]),
        "vit_projector": (Projector, {"vision_states": ((1, T, w["patches"], w["v_hidden"] * 6), f32)},
                          ["cross_attention_states"]),
        "lm_head": (LmHead, {"hidden_states": ((1, H), f32)}, ["m_logits"]),
        "greedy_head": (GreedyHead, {"m_logits": ((1, w["vocab"]), f32)}, ["token"]),
        "embedding_cache": (Embedding, {"input_ids": ((1, 1), i32)}, ["hidden_states"]),
        "embedding": (Embedding, {"input_ids": ((1, seq), i32)}, ["hidden_states"]),
    }


W4 = ["--quantize", "W4BF16", "--q_group_size", "64"]
BLOCK = W4 + ["--quant_input", "--quant_output"]
# kind -> (deploy flags, a big weight table: transform without the ONNX simplifier, citations)
VIT = ["--quantize", "BF16", "--quant_input", "--quant_output"]
EMBED = ["--quantize", "BF16", "--quant_output"]
KINDS = {
    "block_cache": (BLOCK + ["--addr_mode", "io_alone"], False, ["w4", "block_flags", "addr", "block_cache_io", "self_attn", "seq"]),
    "cross_block_cache": (BLOCK + ["--addr_mode", "io_alone"], False,
                          ["w4", "block_flags", "addr", "cross_cache_io", "cross_attn", "cross_layer", "tiles"]),
    "block": (BLOCK, False, ["w4", "block_flags", "block_io", "self_attn", "seq", "runtime"]),
    "cross_block": (BLOCK, False, ["w4", "block_flags", "cross_io", "cross_attn", "cross_layer", "tiles", "seq"]),
    "vit_layer": (VIT, False, ["vit_flags", "vit_io", "tiles", "vision_layer", "vision_model"]),
    "vit_projector": (VIT, False, ["vit_flags", "vit_io", "projector"]),
    "lm_head": (W4 + ["--quant_input"], True, ["lm_flags", "lm_io", "runtime"]),
    "greedy_head": ([], False, ["greedy_flags", "greedy_io", "runtime"]),
    "embedding_cache": (EMBED, True, ["embed_flags", "embed_io", "embed_table", "runtime"]),
    "embedding": (EMBED, True, ["embed_flags", "embed_io", "embed_table", "seq", "runtime"]),
}
FLAG_NOTES = {
    "vit_projector": "the projector inside the reference's BF16 vit net: its input is an interior bf16 tensor "
                     "(--quant_input here), its output the net's (--quant_output as the reference)",
    "vit_layer": "a layer inside the reference's BF16 vit net reads and writes bf16 like every interior tensor, hence "
                 "--quant_input here; the vit net itself has only --quant_output (its input is the f32 pixels)",
}


def available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def wait_for_memory(need: int) -> None:
    waited = 0
    while available() < need:
        if waited % 300 == 0:
            print(f"    waiting for {need >> 30} GB free ({available() / 2**30:.1f} GB now)", flush=True)
        time.sleep(20)
        waited += 20


def export(kind: str, w: dict, seq: int, folder: Path) -> tuple[Path, dict]:
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter is the one wanted

    factory, inputs, outputs = modules(w, seq)[kind]
    torch.manual_seed(0)
    with torch.no_grad():
        model = factory().eval()
        for name, p in model.named_parameters():
            if p.dim() > 1:  # the norms keep ones, the gates their value
                p.normal_(0.0, 0.02)
        args = tuple(torch.zeros(s, dtype=t) if t != torch.float32 else torch.randn(s, dtype=t) for s, t in inputs.values())
        onnx_path = folder / f"{kind}.onnx"
        torch.onnx.export(model, args, str(onnx_path), input_names=list(inputs), output_names=outputs,
                          opset_version=17, do_constant_folding=True, dynamo=False)
    shapes = {n: {"shape": list(s), "dtype": str(t).replace("torch.", "")} for n, (s, t) in inputs.items()}
    return onnx_path, shapes


def measure(kind: str, w: dict, seq: int, toolchain) -> dict:
    flags, big, _ = KINDS[kind]
    folder = WORK / kind
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    started = time.perf_counter()
    print(f"  {kind}: exporting ...", flush=True)
    onnx_path, shapes = export(kind, w, seq, folder)
    exported = time.perf_counter()
    transform_args = ["--model_name", kind, "--model_def", onnx_path.name, "--mlir", f"{kind}.mlir"]
    transform_args += list(TRANSFORM_OPTIONS) if big else []
    wait_for_memory(NEED_AVAILABLE)
    print(f"  {kind}: model_transform.py {' '.join(transform_args)}", flush=True)
    toolchain.python_tool("model_transform.py", transform_args, folder, folder / "transform.log")
    transformed = time.perf_counter()
    onnx_bytes = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".onnx", ".data") or "onnx" in p.name)
    for p in folder.iterdir():  # the ONNX and its external data are no longer needed
        if p.name.startswith(kind + ".onnx") or p.suffix == ".data" or p.name.endswith("_origin.mlir"):
            p.unlink()
    deploy_args = ["--mlir", f"{kind}.mlir", *flags, "--chip", "bm1684x", "--model", f"{kind}.bmodel"]
    wait_for_memory(NEED_AVAILABLE // 2)
    print(f"  {kind}: model_deploy.py {' '.join(deploy_args)}", flush=True)
    toolchain.python_tool("model_deploy.py", deploy_args, folder, folder / "deploy.log")
    deployed = time.perf_counter()
    # A net that runs as a dynamic subnet (greedy_head's TopK) leaves an empty profile: the static
    # cost model does not price it, which is recorded rather than guessed.
    try:
        estimate = read_profile(folder)
        unpriced = None if estimate is not None else "model_deploy.py wrote no compiler_profile_0.txt"
    except ProfileError:
        estimate, unpriced = None, "compiler_profile_0.txt has no TCYC line: " + dynamic_subnets(folder, kind)
    bmodel = folder / f"{kind}.bmodel"
    result = {
        "shapes": shapes, "transform_flags": transform_args,
        "deploy_flags": deploy_args, "flag_note": FLAG_NOTES.get(kind, ""),
        "estimate": estimate.to_json() if estimate else None, "unpriced": unpriced,
        "ms": round(estimate.ms, 4) if estimate else None, "bound": estimate.bound if estimate else None,
        "read_bytes": estimate.read_bytes if estimate else None, "write_bytes": estimate.write_bytes if estimate else None,
        "flops": estimate.flops if estimate else None,
        "onnx_bytes": onnx_bytes, "bmodel_bytes": bmodel.stat().st_size if bmodel.is_file() else None,
        "seconds": {"export": round(exported - started, 1), "transform": round(transformed - exported, 1),
                    "deploy": round(deployed - transformed, 1)},
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    shutil.rmtree(folder, ignore_errors=True)
    return result


def dynamic_subnets(folder: Path, kind: str) -> str:
    """Which subnets of the deployed net tpu-mlir runs in dynamic mode (its final MLIR says so)."""
    final = next(folder.glob(f"{kind}_bm1684x_*_final.mlir"), None)
    text = final.read_text(errors="replace") if final else ""
    ops = sorted(set(re.findall(r'"tpu\.(\w+)"', text)) - {"Buffer"})
    if "TPU_DYNAMIC" in text:
        return f"its subnet runs in TPU_DYNAMIC mode ({', '.join(ops)}), which the static cost model does not price"
    return f"no cost records ({', '.join(ops) or 'final MLIR not found'})"


def citations(kind: str) -> list[dict]:
    return [{"file": CITE[key][0], "lines": CITE[key][1], "what": CITE[key][2]} for key in KINDS[kind][2]]


def totals(kinds: dict, w: dict) -> dict:
    """The reference's call sequence (python/llama3.py) summed over the estimates it has."""
    n_cross = w["cross_layers"]
    n_self = w["layers"] - n_cross
    first = [("vit_layer", w["v_layers"]), ("vit_projector", 1), ("embedding", 1), ("block", n_self), ("cross_block", n_cross),
             ("lm_head", 1), ("greedy_head", 1)]
    step = [("embedding_cache", 1), ("block_cache", n_self), ("cross_block_cache", n_cross), ("lm_head", 1),
            ("greedy_head", 1)]
    out = {}
    for name, calls in (("first_token", first), ("decode_step", step)):
        have = [(k, n) for k, n in calls if kinds.get(k, {}).get("ms") is not None]
        out[name] = {"ms": round(sum(kinds[k]["ms"] * n for k, n in have), 2),
                     "calls": {k: n for k, n in calls}, "missing": [k for k, n in calls if k not in kinds],
                     "unpriced": [k for k, n in calls if k in kinds and kinds[k].get("ms") is None]}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help="which nets, in this order")
    parser.add_argument("--remeasure", action="append", default=[], help="a kind to measure again (repeatable)")
    parser.add_argument("--seq", type=int, default=REFERENCE_SEQ, help="the reference's sequence length")
    args = parser.parse_args()
    os.nice(10)  # the machine is shared with other compiles; every tool inherits this
    w = text_widths()
    toolchain = find_toolchain()
    data = json.loads(OUTPUT.read_text()) if OUTPUT.is_file() else {}
    kinds = data.get("kinds", {})
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        sums = totals(kinds, w)
        for kind in kinds:  # citations follow the script, the figures stay as measured
            kinds[kind]["citations"] = citations(kind)
            kinds[kind]["calls"] = {name: t["calls"][kind] for name, t in sums.items() if kind in t["calls"]}
            kinds[kind].pop("per_model", None)
            kinds[kind].setdefault("unpriced", None)
        save_json(OUTPUT, {
            "what": "the sophon-demo Llama3_2_Vision port's nets at the 11B widths, priced by tpu-mlir's cost model",
            **stamp(), "tpu_mlir": toolchain.tpu_mlir_version, "seq": args.seq, "widths": w,
            "reference": {"first_token_s": REFERENCE_FIRST_TOKEN_S, "tokens_per_s": REFERENCE_TOKENS_PER_S,
                          "source": REFERENCE_SOURCE, "lines": "L99-L101 (the performance table)"},
            "kinds": kinds, "totals": sums,
            "notes": ["vit_layer is one local encoder layer of the tower, counted 40 times (32 local + 8 global layers, "
                      "same shapes; a global layer's two tanh gates are left out), plus vit_projector; the patch embedding, "
                      "position embeddings and layer norms of the tower are left out",
                      "cost model only: no launch, host or DDR-contention time; weights random, shapes and flags the reference's",
                      "modules repeat the reference's patched modeling_mllama.py op for op rather than transformers' classes, "
                      "whose K/V layouts differ from the reference's; exported with opset 17 (the reference used 15)",
                      "bound: the engine (TIU compute or GDMA memory) busy longer in the cost model's timeline",
                      "unpriced: the net compiles but the cost model has no records for it (greedy_head's TopK runs as a "
                      "dynamic subnet), so the sums leave it out"],
        })

    for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
        if kind not in KINDS:
            raise SystemExit(f"unknown kind {kind}; one of {', '.join(KINDS)}")
        if kind in kinds and kind not in args.remeasure:
            continue
        print(f"{kind}:", flush=True)
        kinds[kind] = measure(kind, w, args.seq, toolchain)
        r = kinds[kind]
        print(f"  {kind}: " + (f"{r['ms']:.3f} ms, {r['bound']}-bound" if r["ms"] is not None else r["unpriced"]), flush=True)
        save()
    save()

    rows = []
    for kind, r in kinds.items():
        if r["estimate"] is None:
            rows.append([kind, "-", "unpriced", "", "", "", "", "", "", ", ".join(f"{n} x{c}" for n, c in r["calls"].items())])
            continue
        e = Estimate.from_json(r["estimate"])
        rows.append([kind, f"{e.ms:.3f}", e.bound, f"{e.tiu_cycles / 1e6:.3f}", f"{e.gdma_cycles / 1e6:.3f}",
                     mb(e.read_bytes), mb(e.write_bytes), mb(e.ddr_bytes), f"{e.flops / 1e9:.2f}",
                     ", ".join(f"{n} x{c}" for n, c in r["calls"].items())])
    print(table(rows, ["net", "ms", "bound", "TIU ms", "GDMA ms", "read", "write", "DDR to DDR", "GFLOP", "calls per first token / decode step"]))
    t = totals(kinds, w)
    for name, ref in (("first_token", f"{REFERENCE_FIRST_TOKEN_S} s measured"),
                      ("decode_step", f"{1000 / REFERENCE_TOKENS_PER_S:.0f} ms measured")):
        left = t[name]["missing"] + t[name]["unpriced"]
        missing = f" (without {', '.join(left)})" if left else ""
        print(f"{name}: {t[name]['ms']:.1f} ms by the cost model{missing}; reference {ref}")
    print(f"written {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
