"""A stand-in for Sophgo's `sophon.sail` that behaves like the real SDK where lvb
depends on it, and computes for real: every net runs on the BM1684X simulator
through lvb's cmodel worker (tpu-mlir's pyruntime_bm).

Put `src/lvb/testing/sail_standin` on sys.path (or PYTHONPATH) and
`import sophon.sail` finds this module. It follows sophgo/sophon-sail v3.10.7
(`src/bind.cpp`, `src/engine.cpp`, `src/graph.cpp`, `src/tensor.cpp`,
`src/engine_llm.cpp`) and libsophon (`tpu-runtime/src/bmruntime*.cpp`,
`bmlib/src/bmlib_runtime.cpp`); each class cites the lines it copies.

What it adds for tests, none of which the SDK has:
- a memory budget per device (LVB_SAIL_STANDIN_MEMORY_MB, default 16384): every
  device allocation is counted against it and fails like bm_malloc does;
- traffic counters: bytes host->device, device->host, device->device, and how
  many copies of each, so a test or bench can count what one step moves;
- fault injection: LVB_SAIL_STANDIN_FAIL=net[,net...] (or `fail_launches`)
  makes every launch of those nets fail the way bmrt_launch_tensor_ex does;
- LVB_SAIL_STANDIN_CORRUPT=net[,net...]: those nets run but write wrong values (noise),
  as a card with mismatched firmware does;
- LVB_SAIL_STANDIN_REPORT=path: a JSON summary (peak memory, traffic) written
  when the process exits, for tests that run lvb as a subprocess;
- `register_bmodel(path, nets)`: a bmodel known by its nets' shapes only, whose
  launches compute nothing, to count traffic at shapes the simulator cannot run;
- a record of the stage each launch ran (`Device.stages`, (net, stage) -> launches).

Stages follow bmruntime: a static multi-stage net runs at the stage whose input shapes
equal the bound tensors' shapes exactly, and a launch with shapes no stage has fails.
"""

from __future__ import annotations

import atexit
import enum
import json
import logging
import math
import os
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lvb.dtypes import BY_NAME, DTYPES, from_bf16_bits, to_bf16_bits

__version__ = "3.10.7 (lvb stand-in)"

log = logging.getLogger("sophon.sail")
log.addHandler(logging.NullHandler())  # the real SDK logs through spdlog to stdout; tests read lvb's own errors

# -- enums and errors (bind.cpp:218-228 registers the Sail*Error types; bmdef.h bm_data_type_t) ----


class Dtype(enum.IntEnum):  # libsophon tpu-runtime/include/bmdef.h bm_data_type_t
    BM_FLOAT32 = 0
    BM_FLOAT16 = 1
    BM_INT8 = 2
    BM_UINT8 = 3
    BM_INT16 = 4
    BM_UINT16 = 5
    BM_INT32 = 6
    BM_UINT32 = 7
    BM_BFLOAT16 = 8


class BmrtFlag(enum.IntEnum):  # bind.cpp:248-253, bmdef.h bm_runtime_flag_t
    BM_RUNTIME_AUTO = 0
    BM_RUNTIME_SHARE_MEM = 1


class IOMode(enum.IntEnum):  # bind.cpp IOMode
    SYSI = 0
    SYSO = 1
    SYSIO = 2
    DEVIO = 3


class SailDeviceError(RuntimeError):
    pass


class SailTensorError(RuntimeError):
    pass


class SailEngineError(RuntimeError):
    pass


class SailRuntimeError(RuntimeError):  # tensor.cpp:703 "no enough device memory"
    pass


# Each Dtype's bits in host memory (bf16's as uint16), from lvb's one table of device dtypes.
_BYTES = {Dtype[d.sail]: np.dtype(d.raw).type for d in DTYPES}
# update_data's accepted numpy types (bind.cpp:310-316): float16 and bf16 as uint16 bits.
_UPDATE = {**_BYTES, Dtype.BM_FLOAT16: np.uint16}
# The simulator worker's dtype names for a net's tensors (tpu-mlir's).
_WIRE = {d.tpu_mlir: Dtype[d.sail] for d in DTYPES}


