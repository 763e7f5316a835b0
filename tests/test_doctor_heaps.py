"""`lvb doctor --device N`'s memory per heap and its SE7 heap-layout advice, without the
toolchain: the ION heap summaries and bm-smi's memory detail are parsed from texts taken from
their sources (each sample says where it comes from), the SDK figure comes from the stand-in
sophon.sail, and a plan that does not fit gets the memory_edit.sh sizes that hold it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lvb.doctor import (DeviceMemory, Heap, device_heaps, device_info_lines, ion_heaps, memory_edit,
                        parse_bm_smi_heaps, parse_ion_summary, plan_check, se7_largest, se7_layout)
from lvb.runtime.memory import SE7_FIX, MiB

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "src" / "lvb" / "testing" / "sail_standin"

# The kernel's own format: sophgo/linux-arm64 (v25.03.01) drivers/soc/bitmain/ion/bitmain/
# bitmain_ion_debugfs.c:31-56, filled in for the SE7's shipped NPU heap (the reg size of
# arch/arm64/boot/dts/bitmain/bm1684x_mm_16g.dtsi:43) holding one buffer.
NPU_TOTAL, NPU_BUFFER = 0xF6E00000, 0x10000000
KERNEL_SUMMARY = (
    "Summary:\n"
    + "[%d] %s heap size:%lu bytes, used:%lu bytes\t".replace("%lu", "%d") % (0, "npu", NPU_TOTAL, NPU_BUFFER)
    + "usage rate:%d%%, memory usage peak %lld bytes\n".replace("%lld", "%d") % (7, NPU_BUFFER)
    + "\nDetails:\n%16s %16s %16s %16s\n" % ("heap_id", "alloc_buf_size", "phy_addr", "kmap_cnt")
    + "%16d %16d %16x %16d\n" % (0, NPU_BUFFER, 0x124100000, 0)
    + "\n"
)
# sophgo/sophon-demo docs/FAQ.md:121-123 (its trailing "#" remark left out): a newline between
# "bytes" and "usage rate" in this kernel release.
FAQ_SUMMARY = "Summary:\n[1] vpp heap size:4294967296 bytes, used:144646144 bytes\n" \
              "usage rate:4%, memory usage peak 144646144 bytes\n"
# Sophgo's SE7 user guide, "Query Memory Usage" (查询内存用量): `cat .../summary | head -2` of
# each heap of a fresh SE7, spaces where the kernel prints a tab.
SE7_GUIDE = {
    "npu": "Summary:\n[0] npu heap size:4141875200 bytes, used:0 bytes        usage rate:0%, memory usage peak 0 bytes\n",
    "vpu": "Summary:\n[2] vpu heap size:2147483648 bytes, used:0 bytes        usage rate:0%, memory usage peak 0 bytes\n",
    "vpp": "Summary:\n[1] vpp heap size:3221225472 bytes, used:0 bytes        usage rate:0%, memory usage peak 0 bytes\n",
}
SE7_GUIDE_BYTES = {"npu": 4141875200, "vpu": 2147483648, "vpp": 3221225472}


def _bm_smi_block(heaps_mib: list[tuple[int, int]], vpu_fw_mib: tuple[int, int]) -> str:
    """One PCIe card's `bm-smi --opmode=display_memory_detail --dev=0 --noloop --file=F` sample,
    built from libsophon bm-smi/src/bm_smi_display_memory_detail.cpp's format strings: the header
    (:167-224) and one device's four lines (:514-780: a board of one chip, chip_mode 0)."""
    rule = "+" + "-" * 100 + "+\n"
    header = ["Mon Jun  2 10:00:00 2025\n", rule,
              "| Lib Version:%9s             Driver Version:  %1d.%1d.%1d" % ("0.5.1", 0, 5, 1) + " " * 41 + "|\n",
              "+---------------------------------------+----------------------------------------------------------+\n",
              "|card  Name      Mode        SN         |TPU  boardT  chipT   TPU_P  TPU_V  ECC  CorrectN  Tpu-Util|\n",
              "|12V_ATX  MaxP boardP Minclk Maxclk  Fan|Bus-ID      Status   Currclk   TPU_C   Memory-Usage       |\n",
              "|                                       |     Heap0         Heap1        Heap2     Vpu-Fw-Memory-Usage|\n",
              "|=======================================+==========================================================|\n"]
    used, total = sum(u for u, _ in heaps_mib), sum(t for _, t in heaps_mib)
    device = [
        "|%2s  %-10s %5s %17s |%2d   %4s    %4s   %5s   %5s  %3s    %3s       %5s |\n"
        % ("0", "SC7-HP75", "PCIE", "HQDZKM6BJACJH0085", 0, "41C", "45C", "3W", "750mV", "OFF", "N/A", "0%"),
        "|%6s %5s  %4s  %4s  %7s %5s|%11s%7s %7s   %7s%5dMB/%5dMB       |\n"
        % ("N/A", "75W", "20W", "25M", "1000M", "N/A", "000:01:00.0", "Active", "1000M", " 1.2A", used, total),
        "|                                       |%4dMB/%4dMB %4dMB/%4dMB %4dMB/%4dMB %5dMB/%5dMB |\n"
        % (*(x for pair in heaps_mib for x in pair), *vpu_fw_mib),
        "+=======================================+==========================================================+\n",
    ]
    return "".join(header + device)


