"""Every net kind of the 11B compile checked on the simulator at the real widths, what
`lvb compile --check kinds` adds to the 11B compile, and the short stack end to end.

1. `lvb compile --check kinds` (the 11B's options: `--quant Q`, vision, embedding and head
   BF16, `--seq`/`--chunk` of the export) on bench's 11B-width checkpoint
   (`convert_scale.py --export-only` makes it and its export): the first net of each kind is
   deployed and run on the simulator against onnxruntime (for INT4/INT8 nets onnxruntime
   with the same weight quantization, lvb.check), its siblings take its options unchecked.
   This script only reads the compile manifest: cosine, error, threshold, options, and the
   seconds of each net and of its check (simulator run, and the whole check).
2. What the checks add to the 11B compile: the sum of the per-kind check seconds (one check
   per kind, whatever the layer count) against the 11B compile projected as convert_scale
   does (each kind's measured build seconds, check excluded, x its nets in the 11B's plan),
   and against bench README §1.2's ≈ 2 h.
3. The short stack end to end: lvb's Runner on the simulator (the combined bmodel) and on
   onnxruntime (the export), one picture, greedy tokens: every step's logits cosine and
   whether the simulator picks onnxruntime's token. Both are fed onnxruntime's tokens
   (teacher forcing), so one early difference does not make every later step incomparable.
   The logits come from running the LM head net on the last hidden state (the runtime keeps
   them on the device and runs the greedy head): the bench reads what the Runner computed,
   through its own nets, without a hook in the library.

The vision tower at four tiles is 6432 tokens a layer, hours of simulator per net on two
cores: `--max-tiles 1` (the default here) keeps every width and runs 1608 (bench README §4.1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from common import BENCH, CONFIGS, LVB, OUT, REPO, RESULTS, compiles, geometry_11b, record_result, run_paths, table

README_11B_COMPILE_SECONDS = 2 * 3600  # bench README §1.2: transform + deploy of every 11B net, no check


def run(argv: list, log: Path) -> tuple[int, float]:
    """A command with its output to `log`; (exit code, wall seconds)."""
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call([str(a) for a in argv], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    return code, time.perf_counter() - started


def ensure_export(args, work: Path, out: Path) -> None:
    if (work / "export" / "manifest.json").is_file():
        return
    print("no export yet: running convert_scale.py --export-only (checkpoint 20 s, export ≈ 5 min) ...", flush=True)
    code, _ = run([sys.executable, BENCH / "convert_scale.py", "--export-only", "--layers", args.layers,
                   "--vision-layers", args.vision_layers, "--global-layers", args.global_layers,
                   "--max-tiles", args.max_tiles, *(["--tile", args.tile] if args.tile else []), "--seq", args.seq, "--chunk", args.chunk, "--out", out],
                  out / "real_widths-export.log")
    if code != 0:
        raise SystemExit(f"convert_scale.py failed (exit {code}); see {out / 'real_widths-export.log'}")


def compile_manifest(work: Path, quant: str) -> dict | None:
    """The compile manifest of `--quant quant --check kinds` with the other settings at their defaults."""
    found = compiles(work, quant=quant, check="kinds", vision_quant="bf16", embed_quant="bf16", head_quant="bf16")
    return found[-1] if found else None


def check_first_nets(work: Path, quant: str, nets: list[str]) -> None:
    """Build and check `nets` (each the first of its kind) with lvb's own Compiler, exactly as
    `lvb compile --check kinds` would, into the same cache: the compile that follows reuses
    them. `lvb compile` takes the nets in the export's order, the vision tower first; at real
    widths a check is many minutes of simulator, so this lets the cheap kinds go first and two
    of these processes share the work."""
    from lvb.contract import CheckMode
    from lvb.compile.compiler import Compiler, CompileSettings, NetFailed
    from lvb.toolchain import find_toolchain

    # tpu-mlir's transform of an 11B-width net peaks far above the rest (bench/README §1.2): two of
    # these processes take turns at it and overlap the simulator runs that follow.
    compiler = Compiler(work, CompileSettings(quant=quant, check=CheckMode.KINDS), find_toolchain(),
                        transform_lock=work.parent / "transform.lock")
    first: dict = {}
    for job in compiler.jobs:
        first.setdefault(job.kind, job)
    unknown = [n for n in nets if n not in {job.name for job in first.values()}]
    if unknown:
        raise SystemExit(f"--first {','.join(unknown)}: not the first net of a kind; those are "
                         f"{', '.join(job.name for job in first.values())}")
    for name in nets:
        started = time.perf_counter()
        try:
            result = compiler.compile_net(name)
        except NetFailed as e:  # its attempts are in the cache with their checks; go on to the next kind
            print(f"{name}: {e} ({time.perf_counter() - started:.0f} s here)", flush=True)
            continue
        check = result["check"] or {}
        cosines = ", ".join(f"{k} {v:.6f}" for k, v in check.get("cosines", {}).items())
        print(f"{name}: {cosines}, check {check.get('seconds')} s, net {result['seconds']} s "
              f"({time.perf_counter() - started:.0f} s here)", flush=True)


def per_output(work: Path, quant: str, net: str, group_size: int = 64) -> list[dict]:
    """A compiled net's outputs one by one against onnxruntime with the same weight
    quantization (the compile check keeps only the worst), on the export's check inputs."""
    import numpy as np

    from lvb.check import load_check, quantized_reference
    from lvb.numerics import compare
    from lvb.runtime.cmodel import CmodelEngine

    results = sorted((work / "compile" / net).glob("[0-9a-f]*/result.json"))
    if not results:
        raise SystemExit(f"--per-output {net}: not compiled in {work}")
    bmodel = work / json.loads(results[0].read_text())["bmodel"]
    export = work / "export" / net
    feeds, fp32 = load_check(export / "check.npz")
    started = time.perf_counter()
    with CmodelEngine(bmodel) as simulator:
        got = simulator.run(net, feeds)
    seconds = time.perf_counter() - started
    reference = quantized_reference(export / f"{net}.onnx", feeds, quant, group_size) if quant != "bf16" else fp32
    rows = []
    for i, (ref, out, plain) in enumerate(zip(reference, got, fp32)):
        rows.append({"output": i, "shape": list(np.shape(ref)), **compare([ref], [out]),
                     "reference_vs_fp32": compare([plain], [ref])["cosine"], "largest": float(np.abs(ref).max())})
        print(f"{net} output {i} {rows[-1]['shape']}: cosine {rows[-1]['cosine']:.6f}, max abs err "
              f"{rows[-1]['max_abs_err']:.3g}, largest reference value {rows[-1]['largest']:.3g}", flush=True)
    print(f"simulator {seconds:.0f} s")
    return rows


