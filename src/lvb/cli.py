"""The `lvb` command: thin Typer wrappers over plain functions, one per stage.

Heavy imports (torch, transformers, onnx) happen inside the commands, so
`lvb --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

import lvb

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
    typer.Option("--toolchain", help="tpu-mlir environment (a venv or a folder of its tools); default: LVB_TOOLCHAIN, .venv-tpu, PATH"),
]


def fail(message: str) -> typer.Exit:
    """Print one line naming the problem and its fix; the caller raises the result."""
    errors.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code=1)


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
def doctor(toolchain: ToolchainOption = None) -> None:
    """Show the environments and the toolchain lvb uses, and prove the toolchain works end to end."""
    from lvb.doctor import run_doctor

    with console.status("checking environments") as status:
        report = run_doctor(str(toolchain) if toolchain else None, status=status.update)
    table = Table(title="environments")
    names = list(report.environments)
    table.add_column("package")
    for name in names:
        table.add_column(name)
    for package in ("python", "torch", "transformers", "onnx", "onnxruntime", "tpu_mlir"):
        table.add_row(package, *[report.environments[n].get(package) or "-" for n in names])
    console.print(table)
    if report.toolchain:
        console.print(f"toolchain: {report.toolchain.bin_dir} (found via {report.toolchain.source})")
    for problem in report.problems:
        errors.print(f"[bold red]✗[/] {problem}", highlight=False, soft_wrap=True)
    if not report.ok:
        raise typer.Exit(code=1)
    console.print(
        f"[bold green]✓ lvb doctor: toolchain works[/] (tpu-mlir {report.toolchain.tpu_mlir_version}: "
        f"W4BF16 bm1684x on the simulator matches onnxruntime, cosine {report.cosine:.6f})"
    )


if __name__ == "__main__":
    app()