def test_each_kernel_release_of_the_ion_summary_is_read():
    heap = parse_ion_summary(KERNEL_SUMMARY)
    assert heap == Heap("npu", NPU_TOTAL, NPU_TOTAL - NPU_BUFFER)
    heap = parse_ion_summary(FAQ_SUMMARY)
    assert heap == Heap("vpp", 4294967296, 4294967296 - 144646144)
    for name, text in SE7_GUIDE.items():
        assert parse_ion_summary(text) == Heap(name, SE7_GUIDE_BYTES[name], SE7_GUIDE_BYTES[name])  # nothing used
    assert parse_ion_summary("Summary:\nheap_id alloc_buf_size\n") is None


def _ion_root(tmp_path: Path, texts: dict[str, str]) -> Path:
    """An ION debugfs as the kernel lays it out: one bm_<name>_heap_dump folder per heap with its
    summary (bitmain_ion_debugfs.c:112-123)."""
    for name, text in texts.items():
        (tmp_path / f"bm_{name}_heap_dump").mkdir()
        (tmp_path / f"bm_{name}_heap_dump" / "summary").write_text(text)
    return tmp_path


def test_the_ion_heaps_are_read_in_bmlibs_order_and_a_missing_one_is_left_out(tmp_path):
    root = _ion_root(tmp_path, SE7_GUIDE)
    assert [h.name for h in ion_heaps(root)] == ["npu", "vpp", "vpu"]  # bmlib_memory.cpp:344-357
    heaps, source = device_heaps(0, root)
    assert heaps == ion_heaps(root) and str(root) in source
    (root / "bm_vpu_heap_dump" / "summary").unlink()
    assert [h.name for h in ion_heaps(root)] == ["npu", "vpp"]
    (root / "bm_vpp_heap_dump" / "summary").write_text("Summary:\n")
    with pytest.raises(ValueError, match="bm_vpp_heap_dump/summary"):
        ion_heaps(root)
    heaps, source = device_heaps(0, root)
    assert heaps == () and "bm_vpp_heap_dump/summary" in source
    assert ion_heaps(tmp_path / "no-debugfs") == ()


def test_bm_smi_memory_detail_gives_a_pcie_cards_heaps():
    text = _bm_smi_block([(100, 4029), (0, 3072), (512, 3920)], (0, 1024))
    heaps = parse_bm_smi_heaps(text)
    assert heaps == (Heap("heap0", 4029 * MiB, 3929 * MiB), Heap("heap1", 3072 * MiB, 3072 * MiB),
                     Heap("heap2", 3920 * MiB, 3408 * MiB))
    # A heap the driver did not make (size 0, driver/bm_gmem.c:66) is no heap.
    assert [h.name for h in parse_bm_smi_heaps(_bm_smi_block([(0, 4029), (0, 0), (0, 0)], (0, 0)))] == ["heap0"]
    # An SoC build prints N/A in place of the figures (bm_smi_display_memory_detail.cpp:738-744).
    soc = "|                                       |       N/A          N/A           N/A           N/A       |\n"
    assert parse_bm_smi_heaps(soc) == ()


def _se7(used: dict[str, int] | None = None, sizes: dict[str, int] = SE7_GUIDE_BYTES) -> DeviceMemory:
    heaps = tuple(Heap(n, sizes[n], sizes[n] - (used or {}).get(n, 0)) for n in ("npu", "vpp", "vpu"))
    return DeviceMemory(sum(h.total for h in heaps), sum(h.free for h in heaps), heaps, "test")


