"""Speculative decoding on onnxruntime: with a draft, greedy answers are the model's own token for
token, whether the draft is poor (random weights) or good (the model's own text stack); the K/V
rows written for rejected proposals never reach a later token."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import SEQ, chunks_of
from lvb.runtime.backends import open_engine
from lvb.runtime.memory import Buffers
from lvb.runtime.pipeline import ChatError, Checkpoint, Session
from lvb.runtime.sampling import SamplingConfig
from lvb.runtime.speculative import accept_sampled
from lvb.testing.checkpoints import GEOMETRIES, write_text_stack

NEW_TOKENS = 16
POOR = "llama-mha-untied"  # random weights: it almost never guesses the model's token


def picture(seed: int) -> Image.Image:
    return Image.fromarray((np.random.default_rng(seed).random((50, 90, 3)) * 255).astype(np.uint8))


CHATS = {
    "text": [("Hello there", None), ("What can you do? Tell me more.", None)],
    "picture": [("What is in the picture?", picture(1)), ("Tell me more.", None)],
}


@pytest.fixture(scope="session")
def text_stack_factory(tmp_path_factory, checkpoint_factory):
    """mllama geometry -> (checkpoint, export) of its text stack as a Llama: a good draft."""
    from lvb.export.exporter import export

    done = {}

    def make(name: str):
        if name not in done:
            model = write_text_stack(tmp_path_factory.mktemp("stack") / f"{name}-text", checkpoint_factory(name))
            work = tmp_path_factory.mktemp(f"work-{name}-text")
            export(model, work, seq=SEQ, chunks=chunks_of(name))
            done[name] = model, work
        return done[name]

    return make


def open_model(checkpoint, work):
    return Checkpoint.load(checkpoint), open_engine("onnxruntime", onnx_work=work)


def answers(session: Session, turns, sampling=None) -> list:
    session.reset()
    return [session.ask(text, image=image, max_new_tokens=NEW_TOKENS, sampling=sampling) for text, image in turns]


@pytest.fixture(scope="module", params=sorted(GEOMETRIES) + ["llama-gqa2-tied"])
def target(request, checkpoint_factory, export_factory):
    name = request.param
    model, engine = open_model(checkpoint_factory(name), export_factory(name))
    yield name, model, engine
    engine.close()


@pytest.mark.parametrize("draft", ["poor", "good"])
def test_greedy_answers_with_a_draft_are_the_models_own(target, draft, checkpoint_factory, export_factory,
                                                        text_stack_factory):
    name, model, engine = target
    if draft == "poor":
        draft_files = checkpoint_factory(POOR), export_factory(POOR)
    elif name in GEOMETRIES:
        draft_files = text_stack_factory(name)
    else:  # a Llama target drafts for itself: every proposal is kept
        draft_files = checkpoint_factory(name), export_factory(name)
    draft_model, draft_engine = open_model(*draft_files)
    chats = CHATS if name in GEOMETRIES else {"text": CHATS["text"]}
    for chat, turns in chats.items():
        plain = answers(Session(model, engine), turns)
        for k in (1, 4):
            with_draft = answers(Session(model, engine, draft=(draft_model, draft_engine), draft_tokens=k), turns)
            for reply, expected in zip(with_draft, plain):
                assert reply.tokens == expected.tokens, (chat, k)
                assert reply.text == expected.text
                s = reply.stats.speculative
                assert s.verify_steps > 0
                if draft == "good" and chat == "text":  # the model's own text stack: all of it kept
                    assert s.acceptance == 1.0
                if draft == "poor":
                    assert s.acceptance < 0.5
    draft_engine.close()


CHECKED = "gqa2-cross-last"


@pytest.fixture(scope="module")
def built_for_a_draft(checkpoint_factory, export_factory, tmp_path_factory):
    """A fixture's export with --draft-tokens 3, over a copy of its plain export (whose cache
    keeps the nets the two share)."""
    import shutil

    from lvb.export.exporter import export

    work = tmp_path_factory.mktemp("built-for-a-draft")
    shutil.copytree(export_factory(CHECKED), work, dirs_exist_ok=True)
    export(checkpoint_factory(CHECKED), work, seq=SEQ, chunks=chunks_of(CHECKED), draft_tokens=3)
    return work


@pytest.mark.slow  # a second export of the fixture: CI's, not the inner loop's (make test-fast < 3 min)
@pytest.mark.parametrize("draft", ["poor", "good"])
def test_a_check_scores_its_rows_in_one_launch(draft, checkpoint_factory, export_factory, text_stack_factory,
                                               built_for_a_draft):
    """Built with --draft-tokens 3, the model checks a draft's proposals in a prefill chunk of 4
    and one launch of its LM head over those rows: answers stay the model's, greedy and with a
    seeded sampler equal to the plain build's check one row at a time."""
    from lvb.contract import Kind, net_name

    checkpoint = checkpoint_factory(CHECKED)
    model, engine = open_model(checkpoint, built_for_a_draft)
    one_row = open_model(checkpoint, export_factory(CHECKED))[1]
    draft = open_model(*(text_stack_factory(CHECKED) if draft == "good" else (checkpoint_factory(POOR), export_factory(POOR))))
    session = Session(model, engine, draft=draft)
    assert session.draft_tokens == 3 and 4 in session.chunks  # what the build was made for
    plain = answers(Session(model, engine), CHATS["picture"])
    replies = answers(session, CHATS["picture"])
    assert [r.tokens for r in replies] == [r.tokens for r in plain]
    checks = sum(r.stats.speculative.verify_steps for r in replies)
    head = net_name(Kind.LM_HEAD)
    check_stage = session.runner._head_stage(Kind.LM_HEAD, (1, 4))
    assert checks > 0 and session.runner.launches[head, check_stage] == checks
    sampling = SamplingConfig(do_sample=True, temperature=0.9, top_k=20, seed=5)
    sampled = answers(Session(model, engine, draft=draft), CHATS["picture"], sampling)
    row_at_a_time = answers(Session(model, one_row, draft=draft, draft_tokens=3), CHATS["picture"], sampling)
    assert [r.tokens for r in sampled] == [r.tokens for r in row_at_a_time]
    for e in (engine, one_row, draft[1]):
        e.close()


