"""Export-time patches of transformers' modeling_mllama.

Each patch swaps one attribute of the installed module for the time of a
`with patched():` block and puts the original back afterwards, even on error.
No copy of modeling_mllama.py: everything else is transformers' own code.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lvb.contract import MASK_VALUE
from lvb.errors import LvbError

MODELING = "transformers.models.mllama.modeling_mllama"


@dataclass(frozen=True)
class Patch:
    module: str
    attribute: str  # in the module, or in a class of it ("Class.method")
    replacement: Callable  # with wraps: called with the original, returns what goes in its place
    why: str
    wraps: bool = False


def aspect_ratio_attention_mask(
    aspect_ratio_mask: torch.Tensor, num_patches: int, target_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """transformers' _prepare_aspect_ratio_attention_mask, traceable and finite.

    The original fills padding patches with an in-place slice assignment and
    scales by torch.finfo(dtype).min; tpu-mlir miscompares such values. Same
    pattern (a pair is masked when both its query and key are padding), same
    outputs in PyTorch, with MASK_VALUE and no in-place write.
    """
    padding = padded_tokens(aspect_ratio_mask, num_patches, target_length, dtype).padding.unsqueeze(-1)
    return (padding @ padding.transpose(-1, -2) * MASK_VALUE).unsqueeze(1)


@dataclass(frozen=True)
class PaddedTokens:
    """The vision tower's attention mask in the form it has: a pair of tokens is masked when
    both are padding (a padded tile's patches, or the patches that round a tile up to a
    multiple of 8). `padding` is [batch, tokens], 1 where a token is padding.

    lvb's vision nets hand this to the attention instead of the [tokens, tokens] mask, and
    the attention adds it as one more channel of the queries and keys (padding_channel):
    the chip would read a [tokens, tokens] mask for every group of heads in every layer
    (bench/README.md §1.1).
    """

    padding: torch.Tensor


def padded_tokens(aspect_ratio_mask: torch.Tensor, num_patches: int, target_length: int,
                  dtype: torch.dtype) -> PaddedTokens:
    """Which tokens of the vision tower are padding, from the tile flags."""
    batch, tiles = aspect_ratio_mask.shape
    real_tile = aspect_ratio_mask.view(batch, tiles, 1).to(dtype)
    real_patch = (torch.arange(target_length) < num_patches).to(dtype).view(1, 1, target_length)
    return PaddedTokens((1 - real_tile * real_patch).reshape(batch, tiles * target_length))


def padding_channel(query: torch.Tensor, key: torch.Tensor, padded: PaddedTokens,
                    scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-major query and key ([batch, tokens, heads, d]) with one channel more, so that
    the scaled scores are eager attention's with the mask added: the query's channel is its
    padding flag, the key's its flag times MASK_VALUE / scaling; their product is MASK_VALUE
    where both are padding and exactly 0 elsewhere. (The values keep d channels.)

    Each side is scaled before it is expanded to the heads, so that each Expand feeds only its
    Concat: tpu-mlir's TopFuseTile drops a Tile (ONNX Expand) in front of a Mul, expecting the Mul
    to broadcast, and a Mul by a scalar then hands the Concat a tensor of one head
    (bench/repro_vision_channel.py)."""
    batch, tokens, heads, _ = query.shape
    flag = padded.padding.to(query.dtype).view(batch, tokens, 1, 1)
    query_side, key_side = (side.expand(batch, tokens, heads, 1) for side in (flag, flag * (MASK_VALUE / scaling)))
    return torch.cat([query, query_side], dim=-1), torch.cat([key, key_side], dim=-1)


# At most this many bytes of fp32 attention scores per group of heads. The vision tower
# attends over every tile's patches at once, so all heads' scores together are the largest
# tensor of an export, and eager attention holds them twice while tracing and again in
# onnxruntime's check. The bound splits a real tower into a few groups of heads and leaves
# small ones whole. tpu-mlir fuses each group into one flash-attention op; each op reloads its
# K/V tiles, so groups much smaller than this cost more on the chip (bench/README.md, "Time on
# the chip" and "Converting the model" hold the figures).
SCORES_BYTES_PER_GROUP = 768 * 2**20
# Overrides it, to trade export memory against graph size; the tests set 1 so that every
# fixture's vision attention is exported one head per group (the 11B's is split too).
SCORES_BYTES_VARIABLE = "LVB_SCORES_BYTES_PER_GROUP"


def scores_bytes_per_group() -> int:
    value = os.environ.get(SCORES_BYTES_VARIABLE, str(SCORES_BYTES_PER_GROUP))
    if not value.isdigit() or int(value) < 1:
        raise LvbError(f"{SCORES_BYTES_VARIABLE}={value!r} is not a positive number of bytes; unset it "
                       f"(default {SCORES_BYTES_PER_GROUP})")
    return int(value)


