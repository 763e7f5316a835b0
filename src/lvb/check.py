"""The per-net check, one for every stage: PyTorch against onnxruntime (export,
verify) and onnxruntime against a bmodel (compile on the simulator, verify on
any backend), on the inputs the export checked the net with, judged by one
table of thresholds.

For INT4/INT8 nets the onnxruntime side is the exported ONNX with its matmul
weights quantized the way tpu-mlir's W4BF16/W8BF16 do. Comparing the bmodel with
fp32 mixes two things: the quantization's own error (large for random weights,
small for trained ones) and miscompiles. Against this reference only the
compile's own rounding (bf16 activations) remains, so one tight threshold
catches miscompiles for every model and quantization (measured minima per net kind in
MEASURED_MIN_COSINE below).

A bmodel whose state is bf16 on the device (contract.device_dtype) is fed the same float32
inputs: the backend rounds them to bf16 as the bmodel's own cast did when its I/O was
float32, and gives its bf16 outputs back as float32, so the comparison and its thresholds
are the same (the compile checks' cosines did not move, README "The nets").

torch, onnx and onnxruntime are imported inside the functions that need them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvb.contract import Kind, Names, NetSpec
from lvb.numerics import compare, reaches, same_tokens


@dataclass(frozen=True)
class Closeness:
    """onnxruntime against PyTorch, both fp32: what "the same" means for a net."""

    min_cosine: float = 0.99999
    max_relative_error: float = 1e-3  # of the largest reference magnitude


# The thresholds, all of them; the README's "Checks and thresholds" table is tested against these.
# PyTorch vs onnxruntime, by net kind.
TORCH_VS_ONNX: dict[Kind, Closeness] = {kind: Closeness() for kind in Kind} | {
    Kind.GREEDY_HEAD: Closeness(min_cosine=1.0, max_relative_error=0.0),  # a token id: exact
}
# bmodel vs onnxruntime (for int4/int8 nets: onnxruntime with the same weight
# quantization, quantized_reference below), cosine of a net's worst output: what remains
# is bf16 arithmetic. The worst value measured over every net of a kind, on the three
# test fixtures and the toy (bench/thresholds.py --write) and at the 11B's widths
# (bench/real_widths.py) where lower: the lowest of each row of thresholds.json
# (README "Checks and thresholds").
# The K and V a self-attention block hands the KV cache are judged on their own rows ("k, v"):
# one matmul past the block's input, they sit several times closer to their reference than the
# hidden state, which collects a block's ten or so bf16 steps. Only where both widths were
# measured; elsewhere K and V take their kind's row.
MEASURED_TABLE = Path(__file__).with_name("thresholds.json")


def measured_minima(outputs: str, table: Path = MEASURED_TABLE) -> dict[tuple[Kind, str], float]:
    rows = json.loads(table.read_text())["rows"]
    return {(Kind(r["kind"]), r["quant"]): min(r["measured"].values()) for r in rows if r["outputs"] == outputs}


MEASURED_MIN_COSINE: dict[tuple[Kind, str], float] = measured_minima("all")
MEASURED_MIN_COSINE_KV: dict[tuple[Kind, str], float] = measured_minima("k, v")
_KV_OUTPUTS = frozenset({Names.K, Names.V})
# A w8a8 net is also checked, at compile, against tpu-mlir's own INT8 interpreter (its quantized
# MLIR on the same inputs: the quantization-aware reference onnxruntime cannot be). Its outputs'
# cosines against it are named "<output> vs tpu-mlir" and judged on rows of their own: the
# interpreter sits within 1e-5 of the simulator where no bf16 op is between INT8 ones, only a
# little closer than fp32 in the vision layers (bench/w8a8_reference.py).
INTERPRETER = " vs tpu-mlir"
MEASURED_MIN_COSINE_INTERPRETER: dict[tuple[Kind, str], float] = measured_minima("tpu-mlir")


def min_cosine(kind: Kind, quant: str, output: str | None = None) -> float:
    """The threshold of a net's output (None: of its hidden state, the loosest): the measured
    minimum less a margin equal to the measured deficit, i.e. twice today's worst error
    (1 - cosine) passes, no more. A kind not measured at this quantization (say
    --vision-quant int4) gets that quantization's loosest. An output "<name> vs tpu-mlir" takes
    the interpreter's rows. The greedy head returns a token: right or wrong."""
    if kind is Kind.GREEDY_HEAD:
        return 1.0
    table = MEASURED_MIN_COSINE_INTERPRETER if output and output.endswith(INTERPRETER) else MEASURED_MIN_COSINE
    measured = table.get((kind, quant))
    if output in _KV_OUTPUTS:
        measured = MEASURED_MIN_COSINE_KV.get((kind, quant), measured)
    if measured is None:
        measured = min(v for (_, q), v in table.items() if q == quant)
    return round(1 - 2 * (1 - measured), 6)


