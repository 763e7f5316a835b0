"""Options several commands share, the callbacks that refuse a bad value before any work starts,
lvb's one style for a bad value Typer refuses, and ModelOptions and ChatOptions: what serve, run and
chat need to open a session, parsed once."""

from __future__ import annotations

import functools
import re
import typing
from dataclasses import dataclass, fields
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

from lvb.cli.output import console, errors, fail, show
from lvb.contract import Backend, Choice, ChoiceError, not_one_of
from lvb.errors import LvbError


class History(Choice):
    """What `lvb serve` does with a chat longer than the sequence."""

    REFUSE = "refuse"
    TRUNCATE = "truncate"


class OneLineErrors(TyperGroup):
    """lvb's one style for a bad option value, Typer's own checks included (a name outside an Enum's
    choices, a number that is not one): one `error:` line and exit 1, as for every other bad input,
    instead of click's usage box and exit 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except typer.BadParameter as e:
            raise fail(bad_value(e)) from None
        except ChoiceError as e:  # a choice the Enum takes but the option does not (--quant w8a8)
            raise fail(str(e)) from None


def bad_value(error: typer.BadParameter) -> str:
    """The line for a value Typer refused: the option, the value as typed, and what it may be.
    Typer says "'VALUE' is not one of 'A', 'B'" for a choice, with click and with pydantic alike."""
    option = error.param.opts[0] if error.param is not None and error.param.opts else (error.param_hint or "an option")
    message = " ".join(str(error.message).split()).removeprefix("Value error, ")
    found = re.search(r"'(.*)' is not one of (.*?)\.?$", message)
    if found:
        return not_one_of(option, found.group(1), re.findall(r"'([^']*)'", found.group(2)))
    errors = getattr(error.__cause__, "errors", None)  # pydantic's, which keep the value as typed
    given = errors()[0].get("input") if callable(errors) and errors() else None
    return f"{option} {given}: {message}" if given is not None else f"{option}: {message}"


ToolchainOption = Annotated[
    Optional[Path],
    typer.Option("--toolchain", readable=False, help="tpu-mlir environment (a venv or a folder of its tools); default: LVB_TOOLCHAIN, .venv-tpu, PATH"),
]

RevisionOption = Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of a Hugging Face repo id (default: main).")]


def user_text(text: str, what: str) -> str:
    """`text` as typed, when it is UTF-8: Python hands bytes that are not (a Latin-1 terminal,
    `printf 'x\\xff'`) over as lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise LvbError(f"{what} is not UTF-8 text ({byte} at character {e.start}); set the terminal or file to "
                       "UTF-8 and type it again") from None
    return text



def at_least(low: int):
    """An option callback refusing a count below `low` before any work starts (Typer's own
    min= would exit 2 with a usage box; lvb's bad input is one `error:` line and exit 1)."""

    def check(param: typer.CallbackParam, value: Optional[int]) -> Optional[int]:
        if value is not None and value < low:
            raise fail(f"{param.opts[0]} {value} is out of range: it must be {low} or more")
        return value

    return check


def in_range(low: int, high: int):
    """An option callback refusing a number outside low..high before any work starts."""

    def check(param: typer.CallbackParam, value: Optional[int]) -> Optional[int]:
        if value is not None and not low <= value <= high:
            raise fail(f"{param.opts[0]} {value} is out of range: it must be {low} to {high}")
        return value

    return check


def chunk_list(param: typer.CallbackParam, value: str) -> str:
    """An option callback refusing a --chunk or --batch that is not a list of sizes of 1 or more before any
    work starts; sizes above --seq are refused by the export, which knows the sequence."""
    if not value:
        return value
    try:
        sizes = [int(c) for c in value.split(",")]
    except ValueError:
        raise fail(f"{param.opts[0]} {value}: give one size or a comma-separated list of sizes, such as 16,32,64,128") from None
    if min(sizes) < 1:
        raise fail(f"{param.opts[0]} {value} is out of range: every size must be 1 or more")
    return value



