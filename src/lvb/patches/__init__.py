"""Export-time patches of transformers' modeling_mllama.

Each patch swaps one attribute of the installed module for the time of a
`with patched():` block and puts the original back afterwards, even on error.
No copy of modeling_mllama.py: everything else is transformers' own code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from lvb.contract import MASK_VALUE

MODELING = "transformers.models.mllama.modeling_mllama"


@dataclass(frozen=True)
class Patch:
    module: str
    attribute: str
    replacement: Callable
    why: str


def aspect_ratio_attention_mask(
    aspect_ratio_mask: torch.Tensor, num_patches: int, target_length: int, dtype: torch.dtype
) -> torch.Tensor:
    """transformers' _prepare_aspect_ratio_attention_mask, traceable and finite.

    The original fills padding patches with an in-place slice assignment and
    scales by torch.finfo(dtype).min; tpu-mlir miscompares such values. Same
    pattern (a pair is masked when both its query and key are padding), same
    outputs in PyTorch, with MASK_VALUE and no in-place write.
    """
    batch, tiles = aspect_ratio_mask.shape
    real_tile = aspect_ratio_mask.view(batch, tiles, 1, 1).to(dtype)
    real_patch = (torch.arange(target_length) < num_patches).to(dtype).view(1, 1, target_length, 1)
    padding = (1 - real_tile * real_patch).reshape(batch, tiles * target_length, 1)
    return (padding @ padding.transpose(-1, -2) * MASK_VALUE).unsqueeze(1)


PATCHES: tuple[Patch, ...] = (
    Patch(
        MODELING,
        "_prepare_aspect_ratio_attention_mask",
        aspect_ratio_attention_mask,
        "finite mask value and no in-place write, so tpu-mlir compiles the vision tower right",
    ),
)


@contextmanager
def patched(patches: tuple[Patch, ...] = PATCHES) -> Iterator[None]:
    originals = []
    try:
        for patch in patches:
            module = importlib.import_module(patch.module)
            originals.append((module, patch.attribute, getattr(module, patch.attribute)))
            setattr(module, patch.attribute, patch.replacement)
        yield
    finally:
        for module, attribute, original in reversed(originals):
            setattr(module, attribute, original)
