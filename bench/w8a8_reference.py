#!/usr/bin/env python3
"""Is tpu-mlir's own INT8 interpreter a tighter reference for a w8a8 vision net than fp32?

#30 asks to judge `--vision-quant w8a8` nets against a quantization-aware reference. tpu-mlir has
one: its quantized MLIR (`*_tpu.mlir`), run by its interpreter (what model_deploy.py's
--test_input does). This deploys each vision net of a work directory compiled with
`--vision-quant w8a8` again, with lvb's own transform, tables and options (cached by the compile),
asks model_deploy for the interpreter's outputs on the export's check inputs, runs the bmodel on
the simulator as lvb's check does, and prints three cosines per net: bmodel against the
interpreter, bmodel against fp32 onnxruntime, interpreter against fp32. With
--no-layer-group, each net is deployed a second time with --disable_layer_group, which tells
whether the distance is layer grouping's.

    .venv/bin/python bench/w8a8_reference.py --work WORK   # after lvb compile --vision-quant w8a8
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from common import record_result


def interpreter_and_bmodel(job, compiler, toolchain, folder: Path, extra: tuple[str, ...]):
    """(the interpreter's outputs, the bmodel's outputs on the simulator, fp32's) for one net's
    first stage, deployed in `folder`."""
    from lvb.check import load_check
    from lvb.compile.build import Attempt, interpreted, mlir_files, stage_mlir, stage_tables
    from lvb.compile.tpumlir import deploy
    from lvb.runtime.cmodel import CmodelEngine

    feeds, fp32 = load_check(job.check_files[0])
    attempt = Attempt(job=job, options=job.options, net_folder=compiler.dir.compile_net(job.name), folder=folder,
                      log=folder / "log", check=False, thresholds={}, bmodel="")
    mlir = stage_mlir(attempt, job.net.stages[0], toolchain, None, [])
    tables = stage_tables(attempt, mlir, toolchain, [])
    with mlir_files(mlir, folder):
        bmodel = deploy(toolchain, mlir, folder, f"{job.name}.bmodel", replace(job.options, extra=extra), folder / "log",
                        None, tables, interpret=feeds)
    interpreter = interpreted(folder, bmodel, job, toolchain)
    with CmodelEngine(bmodel, toolchain) as simulator:
        got = simulator.run(job.name, feeds)
    return interpreter, got, fp32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a work directory compiled with --vision-quant w8a8")
    parser.add_argument("--quant", default="int4", help="the compile's --quant (its settings find the cached tables)")
    parser.add_argument("--no-layer-group", action="store_true", help="also deploy each net with --disable_layer_group")
    args = parser.parse_args()

    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.contract import QuantGroup
    from lvb.numerics import compare
    from lvb.toolchain import find_toolchain

    toolchain = find_toolchain()
    compiler = Compiler(args.work, CompileSettings(quant=args.quant, vision_quant="w8a8", check="none"), toolchain)
    variants = {"layer groups": ()} | ({"no layer groups": ("--disable_layer_group",)} if args.no_layer_group else {})
    rows = []
    print(f"{'net':<18} {'deploy':<16} {'bmodel~interp':>14} {'bmodel~fp32':>12} {'interp~fp32':>12}")
    for job in compiler.jobs:
        if job.kind.policy.quant is not QuantGroup.VISION:
            continue
        for variant, extra in variants.items():
            with tempfile.TemporaryDirectory(dir=args.work) as scratch:
                interpreter, got, fp32 = interpreter_and_bmodel(job, compiler, toolchain, Path(scratch), extra)
            row = {"net": job.name, "kind": job.kind.value, "deploy": variant,
                   "bmodel_vs_interpreter": compare(interpreter, got)["cosine"], "bmodel_vs_fp32": compare(fp32, got)["cosine"],
                   "interpreter_vs_fp32": compare(fp32, interpreter)["cosine"]}
            rows.append(row)
            print(f"{job.name:<18} {variant:<16} {row['bmodel_vs_interpreter']:>14.6f} {row['bmodel_vs_fp32']:>12.6f} "
                  f"{row['interpreter_vs_fp32']:>12.6f}", flush=True)
    closer = [r for r in rows if 1 - r["bmodel_vs_interpreter"] < (1 - r["bmodel_vs_fp32"]) / 10]
    print(f"\nnets where the interpreter is 10x closer to the bmodel than fp32 is: {len(closer)} of {len(rows)}")
    model = Path(compiler.export["model"]["dir"]).name
    print(f"results: {record_result('w8a8_reference', {'model': model, 'rows': rows}, label=model)}")


if __name__ == "__main__":
    main()
