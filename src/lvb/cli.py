"""The `lvb` command: thin Typer wrappers over plain functions, one per stage.

Heavy imports (torch, transformers, onnx) happen inside the commands, so
`lvb --help` stays instant.
"""

from __future__ import annotations

import errno
import functools
import typing
from inspect import Parameter, Signature, signature
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

import lvb
from lvb.check import CheckMode
from lvb.compile.tpumlir import DEFAULT_GROUP_SIZE
from lvb.contract import DEFAULT_CHUNKS, DEFAULT_SEQ
from lvb.errors import LvbError
from lvb.devicetime import DEFAULT_LAUNCH_US
from lvb.workdir import lock_work

app = typer.Typer(
    name="lvb",
    help="Llama-3.2-Vision (mllama) to the Sophgo BM1684X: export, compile, verify, chat.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
errors = Console(stderr=True)

ToolchainOption = Annotated[
    Optional[Path],
    typer.Option("--toolchain", readable=False, help="tpu-mlir environment (a venv or a folder of its tools); default: LVB_TOOLCHAIN, .venv-tpu, PATH"),
]

RevisionOption = Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of a Hugging Face repo id (default: main).")]


def show(where: Console, message: object, style: str = "", end: str = "\n") -> None:
    """Text printed literally, never read as Rich markup: lvb's lines carry paths, tool
    output, exception text and model output, any of which may hold [brackets]."""
    where.print(Text(str(message), style=style), end=end, highlight=False, soft_wrap=True)


def say(where: Console, label: str, style: str, message: object) -> None:
    """A styled label, then `message` printed literally (as `show` does)."""
    where.print(Text.assemble((label, style), " ", str(message)), highlight=False, soft_wrap=True)


def fail(message: object) -> typer.Exit:
    """Print one line naming the problem and its fix; the caller raises the result."""
    say(errors, "error:", "bold red", " ".join(str(message).splitlines()))
    return typer.Exit(code=1)


_OS_FIXES = {
    errno.ENOSPC: "the disk is full: free some space (or pass a folder on another disk) and run again",
    errno.EDQUOT: "the disk quota is used up: free some space and run again",
    errno.EROFS: "the file system is read-only: pass a folder on a writable one",
    errno.EACCES: "make it accessible to this user (chmod, chown), or pass another folder",
    errno.EPERM: "make it accessible to this user (chmod, chown), or pass another folder",
}


def problem(error: Exception, folder: Path | None = None) -> str:
    """The one line of an error: an LvbError's message, or for an OS error (a full disk, a
    read-only mount, a file this user may not read) the file, the reason and the fix. lvb
    writes to temporary names and renames, so what such an error interrupts is never trusted.
    `folder`: where the command writes, named when the error does not name its file (a full
    disk, on write())."""
    if not isinstance(error, OSError) or isinstance(error, LvbError):
        return str(error)
    where = f"{error.filename}: " if error.filename else f"writing in {folder}: " if folder is not None else ""
    fix = _OS_FIXES.get(error.errno, "check the path and run again")
    return f"{where}{error.strerror or error}; {fix}"


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


def plain(value: object) -> Text:
    """A table cell or title taken literally (Rich parses plain strings as markup)."""
    return Text(str(value))


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
    """An option callback refusing a --chunk that is not a list of sizes of 1 or more before any
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


def _version(value: bool) -> None:
    if value:
        console.print(f"lvb {lvb.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


@app.command()
def doctor(
    toolchain: ToolchainOption = None,
    device: Annotated[Optional[int], typer.Option("--device", help="Check the card with this device id instead: SDK, "
                      "driver, memory, and micro-nets run on it against the simulator.")] = None,
    bmodel: Annotated[Optional[Path], typer.Option("--bmodel", help="With --device: also say whether this bmodel's "
                      "memory plan fits the device's free memory.")] = None,
) -> None:
    """Show the environments and the toolchain lvb uses, and prove the toolchain works end to end."""
    from lvb.doctor import run_doctor

    if device is not None:
        from lvb.doctor import run_device_doctor

        with console.status("asking the SDK") as status:
            try:
                checks = run_device_doctor(device, str(toolchain) if toolchain else None, bmodel, status=status.update)
            except LvbError as e:
                raise fail(e) from None
        for check in checks:
            if check.ok:
                say(console, "✓", "bold green", check.line)
        failed = next((c for c in checks if not c.ok), None)
        if failed is not None:
            raise fail(failed.line if failed.line.startswith(failed.name) else f"{failed.name}: {failed.line}")
        return

    with console.status("checking environments") as status:
        report = run_doctor(str(toolchain) if toolchain else None, status=status.update)
    table = Table(title="environments")
    names = list(report.environments)
    table.add_column("package")
    for name in names:
        table.add_column(name)
    for package in ("python", "torch", "transformers", "onnx", "onnxruntime", "tpu_mlir"):
        table.add_row(*map(plain, [package, *[report.environments[n].get(package) or "-" for n in names]]))
    console.print(table)
    if report.toolchain:
        show(console, f"toolchain: {report.toolchain.bin_dir} (found via {report.toolchain.source})")
    for problem in report.problems:
        say(errors, "✗", "bold red", problem)
    if not report.ok:
        raise typer.Exit(code=1)
    console.print(
        f"[bold green]✓ lvb doctor: toolchain works[/] (tpu-mlir {report.toolchain.tpu_mlir_version}: "
        f"W4BF16 bm1684x on the simulator matches onnxruntime, cosine {report.cosine:.6f})"
    )


def _progress():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}", markup=False), console=console, transient=False,
    )


@app.command()
def export(
    model: Annotated[str, typer.Option("--model", help="Checkpoint folder (config.json, safetensors, tokenizer) or Hugging Face repo id.")],
    out: Annotated[Path, typer.Option("--out", readable=False, help="Work directory; the nets go to OUT/export.")],
    revision: RevisionOption = None,
    seq: Annotated[int, typer.Option(help="Sequence length the KV cache holds (prompt + answer, all turns).", callback=at_least(1))] = DEFAULT_SEQ,
    chunk: Annotated[str, typer.Option(
        help=f"Tokens per prefill call, 1 to --seq (default: {','.join(map(str, DEFAULT_CHUNKS))}, capped at --seq); a list "
             "such as 16,32,64,128 gives the prefill nets one stage per size, and a turn is prefilled with the smallest "
             "that holds it.", callback=chunk_list, show_default=False)] = "",
) -> None:
    """Export every part to ONNX (opset 17), one layer at a time, each checked against PyTorch."""
    from lvb.hub import resolve_model
    from lvb.runtime.pipeline import Checkpoint

    try:
        source = resolve_model(model, revision, weights=True)
        # The small files as the runtime will read them (a processor config that disagrees with
        # config.json, damaged JSON) fail now, not after an hour of export.
        Checkpoint.load(source.directory)
    except (LvbError, OSError) as e:
        raise fail(problem(e, out))
    from lvb.export.exporter import export as run_export  # torch: only once the checkpoint is there
    chunks = [int(c) for c in chunk.split(",")] if chunk else None  # None: the default sizes, capped at --seq

    with _progress() as progress:
        task = progress.add_task("exporting", total=None, detail="")

        def report(net: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, detail=net)

        try:
            manifest = run_export(source.directory, out, seq=seq, chunks=chunks, progress=report, source=source.to_json(),
                                  notify=lambda message: say(progress.console, "note:", "yellow", message))
        except (LvbError, OSError) as e:
            raise fail(problem(e, out))
    nets = manifest["nets"]
    worst = min(nets.values(), key=lambda n: n["check"]["cosine"])
    say(console, "✓", "bold green", f"{len(nets)} nets in {out / 'export'}; worst onnxruntime-vs-PyTorch cosine "
        f"{worst['check']['cosine']:.6f} ({worst['name']})")


@app.command(name="compile")
def compile_(
    work: Annotated[Path, typer.Option("--work", readable=False, help="Work directory of `lvb export`.")],
    quant: Annotated[str, typer.Option(help="Decoder blocks: int4 (W4BF16), int8 (W8BF16) or bf16.")] = "int4",
    seq: Annotated[Optional[int], typer.Option(help="Must match the export (default: the export's).", callback=at_least(1))] = None,
    group_size: Annotated[int, typer.Option(help="INT4/INT8 weights share one scale per this many inputs.", callback=at_least(1))] = DEFAULT_GROUP_SIZE,
    chip: Annotated[str, typer.Option(help="Target chip.")] = "bm1684x",
    jobs: Annotated[Optional[int], typer.Option(help="Parallel compile jobs (default: from cores and free memory).", callback=at_least(1))] = None,
    vision_quant: Annotated[str, typer.Option(help="Vision tower: bf16, int8 or int4.")] = "bf16",
    embed_quant: Annotated[str, typer.Option(help="Embedding: bf16, int8 or int4.")] = "bf16",
    head_quant: Annotated[str, typer.Option(help="LM head: bf16, int8 or int4.")] = "bf16",
    check: Annotated[CheckMode, typer.Option(
        help="Which nets run on the simulator against onnxruntime: all; the first of each kind (its siblings take "
             "its options; `lvb verify` checks every net); none.")] = CheckMode.ALL,
    toolchain: ToolchainOption = None,
    cluster: Annotated[Optional[str], typer.Option(
        envvar="LVB_CLUSTER", show_envvar=True,
        help="Run the per-net jobs on a Ray cluster: auto, ray://HOST:PORT or HOST:PORT (README: Compiling on a cluster).",
    )] = None,
    cluster_shared_dir: Annotated[Optional[Path], typer.Option(
        readable=False, help="A folder every cluster node mounts at the same path, holding --work: nodes read and write the cache there "
             "instead of through Ray's object store.",
    )] = None,
) -> None:
    """Compile every exported net with tpu-mlir, check it on the simulator, combine into one bmodel."""
    from lvb.compile.compiler import CompileSettings, NetFailed

    settings = CompileSettings(quant=quant, group_size=group_size, chip=chip, vision_quant=vision_quant,
                               embed_quant=embed_quant, head_quant=head_quant, check=check)
    if cluster_shared_dir is not None and not cluster:
        raise fail("--cluster-shared-dir needs --cluster (or LVB_CLUSTER)")
    try:
        with lock_work(work, "lvb compile"):
            manifest = _compile(work, settings, toolchain, seq, jobs, cluster, cluster_shared_dir)
    except NetFailed as e:
        if e.log_tail:
            show(errors, e.log_tail)
        raise fail(str(e))
    except (LvbError, OSError) as e:
        raise fail(problem(e, work))
    retried = [f"{name} {' '.join(r['options'])}" for name, r in manifest["nets"].items() if r["options"]]
    say(console, "✓", "bold green", work / manifest["bmodel"])
    if retried:
        show(console, f"  compiled with safer options: {', '.join(retried)}")
    kept = [f"{name} {tensor} as {dtype}" for name, r in manifest["nets"].items() for tensor, dtype in r["dtype_exceptions"].items()]
    if kept:
        show(console, f"  kept by tpu-mlir in another dtype than lvb asked (the runtime converts them): {', '.join(kept)}")


def _compile(work, settings, toolchain, seq, jobs, cluster, cluster_shared_dir) -> dict:
    from lvb.compile.compiler import Compiler
    from lvb.toolchain import find_toolchain

    compiler = Compiler(work, settings, find_toolchain(toolchain), seq=seq)
    with _progress() as progress:
        task = progress.add_task("compiling", total=len(compiler.jobs), detail="")
        compiler.notify = lambda message: say(progress.console, "note:", "yellow", message)

        def report(done: int, total: int, running: list[str]) -> None:
            progress.update(task, completed=done, detail=", ".join(running))

        if cluster:
            from lvb.compile.cluster import ClusterSettings

            progress.update(task, detail=f"connecting to the Ray cluster at {cluster}")
            manifest = compiler.run(progress=report, cluster=ClusterSettings(cluster, cluster_shared_dir))
        else:
            manifest = compiler.run(jobs=jobs, progress=report)
    return manifest


@app.command()
def inspect(
    bmodel: Annotated[Path, typer.Argument(readable=False, help="A bmodel made by `lvb compile`.")],
    toolchain: ToolchainOption = None,
    device: Annotated[Optional[int], typer.Option(help="Also check the plan against this device's free memory "
                                                       "(sophon.sail; a device id, 0 or more); exit 1 when it does not fit.",
                                                  callback=at_least(0))] = None,
    model: Annotated[Optional[Path], typer.Option("--model", help="Checkpoint folder whose config prices a turn (default: the one the bmodel was exported from).")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Tokens of the first turn the device-time model prices.", callback=at_least(1))] = 17,
    launch_us: Annotated[float, typer.Option(help="Host cost per net launch on the card, in µs: an assumption, shown apart from the estimate.")] = DEFAULT_LAUNCH_US,
) -> None:
    """List a bmodel's nets, their tensors, weights and estimated time on the chip (tpu-mlir's cost
    model), a turn's time, the bytes one decode step reads, and the device memory lvb's runtime needs."""
    from lvb.bmodel import inspect_bmodel
    from lvb.devicetime import NoEstimates, compile_record, from_manifest
    from lvb.toolchain import find_toolchain

    try:
        info = inspect_bmodel(bmodel, find_toolchain(toolchain))
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    try:
        record = compile_record(bmodel)
    except NoEstimates as e:
        record, no_estimates = None, str(e)
    estimates = from_manifest(record) if record else None
    table = Table(title=plain(f"{bmodel.name} ({info.chip})"))
    for column in ("net", "inputs", "outputs", "weights", "est. ms"):
        table.add_column(column, justify="right" if column == "est. ms" else "left")
    describe = lambda ts: "\n".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in ts)  # noqa: E731
    for net in info.nets.values():
        stages = estimates.nets.get(net.name, ()) if estimates else ()
        ms = "\n".join(f"{e.ms:.3f} ({e.bound})" for e in stages) or "-"
        table.add_row(*map(plain, (net.name, describe(net.inputs), describe(net.outputs), _bytes(net.weight_bytes), ms)))
    console.print(table)
    step = info.decode_step()
    console.print(
        f"weights on the device: {_bytes(info.device_weight_bytes)} (shared between nets)\n"
        f"one decode step reads {_bytes(step['total'])}: weights {_bytes(step['weights'])}, "
        f"KV cache {_bytes(step['kv_cache'])}, cross-attention K/V {_bytes(step['cross_kv'])}"
    )
    if record is None:
        show(console, f"no device-time estimates: {no_estimates}")
    else:
        _print_turn_times(record, estimates, model, prompt_tokens, launch_us)
    _print_memory_plan(info)
    if device is not None:
        _print_preflight(bmodel, device, toolchain)


def _print_turn_times(record: dict, estimates, model: Optional[Path], prompt_tokens: int, launch_us: float) -> None:
    from lvb.runtime.turn import turn_times
    from lvb.spec import ModelSpec

    try:
        spec = ModelSpec.from_dir(model or record["model"]["dir"])
    except LvbError as e:
        show(console, f"no turn estimate: {e}; pass --model with the checkpoint's folder")
        return
    times = turn_times(spec, record["settings"]["seq"], record["settings"]["chunks"], estimates, prompt_tokens, launch_us)
    table = Table(title=f"a {prompt_tokens}-token first turn on the chip (tpu-mlir's cost model, greedy)")
    for column in ("picture", "first token ms", "decode step ms", "tokens/s", "launches first / step"):
        table.add_column(column, justify="left" if column == "picture" else "right")
    for t in times:
        table.add_row("none" if t.tiles is None else f"{t.tiles} tile{'s' * (t.tiles > 1)}", f"{t.first_token.ms:,.1f}",
                      f"{t.decode_step.ms:,.2f}", f"{t.tokens_per_second:.2f}",
                      f"{t.first_token.launches} / {t.decode_step.launches}")
    console.print(table)
    show(console, f"not included: {launch_us:g} µs per launch on the card (--launch-us), host work, DDR contention")
    if estimates.missing:
        show(console, f"no estimate for {len(estimates.missing)} nets compiled before lvb kept them "
                      f"({', '.join(estimates.missing[:3])}...): their time is missing above; compile them again to add it")


def _print_preflight(bmodel: Path, device: int, toolchain) -> None:
    from lvb.runtime.memory import format_bytes, preflight
    from lvb.runtime.sail import device_memory, device_target, sdk_version
    from lvb.toolchain import find_toolchain

    version = sdk_version()
    memory = device_memory(device)
    where = f"device {device} ({device_target(device) or 'no chip found'}): "
    where += (f"{format_bytes(memory[1])} free of {format_bytes(memory[0])}" if memory
              else "sophon.sail exposes no memory figures")
    show(console, f"sophon.sail {version or 'not installed'}; {where}")
    try:
        check = preflight(bmodel, device, find_toolchain(toolchain))
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    show(console, f"preflight: {check.line()}")


def _print_memory_plan(info) -> None:
    from lvb.runtime.memory import CARDS, format_bytes, plan_for_bmodel

    try:
        plan = plan_for_bmodel(info)
    except LvbError as e:
        show(console, f"no device memory plan: {e}")
        return
    table = Table(title="device memory plan (lvb's runtime, sail backend)")
    table.add_column("what")
    table.add_column("bytes", justify="right")
    table.add_column("", justify="right")
    for label, size in plan.rows():
        table.add_row(label, f"{size:,}", format_bytes(size))
    console.print(table)
    fits = ", ".join(f"{card} {'fits' if plan.total <= size else 'too small'}" for card, size in CARDS.items())
    show(console, f"against a card: {fits}")
    for note in plan.notes:
        show(console, f"note: {note}")


@app.command()
def pack(
    work: Annotated[Path, typer.Argument(readable=False, help="Work directory of `lvb export` and `lvb compile`.")],
    out: Annotated[Path, typer.Option("--out", readable=False, help="Folder to write the package to (an older package there is replaced).")],
    quant: Annotated[Optional[str], typer.Option(help="Which compiled bmodel: int4, int8 or bf16 (default: the newest).")] = None,
    onnx: Annotated[bool, typer.Option("--onnx", help="Add the ONNX nets, for the onnxruntime backend on a machine without a card.")] = False,
    tar: Annotated[bool, typer.Option("--tar", help="Also write OUT.tar.gz.")] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="Checkpoint folder or repo id for the small files (default: the one WORK was exported from).")] = None,
    revision: RevisionOption = None,
) -> None:
    """Write what a board needs to answer: the combined bmodel and the checkpoint's small files (never the weights), with a checked manifest."""
    from lvb.hub import resolve_model
    from lvb.package import pack as run_pack
    from lvb.package import tar_path

    try:
        checkpoint = resolve_model(model, revision).directory if model is not None else None
        with _byte_progress() as progress:
            task = progress.add_task("packing", total=None, detail="")
            package = run_pack(work, out, quant=quant, checkpoint=checkpoint, onnx=onnx, tar=tar,
                               progress=lambda name, done, total: progress.update(task, completed=done, total=total, detail=name))
    except (LvbError, OSError) as e:
        raise fail(problem(e, out))
    size = sum(entry["size"] for entry in package.manifest["files"].values())
    what = package.manifest["bmodel"] or "ONNX nets only"
    say(console, "✓", "bold green", f"{out}: {what}, {len(package.manifest['files'])} files, {_bytes(size)}")
    if tar:
        show(console, str(tar_path(out)))