def compile_kinds(work: Path, quant: str, jobs: int, out: Path) -> dict:
    manifest = compile_manifest(work, quant)
    if manifest is not None:
        print(f"{quant}: compiled before ({manifest['path']})")
        return manifest
    fresh = not any((work / "compile").glob("*/mlir-*"))  # else the transforms are cached and not in the seconds
    log = out / f"real_widths-compile-{quant}.log"
    print(f"{quant}: lvb compile --check kinds --jobs {jobs} (log: {log}) ...", flush=True)
    code, wall = run([LVB, "compile", "--work", work, "--quant", quant, "--check", "kinds", "--jobs", jobs], log)
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise SystemExit(f"lvb compile --quant {quant} --check kinds failed (exit {code}):\n{tail}")
    manifest = compile_manifest(work, quant)
    manifest["bench"] = {"wall_seconds": round(wall, 1), "transforms_included": fresh}
    Path(manifest["path"]).write_text(json.dumps({k: v for k, v in manifest.items() if k != "path"}, indent=1))
    return manifest


def kind_rows(manifest: dict, exported: dict) -> list[dict]:
    rows = []
    for name, result in manifest["nets"].items():
        check = result.get("check") or {}
        rows.append({
            "net": name, "kind": exported[name]["kind"], "quant": result["quant"], "options": result["options"],
            "checked_by": result.get("checked_by"), "cosine": check.get("cosine"), "cosine_fp32": check.get("cosine_fp32"),
            "max_abs_err": check.get("max_abs_err"), "max_rel_err": check.get("max_rel_err"),
            "threshold": min(result["thresholds"].values()), "passed": result["passed"], "seconds": result["seconds"],
            "simulator_seconds": check.get("simulator_seconds"), "check_seconds": check.get("seconds", 0.0),
        })
    return rows


