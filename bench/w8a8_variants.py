#!/usr/bin/env python3
"""Where a `--vision-quant w8a8` vision layer's time goes on tpu-mlir's cost model, and what the
remaining levers would buy: the 11B's 4-tile layer as lvb builds it, with more of its attention
core in INT8, and with tpu-mlir's other layer-group strategies (issue #30's INT8 first-token goal).

Each variant is vision_time.py's layer (the 11B's widths, four 560-px tiles) deployed as lvb
deploys w8a8 over a uniform table (vision_time.deploy_uniform: the estimate reads no threshold),
the quantize table or the deploy options changed as the variant says. The first token it implies
replaces the 40 vision layers of the recorded `lvb-vision-w8a8` turn (device_time.json). Run
`bench/vision_time.py --vision-quant w8a8 --uniform-thresholds --label lvb-vision-w8a8 --base lvb`
first (its BF16 build is the transform every variant deploys). Then the floor: the first token with
every vision layer at its compute engine's time, and one head group's attention core alone
(repro_vision_channel.Core) with its softmax in each of NORMALIZE's forms.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from common import CONFIGS, record_result, recorded, table
from lvb.spec import ModelSpec
from vision_time import deploy_uniform, uniform_compiler, work_dir

BASE = "lvb-vision-w8a8"  # device_time.json's turn the variants change the vision layers of
NET = "vision_layer_0"


def attention_matmuls(onnx_path: Path) -> tuple[set[str], set[str]]:
    """The attention core's matmuls by tpu-mlir's op names: (scores Q K^T, probabilities x V), told
    apart by the graph: a score matmul reaches a Softmax through element-wise ops, the other reads one."""
    import onnx

    from lvb.compile.calibration import op_name

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for tensor in node.input:
            consumers.setdefault(tensor, []).append(node)
    scores, values = set(), set()
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        node = producer.get(softmax.input[0])
        while node is not None and node.op_type != "MatMul":
            node = producer.get(node.input[0])
        after = consumers.get(softmax.output[0], [])
        while len(after) == 1 and after[0].op_type != "MatMul":  # the casts around transformers' fp32 softmax
            after = consumers.get(after[0].output[0], [])
        scores |= {op_name(node)} if node is not None else set()
        values |= {op_name(n) for n in after if n.op_type == "MatMul"}
    return scores, values


def variants(scores: set[str], values: set[str]) -> list[dict]:
    """(label, which quantize-table ops stay out of INT8, more deploy options, what it is; "core": their mode)."""
    core = {"label": "as lvb builds it", "keep": None, "extra": (),
            "what": "INT8 projections and MLP, the attention core bf16 (lvb's quantize table)"}
    return [
        core,
        {"label": "attention core F16", "keep": None, "extra": (), "core": "F16",
         "what": "the quantize table's ops in F16 instead of bf16 (the padding channel's key value overflows F16: for cost only)"},
        {"label": "score matmuls INT8", "keep": lambda op: op not in scores, "extra": (),
         "what": "Q K^T in INT8 too (the mask channel's value would need its own scale: for cost)"},
        {"label": "every attention matmul INT8", "keep": lambda op: op not in scores | values, "extra": (),
         "what": "Q K^T and the probabilities x V in INT8 (INT8 probabilities round to zero: for cost only)"},
        *({"label": f"`{' '.join(o)}`", "keep": None, "extra": o, "what": "tpu-mlir's other layer-group search"}
          for o in (("--opt", "1"), ("--opt", "3"), ("--shape_secs_search_strategy", "1"),
                    ("--shape_secs_search_strategy", "2"))),
    ]


def figures(estimate) -> dict:
    """An estimate's times in ms: the whole, each engine's busy time, and each op type's."""
    return {"ms": estimate.ms, "tiu_ms": estimate.tiu_cycles / 1e6, "gdma_ms": estimate.gdma_cycles / 1e6,
            "ops_ms": {op: {"tiu": c["tiu"] / 1e6, "gdma": c["gdma"] / 1e6} for op, c in estimate.ops.items()}}


