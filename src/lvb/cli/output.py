"""What the `lvb` commands print: literal text (never Rich markup), one-line errors, progress
bars and the tables of doctor, inspect and verify."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lvb.errors import LvbError

console = Console()
errors = Console(stderr=True)


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



def plain(value: object) -> Text:
    """A table cell or title taken literally (Rich parses plain strings as markup)."""
    return Text(str(value))



def progress_bar():
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}", markup=False), console=console, transient=False,
    )



def byte_progress():
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[detail]}", markup=False), console=console, transient=False,
    )



def print_turn_times(record: dict, estimates, model: Optional[Path], prompt_tokens: int, launch_us: float) -> None:
    from lvb.runtime.turn import turn_times
    from lvb.spec import ModelSpec

    try:
        spec = ModelSpec.from_dir(model or record["model"]["dir"])
    except LvbError as e:
        show(console, f"no turn estimate: {e}; pass --model with the checkpoint's folder")
        return
    settings = record["settings"]
    batch = settings.get("batch", [1])
    times = turn_times(spec, settings["seq"], settings["chunks"], estimates, prompt_tokens, launch_us, batch,
                       settings.get("verify", 0))
    table = Table(title=f"a {prompt_tokens}-token first turn on the chip (tpu-mlir's cost model, greedy)")
    for column in ("picture", "first token ms", "decode step ms", "tokens/s", "launches first / step"):
        table.add_column(column, justify="left" if column == "picture" else "right")
    for t in times:
        table.add_row("none" if t.tiles is None else f"{t.tiles} tile{'s' * (t.tiles > 1)}", f"{t.first_token.ms:,.1f}",
                      f"{t.decode_step.ms:,.2f}", f"{t.tokens_per_second:.2f}",
                      f"{t.first_token.launches} / {t.decode_step.launches}")
    console.print(table)
    if len(batch) > 1:
        from lvb.runtime.turn import batch_step_times

        table = Table(title="a decode step of several conversations (continuous batching, tpu-mlir's cost model)")
        for column in ("conversations", "pictures", "step ms", "tokens/s, all", "tokens/s, each"):
            table.add_column(column, justify="right")
        for t in batch_step_times(spec, settings["seq"], settings["chunks"], batch, estimates, launch_us,
                                  settings.get("verify", 0)):
            table.add_row(str(t.rows), "1 tile each" if t.pictures else "none", f"{t.step.ms:,.2f}",
                          f"{t.tokens_per_second:.2f}", f"{t.per_conversation:.2f}")
        console.print(table)
    show(console, f"not included: {launch_us:g} µs per launch on the card (--launch-us), host work, DDR contention")
    if estimates.missing:
        show(console, f"no estimate for {len(estimates.missing)} nets compiled before lvb kept them "
                      f"({', '.join(estimates.missing[:3])}...): their time is missing above; compile them again to add it")


def print_preflight(bmodel: Path, device: int, toolchain) -> None:
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


def print_memory_plan(info) -> None:
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




def print_stats(reply) -> None:
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



def size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def print_environments(report) -> None:
    """doctor's table: each environment's package versions."""
    table = Table(title="environments")
    names = list(report.environments)
    table.add_column("package")
    for name in names:
        table.add_column(name)
    for package in ("python", "torch", "transformers", "onnx", "onnxruntime", "tpu_mlir"):
        table.add_row(*map(plain, [package, *[report.environments[n].get(package) or "-" for n in names]]))
    console.print(table)


def print_nets(bmodel: Path, info, estimates) -> None:
    """inspect's table: every net's tensors, weights and estimated time; then what a decode step reads."""
    table = Table(title=plain(f"{bmodel.name} ({info.chip})"))
    for column in ("net", "inputs", "outputs", "weights", "est. ms"):
        table.add_column(column, justify="right" if column == "est. ms" else "left")
    describe = lambda ts: "\n".join(f"{t.name} {list(t.shape)} {t.dtype}" for t in ts)  # noqa: E731
    for net in info.nets.values():
        stages = estimates.nets.get(net.name, ()) if estimates else ()
        ms = "\n".join(f"{e.ms:.3f} ({e.bound})" for e in stages) or "-"
        table.add_row(*map(plain, (net.name, describe(net.inputs), describe(net.outputs), size_text(net.weight_bytes), ms)))
    console.print(table)
    step = info.decode_step()
    console.print(
        f"weights on the device: {size_text(info.device_weight_bytes)} (shared between nets)\n"
        f"one decode step reads {size_text(step['total'])}: weights {size_text(step['weights'])}, "
        f"KV cache {size_text(step['kv_cache'])}, cross-attention K/V {size_text(step['cross_kv'])}"
    )


def print_verify_report(data: dict) -> None:
    """verify's tables: per net, the answers, the task; and where the reports are."""
    table = Table(title=plain(f"per net: cosine similarity ({data['backend']}{', ' + data['bmodel'] if data['bmodel'] else ''})"))
    # tpu-mlir's interpreter is a reference for w8a8 nets only: its column only where one has it.
    interpreted = any(part.get("bmodel_vs_interpreter") is not None for part in data["parts"])
    for column in ("net", "quant", "compile check", "PyTorch vs ORT", "ORT vs bmodel", "bmodel vs fp32",
                   *(["bmodel vs tpu-mlir"] if interpreted else [])):
        table.add_column(column)
    fmt = lambda v: "-" if v is None else f"{v:.6f}"  # noqa: E731
    for part in data["parts"]:
        style = "red" if part["misses"] else None
        cells = (part["net"], part["quant"] or "-", part.get("compile_check") or "-", fmt(part["torch_vs_onnx"]),
                 fmt(part["onnx_vs_bmodel"]), fmt(part["bmodel_vs_fp32"]),
                 *([fmt(part.get("bmodel_vs_interpreter"))] if interpreted else []))
        table.add_row(*map(plain, cells), style=style)
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
