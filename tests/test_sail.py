"""The sail backend (lvb.runtime.sail) on lvb's stand-in sophon.sail, which follows the
real SDK's source (src/lvb/testing/sail_standin/sophon/sail.py cites it) and runs every
net on the BM1684X simulator: the toy's INT4 bmodel answers through `--backend sail`
token for token as through `--backend cmodel`, within 1.5x the bmodel's own device
memory; a failed launch ends the answer with an error naming the net; a device too
small is refused before loading. SailEngine, Session and the CLI are the real ones."""

from __future__ import annotations

import math
from collections import Counter
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from helpers import TOY
from lvb.bmodel import inspect_bmodel
from lvb.runtime.engine import EngineError, Resident
from lvb.runtime.memory import Buffers, plan_for_bmodel
from lvb.toolchain import find_toolchain

ROOT = Path(__file__).resolve().parent.parent
STANDIN = ROOT / "src" / "lvb" / "testing" / "sail_standin"
LVB = Path(sys.executable).parent / "lvb"
# Two pictures with different tile layouts, then a follow-up turn, rather than the 20
# pictures: every picture goes through the same nets, chunks, views and buffers; what changes
# between pictures is the number of tiles (the cross-attention masks, which tiles the vision
# tower attends to) and the prompt's length, and a second picture also covers re-zeroed
# buffers and masks that change between answers. Each picture costs two simulated
# conversations (sail and cmodel), about a minute of CI per picture on 2 cores.
PICTURES = 2
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def sail():
    """The stand-in as `sophon.sail`, for this module only: elsewhere `import sophon.sail`
    must keep failing, or the default backend would become sail."""
    sys.path.insert(0, str(STANDIN))
    import sophon.sail as module

    yield module
    module.fail_launches()
    sys.path.remove(str(STANDIN))
    for name in [n for n in sys.modules if n == "sophon" or n.startswith("sophon.")]:
        del sys.modules[name]


