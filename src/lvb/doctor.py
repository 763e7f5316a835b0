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