def heads_per_group(heads: int, queries: int, keys: int, budget: int | None = None) -> int:
    """How many heads' fp32 scores ([queries, keys] each) fit the budget (scores_bytes_per_group()
    by default); at least one."""
    budget = scores_bytes_per_group() if budget is None else budget
    return max(1, min(heads, budget // (queries * keys * 4)))


def attention_in_head_groups(eager: Callable) -> Callable:
    """transformers' eager attention, run on a few of the vision tower's heads at a time.

    Heads are independent, so each group is the original function on a slice of the heads
    (same arithmetic, same order) and the outputs are joined on the head axis; the traced
    graph then holds one group's scores at a time. Other attentions (the text layers', with
    K/V heads shared between query heads and small scores) go to the original unchanged.

    The graph keeps the shape tpu-mlir fuses into one flash-attention op per group on the
    BM1684X (MatMul2FAttentionPattern: permuted Q/K/V in, the output permuted then
    reshaped), which never holds the scores in device memory: heads are sliced while the
    projections are still token-major (the transposes meet and cancel in the simplifier),
    and each group's output is flattened before the groups are joined.
    """

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        from transformers.models.mllama.modeling_mllama import MllamaVisionAttention

        batch, heads, queries, dim = value.shape
        token_major = [t.transpose(1, 2) for t in (query, key, value)]  # [batch, tokens, heads, dim]
        if isinstance(attention_mask, PaddedTokens):
            token_major[:2] = padding_channel(*token_major[:2], attention_mask, module.scaling)
            query, key = (t.transpose(1, 2) for t in token_major[:2])
            attention_mask = None
        size = heads_per_group(heads, queries, key.shape[2])
        if not isinstance(module, MllamaVisionAttention) or size >= heads:
            return eager(module, query, key, value, attention_mask, *args, **kwargs)
        if attention_mask is not None and attention_mask.shape[1] != 1:
            raise NotImplementedError("attention in head groups expects one mask for every head")
        outputs = []
        for first in range(0, heads, size):
            q, k, v = (t[:, :, first:first + size].transpose(1, 2) for t in token_major)
            output = eager(module, q, k, v, attention_mask, *args, **kwargs)[0]  # [batch, queries, group, dim]
            outputs.append(output.reshape(batch, queries, -1))
        # [batch, queries, heads, dim], as eager returns it; no one reads the weights
        return torch.cat(outputs, dim=-1).view(batch, queries, heads, dim), None

    return attention


def grouped_query_attention(eager: Callable) -> Callable:
    """The text layers' attention without repeating K/V to the query heads.

    transformers' eager attention copies each K/V head to its query heads (repeat_kv) before
    the score matmul. Here the query heads that share a K/V head are stacked on the query
    axis instead ([KV heads, group x queries, d] against [KV heads, keys, d]): the same dot
    products, and no repeated K/V in the graph. On the BM1684X that repeat was a Tile moving
    the K/V once per query head of a group; the grouped matmul reads the K/V once
    (bench/README.md, "Time on the chip").
    Other attentions (the vision tower's, or one without shared heads) go on unchanged.
    """

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        from transformers.models.mllama.modeling_mllama import MllamaVisionAttention

        if isinstance(module, MllamaVisionAttention):
            return eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        batch, heads, queries, dim = query.shape
        kv_heads = key.shape[1]
        masks_per_head = attention_mask is not None and attention_mask.shape[1] != 1
        if kv_heads == heads or masks_per_head or module.training:
            return eager(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
        group = heads // kv_heads
        # Head h uses K/V head h // group (repeat_kv's order): heads are outer to queries, so
        # row g * queries + q of K/V head k is query q of head k * group + g.
        stacked = query.reshape(batch, kv_heads, group * queries, dim)
        scores = torch.matmul(stacked, key.transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask.repeat(1, 1, group, 1)
        weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(weights, value).reshape(batch, heads, queries, dim)
        return output.transpose(1, 2).contiguous(), None  # as eager returns it; no one reads the weights

    return attention


# A chunk of 2 to this many tokens (a speculative check's, a short prefill's) stacks its query
# heads per K/V head: tpu-mlir then fuses one flash-attention op per K/V head over group x tokens
# query rows, where the broadcast form's op per query head pays a fixed price that a few tokens do
# not amortise. One token (a decode step) keeps the broadcast form, which tpu-mlir fuses into its
# one-row flash attention; stacked, the single row is not fused and the cache gets transposed
# (bench/README.md §2.7).
STACKED_QUERIES_UP_TO = 16


def token_major_self_attention(self, hidden_states, attention_mask, position_embeddings, cache=None, **kwargs):
    """MllamaTextSelfAttention.forward with its tensors token-major ([batch, tokens, heads, d]).

    The same modules and arithmetic as transformers' forward (projections, rotary embedding,
    cache, scaled dot-product attention, output projection), laid out as lvb keeps its KV cache:
    the cache is concatenated along the token axis and never copied to every query head, and
    every transpose meets a matmul, so tpu-mlir fuses the attention into flash attention
    (FAttention) with grouped K/V heads. A decode step or a long chunk broadcasts each K/V head to
    its query heads right at the product; a short chunk whose query heads share K/V heads
    (STACKED_QUERIES_UP_TO) stacks them on the query axis instead ([KV heads, tokens x group, d]
    against [KV heads, keys, d]): the same dot products. Only lvb's export cache (token-major) is
    supported.
    """
    from transformers.models.mllama.modeling_mllama import apply_rotary_pos_emb

    batch, tokens, _ = hidden_states.shape
    heads, kv_heads, dim = self.num_heads, self.num_key_value_heads, self.head_dim
    group = self.num_key_value_groups
    query = self.q_proj(hidden_states).view(batch, tokens, heads, dim)
    key = self.k_proj(hidden_states).view(batch, tokens, kv_heads, dim)
    value = self.v_proj(hidden_states).view(batch, tokens, kv_heads, dim)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=2)
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx)
    positions = key.shape[1]

    if 1 < tokens <= STACKED_QUERIES_UP_TO and group > 1:
        # Head h uses K/V head h // group (repeat_kv's order): row t * group + g of K/V head k is
        # token t of head k * group + g. Token-major like the cache, so every transpose meets a matmul.
        stacked = query.view(batch, tokens, kv_heads, group, dim).transpose(2, 3).reshape(batch, tokens * group, kv_heads, dim)
        scores = torch.matmul(stacked.transpose(1, 2), key.transpose(1, 2).transpose(2, 3)) * self.scaling
        if attention_mask is not None:
            rows = attention_mask[:, :, :, None, :].expand(-1, -1, -1, group, -1)
            scores = scores + rows.reshape(batch, attention_mask.shape[1], tokens * group, positions)
        weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        output = torch.matmul(weights, value.transpose(1, 2)).transpose(1, 2)  # [batch, tokens x group, KV, d]
        output = output.reshape(batch, tokens, group, kv_heads, dim).transpose(2, 3).reshape(batch, tokens, -1)
        return self.o_proj(output), None

    def to_query_heads(x):  # [batch, positions, KV, d] -> [batch, heads, positions, d], repeat_kv's order
        x = x[:, :, :, None, :].expand(batch, positions, kv_heads, group, dim)
        return x.reshape(batch, positions, heads, dim).transpose(1, 2)

    scores = torch.matmul(query.transpose(1, 2), to_query_heads(key).transpose(2, 3)) * self.scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    output = torch.matmul(weights, to_query_heads(value)).transpose(1, 2).contiguous().reshape(batch, tokens, -1)
    return self.o_proj(output), None


PATCHES: tuple[Patch, ...] = (
    Patch(
        MODELING,
        "_prepare_aspect_ratio_attention_mask",
        aspect_ratio_attention_mask,
        "finite mask value and no in-place write, so tpu-mlir compiles the vision tower right",
    ),
    Patch(
        MODELING,
        "eager_attention_forward",
        attention_in_head_groups,
        "the vision tower's scores a few heads at a time, so no [heads, tokens, tokens] tensor exists "
        "while exporting and checking it",
        wraps=True,
    ),
    Patch(
        MODELING,
        "MllamaTextSelfAttention.forward",
        token_major_self_attention,
        "the text self-attention token-major, as lvb keeps the KV cache, in a form tpu-mlir fuses into flash "
        "attention (a short chunk's query heads stacked per K/V head)",
    ),
    Patch(
        MODELING,
        "eager_attention_forward",
        grouped_query_attention,
        "the text layers' query heads grouped per K/V head, so the nets never copy K/V to every query head",
        wraps=True,
    ),
)


def target(patch: Patch) -> tuple[object, str]:
    """The object that holds the patched attribute (a module, or a class in it) and its name."""
    owner = importlib.import_module(patch.module)
    *path, name = patch.attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, name


@contextmanager
def patched(patches: tuple[Patch, ...] = PATCHES) -> Iterator[None]:
    originals = []
    try:
        for patch in patches:
            owner, name = target(patch)
            original = getattr(owner, name)
            originals.append((owner, name, original))
            setattr(owner, name, patch.replacement(original) if patch.wraps else patch.replacement)
        yield
    finally:
        for owner, name, original in reversed(originals):
            setattr(owner, name, original)
