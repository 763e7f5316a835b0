"""What a correctly compiled quantized net must compute: the exported ONNX with its
matmul weights quantized the way tpu-mlir's W4BF16/W8BF16 do, run by onnxruntime.

Comparing the simulator with fp32 mixes two things: the quantization's own error
(large for random weights, small for trained ones) and miscompiles. Against this
reference only the compile's own rounding (bf16 activations) remains, so one
tight threshold catches miscompiles for every model and quantization. Measured:
cosine >= 0.99987 for W4BF16 and W8BF16 blocks of every fixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BITS = {"int4": 4, "int8": 8}


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


def quantized_reference(onnx_path: Path, feeds: dict[str, np.ndarray], quant: str, group_size: int) -> list[np.ndarray]:
    import onnx
    from onnx import numpy_helper

    from lvb.runtime.onnx import run_once

    model = onnx.load(str(onnx_path))
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        init = constants.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if init is None or len(init.dims) != 2 or init.dims[0] % group_size:
            continue
        weight = numpy_helper.to_array(init)
        init.CopyFrom(numpy_helper.from_array(fake_quantize(weight, BITS[quant], group_size), init.name))
    return run_once(model.SerializeToString(), feeds)
