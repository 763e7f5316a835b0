"""Reading the files a user hands lvb (a checkpoint's small files, a task, a template): one
rule for every way that can fail. An OS error (no permission, an I/O error, a FIFO that is
not a file), bytes that are not UTF-8 and JSON that is damaged or nested past what Python
parses all end in one line naming the file and the fix, never a traceback."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from lvb.errors import LvbError


class FileError(LvbError, ValueError):
    """A file lvb cannot read; the message names it and the fix."""


def cannot_read(path: str | Path, error: OSError, fix: str) -> str:
    """One line for an OS error on `path`, naming the fix: a permission problem says so."""
    if isinstance(error, PermissionError):
        fix = "make it readable by this user (chmod, chown) or run as its owner"
    return f"cannot read {path} ({error.strerror or error}); {fix}"


def regular_file(path: str | Path, fix: str) -> Path:
    """`path`, when it is a file one can read to its end: a FIFO or a device would block or
    never end, a folder is not a file."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise FileError(f"{path}: no such file; {fix}" if isinstance(e, FileNotFoundError) else cannot_read(path, e, fix)) from None
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "not a regular file"
        raise FileError(f"{path} is {kind}, not a file; {fix}")
    return path


def read_text(path: str | Path, fix: str) -> str:
    path = regular_file(path, fix)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise FileError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); {fix}") from None
    except OSError as e:
        raise FileError(cannot_read(path, e, fix)) from None


def parse_json(text: str, path: str | Path, fix: str, what: str = "is not valid JSON") -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise FileError(f"{path} {what} (nested too deeply to read); {fix}") from None
    except ValueError as e:
        raise FileError(f"{path} {what} ({e}); {fix}") from None


def read_json(path: str | Path, fix: str, what: str = "is not valid JSON") -> Any:
    return parse_json(read_text(path, fix), path, fix, what)
