"""`lvb doctor`: which environments and toolchain lvb uses, and proof that they work.

The proof is end to end: a MatMul+Add ONNX graph compiled by tpu-mlir to a
W4BF16 bm1684x bmodel, run on the simulator, compared with onnxruntime running
the same graph with the same weight quantization.
"""

from __future__ import annotations

import re
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from lvb.check import DOCTOR_MIN_COSINE
from lvb.numerics import reaches
from lvb.toolchain import BUNDLED_GLIBC, Toolchain, ToolchainError, ToolFailed, find_toolchain

PACKAGES = ("torch", "transformers", "onnx", "onnxruntime", "tpu_mlir")


@dataclass
class Problem:
    what: str
    fix: str

    def __str__(self):
        return f"{self.what}; fix: {self.fix}"


@dataclass
class Report:
    environments: dict[str, dict[str, str | None]] = field(default_factory=dict)
    toolchain: Toolchain | None = None
    cosine: float | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def local_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def toolchain_problems(toolchain: Toolchain) -> list[Problem]:
    versions = toolchain.versions
    problems = []
    if not versions.get("tpu_mlir") and not toolchain.library_dirs:
        problems.append(Problem(f"tpu-mlir is not installed for {toolchain.python}", "run `make setup`"))
    if not versions.get("python", "").startswith("3.10"):
        problems.append(Problem(f"the toolchain runs Python {versions.get('python')}, tpu-mlir needs 3.10", "run `make setup`"))
    for package, why in (("torch", "its ONNX front end imports torch"), ("psutil", "its tools import psutil")):
        if not versions.get(package):
            problems.append(Problem(f"{package} is missing from the toolchain ({why})", f"{toolchain.python} -m pip install {package}"))
    for directory in toolchain.library_dirs[2:]:
        bundled = [p.name for p in directory.glob("lib*.so*") if p.name in BUNDLED_GLIBC]
        if bundled:
            problems.append(
                Problem(f"tpu-mlir bundles an old glibc ({', '.join(bundled)}) that breaks every tool here",
                        f"rm {' '.join(str(directory / b) for b in bundled)}")
            )
    return problems


def matmul_add_onnx(path: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = rng.standard_normal((64, 64)).astype(np.float32) * 0.1
    bias = rng.standard_normal(64).astype(np.float32) * 0.1
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])],
        "doctor",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 64])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return {"x": rng.standard_normal((1, 8, 64)).astype(np.float32)}


def end_to_end(toolchain: Toolchain, work: Path) -> float:
    """Compile the check graph and return its cosine against onnxruntime with the bmodel's
    weight quantization."""
    from lvb.check import quantized_reference
    from lvb.compile.tpumlir import DeployOptions, deploy, transform
    from lvb.runtime.cmodel import CmodelEngine
    from lvb.numerics import cosine

    onnx_path = work / "doctor.onnx"
    feeds = matmul_add_onnx(onnx_path, np.random.default_rng(0))
    log = work / "doctor.log"
    mlir = transform(toolchain, onnx_path, work, "doctor", [(1, 8, 64)], log)
    bmodel = deploy(toolchain, mlir, work, "doctor.bmodel", DeployOptions("int4", group_size=64), log)
    expected = quantized_reference(onnx_path, feeds, "int4", 64)[0]
    with CmodelEngine(bmodel, toolchain) as simulator:
        got = simulator.run("doctor", feeds)[0]
    return cosine(got, expected)


