"""The protocol: OpenAI's Chat Completions request (and vLLM's /tokenize, /detokenize) as
typed pydantic models, and the checks that turn one into a `ChatRequest` the worker runs.

Every option is either honoured or refused with a 400 naming it: the body is parsed
strictly (no "1" for 1), an option lvb does not know is refused, and one it knows but
cannot honour is accepted only at the value that means "not used". A refusal is one
sentence saying what lvb cannot do and what to send instead.

Cost is bounded before the work. The JSON parser (pydantic-core's) refuses deep nesting
and invalid Unicode; text longer than the sequence could hold is refused by its length,
without calling the tokenizer; pictures arrive only as `data:` URLs, their bytes and
pixels are capped, the format is sniffed from the bytes, the size is read from the header
before decoding, and decoding waits for a pixel budget shared by all requests. Only the
pictures the engine will see are decoded (the newest of the history and the new turn's);
they are preprocessed at once, so a queued request holds tiles, not a full-size picture.
Nothing from a request is ever used as a file path.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import io
import re
import threading
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lvb.errors import LvbError


class RequestError(LvbError):
    """A request lvb refuses; `status` is the HTTP status, the message says why and what to do."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 32 * 1024 * 1024
    image_bytes: int = 16 * 1024 * 1024
    image_pixels: int = 40_000_000  # one picture, decoded width x height; an 8000 x 5000 photo
    decode_pixels: int = 40_000_000  # all the pictures being decoded at once, across requests
    decode_wait_seconds: float = 120.0  # how long a picture may wait for the decode budget


IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp", "GIF": "image/gif"}
DECLARED_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif"}


@dataclass(frozen=True)
class ServedModel:
    """What checking a request needs to know about the model behind the server."""

    name: str
    seq: int  # tokens the sequence holds
    max_token_chars: int  # the longest token's text: len(text) > seq x this cannot fit
    vocab_size: int
    stop_ids: tuple[int, ...]  # the checkpoint's end-of-answer tokens
    system_with_picture: bool  # whether the chat template takes a system message and a picture together
    prepare: Callable[[Image.Image], Any]  # a decoded picture -> what the session takes (ProcessedImage)
    history: str = "refuse"  # refuse or truncate a conversation longer than the sequence

    @property
    def max_text_chars(self) -> int:
        return self.seq * self.max_token_chars


# -- the protocol ---------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # one resolution only: the tiles of the checkpoint


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    name: None = None  # the chat template has no place for a speaker's name
    tool_calls: list[Any] | None = None
    tool_call_id: None = None
    function_call: None = None
    refusal: None = None


class StreamOptions(_Strict):
    include_usage: bool | None = None
    continuous_usage_stats: Literal[False] | None = None


class ResponseFormat(_Strict):
    type: Literal["text"]


