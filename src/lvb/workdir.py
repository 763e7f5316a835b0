"""The work directory: the on-disk layout that is the API between the stages.

    export/manifest.json            what was exported, from what, with which settings
    export/<net>/<net>.onnx         a net's graph, <net>.weights its weights
    export/<net>/check.npz          the inputs it was checked on and onnxruntime's outputs
    export/<net>/check.stage<i>.npz the same for a prefill net's smaller stage i
    compile/<net>/mlir-<key>/       model_transform.py's output (shared by all quantizations), one per stage
    compile/<net>/<key>/            one deploy: the bmodel, its log and result.json (stage<i>/ per stage
                                    when there are several, unless a cluster node built it; <net>.bmodel
                                    joins them)
    compile/logs/                   one log per job of the last run
    compile/<bmodel stem>.json      the manifest of one combined bmodel
    <model>_<tag>_seq<S>_chunk<C>_<chip>.bmodel   a combined bmodel (<C>: the chunk sizes, 16-32-64-128)
    verify/<bmodel stem or onnxruntime>/report.json, report.html

Every file here is written to a temporary name (`temporary`: `.<name>.tmp-<pid>`) and renamed
into place, so a killed run leaves either the old file or the new one; the next run removes what
a killed one left (`remove_stale_scratch`). Every manifest carries a
version and is checked on every read: one of another version reads as absent. Every
file a cache reuses is recorded (`record_file`) and checked before reuse
(`matches_record`, `damaged_files`); a damaged one is rebuilt or refused, never trusted.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lvb.errors import LvbError

EXPORT_VERSION = 2  # 2: settings name the prefill chunk sizes (chunks), nets may carry smaller stages
COMPILE_VERSION = 2  # 2: a check judges each output on its own (check.cosines, result.thresholds)
CHECK_FILE = "check.npz"  # the largest stage's; a smaller prefill stage i has check.stage<i>.npz
REPORT_FILE = "report.json"


class WorkDirError(LvbError):
    pass


class WorkDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.export = self.root / "export"
        self.export_manifest = self.export / "manifest.json"
        self.compile = self.root / "compile"
        self.logs = self.compile / "logs"

    def net_dir(self, net: str) -> Path:
        return self.export / net

    def onnx_entry(self, net: str) -> str:
        """The manifest's `file` of a net, relative to export/."""
        return f"{net}/{net}.onnx"

    def onnx(self, entry: dict) -> Path:
        return self.export / entry["file"]

    def check_file(self, net: str, stage: int = 0) -> Path:
        """The export's check inputs and outputs for stage `stage` (0: the largest) of a net."""
        return self.net_dir(net) / (CHECK_FILE if stage == 0 else f"check.stage{stage}.npz")

    def compile_net(self, net: str) -> Path:
        return self.compile / net

    def compile_manifest(self, bmodel: Path) -> Path:
        """One per combined bmodel, so switching --quant back and forth stays cached."""
        return self.compile / f"{bmodel.stem}.json"

    def compile_manifests(self) -> list[Path]:
        return sorted(self.compile.glob("*.json"))

    def bmodel(self, name: str) -> Path:
        return self.root / name

    # verify
    def verify_dir(self, bmodel: Path | None) -> Path:
        return self.root / "verify" / (bmodel.stem if bmodel else "onnxruntime")

    def report(self, bmodel: Path | None) -> Path:
        return self.verify_dir(bmodel) / REPORT_FILE

    # manifests
    def newest_compile(self, quant: str | None = None) -> dict | None:
        """The record of the newest combined bmodel still here (of `quant`, when given), or None."""
        candidates = []
        for path in self.compile_manifests():
            data = read_manifest(path, COMPILE_VERSION)
            if not isinstance(data.get("bmodel"), str) or not self.bmodel(data["bmodel"]).is_file():
                continue
            if quant is None or data.get("settings", {}).get("quant") == quant:
                candidates.append((path.stat().st_mtime, data))
        return max(candidates, key=lambda c: c[0])[1] if candidates else None

    def check_compile(self, compiled: dict, export: dict) -> None:
        """The bmodel of `compiled` is the file its compile recorded, compiled from `export` as
        it is now; else WorkDirError naming the mismatch."""
        rerun = f"run `lvb compile --work {self.root} --quant {compiled.get('settings', {}).get('quant', 'int4')}` again"
        problem = matches_record(self.bmodel(compiled["bmodel"]), compiled.get("file"))
        if problem:
            raise WorkDirError(f"{problem}; {rerun}")
        settings = compiled.get("settings", {})
        for name in ("seq", "chunks"):
            if settings.get(name) != export["settings"].get(name):
                raise WorkDirError(f"{compiled['bmodel']} was compiled from an export of {name} {settings.get(name)}, but "
                                   f"the export in {self.root} is now {name} {export['settings'].get(name)}; {rerun}")
        keys = compiled.get("export")
        if keys != {name: entry.get("key") for name, entry in export["nets"].items()}:
            raise WorkDirError(f"{compiled['bmodel']} was not compiled from the export now in {self.root} (its nets were "
                               f"exported again since, or it predates this check); {rerun}")

    def read_export(self) -> dict:
        """The export manifest, or {} when there is none of this version."""
        return read_manifest(self.export_manifest, EXPORT_VERSION)

    def require_export(self, model_hint: str = "DIR") -> dict:
        """The export manifest of a finished export; else one line naming what is wrong with it:
        absent, damaged (unreadable or of another version) or unfinished (a killed export)."""
        rerun = f"run `lvb export --model {model_hint} --out {self.root}`"
        if not self.export_manifest.is_file():
            raise WorkDirError(f"{self.root} holds no export; {rerun} first")
        manifest = self.read_export()
        nets = manifest.get("nets")
        readable = isinstance(nets, dict) and isinstance(manifest.get("settings"), dict) and all(
            isinstance(entry, dict) and isinstance(entry.get("file"), str) for entry in nets.values())
        if not readable:
            raise WorkDirError(f"{self.export_manifest} is damaged or of another lvb version; {rerun} again")
        if manifest.get("complete") is False or not nets:
            raise WorkDirError(f"the export in {self.root} is unfinished ({len(nets)} nets so far; was it interrupted?); "
                               f"{rerun} again to finish it")
        for name, entry in nets.items():  # what the export recorded, or nothing is read
            damaged = damaged_files(self.net_dir(name), entry.get("files"))
            if damaged and damaged[0].startswith("cannot read"):  # intact, for all lvb knows
                raise WorkDirError(f"{damaged[0]}; make it readable by this user (chmod, chown) or run as its owner")
            if damaged:
                raise WorkDirError(f"{damaged[0]}: the export is damaged; {rerun} again")
        return manifest


