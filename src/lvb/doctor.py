"""`lvb doctor`: which environments and toolchain lvb uses, and proof that they work.

The proof is end to end: a MatMul+Add ONNX graph compiled by tpu-mlir to a
W4BF16 bm1684x bmodel, run on the simulator, compared with onnxruntime running
the same graph with the same weight quantization.
"""

from __future__ import annotations

import sys
import tempfile
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


def device_info_lines(device_id: int) -> tuple[list[DeviceCheck], int | None]:
    """The SDK, driver, libsophon, chip and memory; (checks, free bytes or None)."""
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
    memory = device_memory(device_id)
    if memory is None:
        checks.append(DeviceCheck("memory", True, "device memory: this sophon.sail exposes no figure (sail.get_dev_stat)"))
        return checks, None
    total, free = memory
    checks.append(DeviceCheck("memory", True, f"device memory {format_bytes(total)}, {format_bytes(free)} free (all heaps "
                              "bmruntime allocates from; per heap: bm-smi)"))
    return checks, free


def run_device_doctor(device_id: int, toolchain_arg: str | None = None, bmodel: Path | None = None,
                      status=None) -> list[DeviceCheck]:
    """One DeviceCheck per line, in order; the run stops adding checks that depend on a failed one."""
    from lvb.errors import LvbError
    from lvb.runtime.memory import SE7_FIX, format_bytes

    checks, free = device_info_lines(device_id)
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
        fits = free is None or need <= free
        checks.append(DeviceCheck("plan", fits, f"{Path(bmodel).name} needs {format_bytes(need)}" + (
            "" if fits else f", more than the {format_bytes(free)} free; likely cause: the heap layout: {SE7_FIX}")))
        if not fits:
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