def _byte_progress():
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}", markup=False), console=console, transient=False,
    )


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


def _print_stats(reply) -> None:
    s = reply.stats
    show(errors, f"first token {s.first_token_seconds:.3f} s · prompt {s.prompt_tokens} tokens ({s.prefilled_tokens} prefilled) · "
                 f"{s.generated_tokens} generated · {s.tokens_per_second:.2f} tokens/s · {reply.stop_reason}", style="dim")
    steps = max(1, s.generated_tokens - 1)
    show(errors, f"net launches: {sum(s.first_token_launches.values())} to the first token, "
                 f"{sum(s.decode_launches.values()) / steps:.0f} per decode step", style="dim")
    if s.speculative is not None:
        d = s.speculative
        show(errors, f"draft: {d.accepted} of {d.proposed} proposed tokens kept ({d.acceptance:.0%}), "
                     f"{d.tokens_per_step:.2f} tokens per check of the model ({d.verify_steps} checks)", style="dim")


ModelOption = Annotated[str, typer.Option("--model", help="Checkpoint folder or Hugging Face repo id (org/name).")]
RuntimeModelOption = Annotated[Optional[str], typer.Option("--model", help="Checkpoint folder or Hugging Face repo id (org/name): config, tokenizer, chat template, processor.")]
# Every path option is readable=False: click's readable check would answer an unreadable path
# with a usage box (exit 2); lvb reads it and says what is wrong in one line (exit 1).
PackageOption = Annotated[Optional[Path], typer.Option("--package", readable=False, help="A folder made by `lvb pack`, checked before loading (instead of --model and --bmodel/--onnx).")]
BmodelOption = Annotated[Optional[Path], typer.Option("--bmodel", readable=False, help="Combined bmodel from `lvb compile`.")]
OnnxOption = Annotated[Optional[Path], typer.Option("--onnx", readable=False, help="Work directory of `lvb export` (onnxruntime backend).")]
BackendOption = Annotated[Optional[str], typer.Option(help="sail (device), cmodel (simulator) or onnxruntime; default: sail for a bmodel where sophon.sail imports, else onnxruntime when there are ONNX nets, else cmodel.")]
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
DraftTokensOption = Annotated[Optional[int], typer.Option("--draft-tokens", help="Tokens the draft proposes per check (default 4; below the model's largest prefill chunk).", callback=at_least(1))]


