"""`lvb compile` with the real tpu-mlir and the real simulator."""

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from helpers import CHUNK, SEQ, one_error_line
from lvb.cli import app
from lvb.check import ONNX_VS_BMODEL
from lvb.compile.compiler import CompileSettings, Compiler
from lvb.compile.inspect import inspect_bmodel
from lvb.testing.checkpoints import GEOMETRIES
from lvb.toolchain import Toolchain, find_toolchain

runner = CliRunner()
pytestmark = pytest.mark.toolchain  # every test here runs tpu-mlir or its simulator
_BUILD_TIME = re.compile(rb"[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")


def bmodel_digest(path) -> str:
    """The bmodel's bytes without its build time, the one thing two identical compiles differ in."""
    data = path.read_bytes()
    return hashlib.sha256(_BUILD_TIME.sub(b"", data[:65536], count=1) + data[65536:]).hexdigest()


def manifest(bmodel):
    return json.loads((bmodel.parent / "compile" / f"{bmodel.stem}.json").read_text())


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_every_net_compiles_and_matches_onnxruntime_on_the_simulator(name, quant, compile_factory, export_factory):
    bmodel = compile_factory(name, quant)
    work = export_factory(name)
    assert bmodel.name == f"{name}_{quant}_g64_seq{SEQ}_chunk{CHUNK}_bm1684x.bmodel"
    exported = json.loads((work / "export" / "manifest.json").read_text())["nets"]
    compiled = manifest(bmodel)["nets"]
    assert list(compiled) == list(exported)
    for net, result in compiled.items():
        assert result["passed"] and result["check"]["cosine"] >= ONNX_VS_BMODEL[result["quant"]], net
        decoder = net.startswith(("block_", "cross_kv_"))
        assert result["quant"] == (quant if decoder else ("f32" if net == "greedy_head" else "bf16"))
    info = inspect_bmodel(bmodel, find_toolchain())
    assert list(info.nets) == list(exported)
    for net, entry in exported.items():
        assert [(t.name, list(t.shape)) for t in info.nets[net].inputs] == [(t["name"], t["shape"]) for t in entry["inputs"]]


def test_changing_quant_recompiles_only_the_blocks(compile_factory, export_factory):
    int4 = manifest(compile_factory("gqa2-cross-last", "int4"))["nets"]
    int8 = manifest(compile_factory("gqa2-cross-last", "int8"))["nets"]
    for net in int4:
        same = int4[net]["bmodel"] == int8[net]["bmodel"]
        assert same != net.startswith(("block_", "cross_kv_")), net


def test_nothing_changed_means_no_tool_runs(compile_factory, export_factory, monkeypatch):
    compile_factory("mha-cross-first", "int4")

    def no_tools(*args, **kwargs):
        raise AssertionError("a tool ran although nothing changed")

    monkeypatch.setattr(Toolchain, "python_tool", no_tools)
    monkeypatch.setattr(Toolchain, "run", no_tools)
    result = runner.invoke(app, ["compile", "--work", str(export_factory("mha-cross-first")), "--quant", "int4"])
    assert result.exit_code == 0, result.output


# Compiles in a pool of two and SIGKILLs its whole process group (tool servers included)
# from the progress callback, right after the N-th net's result: no wall-clock race.
KILL_AFTER = """
import os, signal, sys
from pathlib import Path
from lvb.compile.compiler import CompileSettings, Compiler
from lvb.toolchain import find_toolchain

def progress(done, total, running):
    if done == int(sys.argv[1]):
        os.killpg(0, signal.SIGKILL)

Compiler(Path("work"), CompileSettings(quant="int4"), find_toolchain()).run(jobs=2, progress=progress)
"""


def test_killed_halfway_resumes_to_the_same_result(export_factory, compile_factory, tmp_path):
    """Starts from the finished compile with the decoder nets' int4 results removed (the rest
    stays cached), is killed with four nets to go, and resumes to the same bytes."""
    name = "mha-cross-first"
    clean = compile_factory(name, "int4")
    work = tmp_path / "work"
    shutil.copytree(export_factory(name) / "export", work / "export")
    shutil.copytree(export_factory(name) / "compile", work / "compile")
    for manifest_file in (work / "compile").glob("*.json"):  # the combined bmodels' manifests
        manifest_file.unlink()
    removed = [done.parent for done in (work / "compile").glob("*/*/result.json")
               if json.loads(done.read_text())["quant"] == "int4"]
    for folder in removed:
        shutil.rmtree(folder)
    nets = len(json.loads((work / "export" / "manifest.json").read_text())["nets"])
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER, str(nets - 4)], cwd=tmp_path, capture_output=True,
                            start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    redone = [d for d in (work / "compile").glob("*/*/result.json") if json.loads(d.read_text())["quant"] == "int4"]
    assert 3 <= len(redone) < len(removed) and not list(work.glob("*.bmodel"))
    # A relative --work, as in ci/pipeline.sh: the tool server's children change directory.
    command = [sys.executable, "-m", "lvb.cli", "compile", "--work", "work", "--quant", "int4", "--jobs", "2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resumed = work / clean.name
    assert bmodel_digest(resumed) == bmodel_digest(clean)


def test_bad_input(export_factory, tmp_path):
    work = str(export_factory("gqa2-cross-last"))
    assert "holds no export" in one_error_line(["compile", "--work", str(tmp_path)])
    assert "no-such-toolchain" in one_error_line(["compile", "--work", work, "--toolchain", str(tmp_path / "no-such-toolchain")])
    assert "--chip bm1688 is not supported" in one_error_line(["compile", "--work", work, "--chip", "bm1688"])
    assert "--quant int3 is not one of" in one_error_line(["compile", "--work", work, "--quant", "int3"])
    output = one_error_line(["compile", "--work", work, "--group-size", "48"])
    assert "--group-size 48 does not divide text hidden_size 64" in output and "--group-size 64" in output
    assert "is for --seq 160, not 512" in one_error_line(["compile", "--work", work, "--seq", "512"])


def test_a_failing_net_stops_the_pool_and_is_named(export_factory, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(export_factory("mha-cross-first") / "export", work / "export")
    broken = work / "export" / "block_1" / "block_1.onnx"
    broken.write_bytes(broken.read_bytes()[:1000])
    result = runner.invoke(app, ["compile", "--work", str(work), "--quant", "int4"])
    assert result.exit_code == 1
    assert "error: block_1: model_transform.py failed" in result.output
    assert not list(work.glob("*.bmodel"))  # nothing a later run would trust


def test_inspect_reports_decode_bytes(compile_factory):
    bmodel = compile_factory("gqa2-cross-last", "int4")
    result = runner.invoke(app, ["inspect", str(bmodel)])
    assert result.exit_code == 0, result.output
    info = inspect_bmodel(bmodel, find_toolchain())
    step = info.decode_step()
    # KV of the self-attention layers (0 and 2): [1, SEQ, 2, 16] fp32 each for K and V.
    assert step["kv_cache"] == 2 * 2 * SEQ * 2 * 16 * 4
    # Cross K/V of layers 1 and 3: [1, 68, 2, 16] fp32, K and V: KV heads only, never 4 query heads.
    assert step["cross_kv"] == 2 * 2 * 68 * 2 * 16 * 4
    assert step["weights"] > 0 and "one decode step reads" in result.output
