#!/usr/bin/env python3
"""Activation (neuron) memory of the nets compiled at the 11B's widths: the `ctx_size`
the card must hold for each, which bmruntime shares between nets so that the largest net
sets it (bench README §3.1, memory_plan.py).

What it does:

1. Takes a work dir exported by convert_scale.py (default: its 11B-width one) and compiled
   as the 11B compile is (`lvb compile --quant int4 --check none`: convert_scale.py does it,
   or run it on an `--export-only` work dir).
2. Reads each of --nets' ctx_size from its per-net bmodel with lvb.bmodel.inspect_bmodel
   (model_tool) and prints it, beside the fp32 and bf16 size of one whole [heads, tokens,
   tokens] vision score tensor.
3. Records them in bench/results/activation_memory.json, an entry per work dir; memory_plan.py
   takes the largest recorded figure as the activation memory of its plan.

Prints figures; exits non-zero when the work dir has no such compile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, gb, newest_compile, record_result  # noqa: E402

from lvb.contract import padded_patches  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402

DEFAULT_WORK = OUT / "work-11b-widths-L3-V2+1-seq512-chunk128"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="a work dir exported by convert_scale.py and compiled INT4")
    parser.add_argument("--nets", default="", help="comma-separated nets to read (default: every net of the compile)")
    args = parser.parse_args()

    from lvb.bmodel import inspect_bmodel
    from lvb.toolchain import find_toolchain

    work = args.work.resolve()
    compiled = newest_compile(work, "int4")
    nets = [n for n in args.nets.split(",") if n] or list(compiled["nets"])
    if missing := [n for n in nets if n not in compiled["nets"]]:
        raise SystemExit(f"error: {work}'s INT4 compile has no net {', '.join(missing)}; nets: {', '.join(compiled['nets'])}")
    toolchain = find_toolchain()
    ctx = {}
    for net in nets:
        info = inspect_bmodel(work / compiled["nets"][net]["bmodel"], toolchain)
        ctx[net] = info.nets[net].neuron_bytes
    export = json.loads((work / "export" / "manifest.json").read_text())
    v = ModelSpec.from_dir(export["model"]["dir"]).vision
    tokens = v.max_num_tiles * padded_patches(v.patches_per_tile)
    scores = v.num_heads * tokens * tokens
    print(f"vision attention: {v.num_heads} heads over {tokens} tokens, width {v.hidden_size}; one whole score "
          f"tensor is {gb(scores * 4)} in fp32, {gb(scores * 2)} in bf16")
    for net, size in sorted(ctx.items(), key=lambda kv: -kv[1]):
        print(f"  {net}: ctx_size (activation memory) {size:,} B = {gb(size)}")
    figures = {"work": work.name, "seq": export["settings"]["seq"], "tiles": v.max_num_tiles, "vision_tokens": tokens,
               "compile": compiled["settings"], "ctx_size": ctx}
    print(f"results: {record_result('activation_memory', figures, label=work.name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
