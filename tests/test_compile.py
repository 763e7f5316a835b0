"""`lvb compile` with the real tpu-mlir and the real simulator."""

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import SEQ, bmodel_digest, chunks_of, manifest, one_error_line, record_as_exported
from lvb.cli import app
from lvb.check import shortfalls, thresholds
from lvb.bmodel import inspect_bmodel
from lvb.devicetime import Estimate, compile_record, from_manifest
from lvb.runtime.turn import turn_times
from lvb.spec import ModelSpec
from lvb.compile.build import record_transform
from lvb.compile.compiler import CompileSettings, Compiler
from lvb.contract import CheckMode, Kind, NetSpec
from lvb.testing.checkpoints import GEOMETRIES
from lvb.toolchain import Toolchain, find_toolchain

runner = CliRunner()
pytestmark = pytest.mark.toolchain  # every test here runs tpu-mlir or its simulator


# How much closer (in 1 - cosine) every quantized net is to the quantized reference than to fp32.
# Measured over every INT4/INT8 net of the three fixtures (this test's compiles, the ratio of
# each net's cosine_fp32 and cosine deficits): INT4 179 - 1,486, so half the minimum; INT8
# 1.06 - 4.05 (a decode layer, where bf16 arithmetic dominates, is the least), where half the
# minimum would be below 1, so no looser than "closer than fp32".
CLOSER = {"int4": 89.0, "int8": 1.0}


@pytest.mark.parametrize("quant", ["int4", "int8"])
@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_every_net_compiles_and_matches_onnxruntime_on_the_simulator(name, quant, compile_factory, export_factory):
    bmodel = compile_factory(name, quant)
    work = export_factory(name)
    assert bmodel.name == f"{name}_{quant}_g64_seq{SEQ}_chunk{'-'.join(map(str, sorted(chunks_of(name))))}_bm1684x.bmodel"
    exported = json.loads((work / "export" / "manifest.json").read_text())["nets"]
    compiled = manifest(bmodel)["nets"]
    assert list(compiled) == list(exported)
    for net, result in compiled.items():
        check = result["check"]
        assert result["passed"] and not shortfalls(check["cosines"], thresholds(NetSpec.from_json(exported[net]), result["quant"])), net
        if result["quant"] in ("int4", "int8"):  # the quantization-aware reference fits: far closer than fp32
            assert 1 - check["cosine_fp32"] > CLOSER[result["quant"]] * (1 - check["cosine"]), (net, check)
        decoder = net.startswith(("block_", "cross_kv_"))
        assert result["quant"] == (quant if decoder else ("f32" if net == "greedy_head" else "bf16"))
    info = inspect_bmodel(bmodel, find_toolchain())
    assert list(info.nets) == list(exported)
    for net, result in compiled.items():  # the cost model's estimate, one per stage
        stages = [Estimate.from_json(e) for e in result["device"]]
        assert len(stages) == len(NetSpec.from_json(exported[net]).stages), net
        for estimate in stages:
            # The timeline is at least as long as either engine is busy, and every net moves data.
            assert estimate.cycles >= max(estimate.tiu_cycles, estimate.gdma_cycles) > 0, (net, estimate)
            assert estimate.moved_bytes > 0, (net, estimate)
            if Kind(exported[net]["kind"]) in (Kind.SELF_PREFILL, Kind.SELF_DECODE):
                # The self-attention is in a form tpu-mlir fuses into flash attention
                # (patches.token_major_self_attention): no cache transpose, concat-and-copy.
                assert "FAttention" in estimate.ops, (net, estimate.ops)
    # Every net's activation memory is read, a multi-stage prefill net's too (the memory plan
    # would silently count none otherwise).
    assert all(net.neuron_bytes > 0 for net in info.nets.values()), {n: x.neuron_bytes for n, x in info.nets.items()}
    for net, entry in exported.items():
        assert [(t.name, list(t.shape)) for t in info.nets[net].inputs] == [(t["name"], t["shape"]) for t in entry["inputs"]]
        # Each tensor in the dtype the contract gives the device (the state bf16, the rest as
        # exported), but where the compile recorded that tpu-mlir kept another (found on
        # gqa4-cross-pair: the float32 cast of a vision-head input it unsqueezes first).
        device = NetSpec.from_json(entry).on_device()
        kept = compiled[net]["dtype_exceptions"]
        for got, want in zip(info.nets[net].inputs, device.inputs):
            assert got.dtype == kept.get(want.name, want.dtype), (net, got, want)
        for got, want in zip(info.nets[net].outputs, device.outputs):
            assert got.dtype == kept.get(want.name, want.dtype), (net, got, want)
        assert not kept or Kind(entry["kind"]) is Kind.VISION_HEAD, (net, kept)  # none but that one, so far
    block = next(net for net in exported if net.startswith("block_cache_") and Kind(exported[net]["kind"]) is Kind.SELF_DECODE)
    declared = {t.name: t.dtype for t in info.nets[block].inputs}
    assert declared["past_k"] == declared["past_v"] == "bfloat16" and declared["position_ids"] == "int32"
    assert [t.dtype for t in info.nets[block].outputs] == ["bfloat16"] * 3