# Options lvb knows but does not implement, with the values that mean "not used"; any other
# value is refused with the reason. (OpenAI's, vLLM's and llama.cpp's names.)
NOT_USED: dict[str, tuple[tuple, str]] = {
    "tools": (([],), "lvb serve has no tool calling"),
    "tool_choice": (("none",), "lvb serve has no tool calling"),
    "functions": (([],), "lvb serve has no tool calling"),
    "function_call": (("none",), "lvb serve has no tool calling"),
    "parallel_tool_calls": ((False,), "lvb serve has no tool calling"),
    "logprobs": ((False,), "log-probabilities are not returned"),
    "top_logprobs": ((0,), "log-probabilities are not returned"),
    "prompt_logprobs": ((0,), "log-probabilities are not returned"),
    "logit_bias": (({},), "logit biases are not applied"),
    "presence_penalty": ((0, 0.0), "only repetition_penalty is applied"),
    "frequency_penalty": ((0, 0.0), "only repetition_penalty is applied"),
    "length_penalty": ((1, 1.0), "there is no beam search"),
    "use_beam_search": ((False,), "there is no beam search"),
    "best_of": ((1,), "one answer is sampled per request"),
    "typical_p": ((1, 1.0), "typical sampling is not implemented; use top_p, top_k or min_p"),
    "guided_json": ((), "no constrained decoding"),
    "guided_regex": ((), "no constrained decoding"),
    "guided_choice": ((), "no constrained decoding"),
    "guided_grammar": ((), "no constrained decoding"),
    "guided_decoding_backend": ((), "no constrained decoding"),
    "json_schema": ((), "no constrained decoding"),
    "structured_outputs": ((), "no constrained decoding"),
    "grammar": ((), "no constrained decoding"),
    "allowed_token_ids": ((), "no constrained decoding"),
    "bad_words": (([],), "no constrained decoding"),
    "n_predict": ((), "it is llama.cpp's name: use max_tokens"),
    "add_generation_prompt": ((True,), "the answer always starts a new assistant turn"),
    "continue_final_message": ((False,), "the last message must be the user's, and the answer a new turn"),
    "echo": ((False,), "the answer does not repeat the prompt"),
    "include_stop_str_in_output": ((False,), "a stop string is never part of the answer"),
    "skip_special_tokens": ((True,), "control tokens are never part of the answer"),
    "spaces_between_special_tokens": ((True,), "control tokens are never part of the answer"),
    "chat_template": ((), "the checkpoint's own chat template is used"),
    "chat_template_kwargs": (({},), "the checkpoint's own chat template is used, as it is"),
    "documents": (([],), "the chat template is given no documents"),
    "mm_processor_kwargs": (({},), "pictures are preprocessed as the checkpoint says"),
    "truncate_prompt_tokens": ((), "a prompt is never cut; see `lvb serve --history truncate`"),
    "audio": ((), "answers are text only"),
    "prediction": ((), "predicted outputs are not supported"),
    "web_search_options": ((), "lvb serve does not search the web"),
    "store": ((False,), "nothing is stored"),
    "metadata": (({},), "nothing is stored"),
    "reasoning_effort": ((), "the model does not reason in a separate channel"),
    "service_tier": (("auto", "default"), "there is one tier"),
    "priority": ((0,), "requests are answered in arrival order"),
}


