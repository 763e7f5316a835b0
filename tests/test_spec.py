import json
from pathlib import Path

import pytest

from lvb.spec import ModelSpec, SpecError

DATA = Path(__file__).parent / "data"


def published(name):
    return json.loads((DATA / f"{name}.config.json").read_text())


def test_11b_by_hand():
    spec = ModelSpec.from_config(published("llama-3.2-11b-vision"))
    t, v = spec.text, spec.vision
    assert (t.num_layers, t.hidden_size, t.intermediate_size) == (40, 4096, 14336)
    assert t.cross_attention_layers == (3, 8, 13, 18, 23, 28, 33, 38)
    assert len(t.self_attention_layers) == 32 and 3 not in t.self_attention_layers
    assert (t.num_heads, t.num_kv_heads, t.head_dim, t.kv_groups) == (32, 8, 4096 // 32, 32 // 8)
    assert t.vocab_size == 128256 and spec.image_token_id == 128256
    assert t.rope.rope_type == "llama3" and t.rope.theta == 500000.0 and t.rope.factor == 8.0
    assert t.rope.original_max_position_embeddings == 8192
    assert (v.image_size, v.patch_size, v.max_num_tiles) == (560, 14, 4)
    assert v.patches_per_tile == (560 // 14) ** 2 + 1
    assert v.tokens_per_image == 4 * ((560 // 14) ** 2 + 1)
    assert spec.cross_kv_shape == (1, 8, 4 * 1601, 128)
    assert (v.num_layers, v.num_global_layers, v.intermediate_layers_indices) == (32, 8, (3, 7, 15, 23, 30))
    assert v.output_dim == 1280 * 6 and spec.num_aspect_ratio_ids == 8


def test_90b_by_hand():
    spec = ModelSpec.from_config(published("llama-3.2-90b-vision"))
    t = spec.text
    assert (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads) == (100, 8192, 64, 8)
    assert t.cross_attention_layers == tuple(range(3, 100, 5)) and len(t.self_attention_layers) == 80
    assert (t.head_dim, t.kv_groups) == (128, 8)
    assert spec.cross_kv_shape == (1, 8, 6404, 128)


# Hand-computed for each fixture geometry: (tile // patch)^2 + 1 patches per tile.
FIXTURES = {
    "mha-cross-first": dict(cross=(0,), selfs=(1, 2), head_dim=16, groups=1, patches=5, tokens=10, ratios=3, kept=(0,)),
    "gqa2-cross-last": dict(cross=(1, 3), selfs=(0, 2), head_dim=16, groups=2, patches=17, tokens=68, ratios=8, kept=(2, 0)),
    "gqa4-cross-pair": dict(cross=(2, 3), selfs=(0, 1, 4), head_dim=16, groups=4, patches=10, tokens=30, ratios=5, kept=(1,)),
}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_by_hand(name, checkpoint_factory):
    expected = FIXTURES[name]
    spec = ModelSpec.from_dir(checkpoint_factory(name))
    assert spec.text.cross_attention_layers == expected["cross"]
    assert spec.text.self_attention_layers == expected["selfs"]
    assert spec.text.head_dim == expected["head_dim"] and spec.text.kv_groups == expected["groups"]
    assert spec.vision.patches_per_tile == expected["patches"]
    assert spec.vision.tokens_per_image == expected["tokens"]
    assert spec.num_aspect_ratio_ids == expected["ratios"]
    assert spec.vision.kept_layers == expected["kept"]
    assert spec.cross_kv_shape == (1, spec.text.num_kv_heads, expected["tokens"], expected["head_dim"])


def test_not_mllama_is_named():
    with pytest.raises(SpecError, match="model_type is 'qwen2'"):
        ModelSpec.from_config({"model_type": "qwen2"})
    with pytest.raises(SpecError, match="hidden_size is missing"):  # a Llama text config is read as one
        ModelSpec.from_config({"model_type": "llama"})


@pytest.mark.parametrize(
    "section, key",
    [("text_config", "cross_attention_layers"), ("text_config", "num_key_value_heads"), ("vision_config", "image_size"),
     ("vision_config", "supported_aspect_ratios"), (None, "text_config")],
)
def test_missing_field_is_named(section, key):
    config = published("llama-3.2-11b-vision")
    del (config[section] if section else config)[key]
    name = f"{section}.{key}" if section else key
    with pytest.raises(SpecError, match=name.replace(".", r"\.") + " is missing"):
        ModelSpec.from_config(config)


def test_inconsistent_config_is_named():
    config = published("llama-3.2-11b-vision")
    config["text_config"]["cross_attention_layers"] = [3, 40]
    with pytest.raises(SpecError, match="cross_attention_layers"):
        ModelSpec.from_config(config)
    config = published("llama-3.2-11b-vision")
    config["vision_config"]["vision_output_dim"] = 1234
    with pytest.raises(SpecError, match="vision_output_dim"):
        ModelSpec.from_config(config)


def test_spec_is_frozen():
    spec = ModelSpec.from_config(published("llama-3.2-11b-vision"))
    with pytest.raises(AttributeError):
        spec.text.hidden_size = 1


def test_prefill_nets_carry_a_stage_per_chunk_size():
    from lvb.contract import NetSpec, chunk_for, plan

    spec = ModelSpec.from_config(published("llama-3.2-11b-vision"))
    nets = {n.name: n for n in plan(spec, 512, (32, 128, 16))}
    staged = {name for name, net in nets.items() if net.smaller}
    assert staged == {"embed"} | {f"block_{i}" for i in range(spec.text.num_layers)}
    block = nets["block_0"]
    assert [s.inputs[0].shape[1] for s in block.stages] == [128, 32, 16]  # largest first, as a bmodel needs them
    assert [s.inputs[2].shape for s in block.stages] == [(1, 1, C, 512 + C) for C in (128, 32, 16)]
    assert NetSpec.from_json(block.to_json()) == block
    assert [chunk_for(n, (128, 32, 16)) for n in (1, 16, 17, 33, 128, 129, 600)] == [16, 16, 32, 128, 128, 128, 128]
    with pytest.raises(ValueError, match="between 1 and seq 512"):
        plan(spec, 512, (16, 1024))
