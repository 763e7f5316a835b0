"""The one table of thresholds (lvb.check) is the one the README states."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lvb.check import (INTERPRETER, MEASURED_MIN_COSINE, MEASURED_MIN_COSINE_INTERPRETER, MEASURED_MIN_COSINE_KV, MIN_AGREEMENT,
                       TORCH_VS_ONNX, min_cosine)
from lvb.contract import Kind, Names

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_bmodel_thresholds_in_the_readme_are_the_table():
    """Every kind and quantization, and the K/V outputs judged on their own: the threshold
    beside the measured minimum it comes from."""
    stated = {}
    for line in section("Checks and thresholds").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and (row := re.fullmatch(r"`(\w+)`( k, v| vs tpu-mlir)?", cells[0])):
            stated[row[1], cells[1], (row[2] or "").strip()] = (cells[2], cells[3])
    expected = {(kind.value, quant, ""): (f"{min_cosine(kind, quant):.6f}", f"{measured:.6f}")
                for (kind, quant), measured in MEASURED_MIN_COSINE.items()}
    expected |= {(kind.value, quant, "k, v"): (f"{min_cosine(kind, quant, Names.K):.6f}", f"{measured:.6f}")
                 for (kind, quant), measured in MEASURED_MIN_COSINE_KV.items()}
    expected |= {(kind.value, quant, "vs tpu-mlir"): (f"{min_cosine(kind, quant, Names.HIDDEN + INTERPRETER):.6f}",
                                                      f"{measured:.6f}")
                 for (kind, quant), measured in MEASURED_MIN_COSINE_INTERPRETER.items()}
    assert stated.pop(("greedy_head", "f32", "")) == ("exact token", "exact") and min_cosine(Kind.GREEDY_HEAD, "f32") == 1.0
    assert stated == expected
    # K and V share their row, and are judged tighter than the hidden state they come with.
    for kind, quant in MEASURED_MIN_COSINE_KV:
        assert min_cosine(kind, quant, Names.V) == min_cosine(kind, quant, Names.K) > min_cosine(kind, quant, Names.HIDDEN)


def test_torch_threshold_in_the_readme_is_the_table():
    text = section("Checks and thresholds")
    stated = float(re.search(r"must match PyTorch in onnxruntime with cosine ≥ ([0-9.]+)", text)[1])
    assert {TORCH_VS_ONNX[kind].min_cosine for kind in Kind if kind is not Kind.GREEDY_HEAD} == {stated}


def test_answer_agreement_in_the_readme_is_the_table():
    text = " ".join(section("Checks and thresholds").split())
    found = re.search(r"by at least ([0-9.]+) on onnxruntime, ([0-9.]+) for BF16, ([0-9.]+) for INT8 and ([0-9.]+) for INT4", text)
    assert dict(zip(("onnxruntime", "bf16", "int8", "int4"), map(float, found.groups()))) == MIN_AGREEMENT


def test_an_output_is_judged_on_its_own_threshold():
    """A self-attention block whose K alone is off: inside the hidden state's threshold, outside
    its own row. Every output is named where it misses."""
    from lvb.check import shortfalls, thresholds
    from lvb.contract import NetSpec, TensorInfo

    kind, quant = next(iter(MEASURED_MIN_COSINE_KV))
    hidden, k, v = (TensorInfo(name, (1, 1, 8), "float32") for name in (Names.HIDDEN, Names.K, Names.V))
    need = thresholds(NetSpec("block_cache_0", kind, 0, (hidden,), (hidden, k, v)), quant)
    between = (need[Names.HIDDEN] + need[Names.K]) / 2
    assert shortfalls({Names.HIDDEN: need[Names.HIDDEN], Names.K: need[Names.K], Names.V: 1.0}, need) == []
    assert shortfalls({Names.HIDDEN: 1.0, Names.K: between, Names.V: 1.0}, need) == [f"k cosine {between:.6f} < {need[Names.K]}"]


def test_a_w8a8_compile_judges_each_output_against_tpu_mlirs_interpreter_too():
    """At compile, a w8a8 net's outputs are judged against fp32 (the rows verify uses too) and,
    on rows of their own, against tpu-mlir's INT8 interpreter; verify asks only for the first."""
    from lvb.check import shortfalls, thresholds
    from lvb.contract import NetSpec, TensorInfo

    hidden = TensorInfo(Names.HIDDEN, (1, 8, 4), "float32")
    net = NetSpec("vision_embed", Kind.VISION_EMBED, 0, (hidden,), (hidden,))
    assert thresholds(net, "w8a8") == {Names.HIDDEN: min_cosine(Kind.VISION_EMBED, "w8a8")}
    need = thresholds(net, "w8a8", interpreter=True)
    interpreted = Names.HIDDEN + INTERPRETER
    measured = MEASURED_MIN_COSINE_INTERPRETER[Kind.VISION_EMBED, "w8a8"]
    assert need[interpreted] == round(1 - 2 * (1 - measured), 6) > need[Names.HIDDEN]
    # Inside fp32's threshold, outside the interpreter's: a miscompile the fp32 row alone lets through.
    between = (need[Names.HIDDEN] + need[interpreted]) / 2
    assert shortfalls({Names.HIDDEN: between, interpreted: between}, need) == [
        f"{interpreted} cosine {between:.6f} < {need[interpreted]}"]
    assert shortfalls({Names.HIDDEN: 1.0}, need) == [f"{interpreted} cosine nan < {need[interpreted]}"]


