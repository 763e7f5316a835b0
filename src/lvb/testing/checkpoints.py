"""Write complete, loadable mllama checkpoints of any geometry.

A checkpoint here is what a user would download: config.json,
model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json, the chat template and preprocessor_config.json, all
written by transformers itself so that AutoProcessor and
MllamaForConditionalGeneration load it.

The geometries differ in everything a port could silently hard-code: layer
count, where the cross-attention layers sit (first, last, adjacent), the
query/KV head ratio (1, 2, 4), tile size, patch size and tile count.

Needs torch and transformers (the dev environment), never the runtime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from lvb.tasks import COLOURS, SHAPES

# Llama 3's special tokens in Llama 3's order; the tokenizer puts them right
# after the regular tokens, and <|image|> right after them, at vocab_size
# (outside the LM head, inside the embedding's 8 extra rows), as Llama 3.2 Vision does.
SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|reserved_special_token_3|>",
    "<|reserved_special_token_4|>",
    "<|reserved_special_token_5|>",
    "<|reserved_special_token_6|>",
    "<|reserved_special_token_7|>",
)
IMAGE_TOKEN = "<|image|>"
BOS, EOT, END_OF_TEXT, EOM, PAD = (
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|eom_id|>",
    "<|finetune_right_pad_id|>",
)

# OpenAI CLIP's normalisation, which Llama 3.2 Vision's processor uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# Text the tokenizer's merges are learnt from: the toy task's words many times
# over, plus ordinary English so that any prompt tokenizes to something sensible.
_CORPUS = (
    [f"a {c} {s}" for c in COLOURS for s in SHAPES] * 40
    + ["What is in the picture?", "What colour is it?", "What shape is it?", "Describe the image."] * 40
    + [
        "The quick brown fox jumps over the lazy dog.",
        "Hello, how are you today? I am fine, thank you.",
        "This is a picture of a cat sitting on a mat in the sun.",
        "Tell me more about it. Please answer in one short sentence.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
        "Café, naïve, jalapeño, 東京, 😀 — unicode text must round-trip.",
    ]
    * 10
)


@dataclass(frozen=True)
class Geometry:
    """The shape of a test checkpoint; every field lands in config.json."""

    name: str
    text_layers: int
    cross_layers: tuple[int, ...]
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    tile: int
    patch: int
    max_tiles: int
    vision_layers: int
    global_layers: int
    intermediate_indices: tuple[int, ...]
    vision_hidden: int
    vision_heads: int
    vision_intermediate: int
    rope: str = "llama3"  # or "default"
    # None: exactly the tokenizer's regular + special tokens, as in Llama 3.2.
    vocab_size: int | None = None
    tokenizer_vocab: int = 384  # regular (BPE) tokens
    init_std: float = 0.25  # wide enough that greedy decoding has no near-ties
    gate: float = 0.8  # transformers initialises gates to 0, which hides the image
    description: str = field(default="", compare=False)


GEOMETRIES: dict[str, Geometry] = {
    g.name: g
    for g in (
        Geometry(
            name="mha-cross-first",
            description="3 layers, cross-attention at layer 0, 4 heads / 4 KV heads, 28-px tiles of 14-px patches, 2 tiles",
            text_layers=3,
            cross_layers=(0,),
            hidden=64,
            intermediate=128,
            heads=4,
            kv_heads=4,
            tile=28,
            patch=14,
            max_tiles=2,
            vision_layers=2,
            global_layers=1,
            intermediate_indices=(0,),
            vision_hidden=32,
            vision_heads=2,
            vision_intermediate=64,
            rope="default",
        ),
        Geometry(
            name="gqa2-cross-last",
            description="4 layers, cross-attention at 1 and the last, 4 heads / 2 KV heads, 32-px tiles of 8-px patches, 4 tiles",
            text_layers=4,
            cross_layers=(1, 3),
            hidden=64,
            intermediate=192,
            heads=4,
            kv_heads=2,
            tile=32,
            patch=8,
            max_tiles=4,
            vision_layers=3,
            global_layers=1,
            intermediate_indices=(2, 0, 2),  # out of order and repeated: transformers allows both
            vision_hidden=32,
            vision_heads=4,
            vision_intermediate=64,
        ),
        Geometry(
            name="gqa4-cross-pair",
            description="5 layers, adjacent cross-attention layers 2 and 3, 8 heads / 2 KV heads, 42-px tiles of 14-px patches, 3 tiles",
            text_layers=5,
            cross_layers=(2, 3),
            hidden=128,
            intermediate=256,
            heads=8,
            kv_heads=2,
            tile=42,
            patch=14,
            max_tiles=3,
            vision_layers=2,
            global_layers=2,
            intermediate_indices=(1,),
            vision_hidden=48,
            vision_heads=3,
            vision_intermediate=96,
        ),
    )
}


# The trained toy checkpoint (scripts/train_toy.py, models/toy): kept out of
# GEOMETRIES, which the tests write as random checkpoints. Text widths are
# multiples of 64 (INT4 groups of 64); 56-px tiles, up to 4 of them.
TOY = Geometry(
    name="toy",
    description="3 layers, cross-attention at layer 1, 4 heads / 2 KV heads, 56-px tiles of 8-px patches, 4 tiles; trained",
    text_layers=3,
    cross_layers=(1,),
    hidden=64,
    intermediate=128,
    heads=4,
    kv_heads=2,
    tile=56,
    patch=8,
    max_tiles=4,
    vision_layers=2,
    global_layers=1,
    intermediate_indices=(0,),
    vision_hidden=64,
    vision_heads=4,
    vision_intermediate=128,
    tokenizer_vocab=384,  # every answer is 3 tokens: "a", " red", " circle"
    init_std=0.25,  # the vision tower learns shapes much sooner than from 0.02 or 0.1
    gate=0.5,
)


def supported_aspect_ratios(max_tiles: int) -> list[list[int]]:
    """Every (rows, cols) tile grid of at most max_tiles tiles, in the processor's order."""
    return [[w, h] for w in range(1, max_tiles + 1) for h in range(1, max_tiles + 1) if w * h <= max_tiles]


