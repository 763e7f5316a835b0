"""Continuous batching on onnxruntime: conversations decoded together in one batched step each
get, token for token, the greedy answer they get alone from the one-conversation nets, whatever
joins or leaves the batch around them, with or without a picture."""

import threading
from collections import Counter
from datetime import datetime

import numpy as np
import openai
import pytest
from PIL import Image

from helpers import SEQ, chunks_of
from lvb.contract import Kind, batch_sizes, net_name, plan
from lvb.runtime.backends import open_engine
from lvb.runtime.batch import Batch
from lvb.runtime.pipeline import Checkpoint, Session
from lvb.runtime.sampling import SamplingConfig
from lvb.spec import ModelSpec
from lvb.testing.checkpoints import GEOMETRIES

DAY = datetime(2026, 3, 1)
BATCH = (4, 2)  # and 1, always


def picture(seed: int, size=(90, 50)) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8))


# (question, picture, max new tokens): three different pictures and a chat without one, answers
# of different lengths so that rows leave the batch at different steps.
CONVERSATIONS = [
    ("What is in the picture?", picture(1), 9),
    ("Describe this image in a few words please", picture(2, (40, 120)), 4),
    ("Hello there", None, 7),
    ("What colour is it?", picture(3, (200, 60)), 12),
]


# One geometry in the inner loop (make test-fast), every one in CI.
FAST_GEOMETRY = "gqa2-cross-last"


@pytest.fixture(scope="module", params=[pytest.param(g, marks=() if g == FAST_GEOMETRY else pytest.mark.slow)
                                        for g in sorted(GEOMETRIES)])
def batched(request, tmp_path_factory, checkpoint_factory, export_factory):
    """(checkpoint, the one-conversation export's engine, the batched export's engine)."""
    import shutil

    from lvb.export.exporter import export

    name = request.param
    model = checkpoint_factory(name)
    work = tmp_path_factory.mktemp(f"batched-{name}")
    shutil.copytree(export_factory(name), work, dirs_exist_ok=True)  # its cache keeps the nets a batch leaves as they are
    export(model, work, seq=SEQ, chunks=chunks_of(name), batch=BATCH)
    alone = open_engine("onnxruntime", onnx_work=export_factory(name))
    together = open_engine("onnxruntime", onnx_work=work)
    yield Checkpoint.load(model), alone, together
    alone.close()
    together.close()


def alone_answers(checkpoint, engine, conversations) -> list[list[int]]:
    return [Session(checkpoint, engine, today=DAY).ask(text, image, max_new_tokens=n).tokens
            for text, image, n in conversations]


def test_the_plan_gives_the_decode_nets_a_stage_per_batch_size(checkpoint_factory):
    spec = ModelSpec.from_dir(checkpoint_factory("gqa2-cross-last"))
    assert batch_sizes((4, 2)) == (4, 2, 1) and batch_sizes(1) == (1,)
    with pytest.raises(ValueError):
        batch_sizes((0, 2))
    single = {n.name: n for n in plan(spec, SEQ, 32)}
    nets = {n.name: n for n in plan(spec, SEQ, 32, (4, 2))}
    decode = {Kind.EMBED_CACHE, Kind.SELF_DECODE, Kind.CROSS_DECODE, Kind.LM_HEAD, Kind.GREEDY_HEAD}
    for name, net in nets.items():
        if net.kind not in decode:
            assert net == single[name]
            continue
        # Largest first; the B=1 stage is today's net; every tensor has B rows.
        assert [s.inputs[0].shape[0] for s in net.stages] == [4, 2, 1]
        assert (net.stages[-1].inputs, net.stages[-1].outputs) == (single[name].inputs, single[name].outputs)
        assert all(t.shape[0] == 4 for t in (*net.inputs, *net.outputs))


