"""lvb's quantization reference (lvb.check.fake_quantize) against the weights tpu-mlir itself
deploys: every INT4/INT8 check (the compile's, verify's, the simulator chat's "transformers"
side) compares a bmodel with fake_quantize, so fake_quantize is held here to a reference that
is not lvb's own.

One MatMul per quantization, deployed by model_deploy.py as lvb deploys the decoder blocks
(W4BF16 / W8BF16, --q_group_size, asymmetric: lvb never passes --q_symmetric), run on the
simulator with the identity as its input: row i of the output is row i of the weight as the
bmodel holds it. The bmodel dequantizes in bf16: code minus zero point, times the group's
scale stored as bf16, the product rounded to bf16. So each value of the bmodel is predicted
from fake_quantize's value (its step count on the group's grid) and must equal the
prediction exactly, group by group."""

from __future__ import annotations

import numpy as np
import pytest

from lvb.check import BITS, fake_quantize

pytestmark = pytest.mark.toolchain

# Two groups along the inputs of each of the 64 outputs: a grouping along the outputs, or one
# scale per column, would not match.
INPUTS, OUTPUTS, GROUP = 128, 64, 64


def bf16(values: np.ndarray) -> np.ndarray:
    """Round to nearest even at bf16 (the top 16 bits of a float32)."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32)


def weight() -> np.ndarray:
    """Gaussian weights with an offset of their own per group, so that the zero points differ
    from group to group and from a symmetric grid's."""
    rng = np.random.default_rng(0)
    offsets = np.repeat(rng.uniform(-0.1, 0.1, (INPUTS // GROUP, 1, OUTPUTS)), GROUP, axis=1)
    return (rng.standard_normal((INPUTS // GROUP, GROUP, OUTPUTS)) * 0.1 + offsets).reshape(INPUTS, OUTPUTS).astype(np.float32)


def deployed_weight(tmp_path, quant: str, w: np.ndarray) -> np.ndarray:
    """The weight as the deployed bmodel holds it: the simulator's output for one-hot rows."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from lvb.compile.tpumlir import DeployOptions, deploy, transform
    from lvb.runtime.cmodel import CmodelEngine
    from lvb.toolchain import find_toolchain

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "onehot",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, INPUTS, INPUTS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, INPUTS, OUTPUTS])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "onehot.onnx")
    toolchain, log = find_toolchain(), tmp_path / "tools.log"
    mlir = transform(toolchain, tmp_path / "onehot.onnx", tmp_path, "onehot", [(1, INPUTS, INPUTS)], log)
    bmodel = deploy(toolchain, mlir, tmp_path, "onehot.bmodel", DeployOptions(quant, group_size=GROUP), log)
    with CmodelEngine(bmodel, toolchain) as simulator:
        return simulator.run("onehot", {"x": np.eye(INPUTS, dtype=np.float32)[None]})[0][0]


@pytest.mark.parametrize("quant", sorted(BITS))
def test_fake_quantize_is_the_weight_tpu_mlir_deploys(tmp_path, quant):
    w = weight()
    got = deployed_weight(tmp_path, quant, w)
    reference = fake_quantize(w, BITS[quant], GROUP)
    groups = (INPUTS // GROUP, GROUP, OUTPUTS)
    low, high = w.reshape(groups).min(axis=1, keepdims=True), w.reshape(groups).max(axis=1, keepdims=True)
    step = (high.astype(np.float64) - low) / (2 ** BITS[quant] - 1)  # the asymmetric grid of each group
    steps = reference.reshape(groups) / step
    # fake_quantize's values lie on their group's grid, zero point included (as a whole step).
    assert np.abs(steps - np.round(steps)).max() < 1e-3
    predicted = bf16(np.round(steps) * bf16(step)).reshape(groups)
    mismatched = np.argwhere((got.reshape(groups) != predicted).any(axis=1))
    assert not len(mismatched), f"{len(mismatched)} of {groups[0] * groups[2]} groups differ, first (group, output) {mismatched[0]}"
    # Not a vacuous match: the quantization moved the weights by several bf16 steps.
    assert np.abs(got - bf16(w)).mean() > 4 * np.abs(got - bf16(reference)).mean()