@cache
def build_tokenizer(regular_tokens: int = 384):
    """A byte-level BPE with Llama 3's special tokens; deterministic for a given size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=regular_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS) + [IMAGE_TOKEN])
    return tokenizer


def text_vocab_size(geometry: Geometry) -> int:
    tokenizer = build_tokenizer(geometry.tokenizer_vocab)
    tokens_below_image = tokenizer.token_to_id(IMAGE_TOKEN)
    return max(geometry.vocab_size or 0, tokens_below_image)


def _text_fields(tokenizer, g, layers: int, rope_factor: float) -> dict:
    """The Llama text stack's config fields a test geometry sets, mllama's or a plain Llama's
    (`rope_factor`: llama3 rope's scaling, 8 in Llama-3.2-Vision, 32 in Llama-3.2-1B)."""
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if g.rope == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": rope_factor, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return dict(
        hidden_size=g.hidden,
        intermediate_size=g.intermediate,
        num_hidden_layers=layers,
        num_attention_heads=g.heads,
        num_key_value_heads=g.kv_heads,
        rope_parameters=rope,
        rms_norm_eps=1e-5,
        max_position_embeddings=131072,
        initializer_range=g.init_std,
        bos_token_id=ids[BOS],
        eos_token_id=[ids[END_OF_TEXT], ids[EOM], ids[EOT]],
        pad_token_id=ids[PAD],
    )


def mllama_config(geometry: Geometry):
    from transformers import MllamaConfig

    tokenizer = build_tokenizer(geometry.tokenizer_vocab)
    g = geometry
    return MllamaConfig(
        image_token_index=tokenizer.token_to_id(IMAGE_TOKEN),
        text_config=dict(
            vocab_size=text_vocab_size(g),
            **_text_fields(tokenizer, g, g.text_layers, rope_factor=8.0),
            cross_attention_layers=list(g.cross_layers),
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            hidden_size=g.vision_hidden,
            intermediate_size=g.vision_intermediate,
            num_hidden_layers=g.vision_layers,
            num_global_layers=g.global_layers,
            attention_heads=g.vision_heads,
            image_size=g.tile,
            patch_size=g.patch,
            max_num_tiles=g.max_tiles,
            supported_aspect_ratios=supported_aspect_ratios(g.max_tiles),
            intermediate_layers_indices=list(g.intermediate_indices),
            vision_output_dim=g.vision_hidden * (len(g.intermediate_indices) + 1),
            norm_eps=1e-5,
            initializer_range=g.init_std,
        ),
    )


