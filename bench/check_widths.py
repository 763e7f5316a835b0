#!/usr/bin/env python3
"""A speculative check on the BM1684X at Llama-3.2-11B-Vision widths, by tpu-mlir's cost model:
what the model's nets cost when they check a draft's k proposals, as `lvb export --draft-tokens`
builds them (a prefill chunk of k + 1 tokens, heads that score its rows in one launch).

How: the 11B-width checkpoint of bench/batch_decode.py (2 text layers, one of them
cross-attention, 1 + 1 vision layers, 4 tiles of 560 px) is exported with `lvb export --seq 512
--chunk 2,4,16 --draft-tokens 7` (prefill stages of 16, 8, 4 and 2 tokens; LM and greedy heads
with stages of one row and of 8), and only the first net of each kind a check launches, and the
self-attention decode net beside them, is compiled (INT4 blocks, INT4 head as device_time.json's
`lvb-head-int4`, `--check none`). Each stage's estimate comes from its deploy's
compiler_profile_0.txt (lvb.devicetime). bench/speculative.py prices a check from these: the
smallest priced chunk that holds k + 1 tokens, the heads once over every row.

Heavy: run it as `flock /work/heavy.lock python bench/check_widths.py`; `--clean` deletes the work
folder after. Writes bench/results/check_widths.json; prints a table; no timed assertions.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from common import (OUT, checkpoint_complete, compile_first_of_kinds, first_of_kinds_record, geometry_11b, lvb_export,  # noqa: E402
                    record_result, table, write_streaming_checkpoint)

from lvb.contract import Kind  # noqa: E402

# What a check launches, and the self-attention decode step beside it: the plain step a check is
# weighed against, in the same build (the chunk decides the attention's form).
CHECK_KINDS = (Kind.EMBED, Kind.SELF_PREFILL, Kind.CROSS_PREFILL, Kind.LM_HEAD, Kind.GREEDY_HEAD, Kind.SELF_DECODE)


def stage_label(kind: str, shape: list[int]) -> str:
    """A stage by what it takes: a prefill net's chunk, a head's rows."""
    if kind == Kind.LM_HEAD.value:
        return "x".join(map(str, shape[:2]))  # [B, R] rows of hidden states
    if kind == Kind.GREEDY_HEAD.value:
        return str(shape[0])
    return str(shape[1])  # [1, C, ...]: the chunk


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chunk", default="2,4,16", help="prefill chunks beside the check's own (k + 1)")
    parser.add_argument("--draft-tokens", type=int, default=7)
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--head-quant", default="int4")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--clean", action="store_true", help="delete the work folder after a successful run")
    args = parser.parse_args()
    geometry = geometry_11b(layers=2, vision_layers=1, global_layers=1, cross=(1,))
    checkpoint = args.out / f"ckpt-{geometry.name}"
    if not checkpoint_complete(checkpoint):
        print(f"writing {checkpoint} ...", flush=True)
        write_streaming_checkpoint(checkpoint, geometry)
    work = args.out / f"work-{geometry.name}-seq512-chunk{args.chunk.replace(',', '-')}-draft{args.draft_tokens}"
    lvb_export(checkpoint, work, "--seq", "512", "--chunk", args.chunk, "--draft-tokens", str(args.draft_tokens))
    results = compile_first_of_kinds(work, CHECK_KINDS, args.quant, args.head_quant)
    nets = first_of_kinds_record(results)
    ms = {}
    for net in nets.values():
        ms[net["kind"]] = {stage_label(net["kind"], shape): stage["cycles"] / 1e6
                           for shape, stage in zip(net["first_input"], net["device"])}
    data = {"settings": {"geometry": geometry.name, "seq": 512, "chunk": args.chunk, "draft_tokens": args.draft_tokens,
                         "quant": args.quant, "head_quant": args.head_quant, "check": "none"},
            "nets": nets, "ms": ms}
    record_result("check_widths", data)
    rows = [[kind, stage, f"{t:.2f}"] for kind, stages in ms.items() for stage, t in stages.items()]
    print(table(rows, ["kind", "stage", "ms"]))
    if args.clean:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
