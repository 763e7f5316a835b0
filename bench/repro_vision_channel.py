#!/usr/bin/env python3
"""Minimal reproduction of tpu-mlir miscompiling lvb's vision attention with the padding mask
as an extra query/key channel (issue #30): a few-op attention core at a fixture's small sizes,
exported to ONNX, compiled BF16 for bm1684x with lvb's own transform/deploy calls, run on the
simulator and compared with onnxruntime (cosine; real and padding query rows apart). Each
variant isolates one ingredient.

    PYTHONPATH=$PWD/src LVB_TOOLCHAIN=/work/main/.venv-tpu /work/main/.venv/bin/python \
        bench/repro_vision_channel.py [--variants a,b] [--shape ...] [--no-layer-group] [--no-sim]

What triggers it (for a tpu-mlir report; tpu-mlir 1.30.2, bm1684x, BF16, with or without
--disable_layer_group): one ONNX Expand x[1,N,1,1] -> [1,N,h,1] feeding both a Concat and a
Mul by a scalar constant, that Mul feeding a second Concat:

    f = Expand(x)                      # [1, N, h, 1]
    q' = Concat(q, f, axis=-1)         # [1, N, h, d+1]
    k' = Concat(k, Mul(f, c), axis=-1) # [1, N, h, d+1]

The Top canonicalization TopFuseTile (lib/Dialect/Top/Canonicalize/Tile.cpp) removes the
Tile for its broadcasting users (Add/Sub/Mul/Min/Max), keeping a copy for the others. A Mul
whose other operand is a scalar does not broadcast back to [1,N,h,1]: it becomes MulConst with
output [1,N,1,1], and the second Concat is then built as Concat([1,N,h,d], [1,N,1,1]) ->
[1,N,h,d+1] with no error (see the top MLIR, `top.Concat(%k, %mulconst)`). Its output's extra
channel is right for head 0 only and holds stale memory for the other heads (`--concat-only`
prints it, from the three ops above alone), so in the attention the padding queries (whose
query channel is 1) see a wrong key channel: their rows come out wrong (cosine 0.67 at the
default shape) while the real queries' rows (query channel 0) are right. Multiplying before
the Expand (each Expand then feeds only a Concat) compiles right and costs the same.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import torch

from lvb.check import compare, run_once
from lvb.compile.tpumlir import DeployOptions, TRANSFORM_OPTIONS, deploy, transform
from lvb.contract import MASK_VALUE
from lvb.devicetime import read_profile
from lvb.patches import padded_tokens
from lvb.runtime.cmodel import CmodelEngine
from lvb.toolchain import find_toolchain

BENCH = Path(__file__).resolve().parent


class Core(torch.nn.Module):
    """Token-major q, k, v [1, N, h, d] and the padding flags [1, N] -> attention [1, N, h*d]."""

    def __init__(self, variant: str, scaling: float, normalize: str = "softmax"):
        super().__init__()
        self.variant, self.scaling, self.normalize = variant, scaling, normalize

    def forward(self, q, k, v, pad):
        b, n, h, d = q.shape
        var, s = self.variant, self.scaling
        mask = None
        if var in ("plain", "mask"):
            if var == "mask":  # main's form: the [N, N] additive mask
                p = pad.view(b, n, 1)
                mask = (p @ p.transpose(-1, -2) * MASK_VALUE).unsqueeze(1)
        elif var == "zeros_channel":  # one more channel of zeros on both: exact, no mask
            z = torch.zeros_like(q[..., :1])
            q, k = torch.cat([q, z], -1), torch.cat([k, z], -1)
        elif var.startswith("zeros_all"):  # q, k and v each one zero channel wider (flash attention's one width)
            q, k, v = (torch.cat([t, torch.zeros(b, n, h, 1)], -1) for t in (q, k, v))
            if var == "zeros_all_wide":  # keep the zero channel in the output: no slice after the attention
                d = d + 1
        elif var.startswith("channel"):  # the experiment commit's form and its twins
            flag = pad.view(b, n, 1, 1).expand(b, n, h, 1)
            qside, kside = flag, flag * (MASK_VALUE / s)  # channel: the experiment's
            if var == "channel_small":  # a key value as small as a real one: is size the trigger?
                kside = flag * 1.0
            elif var == "channel_qside":  # MASK_VALUE on the query side
                qside, kside = flag * (MASK_VALUE / s), flag
            elif var.startswith("channel_scale_first"):  # scaled before it is expanded: each Expand feeds only a Concat
                kside = (pad * (MASK_VALUE / s)).view(b, n, 1, 1).expand(b, n, h, 1)
            extra = int(var.split("_pad", 1)[1].split("_")[0]) if "_pad" in var else 0  # zero channels beyond d+1
            tail = [torch.zeros(b, n, h, extra)] if extra else []
            q = torch.cat([q, qside, *tail], -1)
            k = torch.cat([k, kside, *tail], -1)
            if var.endswith(("_v", "_wide")):  # values padded with zeros to the same width (flash attention wants one)
                v = torch.cat([v, torch.zeros(b, n, h, 1 + extra)], -1)
            if var.endswith("_wide"):  # and the zero channels kept in the output: no slice after the attention
                d = d + 1 + extra
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(2, 3)) * s
        if mask is not None:
            scores = scores + mask
        if self.normalize == "softmax":
            out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(q.dtype), v)
        else:  # NORMALIZE's other forms: exp, the values' matmul, then the division by the exponentials' sum
            if self.normalize == "after_values":
                scores = scores - scores.amax(dim=-1, keepdim=True)
            weights = torch.exp(scores)
            out = torch.matmul(weights, v) / weights.sum(dim=-1, keepdim=True)
        return out.transpose(1, 2)[..., :d].reshape(b, n, h * d)


# How Core turns scores into the values' weights: transformers' softmax; the same normalized
# after the values' matmul (exact); and without the row maximum (the same arithmetic, but a
# large score overflows: for cost only).
NORMALIZE = ("softmax", "after_values", "exp_only")


def inputs(tiles: int, per_tile: int, real: int, heads: int, dim: int, real_tiles: int):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, tiles * per_tile, heads, dim, generator=g) for _ in range(3))
    flags = (torch.arange(tiles) < real_tiles).long().view(1, tiles)
    return q, k, v, padded_tokens(flags, real, per_tile, torch.float32).padding


def build(module: torch.nn.Module, feeds: dict[str, torch.Tensor], outputs: list[str], folder: Path, name: str,
          extra: tuple[str, ...], toolchain) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """`module` to ONNX and a BF16 bm1684x bmodel as lvb transforms and deploys: (onnx, bmodel,
    the feeds the ONNX kept: the exporter drops an unused input)."""
    import onnx as onnx_lib

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    onnx = folder / f"{name}.onnx"
    torch.onnx.export(module, tuple(feeds.values()), str(onnx), opset_version=17, dynamo=False,
                      input_names=list(feeds), output_names=outputs)
    kept = {i.name for i in onnx_lib.load(str(onnx)).graph.input}
    arrays = {key: t.numpy() for key, t in feeds.items() if key in kept}
    log = folder / "tools.log"
    mlir = transform(toolchain, onnx, folder, name, [a.shape for a in arrays.values()], log, extra=TRANSFORM_OPTIONS)
    return onnx, deploy(toolchain, mlir, folder, f"{name}.bmodel", DeployOptions("bf16", extra=extra), log), arrays


def run(variant: str, x, folder: Path, extra: tuple[str, ...], toolchain, simulate: bool = True) -> dict:
    dim = x[0].shape[-1]
    module = Core(variant, dim ** -0.5)
    expected = Core("mask", dim ** -0.5)(*x)
    with torch.no_grad():
        got_torch = module(*x)
    exact = float((got_torch - expected).abs().max()) if got_torch.shape == expected.shape else float("nan")
    onnx, bmodel, feeds = build(module, dict(zip(["q", "k", "v", "pad"], x)), ["o"], folder, "core", extra, toolchain)
    estimate = read_profile(folder)
    final = next(folder.glob("*_final.mlir"), None)
    fused = final.read_text().count('"tpu.FAttention"') if final else -1
    if not simulate:
        return {"cosine": float("nan"), "real_rows": float("nan"), "pad_rows": float("nan"), "torch_vs_mask": exact,
                "fattention": fused, "ms": estimate.ms if estimate else None}
    reference = run_once(onnx, feeds)
    with CmodelEngine(bmodel, toolchain) as engine:
        got = engine.run("core", feeds)
    got = [np.asarray(a, dtype=np.float32).reshape(r.shape) for a, r in zip(got, reference)]
    result = compare(reference, got)
    pad = x[3].numpy().reshape(-1).astype(bool)
    real_rows = compare([reference[0][:, ~pad]], [got[0][:, ~pad]])["cosine"]
    pad_rows = compare([reference[0][:, pad]], [got[0][:, pad]])["cosine"] if pad.any() else float("nan")
    return {"cosine": result["cosine"], "real_rows": real_rows, "pad_rows": pad_rows, "torch_vs_mask": exact,
            "fattention": fused, "ms": estimate.ms if estimate else None}


class ConcatOnly(torch.nn.Module):
    """The trigger alone: one Expand feeding a Concat and a Mul by a scalar, the Mul a Concat."""

    def forward(self, q, k, pad):
        b, n, h, _ = q.shape
        flag = pad.view(b, n, 1, 1).expand(b, n, h, 1)
        return torch.cat([q, flag], -1), torch.cat([k, flag * 7.0], -1)


def concat_only(folder: Path, toolchain) -> None:
    """Prints the key side's extra channel per token and head as the simulator gives it."""
    n, h, d = 8, 4, 8
    g = torch.Generator().manual_seed(0)
    feeds = {"q": torch.randn(1, n, h, d, generator=g), "k": torch.randn(1, n, h, d, generator=g),
             "pad": torch.arange(1, n + 1, dtype=torch.float32).view(1, n)}
    _, bmodel, arrays = build(ConcatOnly(), feeds, ["q_out", "k_out"], folder, "concat", (), toolchain)
    with CmodelEngine(bmodel, toolchain) as engine:
        got = engine.run("concat", arrays)
    key = np.asarray(got[1], dtype=np.float32).reshape(1, n, h, d + 1)[0, :, :, -1]
    print("key channel, token x head (onnxruntime: 7 x token number in every head):")
    print(np.array2string(key, precision=3, max_line_width=120))