def softmax_forms(vision, groups: int, folder: Path, toolchain) -> list[dict]:
    """The attention core of one of the layer's `groups` head groups as lvb exports it (the padding channel
    scaled before it is expanded: repro_vision_channel's `channel_scale_first`) at `vision`'s widths, BF16
    as w8a8's quantize table keeps it, with its scores turned into weights in each of NORMALIZE's forms."""
    from repro_vision_channel import NORMALIZE, Core, build, inputs

    from lvb.contract import padded_patches
    from lvb.devicetime import read_profile

    heads, dim = vision.num_heads // groups, vision.hidden_size // vision.num_heads
    x = inputs(vision.max_num_tiles, padded_patches(vision.patches_per_tile), vision.patches_per_tile, heads, dim,
               vision.max_num_tiles)
    rows = []
    for normalize in NORMALIZE:
        print(f"deploying one head group's attention core: {normalize} ...", flush=True)
        build(Core("channel_scale_first", dim ** -0.5, normalize), dict(zip(["q", "k", "v", "pad"], x)), ["o"],
              folder / normalize, "core", (), toolchain)
        rows.append({"form": normalize, "groups": groups, "heads": heads} | figures(read_profile(folder / normalize)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.parse_args()
    work = work_dir()
    if not (work / "export" / "manifest.json").is_file():
        raise SystemExit(f"error: {work} holds no export; run `bench/vision_time.py --vision-quant w8a8 "
                         "--uniform-thresholds --label lvb-vision-w8a8 --base lvb` first")
    compiler = uniform_compiler(work)
    job = next(j for j in compiler.jobs if j.name == NET)
    scores, values = attention_matmuls(job.onnx)
    if not scores or len(scores) != len(values):
        raise SystemExit(f"error: {job.onnx} has {len(scores)} score and {len(values)} value matmuls; the exporter "
                         "changed the attention core, and this script with it")
    base = recorded("device_time", "bench/device_time.py")[BASE]
    turn = next(t for t in base["turns"] if t["tiles"] == 4)
    ratio = next(r for r in base["against_reference"]["rows"] if r["tiles"] == 4)["first_token_ratio"]
    reference_ms = turn["first_token_ms"] / ratio
    vision = ModelSpec.from_config(json.loads(CONFIGS["11b"].read_text())).vision
    layers = vision.num_layers + vision.num_global_layers
    base_ms = (turn["first_token_by_kind"]["vision_layer"] + turn["first_token_by_kind"]["vision_global"]) / layers

    rows = []
    for variant in variants(scores, values):
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            print(f"deploying {NET}: {variant['label']} ...", flush=True)
            estimate = deploy_uniform(compiler, job, Path(scratch), variant["keep"], variant["extra"],
                                      variant.get("core", "BF16"))
        first = turn["first_token_ms"] + layers * (estimate.ms - base_ms)
        # The same with every vision layer at its compute engine's time, its memory transfers all
        # hidden: no schedule of the same ops does better.
        floor = turn["first_token_ms"] + layers * (estimate.tiu_cycles / 1e6 - base_ms)
        rows.append({"variant": variant["label"], "what": variant["what"]} | figures(estimate)
                    | {"read_mb": estimate.read_bytes / 1e6, "write_mb": estimate.write_bytes / 1e6,
                       "first_token_ms": first, "first_token_ratio": first / reference_ms,
                       "compute_bound_first_token_ms": floor, "compute_bound_ratio": floor / reference_ms})
    print(table([[r["variant"], f"{r['ms']:.3f}", f"{r['tiu_ms']:.2f}", f"{r['gdma_ms']:.2f}", f"{r['read_mb']:.1f}",
                  f"{r['first_token_ms']:,.1f}", f"{r['first_token_ratio']:.3f}", f"{r['compute_bound_ratio']:.3f}"]
                 for r in rows],
                ["variant", "layer ms", "compute busy ms", "GDMA busy ms", "read MB", "first token ms", "vs reference",
                 "compute-bound vs reference"]))
    for row in rows[:4]:
        print(f"\n{row['variant']}, the busiest op types (ms compute / memory engine): "
              + ", ".join(f"{op} {c['tiu']:.2f} / {c['gdma']:.2f}" for op, c in row["ops_ms"].items()))

    with tempfile.TemporaryDirectory(dir=work) as scratch:
        forms = softmax_forms(vision, len(scores), Path(scratch), compiler.toolchain)  # a score matmul a head group
    print(table([[f["form"], f"{f['ms']:.3f}", f"{f['tiu_ms']:.3f}", f"{f['gdma_ms']:.3f}",
                  ", ".join(f"{op} {c['tiu']:.3f}" for op, c in f["ops_ms"].items() if c["tiu"] >= 0.05)]
                 for f in forms],
                ["one head group's core", "ms", "compute busy ms", "memory busy ms", "compute by op type (ms)"]))
    result = {"net": NET, "base": BASE, "layers": layers, "base_layer_ms": base_ms, "reference_ms": reference_ms,
              "rows": rows, "softmax_forms": forms}
    print(f"\nresults: {record_result('w8a8_variants', result)}")


if __name__ == "__main__":
    main()
