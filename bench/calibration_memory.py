#!/usr/bin/env python3
"""Peak memory and time of calibrating one `--vision-quant w8a8` vision layer at the 11B's widths:
tpu-mlir's run_calibration.py as lvb ran it before, and as lvb runs it now
(lvb.compile.calibrate_tool: the tool's throwaway interpreters freed, its statistics one tensor at
a time; the same table), and the same without tpu-mlir's threshold tuning, on the same
calibration pictures.

The checkpoint is vision_time.py's (the 11B's vision tower, one local and one global layer, a
small text model) at --tiles tiles: the layer's attention scores grow with the square of the
tiles, and four did not fit this host either way. A run whose process tree passes --limit-gb is
stopped and recorded as such: past it this host would swap or kill something else.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psutil

from common import LVB, OUT, checkpoint_complete, gb, record_result, table, write_streaming_checkpoint
from vision_time import GEOMETRY, run, uniform_compiler

NET = "vision_layer_0"


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for p in [process, *process.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(argv: list[str], cwd: Path, env: dict, limit: int) -> dict:
    """Run `argv`, sampling its process tree's RSS; stop it past `limit` bytes."""
    start, peak = time.time(), 0
    with open(cwd / "log", "w") as log:
        process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        watched = psutil.Process(process.pid)
        while process.poll() is None:
            peak = max(peak, tree_rss(watched))
            if peak > limit:
                for p in [*watched.children(recursive=True), watched]:
                    p.kill()
                process.wait()
                return {"finished": False, "peak_rss": peak, "seconds": time.time() - start}
            time.sleep(0.5)
    if process.returncode != 0:
        raise SystemExit(f"{argv[0]} failed (exit {process.returncode}); see {cwd / 'log'}")
    return {"finished": True, "peak_rss": peak, "seconds": time.time() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pictures", type=int, default=2, help="calibration pictures per run")
    parser.add_argument("--tiles", type=int, default=2, help="the vision tower's tiles (the 11B's: 4)")
    parser.add_argument("--limit-gb", type=float, default=21.0, help="stop a run whose process tree passes this")
    args = parser.parse_args()
    from dataclasses import replace

    geometry = replace(GEOMETRY, max_tiles=args.tiles, name=f"{GEOMETRY.name}-T{args.tiles}")
    checkpoint, work = OUT / f"ckpt-{geometry.name}", OUT / f"work-{geometry.name}"
    if not checkpoint_complete(checkpoint):
        write_streaming_checkpoint(checkpoint, geometry)
    run([LVB, "export", "--model", checkpoint, "--out", work, "--seq", 512, "--chunk", 32])
    from lvb.compile import calibration
    from lvb.compile.build import Attempt, mlir_files, stage_mlir
    from lvb.compile.tpumlir import CALIBRATE_TOOL, calibration_args

    compiler = uniform_compiler(work)
    toolchain = compiler.toolchain
    _, folder, pictures = compiler.calibration
    calibration.ensure_set(folder, Path(compiler.export["model"]["dir"]), compiler.export, compiler.dir.onnx, pictures)
    job = next(j for j in compiler.jobs if j.name == NET)
    attempt = Attempt(job=job, options=job.options, net_folder=compiler.dir.compile_net(job.name), folder=work,
                      log=work / "calibration-memory-transform.log", check=False, thresholds={}, bmodel="")
    mlir = stage_mlir(attempt, job.net, toolchain, None, [])  # cached by the compile's own key
    tuned, untuned = (calibration_args(mlir, job.calibration, args.pictures, "table", tune) for tune in (True, False))
    runs = {
        "run_calibration.py (lvb before)": ([str(toolchain.tool("run_calibration.py")), *tuned], toolchain.env()),
        "lvb.compile.calibrate_tool (lvb now)": (toolchain.lvb_command(CALIBRATE_TOOL, tuned), toolchain.worker_env()),
        # What tpu-mlir's threshold tuning costs (two interpreters of its own): lvb keeps it by
        # default, as a fixture's post-norm missed its threshold without it (bench/README.md §1.8).
        "the same without threshold tuning (--tune_num 0)": (toolchain.lvb_command(CALIBRATE_TOOL, untuned),
                                                             toolchain.worker_env()),
    }
    rows = []
    for label, (argv, env) in runs.items():
        with tempfile.TemporaryDirectory(dir=work) as scratch:
            tmp = Path(scratch)
            print(f"calibrating {NET} on {args.pictures} pictures: {label} ...", flush=True)
            with mlir_files(mlir, tmp):
                result = measure(argv, tmp, env, int(args.limit_gb * 1e9))
            if result["finished"]:
                shutil.copy(tmp / "log", work / f"calibration-memory-{len(rows)}.log")
        rows.append({"run": label} | result)
    print(table([[r["run"], "yes" if r["finished"] else f"no: stopped past {args.limit_gb:.0f} GB", gb(r["peak_rss"]),
                  f"{r['seconds']:.0f}"] for r in rows], ["run", "finished", "peak RSS", "seconds"]))
    machine_ram = psutil.virtual_memory().total
    figures = {"net": NET, "tiles": args.tiles, "pictures": args.pictures, "limit_gb": args.limit_gb,
               "host_ram": machine_ram, "rows": rows}
    print(f"\nresults: {record_result('calibration_memory', figures, label=f'{args.tiles} tiles')}")


if __name__ == "__main__":
    main()