def test_the_device_time_model_prices_a_check_as_the_runtime_launches_it(checkpoint_factory):
    """With a [1, k+1] head stage a check launches each head once, at that stage, beside a
    decode batch's [B, 1] stages; without one, once a row. Each logits buffer holds its stages'
    rows."""
    from lvb.contract import plan
    from lvb.runtime.memory import resident_buffers
    from lvb.runtime.turn import check_launches
    from lvb.spec import ModelSpec

    spec = ModelSpec.from_dir(checkpoint_factory("gqa2-cross-last"))
    layers = spec.text.num_layers
    heads = {"lm_head", "greedy_head"}
    for verify, calls in ((0, 4), (4, 1)):
        launches = check_launches(spec, SEQ, (32, 4) if verify else (32,), verify, 3, tiles=1)
        assert {net: n for (net, _), n in launches.items() if net in heads} == {"lm_head": calls, "greedy_head": calls}
        assert sum(n for (net, _), n in launches.items() if net.startswith("block_")) == layers  # one chunk
    nets = {n.name: n for n in plan(spec, SEQ, (32, 4), (2, 1), verify=4)}
    assert [s.inputs[0].shape[:2] for s in nets["lm_head"].stages] == [(1, 4), (2, 1), (1, 1)]
    assert [s.inputs[0].shape[0] for s in nets["greedy_head"].stages] == [4, 2, 1]
    logits = {t.name: t.shape for t in resident_buffers(nets) if "logits" in t.name}
    assert logits == {Buffers.LOGITS: (2, spec.text.vocab_size), Buffers.CHECK_LOGITS: (4, spec.text.vocab_size)}
    with pytest.raises(ValueError, match="verify rows 40"):
        plan(spec, SEQ, 32, verify=40)


def poison(engine, layers, rows: range, rng) -> None:
    """Overwrite cache rows of every self-attention layer with random K/V of the cache's scale."""
    for layer in layers:
        for buffer in Buffers.kv(layer):
            data = engine.read(buffer)
            scale = float(np.abs(data[:, : rows.start]).max()) or 1.0
            data[:, rows.start : rows.stop] = rng.standard_normal(data[:, rows.start : rows.stop].shape) * 3 * scale
            engine.upload(buffer, data)


def test_rejected_kv_rows_never_reach_a_later_token(checkpoint_factory, export_factory, text_stack_factory, monkeypatch):
    """After every verify pass the rows of its rejected proposals are overwritten with noise: the
    answers stay the model's. The same noise on the last kept row changes them: the noise is
    strong enough to show wherever a later token reads it."""
    name = "gqa2-cross-last"
    model, engine = open_model(checkpoint_factory(name), export_factory(name))
    draft = open_model(*text_stack_factory(name))  # on the picture chat it is right now and then
    turns = CHATS["picture"]
    plain = [r.tokens for r in answers(Session(model, engine), turns)]
    layers = model.spec.text.self_attention_layers
    step = Session._step
    rng = np.random.default_rng(0)
    poisoned = {"rejected": 0}

    def run(where):
        def spy(self, token, history, sampler, room, stats):
            start = len(self.cached)
            k = min(self.draft_tokens, room - 1, self.seq - start - 1, self.draft.room(history))
            out = step(self, token, history, sampler, room, stats)
            end = len(self.cached)  # the pass wrote rows start..start+k and kept start..end-1
            written = start + k + 1 if k >= 1 else end
            if where == "rejected" and written > end:
                poison(engine, layers, range(end, written), rng)
                poisoned["rejected"] += written - end
            if where == "kept":
                poison(engine, layers, range(end - 1, end), rng)
            return out

        monkeypatch.setattr(Session, "_step", spy)
        try:
            return [r.tokens for r in answers(Session(model, engine, draft=draft, draft_tokens=4), turns)]
        finally:
            monkeypatch.setattr(Session, "_step", step)

    assert run("rejected") == plain
    assert poisoned["rejected"] > 10
    assert run("kept") != plain
    draft[1].close()
    engine.close()


