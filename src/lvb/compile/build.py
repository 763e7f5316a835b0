"""Building one net: transform (cached), deploy each stage, check it on the simulator, and
record the result; the attempt's folder appears only complete. The compiler runs this in its own
threads (lvb.compile.compiler.LocalExecutor), a cluster node in a Ray task (lvb.compile.cluster)."""

from __future__ import annotations

import functools
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from lvb.bmodel import declared_tensors
from lvb.check import INTERPRETED, against_interpreter, load_check, onnx_vs_bmodel, save_interpreted, shortfalls
from lvb.compile.calibration import write_tables
from lvb.compile.tpumlir import TRANSFORM_OPTIONS, DeployOptions, calibrate, combine, deploy, interpreted_outputs, transform
from lvb.contract import Kind, NetSpec
from lvb.devicetime import read_profile
from lvb.errors import CompileError
from lvb.numerics import lowest
from lvb.toolchain import Toolchain, ToolServer
from lvb.workdir import COMPILE_VERSION, cache_key, damaged_files, read_manifest, record_file, scratch, write_json

# In a transform folder: the records of what model_transform.py wrote there.
TRANSFORM_FILES = "files.json"


def truncated_npz(path: Path) -> bool:
    """Whether a weight archive holds less than its own directory says: tpu-mlir's writer goes
    on past a failed write (a full disk) and ends the archive with a directory that looks whole."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return sum(entry.compress_size for entry in archive.infolist()) > path.stat().st_size
    except (zipfile.BadZipFile, OSError):
        return True


def record_transform(folder: Path) -> None:
    """Record what model_transform.py wrote in `folder`: the folder is reused only while its
    files are these. A truncated weight archive is refused, never recorded."""
    for archive in Path(folder).glob("*.npz"):
        if truncated_npz(archive):
            free = shutil.disk_usage(folder).free / 1e9
            raise CompileError(f"tpu-mlir's transform wrote {archive.name} short of what it holds ({free:.1f} GB free "
                               f"on {folder.parent}): free disk space and compile again")
    files = {p.name: record_file(p) for p in sorted(Path(folder).iterdir()) if p.name != TRANSFORM_FILES}
    write_json(Path(folder) / TRANSFORM_FILES, {"version": COMPILE_VERSION, "files": files})


class NetFailed(CompileError):
    def __init__(self, net: str, message: str, log_tail: str = ""):
        self.net, self.log_tail = net, log_tail
        super().__init__(f"{net}: {message}")


@dataclass
class NetJob:
    net: NetSpec
    onnx: Path
    check_files: tuple[Path, ...]  # one per stage, largest first
    export_key: str
    quant: str
    options: DeployOptions
    calibration: Path | None = None  # w8a8: this net's inputs over the calibration pictures (<i>.npz)
    result: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.net.name

    @property
    def kind(self) -> Kind:
        return self.net.kind

    @functools.cached_property
    def simplified(self) -> bool:
        """Whether its transform needs tpu-mlir's simplifier: read once, for the memory plan and
        every stage's transform."""
        return needs_simplifier(self.onnx)


@dataclass(frozen=True)
class Attempt:
    """One deploy of one net with one option set: what to build and where it goes. Plain
    data, so that a cluster node can build it too (lvb.compile.cluster)."""

    job: NetJob
    options: DeployOptions
    net_folder: Path  # the net's compile folder: its stages' MLIR (mlir-<key>/), cached apart from the deploys
    folder: Path  # the attempt's cache folder: bmodel, compile.log, result.json
    log: Path
    check: bool
    thresholds: dict[str, float]  # per output (lvb.check.thresholds)
    bmodel: str  # the bmodel's path in result.json, relative to the work directory
    # A file the transforms of compiles sharing this machine take turns on (Compiler's transform_lock).
    transform_lock: Path | None = None