# -- the device ------------------------------------------------------------------------------


@dataclass
class Device:
    """One chip's memory and copy counters (not in the SDK)."""

    total: int
    used: int = 0
    peak: int = 0
    model: int = 0  # what loading bmodels took (weights, instructions, activations, and Engine's I/O)
    traffic: Counter = field(default_factory=Counter)  # bytes: h2d, d2h, d2d
    copies: Counter = field(default_factory=Counter)  # how many: h2d, d2h, d2d
    launches: Counter = field(default_factory=Counter)  # per net
    stages: Counter = field(default_factory=Counter)  # (net, stage) of every launch that ran; 0 is the first

    def malloc(self, nbytes: int, what: str) -> None:
        # bm_malloc_device_byte_heap_mask fails, sail throws (tensor.cpp:697-705).
        if self.used + nbytes > self.total:
            log.error("bm_malloc_device_byte() err, size=%d (%s)", nbytes, what)
            raise SailRuntimeError(f"no enough device memory: {what} needs {nbytes} bytes, "
                                   f"{self.total - self.used} of {self.total} free")
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def free(self, nbytes: int) -> None:
        self.used -= nbytes

    def count(self, kind: str, nbytes: int) -> None:
        self.traffic[kind] += int(nbytes)
        self.copies[kind] += 1

    def reset_counters(self) -> None:
        self.traffic.clear()
        self.copies.clear()
        self.launches.clear()
        self.stages.clear()

    def summary(self) -> dict:
        return {"total": self.total, "used": self.used, "peak": self.peak, "model": self.model,
                "traffic": dict(self.traffic), "copies": dict(self.copies), "launches": dict(self.launches),
                "stages": {f"{net}:{stage}": n for (net, stage), n in self.stages.items()}}


_DEVICES: dict[int, Device] = {}
_FAIL: set[str] = set()


def device(dev_id: int = 0) -> Device:
    """The stand-in's record of one device (not in the SDK)."""
    if dev_id not in _DEVICES:
        megabytes = int(os.environ.get("LVB_SAIL_STANDIN_MEMORY_MB", "16384"))
        _DEVICES[dev_id] = Device(total=megabytes << 20)
    return _DEVICES[dev_id]


def fail_launches(*nets: str) -> None:
    """Make every later launch of these nets fail (not in the SDK); none to clear."""
    _FAIL.clear()
    _FAIL.update(nets)


def _failing() -> set[str]:
    return _FAIL | {n for n in os.environ.get("LVB_SAIL_STANDIN_FAIL", "").split(",") if n}


def _report() -> None:
    path = os.environ.get("LVB_SAIL_STANDIN_REPORT")
    if path and _DEVICES:
        Path(path).write_text(json.dumps({str(k): d.summary() for k, d in _DEVICES.items()}))


atexit.register(_report)


def get_dev_stat(dev_id: int) -> list[int]:
    """[mem_total, mem_used, tpu_util]: tensor.cpp:73-91 over bm_get_stat, which sums every
    heap and reports MiB (bmlib_runtime.cpp:1333-1355); no per-heap figure (bind.cpp:201-210).
    A device that is not there fails bm_dev_request (tensor.cpp:77-81)."""
    if not 0 <= dev_id < get_available_tpu_num():
        log.error("bm_dev_request failed")
        raise SailDeviceError("bm_dev_request failed")
    d = device(dev_id)
    return [d.total >> 20, d.used >> 20, 0]


def get_available_tpu_num() -> int:  # one chip, device 0
    return 1


class Handle:  # bind.cpp:281-285
    def __init__(self, tpu_id: int = 0):
        if not 0 <= tpu_id < get_available_tpu_num():  # bm_dev_query fails (tensor.cpp:350-356)
            log.error("bm_dev_query failed. the given TPU id '%d' is invalid!", tpu_id)
            raise SailDeviceError("init device failure")
        self._tpu_id = tpu_id
        device(tpu_id)

    def get_device_id(self) -> int:
        return self._tpu_id

    def get_target(self) -> str:
        return "BM1684X"


