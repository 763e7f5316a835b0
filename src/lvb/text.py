"""The text side of mllama: chat template, tokenizer, streaming detokenizer.

Reproduces what transformers 5 does for the same checkpoint, with jinja2 and
tokenizers only:

* ``ChatTemplate.render`` == ``processor.apply_chat_template(messages, tokenize=False)``
  (same sandboxed jinja environment, globals, filters and template variables);
* ``Tokenizer.encode_prompt`` == the ``input_ids`` the processor produces for that text
  (``MllamaProcessor.__call__``: ``build_string_from_input`` then the fast tokenizer);
* ``Tokenizer.decode`` == ``processor.decode``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import numpy as np
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer

from lvb.errors import LvbError
from lvb.files import FileError, read_json, read_text

IMAGE_TOKEN = "<|image|>"  # MllamaProcessor's placeholder unless the tokenizer names another

# The named special tokens transformers always exposes (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES).
_NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class TextError(LvbError, ValueError):
    """A problem with a checkpoint's text files or a chat; the message says what to fix."""


def read_json_object(path: Path) -> dict[str, Any] | None:
    """A small JSON file of the checkpoint, None when absent; a damaged one is one line."""
    if not path.exists():
        return None
    try:
        data = read_json(path, "copy it again from the original checkpoint")
    except FileError as e:
        raise TextError(str(e)) from None
    if not isinstance(data, dict):
        raise TextError(f"{path} should hold a JSON object; copy it again from the original checkpoint")
    return data


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) or {}


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def special_tokens_map(model_dir: str | Path) -> dict[str, str]:
    """``tokenizer.special_tokens_map`` as transformers 5 builds it from the checkpoint.

    The standard named tokens, every other ``*_token`` string key of
    tokenizer_config.json, and a dict ``extra_special_tokens``; special_tokens_map.json
    counts only when tokenizer_config.json has no ``added_tokens_decoder`` (transformers'
    legacy path).
    """
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "tokenizer_config.json")
    if "added_tokens_decoder" not in config:
        config = {**config, **_read_json(model_dir / "special_tokens_map.json")}
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        config = {**config, **extra}
    tokens = {}
    for key, value in config.items():
        token = _token_str(value)
        if token is not None and (key in _NAMED_SPECIAL_TOKENS or key.endswith("_token")):
            tokens[key] = token
    return tokens


# ----------------------------------------------------------------------------- chat template


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: transformers' assistant-mask tag, rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace()`` that, like transformers', refuses underscore-prefixed attributes."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")


class _TemplateDict:
    """``dict()`` without exposing the dict type itself to the sandbox."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # jinja's own tojson HTML-escapes; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _plain(value: Any) -> Any:
    """What transformers lets a template see: plain JSON-like data, anything else as "<TypeName>"."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, np.generic):
        return _plain(value.item())  # np.bool_(False) must stay falsy
    return f"<{type(value).__name__}>"