def check_cost(rows: list[dict], seq: int, chunks: list[int]) -> dict:
    """Σ check seconds (one per kind) against the 11B compile projected from these builds."""
    from lvb.contract import plan
    from lvb.spec import ModelSpec

    counts: dict[str, int] = {}
    for net in plan(ModelSpec.from_config(json.loads(CONFIGS["11b"].read_text())), seq, tuple(chunks)):
        counts[net.kind.value] = counts.get(net.kind.value, 0) + 1
    build: dict[str, list[float]] = {}
    for r in rows:
        build.setdefault(r["kind"], []).append(r["seconds"] - r["check_seconds"])
    projected = sum(sum(v) / len(v) * counts.get(kind, 0) for kind, v in build.items())
    checks = sum(r["check_seconds"] for r in rows)
    return {"check_seconds": round(checks, 1), "simulator_seconds": round(sum(r["simulator_seconds"] or 0 for r in rows), 1),
            "projected_11b_compile_seconds": round(projected, 1), "nets_11b": counts,
            "share_of_projected": round(checks / projected, 3) if projected else None,
            "share_of_readme_2h": round(checks / README_11B_COMPILE_SECONDS, 3)}


# -- 3. the short stack end to end ------------------------------------------------------


def picture(size: int):
    """A smooth synthetic picture of exactly one tile."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 255
    return Image.fromarray(rgb.astype(np.uint8))


def _prompt(checkpoint, question: str):
    from lvb.runtime.image import preprocess

    image = preprocess(picture(checkpoint.spec.vision.image_size), checkpoint.image_config)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return image, checkpoint.tokenizer.encode_chat(checkpoint.template, messages, now=datetime(2026, 11, 30))


def run_stack(checkpoint, engine, image, ids: list[int], tokens: list[int] | None, count: int) -> tuple[list, float]:
    """Per step, the logits of lvb's Runner on `engine`: the prompt, then each of `tokens` (a
    reference's answer) decoded in turn, or, without `tokens`, its own greedy answer."""
    import numpy as np

    from lvb.contract import Kind, Names, net_name
    from lvb.runtime.runner import Runner

    started = time.perf_counter()
    runner = Runner(checkpoint.spec, engine, checkpoint.tokenizer.image_id, checkpoint.tokenizer.pad_id or 0)
    runner.encode_image(image)
    steps = []
    for i in range(count):
        if i == 0:
            hidden = runner.prefill(ids, 0, image.num_tiles)
        else:
            fed = tokens[i - 1] if tokens else int(np.argmax(steps[-1]))
            hidden = runner.decode(fed, len(ids) + i - 1, image.num_tiles)
        steps.append(np.asarray(engine.run(net_name(Kind.LM_HEAD), {Names.HIDDEN: hidden})[0], np.float64).ravel())
        print(f"  {engine.backend} step {i}: token {int(np.argmax(steps[-1]))} ({time.perf_counter() - started:.0f} s)", flush=True)
    return steps, time.perf_counter() - started


