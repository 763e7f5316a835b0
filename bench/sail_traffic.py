#!/usr/bin/env python3
"""Host traffic of the sail backend per decode step at 11B shapes, beside the reference
port's (sophon-demo sample/Llama3_2_Vision/python/llama3.py, `forward_next`).

Setup: the config-only 11B checkpoint folder of host_overhead.py (40 text layers, 8
cross, hidden 4096, 8 KV heads, vocab 128256, 4 x 1601 vision tokens; no weights) and
lvb's stand-in sophon.sail (src/lvb/testing/sail_standin), with a bmodel registered by
the contract's net shapes in the dtypes lvb compiles them with (NetSpec.on_device), whose launches compute
nothing. lvb's real SailEngine and Session run on it; the stand-in counts every copy
its Tensors make: host->device (update_data to a device-only tensor, sync_s2d),
device->host (sync_d2s) and device->device (sync_d2d), in bytes and in calls.

Measured: one turn with an image (prefill + a few tokens), then --steps decode steps,
each counted on its own; the figure is the median step. Also the per-step buffers
lvb uploads, and how many net launches read them.

The reference's figures are read from its code (it has no device here): per step it
writes position_id (1 int32), the attention mask (S+1 bf16) and the cross-attention
mask (4 x 1601 bf16) with update_data, binds block 0's tensors for every layer, writes
the KV rows and the hidden state in place through views, feeds the embedding from the
greedy head's output tensor, and reads the token (1 int32) back.

Prints a table; exits 0. No timed assertions.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "src" / "lvb" / "testing" / "sail_standin"))
from common import OUT, REPO, full_model, geometry_11b, record_result, table, write_config_only  # noqa: E402

import sophon.sail as sail  # noqa: E402  (the stand-in)

from lvb.contract import plan  # noqa: E402
from lvb.runtime.pipeline import Checkpoint, Session  # noqa: E402
from lvb.runtime.sail import SailEngine  # noqa: E402
from lvb.runtime.sampling import Sampler, SamplingConfig  # noqa: E402


def reference_step(seq: int, vision_tokens: int) -> dict[str, int]:
    """llama3.py forward_next: bytes and calls per decode step."""
    h2d = 4 + (seq + 1) * 2 + vision_tokens * 2  # position_id, attention_mask, cross_attention_mask (bf16)
    return {"h2d": h2d, "h2d calls": 3, "d2h": 4, "d2h calls": 1, "d2d": 0, "d2d calls": 0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=OUT, help="where the config-only checkpoint folder goes")
    args = parser.parse_args()

    full = full_model("11b")
    geometry = geometry_11b(full["text_layers"], full["vision_layers"], full["global_layers"], cross=full["cross_layers"])
    checkpoint = Checkpoint.load(write_config_only(args.out.resolve() / "config-11b", geometry))
    spec = checkpoint.spec
    nets = [net.on_device() for net in plan(spec, args.seq, args.chunk)]  # as lvb compile declares them: bf16 state
    bmodel = args.out.resolve() / "traffic-11b.bmodel"
    bmodel.parent.mkdir(parents=True, exist_ok=True)
    bmodel.write_bytes(b"")  # SailEngine checks the file exists; the stand-in knows it by its nets
    sail.register_bmodel(str(bmodel), nets)
    device = sail.device(0)

    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (750, 1000, 3), dtype=np.uint8))
    with SailEngine(bmodel) as engine:
        session = Session(checkpoint, engine)
        session.ask("Describe this picture in detail.", image=photo, max_new_tokens=4)
        greedy = Sampler(SamplingConfig())
        steps = []
        for i in range(args.steps):
            device.reset_counters()
            session._decode(42, list(session.cached), greedy)
            steps.append({"h2d": device.traffic["h2d"], "h2d calls": device.copies["h2d"],
                          "d2h": device.traffic["d2h"], "d2h calls": device.copies["d2h"],
                          "d2d": device.traffic["d2d"], "d2d calls": device.copies["d2d"],
                          "launches": sum(device.launches.values())})
    ours = {key: statistics.median(s[key] for s in steps) for key in steps[0]}
    ref = reference_step(args.seq, spec.vision.tokens_per_image)
    layers = spec.text.num_layers
    print(f"11B shapes: {layers} layers ({len(spec.text.cross_attention_layers)} cross), seq {args.seq}, "
          f"chunk {args.chunk}, vision tokens {spec.vision.tokens_per_image}; median of {args.steps} decode steps; "
          f"{int(ours['launches'])} launches per step")
    rows = [[what, f"{int(ours[what]):,}", f"{ref[what]:,}"] for what in
            ("h2d", "h2d calls", "d2h", "d2h calls", "d2d", "d2d calls")]
    total = int(ours["h2d"] + ours["d2h"] + ours["d2d"])
    rows.append(["bytes moved in all", f"{total:,}", f"{ref['h2d'] + ref['d2h'] + ref['d2d']:,}"])
    print(table(rows, ["per decode step", "lvb sail (counted)", "llama3.py (from its code)"]))
    print(f"host->device copies per step: {int(ours['h2d calls'])} for {layers} layers (lvb), {ref['h2d calls']} (llama3.py): "
          "none per layer")
    if (args.seq, args.chunk, args.steps) == (512, 128, 20):  # what the READMEs show
        path = record_result("sail_traffic", {"seq": args.seq, "chunk": args.chunk, "steps": args.steps, "layers": layers,
                                              "launches": int(ours["launches"]), "lvb": {k: int(ours[k]) for k in ref},
                                              "reference": ref})
        print(f"\nresults: {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
