"""Image preprocessing for mllama (Llama-3.2-Vision) with numpy and Pillow only.

Reproduces, value for value, transformers' ``MllamaImageProcessorPil``: the class that
``AutoImageProcessor`` loads for ``"image_processor_type": "MllamaImageProcessor"`` when
torchvision is not installed. The steps: convert to RGB (transparency composited onto
white), Pillow-resize the uint8 image to fit the best canvas of tiles, zero-pad, rescale
and normalise, split into tiles, pad to ``max_num_tiles`` tiles.
"""

from __future__ import annotations

import math
import os
import stat
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lvb.errors import LvbError

_FORMATS = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# MllamaImageProcessorPil's defaults, used for keys that are missing or null.
_DEFAULTS = {
    "size": {"height": 224, "width": 224},
    "max_image_tiles": 4,
    "resample": 2,  # PIL bilinear
    "rescale_factor": 1 / 255,
    "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5),
    "do_convert_rgb": True,
    "do_resize": True,
    "do_pad": True,
    "do_rescale": True,
    "do_normalize": True,
}


class ImageError(LvbError, ValueError):
    """An unusable image or preprocessor config; the message names the problem and the fix."""


def _is_number(value) -> bool:
    """A finite int or float from JSON (not a bool, not a string, not NaN)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class ImageProcessorConfig:
    tile_size: int
    max_num_tiles: int
    resample: int
    rescale_factor: float  # 1.0 when the config has do_rescale false
    image_mean: tuple[float, float, float]  # zeros when the config has do_normalize false
    image_std: tuple[float, float, float]  # ones when the config has do_normalize false
    do_convert_rgb: bool

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorConfig:
        """Read a preprocessor_config.json dict as transformers writes it."""

        def get(key):
            return _DEFAULTS[key] if d.get(key) is None else d[key]

        def bad(key, why):
            return ImageError(
                f"unsupported preprocessor config: {key}={d.get(key)!r} {why}; "
                "use the preprocessor_config.json of a Llama-3.2-Vision checkpoint"
            )

        kind = d.get("image_processor_type")
        if kind is not None and not str(kind).startswith("MllamaImageProcessor"):
            raise bad("image_processor_type", "is not an mllama image processor")
        for key in ("do_resize", "do_pad"):
            if not get(key):
                raise bad(key, "(mllama always resizes and pads)")
        size = get("size")
        if isinstance(size, int) and not isinstance(size, bool):
            size = {"height": size, "width": size}
        tile = size.get("height") if isinstance(size, dict) else None
        if not (isinstance(tile, int) and tile > 0 and size.get("width") == tile):
            raise bad("size", "(needs a square {'height': N, 'width': N})")
        max_tiles = get("max_image_tiles")
        if not (isinstance(max_tiles, int) and max_tiles > 0):
            raise bad("max_image_tiles", "(needs a positive integer)")
        resample = get("resample")
        if not (isinstance(resample, int) and 0 <= resample <= 5):
            raise bad("resample", "(needs a PIL resampling code 0-5)")

        def per_channel(key):
            value = get(key)
            values = [value] * 3 if isinstance(value, (int, float)) else value
            if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(_is_number(v) for v in values)):
                raise bad(key, "(needs a number or 3 numbers, one per RGB channel)")
            if key == "image_std" and 0 in values:
                raise bad(key, "(a standard deviation of 0 divides by zero)")
            return tuple(float(v) for v in values)

        # Folding the switches into the numbers gives bit-identical results: x * 1.0 == x
        # and (x - 0) / 1 == x in float32.
        rescale = 1.0
        if get("do_rescale"):
            rescale = get("rescale_factor")
            if not _is_number(rescale):
                raise bad("rescale_factor", "(needs a number)")
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        if get("do_normalize"):
            mean, std = per_channel("image_mean"), per_channel("image_std")
        return cls(tile, max_tiles, resample, float(rescale), mean, std, bool(get("do_convert_rgb")))


@dataclass(frozen=True, eq=False)
class ProcessedImage:
    pixel_values: np.ndarray  # float32 [1, 1, max_num_tiles, 3, tile, tile]
    aspect_ratio_ids: np.ndarray  # int64 [1, 1]
    aspect_ratio_mask: np.ndarray  # int64 [1, 1, max_num_tiles]
    num_tiles: int
    tile_grid: tuple[int, int]  # (rows, cols) of tiles
    resized_size: tuple[int, int]  # (height, width) of the image inside the canvas
    notes: tuple[str, ...] = ()  # what preprocessing did that the user should know


def supported_aspect_ratios(max_num_tiles: int) -> list[tuple[int, int]]:
    """Tile grids with at most max_num_tiles tiles, in transformers' order.

    transformers documents the pairs as (width, height) but uses them as (rows, cols):
    the first number multiplies the canvas height, and aspect_ratio_ids index (rows, cols).
    """
    n = max_num_tiles
    return [(a, b) for a in range(1, n + 1) for b in range(1, n + 1) if a * b <= n]


def load_image(path) -> Image.Image:
    """Open an image file and apply its EXIF orientation, as transformers' load_image does.

    Unlike transformers' load_image this keeps the image mode (no convert("RGB"), which
    would drop alpha); preprocess composites transparency onto white.
    """
    name = os.fspath(path)

    def fail(problem, fix):
        return ImageError(f"cannot read image {name!r}: {problem}; {fix}")

    try:
        mode = os.stat(name).st_mode
        if not stat.S_ISREG(mode):  # a FIFO or a device would block open() or never end
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, not a file" if stat.S_ISFIFO(mode) else "not a regular file"
            raise fail(f"is {kind}", "pass the path of an image file")
        file = open(name, "rb")
    except OSError as e:
        raise fail((e.strerror or str(e)).lower(), "pass the path of a readable image file") from None
    with file:
        try:
            image = Image.open(file)
            image.load()  # decode now: Image.open is lazy and would hide truncation
            return ImageOps.exif_transpose(image)
        except UnidentifiedImageError:
            raise fail("not an image file (PIL cannot identify it)", f"pass a {_FORMATS} file") from None
        except Image.DecompressionBombError as e:
            raise fail(f"too many pixels ({e})", "downscale the image") from None
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise fail(f"corrupt or truncated ({e})", "re-export or re-download the file") from None


def preprocess(image: Image.Image, config: ImageProcessorConfig) -> ProcessedImage:
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageError(f"image has no pixels (size {width}x{height}); pass a non-empty image")
    tile = config.tile_size
    rows, cols = _tile_grid(height, width, config.max_num_tiles, tile)
    new_h, new_w = _fit_size(height, width, rows * tile, cols * tile, tile)

    image, notes = _to_8_bits(image)
    rgb = _to_rgb(image, config.do_convert_rgb)
    canvas = np.zeros((rows * tile, cols * tile, 3), np.uint8)
    canvas[:new_h, :new_w] = np.asarray(rgb.resize((new_w, new_h), resample=config.resample))
    tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, tile, tile)

    num_tiles = rows * cols
    pixel_values = np.zeros((1, 1, config.max_num_tiles, 3, tile, tile), np.float32)
    channel = np.arange(3)[:, None, None]
    pixel_values[0, 0, :num_tiles] = _lookup_table(config)[channel, tiles]
    ids = np.array([[supported_aspect_ratios(config.max_num_tiles).index((rows, cols)) + 1]], np.int64)
    mask = np.zeros((1, 1, config.max_num_tiles), np.int64)
    mask[0, 0, :num_tiles] = 1
    return ProcessedImage(pixel_values, ids, mask, num_tiles, (rows, cols), (new_h, new_w), notes)


def _to_8_bits(image: Image.Image) -> tuple[Image.Image, tuple[str, ...]]:
    """A 16-bit (or 32-bit integer or float) grey picture scaled to 8 bits. Pillow's
    convert("RGB"), and so transformers, clips such values to 0..255, which turns every
    pixel brighter than 0.4 % of full scale white: the model would see a blank picture.
    Scaling departs from transformers for these pictures only (8-bit content in a wide
    mode is left as it is, as transformers does), and says so."""
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image, ()
    top = float(image.getextrema()[1])
    if top <= 255 and not image.mode.startswith("I;16"):
        return image, ()
    full = 65535.0 if image.mode.startswith("I;16") or top <= 65535 else top
    # A band of rows at a time: no full-size float64 copy (a 6300 x 6300 picture would take 1 GB).
    width, height = image.size
    scaled = np.empty((height, width), np.uint8)
    for top_row, rows in _bands(image.size):
        values = np.asarray(image.crop((0, top_row, width, top_row + rows)), dtype=np.float64)
        scaled[top_row : top_row + rows] = np.clip(np.round(values * (255.0 / full)), 0, 255)
    note = f"the {image.mode} picture was scaled from 0..{full:.0f} to 8 bits (transformers would clip it at 255)"
    return Image.fromarray(scaled), (note,)


_BAND_PIXELS = 1 << 20


def _bands(size: tuple[int, int]):
    """(first row, rows) of bands of about a million pixels covering a picture of `size`."""
    width, height = size
    rows = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, rows):
        yield top, min(rows, height - top)


def _to_rgb(image: Image.Image, convert: bool) -> Image.Image:
    if not convert:
        if image.mode != "RGB":
            raise ImageError(
                f"image mode {image.mode!r} is not RGB and the preprocessor config has do_convert_rgb "
                "false; convert the image to RGB first"
            )
        return image
    # transformers' convert_to_rgb: anything with alpha or a transparency key is composited
    # onto white; the rest goes through Image.convert("RGB") (wide modes were scaled before).
    try:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            # Band by band (the same pixels): one full-size copy, the result, instead of four.
            width = image.size[0]
            rgb = Image.new("RGB", image.size)
            for top, rows in _bands(image.size):
                box = (0, top, width, top + rows)
                band = image.crop(box).convert("RGBA")
                white = Image.new("RGBA", band.size, (255, 255, 255, 255))
                rgb.paste(Image.alpha_composite(white, band).convert("RGB"), box)
            return rgb
        return image if image.mode == "RGB" else image.convert("RGB")
    except ValueError as e:
        raise ImageError(f"cannot convert image mode {image.mode!r} to RGB ({e}); save it as 8-bit RGB") from None


def _tile_grid(height: int, width: int, max_num_tiles: int, tile: int) -> tuple[int, int]:
    """transformers' get_optimal_tiled_canvas, as (rows, cols): the smallest upscale, else
    the largest downscale, ties going to the smallest canvas (first in order)."""
    grids = supported_aspect_ratios(max_num_tiles)
    scales = [min(rows * tile / height, cols * tile / width) for rows, cols in grids]
    upscales = [s for s in scales if s >= 1]
    best = min(upscales) if upscales else max(scales)
    return min((g for g, s in zip(grids, scales) if s == best), key=lambda g: g[0] * g[1])


def _fit_size(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """transformers' get_image_size_fit_to_canvas: (height, width) to resize to."""
    target_h = min(max(height, tile), canvas_h)
    target_w = min(max(width, tile), canvas_w)
    scale_h, scale_w = target_h / height, target_w / width
    if scale_w < scale_h:
        return min(math.floor(height * scale_w) or 1, target_h), target_w
    return target_h, min(math.floor(width * scale_h) or 1, target_w)


def _lookup_table(config: ImageProcessorConfig) -> np.ndarray:
    """float32 [3, 256]: each channel's output for each uint8 value.

    Same dtypes as transformers, so the results are bit-identical: rescale in float64 and
    cast to float32, then subtract and divide in float32. Padding (0) goes through it too.
    """
    values = (np.arange(256, dtype=np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.array(config.image_mean, np.float32)[:, None]
    std = np.array(config.image_std, np.float32)[:, None]
    return (values[None, :] - mean) / std
