"""ci/pipeline.sh on the trained toy with the BM1684X simulator: the same commands a
PCIe-card runner uses with BACKEND=sail. The toy must answer at least 95 % of 100
fresh pictures exactly right through its INT4 and its INT8 bmodel."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("quant", ["int4", "int8"])
def test_pipeline_on_the_toy_with_the_simulator(quant, toy_work):
    env = dict(os.environ, MODEL=str(ROOT / "models" / "toy"), WORK=str(toy_work), QUANT=quant, SEQ="128",
               CHUNK="32", BACKEND="cmodel", PICTURES="100", LVB=str(Path(sys.executable).parent / "lvb"))
    result = subprocess.run([str(ROOT / "ci" / "pipeline.sh")], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    bmodel = f"toy_{quant}_g64_seq128_chunk32_bm1684x"
    report = json.loads((toy_work / "verify" / bmodel / "report.json").read_text())
    assert report["ok"] and report["backend"] == "cmodel"
    assert report["task"]["pictures"] == 100 and report["task"]["accuracy"] >= 0.95
    assert all(p["onnx_vs_bmodel"] is not None for p in report["parts"])
