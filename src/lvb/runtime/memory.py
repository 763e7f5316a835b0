"""What a card must hold to run a bmodel with lvb's runtime, and the preflight that
compares it with the device's free memory before loading.

- Weights and instructions: what bmruntime loads from the bmodel (model_tool's
  `device mem size`, weights shared between nets counted once).
- Activations: each net's neuron memory (`ctx_size`). On a one-core BM1684X
  bmruntime shares one buffer, sized for the largest net, between all nets
  (bmruntime.cpp:296-300 turns BM_RUNTIME_SHARE_MEM on, bmruntime_bmodel.cpp:923-940);
  without it, each net has its own.
- Resident buffers: what `Session` allocates (KV caches, cross K/V, vision states,
  hidden states, per-step masks), from the nets' own shapes.
- Scratch I/O: the tensors SailEngine shares between nets by shape and dtype for
  host feeds and returned outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from lvb.contract import Kind, Names, TensorInfo, block_name, kinds_named, layer_of, net_name
from lvb.dtypes import tensor_bytes
from lvb.runtime.engine import EngineError

GiB = 1 << 30
MiB = 1 << 20

# Device memory a card gives the runtime (MiB, as bm_get_stat reports it). SE7: the NPU heap
# alone, or NPU + VPU + VPP after Sophgo's `memory_edit.sh -c -npu 7615 -vpu 3071 -vpp 3071`
# (bmruntime and sail allocate with heap mask 7: any heap, bmruntime.cpp:301-310, tensor.cpp:697-700).
CARDS = {
    "SE7, NPU heap": 7615 * MiB,
    "SE7, NPU+VPU+VPP": (7615 + 3071 + 3071) * MiB,
    "SC7 chip, 12 GB": 12 * 10**9,
    "SC7 chip, 16 GB": 16 * 10**9,
}
SE7_FIX = "on an SE7, give the NPU the VPU and VPP heaps (memory_edit.sh -c -npu 7615 -vpu 3071 -vpp 3071)"


def _bytes(t: TensorInfo) -> int:
    return tensor_bytes(t.shape, t.dtype)


class Buffers:
    """The resident buffers' names (the runner allocates them from `resident_buffers`)."""

    VISION = "vision"  # the vision tower's hidden states, layer to layer ...
    VISION_B = "vision_b"  # ... ping-ponging with this one: a net never writes the buffer it reads
    CROSS_STATES = "cross_states"  # the image's tokens at the text width
    HIDDEN = "hidden"  # a prefill chunk's hidden states (the largest chunk)
    HIDDEN_B = "hidden_b"
    HIDDEN1 = "hidden1"  # one token's
    HIDDEN1_B = "hidden1_b"
    LOGITS = "logits"  # a decode step's (each row of a batch)
    CHECK_LOGITS = "check_logits"  # the rows of a speculative check, scored in one launch

    @staticmethod
    def kv(layer: int) -> tuple[str, str]:
        """A self-attention layer's KV cache."""
        return f"k{layer}", f"v{layer}"

    @staticmethod
    def cross_kv(layer: int) -> tuple[str, str]:
        """A cross-attention layer's K/V of the image in play."""
        return f"ck{layer}", f"cv{layer}"

    @staticmethod
    def kept(j: int) -> str:
        """The output of vision layer j, which the vision head reads later."""
        return net_name(Kind.VISION_LAYER, j)

    @staticmethod
    def step(name: str, width: int, rows: int = 1) -> str:
        """What every layer of one step of `width` tokens (of `rows` conversations, a decode
        batch) reads (positions, masks), uploaded once."""
        return f"{name}_{width}" if rows == 1 else f"{name}_{rows}x{width}"

    KV_CACHE, CROSS_KV, VISION_STATES, HIDDEN_STATES, STEP = (
        "KV cache", "cross-attention K/V", "vision states", "hidden states, logits", "per-step masks and positions")

    @classmethod
    def holds(cls, name: str) -> str:
        """What a resident buffer holds (the memory plan's rows), by the names made above."""
        if name in (cls.VISION, cls.VISION_B, cls.CROSS_STATES):
            return cls.VISION_STATES
        if name in (cls.HIDDEN, cls.HIDDEN_B, cls.HIDDEN1, cls.HIDDEN1_B, cls.LOGITS, cls.CHECK_LOGITS):
            return cls.HIDDEN_STATES
        layer = layer_of(name)
        if layer is not None and name == cls.kept(layer):
            return cls.VISION_STATES
        digits = name.lstrip("ckv")
        if digits.isdigit() and name in cls.kv(int(digits)):
            return cls.KV_CACHE
        if digits.isdigit() and name in cls.cross_kv(int(digits)):
            return cls.CROSS_KV
        return cls.STEP