def thresholds(net: NetSpec, quant: str, interpreter: bool = False) -> dict[str, float]:
    """Every output's threshold, by name; with `interpreter` (a w8a8 compile's check) also each
    output's against tpu-mlir's interpreter ("<output> vs tpu-mlir")."""
    names = [t.name for t in net.outputs] + ([t.name + INTERPRETER for t in net.outputs] if interpreter else [])
    return {name: min_cosine(net.kind, quant, name) for name in names}


def shortfalls(cosines: Mapping[str, float], need: Mapping[str, float]) -> list[str]:
    """Each output below its threshold, as "k cosine 0.999812 < 0.99996"; a NaN cosine (or a
    missing one) is below every threshold."""
    return [f"{name} cosine {float(cosines.get(name, float('nan'))):.6f} < {need[name]}" for name in need
            if not reaches(cosines.get(name, float("nan")), need[name])]


# Whole answers: token agreement (mean share of each reference answer reproduced before the
# first difference) with transformers' fp32 generate over verify's five answers, by what runs
# the blocks: what each measured (README "Checks and thresholds") less a margin of one more
# answer of the five parting at its first token. BF16 is not measured yet.
MIN_AGREEMENT: dict[str, float] = {"onnxruntime": 1.0, "bf16": 0.9, "int8": 0.8, "int4": 0.7}
# `lvb doctor`'s proof of the toolchain: a W4BF16 64x64 matmul on the simulator against
# onnxruntime with the same weight quantization (README "Checks and thresholds"; against fp32
# the quantization's own error would dominate). The margin equals the measured deficit: twice
# today's error fails.
DOCTOR_MEASURED_COSINE = 0.999993
DOCTOR_MIN_COSINE = round(1 - 2 * (1 - DOCTOR_MEASURED_COSINE), 6)

BITS = {"int4": 4, "int8": 8}


# -- check inputs ---------------------------------------------------------------


def save_check(path: Path, inputs: Mapping[str, np.ndarray], outputs: list[np.ndarray]) -> None:
    """The inputs a net was checked on and onnxruntime's fp32 outputs on them."""
    np.savez(path, **{f"in.{k}": v for k, v in inputs.items()}, **{f"out.{i}": v for i, v in enumerate(outputs)})


def load_check(path: Path) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """(inputs, onnxruntime's outputs) of save_check."""
    with np.load(path) as check:
        feeds = {k[3:]: check[k] for k in check.files if k.startswith("in.")}
        outputs = [check[f"out.{i}"] for i in range(sum(k.startswith("out.") for k in check.files))]
    return feeds, outputs


# In a checked w8a8 net's compile folder, beside its bmodel, recorded in its result's "interpreted".
INTERPRETED = "interpreted.npz"


def save_interpreted(path: Path, net: NetSpec, outputs: list[np.ndarray]) -> None:
    """tpu-mlir's interpreter's outputs of a w8a8 net on its check inputs, which the compile keeps
    beside the bmodel: `lvb verify` judges the bmodel on any backend against them."""
    np.savez(path, **{t.name: o for t, o in zip(net.outputs, outputs)})


def load_interpreted(path: Path, net: NetSpec) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[t.name] for t in net.outputs]


# -- the three runs ----------------------------------------------------------------


