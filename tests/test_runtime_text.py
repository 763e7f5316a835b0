"""lvb.text against transformers' MllamaProcessor for the same checkpoint."""

from __future__ import annotations

import json
import random
import shutil
from functools import lru_cache
from pathlib import Path

import jinja2
import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer

from lvb.text import ChatTemplate, StreamDecoder, TextError, Tokenizer

GEOMETRIES = ["mha-cross-first", "gqa2-cross-last"]
IMAGE = Image.new("RGB", (40, 30), (200, 30, 30))


def image():
    # The processor loads images from the content blocks; our template sees them as "<Image>".
    return {"type": "image", "image": IMAGE}


def text(value: str):
    return {"type": "text", "text": value}


CHATS = {
    "single image": [{"role": "user", "content": [image(), text("What is in the picture?")]}],
    "text only": [{"role": "user", "content": "Hello, how are you today?"}],
    "text only, list content": [{"role": "user", "content": [text("Describe the image.")]}],
    "system": [
        {"role": "system", "content": "  Please answer in one short sentence.\n"},
        {"role": "user", "content": "What colour is it?"},
    ],
    "system, list content": [
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [text("What shape is it?")]},
    ],
    "multi-turn": [
        {"role": "user", "content": [image(), text("What is in the picture?")]},
        {"role": "assistant", "content": "a red circle"},
        {"role": "user", "content": [text("What colour is it?")]},
        {"role": "assistant", "content": [text("red")]},
        {"role": "user", "content": "Tell me more about it."},
    ],
    "text before image": [{"role": "user", "content": [text("Look: "), image(), text(" What shape?")]}],
    "image in a later turn": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello, how are you today?"},
        {"role": "user", "content": [image(), text("What is in the picture?")]},
    ],
    "two images": [{"role": "user", "content": [image(), image(), text("Which is which?")]}],
    "unicode": [{"role": "user", "content": "Café, naïve, jalapeño, 東京, 😀 — ünïcödé ✓ \u200b\t\n end"}],
    "empty text": [{"role": "user", "content": ""}],
    "none values dropped": [{"role": "user", "content": [image(), text("hi")], "name": None}],
}


@lru_cache(maxsize=None)
def hf_processor(directory: str):
    return AutoProcessor.from_pretrained(directory)


@pytest.fixture(params=GEOMETRIES, scope="module")
def model_dir(request, checkpoint_factory) -> Path:
    return Path(checkpoint_factory(request.param))


def copy_checkpoint(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.safetensors"))
    return target


def n_images(prompt: str) -> int:
    return prompt.count("<|image|>")


def processor_ids(processor, prompt: str, **kwargs) -> list[int]:
    images = [IMAGE] * n_images(prompt) or None
    return list(processor(text=prompt, images=images, **kwargs)["input_ids"][0])


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", CHATS)
def test_render_and_ids_match_processor(model_dir, chat, add_generation_prompt):
    processor = hf_processor(str(model_dir))
    messages = CHATS[chat]
    prompt = ChatTemplate.from_dir(model_dir).render(messages, add_generation_prompt=add_generation_prompt)
    assert prompt == processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    ids = Tokenizer.from_dir(model_dir).encode_prompt(prompt)
    assert ids == processor_ids(processor, prompt, add_special_tokens=False)
    expected = processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == list(expected[0])


def test_date_string_and_special_token_variables(model_dir):
    processor = hf_processor(str(model_dir))
    template = ChatTemplate.from_dir(model_dir)
    messages = CHATS["text only"]
    prompt = template.render(messages, date_string="26 Jul 2024")
    assert "Today Date: 26 Jul 2024\n" in prompt
    assert prompt == processor.apply_chat_template(messages, add_generation_prompt=True, date_string="26 Jul 2024")
    # The template sees the tokenizer's named special tokens; explicit variables win.
    assert template.render(messages, bos_token="<BOS>").startswith("<BOS><|start_header_id|>")
    assert template.special_tokens == processor.tokenizer.special_tokens_map


def test_template_exception_raises_text_error(model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [image(), text("What?")]}]
    with pytest.raises(jinja2.TemplateError, match="incompatible with system messages"):
        hf_processor(str(model_dir)).apply_chat_template(messages)
    with pytest.raises(TextError, match=r"chat_template\.jinja.*Prompting with images is incompatible with system messages\.$"):
        ChatTemplate.from_dir(model_dir).render(messages)
    with pytest.raises(TextError, match="rejected the chat"):
        ChatTemplate.from_dir(model_dir).render([])  # messages[0] is undefined
    with pytest.raises(TextError, match="^messages must be a list of"):
        ChatTemplate.from_dir(model_dir).render("hello")
    with pytest.raises(TextError, match="^each message must be a dict"):
        ChatTemplate.from_dir(model_dir).render(["hello"])


