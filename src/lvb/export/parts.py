"""One small declarative class per exported part: which weights it reads, the
PyTorch module it exports (transformers' own layers), the inputs it is
checked on (how close onnxruntime must come to PyTorch is lvb.check's table).

Adding a part is adding a class here, registered with @part for its kinds of
net, and its nets in lvb.contract (README, "Adding a kind of net").
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from lvb.contract import Kind, Names, NetSpec
from lvb.export.weights import CheckpointWeights
from lvb.masks import cross_attention_mask, self_attention_mask
from lvb.patches import padded_tokens
from lvb.spec import ModelSpec

TEXT = "language_model.model."


def _on_meta(factory):
    """Build a module without allocating its weights; load_state_dict(assign=True) brings them."""
    with torch.device("meta"):
        return factory()


def _load(module: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    module.load_state_dict(weights, strict=True, assign=True)
    return module.eval()


class _KVCache:
    """Stands in for transformers' Cache inside one layer: past K/V in, new K/V out.

    The self-attention nets keep their cache token-major ([1, tokens, KV heads, head dim])
    so the runtime writes one token's K/V as one contiguous copy; transformers works
    head-major, hence the transposes. An image's cross-attention K/V are written whole, once,
    so they stay head-major ([1, KV heads, tokens, head dim]), as the attention reads them:
    no transpose of 6,404 positions in every cross-attention layer's every step.
    """

    def __init__(self, layer: int, past_k=None, past_v=None, tokens_axis: int = 2):
        self.past_k, self.past_v, self.tokens_axis = past_k, past_v, tokens_axis
        self.new_k = self.new_v = None
        self.layers = {}
        if past_k is not None:
            self.layers[layer] = type("CachedLayer", (), {"keys": past_k, "values": past_v})()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_k, self.new_v = key_states, value_states
        if self.past_k is None:
            return key_states, value_states
        axis = self.tokens_axis
        return torch.cat([self.past_k, key_states], dim=axis), torch.cat([self.past_v, value_states], dim=axis)


def _head_major(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


# The vision tower, one net per encoder layer. transformers' MllamaVisionModel.forward
# runs them all in one call; the glue between its submodules is restated here step
# for step (same modules, same order) so that each layer streams on its own, and
# tests/test_export.py checks the chain against the whole transformers tower.


class VisionEmbed(nn.Module):
    """Patches, tile and position embeddings, class token, pre-norm, padding."""

    def __init__(self, parts: nn.Module, tiles: int, padded: int):
        super().__init__()
        self.parts, self.tiles, self.padded = parts, tiles, padded

    def forward(self, pixel_values, aspect_ratio_ids):
        p = self.parts
        ids = aspect_ratio_ids.reshape(1, -1).long()
        _, _, tiles, channels, height, width = pixel_values.shape
        patches = p.patch_embedding(pixel_values.reshape(tiles, channels, height, width)).flatten(2).transpose(1, 2)
        dim = patches.shape[-1]
        hidden = p.pre_tile_positional_embedding(patches.reshape(1, tiles, -1, dim), ids)
        hidden = hidden.reshape(tiles, -1, dim)
        hidden = torch.cat([p.class_embedding.expand(tiles, 1, dim), hidden], dim=1)
        hidden = p.gated_positional_embedding(hidden.reshape(1, tiles, -1, dim), ids)
        hidden = p.layernorm_pre(hidden)
        hidden = nn.functional.pad(hidden, (0, 0, 0, self.padded - hidden.shape[2]), mode="constant", value=0)
        return hidden.reshape(1, -1, dim)


class VisionLayer(nn.Module):
    """One local or global encoder layer; the padding is worked out from the tile flags."""

    def __init__(self, layer: nn.Module, patches: int, padded: int):
        super().__init__()
        self.layer, self.patches, self.padded = layer, patches, padded

    def forward(self, hidden_states, aspect_ratio_mask):
        # The mask as the padding flags, which the patched attention adds as a channel
        # (patches.PaddedTokens); transformers' layer passes it through untouched.
        padded = padded_tokens(aspect_ratio_mask.reshape(1, -1).long(), self.patches, self.padded, hidden_states.dtype)
        return self.layer(hidden_states, attention_mask=padded)


class VisionPost(nn.Module):
    """Post-norm and the tile embedding before the global layers."""

    def __init__(self, parts: nn.Module, tiles: int, padded: int):
        super().__init__()
        self.parts, self.tiles, self.padded = parts, tiles, padded

    def forward(self, hidden_states, aspect_ratio_ids):
        hidden = self.parts.layernorm_post(hidden_states)
        hidden = hidden.reshape(1, self.tiles, self.padded, -1)
        hidden = self.parts.post_tile_positional_embedding(hidden, aspect_ratio_ids.reshape(1, -1).long())
        return hidden.reshape(1, self.tiles * self.padded, -1)


class VisionHead(nn.Module):
    """Drop the padding, join the intermediate layers' outputs, project to the text width.

    Takes each kept layer's output once; `picks` orders (and repeats) them as the config's
    intermediate_layers_indices do."""

    def __init__(self, projector: nn.Linear, tiles: int, patches: int, padded: int, text_hidden: int, picks: tuple[int, ...]):
        super().__init__()
        self.projector, self.tiles, self.patches, self.padded, self.text_hidden = projector, tiles, patches, padded, text_hidden
        self.picks = picks

    def forward(self, hidden_states, *kept):
        final = hidden_states.reshape(1, self.tiles, self.padded, -1)[:, :, : self.patches]
        stacked = torch.stack([kept[i] for i in self.picks], dim=-1).reshape(1, self.tiles, self.padded, -1)[:, :, : self.patches]
        states = torch.cat([final, stacked], dim=-1)
        return self.projector(states).reshape(1, -1, self.text_hidden)


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(weight, freeze=True)

    def forward(self, input_ids):
        return self.table(input_ids.long())


class RotaryTable(nn.Module):
    """transformers' rotary cos/sin of every position a net can see, computed once at export
    in fp32 and looked up by position. Computed in the net, a BF16 bmodel rounds the angle
    (position x inverse frequency) to bf16: at position 95 the angles were 0.016 rad off
    (cos/sin 1-3 % off, the largest error of a self-attention block), and above position 256
    the position itself is rounded."""

    def __init__(self, rotary: nn.Module, positions: int):
        super().__init__()
        cos, sin = rotary(torch.zeros(1), torch.arange(positions)[None])
        self.register_buffer("cos", cos[0].contiguous())
        self.register_buffer("sin", sin[0].contiguous())

    def forward(self, position_ids):
        return self.cos[position_ids], self.sin[position_ids]


class SelfAttentionBlock(nn.Module):
    def __init__(self, layer: nn.Module, rotary: RotaryTable):
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, hidden_states, position_ids, attention_mask, past_k, past_v):
        position_embeddings = self.rotary(position_ids.long())
        # Token-major throughout (patches.token_major_self_attention), as the cache is kept.
        cache = _KVCache(self.layer.layer_idx, past_k, past_v, tokens_axis=1)
        hidden_states = self.layer(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids.long(),
            cache=cache,
        )
        return hidden_states, cache.new_k, cache.new_v


class CrossKV(nn.Module):
    """A cross-attention layer's K/V of one image, computed by transformers' own
    attention module (its query side runs on a dummy token and is pruned from
    the graph, since no output depends on it)."""

    def __init__(self, attention: nn.Module, hidden_size: int):
        super().__init__()
        self.attention, self.hidden_size = attention, hidden_size

    def forward(self, cross_states):
        cache = _KVCache(self.attention.layer_idx)
        self.attention(
            hidden_states=cross_states[:, :1],
            cross_attention_states=cross_states,
            cache=cache,
            attention_mask=None,
        )
        return cache.new_k, cache.new_v


class CrossAttentionBlock(nn.Module):
    """C tokens (a prefill chunk) or one (decode) against the image's cached K/V."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cross_k, cross_v, cross_attention_mask, text_row_mask):
        cache = _KVCache(self.layer.layer_idx, cross_k, cross_v)
        return self.layer(
            hidden_states,
            cross_attention_states=None,
            cross_attention_mask=cross_attention_mask,
            attention_mask=None,
            full_text_row_masked_out_mask=text_row_mask,
            cache=cache,
        )


