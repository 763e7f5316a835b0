"""ModelSpec: every dimension lvb needs, read once from a checkpoint's config.json.

Nothing here has a default taken from the 11B checkpoint: a field the config
does not state is an error that names it, because a silently assumed
dimension is exactly how ports end up working for one checkpoint only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvb.errors import LvbError


class SpecError(LvbError, ValueError):
    """A config that lvb cannot use; the message names the field and the fix."""


class _Reader:
    """Reads required fields from one section of config.json, naming them on error."""

    def __init__(self, section: dict[str, Any], where: str):
        self.section = section
        self.where = where

    def _get(self, key: str) -> Any:
        if key not in self.section or self.section[key] is None:
            raise SpecError(f"config.json: {self.where}{key} is missing; re-save the checkpoint with transformers")
        return self.section[key]

    def int(self, key: str, minimum: int = 1) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise SpecError(f"config.json: {self.where}{key} must be an integer >= {minimum}, got {value!r}")
        return value

    def float(self, key: str) -> float:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise SpecError(f"config.json: {self.where}{key} must be a positive number, got {value!r}")
        return float(value)

    def ints(self, key: str) -> tuple[int, ...]:
        """A non-empty list of integers: every list lvb reads names at least one layer."""
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise SpecError(f"config.json: {self.where}{key} must be a list of integers, got {value!r}")
        if not value:
            raise SpecError(f"config.json: {self.where}{key} is empty; an mllama checkpoint names at least one layer "
                            "there (re-save the checkpoint with transformers)")
        return tuple(value)

    def square(self, key: str) -> int:
        """image_size and patch_size may be written as one int or as [h, w]."""
        value = self._get(key)
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpecError(f"config.json: {self.where}{key} must be one positive integer (square), got {value!r}")
        return value

    def section_of(self, key: str) -> _Reader:
        value = self._get(key)
        if not isinstance(value, dict):
            raise SpecError(f"config.json: {self.where}{key} must be an object")
        return _Reader(value, f"{self.where}{key}.")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    # rope_type "default" or "llama3"; the llama3 parameters are None otherwise.
    rope_type: str
    factor: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    original_max_position_embeddings: int | None = None

    @classmethod
    def from_text_config(cls, text: _Reader) -> RopeSpec:
        # transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_theta + rope_scaling.
        params = text.section.get("rope_parameters") or dict(text.section.get("rope_scaling") or {})
        if "rope_theta" not in params:
            params["rope_theta"] = text.float("rope_theta")
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "default":
            return cls(theta=float(params["rope_theta"]), rope_type="default")
        if rope_type != "llama3":
            raise SpecError(f"config.json: text_config rope type {rope_type!r} is not supported; lvb supports default and llama3")
        rope = _Reader(params, "text_config.rope_parameters.")
        return cls(
            theta=rope.float("rope_theta"),
            rope_type="llama3",
            factor=rope.float("factor"),
            low_freq_factor=rope.float("low_freq_factor"),
            high_freq_factor=rope.float("high_freq_factor"),
            original_max_position_embeddings=rope.int("original_max_position_embeddings"),
        )


@dataclass(frozen=True)
class TextSpec:
    num_layers: int
    cross_attention_layers: tuple[int, ...]
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeSpec
    head_dim: int = field(init=False)
    kv_groups: int = field(init=False)
    self_attention_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise SpecError(
                f"config.json: text_config.hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"config.json: text_config.num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        bad = [i for i in self.cross_attention_layers if not 0 <= i < self.num_layers]
        if bad or len(set(self.cross_attention_layers)) != len(self.cross_attention_layers):
            raise SpecError(
                f"config.json: text_config.cross_attention_layers {list(self.cross_attention_layers)} must be distinct "
                f"layer ids in 0..{self.num_layers - 1}"
            )
        object.__setattr__(self, "cross_attention_layers", tuple(sorted(self.cross_attention_layers)))
        object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        object.__setattr__(self, "kv_groups", self.num_heads // self.num_kv_heads)
        object.__setattr__(
            self,
            "self_attention_layers",
            tuple(i for i in range(self.num_layers) if i not in self.cross_attention_layers),
        )

    def is_cross(self, layer: int) -> bool:
        return layer in self.cross_attention_layers


@dataclass(frozen=True)
class VisionSpec:
    image_size: int  # one tile's side in pixels
    patch_size: int
    num_channels: int
    max_num_tiles: int
    supported_aspect_ratios: tuple[tuple[int, int], ...]
    num_layers: int
    num_global_layers: int
    intermediate_layers_indices: tuple[int, ...]
    hidden_size: int
    num_heads: int
    intermediate_size: int
    output_dim: int
    norm_eps: float
    patches_per_tile: int = field(init=False)  # including the class token
    tokens_per_image: int = field(init=False)  # what one image adds to cross-attention
    # The layers whose outputs the projector reads, each once (transformers allows an index
    # to repeat, and any order).
    kept_layers: tuple[int, ...] = field(init=False)

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise SpecError(
                f"config.json: vision_config.hidden_size {self.hidden_size} is not a multiple of attention_heads {self.num_heads}"
            )
        if not self.supported_aspect_ratios:
            raise SpecError("config.json: vision_config.supported_aspect_ratios is empty; it lists at least one [rows, cols]")
        if self.image_size % self.patch_size:
            raise SpecError(
                f"config.json: vision_config.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        bad = [i for i in self.intermediate_layers_indices if not 0 <= i < self.num_layers]
        if bad:
            raise SpecError(
                f"config.json: vision_config.intermediate_layers_indices {bad} are outside 0..{self.num_layers - 1}"
            )
        expected_output = self.hidden_size * (len(self.intermediate_layers_indices) + 1)
        if self.output_dim != expected_output:
            raise SpecError(
                f"config.json: vision_config.vision_output_dim is {self.output_dim} but hidden_size x "
                f"(intermediate layers + 1) is {expected_output}"
            )
        too_many = [r for r in self.supported_aspect_ratios if r[0] * r[1] > self.max_num_tiles]
        if too_many:
            raise SpecError(
                f"config.json: vision_config.supported_aspect_ratios {too_many} need more than max_num_tiles={self.max_num_tiles}"
            )
        patches = (self.image_size // self.patch_size) ** 2 + 1
        object.__setattr__(self, "patches_per_tile", patches)
        object.__setattr__(self, "tokens_per_image", self.max_num_tiles * patches)
        object.__setattr__(self, "kept_layers", tuple(dict.fromkeys(self.intermediate_layers_indices)))


@dataclass(frozen=True)
class ModelSpec:
    text: TextSpec
    # None for a plain Llama text checkpoint (LlamaForCausalLM): no vision tower, no
    # cross-attention layers, no image token; the same text nets otherwise.
    vision: VisionSpec | None
    image_token_id: int | None

    @property
    def text_only(self) -> bool:
        return self.vision is None

    @property
    def cross_kv_shape(self) -> tuple[int, ...] | None:
        """One of cross K or V, [1, kv heads, tokens, head dim]; None without a vision tower."""
        t, v = self.text, self.vision
        return None if v is None else (1, t.num_kv_heads, v.tokens_per_image, t.head_dim)

    @property
    def num_aspect_ratio_ids(self) -> int:
        """Aspect-ratio ids run 1..N; 0 is reserved for 'no image'."""
        return len(self.vision.supported_aspect_ratios)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        if not isinstance(config, dict):
            raise SpecError("config.json must hold a JSON object")
        model_type = config.get("model_type")
        if model_type == "llama":
            return cls(text=_llama_text(_Reader(config, "")), vision=None, image_token_id=None)
        if model_type != "mllama":
            raise SpecError(
                f"config.json: model_type is {model_type!r}; lvb converts Llama-3.2-Vision (mllama) and Llama text "
                "(llama) checkpoints only"
            )
        root = _Reader(config, "")
        text = root.section_of("text_config")
        vision = root.section_of("vision_config")
        ratios = vision._get("supported_aspect_ratios")
        if not isinstance(ratios, list) or not all(
            isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) and x > 0 for x in r) for r in ratios
        ):
            raise SpecError("config.json: vision_config.supported_aspect_ratios must be a list of [rows, cols] pairs")
        return cls(
            text=TextSpec(
                num_layers=text.int("num_hidden_layers"),
                cross_attention_layers=text.ints("cross_attention_layers"),
                hidden_size=text.int("hidden_size"),
                intermediate_size=text.int("intermediate_size"),
                num_heads=text.int("num_attention_heads"),
                num_kv_heads=text.int("num_key_value_heads"),
                vocab_size=text.int("vocab_size"),
                rms_norm_eps=text.float("rms_norm_eps"),
                max_position_embeddings=text.int("max_position_embeddings"),
                rope=RopeSpec.from_text_config(text),
            ),
            vision=VisionSpec(
                image_size=vision.square("image_size"),
                patch_size=vision.square("patch_size"),
                num_channels=vision.int("num_channels"),
                max_num_tiles=vision.int("max_num_tiles"),
                supported_aspect_ratios=tuple(tuple(r) for r in ratios),
                num_layers=vision.int("num_hidden_layers"),
                num_global_layers=vision.int("num_global_layers", minimum=0),
                intermediate_layers_indices=vision.ints("intermediate_layers_indices"),
                hidden_size=vision.int("hidden_size"),
                num_heads=vision.int("attention_heads"),
                intermediate_size=vision.int("intermediate_size"),
                output_dim=vision.int("vision_output_dim"),
                norm_eps=vision.float("norm_eps"),
            ),
            image_token_id=root.int("image_token_index", minimum=0),
        )

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelSpec:
        return cls.from_config(read_config(model_dir))


def _llama_text(root: _Reader) -> TextSpec:
    """A LlamaForCausalLM's text stack: an mllama text model without cross-attention layers
    (same layers, same weights, same rotary embedding)."""
    config = root.section
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise SpecError(f"config.json: {key} is true; lvb converts Llama 3.x checkpoints, whose projections have no bias")
    if config.get("hidden_act", "silu") != "silu":
        raise SpecError(f"config.json: hidden_act is {config['hidden_act']!r}; lvb converts Llama 3.x checkpoints (silu)")
    hidden, heads = root.int("hidden_size"), root.int("num_attention_heads")
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise SpecError(f"config.json: head_dim {head_dim} x num_attention_heads {heads} is not hidden_size {hidden}; "
                        "lvb needs head_dim = hidden_size / num_attention_heads")
    return TextSpec(
        num_layers=root.int("num_hidden_layers"),
        cross_attention_layers=(),
        hidden_size=hidden,
        intermediate_size=root.int("intermediate_size"),
        num_heads=heads,
        num_kv_heads=root.int("num_key_value_heads"),
        vocab_size=root.int("vocab_size"),
        rms_norm_eps=root.float("rms_norm_eps"),
        max_position_embeddings=root.int("max_position_embeddings"),
        rope=RopeSpec.from_text_config(root),
    )


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / "config.json"
    if Path(model_dir).exists() and not Path(model_dir).is_dir():
        raise SpecError(f"{model_dir} is a file, not a folder; pass the folder that holds the checkpoint's config.json")
    if not Path(model_dir).is_dir():
        raise SpecError(f"{model_dir}: no such directory; pass the folder that holds the checkpoint's config.json")
    if not path.is_file():
        raise SpecError(f"{model_dir}: no config.json; pass the folder of a Hugging Face checkpoint")
    from lvb.files import FileError, read_json

    try:
        return read_json(path, "re-save the checkpoint")
    except FileError as e:
        raise SpecError(str(e)) from None
