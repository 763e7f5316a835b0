#!/usr/bin/env python3
"""The vision tower's layers at Llama-3.2-11B-Vision's widths on tpu-mlir's cost model, without
compiling an 11B-width text stack: a checkpoint with the 11B's vision tower (its widths, four
560-px tiles; one local and one global layer) and a small text model, exported and compiled by
lvb (`lvb compile --check none`, vision BF16 as in the 11B's default build, or --vision-quant), then
bench/device_time.py prices the full 11B turn with these vision-layer estimates in place of an
earlier build's (`--base`), every other kind as that build measured it.

Minutes instead of the hour and the disk of a short stack at every width (bench/README §1.1).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from common import BENCH, LVB, OUT, REPO, checkpoint_complete, geometry_11b, write_streaming_checkpoint

# What the text model may be: small, so that its nets compile in seconds; their estimates are
# not used (only the vision layers' are).
SMALL_TEXT = dict(text_layers=2, cross_layers=(1,), hidden=256, intermediate=512, heads=4, kv_heads=2)
KINDS = "vision_layer,vision_global"
# Every vision kind changes with --vision-quant; the layers alone with a change to their graph.
VISION_KINDS = "vision_embed,vision_layer,vision_global,vision_post,vision_head"


def run(argv: list) -> None:
    print("$", " ".join(map(str, argv)), flush=True)
    code = subprocess.call([str(a) for a in argv], cwd=REPO)
    if code != 0:
        raise SystemExit(f"{Path(str(argv[0])).name} failed (exit {code})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="lvb", help="the device_time.json build whose other kinds are kept")
    parser.add_argument("--label", required=True, help="the name the new figures are kept under in device_time.json")
    parser.add_argument("--vision-quant", default="bf16", choices=["bf16", "int8", "int4", "w8a8"])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--jobs", type=int, default=1, help="lvb compile --jobs: w8a8's calibration of one vision layer "
                        "at four tiles takes tens of GB")
    args = parser.parse_args()

    geometry = replace(geometry_11b(layers=2, vision_layers=1, global_layers=1), **SMALL_TEXT)
    geometry = replace(geometry, name=f"11b-vision-small-text-V1+1")
    checkpoint, work = args.out / f"ckpt-{geometry.name}", args.out / f"work-{geometry.name}"
    if not checkpoint_complete(checkpoint):
        print(f"writing {checkpoint} ...", flush=True)
        write_streaming_checkpoint(checkpoint, geometry)
    run([LVB, "export", "--model", checkpoint, "--out", work, "--seq", 512, "--chunk", 32])
    run([LVB, "compile", "--work", work, "--quant", "int4", "--vision-quant", args.vision_quant, "--check", "none",
         "--jobs", args.jobs])
    kinds = KINDS if args.vision_quant == "bf16" else VISION_KINDS
    run([sys.executable, BENCH / "device_time.py", "--work", work, "--base", args.base, "--kinds", kinds,
         "--label", args.label])


if __name__ == "__main__":
    main()