VARIANTS = ["plain", "mask", "zeros_channel", "channel", "channel_small", "channel_qside", "channel_pad1",
            "channel_pad7", "channel_scale_first", "channel_scale_first_pad7", "channel_scale_first_v",
            "channel_scale_first_wide"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--shape", default="4,24,17,4,8,3", help="tiles,per_tile,real_patches,heads,head_dim,real_tiles")
    parser.add_argument("--no-layer-group", action="store_true", help="deploy with --disable_layer_group")
    parser.add_argument("--out", type=Path, default=BENCH / "out" / "repro_vision_channel")
    parser.add_argument("--keep", action="store_true", help="keep each variant's work folder")
    parser.add_argument("--no-sim", action="store_true", help="only compile and price (for sizes the simulator is slow at)")
    parser.add_argument("--concat-only", action="store_true", help="the trigger alone: print the key side's channel")
    args = parser.parse_args()
    toolchain = find_toolchain()
    if args.concat_only:
        concat_only(args.out / "concat_only", toolchain)
        return
    x = inputs(*map(int, args.shape.split(",")))
    extra = ("--disable_layer_group",) if args.no_layer_group else ()
    for variant in args.variants.split(","):
        folder = args.out / variant
        r = run(variant, x, folder, extra, toolchain, simulate=not args.no_sim)
        print(f"{variant:16s} cosine {r['cosine']:.6f}  real rows {r['real_rows']:.6f}  padding rows "
              f"{r['pad_rows']:.6f}  torch-vs-mask {r['torch_vs_mask']:.1e}  FAttention {r['fattention']}  "
              f"{r['ms'] if r['ms'] is None else round(r['ms'], 4)} ms", flush=True)
        if not args.keep:
            shutil.rmtree(folder)


if __name__ == "__main__":
    main()