def test_batched_rows_equal_each_conversation_alone(batched):
    """Two conversations start, two more join the running batch one step apart, each leaves
    when its answer ends (slots free in the middle: the step's stage computes a throwaway row
    there and keeps its cache), and the first slot takes a second turn that reuses its cache."""
    checkpoint, alone, together = batched
    expected = alone_answers(checkpoint, alone, CONVERSATIONS)
    batch = Batch(checkpoint, together, today=DAY)
    assert batch.slots == 4
    got: dict[int, list[int]] = {}
    steps = 0

    def collect(ended):
        for slot, reply in ended.items():
            got[slot] = reply.tokens

    for slot, (text, image, n) in enumerate(CONVERSATIONS[:2]):
        batch.begin(slot, text, image, max_new_tokens=n)
    collect(batch.step())
    steps += 1
    for slot, (text, image, n) in enumerate(CONVERSATIONS[2:], start=2):
        batch.begin(slot, text, image, max_new_tokens=n)
        collect(batch.step())
        steps += 1
    while batch.answers:
        collect(batch.step())
        steps += 1
    assert [got[slot] for slot in range(4)] == expected
    # Every step ran the decode nets once, at a batch stage, for all its rows together.
    launches = batch.runner.launches
    decode_steps = sum(count for (net, _), count in launches.items() if net == net_name(Kind.EMBED_CACHE))
    assert decode_steps == steps

    # A second turn in slot 0 keeps its cached prompt and answers as the same chat alone does.
    session = Session(checkpoint, alone, today=DAY)
    first_text, first_image, n = CONVERSATIONS[0]
    session.ask(first_text, first_image, max_new_tokens=n)
    second = session.ask("And what else?", max_new_tokens=6)
    answer = batch.begin(0, "And what else?", max_new_tokens=6)
    assert answer.stats.prefilled_tokens == second.stats.prefilled_tokens < answer.stats.prompt_tokens
    # The chat without a picture, new, in the slot whose K/V held a picture's: they must not leak in.
    text, image, n = CONVERSATIONS[2]
    batch.sessions[1].reset()
    batch.begin(1, text, image, max_new_tokens=n)
    while batch.answers:
        collect(batch.step())
    assert got[0] == second.tokens and got[1] == expected[2]


class Recorder:
    """The real engine, noting the nets it runs in the order it runs them; it holds the engine
    thread in the `hold_at`-th decode step until the test lets it go on, and fails the
    `fail_at`-th prefill chunk (the server's handling of a failure is under test, not the engine)."""

    def __init__(self, engine, hold_at: int, fail_at: int | None = None):
        self.engine, self.hold_at, self.fail_at, self.order = engine, hold_at, fail_at, []
        self.held, self.go = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def run(self, net, feeds, store=None):
        from lvb.runtime.engine import EngineError

        self.order.append(net)
        if net == net_name(Kind.EMBED_CACHE) and self.order.count(net) == self.hold_at:
            self.held.set()
            assert self.go.wait(timeout=120)
        if net == net_name(Kind.EMBED) and self.order.count(net) == self.fail_at:
            raise EngineError("embed: device returned error 3 (stand-in failure)")
        return self.engine.run(net, feeds, store)


def newcomer_during(server, recorder, running: tuple, newcomer: tuple) -> dict:
    """Ask `running` (messages, max tokens) streamed, and once the engine is held in its second
    step, queue `newcomer` and let the engine go on: each one's text, or (status, message) for an
    error."""
    from test_serve import ask, wait_for

    client = server.client()
    got = {}

    def call(name, messages, max_tokens):
        try:
            got[name] = ask(client, messages, stream=name == "running", max_tokens=max_tokens, temperature=0)[0]
        except openai.APIStatusError as e:
            got[name] = (e.status_code, e.message)

    first = threading.Thread(target=call, args=("running", *running))
    first.start()
    assert recorder.held.wait(timeout=120)  # the running answer's second step: the engine waits
    second = threading.Thread(target=call, args=("newcomer", *newcomer))
    second.start()
    wait_for(lambda: server.worker.pending == 2, "the newcomer to queue")
    recorder.go.set()
    first.join()
    second.join()
    server.idle()
    return got