# -- tensors ---------------------------------------------------------------------------------


class _Memory:
    """A device allocation: bytes, freed (returned to the budget) when no tensor uses it."""

    def __init__(self, dev: Device, nbytes: int, what: str):
        dev.malloc(nbytes, what)
        self.data = np.zeros(nbytes, np.uint8)  # zero-filled at allocation (tensor.cpp:706-719)
        weakref.finalize(self, dev.free, nbytes)


class Tensor:
    """bind.cpp:294-300: Tensor(handle, shape, dtype, own_sys_data=False, own_dev_data=False), and
    Tensor(src, shape, offset, no_copy=True), a view of src's device memory (tensor.cpp:756-800)."""

    def __init__(self, first, shape, *args):
        if isinstance(first, Tensor):
            self._view(first, list(shape), int(args[0]) if args else 0, bool(args[1]) if len(args) > 1 else True)
            return
        if not isinstance(first, Handle) or not args:
            raise TypeError("Tensor(handle, shape, dtype, own_sys_data, own_dev_data)")
        own_sys_data, own_dev_data = (list(args[1:3]) + [False, False])[:2]
        self._dev_id, self._shape, self._dtype = first.get_device_id(), [int(d) for d in shape], Dtype(args[0])
        self._nbytes = math.prod(self._shape) * np.dtype(_BYTES[self._dtype]).itemsize
        self._memory = _Memory(device(self._dev_id), self._nbytes, f"Tensor {self._shape}") if own_dev_data else None
        self._offset = 0
        self._sys = np.zeros(self._nbytes, np.uint8) if own_sys_data else None

    def _view(self, src: Tensor, shape: list[int], offset: int, no_copy: bool) -> None:
        self._dev_id, self._shape, self._dtype = src._dev_id, shape, src._dtype
        itemsize = np.dtype(_BYTES[self._dtype]).itemsize
        self._nbytes = math.prod(shape) * itemsize
        if src._memory is None:
            raise SailTensorError("invalid Tensor")  # tensor.cpp:774-778
        if offset * itemsize + self._nbytes > src._nbytes:
            raise SailTensorError("size out of range")  # tensor.cpp:784-789
        if not no_copy:
            raise NotImplementedError("the stand-in has views only (no_copy=True)")
        self._memory, self._offset = src._memory, src._offset + offset * itemsize
        # A view of a tensor with host memory shares that too, at the same offset (tensor.cpp:791-796).
        start = offset * itemsize
        self._sys = None if src._sys is None else src._sys[start : start + self._nbytes]

    # device bytes of this tensor, as the raw numpy dtype
    def _device(self) -> np.ndarray:
        return self._memory.data[self._offset : self._offset + self._nbytes].view(_BYTES[self._dtype])

    def shape(self) -> list[int]:
        return list(self._shape)

    def dtype(self) -> Dtype:
        return self._dtype

    def update_data(self, data: np.ndarray) -> None:
        data = np.asarray(data)
        # tensor.cpp:1639-1665: the same number of dimensions and every dimension equal.
        if data.ndim != len(self._shape) or list(data.shape) != self._shape:
            log.error("Invalid tensor shape %s vs. %s!", self._shape, list(data.shape))
            raise SailTensorError("invalid argument")
        if data.dtype != _UPDATE[self._dtype]:
            raise SailTensorError(f"update_data: {data.dtype} data for a {self._dtype.name} tensor")
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if self._sys is not None:
            self._sys[:] = raw
        elif self._memory is not None:  # no host memory: straight to the device (tensor.cpp:1766-1776)
            device(self._dev_id).count("h2d", raw.size)
            self._device().view(np.uint8)[:] = raw
        else:
            raise SailTensorError("invalid Tensor")

    def sync_s2d(self) -> None:
        if self._sys is not None and self._memory is not None:  # tensor.cpp:1048-1058
            device(self._dev_id).count("h2d", self._nbytes)
            self._device().view(np.uint8)[:] = self._sys

    def sync_d2s(self) -> None:
        if self._sys is not None and self._memory is not None:
            device(self._dev_id).count("d2h", self._nbytes)
            self._sys[:] = self._device().view(np.uint8)

    def asnumpy(self) -> np.ndarray:
        if self._sys is None:
            raise SailTensorError("Can not find System memory!")  # bind.cpp:343
        data = self._sys.view(_BYTES[self._dtype]).reshape(self._shape).copy()
        return data.view(np.uint16) if self._dtype in (Dtype.BM_FLOAT16, Dtype.BM_BFLOAT16) else data

    def sync_d2d(self, src: Tensor, offset_src: int, offset_dst: int, len: int) -> None:  # noqa: A002 (the SDK's name)
        # tensor.cpp:1060-1094: elements, not bytes; SailTensorError on a dtype or bounds error.
        if self._dtype != src._dtype:
            raise SailTensorError("mismatch Tensor")
        if self._memory is None or src._memory is None:
            raise SailTensorError("invalid Tensor")
        if offset_src + len > math.prod(src._shape) or offset_dst + len > math.prod(self._shape):
            raise SailTensorError("size out of range")
        device(self._dev_id).count("d2d", len * np.dtype(_BYTES[self._dtype]).itemsize)
        self._device()[offset_dst : offset_dst + len] = src._device()[offset_src : offset_src + len]

    def zeros(self) -> None:  # bind.cpp:332
        if self._sys is not None:
            self._sys[:] = 0
        if self._memory is not None:
            self._device()[:] = 0


