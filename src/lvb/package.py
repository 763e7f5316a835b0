"""`lvb pack`: what a board needs to answer, in one folder, with a manifest that
`lvb run --package` checks before loading anything.

Layout of a package:

    lvb-package.json          format, model, settings, the versions that made it,
                              and every file's size and sha256
    <model>_..._<chip>.bmodel the combined bmodel from `lvb compile`
    checkpoint/               config, tokenizer, chat template, processor and
                              generation configs (never the weights)
    export/                   with --onnx: the ONNX nets, for the onnxruntime
                              backend on a machine without a card

A package is written to a temporary folder beside the target and renamed into
place, so an interrupted `lvb pack` leaves nothing a later run would take for a
package. Checking a package hashes every file once; after that a file whose
size, inode and mtime are unchanged since it was hashed is not hashed again
(the stamp lives in the package, beside the manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lvb
from lvb.contract import Quant
from lvb.errors import LvbError
from lvb.hub import RUNTIME_FILES
from lvb.workdir import (BLOCK, WorkDir, WorkDirError, lock_folder, read_json, scratch, sha256_of, sweep_temporaries,
                         temporary, temporary_prefix, write_json)

MANIFEST = "lvb-package.json"
STAMP = ".lvb-checked.json"
FORMAT = 1
CHECKPOINT = "checkpoint"
EXPORT = "export"

Progress = Callable[[str, int, int], None]  # (file, bytes done, bytes in all)


class PackageError(LvbError):
    """A package that cannot be made or trusted; the message names the file."""


@dataclass(frozen=True)
class Package:
    """A checked package: what `lvb run`, `chat` and `serve` load from it."""

    directory: Path
    manifest: dict

    @property
    def checkpoint(self) -> Path:
        return self.directory / CHECKPOINT

    @property
    def bmodel(self) -> Path | None:
        name = self.manifest.get("bmodel")
        return self.directory / name if name else None

    @property
    def onnx_work(self) -> Path | None:
        """A work directory for the onnxruntime backend (it reads export/manifest.json)."""
        return self.directory if self.manifest.get("onnx") else None


# -- making one ------------------------------------------------------------------


def _copy(source: Path, target: Path, done: int, total: int, progress: Progress | None,
          expected: str | None = None) -> tuple[dict, int]:
    """Copy and hash in one pass; returns the manifest entry and the bytes done so far. A copy
    whose sha256 is not `expected` (what the export or compile recorded) is refused: a file
    changed under its record is never packed as good."""
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(BLOCK):
            digest.update(block)
            dst.write(block)
            done += len(block)
            if progress:
                progress(target.name, done, total)
    if expected is not None and digest.hexdigest() != expected:
        raise PackageError(f"{source} changed since lvb wrote it (its sha256 is not the one recorded); "
                           "run the stage that made it again (`lvb export` or `lvb compile`)")
    return {"size": target.stat().st_size, "sha256": digest.hexdigest()}, done


def _package_export_manifest(export: dict, files: dict, tmp: Path) -> dict:
    """The export manifest as the package holds it: each net's file records are those of the
    copies (the runtime checks them before it loads a net), check.npz left out; returns its
    package-manifest entry."""
    nets = {}
    for name, entry in export["nets"].items():
        copied = {}
        for file in entry.get("files", {}):
            relative = f"{EXPORT}/{name}/{file}"
            if relative in files:
                stat = (tmp / relative).stat()
                copied[file] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": files[relative]["sha256"]}
        nets[name] = entry | {"files": copied}
    data = json.dumps(export | {"nets": nets}, indent=1).encode()
    (tmp / EXPORT / "manifest.json").write_bytes(data)
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def pack(work: Path, out: Path, quant: str | None = None, checkpoint: Path | None = None, onnx: bool = False,
         tar: bool = False, progress: Progress | None = None) -> Package:
    """Write the package of work directory `work` to `out` (replacing an older package there).
    `checkpoint` overrides the folder the export was made from (for its small files)."""
    work, out = Path(work), Path(os.path.abspath(out))  # `--out .` names the folder it is run in
    quant = Quant.of_weights(quant, "--quant") if quant is not None else None
    if out.resolve() == work.resolve() or out.resolve() in work.resolve().parents or work.resolve() in out.resolve().parents:
        raise PackageError(f"--out {out} overlaps the work directory {work}; pass a folder outside it")
    try:  # what every reader checks: finished, and each net's files the recorded ones
        export = WorkDir(work).require_export()
    except WorkDirError as e:
        raise PackageError(str(e)) from None
    directory = WorkDir(work)
    compiled = directory.newest_compile(quant)
    if compiled is None and (not onnx or quant is not None):  # an ONNX-only package, unless a bmodel was asked for
        raise PackageError(f"{work} holds no {f'{quant} bmodel' if quant else 'bmodel'}; run `lvb compile --work {work}`"
                           f"{f' --quant {quant}' if quant else ''} first, or pack the ONNX nets alone with --onnx")
    if compiled:
        try:  # a package is only as good as what went into it
            directory.check_compile(compiled, export)
        except WorkDirError as e:
            raise PackageError(str(e)) from None
    checkpoint = Path(checkpoint or export.get("model", {}).get("dir", ""))
    if not (checkpoint / "config.json").is_file():
        raise PackageError(f"the checkpoint {work} was exported from ({checkpoint}) is gone; pass --model with it")
    if out.exists() and not (out / MANIFEST).is_file():
        raise PackageError(f"{out} exists and is not an lvb package; choose another --out or remove it")


    sources: dict[str, Path] = {}
    expected: dict[str, str] = {}  # the sha256 each recorded source must still have
    for name in RUNTIME_FILES:
        if (checkpoint / name).is_file():
            sources[f"{CHECKPOINT}/{name}"] = checkpoint / name
    if compiled:
        sources[compiled["bmodel"]] = work / compiled["bmodel"]
        expected[compiled["bmodel"]] = compiled["file"].get("sha256")
    if onnx:
        for name, entry in export["nets"].items():
            for file, record in entry["files"].items():
                if Path(file).suffix in (".onnx", ".weights"):  # not check.npz: the export's own test data
                    relative = f"{EXPORT}/{name}/{file}"
                    sources[relative], expected[relative] = work / "export" / name / file, record.get("sha256")

    with lock_folder(out.with_name(f".{out.name}.lock"), f"--out {out}", "lvb pack"):
        return _write(work, out, export, compiled, checkpoint, onnx, tar, sources, expected, progress)


def _write(work, out, export, compiled, checkpoint, onnx, tar, sources, expected, progress) -> Package:
    # A killed pack's temporary folder (its process gone) is never trusted, and not kept either.
    sweep_temporaries(out)
    sweep_temporaries(tar_path(out))
    tmp = scratch(out)
    try:
        files, done = {}, 0
        total = sum(p.stat().st_size for p in sources.values())
        for relative, source in sources.items():
            files[relative], done = _copy(source, tmp / relative, done, total, progress, expected.get(relative))
        if onnx:
            files[f"{EXPORT}/manifest.json"] = _package_export_manifest(export, files, tmp)
        manifest = {
            "format": FORMAT,
            "model": {"name": export.get("model", {}).get("name", checkpoint.name),
                      **{k: v for k, v in export.get("model", {}).items() if k in ("repo_id", "commit")}},
            "bmodel": compiled["bmodel"] if compiled else None,
            "onnx": onnx,
            "settings": (compiled["settings"] if compiled else {}) | {k: export["settings"][k] for k in ("seq", "chunks")},
            "versions": {"lvb": lvb.__version__,
                         "tpu_mlir": compiled["toolchain"]["tpu_mlir"] if compiled else None}
                        | ({"export": export.get("versions", {})} if onnx else {}),
            "files": files,
        }
        write_json(tmp / MANIFEST, manifest)
        _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if tar:
        write_tar(out)
    return Package(out, manifest)


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`; an older package there is moved aside first, then removed."""
    old = temporary(out, "old")
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def tar_path(directory: Path) -> Path:
    return directory.with_name(directory.name + ".tar.gz")