# Templates exercising the jinja environment: flags, globals, filters, sandbox.
CUSTOM_TEMPLATES = [
    "{{ messages | tojson }}|{{ messages | tojson(indent=2, sort_keys=true) }}",
    "{% for m in messages %}\n  {% if m.role == 'user' %}\n    U:{{ m.content }}\n  {% endif %}\n{% endfor %}\n!",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.role }}{% continue %}x{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "{{ dict(a=1, b='é') | tojson }} {{ bos_token }}{{ eos_token }}{{ pad_token }} {{ unk_token is defined }}",
    "{% generation %}{{ messages[0].content }}{% endgeneration %}{{ add_generation_prompt }} {{ tools }} {{ documents }}",
    "{{ strftime_now('%Y') }} {{ messages[0]['content'][0] }}",
    "{{ messages[0].content | trim }}{{ '<x>' }} {{ messages | length }}",
    "{% for m in messages %}{{ m.name is defined }}{{ m.reasoning_content }}{{ m.thinking }}{% endfor %}",
]

# What only custom templates can tell apart: dropped None values, OpenAI image_url blocks,
# reasoning fields, numpy scalars.
ODD_MESSAGES = [
    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///x.png"}}, text("hi")], "name": None},
    {"role": "assistant", "content": "ok", "reasoning": "because", "score": np.float32(0.5), "flag": np.bool_(False)},
]


@pytest.mark.parametrize("source", CUSTOM_TEMPLATES)
def test_custom_templates_match_transformers(model_dir, source):
    processor = hf_processor(str(model_dir))
    template = ChatTemplate(source, ChatTemplate.from_dir(model_dir).special_tokens)
    for messages in (CHATS["unicode"], CHATS["multi-turn"], CHATS["single image"], ODD_MESSAGES):
        expected = processor.apply_chat_template(messages, chat_template=source, add_generation_prompt=True)
        assert template.render(messages) == expected


@pytest.mark.parametrize(
    "source, message",
    [
        ("{% set ns = namespace(_x=1) %}", "underscore"),
        ("{% set ns = namespace() %}{% set ns._x = 1 %}", "underscore"),
        ("{{ messages.__class__ }}{{ ''.__class__.__mro__ }}", "unsafe|__class__|rejected"),
        ("{{ raise_exception('no ' ~ messages[0].role ~ '\nplease') }}", r"rejected the chat: no user please$"),
        ("{{ 'a' + 1 }}", "failed: TypeError"),
    ],
)
def test_sandbox_and_raise_exception(source, message):
    with pytest.raises(TextError, match=message):
        ChatTemplate(source).render(CHATS["text only"])


def test_template_syntax_error():
    with pytest.raises(TextError, match="syntax error at line 2"):
        ChatTemplate("ok\n{% if %}", origin="chat_template.jinja")


def test_template_precedence_matches_transformers(model_dir, tmp_path):
    directory = copy_checkpoint(model_dir, tmp_path / "ckpt")
    source = (directory / "chat_template.jinja").read_text()
    messages = CHATS["text only"]

    # Published Llama 3.2 Vision layout: tokenizer_config.json's "chat_template" only. The
    # processor in transformers 5 does not fall back to it; the tokenizer renders it.
    (directory / "chat_template.jinja").unlink()
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = source.replace("Cutting", "TOKENIZER Cutting")
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    template = ChatTemplate.from_dir(directory)
    assert template.origin == "tokenizer_config.json"
    expected = AutoTokenizer.from_pretrained(directory).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    )
    assert "TOKENIZER" in expected and template.render(messages) == expected

    # Older tokenizer configs hold a list of named templates.
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    assert ChatTemplate.from_dir(directory).source == source

    # chat_template.json (the legacy processor file) beats chat_template.jinja.
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": source.replace("Cutting", "JSON Cutting")}))
    (directory / "chat_template.jinja").write_text(source.replace("Cutting", "JINJA Cutting"))
    expected = AutoProcessor.from_pretrained(directory).apply_chat_template(messages, add_generation_prompt=True)
    assert "JSON" in expected and ChatTemplate.from_dir(directory).render(messages) == expected

    # A "chat_template" in processor_config.json beats both.
    processor_config = json.loads((directory / "processor_config.json").read_text())
    processor_config["chat_template"] = source.replace("Cutting", "PROCESSOR Cutting")
    (directory / "processor_config.json").write_text(json.dumps(processor_config))
    expected = AutoProcessor.from_pretrained(directory).apply_chat_template(messages, add_generation_prompt=True)
    assert "PROCESSOR" in expected and ChatTemplate.from_dir(directory).render(messages) == expected
    del processor_config["chat_template"]
    (directory / "processor_config.json").write_text(json.dumps(processor_config))

    for name in ("chat_template.json", "chat_template.jinja"):
        (directory / name).unlink()
    del config["chat_template"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TextError, match="has no chat template"):
        ChatTemplate.from_dir(directory)


