"""`lvb compile --cluster`: every net's transform, deploy and simulator check as a Ray task.

The compiler keeps everything else: the cache, the option ladder, logs, progress, the
fail-fast message and the combine all stay where the command was started. This module
only builds one attempt (lvb.compile.build.Attempt) on a cluster node:

- Files. Without a shared filesystem, the driver puts the net's ONNX, its external
  weights and check inputs into Ray's object store in CHUNK-sized pieces (it holds one
  piece at a time); the task writes them into a node-local scratch folder, builds there,
  and the driver reads the bmodel, log and result back piece by piece with small tasks
  pinned to that node, into a scratch folder renamed into the cache. With
  `--cluster-shared-dir`, where the work directory lies on a filesystem every node
  mounts at the same path, the task builds straight into the cache as the local pool does.
- Nodes. A task uses its node's own toolchain (LVB_TOOLCHAIN in the node's environment,
  else the node's checkout's .venv-tpu, else PATH), which must be the driver's tpu-mlir
  version: cache keys include it. Every node is probed before the first job; a node
  without a working toolchain stops the compile with one line naming it.
- Faults. A task lost with its worker or node is run again elsewhere (Ray's
  max_retries, MAX_RETRIES times); a tool error or a missed threshold comes back as data,
  never as an exception, so Ray retries nothing (retry_exceptions stays off).
- Memory. Each task asks Ray for the memory its net kind peaked at in
  bench/convert_scale.py at 11B widths, scaled by the net's weight bytes (the kind's
  policy in lvb.contract), so a node never runs more tools than its memory holds.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import lvb
from lvb.compile.build import Attempt, CompileError, NetJob, build_attempt, memory_need
from lvb.toolchain import Toolchain, ToolchainError, ToolFailed, ToolServer, find_toolchain
from lvb.workdir import scratch

CLUSTER_ENV = "LVB_CLUSTER"
CHUNK = 32 << 20  # bytes per object-store piece: a 2 GB table goes as 64 of them
FETCH_AHEAD = 4  # pieces pulled ahead, to a node (inputs) or from it (results)
MAX_RETRIES = 3  # runs of a task lost with its worker or node (system failures only)
# What comes back of a deploy folder: the rest (tpu-mlir's intermediate MLIR and weight
# files, as large again as the bmodel, and a staged net's per-stage bmodels, which its
# <net>.bmodel joins) stays behind.
RESULT_FILES = lambda net: (f"{net}.bmodel", "compile.log", "result.json")  # noqa: E731
SCRATCH_PREFIX = "lvb-job-"
INSTALL_HINT = "install the cluster extra: pip install -e '.[cluster]' (make setup does)"


@dataclass(frozen=True)
class ClusterSettings:
    address: str  # "auto", "ray://HOST:PORT" (Ray Client) or HOST:PORT of a cluster this machine is a node of
    shared_dir: Path | None = None  # mounted at the same path on every node; holds the work directory


def _inputs(attempt: Attempt) -> list[Path]:
    """What a node needs of the export: the net's ONNX and weights, and its stages' check inputs."""
    folder = attempt.job.onnx.parent
    return sorted(p for p in folder.iterdir() if p.is_file() and (attempt.check or p not in attempt.job.check_files))


# -- on a node ---------------------------------------------------------------------------

_NODE: dict = {}  # per worker process: its node's toolchain and a warm tool server


class NodeProblem(CompileError):
    """This node cannot build: the message names it."""


def _node_name() -> str:
    import ray

    return f"node {ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"


def _node_toolchain(expect: dict) -> Toolchain:
    """The node's own toolchain, checked once per worker process against the driver's."""
    if "toolchain" not in _NODE:
        try:
            toolchain = find_toolchain()
            version = toolchain.tpu_mlir_version
        except ToolchainError as e:
            raise NodeProblem(f"{_node_name()}: {e}") from e
        if version != expect["tpu_mlir"]:
            raise NodeProblem(f"{_node_name()}: its toolchain {toolchain.bin_dir} has tpu-mlir {version}, the command's "
                              f"has {expect['tpu_mlir']}; run `make setup` on the node from the same checkout")
        if expect["lvb"] != lvb.__version__:
            raise NodeProblem(f"{_node_name()}: it runs lvb {lvb.__version__}, the command lvb {expect['lvb']}; "
                              "update the node's checkout")
        _NODE["toolchain"] = toolchain
    return _NODE["toolchain"]


def _node_server(toolchain: Toolchain) -> ToolServer | None:
    server = _NODE.get("server")
    if server is None or server.process.poll() is not None:
        try:
            server = ToolServer(toolchain)
        except ToolchainError:
            server = None
        _NODE["server"] = server
    return server


def probe_node(expect: dict, shared_dir: str | None) -> str:
    """Runs once on every node before the first job: the one-line problem, or ''."""
    try:
        _node_toolchain(expect)
        if shared_dir and not Path(shared_dir).is_dir():
            raise NodeProblem(f"{_node_name()}: it does not see --cluster-shared-dir {shared_dir}; mount it at the same path")
    except NodeProblem as e:
        return str(e)
    return ""


def receive(layout: list[tuple[str, int]], pieces, folder: Path) -> None:
    """Write the pieces the driver put into the object store (RayExecutor.upload) as the files
    of `layout` (name, number of pieces) in `folder`. Ray pulled them to this node before the
    task took its CPU, and hands them over as read-only views of the object store: no copy
    on this process's heap."""
    at = 0
    for name, count in layout:
        with open(folder / name, "wb") as f:
            for piece in pieces[at:at + count]:
                f.write(piece)
        at += count