def write_tar(directory: Path) -> Path:
    """`<directory>.tar.gz` holding the package under its folder's name."""
    target = tar_path(directory)
    tmp = temporary(target)
    try:
        with tarfile.open(tmp, "w:gz") as archive:
            for path in sorted(directory.rglob("*")):
                if path.is_file() and path.name != STAMP:
                    archive.add(path, arcname=f"{directory.name}/{path.relative_to(directory).as_posix()}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# -- checking one ----------------------------------------------------------------


def _fingerprint(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_ino, stat.st_mtime_ns]


def _sha256(path: Path, done: int, total: int, progress: Progress | None) -> tuple[str, int]:
    read = [done]

    def count(n: int) -> None:
        read[0] += n
        if progress:
            progress(path.name, read[0], total)

    return sha256_of(path, count), read[0]


def _damaged(path: Path, why: str) -> PackageError:
    return PackageError(f"{path} is damaged ({why}); copy the package again or re-run `lvb pack`")


def _entries(path: Path, manifest) -> dict:
    """The manifest's files, each {"size": int, "sha256": 64 hex digits}; else PackageError
    saying which field has which wrong type."""
    if not isinstance(manifest, dict):
        raise _damaged(path, "it is not a JSON object")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise _damaged(path, f"its files is {type(files).__name__ if files is not None else 'missing'}, not an object")
    if not files:
        raise _damaged(path, "it lists no files, so it vouches for nothing")
    for relative, entry in files.items():
        if not isinstance(entry, dict):
            raise _damaged(path, f"the entry of {relative} is {entry!r}, not an object")
        size, digest = entry.get("size"), entry.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise _damaged(path, f"the size of {relative} is {size!r} ({type(size).__name__}), not a whole number of bytes")
        if not isinstance(digest, str) or len(digest) != 64 or set(digest) - set("0123456789abcdef"):
            raise _damaged(path, f"the sha256 of {relative} is {digest!r}, not 64 hex digits")
        if Path(relative).is_absolute() or ".." in Path(relative).parts:
            raise _damaged(path, f"{relative} is outside the package")
    return files


def open_package(directory: str | Path, progress: Progress | None = None) -> Package:
    """The package in `directory`, after checking every file its manifest lists: present,
    the size and the sha256 it was packed with; and that it lists every file the package
    holds. Raises PackageError naming the first bad file."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise PackageError(f"{directory} is not an lvb package (no {MANIFEST}); make one with `lvb pack WORK --out DIR`")
    try:
        manifest = json.loads(path.read_text())
    except OSError as e:
        raise PackageError(f"cannot read {path} ({e.strerror}); make the package readable") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _damaged(path, "not valid JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or isinstance(manifest.get("format"), bool):
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise PackageError(f"{directory} is package format {found!r} ({type(found).__name__}), this lvb {lvb.__version__} "
                           f"reads format {FORMAT!r} (int); install the lvb that made it "
                           f"({(manifest.get('versions') or {}).get('lvb') if isinstance(manifest, dict) else None}) or pack again")
    files = _entries(path, manifest)
    unlisted = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                      if not p.is_dir() and p.name not in (MANIFEST, STAMP) and not p.name.startswith(temporary_prefix(p.parent / STAMP))
                      and p.relative_to(directory).as_posix() not in files)
    if unlisted:
        raise PackageError(f"{directory / unlisted[0]} is in the package but not in its manifest; copy the package "
                           "again or re-run `lvb pack`")
    stamp = read_json(directory / STAMP)
    total = sum(entry["size"] for entry in files.values())
    done = 0
    checked = {}
    for relative, entry in files.items():
        file = directory / relative
        if not file.is_file():
            raise PackageError(f"{file} is missing from the package; copy the package again or re-run `lvb pack`")
        fingerprint = _fingerprint(file)
        if fingerprint[0] != entry["size"]:
            raise PackageError(f"{file} is {fingerprint[0]} bytes, the package manifest says {entry['size']}: "
                               "damaged or from another package; copy the package again")
        if stamp.get(relative) == [entry["sha256"], *fingerprint]:
            done += entry["size"]
        else:
            try:
                digest, done = _sha256(file, done, total, progress)
            except OSError as e:
                raise PackageError(f"cannot read {file} ({e.strerror}); make the package readable") from None
            if digest != entry["sha256"]:
                raise PackageError(f"{file} does not match the package manifest (sha256 differs): damaged or "
                                   "from another package; copy the package again")
        checked[relative] = [entry["sha256"], *fingerprint]
    if checked != stamp:
        _write_stamp(directory, checked)
    return Package(directory, manifest)


def _write_stamp(directory: Path, checked: dict) -> None:
    """Best effort: a package lvb cannot write to (a read-only mount, a board's read-only
    partition, another user's folder) is simply hashed every time."""
    try:
        write_json(directory / STAMP, checked)
    except OSError:
        pass
