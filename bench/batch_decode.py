#!/usr/bin/env python3
"""Continuous batching on the BM1684X at Llama-3.2-11B-Vision widths, by tpu-mlir's cost model:
what one decode step of B conversations costs, the aggregate and per-conversation tokens/s at
B = 1, 2, 4, 8, against the goals (B=4 aggregate >= 3x B=1; per conversation >= 0.75x a lone one).

How: a synthetic checkpoint with the 11B's widths (bench/common.py; 2 text layers, one of them
cross-attention, 1 + 1 vision layers, 4 tiles of 560 px) is exported with `lvb export --batch
8,4,2,1 --seq 512`, and only the decode nets (embed_cache, a self- and a cross-attention
block_cache, lm_head, greedy_head) are compiled (INT4 blocks, BF16 head, `--check none`),
each with one stage per B sharing the weights, as `lvb compile` builds them. Each stage's
estimate comes from the deploy's compiler_profile_0.txt (lvb.devicetime). A step of the full
11B is the embedding, 32 self-attention and 8 cross-attention layers (the published config's
counts, lvb.contract.plan), the LM head and the greedy head, all at one B, priced from the
runtime's own launches (lvb.runtime.turn.batch_step_times); a batch without any picture skips
the cross-attention layers, as one conversation does. Launch overhead is left out, as in
bench/device_time.py.

Heavy (tpu-mlir's transform of an 11B-width net peaks far above the rest of the run, bench/README §1.2): run it as
`flock /work/heavy.lock python bench/batch_decode.py`; `--clean` deletes the work folder after.
Writes bench/results/batch_decode.json; prints a table; no timed assertions.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from common import (CONFIGS, OUT, RESULTS, checkpoint_complete, compile_first_of_kinds, first_of_kinds_record,  # noqa: E402
                    geometry_11b, geometry_tiny, lvb_export, plan_estimates, record_result, table)

from lvb.contract import Kind, plan  # noqa: E402
from lvb.devicetime import Estimate  # noqa: E402
from lvb.runtime.turn import batch_step_times  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402

RESULTS_FILE = RESULTS / "batch_decode.json"
DECODE_KINDS = (Kind.EMBED_CACHE, Kind.SELF_DECODE, Kind.CROSS_DECODE, Kind.LM_HEAD, Kind.GREEDY_HEAD)


def figures(results: dict[str, dict], batch: list[int], seq: int, chunk: int) -> dict:
    """Every net of the full 11B plan takes the estimates of the compiled net of its kind, and a
    step is priced from the Runner's own launches (lvb.runtime.turn.batch_step_times)."""
    spec = ModelSpec.from_config(json.loads(CONFIGS["11b"].read_text()))
    full = plan(spec, seq, chunk, batch)
    by_kind = {result["kind"]: result["device"] for result in results.values()}
    estimates = plan_estimates(full, by_kind)
    rows_of = sorted(batch, reverse=True)  # the stages' order
    per_net_ms = {kind: {B: Estimate.from_json(s).ms for B, s in zip(rows_of, stages)} for kind, stages in by_kind.items()}
    steps = []
    for t in batch_step_times(spec, seq, (chunk,), batch, estimates, launch_us=0.0):
        if t.step.missing:
            raise SystemExit(f"no estimate for {', '.join(t.step.missing)}")
        steps.append({"B": t.rows, "rows": "pictures" if t.pictures else "text only", "step_ms": t.step.ms,
                      "launches": t.step.launches, "aggregate_tokens_per_s": t.tokens_per_second,
                      "per_conversation_tokens_per_s": t.per_conversation})
    lone = {s["rows"]: s for s in steps if s["B"] == 1}
    for s in steps:
        s["aggregate_vs_B1"] = s["aggregate_tokens_per_s"] / lone[s["rows"]]["aggregate_tokens_per_s"]
        s["per_conversation_vs_B1"] = s["per_conversation_tokens_per_s"] / lone[s["rows"]]["per_conversation_tokens_per_s"]
    return {"per_net_ms": per_net_ms, "steps": steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", default="8,4,2,1", help="decode batch sizes (stages)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=32, help="prefill chunk of the export (not priced here)")
    parser.add_argument("--quant", default="int4")
    parser.add_argument("--head-quant", default="bf16")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--clean", action="store_true", help="delete the checkpoint and work folder after a successful run")
    parser.add_argument("--tiny", action="store_true", help="a small geometry of the same structure (tries the script in a minute; writes no results)")
    args = parser.parse_args()
    batch = sorted({int(b) for b in args.batch.split(",")} | {1})
    geometry = geometry_tiny(layers=2, vision_layers=1) if args.tiny else geometry_11b(layers=2, vision_layers=1, global_layers=1, cross=(1,))
    checkpoint = args.out / f"ckpt-{geometry.name}"
    work = args.out / f"work-{geometry.name}-seq{args.seq}-batch{'-'.join(map(str, batch))}"
    if not checkpoint_complete(checkpoint):
        from common import write_streaming_checkpoint

        print(f"writing {checkpoint} ...", flush=True)
        write_streaming_checkpoint(checkpoint, geometry)
    lvb_export(checkpoint, work, "--seq", str(args.seq), "--chunk", str(args.chunk), "--batch", ",".join(map(str, batch)))
    results = compile_first_of_kinds(work, DECODE_KINDS, args.quant, args.head_quant)
    data = {"settings": {"batch": batch, "seq": args.seq, "quant": args.quant, "head_quant": args.head_quant,
                         "geometry": geometry.name, "check": "none"},
            "nets": first_of_kinds_record(results)}
    data |= figures(results, batch, args.seq, args.chunk)
    if args.clean:  # only after success: a failed compile's logs and cached stages are kept to look at and resume
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(checkpoint, ignore_errors=True)
    if not args.tiny:
        record_result("batch_decode", data)
    rows = [[s["B"], s["rows"], f"{s['step_ms']:.1f}", f"{s['aggregate_tokens_per_s']:.2f}",
             f"{s['aggregate_vs_B1']:.2f}x", f"{s['per_conversation_tokens_per_s']:.2f}",
             f"{s['per_conversation_vs_B1']:.2f}x"] for s in data["steps"]]
    print(table(rows, ["B", "rows", "step ms", "aggregate tok/s", "vs B=1", "per conversation tok/s", "vs lone"]))
    print("(tiny geometry: not written)" if args.tiny else f"wrote {RESULTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