def quantized_nets(work: Path, quant: str, folder: Path, group_size: int = 64) -> tuple[dict[str, Path], dict]:
    """Every exported net's ONNX, the `quant` ones (the decoder blocks and cross K/V) with
    their matmul weights quantized as tpu-mlir does (lvb.check.quantize_weights, what each
    net's compile check compares against): the whole stack as a correct compile computes it.
    (files, specs), for an OnnxEngine."""
    import onnx

    from lvb.check import quantize_weights
    from lvb.compile.compiler import CompileSettings
    from lvb.contract import NetSpec
    from lvb.workdir import WorkDir

    settings, workdir = CompileSettings(quant=quant), WorkDir(work)
    files, specs = {}, {}
    for name, entry in workdir.require_export()["nets"].items():
        specs[name] = NetSpec.from_json(entry)
        files[name] = source = workdir.onnx(entry)
        if settings.quant_of(specs[name].kind) != quant:
            continue
        files[name] = target = folder / name / source.name
        if target.is_file():
            continue
        model = onnx.load(str(source))
        quantize_weights(model, quant, group_size)
        target.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(target.with_suffix(".tmp")), save_as_external_data=True, location=f"{name}.weights")
        os.replace(target.with_suffix(".tmp"), target)
    return files, specs


def add_quantized(checkpoint_dir: Path, work: Path, e2e: dict, question: str, reference_file: Path) -> None:
    """The same stack on onnxruntime with the blocks' weights quantized as tpu-mlir does, fed
    the reference's tokens, added to a recorded end-to-end run: what the quantization alone
    does to the answer, apart from what the compile adds (and, where the run kept the
    simulator's logits, how close the simulator is to it)."""
    import numpy as np

    from lvb.numerics import cosine
    from lvb.runtime.onnx import OnnxEngine
    from lvb.runtime.pipeline import Checkpoint

    checkpoint = Checkpoint.load(checkpoint_dir)
    image, ids = _prompt(checkpoint, question)
    reference = list(np.load(reference_file)["logits"])
    tokens = [int(np.argmax(r)) for r in reference]
    files, specs = quantized_nets(work, e2e["quant"], reference_file.parent / f"{reference_file.stem}-{e2e['quant']}-onnx")
    with OnnxEngine(files, specs=specs) as engine:
        quantized, seconds = run_stack(checkpoint, engine, image, ids, tokens, len(e2e["steps"]))
    simulated_file = simulator_logits(reference_file, e2e["quant"])
    simulated = list(np.load(simulated_file)["logits"]) if simulated_file.is_file() else [None] * len(quantized)
    for step, q, ref, sim in zip(e2e["steps"], quantized, reference, simulated):
        step |= {"quantized_cosine": cosine(q, ref), "quantized_token": int(np.argmax(q))}
        if sim is not None:
            step["simulator_vs_quantized_cosine"] = cosine(sim, q)
    e2e["seconds"][f"onnxruntime_{e2e['quant']}"] = round(seconds, 1)


def simulator_logits(reference_file: Path, quant: str) -> Path:
    return reference_file.with_name(f"{reference_file.stem}-cmodel-{quant}.npz")


def end_to_end(checkpoint_dir: Path, work: Path, bmodel: Path, count: int, question: str, reference_file: Path,
               reference_only: bool = False, quant: str = "bf16") -> dict | None:
    """onnxruntime first (its logits kept in `reference_file`), then the simulator fed the
    same tokens; one engine at a time, so the peak is the larger of the two."""
    import numpy as np

    from lvb.numerics import cosine
    from lvb.runtime.backends import open_engine
    from lvb.runtime.pipeline import Checkpoint

    checkpoint = Checkpoint.load(checkpoint_dir)
    image, ids = _prompt(checkpoint, question)
    key = json.dumps({"ids": ids, "count": count})
    seconds = {}
    if reference_file.is_file() and str(np.load(reference_file)["key"]) == key:
        reference = list(np.load(reference_file)["logits"])
    else:
        with open_engine("onnxruntime", onnx_work=work) as engine:
            reference, seconds["onnxruntime"] = run_stack(checkpoint, engine, image, ids, None, count)
        tmp = reference_file.with_suffix(".tmp.npz")
        np.savez(tmp, key=key, logits=np.stack(reference))
        os.replace(tmp, reference_file)
    if reference_only:
        return None
    tokens = [int(np.argmax(r)) for r in reference]
    with open_engine("cmodel", bmodel=bmodel) as engine:
        simulated, seconds["cmodel"] = run_stack(checkpoint, engine, image, ids, tokens, count)
    np.savez(simulator_logits(reference_file, quant), key=key, logits=np.stack(simulated))
    steps = []
    for i, (ref, sim) in enumerate(zip(reference, simulated)):
        top = np.sort(ref)[-2:]
        steps.append({"step": i, "cosine": cosine(sim, ref), "token": tokens[i], "simulator_token": int(np.argmax(sim)),
                      "same": int(np.argmax(sim)) == tokens[i], "max_abs_err": float(np.max(np.abs(sim - ref))),
                      "reference_margin": float(top[1] - top[0])})
    first_difference = next((s["step"] for s in steps if not s["same"]), len(steps))
    return {"prompt_tokens": len(ids), "tiles": int(image.num_tiles), "steps": steps,
            "token_agreement": sum(s["same"] for s in steps) / len(steps), "same_answer_tokens": first_difference,
            "min_cosine": min(s["cosine"] for s in steps), "seconds": {k: round(v, 1) for k, v in seconds.items()}}


