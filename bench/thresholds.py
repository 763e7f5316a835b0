#!/usr/bin/env python3
"""What the checks' thresholds are set from: the measured agreement of every compiled
net with its reference, per net kind and quantization, and of whole greedy answers on
the simulator with transformers' generate, per fixture and quantization.

How: every test fixture (lvb.testing.checkpoints.GEOMETRIES, random weights) and the
trained toy (models/toy) is exported at the tests' --seq 160 --chunk 32 and compiled
with `--quant int4`, `int8` and `bf16`, the vision tower as --vision-quant says (the
simulator check on, the thresholds of the code the script runs with: a net below them would
stop the compile, so run it with the thresholds loose when measuring anew). The compile
manifest holds each net's cosine against its reference (fp32 ONNX for bf16 and w8a8 nets, ONNX
with tpu-mlir's weight quantization for int4/int8 ones, lvb.check.quantized_reference) and
against fp32. Then lvb
verify's answer check (lvb.verify.checks.check_answers: four chats, 16 new tokens, on
the simulator) gives each fixture's token agreement.

Writes out/thresholds/measured.json and prints the tables; exits 0. With --write, also
the table the checks load (src/lvb/thresholds.json): its bench/thresholds.py column becomes
this run's minimum per net kind and quantization it measured (a run over some of the fixtures
only lowers a row), the other benches' columns stay. Cached: an export or compile that exists
is reused (lvb's own caches).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OUT, REPO  # noqa: E402

SEQ, CHUNK = 160, 32
QUANTS = ("int4", "int8", "bf16")


def fixtures(out: Path, names: list[str]) -> dict[str, Path]:
    from lvb.testing.checkpoints import write_checkpoint

    found = {}
    for name in names:
        if name == "toy":
            found[name] = REPO / "models" / "toy"
            continue
        directory = out / "checkpoints" / name
        if not (directory / "model.safetensors").is_file():
            write_checkpoint(directory, name)
        found[name] = directory
    return found


def measure(name: str, model: Path, out: Path, quants: list[str], answers: bool, vision_quant: str = "bf16") -> dict:
    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.export.exporter import export
    from lvb.runtime.backends import open_engine
    from lvb.runtime.pipeline import Checkpoint, Session
    from lvb.toolchain import find_toolchain
    from lvb.verify.checks import check_answers, read_task

    work = out / "work" / name
    export(model, work, seq=SEQ, chunks=CHUNK)
    toolchain = find_toolchain()
    saved = out / f"{name}.json"  # earlier runs' other quantizations are kept
    result = json.loads(saved.read_text()) if saved.is_file() else {"nets": {}, "answers": {}}
    for quant in quants:
        compiler = Compiler(work, CompileSettings(quant=quant, vision_quant=vision_quant), toolchain)
        manifest = compiler.run(jobs=1)
        quant = quant if vision_quant == "bf16" else f"{quant}+vision-{vision_quant}"  # this build's key in the results
        result["nets"][quant] = {net: {"kind": job.kind.value, "quant": r["quant"], "cosine": r["check"]["cosine"],
                                       "cosine_fp32": r["check"]["cosine_fp32"], "max_abs_err": r["check"]["max_abs_err"],
                                       "cosines": r["check"].get("cosines", {})}
                                 for job in compiler.jobs for net, r in [(job.name, manifest["nets"][job.name])]}
        print(f"{name} {quant}: compiled", flush=True)
        if answers:
            task = read_task(model)
            with open_engine("cmodel", bmodel=compiler.bmodel, toolchain=toolchain) as engine:
                session = Session(Checkpoint.load(model), engine)
                got = check_answers(model, session, task["question"] if task else "What is in the picture?")
            result["answers"][quant] = [{"name": a.name, "agreement": a.agreement, "reference": a.reference, "got": a.got}
                                        for a in got]
            print(f"{name} {quant}: answers {[a.agreement for a in got]}", flush=True)
        saved.write_text(json.dumps(result, indent=1))
    return result


def from_manifest(path: Path) -> dict:
    """The per-net checks of a compile that already ran (its work dir's export gives the kinds)."""
    compiled = json.loads(path.read_text())
    kinds = {net: e["kind"] for net, e in json.loads((path.parent.parent / "export" / "manifest.json").read_text())["nets"].items()}
    quant = compiled["settings"]["quant"]
    return {"nets": {quant: {net: {"kind": kinds[net], "quant": r["quant"], "cosine": r["check"]["cosine"],
                                   "cosine_fp32": r["check"]["cosine_fp32"], "max_abs_err": r["check"]["max_abs_err"],
                                       "cosines": r["check"].get("cosines", {})}
                             for net, r in compiled["nets"].items()}}, "answers": {}}


def tables(results: dict[str, dict]) -> str:
    by_kind: dict[tuple[str, str], list[tuple[float, float, str]]] = defaultdict(list)
    for name, result in results.items():
        for nets in result["nets"].values():
            for net, r in nets.items():
                by_kind[r["kind"], r["quant"]].append((r["cosine"], r["cosine_fp32"], f"{name}/{net}"))
    lines = ["| net kind | quant | nets | min cosine vs reference (where) | max | min vs fp32 |", "|---|---|---|---|---|---|"]
    for (kind, quant), values in sorted(by_kind.items()):
        worst = min(values)
        lines.append(f"| {kind} | {quant} | {len(values)} | {worst[0]:.6f} ({worst[2]}) | {max(values)[0]:.6f} | "
                     f"{min(v[1] for v in values):.6f} |")
    lines += ["", "| fixture | quant | agreement per answer | mean |", "|---|---|---|---|"]
    for name, result in results.items():
        for quant, answers in result["answers"].items():
            values = [a["agreement"] for a in answers if a["agreement"] is not None]
            lines.append(f"| {name} | {quant} | {' '.join(f'{v:.2f}' for v in values)} | {sum(values) / len(values):.3f} |")
    return "\n".join(lines)


TABLE = REPO / "src" / "lvb" / "thresholds.json"
SOURCE = "bench/thresholds.py"
KV = ("k", "v")


def minima(results: dict[str, dict]) -> dict[tuple[str, str, str], float]:
    """(kind, quant, outputs) -> the worst cosine measured: "all" over every net's worst output,
    "k, v" over a self-attention block's K and V, "tpu-mlir" over a w8a8 net's outputs against
    tpu-mlir's interpreter (lvb.check.INTERPRETER)."""
    from lvb.check import INTERPRETER

    found: dict[tuple[str, str, str], float] = {}
    for result in results.values():
        for nets in result["nets"].values():
            for r in nets.values():
                kv = [r["cosines"][o] for o in KV if o in r["cosines"]]
                interpreted = [c for o, c in r["cosines"].items() if o.endswith(INTERPRETER)]
                for outputs, value in (("all", r["cosine"]), ("k, v", min(kv) if kv else None),
                                       ("tpu-mlir", min(interpreted) if interpreted else None)):
                    if value is not None:
                        key = r["kind"], r["quant"], outputs
                        found[key] = min(found.get(key, 1.0), round(value, 6))
    return found


def write_table(results: dict[str, dict], path: Path = TABLE, complete: bool = True) -> None:
    """This run's minima into the table's bench/thresholds.py column. A "k, v" row is kept only
    where the table has one (K and V take their kind's row unless both widths were measured).
    A run over some of the fixtures (not `complete`) only lowers a row: a fixture it did not run
    may be the one that set it."""
    table = json.loads(path.read_text())
    rows = {(r["kind"], r["quant"], r["outputs"]): r for r in table["rows"]}
    for (kind, quant, outputs), value in minima(results).items():
        if outputs != "k, v" and (kind, quant, outputs) not in rows:
            rows[kind, quant, outputs] = {"kind": kind, "quant": quant, "outputs": outputs, "measured": {}}
            table["rows"].append(rows[kind, quant, outputs])
        if (kind, quant, outputs) in rows:
            measured = rows[kind, quant, outputs]["measured"]
            measured[SOURCE] = value if complete else min(value, measured.get(SOURCE, 1.0))
    lines = ",\n".join("  " + json.dumps(row) for row in table["rows"])
    path.write_text(f'{{\n "about": {json.dumps(table["about"])},\n "rows": [\n{lines}\n ]\n}}\n')


def main() -> None:
    from lvb.testing.checkpoints import GEOMETRIES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT / "thresholds")
    every = [*sorted(GEOMETRIES), "toy"]
    parser.add_argument("--fixtures", nargs="*", default=every)
    parser.add_argument("--quants", nargs="+", default=list(QUANTS))
    parser.add_argument("--no-answers", action="store_true", help="only the per-net checks")
    parser.add_argument("--vision-quant", default="bf16", help="the vision tower's quantization in every compile (e.g. w8a8)")
    parser.add_argument("--write", action="store_true", help=f"write this run's minima into {TABLE.relative_to(REPO)}")
    parser.add_argument("--also", nargs="*", type=Path, default=[],
                        help="more compile manifests (WORK/compile/<bmodel>.json, e.g. the tests' work dirs) to include")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, model in fixtures(args.out, args.fixtures).items():
        results[name] = measure(name, model, args.out, args.quants, not args.no_answers, args.vision_quant)
    for manifest in args.also:
        results[f"{manifest.parent.parent.name}/{manifest.stem}"] = from_manifest(manifest)
    (args.out / "measured.json").write_text(json.dumps(results, indent=1))
    if args.write:
        write_table(results, complete=set(every) <= set(args.fixtures))
    print(tables(results))


if __name__ == "__main__":
    main()
