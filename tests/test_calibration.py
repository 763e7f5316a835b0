"""--vision-quant w8a8 before tpu-mlir: who may ask for it, what the deploy is told, the tables
lvb hands tpu-mlir, and the calibration set's cache. The compile itself, calibration to answers,
runs in test_pipeline (the toy's INT8 run)."""

import json

import numpy as np
import pytest

from lvb.compile import calibration
from lvb.compile.compiler import CompileSettings
from lvb.compile.tpumlir import DeployOptions
from lvb.contract import ChoiceError, Kind, Names, TensorInfo, device_dtype
from lvb.dtypes import BF16
from lvb.workdir import WorkDir


@pytest.mark.parametrize("option", ["quant", "embed_quant", "head_quant"])
def test_w8a8_is_for_the_vision_tower_only(option):
    with pytest.raises(ChoiceError, match=f"^--{option.replace('_', '-')} w8a8 is for --vision-quant only"):
        CompileSettings(**{"quant": "int4", option: "w8a8"})
    settings = CompileSettings(quant="int4", vision_quant="w8a8")
    assert settings.tag() == "int4_g64_vision-w8a8" and not settings.vision_quant.grouped


def test_the_deploy_gets_its_tables_and_bf16_only_where_it_leaves_the_tower():
    hidden = TensorInfo(Names.HIDDEN, (1, 8, 4), "float32")
    states = TensorInfo(Names.CROSS_STATES, (1, 8, 4), "float32")
    # INT8 nets hand each other float32; the cross-attention states leave the tower as bf16.
    assert device_dtype(Kind.VISION_LAYER, hidden, "w8a8") == "float32"
    assert device_dtype(Kind.VISION_LAYER, hidden, "bf16") == device_dtype(Kind.VISION_HEAD, states, "w8a8") == BF16
    options = DeployOptions("w8a8", bf16_outputs=(1,), calibration="key")
    args = options.args(("cali", "qtable"))
    assert args[:2] == ["--quantize", "INT8"] and "--q_group_size" not in args
    assert args[args.index("--calibration_table") + 1] == "cali" and args[args.index("--quantize_table") + 1] == "qtable"
    assert "--quant_output_bf16" in args and "--quant_output_list" not in args
    with pytest.raises(ValueError, match="tables"):
        options.args()


def _measured(path, rows: dict[str, float]):
    path.write_text("# mlir version: x\n# op_name    threshold    min    max\n"
                    + "".join(f"{name} {value:.7f} {-value:.7f} {value:.7f}\n" for name, value in rows.items()))
    return path


def test_a_bf16_concat_passes_on_its_int8_inputs_range_not_the_masks(toy_export, tmp_path):
    """tpu-mlir gives a Concat's inputs the Concat's threshold: the keys' Concat, which holds the
    padding channel (the mask's large value), must carry the keys' range, or the INT8 key
    projection rounds every key to zero (seen: cosine 0.49 for a toy vision layer)."""
    import onnx

    onnx_path = WorkDir(toy_export).net_dir("vision_layer_0") / "vision_layer_0.onnx"
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    named = {f"{out}_{n.op_type}": n for n in graph.node for out in n.output[:1] if n.op_type != "Constant"}
    core = calibration.bf16_ops(onnx_path)
    assert core and all(name in named for name in core)
    assert not [n for n in core if any(p in n for p in calibration.PROJECTIONS)]  # the projections are INT8
    assert {named[n].op_type for n in core} >= {"MatMul", "Softmax", "Concat"}
    # Every op gets a threshold of its own: the core's a huge one, as the mask channel gives it, the
    # padding flag's (made outside the layer) 1, the layer's others their own.
    rows = {name: 40000.0 if name in core else 3.0 + i / 100 if name.startswith("/layer/") else 1.0
            for i, name in enumerate(named)}
    table, qtable = tmp_path / "table", tmp_path / "qtable"
    calibration.write_tables(onnx_path, _measured(tmp_path / "measured", rows), table, qtable)
    written = {line.split()[0]: float(line.split()[1]) for line in table.read_text().splitlines() if not line.startswith("#")}
    assert set(written) == set(rows)
    assert [line.split() for line in qtable.read_text().splitlines()] == [[name, "BF16"] for name in core]
    producer = {out: n for n in graph.node for out in n.output}

    def projection(tensor):  # the q/k projection whose values `tensor` holds, through reshapes
        node = producer[tensor]
        while node.op_type == "Reshape":
            node = producer[node.input[0]]
        return f"{node.output[0]}_MatMul" if "_proj/" in node.name else None

    concats = {n: projection(named[n].input[0]) for n in core if named[n].op_type == "Concat"}
    assert sorted(p.split("/")[-2] for p in concats.values() if p) == ["k_proj", "q_proj"]  # the keys' too
    for name, source in concats.items():  # the head groups' Concat (the tests split the attention) keeps its own
        assert written[name] == (rows[source] if source else rows[name]), name
    assert {n: written[n] for n in written if n not in concats} == {n: rows[n] for n in written if n not in concats}


