#!/usr/bin/env python3
"""The device memory plan of the 11B INT4 bmodel with lvb's runtime (sail backend), at
seq 512 and 1024, against an SE7 and an SC7 chip.

Sources:
- weights and instructions: the 11B INT4 bmodel's size from convert_scale.py (bench
  README §1: "about 9.2 GB", extrapolated from per-net bmodels at real widths), or
  --weights to use another figure (model_tool's `weight` + `instruct` of a real one);
- engine buffers and scratch I/O: computed by lvb.runtime.memory from the contract's
  nets for the 11B's own config (tests/data/llama-3.2-11b-vision.config.json), i.e.
  exactly what Session allocates and SailEngine's shared scratch;
- activations: the largest net's neuron memory is the vision layer's while it is
  compiled without layer grouping (lvb.compile.compiler.START). On the toy, its
  `ctx_size` is 380,928 B = 0.95 x one bf16 attention-score tensor (4 heads x 224^2
  tokens); the 11B's is 16 heads x 6432^2, so the same ratio gives the estimate below.
  Not measured at 11B width (the export of one 11B vision layer needs 6.8 GB).
  The second plan assumes the vision attention no longer holds whole score tensors
  (layer grouping, or the export splitting it by heads), so that the largest net needs
  at most --target-activations.

Prints a table per plan; exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table  # noqa: E402

from lvb.contract import padded_patches, plan  # noqa: E402
from lvb.runtime.memory import CARDS, GiB, MemoryPlan, resident_buffers, scratch_tensors  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402

CONFIG = ROOT / "tests" / "data" / "llama-3.2-11b-vision.config.json"
TOY_RATIO = 380_928 / (4 * 224 * 224 * 2)  # toy vision_layer_0 ctx_size / one bf16 score tensor


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=float, default=9.2e9, help="weights + instructions, bytes")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--target-activations", type=float, default=0.25e9)
    args = parser.parse_args()
    spec = ModelSpec.from_config(json.loads(CONFIG.read_text()))
    v = spec.vision
    tokens = v.max_num_tiles * padded_patches(v.patches_per_tile)
    vision_activation = TOY_RATIO * v.num_heads * tokens * tokens * 2
    for seq in (512, 1024):
        nets = {n.name: n for n in plan(spec, seq, args.chunk)}
        for label, activation in (("vision layers as compiled today (estimate)", vision_activation),
                                  (f"activations at most {gb(args.target_activations)} (target)", args.target_activations)):
            p = MemoryPlan(int(args.weights), 0, {"largest net": int(activation)}, resident_buffers(nets),
                           scratch_tensors(nets))
            rows = [["weights + instructions", gb(p.weights)], ["activations (shared)", gb(p.activation)]]
            rows += [[f"engine: {name}", gb(size)] for name, size in p.groups()]
            rows += [["engine: scratch I/O", gb(p.scratch_bytes)],
                     ["engine overhead (all but weights)", f"{gb(p.overhead)} ({p.overhead / GiB:.2f} GiB)"],
                     ["total", gb(p.total)]]
            rows += [[f"spare on {card} ({gb(size)})", gb(size - p.total)] for card, size in CARDS.items()]
            print(f"\n11B INT4, seq {seq}, chunk {args.chunk}: {label}")
            print(table(rows, ["", ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
