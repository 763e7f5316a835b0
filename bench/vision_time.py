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

from common import BENCH, LVB, OUT, PROMPT_TOKENS, REPO, checkpoint_complete, geometry_11b, write_streaming_checkpoint

# What the text model may be: small, so that its nets compile in seconds; their estimates are
# not used (only the vision layers' are).
SMALL_TEXT = dict(text_layers=2, cross_layers=(1,), hidden=256, intermediate=512, heads=4, kv_heads=2)
KINDS = "vision_layer,vision_global"
# Every vision kind changes with --vision-quant; the layers alone with a change to their graph.
VISION_KINDS = "vision_embed,vision_layer,vision_global,vision_post,vision_head"


GEOMETRY = replace(geometry_11b(layers=2, vision_layers=1, global_layers=1), **SMALL_TEXT, name="11b-vision-small-text-V1+1")


def work_dir(out: Path = OUT) -> Path:
    return out / f"work-{GEOMETRY.name}"


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
    parser.add_argument("--uniform-thresholds", action="store_true",
                        help="w8a8 without lvb's calibration (which needs more memory and hours than this host has for a "
                             "4-tile layer): each vision net of the BF16 build deployed as lvb deploys w8a8, with lvb's "
                             "quantize table and every threshold 1; the estimate reads no threshold")
    args = parser.parse_args()
    if args.uniform_thresholds and args.vision_quant != "w8a8":
        raise SystemExit("--uniform-thresholds is for --vision-quant w8a8")

    geometry = GEOMETRY
    checkpoint, work = args.out / f"ckpt-{geometry.name}", work_dir(args.out)
    if not checkpoint_complete(checkpoint):
        print(f"writing {checkpoint} ...", flush=True)
        write_streaming_checkpoint(checkpoint, geometry)
    run([LVB, "export", "--model", checkpoint, "--out", work, "--seq", 512, "--chunk", 32])
    if args.uniform_thresholds:
        run([LVB, "compile", "--work", work, "--quant", "int4", "--check", "none", "--jobs", args.jobs])  # the transforms
        uniform_w8a8(work, args.base, args.label)
        return
    run([LVB, "compile", "--work", work, "--quant", "int4", "--vision-quant", args.vision_quant, "--check", "none",
         "--jobs", args.jobs])
    kinds = KINDS if args.vision_quant == "bf16" else VISION_KINDS
    run([sys.executable, BENCH / "device_time.py", "--work", work, "--base", args.base, "--kinds", kinds,
         "--label", args.label])


def deploy_uniform(compiler, job, folder: Path, keep=None, extra: tuple[str, ...] = (), core: str = "BF16"):
    """`job` deployed into `folder` as lvb deploys w8a8 (its options and tables, lvb.compile.calibration.write_tables)
    over the BF16 build's cached transform and a table that sets every tensor to 1: the cost model reads no
    threshold. `keep`: which of the quantize table's ops stay out of INT8 (a filter of their names); `extra`: more
    model_deploy.py options; `core`: the quantize table's mode for the ops it keeps out of INT8."""
    import re
    from dataclasses import replace

    from lvb.compile.build import Attempt, mlir_files, stage_mlir
    from lvb.compile.calibration import write_tables
    from lvb.compile.tpumlir import deploy
    from lvb.devicetime import read_profile

    toolchain = compiler.toolchain
    attempt = Attempt(job=job, options=job.options, net_folder=compiler.dir.compile_net(job.name), folder=folder,
                      log=folder / "log", check=False, thresholds={}, bmodel="")
    mlir = stage_mlir(attempt, job.net, toolchain, None, [])  # the BF16 build's transform, cached
    names = sorted(set(re.findall(r'loc\("([^"]+)"\)', mlir.read_text())))  # every tensor tpu-mlir names
    (folder / "uniform").write_text("".join(f"{name} 1.0 -1.0 1.0\n" for name in names))
    write_tables(job.onnx, folder / "uniform", folder / "table", folder / "qtable")
    ops = [line.split()[0] for line in (folder / "qtable").read_text().splitlines()]
    (folder / "qtable").write_text("".join(f"{op} {core}\n" for op in ops if keep is None or keep(op)))
    with mlir_files(mlir, folder):
        deploy(toolchain, mlir, folder, f"{job.name}.bmodel", replace(job.options, extra=job.options.extra + extra),
               folder / "log", None, (folder / "table", folder / "qtable"))
    return read_profile(folder)


def uniform_compiler(work: Path):
    """lvb's w8a8 compile of vision_time.py's work dir, for deploy_uniform (its BF16 build must exist)."""
    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.toolchain import find_toolchain

    return Compiler(work, CompileSettings(quant="int4", vision_quant="w8a8", check="none"), find_toolchain())


def uniform_w8a8(work: Path, base: str, label: str) -> None:
    """Every vision net deployed with lvb's w8a8 options and tables over a uniform measured table
    (deploy_uniform), its estimate substituted into `base` as device_time.py does."""
    import json
    import shutil
    import tempfile

    from device_time import compare, print_layout, substituted, REFERENCE_FILE

    from common import record_result
    from lvb.contract import QuantGroup

    compiler = uniform_compiler(work)
    measured = {}
    for job in compiler.jobs:
        if job.kind.policy.quant is not QuantGroup.VISION:
            continue
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            folder = Path(scratch)
            print(f"deploying {job.name} (w8a8, uniform thresholds) ...", flush=True)
            estimate = deploy_uniform(compiler, job, folder)
            shutil.copy(folder / "log", work / f"uniform-w8a8-{job.name}.log")
        measured.setdefault(job.kind.value, {"net": job.name, "quant": job.quant, "options": [],
                                             "stages": [estimate.to_json()]})
    config = json.loads((Path(compiler.export["model"]["dir"]) / "config.json").read_text())
    result = substituted(base, list(measured), measured, {}, config, PROMPT_TOKENS,
                         {"work": str(work), "bmodel": "w8a8 vision nets, uniform thresholds (bench/vision_time.py)"})
    print_layout(label, result)
    reference = json.loads(REFERENCE_FILE.read_text()) if REFERENCE_FILE.is_file() else None
    result["against_reference"] = compare(result, reference)
    print(f"\nresults: {record_result('device_time', result, label=label)} [{label}]")


if __name__ == "__main__":
    main()
