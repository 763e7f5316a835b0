#!/usr/bin/env python3
"""Bytes one decode step reads at Llama-3.2-11B-Vision widths (or the 90B's), for int4 / int8 (/ bf16)
decoder weights, and the upper bound on tokens/s that the BM1684X's DRAM bandwidth allows.

How: takes the work directory of bench/convert_scale.py (real 11B widths, a short stack,
exported and compiled at --seq), and for each quantization has a bmodel of one
self-attention decode layer (block_cache_<i>) and one cross-attention decode layer: the
int4 ones are the per-net bmodels `lvb compile --quant int4` made; the others are deployed
here from the same cached MLIR with lvb's own deploy step and options
(lvb.compile.tpumlir.deploy, W8BF16 / BF16, group size 64, no simulator check).
Their weight bytes and I/O tensors are read with lvb.bmodel.inspect_bmodel
(tpu-mlir's model_tool), the LM head's from the compiled bf16 lm_head bmodel.

Then, for the full model whose widths the checkpoint has (its layer counts from its published
config; the 11B: 32 self-attention + 8 cross-attention layers, the 90B: 80 + 20), the LM
head in bf16 and one embedding row: weights = n_self x self + n_cross x cross + lm_head + one row;
KV cache = every slot of every self-attention layer's K and V at --seq, in the bmodel's
I/O dtype (bf16 as lvb compiles it since its nets take bf16 state; fp32 in a work directory
compiled before) and in bf16; cross-attention K/V = 8 layers x (K + V) of 6404 tokens, at
the 8 KV heads lvb keeps (the bmodel's I/O dtype, and bf16) and in the
reference port's layout repeated to all 32 heads ([1, 32, 6404, 128] per tensor, bf16).
tokens/s <= bandwidth / bytes per token. Bandwidth: 64 GB/s, the BM1684X figure in
Sophgo's own LLM performance model in tpu-mlir (python/llm/LlmProfile.py, chip "bm1684x":
dma_bw = 64., with decode_ddr_util = 0.8; tpu-mlir 1.30.2's python/tools/llm_analyse.py
usage line `-c bm1684x -s 2048 -t 16 -b 64`, -b = chip memory bandwidth in GB/s). No
product page or datasheet with a DRAM bandwidth figure was found in the searchable corpora.
Compared with the reference port's measured tokens/s (common.REFERENCE_TOKENS_PER_S, with its
source).

Prints a table and records it in bench/results/decode_bytes.json (an entry per model whose
widths the work dir has); exits 0. No timed assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REFERENCE_SOURCE, REFERENCE_TOKENS_PER_S, latest_compile, full_model, gb, machine, mb, model_of, record_result, table  # noqa: E402

from lvb.bmodel import inspect_bmodel  # noqa: E402
from lvb.dtypes import value_bytes  # noqa: E402
from lvb.compile.tpumlir import DeployOptions, deploy  # noqa: E402
from lvb.contract import NetSpec  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402
from lvb.toolchain import find_toolchain  # noqa: E402

BANDWIDTH = 64e9  # bytes/s; tpu-mlir python/llm/LlmProfile.py, bm1684x: dma_bw = 64.
DDR_UTIL = 0.8  # same file: decode_ddr_util for bm1684x
SOURCE = ("tpu-mlir's LLM performance model, https://github.com/sophgo/tpu-mlir/blob/06ee352af9c2d8120d7f0bc338ab8d0348d6d676/"
          "python/llm/LlmProfile.py (chip bm1684x: tflops = 16., dma_bw = 64., decode_ddr_util = 0.8); tpu-mlir 1.30.2's "
          "python/tools/llm_analyse.py documents the same: `-c bm1684x ... -t 16 -b 64`, -b = chip memory bandwidth in GB/s")


def default_work() -> Path | None:
    candidates = sorted(OUT.glob("work-11b-widths-*-seq512-chunk128"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def bmodel_for(work: Path, net: str, quant: str, out: Path, toolchain) -> tuple[Path, float | None]:
    """The per-net bmodel of `net` at `quant`: lvb compile's when it made one, else deployed here."""
    manifest = latest_compile(work, quant=quant)
    entry = manifest.get("nets", {}).get(net)
    if entry and (work / entry["bmodel"]).is_file():
        return work / entry["bmodel"], entry.get("seconds")
    folder = out / quant / net
    bmodel = folder / f"{net}.bmodel"
    result = folder / "result.json"
    if bmodel.is_file() and result.is_file():
        return bmodel, json.loads(result.read_text())["seconds"]
    mlirs = sorted((work / "compile" / net).glob("mlir-*/" + f"{net}.mlir"))
    if not mlirs:
        raise SystemExit(f"{work}: no MLIR for {net}; run bench/convert_scale.py first")
    mlir = mlirs[-1]
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for needed in mlir.parent.iterdir():  # deploy reads the MLIR's weight file from its own folder, as lvb compile does
        (tmp / needed.name).symlink_to(needed.resolve())
    # The net's bf16 I/O as lvb compile gives it (contract.NetSpec.bf16_io).
    export = json.loads((work / "export" / "manifest.json").read_text())
    bf16_inputs, bf16_outputs = NetSpec.from_json(export["nets"][net]).bf16_io()
    options = DeployOptions(quantize=quant, chip="bm1684x", group_size=64, bf16_inputs=bf16_inputs, bf16_outputs=bf16_outputs)
    print(f"  deploying {net} at {quant} ({' '.join(options.args())}) ...", flush=True)
    started = time.perf_counter()
    deploy(toolchain, tmp / mlir.name, tmp, bmodel.name, options, tmp / "deploy.log")
    seconds = time.perf_counter() - started
    for link in [p for p in tmp.iterdir() if p.is_symlink()]:
        link.unlink()
    (tmp / "result.json").write_text(json.dumps({"net": net, "quant": quant, "seconds": round(seconds, 1),
                                                  "options": options.args()}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    print(f"    {seconds:.0f} s", flush=True)
    return bmodel, round(seconds, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=default_work(), help="work dir of bench/convert_scale.py")
    parser.add_argument("--quants", default="int4,int8", help="decoder-layer quantizations to compare (int4, int8, bf16)")
    parser.add_argument("--out", type=Path, default=OUT / "decode_bytes", help="where extra deploys go")
    parser.add_argument("--bandwidth", type=float, default=BANDWIDTH / 1e9, help="DRAM bandwidth in GB/s")
    args = parser.parse_args()
    if args.work is None or not (args.work / "export" / "manifest.json").is_file():
        raise SystemExit("no work directory; run bench/convert_scale.py first or pass --work")
    work = args.work.resolve()
    export = json.loads((work / "export" / "manifest.json").read_text())
    spec = ModelSpec.from_dir(export["model"]["dir"])
    t, v = spec.text, spec.vision
    seq = export["settings"]["seq"]
    self_layer = t.self_attention_layers[0]
    cross_layer = t.cross_attention_layers[0]
    toolchain = find_toolchain()
    quants = [q.strip() for q in args.quants.split(",") if q.strip()]
    bandwidth = args.bandwidth * 1e9

    # The LM head and one embedding row: bf16, from lvb compile's int4 build (they are bf16 there).
    int4 = latest_compile(work, quant="int4")
    if not int4:
        raise SystemExit(f"{work}: no int4 compile; run bench/convert_scale.py first")
    head_info = inspect_bmodel(work / int4["nets"]["lm_head"]["bmodel"], toolchain)
    lm_head = head_info.nets["lm_head"].weight_bytes
    embed_row = t.hidden_size * 2  # one bf16 row of the 128264 x 4096 table (a gather)

    measured = {}
    for quant in quants:
        layers = {}
        for kind, layer in (("self", self_layer), ("cross", cross_layer)):
            net = f"block_cache_{layer}"
            bmodel, seconds = bmodel_for(work, net, quant, args.out.resolve(), toolchain)
            info = inspect_bmodel(bmodel, toolchain)
            step = info.decode_step()
            inputs = {tensor.name: tensor for tensor in info.nets[net].inputs}
            layers[kind] = {"net": net, "weights": info.nets[net].weight_bytes, "bmodel": str(bmodel), "deploy_s": seconds,
                            "kv": step["kv_cache"], "cross": step["cross_kv"],
                            "inputs": {n: [list(x.shape), x.dtype] for n, x in inputs.items()}}
        measured[quant] = layers

    model = model_of(t.hidden_size)  # the published model this checkpoint has the widths of
    full = full_model(model)
    n_self, n_cross = full["text_layers"] - len(full["cross_layers"]), len(full["cross_layers"])
    KV, d, V = t.num_kv_heads, t.head_dim, v.tokens_per_image
    self_inputs = measured[quants[0]]["self"]["inputs"]
    kv_dtype = self_inputs["past_k"][1]
    cross_dtype = measured[quants[0]]["cross"]["inputs"]["cross_k"][1]
    kv_io = n_self * 2 * seq * KV * d * value_bytes(kv_dtype)
    kv_bf16 = n_self * 2 * seq * KV * d * 2
    cross_io = n_cross * 2 * V * KV * d * value_bytes(cross_dtype)
    cross_bf16 = n_cross * 2 * V * KV * d * 2
    cross_ref = n_cross * 2 * V * t.num_heads * d * 2  # [1, 32, 6404, 128] bf16 per tensor

    print(f"\nwork: {work}\nmeasured per decode layer (model_tool --info / --weight of the per-net bmodel):")
    rows = []
    for quant, layers in measured.items():
        for kind in ("self", "cross"):
            m = layers[kind]
            rows.append([quant, f"{m['net']} ({kind})", mb(m["weights"]), mb(m["kv"]), mb(m["cross"]),
                         f"{m['deploy_s']}" if m["deploy_s"] is not None else "-"])
    rows.append(["bf16", "lm_head", mb(lm_head), "", "", ""])
    print(table(rows, ["quant", "net", "weights", f"KV cache in (seq {seq}, {kv_dtype})", f"cross K/V in ({cross_dtype})",
                       "deploy s"]))

    print(f"\nOne decode step of the full {model.upper()} ({n_self} self + {n_cross} cross layers, lm_head bf16, one embedding row), "
          f"seq {seq}:")
    rows, totals, recorded = [], {}, []
    for quant, layers in measured.items():
        weights = n_self * layers["self"]["weights"] + n_cross * layers["cross"]["weights"] + lm_head + embed_row
        for label, kv, cross in (
            (f"lvb today: KV {kv_dtype}, cross K/V at {KV} heads {cross_dtype}", kv_io, cross_io),
            (f"KV bf16, cross K/V at {KV} heads bf16", kv_bf16, cross_bf16),
            (f"reference layout: KV bf16, cross K/V repeated to {t.num_heads} heads bf16", kv_bf16, cross_ref),
        ):
            total = weights + kv + cross
            totals[(quant, label)] = total
            recorded.append({"quant": quant, "layout": label, "weights": weights, "kv": kv, "cross": cross, "total": total,
                             "tokens_per_s": bandwidth / total, "tokens_per_s_at_util": DDR_UTIL * bandwidth / total})
            rows.append([quant, label, gb(weights), mb(kv), mb(cross), gb(total), f"{bandwidth / total:.1f}",
                         f"{DDR_UTIL * bandwidth / total:.1f}"])
    print(table(rows, ["quant", "layout", "weights", "KV cache", "cross K/V", "bytes / token", f"tok/s at {args.bandwidth:g} GB/s",
                       f"at {DDR_UTIL:.0%} of it"]))

    ref_int4 = totals.get(("int4", f"reference layout: KV bf16, cross K/V repeated to {t.num_heads} heads bf16"))
    ours_int4 = totals.get(("int4", f"lvb today: KV {kv_dtype}, cross K/V at {KV} heads {cross_dtype}"))
    print(f"\nbandwidth: {args.bandwidth:g} GB/s, from {SOURCE}")
    if ref_int4 and model == "11b":  # the reference port's measured speed is the 11B's
        print(f"reference port (sophon-demo Llama3_2_Vision, int4, seq 512, SE7-32): {REFERENCE_TOKENS_PER_S} tokens/s measured "
              f"({REFERENCE_SOURCE}); with its layout the bound here is {bandwidth / ref_int4:.1f} tokens/s, so it runs at "
              f"{REFERENCE_TOKENS_PER_S * ref_int4 / bandwidth:.0%} of the bandwidth bound ({REFERENCE_TOKENS_PER_S * ref_int4 / 1e9:.1f} GB/s effective).")
        print(f"lvb int4 as compiled today reads {gb(ours_int4)} per token vs the reference layout's {gb(ref_int4)} "
              f"({1 - ours_int4 / ref_int4:.1%} fewer bytes; {1 - totals[('int4', f'KV bf16, cross K/V at {KV} heads bf16')] / ref_int4:.1%} "
              f"fewer with bf16 KV and cross K/V I/O); at the reference's "
              f"efficiency that is about {REFERENCE_TOKENS_PER_S * ref_int4 / ours_int4:.1f} tokens/s.")
    cross_share = cross_ref / ref_int4 if ref_int4 else 0
    print(f"cross K/V: {mb(cross_ref)} per token repeated to {t.num_heads} heads ({cross_share:.0%} of the reference's bytes) vs "
          f"{mb(cross_bf16)} at {KV} KV heads in bf16 ({mb(cross_io)} as lvb's {cross_dtype} I/O today)")
    m = machine()
    print(f"(bmodel figures do not depend on the machine; inspected on {m['cpu']}, {m['cores']} cores)")
    layers = {quant: {kind: {k: one[k] for k in ("net", "weights", "kv", "cross", "deploy_s", "inputs")} for kind, one in ls.items()}
              for quant, ls in measured.items()}
    path = record_result("decode_bytes", {"work": work.name, "seq": seq, "quants": quants, "bandwidth": bandwidth,
                                          "ddr_util": DDR_UTIL, "layers": layers, "lm_head": lm_head, "embed_row": embed_row,
                                          "n_self": n_self, "n_cross": n_cross, "rows": recorded}, label=model)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
