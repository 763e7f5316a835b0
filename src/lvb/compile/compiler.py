"""`lvb compile`: every exported net to a bmodel, in a bounded pool, cached,
resumable, each checked on the simulator against onnxruntime, then combined.

The compiler decides what to build (the cache, each kind's option ladder); an Executor
builds one attempt: this machine's threads (LocalExecutor), or Ray tasks on a cluster
(lvb.compile.cluster). Progress, logs, the fail-fast message and the combine stay here.

What it writes under the work directory is described in lvb.workdir.
A job folder is renamed into place only when its bmodel passed its check, so a
run killed at any point resumes where it stopped and ends with the same nets.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import lvb
from lvb.compile import calibration
from lvb.compile.build import Attempt, CompileError, NetFailed, NetJob, build_attempt, interprets, memory_need
from lvb.compile.tpumlir import DEFAULT_GROUP_SIZE, DeployOptions, combine
from lvb.check import shortfalls, thresholds
from lvb.contract import DEFAULT_BATCH, CheckMode, Chip, ChoiceError, Kind, NetSpec, Quant, QuantGroup, batch_sizes, is_calibrated, plan
from lvb.spec import ModelSpec
from lvb.toolchain import Toolchain, ToolchainError, ToolFailed, ToolServer
from lvb.workdir import (COMPILE_VERSION, WorkDir, WorkDirError, cache_key, matches_record, read_manifest, record_file,
                         remove_stale_scratch, temporary, write_json)

if TYPE_CHECKING:
    from lvb.compile.cluster import ClusterSettings


@dataclass(frozen=True)
class CompileSettings:
    """What `lvb compile` was asked for; names (from a caller or a manifest) become choices here,
    and a name outside them is a ChoiceError naming the option."""

    quant: Quant  # for the decoder blocks
    group_size: int = DEFAULT_GROUP_SIZE
    chip: Chip = Chip.BM1684X
    vision_quant: Quant = Quant.BF16
    embed_quant: Quant = Quant.BF16
    head_quant: Quant = Quant.BF16
    check: CheckMode = CheckMode.ALL
    calibration_images: str | None = None  # a folder of pictures a w8a8 tower is calibrated on
    # Whether that calibration tunes its thresholds: off, a 4-tile 11B layer calibrates in about half
    # the host memory (bench/README.md §1.8), and the checks judge what it gives.
    calibration_tuning: bool = True

    def __post_init__(self):
        for name, of in (("quant", Quant.of_weights), ("vision_quant", Quant.of), ("embed_quant", Quant.of_weights),
                         ("head_quant", Quant.of_weights), ("chip", Chip.of), ("check", CheckMode.of)):
            object.__setattr__(self, name, of(getattr(self, name), "--" + name.replace("_", "-")))
        if self.calibration_images is not None and not self.vision_quant.calibrated:
            raise ChoiceError(f"--calibration-images is for --vision-quant w8a8 (the INT8 tower is calibrated on them, "
                              f"not --vision-quant {self.vision_quant}); add --vision-quant w8a8 or drop it")
        if not self.calibration_tuning and not self.vision_quant.calibrated:
            raise ChoiceError(f"--no-calibration-tuning is for --vision-quant w8a8 (nothing is calibrated with "
                              f"--vision-quant {self.vision_quant}); add --vision-quant w8a8 or drop it")

    def quant_of(self, kind: Kind) -> str:
        """The net's key of tpumlir.QUANTIZE."""
        group = kind.policy.quant
        return "f32" if group is QuantGroup.F32 else getattr(self, group.value).value

    def tag(self) -> str:
        parts = [self.quant.value] + ([f"g{self.group_size}"] if self.quant.grouped else [])
        for name, value in (("vision", self.vision_quant), ("embed", self.embed_quant), ("head", self.head_quant)):
            if value is not Quant.BF16:
                parts.append(f"{name}-{value.value}")
        return "_".join(parts)