def test_the_rejection_rule_keeps_the_models_distribution():
    """Drawn many times over, the tokens accept_sampled yields for a first position are
    distributed as the model's p whatever the draft's q."""
    rng = np.random.default_rng(1)
    p = np.array([0.5, 0.3, 0.15, 0.05])
    q = np.array([0.1, 0.1, 0.2, 0.6])
    counts = np.zeros(4)
    for _ in range(20000):
        proposal = int(rng.choice(4, p=q))
        out = accept_sampled([proposal], [q], lambda i: p, rng, lambda probs: int(rng.choice(4, p=probs)))
        counts[out[0]] += 1
    assert np.abs(counts / counts.sum() - p).max() < 0.015


def test_sampled_answers_with_a_draft_run(checkpoint_factory, export_factory):
    name = "llama-gqa2-tied"
    model, engine = open_model(checkpoint_factory(name), export_factory(name))
    draft = open_model(checkpoint_factory(name), export_factory(name))
    sampling = SamplingConfig(do_sample=True, temperature=0.8, seed=3)
    reply = answers(Session(model, engine, draft=draft, draft_tokens=3), CHATS["text"][:1], sampling)[0]
    assert 1 <= len(reply.tokens) <= NEW_TOKENS
    # The model drafting for itself: p == q, so every proposal is kept.
    assert reply.stats.speculative.acceptance == 1.0


def test_a_vision_draft_or_a_too_long_draft_is_refused(checkpoint_factory, export_factory):
    model, engine = open_model(checkpoint_factory("llama-gqa2-tied"), export_factory("llama-gqa2-tied"))
    vision = open_model(checkpoint_factory("gqa2-cross-last"), export_factory("gqa2-cross-last"))
    with pytest.raises(ChatError, match="vision model"):
        Session(model, engine, draft=vision)
    with pytest.raises(ChatError, match="--draft-tokens 40"):
        Session(model, engine, draft=(model, engine), draft_tokens=40)


def test_run_cli_with_a_draft(checkpoint_factory, export_factory):
    from typer.testing import CliRunner

    from helpers import one_error_line
    from lvb.cli import app

    name = "llama-gqa2-tied"
    model, work = checkpoint_factory(name), export_factory(name)
    common = ["run", "--model", model, "--onnx", work, "--prompt", "Hello there", "--max-new-tokens", "8"]
    plain = CliRunner().invoke(app, [str(a) for a in common])
    result = CliRunner().invoke(app, [str(a) for a in common + ["--draft", model, "--draft-onnx", work, "--draft-tokens", "3", "--stats"]])
    assert result.exit_code == 0, result.output
    assert result.stdout == plain.stdout
    # 8 tokens: the prefill's, then a check of 3 proposals (4 tokens), then one of the 2 that fit (3)
    assert "draft: 5 of 5 proposed tokens kept (100%), 3.50 tokens per check of the model (2 checks)" in result.output
    assert "pass --draft-onnx" in one_error_line(common + ["--draft", model])
    assert "go with --draft" in one_error_line(common + ["--draft-tokens", "3"])
    export = ["export", "--model", model, "--out", work.parent / "never", "--seq", "64"]
    assert "1 to 63 (below --seq)" in one_error_line(export + ["--draft-tokens", "64"])
    assert "must be 0 or more" in one_error_line(export + ["--draft-tokens", "-1"])
    assert not (work.parent / "never").exists()


@pytest.mark.slow
def test_the_toy_and_its_draft_on_the_simulator(toy_staged_bmodel, tmp_path):
    """The trained toy (INT4, simulator) answers fresh pictures with its trained draft (INT4)
    exactly as without it, and the draft's proposals are kept now and then."""
    from lvb.compile.compiler import CompileSettings, Compiler
    from lvb.export.exporter import export
    from lvb.tasks import QUESTION, sample
    from lvb.toolchain import find_toolchain

    root = Path(__file__).resolve().parent.parent
    draft_dir = root / "models" / "toy-draft"
    export(draft_dir, tmp_path, seq=128, chunks=(16,))
    compiler = Compiler(tmp_path, CompileSettings(quant="int4", check="none"), find_toolchain())
    compiler.run()
    toolchain = find_toolchain()
    model = Checkpoint.load(root / "models" / "toy")
    engine = open_engine("cmodel", bmodel=toy_staged_bmodel, toolchain=toolchain)
    draft = Checkpoint.load(draft_dir), open_engine("cmodel", bmodel=compiler.bmodel, toolchain=toolchain)
    plain, speculative = Session(model, engine), Session(model, engine, draft=draft, draft_tokens=3)
    kept = 0
    with engine, draft[1]:
        for image, _ in sample(2, 77):
            expected = answers(plain, [(QUESTION, image)])[0]
            reply = answers(speculative, [(QUESTION, image)])[0]
            assert reply.tokens == expected.tokens
            kept += reply.stats.speculative.accepted
    assert kept > 0