def test_a_newcomers_prefill_chunks_interleave_with_the_running_answers_steps(batched):
    """lvb serve on a batched export: a newcomer with a picture and a prompt of several chunks
    arrives while an answer runs. It comes in a piece per decode step of the running answer (its
    vision tower, then each prefill chunk, one decode step after each), and both answers are
    the ones each request gets alone."""
    from test_serve import LONG, Server, user

    checkpoint, alone, together = batched
    text, image, _ = CONVERSATIONS[0]
    long_text, long_image = LONG * 2, picture(4)
    reference = Session(checkpoint, alone, today=DAY)
    running = reference.ask(text, image, max_new_tokens=40)
    assert running.stop_reason == "max new tokens"  # it runs on while the newcomer comes in
    reference.reset()
    newcomer = reference.ask(long_text, long_image, max_new_tokens=5)
    chunks = sum(n for (net, _), n in newcomer.stats.first_token_launches.items() if net == net_name(Kind.EMBED))
    assert chunks > 2

    recorder = Recorder(together, hold_at=2)
    server = Server(Session(checkpoint, recorder, today=DAY), max_queue=4)
    try:
        got = newcomer_during(server, recorder, ([user(text, image)], 40), ([user(long_text, long_image)], 5))
    finally:
        recorder.go.set()
        server.stop()
    assert got == {"running": running.text, "newcomer": newcomer.text}
    nets = recorder.order
    steps = [i for i, net in enumerate(nets) if net == net_name(Kind.EMBED_CACHE)]
    pieces = [i for i, net in enumerate(nets) if i > steps[0] and net in (net_name(Kind.VISION_EMBED), net_name(Kind.EMBED))]
    assert nets[pieces[0]] == net_name(Kind.VISION_EMBED) and len(pieces) == 1 + chunks
    # One decode step of the running answer between two pieces of the newcomer: not one prefill
    # of the whole prompt between two steps.
    for a, b in zip(pieces, pieces[1:]):
        assert sum(a < i < b for i in steps) == 1, nets[a:b]
    assert server.worker.metrics.stall.count >= len(pieces)  # the running answer's waits were measured


def test_a_chunk_that_fails_fails_only_its_request(batched):
    """A newcomer's second prefill chunk fails while an answer runs: the newcomer gets a 500
    naming the failure, the running answer goes on to the one it gets alone, and the same
    request asked again is answered as it is alone."""
    from test_serve import LONG, Server, ask, user

    checkpoint, alone, together = batched
    text, image, _ = CONVERSATIONS[0]
    reference = Session(checkpoint, alone, today=DAY)
    running = reference.ask(text, image, max_new_tokens=40)
    reference.reset()
    newcomer = reference.ask(LONG, max_new_tokens=5)
    recorder = Recorder(together, hold_at=2)
    server = Server(Session(checkpoint, recorder, today=DAY), max_queue=4)
    try:
        # The newcomer's second chunk comes after the running answer's prompt's chunks.
        recorder.fail_at = 2 + sum(n for (net, _), n in running.stats.first_token_launches.items()
                                   if net == net_name(Kind.EMBED))
        got = newcomer_during(server, recorder, ([user(text, image)], 40), ([user(LONG)], 5))
        again = ask(server.client(), [user(LONG)], stream=False, max_tokens=5, temperature=0)[0]
        assert server.worker.failed == 1 and not server.worker.running and server.worker.newcomer is None
    finally:
        recorder.go.set()
        server.stop()
    assert got["running"] == running.text
    status, message = got["newcomer"]
    assert status == 500 and "device returned error 3" in message
    assert again == newcomer.text


def test_the_greedy_head_picks_each_rows_token(batched):
    """A device keeps the logits and runs the greedy head on all rows at once."""
    checkpoint, alone, together = batched
    expected = alone_answers(checkpoint, alone, CONVERSATIONS[:3])
    together.logits_on_host = False
    try:
        batch = Batch(checkpoint, together, today=DAY)
        for slot, (text, image, n) in enumerate(CONVERSATIONS[:3]):
            batch.begin(slot, text, image, max_new_tokens=n)
        got = {}
        while batch.answers:
            got |= {slot: r.tokens for slot, r in batch.step().items()}
    finally:
        together.logits_on_host = True
    assert [got[slot] for slot in range(3)] == expected
    assert any(net == net_name(Kind.GREEDY_HEAD) and stage == 0 for net, stage in batch.runner.launches)