class LmHead(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Linear, staged: bool = False):
        super().__init__()
        self.norm, self.head, self.staged = norm, head, staged

    def forward(self, hidden_states):
        logits = self.head(self.norm(hidden_states))
        # [B, 1, vocab] (a decode batch) or [1, R, vocab] (a check's rows) -> [B * R, vocab]; a
        # staged net's two row axes are symbolic in its graph.
        # One Flatten: a reshape to logits.shape[-1] would compute its target in the graph (Shape,
        # Gather, Concat; the vocabulary is a traced stand-in's), which tpu-mlir's transform of an
        # 11B-width head answers by running out of memory.
        return logits.flatten(0, 1) if self.staged else logits.reshape(1, -1)


class GreedyHead(nn.Module):
    def forward(self, logits):
        return torch.argmax(logits, dim=-1, keepdim=True).to(torch.int32)


class Part:
    kinds: ClassVar[tuple[Kind, ...]]  # set by @part
    # Whether the nets of one layer (all its kinds) are the same module at other shapes.
    shared_module: ClassVar[bool] = True
    # Vocabulary-sized parameters (module name -> checkpoint name) traced as a stand-in of a
    # few rows and written from the checkpoint afterwards (lvb.export.exporter.StandIn).
    stand_ins: ClassVar[dict[str, str]] = {}
    # Raised when the graph a part traces changes, so that exports of the old graph are not
    # reused (part of the net's cache key).
    revision: ClassVar[int] = 0

    def weight_prefixes(self, net: NetSpec, spec: ModelSpec) -> tuple[str, ...]:
        """The checkpoint prefixes of the net's weights: what it loads, and what its cache key digests."""
        return ()

    def build(self, net: NetSpec, spec: ModelSpec, config, tensors: list[dict[str, torch.Tensor]]) -> nn.Module:
        """The module, from the tensors under each of weight_prefixes (in that order, prefix removed)."""
        raise NotImplementedError

    def module(self, net: NetSpec, spec: ModelSpec, config, weights: CheckpointWeights) -> nn.Module:
        """The net's PyTorch module with its weights, read from the checkpoint once."""
        return self.build(net, spec, config, [weights.load(prefix) for prefix in self.weight_prefixes(net, spec)])

    def dummy_inputs(self, net: NetSpec, spec: ModelSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random values of the net's shapes, with masks, ids and positions that make sense."""
        return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in net.inputs}


