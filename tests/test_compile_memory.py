"""What a compile job is planned to need, without compiling: the README's figures for the
cluster's memory requests are the kinds' measured peaks (lvb.contract), and `--jobs`' default
is bounded by the cores and by the memory free now."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lvb.compile.compiler import default_jobs
from lvb.contract import TOOL_BASE_BYTES, Kind

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_the_readme_memory_requests_are_the_measured_peaks():
    """A net at the widths its kind was measured at asks for the measured peak: an 11B decoder
    layer (and a staged one, which still needs the ONNX simplifier), a vision layer, a tool with
    nothing to convert; the README states each, in GB to one decimal."""
    text = " ".join(README.split())
    found = re.search(r"net's weight bytes: ([0-9.]+) GB for an 11B decoder layer \(([0-9.]+) GB for a staged one, .*?\), "
                      r"([0-9.]+) GB for a vision layer, ([0-9.]+) GB for a tool with nothing to convert", text)
    assert found, "the README's Memory paragraph moved"
    decoder, vision = Kind.SELF_DECODE.policy.peak, Kind.VISION_LAYER.policy.peak
    expected = (decoder.need(int(decoder.weight_bytes)), Kind.SELF_PREFILL.policy.peak.need(int(decoder.weight_bytes), simplified=True),
                vision.need(int(vision.weight_bytes)), Kind.GREEDY_HEAD.policy.peak.need(0))
    assert tuple(float(v) for v in found.groups()) == tuple(round(e / 1e9, 1) for e in expected)
    assert Kind.GREEDY_HEAD.policy.peak.need(0) == int(TOOL_BASE_BYTES)
    # Scaled by the weight bytes: twice a layer's weights, more than its peak, less than twice.
    assert decoder.need(int(decoder.weight_bytes)) < decoder.need(int(2 * decoder.weight_bytes)) < 2 * decoder.rss


def test_the_default_jobs_are_bounded_by_cores_and_free_memory():
    cores = os.cpu_count() or 1
    assert default_jobs(1) == cores  # a job that needs nothing: one per core
    assert default_jobs(1 << 50) == 1  # more than the machine holds: still one, never none
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    # Needing a little over half of what is free now: one job fits, two do not (memory moves a little
    # between the two reads; a third of the margin each way).
    assert default_jobs(int(available * 0.6)) == 1 <= cores
    if cores >= 2:
        assert default_jobs(int(available * 0.3)) >= 2
