"""The task `lvb verify` measures a checkpoint on when its lvb-task.json names one
(`"kind": "shapes"`, the toy's), and the toy was trained on: seeded synthetic
pictures, one coloured shape on a grey background.

Each picture holds exactly one shape (circle, square or triangle) in one colour
(red, green, blue or yellow), drawn anti-aliased at a random size (60-95% of the
canvas's short side) and position on a canvas of random size and aspect ratio
(30 to 300 px a side; 40% of canvases very wide or very tall, 3:1 to 8:1) so that
the mllama processor's tile grid changes from picture to picture. The background
is a grey (dark, mid or light, uniform or noisy) with at most a faint tint, so it
is never confused with the saturated shape colour.

The answer to QUESTION is the short phrase "a <colour> <shape>", e.g. "a red circle".

numpy and pillow only: this module must import without torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import numpy as np
from PIL import Image, ImageDraw

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle")

QUESTION = "What is in the picture?"
ANSWERS = tuple(f"a {c} {s}" for c in COLOURS for s in SHAPES)

# Saturated base colours; each channel is jittered by up to +-JITTER per picture.
RGB = {
    "red": (220, 35, 35),
    "green": (35, 185, 45),
    "blue": (40, 70, 225),
    "yellow": (235, 215, 35),
}
JITTER = 25
MIN_SIDE, MAX_SIDE = 30, 300
# The shape's width as a fraction of the canvas's short side. The smallest shapes
# (~15-30 px after the processor's resize) are where a tiny model errs.
SIZE = (0.6, 0.95)
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: smooth edges


def _canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    kind = rng.random()
    if kind < 0.6:  # anything in the square range
        w, h = rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2)
    else:  # very wide or very tall: aspect ratio 3:1 to 8:1
        short = rng.integers(36, 65)
        long = rng.integers(max(3 * short, 120), MAX_SIDE + 1)
        w, h = (long, short) if rng.random() < 0.5 else (short, long)
    return int(w), int(h)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    grey = rng.integers(0, 256)
    tint = rng.integers(-12, 13, size=3)
    base = np.clip(grey + tint, 0, 255).astype(np.float32)
    pixels = np.broadcast_to(base, (h, w, 3)).copy()
    if rng.random() < 0.5:  # noisy, grey noise
        sigma = rng.uniform(4, 20)
        pixels += rng.normal(0, sigma, size=(h, w, 1)).astype(np.float32)
    return pixels


def _mask(rng: np.random.Generator, shape: str, w: int, h: int) -> np.ndarray:
    """An anti-aliased coverage mask in [0, 1] of one shape placed at random."""
    side = min(w, h)
    size = rng.uniform(*SIZE) * side  # bounding-box width
    height = size * (rng.uniform(0.8, 1.0) if shape == "triangle" else 1.0)
    x0 = rng.uniform(0, w - size)
    y0 = rng.uniform(0, h - height)
    k = SUPERSAMPLE
    big = Image.new("L", (w * k, h * k), 0)
    draw = ImageDraw.Draw(big)
    box = [x0 * k, y0 * k, (x0 + size) * k, (y0 + height) * k]
    if shape == "circle":
        draw.ellipse(box, fill=255)
    elif shape == "square":
        draw.rectangle(box, fill=255)
    elif shape == "triangle":
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=255)
    else:
        raise ValueError(shape)
    small = big.resize((w, h), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32)[..., None] / 255.0


def draw(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One random picture and its answer, e.g. (<PIL.Image 212x41>, "a blue triangle")."""
    colour = COLOURS[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    w, h = _canvas_size(rng)
    pixels = _background(rng, w, h)
    ink = np.clip(np.array(RGB[colour]) + rng.integers(-JITTER, JITTER + 1, size=3), 0, 255).astype(np.float32)
    alpha = _mask(rng, shape, w, h)
    pixels = pixels * (1 - alpha) + ink * alpha
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")
    return image, f"a {colour} {shape}"


def pictures(seed: int) -> Iterator[tuple[Image.Image, str]]:
    """An endless seeded stream of (picture, answer); sample(n, seed) is its first n."""
    rng = np.random.default_rng(seed)
    while True:
        yield draw(rng)


def sample(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """n pictures with their answers, the same for the same seed."""
    return list(islice(pictures(seed), n))
