#!/usr/bin/env python3
"""Activation (neuron) memory of one vision layer compiled at the 11B's widths: the
`ctx_size` the card must hold for it, which bmruntime shares between nets and which the
largest net sets (bench README §6, memory_plan.py).

What it does:

1. Takes a work dir exported by convert_scale.py (default: its 11B-width one) and makes
   OUT/activation-NET/, whose export holds that one net (its folder linked, the manifest
   cut down to it), so that `lvb compile` compiles nothing else.
2. Runs `lvb compile --quant int4 --no-check --jobs 1` there, exactly as the 11B compile
   does (the vision nets are BF16 without layer grouping), sampled as convert_scale samples
   its stages and stopped past --max-rss GB or --max-minutes (a shared machine).
3. Reads the net's ctx_size with lvb.bmodel.inspect_bmodel (model_tool) and prints it,
   beside the fp32 and bf16 size of one whole [heads, tokens, tokens] score tensor.

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


def one_net_work(work: Path, net: str, out: Path) -> Path:
    """A work dir whose export is `net` alone (linked, never copied)."""
    manifest = json.loads((work / "export" / "manifest.json").read_text())
    if net not in manifest["nets"]:
        raise SystemExit(f"error: {work}/export has no net {net}; nets: {', '.join(manifest['nets'])}")
    target = out / f"activation-{net}"
    (target / "export").mkdir(parents=True, exist_ok=True)
    link = target / "export" / net
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to((work / "export" / net).resolve(), target_is_directory=True)
    manifest["nets"] = {net: manifest["nets"][net]}
    write_json(target / "export" / "manifest.json", manifest)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="a work dir exported by convert_scale.py")
    parser.add_argument("--net", default="vision_layer_0")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--max-rss", type=float, default=7.0, help="GB the compile may hold before it is stopped")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="minutes before the compile is stopped")
    args = parser.parse_args()

    work = one_net_work(args.work.resolve(), args.net, args.out.resolve())
    export = json.loads((work / "export" / "manifest.json").read_text())
    result = run_measured(f"compile-{args.net}", [LVB, "compile", "--work", work, "--quant", "int4", "--seq",
                                                  str(export["settings"]["seq"]), "--no-check", "--jobs", "1"],
                          work, args.out.resolve() / "activation-logs", min_available=int(1.5e9),
                          max_rss=int(args.max_rss * 1e9), max_seconds=args.max_minutes * 60)
    if result["exit_code"] != 0:
        return result["exit_code"] or 1

    from lvb.bmodel import inspect_bmodel
    from lvb.toolchain import find_toolchain

    bmodel = next(work.glob("*.bmodel"))
    ctx = inspect_bmodel(bmodel, find_toolchain()).nets[args.net].neuron_bytes
    v = ModelSpec.from_dir(export["model"]["dir"]).vision
    tokens = v.max_num_tiles * padded_patches(v.patches_per_tile)
    scores = v.num_heads * tokens * tokens
    print(f"\n{args.net}: {v.num_heads} heads over {tokens} tokens, width {v.hidden_size}")
    print(f"  ctx_size (activation memory): {ctx:,} B = {gb(ctx)}")
    print(f"  one whole score tensor: {gb(scores * 4)} fp32, {gb(scores * 2)} bf16")
    print(f"  compile: {result['wall_seconds']:.0f} s, peak RSS {gb(result['peak_rss_sum'])}")
    print(f"  bmodel: {os.path.relpath(bmodel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