RAW_PROMPTS = [
    "Hello",
    "<|image|>If I had to write a haiku for this one",
    "<|image|><|image|>two pictures",
    "a<|image|>b",
    "<|image|><|begin_of_text|>If I had to write a haiku",
    "x <|begin_of_text|> y",
    "<|begin_of_text|>Hello",
    "<|begin_of_text|><|begin_of_text|>",
    "",
    " Café 😀",
]


@pytest.mark.parametrize("bos_post_processor", [False, True])
def test_raw_prompts_match_processor_call(model_dir, tmp_path, bos_post_processor):
    """Without a chat template the processor inserts bos itself (build_string_from_input)."""
    directory = model_dir
    if bos_post_processor:
        # Llama 3's tokenizer.json post-processor, which prepends bos when add_special_tokens.
        directory = copy_checkpoint(model_dir, tmp_path / "llama3")
        tokenizer_json = json.loads((directory / "tokenizer.json").read_text())
        bos, bos_id = "<|begin_of_text|>", Tokenizer.from_dir(model_dir).bos_id
        tokenizer_json["post_processor"] = {
            "type": "Sequence",
            "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {
                    "type": "TemplateProcessing",
                    "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                    "pair": [
                        {"SpecialToken": {"id": bos, "type_id": 0}},
                        {"Sequence": {"id": "A", "type_id": 0}},
                        {"SpecialToken": {"id": bos, "type_id": 1}},
                        {"Sequence": {"id": "B", "type_id": 1}},
                    ],
                    "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
                },
            ],
        }
        (directory / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    processor = AutoProcessor.from_pretrained(directory)
    tokenizer = Tokenizer.from_dir(directory)
    for prompt in RAW_PROMPTS:
        if prompt.startswith(tokenizer.bos_token):
            expected = processor_ids(processor, prompt, add_special_tokens=False)
        else:
            expected = processor_ids(processor, prompt)
        assert tokenizer.encode_prompt(prompt) == expected, prompt
        for add in (True, False):
            assert tokenizer.encode_prompt(prompt, add_special_tokens=add) == processor_ids(
                processor, prompt, add_special_tokens=add
            )
    # transformers really does double bos here, for Llama 3's post-processor.
    assert tokenizer.encode_prompt("Hello")[:2].count(tokenizer.bos_id) == (2 if bos_post_processor else 1)
    # A rendered chat gets one bos either way, as processor.apply_chat_template(tokenize=True) gives.
    prompt = ChatTemplate.from_dir(directory).render(CHATS["single image"])
    ids = tokenizer.encode_prompt(prompt)
    assert ids.count(tokenizer.bos_id) == 1
    assert ids == list(processor.apply_chat_template(CHATS["single image"], add_generation_prompt=True, tokenize=True)[0])


def test_tokenizer_settings_match_transformers(model_dir):
    processor = hf_processor(str(model_dir))
    hf = processor.tokenizer
    tokenizer = Tokenizer.from_dir(model_dir)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    assert (tokenizer.bos_token, tokenizer.bos_id) == (hf.bos_token, hf.bos_token_id)
    assert (tokenizer.eos_token, tokenizer.eos_id) == (hf.eos_token, hf.eos_token_id)
    assert (tokenizer.pad_token, tokenizer.pad_id) == (hf.pad_token, hf.pad_token_id)
    assert (tokenizer.image_token, tokenizer.image_id) == (processor.image_token, processor.image_token_id)
    assert tokenizer.image_id == config["image_token_index"]
    assert tokenizer.stop_ids == set(generation["eos_token_id"]) | {hf.eos_token_id}
    assert tokenizer.vocab_size == len(hf)
    assert tokenizer.id_of("<|eot_id|>") == hf.convert_tokens_to_ids("<|eot_id|>")
    with pytest.raises(TextError, match="not in the tokenizer"):
        tokenizer.id_of("<|no_such_token|>")


def test_checkpoint_problems_raise_text_error(model_dir, tmp_path):
    directory = copy_checkpoint(model_dir, tmp_path / "broken")
    config = json.loads((directory / "config.json").read_text())
    config["image_token_index"] += 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(TextError, match="image_token_index"):
        Tokenizer.from_dir(directory)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(TextError, match="tokenizer.json not found"):
        Tokenizer.from_dir(directory)


def random_ids(rng: random.Random, vocab: int, special: list[int]) -> list[int]:
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(0, 40))]
    for _ in range(rng.randrange(0, 4)):
        ids.insert(rng.randrange(len(ids) + 1), rng.choice(special))
    return ids