def run_doctor(toolchain_arg: str | None = None, status=None) -> Report:
    report = Report()
    report.environments["lvb (this Python)"] = local_versions()
    for package in ("torch", "transformers", "onnx", "onnxruntime"):
        if not report.environments["lvb (this Python)"][package]:
            report.problems.append(Problem(f"{package} is missing from lvb's environment", "run `make setup`"))
    try:
        toolchain = find_toolchain(toolchain_arg)
        report.toolchain = toolchain
        report.environments[f"toolchain ({toolchain.source})"] = toolchain.versions
        report.problems += toolchain_problems(toolchain)
    except ToolchainError as e:
        report.problems.append(Problem(str(e).split(";")[0], "run `make setup`, or pass --toolchain DIR"))
        return report
    if report.problems:
        return report
    with tempfile.TemporaryDirectory(prefix="lvb-doctor-") as tmp:
        if status:
            status("compiling a MatMul+Add graph to W4BF16 and running it on the simulator")
        try:
            report.cosine = end_to_end(toolchain, Path(tmp))
        except ToolFailed as e:
            tail = e.tail(3).replace("\n", " | ")
            report.problems.append(Problem(f"{e.tool} failed in the end-to-end check ({tail})", "run `make setup` to rebuild .venv-tpu"))
            return report
        except Exception as e:  # any failure of the chain is the finding, reported in one line
            report.problems.append(Problem(f"the end-to-end check failed: {type(e).__name__}: {e}".splitlines()[0], "run `make setup` to rebuild .venv-tpu"))
            return report
    if not reaches(report.cosine, DOCTOR_MIN_COSINE):
        report.problems.append(
            Problem(f"the simulator disagrees with onnxruntime (cosine {report.cosine:.6f} < {DOCTOR_MIN_COSINE:.6f})",
                    "reinstall tpu-mlir (`make clean setup`)")
        )
    return report


# -- the card: `lvb doctor --device N` ------------------------------------------------------------
#
# The first questions asked about a misbehaving card are always the same: which SDK, driver and
# libsophon, which heap layout, does one small net run right, is the output garbage. The device
# checks answer them before anyone loads a model: the versions and memory the SDK exposes, then
# a handful of micro-nets built with tpu-mlir on the spot (cached per tpu-mlir version), each run
# on the card and on the simulator, compared, and timed beside tpu-mlir's device-time estimate.

DEVICE_CACHE_VERSION = 1
DEVICE_CARD_RUNS = 3  # timed launches per check after one warm-up; the fastest is shown
# The card and the simulator run the same bmodel: their outputs should agree to the bf16
# rounding of the chip's own arithmetic, so the doctor threshold (lvb.check) applies.


@dataclass(frozen=True)
class MicroNet:
    name: str
    what: str  # one line: what it proves
    cause: str  # the likely cause when it fails on a card that ran the others
    quantize: str = "bf16"
    stages: tuple[int, ...] = ()  # token counts of a multi-stage net, largest first
    bf16_io: bool = False


MICRO_NETS = (
    MicroNet("doctor_w4", "W4BF16 matmul", "the card's firmware or libsophon is older than the tpu-mlir that built the "
             "bmodel (int4 kernels); install the libsophon and firmware of the same release", quantize="int4"),
    MicroNet("doctor_bf16io", "bf16-I/O net", "this runtime misreads bf16 inputs or outputs; update libsophon and "
             "sophon-sail to one release", bf16_io=True),
    MicroNet("doctor_stages", "two-stage net", "the SDK does not choose a stage by the tensors' shapes; update "
             "sophon-sail (3.9.1 or later)", stages=(16, 8)),
    MicroNet("doctor_attention", "attention", "the firmware lacks tpu-mlir's fused "
             "attention kernels; update the firmware (bm_firmware) to the libsophon release"),
    MicroNet("doctor_greedy", "greedy head (ArgMax)", "the card's ArgMax returns another token than the simulator; "
             "update the firmware", quantize="f32"),
)


@dataclass
class DeviceCheck:
    name: str
    ok: bool
    line: str