def _stage_inputs(net) -> list[tuple[TensorInfo, ...]]:
    """Every stage's inputs, largest first, of a contract NetSpec or a bmodel's net alike."""
    return [net.inputs, *(s.inputs if hasattr(s, "inputs") else s for s in getattr(net, "smaller", ()))]


def resident_buffers(nets: Mapping) -> list[TensorInfo]:
    """Every buffer the runner keeps in the engine, read from the nets' shapes (contract
    NetSpecs with their device dtypes, or a bmodel's nets alike), each in the dtype of the net
    tensor it holds: bf16 state where the nets were compiled so."""
    b, n = Buffers, Names

    def t(name, like: TensorInfo):
        return TensorInfo(name, tuple(like.shape), like.dtype)

    def inputs(net):
        return {x.name: x for x in nets[net].inputs}

    buffers = []
    decode = sorted((name for name in nets if kinds_named(name) & {Kind.SELF_DECODE, Kind.CROSS_DECODE}), key=layer_of)
    self_layers = [name for name in decode if n.PAST_K in inputs(name)]
    cross_layers = [name for name in decode if n.CROSS_K in inputs(name)]
    for net in self_layers:
        buffers += [t(name, inputs(net)[n.PAST_K]) for name in b.kv(layer_of(net))]
    for net in cross_layers:
        buffers += [t(name, inputs(net)[n.CROSS_K]) for name in b.cross_kv(layer_of(net))]
    if net_name(Kind.VISION_HEAD) in nets:  # a text-only (Llama) model has no vision tower
        buffers.append(t(b.CROSS_STATES, nets[net_name(Kind.VISION_HEAD)].outputs[0]))
        vision = nets[net_name(Kind.VISION_EMBED)].outputs[0]
        kept = sorted(j for x in nets[net_name(Kind.VISION_HEAD)].inputs if (j := n.kept_layer_index(x.name)) is not None)
        buffers += [t(name, vision) for name in [b.VISION, b.VISION_B, *(b.kept(j) for j in kept)]]
    buffers += [t(name, nets[net_name(Kind.EMBED)].outputs[0]) for name in (b.HIDDEN, b.HIDDEN_B)]
    buffers += [t(name, nets[net_name(Kind.EMBED_CACHE)].outputs[0]) for name in (b.HIDDEN1, b.HIDDEN1_B)]
    head = nets[net_name(Kind.LM_HEAD)]
    logits = head.outputs[0]
    rows = [next(x for x in stage if x.name == n.HIDDEN).shape[:2] for stage in _stage_inputs(head)]
    batch = max(B for B, R in rows if R == 1)  # a decode step's stages: [B, 1]
    checks = [R for B, R in rows if B == 1 and R > 1]  # a speculative check's: [1, R]
    buffers.append(TensorInfo(b.LOGITS, (batch, logits.shape[-1]), logits.dtype))
    if checks:
        buffers.append(TensorInfo(b.CHECK_LOGITS, (max(checks), logits.shape[-1]), logits.dtype))
    # What every layer of one step reads, one buffer per width (each prefill chunk size, decode).
    for group, names in ((self_layers, (n.POSITION_IDS, n.ATTENTION_MASK)), (cross_layers, (n.CROSS_MASK, n.TEXT_ROW_MASK))):
        if not group:
            continue
        for net in (block_name(layer_of(group[0]), decode=False), group[0]):
            for stage in _stage_inputs(nets[net]):
                rows, width = next(x for x in stage if x.name == n.HIDDEN).shape[:2]
                buffers += [t(b.step(x.name, width, rows), x) for x in stage if x.name in names]
    return buffers


