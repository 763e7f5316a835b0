"""A bmodel as the runtime will see it: the nets, their tensors, their weights, what one
decode step reads, and each net's activation memory (`lvb inspect`, and the memory plan
of lvb.runtime.memory before loading on a card).

Read from tpu-mlir's own `model_tool --info`, `--weight` and `--print` (`ctx_size`). It sits
below the stages: compile, the runtime's preflight and the stand-in SDK all read bmodels.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from lvb.contract import Kind, Names, kinds_named
from lvb.dtypes import tensor_bytes
from lvb.toolchain import Toolchain, ToolchainError

_NET = re.compile(r"^net \d+: \[(?P<name>[^\]]+)\]")
_TENSOR = re.compile(r"^(?P<io>input|output): (?P<name>[^,]+), \[(?P<shape>[^\]]*)\], (?P<dtype>\w+)")
_WEIGHT_NET = re.compile(r'^net \d+ : "(?P<name>[^"]+)"(, stage:(?P<stage>\d+))?')
# A net with several stages (the prefill nets at several chunk sizes) lists each; they share
# the weights, and the first stage is the largest: only it is read.
_STAGE = re.compile(r"^stage (?P<stage>\d+),")
_RANGE = re.compile(r"\[0x(?P<begin>[0-9a-f]+), 0x(?P<end>[0-9a-f]+)\)")
# The nets one generated token runs besides the embedding (which reads one row of its table).
_DECODE_STEP = {Kind.SELF_DECODE, Kind.CROSS_DECODE, Kind.LM_HEAD, Kind.GREEDY_HEAD}
_DEVICE = re.compile(r"device mem size: \d+ \(weight: (?P<weight>\d+), instruct: (?P<instruct>\d+), runtime: (?P<runtime>\d+)\)")
# `--print` dumps the bmodel as text: a net's name at six spaces, then one ctx_size per stage.
_PRINT_NET = re.compile(r'^ {6}name: "(?P<name>[^"]+)"')
_CTX = re.compile(r"^\s*ctx_size: (\d+)")


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def bytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


@dataclass
class Net:
    name: str
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)
    weight_bytes: int = 0
    neuron_bytes: int = 0  # activation memory: its largest stage's
    # The inputs of its later stages (the prefill nets at smaller chunks), in the bmodel's order.
    smaller: list[list[Tensor]] = field(default_factory=list)


@dataclass
class BmodelInfo:
    path: Path
    chip: str
    nets: dict[str, Net]
    device_weight_bytes: int  # shared weights counted once
    instruction_bytes: int = 0

    def decode_step(self) -> dict[str, int]:
        """Bytes one generated token reads: the decode nets' weights (one embedding row),
        the self-attention KV cache and the cross-attention K/V."""
        weights = kv = cross = 0
        for net in self.nets.values():
            kinds = kinds_named(net.name)
            if Kind.EMBED_CACHE in kinds:
                weights += net.outputs[0].bytes  # a gather reads one row of the table
            elif kinds & _DECODE_STEP:
                weights += net.weight_bytes
                for t in net.inputs:
                    if t.name in (Names.PAST_K, Names.PAST_V):
                        kv += t.bytes
                    elif t.name in (Names.CROSS_K, Names.CROSS_V):
                        cross += t.bytes
        return {"weights": weights, "kv_cache": kv, "cross_kv": cross, "total": weights + kv + cross}


def _model_tool(toolchain: Toolchain, *args: str) -> str:
    try:
        return subprocess.run(
            [str(toolchain.tool("model_tool")), *args], capture_output=True, text=True, check=True, env=toolchain.env()
        ).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise ToolchainError(f"model_tool {' '.join(args)} failed ({e}); is it a bmodel?") from e


def _read_info(path: Path, toolchain: Toolchain) -> tuple[dict[str, Net], str, int, int]:
    """(nets with their first stage's tensors and later stages' inputs, chip, device weight
    bytes, instruction bytes)."""
    if not Path(path).is_file():
        raise ToolchainError(f"{path}: no such bmodel; run `lvb compile` first")
    nets: dict[str, Net] = {}
    chip, device_weight, instructions = "?", 0, 0
    current = None
    stage = 0
    for line in _model_tool(toolchain, "--info", str(path)).splitlines():
        line = line.strip()
        if line.startswith("chip:"):
            chip = line.split(":", 1)[1].strip()
        elif m := _NET.match(line):
            current, stage = nets.setdefault(m["name"], Net(m["name"])), 0
        elif (m := _STAGE.match(line)) and current is not None:
            stage = int(m["stage"])
            if stage > 0:
                current.smaller.append([])
        elif (m := _TENSOR.match(line)) and current is not None:
            shape = tuple(int(d) for d in m["shape"].split(",") if d.strip())
            tensor = Tensor(m["name"], shape, m["dtype"])
            if stage == 0:
                (current.inputs if m["io"] == "input" else current.outputs).append(tensor)
            elif m["io"] == "input":
                current.smaller[-1].append(tensor)
        elif m := _DEVICE.match(line):
            device_weight, instructions = int(m["weight"]), int(m["instruct"])
    return nets, chip, device_weight, instructions


def declared_tensors(path: Path, toolchain: Toolchain) -> dict[str, Net]:
    """Each net's tensors as the bmodel declares them (one model_tool call)."""
    return _read_info(path, toolchain)[0]


def inspect_bmodel(path: Path, toolchain: Toolchain) -> BmodelInfo:
    nets, chip, device_weight, instructions = _read_info(path, toolchain)
    current = None
    for line in _model_tool(toolchain, "--weight", str(path)).splitlines():
        if m := _WEIGHT_NET.match(line.strip()):
            current = nets.get(m["name"]) if int(m["stage"] or 0) == 0 else None
        elif current is not None and (r := _RANGE.search(line)):
            current.weight_bytes += int(r["end"], 16) - int(r["begin"], 16)
    if not nets:
        raise ToolchainError(f"{path}: model_tool found no nets; is it a bmodel?")
    current = None
    for line in _model_tool(toolchain, "--print", str(path)).splitlines():
        if m := _PRINT_NET.match(line):
            current = nets.get(m["name"])
        elif (m := _CTX.match(line)) and current is not None:
            current.neuron_bytes = max(current.neuron_bytes, int(m[1]))
    return BmodelInfo(Path(path), chip, nets, device_weight, instructions)