PARTS: dict[Kind, Part] = {}


def part(*kinds: Kind):
    """Register a Part class as the exporter of `kinds` of net."""

    def register(cls: type[Part]) -> type[Part]:
        cls.kinds = kinds
        instance = cls()
        for kind in kinds:
            if kind in PARTS:
                raise TypeError(f"{cls.__name__}: {kind.value} is already exported by {type(PARTS[kind]).__name__}")
            PARTS[kind] = instance
        return cls

    return register


VISION = "vision_model."


class _VisionGeometry:
    @staticmethod
    def sizes(spec: ModelSpec) -> tuple[int, int, int]:
        from lvb.contract import padded_patches

        v = spec.vision
        return v.max_num_tiles, v.patches_per_tile, padded_patches(v.patches_per_tile)

    @staticmethod
    def tile_inputs(net: NetSpec, spec: ModelSpec, inputs: dict) -> dict:
        """An image that fills some but not all tiles exercises the tile masks."""
        ratios = spec.vision.supported_aspect_ratios
        partial = [i for i, (rows, cols) in enumerate(ratios) if rows * cols < spec.vision.max_num_tiles]
        index = partial[-1] if partial else len(ratios) - 1
        tiles = ratios[index][0] * ratios[index][1]
        if "aspect_ratio_ids" in inputs:
            inputs["aspect_ratio_ids"] = np.array([[index + 1]], dtype=np.int32)
        if "aspect_ratio_mask" in inputs:
            inputs["aspect_ratio_mask"] = (np.arange(spec.vision.max_num_tiles) < tiles).astype(np.int32)[None, None]
        return inputs


def _vision_parts(config, names: tuple[str, ...], tensors: list[dict[str, torch.Tensor]]) -> nn.Module:
    """The tower's small submodules named in `names`, built by transformers itself
    (a tower without encoder layers), holding only their own weights: tensors[i] are
    those under VISION + names[i]."""
    from transformers.models.mllama.modeling_mllama import MllamaVisionModel

    vision = config.vision_config
    without_layers = vision.__class__(**(vision.to_dict() | {"num_hidden_layers": 0, "num_global_layers": 0}))
    without_layers._attn_implementation = "eager"
    with torch.device("meta"):
        tower = MllamaVisionModel(without_layers)
    holder = nn.Module()
    state = {}
    for name, loaded in zip(names, tensors, strict=True):
        submodule = getattr(tower, name)
        if isinstance(submodule, nn.Parameter):
            holder.register_parameter(name, submodule)
        else:
            holder.add_module(name, submodule)
        state |= {name + key: value for key, value in loaded.items()}  # keys are "" or ".<tensor>"
    return _load(holder, state)


