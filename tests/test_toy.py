"""The committed toy checkpoint (models/toy, scripts/train_toy.py) answers about fresh pictures.

It is loaded exactly as a user would load a downloaded checkpoint, and asked
about pictures it never saw (the training used seed 1000, the README's numbers
seed 2000), one at a time through the chat template and model.generate.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, MllamaForConditionalGeneration

from lvb.testing.checkpoints import TOY
from lvb.tasks import ANSWERS, QUESTION, sample

TOY_DIR = Path(__file__).resolve().parent.parent / "models" / "toy"
FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "processor_config.json",
    "preprocessor_config.json",
    "README.md",
    "lvb-task.json",
)
TEST_SEED = 3000
PICTURES = 200


@pytest.fixture(scope="module")
def toy():
    processor = AutoProcessor.from_pretrained(TOY_DIR)
    model = MllamaForConditionalGeneration.from_pretrained(TOY_DIR).eval()
    # One thread: the tensors are tiny, and on a busy machine OpenMP threads that
    # spin-wait for each other make every op many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield processor, model
    torch.set_num_threads(threads)


def test_folder_is_complete_and_small():
    missing = [name for name in FILES if not (TOY_DIR / name).is_file()]
    assert not missing, f"{TOY_DIR} lacks {missing}; run scripts/train_toy.py"
    size = sum(f.stat().st_size for f in TOY_DIR.rglob("*") if f.is_file())
    assert size < 10_000_000, f"{size / 1e6:.1f} MB"


def test_folder_has_the_toy_geometry():
    config = json.loads((TOY_DIR / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert (text["num_hidden_layers"], text["cross_attention_layers"]) == (TOY.text_layers, list(TOY.cross_layers))
    assert (text["hidden_size"], text["intermediate_size"]) == (TOY.hidden, TOY.intermediate)
    assert (text["num_attention_heads"], text["num_key_value_heads"]) == (TOY.heads, TOY.kv_heads)
    assert (vision["image_size"], vision["patch_size"], vision["max_num_tiles"]) == (TOY.tile, TOY.patch, TOY.max_tiles)
    # INT4 groups of 64 along every text linear's input.
    assert TOY.hidden % 64 == 0 and TOY.intermediate % 64 == 0


def test_shapes_imports_without_torch():
    code = "import sys, lvb.tasks; assert 'torch' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_pictures_are_seeded_and_vary():
    a, b = sample(12, seed=7), sample(12, seed=7)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert all(np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, b))
    pictures = sample(PICTURES, TEST_SEED)
    assert {answer for _, answer in pictures} == set(ANSWERS)
    sizes = [image.size for image, _ in pictures]
    assert min(min(s) for s in sizes) >= 30 and max(max(s) for s in sizes) <= 300
    assert any(w >= 3 * h for w, h in sizes) and any(h >= 3 * w for w, h in sizes)


@torch.no_grad()
@pytest.mark.slow  # a few hundred generate calls
def test_answers_fresh_pictures(toy):
    processor, model = toy
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    grids, wrong = set(), []
    pictures = sample(PICTURES, TEST_SEED)
    for image, answer in pictures:
        inputs = processor(text=prompt, images=image, add_special_tokens=False, return_tensors="pt")
        grids.add(int(inputs["aspect_ratio_ids"]))
        out = model.generate(**inputs, do_sample=False, max_new_tokens=8)
        reply = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        if reply != answer:
            wrong.append((answer, reply))
    # The pictures exercise the tiling: most of the 8 tile grids of 4 tiles occur.
    assert len(grids) >= 6, grids
    accuracy = 1 - len(wrong) / len(pictures)
    assert accuracy >= 0.95, f"{accuracy:.1%}: {wrong[:10]}"