def run_torch(module, net: NetSpec, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    import torch

    with torch.no_grad():
        outputs = module(*(torch.from_numpy(inputs[t.name]) for t in net.inputs))
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    return [o.numpy() for o in outputs]


def run_once(model: Path | bytes, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """One run of a graph, as the checks make it: quiet, and without weight prepacking,
    which keeps a second copy of every MatMul weight (2.1 GB for an 11B LM head) to save
    time that a single run never gets back."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.disable_prepacking", "1")
    session = onnxruntime.InferenceSession(model if isinstance(model, bytes) else str(model), options)
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})


def fake_quantize(weight: np.ndarray, bits: int, group_size: int) -> np.ndarray:
    """Asymmetric, one scale and zero point per `group_size` consecutive inputs (rows of
    ONNX's [in, out] MatMul weight), tpu-mlir's default for W4/W8 (no --q_symmetric)."""
    rows, cols = weight.shape
    groups = weight.reshape(rows // group_size, group_size, cols).astype(np.float64)
    low, high = groups.min(axis=1, keepdims=True), groups.max(axis=1, keepdims=True)
    top = 2**bits - 1
    scale = (high - low) / top
    scale[scale == 0] = 1.0
    zero = np.round(-low / scale)
    quantized = np.clip(np.round(groups / scale) + zero, 0, top)
    return ((quantized - zero) * scale).reshape(rows, cols).astype(np.float32)


def quantize_like_the_bmodel(layers, quant: str, group_size: int) -> None:
    """transformers' decoder layers with every linear weight as tpu-mlir's W4BF16/W8BF16
    holds it (quantized_reference does the same to the ONNX MatMuls, whose weight is the
    transpose), for whole answers to compare a quantized bmodel with."""
    import torch

    with torch.no_grad():
        for module in layers.modules():
            if isinstance(module, torch.nn.Linear) and module.in_features % group_size == 0:
                weight = fake_quantize(module.weight.numpy().T, BITS[quant], group_size).T
                module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))


def quantize_weights(model, quant: str, group_size: int) -> None:
    """An ONNX model's matmul weights quantized in place as tpu-mlir does (fake_quantize)."""
    from onnx import numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        init = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if init is None or len(init.dims) != 2 or init.dims[0] % group_size:
            continue
        weight = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(fake_quantize(weight, BITS[quant], group_size), init.name))


def quantized_reference(onnx_path: Path, feeds: Mapping[str, np.ndarray], quant: str, group_size: int) -> list[np.ndarray]:
    """What a correctly compiled `quant` net computes: the ONNX with its matmul weights
    quantized as tpu-mlir does, run by onnxruntime."""
    import onnx

    model = onnx.load(str(onnx_path))
    quantize_weights(model, quant, group_size)
    return run_once(model.SerializeToString(), feeds)


# -- the two hops ----------------------------------------------------------------------


def against_interpreter(net: NetSpec, interpreted: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float]:
    """A w8a8 bmodel's outputs against tpu-mlir's interpreter: "<output> vs tpu-mlir" -> cosine,
    judged on thresholds(net, quant, interpreter=True)."""
    return {t.name + INTERPRETER: c for t, c in zip(net.outputs, compare(interpreted, got)["cosines"])}


def torch_vs_onnx(net: NetSpec, torch_outputs: list[np.ndarray], onnx_outputs: list[np.ndarray]) -> tuple[dict, str | None]:
    """(comparison, the miss in one line or None)."""
    # Token ids are right or wrong: a cosine of several ids can round below 1 when all are equal.
    result = (same_tokens(torch_outputs[0], onnx_outputs[0]) if net.kind is Kind.GREEDY_HEAD
              else compare(torch_outputs, onnx_outputs))
    need = TORCH_VS_ONNX[net.kind]
    if reaches(result["cosine"], need.min_cosine) and reaches(-result["max_rel_err"], -need.max_relative_error):
        return result, None
    return result, (f"{net.name}: PyTorch vs onnxruntime cosine {result['cosine']:.6f}, relative error "
                    f"{result['max_rel_err']:.3g}; need cosine >= {need.min_cosine} and relative error <= "
                    f"{need.max_relative_error}")


def onnx_vs_bmodel(net: NetSpec, onnx_path: Path, feeds: Mapping[str, np.ndarray], fp32: list[np.ndarray],
                   got: list[np.ndarray], quant: str, group_size: int) -> tuple[dict, str | None]:
    """A bmodel's outputs against onnxruntime with the same weight quantization; `cosine_fp32`
    says what the quantization itself costs. (comparison, the miss in one line or None)."""
    names = [t.name for t in net.outputs]
    if net.kind is Kind.GREEDY_HEAD:  # a token id: right or wrong
        result = same_tokens(fp32[0], got[0])
        result["cosine_fp32"] = result["cosine"]
    else:
        expected = quantized_reference(onnx_path, feeds, quant, group_size) if quant in BITS else fp32
        result = compare(expected, got)
        result["cosine_fp32"] = compare(fp32, got)["cosine"]
    result["cosines"] = dict(zip(names, result["cosines"]))
    missed = shortfalls(result["cosines"], thresholds(net, quant))
    return result, (f"{net.name}: onnxruntime vs bmodel ({quant}) {'; '.join(missed)}" if missed else None)
