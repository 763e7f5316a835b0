"""Plain Llama text checkpoints (LlamaForCausalLM) through lvb: the text nets without vision or
cross-attention, equal to transformers' generate token for token on onnxruntime."""

import json

import pytest

from helpers import one_error_line
from lvb.contract import Kind
from lvb.runtime.backends import open_engine
from lvb.runtime.pipeline import ChatError, Checkpoint, Session
from lvb.spec import ModelSpec, SpecError
from lvb.testing.checkpoints import LLAMA_GEOMETRIES
from lvb.verify.checks import TransformersChat

NEW_TOKENS = 12


@pytest.fixture(scope="module", params=sorted(LLAMA_GEOMETRIES))
def llama(request, export_factory, checkpoint_factory):
    model = checkpoint_factory(request.param)
    engine = open_engine("onnxruntime", onnx_work=export_factory(request.param))
    yield model, Checkpoint.load(model), engine
    engine.close()


def test_spec_is_the_text_stack_alone(checkpoint_factory):
    for name, geometry in LLAMA_GEOMETRIES.items():
        spec = ModelSpec.from_dir(checkpoint_factory(name))
        assert spec.text_only and spec.vision is None and spec.text.cross_attention_layers == ()
        assert spec.text.num_layers == geometry.layers and spec.text.num_kv_heads == geometry.kv_heads


def test_export_holds_only_text_nets(llama, export_factory):
    model, checkpoint, engine = llama
    kinds = {Kind(net["kind"]) for net in json.loads((export_factory(model.name) / "export" / "manifest.json")
                                                     .read_text())["nets"].values()}
    assert kinds == {Kind.EMBED, Kind.EMBED_CACHE, Kind.SELF_PREFILL, Kind.SELF_DECODE, Kind.LM_HEAD, Kind.GREEDY_HEAD}


def test_answers_equal_transformers_generate(llama):
    model, checkpoint, engine = llama
    session = Session(checkpoint, engine)
    reference = TransformersChat(model)
    messages = []
    for question in ("Hello there", "What can you do? Tell me more about it, please."):
        reply = session.ask(question, max_new_tokens=NEW_TOKENS)
        messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        expected = reference.generate(messages, [], NEW_TOKENS, date_string=session.today.strftime("%d %b %Y"))
        assert reply.tokens == expected
        messages.append({"role": "assistant", "content": [{"type": "text", "text": reply.text}]})


def test_an_image_for_a_text_model_is_refused(llama):
    model, checkpoint, engine = llama
    with pytest.raises(ChatError, match="text model"):
        Session(checkpoint, engine).ask("What is it?", image=object())


def test_a_llama_with_biased_projections_is_refused(checkpoint_factory, tmp_path):
    config = json.loads((checkpoint_factory("llama-gqa2-tied") / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"attention_bias": True}))
    with pytest.raises(SpecError, match="attention_bias"):
        ModelSpec.from_dir(tmp_path)


def test_untied_checkpoint_without_its_head_is_refused(checkpoint_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    source = checkpoint_factory("llama-mha-untied")
    shutil.copytree(source, tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tmp_path / "m" / "model.safetensors", metadata={"format": "pt"})
    line = one_error_line(["export", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "w"), "--seq", "160"])
    assert "language_model.lm_head.weight" in line
