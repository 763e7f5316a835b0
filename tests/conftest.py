"""Shared fixtures: test checkpoints are written once per session, per geometry."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory):
    """Work directory holding the trained toy's export (models/toy), made once per session."""
    from pathlib import Path

    from lvb.export.exporter import export

    work = tmp_path_factory.mktemp("work-toy")
    export(Path(__file__).resolve().parent.parent / "models" / "toy", work, seq=SEQ, chunk=CHUNK)
    return work
