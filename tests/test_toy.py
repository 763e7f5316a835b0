"""The committed toy checkpoint (models/toy, scripts/train_toy.py): complete, small, of
the toy geometry, with seeded picture sampling. That it answers fresh pictures is shown
through the whole pipeline on the simulator (tests/test_pipeline.py: 50 pictures
at INT4, 20 at INT8; `make demo`: 100), which implies the checkpoint itself does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from lvb.runtime.image import preprocess
from lvb.runtime.pipeline import Checkpoint
from lvb.testing.checkpoints import TOY
from lvb.tasks import ANSWERS, sample

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
    # They exercise the tiling: most of the toy's 8 tile grids occur (the pipeline test asks
    # the toy about pictures of this kind on the simulator).
    config = Checkpoint.load(TOY_DIR).image_config
    grids = {int(preprocess(image, config).aspect_ratio_ids.ravel()[0]) for image, _ in pictures}
    assert len(grids) >= 6, grids