def scratch_tensors(nets: Mapping) -> list[TensorInfo]:
    """The scratch tensors SailEngine makes while a Session runs: one per shape and dtype
    (two where one net needs two of a kind), shared by every net."""
    def inputs(net):
        return {x.name: x for x in nets[net].inputs}

    needed: dict[tuple, int] = {}

    def need(x: TensorInfo, count: int = 1):
        key = (tuple(x.shape), x.dtype)
        needed[key] = max(needed.get(key, 0), count)

    n = Names
    host_fed = ((net_name(Kind.EMBED), n.INPUT_IDS), (net_name(Kind.EMBED_CACHE), n.INPUT_IDS),
                (net_name(Kind.VISION_EMBED), n.PIXEL_VALUES), (net_name(Kind.VISION_EMBED), n.ASPECT_RATIO_IDS),
                (net_name(Kind.VISION_LAYER, 0), n.ASPECT_RATIO_MASK))
    for net, name in host_fed:
        if net in nets:
            need(inputs(net)[name])
    need(nets[net_name(Kind.GREEDY_HEAD)].outputs[0])  # the token comes back
    # Reading the logits to sample: a host mirror of the buffer (the second of its shape, as
    # SailEngine._host_copy takes it; the first is never made on the card).
    logits = nets[net_name(Kind.LM_HEAD)].outputs[0]
    needed.setdefault((tuple(logits.shape), logits.dtype, 1), 1)
    # A net input in another dtype than the buffer that feeds it (tpu-mlir may keep one of the
    # vision head's inputs in float32) goes through a scratch tensor of the input's and a host
    # mirror of the buffer's (the second of its shape).
    head = []
    if net_name(Kind.VISION_HEAD) in nets:
        vision = nets[net_name(Kind.VISION_EMBED)].outputs[0]
        head = [x for x in nets[net_name(Kind.VISION_HEAD)].inputs
                if x.dtype != vision.dtype and (x.name == n.HIDDEN or n.kept_layer_index(x.name) is not None)]
    for x in head:
        need(x, sum(y.shape == x.shape and y.dtype == x.dtype for y in head))
    if head:
        needed.setdefault((tuple(vision.shape), vision.dtype, 1), 1)
    prefill = next((name for name in sorted(nets, key=lambda x: layer_of(x) or 0)
                    if Kind.SELF_PREFILL in kinds_named(name) and n.PAST_K in inputs(name)), None)
    if prefill:  # a partial last chunk writes its K and V rows through scratch
        need(nets[prefill].outputs[1], 2)
    # A mirror is the second tensor of its shape: already counted where two are needed anyway.
    needed = {key: count for key, count in needed.items() if len(key) == 2 or needed.get(key[:2], 0) < 2}
    return [TensorInfo(f"{key[1]} {list(key[0])}", key[0], key[1]) for key, count in needed.items()
            for _ in range(count)]