class ChatCompletionRequest(_Strict):
    """The body of POST /v1/chat/completions (anything else in it is refused, see NOT_USED)."""

    model_config = ConfigDict(extra="allow", strict=True)  # extras are checked (refused) before validation

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)  # 0: greedy
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # vLLM's; -1 and 0: off
    min_p: float | None = Field(None, ge=0, le=1)  # vLLM's; 0: off
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)  # vLLM's
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's
    ignore_eos: bool = False  # vLLM's
    min_tokens: int = Field(0, ge=0)  # vLLM's
    n: Literal[1] | None = None
    response_format: ResponseFormat | None = None
    modalities: list[Literal["text"]] | None = None
    user: str | None = None  # OpenAI's end-user id, for abuse reports: accepted, it changes nothing

    @model_validator(mode="before")
    @classmethod
    def _refuse_unused(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, value in data.items():
                if name in cls.model_fields:
                    continue
                if name not in NOT_USED:
                    raise RequestError(f"`{name}` is not an option lvb serve knows; leave it out", param=name)
                neutral, why = NOT_USED[name]
                if value is not None and not any(type(value) is type(v) and value == v for v in neutral):
                    raise RequestError(f"`{name}` is not supported by lvb serve ({why}); leave it out", param=name)
            if isinstance(data.get("n"), int) and not isinstance(data["n"], bool) and data["n"] > 1:
                raise RequestError("`n` > 1 is not supported: lvb serve answers once per request; send several requests",
                                   param="n")
        return data


class TokenizeRequest(_Strict):
    """vLLM's POST /tokenize: a prompt, or messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = Field(None, min_length=1)
    add_special_tokens: bool = True  # for a prompt
    add_generation_prompt: bool = True  # for messages
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise RequestError("send either `prompt` (a string) or `messages` (a chat), not both nor neither")
        return self


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


def validate(kind: type[BaseModel], body: bytes):
    """The body as `kind`, or a RequestError naming the first problem and where it is."""
    try:
        return kind.model_validate_json(body)
    except ValidationError as e:
        # Of a union's errors (one per branch), the one that got furthest names the problem best.
        problem = max(e.errors(include_url=False, include_input=False), key=lambda p: len(p["loc"]))
        where = _where(problem["loc"])
        message = problem["msg"]
        if problem["type"] == "json_invalid":
            raise RequestError(f"the body is not valid JSON: {message.removeprefix('Invalid JSON: ')}") from None
        if problem["type"] == "model_type" and not where:
            raise RequestError("the body must be a JSON object") from None
        param = str(problem["loc"][0]) if problem["loc"] else None
        if problem["type"] == "extra_forbidden":
            raise RequestError(f"`{where}` is not a field lvb serve knows; leave it out", param=param) from None
        raise RequestError(f"`{where}`: {message[0].lower() + message[1:]}" if where else message, param=param) from None


_TYPE_NAMES = {"str", "int", "float", "bool", "none"}


def _where(loc) -> str:
    """pydantic's error location as a path into the JSON: messages[0].content[1].image_url.url."""
    out, tag = "", None  # tag: a tagged union's branch comes next (after its list index)
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            tag = "next" if tag == "after index" else tag
            continue
        if tag == "next":  # the tag that picked the branch, not a field
            tag = None
            continue
        if "[" in part or part in _TYPE_NAMES:  # the name of the union branch tried
            tag = "after index" if "tagged-union" in part else None
            continue
        out += ("." if out else "") + part
    return out


# -- what the worker runs -------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    role: str  # system, user or assistant
    text: str
    image: Any = field(default=None, compare=False)  # the preprocessed picture, when the engine will see it
    digest: str | None = None  # sha256 of the picture's bytes

    def message(self) -> dict:
        """The turn as Session keeps it (and as `lvb chat` renders it: the picture first)."""
        return {"role": self.role, "content": ([{"type": "image"}] if self.digest is not None else [])
                + [{"type": "text", "text": self.text}]}


@dataclass(frozen=True)
class ChatRequest:
    turns: list[Turn]  # the last one is the new user turn
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # not OpenAI's; vLLM's extension, as the next ones
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0
    dropped: int = 0  # exchanges left out before tokenizing, too long for the sequence (--history truncate)


def parse_chat_request(body: bytes, limits: Limits, model: ServedModel, budget: PixelBudget | None = None) -> ChatRequest:
    request = validate(ChatCompletionRequest, body)
    check_model(request.model, model)
    stop = () if request.stop is None else (request.stop,) if isinstance(request.stop, str) else tuple(request.stop)
    if len(stop) > 4 or not all(stop) or any(len(s) > model.max_text_chars for s in stop):
        raise RequestError(f"`stop` must be a non-empty string or a list of up to 4 of them, each at most "
                           f"{model.max_text_chars} characters (no answer is longer)", param="stop")
    for token in request.stop_token_ids or ():
        if not 0 <= token < model.vocab_size:
            raise RequestError(f"`stop_token_ids`: {token} is not a token id (0 to {model.vocab_size - 1})",
                               param="stop_token_ids")
    messages = _messages(request.messages, model, limits)
    messages, dropped = _bound_text(messages, model)
    turns = _turns(messages, limits, model, budget or PixelBudget(limits.decode_pixels))
    return ChatRequest(
        turns=turns, stream=request.stream, include_usage=bool(request.stream_options and request.stream_options.include_usage),
        max_tokens=request.max_completion_tokens if request.max_completion_tokens is not None else request.max_tokens,
        temperature=request.temperature, top_p=request.top_p, top_k=None if request.top_k == -1 else request.top_k,
        min_p=request.min_p, repetition_penalty=request.repetition_penalty, seed=request.seed, stop=stop,
        stop_token_ids=tuple(request.stop_token_ids or ()), ignore_eos=request.ignore_eos, min_tokens=request.min_tokens,
        dropped=dropped,
    )


def check_model(name: str | None, model: ServedModel) -> None:
    if name is not None and name != model.name:
        raise RequestError(f"the model `{name[:200]}` does not exist; this server serves `{model.name}` (GET /v1/models)",
                           status=404, param="model", code="model_not_found")


@dataclass
class _Message:
    role: str
    text: str
    picture: tuple[str, str] | None  # (where, data URL)


def _messages(messages: list[Message], model: ServedModel, limits: Limits) -> list[_Message]:
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if message.role == "developer" else message.role  # newer clients' name for it
        if role not in ("system", "user", "assistant"):
            raise RequestError(f"{where}: role {role!r} is not supported; use system, user or assistant "
                               "(lvb serve has no tools)", param="messages")
        if message.tool_calls:
            raise RequestError(f"{where}: tool calls are not supported", param="messages")
        if role == "system" and i != 0:
            raise RequestError(f"{where}: a system message must come first, and only one", param="messages")
        content = message.content
        if content is None:
            raise RequestError(f"{where}: `content` is missing; send a string or a list of parts", param="messages")
        texts, picture = [], None
        for j, part in enumerate([TextPart(type="text", text=content)] if isinstance(content, str) else content):
            if isinstance(part, TextPart):
                texts.append(part.text)
            elif role != "user":
                raise RequestError(f"{where}: only user messages can carry a picture", param="messages")
            elif picture is not None:
                raise RequestError(f"{where}: one picture per message; send the next one in a later message",
                                   param="messages")
            else:
                picture = (f"{where}.content[{j}]", part.image_url.url)
        out.append(_Message(role, "\n".join(texts), picture))
    if out[-1].role != "user":
        raise RequestError("the last message must be the user's: lvb serve answers it", param="messages")
    if out[0].role == "system" and out[0].text.strip() and not model.system_with_picture and any(m.picture for m in out):
        raise RequestError("this checkpoint's chat template does not take a system message together with a picture; "
                           "leave the system message out, or the picture", param="messages")
    return out


def _bound_text(messages: list[_Message], model: ServedModel) -> tuple[list[_Message], int]:
    """No tokenizer call on text that cannot fit: a token covers at most `max_token_chars`
    characters, so a conversation longer than seq x that many is over the sequence whatever
    it says. With --history truncate the oldest exchanges go, as Session drops them (and
    only those it would drop: the rest of the chat from them on is too long to fit)."""
    limit = model.max_text_chars
    if len(messages[-1].text) > limit:
        raise RequestError(f"the prompt is {len(messages[-1].text)} characters, more than the {model.seq}-token sequence "
                           f"can hold (a token covers at most {model.max_token_chars}); shorten it", param="messages")
    system = 1 if messages[0].role == "system" else 0
    dropped = 0
    while sum(len(m.text) for m in messages) > limit:
        if model.history != "truncate" or len(messages) - system <= 1:
            raise RequestError(f"the conversation is {sum(len(m.text) for m in messages)} characters, more than the "
                               f"{model.seq}-token sequence can hold (a token covers at most {model.max_token_chars}); "
                               "start a new chat, or start lvb serve with --history truncate", param="messages")
        # Session._fit's rule: a user turn and its answer, or a lone turn.
        exchange = 2 if messages[system + 1].role == "assistant" and len(messages) - system > 2 else 1
        messages = messages[:system] + messages[system + exchange:]
        dropped += 1
    return messages, dropped


def _turns(messages: list[_Message], limits: Limits, model: ServedModel, budget: PixelBudget) -> list[Turn]:
    # The engine sees one picture at a time: the new turn's, else the newest of the history's;
    # the others are only checked and named by their digest.
    history = [i for i, m in enumerate(messages[:-1]) if m.picture]
    seen = {len(messages) - 1, *history[-1:]}
    turns = []
    for i, m in enumerate(messages):
        image = digest = None
        if m.picture:
            where, url = m.picture
            raw = data_url_bytes(url, where, limits)
            digest = hashlib.sha256(raw).hexdigest()
            if i in seen:
                image = decode_image(raw, where, limits, budget, model.prepare)
            else:
                check_image(raw, where, limits)
            del raw
        turns.append(Turn(m.role, m.text, image, digest))
    return turns


# -- pictures -------------------------------------------------------------------------------------


class PixelBudget:
    """Decoded pixels in flight, shared by every request: a decode waits until its picture fits."""

    def __init__(self, pixels: int):
        self.pixels, self.used, self.peak = pixels, 0, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int, wait: float, where: str):
        pixels = min(pixels, self.pixels)  # one picture under the per-picture cap always fits alone
        with self._changed:
            if not self._changed.wait_for(lambda: self.used + pixels <= self.pixels, timeout=wait):
                raise RequestError(f"{where}: the server is busy decoding other pictures; retry in a while", status=503)
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