def temporary(final: Path, kind: str = "tmp") -> Path:
    """Where this process builds `final` before renaming it into place (`kind` "old": where it
    moves the one it replaces). The one naming rule, which remove_stale_scratch reads back."""
    return final.with_name(f"{temporary_prefix(final, kind)}{os.getpid()}")


def temporary_prefix(final: Path, kind: str = "tmp") -> str:
    """The name of every process's temporary of `final`, but the pid."""
    return f".{Path(final).name}.{kind}-"


def sweep_temporaries(final: Path) -> None:
    """Remove what killed runs left while building or replacing `final` (their process gone)."""
    final = Path(final)
    for kind in ("tmp", "old"):
        remove_stale_scratch(final.parent, pattern=glob.escape(temporary_prefix(final, kind)) + "*")


def scratch(final: Path) -> Path:
    """A fresh folder to build `final` in, private to this process (a killed run's leftover
    tools may still be writing into theirs); the caller renames it into place when done."""
    tmp = temporary(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


LOCK_FILE = ".lvb.lock"
_held: dict[Path, int] = {}  # the locks this process holds, with how many times it took each


@contextmanager
def lock_folder(lock: Path, what: str, by: str) -> Iterator[None]:
    """Hold `lock` (a file, created for the block and removed after it) for the block, or raise
    WorkDirError naming the process that holds it: two lvb commands writing one work directory
    or package at once leave a tree each of them believes in. `what` names the folder in the
    message, `by` the command taking it ("lvb export"), which a second one is told.
    The lock is the kernel's (flock), so a killed holder releases it (and its file, left
    behind, is taken over); nested use in one process is allowed."""
    lock = Path(lock).absolute()
    if lock in _held:
        _held[lock] += 1
        try:
            yield
        finally:
            _held[lock] -= 1
        return
    fd = _take(lock, what, by)
    if fd is None:  # a read-only file system: nothing can write there, so nobody else can either
        yield
        return
    _held[lock] = 1
    try:
        yield
    finally:
        del _held[lock]
        try:
            os.unlink(lock)  # while still held: a waiting process then finds its file gone and retries
        except OSError:
            pass
        os.close(fd)  # releases the lock


def _take(lock: Path, what: str, by: str) -> int | None:
    """An open descriptor of `lock`, flock'ed by this process, or None on a read-only file system."""
    import fcntl

    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if e.errno == errno.EROFS:
                return None
            raise WorkDirError(f"{what}: cannot create the lock {lock} ({e.strerror}); pass a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise WorkDirError(f"{what} is in use by {holder}; wait for it to finish, or stop it and run again") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:  # its holder removed it between our open and our flock
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{by} (pid {os.getpid()})".encode(), 0)
            return fd
        os.close(fd)


def check_writable(folder: Path) -> None:
    """Create `folder` and a file in it, and remove the file: a read-only file system or a
    folder this user may not write fails here, before the work, with the OSError the CLI
    reports in one line (a full disk shows when the work writes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    probe = temporary(folder / ".lvb-write-probe")
    probe.write_bytes(b"")
    probe.unlink()


def lock_work(work: Path, by: str):
    """The work directory's lock (lock_folder), held by each command that writes into it:
    export, compile, verify. A folder that is not there is left to the command to name."""
    from contextlib import nullcontext

    work = Path(work)
    return lock_folder(work / LOCK_FILE, f"the work directory {work}", by) if work.is_dir() else nullcontext()


def remove_stale_scratch(root: Path, levels: int = 0, pattern: str = ".*.tmp-*") -> None:
    """Delete the temporaries `levels` folders below `root` whose process is gone."""
    for tmp in root.glob("*/" * levels + pattern):
        try:
            os.kill(int(tmp.name.rsplit("-", 1)[1]), 0)
        except (PermissionError, ValueError):
            continue
        except ProcessLookupError:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write `path` so that a reader sees the old file or the new one, never half of one; a
    failed write leaves neither half a file nor its temporary."""
    path = Path(path)
    tmp = temporary(path)
    try:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # EROFS even for a file that is not there
            pass
        raise


def write_json(path: Path, data) -> None:
    """Atomically (write_atomic)."""
    write_atomic(path, json.dumps(data, indent=1))


def read_json(path: Path) -> dict:
    """A JSON object lvb wrote, or {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or bad UTF-8
        return {}
    return data if isinstance(data, dict) else {}


def read_manifest(path: Path, version: int) -> dict:
    """A manifest of `version`, or {} when it is missing, unreadable or of another version."""
    manifest = read_json(path)
    return manifest if manifest.get("version") == version else {}


def cache_key(*parts) -> str:
    """What a cached result depends on, as one digest."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def record_file(path: Path) -> dict:
    """What a later run checks before it trusts `path` again: its size, modification time and
    SHA-256. Hashed once, when written (bench/file_records.py: ~1 CPU-second per GB here)."""
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(path)}


def matches_record(path: Path, record: dict | None) -> str | None:
    """None when `path` is the file `record` describes; else why not, naming the file.

    The size is compared always. An unchanged modification time means the file was not
    written since (truncate, dd, an editor or a copy all change it) and is trusted without
    reading it, as git's index does; otherwise the digest decides, so a copy with fresh times
    is accepted after one read."""
    path = Path(path)
    if not isinstance(record, dict) or "size" not in record:
        return f"{path}: lvb has no record of it"
    try:
        stat = os.stat(path)
    except OSError:
        return f"{path} is missing"
    if stat.st_size != record["size"]:
        return f"{path} is {stat.st_size} bytes, not the {record['size']} written (truncated or overwritten)"
    if not os.access(path, os.R_OK):  # not damaged: another user's, or chmod'ed
        return f"cannot read {path} (permission denied)"
    if stat.st_mtime_ns == record.get("mtime_ns"):
        return None
    try:
        if "sha256" in record and sha256_of(path) != record["sha256"]:
            return f"{path} changed since lvb wrote it"
    except OSError as e:
        return f"cannot read {path} ({e.strerror or e})"
    return None


def damaged_files(folder: Path, records: dict | None) -> list[str]:
    """Why, for each file of `records` (name relative to `folder` -> record) that is not the
    recorded one; a missing or empty record set counts as damaged."""
    if not isinstance(records, dict) or not records:
        return [f"{folder}: lvb has no record of its files"]
    return [problem for name, record in records.items() if (problem := matches_record(Path(folder) / name, record))]


BLOCK = 1 << 20  # bytes read at a time when hashing or copying


def sha256_of(path: Path, read: Callable[[int], None] | None = None) -> str:
    """The SHA-256 of a file, read a block at a time; `read(bytes)` after each block (progress)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            h.update(block)
            if read:
                read(len(block))
    return h.hexdigest()