def test_the_calibration_set_is_each_vision_nets_inputs_and_is_reused_only_whole(toy_export, tmp_path):
    directory = WorkDir(toy_export)
    export = directory.read_export()
    pictures = calibration.photos()[:2]
    folder = tmp_path / "set"
    calibration.ensure_set(folder, export["model"]["dir"], export, directory.onnx, pictures)
    nets = calibration.vision_nets(export)
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(nets)
    for net in nets:
        inputs = [t["name"] for t in export["nets"][net]["inputs"]]
        for i in range(len(pictures)):
            with np.load(folder / net / f"{i}.npz") as saved:
                assert sorted(saved.files) == sorted(inputs), net
    # Each picture gives a net other inputs.
    with np.load(folder / nets[1] / "0.npz") as one, np.load(folder / nets[1] / "1.npz") as other:
        assert not np.array_equal(one[Names.HIDDEN], other[Names.HIDDEN])
    damaged = folder / nets[0] / "0.npz"
    made = damaged.stat().st_mtime_ns
    calibration.ensure_set(folder, export["model"]["dir"], export, directory.onnx, pictures)
    assert damaged.stat().st_mtime_ns == made  # whole: reused
    damaged.write_bytes(b"not an archive")
    calibration.ensure_set(folder, export["model"]["dir"], export, directory.onnx, pictures)
    with np.load(damaged) as again:
        assert again.files  # damaged: made again
    assert json.loads((folder / calibration.RECORD).read_text())["files"]
    # Another picture, another set.
    assert calibration.set_key(export, pictures) != calibration.set_key(export, calibration.photos()[1:3])


def test_the_calibration_loads_only_the_nets_it_runs(toy_export, tmp_path):
    """It runs the vision tower (and the cross K/V after it) on onnxruntime: the decoder blocks and
    the head, most of an 11B export's bytes, are never loaded; a decoder block that cannot be
    loaded at all does not stop it."""
    import shutil

    work = tmp_path / "work"
    shutil.copytree(WorkDir(toy_export).export, work / "export")
    directory = WorkDir(work)
    export = directory.read_export()
    for name, entry in export["nets"].items():
        if name not in calibration.vision_nets(export) and not name.startswith("cross_kv"):
            directory.onnx(entry).write_bytes(b"not a graph")
    folder = tmp_path / "set"
    calibration.ensure_set(folder, export["model"]["dir"], export, directory.onnx, calibration.photos()[:1])
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == sorted(calibration.vision_nets(export))