@dataclass(frozen=True)
class ChatOptions:
    """The options `run` and `chat` share: where the nets run and how tokens are picked."""

    model: RuntimeModelOption = None
    revision: RevisionOption = None
    package: PackageOption = None
    bmodel: BmodelOption = None
    onnx: OnnxOption = None
    backend: BackendOption = None
    max_new_tokens: MaxNewTokensOption = None
    sample: SampleOption = None
    temperature: TemperatureOption = None
    top_k: TopKOption = None
    top_p: TopPOption = None
    repetition_penalty: RepetitionPenaltyOption = None
    seed: SeedOption = None
    toolchain: ToolchainOption = None
    draft: DraftOption = None
    draft_bmodel: DraftBmodelOption = None
    draft_onnx: DraftOnnxOption = None
    draft_tokens: DraftTokensOption = None

    def open_session(self, truncate_history: bool = False):
        from lvb.runtime.backends import default_backend, open_engine
        from lvb.runtime.pipeline import Checkpoint, Session
        from lvb.toolchain import find_toolchain

        if self.bmodel is not None and self.onnx is not None:  # one of them would be ignored
            raise LvbError("--bmodel and --onnx name two models and a backend runs one: pass --bmodel (cmodel, sail) "
                           "or --onnx (onnxruntime)")
        model, bmodel, onnx = runtime_inputs(self.model, self.revision, self.bmodel, self.onnx, self.package)
        # The small files and every option first: no engine is loaded for a run that cannot go ahead.
        checkpoint = Checkpoint.load(model)
        self.sampling(checkpoint)
        backend = self.backend or default_backend(bmodel, onnx)
        if self.package is not None and backend == "onnxruntime" and onnx is None:
            raise LvbError(f"--package {self.package} holds no ONNX nets, which the onnxruntime backend runs; use "
                           "--backend cmodel or sail, or pack again with `lvb pack --onnx`")
        if self.package is not None and backend in ("cmodel", "sail") and bmodel is None:
            raise LvbError(f"--package {self.package} holds ONNX nets only, and the {backend} backend runs a bmodel; "
                           "use --backend onnxruntime, or pack a compiled work directory")
        engine = open_engine(backend, bmodel=bmodel, onnx_work=onnx,
                             toolchain=find_toolchain(self.toolchain) if backend == "cmodel" else None)
        check = getattr(engine, "preflight", None)  # the device memory check, on sail
        if check is not None:
            show(errors, f"preflight: {check.line()}", style="dim")
        draft = None
        try:
            draft = self.open_draft(backend)
            return Session(checkpoint, engine, truncate_history=truncate_history, draft=draft,
                           **({"draft_tokens": self.draft_tokens} if self.draft_tokens is not None else {}))
        except BaseException:
            if draft is not None:
                draft[1].close()
            engine.close()
            raise

    def open_draft(self, backend: str):
        """(draft checkpoint, its engine on the model's backend), or None without --draft."""
        from lvb.runtime.backends import open_engine
        from lvb.runtime.pipeline import Checkpoint
        from lvb.toolchain import find_toolchain

        files = (self.draft_bmodel, self.draft_onnx)
        if self.draft is None:
            if any(f is not None for f in files) or self.draft_tokens is not None:
                raise LvbError("--draft-bmodel, --draft-onnx and --draft-tokens go with --draft (the draft's checkpoint folder)")
            return None
        if backend == "onnxruntime" and self.draft_onnx is None or backend != "onnxruntime" and self.draft_bmodel is None:
            need = "--draft-onnx (its `lvb export` work directory)" if backend == "onnxruntime" else "--draft-bmodel (its `lvb compile` bmodel)"
            raise LvbError(f"--draft {self.draft}: the {backend} backend runs the draft too; pass {need}")
        checkpoint = Checkpoint.load(self.draft)
        engine = open_engine(backend, bmodel=self.draft_bmodel, onnx_work=self.draft_onnx,
                             toolchain=find_toolchain(self.toolchain) if backend == "cmodel" else None)
        return checkpoint, engine

    def sampling(self, checkpoint):
        from lvb.runtime.sampling import SamplingConfig

        return SamplingConfig.from_generation_config(
            checkpoint.generation_config, do_sample=self.sample, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, repetition_penalty=self.repetition_penalty, seed=self.seed,
        )


