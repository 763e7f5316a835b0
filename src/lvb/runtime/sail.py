"""The BM1684X itself as an Engine, through Sophgo's sophon.sail.

The bmodel is loaded once with device-side I/O (IOMode.DEVIO), and every net
runs on sail.Tensors this engine owns. Resident buffers are device tensors:
a whole-buffer feed is bound as the net's input as it is, a row slice is
copied device to device, and stored outputs are copied (or, for a whole
buffer that no input of the same run uses, bound) device to device, so the
KV caches never leave the device. Only numpy feeds, returned outputs and
`read` cross to the host.

Written against sophon-sail's Python docs (docs/source_en/module_python:
sail.Engine, sail.Tensor, sail.Handle, 0_enum_type/sail.IOMode, sail.Dtype;
the 16-bit members of sail.Dtype are listed in docs/source_zh). Comments
marked "not documented" are what the SDK source or Sophgo's demos do and the
docs do not say.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lvb.contract import NetInfo, TensorInfo
from lvb.numerics import from_bf16_bits, to_bf16_bits
from lvb.runtime.engine import Engine, EngineError, Resident

# sail.Dtype member -> (numpy dtype of its bytes, numpy dtype callers give and get).
_KINDS = {
    "BM_FLOAT32": ("float32", "float32"),
    "BM_FLOAT16": ("float16", "float32"),
    "BM_BFLOAT16": ("uint16", "float32"),  # numpy has no bfloat16: the bits as uint16
    "BM_INT32": ("int32", "int32"),
    "BM_UINT32": ("uint32", "uint32"),
    "BM_INT16": ("int16", "int16"),
    "BM_UINT16": ("uint16", "uint16"),
    "BM_INT8": ("int8", "int8"),
    "BM_UINT8": ("uint8", "uint8"),
}
# Resident buffers hold what `allocate` names; these are the numpy names sail can hold.
_BUFFER_KINDS = {"float32": "BM_FLOAT32", "float16": "BM_FLOAT16", "int32": "BM_INT32", "uint32": "BM_UINT32",
                 "int16": "BM_INT16", "uint16": "BM_UINT16", "int8": "BM_INT8", "uint8": "BM_UINT8"}


@dataclass(frozen=True)
class _Kind:
    name: str  # of the sail.Dtype member
    dtype: Any  # the sail.Dtype member
    raw: np.dtype
    host: np.dtype

    def encode(self, x: np.ndarray) -> np.ndarray:
        if self.name == "BM_BFLOAT16":
            return to_bf16_bits(x)
        if self.name == "BM_FLOAT16":  # update_data takes float16 as a uint16 view (sail.Tensor.rst)
            return np.ascontiguousarray(x, dtype=np.float16).view(np.uint16)
        return np.ascontiguousarray(x, dtype=self.raw)

    def decode(self, raw: np.ndarray) -> np.ndarray:
        # asnumpy is documented for float32/int8/uint8 only; not documented: the SDK returns the
        # bits of 16-bit tensors as uint16 (and uint32 as int32), so reinterpret by the byte layout.
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
    def rows(self) -> int:
        return self.shape[1] if len(self.shape) > 1 else 1

    def span(self, start: int, count: int) -> tuple[int, int]:
        """(offset, length) in elements of rows [start, start+count) along axis 1: one
        contiguous range when axis 0 is 1. sync_d2d counts elements, not bytes."""
        if start == 0 and count == self.rows:
            return 0, math.prod(self.shape)
        if len(self.shape) < 2 or self.shape[0] != 1 or start < 0 or start + count > self.rows:
            raise ValueError(f"rows [{start}, {start + count}) of a {list(self.shape)} tensor")
        row = math.prod(self.shape[2:])
        return start * row, count * row


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
        self._sail = sail
        self._kinds = {name: _Kind(name, getattr(sail.Dtype, name), np.dtype(raw), np.dtype(host))
                       for name, (raw, host) in _KINDS.items() if hasattr(sail.Dtype, name)}
        try:
            self._engine = sail.Engine(str(bmodel), device_id, sail.IOMode.DEVIO)
            self._handle = self._engine.get_handle()
            graphs = list(self._engine.get_graph_names())
        except Exception as e:
            raise EngineError(f"{bmodel}: sail could not load it on device {device_id}: {e}") from e
        self._slots: dict[str, dict[str, _Slot]] = {}  # per net, its tensors' kinds and shapes; created lazily
        self._io: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}
        self._nets = {name: self._describe(name) for name in graphs}
        self._buffers: dict[str, _Slot] = {}

    def _describe(self, net: str) -> NetInfo:
        engine = self._engine
        try:
            inputs = tuple(engine.get_input_names(net))
            outputs = tuple(engine.get_output_names(net))  # not documented: listed in the net's output order
            specs = {f"in:{n}": (engine.get_input_shape(net, n), engine.get_input_dtype(net, n)) for n in inputs}
            specs |= {f"out:{n}": (engine.get_output_shape(net, n), engine.get_output_dtype(net, n)) for n in outputs}
        except Exception as e:
            raise EngineError(f"sail: cannot describe net {net}: {e}") from e
        self._io[net] = (inputs, outputs)
        self._slots[net] = {}
        for key, (shape, dtype) in specs.items():
            kind = next((k for k in self._kinds.values() if k.dtype == dtype), None)
            if kind is None:
                raise EngineError(f"net {net}: {key.replace(':', 'put ')} has dtype {dtype}, which lvb cannot convert")
            self._slots[net][key] = _Slot(None, tuple(int(d) for d in shape), kind)

        def info(key: str) -> TensorInfo:
            slot = self._slots[net][key]
            return TensorInfo(key.split(":", 1)[1], slot.shape, slot.kind.host.name)

        return NetInfo(net, tuple(info(f"in:{n}") for n in inputs), tuple(info(f"out:{n}") for n in outputs))

    @property
    def nets(self) -> dict[str, NetInfo]:
        return self._nets

    # -- device memory ---------------------------------------------------------

    def _tensor(self, shape: tuple[int, ...], kind: _Kind):
        # own_sys_data and own_dev_data: device memory that the net uses, plus the host mirror
        # that update_data/sync_s2d and sync_d2s/asnumpy go through.
        return self._sail.Tensor(self._handle, list(shape), kind.dtype, True, True)

    def _own(self, net: str, key: str) -> _Slot:
        """The net's own tensor for an input or output, made on first use: inputs fed whole
        from a buffer never need one."""
        slot = self._slots[net][key]
        if slot.tensor is None:
            slot.tensor = self._tensor(slot.shape, slot.kind)
        return slot

    @staticmethod
    def _to_host(slot: _Slot) -> np.ndarray:
        slot.tensor.sync_d2s()
        raw = slot.tensor.asnumpy()
        if raw is None:  # older SDKs return None for the 16-bit dtypes
            raise EngineError(f"this sophon.sail cannot read {slot.kind.name} tensors; update the SDK")
        return slot.kind.decode(raw).reshape(slot.shape)

    @staticmethod
    def _to_device(slot: _Slot, array: np.ndarray) -> None:
        slot.tensor.update_data(slot.kind.encode(array).reshape(slot.shape))
        slot.tensor.sync_s2d()

    def _copy(self, src: _Slot, src_span: tuple[int, int], dst: _Slot, dst_span: tuple[int, int]) -> None:
        """Copy elements [offset, offset+length) of src into dst at its offset."""
        (src_offset, length), (dst_offset, dst_length) = src_span, dst_span
        if length != dst_length:
            raise ValueError(f"{length} elements of a {list(src.shape)} tensor do not fit {dst_length} of a "
                             f"{list(dst.shape)} one")
        if length == 0:
            return
        if src.kind.name == dst.kind.name:
            # sync_d2d checks dtypes and bounds by exiting the process, hence the checks before it.
            dst.tensor.sync_d2d(src.tensor, src_offset, dst_offset, length)
            return
        # Different dtypes (a bf16 net, a float32 buffer): convert through the host.
        values = self._to_host(src).reshape(-1)[src_offset : src_offset + length]
        whole = values if length == math.prod(dst.shape) else self._to_host(dst).reshape(-1)
        whole[dst_offset : dst_offset + length] = values
        self._to_device(dst, whole)

    # -- Engine ----------------------------------------------------------------

    def allocate(self, buffer: str, shape: tuple[int, ...], dtype: str = "float32") -> None:
        try:
            name = _BUFFER_KINDS.get(np.dtype(dtype).name)
        except TypeError:
            name = None
        if name not in self._kinds:
            raise EngineError(f"buffer {buffer}: sail cannot hold {dtype}")
        kind = _Kind(name, self._kinds[name].dtype, self._kinds[name].raw, np.dtype(dtype))
        shape = tuple(int(d) for d in shape)
        slot = self._buffers.get(buffer)
        try:
            if slot is None or slot.shape != shape or slot.kind != kind:
                self._buffers[buffer] = slot = _Slot(self._tensor(shape, kind), shape, kind)
            slot.tensor.zeros()
        except Exception as e:
            raise EngineError(f"sail: cannot allocate buffer {buffer} {list(shape)} {dtype}: {e}") from e

    def _buffer(self, name: str) -> _Slot:
        if name not in self._buffers:
            raise EngineError(f"no resident buffer {name!r}; allocate it first")
        return self._buffers[name]

    def read(self, buffer: str) -> np.ndarray:
        slot = self._buffer(buffer)
        try:
            return self._to_host(slot)
        except EngineError:
            raise
        except Exception as e:
            raise EngineError(f"sail: cannot read buffer {buffer}: {e}") from e

    def run(self, net: str, feeds: Mapping[str, np.ndarray | Resident], store: Mapping[int, Resident] | None = None):
        if self._engine is None:
            raise EngineError("the sail engine is closed")
        if net not in self._nets:
            raise EngineError(f"the bmodel has no net {net!r}; it has {', '.join(sorted(self._nets))}")
        store = store or {}
        input_names, output_names = self._io[net]
        try:
            bound: set[str] = set()  # buffers bound as inputs: an output must not write them in place
            inputs = {name: self._feed(net, name, feeds, bound) for name in input_names}
            targets = [t.buffer for t in store.values()]
            outputs, in_place = {}, set()
            for index, name in enumerate(output_names):
                target, slot = store.get(index), self._slots[net][f"out:{name}"]
                buffer = self._buffer(target.buffer) if target else None
                if (buffer is not None and target.buffer not in bound and targets.count(target.buffer) == 1
                        and target.start == 0 and target.count in (None, buffer.rows) and buffer.shape == slot.shape
                        and buffer.kind.name == slot.kind.name):
                    outputs[name] = buffer.tensor  # the net writes the whole buffer itself
                    in_place.add(index)
                else:
                    outputs[name] = self._own(net, f"out:{name}").tensor
            # Not documented: process returns once the net has finished on the device.
            self._engine.process(net, inputs, outputs)
            result: list[np.ndarray | None] = []
            for index, name in enumerate(output_names):
                target, slot = store.get(index), self._slots[net][f"out:{name}"]
                if target is None:
                    result.append(self._to_host(slot))
                    continue
                if index not in in_place:
                    buffer, size = self._buffer(target.buffer), math.prod(slot.shape)
                    if target.start == 0 and target.count is None and size == math.prod(buffer.shape):
                        self._copy(slot, (0, size), buffer, (0, size))  # all of it, whatever the shapes
                    else:
                        count = slot.rows if target.count is None else target.count
                        self._copy(slot, slot.span(0, count), buffer, buffer.span(target.start, count))
                result.append(None)
            return result
        except Exception as e:
            raise EngineError(f"sail: net {net}: {e}") from e

    def _feed(self, net: str, name: str, feeds: Mapping[str, np.ndarray | Resident], bound: set[str]):
        if name not in feeds:
            raise ValueError(f"no feed for input {name}")
        value, spec = feeds[name], self._slots[net][f"in:{name}"]
        if isinstance(value, Resident):
            buffer = self._buffer(value.buffer)
            count = buffer.rows - value.start if value.count is None else value.count
            if (value.start == 0 and count == buffer.rows and buffer.shape == spec.shape
                    and buffer.kind.name == spec.kind.name):
                bound.add(value.buffer)
                return buffer.tensor  # process takes "input tensors managed by user" (sail.Engine.rst)
            slot = self._own(net, f"in:{name}")
            self._copy(buffer, buffer.span(value.start, count), slot, (0, math.prod(slot.shape)))
            return slot.tensor
        array = np.asarray(value)
        if array.size != math.prod(spec.shape):
            raise ValueError(f"input {name} is {list(spec.shape)}, got an array of {list(array.shape)}")
        slot = self._own(net, f"in:{name}")
        self._to_device(slot, array)
        return slot.tensor

    def close(self) -> None:
        # sail frees device memory when its Tensors and Engine are collected.
        self._buffers.clear()
        self._slots.clear()
        self._engine = None
