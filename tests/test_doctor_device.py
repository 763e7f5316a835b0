"""`lvb doctor --device N` through the stand-in SDK (src/lvb/testing/sail_standin): the SDK,
chip and memory lines, then micro-nets built with tpu-mlir (cached per tpu-mlir version) run on
the "card" and on the simulator, compared and timed beside the cost model's estimate; each
injected fault (a failed launch, a wrong result) ends in exit 1 with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "src" / "lvb" / "testing" / "sail_standin"
LVB = Path(sys.executable).parent / "lvb"

pytestmark = pytest.mark.toolchain


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("doctor-cache")


def _doctor(cache: Path, *args: str, **extra: str) -> tuple[subprocess.CompletedProcess, float]:
    path = os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, LVB_DOCTOR_CACHE=str(cache), COLUMNS="250", **extra)
    start = time.monotonic()
    result = subprocess.run([str(LVB), "doctor", "--device", "0", *args], env=env, capture_output=True, text=True)
    return result, time.monotonic() - start


def test_every_check_passes_on_the_standin_and_the_second_run_is_quick(cache):
    first, _ = _doctor(cache)  # builds the micro-nets once
    assert first.returncode == 0, first.stdout + first.stderr
    result, seconds = _doctor(cache)
    print(result.stdout, f"{seconds:.1f} s")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines[0].startswith("✓ sophon.sail 3.10.7") and "EngineLLM yes" in lines[0]
    assert any("device 0: BM1684X" in line for line in lines)
    assert any(line.startswith("✓ device memory") for line in lines)
    for name in ("doctor_w4", "doctor_bf16io", "doctor_attention", "doctor_greedy"):
        assert any(line.startswith(f"✓ {name} ") and "cost model" in line for line in lines), name
    assert sum(line.startswith("✓ doctor_stages") for line in lines) == 2  # each stage on the card
    assert not any("cost model unknown" in line for line in lines)
    assert seconds < 120


@pytest.mark.parametrize("fault, words", [
    ({"LVB_SAIL_STANDIN_FAIL": "doctor_w4"}, ("doctor_w4", "launch failed", "likely cause")),
    ({"LVB_SAIL_STANDIN_CORRUPT": "doctor_attention"}, ("doctor_attention", "disagrees with the simulator", "likely cause")),
    ({"LVB_SAIL_STANDIN_CORRUPT": "doctor_greedy"}, ("doctor_greedy", "picked token", "likely cause")),
])
def test_an_injected_fault_is_one_line_naming_it(cache, fault, words):
    result, _ = _doctor(cache, **fault)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and all(w in errors[0] for w in words), result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_plan_too_large_for_the_device_names_the_heap_layout(cache, toy_staged_bmodel):
    """--bmodel: the bmodel's memory plan against the device's free memory; too little ends the
    run before any micro-net, with the SE7 heap layout advice."""
    result, _ = _doctor(cache, "--bmodel", str(toy_staged_bmodel), LVB_SAIL_STANDIN_MEMORY_MB="1")
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "needs" in errors[0] and "memory_edit.sh" in errors[0], result.stderr
    assert "doctor_w4" not in result.stdout