# -- the runtime ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: Dtype


@dataclass(frozen=True)
class _NetSpec:
    name: str
    inputs: tuple[_TensorSpec, ...]  # of stage 0
    outputs: tuple[_TensorSpec, ...]
    smaller: tuple[tuple[tuple[_TensorSpec, ...], tuple[_TensorSpec, ...]], ...] = ()  # stages 1..: (inputs, outputs)

    @property
    def stages(self) -> list[tuple[tuple[_TensorSpec, ...], tuple[_TensorSpec, ...]]]:
        return [(self.inputs, self.outputs), *self.smaller]


def _to_host(raw: np.ndarray, dtype: Dtype) -> np.ndarray:
    """Device values as the simulator worker takes them (floats as float32)."""
    if dtype == Dtype.BM_BFLOAT16:
        return from_bf16_bits(raw)
    return raw.astype(np.float32) if dtype == Dtype.BM_FLOAT16 else raw


def _to_device(values: np.ndarray, dtype: Dtype) -> np.ndarray:
    values = np.asarray(values)
    if dtype == Dtype.BM_BFLOAT16:
        return to_bf16_bits(values)
    return values.astype(_BYTES[dtype])


_REGISTERED: dict[str, dict[str, _NetSpec]] = {}


def register_bmodel(path: str, nets, loaded_bytes: int = 0) -> None:
    """Make `path` load as these nets (not in the SDK): `nets` is a list of objects with
    .name, .inputs and .outputs, whose tensors have .name, .shape and .dtype (numpy names:
    float32, int32, bfloat16), and optionally .smaller, the smaller stages as objects with
    .inputs and .outputs (lvb.contract's NetSpec). Launches leave the outputs as they are."""
    def specs(tensors):
        return tuple(_TensorSpec(t.name, tuple(t.shape), Dtype[BY_NAME[t.dtype].sail]) for t in tensors)

    _REGISTERED[str(path)] = {
        n.name: _NetSpec(n.name, specs(n.inputs), specs(n.outputs),
                         tuple((specs(s.inputs), specs(s.outputs)) for s in getattr(n, "smaller", ())))
        for n in nets
    }
    _REGISTERED[str(path)][""] = loaded_bytes  # type: ignore[assignment]


