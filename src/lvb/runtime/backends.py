"""Open an Engine by backend name: the device (sail), its simulator (cmodel) or onnxruntime."""

from __future__ import annotations

import json
from pathlib import Path

from lvb.runtime.engine import Engine, EngineError

BACKENDS = ("cmodel", "sail", "onnxruntime")


def default_backend(bmodel: Path | None, onnx_work: Path | None) -> str:
    """onnxruntime for an ONNX export; for a bmodel the device where sophon.sail imports, else the simulator."""
    if bmodel is None and onnx_work is not None:
        return "onnxruntime"
    try:
        import sophon.sail  # noqa: F401
    except ImportError:
        return "cmodel"
    return "sail"


def open_engine(backend: str, bmodel: Path | None = None, onnx_work: Path | None = None, toolchain=None) -> Engine:
    if backend not in BACKENDS:
        raise EngineError(f"--backend {backend} is not one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime":
        if onnx_work is None:
            raise EngineError("the onnxruntime backend runs the exported ONNX nets: pass --onnx WORKDIR")
        manifest = Path(onnx_work) / "export" / "manifest.json"
        if not manifest.is_file():
            raise EngineError(f"{onnx_work} holds no export; run `lvb export --out {onnx_work}` first")
        from lvb.runtime.onnx import OnnxEngine

        nets = json.loads(manifest.read_text())["nets"]
        return OnnxEngine({name: Path(onnx_work) / "export" / entry["file"] for name, entry in nets.items()})
    if bmodel is None:
        raise EngineError(f"the {backend} backend runs a bmodel: pass --bmodel FILE")
    if backend == "cmodel":
        from lvb.runtime.cmodel import CmodelEngine

        return CmodelEngine(bmodel, toolchain)
    from lvb.runtime.memory import preflight
    from lvb.runtime.sail import SailEngine

    # Before loading: a bmodel that cannot fit fails here in one line, not deep in bmruntime.
    check = preflight(bmodel, toolchain=toolchain)
    engine = SailEngine(bmodel)
    engine.preflight = check
    return engine