def test_check_kinds_checks_the_first_net_of_each_kind_and_trusts_its_siblings(compile_factory, export_factory, tmp_path):
    compile_factory("gqa2-cross-last", "int4")  # the checked first nets come from its cache
    work = tmp_path / "work"
    shutil.copytree(export_factory("gqa2-cross-last"), work)
    compiled = Compiler(work, CompileSettings(quant="int4", check="kinds"), find_toolchain()).run()
    exported = json.loads((work / "export" / "manifest.json").read_text())["nets"]
    first: dict[str, str] = {}
    for net, entry in exported.items():
        first.setdefault(entry["kind"], net)
    assert len(first) < len(exported)  # some kinds have siblings
    for net, result in compiled["nets"].items():
        checked_on = first[exported[net]["kind"]]
        if net == checked_on:
            assert not shortfalls(result["check"]["cosines"], result["thresholds"]) and "checked_by" not in result, net
            # what the check cost, for bench/real_widths.py: the simulator's run is part of the whole check
            assert 0 < result["check"]["simulator_seconds"] <= result["check"]["seconds"], net
        else:
            assert result["check"] is None and result["checked_by"] == checked_on, net
            assert result["options"] == compiled["nets"][checked_on]["options"], net
    assert compiled["settings"]["check"] == CheckMode.KINDS


# The quantizations the other tests do not compile, in one compile (a second, each group at the
# other width, would add about a minute of CI): BF16 decoder blocks, INT4 vision nets and LM head,
# an INT8 embedding, at group size 32 (the fixtures' vision width is 32).
# Each of the vision, embedding and head groups at both weight quantizations, over the two compiles.
OTHER_QUANTS = [{"quant": "bf16", "vision_quant": "int4", "embed_quant": "int8", "head_quant": "int4"},
                {"quant": "bf16", "vision_quant": "int8", "embed_quant": "int4", "head_quant": "int8"}]


@pytest.mark.parametrize("quants", OTHER_QUANTS, ids=lambda q: "-".join(f"{k.split('_')[0]}-{v}" for k, v in q.items()))
def test_bf16_and_the_vision_embed_and_head_quantizations_compile_and_pass(quants, export_factory, tmp_path):
    """--quant bf16 and --vision-quant / --embed-quant / --head-quant compile, each net at its
    group's quantization and checked on the simulator against its reference; a kind with no
    measured row at its quantization (here the vision nets, the embedding and the LM head) is
    held to that quantization's loosest threshold."""
    from lvb.check import MEASURED_MIN_COSINE
    from lvb.contract import QuantGroup

    name = "gqa2-cross-last"
    work = tmp_path / "work"
    shutil.copytree(export_factory(name) / "export", work / "export")
    exported = json.loads((work / "export" / "manifest.json").read_text())["nets"]
    options = [a for key, value in quants.items() for a in (f"--{key.replace('_', '-')}", value)]
    result = runner.invoke(app, ["compile", "--work", str(work), "--group-size", "32", *options])
    assert result.exit_code == 0, result.output
    (bmodel,) = work.glob(f"{name}_{CompileSettings(**quants, group_size=32).tag()}_seq*.bmodel")
    compiled = manifest(bmodel)["nets"]
    assert list(compiled) == list(exported)
    unmeasured = set()
    for net, entry in compiled.items():
        kind = Kind(exported[net]["kind"])
        group = kind.policy.quant
        assert entry["quant"] == ("f32" if group is QuantGroup.F32 else quants[group.value]), net
        assert entry["passed"] and entry["check"] is not None, net
        assert not shortfalls(entry["check"]["cosines"], thresholds(NetSpec.from_json(exported[net]), entry["quant"])), net
        if entry["quant"] in ("int4", "int8") and (kind, entry["quant"]) not in MEASURED_MIN_COSINE:
            loosest = min(v for (_, q), v in MEASURED_MIN_COSINE.items() if q == entry["quant"])
            assert set(entry["thresholds"].values()) == {round(1 - 2 * (1 - loosest), 6)}, net
            unmeasured.add(kind)
    assert {Kind.VISION_LAYER, Kind.EMBED, Kind.LM_HEAD} <= unmeasured