class _Runtime:
    """One loaded bmodel: its nets run on the simulator, its memory is charged to the device
    as bmruntime allocates it at load: weights, instructions and activations."""

    def __init__(self, path: str, dev_id: int, share_mem: bool):
        self.simulator = None
        self.dev = device(dev_id)
        if path in _REGISTERED:
            self.nets = {k: v for k, v in _REGISTERED[path].items() if k}
            self.loaded = _REGISTERED[path][""]
            self.dev.malloc(self.loaded, f"bmodel {path}")
            self.dev.model += self.loaded
            return
        from lvb.bmodel import inspect_bmodel
        from lvb.runtime.cmodel import CmodelEngine
        from lvb.toolchain import find_toolchain

        if not Path(path).is_file():
            raise SailEngineError(f"bmodel {path} does not exist")  # engine_llm.cpp:830-834
        toolchain = find_toolchain()
        info = inspect_bmodel(Path(path), toolchain)
        # bmruntime.cpp:296-300: on a one-core chip (BM1684X) SHARE_MEM is on by default, so
        # every net's activations share one buffer sized for the largest (bmruntime_bmodel.cpp:923-940).
        shared = True if share_mem is None else share_mem
        neuron = [net.neuron_bytes for net in info.nets.values()] or [0]
        self.loaded = info.device_weight_bytes + info.instruction_bytes + (max(neuron) if shared else sum(neuron))
        self._memory = _Memory(self.dev, self.loaded, f"bmodel {Path(path).name}")
        self.dev.model += self.loaded
        self.simulator = CmodelEngine(path, toolchain)
        self.nets = {}
        for name, net in self.simulator.wire_nets.items():
            def specs(tensors, shapes=None):
                return tuple(_TensorSpec(t["name"], tuple(shape or t["shape"]), _WIRE[t["dtype"]])
                             for t, shape in zip(tensors, shapes or [None] * len(tensors)))

            smaller = tuple((specs(net["inputs"], ins), specs(net["outputs"], outs))
                            for ins, outs in zip(net.get("smaller", ()), net.get("smaller_outputs", ())))
            self.nets[name] = _NetSpec(name, specs(net["inputs"]), specs(net["outputs"]), smaller)

    def stage_of(self, net: str, shapes: list[tuple[int, ...]]) -> int | None:
        """The stage whose input shapes are exactly these (bmruntime's static nets), or None."""
        return next((i for i, (ins, _) in enumerate(self.nets[net].stages) if [t.shape for t in ins] == shapes), None)

    def launch(self, net: str, inputs: list[Tensor], outputs: list[Tensor],
               shapes: list[tuple[int, ...]] | None = None) -> bool:
        """bmrt_launch_tensor_ex with user memory, the inputs at `shapes` (default: the tensors'
        own shapes, as sail passes them): False when the launch fails."""
        spec = self.nets[net]
        self.dev.launches[net] += 1
        if net in _failing():
            return False
        shapes = shapes or [tuple(t.shape()) for t in inputs]
        stage = self.stage_of(net, [tuple(s) for s in shapes])
        if stage is None:  # a static net runs only at one of its stages' input shapes
            log.error("%s: input shapes %s match no stage", net, shapes)
            return False
        stage_inputs, stage_outputs = spec.stages[stage]
        for tensor, want in zip(inputs + outputs, stage_inputs + stage_outputs):
            if tensor.dtype() != want.dtype:
                return False  # a dtype other than the net's is misread
            if tensor._nbytes < math.prod(want.shape) * np.dtype(_BYTES[want.dtype]).itemsize:
                return False  # the stage would read or write past the tensor's memory
        self.dev.stages[net, stage] += 1
        if self.simulator is None:
            return True  # a registered bmodel: shapes only
        feeds = {t.name: _to_host(tensor._device()[: math.prod(t.shape)], t.dtype).reshape(t.shape)
                 for t, tensor in zip(stage_inputs, inputs)}
        results = self.simulator.run(net, feeds)
        if net in os.environ.get("LVB_SAIL_STANDIN_CORRUPT", "").split(","):
            noise = np.random.default_rng(0)
            results = [noise.standard_normal(np.shape(r)).astype(np.float32) * 100 for r in results]
        for tensor, t, value in zip(outputs, stage_outputs, results):
            tensor._device()[: math.prod(t.shape)] = _to_device(value, t.dtype).reshape(-1)
        return True

    def close(self) -> None:
        if self.simulator is not None:
            self.simulator.close()