@dataclass
class MemoryPlan:
    weights: int
    instructions: int
    activations: dict[str, int]  # per net
    resident: list[TensorInfo]
    scratch: list[TensorInfo]
    shared_activations: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def activation(self) -> int:
        values = list(self.activations.values()) or [0]
        return max(values) if self.shared_activations else sum(values)

    @property
    def resident_bytes(self) -> int:
        return sum(_bytes(t) for t in self.resident)

    @property
    def scratch_bytes(self) -> int:
        return sum(_bytes(t) for t in self.scratch)

    @property
    def overhead(self) -> int:
        """Everything but weights and instructions."""
        return self.activation + self.resident_bytes + self.scratch_bytes

    @property
    def total(self) -> int:
        return self.weights + self.instructions + self.overhead

    def groups(self) -> list[tuple[str, int]]:
        """The resident buffers by what they hold."""
        sums = dict.fromkeys((Buffers.KV_CACHE, Buffers.CROSS_KV, Buffers.VISION_STATES, Buffers.HIDDEN_STATES,
                              Buffers.STEP), 0)
        for t in self.resident:
            sums[Buffers.holds(t.name)] += _bytes(t)
        return list(sums.items())

    def rows(self) -> list[tuple[str, int]]:
        largest = max(self.activations, key=self.activations.get) if self.activations else "-"
        how = f"shared, the largest net: {largest}" if self.shared_activations else "every net its own"
        return [("weights", self.weights), ("instructions", self.instructions), (f"activations ({how})", self.activation),
                *((f"engine: {label}", size) for label, size in self.groups()),
                ("engine: scratch I/O tensors", self.scratch_bytes),
                ("engine overhead (all but weights and instructions)", self.overhead), ("total", self.total)]


def plan_for_bmodel(info) -> MemoryPlan:
    """The plan of a bmodel read by lvb.bmodel.inspect_bmodel."""
    once = (Kind.EMBED, Kind.EMBED_CACHE, Kind.LM_HEAD, Kind.GREEDY_HEAD)  # a Llama text model has no vision nets
    missing = [name for name in map(net_name, once) if name not in info.nets]
    if missing:
        raise EngineError(f"{info.path}: no net {missing[0]}; lvb's runtime plan needs a bmodel made by `lvb compile`")
    plan = MemoryPlan(info.device_weight_bytes, info.instruction_bytes,
                      {name: net.neuron_bytes for name, net in info.nets.items()},
                      resident_buffers(info.nets), scratch_tensors(info.nets))
    if not any(plan.activations.values()):
        plan.notes.append("model_tool printed no activation sizes; activations are not counted")
    return plan


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Preflight:
    need: int
    free: int | None
    total: int | None
    notes: tuple[str, ...]

    def line(self) -> str:
        have = (f"device has {format_bytes(self.free)} free of {format_bytes(self.total)}" if self.free is not None
                else "free device memory unknown")
        return f"memory plan {format_bytes(self.need)}; {have}" + "".join(f"; {n}" for n in self.notes)


def preflight(bmodel: Path, device_id: int = 0, toolchain=None) -> Preflight:
    """Compare what the bmodel needs with the device's free memory; raise EngineError naming
    both and the fix when it does not fit."""
    from lvb.runtime.sail import device_memory

    notes: list[str] = []
    try:
        from lvb.bmodel import inspect_bmodel
        from lvb.toolchain import find_toolchain

        plan = plan_for_bmodel(inspect_bmodel(Path(bmodel), toolchain or find_toolchain()))
        need = plan.total
        notes += plan.notes
    except Exception as e:  # no tpu-mlir on this host (a deployment box): the file is the floor
        from lvb.errors import LvbError

        if not isinstance(e, LvbError):
            raise
        need = Path(bmodel).stat().st_size
        notes.append(f"no model_tool here ({e}); checked the bmodel's size only")
    memory = device_memory(device_id)
    if memory is None:
        notes.append("this sophon.sail exposes no free-memory figure (sail.get_dev_stat); not checked")
        return Preflight(need, None, None, tuple(notes))
    total, free = memory
    result = Preflight(need, free, total, tuple(notes))
    if need > free:
        raise EngineError(f"{Path(bmodel).name} needs {format_bytes(need)} of device memory and device {device_id} "
                          f"has {format_bytes(free)} free (of {format_bytes(total)}): compile with a smaller --seq, "
                          f"or {SE7_FIX}")
    return result