_WHITESPACE = re.compile(r"\s+")


def data_url_bytes(url: str, where: str, limits: Limits) -> bytes:
    """The bytes of a `data:image/...;base64,` URL (line breaks in the base64 are allowed)."""
    scheme = url[:16].split(":", 1)[0].lower() if ":" in url[:16] else ""
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
    if len(payload) * 3 // 4 > limits.image_bytes * 1.1 + 1024:  # line breaks add at most ~3 %
        raise RequestError(f"{where}: the picture is over {limits.image_bytes // 2**20} MiB; send a smaller one",
                           status=413, param="messages")
    if _WHITESPACE.search(payload):
        payload = _WHITESPACE.sub("", payload)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where}: the data URL is not valid base64", param="messages") from None
    if len(raw) > limits.image_bytes:
        raise RequestError(f"{where}: the picture is over {limits.image_bytes // 2**20} MiB; send a smaller one",
                           status=413, param="messages")
    return raw


def check_image(raw: bytes, where: str, limits: Limits) -> tuple[int, int]:
    """Open the picture's header only: its format and size, refused when over the pixel cap."""
    try:
        with warnings.catch_warnings():
            # The pixel count is checked here, before decoding, against our own (lower) cap.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
    except UnidentifiedImageError:
        raise RequestError(f"{where}: not a PNG, JPEG, WebP or GIF picture", param="messages") from None
    except Image.DecompressionBombError:
        raise RequestError(f"{where}: the picture claims too many pixels to decode; downscale it", param="messages") from None
    except Exception as e:  # PIL raises many kinds for bad files; its text is only quoted
        raise RequestError(f"{where}: not a readable PNG, JPEG, WebP or GIF picture ({type(e).__name__}: {e})",
                           param="messages") from None
    width, height = image.size
    if width * height > limits.image_pixels:
        raise RequestError(f"{where}: the picture is {width}x{height} = {width * height} pixels, over the "
                           f"{limits.image_pixels} allowed; downscale it", param="messages")
    return width, height


