"""The nets: names, inputs, outputs, shapes and dtypes. The single source of truth
for the exporter, the compiler, the runtime and the checks.

Shapes use S = the compiled sequence (KV-cache slots), C = the prefill chunk,
D = text hidden size, KV = key/value heads, d = head dim, V = vision tokens
of one image (tiles x patches per tile), T = max tiles, I = tile side,
W = vision hidden size, N = T x patches per tile padded as the tower pads them.

The vision tower is a chain of nets, one per encoder layer, so that it streams
like the text layers: `vision_embed`, `vision_layer_{j}`, `vision_post`,
`vision_global_{j}`, `vision_head` (which also applies the projector).

Prefill is chunked: `block_{i}` takes C new tokens against the whole cache
(S slots, masked to the filled ones), so the first prompt and every later
turn use the same nets, and a short turn costs C tokens, not S. The prefill
nets (`embed`, `block_{i}`) exist at every chunk size of a list, the largest
first, as tpu-mlir stages of one net that share its weights; a turn is
prefilled with the smallest chunk that holds it, a long one with the largest.
`block_cache_{i}` is the same computation for one token. The decode nets
(`embed_cache`, `block_cache_{i}`, `lm_head`, `greedy_head`) take B rows, one token of
each of B conversations (continuous batching: one read of the weights serves B
conversations), at every B of a list, the largest first, as stages of one net; the
default list is (1,), the nets of one conversation. Each row has its own position,
causal mask, KV-cache slot (row b of the [B, S, KV, d] cache) and cross K/V. A
cross-attention
layer's K/V depend only on the image: `cross_kv_{i}` computes them once per
image, at KV heads, and its blocks repeat them to the query heads inside.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import Enum

from lvb.dtypes import BF16  # the device dtype of the state the nets hand each other (see `device_dtype`)
from lvb.errors import LvbError
from lvb.spec import ModelSpec

# What `lvb export` builds unless told otherwise: KV-cache slots and prefill chunks.
DEFAULT_SEQ = 512
DEFAULT_CHUNKS = (128,)  # `--chunk 16,32,64,128` prefills a short turn faster; each size is one more compile per layer
DEFAULT_BATCH = (1,)  # `--batch 1,2,4` decodes up to 4 conversations in one step; each size is one more stage per decode net

# Added to attention scores that must be ignored. Large enough that exp()
# underflows to 0 in fp32 and bf16, finite so that bf16 hardware and
# tpu-mlir's comparisons stay clear of infinities.
MASK_VALUE = -10000.0


class ChoiceError(LvbError, ValueError):
    """A name outside an option's choices."""


def not_one_of(option: str, value: object, choices) -> str:
    """The one message for a value outside an option's choices, from the library and the CLI alike."""
    return f"{option} {value} is not one of {', '.join(map(str, choices))}"


