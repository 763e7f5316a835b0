"""The interactive loop of `lvb chat`: slash commands, a picture for the next message, and errors
reported without ending the chat."""

from __future__ import annotations

import sys
from pathlib import Path

from lvb.cli.options import user_text
from lvb.cli.output import console, errors, print_stats, say, show
from lvb.errors import LvbError

CHAT_HELP = "commands: /image PATH (picture for your next message), /reset (new chat), /quit"


def chat_loop(session, sampling, image: Path | None, max_new_tokens: int | None) -> None:
    """Read a line, answer it, until /quit or the end of input; the session's engines are closed on the way out."""
    pending_image = image
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
                reply = session.ask(line, image=pending_image, sampling=sampling, max_new_tokens=max_new_tokens,
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
            print_stats(reply)