ModelOption = Annotated[str, typer.Option("--model", help="Checkpoint folder or Hugging Face repo id (org/name).")]
RuntimeModelOption = Annotated[Optional[str], typer.Option("--model", help="Checkpoint folder or Hugging Face repo id (org/name): config, tokenizer, chat template, processor.")]
# Every path option is readable=False: click's readable check would answer an unreadable path
# with a usage box (exit 2); lvb reads it and says what is wrong in one line (exit 1).
PackageOption = Annotated[Optional[Path], typer.Option("--package", readable=False, help="A folder made by `lvb pack`, checked before loading (instead of --model and --bmodel/--onnx).")]
BmodelOption = Annotated[Optional[Path], typer.Option("--bmodel", readable=False, help="Combined bmodel from `lvb compile`.")]
OnnxOption = Annotated[Optional[Path], typer.Option("--onnx", readable=False, help="Work directory of `lvb export` (onnxruntime backend).")]
BackendOption = Annotated[Optional[Backend], typer.Option(help="sail (device), cmodel (simulator) or onnxruntime; default: sail for a bmodel where sophon.sail imports, else onnxruntime when there are ONNX nets, else cmodel.")]
SampleOption = Annotated[Optional[bool], typer.Option("--sample/--greedy", help="Sample or take the most likely token (default: the checkpoint's generation_config).")]
MaxNewTokensOption = Annotated[Optional[int], typer.Option(help="Stop an answer after this many tokens, 1 or more (default: at a stop token or when the sequence is full).", callback=at_least(1))]
TemperatureOption = Annotated[Optional[float], typer.Option(help="Divide the logits by this when sampling.")]
TopKOption = Annotated[Optional[int], typer.Option(help="Sample among the k most likely tokens (0: all).")]
TopPOption = Annotated[Optional[float], typer.Option(help="Sample among the most likely tokens that hold this much probability.")]
RepetitionPenaltyOption = Annotated[Optional[float], typer.Option(help="Penalize tokens already in the chat (1.0: off).")]
SeedOption = Annotated[Optional[int], typer.Option(help="Seed of the sampler, for repeatable answers.")]
DraftOption = Annotated[Optional[Path], typer.Option("--draft", readable=False, help="Speculative decoding: a Llama text checkpoint folder with the model's tokenizer (e.g. Llama-3.2-1B-Instruct) that proposes tokens the model checks several at a time; with --draft-bmodel or --draft-onnx.")]
DraftBmodelOption = Annotated[Optional[Path], typer.Option("--draft-bmodel", readable=False, help="The draft's bmodel from `lvb compile` (with --bmodel).")]
DraftOnnxOption = Annotated[Optional[Path], typer.Option("--draft-onnx", readable=False, help="The draft's `lvb export` work directory (with --onnx).")]
DraftTokensOption = Annotated[Optional[int], typer.Option("--draft-tokens", help="Tokens the draft proposes per check (default: what the model was exported for with --draft-tokens, else 3; below the model's largest prefill chunk).", callback=at_least(1))]


@dataclass(frozen=True)
class ModelOptions:
    """The options of every command that answers (run, chat, serve): which model, where its nets run,
    and the draft that proposes its tokens."""

    model: RuntimeModelOption = None
    revision: RevisionOption = None
    package: PackageOption = None
    bmodel: BmodelOption = None
    onnx: OnnxOption = None
    backend: BackendOption = None
    toolchain: ToolchainOption = None
    draft: DraftOption = None
    draft_bmodel: DraftBmodelOption = None
    draft_onnx: DraftOnnxOption = None
    draft_tokens: DraftTokensOption = None

    def check(self, checkpoint) -> None:
        """Refuse what the checkpoint or the options make wrong before an engine is loaded."""
        if self.draft is None and (self.draft_bmodel, self.draft_onnx, self.draft_tokens) != (None, None, None):
            raise LvbError("--draft-bmodel, --draft-onnx and --draft-tokens go with --draft (the draft's checkpoint folder)")

    def open_session(self, truncate_history: bool = False):
        from lvb.runtime.backends import default_backend
        from lvb.runtime.pipeline import Checkpoint, Session

        if self.bmodel is not None and self.onnx is not None:  # one of them would be ignored
            raise LvbError("--bmodel and --onnx name two models and a backend runs one: pass --bmodel (cmodel, sail) "
                           "or --onnx (onnxruntime)")
        model, bmodel, onnx = runtime_inputs(self.model, self.revision, self.bmodel, self.onnx, self.package)
        # The small files and every option first: no engine is loaded for a run that cannot go ahead.
        checkpoint = Checkpoint.load(model)
        self.check(checkpoint)
        backend = self.backend or default_backend(bmodel, onnx)
        if self.package is not None and backend is Backend.ONNXRUNTIME and onnx is None:
            raise LvbError(f"--package {self.package} holds no ONNX nets, which the onnxruntime backend runs; use "
                           "--backend cmodel or sail, or pack again with `lvb pack --onnx`")
        if self.package is not None and backend is not Backend.ONNXRUNTIME and bmodel is None:
            raise LvbError(f"--package {self.package} holds ONNX nets only, and the {backend} backend runs a bmodel; "
                           "use --backend onnxruntime, or pack a compiled work directory")
        engine = self.open_engine(backend, bmodel, onnx)
        check = getattr(engine, "preflight", None)  # the device memory check, on sail
        if check is not None:
            show(errors, f"preflight: {check.line()}", style="dim")
        draft = None
        try:
            draft = self.open_draft(backend)
            return Session(checkpoint, engine, truncate_history=truncate_history, **draft)
        except BaseException:
            if draft:
                draft["draft"][1].close()
            engine.close()
            raise

    def open_draft(self, backend: Backend) -> dict:
        """(draft checkpoint, its engine on the model's backend) and --draft-tokens, as Session takes them."""
        from lvb.runtime.pipeline import Checkpoint

        if self.draft is None:
            return {}
        onnx = backend is Backend.ONNXRUNTIME
        if onnx and self.draft_onnx is None or not onnx and self.draft_bmodel is None:
            need = "--draft-onnx (its `lvb export` work directory)" if onnx else "--draft-bmodel (its `lvb compile` bmodel)"
            raise LvbError(f"--draft {self.draft}: the {backend.value} backend runs the draft too; pass {need}")
        checkpoint = Checkpoint.load(self.draft)
        engine = self.open_engine(backend, self.draft_bmodel, self.draft_onnx)
        tokens = {"draft_tokens": self.draft_tokens} if self.draft_tokens is not None else {}
        return {"draft": (checkpoint, engine)} | tokens

    def open_engine(self, backend: Backend, bmodel: Path | None, onnx: Path | None):
        """The model's or the draft's engine on `backend` (the simulator with --toolchain's tpu-mlir)."""
        from lvb.runtime.backends import open_engine
        from lvb.toolchain import find_toolchain

        return open_engine(backend, bmodel=bmodel, onnx_work=onnx,
                           toolchain=find_toolchain(self.toolchain) if backend is Backend.CMODEL else None)


