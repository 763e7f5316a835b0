"""The Chat Completions request, read and checked by hand so that every refusal is one
sentence saying what lvb cannot do and what to send instead.

Pictures arrive only as `data:` URLs. Their bytes and pixels are capped, the format is
sniffed from the bytes (the declared type is not trusted) and the size is read from the
header before anything is decoded, so a decompression bomb is refused, not decoded.
Nothing from a request is ever used as a file path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps, UnidentifiedImageError

from lvb.errors import LvbError


class RequestError(LvbError):
    """A request lvb refuses; `status` is the HTTP status, the message says why and what to do."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 32 * 1024 * 1024
    image_bytes: int = 16 * 1024 * 1024
    image_pixels: int = 40_000_000  # decoded width x height; an 8000 x 5000 photo


IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
DECLARED_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}

# Parameters lvb cannot honour, with the value that means "not used" (None: any value refuses).
UNSUPPORTED = {
    "tools": [], "tool_choice": "none", "functions": [], "function_call": "none", "logprobs": False,
    "top_logprobs": 0, "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0, "audio": None,
    "prediction": None, "parallel_tool_calls": None, "web_search_options": None,
}


@dataclass(frozen=True)
class Turn:
    role: str  # system, user or assistant
    text: str
    image: Image.Image | None = field(default=None, compare=False)
    digest: str | None = None  # sha256 of the picture's bytes

    def message(self) -> dict:
        """The turn as Session keeps it (and as `lvb chat` renders it: the picture first)."""
        return {"role": self.role, "content": ([{"type": "image"}] if self.image is not None else [])
                + [{"type": "text", "text": self.text}]}


@dataclass(frozen=True)
class ChatRequest:
    turns: list[Turn]  # the last one is the new user turn
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; vLLM's extension
    repetition_penalty: float | None = None  # likewise
    seed: int | None = None
    stop: tuple[str, ...] = ()


def parse_chat_request(data, limits: Limits) -> ChatRequest:
    if not isinstance(data, dict):
        raise RequestError("the body must be a JSON object with `messages`")
    for name, unused in UNSUPPORTED.items():
        value = data.get(name)
        if value is not None and value != unused and not (unused == [] and value == []):
            raise RequestError(f"`{name}` is not supported by lvb serve (an image chat model without tools, "
                               "log-probabilities or penalties); leave it out", param=name)
    n = data.get("n")
    if n is not None and n != 1:
        raise RequestError("`n` > 1 is not supported: lvb serve answers once per request; send several requests",
                           param="n")
    response_format = data.get("response_format")
    if response_format is not None and (not isinstance(response_format, dict) or response_format.get("type") != "text"):
        raise RequestError("`response_format` other than text is not supported; leave it out", param="response_format")
    modalities = data.get("modalities")
    if modalities is not None and list(modalities) != ["text"]:
        raise RequestError("only text answers: `modalities` must be [\"text\"] or left out", param="modalities")

    turns = _turns(data.get("messages"), limits)
    stream = _typed(data, "stream", bool) or False
    options = data.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("`stream_options` must be an object", param="stream_options")
    max_tokens = _typed(data, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _typed(data, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(f"`max_tokens` must be at least 1, got {max_tokens}", param="max_tokens")
    stop = data.get("stop")
    stop = () if stop is None else (stop,) if isinstance(stop, str) else stop
    if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop) and len(stop) <= 4):
        raise RequestError("`stop` must be a non-empty string or a list of up to 4 of them", param="stop")
    return ChatRequest(
        turns=turns, stream=stream, include_usage=bool(options.get("include_usage")), max_tokens=max_tokens,
        temperature=_number(data, "temperature"), top_p=_number(data, "top_p"), top_k=_typed(data, "top_k", int),
        repetition_penalty=_number(data, "repetition_penalty"), seed=_typed(data, "seed", int), stop=tuple(stop),
    )


def _typed(data: dict, name: str, kind: type):
    value = data.get(name)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(f"`{name}` must be {'an integer' if kind is int else 'true or false'}, got {value!r}", param=name)
    return value


