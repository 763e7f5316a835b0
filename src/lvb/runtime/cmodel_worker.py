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

from lvb.dtypes import BY_TPU_MLIR, from_bf16_bits, to_bf16_bits
from lvb.runtime.engine import HostBuffers, Resident
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


def stage_shapes(bmodel: str, outputs: bool = False) -> dict[str, list[list[list[int]]]]:
    """Each net's input (or output) shapes per stage, in the bmodel's stage order, read from
    its flatbuffer header only (pyruntime_bm shows the first stage alone)."""
    from debugger import bmodel_fbs
    from debugger.disassembler import bmodel_header_type

    with open(bmodel, "rb") as f:
        head = np.frombuffer(f.read(bmodel_header_type.itemsize), dtype=bmodel_header_type)
        model = bmodel_fbs.Model.GetRootAsModel(f.read(int(head["flatbuffers_size"][0])), 0)
    shapes = {}
    for i in range(model.NetLength()):
        net = model.Net(i)
        shapes[net.Name().decode()] = [
            [[int(d) for d in tensor(k).Shape(0).DimAsNumpy()] for k in range(count())]
            for stage in (net.Parameter(j) for j in range(net.ParameterLength()))
            for tensor, count in [(stage.OutputTensor, stage.OutputTensorLength) if outputs else
                                  (stage.InputTensor, stage.InputTensorLength)]
        ]
    return shapes


def _resident(value):
    """A feed off the wire: a Resident (sent as its fields) or an array."""
    return Resident(**value) if isinstance(value, dict) else value


class Worker:
    def __init__(self):
        self.model = None
        self.nets = {}
        self.stages: dict[str, list[list[list[int]]]] = {}
        self.buffers = HostBuffers()

    def load(self, bmodel: str) -> dict:
        runtime = _load_runtime(bmodel)
        self.model = runtime.Model(bmodel, 0, "")
        self.stages = stage_shapes(bmodel)
        output_stages = stage_shapes(bmodel, outputs=True)
        info = {}
        for name in self.model.networks:
            net = self.model.Net(name)
            self.nets[name] = net
            info[name] = {
                "inputs": [{"name": t.name, "shape": list(t.data.shape), "dtype": t.dtype} for t in net.inputs],
                "outputs": [{"name": t.name, "shape": list(t.data.shape), "dtype": t.dtype} for t in net.outputs],
                "smaller": self.stages.get(name, [])[1:],
                "smaller_outputs": output_stages.get(name, [])[1:],
            }
        return info

    def run(self, net_name: str, feeds: dict, store: dict) -> list:
        net = self.nets[net_name]
        values, bits = [], []
        for tensor in net.inputs:
            value, is_bits = self.buffers.resolve_raw(_resident(feeds[tensor.name]))
            values.append(np.asarray(value))
            bits.append(is_bits)
        shapes = [list(v.shape) for v in values]
        smaller = self.stages.get(net_name, [])[1:]
        first = [v.size for v in values] == [t.data.size for t in net.inputs]
        if not first and shapes not in smaller:  # the simulator aborts the process on a shape no stage has
            raise ValueError(f"{net_name}: no stage takes inputs of shapes {shapes}")
        for tensor, value, is_bits in zip(net.inputs, values, bits):
            # A bf16 buffer feeds a bf16 input as it is; the other pairs convert.
            if tensor.dtype == "bf16" and not is_bits:
                value = to_bf16_bits(value)
            elif is_bits and tensor.dtype != "bf16":
                value = from_bf16_bits(value)
            # A smaller stage reads its inputs from the start of the first stage's buffers.
            tensor.data.reshape(-1)[: value.size] = value.reshape(-1).astype(tensor.data.dtype, copy=False)
        if first:
            net.forward()
            output_shapes = [list(t.data.shape) for t in net.outputs]
        else:
            output_shapes = net.forward_dynamic(shapes)
        outputs = []
        for index, (tensor, shape) in enumerate(zip(net.outputs, output_shapes)):
            raw = np.array(tensor.data).reshape(-1)[: int(np.prod(shape))].reshape(shape)
            target = store.get(str(index))
            if target is not None:
                self.buffers.store(raw, Resident(**target), bf16_bits=tensor.dtype == "bf16")
                outputs.append(None)
            else:
                data = from_bf16_bits(raw) if tensor.dtype == "bf16" else raw
                known = BY_TPU_MLIR.get(tensor.dtype)  # 16-bit floats are given back as float32
                outputs.append(np.array(data, dtype=known.host if known else data.dtype))
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
