"""onnxruntime on the CPU as an Engine, over the exported ONNX nets."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from lvb.contract import NetInfo, NetSpec, TensorInfo
from lvb.runtime.engine import Engine, EngineError, HostBuffers, Resident

_ORT_TYPES = {"tensor(float)": "float32", "tensor(int32)": "int32", "tensor(int64)": "int64"}


def _first_line(error: Exception) -> str:
    """onnxruntime's message as one line (its errors span several, with the node's details)."""
    return " ".join(str(error).split())[:300]


class OnnxEngine(Engine):
    backend = "onnxruntime"

    def __init__(self, files: Mapping[str, str | Path], threads: int | None = None,
                 specs: Mapping[str, NetSpec] | None = None,
                 record: Callable[[str, dict[str, np.ndarray]], object] | None = None):
        """`specs`: the nets as exported, which then say each net's inputs, outputs and stages (a
        net exported for several prefill chunks has a symbolic chunk axis in its graph), and a net
        is loaded only when it first runs: a caller that runs a few nets of an 11B export (the
        calibration runs the vision tower) does not hold the rest in memory. `record`: told
        each net run and a copy of what it was fed (a calibration set is made so)."""
        try:
            import onnxruntime
        except ImportError as e:
            raise EngineError("the onnxruntime backend needs onnxruntime: pip install onnxruntime") from e
        self._ort = onnxruntime
        self._files = {name: Path(path) for name, path in files.items()}
        missing = [str(p) for p in self._files.values() if not p.is_file()]
        if missing:
            raise EngineError(f"missing ONNX files: {', '.join(missing)}; run `lvb export` again")
        self._threads, self._record = threads, record
        self._sessions = {}
        self._buffers = HostBuffers()
        specs = specs or {}
        self._nets = {name: NetInfo(name, specs[name].inputs, specs[name].outputs,
                                    tuple(s.inputs for s in specs[name].smaller))
                      if name in specs else self._info(name) for name in self._files}

    def _session(self, name: str):
        if name not in self._sessions:
            options = self._ort.SessionOptions()
            if self._threads:
                options.intra_op_num_threads = self._threads
            options.log_severity_level = 3
            try:
                self._sessions[name] = self._ort.InferenceSession(str(self._files[name]), options)
            except Exception as e:  # onnxruntime raises its own Fail/InvalidProtobuf types for a damaged file
                raise EngineError(f"{self._files[name]}: onnxruntime cannot load it ({_first_line(e)}); the export is "
                                  "damaged: run `lvb export` again") from None
        return self._sessions[name]

    def _info(self, name: str) -> NetInfo:
        session = self._session(name)

        def describe(args):
            return tuple(TensorInfo(a.name, tuple(a.shape), _ORT_TYPES.get(a.type, a.type)) for a in args)

        return NetInfo(name, describe(session.get_inputs()), describe(session.get_outputs()))

    @property
    def nets(self) -> dict[str, NetInfo]:
        return self._nets

    def allocate(self, buffer: str, shape, dtype: str = "float32") -> None:
        self._buffers.allocate(buffer, shape, dtype)

    def read(self, buffer: str) -> np.ndarray:
        return self._buffers.read(buffer)

    def upload(self, buffer: str, array: np.ndarray, slot: int | None = None) -> None:
        try:
            self._buffers.upload(buffer, array, slot)
        except (KeyError, ValueError) as e:
            raise EngineError(f"cannot upload buffer {buffer}: {e}") from e

    def run(self, net: str, feeds: Mapping[str, np.ndarray | Resident], store: Mapping[int, Resident] | None = None):
        if net not in self._nets:
            raise EngineError(f"no ONNX net {net!r}; have {', '.join(sorted(self._nets))}")
        info = self._nets[net]
        inputs = {t.name: np.ascontiguousarray(self._buffers.resolve(feeds[t.name]), dtype=t.dtype) for t in info.inputs}
        if info.smaller:
            shapes = [tuple(inputs[t.name].shape) for t in info.inputs]
            if shapes not in [[t.shape for t in stage] for stage in (info.inputs, *info.smaller)]:
                raise EngineError(f"{net}: no stage takes inputs of shapes {shapes}")
        if self._record is not None:
            self._record(net, {name: array.copy() for name, array in inputs.items()})
        try:
            outputs = self._session(net).run(None, inputs)
        except Exception as e:  # e.g. a weights file truncated after the session mapped it
            raise EngineError(f"{self._files[net]}: onnxruntime failed to run it ({_first_line(e)}); the export may be "
                              "damaged: run `lvb export` again") from None
        result: list[np.ndarray | None] = []
        for index, output in enumerate(outputs):
            target = (store or {}).get(index)
            if target is None:
                result.append(output)
            else:
                self._buffers.store(output, target)
                result.append(None)
        return result