def test_decode_matches_processor(model_dir):
    processor = hf_processor(str(model_dir))
    tokenizer = Tokenizer.from_dir(model_dir)
    rng = random.Random(0)
    special = sorted(tokenizer.stop_ids | {tokenizer.bos_id, tokenizer.image_id})
    for _ in range(200):
        ids = random_ids(rng, tokenizer.vocab_size, special)
        for skip in (True, False):
            assert tokenizer.decode(ids, skip_special_tokens=skip) == processor.decode(ids, skip_special_tokens=skip)
    ids = processor_ids(processor, ChatTemplate.from_dir(model_dir).render(CHATS["unicode"]), add_special_tokens=False)
    assert tokenizer.decode(np.array(ids)) == processor.decode(ids, skip_special_tokens=True)
    assert "東京, 😀" in tokenizer.decode(ids)


def stream(tokenizer: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    decoder = StreamDecoder(tokenizer, skip_special_tokens=skip)
    pieces = [decoder.push(i) for i in ids]
    return pieces + [decoder.flush()]


def test_stream_decoder_invariant_on_random_ids(model_dir):
    tokenizer = Tokenizer.from_dir(model_dir)
    rng = random.Random(1)
    special = sorted(tokenizer.stop_ids | {tokenizer.bos_id, tokenizer.image_id})
    for _ in range(500):
        ids = random_ids(rng, tokenizer.vocab_size, special)
        for skip in (True, False):
            assert "".join(stream(tokenizer, ids, skip)) == tokenizer.decode(ids, skip_special_tokens=skip), ids


def test_stream_decoder_never_splits_a_character(model_dir):
    tokenizer = Tokenizer.from_dir(model_dir)
    sentence = "Café, naïve, jalapeño, 東京, 😀 — unicode text must round-trip. 🦙🖼️ ok"
    ids = tokenizer.encode_prompt(sentence + "<|eot_id|>", add_special_tokens=False)[1:]  # drop the inserted bos
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)  # characters really are split
    decoder = tokenizer.stream()
    pieces, window = [], 0
    for i in ids:
        pieces.append(decoder.push(i))
        window = max(window, len(decoder._ids))
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) + decoder.flush() == sentence
    assert window <= 8 < len(ids)  # a window of a few characters (<= 4 byte tokens each), not the history


def test_stream_decoder_invalid_bytes_come_out_as_decode_renders_them(model_dir):
    tokenizer = Tokenizer.from_dir(model_dir)
    # Byte-level tokens that alone are not UTF-8: a lone continuation byte, a lead byte.
    continuation = next(i for i in range(256) if tokenizer.decode([i]) == "\ufffd" and tokenizer.decode([i, i]) == "\ufffd\ufffd")
    lead = tokenizer.encode_prompt("東", add_special_tokens=False)[1]
    a, b = tokenizer.encode_prompt("a", False)[1], tokenizer.encode_prompt("b", False)[1]
    for ids in ([a, continuation, b], [a, lead, b], [a, lead], [lead], [continuation, continuation], [a, lead, lead, b]):
        pieces = stream(tokenizer, ids, True)
        assert "".join(pieces) == tokenizer.decode(ids)
        assert "\ufffd" in "".join(pieces)
    assert stream(tokenizer, [a, lead], True)[-1] == "\ufffd"  # held until flush
