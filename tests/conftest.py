"""Shared fixtures (test checkpoints, exports and bmodels, each made once per session)
and the test tiers: `toolchain` marks what needs tpu-mlir or its simulator, `slow`
a full pipeline; `make test-fast` runs neither, `make test` everything."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import CHUNK, PIPELINE_PICTURES, PIPELINE_VISION_QUANT, SEQ, chunks_of
from lvb.testing.checkpoints import GEOMETRIES, LLAMA_GEOMETRIES, write_checkpoint, write_llama_checkpoint

# Fixtures whose users need the toolchain: they are marked without being named twice.
TOOLCHAIN_FIXTURES = {"compile_factory", "toy_pipeline", "toy_staged_bmodel"}
# A test parametrized over the fixture geometries runs for this one in the fast tier, for
# all of them in the full suite: one export instead of three for the inner loop.
FAST_GEOMETRY = "gqa2-cross-last"


def pytest_configure(config):
    # Every export of the session, in this process or a command it starts, splits the vision
    # attention one head per group, as the 11B's is split (a fixture's scores are a few KB, far
    # below the default budget): transformers parity and the simulator cover the split graph.
    os.environ["LVB_SCORES_BYTES_PER_GROUP"] = "1"


def pytest_collection_modifyitems(config, items):
    for item in items:
        if TOOLCHAIN_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.toolchain)
        params = item.callspec.params.values() if hasattr(item, "callspec") else ()
        if any(isinstance(value, str) and value in GEOMETRIES and value != FAST_GEOMETRY for value in params):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Returns a function name -> checkpoint dir (an mllama geometry or a Llama text one),
    writing each once."""
    written: dict[str, object] = {}

    def make(name: str):
        if name not in written:
            write = write_llama_checkpoint if name in LLAMA_GEOMETRIES else write_checkpoint
            written[name] = write(tmp_path_factory.mktemp("checkpoints") / name, name)
        return written[name]

    return make


@pytest.fixture(params=sorted(GEOMETRIES))
def checkpoint(request, checkpoint_factory):
    return checkpoint_factory(request.param)


@pytest.fixture(scope="session")
def export_factory(tmp_path_factory, checkpoint_factory):
    """name -> work directory holding that checkpoint's export (made once per session).

    Like every export of the session, it splits the vision attention one head per group
    (pytest_configure)."""
    from lvb.export.exporter import export

    done: dict[str, object] = {}

    def make(name: str):
        if name not in done:
            work = tmp_path_factory.mktemp(f"work-{name}")
            export(checkpoint_factory(name), work, seq=SEQ, chunks=chunks_of(name))
            done[name] = work
        return done[name]

    return make


@pytest.fixture(scope="session")
def compile_factory(export_factory):
    """(name, quant) -> combined bmodel, compiled once per session into the export's work dir."""
    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.toolchain import find_toolchain

    done: dict[tuple, object] = {}

    def make(name: str, quant: str):
        if (name, quant) not in done:
            work = export_factory(name)
            compiler = Compiler(work, CompileSettings(quant=quant), find_toolchain())
            compiler.run()
            done[name, quant] = compiler.bmodel
        return done[name, quant]

    return make


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def toy_pipeline(tmp_path_factory):
    """quant -> (work dir, completed ci/pipeline.sh) on the trained toy with the simulator, run
    once per session and quant into one work dir: test_pipeline checks the run, the package
    tests reuse its export and bmodels instead of compiling the toy again."""
    work = tmp_path_factory.mktemp("toy")
    done: dict[str, tuple] = {}

    def run(quant: str):
        if quant not in done:
            # INT8 with --check kinds, as for a large model: verify must then check the nets the
            # compile trusted (INT4 checks every net at compile time, the default).
            env = dict(os.environ, MODEL=str(ROOT / "models" / "toy"), WORK=str(work), QUANT=quant, SEQ="128",
                       VISION_QUANT=PIPELINE_VISION_QUANT[quant],
                       CHUNK="32", BACKEND="cmodel", PICTURES=str(PIPELINE_PICTURES[quant]),
                       CHECK="kinds" if quant == "int8" else "all",
                       LVB=str(Path(sys.executable).parent / "lvb"))
            # The toy as `make demo` exports it: its vision attention whole, as the default budget
            # leaves a small tower (the fixtures cover the split graph).
            env.pop("LVB_SCORES_BYTES_PER_GROUP")
            done[quant] = work, subprocess.run([str(ROOT / "ci" / "pipeline.sh")], env=env, capture_output=True, text=True)
        return done[quant]

    return run


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory):
    """Work directory holding the trained toy's export (models/toy), made once per session."""
    from lvb.export.exporter import export

    work = tmp_path_factory.mktemp("work-toy")
    export(Path(__file__).resolve().parent.parent / "models" / "toy", work, seq=SEQ, chunks=(CHUNK,))
    return work


@pytest.fixture(scope="session")
def toy_draft_export(tmp_path_factory):
    """Work directory holding the toy's draft's export (models/toy-draft), shaped as toy_export."""
    from lvb.export.exporter import export

    work = tmp_path_factory.mktemp("work-toy-draft")
    export(ROOT / "models" / "toy-draft", work, seq=SEQ, chunks=(CHUNK,))
    return work


@pytest.fixture(scope="session")
def toy_staged_bmodel(tmp_path_factory):
    """The trained toy at INT4 with prefill buckets of 64, 32 and 16 tokens (seq 128), made once
    per session without the per-net simulator check (the tests that use it compare a whole turn
    with the simulator instead): a picture and the task's question (26 tokens) fit the middle
    bucket, so a test can tell the smallest bucket that holds a turn from the largest."""
    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.export.exporter import export
    from lvb.toolchain import find_toolchain

    work = tmp_path_factory.mktemp("toy-staged")
    export(ROOT / "models" / "toy", work, seq=128, chunks=(64, 32, 16))
    compiler = Compiler(work, CompileSettings(quant="int4", check="none"), find_toolchain())
    compiler.run()
    return compiler.bmodel


@pytest.fixture(scope="session")
def toy_int4_bmodel(toy_pipeline):
    """The toy's INT4 bmodel from the session's ci/pipeline.sh run (no second compile)."""
    work, result = toy_pipeline("int4")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return next(work.glob("toy_int4_*.bmodel"))