def test_vision_attention_scores_stay_in_local_memory(compile_factory, checkpoint_factory):
    """The vision attention with the padding as a query/key channel (patches.padding_channel) is
    not tpu-mlir's flash attention (its head dim is one more than the values'), but each head
    group's softmax (one head each in the session's exports) runs inside a layer group and no
    command stores a [tokens, tokens] tensor: the scores never go to device memory, where they
    would cost their bytes in time and memory (bench/README.md §1.1, §3.1)."""
    import re

    from lvb.contract import padded_patches
    from lvb.spec import ModelSpec

    name = "gqa2-cross-last"
    bmodel = compile_factory(name, "int4")
    vision = ModelSpec.from_dir(checkpoint_factory(name)).vision
    tokens = vision.max_num_tiles * padded_patches(vision.patches_per_tile)
    for net in ("vision_layer_0", "vision_global_0"):
        folder = (bmodel.parent / manifest(bmodel)["nets"][net]["bmodel"]).parent
        (final,) = folder.glob(f"{net}_*_final.mlir")
        softmaxes = [line for line in final.read_text().splitlines() if '"tpu.Softmax"' in line]
        assert len(softmaxes) == vision.num_heads and all("ginfo" in line for line in softmaxes), net
        stored = re.findall(r'"tpu\.Store"\(.*?: \(tensor<([0-9x]+)x[a-z]', final.read_text())
        assert stored and not [s for s in stored if s.endswith(f"x{tokens}x{tokens}")], (net, stored)


def test_changing_quant_recompiles_only_the_blocks(compile_factory, export_factory):
    int4 = manifest(compile_factory("gqa2-cross-last", "int4"))["nets"]
    int8 = manifest(compile_factory("gqa2-cross-last", "int8"))["nets"]
    for net in int4:
        same = int4[net]["bmodel"] == int8[net]["bmodel"]
        assert same != net.startswith(("block_", "cross_kv_")), net


def test_nothing_changed_means_no_tool_runs(compile_factory, export_factory, monkeypatch):
    compile_factory("mha-cross-first", "int4")

    def no_tools(*args, **kwargs):
        raise AssertionError("a tool ran although nothing changed")

    monkeypatch.setattr(Toolchain, "python_tool", no_tools)
    monkeypatch.setattr(Toolchain, "run", no_tools)
    result = runner.invoke(app, ["compile", "--work", str(export_factory("mha-cross-first")), "--quant", "int4"])
    assert result.exit_code == 0, result.output


# Compiles in a pool of two and SIGKILLs its whole process group (tool servers included)
# from the progress callback, right after the N-th net's result: no wall-clock race.
KILL_AFTER = """
import os, signal, sys
from pathlib import Path
from lvb.compile.compiler import CompileSettings, Compiler
from lvb.toolchain import find_toolchain

def progress(done, total, running):
    if done == int(sys.argv[1]):
        os.killpg(0, signal.SIGKILL)

Compiler(Path("work"), CompileSettings(quant="int4"), find_toolchain()).run(jobs=2, progress=progress)
"""