def _micro_onnx(net: MicroNet, path: Path) -> list[tuple[int, ...]]:
    """Write the net's ONNX graph; return its input shapes (of the largest stage)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(sum(map(ord, net.name)))
    f32 = TensorProto.FLOAT
    weights: list = []
    if net.name == "doctor_attention":
        shape = [1, 4, 16, 32]
        nodes = [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
                 helper.make_node("MatMul", ["q", "kt"], ["s"]),
                 helper.make_node("Mul", ["s", "scale"], ["ss"]),
                 helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
                 helper.make_node("MatMul", ["p", "v"], ["y"])]
        weights = [numpy_helper.from_array(np.array(32 ** -0.5, np.float32), "scale")]
        inputs = [helper.make_tensor_value_info(n, f32, shape) for n in ("q", "k", "v")]
        outputs = [helper.make_tensor_value_info("y", f32, shape)]
        shapes = [tuple(shape)] * 3
    elif net.name == "doctor_greedy":
        nodes = [helper.make_node("ArgMax", ["logits"], ["token"], axis=-1, keepdims=1)]
        inputs = [helper.make_tensor_value_info("logits", f32, [1, 400])]
        outputs = [helper.make_tensor_value_info("token", TensorProto.INT64, [1, 1])]
        shapes = [(1, 400)]
    else:
        tokens = net.stages[0] if net.stages else 8
        axis = "tokens" if net.stages else tokens
        weights = [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) * 0.1, "w"),
                   numpy_helper.from_array(rng.standard_normal(64).astype(np.float32) * 0.1, "b")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
        inputs = [helper.make_tensor_value_info("x", f32, [1, axis, 64])]
        outputs = [helper.make_tensor_value_info("y", f32, [1, axis, 64])]
        shapes = [(1, tokens, 64)]
    model = helper.make_model(helper.make_graph(nodes, net.name, inputs, outputs, weights),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return shapes


def _micro_feeds(net: MicroNet, shapes: list[tuple[int, ...]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7 + sum(map(ord, net.name)))
    names = {"doctor_attention": ("q", "k", "v"), "doctor_greedy": ("logits",)}.get(net.name, ("x",))
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in zip(names, shapes)}


def device_cache_dir(toolchain: Toolchain) -> Path:
    import os

    root = Path(os.environ.get("LVB_DOCTOR_CACHE") or Path.home() / ".cache" / "lvb" / "doctor")
    return root / str(toolchain.tpu_mlir_version)


def build_micro_bmodel(toolchain: Toolchain, status=None) -> tuple[Path, dict]:
    """The micro-nets as one combined bmodel, built once per tpu-mlir version and reused while
    its record matches; returns (bmodel, {net: [device-time estimate per stage, ms]})."""
    import json

    from lvb.compile.tpumlir import DeployOptions, combine, deploy, transform
    from lvb.devicetime import read_profile
    from lvb.workdir import matches_record, record_file, write_json

    folder = device_cache_dir(toolchain)
    manifest_path = folder / "manifest.json"
    bmodel = folder / "doctor.bmodel"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    if (manifest.get("version") == DEVICE_CACHE_VERSION and manifest.get("nets") == [n.name for n in MICRO_NETS]
            and matches_record(bmodel, manifest.get("bmodel")) is None):
        return bmodel, manifest["estimates"]
    folder.mkdir(parents=True, exist_ok=True)
    estimates: dict[str, list[float | None]] = {}
    parts = []
    with tempfile.TemporaryDirectory(prefix="lvb-doctor-", dir=folder) as tmp:
        for net in MICRO_NETS:
            if status:
                status(f"building the micro-net {net.name} ({net.what}) with tpu-mlir, once per tpu-mlir version")
            work = Path(tmp) / net.name
            work.mkdir()
            shapes = _micro_onnx(net, work / f"{net.name}.onnx")
            log = work / "build.log"
            estimates[net.name] = []
            for stage, tokens in enumerate(net.stages or (None,)):
                stage_work = work / f"stage{stage}"
                stage_work.mkdir()
                stage_shapes = [(1, tokens, 64)] if tokens else shapes
                mlir = transform(toolchain, work / f"{net.name}.onnx", stage_work, net.name, stage_shapes, log)
                options = DeployOptions(net.quantize, group_size=64,
                                        bf16_inputs=(1,) if net.bf16_io else (), bf16_outputs=(1,) if net.bf16_io else ())
                parts.append(deploy(toolchain, mlir, stage_work, f"{net.name}.bmodel", options, log))
                estimate = read_profile(stage_work)
                estimates[net.name].append(estimate.ms if estimate else None)
        combine(toolchain, parts, bmodel, Path(tmp) / "combine.log")
    write_json(manifest_path, {"version": DEVICE_CACHE_VERSION, "nets": [n.name for n in MICRO_NETS],
                               "bmodel": record_file(bmodel), "estimates": estimates})
    return bmodel, estimates


def _cosine_or_token(net: MicroNet, got: np.ndarray, want: np.ndarray) -> tuple[bool, str]:
    from lvb.numerics import cosine

    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return False, "the card's output is garbage (NaN or Inf: what prints as \"!!!\")"
    if net.name == "doctor_greedy":
        ok = np.array_equal(got.ravel(), want.ravel())
        return ok, (f"token {int(got.ravel()[0])}" if ok else
                    f"the card picked token {int(got.ravel()[0])}, the simulator {int(want.ravel()[0])}")
    c = cosine(got, want)
    return c >= DOCTOR_MIN_COSINE, (f"cosine {c:.6f}" if c >= DOCTOR_MIN_COSINE else
                                    f"the card disagrees with the simulator (cosine {c:.6f} < {DOCTOR_MIN_COSINE:.6f})")


def _timed(engine, net: str, feeds) -> tuple[list, float]:
    import time

    outputs = engine.run(net, feeds)  # warm-up: the first launch loads the net's instructions
    best = float("inf")
    for _ in range(DEVICE_CARD_RUNS):
        start = time.perf_counter()
        engine.run(net, feeds)
        best = min(best, time.perf_counter() - start)
    return outputs, best * 1000


def _duration(ms: float) -> str:
    return f"{ms:.3f} ms" if ms >= 1 else f"{ms * 1000:.1f} µs"


def _read_first(*paths: str) -> str | None:
    for path in paths:
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text:
            return text.splitlines()[0].strip()
    return None


def libsophon_version() -> str | None:
    """The installed libsophon release, from its folder under /opt/sophon (libsophon-X.Y.Z)."""
    found = sorted(p.name.removeprefix("libsophon-") for p in Path("/opt/sophon").glob("libsophon-*")) \
        if Path("/opt/sophon").is_dir() else []
    return found[-1] if found else None


# -- device memory, per heap ---------------------------------------------------------------------
#
# sophon.sail reports one figure for a device: sail.get_dev_stat sums every heap (sophon-sail
# src/tensor.cpp:73-91 over libsophon's bm_get_stat, bmlib/src/bmlib_runtime.cpp:1333-1363) and
# has no per-heap call (src/bind.cpp:201-210 is its device-level API). Per heap the doctor reads
# what the system shows: on an SoC (an SE7) the ION heaps' debugfs summaries, on a PCIe host one
# sample of bm-smi's memory detail.

ION_ROOT = Path("/sys/kernel/debug/ion")  # sophgo/linux-arm64 drivers/soc/bitmain/ion/ion.c:736
# The carveout heaps bmlib allocates from, in the order it tries them for an any-heap mask, as
# bmruntime and sail allocate (libsophon bmlib/src/bmlib_memory.cpp:344-357, 428-440).
ION_HEAPS = ("npu", "vpp", "vpu")
# Where libsophon installs bm-smi; its profile script adds the folder to login shells' PATH only
# (libsophon bmlib/debian-lib/libsophon-bin-path.sh:1).
BM_SMI = Path("/opt/sophon/libsophon-current/bin/bm-smi")
# An ION heap's summary begins "[id] name heap size:N bytes, used:M bytes" (sophgo/linux-arm64
# drivers/soc/bitmain/ion/bitmain/bitmain_ion_debugfs.c:39-43); what follows on the line differs
# between kernel releases.
ION_SUMMARY = re.compile(r"\[(\d+)\]\s*(\w+) heap size:(\d+) bytes, used:(\d+) bytes")
# bm-smi --opmode=display_memory_detail prints a device's heaps on the third line of its block:
# used/total of heap 0, 1 and 2, then the VPU firmware's, "%4dMB/%4dMB ... %5lldMB/%5lldMB |"
# (libsophon bm-smi/src/bm_smi_display_memory_detail.cpp:723-737), in MiB (driver/bm_gmem.c:158-160);
# an SoC build prints N/A there instead (:738-744).
BM_SMI_HEAPS = re.compile(r"\|\s*" + r"\s+".join([r"(\d+)MB/\s*(\d+)MB"] * 3) + r"\s+-?\d+MB/\s*-?\d+MB\s*\|")


@dataclass(frozen=True)
class Heap:
    name: str
    total: int  # bytes
    free: int

    def __str__(self) -> str:
        from lvb.runtime.memory import format_bytes

        return f"{self.name} {format_bytes(self.free)} free of {format_bytes(self.total)}"


@dataclass(frozen=True)
class DeviceMemory:
    total: int | None  # bytes, every heap together (sail.get_dev_stat), None when the SDK has no figure
    free: int | None
    heaps: tuple[Heap, ...]
    source: str  # where the heaps were read, or why there are none

    @property
    def free_anywhere(self) -> int | None:
        """What bmruntime and sail can allocate from: every heap (heap mask 7)."""
        return self.free if self.free is not None else (sum(h.free for h in self.heaps) if self.heaps else None)

    def heap(self, name: str) -> Heap | None:
        return next((h for h in self.heaps if h.name == name), None)


def parse_ion_summary(text: str) -> Heap | None:
    found = ION_SUMMARY.search(text)
    if found is None:
        return None
    total, used = int(found[3]), int(found[4])
    return Heap(found[2], total, total - used)


def parse_bm_smi_heaps(text: str) -> tuple[Heap, ...]:
    """A card's heaps from bm-smi's memory detail; a heap the driver did not make (size 0,
    driver/bm_gmem.c:66) is left out."""
    from lvb.runtime.memory import MiB

    found = BM_SMI_HEAPS.search(text)
    if found is None:
        return ()
    mib = [int(x) for x in found.groups()]
    return tuple(Heap(f"heap{i}", mib[2 * i + 1] * MiB, (mib[2 * i + 1] - mib[2 * i]) * MiB)
                 for i in range(3) if mib[2 * i + 1])


def ion_heaps(root: Path = ION_ROOT) -> tuple[Heap, ...]:
    """The SoC's heaps from their summaries (root/bm_<name>_heap_dump/summary, made at
    bitmain_ion_debugfs.c:112-123). PermissionError where debugfs is root's; ValueError when a
    summary is not in the kernel's format."""
    heaps = []
    for name in ION_HEAPS:
        path = root / f"bm_{name}_heap_dump" / "summary"
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue  # no such heap: memory_edit.sh drops a heap it is given no room for (memory_edit.sh:691-707)
        heap = parse_ion_summary(text)
        if heap is None:
            raise ValueError(f"{path} has no \"heap size:\" line")
        heaps.append(heap)
    return tuple(heaps)