def _env(**extra) -> dict:
    path = os.pathsep.join([str(STANDIN), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, **extra)


def _pictures(checkpoint, count: int):
    """The first picture of each tile layout in a seeded sample, `count` of them."""
    from lvb.runtime.image import preprocess
    from lvb.tasks import sample

    chosen, layouts = [], set()
    for image, truth in sample(60, seed=14):
        layout = int(preprocess(image, checkpoint.image_config).aspect_ratio_ids.ravel()[0])
        if layout not in layouts:
            layouts.add(layout)
            chosen.append((image, truth))
        if len(chosen) == count:
            break
    return chosen


def _converse(session, pictures) -> list[list[int]]:
    """Each picture as a fresh chat, then one more turn about the last one. Each first turn
    launches what the device-time model (lvb.runtime.turn) prices for it."""
    from lvb.runtime.turn import turn_launches
    from lvb.tasks import QUESTION

    tokens = []
    for image, _ in pictures:
        session.reset()
        reply = session.ask(QUESTION, image=image, max_new_tokens=NEW_TOKENS)
        tokens.append(reply.tokens)
        model = turn_launches(session.spec, session.seq, session.chunks, reply.stats.prompt_tokens, session.image.num_tiles,
                              logits_on_host=session.engine.logits_on_host)
        steps = reply.stats.generated_tokens - 1
        assert reply.stats.first_token_launches == model.first_token
        assert reply.stats.decode_launches == Counter({k: v * steps for k, v in model.decode_step.items()})
    tokens.append(session.ask("Are you sure?", max_new_tokens=NEW_TOKENS).tokens)
    return tokens


def test_sail_answers_as_the_simulator_within_the_memory_goal(sail, toy_int4_bmodel):
    from lvb.runtime.cmodel import CmodelEngine
    from lvb.runtime.pipeline import Checkpoint, Session
    from lvb.runtime.sail import SailEngine

    checkpoint = Checkpoint.load(TOY)
    pictures = _pictures(checkpoint, PICTURES)
    assert len(pictures) == PICTURES
    device = sail.device(0)
    before, device.peak = device.used, device.used
    model_before = device.model
    with SailEngine(toy_int4_bmodel) as engine:
        loaded = device.used - before
        on_sail = _converse(Session(checkpoint, engine), pictures)
        model = device.model - model_before
        peak = device.peak - before
    with CmodelEngine(toy_int4_bmodel) as engine:
        on_simulator = _converse(Session(checkpoint, engine), pictures)
    assert on_sail == on_simulator
    assert all(len(t) > 1 for t in on_sail)
    print(f"device memory: bmodel {model} B, peak {peak} B ({peak / model:.2f}x)")
    assert model > 0 and peak <= 1.5 * model
    # The state the nets hand each other (KV caches, cross K/V, hidden and vision states) is
    # bf16 in the bmodel, so the buffers the engine allocates for it take two bytes a value.
    plan = plan_for_bmodel(inspect_bmodel(toy_int4_bmodel, find_toolchain()))
    state = [t for t in plan.resident if Buffers.holds(t.name) in (Buffers.KV_CACHE, Buffers.CROSS_KV,
                                                                    Buffers.VISION_STATES, Buffers.HIDDEN_STATES)
             and t.name != Buffers.LOGITS]
    assert state and {t.dtype for t in state} == {"bfloat16"}
    print(f"engine: {peak - model} B; float32 state would add {sum(math.prod(t.shape) * 2 for t in state)} B")
    # Loading takes the bmodel and nothing else (no I/O tensor per net), and what the session
    # allocated is the plan's buffers and scratch; greedy answers never read the logits, whose
    # host mirror the plan counts.
    assert loaded == model
    logits = inspect_bmodel(toy_int4_bmodel, find_toolchain()).nets["lm_head"].outputs[0]
    assert_engine_memory_is_the_plan(peak - model, plan, unread=logits.bytes)


def assert_engine_memory_is_the_plan(engine_bytes: int, plan, unread: int = 0, slack: int = 4096) -> None:
    """What the engine allocated beyond the model is the plan's resident buffers and scratch, to
    within `slack` bytes (less `unread`, a tensor the run had no call to make)."""
    want = plan.resident_bytes + plan.scratch_bytes
    print(f"engine {engine_bytes} B, plan {want} B (resident {plan.resident_bytes}, scratch {plan.scratch_bytes})")
    assert want - unread - slack <= engine_bytes <= want + slack


def test_a_failed_launch_ends_the_answer_with_that_error(sail, toy_int4_bmodel, tmp_path):
    from lvb.runtime.pipeline import Checkpoint, Session
    from lvb.runtime.sail import SailEngine
    from lvb.tasks import QUESTION, sample

    checkpoint = Checkpoint.load(TOY)
    image, _ = sample(1, seed=3)[0]
    picture = tmp_path / "picture.png"
    image.save(picture)
    decode_block = f"block_cache_{checkpoint.spec.text.self_attention_layers[-1]}"
    result = subprocess.run(
        [str(LVB), "run", "--model", str(TOY), "--bmodel", str(toy_int4_bmodel), "--backend", "sail",
         "--image", str(picture), "--prompt", QUESTION, "--max-new-tokens", "4"],
        env=_env(LVB_SAIL_STANDIN_FAIL=decode_block), capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("preflight:")]
    assert len(errors) == 1 and decode_block in errors[0] and "failed" in errors[0], result.stderr

    # A vision net, in process: the turn raises, naming it.
    sail.fail_launches("vision_layer_0")
    try:
        with SailEngine(toy_int4_bmodel) as engine:
            with pytest.raises(EngineError, match="net vision_layer_0 failed"):
                Session(checkpoint, engine).ask(QUESTION, image=image, max_new_tokens=2)
            # lvb names an unknown input instead of letting the SDK write it over input 0.
            with pytest.raises(EngineError, match="embed_cache has no input input_idz"):
                engine.run("embed_cache", {"input_idz": np.zeros((1, 1), np.int32)})
    finally:
        sail.fail_launches()


def test_a_device_too_small_is_refused_before_loading(toy_int4_bmodel, tmp_path):
    report = tmp_path / "device.json"
    result = subprocess.run(
        [str(LVB), "run", "--model", str(TOY), "--bmodel", str(toy_int4_bmodel), "--backend", "sail", "--prompt", "Hi"],
        env=_env(LVB_SAIL_STANDIN_MEMORY_MB="1", LVB_SAIL_STANDIN_REPORT=str(report)), capture_output=True, text=True)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "needs" in lines[0] and "free" in lines[0] and "--seq" in lines[0], result.stderr
    assert not report.exists() or '"model": 0' in report.read_text()  # nothing was loaded


def test_the_old_constructor_preallocates_every_nets_io(sail, toy_int4_bmodel):
    """sail.Engine(path, dev, DEVIO), which lvb used before, allocates a tensor for every input
    and output of every net at load; the EngineLLM lvb uses now allocates none."""
    device = sail.device(0)
    start = device.used
    new = sail.EngineLLM(str(toy_int4_bmodel), sail.BmrtFlag.BM_RUNTIME_SHARE_MEM, [0])
    loaded = device.used - start
    nets = new._runtime.nets.values()
    io = sum(math.prod(t.shape) * np.dtype(sail._BYTES[t.dtype]).itemsize for n in nets for t in n.inputs + n.outputs)
    new.close()
    del new
    start = device.used
    old = sail.Engine(str(toy_int4_bmodel), 0, sail.IOMode.DEVIO)
    assert device.used - start == loaded + io
    # Its process only logs a failed launch: the output keeps what it held.
    out = sail.Tensor(sail.Handle(0), [1, 1], sail.Dtype.BM_INT32, True, True)
    out.update_data(np.array([[7]], np.int32))
    out.sync_s2d()
    logits = sail.Tensor(sail.Handle(0), list(old.get_input_shape("greedy_head", "logits")), sail.Dtype.BM_FLOAT32, False, True)
    sail.fail_launches("greedy_head")
    try:
        old.process("greedy_head", {"logits": logits}, {old.get_output_names("greedy_head")[0]: out})
    finally:
        sail.fail_launches()
    out.sync_d2s()
    assert out.asnumpy().ravel()[0] == 7
    old.close()


def test_standin_tensors_follow_the_sdk(sail):
    handle = sail.Handle(0)
    device = sail.device(0)
    used = device.used
    a = sail.Tensor(handle, [1, 4, 2], sail.Dtype.BM_FLOAT32, True, True)
    assert device.used - used == 32
    a.sync_d2s()
    assert not a.asnumpy().any()  # device memory starts zeroed
    with pytest.raises(sail.SailTensorError):
        a.update_data(np.zeros((4, 2), np.float32))  # the same dimensions, not just the same size
    a.update_data(np.arange(8, dtype=np.float32).reshape(1, 4, 2))
    a.sync_s2d()
    b = sail.Tensor(handle, [1, 4, 2], sail.Dtype.BM_FLOAT32, True, True)
    b.sync_d2d(a, 2, 4, 2)  # elements, not bytes
    b.sync_d2s()
    assert b.asnumpy().ravel().tolist() == [0, 0, 0, 0, 2, 3, 0, 0]
    with pytest.raises(sail.SailTensorError):
        b.sync_d2d(a, 4, 4, 5)
    with pytest.raises(sail.SailTensorError):
        b.sync_d2d(sail.Tensor(handle, [8], sail.Dtype.BM_INT32, False, True), 0, 0, 1)
    row = sail.Tensor(b, [1, 1, 2], 6)  # a view of b's last row, and of its host memory (tensor.cpp:791-796)
    row.update_data(np.array([[[9, 9]]], np.float32))  # into the shared host memory ...
    row.sync_s2d()  # ... and the view's bytes to the device
    b.sync_d2s()
    assert b.asnumpy().ravel().tolist()[-2:] == [9, 9]
    with pytest.raises(sail.SailTensorError):
        sail.Tensor(b, [1, 2, 2], 6)
    total = device.total
    device.total = device.used + 16
    try:
        with pytest.raises(sail.SailRuntimeError, match="no enough device memory"):
            sail.Tensor(handle, [8], sail.Dtype.BM_FLOAT32, False, True)
    finally:
        device.total = total


def test_the_dtype_table_names_every_sdk_dtype_once(sail):
    """lvb.dtypes, which the engines, the memory plan and the bmodel reader all read: one row per
    bm_data_type_t of libsophon (the stand-in's Dtype copies bmdef.h), each as wide on the host
    as on the device, and bf16 rounded as the chip rounds (to nearest, ties to even)."""
    from lvb.dtypes import BY_TPU_MLIR, DTYPES, from_bf16_bits, to_bf16_bits

    assert sorted(d.sail for d in DTYPES) == sorted(member.name for member in sail.Dtype)
    assert len(BY_TPU_MLIR) == len(DTYPES) and all(np.dtype(d.raw).itemsize == d.bytes for d in DTYPES)
    ties = np.array([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], np.float32)  # halfway between two bf16 values
    assert from_bf16_bits(to_bf16_bits(ties)).tolist() == [1.0, 1 + 2**-6, -1.0]


def test_without_sophon_sail_the_error_is_one_line(monkeypatch, tmp_path):
    from lvb.runtime.sail import SailEngine

    monkeypatch.setitem(sys.modules, "sophon", None)
    monkeypatch.setitem(sys.modules, "sophon.sail", None)
    with pytest.raises(EngineError, match="needs sophon.sail"):
        SailEngine(tmp_path / "x.bmodel")


def test_upload_is_the_same_on_every_backend_and_views_feed_rows(sail, tmp_path):
    """Engine.upload writes a host array into a resident buffer; a row of a buffer feeds a
    net through a view, with no copy (a shape-only bmodel: nothing runs)."""
    from lvb.contract import NetInfo, TensorInfo
    from lvb.runtime.engine import HostBuffers
    from lvb.runtime.sail import SailEngine

    net = NetInfo("head", (TensorInfo("hidden_states", (1, 1, 4), "float32"),), (TensorInfo("logits", (1, 3), "float32"),))
    bmodel = tmp_path / "shapes.bmodel"
    bmodel.write_bytes(b"")
    sail.register_bmodel(str(bmodel), [net])
    host = HostBuffers()
    values = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    with SailEngine(bmodel) as engine:
        for backend in (engine, host):
            backend.allocate("hidden", (1, 3, 4))
            backend.upload("hidden", values)
            assert np.array_equal(backend.read("hidden"), values)
        device = sail.device(0)
        device.reset_counters()
        engine.allocate("logits", (1, 3))
        engine.run("head", {"hidden_states": Resident("hidden", 2, 1)}, store={0: Resident("logits")})
        assert device.copies["d2d"] == 0 and device.copies["h2d"] == 0


def test_bf16_state_takes_two_bytes_a_value_on_every_backend(sail, tmp_path):
    """A buffer of bf16 state (what the compiled nets declare for KV caches, cross K/V and
    hidden states) holds two bytes a value on the device and in the host backends, with no
    float32 shadow; values go in and come out as float32, rounded to bf16; a bf16 net reads
    and writes rows of it in place (a shape-only bmodel: nothing runs)."""
    from lvb.contract import BF16, NetInfo, TensorInfo
    from lvb.dtypes import from_bf16_bits, to_bf16_bits
    from lvb.runtime.engine import HostBuffers
    from lvb.runtime.sail import SailEngine

    net = NetInfo("block", (TensorInfo("hidden_states", (1, 1, 4), BF16),), (TensorInfo("k", (1, 1, 4), BF16),))
    bmodel = tmp_path / "bf16.bmodel"
    bmodel.write_bytes(b"")
    sail.register_bmodel(str(bmodel), [net])
    host = HostBuffers()
    values = np.arange(12, dtype=np.float32).reshape(1, 3, 4) / 3
    rounded = from_bf16_bits(to_bf16_bits(values))
    assert not np.array_equal(rounded, values)  # the rounding is visible
    device = sail.device(0)
    with SailEngine(bmodel) as engine:
        assert [t.dtype for t in engine.nets["block"].inputs] == [BF16]
        held = {}
        for backend in (engine, host):
            used = device.used
            backend.allocate("hidden", (1, 3, 4), BF16)
            backend.allocate("k", (1, 3, 4), BF16)
            held[backend] = device.used - used
            backend.upload("hidden", values)
            assert np.array_equal(backend.read("hidden"), rounded)
        assert held[engine] == sum(b.nbytes for b in host.buffers.values()) == 2 * 12 * 2
        device.reset_counters()
        used = device.used
        engine.run("block", {"hidden_states": Resident("hidden", 2, 1)}, store={0: Resident("k", 1, 1)})
        assert device.copies["d2d"] == 0 and device.copies["h2d"] == 0 and device.used == used
        # The host backends store a bf16 output's bits as they are.
        host.store(to_bf16_bits(values[:, 2:]), Resident("k", 1, 1), bf16_bits=True)
        assert np.array_equal(host.read("k")[:, 1], rounded[:, 2])


def test_a_short_turn_runs_at_the_smallest_bucket_that_holds_it(sail, toy_staged_bmodel):
    """The toy's first turn with a picture and the task's question (26 tokens) on a bmodel with
    prefill buckets of 64, 32 and 16: the stand-in, which runs a static net only at a stage whose
    input shapes the bound tensors have (as bmruntime does), launches every prefill net at the
    32-token stage and never at 64; the answer is the simulator's; the runner's own record is what
    the device ran."""
    from lvb.contract import chunk_for
    from lvb.runtime.cmodel import CmodelEngine
    from lvb.runtime.pipeline import Checkpoint, Session
    from lvb.runtime.sail import SailEngine
    from lvb.tasks import QUESTION

    from lvb.runtime.sampling import SamplingConfig

    checkpoint = Checkpoint.load(TOY)
    (image, _), = _pictures(checkpoint, 1)
    device = sail.device(0)
    device.reset_counters()
    before, device.peak, model_before = device.used, device.used, device.model
    with SailEngine(toy_staged_bmodel) as engine:
        loaded, model = device.used - before, device.model - model_before
        chunks = tuple(i[0].shape[1] for i in (engine.nets["embed"].inputs, *engine.nets["embed"].smaller))
        assert chunks == (64, 32, 16)
        session = Session(checkpoint, engine)
        reply = session.ask(QUESTION, image=image, max_new_tokens=NEW_TOKENS)
        launched = Counter(device.stages)
        assert engine.stage_launches == launched
        # A sampled turn reads the logits (the plan's host mirror).
        session.ask("Are you sure?", sampling=SamplingConfig(do_sample=True, seed=0), max_new_tokens=2)
        engine_bytes = device.peak - before - model
    # The stages cost nothing beyond the largest's: scratch views, and the plan is what was made.
    assert loaded == model > 0
    assert_engine_memory_is_the_plan(engine_bytes, plan_for_bmodel(inspect_bmodel(toy_staged_bmodel, find_toolchain())),
                                     slack=0)
    assert reply.stats.prompt_tokens == 26
    stage = chunks.index(chunk_for(26, chunks))
    assert stage == 1
    prefill = {net for net, info in engine.nets.items() if info.smaller}
    assert prefill >= {"embed", "block_0"}
    assert {(net, s) for net, s in launched if net in prefill} == {(net, stage) for net in prefill}
    # What the runner recorded for the first token is what the device ran.
    assert all(launched[key] >= calls for key, calls in reply.stats.first_token_launches.items())
    assert sum(launched.values()) == sum(reply.stats.first_token_launches.values()) + sum(reply.stats.decode_launches.values())
    with CmodelEngine(toy_staged_bmodel) as engine:
        assert Session(checkpoint, engine).ask(QUESTION, image=image, max_new_tokens=NEW_TOKENS).tokens == reply.tokens


def test_a_launch_at_shapes_no_stage_has_is_refused_naming_the_net(sail, toy_staged_bmodel):
    """bmruntime runs a static net only at one of its stages' input shapes: EngineLLM raises, the
    old Engine only logs (its outputs keep their contents), and lvb's engine refuses such feeds
    itself, naming the net and the shapes its stages take."""
    from lvb.runtime.sail import SailEngine

    handle = sail.Handle(0)
    device = sail.device(0)
    llm = sail.EngineLLM(str(toy_staged_bmodel), sail.BmrtFlag.BM_RUNTIME_SHARE_MEM, [0])
    try:
        assert llm.get_stage_num("embed") == 3 and llm.get_input_shape("embed", 0, 2) == [1, 16]
        hidden = llm.get_output_shape("embed", 0, 0)  # room for any stage: only the input shapes decide
        out = {0: sail.Tensor(handle, hidden, llm.get_output_dtype("embed", 0), False, True)}
        before = Counter(device.stages)
        # [2, 32] holds as many bytes as the largest stage's [1, 64]: only the shapes differ.
        for shape, ok in (([1, 16], True), ([2, 32], False)):
            ids = {0: sail.Tensor(handle, shape, sail.Dtype.BM_INT32, False, True)}
            if ok:
                llm.process("embed", ids, out)
            else:
                with pytest.raises(sail.SailEngineError):
                    llm.process("embed", ids, out)
        assert Counter(device.stages) - before == Counter({("embed", 2): 1})
    finally:
        llm.close()
    with SailEngine(toy_staged_bmodel) as engine:
        engine.allocate("hidden", tuple(engine.nets["embed"].outputs[0].shape), engine.nets["embed"].outputs[0].dtype)
        with pytest.raises(EngineError, match=r"net embed: input input_ids holds 20 values.*\[1, 64\] or \[1, 32\] or \[1, 16\]"):
            engine.run("embed", {"input_ids": np.zeros((1, 20), np.int32)}, store={0: Resident("hidden")})
        engine.run("embed", {"input_ids": np.zeros((1, 16), np.int32)}, store={0: Resident("hidden")})
        assert engine.stage_launches == Counter({("embed", 2): 1})


def test_the_engine_at_the_11b_shapes_allocates_the_plan_within_the_overhead_goal(sail, tmp_path):
    """The 11B's nets (from its config, seq 512, buckets 128 and 32) registered with the stand-in
    by shape, nothing computed: loading allocates only the bmodel, a first turn with a 4-tile
    picture, a decode step and a sampled token allocate the plan's buffers and scratch to the
    byte, and with the activations measured at the 11B's widths (bench/memory_plan.py) the
    engine's overhead is within 1 GiB."""
    import json

    from lvb.contract import plan
    from lvb.runtime.image import ProcessedImage
    from lvb.runtime.memory import GiB, MemoryPlan, resident_buffers, scratch_tensors
    from lvb.runtime.runner import Runner
    from lvb.runtime.sail import SailEngine
    from lvb.runtime.sampling import Sampler, SamplingConfig
    from lvb.spec import ModelSpec

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from memory_plan import measured_activations
    finally:
        sys.path.remove(str(ROOT / "bench"))
    activations = measured_activations()[0]
    spec = ModelSpec.from_config(json.loads((ROOT / "tests" / "data" / "llama-3.2-11b-vision.config.json").read_text()))
    nets = [n.on_device() for n in plan(spec, 512, (128, 32))]
    bmodel = tmp_path / "11b.bmodel"
    bmodel.write_bytes(b"")
    weights = 1 << 20  # what the registered bmodel's load charges
    sail.register_bmodel(str(bmodel), nets, loaded_bytes=weights)
    expected = MemoryPlan(weights, 0, {"largest net": activations}, resident_buffers({n.name: n for n in nets}),
                          scratch_tensors({n.name: n for n in nets}))
    device = sail.device(0)
    before, device.peak = device.used, device.used
    with SailEngine(bmodel) as engine:
        assert device.used - before == weights
        runner = Runner(spec, engine, image_token_id=1)
        v = spec.vision
        runner.encode_image(ProcessedImage(
            pixel_values=np.zeros((1, 1, v.max_num_tiles, 3, v.image_size, v.image_size), np.float32),
            aspect_ratio_ids=np.ones((1, 1), np.int64), aspect_ratio_mask=np.ones((1, 1, v.max_num_tiles), np.int64),
            num_tiles=v.max_num_tiles, tile_grid=(2, 2), resized_size=(v.image_size, v.image_size)))
        ids = [1] + [2] * 25
        greedy, sampled = Sampler(SamplingConfig()), Sampler(SamplingConfig(do_sample=True, seed=0))
        token = runner.next_token(runner.prefill(ids, 0, v.max_num_tiles), greedy, ids)
        runner.next_token(runner.decode(token, len(ids), v.max_num_tiles), sampled, ids)
        engine_bytes = device.peak - before - weights
        assert {s for (net, s) in engine.stage_launches if net == "embed"} == {1}  # 26 tokens: the 32 bucket
    assert_engine_memory_is_the_plan(engine_bytes, expected, slack=0)
    print(f"11B engine overhead: {expected.overhead / GiB:.3f} GiB (activations {activations} B)")
    assert engine_bytes + activations == expected.overhead <= GiB
