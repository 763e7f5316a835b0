"""Shared fixtures: test checkpoints are written once per session, per geometry."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvb.testing.checkpoints import GEOMETRIES, write_checkpoint


@pytest.fixture(scope="session")
def checkpoint_factory(tmp_path_factory):
    """Returns a function name -> checkpoint dir, writing each geometry once."""
    written: dict[str, object] = {}

    def make(name: str):
        if name not in written:
            written[name] = write_checkpoint(tmp_path_factory.mktemp("checkpoints") / name, name)
        return written[name]

    return make


@pytest.fixture(params=sorted(GEOMETRIES))
def checkpoint(request, checkpoint_factory):
    return checkpoint_factory(request.param)


# Small enough for the simulator, long enough for a few turns with an image.
SEQ, CHUNK = 160, 32


@pytest.fixture(scope="session")
def export_factory(tmp_path_factory, checkpoint_factory):
    """name -> work directory holding that checkpoint's export (made once per session)."""
    from lvb.export.exporter import export

    done: dict[str, object] = {}

    def make(name: str):
        if name not in done:
            work = tmp_path_factory.mktemp(f"work-{name}")
            export(checkpoint_factory(name), work, seq=SEQ, chunk=CHUNK)
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


TOY = Path(__file__).resolve().parent.parent / "models" / "toy"
# The toy as ci/pipeline.sh builds it in tests/test_pipeline.py (SEQ=128, CHUNK=32): the same
# work directory and settings, so whichever test runs first pays for it and the rest hit
# lvb's export and compile caches.
TOY_SEQ, TOY_CHUNK = 128, 32


@pytest.fixture(scope="session")
def toy_work(tmp_path_factory):
    return tmp_path_factory.mktemp("toy")


@pytest.fixture(scope="session")
def toy_int4_bmodel(toy_work):
    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.export.exporter import export
    from lvb.toolchain import find_toolchain

    export(TOY, toy_work, seq=TOY_SEQ, chunk=TOY_CHUNK)
    compiler = Compiler(toy_work, CompileSettings(quant="int4"), find_toolchain())
    compiler.run()
    return compiler.bmodel
