"""Messages with numpy arrays between lvb and its simulator worker.

The worker runs in tpu-mlir's Python 3.10 with numpy 1.24 while lvb may run
numpy 2, whose pickles the old numpy cannot read; so a message is a JSON
header (arrays replaced by {"$array": i}) followed by the arrays' raw bytes.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO

import numpy as np

_LENGTH = struct.Struct("<Q")


def _strip(value: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(value, np.ndarray):
        arrays.append(np.ascontiguousarray(value))
        return {"$array": len(arrays) - 1}
    if isinstance(value, dict):
        return {k: _strip(v, arrays) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strip(v, arrays) for v in value]
    return value


def _fill(value: Any, arrays: list[np.ndarray]) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$array"}:
            return arrays[value["$array"]]
        return {k: _fill(v, arrays) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, arrays) for v in value]
    return value


def send(stream: BinaryIO, message: Any) -> None:
    arrays: list[np.ndarray] = []
    body = _strip(message, arrays)
    header = json.dumps(
        {"body": body, "arrays": [{"dtype": a.dtype.str, "shape": list(a.shape)} for a in arrays]}
    ).encode()
    stream.write(_LENGTH.pack(len(header)) + header)
    for a in arrays:
        stream.write(memoryview(a).cast("B") if a.size else b"")
    stream.flush()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            raise EOFError("the other side closed the pipe")
        data += chunk
    return bytes(data)


def receive(stream: BinaryIO) -> Any:
    (length,) = _LENGTH.unpack(_read_exact(stream, _LENGTH.size))
    header = json.loads(_read_exact(stream, length))
    arrays = []
    for meta in header["arrays"]:
        dtype = np.dtype(meta["dtype"])
        count = int(np.prod(meta["shape"], dtype=np.int64))
        raw = _read_exact(stream, count * dtype.itemsize)
        arrays.append(np.frombuffer(raw, dtype=dtype).reshape(meta["shape"]).copy())
    return _fill(header["body"], arrays)