def test_killed_halfway_resumes_to_the_same_result(export_factory, compile_factory, tmp_path):
    """Starts from the finished compile with the decoder nets' int4 results removed (the rest
    stays cached), is killed with four nets to go, and resumes to the same bytes."""
    name = "mha-cross-first"
    clean = compile_factory(name, "int4")
    work = tmp_path / "work"
    shutil.copytree(export_factory(name) / "export", work / "export")
    shutil.copytree(export_factory(name) / "compile", work / "compile")
    for manifest_file in (work / "compile").glob("*.json"):  # the combined bmodels' manifests
        manifest_file.unlink()
    removed = [done.parent for done in (work / "compile").glob("*/*/result.json")
               if json.loads(done.read_text())["quant"] == "int4"]
    for folder in removed:
        shutil.rmtree(folder)
    nets = len(json.loads((work / "export" / "manifest.json").read_text())["nets"])
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER, str(nets - 4)], cwd=tmp_path, capture_output=True,
                            start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    redone = [d for d in (work / "compile").glob("*/*/result.json") if json.loads(d.read_text())["quant"] == "int4"]
    assert 3 <= len(redone) < len(removed) and not list(work.glob("*.bmodel"))
    # A relative --work, as in ci/pipeline.sh: the tool server's children change directory.
    command = [sys.executable, "-m", "lvb.cli", "compile", "--work", "work", "--quant", "int4", "--jobs", "2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    resumed = work / clean.name
    assert bmodel_digest(resumed) == bmodel_digest(clean)


def test_bad_input(export_factory, tmp_path):
    work = str(export_factory("gqa2-cross-last"))
    assert "holds no export" in one_error_line(["compile", "--work", str(tmp_path)])
    assert "no-such-toolchain" in one_error_line(["compile", "--work", work, "--toolchain", str(tmp_path / "no-such-toolchain")])
    assert "--chip bm1688 is not one of bm1684x" in one_error_line(["compile", "--work", work, "--chip", "bm1688"])
    assert "--quant int3 is not one of" in one_error_line(["compile", "--work", work, "--quant", "int3"])
    output = one_error_line(["compile", "--work", work, "--group-size", "48"])
    assert "--group-size 48 does not divide text hidden_size 64" in output and "--group-size 64" in output
    assert "is for --seq 160, not 512" in one_error_line(["compile", "--work", work, "--seq", "512"])


def test_a_failing_net_stops_the_pool_and_is_named(export_factory, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(export_factory("mha-cross-first") / "export", work / "export")
    broken = work / "export" / "block_1" / "block_1.onnx"
    broken.write_bytes(broken.read_bytes()[:1000])
    record_as_exported(work, "block_1")  # a net tpu-mlir fails on (an unrecorded change is refused up front: test_hostile)
    result = runner.invoke(app, ["compile", "--work", str(work), "--quant", "int4"])
    assert result.exit_code == 1
    assert "error: block_1: model_transform.py failed" in result.output
    assert not list(work.glob("*.bmodel"))  # nothing a later run would trust


def test_compile_net_builds_one_net_as_run_would(export_factory, checkpoint_factory, tmp_path):
    """The public way to build one net ahead of `run` (bench/real_widths.py builds the first net of
    each kind so): checked, cached where `run` looks, its transform taken in turn on the lock. The
    heads of an export for speculative decoding (--draft-tokens 3) pass at each stage: a decode
    step's one row and a check's four; so does a self-attention layer at the check's chunk of
    four, its query heads stacked per K/V head (patches.STACKED_QUERIES_UP_TO), one flash
    attention as at the chunk of 32."""
    from lvb.compile.build import CompileError
    from lvb.export.exporter import export

    name = "gqa2-cross-last"
    work = tmp_path / "work"
    shutil.copytree(export_factory(name) / "export", work / "export")
    export(checkpoint_factory(name), work, seq=SEQ, chunks=chunks_of(name), draft_tokens=3)
    turns = tmp_path / "transform.lock"
    compiler = Compiler(work, CompileSettings(quant="int4", check="kinds"), find_toolchain(), transform_lock=turns)
    for head in ("greedy_head", "lm_head"):
        result = compiler.compile_net(head)
        assert result["passed"] and result["check"] is not None and (work / result["bmodel"]).is_file()
        assert len(result["device"]) == 2  # an estimate per stage
    block = compiler.compile_net("block_0")
    assert block["passed"] and block["check"] is not None
    assert [Estimate.from_json(e).ops.keys() >= {"FAttention"} for e in block["device"]] == [True, True]
    assert turns.is_file()  # the transform ran under the lock
    with pytest.raises(CompileError, match="no_such_net is not a net of the export"):
        compiler.compile_net("no_such_net")


def test_inspect_reports_decode_bytes(compile_factory):
    bmodel = compile_factory("gqa2-cross-last", "int4")
    result = runner.invoke(app, ["inspect", str(bmodel)])
    assert result.exit_code == 0, result.output
    info = inspect_bmodel(bmodel, find_toolchain())
    step = info.decode_step()
    # KV of the self-attention layers (0 and 2): [1, SEQ, 2, 16] bf16 each for K and V.
    assert step["kv_cache"] == 2 * 2 * SEQ * 2 * 16 * 2
    # Cross K/V of layers 1 and 3: [1, 2, 68, 16] bf16, K and V: KV heads only, never 4 query heads.
    assert step["cross_kv"] == 2 * 2 * 68 * 2 * 16 * 2
    assert step["weights"] > 0 and "one decode step reads" in result.output
    # The turn's time: a decode step with a picture is every decode net once plus the card's
    # greedy head, each at its recorded estimate (counted here from the manifest, not the runner).
    nets = manifest(bmodel)["nets"]
    decode = [n for n, r in nets.items() if n.startswith("block_cache_") or n in ("embed_cache", "lm_head", "greedy_head")]
    step_ms = sum(nets[n]["device"][0]["cycles"] for n in decode) / 1e6
    record = compile_record(bmodel)
    times = turn_times(ModelSpec.from_dir(record["model"]["dir"]), SEQ, chunks_of("gqa2-cross-last"), from_manifest(record), 17)
    assert [t.tiles for t in times] == [None, *range(1, GEOMETRIES["gqa2-cross-last"].max_tiles + 1)]
    assert times[1].decode_step.ms == pytest.approx(step_ms) and times[1].decode_step.launches == len(decode)
    assert times[0].decode_step.ms < step_ms  # without a picture the cross-attention layers are skipped
    assert f"{times[1].decode_step.ms:,.2f}" in result.output and "first token ms" in result.output


def damage(weights_file, rng, relative=0.01, width=None):
    """Gaussian noise of `relative` times its norm added to the first weight matrix (of output
    `width`, if given) in an npz of weights (the transform's output): a miscompile in small."""
    arrays = dict(np.load(weights_file))
    name = next(k for k, v in arrays.items() if v.ndim == 2 and width in (None, v.shape[1]))
    noise = rng.standard_normal(arrays[name].shape)
    arrays[name] = (arrays[name] + noise * relative * np.linalg.norm(arrays[name]) / np.linalg.norm(noise)).astype(arrays[name].dtype)
    np.savez(weights_file, **arrays)


def compile_with_damage(compile_factory, export_factory, name: str, net: str, work: Path, width=None) -> Compiler:
    """`name`'s INT8 compile copied to `work`, `net`'s weights 1 % off in the MLIR its deploy
    reads (damage) and its deploys gone: the compiler that builds and checks it again."""
    compile_factory(name, "int8")
    shutil.copytree(export_factory(name) / "export", work / "export")
    shutil.copytree(export_factory(name) / "compile", work / "compile")
    for manifest_file in (work / "compile").glob("*.json"):
        manifest_file.unlink()
    for weights in (work / "compile" / net).glob("mlir-*/*_weight.npz"):
        damage(weights, np.random.default_rng(0), width=width)
        record_transform(weights.parent)  # as if model_transform.py had written it (unrecorded, it is transformed again)
    for folder in (work / "compile" / net).iterdir():
        if not folder.name.startswith("mlir-"):
            shutil.rmtree(folder)
    return Compiler(work, CompileSettings(quant="int8"), find_toolchain())


def test_a_net_one_percent_off_fails_the_compile_check_and_verify(compile_factory, export_factory, checkpoint_factory, tmp_path):
    """The LM head's weight matrix 1 % off (Gaussian noise of 1 % of its norm, in the MLIR the
    deploy reads): the compile check refuses the bmodel; forced into a combined bmodel, verify's
    per-net check names it."""
    from lvb.compile.compiler import NetFailed
    from lvb.compile.tpumlir import combine
    from lvb.runtime.backends import open_engine
    from lvb.verify.checks import check_parts

    name = "gqa2-cross-last"
    work = tmp_path / "work"
    compiler = compile_with_damage(compile_factory, export_factory, name, "lm_head", work)
    with pytest.raises(NetFailed, match=r"lm_head: the simulator disagrees with onnxruntime \(.*cosine 0\.9999"):
        compiler.run(jobs=1)
    assert not compiler.bmodel.exists()

    # The same nets combined with that LM head, as if no check had run.
    compiled = manifest(compile_factory(name, "int8"))
    nets = [work / r["bmodel"] for r in compiled["nets"].values()]
    nets[list(compiled["nets"]).index("lm_head")] = next((work / "compile" / "lm_head").glob("*/lm_head.bmodel"))
    combine(find_toolchain(), nets, compiler.bmodel, tmp_path / "combine.log")
    with open_engine("cmodel", bmodel=compiler.bmodel) as engine:
        parts = check_parts(checkpoint_factory(name), work, engine, compiled)
    assert [p.net for p in parts if p.misses] == ["lm_head"]


def test_a_k_projection_one_percent_off_fails_the_int8_check(compile_factory, export_factory, checkpoint_factory, tmp_path):
    """A self-attention block's K is one matmul past its input, so at INT8 it sits 10⁻⁵ from
    its reference at any width (bench/README.md §4.1), and its own row catches 1 % noise on
    `k_proj` that the hidden state's row cannot."""
    from lvb.compile.compiler import NetFailed
    from lvb.spec import ModelSpec

    name = "gqa2-cross-last"
    text = ModelSpec.from_dir(checkpoint_factory(name)).text
    # block_0 is a self-attention prefill (the cross-attention layer is the last). q_proj is
    # wider; of the two KV-wide projections the graph holds k_proj first.
    compiler = compile_with_damage(compile_factory, export_factory, name, "block_0", tmp_path / "work",
                                   width=text.num_kv_heads * text.head_dim)
    with pytest.raises(NetFailed, match=r"block_0: the simulator disagrees with onnxruntime \(options default: k cosine 0\.9999"):
        compiler.run(jobs=1)
    assert not compiler.bmodel.exists()


def test_a_truncated_weight_archive_is_never_recorded_nor_reused(tmp_path):
    """tpu-mlir's npz writer, on a full disk, loses part of the data and still ends the archive
    with its directory: such a transform is refused rather than recorded, and one recorded before
    this check is transformed again rather than reused."""
    import zipfile

    from lvb.compile.build import TRANSFORM_FILES, CompileError, record_transform, truncated_npz

    whole = tmp_path / "whole" / "net_top_f32_all_weight.npz"
    whole.parent.mkdir()
    np.savez(whole, table=np.arange(1 << 16, dtype=np.float32))
    assert not truncated_npz(whole)
    data = whole.read_bytes()
    with zipfile.ZipFile(whole) as archive:
        directory = archive.start_dir
    short = tmp_path / "short" / whole.name
    short.parent.mkdir()
    short.write_bytes(data[:1000] + data[directory:])  # the data cut, the directory kept
    with zipfile.ZipFile(short) as archive:
        assert archive.namelist() == ["table.npy"]  # it opens as if whole
    assert truncated_npz(short)
    with pytest.raises(CompileError, match="short of what it holds.*free disk space"):
        record_transform(short.parent)
    assert not (short.parent / TRANSFORM_FILES).exists()
    record_transform(whole.parent)
    assert (whole.parent / TRANSFORM_FILES).is_file()
