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