class EngineLLM:
    """sail.EngineLLM (bind.cpp:398-457, engine_llm.cpp): inputs and outputs by index; the
    caller's tensors are bound as they are (GraphLLM::attach_io_tensor, engine_llm.cpp:388-417);
    a failed launch raises (engine_llm.cpp:420-445 returns SAIL_ERR_ENGINE_INFER,
    EngineLLM_CC::process turns it into an exception with SAIL_CHECK_RET, engine_llm.cpp:1024-1032)."""

    def __init__(self, bmodel_path: str, *args):
        flags, tpu_ids = (args[0], args[1]) if len(args) == 2 else (None, args[0])
        if not tpu_ids:
            raise SailEngineError("EngineLLM device_ids error!")  # engine_llm.cpp:825-828
        self._dev_ids = list(tpu_ids)
        share = None if flags is None else bool(int(flags) & BmrtFlag.BM_RUNTIME_SHARE_MEM)
        self._runtime = _Runtime(str(bmodel_path), self._dev_ids[0], share)

    def get_device_ids(self) -> list[int]:
        return self._dev_ids

    def get_graph_names(self) -> list[str]:
        return list(self._runtime.nets)

    def get_addr_mode(self, graph_name: str) -> int:
        return 0

    def get_input_num(self, graph_name: str) -> int:
        return len(self._runtime.nets[graph_name].inputs)

    def get_output_num(self, graph_name: str) -> int:
        return len(self._runtime.nets[graph_name].outputs)

    def get_input_names(self, graph_name: str) -> list[str]:
        return [t.name for t in self._runtime.nets[graph_name].inputs]

    def get_output_names(self, graph_name: str) -> list[str]:
        return [t.name for t in self._runtime.nets[graph_name].outputs]

    def get_stage_num(self, graph_name: str) -> int:  # bind.cpp:409, GraphLLM::get_stage_num
        return len(self._runtime.nets[graph_name].stages)

    def get_input_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]:
        return list(self._runtime.nets[graph_name].stages[stage][0][index].shape)

    def get_output_shape(self, graph_name: str, index: int, stage: int = 0) -> list[int]:
        return list(self._runtime.nets[graph_name].stages[stage][1][index].shape)

    def get_input_dtype(self, graph_name: str, index: int) -> Dtype:
        return self._runtime.nets[graph_name].inputs[index].dtype

    def get_output_dtype(self, graph_name: str, index: int) -> Dtype:
        return self._runtime.nets[graph_name].outputs[index].dtype

    def process(self, graph_name: str, input: dict, output: dict, core_list=(0,)) -> None:  # noqa: A002
        spec = self._runtime.nets[graph_name]  # graphs_.at(): std::out_of_range for an unknown net
        # attach_io_tensor reads input[i] for every index; a missing one is a null pointer there.
        for what, given, count in (("input", input, len(spec.inputs)), ("output", output, len(spec.outputs))):
            missing = [i for i in range(count) if i not in given]
            if missing:
                raise SailEngineError(f"{what} {missing[0]} of {graph_name} is missing (a null Tensor in the SDK)")
        ok = self._runtime.launch(graph_name, [input[i] for i in range(len(spec.inputs))],
                                  [output[i] for i in range(len(spec.outputs))])
        if not ok:
            log.error("bmrt_launch_tensor_ex fail!")
            raise SailEngineError("SAIL_ERR_ENGINE_INFER: engine_llm.cpp: process")

    def close(self) -> None:  # not in the SDK: stops the simulator worker
        self._runtime.close()