def open_the_gates(model, value: float) -> None:
    """Set every tanh gate non-zero so the image actually reaches the text."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("gate", "gate_attn", "gate_ffn", "cross_attn_attn_gate", "cross_attn_mlp_gate")):
                parameter.fill_(value)


def build_model(geometry: Geometry, seed: int = 0, dtype=None):
    import torch
    from transformers import MllamaForConditionalGeneration

    torch.manual_seed(seed)
    model = MllamaForConditionalGeneration(mllama_config(geometry))
    open_the_gates(model, geometry.gate)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def save_processor(directory: Path, geometry: Geometry) -> None:
    from transformers import MllamaImageProcessorPil, MllamaProcessor, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(geometry.tokenizer_vocab),
        bos_token=BOS,
        eos_token=EOT,
        pad_token=PAD,
        model_max_length=131072,
    )
    image_processor = MllamaImageProcessorPil(
        size={"height": geometry.tile, "width": geometry.tile},
        max_image_tiles=geometry.max_tiles,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    template = (Path(__file__).parent / "chat_template.jinja").read_text()
    MllamaProcessor(image_processor, tokenizer, chat_template=template).save_pretrained(directory)
    # Published checkpoints carry preprocessor_config.json; transformers 5 reads either.
    image_processor.save_pretrained(directory)


def write_checkpoint(directory: str | Path, geometry: Geometry | str, seed: int = 0, model=None) -> Path:
    """Write a complete checkpoint folder and return its path.

    `model` lets a caller (the toy trainer) save trained weights with the same files.
    """
    from transformers import GenerationConfig

    geometry = GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else build_model(geometry, seed)
    text = model.config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(directory)
    save_processor(directory, geometry)
    return directory


# ----------------------------------------------------------------------------- Llama text checkpoints


@dataclass(frozen=True)
class LlamaGeometry:
    """A plain Llama text checkpoint (LlamaForCausalLM) with the fixtures' tokenizer, so that it
    can draft for any of them (same vocabulary, same chat template)."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    rope: str = "llama3"
    tokenizer_vocab: int = 384
    init_std: float = 0.25
    description: str = field(default="", compare=False)


LLAMA_GEOMETRIES: dict[str, LlamaGeometry] = {
    g.name: g
    for g in (
        LlamaGeometry("llama-gqa2-tied", layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, tied=True,
                      description="2 layers, 4 heads / 2 KV heads, tied embeddings, llama3 rope (as Llama-3.2-1B)"),
        LlamaGeometry("llama-mha-untied", layers=3, hidden=64, intermediate=192, heads=2, kv_heads=2, tied=False,
                      rope="default", description="3 layers, 2 heads / 2 KV heads, its own LM head, default rope"),
    )
}


def llama_config(geometry: LlamaGeometry):
    from transformers import LlamaConfig

    tokenizer = build_tokenizer(geometry.tokenizer_vocab)
    return LlamaConfig(
        # The mllama fixtures' LM vocabulary: every token below <|image|>, so a draft's logits
        # and a target's cover the same ids.
        vocab_size=tokenizer.token_to_id(IMAGE_TOKEN),
        **_text_fields(tokenizer, geometry, geometry.layers, rope_factor=32.0),
        tie_word_embeddings=geometry.tied,
    )


def build_llama(geometry: LlamaGeometry | str, seed: int = 0):
    import torch
    from transformers import LlamaForCausalLM

    geometry = LLAMA_GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    torch.manual_seed(seed)
    return LlamaForCausalLM(llama_config(geometry)).eval()


def write_llama_checkpoint(directory: str | Path, geometry: LlamaGeometry | str, seed: int = 0, model=None) -> Path:
    """A complete Llama text checkpoint folder (weights, tokenizer, chat template); `model`
    lets a trainer save its weights with the same files."""
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    geometry = LLAMA_GEOMETRIES[geometry] if isinstance(geometry, str) else geometry
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model = model if model is not None else build_llama(geometry, seed)
    config = model.config
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id, do_sample=False)
    model.save_pretrained(directory)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(geometry.tokenizer_vocab), bos_token=BOS,
                                        eos_token=EOT, pad_token=PAD, model_max_length=131072)
    tokenizer.chat_template = (Path(__file__).parent / "chat_template.jinja").read_text()
    tokenizer.save_pretrained(directory)
    return directory


def write_text_stack(directory: str | Path, mllama_dir: str | Path) -> Path:
    """A Llama text checkpoint holding an mllama checkpoint's self-attention layers, table, norm
    and head: without a picture transformers skips the cross-attention layers, so on text-only
    turns it answers exactly as the mllama model does (a draft that agrees with its model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MllamaForConditionalGeneration

    source = MllamaForConditionalGeneration.from_pretrained(mllama_dir, dtype=torch.float32).eval()
    text = source.config.text_config
    selfs = [i for i in range(text.num_hidden_layers) if i not in text.cross_attention_layers]
    config = LlamaConfig(
        vocab_size=text.vocab_size, hidden_size=text.hidden_size, intermediate_size=text.intermediate_size,
        num_hidden_layers=len(selfs), num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads, rope_parameters=text.rope_parameters, rms_norm_eps=text.rms_norm_eps,
        max_position_embeddings=text.max_position_embeddings, bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    language = source.model.language_model
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(language.embed_tokens.weight[: text.vocab_size])
        for mine, theirs in zip(model.model.layers, selfs):
            mine.load_state_dict(language.layers[theirs].state_dict())
        model.model.norm.load_state_dict(language.norm.state_dict())
        model.lm_head.load_state_dict(source.lm_head.state_dict())
    geometry = LlamaGeometry("text-stack", len(selfs), text.hidden_size, text.intermediate_size,
                             text.num_attention_heads, text.num_key_value_heads, tied=False)
    return write_llama_checkpoint(directory, geometry, model=model)
