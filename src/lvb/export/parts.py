"""One small declarative class per exported part: which weights it reads, the
PyTorch module it exports (transformers' own layers), the inputs it is
checked on, and how close onnxruntime must come to PyTorch.

Adding a part is adding a class here and a NetSpec in lvb.contract.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import nn

from lvb.contract import Kind, NetSpec
from lvb.export.weights import CheckpointWeights
from lvb.runtime.masks import cross_attention_mask, self_attention_mask
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

    The nets keep K/V token-major ([1, tokens, KV heads, head dim]) so the
    runtime writes one token's K/V as one contiguous copy; transformers works
    head-major, hence the transposes.
    """

    def __init__(self, layer: int, past_k=None, past_v=None):
        self.past_k, self.past_v = past_k, past_v
        self.new_k = self.new_v = None
        self.layers = {}
        if past_k is not None:
            self.layers[layer] = type("CachedLayer", (), {"keys": past_k, "values": past_v})()

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.new_k, self.new_v = key_states, value_states
        if self.past_k is None:
            return key_states, value_states
        return torch.cat([self.past_k, key_states], dim=2), torch.cat([self.past_v, value_states], dim=2)


def _head_major(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(1, 2)


class VisionTower(nn.Module):
    def __init__(self, vision, projector, hidden_size: int):
        super().__init__()
        self.vision, self.projector, self.hidden_size = vision, projector, hidden_size

    def forward(self, pixel_values, aspect_ratio_ids, aspect_ratio_mask):
        states = self.vision(
            pixel_values=pixel_values, aspect_ratio_ids=aspect_ratio_ids.long(), aspect_ratio_mask=aspect_ratio_mask.long()
        ).last_hidden_state
        return self.projector(states).reshape(1, -1, self.hidden_size)


class Embedding(nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.table = nn.Embedding.from_pretrained(weight, freeze=True)

    def forward(self, input_ids):
        return self.table(input_ids.long())


class SelfAttentionBlock(nn.Module):
    def __init__(self, layer: nn.Module, rotary: nn.Module):
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, hidden_states, position_ids, attention_mask, past_k, past_v):
        position_embeddings = self.rotary(hidden_states, position_ids.long())
        cache = _KVCache(self.layer.layer_idx, _head_major(past_k), _head_major(past_v))
        hidden_states = self.layer(
            hidden_states,
            attention_mask=attention_mask,
            position_embeddings=position_embeddings,
            position_ids=position_ids.long(),
            cache=cache,
        )
        return hidden_states, _head_major(cache.new_k), _head_major(cache.new_v)


class CrossAttentionPrefill(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cross_states, cross_attention_mask, text_row_mask):
        cache = _KVCache(self.layer.layer_idx)
        hidden_states = self.layer(
            hidden_states,
            cross_attention_states=cross_states,
            cross_attention_mask=cross_attention_mask,
            attention_mask=None,
            full_text_row_masked_out_mask=text_row_mask,
            cache=cache,
        )
        return hidden_states, _head_major(cache.new_k), _head_major(cache.new_v)


class CrossAttentionDecode(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, hidden_states, cross_k, cross_v, cross_attention_mask, text_row_mask):
        cache = _KVCache(self.layer.layer_idx, _head_major(cross_k), _head_major(cross_v))
        return self.layer(
            hidden_states,
            cross_attention_states=None,
            cross_attention_mask=cross_attention_mask,
            attention_mask=None,
            full_text_row_masked_out_mask=text_row_mask,
            cache=cache,
        )


class LmHead(nn.Module):
    def __init__(self, norm: nn.Module, head: nn.Linear):
        super().__init__()
        self.norm, self.head = norm, head

    def forward(self, hidden_states):
        return self.head(self.norm(hidden_states)).reshape(1, -1)


class GreedyHead(nn.Module):
    def forward(self, logits):
        return torch.argmax(logits, dim=-1, keepdim=True).to(torch.int32)


class Part:
    kinds: ClassVar[tuple[Kind, ...]]
    # onnxruntime vs PyTorch, both fp32: what "the same" means for this part.
    min_cosine: ClassVar[float] = 0.99999
    max_relative_error: ClassVar[float] = 1e-3  # of the largest reference magnitude

    def weight_prefixes(self, net: NetSpec, spec: ModelSpec) -> tuple[str, ...]:
        raise NotImplementedError

    def build(self, net: NetSpec, config, weights: CheckpointWeights) -> nn.Module:
        raise NotImplementedError

    def dummy_inputs(self, net: NetSpec, spec: ModelSpec, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Random values of the net's shapes, with masks, ids and positions that make sense."""
        return {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in net.inputs}


class VisionPart(Part):
    kinds = (Kind.VISION,)

    def weight_prefixes(self, net, spec):
        return ("vision_model.", "multi_modal_projector.")

    def build(self, net, config, weights):
        from transformers.models.mllama.modeling_mllama import MllamaVisionModel

        vision = _load(_on_meta(lambda: MllamaVisionModel(config.vision_config)), weights.load("vision_model."))
        projector_weights = weights.load("multi_modal_projector.")
        out_dim, in_dim = projector_weights["weight"].shape
        projector = _load(_on_meta(lambda: nn.Linear(in_dim, out_dim, bias=True)), projector_weights)
        return VisionTower(vision, projector, config.text_config.hidden_size)

    def dummy_inputs(self, net, spec, rng):
        inputs = super().dummy_inputs(net, spec, rng)
        ratios = spec.vision.supported_aspect_ratios
        # An image that fills some but not all tiles exercises the tile masks.
        partial = [i for i, (rows, cols) in enumerate(ratios) if rows * cols < spec.vision.max_num_tiles]
        index = partial[-1] if partial else len(ratios) - 1
        tiles = ratios[index][0] * ratios[index][1]
        inputs["aspect_ratio_ids"] = np.array([[index + 1]], dtype=np.int32)
        inputs["aspect_ratio_mask"] = (np.arange(spec.vision.max_num_tiles) < tiles).astype(np.int32)[None, None]
        return inputs


class EmbeddingPart(Part):
    kinds = (Kind.EMBED, Kind.EMBED_CACHE)

    def weight_prefixes(self, net, spec):
        return (TEXT + "embed_tokens.",)

    def build(self, net, config, weights):
        return Embedding(weights.load(TEXT + "embed_tokens.")["weight"]).eval()

    def dummy_inputs(self, net, spec, rng):
        shape = net.inputs[0].shape
        ids = rng.integers(0, spec.text.vocab_size, size=shape).astype(np.int32)
        ids.flat[0] = spec.image_token_id  # beyond the LM vocabulary, inside the table
        return {"input_ids": ids}


class SelfAttentionPart(Part):
    kinds = (Kind.SELF_PREFILL, Kind.SELF_DECODE)

    def weight_prefixes(self, net, spec):
        return (f"{TEXT}layers.{net.layer}.",)

    def build(self, net, config, weights):
        from transformers.models.mllama.modeling_mllama import MllamaRotaryEmbedding, MllamaSelfAttentionDecoderLayer

        text = config.text_config
        layer = _load(_on_meta(lambda: MllamaSelfAttentionDecoderLayer(text, net.layer)), weights.load(f"{TEXT}layers.{net.layer}."))
        return SelfAttentionBlock(layer, MllamaRotaryEmbedding(text).eval())

    def dummy_inputs(self, net, spec, rng):
        inputs = super().dummy_inputs(net, spec, rng)
        chunk = net.inputs[0].shape[1]
        seq = net.inputs[3].shape[1]
        past = (seq - chunk) // 2 if chunk > 1 else seq // 2
        inputs["position_ids"] = (past + np.arange(chunk, dtype=np.int32))[None]
        inputs["attention_mask"] = self_attention_mask(past, chunk, seq)
        return inputs


class CrossAttentionPart(Part):
    kinds = (Kind.CROSS_PREFILL, Kind.CROSS_DECODE)

    def weight_prefixes(self, net, spec):
        return (f"{TEXT}layers.{net.layer}.",)

    def build(self, net, config, weights):
        from transformers.models.mllama.modeling_mllama import MllamaCrossAttentionDecoderLayer

        text = config.text_config
        layer = _load(_on_meta(lambda: MllamaCrossAttentionDecoderLayer(text, net.layer)), weights.load(f"{TEXT}layers.{net.layer}."))
        return CrossAttentionPrefill(layer) if net.kind is Kind.CROSS_PREFILL else CrossAttentionDecode(layer)

    def dummy_inputs(self, net, spec, rng):
        inputs = super().dummy_inputs(net, spec, rng)
        chunk = net.inputs[0].shape[1]
        # Some tokens before the image (fully masked rows) and an image short of the tile maximum.
        sees_image = np.arange(chunk) >= chunk // 4
        tiles = max(1, spec.vision.max_num_tiles - 1)
        inputs["cross_attention_mask"], inputs["text_row_mask"] = cross_attention_mask(
            sees_image, tiles, spec.vision.max_num_tiles, spec.vision.patches_per_tile
        )
        return inputs


class LmHeadPart(Part):
    kinds = (Kind.LM_HEAD,)

    def weight_prefixes(self, net, spec):
        return (TEXT + "norm.", "language_model.lm_head.")

    def build(self, net, config, weights):
        from transformers.models.mllama.modeling_mllama import MllamaTextRMSNorm

        text = config.text_config
        norm = _load(_on_meta(lambda: MllamaTextRMSNorm(text.hidden_size, eps=text.rms_norm_eps)), weights.load(TEXT + "norm."))
        head_weights = weights.load("language_model.lm_head.")
        vocab, hidden = head_weights["weight"].shape
        head = _load(_on_meta(lambda: nn.Linear(hidden, vocab, bias=False)), head_weights)
        return LmHead(norm, head)


class GreedyHeadPart(Part):
    kinds = (Kind.GREEDY_HEAD,)
    min_cosine = 1.0
    max_relative_error = 0.0

    def weight_prefixes(self, net, spec):
        return ()

    def build(self, net, config, weights):
        return GreedyHead()


PARTS: dict[Kind, Part] = {kind: part for part in (
    VisionPart(), EmbeddingPart(), SelfAttentionPart(), CrossAttentionPart(), LmHeadPart(), GreedyHeadPart()
) for kind in part.kinds}