def with_chat_options(command):
    """Give a command ChatOptions' fields as its own options; they arrive as `options`."""
    own = [p for p in signature(command, eval_str=True).parameters.values() if p.name != "options"]
    hints = typing.get_type_hints(ChatOptions, include_extras=True)
    shared = [Parameter(f.name, Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
              for f in fields(ChatOptions)]

    @functools.wraps(command)
    def wrapper(**kwargs):
        options = ChatOptions(**{f.name: kwargs.pop(f.name) for f in fields(ChatOptions)})
        return command(**kwargs, options=options)

    parameters = [p.replace(kind=Parameter.KEYWORD_ONLY) for p in own] + shared
    wrapper.__signature__ = Signature(parameters)
    wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
    return wrapper


@app.command()
@with_chat_options
def run(
    prompt: Annotated[str, typer.Option("--prompt", help="The question.")],
    options: ChatOptions,
    image: Annotated[Optional[Path], typer.Option("--image", readable=False, help="A picture to ask about.")] = None,
    stats: Annotated[bool, typer.Option("--stats", help="Print first-token latency, prompt tokens and tokens/s to stderr.")] = False,
) -> None:
    """Answer one question (about one picture) and print the answer on stdout."""
    try:
        session = options.open_session()
        with session:
            sampling = options.sampling(session.checkpoint)
            reply = session.ask(user_text(prompt, "--prompt"), image=image, sampling=sampling, max_new_tokens=options.max_new_tokens,
                                on_text=lambda piece: print(piece, end="", flush=True))
            print()
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    for notice in reply.notices:
        say(errors, "note:", "yellow", notice)
    if stats:
        _print_stats(reply)


CHAT_HELP = "commands: /image PATH (picture for your next message), /reset (new chat), /quit"


@app.command()
@with_chat_options
def chat(
    options: ChatOptions,
    image: Annotated[Optional[Path], typer.Option("--image", readable=False, help="A picture for the first message.")] = None,
    truncate_history: Annotated[bool, typer.Option(help="Drop the oldest exchanges when the chat outgrows the sequence.")] = False,
) -> None:
    """Multi-turn chat; a new picture can come with any message. Errors are reported and the chat goes on."""
    try:
        session = options.open_session(truncate_history)
        sampling = options.sampling(session.checkpoint)
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    show(console, f"{session.engine.backend} · seq {session.seq} · {CHAT_HELP}", style="dim")
    pending_image = image
    import sys

    if hasattr(sys.stdin, "reconfigure"):  # a line that is not UTF-8 is reported, and the chat goes on
        sys.stdin.reconfigure(errors="surrogateescape")
    with session:
        while True:
            try:
                line = console.input("[bold cyan]you>[/] ").strip()
            except (EOFError, KeyboardInterrupt):
                console.print()
                return
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            if line == "/reset":
                session.reset()
                show(console, "new chat", style="dim")
                continue
            if line.startswith("/image"):
                pending_image = Path(line[len("/image"):].strip()) if line[len("/image"):].strip() else None
                show(console, f"next message comes with {pending_image}" if pending_image else CHAT_HELP, style="dim")
                continue
            if line.startswith("/"):
                show(console, CHAT_HELP, style="dim")
                continue
            try:
                user_text(line, "your message")
            except LvbError as e:
                say(errors, "error:", "bold red", str(e))
                continue
            console.print("[bold magenta]lvb>[/] ", end="")
            try:
                reply = session.ask(line, image=pending_image, sampling=sampling, max_new_tokens=options.max_new_tokens,
                                    on_text=lambda piece: show(console, piece, end=""))
            except LvbError as e:
                from lvb.runtime.image import ImageError

                console.print()
                say(errors, "error:", "bold red", " ".join(str(e).splitlines()))
                if pending_image is not None and not isinstance(e, ImageError):  # the picture was fine: keep it
                    say(errors, "note:", "yellow", f"{pending_image} comes with your next message (/image alone drops it)")
                else:
                    pending_image = None
                continue
            pending_image = None
            console.print()
            for notice in reply.notices:
                say(errors, "note:", "yellow", notice)
            _print_stats(reply)


def _bad_history(value: str):
    raise fail(f"--history {value} is not known: it must be refuse or truncate")


@app.command()
def serve(
    model: RuntimeModelOption = None,
    revision: RevisionOption = None,
    package: PackageOption = None,
    bmodel: BmodelOption = None,
    onnx: OnnxOption = None,
    backend: BackendOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback exposes the model to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port, 1 to 65535.", callback=in_range(1, 65535))] = 8000,
    max_queue: Annotated[int, typer.Option(help="Requests that may wait for the engine, 0 or more; beyond them the answer is 429.",
                                           callback=at_least(0))] = 16,
    api_key: Annotated[Optional[str], typer.Option(envvar="LVB_API_KEY", show_envvar=True,
                                                   help="Require `Authorization: Bearer KEY` on every endpoint but /health and the page.")] = None,
    history: Annotated[str, typer.Option(help="A chat longer than the sequence: refuse it (400), or truncate it, dropping "
                                              "the oldest exchanges as `lvb chat --truncate-history` does.",
                                         callback=lambda value: value if value in ("refuse", "truncate") else _bad_history(value))] = "refuse",
    allow_origin: Annotated[Optional[list[str]], typer.Option(help="A web origin (https://host:port) whose pages may call "
                                                                   "the API (CORS); repeat for more, * for any.")] = None,
    toolchain: ToolchainOption = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (/v1/chat/completions) with a chat page at /."""
    try:
        import uvicorn

        from lvb.serve.app import check_api_key, create_app
        from lvb.serve.worker import Worker
    except ImportError as e:
        raise fail(f"lvb serve needs the serve extra ({e.name} is missing): pip install 'lvb[serve]'")
    try:
        check_api_key(api_key)
        session = ChatOptions(model=model, revision=revision, package=package, bmodel=bmodel, onnx=onnx,
                              backend=backend, toolchain=toolchain).open_session(truncate_history=history == "truncate")
    except (LvbError, OSError) as e:
        raise fail(problem(e))
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        say(errors, "note:", "yellow", f"listening on {host} without --api-key: anyone who reaches it can use the model")
    worker = Worker(session, max_queue=max_queue)
    name = session.checkpoint.directory.name
    show(console, f"{session.engine.backend} · seq {session.seq} · model {name} · http://{host}:{port}/", style="dim")
    try:
        uvicorn.run(create_app(worker, name, api_key=api_key, allow_origins=tuple(allow_origin or ())), host=host,
                    port=port, log_level="info")
    finally:
        worker.close()
        session.engine.close()


@app.command()
def verify(
    model: ModelOption,
    work: Annotated[Path, typer.Option("--work", readable=False, help="Work directory of `lvb export` and `lvb compile`.")],
    quant: Annotated[str, typer.Option(help="Which compiled bmodel to check: int4, int8 or bf16.")] = "int4",
    backend: Annotated[str, typer.Option(help="cmodel (simulator), sail (device) or onnxruntime (the ONNX nets only).")] = "cmodel",
    pictures: Annotated[int, typer.Option(help="Fresh pictures for the task accuracy, when the checkpoint has a task (1 or more).", callback=at_least(1))] = 100,
    revision: RevisionOption = None,
    toolchain: ToolchainOption = None,
) -> None:
    """Check every hop (PyTorch, onnxruntime, bmodel) per net and whole answers; write report.json and report.html."""
    from lvb.hub import resolve_model
    from lvb.toolchain import find_toolchain
    from lvb.verify import verify as run_verify

    try:
        model_dir = resolve_model(model, revision, weights=True).directory
        with _progress() as progress:
            task = progress.add_task("verifying", total=None, detail="")
            data = run_verify(model_dir, work, quant=quant, backend=backend, pictures=pictures,
                              toolchain=find_toolchain(toolchain) if backend == "cmodel" else None,
                              progress=lambda what, i, t: progress.update(task, completed=i, total=t, detail=what))
    except (LvbError, OSError) as e:
        raise fail(problem(e, work))
    table = Table(title=plain(f"per net: cosine similarity ({data['backend']}{', ' + data['bmodel'] if data['bmodel'] else ''})"))
    for column in ("net", "quant", "compile check", "PyTorch vs ORT", "ORT vs bmodel", "bmodel vs fp32"):
        table.add_column(column)
    fmt = lambda v: "-" if v is None else f"{v:.6f}"  # noqa: E731
    for part in data["parts"]:
        style = "red" if part["misses"] else None
        table.add_row(*map(plain, (part["net"], part["quant"] or "-", part.get("compile_check") or "-",
                                   fmt(part["torch_vs_onnx"]), fmt(part["onnx_vs_bmodel"]), fmt(part["bmodel_vs_fp32"]))),
                      style=style)
    console.print(table)
    answers = Table(title=f"answers vs transformers' generate: agreement {data['agreement']:.2f} (needs {data['min_agreement']})")
    for column in ("prompt", "agreement", "answer"):
        answers.add_column(column)
    for answer in data["answers"]:
        answers.add_row(*map(plain, (answer["name"], fmt(answer["agreement"]), answer["text"][:60])))
    console.print(answers)
    if data["task"]:
        t = data["task"]
        console.print(f"task accuracy: {t['correct']}/{t['pictures']} = {t['accuracy']:.1%} (needs {t['min_accuracy']:.0%})")
    show(console, f"reports: {data['directory']}/report.json, report.html{' (cached: nothing changed)' if data.get('cached') else ''}")
    if data["misses"]:
        for miss in data["misses"]:
            say(errors, "✗", "bold red", miss)
        raise typer.Exit(code=1)
    console.print("[bold green]✓ lvb verify: every threshold met[/]")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


if __name__ == "__main__":
    app()