class Executor(Protocol):
    """Where attempts are built: this machine's threads, or a Ray cluster (lvb.compile.cluster)."""

    slots: int  # attempts in flight at once

    def build(self, attempt: Attempt) -> dict: ...

    def cancel(self) -> None: ...  # stop what runs now: a net failed or the user pressed Ctrl-C

    def close(self) -> None: ...

    def describe(self) -> dict: ...  # what the manifest's settings record of where it ran


def default_jobs(largest_need: int) -> int:
    """As many jobs as cores, fewer when free memory cannot hold them."""
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return max(1, cores // 2)
    return max(1, min(cores, available // largest_need))


def validate_group_size(spec: ModelSpec, settings: CompileSettings) -> None:
    """Every quantized matmul's input width must be a multiple of the group size."""
    t, v = spec.text, spec.vision
    widths = {}
    if settings.quant.grouped:
        widths.update({"text hidden_size": t.hidden_size, "text intermediate_size": t.intermediate_size})
    if settings.vision_quant.grouped:
        widths.update({"vision hidden_size": v.hidden_size, "vision intermediate_size": v.intermediate_size,
                       "vision_output_dim": v.output_dim})
    if settings.head_quant.grouped:
        widths["text hidden_size"] = t.hidden_size
    bad = {name: width for name, width in widths.items() if width % settings.group_size}
    if bad:
        name, width = next(iter(bad.items()))
        divisors = [g for g in (256, 128, 64, 32, 16, 8) if all(w % g == 0 for w in widths.values())]
        hint = f"--group-size {divisors[0]}" if divisors else "--quant bf16"
        raise CompileError(f"--group-size {settings.group_size} does not divide {name} {width}; use {hint}")


class LocalExecutor:
    """Attempts in this process's threads, each with a warm tool server of its own."""

    def __init__(self, toolchain: Toolchain, slots: int):
        self.toolchain, self.slots = toolchain, slots
        self._local = threading.local()
        self._servers: list[ToolServer] = []
        self._lock = threading.Lock()

    def _server(self) -> ToolServer | None:
        """One warm tool server per pool thread; plain subprocesses if it cannot start."""
        if not hasattr(self._local, "server"):
            try:
                self._local.server = ToolServer(self.toolchain)
                with self._lock:
                    self._servers.append(self._local.server)
            except ToolchainError:
                self._local.server = None
        return self._local.server

    def build(self, attempt: Attempt) -> dict:
        return build_attempt(attempt, self.toolchain, self._server())

    def cancel(self) -> None:
        self.toolchain.kill_all()

    def close(self) -> None:
        for server in self._servers:
            server.close()

    def describe(self) -> dict:
        return {"jobs": self.slots}


class Compiler:
    def __init__(self, work: Path, settings: CompileSettings, toolchain: Toolchain, seq: int | None = None,
                 notify: Callable[[str], None] | None = None, transform_lock: Path | None = None,
                 batch: Sequence[int] | None = None):
        """`seq`, `batch`: what the caller expects the export to hold (refused when it does not).
        `transform_lock`: a file on which this compile's transforms take turns with those of other
        compiles given the same file (each transform's memory peaks far above its deploy's, so two
        compiles sharing a machine can overlap everything else)."""
        self.work, self.settings, self.toolchain = Path(work).resolve(), settings, toolchain
        self.notify = notify or (lambda message: None)  # a cached file that is damaged, and rebuilt
        self.transform_lock = transform_lock
        self.dir = WorkDir(self.work)
        try:
            self.export = self.dir.require_export()
        except WorkDirError as e:
            raise CompileError(str(e)) from None
        exported_seq = self.export["settings"]["seq"]
        if seq is not None and seq != exported_seq:
            raise CompileError(f"the export in {self.work} is for --seq {exported_seq}, not {seq}; run `lvb export --seq {seq}` first")
        self.seq, self.chunks = exported_seq, tuple(self.export["settings"]["chunks"])
        self.batch = tuple(self.export["settings"].get("batch", DEFAULT_BATCH))
        if batch is not None and batch_sizes(batch) != self.batch:
            have, want = (",".join(map(str, sorted(b))) for b in (self.batch, batch_sizes(batch)))
            raise CompileError(f"the export in {self.work} is for --batch {have}, not {want}; run `lvb export --batch {want}` "
                               "first (the decode nets' stages are made there)")
        self.verify = self.export["settings"].get("verify", 0)
        self.spec = ModelSpec.from_dir(self.export["model"]["dir"])
        missing = [n.name for n in plan(self.spec, self.seq, self.chunks, self.batch, self.verify)
                   if n.name not in self.export["nets"]]
        if missing:  # a manifest from before `complete` existed, or one edited by hand
            raise CompileError(f"the export in {self.work} is unfinished ({len(missing)} nets missing, e.g. "
                               f"{', '.join(missing[:3]) or '?'}; was it interrupted?); run `lvb export --out {self.work}` again to finish it")
        validate_group_size(self.spec, settings)
        self.out = self.dir.compile
        self.out.mkdir(parents=True, exist_ok=True)
        self.toolchain_version = toolchain.tpu_mlir_version
        self.calibration = self._calibration_set() if settings.vision_quant.calibrated else None
        self.jobs = [self._job(name, entry) for name, entry in self.export["nets"].items()]
        model_name = self.export["model"]["name"]
        chunks = "-".join(map(str, sorted(self.chunks)))
        batch = f"_batch{'-'.join(map(str, sorted(self.batch)))}" if self.batch != DEFAULT_BATCH else ""
        verify = f"_verify{self.verify}" if self.verify else ""
        self.bmodel = self.dir.bmodel(f"{model_name}_{settings.tag()}_seq{self.seq}_chunk{chunks}{batch}{verify}_{settings.chip}.bmodel")
        self._cancel = threading.Event()

    def _calibration_set(self) -> tuple[str, Path, list[Path]]:
        """(key, folder, pictures) of the pictures' vision inputs a w8a8 tower is calibrated on."""
        pictures = calibration.pictures(self.settings.calibration_images)
        key = calibration.set_key(self.export, pictures)
        return key, self.out / "calibration" / key, pictures

    def _ensure_calibration(self) -> None:
        """Make the calibration set when a w8a8 net will need it and it is not on disk whole."""
        if self.calibration is None:
            return
        _, folder, pictures = self.calibration
        calibration.ensure_set(folder, Path(self.export["model"]["dir"]), self.export, self.dir.onnx, pictures,
                               progress=lambda i, n: self.notify(f"w8a8: the vision tower's inputs on calibration "
                                                                 f"picture {i + 1} of {n} (onnxruntime)"))

    def _job(self, name: str, entry: dict) -> NetJob:
        net = NetSpec.from_json(entry)
        quant = self.settings.quant_of(net.kind)
        bf16_inputs, bf16_outputs = net.bf16_io(quant)
        calibrated = is_calibrated(quant)
        return NetJob(
            net=net,
            onnx=self.dir.onnx(entry),
            check_files=tuple(self.dir.check_file(name, i) for i in range(len(net.stages))),
            export_key=entry["key"],
            quant=quant,
            options=DeployOptions(quantize=quant, chip=self.settings.chip.value, group_size=self.settings.group_size,
                                  bf16_inputs=bf16_inputs, bf16_outputs=bf16_outputs,
                                  calibration=self.calibration[0] if calibrated else "",
                                  calibration_tuning=self.settings.calibration_tuning or not calibrated),
            calibration=self.calibration[1] / name if calibrated else None,
        )

    # -- one net ---------------------------------------------------------------

    def _compile(self, job: NetJob, log_dir: Path, executor: Executor, like: NetJob | None = None) -> dict:
        """Deploy with the first option set whose bmodel passes the simulator check; with `like`
        (a checked net of the same kind, --check kinds), unchecked with the options it passed with."""
        net_folder = self.dir.compile_net(job.name)
        check = self.settings.check is CheckMode.ALL or (self.settings.check is CheckMode.KINDS and like is None)
        interpret = interprets(job, check)
        need = thresholds(job.net, job.quant, interpreter=interpret)
        ladder = job.kind.policy.ladder if like is None else (tuple(like.result["options"]),)
        tried = []
        for extra in ladder:
            options = replace(job.options, extra=extra)
            folder = net_folder / cache_key(job.export_key, self.toolchain_version, vars(options), check,
                                            *(["tpu-mlir"] if interpret else []))
            result = read_manifest(folder / "result.json", COMPILE_VERSION)
            problem = result and matches_record(self.work / result["bmodel"], result.get("file"))
            if result and problem is None:
                # Judged again: the thresholds may have changed since it was stored.
                result["thresholds"] = need
                result["passed"] = result["check"] is None or not shortfalls(result["check"]["cosines"], need)
            else:
                if result:
                    self.notify(f"{problem}; compiling {job.name} again")
                try:
                    result = executor.build(Attempt(
                        job=job, options=options, net_folder=net_folder, folder=folder, log=log_dir / f"{job.name}.log",
                        check=check, thresholds=need, bmodel=str((folder / f"{job.name}.bmodel").relative_to(self.work)),
                        transform_lock=self.transform_lock))
                except ToolFailed as e:
                    raise NetFailed(job.name, f"{e.tool} failed (exit {e.code}); log: {e.log}", e.tail()) from e
                for note in result.pop("notes", ()):
                    self.notify(note)
            if result["passed"]:
                return result | ({"checked_by": like.name} if like is not None else {})
            tried.append(result)
        summary = "; ".join(f"options {r['options'] or 'default'}: {', '.join(shortfalls(r['check']['cosines'], need))}"
                            for r in tried)
        untuned = ("; its calibration was not tuned: drop --no-calibration-tuning on a host with the memory for the tuning"
                   if not job.options.calibration_tuning else "")
        raise NetFailed(job.name, f"the simulator disagrees with onnxruntime ({summary}){untuned}")

    def compile_net(self, name: str) -> dict:
        """Build one net here as `run` would (checked when `--check` asks for it: under kinds, when it
        is the first of its kind, as it has no checked sibling to follow), into the cache `run` then
        reuses; its result record, or NetFailed."""
        job = next((j for j in self.jobs if j.name == name), None)
        if job is None:
            raise CompileError(f"{name} is not a net of the export in {self.work}")
        if job.calibration is not None:
            self._ensure_calibration()
        self.dir.logs.mkdir(exist_ok=True)
        executor = LocalExecutor(self.toolchain, 1)
        try:
            return self._compile(job, self.dir.logs, executor)
        finally:
            executor.close()

    # -- all nets ----------------------------------------------------------------

    def cached(self) -> bool:
        """True when the combined bmodel of exactly these settings and nets exists."""
        previous = read_manifest(self._manifest_path(), COMPILE_VERSION)
        if previous.get("key") != self._combined_key() or previous.get("bmodel") != self.bmodel.name:
            return False
        problem = matches_record(self.bmodel, previous.get("file"))
        if problem is not None:
            self.notify(f"{problem}; combining it again")
        elif "export" not in previous:  # made before the manifest named its export: `lvb pack` checks it
            write_json(self._manifest_path(), previous | {"export": self._export_keys()})
        return problem is None

    def _export_keys(self) -> dict[str, str]:
        """Which export the bmodel is compiled from: each net's export key."""
        return {j.name: j.export_key for j in self.jobs}

    def _manifest_path(self) -> Path:
        return self.dir.compile_manifest(self.bmodel)

    def _combined_key(self) -> str:
        # The calibration set's key holds its pictures' bytes: new pictures in the same folder are another bmodel.
        calibrated = self.calibration[0] if self.calibration else None
        return cache_key([(j.name, j.export_key) for j in self.jobs], vars(self.settings), calibrated,
                         self.toolchain_version, lvb.__version__)

    def run(self, jobs: int | None = None, progress: Callable[[int, int, list[str]], None] | None = None,
            cluster: ClusterSettings | None = None) -> dict:
        """Compile every net not yet cached, here or on a Ray cluster (`cluster`), then combine here."""
        remove_stale_scratch(self.work)  # a killed combine's bmodel, even when all else is cached
        if self.cached():
            return read_manifest(self._manifest_path(), COMPILE_VERSION)
        if cluster is not None and self.calibration is not None and cluster.shared_dir is None:
            raise CompileError("--vision-quant w8a8 on a cluster needs --cluster-shared-dir: the nodes read the "
                               "calibration inputs from the work directory")
        remove_stale_scratch(self.out, levels=1)
        self._ensure_calibration()
        log_dir = self.dir.logs
        log_dir.mkdir(exist_ok=True)
        for stale in log_dir.glob("*.log"):
            stale.unlink()
        if cluster is not None:
            from lvb.compile.cluster import RayExecutor

            executor: Executor = RayExecutor(cluster, self.work, self.jobs, self.toolchain_version)
        else:
            executor = LocalExecutor(self.toolchain, jobs or default_jobs(max(map(memory_need, self.jobs))))
        running: list[str] = []
        done = 0
        lock = threading.Lock()
        # --check kinds: the first net of each kind is built (and checked) first; its siblings
        # are queued only once it has passed, so none holds a pool thread while it waits.
        first: dict[Kind, NetJob] = {}
        if self.settings.check is CheckMode.KINDS:
            for job in self.jobs:
                first.setdefault(job.kind, job)
        siblings = {kind: [job for job in self.jobs if job.kind is kind and job is not lead] for kind, lead in first.items()}

        def one(job: NetJob) -> dict:
            nonlocal done
            if self._cancel.is_set():
                raise CompileError("cancelled")
            with lock:
                running.append(job.name)
                if progress:
                    progress(done, len(self.jobs), list(running))
            try:
                lead = first.get(job.kind)
                job.result = self._compile(job, log_dir, executor, lead if lead is not job else None)
            finally:
                with lock:
                    running.remove(job.name)
                    done += 1
                    if progress:
                        progress(done, len(self.jobs), list(running))
            return job.result

        try:
            with ThreadPoolExecutor(max_workers=executor.slots) as pool:
                leads = list(first.values()) if first else self.jobs
                pending = {pool.submit(one, job): job for job in leads}
                while pending:
                    finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                    failed = [f for f in finished if f.exception()]
                    if failed:
                        self._cancel.set()
                        for future in pending:
                            future.cancel()
                        executor.cancel()
                        raise failed[0].exception()
                    for future in finished:
                        job = pending.pop(future)
                        if first.get(job.kind) is job:
                            pending.update({pool.submit(one, sibling): sibling for sibling in siblings[job.kind]})
        except KeyboardInterrupt:
            self._cancel.set()
            executor.cancel()
            raise
        finally:
            executor.close()
        return self._combine(executor.describe())

    def _combine(self, executed: dict) -> dict:
        log = self.dir.logs / "combine.log"
        tmp = temporary(self.bmodel)  # swept with the others' when its run was killed
        combine(self.toolchain, [self.work / j.result["bmodel"] for j in self.jobs], tmp, log)
        os.replace(tmp, self.bmodel)
        manifest = {
            "version": COMPILE_VERSION,
            "key": self._combined_key(),
            "bmodel": self.bmodel.name,
            "file": record_file(self.bmodel),
            "model": self.export["model"],
            "settings": vars(self.settings) | {"seq": self.seq, "chunks": list(self.chunks), **executed}
            | ({"batch": list(self.batch)} if self.batch != DEFAULT_BATCH else {})
            | ({"verify": self.verify} if self.verify else {}),
            "toolchain": {"tpu_mlir": self.toolchain_version, "source": self.toolchain.source},
            "nets": {j.name: j.result for j in self.jobs},
            "export": self._export_keys(),
        }
        write_json(self._manifest_path(), manifest)
        return manifest
