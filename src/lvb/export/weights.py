"""Streaming access to a checkpoint's safetensors: one part's tensors at a time.

The files are memory-mapped and only the tensors a part asks for are read,
so exporting never holds the whole model. Each tensor also has a content
digest (of its raw bytes), cached per file state, so that an unchanged part
is recognised without being exported again.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from safetensors import safe_open

from lvb.errors import LvbError
from lvb.dtypes import from_bf16_bits

# The same tensors are named differently by Meta's checkpoints / transformers 4
# (left, which is what lvb uses) and by transformers 5's in-memory layout (right).
NAME_PREFIXES: tuple[tuple[str, str], ...] = (
    ("vision_model.", "model.vision_model."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    # A Llama text checkpoint (LlamaForCausalLM): its stack is an mllama text model's.
    ("language_model.model.", "model."),
)
# With tied embeddings a checkpoint has no LM head of its own: the head reads the table.
TIED = {"language_model.lm_head.weight": "language_model.model.embed_tokens.weight"}


# safetensors dtype -> (bytes per value, raw bytes -> float32 array)
_FLOAT_READERS = {
    "F32": (4, lambda raw: np.frombuffer(raw, np.float32)),
    "F16": (2, lambda raw: np.frombuffer(raw, np.float16).astype(np.float32)),
    "BF16": (2, lambda raw: from_bf16_bits(np.frombuffer(raw, np.uint16))),
}


READABLE_DTYPES = ("BF16", "F16", "F32")  # the float dtypes of a checkpoint lvb exports from


class WeightsError(LvbError, ValueError):
    """Missing, truncated or incomplete weights; the message names the file."""


def canonical(name: str) -> str:
    for ours, theirs in NAME_PREFIXES:
        if name.startswith(theirs):
            return ours + name[len(theirs) :]
    return name


class _File:
    """One safetensors file: its header, checked against its size."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (header_size,) = struct.unpack("<Q", f.read(8))
                if header_size > size - 8:
                    raise ValueError
                header = json.loads(f.read(header_size))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path} is not a readable safetensors file; download it again") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + header_size
        self.tensors = header
        end = max((t["data_offsets"][1] for t in header.values()), default=0)
        if self.data_start + end > size:
            raise WeightsError(
                f"{path} is truncated ({size} bytes, its header needs {self.data_start + end}); download it again"
            )
        self.stat = [size, path.stat().st_mtime_ns]

    def digests(self) -> dict[str, str]:
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            result = {}
            for name, meta in self.tensors.items():
                begin, end = meta["data_offsets"]
                digest = hashlib.blake2b(digest_size=16)
                digest.update(f"{meta['dtype']}{meta['shape']}".encode())
                digest.update(memoryview(data)[self.data_start + begin : self.data_start + end])
                result[name] = digest.hexdigest()
            return result


class CheckpointWeights:
    def __init__(self, model_dir: str | Path, digest_cache: dict | None = None):
        model_dir = self.model_dir = Path(model_dir)
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightsError(f"{index} is not a safetensors index; download it again") from e
            files = sorted(set(weight_map.values()))
        elif (model_dir / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise WeightsError(f"{model_dir} has no model.safetensors or model.safetensors.index.json; lvb reads safetensors checkpoints")
        self.files: dict[str, _File] = {}
        self.location: dict[str, str] = {}  # canonical tensor name -> file name
        for name in files:
            path = model_dir / name
            if not path.is_file():
                raise WeightsError(f"{path} is missing (listed in the index); download it again")
            self.files[name] = _File(path)
            for tensor in self.files[name].tensors:
                self.location[canonical(tensor)] = name
        self._raw_names = {canonical(t): t for f in self.files.values() for t in f.tensors}
        # Names served by another tensor (TIED); the export's weight check refuses them unless
        # the config ties the embeddings.
        self.aliased = {name for name, table in TIED.items() if name not in self.location and table in self.location}
        for name in self.aliased:
            self.location[name], self._raw_names[name] = self.location[TIED[name]], self._raw_names[TIED[name]]
        # {file: {"stat": [size, mtime_ns], "tensors": {raw name: digest}}}, kept in the export manifest
        self.digest_cache = digest_cache if digest_cache is not None else {}

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.location if n.startswith(prefix))

    def shape(self, name: str) -> list[int]:
        return self.meta(name)["shape"]

    def meta(self, name: str) -> dict:
        """The safetensors header entry of tensor `name`: dtype, shape, data_offsets."""
        return self.files[self.location[name]].tensors[self._raw_names[name]]

    def load(self, prefix: str, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor under `prefix`, with the prefix removed, read from the mapped files."""
        names = self.names(prefix)
        if not names:
            raise WeightsError(f"the checkpoint has no tensors under {prefix!r}; is it a complete mllama checkpoint?")
        result = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.location[name], []).append(name)
        for file_name, file_names in by_file.items():
            with safe_open(self.files[file_name].path, framework="pt") as f:
                for name in file_names:
                    result[name[len(prefix) :]] = f.get_tensor(self._raw_names[name]).to(dtype)
        return result

    def write_float32(self, name: str, out: BinaryIO, transpose: bool = False, slab_bytes: int = 64 << 20) -> int:
        """Write 2-D tensor `name` as float32 (transposed if asked) at `out`'s position, a slab
        of rows at a time with plain reads and writes, so that a vocabulary-sized table is
        never whole in memory, neither as a tensor nor as mapped pages. Returns the bytes written."""
        file = self.files[self.location[name]]
        meta = file.tensors[self._raw_names[name]]
        if meta["dtype"] not in _FLOAT_READERS or len(meta["shape"]) != 2:
            raise WeightsError(f"{name} is {meta['dtype']}{meta['shape']}; lvb streams 2-D BF16, F16 or F32 tables")
        rows, cols = meta["shape"]
        itemsize, to_float32 = _FLOAT_READERS[meta["dtype"]]
        step = max(1, slab_bytes // (4 * cols))
        start = out.tell()
        out.flush()
        with open(file.path, "rb") as source:
            for first in range(0, rows, step):
                count = min(step, rows - first)
                source.seek(file.data_start + meta["data_offsets"][0] + first * cols * itemsize)
                slab = to_float32(source.read(count * cols * itemsize)).reshape(count, cols)
                if not transpose:
                    os.pwrite(out.fileno(), slab.tobytes(), start + first * cols * 4)
                    continue
                for column, values in enumerate(np.ascontiguousarray(slab.T)):  # row `column` of the transpose
                    os.pwrite(out.fileno(), values.tobytes(), start + (column * rows + first) * 4)
        out.seek(start + rows * cols * 4)
        return rows * cols * 4

    def digest(self, prefix: str) -> str:
        """A content digest of every tensor under `prefix`."""
        combined = hashlib.blake2b(digest_size=16)
        for name in self.names(prefix):
            file_name = self.location[name]
            cached = self.digest_cache.get(file_name)
            stat = self.files[file_name].stat
            if not cached or cached["stat"] != stat:
                cached = self.digest_cache[file_name] = {"stat": stat, "tensors": self.files[file_name].digests()}
            combined.update(name.encode() + cached["tensors"][self._raw_names[name]].encode())
        return combined.hexdigest()
