"""lvb.runtime.image against transformers' own mllama image processor.

The reference is whatever AutoImageProcessor loads from a checkpoint directory, which
without torchvision is MllamaImageProcessorPil.
"""

import importlib.util
import json
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import AutoImageProcessor
from transformers.image_utils import load_image as hf_load_image
from transformers.models.mllama import image_processing_pil_mllama as hf_mllama

from lvb.runtime import image as lvb

SKIMAGE_DATA = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"

# preprocessor_config.json of meta-llama/Llama-3.2-11B-Vision-Instruct.
STOCK = {
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "MllamaImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "max_image_tiles": 4,
    "processor_class": "MllamaProcessor",
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 560, "width": 560},
}
CONFIGS = {
    "stock560x4": STOCK,
    "tile56x4": {**STOCK, "size": {"height": 56, "width": 56}},
    # Only the type: everything else comes from the class defaults.
    "tile28x6_bicubic_defaults": {
        "image_processor_type": "MllamaImageProcessor",
        "size": {"height": 28, "width": 28},
        "max_image_tiles": 6,
        "resample": 3,
    },
    "tile32x2_nearest_raw": {
        **STOCK,
        "size": 32,
        "max_image_tiles": 2,
        "resample": 0,
        "do_rescale": False,
        "do_normalize": False,
    },
    "tile16x3_normalize_only": {**STOCK, "size": {"height": 16, "width": 16}, "max_image_tiles": 3, "do_rescale": False},
    "tile20x9_lanczos_scalar_mean": {
        **STOCK,
        "size": {"height": 20, "width": 20},
        "max_image_tiles": 9,
        "resample": 1,
        "rescale_factor": 1 / 127.5,
        "image_mean": 1.0,
        "image_std": 0.75,
    },
}


@pytest.fixture(scope="module")
def processors(tmp_path_factory):
    """name -> (lvb config, transformers processor loaded the way a checkpoint is)."""
    out = {}
    for name, cfg in CONFIGS.items():
        ckpt = tmp_path_factory.mktemp(name)
        (ckpt / "preprocessor_config.json").write_text(json.dumps(cfg))
        ref = AutoImageProcessor.from_pretrained(ckpt)
        # With torchvision installed AutoImageProcessor would pick the torchvision
        # MllamaImageProcessor instead, whose resize is not Pillow's.
        assert type(ref) is hf_mllama.MllamaImageProcessorPil
        out[name] = (lvb.ImageProcessorConfig.from_dict(cfg), ref)
    return out


def assert_matches(ours, ref_out):
    ref_pixels = ref_out["pixel_values"]
    assert ours.pixel_values.dtype == np.float32
    assert ours.pixel_values.shape == ref_pixels.shape
    assert np.abs(ours.pixel_values - ref_pixels).max() <= 1e-5
    assert ours.aspect_ratio_ids.dtype == np.int64
    np.testing.assert_array_equal(ours.aspect_ratio_ids, ref_out["aspect_ratio_ids"])
    assert ours.aspect_ratio_mask.dtype == np.int64
    np.testing.assert_array_equal(ours.aspect_ratio_mask, ref_out["aspect_ratio_mask"])
    assert [[ours.num_tiles]] == ref_out["num_tiles"]
    assert ours.tile_grid[0] * ours.tile_grid[1] == ours.num_tiles


def compare(image, name, processors):
    config, ref = processors[name]
    assert_matches(lvb.preprocess(image, config), ref(image, return_tensors="np"))


# ---- synthetic images ----------------------------------------------------------------


