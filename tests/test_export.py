"""`lvb export`: every net, checked against PyTorch, streamed, cached, and safe to interrupt."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CHUNK, SEQ, chunks_of, one_error_line, scale_weights
from lvb.contract import plan
from lvb.export import exporter
from lvb.export.exporter import export
from lvb.export.weights import CheckpointWeights
from lvb.spec import ModelSpec
from lvb.testing.checkpoints import GEOMETRIES


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_every_net_is_exported_and_matches_pytorch(name, export_factory, checkpoint_factory):
    """Each net's recorded check: onnxruntime against the PyTorch module it was exported from
    (lvb.export.parts, transformers' layers with lvb's patches). That the parts together are
    transformers' model is held against transformers itself: below, the vision chain against its
    whole tower and the attention against its own, and greedy answers equal to its generate on
    every fixture (tests/test_runtime.py)."""
    work = export_factory(name)
    manifest = json.loads((work / "export" / "manifest.json").read_text())
    spec = ModelSpec.from_dir(checkpoint_factory(name))
    expected = plan(spec, SEQ, chunks_of(name))
    assert list(manifest["nets"]) == [n.name for n in expected]
    for net in expected:
        entry = manifest["nets"][net.name]
        assert entry["kind"] == net.kind.value and entry["layer"] == net.layer
        assert entry == entry | net.to_json()  # shapes of every stage
        assert (work / "export" / entry["file"]).is_file()
        assert entry["check"]["cosine"] >= 0.99999, net.name
    # Cross-attention K/V stay at the KV heads, never repeated to the query heads.
    for layer in spec.text.cross_attention_layers:
        cross_k = manifest["nets"][f"cross_kv_{layer}"]["outputs"][0]
        assert cross_k["shape"] == [1, spec.text.num_kv_heads, spec.vision.tokens_per_image, spec.text.head_dim]


@pytest.mark.slow  # exports a whole checkpoint of its own
def test_check_catches_a_wrong_export(checkpoint_factory, tmp_path, monkeypatch):
    """The on-the-spot check is real: an ONNX file that computes something else stops the export, naming the net."""
    real_export = exporter._export_onnx

    def broken(module, net, inputs, path):
        real_export(module, net, inputs, path)
        if net.name == "block_cache_0":
            scale_weights(path)  # perturb the weights after export

    monkeypatch.setattr(exporter, "_export_onnx", broken)
    with pytest.raises(exporter.ExportError, match="block_cache_0: PyTorch vs onnxruntime cosine"):
        export(checkpoint_factory("mha-cross-first"), tmp_path, seq=SEQ, chunks=CHUNK)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert "block_cache_0" not in manifest["nets"] and not (tmp_path / "export" / "block_cache_0").exists()


@pytest.mark.slow  # exports a whole checkpoint of its own
def test_unchanged_nets_are_not_exported_again(checkpoint_factory, tmp_path, monkeypatch):
    model = checkpoint_factory("gqa2-cross-last")
    export(model, tmp_path, seq=SEQ, chunks=CHUNK)
    calls = []
    monkeypatch.setattr(exporter, "_export_onnx", lambda *a: calls.append(a[1].name))
    export(model, tmp_path, seq=SEQ, chunks=CHUNK)
    assert calls == []
    # Another chunk size changes the chunked nets and nothing else.
    monkeypatch.undo()
    before = json.loads((tmp_path / "export" / "manifest.json").read_text())["nets"]
    export(model, tmp_path, seq=SEQ, chunks=CHUNK // 2)
    after = json.loads((tmp_path / "export" / "manifest.json").read_text())["nets"]
    changed = {n for n in after if after[n]["key"] != before[n]["key"]}
    assert changed == {"embed"} | {f"block_{i}" for i in range(4)}


@pytest.mark.slow  # exports a whole checkpoint of its own
def test_interrupted_export_leaves_only_finished_nets(checkpoint_factory, tmp_path, monkeypatch):
    model = checkpoint_factory("mha-cross-first")
    real = exporter.Exporter._check_and_keep
    finished = []

    def dies_on_the_fourth(self, net, *args):
        if len(finished) == 3:
            raise KeyboardInterrupt
        real(self, net, *args)
        finished.append(net.name)

    monkeypatch.setattr(exporter.Exporter, "_check_and_keep", dies_on_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        export(model, tmp_path, seq=SEQ, chunks=CHUNK)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert list(manifest["nets"]) == finished
    leftovers = [p.name for p in (tmp_path / "export").iterdir() if p.is_dir() and p.name not in finished]
    assert all(name.startswith(".") for name in leftovers)  # temporaries only, never trusted
    monkeypatch.undo()
    exported = []
    real_export = exporter._export_onnx
    monkeypatch.setattr(exporter, "_export_onnx", lambda module, net, *a: (exported.append(net.name), real_export(module, net, *a)))
    export(model, tmp_path, seq=SEQ, chunks=CHUNK)
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert set(exported) == set(manifest["nets"]) - set(finished)  # resumed, nothing done twice


@pytest.mark.slow  # exports a whole checkpoint of its own
def test_streaming_reads_one_layer_at_a_time(checkpoint_factory, tmp_path, monkeypatch):
    model = checkpoint_factory("gqa4-cross-pair")
    spec = ModelSpec.from_dir(model)
    weights = CheckpointWeights(model)
    total = sum(np.prod(weights.shape(n)) for n in weights.location)
    loads = []
    real = CheckpointWeights.load

    def recording(self, prefix, dtype=torch.float32):
        tensors = real(self, prefix, dtype)
        loads.append((prefix, sum(t.numel() for t in tensors.values())))
        return tensors

    monkeypatch.setattr(CheckpointWeights, "load", recording)
    export(model, tmp_path, seq=SEQ, chunks=CHUNK)
    layers = {int(p.split(".layers.")[1].split(".")[0]) for p, _ in loads if p.startswith("language_model.model.layers.")}
    assert layers == set(range(spec.text.num_layers))  # every layer read by a prefix of its own
    size = {name: int(np.prod(weights.shape(name))) for name in weights.location}
    for prefix, n in loads:  # a load holds its prefix's tensors and nothing else
        assert n == sum(v for name, v in size.items() if name.startswith(prefix)), prefix
    # The most ever held at once is one layer: the largest prefix that ends at a layer number.
    layer_sizes: dict[str, int] = {}
    for name, v in size.items():
        if ".layers." in name:
            head, tail = name.split(".layers.", 1)
            prefix = f"{head}.layers.{tail.split('.')[0]}."
            layer_sizes[prefix] = layer_sizes.get(prefix, 0) + v
    assert max(n for _, n in loads) <= max(layer_sizes.values()) < total / 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_tables_stream_into_external_data_unchanged(tmp_path, dtype, transpose):
    from safetensors.torch import save_file

    table = torch.randn(37, 11).to(dtype)
    save_file({"language_model.lm_head.weight": table}, tmp_path / "model.safetensors")
    weights = CheckpointWeights(tmp_path)
    with open(tmp_path / "out.bin", "wb") as out:
        out.write(b"head")  # the table goes at the file's position, not at 0
        # five rows a slab: eight slabs, the last one short
        length = weights.write_float32("language_model.lm_head.weight", out, transpose=transpose, slab_bytes=5 * 11 * 4)
        assert out.tell() == 4 + length == 4 + table.numel() * 4
    written = np.fromfile(tmp_path / "out.bin", np.float32, offset=4)
    expected = weights.load("language_model.lm_head.")["weight"].numpy()
    np.testing.assert_array_equal(written, (expected.T if transpose else expected).ravel())


def test_patches_are_reversible(checkpoint_factory):
    from transformers import MllamaForConditionalGeneration

    from lvb.patches import PATCHES, patched, target

    model = MllamaForConditionalGeneration.from_pretrained(checkpoint_factory("gqa2-cross-last")).eval()
    originals = {target(p): getattr(*target(p)) for p in PATCHES}
    vision = model.model.vision_model
    pixels = torch.randn(1, 1, 4, 3, 32, 32)
    ids = torch.tensor([[2]])
    mask = torch.tensor([[[1, 1, 0, 0]]])
    with torch.no_grad():
        before = vision(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
        with patched():
            assert all(getattr(*a) is not f for a, f in originals.items())
            inside = vision(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
        after = vision(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
    assert all(getattr(*a) is f for a, f in originals.items())
    assert torch.equal(before, after)
    assert torch.allclose(before, inside, atol=1e-6)  # the patch changes how, not what


def test_vision_attention_in_head_groups_is_transformers_own(checkpoint_factory, monkeypatch):
    """Split into one group per head, transformers' eager vision tower gives what it gives whole."""
    from transformers import MllamaForConditionalGeneration

    from lvb.patches import patched

    model_dir = checkpoint_factory("gqa4-cross-pair")
    vision = MllamaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval().model.vision_model
    config = vision.config
    pixels = torch.randn(1, 1, config.max_num_tiles, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(0))
    ids, mask = torch.tensor([[2]]), torch.tensor([[[1] * (config.max_num_tiles - 1) + [0]]])
    with torch.no_grad():
        whole = vision(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
        softmax, calls = torch.nn.functional.softmax, []
        monkeypatch.setattr(torch.nn.functional, "softmax", lambda *a, **k: calls.append(1) or softmax(*a, **k))
        monkeypatch.setenv("LVB_SCORES_BYTES_PER_GROUP", "1")
        with patched():
            split = vision(pixel_values=pixels, aspect_ratio_ids=ids, aspect_ratio_mask=mask).last_hidden_state
    assert len(calls) == (config.num_hidden_layers + config.num_global_layers) * config.attention_heads
    assert torch.allclose(whole, split, atol=1e-6)


@pytest.mark.parametrize("long_prompt", [False, True], ids=["stacked-queries", "flash-form"])
@pytest.mark.parametrize("name", ["gqa2-cross-last", "gqa4-cross-pair"])
def test_grouped_query_attention_is_transformers_own(name, long_prompt, checkpoint_factory):
    """With the text layers' query heads grouped per K/V head (no repeat_kv), transformers'
    own model gives the logits it gives unpatched, picture and cross-attention included: for a
    prompt short enough that the self-attention stacks its query heads, and a longer one in
    the flash-attention form."""
    from transformers import MllamaForConditionalGeneration

    from lvb.patches import STACKED_QUERIES_UP_TO, patched

    model = MllamaForConditionalGeneration.from_pretrained(checkpoint_factory(name), attn_implementation="eager").eval()
    config = model.config.vision_config
    generator = torch.Generator().manual_seed(0)
    tiles = config.max_num_tiles
    tokens = STACKED_QUERIES_UP_TO + 4 if long_prompt else 6
    inputs = dict(
        input_ids=torch.tensor([[model.config.image_token_index] + [5 + i for i in range(tokens - 1)]]),
        pixel_values=torch.randn(1, 1, tiles, 3, config.image_size, config.image_size, generator=generator),
        aspect_ratio_ids=torch.tensor([[1]]), aspect_ratio_mask=torch.tensor([[[1] + [0] * (tiles - 1)]]),
        cross_attention_mask=torch.tensor([[[1] + [0] * (tiles - 1)]]).expand(1, tokens, tiles)[:, :, None, :].reshape(1, tokens, 1, tiles),
    )
    assert model.config.text_config.num_attention_heads > model.config.text_config.num_key_value_heads
    with torch.no_grad():
        plain = model(**inputs).logits
        with patched():
            grouped = model(**inputs).logits
    assert torch.allclose(plain, grouped, atol=1e-5), (plain - grouped).abs().max()


def exported_graphs(work, kinds: tuple[str, ...]):
    """(name, ONNX graph without its weights) of every exported net of `kinds`; at least one."""
    import onnx

    nets = json.loads((work / "export" / "manifest.json").read_text())["nets"]
    names = [name for name, entry in nets.items() if entry["kind"] in kinds]
    assert names, kinds
    for name in names:
        yield name, onnx.load(str(work / "export" / name / f"{name}.onnx"), load_external_data=False).graph


def test_cross_attention_blocks_never_repeat_kv(export_factory):
    """No cross-attention block of a fixture whose query heads share K/V heads copies the
    image's K/V to them (repeat_kv is an Expand): the only copies are of a mask, one row per
    query head. (A self-attention block keeps repeat_kv's form but over a short chunk, which the
    compile fuses into flash attention either way: tests/test_compile.py checks the fused op.)"""
    for name, graph in exported_graphs(export_factory("gqa2-cross-last"), ("cross_prefill", "cross_decode")):
        masks = {i.name for i in graph.input if "mask" in i.name}
        for node in graph.node:
            if node.op_type in ("Expand", "Tile"):
                assert node.input[0] in masks, (name, node.name)
                masks.update(node.output)


def test_vision_padding_channel_expands_feed_only_concats(export_factory):
    """In every vision layer each Expand of the padding flags to the heads feeds only the Concat
    that adds it to the queries or keys: tpu-mlir drops an Expand (its Tile) in front of a Mul,
    and a Mul by a scalar then hands the Concat one head's channel, a miscompile the simulator
    check shows (bench/repro_vision_channel.py)."""
    for name, graph in exported_graphs(export_factory("gqa2-cross-last"), ("vision_layer", "vision_global")):
        users: dict[str, list[str]] = {}
        for node in graph.node:
            for value in node.input:
                users.setdefault(value, []).append(node.op_type)
        expands = [node for node in graph.node if node.op_type in ("Expand", "Tile")]
        for node in expands:
            assert users[node.output[0]] == ["Concat"], (name, node.name, users[node.output[0]])
        assert len(expands) == 2, (name, [n.name for n in expands])  # the query's side and the key's


@pytest.mark.parametrize("groups", ["one head a group", "whole"])
def test_vision_layer_with_a_padding_channel_is_transformers_own(groups, checkpoint_factory, monkeypatch):
    """lvb's vision layer hands the attention the padding flags (patches.PaddedTokens), which it
    adds as a channel of the queries and keys: every token's output, padding included, is what
    transformers' layer gives with its own [tokens, tokens] mask, for a picture whose last tiles
    are padding."""
    from transformers.models.mllama import modeling_mllama
    from transformers.models.mllama.modeling_mllama import MllamaForConditionalGeneration

    from lvb.contract import padded_patches
    from lvb.export.parts import VisionLayer
    from lvb.patches import patched

    if groups == "whole":
        monkeypatch.setenv("LVB_SCORES_BYTES_PER_GROUP", str(2**40))
    model_dir = checkpoint_factory("gqa4-cross-pair")
    vision = MllamaForConditionalGeneration.from_pretrained(model_dir, attn_implementation="eager").eval().model.vision_model
    config = vision.config
    tiles, patches = config.max_num_tiles, vision.num_patches
    padded = padded_patches(patches)
    assert padded > patches and tiles > 1  # both kinds of padding: patches rounding a tile up, and a padded tile
    tile_flags = torch.tensor([[1] * (tiles - 1) + [0]])
    hidden = torch.randn(1, tiles * padded, config.hidden_size, generator=torch.Generator().manual_seed(0))
    for layer in (vision.transformer.layers[0], vision.global_transformer.layers[0]):
        with torch.no_grad():
            mask = modeling_mllama._prepare_aspect_ratio_attention_mask(tile_flags, patches, padded, torch.float32)
            expected = layer(hidden, attention_mask=mask)
            with patched():
                got = VisionLayer(layer, patches, padded)(hidden, tile_flags.view(1, 1, tiles).int())
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_heads_per_group_follows_the_budget():
    """The 11B's vision attention (16 heads over 4 x 1608 tokens) goes four heads at a time
    (what tpu-mlir's flash attention costs as if whole); a fixture's, a few KB of scores, stays
    whole under the default budget."""
    from lvb.contract import padded_patches
    from lvb.patches import SCORES_BYTES_PER_GROUP, heads_per_group

    config = json.loads((Path(__file__).parent / "data" / "llama-3.2-11b-vision.config.json").read_text())
    v = ModelSpec.from_config(config).vision
    tokens = v.max_num_tiles * padded_patches(v.patches_per_tile)
    budget = SCORES_BYTES_PER_GROUP  # the default, whatever the tests' environment says
    assert heads_per_group(v.num_heads, tokens, tokens, budget) == 4
    assert heads_per_group(v.num_heads, tokens, tokens // 4, budget) == min(v.num_heads, SCORES_BYTES_PER_GROUP // (tokens * tokens))
    assert heads_per_group(4, 96, 96, budget) == 4


def test_vision_nets_are_exported_one_head_at_a_time(export_factory, checkpoint_factory):
    """The session's exports split every head (tests/conftest.py): one softmax per head in
    each vision layer's graph, so the parity and simulator tests on them cover the split."""
    import onnx

    name = "gqa2-cross-last"
    work, spec = export_factory(name), ModelSpec.from_dir(checkpoint_factory(name))
    assert spec.vision.num_heads > 1
    for net in ("vision_layer_0", "vision_global_0"):
        graph = onnx.load(str(work / "export" / net / f"{net}.onnx"), load_external_data=False).graph
        assert sum(node.op_type == "Softmax" for node in graph.node) == spec.vision.num_heads, net


def test_patches_are_restored_after_an_error():

    from lvb.patches import PATCHES, patched, target

    originals = {target(p): getattr(*target(p)) for p in PATCHES}
    with pytest.raises(RuntimeError):
        with patched():
            raise RuntimeError("boom")
    assert all(getattr(*a) is f for a, f in originals.items())


def test_bad_input_gives_one_line(tmp_path, checkpoint_factory):
    out = tmp_path / "work"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no config.json" in one_error_line(["export", "--model", str(empty), "--out", str(out)])

    not_mllama = tmp_path / "gpt2"
    not_mllama.mkdir()
    (not_mllama / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert "model_type is 'gpt2'" in one_error_line(["export", "--model", str(not_mllama), "--out", str(out)])
    text_llama = tmp_path / "llama"  # a Llama text config is taken (issue 34), and its missing widths named
    text_llama.mkdir()
    (text_llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "hidden_size is missing" in one_error_line(["export", "--model", str(text_llama), "--out", str(out)])

    model = checkpoint_factory("mha-cross-first")
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    for f in model.iterdir():
        (truncated / f.name).write_bytes(f.read_bytes())
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    output = one_error_line(["export", "--model", str(truncated), "--out", str(out), "--seq", str(SEQ)])
    assert "model.safetensors is truncated" in output

    assert "--seq 8 is too short" in one_error_line(["export", "--model", str(model), "--out", str(out), "--seq", "8"])
    assert not (out / "export" / "manifest.json").exists() or not json.loads((out / "export" / "manifest.json").read_text()).get("nets")


# Picture sizes as multiples of the tile (width, height): one tile; a grid of two tiles
# side by side, which leaves padded tiles where more than two fit; a tall one.
PICTURES = {"single tile": (0.8, 0.7), "partial grid": (2.0, 0.9), "tall": (0.7, 3.0)}


@pytest.mark.parametrize("shape", sorted(PICTURES))
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_vision_chain_equals_the_whole_transformers_tower(name, shape, export_factory, checkpoint_factory):
    """The per-layer vision nets, run in a chain by onnxruntime, give transformers' tower +
    projector, padded tiles included."""
    from PIL import Image
    from transformers import AutoProcessor, MllamaForConditionalGeneration

    from lvb.runtime.backends import open_engine
    from lvb.runtime.image import preprocess
    from lvb.runtime.pipeline import Checkpoint
    from lvb.runtime.runner import Buffers, Runner

    model_dir = checkpoint_factory(name)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = MllamaForConditionalGeneration.from_pretrained(model_dir).eval()
    tile, max_tiles = GEOMETRIES[name].tile, GEOMETRIES[name].max_tiles
    width, height = (round(f * tile) for f in PICTURES[shape])
    picture = Image.fromarray((np.random.default_rng(3).random((height, width, 3)) * 255).astype(np.uint8))
    inputs = processor(images=picture, return_tensors="pt")
    tiles = int(inputs["aspect_ratio_mask"].sum())
    rows, cols = model.config.vision_config.supported_aspect_ratios[int(inputs["aspect_ratio_ids"]) - 1]
    assert tiles == rows * cols and {"single tile": tiles == 1, "partial grid": cols > rows,
                                     "tall": rows > cols}[shape], (rows, cols)
    if shape == "single tile":
        assert tiles < max_tiles  # every geometry has more than one tile: the rest are padding
    with torch.no_grad():
        states = model.model.vision_model(pixel_values=inputs["pixel_values"], aspect_ratio_ids=inputs["aspect_ratio_ids"],
                                          aspect_ratio_mask=inputs["aspect_ratio_mask"]).last_hidden_state
        expected = model.model.multi_modal_projector(states).reshape(1, -1, model.config.text_config.hidden_size).numpy()
    with open_engine("onnxruntime", onnx_work=export_factory(name)) as engine:
        checkpoint = Checkpoint.load(model_dir)
        Runner(checkpoint.spec, engine, checkpoint.tokenizer.image_id).encode_image(preprocess(picture, checkpoint.image_config))
        got = engine.read(Buffers.CROSS_STATES)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
