"""One interface over the three places a net can run: the BM1684X (sail), its
simulator (cmodel) and onnxruntime on the CPU.

Nets are addressed by name; inputs by name; outputs by position (a bmodel
renames its outputs after the last op that made them, so only the order is
stable). Buffers that stay on the backend between calls, the KV caches and
hidden states, are named *resident* buffers: a feed may be a `Resident`
instead of an array, and an output may be stored into one instead of
coming back, so a device backend never copies the cache to the host.
A host array that every layer of a step reads (positions, masks) is
`upload`ed into a resident buffer once and fed as a `Resident`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from lvb.contract import BF16, NetInfo
from lvb.errors import LvbError
from lvb.dtypes import from_bf16_bits, to_bf16_bits


class EngineError(LvbError, RuntimeError):
    """A backend that cannot load or run; the message names the net or file."""


@dataclass(frozen=True)
class Resident:
    """A buffer that lives in the engine. As a feed: rows [start, start+count) of
    axis 1 (all rows when count is None). As a store target: where an output's
    first `count` rows along axis 1 are written."""

    buffer: str
    start: int = 0
    count: int | None = None


class Engine(ABC):
    backend: str
    # Where the logits already are: on the host (onnxruntime, the simulator's worker),
    # picking the token there saves a net call; on a device, the greedy head saves
    # copying the logits out.
    logits_on_host: bool = True

    @property
    @abstractmethod
    def nets(self) -> dict[str, NetInfo]: ...

    @abstractmethod
    def allocate(self, buffer: str, shape: tuple[int, ...], dtype: str = "float32") -> None:
        """Create (or reset to zeros) a resident buffer: float32, int32, or bfloat16 (contract.BF16),
        which a backend holds in two bytes and gives and takes as float32 values."""

    @abstractmethod
    def read(self, buffer: str) -> np.ndarray: ...

    @abstractmethod
    def upload(self, buffer: str, array: np.ndarray) -> None:
        """Write a host array (as many elements as the buffer) into a resident buffer, so that
        many nets can read it without crossing to the device again."""

    @abstractmethod
    def run(
        self,
        net: str,
        feeds: Mapping[str, np.ndarray | Resident],
        store: Mapping[int, Resident] | None = None,
    ) -> list[np.ndarray | None]:
        """Run one net; outputs in order, None for those written to a resident buffer."""

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class HostBuffers:
    """Resident buffers kept as numpy arrays, for the backends that run on the host
    (onnxruntime, and the simulator's worker process). A bfloat16 buffer holds its bf16 bits
    (uint16), as the device does: half the bytes, and a net with bf16 I/O reads and writes
    them without a conversion. Values go in and come out as float32 (numpy has no bfloat16)."""

    def __init__(self):
        self.buffers: dict[str, np.ndarray] = {}
        self.bf16: set[str] = set()

    def allocate(self, buffer: str, shape, dtype: str = "float32") -> None:
        if dtype == BF16:
            self.buffers[buffer] = np.zeros(tuple(shape), dtype=np.uint16)
            self.bf16.add(buffer)
        else:
            self.buffers[buffer] = np.zeros(tuple(shape), dtype=dtype)
            self.bf16.discard(buffer)

    def read(self, buffer: str) -> np.ndarray:
        data = self.buffers[buffer]
        return from_bf16_bits(data) if buffer in self.bf16 else data.copy()

    def upload(self, buffer: str, array: np.ndarray) -> None:
        data = self.buffers[buffer]
        array = np.asarray(array)
        if array.size != data.size:
            raise ValueError(f"buffer {buffer} is {list(data.shape)}, got an array of {list(array.shape)}")
        data[...] = (to_bf16_bits(array) if buffer in self.bf16 else array).reshape(data.shape)

    def resolve_raw(self, value) -> tuple[np.ndarray, bool]:
        """(the array a feed names, True when it is bf16 bits)."""
        if not isinstance(value, Resident):
            return value, False
        data = self.buffers[value.buffer]
        if not (value.start == 0 and value.count is None):
            stop = data.shape[1] if value.count is None else value.start + value.count
            data = data[:, value.start : stop]
        return data, value.buffer in self.bf16

    def resolve(self, value) -> np.ndarray:
        """The values a feed names (float32 for a bf16 buffer)."""
        data, bits = self.resolve_raw(value)
        return from_bf16_bits(data) if bits else data

    def store(self, output: np.ndarray, target: Resident, bf16_bits: bool = False) -> None:
        """Write an output (bf16 bits when `bf16_bits`, else values) into a buffer's rows."""
        data = self.buffers[target.buffer]
        count = output.shape[1] if target.count is None else target.count
        rows = output[:, :count]
        if target.buffer in self.bf16:
            rows = rows if bf16_bits else to_bf16_bits(rows)
        elif bf16_bits:
            rows = from_bf16_bits(rows)
        data[:, target.start : target.start + count] = rows.astype(data.dtype, copy=False)