def test_the_table_is_what_bench_thresholds_writes(tmp_path):
    """lvb.check loads src/lvb/thresholds.json, which bench/thresholds.py --write writes from its
    measurements: the committed file is byte for byte what the bench writes from the values in
    it, a lower measurement becomes the threshold, another bench's lower column stays, and a run
    over some fixtures only lowers its column."""
    import json
    import shutil
    import sys

    from lvb.check import MEASURED_TABLE, measured_minima

    sys.path.insert(0, str(README.parent / "bench"))
    from thresholds import SOURCE, write_table

    table = tmp_path / "thresholds.json"
    shutil.copy(MEASURED_TABLE, table)
    rows = json.loads(table.read_text())["rows"]
    own = [r for r in rows if SOURCE in r["measured"]]
    nets = {}
    def own_row(r, outputs):
        return next((k["measured"][SOURCE] for k in own if k["outputs"] == outputs and (k["kind"], k["quant"]) == (r["kind"], r["quant"])), None)

    for i, r in enumerate(r for r in own if r["outputs"] == "all"):
        kv, interpreted = own_row(r, "k, v"), own_row(r, "tpu-mlir")
        nets[f"net{i}"] = {"kind": r["kind"], "quant": r["quant"], "cosine": r["measured"][SOURCE],
                           "cosines": ({} if kv is None else {"k": kv, "v": 1.0})
                           | ({} if interpreted is None else {"out" + INTERPRETER: interpreted})}
    write_table({"fixture": {"nets": {"int4": nets}}}, table)
    assert table.read_text() == MEASURED_TABLE.read_text()
    assert measured_minima("all", table) == MEASURED_MIN_COSINE and measured_minima("k, v", table) == MEASURED_MIN_COSINE_KV
    assert measured_minima("tpu-mlir", table) == MEASURED_MIN_COSINE_INTERPRETER

    # The cross K/V INT4 row: the 11B's widths set it; a fixture measured lower takes over, one
    # measured higher leaves it.
    kind, quant = Kind.CROSS_KV, "int4"
    real_widths = min(v for s, v in next(r for r in rows if (r["kind"], r["quant"], r["outputs"]) == (kind.value, quant, "all"))["measured"].items() if s != SOURCE)
    assert MEASURED_MIN_COSINE[kind, quant] == real_widths
    for measured, expected in ((real_widths - 1e-5, real_widths - 1e-5), (0.9999999, real_widths)):
        write_table({"fixture": {"nets": {quant: {"n": {"kind": kind.value, "quant": quant, "cosine": measured, "cosines": {}}}}}}, table)
        assert measured_minima("all", table)[kind, quant] == pytest.approx(expected, abs=1e-9)

    # A run over some fixtures only lowers its own column: the fixture that set a row may not have run.
    row = next(r for r in own if r["outputs"] == "all")
    for measured, expected in ((row["measured"][SOURCE] + 1e-6, row["measured"][SOURCE]),
                               (row["measured"][SOURCE] - 1e-6, row["measured"][SOURCE] - 1e-6)):
        write_table({"fixture": {"nets": {"q": {"n": {"kind": row["kind"], "quant": row["quant"], "cosine": measured,
                                                      "cosines": {}}}}}}, table, complete=False)
        written = next(r for r in json.loads(table.read_text())["rows"]
                       if (r["kind"], r["quant"], r["outputs"]) == (row["kind"], row["quant"], "all"))
        assert written["measured"][SOURCE] == pytest.approx(expected, abs=1e-9)


def test_the_readme_names_the_table_and_its_writer():
    text = " ".join(section("Checks and thresholds").split())
    assert "`src/lvb/thresholds.json`" in text and "`bench/thresholds.py --write`" in text