def _number(data: dict, name: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"`{name}` must be a number, got {value!r}", param=name)
    return float(value)


def _turns(messages, limits: Limits) -> list[Turn]:
    if not isinstance(messages, list) or not messages:
        raise RequestError("`messages` must be a non-empty list of {role, content} objects", param="messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object with `role` and `content`", param="messages")
        role = message.get("role")
        if role == "developer":  # newer OpenAI clients' name for the system turn
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}: role {role!r} is not supported; use system, user or assistant "
                               "(lvb serve has no tools)", param="messages")
        if message.get("tool_calls") or message.get("function_call"):
            raise RequestError(f"{where}: tool calls are not supported", param="messages")
        if role == "system" and i != 0:
            raise RequestError(f"{where}: a system message must come first, and only one", param="messages")
        text, image, digest = _content(message.get("content"), where, limits, pictures=role == "user")
        turns.append(Turn(role, text, image, digest))
    if turns[-1].role != "user":
        raise RequestError("the last message must be the user's: lvb serve answers it", param="messages")
    return turns


def _content(content, where: str, limits: Limits, pictures: bool):
    if isinstance(content, str):
        return content, None, None
    if not isinstance(content, list):
        raise RequestError(f"{where}: `content` must be a string or a list of parts", param="messages")
    texts, image, digest = [], None, None
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url" and pictures:
            if image is not None:
                raise RequestError(f"{where}: one picture per message; send the next one in a later message",
                                   param="messages")
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            image, digest = decode_data_url(url, f"{where}.content[{j}]", limits)
        elif kind == "image_url":
            raise RequestError(f"{where}: only user messages can carry a picture", param="messages")
        else:
            raise RequestError(f"{where}.content[{j}]: part type {kind!r} is not supported; use text or image_url",
                               param="messages")
    return "\n".join(texts), image, digest


def decode_data_url(url, where: str, limits: Limits) -> tuple[Image.Image, str]:
    """A `data:image/...;base64,` URL -> (decoded picture, sha256 of its bytes)."""
    if not isinstance(url, str):
        raise RequestError(f"{where}: image_url needs a `url` string", param="messages")
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise RequestError(f"{where}: remote image URLs are not fetched (the server may have no internet); "
                           "send the picture inline as data:image/png;base64,...", param="messages")
    if scheme != "data":
        raise RequestError(f"{where}: the image URL must be a data: URL (data:image/png;base64,...)", param="messages")
    header, _, payload = url.partition(",")
    declared, *flags = header[5:].split(";")
    if declared.lower() not in DECLARED_TYPES or "base64" not in flags:
        raise RequestError(f"{where}: the picture must be PNG, JPEG, WebP or GIF sent as data:image/<type>;base64,...; "
                           f"got {header[:60]!r}", param="messages")
    if len(payload) * 3 // 4 > limits.image_bytes:
        raise RequestError(f"{where}: the picture is over {limits.image_bytes // 2**20} MiB; send a smaller one",
                           status=413, param="messages")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the data URL is not valid base64", param="messages") from None
    return decode_image(raw, where, limits), hashlib.sha256(raw).hexdigest()


def decode_image(raw: bytes, where: str, limits: Limits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # The pixel count is checked below, before decoding, against our own (lower) cap.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
            width, height = image.size
            if width * height > limits.image_pixels:
                raise RequestError(f"{where}: the picture is {width}x{height} = {width * height} pixels, over the "
                                   f"{limits.image_pixels} allowed; downscale it", param="messages")
            image.load()
        return ImageOps.exif_transpose(image)
    except RequestError:
        raise
    except UnidentifiedImageError:
        raise RequestError(f"{where}: not a PNG, JPEG, WebP or GIF picture", param="messages") from None
    except Image.DecompressionBombError:
        raise RequestError(f"{where}: the picture claims too many pixels to decode; downscale it", param="messages") from None
    except Exception as e:  # PIL raises many kinds for bad files; its text is only quoted
        raise RequestError(f"{where}: not a readable PNG, JPEG, WebP or GIF picture ({type(e).__name__}: {e})",
                           param="messages") from None
