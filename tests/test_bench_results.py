"""The README's device-time figures are the ones bench/device_time.py recorded
(bench/results/device_time.json, committed): a figure changed in one place and not the other
fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = json.loads((ROOT / "bench" / "results" / "device_time.json").read_text())
REFERENCE = json.loads((ROOT / "bench" / "results" / "reference_layout.json").read_text())["totals"]
README = (ROOT / "README.md").read_text()
BENCH_README = (ROOT / "bench" / "README.md").read_text()


def four_tiles(label: str) -> dict:
    return RESULTS[label]["turns"][-1]


@pytest.mark.parametrize("label", ["lvb", "lvb-head-int4", "before"])
def test_readme_decode_step_and_first_token_are_the_recorded_ones(label):
    turn = four_tiles(label)
    step, tps = f"{turn['decode_step_ms']:.1f} ms", f"{turn['tokens_per_second']:.2f}"
    assert step in README and tps in README, (label, step, tps)
    assert f"{turn['decode_step_ms']:.2f}" in BENCH_README and f"{turn['first_token_ms']:,.1f}" in BENCH_README, label
    ratio = RESULTS[label]["against_reference"]["rows"][-1]
    assert f"{ratio['first_token_ratio']:.3f}" in BENCH_README and f"{ratio['decode_step_ratio']:.3f}" in BENCH_README


def test_readme_first_token_and_projection_are_the_recorded_ones():
    turn, ratio = four_tiles("lvb"), RESULTS["lvb"]["against_reference"]["rows"][-1]
    assert f"{turn['first_token_ms']:,.0f} ms" in README and f"{ratio['first_token_ratio']:.3f}×" in README
    assert f"{ratio['projected_first_token_s']:.2f} s to the first token" in README
    assert f"{ratio['projected_tokens_per_second']:.2f} tokens/s" in README
    assert f"{REFERENCE['first_token']['ms']:,.0f} ms" in README and f"{REFERENCE['decode_step']['ms']:.1f} ms" in README


def test_the_turn_is_priced_from_the_recorded_nets():
    """A step is the recorded per-kind times over the full 11B's layers: 32 self- and 8
    cross-attention decode layers, the LM head, the greedy head and the embedding (the 11B's
    published layer counts; the turn model derives them from the config)."""
    config = json.loads((ROOT / "tests" / "data" / "llama-3.2-11b-vision.config.json").read_text())["text_config"]
    cross = len(config["cross_attention_layers"])
    result = RESULTS["lvb"]
    ms = {kind: entry["stages"][0]["cycles"] / 1e6 for kind, entry in result["kinds"].items()}
    step = ((config["num_hidden_layers"] - cross) * ms["self_decode"] + cross * ms["cross_decode"] + ms["lm_head"]
            + ms["greedy_head"] + ms["embed_cache"])
    assert four_tiles("lvb")["decode_step_ms"] == pytest.approx(step)


def test_readme_host_traffic_is_the_recorded_one():
    """One decode step's host traffic at 11B shapes (bench/sail_traffic.py), the same in both
    READMEs' places: host to device apart from the token read back."""
    traffic = json.loads((ROOT / "bench" / "results" / "sail_traffic.json").read_text())
    ours, reference = traffic["lvb"], traffic["reference"]
    assert ours["d2d"] == 0 and ours["d2h"] == reference["d2h"] == 4
    row = (f"{ours['h2d']:,} bytes host→device in {ours['h2d calls']} copies and {ours['d2h']} back, no per-layer upload "
           f"(reference port: {reference['h2d']:,} and {reference['d2h']})")
    prose = (f"the card moves {ours['h2d']:,} bytes host→device in {ours['h2d calls']} copies (the token, the positions, "
             f"the causal mask), {ours['d2h']} bytes back (the token) and nothing device to device; the reference port "
             f"(`llama3.py`) moves {reference['h2d']:,} and {reference['d2h']}")
    assert row in README and prose in " ".join(README.split())
    bench = (f"| host → device | {ours['h2d']:,} B in {ours['h2d calls']} copies (token, positions, causal mask) | "
             f"{reference['h2d']:,} B in {reference['h2d calls']} ")
    assert bench in BENCH_README