class Choice(str, Enum):
    """A closed set of names an option takes (the CLI's Enum choices, the library's arguments).
    A member reads, formats, hashes and serializes as its name, so it and the plain name are
    interchangeable in messages, file names, JSON and dict keys."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:
        return hash(self.value)

    @classmethod
    def of(cls, value: object, option: str):
        """`value` (a name or a member) as a member; a name outside the choices is a ChoiceError
        naming `option` and the choices."""
        try:
            return cls(value)
        except ValueError:
            raise ChoiceError(not_one_of(option, value, [c.value for c in cls])) from None


class Quant(Choice):
    """How a group of nets is compiled (`--quant`, `--vision-quant`, `--embed-quant`, `--head-quant`):
    INT4 or INT8 weights with bf16 activations (tpu-mlir's W4BF16, W8BF16), bf16 throughout, or
    (the vision tower only) INT8 weights and activations at calibrated thresholds (tpu-mlir's INT8,
    lvb.compile.calibration)."""

    INT4 = "int4"
    INT8 = "int8"
    BF16 = "bf16"
    W8A8 = "w8a8"

    @property
    def grouped(self) -> bool:
        """Whether its weights share one scale per `--group-size` inputs."""
        return self in (Quant.INT4, Quant.INT8)

    @property
    def calibrated(self) -> bool:
        """Whether its activations are INT8 too, at thresholds measured on pictures."""
        return self is Quant.W8A8

    @classmethod
    def of_weights(cls, value: object, option: str) -> Quant:
        """As `of`, for the options that take a weight quantization only (all but --vision-quant)."""
        quant = cls.of(value, option)
        if quant.calibrated:
            raise ChoiceError(f"{option} {quant} is for --vision-quant only (the vision tower); use int4, int8 or bf16")
        return quant


class Backend(Choice):
    """Where the nets run."""

    CMODEL = "cmodel"  # tpu-mlir's simulator of the chip
    SAIL = "sail"  # the device, through sophon.sail
    ONNXRUNTIME = "onnxruntime"  # the exported ONNX nets, no bmodel


class Chip(Choice):
    """The chips lvb compiles for."""

    BM1684X = "bm1684x"


class CheckMode(Choice):
    """Which nets the compile runs on the simulator against onnxruntime."""

    ALL = "all"
    # The first net of each kind; its siblings differ only in weights, so they take its passing
    # options unchecked (at real widths a check costs minutes per net). `lvb verify` checks them all.
    KINDS = "kinds"
    NONE = "none"

@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> TensorInfo:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])


@dataclass(frozen=True)
class NetInfo:
    name: str
    inputs: tuple[TensorInfo, ...]  # of the largest stage
    outputs: tuple[TensorInfo, ...]
    # The inputs of the net's smaller stages (the prefill nets at smaller chunks, the decode nets
    # at smaller batches), largest first.
    smaller: tuple[tuple[TensorInfo, ...], ...] = ()


class Kind(str, Enum):
    VISION_EMBED = "vision_embed"
    VISION_LAYER = "vision_layer"
    VISION_POST = "vision_post"
    VISION_GLOBAL = "vision_global"
    VISION_HEAD = "vision_head"
    EMBED = "embed"
    EMBED_CACHE = "embed_cache"
    SELF_PREFILL = "self_prefill"
    SELF_DECODE = "self_decode"
    CROSS_KV = "cross_kv"
    CROSS_PREFILL = "cross_prefill"
    CROSS_DECODE = "cross_decode"
    LM_HEAD = "lm_head"
    GREEDY_HEAD = "greedy_head"

    @property
    def policy(self) -> KindPolicy:
        return POLICY[self]


def _quant(quant: str) -> Quant | None:
    """A net's quantization by its value: a Quant, or None for "f32" (the nets always kept in float32)."""
    return None if quant == QuantGroup.F32.value else Quant(quant)


def is_calibrated(quant: str) -> bool:
    """Whether a net's quantization (a Quant's value, or "f32") quantizes its activations at calibrated
    thresholds (w8a8)."""
    return (q := _quant(quant)) is not None and q.calibrated


def is_grouped(quant: str) -> bool:
    """Whether a net's quantization (as for is_calibrated) shares a weight scale per `--group-size` inputs."""
    return (q := _quant(quant)) is not None and q.grouped


class QuantGroup(str, Enum):
    """Which `lvb compile` option sets a net's quantization."""

    DECODER = "quant"  # --quant
    VISION = "vision_quant"  # --vision-quant
    EMBED = "embed_quant"  # --embed-quant
    HEAD = "head_quant"  # --head-quant
    F32 = "f32"  # always float32


# tpu-mlir's layer grouping once miscompiled the vision tower (cosine 0.76 on the toy, before the
# exporter's finite masks and head groups); a net that misses its threshold is compiled again
# without it.
SAFER = ("--disable_layer_group",)
# A tpu-mlir tool with (almost) nothing to convert: the smallest peak measured below.
TOOL_BASE_BYTES = 1.29e9


@dataclass(frozen=True)
class MeasuredPeak:
    """Peak RSS of tpu-mlir's tools (model_transform, then model_deploy) for one net of a kind,
    and that net's ONNX + weight bytes, at Llama-3.2-11B-Vision widths (bench/README.md §1.2,
    measured by bench/convert_scale.py). A kind without weights peaks at its measure.
    `simplified` is the peak with tpu-mlir's ONNX simplifier, which a graph that computes
    shapes (a net with stages) still needs (lvb.compile.build.needs_simplifier)."""

    rss: float
    weight_bytes: float
    simplified: float = 0.0  # 0: as rss

    def need(self, weight_bytes: int, simplified: bool = False) -> int:
        """Bytes one job of this kind needs: the tool's base plus the measured growth, scaled
        by this net's weight bytes."""
        rss = self.simplified if simplified and self.simplified else self.rss
        if not self.weight_bytes:
            return int(rss)
        return int(TOOL_BASE_BYTES + (rss - TOOL_BASE_BYTES) * weight_bytes / self.weight_bytes)


@dataclass(frozen=True)
class KindPolicy:
    """How a kind of net is compiled."""

    quant: QuantGroup
    # model_deploy.py options to try, in order, until the bmodel passes its check.
    ladder: tuple[tuple[str, ...], ...] = ((), SAFER)
    # What a job of this kind asks a cluster for (lvb.compile.cluster): its measured memory.
    peak: MeasuredPeak = MeasuredPeak(TOOL_BASE_BYTES, 0.0)
    # The state it reads and writes (hidden states, KV caches, cross K/V, vision states) crosses
    # the device boundary as bf16 (model_deploy's --quant_input/--quant_output, as Sophgo's own
    # builds): the net computes in bf16 anyway, so the float32 cast at its edge only doubled the
    # bytes every buffer holds and every decode step reads.
    bf16_state: bool = True


# Layer groups cut the 11B's vision layer on tpu-mlir's cost model, and every vision net passes
# its check with them (the toy, the fixtures, the 11B's widths at a 224-px tile: bench/README.md
# §1.1), so they start with them too.
_VISION = KindPolicy(QuantGroup.VISION)
_DECODER = KindPolicy(QuantGroup.DECODER)
# Measured without the simplifier, as the tables are transformed (bench/README.md §1.5).
_TABLE = KindPolicy(QuantGroup.EMBED, peak=MeasuredPeak(9.81e9, 2.10e9))

POLICY: dict[Kind, KindPolicy] = {
    Kind.VISION_EMBED: replace(_VISION, peak=MeasuredPeak(2.67e9, 0.31e9, simplified=4.78e9)),
    Kind.VISION_LAYER: replace(_VISION, peak=MeasuredPeak(1.76e9, 0.08e9, simplified=8.16e9)),
    Kind.VISION_POST: replace(_VISION, peak=MeasuredPeak(1.35e9, 0.0, simplified=1.64e9)),
    Kind.VISION_GLOBAL: replace(_VISION, peak=MeasuredPeak(1.82e9, 0.08e9, simplified=8.05e9)),
    Kind.VISION_HEAD: replace(_VISION, peak=MeasuredPeak(1.91e9, 0.13e9, simplified=2.78e9)),
    Kind.EMBED: _TABLE,
    Kind.EMBED_CACHE: _TABLE,
    Kind.SELF_PREFILL: replace(_DECODER, peak=MeasuredPeak(4.83e9, 0.87e9, simplified=10.42e9)),
    Kind.SELF_DECODE: replace(_DECODER, peak=MeasuredPeak(4.83e9, 0.87e9, simplified=10.24e9)),
    Kind.CROSS_KV: replace(_DECODER, peak=MeasuredPeak(1.54e9, 0.03e9, simplified=1.95e9)),
    Kind.CROSS_PREFILL: replace(_DECODER, peak=MeasuredPeak(4.70e9, 0.84e9, simplified=10.07e9)),
    Kind.CROSS_DECODE: replace(_DECODER, peak=MeasuredPeak(4.75e9, 0.84e9, simplified=9.96e9)),
    Kind.LM_HEAD: replace(_TABLE, quant=QuantGroup.HEAD),
    # An argmax: no weights, and no reason to round the logits.
    Kind.GREEDY_HEAD: KindPolicy(QuantGroup.F32, peak=MeasuredPeak(1.29e9, 0.0), bf16_state=False),
}


class Names:
    """The nets' input and output names, for everything that feeds or reads them."""

    PIXEL_VALUES = "pixel_values"
    ASPECT_RATIO_IDS = "aspect_ratio_ids"
    ASPECT_RATIO_MASK = "aspect_ratio_mask"
    HIDDEN = "hidden_states"
    CROSS_STATES = "cross_states"
    CROSS_K, CROSS_V = "cross_k", "cross_v"
    INPUT_IDS = "input_ids"
    POSITION_IDS = "position_ids"
    ATTENTION_MASK = "attention_mask"
    CROSS_MASK = "cross_attention_mask"
    TEXT_ROW_MASK = "text_row_mask"
    PAST_K, PAST_V = "past_k", "past_v"
    K, V = "k", "v"
    LOGITS = "logits"
    TOKEN = "token"

    @staticmethod
    def kept_layer(j: int) -> str:
        """vision_head's input for the output of vision layer j."""
        return _KEPT_LAYER.format(j)

    @staticmethod
    def kept_layer_index(name: str) -> int | None:
        """j if `name` is vision_head's input for vision layer j, else None."""
        m = re.fullmatch(_KEPT_LAYER.format(r"(\d+)"), name)
        return int(m[1]) if m else None


_KEPT_LAYER = "layer_{}"

# What the nets hand each other through resident buffers. Masks, positions, pixels, logits and
# tokens are not state: the host makes or reads them.
_STATE = frozenset({Names.HIDDEN, Names.CROSS_STATES, Names.CROSS_K, Names.CROSS_V, Names.PAST_K, Names.PAST_V,
                    Names.K, Names.V})


def is_state(name: str) -> bool:
    return name in _STATE or Names.kept_layer_index(name) is not None


def device_dtype(kind: Kind, tensor: TensorInfo, quant: str | None = None) -> str:
    """The dtype a net of `kind`, compiled as `quant`, takes or gives `tensor` in on the device
    (the ONNX graph's is tensor.dtype): bf16 for float32 state where the kind's policy says so.
    An INT8 (w8a8) net cannot take bf16 (tpu-mlir would make such an input INT8), so the w8a8
    vision nets hand each other float32 and only the cross-attention states leave them as bf16."""
    if not (kind.policy.bf16_state and tensor.dtype == "float32" and is_state(tensor.name)):
        return tensor.dtype
    if quant == Quant.W8A8 and tensor.name != Names.CROSS_STATES:
        return tensor.dtype
    return BF16


# How the nets that exist once per layer are named; the others are named after their kind.
_LAYER_NAMES = {
    Kind.VISION_LAYER: "vision_layer_{}",
    Kind.VISION_GLOBAL: "vision_global_{}",
    Kind.CROSS_KV: "cross_kv_{}",
    Kind.SELF_PREFILL: "block_{}",
    Kind.CROSS_PREFILL: "block_{}",
    Kind.SELF_DECODE: "block_cache_{}",
    Kind.CROSS_DECODE: "block_cache_{}",
}


def net_name(kind: Kind, layer: int | None = None) -> str:
    """The net of `kind` (for `layer`)."""
    return _LAYER_NAMES[kind].format(layer) if kind in _LAYER_NAMES else kind.value


def kinds_named(name: str) -> set[Kind]:
    """The kinds a net of this name can be (a block is a self- or a cross-attention layer)."""
    once = {kind for kind in Kind if kind not in _LAYER_NAMES and kind.value == name}
    return once | {kind for kind, template in _LAYER_NAMES.items() if re.fullmatch(template.format(r"\d+"), name)}


def layer_of(name: str) -> int | None:
    """The layer a per-layer net is for (None for the nets that exist once)."""
    for template in set(_LAYER_NAMES.values()):
        if m := re.fullmatch(template.format(r"(\d+)"), name):
            return int(m[1])
    return None


def block_name(layer: int, decode: bool) -> str:
    return net_name(Kind.SELF_DECODE if decode else Kind.SELF_PREFILL, layer)


@dataclass(frozen=True)
class NetSpec:
    name: str
    kind: Kind
    layer: int | None
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    # The same net at smaller prefill chunks (or decode batches), largest first: tpu-mlir
    # stages that share its weights. `inputs` and `outputs` are the largest stage's.
    smaller: tuple[NetSpec, ...] = ()

    def on_device(self, quant: str | None = None) -> NetSpec:
        """The net as a bmodel declares it, compiled as `quant`: each tensor in its device dtype."""
        def device(tensors):
            return tuple(replace(t, dtype=device_dtype(self.kind, t, quant)) for t in tensors)

        return replace(self, inputs=device(self.inputs), outputs=device(self.outputs),
                       smaller=tuple(s.on_device(quant) for s in self.smaller))

    def bf16_io(self, quant: str | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The 1-based positions of the inputs and outputs the device takes as bf16, as
        model_deploy's --quant_input_list/--quant_output_list count them."""
        device = self.on_device(quant)
        return (tuple(i + 1 for i, t in enumerate(device.inputs) if t.dtype == BF16),
                tuple(i + 1 for i, t in enumerate(device.outputs) if t.dtype == BF16))

    @property
    def stages(self) -> tuple[NetSpec, ...]:
        """Every shape of the net, largest first (the order a combined bmodel needs them in)."""
        return (self, *self.smaller)

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "kind": self.kind.value,
            "layer": self.layer,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
        }
        return d | ({"smaller": [s.to_json() for s in self.smaller]} if self.smaller else {})

    @classmethod
    def from_json(cls, d: dict) -> NetSpec:
        return cls(d["name"], Kind(d["kind"]), d["layer"], tuple(TensorInfo.from_json(t) for t in d["inputs"]),
                   tuple(TensorInfo.from_json(t) for t in d["outputs"]),
                   tuple(NetSpec.from_json(s) for s in d.get("smaller", ())))


def chunk_sizes(chunks: int | Sequence[int], seq: int) -> tuple[int, ...]:
    """The prefill chunk sizes, largest first; each between 1 and seq."""
    sizes = (chunks,) if isinstance(chunks, int) else tuple(chunks)
    bad = [c for c in sizes if not isinstance(c, int) or not 1 <= c <= seq]
    if not sizes or bad:
        raise ValueError(f"chunk sizes {list(sizes)} must be between 1 and seq {seq}")
    return tuple(sorted(set(sizes), reverse=True))


def batch_sizes(batch: int | Sequence[int]) -> tuple[int, ...]:
    """The decode batch sizes (rows of the decode nets), largest first; each 1 or more. 1 is
    always one: a lone conversation, and every prefill's first token, take it."""
    sizes = (batch,) if isinstance(batch, int) else tuple(batch)
    bad = [b for b in sizes if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if not sizes or bad:
        raise ValueError(f"batch sizes {list(sizes)} must be whole numbers of 1 or more")
    return tuple(sorted({*sizes, 1}, reverse=True))


def batch_for(rows: int, batch: Sequence[int]) -> int:
    """The decode stage to run `rows` conversations in: the smallest that holds them all."""
    fitting = [b for b in batch if b >= rows]
    if not fitting:
        raise ValueError(f"{rows} rows do not fit the decode nets' largest batch {max(batch)}")
    return min(fitting)


def chunk_for(tokens: int, chunks: Sequence[int]) -> int:
    """The chunk to prefill `tokens` more tokens with: the smallest that holds them all,
    else the largest (the rest goes in later chunks)."""
    fitting = [c for c in chunks if c >= tokens]
    return min(fitting) if fitting else max(chunks)


def _t(name: str, *shape: int, dtype: str = "float32") -> TensorInfo:
    return TensorInfo(name, tuple(shape), dtype)


def padded_patches(patches_per_tile: int) -> int:
    """transformers' vision tower pads each tile's patches to a multiple of 8."""
    return patches_per_tile + (8 - patches_per_tile % 8) % 8


def vision_nets(spec: ModelSpec) -> list[NetSpec]:
    t, v, n = spec.text, spec.vision, Names
    T, I, W = v.max_num_tiles, v.image_size, v.hidden_size
    N = T * padded_patches(v.patches_per_tile)
    ids, tiles = _t(n.ASPECT_RATIO_IDS, 1, 1, dtype="int32"), _t(n.ASPECT_RATIO_MASK, 1, 1, T, dtype="int32")
    hidden = _t(n.HIDDEN, 1, N, W)

    def net(kind: Kind, layer: int | None, inputs, outputs) -> NetSpec:
        return NetSpec(net_name(kind, layer), kind, layer, tuple(inputs), tuple(outputs))

    nets = [net(Kind.VISION_EMBED, None, (_t(n.PIXEL_VALUES, 1, 1, T, v.num_channels, I, I), ids), (hidden,))]
    nets += [net(Kind.VISION_LAYER, j, (hidden, tiles), (hidden,)) for j in range(v.num_layers)]
    nets.append(net(Kind.VISION_POST, None, (hidden, ids), (hidden,)))
    nets += [net(Kind.VISION_GLOBAL, j, (hidden, tiles), (hidden,)) for j in range(v.num_global_layers)]
    intermediate = tuple(_t(n.kept_layer(j), 1, N, W) for j in v.kept_layers)
    nets.append(net(Kind.VISION_HEAD, None, (hidden, *intermediate), (_t(n.CROSS_STATES, 1, v.tokens_per_image, t.hidden_size),)))
    return nets


def plan(spec: ModelSpec, seq: int, chunks: int | Sequence[int], batch: int | Sequence[int] = DEFAULT_BATCH,
         verify: int = 0) -> list[NetSpec]:
    """Every net of a model compiled for `seq` cache slots and prefill in chunks of the
    given sizes (one size, or several: the prefill nets then carry the smaller ones as stages),
    and decode in batches of `batch` rows (the decode nets' stages, likewise). `verify`: rows of
    a prefill chunk the heads also score in one launch (speculative decoding's check of a
    draft's k tokens and one more; 0: none), as a stage of [1, verify] rows beside the batches'
    [B, 1]; at most the largest chunk, whose hidden states they are."""
    sizes = chunk_sizes(chunks, seq)
    rows = batch_sizes(batch)
    if isinstance(verify, bool) or not isinstance(verify, int) or verify == 1 or not 0 <= verify <= max(sizes):
        raise ValueError(f"verify rows {verify} must be 0 (none) or 2 to the largest prefill chunk {max(sizes)}")
    t, v, n = spec.text, spec.vision, Names
    D, KV, d = t.hidden_size, t.num_kv_heads, t.head_dim
    V = v.tokens_per_image if v is not None else 0  # only cross-attention layers read it
    S = seq

    def net(kind: Kind, layer: int | None, inputs, outputs) -> NetSpec:
        return NetSpec(net_name(kind, layer), kind, layer, tuple(inputs), tuple(outputs))

    def embed(C: int) -> NetSpec:
        return net(Kind.EMBED, None, (_t(n.INPUT_IDS, 1, C, dtype="int32"),), (_t(n.HIDDEN, 1, C, D),))

    def block(layer: int, C: int, decode: bool, B: int = 1) -> NetSpec:
        if t.is_cross(layer):
            kind = Kind.CROSS_DECODE if decode else Kind.CROSS_PREFILL
            inputs = (
                _t(n.HIDDEN, B, C, D),
                _t(n.CROSS_K, B, KV, V, d),
                _t(n.CROSS_V, B, KV, V, d),
                _t(n.CROSS_MASK, B, 1, C, V),
                _t(n.TEXT_ROW_MASK, B, 1, C, 1),
            )
            outputs = (_t(n.HIDDEN, B, C, D),)
        else:
            kind = Kind.SELF_DECODE if decode else Kind.SELF_PREFILL
            inputs = (
                _t(n.HIDDEN, B, C, D),
                _t(n.POSITION_IDS, B, C, dtype="int32"),
                _t(n.ATTENTION_MASK, B, 1, C, S + C),
                _t(n.PAST_K, B, S, KV, d),
                _t(n.PAST_V, B, S, KV, d),
            )
            outputs = (_t(n.HIDDEN, B, C, D), _t(n.K, B, C, KV, d), _t(n.V, B, C, KV, d))
        return net(kind, layer, inputs, outputs)

    def staged(make, over=sizes) -> NetSpec:
        largest, *smaller = (make(x) for x in over)
        return replace(largest, smaller=tuple(smaller))

    def batched(make) -> NetSpec:
        return staged(make, rows)

    # The heads' stages: a decode batch's B rows of one token, and a check's R tokens of one
    # row (the chunk's hidden states as they lie), largest first.
    head_shapes = sorted([(B, 1) for B in rows] + ([(1, verify)] if verify else []), key=lambda s: (-s[0] * s[1], -s[0]))
    picks = sorted({*rows, *([verify] if verify else [])}, reverse=True)

    nets = vision_nets(spec) if not spec.text_only else []
    nets += [
        net(Kind.CROSS_KV, layer, (_t(n.CROSS_STATES, 1, V, D),), (_t(n.CROSS_K, 1, KV, V, d), _t(n.CROSS_V, 1, KV, V, d)))
        for layer in t.cross_attention_layers
    ]
    nets += [
        staged(embed),
        batched(lambda B: net(Kind.EMBED_CACHE, None, (_t(n.INPUT_IDS, B, 1, dtype="int32"),), (_t(n.HIDDEN, B, 1, D),))),
    ]
    for layer in range(t.num_layers):
        nets.append(staged(lambda C, layer=layer: block(layer, C, decode=False)))
        nets.append(batched(lambda B, layer=layer: block(layer, 1, decode=True, B=B)))
    nets += [
        staged(lambda s: net(Kind.LM_HEAD, None, (_t(n.HIDDEN, *s, D),), (_t(n.LOGITS, s[0] * s[1], t.vocab_size),)),
               head_shapes),
        staged(lambda B: net(Kind.GREEDY_HEAD, None, (_t(n.LOGITS, B, t.vocab_size),), (_t(n.TOKEN, B, 1, dtype="int32"),)),
               picks),
    ]
    return nets