def bm_smi_heaps(device_id: int) -> tuple[Heap, ...]:
    """A PCIe card's heaps from one bm-smi memory-detail sample written to a file (--noloop,
    --file, --dev: bm-smi/src/bm_smi_cmdline.cpp:5-17); () when there is no bm-smi or it prints
    no heaps."""
    import shutil
    import subprocess

    exe = shutil.which("bm-smi") or (str(BM_SMI) if BM_SMI.is_file() else None)
    if exe is None:
        return ()
    with tempfile.TemporaryDirectory(prefix="lvb-bm-smi-") as tmp:
        sample = Path(tmp) / "bm-smi.txt"
        # bm-smi draws with ncurses on stdout and polls stdin; one sample, then it exits.
        command = [exe, "--opmode=display_memory_detail", f"--dev={device_id}", "--noloop", f"--file={sample}"]
        try:
            subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=30, check=False)
            text = sample.read_text()
        except (OSError, subprocess.TimeoutExpired):
            return ()
    return parse_bm_smi_heaps(text)


def device_heaps(device_id: int, ion_root: Path = ION_ROOT) -> tuple[tuple[Heap, ...], str]:
    """The device's heaps and where they were read, or () and why there are none."""
    try:
        heaps = ion_heaps(ion_root)
    except PermissionError:
        heaps, denied = (), True
    except (OSError, ValueError) as e:
        return (), f"per heap: {e}"
    else:
        denied = False
    if heaps:
        return heaps, f"{ion_root}/bm_*_heap_dump/summary"
    if Path("/dev/ion").exists():  # an SoC, whose bmlib opens /dev/ion (bmlib_runtime.cpp:519-523)
        return (), (f"per heap: {ion_root} is root's; `sudo lvb doctor --device {device_id}` reads the heaps" if denied
                    else f"per heap: no heap summaries under {ion_root}")
    heaps = bm_smi_heaps(device_id)
    if heaps:
        return heaps, "bm-smi --opmode=display_memory_detail"
    return (), "per heap: neither ION heap summaries nor bm-smi here"


