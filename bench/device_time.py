#!/usr/bin/env python3
"""Time on the BM1684X at Llama-3.2-11B-Vision widths, by tpu-mlir's cost model: every net
kind's estimate, the seed's benchmark turn (first token at 1 to 4 tiles, one decode step,
tokens/s), lvb's layout beside the reference port's, and lvb projected onto an SE7-32.

How: `lvb compile` keeps each net's estimate (lvb.devicetime). This script reads the compile
manifest of a short stack at the real widths (bench/convert_scale.py's work directory, compiled
with `lvb compile --check none`), stands one net of each kind in for every net of that kind in
the full model's plan (its layer counts from the published config; layers of a kind have the
same shapes, so the same estimate: checked where the stack has two of a kind), and prices the
turn with lvb.runtime.turn, i.e. from the runtime's own launches. The reference layout's
estimates come from bench/reference_layout.py (bench/results/reference_layout.json), built
through the same toolchain. Launch overhead is left out of both (lvb inspect --launch-us
states it apart); the projection onto the card multiplies lvb's estimate by the ratio of the
reference's measured time to its own estimate, separately for the first token and the step.

Writes bench/results/device_time.json under --label (several builds side by side: before and
after a change). Prints its tables; no timed assertions.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))
from common import (CONFIGS, PROMPT_TOKENS, REFERENCE_FIRST_TOKEN_S, REFERENCE_SOURCE, REFERENCE_TOKENS_PER_S,  # noqa: E402
                    RESULTS, model_of, newest_compile, record_result, table)

from lvb.contract import Kind, plan  # noqa: E402
from lvb.devicetime import Estimate, NetEstimates, from_manifest  # noqa: E402
from lvb.runtime.turn import turn_times  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402
from lvb.workdir import WorkDir  # noqa: E402

REFERENCE_FILE = RESULTS / "reference_layout.json"


def full_config(short: dict, model: str) -> dict:
    """The short stack's config (its widths, tiles and tile size) with the published model's
    layer structure."""
    published = json.loads(CONFIGS[model].read_text())
    config = json.loads(json.dumps(short))
    for section in ("text_config", "vision_config"):
        for key in ("num_hidden_layers", "cross_attention_layers", "num_global_layers", "intermediate_layers_indices"):
            if key in published[section]:
                config[section][key] = published[section][key]
    return config


def measured_kinds(work: Path, quant: str | None, head_quant: str | None) -> tuple[dict, dict, dict, dict]:
    """One net of each kind from a compile's record: (the record, its config, per-kind estimates as
    device_time.json keeps them, whether nets of one kind were estimated equal)."""
    record = newest_compile(work, quant, head_quant)
    export = WorkDir(work).read_export()
    short = from_manifest(record)
    if short.missing:
        raise SystemExit(f"no estimate for {', '.join(short.missing)}: compiled before lvb kept them; compile again")
    by_kind: dict[Kind, list[str]] = defaultdict(list)
    for name, entry in export["nets"].items():
        by_kind[Kind(entry["kind"])].append(name)
    same = {}
    for kind, names in by_kind.items():
        if len(names) > 1:
            cycles = {n: [e.cycles for e in short.nets[n]] for n in names}
            same[kind.value] = {"nets": names, "equal": len({tuple(c) for c in cycles.values()}) == 1, "cycles": cycles}
    per_kind = {kind.value: {"net": names[0], "quant": record["nets"][names[0]]["quant"],
                             "options": record["nets"][names[0]]["options"],
                             "stages": [e.to_json() for e in short.nets[names[0]]]} for kind, names in by_kind.items()}
    config = json.loads((Path(record["model"]["dir"]) / "config.json").read_text())
    return record, config, per_kind, same


def price(spec: ModelSpec, seq: int, chunks: list[int], per_kind: dict, prompt_tokens: int) -> list[dict]:
    """The turn at 1 to 4 tiles (and without a picture) with every net of the full plan at its
    kind's estimate, by the runtime's own launches (lvb.runtime.turn)."""
    full = plan(spec, seq, chunks)
    stages = {kind: [Estimate.from_json(raw) for raw in entry["stages"]] for kind, entry in per_kind.items()}
    estimates = NetEstimates({n.name: stages[n.kind.value] for n in full}, ())
    kind_of = {n.name: n.kind.value for n in full}
    return [{"tiles": t.tiles, "first_token_ms": t.first_token.ms, "decode_step_ms": t.decode_step.ms,
             "tokens_per_second": t.tokens_per_second, "launches_first": t.first_token.launches,
             "launches_step": t.decode_step.launches,
             "first_token_by_kind": _by_kind(t.first_token.by_net, kind_of),
             "decode_step_by_kind": _by_kind(t.decode_step.by_net, kind_of)}
            for t in turn_times(spec, seq, chunks, estimates, prompt_tokens)]


def lvb_layout(work: Path, quant: str | None, head_quant: str | None, prompt_tokens: int) -> dict:
    record, short_config, per_kind, same = measured_kinds(work, quant, head_quant)
    model = model_of(short_config["text_config"]["hidden_size"])
    spec = ModelSpec.from_config(full_config(short_config, model))
    seq, chunks = record["settings"]["seq"], record["settings"]["chunks"]
    return {"work": str(work), "bmodel": record["bmodel"], "settings": record["settings"], "model": model,
            "prompt_tokens": prompt_tokens, "kinds": per_kind, "same_kind_equal": same,
            "turns": price(spec, seq, chunks, per_kind, prompt_tokens)}


# What must equal the published model's for a vision tower's estimates to stand in for its own.
VISION_GEOMETRY = ("hidden_size", "attention_heads", "intermediate_size", "image_size", "patch_size", "max_num_tiles")


def substituted_layout(work: Path, base_label: str, kinds: list[str], prompt_tokens: int) -> dict:
    """An earlier build's figures (device_time.json[base_label]) with `kinds` estimated again from
    the compile in `work`, priced over the full model again: for a change to a few kinds, compiled
    in a checkpoint that has only those at the real widths (bench/vision_time.py)."""
    record, config, measured, same = measured_kinds(work, None, None)
    return substituted(base_label, kinds, measured, same, config, prompt_tokens, {"work": str(work), "bmodel": record["bmodel"]})


def substituted(base_label: str, kinds: list[str], measured: dict, same: dict, config: dict, prompt_tokens: int,
                source: dict) -> dict:
    """device_time.json[base_label] with `kinds` taken from `measured` (per kind, as measured_kinds
    gives them) of a checkpoint with `config`; `source` says where they were built."""
    results = json.loads((RESULTS / "device_time.json").read_text())
    if base_label not in results:
        raise SystemExit(f"--base {base_label}: not in bench/results/device_time.json ({', '.join(results)})")
    base = results[base_label]
    work = source["work"]
    published = json.loads(CONFIGS[base["model"]].read_text())
    differs = [k for k in VISION_GEOMETRY if config["vision_config"].get(k) != published["vision_config"].get(k)]
    if any(k.startswith("vision") for k in kinds) and differs:
        raise SystemExit(f"{work}: its vision tower differs from the {base['model']}'s in {', '.join(differs)}")
    unknown = [k for k in kinds if k not in measured or k not in base["kinds"]]
    if unknown:
        raise SystemExit(f"--kinds {','.join(unknown)}: not compiled in {work} or not in --base {base_label}")
    per_kind = base["kinds"] | {k: measured[k] for k in kinds}
    spec = ModelSpec.from_config(published)
    settings = base["settings"]
    return source | {"base": base_label, "substituted": kinds,
            "settings": settings, "model": base["model"], "prompt_tokens": prompt_tokens, "kinds": per_kind,
            "same_kind_equal": base["same_kind_equal"] | {k: v for k, v in same.items() if k in kinds},
            "turns": price(spec, settings["seq"], settings["chunks"], per_kind, prompt_tokens)}


def _by_kind(by_net: dict[str, float], kind_of: dict[str, str]) -> dict[str, float]:
    totals: Counter = Counter()
    for net, ms in by_net.items():
        totals[kind_of[net]] += ms
    return dict(totals.most_common())


def print_layout(label: str, result: dict) -> None:
    rows = []
    for kind, entry in result["kinds"].items():
        for stage, raw in enumerate(entry["stages"]):
            e = Estimate.from_json(raw)
            seconds = e.cycles / 1e9
            busiest = max(e.ops.items(), key=lambda item: max(item[1].values()))[0] if e.ops else "-"
            rows.append([kind + (f" (stage {stage})" if len(entry["stages"]) > 1 else ""), entry["quant"],
                         " ".join(entry["options"]) or "default", f"{e.ms:.3f}", e.bound,
                         f"{e.read_bytes / 1e6:.1f}", f"{e.read_bytes / seconds / 1e9:.1f}", f"{e.flops / seconds / 1e12:.2f}", busiest])
    print(f"\n[{label}] {result['bmodel']}: one net of each kind (tpu-mlir's cost model)")
    print(table(rows, ["kind", "quant", "deploy options", "ms", "bound", "read MB", "read GB/s", "TFLOPS", "busiest op"]))
    for kind, check in result["same_kind_equal"].items():
        print(f"  {kind}: {', '.join(check['nets'])} estimated {'equal' if check['equal'] else 'DIFFERENT: ' + str(check['cycles'])}")
    rows = [["none" if t["tiles"] is None else t["tiles"], f"{t['first_token_ms']:,.1f}", f"{t['decode_step_ms']:.2f}",
             f"{t['tokens_per_second']:.2f}", f"{t['launches_first']} / {t['launches_step']}"] for t in result["turns"]]
    print(f"\n[{label}] the full {result['model']} at these widths, a {result['prompt_tokens']}-token first turn "
          f"(seq {result['settings']['seq']}, chunks {result['settings']['chunks']}), launch overhead not included")
    print(table(rows, ["picture tiles", "first token ms", "decode step ms", "tokens/s", "launches first / step"]))
    four = result["turns"][-1]
    for what in ("first_token_by_kind", "decode_step_by_kind"):
        total = sum(four[what].values())
        parts = ", ".join(f"{k} {v:,.1f} ms ({v / total:.0%})" for k, v in list(four[what].items())[:5])
        print(f"  where the {what.split('_by')[0].replace('_', ' ')} goes at {four['tiles']} tiles: {parts}")


def reference_turn(reference: dict) -> dict | None:
    """The reference's first token and decode step, its per-kind estimates summed over its call
    sequence by bench/reference_layout.py (the same at any tile count: it always runs 4 tiles and
    a 512-token prefill; its greedy head compiles to a dynamic subnet the cost model leaves unpriced)."""
    totals = reference.get("totals") or {}
    if "first_token" not in totals or "decode_step" not in totals:
        return None
    return {"first_token_ms": totals["first_token"]["ms"], "decode_step_ms": totals["decode_step"]["ms"]}


def compare(result: dict, reference: dict | None) -> dict:
    if not reference or not reference_turn(reference):
        print("\nno reference layout estimates yet (bench/reference_layout.py)")
        return {}
    ref = reference_turn(reference)
    k_first = REFERENCE_FIRST_TOKEN_S * 1000 / ref["first_token_ms"]
    k_step = (1000 / REFERENCE_TOKENS_PER_S) / ref["decode_step_ms"]
    rows, out = [], {"calibration": {"first_token": k_first, "decode_step": k_step}, "rows": []}
    for t in result["turns"]:
        if t["tiles"] is None:
            continue
        first_ratio = t["first_token_ms"] / ref["first_token_ms"]
        step_ratio = t["decode_step_ms"] / ref["decode_step_ms"]
        row = {"tiles": t["tiles"], "first_token_ratio": first_ratio, "decode_step_ratio": step_ratio,
               "projected_first_token_s": t["first_token_ms"] * k_first / 1000,
               "projected_tokens_per_second": 1000 / (t["decode_step_ms"] * k_step)}
        out["rows"].append(row)
        rows.append([t["tiles"], f"{t['first_token_ms']:,.1f} / {ref['first_token_ms']:,.1f}", f"{first_ratio:.3f}",
                     f"{t['decode_step_ms']:.2f} / {ref['decode_step_ms']:.2f}", f"{step_ratio:.3f}",
                     f"{row['projected_first_token_s']:.2f}", f"{row['projected_tokens_per_second']:.2f}"])
    print(f"\nlvb / reference layout (the reference always runs 4 tiles and a 512-token prefill); projected on an SE7-32 "
          f"by the reference's measured {REFERENCE_FIRST_TOKEN_S} s and {REFERENCE_TOKENS_PER_S} tokens/s "
          f"(calibration: first token x{k_first:.2f}, decode step x{k_step:.2f} of the estimate; {REFERENCE_SOURCE})")
    print(table(rows, ["tiles", "first token ms lvb / ref", "ratio", "decode step ms lvb / ref", "ratio",
                       "projected first token s", "projected tokens/s"]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="a work directory of bench/convert_scale.py, compiled")
    parser.add_argument("--quant", help="which compile in it (default: the newest)")
    parser.add_argument("--head-quant", help="which compile in it, by its LM head's quantization")
    parser.add_argument("--label", default="lvb", help="the name this build's figures are kept under")
    parser.add_argument("--prompt-tokens", type=int, default=PROMPT_TOKENS)
    parser.add_argument("--base", help="an earlier build in device_time.json to keep every kind of but --kinds")
    parser.add_argument("--kinds", type=lambda v: v.split(","), default=[],
                        help="with --base: the kinds (e.g. vision_layer,vision_global) estimated from --work's compile")
    args = parser.parse_args()
    if bool(args.base) != bool(args.kinds):
        raise SystemExit("--base and --kinds go together")
    if args.base:
        result = substituted_layout(args.work.resolve(), args.base, args.kinds, args.prompt_tokens)
    else:
        result = lvb_layout(args.work.resolve(), args.quant, args.head_quant, args.prompt_tokens)
    print_layout(args.label, result)
    reference = json.loads(REFERENCE_FILE.read_text()) if REFERENCE_FILE.is_file() else None
    result["against_reference"] = compare(result, reference)
    path = record_result("device_time", result, label=args.label)
    print(f"\nresults: {path.relative_to(REPO)} [{args.label}]")


if __name__ == "__main__":
    main()