def test_per_row_sampling_options_and_a_row_cut_short(batched):
    """Each row samples with its own seeded sampler, as it does alone; a row ended from outside
    (a client gone) leaves without disturbing the others."""
    checkpoint, alone, together = batched
    sampled = SamplingConfig(do_sample=True, temperature=0.9, top_k=20, seed=5)
    text, image, n = CONVERSATIONS[0]
    lone = Session(checkpoint, alone, today=DAY).ask(text, image, sampled, max_new_tokens=n).tokens
    greedy = alone_answers(checkpoint, alone, CONVERSATIONS[2:3])[0]
    batch = Batch(checkpoint, together, today=DAY)
    batch.begin(0, text, image, sampled, max_new_tokens=n)
    batch.begin(1, *CONVERSATIONS[1][:2], max_new_tokens=50)
    text2, image2, n2 = CONVERSATIONS[2]
    batch.begin(2, text2, image2, max_new_tokens=n2)
    batch.step()
    cut = batch.finish(1, "stopped")
    assert cut.stop_reason == "stopped" and 1 not in batch.answers
    got = {}
    while batch.answers:
        got |= {slot: r.tokens for slot, r in batch.step().items()}
    assert got[0] == lone and got[2] == greedy


def test_memory_plan_and_device_time_know_the_batch(checkpoint_factory):
    """Each conversation of a batch has its own KV cache and cross K/V slot in the plan that
    the preflight holds against the device; the device-time model launches every decode net
    once per step at the stage of the step's rows."""
    from lvb.runtime.memory import Buffers, resident_buffers
    from lvb.runtime.turn import batch_step_launches

    spec = ModelSpec.from_dir(checkpoint_factory("gqa2-cross-last"))

    def held(batch):
        nets = {n.name: n.on_device() for n in plan(spec, SEQ, 32, batch)}
        sizes = Counter()
        for t in resident_buffers(nets):
            sizes[Buffers.holds(t.name)] += int(np.prod(t.shape))
        return sizes

    one, four = held(1), held((4, 2))
    for what in (Buffers.KV_CACHE, Buffers.CROSS_KV):
        assert four[what] == 4 * one[what] > 0
    assert four[Buffers.VISION_STATES] == one[Buffers.VISION_STATES]  # one picture is encoded at a time
    layers = spec.text.num_layers
    for rows, stage in ((3, 0), (2, 1), (1, 2)):
        launches = batch_step_launches(spec, SEQ, (32,), (4, 2), rows, pictures=True)
        assert sum(launches.values()) == layers + 3  # embedding, every layer, LM head, greedy head
        assert {s for _, s in launches} == {stage}
    text_only = batch_step_launches(spec, SEQ, (32,), (4, 2), 2, pictures=False)
    assert sum(text_only.values()) == layers + 3 - len(spec.text.cross_attention_layers)


@pytest.fixture(scope="module")
def toy_batched(tmp_path_factory):
    """The trained toy exported with --batch 4 (seq and chunk as the session's toy export)."""
    from pathlib import Path

    from lvb.export.exporter import export

    toy = Path(__file__).resolve().parent.parent / "models" / "toy"
    work = tmp_path_factory.mktemp("batched-toy")
    export(toy, work, seq=SEQ, chunks=(32,), batch=(4,))
    return toy, work


def test_batch_sizes_are_checked_before_any_work(toy_batched, tmp_path):
    """`lvb export --batch` refuses a size below 1 in one line, and `lvb compile --batch` one the
    export was not made for, naming both."""
    from typer.testing import CliRunner

    from lvb.cli import app

    toy, work = toy_batched
    result = CliRunner().invoke(app, ["export", "--model", str(toy), "--out", str(tmp_path / "w"), "--batch", "0,2"])
    assert result.exit_code != 0 and "--batch 0,2 is out of range" in result.output
    assert not (tmp_path / "w").exists()
    result = CliRunner().invoke(app, ["compile", "--work", str(work), "--batch", "2"])
    assert result.exit_code != 0
    assert "is for --batch 1,4, not 1,2; run `lvb export --batch 1,2` first" in " ".join(result.output.split())