def needs_simplifier(onnx_path: Path) -> bool:
    """Whether the graph computes shapes (Shape ops): a net with stages is exported with
    symbolic axes, and only tpu-mlir's ONNX simplifier makes them static per stage (without it
    its shape inference fails on their Reshapes). Other graphs are transformed without it."""
    import onnx
    from google.protobuf.message import DecodeError

    try:
        graph = onnx.load(str(onnx_path), load_external_data=False).graph
    except (DecodeError, OSError):
        return False  # model_transform.py reports the broken file, naming its net
    return any(node.op_type == "Shape" for node in graph.node)


def memory_need(job: NetJob) -> int:
    """Bytes of memory one job of this net needs: its kind's measured peak, scaled by the
    net's ONNX and weight bytes."""
    weight_bytes = sum(p.stat().st_size for p in job.onnx.parent.iterdir() if p.is_file() and p not in job.check_files)
    return job.kind.policy.peak.need(weight_bytes, simplified=job.simplified)


def stage_mlir(attempt: Attempt, stage: NetSpec, toolchain: Toolchain, server: ToolServer | None, notes: list[str]) -> Path:
    """One stage's MLIR (a net without smaller stages has one): the ONNX graph at that
    stage's input shapes, made once and shared by the net's deploys."""
    job = attempt.job
    options = () if job.simplified else TRANSFORM_OPTIONS
    shapes = [t.shape for t in stage.inputs]
    folder = attempt.net_folder / f"mlir-{cache_key(job.export_key, toolchain.tpu_mlir_version, options, shapes)}"
    mlir = folder / f"{job.name}.mlir"
    if folder.is_dir():
        damaged = damaged_files(folder, read_manifest(folder / TRANSFORM_FILES, COMPILE_VERSION).get("files"))
        damaged += [f"{p} is truncated" for p in folder.glob("*.npz") if truncated_npz(p)]  # recorded as written
        if not damaged:
            return mlir
        notes.append(f"{damaged[0]}; transforming {job.name} again")
    tmp = scratch(folder)
    with _turn(attempt.transform_lock):
        transform(toolchain, job.onnx, tmp, job.name, shapes, attempt.log, server, options)
    record_transform(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return mlir


def stage_tables(attempt: Attempt, mlir: Path, toolchain: Toolchain, notes: list[str]) -> tuple[Path, Path]:
    """A w8a8 stage's calibration and quantize tables (lvb.compile.calibration), measured on the
    net's calibration inputs once per MLIR and calibration set, and shared by its deploys."""
    job = attempt.job
    key = cache_key(mlir.parent.name, job.options.calibration, job.options.calibration_tuning)
    folder = attempt.net_folder / f"cali-{key}"
    table, qtable = folder / "calibration_table", folder / "quantize_table"
    if folder.is_dir():
        damaged = damaged_files(folder, read_manifest(folder / TRANSFORM_FILES, COMPILE_VERSION).get("files"))
        if not damaged:
            return table, qtable
        notes.append(f"{damaged[0]}; calibrating {job.name} again")
    inputs = sorted(job.calibration.glob("*.npz")) if job.calibration else []
    if not inputs:
        raise CompileError(f"{job.name}: no calibration inputs in {job.calibration}; delete compile/calibration and "
                           "compile again")
    tmp = scratch(folder)
    # tpu-mlir's calibration holds every tensor of the net in memory (tens of GB for a vision layer
    # at the 11B's four tiles): the jobs of this machine calibrate one at a time.
    with _turn(_calibration_turns(job)), mlir_files(mlir, tmp):
        measured = calibrate(toolchain, mlir, tmp, job.calibration, len(inputs), "measured_table", attempt.log,
                             job.options.calibration_tuning)
    write_tables(job.onnx, measured, tmp / table.name, tmp / qtable.name)
    record_transform(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return table, qtable


def _calibration_turns(job: NetJob) -> Path:
    """The lock a machine's w8a8 jobs take turns on for tpu-mlir's memory-hungry steps."""
    return job.calibration.parent.parent / "turns.lock"


@contextmanager
def mlir_files(mlir: Path, folder: Path) -> Iterator[None]:
    """The MLIR's folder linked into `folder` while a tool runs there: deploy and calibration read
    the MLIR's weight file from their own working directory."""
    links = [folder / needed.name for needed in mlir.parent.iterdir()]
    for link in links:
        link.symlink_to(mlir.parent / link.name)
    try:
        yield
    finally:
        for link in links:
            link.unlink(missing_ok=True)


@contextmanager
def _turn(lock: Path | None) -> Iterator[None]:
    """Wait until no other holder of `lock` (flock) is inside; no lock, no waiting."""
    if lock is None:
        yield
        return
    import fcntl

    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        yield


def _simulate(job: NetJob, stage: NetSpec, feeds: dict, fp32: list, bmodel: Path, toolchain: Toolchain,
              interpreted: list | None) -> dict:
    """One stage's bmodel on the simulator against onnxruntime on the export's check inputs, and
    against tpu-mlir's interpreter's outputs where its deploy ran it."""
    from lvb.runtime.cmodel import CmodelEngine

    started = time.perf_counter()
    with CmodelEngine(bmodel, toolchain) as simulator:
        simulated = time.perf_counter()
        got = simulator.run(job.name, feeds)
        simulator_seconds = time.perf_counter() - simulated
    check, _ = onnx_vs_bmodel(stage, job.onnx, feeds, fp32, got, job.quant, job.options.group_size)
    if interpreted is not None:
        check["cosines"] |= against_interpreter(stage, interpreted, got)
    # What a check costs (bench/real_widths.py weighs --check kinds against the compile):
    # the simulator's run, and the whole check with loading and the quantized reference.
    return check | {"simulator_seconds": round(simulator_seconds, 2), "seconds": round(time.perf_counter() - started, 2)}


def interprets(job: NetJob, check: bool) -> bool:
    """Whether a checked deploy of `job` also runs tpu-mlir's interpreter, the quantization-aware
    reference of a w8a8 net (lvb.check.INTERPRETER)."""
    return check and job.calibration is not None


def interpreted(folder: Path, bmodel: Path, job: NetJob, toolchain: Toolchain) -> list:
    """The outputs tpu-mlir's interpreter gave the deploy in `folder`, in the bmodel's order."""
    return interpreted_outputs(folder, [t.name for t in declared_tensors(bmodel, toolchain)[job.name].outputs])


def dtype_exceptions(bmodel: Path, net: NetSpec, quant: str, toolchain: Toolchain) -> dict[str, str]:
    """The tensors a bmodel declares in another dtype than the contract gives the device
    (NetSpec.on_device), by name. Seen once: tpu-mlir keeping the float32 cast of a
    vision-head input it unsqueezes first. The runtime and the memory plan read dtypes from
    the bmodel, so the net still runs right (the host converts that input); the manifest says which."""
    found, want = declared_tensors(bmodel, toolchain)[net.name], net.on_device(quant)
    inputs = {t.name: t.dtype for t in found.inputs}
    exceptions = {t.name: inputs[t.name] for t in want.inputs if inputs.get(t.name, t.dtype) != t.dtype}
    return exceptions | {t.name: o.dtype for t, o in zip(want.outputs, found.outputs) if o.dtype != t.dtype}


def _deploy_stages(attempt: Attempt, tmp: Path, toolchain: Toolchain, server: ToolServer | None,
                   notes: list[str]) -> tuple[Path, dict | None, list[dict] | None]:
    """Every stage deployed and checked on its own, then, when there are several, joined
    largest first into one net whose stages share the weights (tpu-mlir's own LLM converter
    orders them so; the simulator crashes on a combined net whose first stage is not its largest).
    Also each stage's device-time estimate, which the deploy leaves in its folder."""
    job = attempt.job
    stage_bmodels, checks, estimates = [], [], []
    interpret = interprets(job, attempt.check)
    kept = None
    for index, (stage, check_file) in enumerate(zip(job.net.stages, job.check_files)):
        mlir = stage_mlir(attempt, stage, toolchain, server, notes)
        folder = tmp / f"stage{index}" if len(job.net.stages) > 1 else tmp
        folder.mkdir(exist_ok=True)
        tables = stage_tables(attempt, mlir, toolchain, notes) if job.calibration is not None else None
        feeds, fp32 = load_check(check_file) if attempt.check else ({}, [])
        # tpu-mlir's interpreter, like its calibration, holds every tensor of the net: the same turns.
        with _turn(_calibration_turns(job) if interpret else None), mlir_files(mlir, folder):
            bmodel = deploy(toolchain, mlir, folder, f"{job.name}.bmodel", attempt.options, attempt.log, server, tables,
                            feeds if interpret else None)
        estimates.append(read_profile(folder))
        stage_bmodels.append(bmodel)
        if attempt.check:
            reference = interpreted(folder, bmodel, job, toolchain) if interpret else None
            if index == 0:  # the stage verify runs, on the same check inputs
                kept = reference
            checks.append(_simulate(job, stage, feeds, fp32, bmodel, toolchain, reference))
    bmodel = stage_bmodels[0]
    if len(stage_bmodels) > 1:
        bmodel = combine(toolchain, stage_bmodels, tmp / f"{job.name}.bmodel", attempt.log)
    # The deploys' copies of the weights (their weight files, and each stage's bmodel once joined)
    # would stay in the cache beside the net's bmodel, a copy or two of every weight per stage; so
    # would the interpreter's inputs and outputs.
    for stage_bmodel in stage_bmodels:
        for bulky in stage_bmodel.parent.glob("*.npz"):
            bulky.unlink()
        if stage_bmodel != bmodel:
            stage_bmodel.unlink()
    if kept is not None:
        save_interpreted(tmp / INTERPRETED, job.net, kept)
    device = [e.to_json() for e in estimates] if all(estimates) else None
    if not checks:
        return bmodel, None, device
    cost = {key: round(sum(c[key] for c in checks), 2) for key in ("simulator_seconds", "seconds")}  # every stage's
    worst = min(checks, key=lambda c: (c["cosine"] == c["cosine"], c["cosine"]))  # a NaN first
    cosines = {name: lowest(c["cosines"][name] for c in checks) for name in worst["cosines"]}  # each output's worst stage
    return bmodel, worst | {"cosines": cosines} | cost, device


def build_attempt(attempt: Attempt, toolchain: Toolchain, server: ToolServer | None) -> dict:
    """Transform (cached), deploy and check one net, on this machine's pool or a cluster node;
    the attempt's folder appears only complete. Its "notes" name damaged cached files it rebuilt."""
    job = attempt.job
    tmp = scratch(attempt.folder)
    started = time.perf_counter()
    notes: list[str] = []
    bmodel, check, device = _deploy_stages(attempt, tmp, toolchain, server, notes)
    exceptions = dtype_exceptions(bmodel, job.net, job.quant, toolchain)
    seconds = time.perf_counter() - started
    passed = check is None or not shortfalls(check["cosines"], attempt.thresholds)
    result = {"version": COMPILE_VERSION, "net": job.name, "quant": job.quant, "options": list(attempt.options.extra),
              "check": check, "thresholds": attempt.thresholds, "passed": passed, "seconds": round(seconds, 2),
              "bmodel": attempt.bmodel, "file": record_file(bmodel), "dtype_exceptions": exceptions,
              "device": device}
    if (tmp / INTERPRETED).is_file():
        result["interpreted"] = record_file(tmp / INTERPRETED)
    shutil.copy(attempt.log, tmp / "compile.log")
    write_json(tmp / "result.json", result)
    shutil.rmtree(attempt.folder, ignore_errors=True)
    os.replace(tmp, attempt.folder)
    return result | ({"notes": notes} if notes else {})