@part(Kind.VISION_EMBED)
class VisionEmbedPart(Part, _VisionGeometry):
    NAMES = ("patch_embedding", "class_embedding", "pre_tile_positional_embedding", "gated_positional_embedding", "layernorm_pre")

    def weight_prefixes(self, net, spec):
        return tuple(VISION + n for n in self.NAMES)

    def build(self, net, spec, config, tensors):
        tiles, _, padded = self.sizes(spec)
        return VisionEmbed(_vision_parts(config, self.NAMES, tensors), tiles, padded)

    def dummy_inputs(self, net, spec, rng):
        return self.tile_inputs(net, spec, super().dummy_inputs(net, spec, rng))


@part(Kind.VISION_LAYER, Kind.VISION_GLOBAL)
class VisionLayerPart(Part, _VisionGeometry):
    shared_module = False  # local layer j and global layer j are different layers
    revision = 2  # 1: the mask as a padding channel of queries and keys (patches.PaddedTokens); 2: each
    # side of the channel scaled before it is expanded to the heads (patches.padding_channel)

    def _prefix(self, net):
        return f"{VISION}{'transformer' if net.kind is Kind.VISION_LAYER else 'global_transformer'}.layers.{net.layer}."

    def weight_prefixes(self, net, spec):
        return (self._prefix(net),)

    def build(self, net, spec, config, tensors):
        from transformers.models.mllama.modeling_mllama import MllamaVisionEncoderLayer

        vision = config.vision_config
        layer = _load(_on_meta(lambda: MllamaVisionEncoderLayer(vision, is_gated=net.kind is Kind.VISION_GLOBAL)), tensors[0])
        _, patches, padded = self.sizes(spec)
        return VisionLayer(layer, patches, padded)

    def dummy_inputs(self, net, spec, rng):
        return self.tile_inputs(net, spec, super().dummy_inputs(net, spec, rng))


@part(Kind.VISION_POST)
class VisionPostPart(Part, _VisionGeometry):
    NAMES = ("layernorm_post", "post_tile_positional_embedding")

    def weight_prefixes(self, net, spec):
        return tuple(VISION + n for n in self.NAMES)

    def build(self, net, spec, config, tensors):
        tiles, _, padded = self.sizes(spec)
        return VisionPost(_vision_parts(config, self.NAMES, tensors), tiles, padded)

    def dummy_inputs(self, net, spec, rng):
        return self.tile_inputs(net, spec, super().dummy_inputs(net, spec, rng))


@part(Kind.VISION_HEAD)
class VisionHeadPart(Part, _VisionGeometry):
    def weight_prefixes(self, net, spec):
        return ("multi_modal_projector.",)

    def build(self, net, spec, config, tensors):
        (projector_weights,) = tensors
        out_dim, in_dim = projector_weights["weight"].shape
        projector = _load(_on_meta(lambda: nn.Linear(in_dim, out_dim, bias=True)), projector_weights)
        tiles, patches, padded = self.sizes(spec)
        v = spec.vision
        picks = tuple(v.kept_layers.index(j) for j in v.intermediate_layers_indices)
        return VisionHead(projector, tiles, patches, padded, config.text_config.hidden_size, picks)


@part(Kind.EMBED, Kind.EMBED_CACHE)
class EmbeddingPart(Part):
    PREFIX = TEXT + "embed_tokens."
    stand_ins = {"table.weight": PREFIX + "weight"}

    def weight_prefixes(self, net, spec):
        return (self.PREFIX,)

    def build(self, net, spec, config, tensors):
        return Embedding(tensors[0]["weight"]).eval()

    def dummy_inputs(self, net, spec, rng):
        shape = net.inputs[0].shape
        ids = rng.integers(0, spec.text.vocab_size, size=shape).astype(np.int32)
        if spec.image_token_id is not None:
            ids.flat[0] = spec.image_token_id  # beyond the LM vocabulary, inside the table
        return {"input_ids": ids}