def test_served_requests_share_decode_steps_and_keep_their_answers(toy_batched, toy_export):
    """lvb serve on the toy exported with --batch 4: ten clients at once (pictures, a chat
    without one, streamed or not, one with a stop string) each get the answer the toy gives
    alone; several answers ran together, and the queue behind them drained."""
    import threading

    from lvb.tasks import QUESTION, sample
    from test_serve import Server, ask, user

    toy, work = toy_batched
    checkpoint = Checkpoint.load(toy)
    reference = Session(checkpoint, open_engine("onnxruntime", onnx_work=toy_export))
    server = Server(Session(checkpoint, open_engine("onnxruntime", onnx_work=work)), max_queue=16)
    pictures = sample(8, seed=321)
    asks = [(QUESTION, image, {}) for image, _ in pictures]
    asks += [("Hello there", None, {"max_tokens": 6}), (QUESTION, pictures[0][0], {"stop": [" "]})]
    requests = [([user(text, image)], options) for text, image, options in asks]
    expected = []
    for text, image, options in asks:
        reference.reset()
        reply = reference.ask(text, image, max_new_tokens=options.get("max_tokens"))
        expected.append(reply.text.split(" ")[0] if options.get("stop") else reply.text)
    assert expected[:8] == [label for _, label in pictures]  # the toy knows its pictures
    results: dict[int, str] = {}
    try:
        def call(i):
            messages, options = requests[i]
            results[i] = ask(server.client(), messages, stream=i % 2 == 0, temperature=0, **options)[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        server.idle()
        metrics = server.worker.metrics
        assert metrics.stall.count > 0  # steps followed one another while answers ran together
        assert server.worker.served == len(requests) and not server.worker.running
    finally:
        server.stop()
    assert [results[i] for i in range(len(requests))] == expected
    together = server.worker.batch.runner.launches
    assert any(net == net_name(Kind.EMBED_CACHE) and stage == 0 for net, stage in together)  # a step of 4 rows ran


def test_serve_refuses_a_draft_with_a_batched_model(toy_batched, toy_draft_export):
    """`lvb serve --draft` on the toy exported with --batch 4: one line naming the problem and the
    fix, exit 1, before the server listens (the port is held: a server that started would fail
    differently); `lvb run` takes the same draft on the same export (one conversation)."""
    import socket

    from helpers import one_error_line
    from lvb.cli import app
    from typer.testing import CliRunner

    toy, work = toy_batched
    draft = ["--draft", toy.parent / "toy-draft", "--draft-onnx", toy_draft_export]
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        output = " ".join(one_error_line(["serve", "--model", toy, "--onnx", work, "--port", held.getsockname()[1]]
                                         + draft).split())
    assert "--draft takes one conversation at a time, and the model's nets decode 4 at once" in output
    assert "serve it without --draft for continuous batching, or with --draft from an export with --batch 1" in output
    result = CliRunner().invoke(app, [str(a) for a in ["run", "--model", toy, "--onnx", work, "--prompt", "Hello",
                                                        "--max-new-tokens", "3"] + draft])
    assert result.exit_code == 0, result.output


@pytest.mark.toolchain
@pytest.mark.slow
def test_the_simulator_runs_a_batch_of_three_pictures_and_a_chat_without_one(tmp_path_factory):
    """The toy compiled with --batch 4 (INT4, decode nets with stages of 4 and 1 rows sharing
    their weights): on the simulator, three conversations about different pictures and one
    without a picture, decoded together, each answer as the same bmodel gives it alone."""
    from pathlib import Path

    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.export.exporter import export
    from lvb.runtime.cmodel import CmodelEngine
    from lvb.tasks import QUESTION, sample
    from lvb.toolchain import find_toolchain

    toy = Path(__file__).resolve().parent.parent / "models" / "toy"
    work = tmp_path_factory.mktemp("toy-batched")
    export(toy, work, seq=128, chunks=(32,), batch=(4,))
    compiler = Compiler(work, CompileSettings(quant="int4", check="none"), find_toolchain(), batch=(4,))
    compiler.run()
    checkpoint = Checkpoint.load(toy)
    asks = [(QUESTION, image, 6) for image, _ in sample(3, seed=77)] + [("Hello", None, 4)]
    with CmodelEngine(compiler.bmodel) as engine:
        assert [i[0].shape[0] for i in (engine.nets["block_cache_0"].inputs, *engine.nets["block_cache_0"].smaller)] == [4, 1]
        alone = [Session(checkpoint, engine, today=DAY).ask(text, image, max_new_tokens=n).tokens for text, image, n in asks]
        batch = Batch(checkpoint, engine, today=DAY)
        for slot, (text, image, n) in enumerate(asks):
            batch.begin(slot, text, image, max_new_tokens=n)
        got = {}
        while batch.answers:
            got |= {slot: reply.tokens for slot, reply in batch.step().items()}
    assert [got[slot] for slot in range(4)] == alone
    assert batch.runner.launches[net_name(Kind.EMBED_CACHE), 0] >= 3  # steps of 4 rows