def noisy_rgb(width, height, seed=0):
    """Gradients plus noise, so every resampling filter has work to do."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [x * 255 / max(width - 1, 1), y * 255 / max(height - 1, 1), (x + y) * 127 / max(width + height - 2, 1)], -1
    )
    return np.clip(base + rng.normal(0, 30, (height, width, 3)), 0, 255).astype(np.uint8)


def rgba_partial():
    rgb = noisy_rgb(300, 200, seed=1)
    alpha = np.tile(np.linspace(0, 255, 300).astype(np.uint8), (200, 1))
    alpha[:50, :100] = 0  # fully transparent over bright noise
    alpha[150:, 200:] = 255
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def palette(transparent):
    image = Image.fromarray(noisy_rgb(220, 170, seed=2)).quantize(64)
    if transparent:
        image.info["transparency"] = 5
    return image


def color_keyed(mode):
    image = Image.fromarray(noisy_rgb(130, 90, seed=3)).convert(mode)
    key = image.getpixel((10, 10))
    image.info["transparency"] = key
    return image


def high_bit_depth(mode):
    """8-bit content (and some negatives, which Pillow clips) in a wide mode: lvb leaves it
    to Pillow, as transformers does. Wider content is scaled (test_wide_pictures_are_scaled)."""
    rng = np.random.default_rng(4)
    values = rng.integers(-40, 255, (120, 160))
    if mode == "I":
        return Image.fromarray(values.astype(np.int32))
    return Image.fromarray(values.astype(np.float32) + 0.25)


IMAGES = {
    "rgb_landscape": lambda tile: Image.fromarray(noisy_rgb(640, 480)),
    "rgb_portrait": lambda tile: Image.fromarray(noisy_rgb(250, 700, seed=5)),
    "rgba_partial_alpha": lambda tile: rgba_partial(),
    "rgba_opaque": lambda tile: rgba_partial().convert("RGB").convert("RGBA"),
    "la": lambda tile: rgba_partial().convert("LA"),
    "pa": lambda tile: rgba_partial().convert("PA"),
    "l": lambda tile: Image.fromarray(noisy_rgb(333, 222, seed=6)).convert("L"),
    "bilevel_1": lambda tile: Image.fromarray(noisy_rgb(333, 222, seed=6)).convert("1"),
    "p": lambda tile: palette(transparent=False),
    "p_transparent": lambda tile: palette(transparent=True),
    "rgb_color_key": lambda tile: color_keyed("RGB"),
    "l_color_key": lambda tile: color_keyed("L"),
    "i32": lambda tile: high_bit_depth("I"),
    "float32": lambda tile: high_bit_depth("F"),
    "cmyk": lambda tile: Image.fromarray(noisy_rgb(200, 300, seed=7)).convert("CMYK"),
    "ycbcr": lambda tile: Image.fromarray(noisy_rgb(200, 300, seed=7)).convert("YCbCr"),
    "rgba_premultiplied": lambda tile: rgba_partial().convert("RGBa"),
    "1x1": lambda tile: Image.new("RGB", (1, 1), (200, 30, 90)),
    "tiny_5x7": lambda tile: Image.fromarray(noisy_rgb(5, 7, seed=8)),
    "wide_2000x3": lambda tile: Image.fromarray(noisy_rgb(2000, 3, seed=9)),
    "tall_3x2000": lambda tile: Image.fromarray(noisy_rgb(3, 2000, seed=10)),
    "exact_tile": lambda tile: Image.fromarray(noisy_rgb(tile, tile, seed=11)),
    "exact_2x1_tiles": lambda tile: Image.fromarray(noisy_rgb(2 * tile, tile, seed=12)),
    "tile_plus_1": lambda tile: Image.fromarray(noisy_rgb(tile + 1, tile - 1, seed=13)),
}
PHOTOS = [
    "astronaut.png",  # RGB
    "coffee.png",  # RGB
    "chelsea.png",  # RGB
    "camera.png",  # L
    "logo.png",  # RGBA
    "horse.png",  # RGBA
    "rocket.jpg",  # JPEG
    "no_time_for_that_tiny.gif",  # P, animated
]


@lru_cache(maxsize=None)
def photo(name):
    return lvb.load_image(SKIMAGE_DATA / name)


@pytest.mark.parametrize("image_name", IMAGES)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_synthetic_image_matches_transformers(processors, config_name, image_name):
    tile = processors[config_name][0].tile_size
    compare(IMAGES[image_name](tile), config_name, processors)


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("config_name", CONFIGS)
def test_photo_matches_transformers(processors, config_name, name):
    compare(photo(name), config_name, processors)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
@pytest.mark.parametrize("config_name", ["stock560x4", "tile56x4"])
def test_exif_rotated_jpeg_matches_transformers(processors, tmp_path, config_name, orientation):
    pixels = noisy_rgb(90, 60, seed=14)
    pixels[:20, :30] = (255, 0, 0)  # a marker in one corner, to see where it ends up
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"orientation{orientation}.jpg"
    Image.fromarray(pixels).save(path, quality=95, exif=exif.tobytes())

    ours = lvb.load_image(path)
    theirs = hf_load_image(str(path))
    assert ours.size == ((60, 90) if orientation in (6, 8) else (90, 60))
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    config, ref = processors[config_name]
    result = lvb.preprocess(ours, config)
    assert_matches(result, ref(theirs, return_tensors="np"))
    assert_matches(result, ref(str(path), return_tensors="np"))  # the processor loading the path itself


def test_tile_grid_and_resize_match_transformers_for_many_sizes():
    rng = random.Random(0)
    sizes = [(1, 1), (1, 5000), (5000, 1), (560, 560), (559, 561), (1120, 560), (2240, 559), (3, 2000)]
    sizes += [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(300)]
    sizes += [(rng.randint(1, 60), rng.randint(1, 60)) for _ in range(100)]
    for tile, max_tiles in [(560, 4), (28, 6), (14, 1), (7, 9)]:
        for h, w in sizes:
            canvas = hf_mllama.get_optimal_tiled_canvas(h, w, max_tiles, tile)
            rows, cols = lvb._tile_grid(h, w, max_tiles, tile)
            assert (rows * tile, cols * tile) == tuple(canvas), (h, w, tile, max_tiles)
            expected = hf_mllama.get_image_size_fit_to_canvas(h, w, canvas[0], canvas[1], tile)
            assert lvb._fit_size(h, w, rows * tile, cols * tile, tile) == tuple(expected), (h, w, tile)


@pytest.mark.parametrize("max_tiles", range(1, 10))
def test_supported_aspect_ratios_match_transformers(max_tiles):
    assert lvb.supported_aspect_ratios(max_tiles) == hf_mllama.get_all_supported_aspect_ratios(max_tiles)


def test_from_dict_reads_stock_config():
    config = lvb.ImageProcessorConfig.from_dict(STOCK)
    assert config == lvb.ImageProcessorConfig(
        tile_size=560,
        max_num_tiles=4,
        resample=2,
        rescale_factor=1 / 255,
        image_mean=(0.48145466, 0.4578275, 0.40821073),
        image_std=(0.26862954, 0.26130258, 0.27577711),
        do_convert_rgb=True,
    )


@pytest.mark.parametrize(
    "key, value",
    [
        ("do_resize", False),
        ("do_pad", False),
        ("size", {"height": 560, "width": 448}),
        ("size", {"shortest_edge": 560}),
        ("max_image_tiles", 0),
        ("resample", 7),
        ("image_mean", [0.5, 0.5]),
        ("image_std", "wide"),
        ("rescale_factor", "1/255"),
        ("image_processor_type", "CLIPImageProcessor"),
    ],
)
def test_from_dict_rejects_unsupported_settings(key, value):
    with pytest.raises(lvb.ImageError, match=f"^unsupported preprocessor config: {key}="):
        lvb.ImageProcessorConfig.from_dict({**STOCK, key: value})


def test_unconvertible_mode_raises_image_error():
    config = lvb.ImageProcessorConfig.from_dict(STOCK)
    with pytest.raises(lvb.ImageError, match="mode 'La'"):
        lvb.preprocess(Image.new("La", (8, 8)), config)
    raw = lvb.ImageProcessorConfig.from_dict({**STOCK, "do_convert_rgb": False})
    with pytest.raises(lvb.ImageError, match="do_convert_rgb"):
        lvb.preprocess(Image.new("L", (8, 8)), raw)


def _truncated_png(path):
    Image.fromarray(noisy_rgb(64, 64)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda p: None, "no such file"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("hello, not an image\n"), "not an image file"),
        (lambda p: p.write_bytes(b""), "not an image file"),
        (_truncated_png, "corrupt or truncated"),
    ],
    ids=["missing", "directory", "text_file", "empty_file", "truncated_png"],
)
def test_bad_input_raises_image_error_naming_the_file(tmp_path, make, problem):
    path = tmp_path / "input.png"
    make(path)
    with pytest.raises(lvb.ImageError) as info:
        lvb.load_image(path)
    message = str(info.value)
    assert message.startswith(f"cannot read image {str(path)!r}: {problem}")
    assert "\n" not in message
    assert isinstance(info.value, ValueError)


def test_load_image_keeps_mode_and_alpha():
    # transformers' load_image also calls convert("RGB"), which drops alpha without
    # compositing; lvb keeps the mode so preprocess can composite onto white, as the
    # processor does for a PIL image.
    logo = lvb.load_image(SKIMAGE_DATA / "logo.png")
    assert logo.mode == "RGBA"
    assert ImageOps.exif_transpose(Image.open(SKIMAGE_DATA / "logo.png")).tobytes() == logo.tobytes()


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_pictures_are_scaled_to_8_bits_with_a_note(mode):
    """transformers clips a 16-bit picture at 255 (almost all white); lvb scales it and says so."""
    config = lvb.ImageProcessorConfig.from_dict({"size": {"height": 28, "width": 28}, "max_image_tiles": 2})
    values = np.random.default_rng(5).integers(0, 65536, (40, 50))
    wide = Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    assert wide.mode == mode
    eight = Image.fromarray(np.round(values * 255 / 65535).astype(np.uint8), "L")
    got, expected = lvb.preprocess(wide, config), lvb.preprocess(eight, config)
    np.testing.assert_array_equal(got.pixel_values, expected.pixel_values)
    assert len(got.notes) == 1 and "scaled" in got.notes[0] and not expected.notes


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_band_by_band_equals_the_whole_picture(name, monkeypatch):
    """Alpha compositing and 8-bit scaling go band by band, to keep a large picture's memory to
    one full-size copy; the bands (here of 97 pixels, so many and uneven) change no value.
    The wide modes are scaled here, as the test below makes them."""
    import lvb.runtime.image as module

    config = lvb.ImageProcessorConfig.from_dict({"size": {"height": 28, "width": 28}, "max_image_tiles": 4})
    image = IMAGES[name](28)
    if image.mode in ("I", "F"):
        image = Image.fromarray(np.asarray(image) * 300)  # beyond 255: scaled
    whole = lvb.preprocess(image, config)
    monkeypatch.setattr(module, "_BAND_PIXELS", 97)
    banded = lvb.preprocess(image, config)
    np.testing.assert_array_equal(banded.pixel_values, whole.pixel_values)
    assert banded.notes == whole.notes