@part(Kind.SELF_PREFILL, Kind.SELF_DECODE)
class SelfAttentionPart(Part):
    revision = 4  # 1: rotary cos/sin looked up in a table (RotaryTable); 2: the table covers a last chunk's padding;
    # 3: query heads grouped per K/V head (patches.grouped_query_attention); 4: a short chunk's query heads stacked
    # per K/V head (patches.STACKED_QUERIES_UP_TO)

    def weight_prefixes(self, net, spec):
        return (f"{TEXT}layers.{net.layer}.",)

    def build(self, net, spec, config, tensors):
        from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding, MllamaSelfAttentionDecoderLayer

        text = config.text_config
        layer = _load(_on_meta(lambda: MllamaSelfAttentionDecoderLayer(text, net.layer)), tensors[0])
        # Every position a row can have: the cache's slots, and the padded rows of a last chunk
        # that runs past them (positions up to seq - 1 + chunk - 1; their outputs are not kept).
        shape = {t.name: t.shape for t in net.inputs}
        positions = shape[Names.PAST_K][1] + shape[Names.HIDDEN][1]
        return SelfAttentionBlock(layer, RotaryTable(MllamaRotaryEmbedding(text).eval(), positions))

    def dummy_inputs(self, net, spec, rng):
        inputs = super().dummy_inputs(net, spec, rng)
        rows, chunk = net.inputs[0].shape[:2]
        seq = net.inputs[3].shape[1]
        past = (seq - chunk) // 2 if chunk > 1 else seq // 2
        # The rows of a decode batch (conversations) are at different positions.
        pasts = [(past + row * (seq // 3 + 1)) % (seq + 1) for row in range(rows)]
        inputs["position_ids"] = np.stack([p + np.arange(chunk, dtype=np.int32) for p in pasts])
        inputs["attention_mask"] = np.concatenate([self_attention_mask(p, chunk, seq) for p in pasts])
        return inputs


@part(Kind.CROSS_KV)
class CrossKVPart(Part):
    revision = 1  # 1: K/V head-major

    def weight_prefixes(self, net, spec):
        return (f"{TEXT}layers.{net.layer}.cross_attn.",)

    def build(self, net, spec, config, tensors):
        from transformers.models.mllama.modeling_mllama import MllamaTextCrossAttention

        text = config.text_config
        attention = _load(_on_meta(lambda: MllamaTextCrossAttention(text, net.layer)), tensors[0])
        return CrossKV(attention, text.hidden_size)


@part(Kind.CROSS_PREFILL, Kind.CROSS_DECODE)
class CrossAttentionPart(Part):
    revision = 1  # 1: K/V head-major, query heads grouped per K/V head (patches.grouped_query_attention)

    def weight_prefixes(self, net, spec):
        return (f"{TEXT}layers.{net.layer}.",)

    def build(self, net, spec, config, tensors):
        from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

        text = config.text_config
        layer = _load(_on_meta(lambda: MllamaCrossAttentionDecoderLayer(text, net.layer)), tensors[0])
        return CrossAttentionBlock(layer)

    def dummy_inputs(self, net, spec, rng):
        inputs = super().dummy_inputs(net, spec, rng)
        chunk = net.inputs[0].shape[1]
        # Some tokens before the image (fully masked rows) and an image short of the tile maximum.
        sees_image = np.arange(chunk) >= chunk // 4
        tiles = max(1, spec.vision.max_num_tiles - 1)
        masks = cross_attention_mask(sees_image, tiles, spec.vision.max_num_tiles, spec.vision.patches_per_tile)
        rows = net.inputs[0].shape[0]
        if rows > 1:
            # A decode batch: the last row is a conversation without a picture (zero V, row masked out).
            masks = tuple(np.repeat(m, rows, axis=0) for m in masks)
            masks[1][-1] = 0.0
            inputs["cross_v"][-1] = 0.0
        inputs["cross_attention_mask"], inputs["text_row_mask"] = masks
        return inputs


@part(Kind.LM_HEAD)
class LmHeadPart(Part):
    revision = 1  # 1: a staged head flattens [B, R, vocab] (stages of [1, R] rows beside [B, 1])
    HEAD = "language_model.lm_head."
    stand_ins = {"head.weight": HEAD + "weight"}

    def weight_prefixes(self, net, spec):
        return (TEXT + "norm.", self.HEAD)

    def build(self, net, spec, config, tensors):
        from transformers.models.mllama.modeling_mllama import MllamaTextRMSNorm

        text = config.text_config
        norm_weights, head_weights = tensors
        norm = _load(_on_meta(lambda: MllamaTextRMSNorm(text.hidden_size, eps=text.rms_norm_eps)), norm_weights)
        vocab, hidden = head_weights["weight"].shape
        head = _load(_on_meta(lambda: nn.Linear(hidden, vocab, bias=False)), head_weights)
        return LmHead(norm, head, staged=bool(net.smaller))


@part(Kind.GREEDY_HEAD)
class GreedyHeadPart(Part):
    def build(self, net, spec, config, tensors):
        return GreedyHead()
