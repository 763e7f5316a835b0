"""`--vision-quant w8a8`: the vision nets in tpu-mlir's INT8 with activations quantized too, at
thresholds measured on real pictures (run_calibration.py), the attention core kept in bf16.

The calibration set is every vision net's inputs as the tower computes them for each picture:
the exported ONNX nets, run by onnxruntime through the runtime's own vision sequence
(Runner.encode_image), so each net sees what its predecessor gives it. It lives under
compile/calibration/<key>/, keyed by the vision nets' export keys and the pictures, and is reused
only while its recorded files are the ones on disk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from lvb.contract import Kind, QuantGroup
from lvb.errors import CompileError
from lvb.workdir import cache_key, damaged_files, read_manifest, record_file, scratch, sha256_of, write_json

CALIBRATION_VERSION = 1
RECORD = "files.json"
# scikit-image's colour photographs: real scenes, shipped with a dependency, the same everywhere.
PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
          "ihc.png", "retina.jpg")
# What --calibration-images takes from its folder (PIL reads them all).
PICTURE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# The vision attention's core (scores, their softmax, the padding channel of lvb.patches.padding_channel)
# stays bf16: the padding channel holds the mask's large value, which no INT8 scale shared with the
# keys survives; the projections around it are INT8. ONNX node names, as the exporter traces them.
ATTENTION_SCOPE = "/layer/self_attn/"
PROJECTIONS = ("q_proj/", "k_proj/", "v_proj/", "o_proj/")
# Ops that only move values: a threshold passes through them unchanged (tpu-mlir shares it).
_MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Cast", "Slice", "Split"})


class CalibrationError(CompileError):
    pass


def vision_nets(export: dict) -> list[str]:
    """The nets --vision-quant sets, in the export's order."""
    return [name for name, entry in export["nets"].items() if Kind(entry["kind"]).policy.quant is QuantGroup.VISION]


def photos() -> list[Path]:
    import skimage.data

    folder = Path(skimage.data.__file__).parent
    return [folder / name for name in PHOTOS if (folder / name).is_file()]


def pictures(folder: Path | str | None) -> list[Path]:
    """What a w8a8 tower is calibrated on: the pictures in `folder` (--calibration-images, by name),
    or scikit-image's photographs."""
    if folder is None:
        return photos()
    folder = Path(folder)
    if not folder.is_dir():
        raise CalibrationError(f"--calibration-images {folder} is not a folder; give a folder of pictures "
                               f"({', '.join(PICTURE_SUFFIXES)})")
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in PICTURE_SUFFIXES)
    if not found:
        raise CalibrationError(f"--calibration-images {folder} holds no pictures ({', '.join(PICTURE_SUFFIXES)}); "
                               "add some, or drop the option to calibrate on scikit-image's photos")
    return found


def set_key(export: dict, pictures: Sequence[Path]) -> str:
    """What a calibration set is made from: the vision nets' exports and the pictures' bytes."""
    return cache_key(CALIBRATION_VERSION, [(n, export["nets"][n]["key"]) for n in vision_nets(export)],
                     [sha256_of(p) for p in pictures])