def test_the_layout_grows_the_npu_heap_first_and_never_shrinks_one():
    npu_max, vpu_max, vpp_max = se7_largest()
    assert memory_edit(se7_largest()) in SE7_FIX  # the layout lvb already advises, from lvb.runtime.memory
    memory = _se7()
    heaps = {h.name: h for h in memory.heaps}
    now = {n: SE7_GUIDE_BYTES[n] // MiB for n in heaps}
    for need_mib in (sum(now.values()) + 1, npu_max + now["vpu"] + now["vpp"], npu_max + now["vpu"] + now["vpp"] + 1,
                     npu_max + vpu_max + vpp_max):
        npu, vpu, vpp = se7_layout(need_mib * MiB, heaps)
        assert npu + vpu + vpp >= need_mib, need_mib
        assert npu <= npu_max and npu >= now["npu"] and vpu >= now["vpu"] and vpp >= now["vpp"]
        if (vpu, vpp) != (now["vpu"], now["vpp"]):
            assert npu == npu_max  # the video heaps grow only once the NPU heap is as large as it gets
        else:
            assert npu + vpu + vpp == need_mib  # no more than the plan asks
    # The largest layout, with a heap already larger than lvb would make it kept as it is.
    largest_here = npu_max + max(vpu_max, now["vpu"]) + max(vpp_max, now["vpp"])
    assert sum(se7_layout(largest_here * MiB, heaps)) == largest_here
    assert se7_layout((largest_here + 1) * MiB, heaps) is None
    # What other processes hold now stays held: it is added to the plan.
    busy = {h.name: h for h in _se7(used={"vpp": 200 * MiB}).heaps}
    need = (sum(now.values()) + 1) * MiB
    assert sum(se7_layout(need, busy)) == sum(se7_layout(need, heaps)) + 200


def test_a_plan_is_checked_against_every_heap_and_refused_with_the_layout_that_holds_it():
    memory = _se7(used={"npu": 100 * MiB})
    npu = memory.heap("npu")
    fits = plan_check("m.bmodel", npu.free, memory)
    assert fits.ok and "NPU heap" in fits.line
    beyond_npu = plan_check("m.bmodel", npu.free + 1, memory)  # the VPU and VPP heaps hold the rest
    assert beyond_npu.ok and "VPU and VPP heaps" in beyond_npu.line
    refused = plan_check("m.bmodel", memory.free + 1, memory)
    assert not refused.ok and "likely cause: the heap layout" in refused.line
    assert f"`{memory_edit(se7_layout(memory.free + 1, {h.name: h for h in memory.heaps}))}`" in refused.line
    largest_here = sum(max(a, h.total // MiB) for a, h in zip(se7_largest(), map(memory.heap, ("npu", "vpu", "vpp"))))
    too_large = plan_check("m.bmodel", (largest_here + 1) * MiB, memory)
    assert not too_large.ok and "too large for an SE7" in too_large.line and "smaller --seq" in too_large.line
    # Heaps unknown (debugfs is root's): the largest layout, as the runtime's preflight advises.
    unknown = DeviceMemory(memory.total, memory.free, (), "per heap: unknown")
    line = plan_check("m.bmodel", memory.free + 1, unknown).line
    assert SE7_FIX in line
    # A PCIe card's heaps are all the NPU's: no memory_edit.sh there.
    card = DeviceMemory(None, None, parse_bm_smi_heaps(_bm_smi_block([(0, 4029), (0, 3072), (0, 3920)], (0, 0))), "bm-smi")
    refused = plan_check("m.bmodel", card.free_anywhere + 1, card)
    assert not refused.ok and "memory_edit" not in refused.line and "heap0" in refused.line
    assert plan_check("m.bmodel", 1, DeviceMemory(None, None, (), "per heap: unknown")).ok  # nothing to check against


@pytest.fixture
def standin(monkeypatch):
    """The stand-in as `sophon.sail` with as much memory as the SE7 guide's three heaps, as
    bm_get_stat sums them on an SoC (bmlib_runtime.cpp:1341-1350)."""
    monkeypatch.setenv("LVB_SAIL_STANDIN_MEMORY_MB", str(sum(SE7_GUIDE_BYTES.values()) // MiB))
    sys.path.insert(0, str(STANDIN))
    import sophon.sail as module

    yield module
    sys.path.remove(str(STANDIN))
    for name in [n for n in sys.modules if n == "sophon" or n.startswith("sophon.")]:
        del sys.modules[name]


def test_the_doctor_reports_the_sdk_figure_and_each_heap(standin, tmp_path):
    root = _ion_root(tmp_path, SE7_GUIDE)
    checks, memory = device_info_lines(0, root)
    lines = {c.name: c.line for c in checks}
    assert all(c.ok for c in checks), lines
    total_mib = standin.get_dev_stat(0)[0]
    assert memory.total == total_mib * MiB and "sail.get_dev_stat" in lines["memory"]
    assert [h.name for h in memory.heaps] == ["npu", "vpp", "vpu"] and str(root) in lines["heaps"]
    assert lines["heaps"].index("npu") < lines["heaps"].index("vpp") < lines["heaps"].index("vpu")
    # No heap summaries and no bm-smi here: the line says so, the check still passes.
    checks, memory = device_info_lines(0, tmp_path / "no-debugfs")
    assert memory.heaps == () and [c.line for c in checks if c.name == "heaps"] == [memory.source]


def test_a_device_that_is_not_there_does_not_answer(standin):
    """The stand-in has one chip; the SDK refuses another id (sophon-sail tensor.cpp:77-81, 350-356)."""
    from lvb.runtime.sail import device_memory, device_target

    assert device_target(1) is None and device_memory(1) is None
    with pytest.raises(standin.SailDeviceError):
        standin.get_dev_stat(1)
    checks, memory = device_info_lines(1)
    assert memory is None and not checks[-1].ok and "device 1 does not answer" in checks[-1].line