@dataclass(frozen=True)
class ChatOptions(ModelOptions):
    """The options `run` and `chat` add: how tokens are picked, and how many."""

    max_new_tokens: MaxNewTokensOption = None
    sample: SampleOption = None
    temperature: TemperatureOption = None
    top_k: TopKOption = None
    top_p: TopPOption = None
    repetition_penalty: RepetitionPenaltyOption = None
    seed: SeedOption = None

    def check(self, checkpoint) -> None:
        self.sampling(checkpoint)
        super().check(checkpoint)

    def sampling(self, checkpoint):
        from lvb.runtime.sampling import SamplingConfig

        return SamplingConfig.from_generation_config(
            checkpoint.generation_config, do_sample=self.sample, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
        )


def with_options(kind: type[ModelOptions]):
    """Give a command the fields of `kind` (ModelOptions or ChatOptions) as its own options; they
    arrive, parsed once, as `options`."""

    def decorate(command):
        own = [p for p in signature(command, eval_str=True).parameters.values() if p.name != "options"]
        hints = typing.get_type_hints(kind, include_extras=True)
        shared = [Parameter(f.name, Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
                  for f in fields(kind)]

        @functools.wraps(command)
        def wrapper(**kwargs):
            options = kind(**{f.name: kwargs.pop(f.name) for f in fields(kind)})
            return command(**kwargs, options=options)

        parameters = [p.replace(kind=Parameter.KEYWORD_ONLY) for p in own] + shared
        wrapper.__signature__ = Signature(parameters)
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper

    return decorate


def runtime_inputs(model: Optional[str], revision: Optional[str], bmodel: Optional[Path], onnx: Optional[Path],
                   package: Optional[Path]) -> tuple[Path, Optional[Path], Optional[Path]]:
    """(checkpoint folder, bmodel, ONNX work dir) from --model/--bmodel/--onnx or from a checked
    --package; every command that runs a model (run, chat, serve) goes through here."""
    from lvb.hub import resolve_model
    from lvb.package import open_package

    if package is not None:
        given = [name for name, value in (("--model", model), ("--revision", revision), ("--bmodel", bmodel),
                                          ("--onnx", onnx)) if value is not None]
        if given:
            raise LvbError(f"--package holds the model files; drop {', '.join(given)}")
        with console.status("checking the package (sha256 of every file)"):
            found = open_package(package)
        return found.checkpoint, found.bmodel, found.onnx_work
    if model is None:
        raise LvbError("pass --model (a checkpoint folder or Hugging Face repo id) with --bmodel or --onnx, or --package DIR")
    return resolve_model(model, revision).directory, bmodel, onnx