def se7_largest() -> tuple[int, int, int]:
    """The largest -npu, -vpu and -vpp (MiB) lvb knows an SE7 takes: lvb.runtime.memory.CARDS."""
    from lvb.runtime.memory import CARDS, MiB

    video = (CARDS["SE7, NPU+VPU+VPP"] - CARDS["SE7, NPU heap"]) // (2 * MiB)
    return CARDS["SE7, NPU heap"] // MiB, video, video


def memory_edit(layout: tuple[int, int, int]) -> str:
    return "memory_edit.sh -c -npu {} -vpu {} -vpp {}".format(*layout)


def se7_layout(need: int, heaps: Mapping[str, Heap]) -> tuple[int, int, int] | None:
    """memory_edit.sh's -npu, -vpu and -vpp (MiB) for an SE7 whose heaps hold `need` bytes beside
    what is in use now: the NPU heap grown first, up to the largest an SE7 takes, then the VPU and
    VPP heaps evenly; no heap shrinks. None when the largest layout is too small."""
    from lvb.runtime.memory import MiB

    npu_max, video_max, _ = se7_largest()
    now = {name: (heaps[name].total // MiB if name in heaps else 0) for name in ("npu", "vpu", "vpp")}
    in_use = sum(h.total - h.free for h in heaps.values())
    want = -(-(need + in_use) // MiB)
    npu = max(now["npu"], min(npu_max, want - now["vpu"] - now["vpp"]))
    short = max(0, want - npu - now["vpu"] - now["vpp"])
    cap = {name: max(now[name], video_max) for name in ("vpu", "vpp")}
    # Half the shortfall each; what one heap cannot take goes to the other.
    vpu = min(cap["vpu"], now["vpu"] + -(-short // 2))
    vpp = min(cap["vpp"], now["vpp"] + short - (vpu - now["vpu"]))
    vpu = min(cap["vpu"], vpu + max(0, want - npu - vpu - vpp))
    return (npu, vpu, vpp) if npu + vpu + vpp >= want else None


def plan_check(name: str, need: int, memory: DeviceMemory) -> DeviceCheck:
    """Whether a memory plan of `need` bytes fits the device's free memory. bmruntime and sail
    allocate from any heap (heap mask 7: libsophon tpu-runtime/src/bmruntime.cpp:301-310,
    bmruntime_bmodel.cpp:2046, sophon-sail src/tensor.cpp:697-700), so a plan larger than the NPU
    heap fits while the VPU and VPP heaps hold the rest; when it does not fit, an SE7 gets the
    memory_edit.sh layout that holds it."""
    from lvb.runtime.memory import SE7_FIX, MiB, format_bytes

    free = memory.free_anywhere
    head = f"{name} needs {format_bytes(need)}"
    if free is None:
        return DeviceCheck("plan", True, f"{head}; the device's free memory is unknown ({memory.source})")
    heaps = {h.name: h for h in memory.heaps}
    npu = heaps.get("npu")
    if need <= free:
        if npu is None or need <= npu.free:
            where = f"the NPU heap has {format_bytes(npu.free)} free" if npu else f"{format_bytes(free)} free"
            return DeviceCheck("plan", True, f"{head}; {where}")
        return DeviceCheck("plan", True, f"{head}, more than the NPU heap's {format_bytes(npu.free)} free: the VPU and "
                                         f"VPP heaps hold the rest ({format_bytes(free)} free in all), which bmruntime "
                                         "and sail allocate from too; video decoding on this board shares them")
    short = f"{head}, more than the {format_bytes(free)} free"
    if npu is None and memory.heaps:  # a PCIe card's heaps are all the NPU's, sized by its driver
        return DeviceCheck("plan", False, f"{short} ({'; '.join(map(str, memory.heaps))}); likely cause: the card is "
                                          "too small for this plan: compile with a smaller --seq")
    largest = se7_largest()
    too_large = (f"more than an SE7's heaps hold ({sum(largest)} MiB with {memory_edit(largest)}); likely cause: the "
                 "plan is too large for an SE7: compile with a smaller --seq")
    if npu is None:  # heaps unknown
        return DeviceCheck("plan", False, f"{short}, and {too_large}" if need > sum(largest) * MiB else
                           f"{short}; likely cause: the heap layout: {SE7_FIX}")
    layout = se7_layout(need, heaps)
    now = "; ".join(map(str, memory.heaps))
    if layout is None:
        return DeviceCheck("plan", False, f"{short} ({now}), and {too_large}")
    return DeviceCheck("plan", False, f"{short} ({now}); likely cause: the heap layout: on this SE7, `{memory_edit(layout)}` "
                                      "holds it beside what is in use now (then copy its emmcboot.itb to /boot and reboot)")


def device_info_lines(device_id: int, ion_root: Path = ION_ROOT) -> tuple[list[DeviceCheck], DeviceMemory | None]:
    """The SDK, driver, libsophon, chip and memory; (checks, the device's memory or None)."""
    from lvb.runtime.memory import format_bytes
    from lvb.runtime.sail import device_memory, device_target, sdk_version

    checks = []
    version = sdk_version()
    if version is None:
        checks.append(DeviceCheck("sdk", False, "sophon.sail is not importable in this Python; likely cause: Sophgo's "
                                  "SDK is not installed here (pip install the sophon-sail wheel of your libsophon)"))
        return checks, None
    import sophon.sail as sail

    llm = hasattr(sail, "EngineLLM")
    checks.append(DeviceCheck("sdk", llm, f"sophon.sail {version}, EngineLLM " + (
        "yes" if llm else "missing; likely cause: a sophon-sail built without BUILD_ENGINELLM (lvb needs it to notice "
        "failed launches): install sophon-sail 3.8 or later")))
    driver = _read_first("/proc/bmsophon/driver_version", "/sys/module/bmsophon/version", "/sys/module/bm_sophon/version")
    checks.append(DeviceCheck("driver", True, f"driver {driver or 'unknown (no /proc/bmsophon/driver_version)'}, "
                              f"libsophon {libsophon_version() or 'unknown (no /opt/sophon/libsophon-*)'}"))
    chip = device_target(device_id)
    if chip is None:
        checks.append(DeviceCheck("chip", False, f"device {device_id} does not answer (sail.Handle failed); likely cause: "
                                  "no such device, or the driver is not loaded (lsmod | grep bmsophon)"))
        return checks, None
    checks.append(DeviceCheck("chip", chip.upper() == "BM1684X", f"device {device_id}: {chip}" + (
        "" if chip.upper() == "BM1684X" else "; lvb builds for the BM1684X only")))
    figures = device_memory(device_id)
    heaps, source = device_heaps(device_id, ion_root)
    memory = DeviceMemory(*(figures or (None, None)), heaps, source)
    checks.append(DeviceCheck("memory", True, (
        f"device memory {format_bytes(memory.total)}, {format_bytes(memory.free)} free (sail.get_dev_stat: every heap)"
        if figures else "device memory: this sophon.sail exposes no figure (sail.get_dev_stat)")))
    checks.append(DeviceCheck("heaps", True, f"heaps: {'; '.join(map(str, heaps))} (from {source})" if heaps else source))
    return checks, memory


def run_device_doctor(device_id: int, toolchain_arg: str | None = None, bmodel: Path | None = None,
                      status=None) -> list[DeviceCheck]:
    """One DeviceCheck per line, in order; the run stops adding checks that depend on a failed one."""
    from lvb.errors import LvbError

    checks, memory = device_info_lines(device_id)
    if not all(c.ok for c in checks):
        return checks
    try:
        toolchain = find_toolchain(toolchain_arg)
    except ToolchainError as e:
        return [*checks, DeviceCheck("toolchain", False, f"{str(e).split(';')[0]}; the micro-nets are built with "
                                                         "tpu-mlir: run `make setup`, or pass --toolchain DIR")]
    if bmodel is not None:
        from lvb.bmodel import inspect_bmodel
        from lvb.runtime.memory import plan_for_bmodel

        try:
            need = plan_for_bmodel(inspect_bmodel(Path(bmodel), toolchain)).total
        except LvbError as e:
            return [*checks, DeviceCheck("plan", False, f"{bmodel}: {e}")]
        checks.append(plan_check(Path(bmodel).name, need, memory))
        if not checks[-1].ok:
            return checks
    try:
        micro, estimates = build_micro_bmodel(toolchain, status)
    except ToolFailed as e:
        tail = e.tail(3).replace("\n", " | ")
        return [*checks, DeviceCheck("build", False, f"tpu-mlir could not build the micro-nets ({e.tool}: {tail}); "
                                                     "run `lvb doctor` without --device to check the toolchain")]
    from lvb.runtime.cmodel import CmodelEngine
    from lvb.runtime.engine import EngineError
    from lvb.runtime.sail import SailEngine

    if status:
        status(f"running {len(MICRO_NETS)} micro-nets on device {device_id} and on the simulator")
    try:
        card = SailEngine(micro, device_id)
    except EngineError as e:
        return [*checks, DeviceCheck("load", False, f"the micro-nets did not load on device {device_id}: {e}; likely "
                                                    "cause: the driver or libsophon does not match this sophon.sail")]
    with card, CmodelEngine(micro, toolchain) as simulator:
        for net in MICRO_NETS:
            info = card.nets[net.name]
            stages = [info.inputs, *info.smaller]
            for stage, inputs in enumerate(stages):
                label = f"{net.name} ({net.what}" + (f", stage {stage} of {len(stages)}" if len(stages) > 1 else "") + ")"
                feeds = _micro_feeds(net, [t.shape for t in inputs])
                try:
                    got, card_ms = _timed(card, net.name, feeds)
                except EngineError as e:
                    checks.append(DeviceCheck(net.name, False, f"{label}: the launch failed on device {device_id} ({e}); "
                                                               f"likely cause: {net.cause}"))
                    return checks
                want = simulator.run(net.name, feeds)
                ok, detail = _cosine_or_token(net, got[0], want[0])
                per_stage = estimates.get(net.name) or []
                ms = per_stage[stage] if stage < len(per_stage) else None
                timing = f"card {_duration(card_ms)}, cost model " + (_duration(ms) if ms is not None else "unknown")
                checks.append(DeviceCheck(net.name, ok, f"{label}: {detail}; {timing}" + ("" if ok else f"; likely cause: {net.cause}")))
                if not ok:
                    return checks
    return checks
