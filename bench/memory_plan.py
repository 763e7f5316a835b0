#!/usr/bin/env python3
"""The device memory plan of the 11B INT4 bmodel with lvb's runtime (sail backend), at
seq 512 and 1024, against an SE7 and an SC7 chip.

Sources:
- weights and instructions: the 11B INT4 bmodel's size from convert_scale.py
  (bench/results/convert_scale.json, extrapolated from per-net bmodels at real widths), or
  --weights to use another figure (model_tool's `weight` + `instruct` of a real one);
- engine buffers and scratch I/O: computed by lvb.runtime.memory from the contract's
  nets for the 11B's own config (tests/data/llama-3.2-11b-vision.config.json) in the
  dtypes the compiled nets take (bf16 state), i.e. exactly what Session allocates and
  SailEngine's shared scratch;
- activations: bmruntime shares one neuron buffer, sized for the largest net. --activations
  takes it from a bmodel (the largest `ctx_size` among its nets, read by
  lvb.bmodel.inspect_bmodel; activation_memory.py compiles nets of the 11B-width export
  for this) or as a byte count; by default the largest figure activation_memory.py recorded
  (bench/results/activation_memory.json). The table's title says where the figure came from.

Then continuous batching (`lvb export --batch 1,B`): the KV caches, cross-attention K/V and
per-step buffers grow with B (each conversation has its slot); the largest B whose plan leaves
at least SPARE on a 12 GB and a 16 GB chip at seq 512, written to bench/results/batch_memory.json.

Prints a table per plan and writes them to bench/results/memory_plan.json (committed; the
READMEs' figures are tested against it); exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, bmodel_11b_int4_bytes, record_result, recorded, table  # noqa: E402

from lvb.contract import plan  # noqa: E402
from lvb.runtime.memory import CARDS, GiB, MemoryPlan, resident_buffers, scratch_tensors  # noqa: E402
from lvb.spec import ModelSpec  # noqa: E402

CONFIG = ROOT / "tests" / "data" / "llama-3.2-11b-vision.config.json"


def measured_activations() -> tuple[int, str, str, str]:
    """The largest ctx_size activation_memory.py recorded at 11B widths: (bytes, net, work dir, date).
    It reads every net of a short stack's INT4 compile (the vision head also from an export with
    5 local layers, so that it reads the 11B's six states)."""
    runs = recorded("activation_memory", "bench/activation_memory.py")
    return max(((size, net, label, run["date"][:10]) for label, run in runs.items() for net, size in run["ctx_size"].items()),
               key=lambda m: m[0])


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def activations(source: str | None) -> tuple[int, str]:
    """The shared activation memory, and where the figure comes from."""
    if source is None:
        size, net, work, when = measured_activations()
        return size, f"{net}'s ctx_size ({work}), the largest in bench/results/activation_memory.json ({when})"
    try:
        return int(float(source)), "as given (--activations)"
    except ValueError:
        pass
    if not Path(source).is_file():
        raise SystemExit(f"error: --activations {source} is neither a byte count nor a bmodel file")
    from lvb.bmodel import inspect_bmodel
    from lvb.toolchain import find_toolchain

    nets = inspect_bmodel(Path(source), find_toolchain()).nets
    net = max(nets.values(), key=lambda n: n.neuron_bytes)
    return net.neuron_bytes, f"{net.name}'s ctx_size, the largest of {len(nets)} nets in {source}"


SPARE = 1e9  # what a chip keeps free beside the plan (bytes)
BATCH_CARDS = ("SC7 chip, 12 GB", "SC7 chip, 16 GB")


def batch_fit(spec: ModelSpec, weights: int, activation: int, seq: int, chunk: int, largest: int = 32) -> dict:
    """Each B's plan total at `seq`, and the largest B that leaves SPARE on each of BATCH_CARDS."""
    totals = {}
    for B in range(1, largest + 1):
        nets = {n.name: n.on_device() for n in plan(spec, seq, chunk, (B,))}
        totals[B] = MemoryPlan(weights, 0, {"largest net": activation}, resident_buffers(nets), scratch_tensors(nets)).total
    fits = {card: max((B for B, total in totals.items() if CARDS[card] - total >= SPARE), default=0) for card in BATCH_CARDS}
    per_conversation = totals[2] - totals[1]
    return {"seq": seq, "chunk": chunk, "weights": weights, "activations": activation, "spare": SPARE,
            "totals": {str(B): t for B, t in totals.items()}, "per_conversation": per_conversation,
            "largest_batch": fits, "cards": {card: CARDS[card] for card in BATCH_CARDS}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=float, help="weights + instructions, bytes (default: convert_scale.py's 11B INT4 bmodel)")
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--activations", help="a bmodel to read the largest net's ctx_size from, or bytes")
    args = parser.parse_args()
    default_plan = args.weights is None and args.activations is None  # the plan the READMEs show
    args.weights = bmodel_11b_int4_bytes() if args.weights is None else args.weights
    spec = ModelSpec.from_config(json.loads(CONFIG.read_text()))
    activation, source = activations(args.activations)
    plans = {}
    for seq in (512, 1024):
        nets = {n.name: n.on_device() for n in plan(spec, seq, args.chunk)}
        p = MemoryPlan(int(args.weights), 0, {"largest net": activation}, resident_buffers(nets), scratch_tensors(nets))
        rows = [["weights + instructions", gb(p.weights)], ["activations (shared)", gb(p.activation)]]
        rows += [[f"engine: {name}", gb(size)] for name, size in p.groups()]
        rows += [["engine: scratch I/O", gb(p.scratch_bytes)],
                 ["engine overhead (all but weights)", f"{gb(p.overhead)} ({p.overhead / GiB:.2f} GiB)"],
                 ["total", gb(p.total)]]
        rows += [[f"spare on {card} ({gb(size)})", gb(size - p.total)] for card, size in CARDS.items()]
        print(f"\n11B INT4, seq {seq}, chunk {args.chunk}; activations: {source}")
        print(table(rows, ["", ""]))
        plans[str(seq)] = {"weights": p.weights, "activations": p.activation, **{f"engine: {n}": b for n, b in p.groups()},
                           "scratch": p.scratch_bytes, "overhead": p.overhead, "total": p.total,
                           "spare": {card: size - p.total for card, size in CARDS.items()}}
    if default_plan:
        path = record_result("memory_plan", {"chunk": args.chunk, "activations_source": source, "plans": plans})
        print(f"\nresults: {path.relative_to(REPO)}")
    fit = batch_fit(spec, int(args.weights), activation, 512, args.chunk)
    print(f"\ncontinuous batching, seq 512: each more conversation adds {gb(fit['per_conversation'])} "
          f"(its KV cache and cross-attention K/V, bf16)")
    rows = [[card, fit["largest_batch"][card], gb(fit["totals"][str(fit["largest_batch"][card])]),
             gb(fit["cards"][card] - fit["totals"][str(fit["largest_batch"][card])])] for card in BATCH_CARDS]
    print(table(rows, ["chip", f"largest B with >= {gb(SPARE)} spare", "plan", "spare"]))
    if default_plan:
        path = record_result("batch_memory", fit | {"activation_source": source})
        print(f"results: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