def run_attempt(attempt: Attempt, layout: list[tuple[str, int]] | None, expect: dict, *pieces) -> dict:
    """Build one attempt on this node. Failures come back as data ("error"), so Ray retries
    only lost workers and nodes. `layout` None: the work directory is shared."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    try:
        toolchain = _node_toolchain(expect)
    except NodeProblem as e:
        return {"error": str(e)}
    if layout is None:
        try:
            return {"result": build_attempt(attempt, toolchain, _node_server(toolchain))}
        except ToolFailed as e:
            return {"error": "tool", "tool": e.tool, "code": e.code}
        except Exception as e:  # noqa: BLE001  (one line back to the command; the log has the rest)
            return {"error": f"{attempt.job.name} on {_node_name()}: {type(e).__name__}: {e}"}
    _sweep_scratch()
    local = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-{attempt.job.name}-"))
    export = local / "export"
    export.mkdir()
    try:
        receive(layout, pieces, export)
        job = replace(attempt.job, onnx=export / attempt.job.onnx.name,
                      check_files=tuple(export / f.name for f in attempt.job.check_files))
        here = replace(attempt, job=job, net_folder=local / "net", folder=local / "out", log=local / "job.log")
        result = build_attempt(here, toolchain, _node_server(toolchain))
        files = {name: (here.folder / name).stat().st_size for name in RESULT_FILES(job.name)}
        return {"result": result, "folder": str(here.folder), "files": files, **_log(node, here.log)}
    except ToolFailed as e:
        return {"error": "tool", "tool": e.tool, "code": e.code, **_log(node, local / "job.log")}
    except Exception as e:  # noqa: BLE001
        with open(local / "job.log", "a") as log:
            import traceback

            traceback.print_exc(file=log)
        return {"error": f"{attempt.job.name} on {_node_name()}: {type(e).__name__}: {e}", **_log(node, local / "job.log")}
    finally:
        shutil.rmtree(export, ignore_errors=True)
        shutil.rmtree(local / "net", ignore_errors=True)


def _sweep_scratch() -> None:
    """Remove scratch folders of this node's workers that died mid-job (their pid is gone)."""
    if _NODE.get("swept"):
        return
    _NODE["swept"] = True
    for folder in Path(tempfile.gettempdir()).glob(f"{SCRATCH_PREFIX}*"):
        try:
            os.kill(int(folder.name[len(SCRATCH_PREFIX):].split("-", 1)[0]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _log(node: str, log: Path) -> dict:
    return {"node": node, "log": str(log), "log_size": log.stat().st_size if log.exists() else 0}


def read_piece(path: str, offset: int, size: int):
    import numpy as np

    with open(path, "rb") as f:
        f.seek(offset)
        return np.frombuffer(f.read(size), np.uint8)


def discard(path: str) -> None:
    """Remove a fetched attempt's node-local scratch folder (`path` is its `out` folder or its log)."""
    shutil.rmtree(Path(path).parent, ignore_errors=True)


# -- where the command runs ------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    """One line of an exception Ray relayed, without the terminal colours it adds."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0] if text else type(error).__name__


class Lost(Exception):
    """An attempt's task or its node is gone before its result came back: run it again."""


class RayExecutor:
    """Builds attempts as Ray tasks; each of the Compiler's threads (slots) sends one and waits for it."""

    def __init__(self, settings: ClusterSettings, work: Path | None = None, jobs: list[NetJob] = (),
                 tpu_mlir: str | None = None):
        """Connects; with a compile's work directory, jobs and tpu-mlir version, also sizes the pool and
        probes every node for them."""
        try:
            import ray
        except ImportError as e:
            raise CompileError(f"--cluster needs Ray, which is not installed; {INSTALL_HINT}") from e
        self.ray, self.settings = ray, settings
        if settings.shared_dir is not None:
            shared = settings.shared_dir.resolve()
            if work is not None and not work.is_relative_to(shared):
                raise CompileError(f"--work {work} is not inside --cluster-shared-dir {shared}; "
                                   "put the work directory on the shared filesystem")
        import logging

        try:
            ray.init(address=settings.address, logging_level=logging.ERROR, log_to_driver=False)
        except Exception as e:  # noqa: BLE001  (ConnectionError, ValueError, RuntimeError, grpc errors)
            raise CompileError(f"cannot reach a Ray cluster at {settings.address} ({_first_line(e)}); start one with "
                               "`ray start --head`, or give --cluster ray://HOST:10001 / HOST:6379") from e
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self._pinned = lambda node: NodeAffinitySchedulingStrategy(node, soft=False)
        self._run = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(run_attempt)
        self._read = ray.remote(num_cpus=0, max_retries=MAX_RETRIES)(read_piece)
        self._discard = ray.remote(num_cpus=0)(discard)
        self._live: set = set()
        self._lock = threading.Lock()
        self._cancelled = False
        try:
            nodes = [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
            if not nodes:
                raise CompileError(f"the Ray cluster at {settings.address} has no node with a CPU; add one with `ray start`")
            # One job queued per node beyond its CPUs: its inputs travel while the node works.
            self.slots = max(1, int(sum(n["Resources"]["CPU"] for n in nodes))) + len(nodes)
            self.nodes = len(nodes)
            if work is not None:
                self._prepare(jobs, tpu_mlir, nodes)
        except BaseException:
            ray.shutdown()
            raise

    def _prepare(self, jobs: list[NetJob], tpu_mlir: str | None, nodes: list[dict]) -> None:
        ray = self.ray
        largest = max(n["Resources"].get("memory", 0) for n in nodes)
        self.need = {job.name: memory_need(job) for job in jobs}
        worst = max(jobs, key=lambda j: self.need[j.name])
        if self.need[worst.name] > largest:
            raise CompileError(f"{worst.name} needs {self.need[worst.name] / 1e9:.1f} GB of memory and the largest node of "
                               f"the cluster offers {largest / 1e9:.1f} GB (Ray's memory resource); add a larger node")
        self.expect = {"tpu_mlir": tpu_mlir, "lvb": lvb.__version__}
        shared = str(self.settings.shared_dir.resolve()) if self.settings.shared_dir else None
        probe = ray.remote(num_cpus=0)(probe_node)
        problems = ray.get([probe.options(scheduling_strategy=self._pinned(n["NodeID"])).remote(self.expect, shared)
                            for n in nodes])
        problems = [p for p in problems if p]
        if problems:
            raise CompileError(problems[0])

    # -- one attempt

    def build(self, attempt: Attempt) -> dict:
        for _ in range(MAX_RETRIES + 1):
            try:
                return self._build_once(attempt)
            except Lost as e:
                cause = e.__cause__
        raise CompileError(f"{attempt.job.name}: the cluster lost its result {MAX_RETRIES + 1} times "
                           f"({type(cause).__name__}: {_first_line(cause)}); check `ray status`")

    def _submit(self, remote, *args, **options):
        if self._cancelled:
            raise CompileError("cancelled")
        ref = remote.options(**options).remote(*args) if options else remote.remote(*args)
        with self._lock:
            self._live.add(ref)
        return ref

    def _get(self, ref):
        try:
            return self.ray.get(ref)
        finally:
            with self._lock:
                self._live.discard(ref)

    def _build_once(self, attempt: Attempt) -> dict:
        ray, job = self.ray, attempt.job
        layout, pieces = None, []
        if not self.settings.shared_dir:
            layout = []
            for path in _inputs(attempt):
                refs = self.upload(path)
                layout.append((path.name, len(refs)))
                pieces += refs
        # The pieces go as arguments of their own, so Ray moves them to the node before the
        # task takes a CPU there: the transfer overlaps the job the node is running.
        ref = self._submit(self._run, attempt, layout, self.expect, *pieces, memory=self.need[job.name])
        try:
            reply = self._get(ref)
        except ray.exceptions.TaskCancelledError as e:
            raise CompileError("cancelled") from e
        except ray.exceptions.RayError as e:
            raise CompileError(f"{job.name}: lost on the cluster after {MAX_RETRIES} retries "
                               f"({type(e).__name__}: {_first_line(e)})") from e
        finally:
            del pieces  # they leave the object store with the task's last reference
        error = reply.get("error")
        if "node" in reply:  # built in a node-local scratch folder: bring the log and the result here
            try:
                self._fetch_log(reply, attempt.log)
                if not error:
                    self._fetch_folder(reply, attempt)
            finally:
                self.discard(reply["node"], reply.get("folder") or reply["log"])
        if error == "tool":
            raise ToolFailed(reply["tool"], reply["code"], attempt.log)
        if error:
            raise CompileError(error)
        return reply["result"]

    def upload(self, path: Path) -> list:
        """The file as object-store pieces, for `receive` on a node; this process holds one piece at a time."""
        import numpy as np

        refs = []
        with open(path, "rb") as f:
            while piece := f.read(CHUNK):
                refs.append(self.ray.put(np.frombuffer(piece, np.uint8)))
        return refs

    def _pieces(self, node: str, path: str, size: int):
        """The file's pieces in order, FETCH_AHEAD read tasks in flight on its node."""
        offsets = list(range(0, size, CHUNK))
        pending = []
        for offset in offsets:
            pending.append(self._submit(self._read, path, offset, CHUNK, scheduling_strategy=self._pinned(node)))
            if len(pending) > FETCH_AHEAD:
                yield self._piece(pending.pop(0))
        while pending:
            yield self._piece(pending.pop(0))

    def _piece(self, ref):
        try:
            return self._get(ref)
        except self.ray.exceptions.TaskCancelledError as e:
            raise CompileError("cancelled") from e
        except self.ray.exceptions.RayError as e:  # the node left with the result: build again
            raise Lost() from e

    def fetch(self, node: str, path: str, size: int, out) -> None:
        """Copy a file of `size` bytes from a node-local `path` into the open file `out`."""
        for piece in self._pieces(node, path, size):
            out.write(piece)

    def discard(self, node: str, path: str) -> None:
        """Remove the node-local scratch folder holding `path` (fire and forget)."""
        self._discard.options(scheduling_strategy=self._pinned(node)).remote(path)

    def _fetch_log(self, reply: dict, log: Path) -> None:
        with open(log, "ab") as out:
            self.fetch(reply["node"], reply["log"], reply["log_size"], out)

    def _fetch_folder(self, reply: dict, attempt: Attempt) -> None:
        tmp = scratch(attempt.folder)
        for name, size in reply["files"].items():
            with open(tmp / name, "wb") as out:
                self.fetch(reply["node"], f"{reply['folder']}/{name}", size, out)
        shutil.rmtree(attempt.folder, ignore_errors=True)
        os.replace(tmp, attempt.folder)

    # -- the pool's life

    def cancel(self) -> None:
        self._cancelled = True
        with self._lock:
            live = list(self._live)
        for ref in live:
            try:
                self.ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001  (already finished or its node is gone)
                pass

    def close(self) -> None:
        self.ray.shutdown()

    def describe(self) -> dict:
        return {"jobs": self.slots, "cluster": self.settings.address, "nodes": self.nodes,
                "shared_dir": str(self.settings.shared_dir) if self.settings.shared_dir else None}
