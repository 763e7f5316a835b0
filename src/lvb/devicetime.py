"""Time on the BM1684X without a card: tpu-mlir's cost model, as `model_deploy.py` leaves it.

Every deploy writes `compiler_profile_0.txt` into its working directory: one record per TIU
(compute) and GDMA (memory) command, each costed by a fixed formula and laid on the two
engines' in-order timeline, then `TCYC : <cycles>` per subnet (1 GHz: a cycle is a ns), the
GDMA bytes per direction and the FLOPs. No DDR contention, no launch or host overhead: good for
comparing builds of one model, to be calibrated against a card for absolutes.

`lvb compile` keeps each net's estimate (one per stage) in its manifest; `from_manifest`
reads them back from a bmodel's `compile_record`, and lvb.runtime.turn lays them on the runtime's own call
sequence.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lvb.workdir import COMPILE_VERSION, WorkDir, matches_record, read_manifest

PROFILE_FILE = "compiler_profile_0.txt"
# Per net call on the card: the host's launch and wait, which the cost model leaves out. A
# stated assumption (`lvb inspect --launch-us`), shown apart from the estimate, never inside it.
DEFAULT_LAUNCH_US = 20.0
# How many op types an estimate keeps, busiest first: where a net's time goes.
TOP_OPS = 8

_RECORD = re.compile(r"(?P<op>[^\s|]+)\|(?P<cmd>[A-Z0-9_]+)\|s:\d+\|b:\d+\|g:\d+\|e:\d+\|t:(?P<t>\d+)(?:\|dr:(?P<dr>\d+)\|sz:(?P<sz>\d+))?")
_TCYC = re.compile(r"^TCYC : (\d+)\s*$", re.M)
_FLOPS = re.compile(r"^flops: (\d+),", re.M)
_SUMMARY = re.compile(r"^GDMA SUMMARY : \|dr\[0\] S2L:(\d+)\|dr\[1\] L2S:(\d+)\|dr\[2\] S2S:(\d+)", re.M)


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class Estimate:
    """One net (one stage) on the chip by tpu-mlir's cost model."""

    cycles: int  # the timeline's length: ns at the model's 1 GHz
    tiu_cycles: int  # busy time of the compute engine
    gdma_cycles: int  # busy time of the memory engine
    read_bytes: int  # DDR -> local memory
    write_bytes: int  # local memory -> DDR
    ddr_bytes: int  # DDR -> DDR
    flops: int
    ops: dict[str, dict[str, int]] = field(default_factory=dict)  # op type -> tiu/gdma cycles, the busiest

    @property
    def ms(self) -> float:
        return self.cycles / 1e6

    @property
    def bound(self) -> str:
        """Which engine the timeline waits on most."""
        return "GDMA" if self.gdma_cycles >= self.tiu_cycles else "compute"

    @property
    def moved_bytes(self) -> int:
        return self.read_bytes + self.write_bytes + 2 * self.ddr_bytes

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Estimate:
        return cls(**data)


def _op_type(op: str) -> str:
    """`A16MatMul_17` -> `A16MatMul`: the records name an op by type and MLIR id."""
    return re.sub(r"_\d+$", "", op)


def parse_profile(text: str) -> Estimate:
    """The estimate in one compiler_profile_0.txt; several subnets add up."""
    totals = [int(c) for c in _TCYC.findall(text)]
    if not totals:
        raise ProfileError("no TCYC line: not a tpu-mlir compiler profile, or the deploy did not finish")
    busy = {"tiu": 0, "gdma": 0}
    ops: dict[str, dict[str, int]] = defaultdict(lambda: {"tiu": 0, "gdma": 0})
    for record in _RECORD.finditer(text):
        engine = "gdma" if record["dr"] is not None else "tiu"
        cycles = int(record["t"])
        busy[engine] += cycles
        ops[_op_type(record["op"])][engine] += cycles
    read = write = ddr = 0
    for s2l, l2s, s2s in _SUMMARY.findall(text):
        read, write, ddr = read + int(s2l), write + int(l2s), ddr + int(s2s)
    busiest = sorted(ops.items(), key=lambda item: -max(item[1].values()))[:TOP_OPS]
    return Estimate(cycles=sum(totals), tiu_cycles=busy["tiu"], gdma_cycles=busy["gdma"], read_bytes=read,
                    write_bytes=write, ddr_bytes=ddr, flops=sum(int(f) for f in _FLOPS.findall(text)),
                    ops=dict(busiest))


def read_profile(folder: Path) -> Estimate | None:
    """The estimate a deploy left in `folder`, which is then removed (a large net's runs to
    tens of MB, and the next deploy in the folder would overwrite it anyway); None without one."""
    path = Path(folder) / PROFILE_FILE
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    path.unlink()
    return parse_profile(text)


@dataclass(frozen=True)
class NetEstimates:
    """Each net's estimate per stage (largest first) of one combined bmodel, from its compile record."""

    nets: dict[str, tuple[Estimate, ...]]
    missing: tuple[str, ...]  # nets compiled before lvb kept estimates

    def of(self, net: str, stage: int = 0) -> Estimate | None:
        stages = self.nets.get(net, ())
        return stages[stage] if stage < len(stages) else None


def from_manifest(manifest: dict) -> NetEstimates:
    nets, missing = {}, []
    for name, result in manifest.get("nets", {}).items():
        stages = result.get("device") if isinstance(result, dict) else None
        if stages:
            nets[name] = tuple(Estimate.from_json(s) for s in stages)
        else:
            missing.append(name)
    return NetEstimates(nets, tuple(missing))


class NoEstimates(LookupError):
    pass


def compile_record(bmodel: Path) -> dict:
    """The compile manifest `lvb compile` wrote for this bmodel in its work directory, trusted
    only while the bmodel is the file that manifest describes."""
    bmodel = Path(bmodel)
    path = WorkDir(bmodel.parent).compile_manifest(bmodel)
    manifest = read_manifest(path, COMPILE_VERSION)
    if not manifest or manifest.get("bmodel") != bmodel.name:
        raise NoEstimates(f"no compile record for {bmodel.name} beside it ({path}); device-time estimates come from `lvb compile`")
    problem = matches_record(bmodel, manifest.get("file"))
    if problem:
        raise NoEstimates(f"{problem}: its compile record no longer describes it")
    return manifest