def _normalize(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as transformers hands them to the template: None values dropped, OpenAI
    image_url blocks made image blocks, plain data only, reasoning fields aliased."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TextError("messages must be a list of {'role': ..., 'content': ...} dicts")
    normalized = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TextError(f"each message must be a dict with 'role' and 'content', got {message!r}")
        message = {k: v for k, v in message.items() if v is not None}
        content = message.get("content")
        if isinstance(content, list):
            message["content"] = [
                {"type": "image", "url": _image_url(block["image_url"])}
                if isinstance(block, Mapping) and block.get("type") == "image_url" and "image_url" in block
                else block
                for block in content
            ]
        message = _plain(message)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        normalized.append(message)
    return normalized


def _image_url(info: Any) -> Any:
    return info.get("url", "") if isinstance(info, Mapping) else info


def _default_template(value: Any, origin: str) -> str:
    """A template entry: a string, a {name: template} dict or a [{name, template}] list -> the default."""
    if isinstance(value, list):
        value = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
    if isinstance(value, Mapping):
        value = value.get("default")
    if not isinstance(value, str):
        raise TextError(f"{origin} has chat templates but none named 'default'")
    return value


def find_chat_template(model_dir: str | Path) -> tuple[str, str]:
    """(template, where it came from), in the order transformers 5 looks.

    MllamaProcessor takes processor_config.json's "chat_template", else chat_template.json,
    else chat_template.jinja (so a legacy chat_template.json wins over a .jinja next to
    it); only the tokenizer reads tokenizer_config.json's "chat_template", the fallback.
    """
    model_dir = Path(model_dir)
    for name in ("processor_config.json", "chat_template.json"):
        template = _read_json(model_dir / name).get("chat_template")
        if template is not None:
            return _default_template(template, str(model_dir / name)), name
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        try:
            return read_text(jinja, "copy it again from the original checkpoint"), jinja.name
        except FileError as e:
            raise TextError(str(e)) from None
    template = _read_json(model_dir / "tokenizer_config.json").get("chat_template")
    if template is not None:
        return _default_template(template, str(model_dir / "tokenizer_config.json")), "tokenizer_config.json"
    raise TextError(
        f"{model_dir} has no chat template: expected chat_template.jinja, chat_template.json "
        "or a \"chat_template\" entry in tokenizer_config.json (use an -Instruct checkpoint)"
    )


class ChatTemplate:
    """A checkpoint's chat template, rendered exactly as transformers renders it."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None, origin: str = "chat template"):
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise TextError(f"{origin}: template syntax error at line {e.lineno}: {e.message}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ChatTemplate:
        source, origin = find_chat_template(model_dir)
        return cls(source, special_tokens_map(model_dir), origin=origin)

    def render_with_spans(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                          now: datetime | None = None, **variables: Any) -> tuple[str, list[tuple[int, int]]]:
        """The prompt, and where in it the messages' own texts landed ([start, end) spans):
        text that came from a user (or a model's answer), not from the template. Found by
        rendering again with a marker in place of each text; the template may pass a text on
        as it is or trimmed (Llama's trims), anything else is refused. Both renders see the
        same `now`, so a date in the template cannot differ between them."""
        now = now or datetime.now()
        prompt = self.render(messages, add_generation_prompt, now=now, **variables)
        texts = _message_texts(messages)
        if not texts:
            return prompt, []
        markers = [f"\ue000{i}\ue001" for i in range(len(texts))]
        marked = self.render(_with_texts(messages, markers), add_generation_prompt, now=now, **variables)
        pieces = re.split("\ue000(\\d+)\ue001", marked)  # template text, marker index, template text, ...
        for shape in (lambda t: t, str.strip):
            spans, rebuilt = [], pieces[0]
            for index, after in zip(pieces[1::2], pieces[2::2]):
                text = shape(texts[int(index)])
                spans.append((len(rebuilt), len(rebuilt) + len(text)))
                rebuilt += text + after
            if rebuilt == prompt:
                return prompt, spans
        raise TextError(f"the chat template ({self.origin}) changes message text in a way lvb cannot follow, so it "
                        "cannot keep typed control tokens out of the prompt; use a template that passes text on as it is")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               now: datetime | None = None, **variables: Any) -> str:
        """The prompt text; ``variables`` are extra template variables (e.g. ``date_string``);
        ``now`` is the time the template's strftime_now() reads (default: the clock)."""
        messages = _normalize(messages)
        kwargs = _plain({**self.special_tokens, **variables})  # explicit variables win, as in transformers
        if now is not None:
            kwargs["strftime_now"] = now.strftime
        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **kwargs,
            )
        except jinja2.TemplateError as e:  # raise_exception(), undefined values, sandbox violations
            raise TextError(f"the chat template ({self.origin}) rejected the chat: {_one_line(e)}") from None
        except Exception as e:  # a template bug such as "a" + 1
            raise TextError(f"the chat template ({self.origin}) failed: {type(e).__name__}: {_one_line(e)}") from None


def _message_texts(messages: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every text a message carries (string content or text blocks), in order."""
    texts = []
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [b["text"] for b in content if isinstance(b, Mapping) and b.get("type") == "text" and isinstance(b.get("text"), str)]
    return texts


def _with_texts(messages: Sequence[Mapping[str, Any]], texts: Iterable[str]) -> list[dict]:
    """The messages with their texts replaced, in _message_texts' order."""
    texts = iter(texts)
    out = []
    for message in messages:
        message = dict(message)
        content = message.get("content")
        if isinstance(content, str):
            message["content"] = next(texts)
        elif isinstance(content, list):
            message["content"] = [
                {**b, "text": next(texts)} if isinstance(b, Mapping) and b.get("type") == "text" and isinstance(b.get("text"), str) else b
                for b in content
            ]
        out.append(message)
    return out


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


# ----------------------------------------------------------------------------- tokenizer


def build_string_from_input(prompt: str, bos_token: str, image_token: str) -> str:
    """MllamaProcessor's: put bos after any leading image tokens unless bos is anywhere in the prompt."""
    if bos_token in prompt:
        return prompt
    n = 0
    while prompt.startswith(image_token):
        prompt = prompt[len(image_token) :]
        n += 1
    return f"{image_token * n}{bos_token}{prompt}"


def _as_ids(value: Any, where: str) -> list[int]:
    """Token ids as a checkpoint's JSON gives them (one id or a list), each checked: `where`
    names the file and key for the one-line error."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TextError(f"{where} is {value!r}; it must be a token id (an integer >= 0) or a list of them: "
                        "copy the file again from the original checkpoint")
    return values


class Tokenizer:
    """tokenizer.json plus the checkpoint's special-token settings."""

    def __init__(
        self,
        tokenizer: _HFTokenizer,
        bos_token: str,
        eos_token: str | None,
        image_token: str = IMAGE_TOKEN,
        pad_token: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ):
        self._tok = tokenizer
        self.bos_token = bos_token
        self.bos_id = self.id_of(bos_token)
        self.eos_token = eos_token
        self.eos_id = self.id_of(eos_token) if eos_token is not None else None
        self.pad_token = pad_token
        self.pad_id = tokenizer.token_to_id(pad_token) if pad_token is not None else None
        self.image_token = image_token
        self.image_id = tokenizer.token_to_id(image_token)  # None for a text model's tokenizer
        self.stop_ids: frozenset[int] = frozenset(_as_ids(extra_stop_ids, "extra_stop_ids")) | (
            {self.eos_id} if self.eos_id is not None else set()
        )
        # Number of ids the tokenizer knows, added tokens included (len(tokenizer) in transformers).
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        specials = sorted((t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special), key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, specials))) if specials else None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TextError(
                f"{path} not found: lvb needs the fast tokenizer file; save one with "
                "transformers' AutoProcessor.from_pretrained(<checkpoint>).save_pretrained(<dir>)"
            )
        try:
            tokenizer = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise TextError(f"{path} cannot be loaded by tokenizers ({e}); re-download it") from None

        tokenizer_config = _read_json(model_dir / "tokenizer_config.json")
        if tokenizer_config.get("split_special_tokens"):
            tokenizer.encode_special_tokens = True
        if tokenizer_config.get("clean_up_tokenization_spaces") and type(tokenizer.model).__name__ != "BPE":
            # transformers skips the clean-up for BPE models, which every Llama 3 tokenizer is.
            raise TextError(f"{path}: clean_up_tokenization_spaces with a non-BPE tokenizer is not supported")

        special = special_tokens_map(model_dir)
        generation = _read_json(model_dir / "generation_config.json")
        config = _read_json(model_dir / "config.json")
        text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

        bos = special.get("bos_token")
        if bos is None and generation.get("bos_token_id") is not None:
            bos = tokenizer.id_to_token(_as_ids(generation["bos_token_id"], f"{model_dir / 'generation_config.json'}: bos_token_id")[0])
        if bos is None:
            raise TextError(f"{model_dir}: no bos_token in tokenizer_config.json or generation_config.json")

        # generate() stops on generation_config's eos ids (the model config's when it has none).
        stop, where = generation.get("eos_token_id"), "generation_config.json"
        if stop is None:
            stop, where = text_config.get("eos_token_id"), "config.json"
        result = cls(
            tokenizer,
            bos_token=bos,
            eos_token=special.get("eos_token"),
            image_token=special.get("image_token", IMAGE_TOKEN),
            pad_token=special.get("pad_token"),
            extra_stop_ids=_as_ids(stop, f"{model_dir / where}: eos_token_id"),
        )
        expected = config.get("image_token_index")
        if expected is not None and _as_ids(expected, f"{model_dir / 'config.json'}: image_token_index") != [result.image_id]:
            raise TextError(
                f"{model_dir}: config.json image_token_index is {expected} but the tokenizer gives "
                f"{result.image_token} id {result.image_id}; the config and tokenizer come from different checkpoints"
            )
        return result

    def max_token_chars(self) -> int:
        """The most characters of text one token can stand for: its vocabulary string's length
        (one character per byte in a byte-level BPE, so never fewer than the text's)."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    def id_of(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise TextError(f"token {token!r} is not in the tokenizer's vocabulary")
        return token_id

    def encode_chat(self, template: ChatTemplate, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, now: datetime | None = None) -> list[int]:
        """A chat's input_ids, with the messages' own texts never read as control tokens."""
        prompt, spans = template.render_with_spans(messages, add_generation_prompt, now=now)
        return self.encode_prompt(prompt, untrusted=spans)

    def encode_prompt(self, text: str, add_special_tokens: bool | None = None,
                      untrusted: Sequence[tuple[int, int]] = ()) -> list[int]:
        """The processor's input_ids for ``text`` (no images needed, only their placeholders).

        By default this is ``processor(text=text)`` except that a text starting with bos
        (a rendered chat) is tokenized with ``add_special_tokens=False``, exactly what
        ``processor.apply_chat_template(..., tokenize=True)`` does. As in transformers, a
        text without bos gets one inserted (after leading image tokens), and then, for a
        tokenizer.json whose post-processor adds bos (Llama 3's), a second one in front.

        ``untrusted`` spans of ``text`` (a user's message, a model's answer) are tokenized as
        plain text: a typed ``<|image|>`` or ``<|eot_id|><|start_header_id|>`` stays characters,
        as in llama.cpp with parse_special off. Here lvb departs from transformers, whose
        processor makes them control tokens (a second image, a forged turn). A text without
        control-token strings in those spans is tokenized exactly as transformers does.
        """
        if add_special_tokens is None:
            add_special_tokens = not text.startswith(self.bos_token)
        original = len(text)
        text = build_string_from_input(text, self.bos_token, self.image_token)
        if len(text) != original:  # bos went in after the leading image tokens, before any span
            untrusted = [(a + len(self.bos_token), b + len(self.bos_token)) for a, b in untrusted]
        forged = self._forged(text, untrusted)
        if not forged:
            return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)
        return self._encode_without(text, forged, add_special_tokens)

    def _forged(self, text: str, untrusted: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """Control-token strings that overlap an untrusted span."""
        if self._specials is None or not untrusted or self._tok.encode_special_tokens:
            return []
        return [m.span() for m in self._specials.finditer(text)
                if any(m.start() < b and a < m.end() for a, b in untrusted)]

    def _encode_without(self, text: str, forged: list[tuple[int, int]], add_special_tokens: bool) -> list[int]:
        """Split where the tokenizer would (at the genuine control tokens), then encode each
        piece in between with control-token parsing off: the same pieces as a normal encode,
        except that the forged tokens stay text."""
        from tokenizers import Encoding

        pieces, start = [], 0
        for match in self._specials.finditer(text):
            if match.span() in forged:
                continue
            pieces += [(text[start:match.start()], False), (match.group(), True)]
            start = match.end()
        pieces.append((text[start:], False))
        encodings = []
        try:
            for piece, special in pieces:
                if piece:
                    self._tok.encode_special_tokens = not special
                    encodings.append(self._tok.encode(piece, add_special_tokens=False))
        finally:
            self._tok.encode_special_tokens = False
        merged = Encoding.merge(encodings, growing_offsets=True)
        return list(self._tok.post_process(merged, None, add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def stream(self, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental decode: push ids, get only newly complete text.

    Decodes a small window: ``_ids`` holds the tokens from the last emitted boundary but
    one (so decoders that treat the first token specially agree), ``_read`` is where the
    already emitted part of that window ends. Text is held back while it ends in U+FFFD,
    i.e. while a character is split across tokens; ``flush`` releases whatever remains
    (a genuinely invalid byte sequence comes out as decode() renders it).
    Invariant: "".join(push(i) for i in ids) + flush() == tokenizer.decode(ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._read = 0
        self._prefix = ""  # decode(self._ids[:self._read])

    def push(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        text = self._tokenizer.decode(self._ids, self._skip)
        if len(text) <= len(self._prefix) or text.endswith("\ufffd"):
            return ""
        new = text[len(self._prefix) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        self._prefix = self._tokenizer.decode(self._ids, self._skip)
        return new

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids, self._skip)[len(self._prefix) :]
        self._ids, self._read, self._prefix = [], 0, ""
        return text
