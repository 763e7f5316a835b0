#!/usr/bin/env python3
"""Peak RAM and time of tpu-mlir's model_transform / model_deploy against a net's weight
bytes, for the two vocabulary-sized nets lvb compiles (the embedding gather and the LM head),
measured at fractions of the 11B's 128256-token vocabulary and extrapolated to all of it.

Why: at real widths `lvb compile` needs far more memory for these nets than for any
decoder layer (bench/README §1.3, what convert_scale.py first saw). This finds how many bytes
each tool holds per weight byte, so the full-vocabulary figure can be stated without
running it on a machine that cannot hold it.

How: for each --rows, the same modules lvb exports (lvb.export.parts.Embedding, and
LmHead = RMSNorm + Linear) with hidden 4096 and random fp32 weights are exported to ONNX
exactly as lvb does (TorchScript, opset 17, constant folding), then model_transform.py and
model_deploy.py (BF16, as lvb compiles these nets by default, no simulator check) run via
lvb.compile.tpumlir, each as a subprocess whose whole process tree is sampled every 0.2 s
(psutil, as in convert_scale.py). A least-squares line peak = a + b x weight bytes
over the measured sizes gives the figure at 128256 rows. --no-onnxsim adds a run with
model_transform's `--do_onnx_sim ''` (tpu-mlir parses it as False), which lvb does not pass,
to show what the ONNX simplifier's model copies cost.

Prints a table and records it in bench/results/transform_memory.json; exits 0. No timed assertions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, gb, machine, record_result, table  # noqa: E402
from convert_scale import run_measured  # noqa: E402

VOCAB = 128256
EMBED_ROWS = VOCAB + 8  # mllama's table has 8 extra rows (the image token sits past the LM head)
HIDDEN = 4096


def export_onnx(kind: str, rows: int, path: Path) -> int:
    import torch

    from lvb.export.parts import Embedding, LmHead

    torch.manual_seed(0)
    if kind == "embed":
        module = Embedding(torch.randn(rows, HIDDEN) * 0.02).eval()
        args = (torch.zeros(1, 128, dtype=torch.int32),)
        names = ["input_ids"]
    else:
        from transformers.models.mllama.modeling_mllama import MllamaTextRMSNorm

        head = torch.nn.Linear(HIDDEN, rows, bias=False)
        torch.nn.init.normal_(head.weight, std=0.02)
        module = LmHead(MllamaTextRMSNorm(HIDDEN, eps=1e-5), head).eval()
        args = (torch.randn(1, 1, HIDDEN),)
        names = ["hidden_states"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), input_names=names, output_names=["out"], opset_version=17,
                          dynamo=False, do_constant_folding=True)
    del module
    return rows * HIDDEN * 4


def run_work_nets(args, out: Path, results: dict, results_path: Path, tpu_python: Path) -> list[list]:
    """Transform nets of a convert_scale.py work dir with --do_onnx_sim '' and deploy them with lvb's options."""
    from lvb.contract import CheckMode, NetSpec
    from lvb.compile.compiler import CompileSettings
    from lvb.compile.tpumlir import DeployOptions, shapes_arg
    from lvb.contract import Kind

    work = args.work.resolve()
    manifest = json.loads((work / "export" / "manifest.json").read_text())
    scale = {}
    for path in sorted(OUT.glob("results-*.json")):
        data = json.loads(path.read_text())
        if data.get("work") == str(work):
            scale = data
    lvb_labels = {}
    for stage in ("compile_int4", "compile_int4_rest", "compile_int4_final"):
        lvb_labels.update(scale.get(stage, {}).get("labels", {}))
    lvb_nets = {r["net"]: r for r in scale.get("analysis", {}).get("per_net", [])}
    settings = CompileSettings(quant="int4", check=CheckMode.NONE)
    rows = []
    for net in [n for n in args.work_nets.split(",") if n]:
        entry = manifest["nets"][net]
        kind = Kind(entry["kind"])
        quant = settings.quant_of(kind)
        extra = kind.policy.ladder[0]
        bf16_inputs, bf16_outputs = NetSpec.from_json(entry).bf16_io()  # the net's bf16 state, as lvb compile deploys it
        options = DeployOptions(quantize=quant, group_size=settings.group_size, extra=extra, bf16_inputs=bf16_inputs,
                                bf16_outputs=bf16_outputs)
        key = f"work-{net}-no-onnxsim"
        folder = out / key
        if key not in results:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            shapes = shapes_arg([tuple(t["shape"]) for t in entry["inputs"]])
            transform = [str(tpu_python / "python"), str(tpu_python / "model_transform.py"), "--model_name", net, "--model_def",
                         str(work / "export" / entry["file"]), "--input_shapes", shapes, "--mlir", f"{net}.mlir",
                         "--do_onnx_sim", ""]
            record = {"net": net, "kind": kind.value, "onnx_bytes": lvb_nets.get(net, {}).get("onnx_bytes", 0),
                      "deploy_args": options.args()}
            record["transform"] = run_measured(f"transform-{key}", transform, folder, out, int(args.min_available * 1e9), cwd=folder)
            if record["transform"]["exit_code"] == 0:
                deploy = [str(tpu_python / "python"), str(tpu_python / "model_deploy.py"), "--mlir", f"{net}.mlir", "--model",
                          f"{net}.bmodel", *options.args()]
                record["deploy"] = run_measured(f"deploy-{key}", deploy, folder, out, int(args.min_available * 1e9), cwd=folder)
                bmodel = folder / f"{net}.bmodel"
                record["bmodel_bytes"] = bmodel.stat().st_size if bmodel.is_file() else 0
            results[key] = record
            results_path.write_text(json.dumps(results, indent=1, default=str))
            for p in folder.iterdir():
                if p.suffix in (".onnx", ".npz", ".bmodel") or "external" in p.name:
                    p.unlink()
        r = results[key]
        t, d = r["transform"], r.get("deploy", {})
        if t["exit_code"] != 0:
            log = out / "logs" / f"transform-{key}.log"
            error = next((line for line in reversed(log.read_text(errors="replace").splitlines()) if "Error" in line), "?")
            rows.append([net, gb(r["onnx_bytes"]), f"{lvb_labels.get(f'transform:{net}', {}).get('seconds', 0):.0f}",
                         gb(lvb_labels.get(f"transform:{net}", {}).get("peak_rss", 0)), "FAILS", error.strip()[:60], "", "", "", ""])
            continue
        lvb_t = lvb_labels.get(f"transform:{net}", {})
        rows.append([net, gb(r["onnx_bytes"]), f"{lvb_t.get('seconds', 0):.0f}", gb(lvb_t.get("peak_rss", 0)),
                     f"{t['wall_seconds']:.0f}", gb(t["peak_rss_sum"]), " ".join(r["deploy_args"]),
                     f"{d.get('wall_seconds', 0):.0f}", gb(d.get("peak_rss_sum", 0)),
                     "yes" if r.get("bmodel_bytes") == lvb_nets.get(net, {}).get("bmodel_bytes") else
                     f"{r.get('bmodel_bytes', 0) / 1e6:.1f} vs {lvb_nets.get(net, {}).get('bmodel_bytes', 0) / 1e6:.1f} MB"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="16032,32064,64128", help="table rows to measure (the 11B has 128256 / 128264)")
    parser.add_argument("--kinds", default="embed,lm_head")
    parser.add_argument("--no-onnxsim", action="store_true", help="also run model_transform with --do_onnx_sim '' at the largest size")
    parser.add_argument("--out", type=Path, default=OUT / "transform_memory")
    parser.add_argument("--min-available", type=float, default=1.5, help="GB of MemAvailable below which a run is stopped")
    parser.add_argument("--work", type=Path, default=None,
                        help="work dir of bench/convert_scale.py: also run --work-nets from it with --do_onnx_sim ''")
    parser.add_argument("--work-nets", default="vision_layer_0,block_0,block_cache_1",
                        help="nets of --work to transform without the ONNX simplifier and deploy as lvb would")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    from lvb.toolchain import find_toolchain

    tpu_python = find_toolchain().bin_dir  # lvb's own (LVB_TOOLCHAIN first): the tools it compiles with
    env_bin = str(tpu_python)
    sizes = [int(r) for r in args.rows.split(",")]
    runs = [(kind, rows, True) for kind in args.kinds.split(",") for rows in sizes]
    if args.no_onnxsim:
        runs += [(kind, max(sizes), False) for kind in args.kinds.split(",")]
    for kind, rows, onnxsim in runs:
        key = f"{kind}-{rows}" + ("" if onnxsim else "-no-onnxsim")
        if key in results and results[key].get("deploy", {}).get("exit_code") == 0:
            continue
        folder = out / key
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        onnx_path = folder / f"{kind}.onnx"
        weight_bytes = export_onnx(kind, rows, onnx_path)
        shape = "[[1,128]]" if kind == "embed" else f"[[1,1,{HIDDEN}]]"
        transform = [str(tpu_python / "python"), str(tpu_python / "model_transform.py"), "--model_name", kind, "--model_def",
                     str(onnx_path), "--input_shapes", shape, "--mlir", f"{kind}.mlir"]
        if not onnxsim:
            transform += ["--do_onnx_sim", ""]
        os.environ["PATH"] = env_bin + os.pathsep + os.environ["PATH"]
        record = {"kind": kind, "rows": rows, "weight_bytes": weight_bytes, "onnx_bytes": onnx_path.stat().st_size,
                  "onnxsim": onnxsim}
        record["transform"] = run_measured(f"transform-{key}", transform, folder, out, int(args.min_available * 1e9), cwd=folder)
        if record["transform"]["exit_code"] == 0:
            deploy = [str(tpu_python / "python"), str(tpu_python / "model_deploy.py"), "--mlir", f"{kind}.mlir", "--model",
                      f"{kind}.bmodel", "--quantize", "BF16", "--chip", "bm1684x"]
            record["deploy"] = run_measured(f"deploy-{key}", deploy, folder, out, int(args.min_available * 1e9), cwd=folder)
        results[key] = record
        results_path.write_text(json.dumps(results, indent=1, default=str))
        for p in folder.iterdir():  # keep the logs, drop the gigabytes
            if p.suffix in (".onnx", ".npz", ".bmodel") or "external" in p.name:
                p.unlink()

    work_rows = run_work_nets(args, out, results, results_path, tpu_python) if args.work else []

    rows_out = []
    fits = {}
    for kind in args.kinds.split(","):
        sized = {k: r for k, r in results.items() if k != "fits" and not k.startswith("work-")}
        points = [r for r in sized.values() if r["kind"] == kind and r["onnxsim"] and r.get("deploy")]
        points.sort(key=lambda r: r["rows"])
        for r in points + [v for v in sized.values() if v["kind"] == kind and not v["onnxsim"]]:
            t, d = r["transform"], r.get("deploy", {})
            rows_out.append([kind + ("" if r["onnxsim"] else " (--do_onnx_sim '')"), r["rows"], gb(r["weight_bytes"]),
                             f"{t['wall_seconds']:.0f}", gb(t["peak_rss_sum"]), f"{t['peak_rss_sum'] / r['weight_bytes']:.1f}",
                             f"{d.get('wall_seconds', 0):.0f}", gb(d.get("peak_rss_sum", 0)),
                             f"{d.get('peak_rss_sum', 0) / r['weight_bytes']:.1f}"])
        if len(points) >= 2:
            for stage in ("transform", "deploy"):
                xs = [r["weight_bytes"] for r in points]
                ys = [r[stage]["peak_rss_sum"] for r in points]
                ts = [r[stage]["wall_seconds"] for r in points]
                n = len(xs)
                mx, my, mt = sum(xs) / n, sum(ys) / n, sum(ts) / n
                sxx = sum((x - mx) ** 2 for x in xs)
                b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
                bt = sum((x - mx) * (t - mt) for x, t in zip(xs, ts)) / sxx
                full_rows = EMBED_ROWS if kind == "embed" else VOCAB
                full = full_rows * HIDDEN * 4
                fits[(kind, stage)] = {"a": my - b * mx, "b": b, "full_bytes": full, "full_peak": my - b * mx + b * full,
                                       "full_seconds": mt - bt * mx + bt * full}
    print("\n" + table(rows_out, ["net", "rows", "fp32 weights", "transform s", "transform peak", "x weights", "deploy s",
                                  "deploy peak", "x weights"]))
    if fits:
        print("\nExtrapolated to the 11B's vocabulary (least squares, peak = a + b x weight bytes):")
        rows_fit = []
        for (kind, stage), f in fits.items():
            rows_fit.append([kind, stage, gb(f["a"]), f"{f['b']:.2f}", gb(f["full_bytes"]), gb(f["full_peak"]),
                             f"{f['full_seconds']:.0f}"])
        print(table(rows_fit, ["net", "tool", "a", "b (bytes per weight byte)", "weights at 11B", "peak at 11B", "seconds at 11B"]))
    if work_rows:
        print("\nNets of the 11B-width work dir: model_transform as lvb runs it (convert_scale.py) vs with --do_onnx_sim '', "
              "then model_deploy with lvb's options:")
        print(table(work_rows, ["net", "onnx", "transform s (lvb)", "peak (lvb)", "transform s (no sim)", "peak (no sim)",
                                "deploy", "deploy s", "deploy peak", "same bmodel size"]))
    m = machine()
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {gb(m['ram_bytes'])} RAM")
    results["fits"] = {f"{k}|{s}": v for (k, s), v in fits.items()}
    results_path.write_text(json.dumps(results, indent=1, default=str))
    keep = ("exit_code", "wall_seconds", "peak_rss_sum", "peak_rss_during", "killed_for_memory")
    runs = [{**{k: r[k] for k in ("kind", "rows", "weight_bytes", "onnx_bytes", "onnxsim")},
             **{stage: {k: r[stage].get(k) for k in keep} for stage in ("transform", "deploy") if stage in r}}
            for key, r in results.items() if key != "fits" and not key.startswith("work-")]
    work_nets = [{**{k: r.get(k) for k in ("net", "kind", "onnx_bytes", "bmodel_bytes", "deploy_args")},
                  **{stage: {k: r[stage].get(k) for k in keep} for stage in ("transform", "deploy") if stage in r}}
                 for key, r in results.items() if key.startswith("work-")]
    path = record_result("transform_memory", {"hidden": HIDDEN, "vocab": VOCAB, "embed_rows": EMBED_ROWS, "rows": sizes,
                                              "work": args.work.resolve().name if args.work else None, "runs": runs,
                                              "fits": [{"kind": k, "stage": s, **f} for (k, s), f in fits.items()],
                                              "work_nets": work_nets})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
