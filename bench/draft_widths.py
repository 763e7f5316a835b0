#!/usr/bin/env python3
"""The draft's nets at Llama-3.2-1B's widths on tpu-mlir's cost model: a one-layer Llama text
checkpoint with the 1B's published widths (16 layers, hidden 2048, 32 heads, 8 KV heads, MLP
8192, vocabulary 128,256, tied embeddings; random weights: the cost model prices shapes, not
values), exported and compiled INT4 (head INT4) with `--check none`, one block of each kind
standing for the 16 (layers of a kind have the same shapes). bench/speculative.py reads the
estimates this writes to bench/results/draft_widths.json. The work directory is deleted after.

    flock /work/heavy.lock .venv/bin/python bench/draft_widths.py
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from common import LVB, OUT, record_result

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "src"))

from lvb.devicetime import from_manifest  # noqa: E402
from lvb.testing.checkpoints import LlamaGeometry, write_llama_checkpoint  # noqa: E402
from lvb.workdir import COMPILE_VERSION, WorkDir, read_manifest  # noqa: E402

# Llama-3.2-1B's config.json (published): the widths priced here.
WIDTHS_1B = {"layers": 16, "hidden": 2048, "heads": 32, "kv_heads": 8, "intermediate": 8192, "vocab": 128256,
             "tied": True}


def checkpoint(out: Path) -> Path:
    import torch
    from transformers import LlamaForCausalLM

    from lvb.testing.checkpoints import llama_config

    w = WIDTHS_1B
    geometry = LlamaGeometry("1b-widths-L1", layers=1, hidden=w["hidden"], intermediate=w["intermediate"], heads=w["heads"],
                             kv_heads=w["kv_heads"], tied=w["tied"], init_std=0.02)
    config = llama_config(geometry)
    config.vocab_size = w["vocab"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return write_llama_checkpoint(out / "ckpt-1b-widths-L1", geometry, model=model)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--chunk", default="32")
    parser.add_argument("--out", type=Path, default=OUT / "draft-widths")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = checkpoint(args.out)
    work = args.out / "work"
    for argv in ([LVB, "export", "--model", model, "--out", work, "--seq", args.seq, "--chunk", args.chunk],
                 [LVB, "compile", "--work", work, "--quant", "int4", "--head-quant", "int4", "--check", "none",
                  "--jobs", "1"]):
        print(" ".join(map(str, argv)), flush=True)
        subprocess.run([str(a) for a in argv], check=True, cwd=REPO)
    (manifest,) = [read_manifest(p, COMPILE_VERSION) for p in WorkDir(work).compile_manifests()]
    estimates = from_manifest(manifest)
    nets = {}
    for name in sorted(manifest["nets"]):
        stages = [estimates.of(name, stage) for stage in range(4)]
        nets[name] = [round(s.ms, 4) for s in stages if s is not None]
    print(nets)
    # Device weight bytes of the 16-layer draft: the one-layer bmodel's per-net weights, the
    # block and block_cache nets (each holds its own copy of the layer) once per layer.
    from lvb.bmodel import inspect_bmodel
    from lvb.toolchain import find_toolchain

    info = inspect_bmodel(WorkDir(work).bmodel(manifest["bmodel"]), find_toolchain())
    weights = {name: net.weight_bytes for name, net in info.nets.items()}
    per_layer = weights["block_0"] + weights["block_cache_0"]
    total = sum(weights.values()) + (WIDTHS_1B["layers"] - 1) * per_layer + info.instruction_bytes
    print(weights, total)
    record_result("draft_widths", {"widths": WIDTHS_1B, "settings": manifest["settings"], "ms": nets,
                                   "weight_bytes": weights, "instruction_bytes": info.instruction_bytes,
                                   "weight_bytes_16_layers": total})
    if not args.keep:
        shutil.rmtree(args.out)


if __name__ == "__main__":
    main()
