"""The `lvb` command: the Typer app (commands.py), what it prints (output.py), the options the
commands share (options.py) and the interactive chat (chat.py)."""

from lvb.cli.commands import app

__all__ = ["app"]