def test_calibration_images_are_a_folder_of_pictures_each_one_readable(toy_export, tmp_path):
    """--calibration-images: the pictures of a folder, by name; every way it can be wrong is one
    line naming the folder or file, before a calibration set is trusted."""
    from PIL import Image

    with pytest.raises(calibration.CalibrationError, match="is not a folder; give a folder of pictures"):
        calibration.pictures(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("not a picture")
    with pytest.raises(calibration.CalibrationError, match="holds no pictures .*drop the option"):
        calibration.pictures(tmp_path)
    for name, size in (("b.PNG", (40, 30)), ("a.jpg", (30, 40))):
        Image.new("RGB", size, (200, 100, 50)).save(tmp_path / name, format="PNG" if name.endswith("PNG") else "JPEG")
    assert [p.name for p in calibration.pictures(tmp_path)] == ["a.jpg", "b.PNG"]
    assert calibration.pictures(None) == calibration.photos() and len(calibration.photos()) == len(calibration.PHOTOS)
    directory = WorkDir(toy_export)
    export = directory.read_export()
    (tmp_path / "c.png").write_bytes(b"\x89PNG but cut short")
    folder = tmp_path / "set"
    with pytest.raises(calibration.CalibrationError, match=r"c\.png is not a picture PIL can read"):
        calibration.ensure_set(folder, export["model"]["dir"], export, directory.onnx, calibration.pictures(tmp_path))
    assert not list(tmp_path.glob("*set*"))  # nothing a later compile would trust, no scratch left
    # The pictures' bytes are the set's key: a picture changed in place is another set.
    (tmp_path / "c.png").unlink()
    before = calibration.set_key(export, calibration.pictures(tmp_path))
    Image.new("RGB", (30, 40), (0, 100, 50)).save(tmp_path / "a.jpg", format="JPEG")
    assert calibration.set_key(export, calibration.pictures(tmp_path)) != before


def test_calibration_images_are_for_w8a8_only():
    with pytest.raises(ChoiceError, match="^--calibration-images is for --vision-quant w8a8 .*add --vision-quant w8a8"):
        CompileSettings(quant="int4", calibration_images="pictures")
    assert CompileSettings(quant="int4", vision_quant="w8a8", calibration_images="pictures").calibration_images


@pytest.mark.toolchain
def test_a_cluster_without_a_shared_dir_is_refused_before_the_calibration(toy_export, tmp_path):
    """The nodes read the calibration set from the work directory: through the object store they
    would not find it, so the compile stops in one line before making it."""
    import shutil

    from lvb.compile.build import CompileError
    from lvb.compile.cluster import ClusterSettings
    from lvb.compile.compiler import Compiler
    from lvb.toolchain import find_toolchain

    shutil.copytree(WorkDir(toy_export).export, tmp_path / "export")
    compiler = Compiler(tmp_path, CompileSettings(quant="int4", vision_quant="w8a8"), find_toolchain())
    with pytest.raises(CompileError, match="^--vision-quant w8a8 on a cluster needs --cluster-shared-dir"):
        compiler.run(cluster=ClusterSettings("auto"))
    assert not (tmp_path / "compile" / "calibration").exists()


def test_calibration_tuning_is_for_w8a8_only():
    with pytest.raises(ChoiceError, match="^--no-calibration-tuning is for --vision-quant w8a8 .*add --vision-quant w8a8"):
        CompileSettings(quant="int4", calibration_tuning=False)
    settings = CompileSettings(quant="int4", vision_quant="w8a8", calibration_tuning=False)
    assert not settings.calibration_tuning


@pytest.mark.toolchain
def test_a_net_calibrated_untuned_that_fails_its_check_names_the_option(toy_export, tmp_path, monkeypatch):
    """A w8a8 net whose untuned calibration misses its thresholds (here thresholds no net meets: the
    table is not what is tested) fails in one line that names --no-calibration-tuning as the fix."""
    import shutil

    import lvb.compile.compiler as compiler_module
    from lvb.compile.compiler import Compiler, NetFailed
    from lvb.toolchain import find_toolchain

    shutil.copytree(WorkDir(toy_export).export, tmp_path / "export")
    real = compiler_module.thresholds
    monkeypatch.setattr(compiler_module, "thresholds", lambda *a, **k: {o: 1.0 for o in real(*a, **k)})
    compiler = Compiler(tmp_path, CompileSettings(quant="int4", vision_quant="w8a8", calibration_tuning=False),
                        find_toolchain())
    with pytest.raises(NetFailed, match=r"^vision_post: the simulator disagrees .*; its calibration was not tuned: "
                                        r"drop --no-calibration-tuning"):
        compiler.compile_net("vision_post")


@pytest.mark.toolchain
def test_lvbs_calibration_writes_the_table_tpu_mlirs_tool_writes(toy_export, tmp_path):
    """lvb.compile.calibrate_tool runs run_calibration.py with its throwaway interpreters freed and
    its statistics taken one tensor at a time: for memory only, so the table is the tool's own,
    line for line but the timestamp; with tuning off (--no-calibration-tuning) too, and that table
    is another."""
    import shutil

    from lvb.compile.build import Attempt, mlir_files, stage_mlir
    from lvb.compile.compiler import Compiler
    from lvb.compile.tpumlir import calibrate
    from lvb.toolchain import find_toolchain

    shutil.copytree(WorkDir(toy_export).export, tmp_path / "export")
    toolchain = find_toolchain()
    compiler = Compiler(tmp_path, CompileSettings(quant="int4", vision_quant="w8a8"), toolchain)
    job = next(j for j in compiler.jobs if j.kind is Kind.VISION_LAYER)
    export = compiler.export
    calibration.ensure_set(job.calibration.parent, export["model"]["dir"], export, compiler.dir.onnx,
                           calibration.photos()[:2])
    tables = {}
    for tool, tune in (("tpu-mlir", True), ("lvb", True), ("tpu-mlir", False), ("lvb", False)):
        folder = tmp_path / f"{tool}-{tune}"
        folder.mkdir()
        attempt = Attempt(job=job, options=job.options, net_folder=compiler.dir.compile_net(job.name), folder=folder,
                          log=folder / "log", check=False, thresholds={}, bmodel="")
        mlir = stage_mlir(attempt, job.net, toolchain, None, [])
        with mlir_files(mlir, folder):
            if tool == "lvb":
                table = calibrate(toolchain, mlir, folder, job.calibration, 2, "table", folder / "log", tune)
            else:
                toolchain.run([str(toolchain.tool("run_calibration.py")), mlir.name, "--dataset", str(job.calibration),
                               "--input_num", "2", "-o", "table", *(() if tune else ("--tune_num", "0"))],
                              folder, folder / "log")
                table = folder / "table"
        tables[tool, tune] = [line for line in table.read_text().splitlines() if not line.startswith("# genetated time")]
    assert "lvb.compile.calibrate_tool" in (tmp_path / "lvb-True" / "log").read_text()
    for tune in (True, False):
        assert len(tables["lvb", tune]) > 20 and tables["lvb", tune] == tables["tpu-mlir", tune]
    assert tables["lvb", False] != tables["lvb", True]
