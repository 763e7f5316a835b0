"""The simulator side of the cmodel engine; runs in tpu-mlir's own Python.

Started by `lvb.runtime.cmodel.CmodelEngine` with tpu-mlir's library folders
already on LD_LIBRARY_PATH (they must be there when the process starts).
Reads requests on stdin and answers on the original stdout; everything the
simulator prints goes to stderr.
"""

from __future__ import annotations

import os
import sys
import traceback

import numpy as np

from lvb.runtime.engine import HostBuffers, Resident, from_bf16_bits, to_bf16_bits
from lvb.runtime.wire import receive, send


def _load_runtime(bmodel: str):
    """Bind the BM1684X simulator library the way tpu-mlir's model_runner does."""
    import tpu_mlir  # noqa: F401  (sets TPUC_ROOT and sys.path)
    from filelock import FileLock
    from tools.model_runner import bind_cmodel_so, get_chip_from_model, link_bmlib_so, link_cmodel_so

    chip = get_chip_from_model(bmodel).strip() or "BM1684X"
    with FileLock("/tmp/cmodel_so.lock"):
        link_cmodel_so(chip)
        link_bmlib_so(chip)
        import pyruntime_bm

        bind_cmodel_so(chip)
    return pyruntime_bm


class Worker:
    def __init__(self):
        self.model = None
        self.nets = {}
        self.buffers = HostBuffers()

    def load(self, bmodel: str) -> dict:
        runtime = _load_runtime(bmodel)
        self.model = runtime.Model(bmodel, 0, "")
        info = {}
        for name in self.model.networks:
            net = self.model.Net(name)
            self.nets[name] = net
            info[name] = {
                "inputs": [{"name": t.name, "shape": list(t.data.shape), "dtype": t.dtype} for t in net.inputs],
                "outputs": [{"name": t.name, "shape": list(t.data.shape), "dtype": t.dtype} for t in net.outputs],
            }
        return info

    def run(self, net_name: str, feeds: dict, store: dict) -> list:
        net = self.nets[net_name]
        for tensor in net.inputs:
            value = feeds[tensor.name]
            if isinstance(value, dict):
                value = self.buffers.resolve(Resident(**value))
            value = np.asarray(value)
            if tensor.dtype == "bf16":
                value = to_bf16_bits(value)
            tensor.data.reshape(-1)[:] = value.reshape(-1).astype(tensor.data.dtype, copy=False)
        net.forward()
        outputs = []
        for index, tensor in enumerate(net.outputs):
            data = from_bf16_bits(tensor.data) if tensor.dtype == "bf16" else np.array(tensor.data)
            target = store.get(str(index))
            if target is not None:
                self.buffers.store(data, Resident(**target))
                outputs.append(None)
            else:
                outputs.append(np.array(data, dtype=np.float32 if tensor.dtype in ("bf16", "f16") else data.dtype))
        return outputs

    def handle(self, request: dict):
        op = request["op"]
        if op == "load":
            return self.load(request["bmodel"])
        if op == "allocate":
            self.buffers.allocate(request["buffer"], request["shape"], request["dtype"])
            return None
        if op == "upload":
            self.buffers.upload(request["buffer"], request["array"])
            return None
        if op == "read":
            return self.buffers.read(request["buffer"])
        if op == "run":
            return self.run(request["net"], request["feeds"], request.get("store") or {})
        raise ValueError(f"unknown request {op!r}")


def main() -> None:
    # Keep the protocol on a private copy of stdout; the simulator's chatter goes to stderr.
    replies = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    requests = sys.stdin.buffer
    worker = Worker()
    while True:
        try:
            request = receive(requests)
        except EOFError:
            return
        if request["op"] == "close":
            send(replies, {"ok": True, "result": None})
            return
        try:
            send(replies, {"ok": True, "result": worker.handle(request)})
        except Exception as e:  # reported to the client, which raises it there
            traceback.print_exc()
            send(replies, {"ok": False, "error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    main()
