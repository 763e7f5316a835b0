"""One ONNX net to one bmodel with tpu-mlir's model_transform.py and model_deploy.py."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lvb.contract import Quant, is_calibrated, is_grouped
from lvb.toolchain import Toolchain, ToolServer

# --quantize values of model_deploy.py, by lvb's names (f32: the nets always kept in float32).
QUANTIZE = {Quant.INT4: "W4BF16", Quant.INT8: "W8BF16", Quant.BF16: "BF16", Quant.W8A8: "INT8", "f32": "F32"}
# INT4/INT8 weights share one scale and zero point per this many inputs.
DEFAULT_GROUP_SIZE = 64


# model_transform.py without its ONNX simplifier, which holds several bytes of memory per weight
# byte (bench/README.md, transform_memory.py: more than this machine has for an 11B vocabulary
# table) and which a net of one stage does not need: its graph is static, and the exporter
# folds what the converter needs folded (lvb.export.exporter._prepare_for_tpu_mlir).
TRANSFORM_OPTIONS = ("--do_onnx_sim", "")


@dataclass(frozen=True)
class DeployOptions:
    quantize: str  # a key of QUANTIZE
    chip: str = "bm1684x"
    group_size: int = DEFAULT_GROUP_SIZE  # only for int4 / int8
    # Extra model_deploy.py flags, e.g. ("--disable_layer_group",) where the
    # default layer grouping miscompiles a net on this chip.
    extra: tuple[str, ...] = ()
    # 1-based positions of the inputs and outputs the bmodel takes and gives as bf16, without
    # the cast to float32 at its edge (NetSpec.bf16_io). Both flags are needed: a list alone
    # is ignored, the flag alone strips every input's or output's cast.
    bf16_inputs: tuple[int, ...] = ()
    bf16_outputs: tuple[int, ...] = ()
    # w8a8: the key of the calibration set its tables are measured on (lvb.compile.calibration),
    # so that a deploy on other pictures or another export is another cache entry.
    calibration: str = ""
    # w8a8: whether that calibration tunes its thresholds (--no-calibration-tuning).
    calibration_tuning: bool = True

    def args(self, tables: tuple[Path, Path] | None = None) -> list[str]:
        """`tables`: a w8a8 deploy's calibration and quantize tables."""
        args = ["--quantize", QUANTIZE[self.quantize], "--chip", self.chip]
        calibrated = is_calibrated(self.quantize)
        if is_grouped(self.quantize):
            args += ["--q_group_size", str(self.group_size)]
        if calibrated:
            if tables is None:
                raise ValueError("a w8a8 deploy needs its calibration and quantize tables")
            args += ["--calibration_table", str(tables[0]), "--quantize_table", str(tables[1])]
        if self.bf16_inputs:
            args += ["--quant_input", "--quant_input_list", ",".join(map(str, self.bf16_inputs))]
        if self.bf16_outputs:
            # An INT8 net's stripped output would be INT8: it is cast to bf16 instead (all its outputs).
            args += ["--quant_output_bf16"] if calibrated else ["--quant_output", "--quant_output_list",
                                                                   ",".join(map(str, self.bf16_outputs))]
        return args + list(self.extra)


def shapes_arg(shapes: list[tuple[int, ...]]) -> str:
    return "[" + ",".join("[" + ",".join(str(d) for d in s) + "]" for s in shapes) + "]"


def transform(toolchain: Toolchain, onnx_path: Path, work: Path, name: str, input_shapes, log: Path,
              server: ToolServer | None = None, extra: tuple[str, ...] = ()) -> Path:
    """ONNX -> top-level MLIR (quantization-independent, so cached apart from deploy)."""
    mlir = work / f"{name}.mlir"
    args = ["--model_name", name, "--model_def", str(onnx_path.resolve()), "--input_shapes", shapes_arg(input_shapes),
            "--mlir", mlir.name, *extra]
    toolchain.python_tool("model_transform.py", args, work, log, server)
    return mlir


# What a deploy with `interpret` writes for model_deploy.py: the inputs, and a reference of nothing.
INTERPRETER_INPUTS, NOTHING = "interpreter_inputs.npz", "nothing.npz"


def deploy(toolchain: Toolchain, mlir: Path, work: Path, bmodel_name: str, options: DeployOptions, log: Path,
           server: ToolServer | None = None, tables: tuple[Path, Path] | None = None,
           interpret: Mapping[str, np.ndarray] | None = None) -> Path:
    """Top-level MLIR -> bmodel for one quantization (w8a8: with its calibration and quantize tables).
    `interpret`: inputs tpu-mlir's interpreter runs the quantized MLIR on (interpreted_outputs)."""
    bmodel = work / bmodel_name
    args = ["--mlir", mlir.name, "--model", bmodel.name, *options.args(tables)]
    if interpret is not None:
        np.savez(work / INTERPRETER_INPUTS, **interpret)
        # model_deploy compares its interpreter with --test_reference before building and with the
        # bmodel after; lvb compares itself, so the reference holds none of the net's tensors and
        # the bmodel run is skipped (lvb's check runs it). --cache_skip keeps the outputs' file.
        np.savez(work / NOTHING, lvb_nothing=np.zeros(1, np.float32))
        args += ["--test_input", INTERPRETER_INPUTS, "--test_reference", NOTHING, "--skip_validation", "--cache_skip"]
    toolchain.python_tool("model_deploy.py", args, work, log, server)
    return bmodel


def interpreted_outputs(work: Path, names: list[str]) -> list[np.ndarray]:
    """The interpreter's outputs of a deploy with `interpret`, in the order of the bmodel's output
    `names`: the quantized MLIR's names, less the suffix of a cast added after it
    (--quant_output_bf16's "_bf16")."""
    with np.load(next(work.glob("*_tpu_outputs.npz"))) as interpreted:
        return [interpreted[max((k for k in interpreted.files if name.startswith(k)), key=len)] for name in names]


# run_calibration.py with less memory and the same tables; it takes the tool's arguments.
CALIBRATE_TOOL = "lvb.compile.calibrate_tool"


def calibration_args(mlir: Path, dataset: Path, count: int, table_name: str, tune: bool = True) -> list[str]:
    """run_calibration.py's arguments: each tensor's threshold over the `count` input files in `dataset`,
    into `table_name`. `tune` False skips the threshold tuning (--tune_num 0), its most memory-hungry step."""
    return [mlir.name, "--dataset", str(dataset.resolve()), "--input_num", str(count), "-o", table_name,
            *(() if tune else ("--tune_num", "0"))]


def calibrate(toolchain: Toolchain, mlir: Path, work: Path, dataset: Path, count: int, table_name: str, log: Path,
              tune: bool = True) -> Path:
    """run_calibration.py in `work` (which holds the MLIR's files), through CALIBRATE_TOOL, as
    calibration_args says."""
    toolchain.lvb_tool(CALIBRATE_TOOL, calibration_args(mlir, dataset, count, table_name, tune), work, log)
    return work / table_name


def combine(toolchain: Toolchain, bmodels: list[Path], out: Path, log: Path) -> Path:
    """Join nets into one bmodel; nets with identical weights share them."""
    toolchain.run(
        [str(toolchain.tool("model_tool")), "--combine", *map(str, bmodels), "-o", str(out)],
        cwd=out.parent,
        log=log,
    )
    return out
