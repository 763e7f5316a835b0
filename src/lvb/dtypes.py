"""The device's dtypes, one table: each one's name in lvb (numpy's, and `bfloat16`), in tpu-mlir
(model_tool and pyruntime: `f32`, `bf16`, ...) and in sophon.sail (`BM_FLOAT32`, ...), its bytes per
value, how its bits sit in host memory and what callers give and get; and bf16's rounding.

Every reader of a bmodel's or a net's tensors takes its names and sizes from here: the bmodel
reader, the memory plan, the sail and simulator engines, the simulator worker and the stand-in SDK.
Depends on numpy alone (the simulator worker imports it inside tpu-mlir's Python).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BF16 = "bfloat16"  # numpy has no bfloat16: lvb's name for it, its bits held as uint16


@dataclass(frozen=True)
class DeviceDtype:
    name: str  # lvb's: numpy's name, or BF16
    bytes: int  # per value on the device
    tpu_mlir: str  # model_tool's and pyruntime's short name
    sail: str  # the sophon.sail Dtype member
    raw: str  # numpy dtype of its bits in host memory
    host: str  # numpy dtype callers give and get: 16-bit floats as float32

    @property
    def declared(self) -> str:
        """The dtype an engine declares a tensor of this kind in (NetInfo): bf16 as BF16, so the
        runner keeps bf16 state as bf16; float16 as the float32 callers give and get."""
        return BF16 if self.name == BF16 else self.host


DTYPES = (
    DeviceDtype("float32", 4, "f32", "BM_FLOAT32", "float32", "float32"),
    DeviceDtype("float16", 2, "f16", "BM_FLOAT16", "float16", "float32"),
    DeviceDtype(BF16, 2, "bf16", "BM_BFLOAT16", "uint16", "float32"),
    DeviceDtype("int32", 4, "i32", "BM_INT32", "int32", "int32"),
    DeviceDtype("uint32", 4, "u32", "BM_UINT32", "uint32", "uint32"),
    DeviceDtype("int16", 2, "i16", "BM_INT16", "int16", "int16"),
    DeviceDtype("uint16", 2, "u16", "BM_UINT16", "uint16", "uint16"),
    DeviceDtype("int8", 1, "i8", "BM_INT8", "int8", "int8"),
    DeviceDtype("uint8", 1, "u8", "BM_UINT8", "uint8", "uint8"),
)
BY_NAME = {d.name: d for d in DTYPES}
BY_TPU_MLIR = {d.tpu_mlir: d for d in DTYPES}
BY_SAIL = {d.sail: d for d in DTYPES}


def value_bytes(dtype: str) -> int:
    """Bytes per value of lvb's dtype `dtype`; 4 for a name the table lacks (as wide as the widest)."""
    known = BY_NAME.get(dtype)
    return known.bytes if known else 4


def tensor_bytes(shape, dtype: str) -> int:
    return math.prod(shape) * value_bytes(dtype)


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even, as the chip rounds."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)