def print_end_to_end(e: dict) -> None:
    quantized = "quantized_cosine" in e["steps"][0]
    print(table([[s["step"], f"{s['cosine']:.6f}", f"{s['max_abs_err']:.3g}", s["token"], s["simulator_token"],
                  f"{s['reference_margin']:.3g}", *([f"{s['quantized_cosine']:.6f}", s["quantized_token"]] if quantized else [])]
                 for s in e["steps"]],
                ["step", "logits cosine", "max abs err", "onnxruntime token", "simulator token", "top-2 margin",
                 *([f"{e['quant']} onnxruntime cosine", f"{e['quant']} onnxruntime token"] if quantized else [])]))
    print(f"\n{e['prompt_tokens']} prompt tokens, {e['tiles']} tile; token agreement {e['token_agreement']:.2f}, "
          f"same answer for {e['same_answer_tokens']} tokens; seconds {e['seconds']}")
    if quantized:
        same = sum(s["quantized_token"] == s["simulator_token"] for s in e["steps"])
        print(f"the simulator picks the quantization-aware onnxruntime's token at {same} of {len(e['steps'])} steps")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vision-layers", type=int, default=2)
    parser.add_argument("--global-layers", type=int, default=1)
    parser.add_argument("--max-tiles", type=int, default=1, help="tiles per picture (the 11B: 4; see the docstring)")
    parser.add_argument("--tile", type=int, default=None,
                        help="pixels per tile (the 11B: 560, 1601 vision tokens; 224: 257, every width kept)")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--quant", action="append", choices=["int4", "int8", "bf16"],
                        help="decoder quantization to compile and check, repeatable (default: int4)")
    parser.add_argument("--jobs", type=int, default=1, help="lvb compile --jobs (1: one heavy tool at a time)")
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens of the end-to-end run (0: skip it)")
    parser.add_argument("--question", default="What is in this picture?")
    parser.add_argument("--reference-only", action="store_true",
                        help="only the onnxruntime side of the end-to-end run (needs the export, not the compile)")
    parser.add_argument("--quantized-only", action="store_true",
                        help="add the quantization-aware onnxruntime stack to the end-to-end run already recorded, then stop")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--per-output", metavar="NET",
                        help="run a compiled net's first bmodel again on the simulator and compare each output, then stop")
    parser.add_argument("--first", type=lambda v: v.split(","),
                        help="only build and check these nets, each the first of its kind, in this order (for the first "
                             "--quant), then stop: e.g. embed,block_cache_0")
    args = parser.parse_args()
    quants = args.quant or ["int4"]

    geometry = geometry_11b(args.layers, args.vision_layers, args.global_layers, max_tiles=args.max_tiles, tile=args.tile)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint, work, _ = run_paths(out, geometry, args.seq, args.chunk, "real_widths")
    # One entry per stack in bench/results/real_widths.json; each invocation adds its part
    # (--per-output, --quantized-only, ...) to what that stack's earlier ones recorded.
    label = f"{geometry.name}-seq{args.seq}-chunk{args.chunk}"
    results_path = RESULTS / "real_widths.json"
    recorded = json.loads(results_path.read_text()).get(label, {}) if results_path.is_file() else {}
    results = {key: value for key, value in recorded.items() if key not in ("commit", "date", "machine", "load_average")}

    def save():
        record_result("real_widths", results, label=label)

    ensure_export(args, work, out)
    export = json.loads((work / "export" / "manifest.json").read_text())
    chunks = export["settings"]["chunks"]
    reference_file = out / f"real_widths-reference-{geometry.name}-seq{args.seq}-chunk{args.chunk}.npz"
    if args.reference_only:
        end_to_end(checkpoint, work, Path(), args.tokens, args.question, reference_file, reference_only=True)
        print(f"reference logits: {reference_file}")
        return 0
    if args.quantized_only:
        add_quantized(checkpoint, work, results["end_to_end"], args.question, reference_file)
        save()
        print_end_to_end(results["end_to_end"])
        return 0
    if args.per_output:
        results.setdefault("per_output", {})[args.per_output] = per_output(work, quants[0], args.per_output)
        save()
        return 0
    if args.first:
        check_first_nets(work, quants[0], args.first)
        return 0
    for quant in quants:
        manifest = compile_kinds(work, quant, args.jobs, out)
        rows = kind_rows(manifest, export["nets"])
        results[quant] = {"bmodel": str(work / manifest["bmodel"]), "rows": rows, "bench": manifest.get("bench", {}),
                          "cost": check_cost(rows, args.seq, chunks)}
        save()
        print(f"\n{quant}: the checked net of each kind (simulator vs onnxruntime"
              f"{' with the same weight quantization' if quant != 'bf16' else ''})\n")
        print(table([[r["net"], r["kind"], r["quant"], " ".join(r["options"]) or "default", f"{r['cosine']:.6f}",
                      f"{r['cosine_fp32']:.6f}", f"{r['max_abs_err']:.3g}", f"{r['max_rel_err']:.3g}", r["threshold"],
                      "yes" if r["passed"] else "NO", r["simulator_seconds"], r["check_seconds"], r["seconds"]]
                     for r in rows if r["checked_by"] is None],
                    ["net", "kind", "quant", "options", "cosine", "vs fp32", "max abs err", "max rel err", "threshold",
                     "passed", "simulator s", "check s", "net s"]))
        trusted = [f"{r['net']} (like {r['checked_by']})" for r in rows if r["checked_by"]]
        print(f"\nunchecked, options of their kind's first net: {', '.join(trusted) or 'none'}")
        cost = results[quant]["cost"]
        bench = results[quant]["bench"]
        print(f"\nlvb compile wall {bench.get('wall_seconds', '?')} s (transforms included: {bench.get('transforms_included', '?')}); "
              f"checks {cost['check_seconds']} s ({cost['simulator_seconds']} s of it on the simulator); 11B compile "
              f"projected from these builds {cost['projected_11b_compile_seconds'] / 60:.0f} min -> checks add "
              f"{cost['share_of_projected']:.1%}; against bench README §1.2's 2 h: {cost['share_of_readme_2h']:.1%}")

    if args.tokens:
        quant = quants[0]
        print(f"\nend to end ({quant} bmodel on the simulator vs the export on onnxruntime, {args.tokens} greedy tokens) ...",
              flush=True)
        results["end_to_end"] = {"quant": quant, **end_to_end(checkpoint, work, Path(results[quant]["bmodel"]), args.tokens,
                                                               args.question, reference_file, quant=quant)}
        if quant in ("int4", "int8"):
            add_quantized(checkpoint, work, results["end_to_end"], args.question, reference_file)
        save()
        print_end_to_end(results["end_to_end"])
    print(f"\nresults: {results_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
