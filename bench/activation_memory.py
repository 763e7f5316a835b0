#!/usr/bin/env python3
"""Activation (neuron) memory of some nets compiled at the 11B's widths: the `ctx_size`
the card must hold for each, which bmruntime shares between nets so that the largest net
sets it (bench README §3.1, memory_plan.py).

What it does:

1. Takes a work dir exported by convert_scale.py (default: its 11B-width one) and makes
   OUT/activation-memory/, whose export holds only the --nets (their folders linked, the
   manifest cut down to them), so that `lvb compile` compiles nothing else.
2. Runs `lvb compile --quant int4 --check none --jobs 1` there, exactly as the 11B compile
   does (the vision nets are BF16 without layer grouping), sampled as convert_scale samples
   its stages and stopped past --max-rss GB or --max-minutes (a shared machine).
3. Reads each net's ctx_size with lvb.bmodel.inspect_bmodel (model_tool) and prints it,
   beside the fp32 and bf16 size of one whole [heads, tokens, tokens] vision score tensor.
   `memory_plan.py --activations OUT/activation-memory/<bmodel>` takes the largest.

Prints figures; exits non-zero only when the compile fails or is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LVB, OUT, gb  # noqa: E402
from convert_scale import run_measured  # noqa: E402

from lvb.contract import padded_patches  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402
from lvb.workdir import write_json  # noqa: E402

DEFAULT_WORK = OUT / "work-11b-widths-L3-V2+1-seq512-chunk128"


def subset_work(work: Path, nets: list[str], out: Path) -> Path:
    """A work dir whose export is `nets` alone (linked, never copied)."""
    manifest = json.loads((work / "export" / "manifest.json").read_text())
    if missing := [n for n in nets if n not in manifest["nets"]]:
        raise SystemExit(f"error: {work}/export has no net {', '.join(missing)}; nets: {', '.join(manifest['nets'])}")
    target = out / "activation-memory"
    (target / "export").mkdir(parents=True, exist_ok=True)
    for old in (target / "export").iterdir():
        if old.is_symlink():
            old.unlink()
    for net in nets:
        (target / "export" / net).symlink_to((work / "export" / net).resolve(), target_is_directory=True)
    manifest["nets"] = {net: manifest["nets"][net] for net in nets}
    write_json(target / "export" / "manifest.json", manifest)
    for old in target.glob("*.bmodel"):  # a combined bmodel of other nets
        old.unlink()
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="a work dir exported by convert_scale.py")
    parser.add_argument("--nets", default="vision_layer_0", help="comma-separated nets of the export")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-rss", type=float, default=7.0, help="GB the compile may hold before it is stopped")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="minutes before the compile is stopped")
    args = parser.parse_args()

    nets = args.nets.split(",")
    work = subset_work(args.work.resolve(), nets, args.out.resolve())
    export = json.loads((work / "export" / "manifest.json").read_text())
    result = run_measured("compile-" + "-".join(nets), [LVB, "compile", "--work", work, "--quant", "int4", "--seq",
                                                  str(export["settings"]["seq"]), "--check", "none", "--jobs", "1"],
                          work, args.out.resolve(), min_available=int(1.5e9),
                          max_rss=int(args.max_rss * 1e9), max_seconds=args.max_minutes * 60)
    if result["exit_code"] != 0:
        return result["exit_code"] or 1

    from lvb.bmodel import inspect_bmodel
    from lvb.toolchain import find_toolchain

    bmodel = next(work.glob("*.bmodel"))
    info = inspect_bmodel(bmodel, find_toolchain())
    v = ModelSpec.from_dir(export["model"]["dir"]).vision
    tokens = v.max_num_tiles * padded_patches(v.patches_per_tile)
    scores = v.num_heads * tokens * tokens
    print(f"\nvision attention: {v.num_heads} heads over {tokens} tokens, width {v.hidden_size}; one whole score "
          f"tensor is {gb(scores * 4)} in fp32, {gb(scores * 2)} in bf16")
    for net in nets:
        ctx = info.nets[net].neuron_bytes
        print(f"  {net}: ctx_size (activation memory) {ctx:,} B = {gb(ctx)}")
    print(f"compile: {result['wall_seconds']:.0f} s, peak RSS {gb(result['peak_rss_sum'])}")
    print(f"bmodel: {os.path.relpath(bmodel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
