"""`lvb verify`: the report, the thresholds, every miss listed."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from helpers import record_as_exported, scale_weights
from lvb.cli import app

runner = CliRunner()


@pytest.mark.slow  # every net through PyTorch again, and transformers' generate
def test_onnxruntime_verify_passes_and_writes_reports(export_factory, checkpoint_factory):
    model, work = checkpoint_factory("gqa4-cross-pair"), export_factory("gqa4-cross-pair")
    args = ["verify", "--model", str(model), "--work", str(work), "--backend", "onnxruntime"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((work / "verify" / "onnxruntime" / "report.json").read_text())
    assert report["ok"] and report["agreement"] == 1.0
    assert [p["net"] for p in report["parts"]] == list(json.loads((work / "export" / "manifest.json").read_text())["nets"])
    html = (work / "verify" / "onnxruntime" / "report.html").read_text()
    assert "<svg" in html and "block_cache_4" in html and "http" not in html.replace("http://www.w3.org/2000/svg", "")
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "cached" in again.output
    # A damaged report (what a kill mid-write used to leave) is not trusted: verified again.
    path = work / "verify" / "onnxruntime" / "report.json"
    path.write_text(path.read_text()[:100])
    third = runner.invoke(app, args)
    assert third.exit_code == 0 and "cached" not in third.output and json.loads(path.read_text())["ok"]


@pytest.mark.slow  # every net through PyTorch again, and transformers' generate
def test_every_miss_is_listed(export_factory, checkpoint_factory, tmp_path):
    """A wrong net: its own check fails and so do the answers; both are reported, exit 1."""
    model = checkpoint_factory("gqa2-cross-last")
    work = tmp_path / "work"
    shutil.copytree(export_factory("gqa2-cross-last") / "export", work / "export")
    scale_weights(work / "export" / "block_cache_0" / "block_cache_0.onnx")
    record_as_exported(work, "block_cache_0")  # a damaged file is refused before any check: test_hostile
    result = runner.invoke(app, ["verify", "--model", str(model), "--work", str(work), "--backend", "onnxruntime"])
    assert result.exit_code == 1
    assert "block_cache_0: PyTorch vs onnxruntime cosine" in result.output
    assert "token agreement with transformers" in result.output
    report = json.loads((work / "verify" / "onnxruntime" / "report.json").read_text())
    assert len(report["misses"]) >= 2 and not report["ok"]


def test_verify_without_a_compile_names_the_fix(export_factory, checkpoint_factory, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(export_factory("gqa2-cross-last") / "export", work / "export")
    result = runner.invoke(app, ["verify", "--model", str(checkpoint_factory("gqa2-cross-last")), "--work", str(work)])
    assert result.exit_code == 1 and "holds no int4 bmodel; run `lvb compile" in result.output


@pytest.mark.slow  # exports a checkpoint of its own at a short --seq
def test_prompts_longer_than_the_sequence_are_listed_as_misses(checkpoint_factory, tmp_path):
    """At --seq 40 the pictures' one-turn prompts (26 tokens) fit; the text-only prompt (its
    system block makes it 92) and the second turn of the two-turn chat do not."""
    from lvb.export.exporter import export

    model = checkpoint_factory("mha-cross-first")
    export(model, tmp_path, seq=40, chunks=8)
    result = runner.invoke(app, ["verify", "--model", str(model), "--work", str(tmp_path), "--backend", "onnxruntime"])
    assert result.exit_code == 1
    report = json.loads((tmp_path / "verify" / "onnxruntime" / "report.json").read_text())
    unchecked = [m for m in report["misses"] if "was not checked" in m]
    assert len(unchecked) == 2 and "'text only'" in unchecked[0] and "'two turns, turn 2'" in unchecked[1]
    assert all("tokens and the model holds 40" in m for m in unchecked)
    assert [a["name"] for a in report["answers"] if a["agreement"] is not None] == ["photo", "synthetic", "two turns, turn 1"]


def test_a_w8a8_net_is_held_to_the_interpreters_outputs_the_compile_kept(tmp_path):
    """On any backend (the card has no tpu-mlir), a w8a8 net's outputs against what tpu-mlir's
    interpreter gave the compile on the same inputs, on the interpreter's rows: a small error the
    fp32 row lets through is a miss, and so is a kept file changed since the compile."""
    import numpy as np

    from lvb.check import INTERPRETED, INTERPRETER, min_cosine, save_interpreted
    from lvb.contract import Kind, Names, NetSpec, TensorInfo
    from lvb.verify.checks import PartResult, _against_interpreter
    from lvb.workdir import WorkDir, record_file

    hidden = TensorInfo(Names.HIDDEN, (1, 64, 8), "float32")
    net = NetSpec("vision_embed", Kind.VISION_EMBED, 0, (hidden,), (hidden,))
    folder = tmp_path / "compile" / "vision_embed" / "attempt"
    folder.mkdir(parents=True)
    interpreted = np.random.default_rng(0).standard_normal((1, 64, 8)).astype(np.float32)
    save_interpreted(folder / INTERPRETED, net, [interpreted])
    compiled = {"quant": "w8a8", "bmodel": "compile/vision_embed/attempt/vision_embed.bmodel",
                "interpreted": record_file(folder / INTERPRETED)}
    directory = WorkDir(tmp_path)

    def misses(got):
        result = PartResult(net.name, net.kind.value, 0, "w8a8", 1.0)
        return result, _against_interpreter(result, directory, compiled, net, [got])

    result, missed = misses(interpreted)
    assert missed == [] and result.bmodel_vs_interpreter == pytest.approx(1.0)
    off = interpreted + 0.01 * np.random.default_rng(1).standard_normal(interpreted.shape).astype(np.float32)
    result, missed = misses(off)
    assert min_cosine(net.kind, "w8a8") < result.bmodel_vs_interpreter < min_cosine(net.kind, "w8a8", "x" + INTERPRETER)
    assert len(missed) == 1 and missed[0].startswith("vision_embed: bmodel vs tpu-mlir's interpreter (w8a8) hidden_states vs tpu-mlir cosine")
    save_interpreted(folder / INTERPRETED, net, [off])
    _, missed = misses(off)
    assert len(missed) == 1 and str(folder / INTERPRETED) in missed[0] and "lvb compile" in missed[0]
    assert misses(off)[1] == missed and not _against_interpreter(PartResult(net.name, net.kind.value, 0, "w8a8", 1.0),
                                                                 directory, {"quant": "w8a8", "bmodel": ""}, net, [off])


def test_the_interpreter_column_shows_where_a_net_has_the_reference(tmp_path, capsys):
    """verify's tables: "bmodel vs tpu-mlir" beside the other hops when a w8a8 net was held to the
    interpreter (in report.html always, blank elsewhere); a build without one keeps its old table."""
    from lvb.cli import output
    from lvb.verify.checks import PartResult, Report
    from lvb.verify.report import write_reports

    part = PartResult("vision_embed", "vision_embed", None, "w8a8", 1.0, 0.995, 0.995, bmodel_vs_interpreter=0.9999871)
    report = Report("toy", "cmodel", "toy.bmodel", "int4", parts=[part, PartResult("embed", "embed", None, "bf16", 1.0, 0.99)],
                    agreement=1.0, min_agreement=0.7)
    data = write_reports(report, tmp_path) | {"directory": str(tmp_path)}
    assert "<th>bmodel vs tpu-mlir</th>" in (tmp_path / "report.html").read_text()
    assert "<td>0.999987</td>" in (tmp_path / "report.html").read_text()
    with output.console.capture() as seen:
        output.print_verify_report(data)
    assert "tpu-mlir" in seen.get() and "0.999987" in seen.get()
    for p in data["parts"]:
        p["bmodel_vs_interpreter"] = None
    with output.console.capture() as seen:
        output.print_verify_report(data)
    assert "tpu-mlir" not in seen.get()