class Engine:
    """sail.Engine (engine.cpp, graph.cpp): Engine(tpu_id) then load(path) allocates nothing for
    I/O; Engine(path, tpu_id, mode) also allocates a device tensor for every input and output of
    every graph (engine.cpp:645-660 -> alloc_tensors, engine.cpp:313-330 -> graph.cpp:554-592).
    process binds tensors by name, and an unknown name lands on input 0 (std::map operator[] in
    graph.cpp:274); a failed launch only logs (graph.cpp:646-648): outputs keep their contents."""

    def __init__(self, first, tpu_id: int | None = None, mode: IOMode | None = None):
        self._runtimes: list[_Runtime] = []
        self._io: list[Tensor] = []
        if isinstance(first, (str, os.PathLike)):
            self._dev_id = int(tpu_id or 0)
            self.load(first)
            self._alloc_tensors(mode)
        else:
            self._dev_id = first.get_device_id() if isinstance(first, Handle) else int(first)

    def _alloc_tensors(self, mode) -> None:
        handle = Handle(self._dev_id)
        for runtime in self._runtimes:
            for net in runtime.nets.values():
                for t in net.inputs + net.outputs:
                    self._io.append(Tensor(handle, list(t.shape), t.dtype, False, True))
                    device(self._dev_id).model += self._io[-1]._nbytes

    def load(self, bmodel_path: str) -> bool:
        self._runtimes.append(_Runtime(str(bmodel_path), self._dev_id, None))
        return True

    def _net(self, graph_name: str) -> tuple[_Runtime, _NetSpec]:
        for runtime in self._runtimes:
            if graph_name in runtime.nets:
                return runtime, runtime.nets[graph_name]
        raise SailEngineError(f"no graph {graph_name}")

    def get_handle(self) -> Handle:
        return Handle(self._dev_id)

    def get_graph_names(self) -> list[str]:
        return [n for r in self._runtimes for n in r.nets]

    def get_input_names(self, graph_name: str) -> list[str]:
        return [t.name for t in self._net(graph_name)[1].inputs]

    def get_output_names(self, graph_name: str) -> list[str]:
        return [t.name for t in self._net(graph_name)[1].outputs]

    def get_input_shape(self, graph_name: str, tensor_name: str) -> list[int]:
        return list(next(t.shape for t in self._net(graph_name)[1].inputs if t.name == tensor_name))

    def get_max_input_shapes(self, graph_name: str) -> dict[str, list[int]]:
        """engine.cpp:465-497: per input, the largest of every stage's dims."""
        stages = self._net(graph_name)[1].stages
        return {t.name: [max(ins[i].shape[d] for ins, _ in stages) for d in range(len(t.shape))]
                for i, t in enumerate(stages[0][0])}

    def get_output_shape(self, graph_name: str, tensor_name: str) -> list[int]:
        return list(next(t.shape for t in self._net(graph_name)[1].outputs if t.name == tensor_name))

    def get_input_dtype(self, graph_name: str, tensor_name: str) -> Dtype:
        return next(t.dtype for t in self._net(graph_name)[1].inputs if t.name == tensor_name)

    def get_output_dtype(self, graph_name: str, tensor_name: str) -> Dtype:
        return next(t.dtype for t in self._net(graph_name)[1].outputs if t.name == tensor_name)

    def process(self, graph_name: str, input: dict, *args, core_list=()) -> None:  # noqa: A002
        """process(graph, input, output) or process(graph, input, input_shapes, output): the
        shapes given, else each input tensor's own, go to bmrt_launch_tensor_ex
        (graph.cpp:665-700, 811-829)."""
        input_shapes, output = (args[0], args[1]) if len(args) >= 2 and isinstance(args[1], dict) else (None, args[0])
        runtime, spec = self._net(graph_name)
        bound_in: list[Tensor | None] = [None] * len(spec.inputs)
        names = [t.name for t in spec.inputs]
        for name, tensor in input.items():
            bound_in[names.index(name) if name in names else 0] = tensor  # graph.cpp:274
        bound_out: list[Tensor | None] = [None] * len(spec.outputs)
        out_names = [t.name for t in spec.outputs]
        for name, tensor in output.items():
            bound_out[out_names.index(name) if name in out_names else 0] = tensor
        shapes = None
        if None not in bound_in:
            shapes = [tuple(t.shape()) for t in bound_in]
            for name, shape in (input_shapes or {}).items():
                shapes[names.index(name) if name in names else 0] = tuple(shape)
        if None in bound_in or None in bound_out or not runtime.launch(graph_name, bound_in, bound_out, shapes):
            log.error("bmrt_launch_tensor_ex() err")  # and carry on, as graph.cpp:646-648 does

    def close(self) -> None:  # not in the SDK
        for runtime in self._runtimes:
            runtime.close()
