"""The one table of thresholds (lvb.check) is the one the README states."""

from __future__ import annotations

import re
from pathlib import Path

from lvb.check import MIN_AGREEMENT, ONNX_VS_BMODEL, TORCH_VS_ONNX
from lvb.contract import Kind

README = Path(__file__).resolve().parent.parent / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def table(text: str) -> dict[str, list[str]]:
    """First column -> the other cells, for every body row of the section's table."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in text.splitlines() if line.startswith("|")]
    return {row[0]: row[1:] for row in rows[2:]}  # past the header and its rule


def test_bmodel_thresholds_in_the_readme_are_the_table():
    rows = table(section("Checks and thresholds"))
    stated = {}
    for label, cells in rows.items():
        quant = label.split()[0].lower()
        if quant == "greedy":
            assert cells[0] == "exact token" and TORCH_VS_ONNX[Kind.GREEDY_HEAD].min_cosine == 1.0
        else:
            stated[quant] = float(cells[0])
    assert stated == {quant: threshold for quant, threshold in ONNX_VS_BMODEL.items() if quant != "f32"}


def test_torch_threshold_in_the_readme_is_the_table():
    text = section("Checks and thresholds")
    stated = float(re.search(r"must match PyTorch in onnxruntime with cosine ≥ ([0-9.]+)", text)[1])
    assert {TORCH_VS_ONNX[kind].min_cosine for kind in Kind if kind is not Kind.GREEDY_HEAD} == {stated}


def test_answer_agreement_in_the_readme_is_the_table():
    text = " ".join(section("Checks and thresholds").split())
    found = re.search(r"by at least ([0-9.]+) on onnxruntime, ([0-9.]+) for BF16, ([0-9.]+) for INT8 and ([0-9.]+) for INT4", text)
    assert dict(zip(("onnxruntime", "bf16", "int8", "int4"), map(float, found.groups()))) == MIN_AGREEMENT
