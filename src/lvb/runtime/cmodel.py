"""The BM1684X simulator (cmodel) as an Engine: a worker process in tpu-mlir's
Python loads the bmodel once through pyruntime_bm and runs its nets on request."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from lvb.contract import NetInfo, TensorInfo
from lvb.dtypes import BY_TPU_MLIR
from lvb.runtime.engine import Engine, EngineError, Resident
from lvb.runtime.wire import receive, send
from lvb.toolchain import Toolchain, find_toolchain


def _declared(tpu_mlir: str) -> str:
    """The dtype a tensor named so by the worker is declared in; a name the table lacks as it is."""
    known = BY_TPU_MLIR.get(tpu_mlir)
    return known.declared if known else tpu_mlir


class _WorkerError(EngineError):
    def __init__(self, what: str, reason: str):
        self.reason = reason
        super().__init__(f"{what}: {reason}")


class CmodelEngine(Engine):
    backend = "cmodel"

    def __init__(self, bmodel: str | Path, toolchain: Toolchain | None = None):
        bmodel = Path(bmodel)
        if not bmodel.is_file():
            raise EngineError(f"{bmodel}: no such bmodel; run `lvb compile` first")
        toolchain = toolchain or find_toolchain()
        env = toolchain.worker_env()
        self._log = tempfile.NamedTemporaryFile(prefix="lvb-cmodel-", suffix=".log", delete=False)
        self._process = subprocess.Popen(
            [str(toolchain.python), "-m", "lvb.runtime.cmodel_worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
        )
        try:
            info = self._call({"op": "load", "bmodel": str(bmodel.resolve())})
        except EngineError as e:
            self.close()
            raise EngineError(f"{bmodel}: the simulator cannot load it ({e.reason}); the file is damaged or not a "
                              "bmodel: build it again with `lvb compile`") from None
        self.wire_nets = info  # as the simulator names its dtypes (bf16 stays bf16), for sail's stand-in
        self._nets = {
            name: NetInfo(
                name,
                tuple(TensorInfo(t["name"], tuple(t["shape"]), _declared(t["dtype"])) for t in net["inputs"]),
                tuple(TensorInfo(t["name"], tuple(t["shape"]), _declared(t["dtype"])) for t in net["outputs"]),
                tuple(tuple(TensorInfo(t["name"], tuple(shape), _declared(t["dtype"]))
                            for t, shape in zip(net["inputs"], stage)) for stage in net.get("smaller", ())),
            )
            for name, net in info.items()
        }

    def _log_reason(self) -> str:
        """The line of the worker's log that says what went wrong (tpu-mlir's FATAL or an
        assertion), else its last line: the log itself is deleted with the engine."""
        try:
            lines = [line.strip() for line in Path(self._log.name).read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        for word in ("FATAL", "Assertion", "ERROR", "Error", "terminate"):
            telling = [line for line in lines if word in line]
            if telling:
                return telling[0][:300]
        return (lines or ["no log"])[-1][:300]

    def _call(self, request: dict):
        try:
            send(self._process.stdin, request)
            reply = receive(self._process.stdout)
        except (BrokenPipeError, EOFError, OSError):
            raise _WorkerError("the simulator worker died", self._log_reason()) from None
        if not reply["ok"]:
            raise _WorkerError("simulator", " ".join(str(reply["error"]).split())[:300])
        return reply["result"]

    @property
    def nets(self) -> dict[str, NetInfo]:
        return self._nets

    def allocate(self, buffer: str, shape, dtype: str = "float32") -> None:
        self._call({"op": "allocate", "buffer": buffer, "shape": list(shape), "dtype": dtype})

    def read(self, buffer: str) -> np.ndarray:
        return self._call({"op": "read", "buffer": buffer})

    def upload(self, buffer: str, array: np.ndarray) -> None:
        self._call({"op": "upload", "buffer": buffer, "array": np.asarray(array)})

    def run(self, net: str, feeds: Mapping[str, np.ndarray | Resident], store: Mapping[int, Resident] | None = None):
        if net not in self._nets:
            raise EngineError(f"the bmodel has no net {net!r}; it has {', '.join(sorted(self._nets))}")
        wire_feeds = {
            name: vars(value) if isinstance(value, Resident) else np.asarray(value) for name, value in feeds.items()
        }
        wire_store = {str(index): vars(target) for index, target in (store or {}).items()}
        return self._call({"op": "run", "net": net, "feeds": wire_feeds, "store": wire_store})

    def close(self) -> None:
        if self._log.closed:
            return
        if self._process.poll() is None:
            try:
                self._call({"op": "close"})
                self._process.wait(timeout=30)
            except (EngineError, subprocess.TimeoutExpired):
                self._process.kill()
        self._log.close()
        os.unlink(self._log.name)
