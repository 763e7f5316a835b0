"""Attention masks, built the way transformers builds them, as numpy.

Self-attention: the net's keys are the cache (S slots) followed by the C new
tokens, so a mask row has S + C columns: the filled cache slots, then the new
tokens up to and including its own (causal). Rows past the real tokens are
padding: they see the same and are discarded.

Cross-attention: like transformers' MllamaProcessor and
_prepare_cross_attention_mask. A text token from the image token on sees the
image's real tiles; a token before any image sees no tile, and then, as in
transformers, its mask row is all zeros (it attends uniformly) while its
text-row mask of 0 removes the cross-attention MLP's contribution.
"""

from __future__ import annotations

import numpy as np

from lvb.contract import MASK_VALUE


def self_attention_mask(past: int, chunk: int, seq: int) -> np.ndarray:
    """[1, 1, chunk, seq + chunk] for `chunk` new tokens after `past` cached ones."""
    if not 0 <= past <= seq:
        raise ValueError(f"past {past} outside 0..{seq}")
    mask = np.full((chunk, seq + chunk), MASK_VALUE, dtype=np.float32)
    mask[:, :past] = 0.0
    mask[:, seq:][np.tril(np.ones((chunk, chunk), dtype=bool))] = 0.0
    return mask[None, None]


def cross_attention_mask(
    sees_image: np.ndarray, num_tiles: int, max_tiles: int, patches_per_tile: int
) -> tuple[np.ndarray, np.ndarray]:
    """([1, 1, C, V] additive mask, [1, 1, C, 1] text-row mask) for C tokens.

    `sees_image[i]` tells whether token i comes at or after the image token.
    """
    sees_image = np.asarray(sees_image, dtype=bool)
    tiles = np.arange(max_tiles) < num_tiles
    allowed = np.repeat(tiles, patches_per_tile)  # tile-major, as the vision output
    mask = np.zeros((sees_image.size, allowed.size), dtype=np.float32)  # transformers zeroes fully masked rows
    mask[sees_image] = np.where(allowed, np.float32(0), np.float32(MASK_VALUE))  # one row, broadcast
    row = sees_image.astype(np.float32)[:, None]
    return mask[None, None], row[None, None]
