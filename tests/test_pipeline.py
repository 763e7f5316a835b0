"""ci/pipeline.sh on the trained toy with the BM1684X simulator: the same commands a
PCIe-card runner uses with BACKEND=sail. The toy must answer at least 95 % of its fresh
pictures exactly right through its INT4 bmodel (50) and its INT8 bmodel (20), whose vision tower
is INT8 in its activations too (--vision-quant w8a8)."""

import json

import pytest
from helpers import PIPELINE_PICTURES, PIPELINE_VISION_QUANT

# The whole toolchain, end to end: the longest tests of the suite.
pytestmark = [pytest.mark.toolchain, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_pipeline_on_the_toy_with_the_simulator(quant, toy_pipeline):
    toy_work, result = toy_pipeline(quant)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    from lvb.compile.compiler import CompileSettings
    from lvb.contract import Kind, QuantGroup

    vision = PIPELINE_VISION_QUANT[quant]
    bmodel = f"toy_{CompileSettings(quant=quant, vision_quant=vision).tag()}_seq128_chunk32_bm1684x"
    report = json.loads((toy_work / "verify" / bmodel / "report.json").read_text())
    assert report["ok"] and report["backend"] == "cmodel"
    assert report["task"]["pictures"] == PIPELINE_PICTURES[quant] and report["task"]["accuracy"] >= 0.95
    # Verify checks every net; at INT8, compiled with --check kinds, those the compile trusted on
    # a sibling's check too.
    assert all(p["onnx_vs_bmodel"] is not None and not p["misses"] for p in report["parts"])
    assert any(p["compile_check"].startswith("as ") for p in report["parts"]) == (quant == "int8")
    assert {p["quant"] for p in report["parts"] if Kind(p["kind"]).policy.quant is QuantGroup.VISION} == {vision}
    # A w8a8 net the compile checked was judged against tpu-mlir's INT8 interpreter too, on its own row.
    from lvb.check import INTERPRETER
    from lvb.workdir import WorkDir

    compiled = json.loads(WorkDir(toy_work).compile_manifest(toy_work / f"{bmodel}.bmodel").read_text())["nets"]
    checked = {n: r for n, r in compiled.items() if r["quant"] == "w8a8" and r["check"] is not None}
    assert bool(checked) == (vision == "w8a8")
    for name, r in checked.items():
        interpreted = {o: c for o, c in r["check"]["cosines"].items() if o.endswith(INTERPRETER)}
        assert interpreted and set(interpreted) <= set(r["thresholds"]), name
        assert all(c >= r["thresholds"][o] for o, c in interpreted.items()), name
    # ...and verify held the bmodel to the interpreter's outputs the compile kept.
    held = [p for p in report["parts"] if p["net"] in checked]
    assert len(held) == len(checked) and all(p["bmodel_vs_interpreter"] is not None for p in held)
