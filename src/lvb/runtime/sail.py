"""The BM1684X itself as an Engine, through Sophgo's sophon.sail.

Why `sail.EngineLLM(path, BmrtFlag.BM_RUNTIME_SHARE_MEM, [dev])` and not `sail.Engine`
(read from sophgo/sophon-sail v3.10.7 and libsophon's tpu-runtime):
- `sail.Engine(path, dev, IOMode.DEVIO)` allocates a device tensor for every input and
  output of every graph at load (engine.cpp:645-660 -> Engine_CC::alloc_tensors,
  engine.cpp:313-330 -> Graph_CC::alloc_tensors, graph.cpp:554-592), which lvb never
  uses: for the 11B plan several times lvb's own buffers (bench/README.md, memory_plan.py).
  EngineLLM allocates none for a bmodel without io_alone (engine_llm.cpp:836-862; GraphLLM
  only wraps bmruntime's own I/O memory when addr_mode is 1).
- `Engine.process` only logs a failed launch (graph.cpp:646-648) and returns: the outputs
  keep their old contents and the answer goes on with them. `EngineLLM.process` raises
  (GraphLLM::inference returns SAIL_ERR_ENGINE_INFER, engine_llm.cpp:420-445, and
  EngineLLM_CC::process throws it with SAIL_CHECK_RET, engine_llm.cpp:1024-1032).
- `Engine.process` binds tensors by name, and an unknown name lands on input 0
  (std::map operator[] in graph.cpp:274). EngineLLM binds by index; lvb checks the
  names against the net before it builds the indices.
- Activation (neuron) memory: bmruntime turns BM_RUNTIME_SHARE_MEM on by itself on a
  one-core chip such as the BM1684X (bmruntime.cpp:296-300) and then sizes one neuron
  buffer for the largest net, shared by all (bmruntime_bmodel.cpp:923-940; a net split
  into several subnets owns its own). Passing the flag explicitly, as LLM-TPU's chat.cpp
  does with bmrt_set_flags, keeps that true on multi-core chips too.

Data movement (what sophon-demo's llama3.py `forward_next` does, and no more):
- resident buffers (KV caches, cross K/V, hidden states, per-step masks) are device
  tensors without a host mirror; a net binds them directly, or a view of their rows
  (`sail.Tensor(src, shape, offset)`, bind.cpp:297-300, tensor.cpp:756-800, since
  v3.9.1), so a KV row is written in place and the LM head reads the last prompt
  row where it is; older SDKs, and a partial last prefill chunk, fall back to a
  d2d copy;
- inputs given as numpy arrays and outputs coming back go through scratch tensors
  shared by every net with that shape and dtype;
- `upload` writes a host array into a resident buffer once (update_data straight to the
  device, tensor.cpp:1766-1776), and every layer of the step binds it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lvb.contract import NetInfo, TensorInfo
from lvb.dtypes import BF16, BY_NAME, DTYPES, from_bf16_bits, to_bf16_bits
from lvb.runtime.engine import Engine, EngineError, Resident



@dataclass(frozen=True)
class _Kind:
    name: str  # of the sail.Dtype member
    dtype: Any  # the sail.Dtype member
    raw: np.dtype
    host: np.dtype

    def encode(self, x: np.ndarray) -> np.ndarray:
        if self.name == "BM_BFLOAT16":
            return to_bf16_bits(x)
        if self.name == "BM_FLOAT16":  # update_data takes float16 as uint16 bits (bind.cpp:316)
            return np.ascontiguousarray(x, dtype=np.float16).view(np.uint16)
        return np.ascontiguousarray(x, dtype=self.raw)

    def decode(self, raw: np.ndarray) -> np.ndarray:
        # asnumpy returns the bits of 16-bit tensors as uint16: reinterpret by the byte layout.
        data = np.ascontiguousarray(raw).view(self.raw)
        if self.name == "BM_BFLOAT16":
            return from_bf16_bits(data)
        return data.astype(self.host)  # a copy, even when the dtype is the same


@dataclass
class _Slot:
    """A device tensor with the shape and kind this engine created it with."""

    tensor: Any  # sail.Tensor
    shape: tuple[int, ...]
    kind: _Kind

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def dtype(self) -> str:
        """The dtype the engine declares the tensor in (NetInfo, allocate)."""
        return BF16 if self.kind.name == "BM_BFLOAT16" else self.kind.host.name

    @property
    def rows(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1

    @property
    def row(self) -> int:
        return math.prod(self.shape[2:])

    def span(self, start: int, count: int) -> tuple[int, int]:
        """(offset, length) in elements of rows [start, start+count) along axis 1: one
        contiguous range when axis 0 is 1. sync_d2d and views count elements, not bytes."""
        if start == 0 and count == self.rows:
            return 0, self.size
        if len(self.shape) < 2 or self.shape[0] != 1 or start < 0 or start + count > self.rows:
            raise EngineError(f"rows [{start}, {start + count}) of a {list(self.shape)} tensor")
        return start * self.row, count * self.row


def sdk_version() -> str | None:
    try:
        import sophon.sail as sail
    except ImportError:
        return None
    return str(getattr(sail, "__version__", "unknown"))


def device_target(device_id: int = 0) -> str | None:
    """The chip behind a device id (sail.Handle.get_target, bind.cpp:285), or None."""
    try:
        import sophon.sail as sail

        return str(sail.Handle(device_id).get_target())
    except Exception:
        return None


def device_memory(device_id: int = 0) -> tuple[int, int] | None:
    """(total, free) bytes of a device, from sail.get_dev_stat (tensor.cpp:73-91: bmlib's
    bm_get_stat, summed over every heap in MiB, bmlib_runtime.cpp:1333-1355); None when
    sophon.sail is missing or does not expose it."""
    try:
        import sophon.sail as sail

        total, used, _ = sail.get_dev_stat(device_id)
    except Exception:
        return None
    return int(total) << 20, (int(total) - int(used)) << 20


class SailEngine(Engine):
    backend = "sail"
    logits_on_host = False

    def __init__(self, bmodel: str | Path, device_id: int = 0):
        try:
            import sophon.sail as sail
        except ImportError as e:
            raise EngineError("the sail backend needs sophon.sail (Sophgo's SDK on the device); "
                              "use --backend cmodel or onnxruntime here") from e
        bmodel = Path(bmodel)
        if not bmodel.is_file():
            raise EngineError(f"{bmodel}: no such bmodel; run `lvb compile` first")
        if not hasattr(sail, "EngineLLM"):
            raise EngineError(f"sophon.sail {sdk_version()} has no EngineLLM, which lvb needs to notice failed "
                              "launches; install sophon-sail 3.8 or later")
        self._sail, self._device_id = sail, device_id
        self._kinds = {d.sail: _Kind(d.sail, getattr(sail.Dtype, d.sail), np.dtype(d.raw), np.dtype(d.host))
                       for d in DTYPES if hasattr(sail.Dtype, d.sail)}
        try:
            if hasattr(sail, "BmrtFlag"):  # bind.cpp:400-402, built with SAIL_WITH_BMRT_FLAG
                self._engine = sail.EngineLLM(str(bmodel), sail.BmrtFlag.BM_RUNTIME_SHARE_MEM, [device_id])
            else:
                self._engine = sail.EngineLLM(str(bmodel), [device_id])
            self._handle = sail.Handle(device_id)
            graphs = list(self._engine.get_graph_names())
        except Exception as e:
            raise EngineError(f"{bmodel}: sail could not load it on device {device_id}: {e}") from e
        # net -> (input names, [(input slots, output slots) per stage, largest first])
        self._specs: dict[str, tuple[tuple[str, ...], list[tuple[tuple[_Slot, ...], tuple[_Slot, ...]]]]] = {}
        self._nets = {name: self._describe(name) for name in graphs}
        self._buffers: dict[str, _Slot] = {}
        self._scratch: dict[tuple, _Slot] = {}  # (shape, kind, n): shared by every net
        self._scratch_views: dict[tuple, _Slot] = {}  # (shape, kind, n, stage shape): a smaller stage's
        self._views: dict[tuple, Any] = {}  # (buffer, offset, shape): sail.Tensor views
        self._has_views = True  # until the SDK says otherwise (Tensor(src, shape, offset) since v3.9.1)
        # What this engine launched, (net, stage) -> calls: the stage the bound shapes chose.
        self.stage_launches: Counter[tuple[str, int]] = Counter()

    def _describe(self, net: str) -> NetInfo:
        """The net's tensors at every stage (EngineLLM.get_stage_num, get_input_shape(net, i, stage):
        bind.cpp:409-457); stage 0 is the largest, as lvb compiles them."""
        engine = self._engine
        try:
            names = tuple(engine.get_input_names(net))
            output_count = int(engine.get_output_num(net))
            output_names = tuple(engine.get_output_names(net))
            dtypes = [engine.get_input_dtype(net, i) for i in range(len(names))]
            dtypes += [engine.get_output_dtype(net, i) for i in range(output_count)]
            stage_count = int(engine.get_stage_num(net)) if hasattr(engine, "get_stage_num") else 1
            shapes = []
            for stage in range(stage_count):
                extra = (stage,) if stage else ()  # SDKs before per-stage queries take no stage
                shapes.append([engine.get_input_shape(net, i, *extra) for i in range(len(names))]
                              + [engine.get_output_shape(net, i, *extra) for i in range(output_count)])
        except Exception as e:
            raise EngineError(f"sail: cannot describe net {net}: {e}") from e
        kinds = []
        for index, dtype in enumerate(dtypes):
            kind = next((k for k in self._kinds.values() if k.dtype == dtype), None)
            if kind is None:
                role = f"input {names[index]}" if index < len(names) else f"output {index - len(names)}"
                raise EngineError(f"net {net}: {role} has dtype {dtype}, which lvb cannot convert")
            kinds.append(kind)
        stages = []
        for stage_shapes in shapes:
            slots = [_Slot(None, tuple(int(d) for d in shape), kind) for shape, kind in zip(stage_shapes, kinds)]
            stages.append((tuple(slots[: len(names)]), tuple(slots[len(names) :])))
        self._specs[net] = (names, stages)
        (inputs, outputs), smaller = stages[0], stages[1:]
        return NetInfo(net, tuple(TensorInfo(n, s.shape, s.dtype) for n, s in zip(names, inputs)),
                       tuple(TensorInfo(n, s.shape, s.dtype) for n, s in zip(output_names, outputs)),
                       tuple(tuple(TensorInfo(n, s.shape, s.dtype) for n, s in zip(names, ins)) for ins, _ in smaller))

    @property
    def nets(self) -> dict[str, NetInfo]:
        return self._nets

    # -- device memory ---------------------------------------------------------

    def _tensor(self, shape: tuple[int, ...], kind: _Kind, host: bool):
        # sail.Tensor(handle, shape, dtype, own_sys_data, own_dev_data); device memory is zero-filled
        # (tensor.cpp:706-719). Resident buffers need no host mirror: update_data writes to the device.
        return self._sail.Tensor(self._handle, list(shape), kind.dtype, host, True)

    def _scratch_for(self, shape: tuple[int, ...], kind: _Kind, taken: Counter,
                     stage_shape: tuple[int, ...] | None = None) -> _Slot:
        """A tensor with a host mirror, shared by every net: the n-th one of this shape and
        kind in one run, so two inputs of one net never share. `shape` is the tensor's at the
        net's largest stage; a smaller stage (`stage_shape`) gets a view of its start, whose host
        mirror is the same memory (tensor.cpp:756-800), so the stages cost no device memory."""
        key = (shape, kind.name)
        n = taken[key]
        taken[key] += 1
        slot = self._scratch.get((*key, n))
        if slot is None:
            try:
                slot = self._scratch[(*key, n)] = _Slot(self._tensor(shape, kind, True), shape, kind)
            except Exception as e:
                raise EngineError(f"sail: cannot allocate a {list(shape)} {kind.name} tensor: {e}") from e
        if stage_shape is None or stage_shape == shape:
            return slot
        view_key = (*key, n, stage_shape)
        view = self._scratch_views.get(view_key)
        if view is None:
            tensor = None
            if self._has_views:
                try:
                    tensor = self._sail.Tensor(slot.tensor, list(stage_shape), 0)
                except TypeError:  # before v3.9.1: no views, a tensor of the stage's own
                    self._has_views = False
            if tensor is None:
                return self._scratch_for(stage_shape, kind, taken)
            view = self._scratch_views[view_key] = _Slot(tensor, stage_shape, kind)
        return view

    def _view(self, buffer: str, slot: _Slot, offset: int, shape: tuple[int, ...]):
        """Elements [offset, offset+prod(shape)) of a buffer as a tensor of `shape`, without a
        copy; None when this SDK has no views."""
        if offset == 0 and shape == slot.shape:
            return slot.tensor
        if not self._has_views:
            return None
        key = (buffer, offset, shape)
        view = self._views.get(key)
        if view is None:
            try:
                view = self._views[key] = self._sail.Tensor(slot.tensor, list(shape), offset)
            except TypeError:  # before v3.9.1 there is no such constructor
                self._has_views = False
                return None
        return view

    @staticmethod
    def _to_host(slot: _Slot) -> np.ndarray:
        slot.tensor.sync_d2s()
        raw = slot.tensor.asnumpy()
        if raw is None:  # older SDKs return None for the 16-bit dtypes
            raise EngineError(f"this sophon.sail cannot read {slot.kind.name} tensors; update the SDK")
        return slot.kind.decode(raw).reshape(slot.shape)

    @staticmethod
    def _to_device(slot: _Slot, array: np.ndarray) -> None:
        # update_data wants exactly the tensor's dimensions (tensor.cpp:1641-1665).
        slot.tensor.update_data(slot.kind.encode(array).reshape(slot.shape))
        slot.tensor.sync_s2d()  # a no-op for a tensor without host memory: update_data wrote the device

    def _copy(self, src: _Slot, src_span: tuple[int, int], dst: _Slot, dst_span: tuple[int, int]) -> None:
        """Copy elements [offset, offset+length) of src into dst at its offset."""
        (src_offset, length), (dst_offset, dst_length) = src_span, dst_span
        if length != dst_length:
            raise EngineError(f"{length} elements of a {list(src.shape)} tensor do not fit {dst_length} of a "
                              f"{list(dst.shape)} one")
        if length == 0:
            return
        if src.kind.name == dst.kind.name:
            dst.tensor.sync_d2d(src.tensor, src_offset, dst_offset, length)  # elements (tensor.cpp:1060-1094)
            return
        # Different dtypes (a bf16 net, a float32 buffer): convert through the host.
        values = self._host_copy(src).reshape(-1)[src_offset : src_offset + length]
        whole = values if length == dst.size else self._host_copy(dst).reshape(-1)
        whole[dst_offset : dst_offset + length] = values
        self._write(dst, whole)

    def _host_copy(self, slot: _Slot) -> np.ndarray:
        """A slot's values on the host, through a scratch tensor when it has no host mirror."""
        mirror = self._scratch_for(slot.shape, slot.kind, Counter({(slot.shape, slot.kind.name): 1}))
        if mirror.tensor is not slot.tensor:
            mirror.tensor.sync_d2d(slot.tensor, 0, 0, slot.size)
        return self._to_host(mirror)

    def _write(self, slot: _Slot, array: np.ndarray) -> None:
        slot.tensor.update_data(slot.kind.encode(array).reshape(slot.shape))
        slot.tensor.sync_s2d()

    # -- Engine ----------------------------------------------------------------

    def allocate(self, buffer: str, shape: tuple[int, ...], dtype: str = "float32") -> None:
        # Resident buffers hold numpy's dtypes, and bf16 (on the device as bf16, given and read as float32).
        try:
            known = BY_NAME.get(dtype if dtype == BF16 else np.dtype(dtype).name)
        except TypeError:
            known = None
        name = known.sail if known else None
        if name not in self._kinds:
            raise EngineError(f"buffer {buffer}: sail cannot hold {dtype}")
        known = self._kinds[name]
        kind = known if dtype == BF16 else _Kind(name, known.dtype, known.raw, np.dtype(dtype))
        shape = tuple(int(d) for d in shape)
        slot = self._buffers.get(buffer)
        try:
            if slot is None or slot.shape != shape or slot.kind != kind:
                self._views = {k: v for k, v in self._views.items() if k[0] != buffer}
                self._buffers.pop(buffer, None)
                self._buffers[buffer] = _Slot(self._tensor(shape, kind, False), shape, kind)  # zero-filled
            else:
                slot.tensor.zeros()
        except Exception as e:
            raise EngineError(f"sail: cannot allocate buffer {buffer} {list(shape)} {dtype}: {e}") from e

    def _buffer(self, name: str) -> _Slot:
        if name not in self._buffers:
            raise EngineError(f"no resident buffer {name!r}; allocate it first")
        return self._buffers[name]

    def upload(self, buffer: str, array: np.ndarray, slot: int | None = None) -> None:
        if slot is not None:
            raise EngineError("sail: batched decode (a buffer's slots) is not supported on the device yet; "
                              "export with --batch 1, or serve batches on onnxruntime or the simulator")
        slot = self._buffer(buffer)
        array = np.asarray(array)
        if array.size != slot.size:
            raise EngineError(f"buffer {buffer} is {list(slot.shape)}, got an array of {list(array.shape)}")
        try:
            self._write(slot, array)
        except Exception as e:
            raise EngineError(f"sail: cannot upload buffer {buffer}: {e}") from e

    def read(self, buffer: str) -> np.ndarray:
        slot = self._buffer(buffer)
        try:
            return self._host_copy(slot)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"sail: cannot read buffer {buffer}: {e}") from e

    def run(self, net: str, feeds: Mapping[str, np.ndarray | Resident], store: Mapping[int, Resident] | None = None):
        if self._engine is None:
            raise EngineError("the sail engine is closed")
        if net not in self._nets:
            raise EngineError(f"the bmodel has no net {net!r}; it has {', '.join(sorted(self._nets))}")
        names, stages = self._specs[net]
        unknown = sorted(set(feeds) - set(names))
        if unknown:  # sail.Engine would have written it over input 0 (graph.cpp:274)
            raise EngineError(f"net {net} has no input {unknown[0]}; its inputs are {', '.join(names)}")
        missing = [n for n in names if n not in feeds]
        if missing:
            raise EngineError(f"net {net}: no feed for input {missing[0]}")
        store = dict(store or {})
        if any(isinstance(r, Resident) and (r.slot or r.slots is not None or r.starts is not None)
               for r in (*feeds.values(), *store.values())):
            raise EngineError("sail: batched decode (a buffer's slots) is not supported on the device yet; "
                              "export with --batch 1, or serve batches on onnxruntime or the simulator")
        largest_inputs, largest_outputs = stages[0]
        if any(not 0 <= index < len(largest_outputs) for index in store):
            raise EngineError(f"net {net} has {len(largest_outputs)} outputs; cannot store output {max(store)}")
        try:
            stage = self._stage(names, stages, feeds)
            self.stage_launches[net, stage] += 1
            input_slots, output_slots = stages[stage]
            taken: Counter = Counter()
            bound: set[str] = set()  # buffers bound as inputs: an output must not write them in place
            inputs = {i: self._feed(name, feeds[name], spec, largest, taken, bound)
                      for i, (name, spec, largest) in enumerate(zip(names, input_slots, largest_inputs))}
            targets = Counter(t.buffer for t in store.values())
            outputs, after = {}, []  # after: (scratch, target) pairs to copy or read once the net ran
            for index, (spec, largest) in enumerate(zip(output_slots, largest_outputs)):
                target = store.get(index)
                tensor = None
                rows = target is not None and not (target.start == 0 and target.count is None)
                # A whole buffer the net also reads is never written in place (the pipeline
                # ping-pongs instead). Rows of one are: lvb's blocks write the cache rows of the
                # new tokens, which their own mask hides from the past_k they read, as
                # llama3.py's forward_next binds past_k and a view of its next row together.
                if target is not None and (rows or target.buffer not in bound) and targets[target.buffer] == 1:
                    tensor = self._bind_output(target, spec)
                if tensor is None:
                    scratch = self._scratch_for(largest.shape, spec.kind, taken, spec.shape)
                    tensor = scratch.tensor
                    after.append((index, scratch, target))
                outputs[index] = tensor
        except EngineError as e:
            raise EngineError(f"sail: net {net}: {e}") from e
        except Exception as e:
            raise EngineError(f"sail: net {net}: {type(e).__name__}: {e}") from e
        try:
            # Returns once the net has finished (bm_thread_sync, engine_llm.cpp:439); raises on a failed launch.
            self._engine.process(net, inputs, outputs)
        except Exception as e:
            raise EngineError(f"sail: net {net} failed on device {self._device_id}: {type(e).__name__}: {e}") from e
        result: list[np.ndarray | None] = [None] * len(output_slots)
        try:
            for index, scratch, target in after:
                if target is None:
                    result[index] = self._to_host(scratch)
                    continue
                buffer = self._buffer(target.buffer)
                if target.start == 0 and target.count is None and scratch.size == buffer.size:
                    self._copy(scratch, (0, scratch.size), buffer, (0, buffer.size))  # all of it, whatever the shapes
                else:
                    count = scratch.rows if target.count is None else target.count
                    self._copy(scratch, scratch.span(0, count), buffer, buffer.span(target.start, count))
        except Exception as e:
            raise EngineError(f"sail: net {net}: storing its outputs: {e}") from e
        return result

    def _stage(self, names: tuple[str, ...], stages, feeds) -> int:
        """The stage whose inputs the feeds fill (the first, largest, that fits). sail passes
        each bound tensor's own shape to bmrt_launch_tensor_ex (EngineLLM: engine_llm.cpp
        attach_io_tensor; Engine: graph.cpp:811-829), which runs a static net only at a stage
        with exactly those input shapes: so the stage is chosen by binding tensors, or views, of
        that stage's shapes, as sophon-demo's llama3.py does with sail.Tensor(buf, [1, length], 0)."""
        sizes = []
        for name in names:
            value = feeds[name]
            if isinstance(value, Resident):
                buffer = self._buffer(value.buffer)
                count = buffer.rows - value.start if value.count is None else value.count
                sizes.append(buffer.span(value.start, count)[1])
            else:
                sizes.append(np.asarray(value).size)
        for index, (inputs, _) in enumerate(stages):
            if all(size == slot.size for size, slot in zip(sizes, inputs)):
                return index
        name, size = next((n, z) for n, z, slot in zip(names, sizes, stages[0][0]) if z != slot.size)
        i = names.index(name)
        takes = " or ".join(str(list(inputs[i].shape)) for inputs, _ in stages)
        raise EngineError(f"input {name} holds {size} values; no stage of the net takes that (it takes {takes})")

    def _feed(self, name: str, value, spec: _Slot, largest: _Slot, taken: Counter, bound: set[str]):
        if isinstance(value, Resident):
            buffer = self._buffer(value.buffer)
            count = buffer.rows - value.start if value.count is None else value.count
            offset, length = buffer.span(value.start, count)
            if length != spec.size:
                raise EngineError(f"input {name} is {list(spec.shape)}, buffer {value.buffer} rows "
                                  f"[{value.start}, {value.start + count}) hold {length} elements")
            if buffer.kind.name == spec.kind.name:
                view = self._view(value.buffer, buffer, offset, spec.shape)
                if view is not None:
                    bound.add(value.buffer)
                    return view
            scratch = self._scratch_for(largest.shape, spec.kind, taken, spec.shape)
            self._copy(buffer, (offset, length), scratch, (0, spec.size))
            return scratch.tensor
        array = np.asarray(value)
        if array.size != spec.size:
            raise EngineError(f"input {name} is {list(spec.shape)}, got an array of {list(array.shape)}")
        scratch = self._scratch_for(largest.shape, spec.kind, taken, spec.shape)
        self._to_device(scratch, array)
        return scratch.tensor

    def _bind_output(self, target: Resident, spec: _Slot):
        """The buffer itself, or a view of its rows, when the net can write there directly:
        same dtype, and exactly the rows the caller asked for (a partial chunk is copied)."""
        buffer = self._buffer(target.buffer)
        if buffer.kind.name != spec.kind.name:
            return None
        if target.start == 0 and target.count is None and spec.size == buffer.size:
            return self._view(target.buffer, buffer, 0, spec.shape)
        count = spec.rows if target.count is None else target.count
        if count != spec.rows or spec.shape[0] != 1 or buffer.shape[0] != 1 or spec.row != buffer.row:
            return None
        if target.start < 0 or target.start + count > buffer.rows:
            raise EngineError(f"rows [{target.start}, {target.start + count}) of a {list(buffer.shape)} buffer")
        return self._view(target.buffer, buffer, target.start * buffer.row, spec.shape)

    def close(self) -> None:
        # sail frees device memory when its Tensors and Engine are collected.
        self._views.clear()
        self._buffers.clear()
        self._scratch_views.clear()
        self._scratch.clear()
        if self._engine is not None and hasattr(self._engine, "close"):  # the stand-in's simulator worker
            self._engine.close()
        self._engine = None