def decode_image(raw: bytes, where: str, limits: Limits, budget: PixelBudget, prepare: Callable | None = None):
    """Decode (within the shared pixel budget) and, with `prepare`, preprocess at once: what
    leaves the budget is the model's input, a few tiles, not the full-size picture."""
    width, height = check_image(raw, where, limits)
    pixels = width * height
    try:
        with budget.hold(pixels, limits.decode_wait_seconds, where):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    image = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
                    image.load()
                ImageOps.exif_transpose(image, in_place=True)  # not a copy: a second full-size picture
            except Exception as e:  # PIL raises many kinds for bad files; its text is only quoted
                raise RequestError(f"{where}: not a readable PNG, JPEG, WebP or GIF picture ({type(e).__name__}: {e})",
                                   param="messages") from None
            if prepare is None:
                return image
            try:
                return prepare(image)
            except LvbError as e:
                raise RequestError(f"{where}: {e}", param="messages") from None
            except (ValueError, OSError) as e:  # Pillow refusing to convert or resize an odd picture
                raise RequestError(f"{where}: cannot preprocess this picture ({type(e).__name__}: {e}); save it as "
                                   "8-bit RGB", param="messages") from None
            finally:
                del image
    finally:
        if pixels >= 4_000_000:
            release_memory()


_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
            _libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        except (OSError, AttributeError):
            _libc = False
    return _libc


def map_large_allocations(threshold: int = 4 * 2**20) -> None:
    """Make glibc give every allocation of `threshold` bytes or more its own mapping, returned to
    the system when freed. By default the threshold grows with what was freed (up to 32 MiB), so
    Pillow's 16 MiB blocks of a large picture land in the decoding thread's arena, whose top
    glibc keeps (malloc_trim does not shrink it): 17 large pictures decoded one after the other
    by as many threads kept 260 MB. A server-wide setting: `create_app` makes it."""
    libc = _glibc()
    if libc:
        libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD; setting it also turns the dynamic adjustment off


def release_memory() -> None:
    """Give the freed pages of a large decode or body back to the system (glibc keeps them otherwise)."""
    libc = _glibc()
    if libc:
        libc.malloc_trim(0)