def ensure_set(folder: Path, model_dir: Path, export: dict, onnx: Callable[[dict], Path], pictures: Sequence[Path],
               progress: Callable[[int, int], None] | None = None) -> Path:
    """The calibration set in `folder` (made when absent or damaged): <net>/<i>.npz per picture."""
    record = read_manifest(folder / RECORD, CALIBRATION_VERSION)
    if record and not damaged_files(folder, record.get("files")):
        return folder
    if not pictures:
        raise CalibrationError("--vision-quant w8a8 needs pictures to calibrate on, and scikit-image's photos are "
                               "missing: reinstall scikit-image")
    tmp = scratch(folder)
    try:
        with _vision_inputs(model_dir, export, onnx) as inputs_of:
            for index, picture in enumerate(pictures):
                if progress:
                    progress(index, len(pictures))
                for net, inputs in inputs_of(picture):
                    (tmp / net).mkdir(exist_ok=True)
                    np.savez(tmp / net / f"{index}.npz", **inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    files = {str(p.relative_to(tmp)): record_file(p) for p in sorted(tmp.rglob("*.npz"))}
    write_json(tmp / RECORD, {"version": CALIBRATION_VERSION, "files": files})
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


@contextmanager
def _vision_inputs(model_dir: Path, export: dict, onnx: Callable[[dict], Path]) -> Iterator[Callable]:
    """picture -> [(vision net, what it was fed)], by the runtime over the exported nets on onnxruntime."""
    from PIL import Image

    from lvb.contract import NetSpec
    from lvb.runtime.image import preprocess
    from lvb.runtime.onnx import OnnxEngine
    from lvb.runtime.pipeline import Checkpoint
    from lvb.runtime.runner import Runner

    checkpoint = Checkpoint.load(model_dir)
    wanted = set(vision_nets(export))
    fed: list[tuple[str, dict[str, np.ndarray]]] = []
    engine = OnnxEngine({n: onnx(e) for n, e in export["nets"].items()},
                        specs={n: NetSpec.from_json(e) for n, e in export["nets"].items()},
                        record=lambda net, inputs: net in wanted and fed.append((net, inputs)))
    with engine:
        runner = Runner(checkpoint.spec, engine, checkpoint.tokenizer.image_id, checkpoint.tokenizer.pad_id or 0)

        def inputs_of(picture: Path) -> list[tuple[str, dict[str, np.ndarray]]]:
            try:
                image = Image.open(picture).convert("RGB")
            except OSError as e:  # PIL's "cannot identify image file" too
                raise CalibrationError(f"{picture} is not a picture PIL can read ({e.__class__.__name__}); remove it "
                                       "from the calibration folder") from None
            fed.clear()
            runner.encode_image(preprocess(image, checkpoint.image_config))
            return list(fed)

        yield inputs_of


def bf16_ops(onnx_path: Path) -> dict:
    """The vision attention's core, by the names tpu-mlir gives its ops (output name + "_" + op
    type), each with its ONNX node: the ops a w8a8 deploy keeps in bf16."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return {op_name(node): node for node in graph.node
            if node.op_type != "Constant" and node.name.startswith(ATTENTION_SCOPE)
            and not any(node.name.startswith(ATTENTION_SCOPE + p) for p in PROJECTIONS)}


def op_name(node) -> str:
    """The name tpu-mlir gives an ONNX node's op in its tables: its output, "_", its type."""
    return f"{node.output[0]}_{node.op_type}"


def write_tables(onnx_path: Path, measured: Path, table: Path, qtable: Path) -> None:
    """The quantize table (the core in bf16) and the calibration table as tpu-mlir must read it.

    tpu-mlir gives a Concat's inputs the Concat's threshold even when the Concat runs in bf16, so
    the keys' projection would take the padding channel's (the mask's) range and lose every key
    value to rounding. A bf16 Concat's threshold is therefore the largest of its INT8-computed
    inputs' (followed through ops that only move values); a bf16 op uses none itself."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    core = bf16_ops(onnx_path)
    rows = _read_table(measured)

    def int8_source(tensor: str):
        """The INT8-computed op whose values `tensor` carries, or None (a bf16 op, an input)."""
        node = producer.get(tensor)
        while node is not None and node.op_type in _MOVES:
            node = producer.get(node.input[0])
        return None if node is None or op_name(node) in core else node

    for name, node in core.items():
        if node.op_type != "Concat" or name not in rows:
            continue
        sources = [s for tensor in node.input if (s := int8_source(tensor)) is not None and op_name(s) in rows]
        if sources:
            rows[name] = max(rows[op_name(s)] for s in sources)
    lines = []
    for line in measured.read_text().splitlines():
        fields = line.split()
        if line.startswith("#") or not fields or fields[0] not in rows:
            lines.append(line)
        else:
            lines.append(" ".join([fields[0], f"{rows[fields[0]]:.7f}", *fields[2:]]))
    table.write_text("\n".join(lines) + "\n")
    qtable.write_text("".join(f"{name} BF16\n" for name in core if name in rows))


def _read_table(path: Path) -> dict[str, float]:
    """run_calibration.py's table: op name -> threshold (its first two columns)."""
    rows = {}
    for line in path.read_text().splitlines():
        fields = line.split()
        if len(fields) >= 2 and not line.startswith("#"):
            try:
                rows[fields[0]] = float(fields[1])
            except ValueError:
                raise CalibrationError(f"{path}: unreadable threshold in {fields[0]!r}; delete the folder and compile "
                                       "again") from None
    return rows
