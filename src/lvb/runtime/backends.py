"""Open an Engine by backend name: the device (sail), its simulator (cmodel) or onnxruntime."""

from __future__ import annotations

from pathlib import Path

from lvb.contract import Backend
from lvb.runtime.engine import Engine, EngineError
from lvb.workdir import WorkDir, WorkDirError


def default_backend(bmodel: Path | None, onnx_work: Path | None) -> Backend:
    """The device for a bmodel where sophon.sail imports; else onnxruntime when there are ONNX
    nets (a package made with --onnx on a machine without a card); else the simulator."""
    if bmodel is None and onnx_work is not None:
        return Backend.ONNXRUNTIME
    try:
        import sophon.sail  # noqa: F401
    except ImportError:
        return Backend.ONNXRUNTIME if onnx_work is not None else Backend.CMODEL
    return Backend.SAIL


def open_engine(backend: str, bmodel: Path | None = None, onnx_work: Path | None = None, toolchain=None) -> Engine:
    backend = Backend.of(backend, "--backend")
    if backend is Backend.ONNXRUNTIME:
        if onnx_work is None:
            raise EngineError("the onnxruntime backend runs the exported ONNX nets: pass --onnx WORKDIR")
        work = WorkDir(onnx_work)
        try:
            nets = work.require_export("CHECKPOINT")["nets"]
        except WorkDirError as e:
            raise EngineError(str(e)) from None
        from lvb.contract import NetSpec
        from lvb.runtime.onnx import OnnxEngine

        return OnnxEngine({name: work.onnx(entry) for name, entry in nets.items()},
                          specs={name: NetSpec.from_json(entry) for name, entry in nets.items()})
    if bmodel is None:
        raise EngineError(f"the {backend} backend runs a bmodel: pass --bmodel FILE")
    if backend is Backend.CMODEL:
        from lvb.runtime.cmodel import CmodelEngine

        return CmodelEngine(bmodel, toolchain)
    from lvb.runtime.memory import preflight
    from lvb.runtime.sail import SailEngine

    # Before loading: a bmodel that cannot fit fails here in one line, not deep in bmruntime.
    check = preflight(bmodel, toolchain=toolchain)
    engine = SailEngine(bmodel)
    engine.preflight = check
    return engine
