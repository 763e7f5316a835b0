"""lvb.runtime.sampling against transformers' own logits processors and generate() set-up."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lvb.runtime.sampling import (
    GENERATE_DEFAULTS,
    Sampler,
    SamplingConfig,
    apply_repetition_penalty,
    softmax,
    top_k_filter,
    top_p_filter,
)

VOCAB = 1000


def random_case(seed: int, vocab: int = VOCAB) -> tuple[np.ndarray, list[int]]:
    """float32 logits like a model's, and a history with repeats and ids past the LM head."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 6)).astype(np.float32)
    history = rng.integers(0, vocab + 10, size=int(rng.integers(1, 60))).tolist()
    return logits, history


def reference(processors: list, logits: np.ndarray, history: list[int]) -> np.ndarray:
    scores = torch.from_numpy(logits.copy())[None]
    ids = torch.tensor([history])
    for processor in processors:
        scores = processor(ids, scores)
    return scores[0].double().numpy()


def assert_same_scores(ours: np.ndarray, ref: np.ndarray) -> None:
    """Same surviving tokens, and the same distribution over them."""
    np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
    np.testing.assert_allclose(ours[np.isfinite(ours)], ref[np.isfinite(ref)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(softmax(ours), softmax(ref), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(seed, penalty):
    logits, history = random_case(seed)
    ref = reference([RepetitionPenaltyLogitsProcessor(penalty)], logits, history)
    assert_same_scores(apply_repetition_penalty(logits, history, penalty), ref)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.8])
def test_temperature_matches_transformers(seed, temperature):
    logits, history = random_case(seed)
    config = SamplingConfig(do_sample=True, temperature=temperature)
    assert_same_scores(Sampler(config).process(logits, history), reference([TemperatureLogitsWarper(temperature)], logits, history))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("top_k", [1, 2, 40, VOCAB - 1, VOCAB, VOCAB + 5])
def test_top_k_matches_transformers(seed, top_k):
    logits, history = random_case(seed)
    ref = reference([TopKLogitsWarper(top_k)], logits, history)
    ours = top_k_filter(logits.astype(np.float64), top_k)
    assert_same_scores(ours, ref)
    assert np.isfinite(ours).sum() == min(top_k, VOCAB)


def test_top_k_keeps_every_tie_like_transformers():
    logits = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0, -1.0], dtype=np.float32)
    for k in range(1, 8):
        assert_same_scores(top_k_filter(logits.astype(np.float64), k), reference([TopKLogitsWarper(k)], logits, [0]))
    assert np.isfinite(top_k_filter(logits.astype(np.float64), 3)).sum() == 5  # 3, 3 and all three 2s


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.8, 0.95, 0.999])
def test_top_p_matches_transformers(seed, top_p):
    logits, history = random_case(seed)
    ref = reference([TopPLogitsWarper(top_p)], logits, history)
    assert_same_scores(top_p_filter(logits.astype(np.float64), top_p), ref)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.999999])
@pytest.mark.parametrize("spread", [0.3, 4.0])
def test_top_p_over_a_large_vocabulary_matches_transformers(seed, top_p, spread):
    # Past TOP_P_HEAD tokens lvb sorts only the head when the tail surely goes (peaked
    # logits, spread 4) and the whole vocabulary when it may not (flat logits, spread 0.3).
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(128256) * spread).astype(np.float32)
    logits[rng.integers(0, logits.size, 2000)] = 3.0  # ties across the head's edge
    ref = reference([TopPLogitsWarper(top_p)], logits, [0])
    assert_same_scores(top_p_filter(logits.astype(np.float64), top_p), ref)


def test_top_p_keeps_at_least_the_best_token():
    logits = np.array([0.0, 20.0, 1.0], dtype=np.float32)  # the best token alone is > top_p
    ref = reference([TopPLogitsWarper(0.01)], logits, [0])
    ours = top_p_filter(logits.astype(np.float64), 0.01)
    assert_same_scores(ours, ref)
    assert np.flatnonzero(np.isfinite(ours)).tolist() == [1]


def test_top_p_ties_cut_where_transformers_cuts():
    # Equal logits straddling the cut: transformers' pick among them follows torch's
    # unstable sort, so only the cut itself is defined; ours keeps the same number of
    # tokens with the same values, choosing among equals by id.
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 300))
        logits = rng.integers(-3, 4, size=n).astype(np.float32)
        logits[rng.random(n) < 0.2] = -np.inf
        logits[0] = 0.0
        top_p = float(rng.choice([0.1, 0.5, 0.9, 0.99]))
        ref = reference([TopPLogitsWarper(top_p)], logits, [0])
        ours = top_p_filter(logits.astype(np.float64), top_p)
        np.testing.assert_array_equal(np.sort(ours[np.isfinite(ours)]), np.sort(ref[np.isfinite(ref)]))


@pytest.mark.parametrize("seed", range(4))
def test_end_tokens_held_back_as_min_new_tokens_does(seed):
    """min_new_tokens (vLLM's min_tokens) is transformers' MinNewTokensLengthLogitsProcessor; ignore_eos never
    picks the end tokens; a stop token id is handed back as the token the caller stops on."""
    from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

    logits, prompt = random_case(seed)
    eos = [int(np.argmax(logits)), 3]
    config = SamplingConfig(min_new_tokens=2, eos_ids=tuple(eos))
    sampler = Sampler(config)
    for generated in range(4):
        history = prompt + [5] * generated
        ref = reference([MinNewTokensLengthLogitsProcessor(len(prompt), 2, eos, device="cpu")], logits, history)
        assert_same_scores(sampler.process(logits, history), ref)
    assert Sampler(SamplingConfig(suppress_ids=(eos[0],)))(logits, prompt) != eos[0]
    stopping = Sampler(SamplingConfig(stop_token_ids=(eos[0],), stop_as=99))
    assert stopping(logits, prompt) == 99
    assert SamplingConfig(min_new_tokens=2, eos_ids=(1,)).needs_logits and not SamplingConfig().needs_logits


def tiny_model(generation_config: dict) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**generation_config)
    return model


# Llama-3.2-11B-Vision-Instruct's generation_config.json sampling settings, and variations.
GENERATION_CONFIGS = [
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {}),
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9}, {"top_k": 0, "repetition_penalty": 1.2}),
    ({"do_sample": True, "top_k": 7, "repetition_penalty": 1.1}, {"temperature": 1.5, "top_p": 0.5}),
    ({"do_sample": False}, {"repetition_penalty": 1.3}),
    ({}, {"do_sample": True}),
    ({"do_sample": True, "temperature": 0.7, "min_p": 0.1}, {}),
    ({"do_sample": True, "top_p": 0.9, "top_k": 0}, {"min_p": 0.05, "temperature": 1.3}),
]


@pytest.mark.parametrize("checkpoint_config, overrides", GENERATION_CONFIGS)
def test_pipeline_is_generates(checkpoint_config, overrides):
    """The processors generate() builds for a checkpoint's generation config plus user options."""
    model = tiny_model(checkpoint_config)
    generation_config, _ = model._prepare_generation_config(None, **overrides)
    processors = model._get_logits_processor(
        generation_config, input_ids_seq_length=10, logits_processor=LogitsProcessorList(), device="cpu", model_kwargs={}
    )
    config = SamplingConfig.from_generation_config(checkpoint_config, **overrides)
    assert config.do_sample == generation_config.do_sample
    for seed in range(5):
        logits, history = random_case(seed)
        ref = reference(list(processors), logits, history)
        ours = Sampler(config).process(logits, history)
        assert_same_scores(ours, ref)
        if not config.do_sample:
            assert Sampler(config)(logits, history) == int(np.argmax(ref))


def test_from_generation_config_defaults_and_overrides():
    # generate() fills what the file leaves out with its defaults, top_k=50 included.
    assert SamplingConfig.from_generation_config({}) == SamplingConfig(top_k=50)
    llama = {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "eos_token_id": [1, 2]}
    assert SamplingConfig.from_generation_config(llama) == SamplingConfig(True, 0.6, 50, 0.9)
    config = SamplingConfig.from_generation_config(llama, temperature=None, top_k=0, seed=3, do_sample=False)
    assert config == SamplingConfig(False, 0.6, 0, 0.9, 1.0, 3)
    assert SamplingConfig.from_generation_config({"top_k": None, "top_p": None}).top_k == GENERATE_DEFAULTS["top_k"]
    with pytest.raises(ValueError, match="unknown sampling option.*typical_p"):
        SamplingConfig.from_generation_config({}, typical_p=0.1)


@pytest.mark.parametrize(
    "options, name",
    [
        (dict(do_sample=True, temperature=0.0), "temperature"),
        (dict(do_sample=True, temperature=-1.0), "temperature"),
        (dict(do_sample=True, temperature=math.nan), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=-0.1), "top_p"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(repetition_penalty=0.0), "repetition_penalty"),
        (dict(repetition_penalty=-2.0), "repetition_penalty"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_options_raise_a_one_line_message(options, name):
    with pytest.raises(ValueError) as info:
        SamplingConfig(**options)
    message = str(info.value)
    assert message.startswith(name) and "\n" not in message
    with pytest.raises(ValueError, match=name):
        SamplingConfig.from_generation_config({}, **options)


def test_greedy_ignores_temperature_and_is_argmax_after_penalty():
    SamplingConfig(do_sample=False, temperature=0.0)  # as in transformers: unused when greedy
    logits = np.array([0.1, 2.0, 1.9, -3.0], dtype=np.float32)
    assert Sampler()(logits, [1]) == 1
    assert Sampler(SamplingConfig(repetition_penalty=1.2))(logits, [1]) == 2  # 2.0 / 1.2 < 1.9
    assert Sampler(SamplingConfig(repetition_penalty=1.2))(logits, [1, 99]) == 2  # 99 is past the vocab
    assert Sampler(SamplingConfig(top_k=1, top_p=0.1))(logits, [1]) == 1  # warpers only apply when sampling


def draw(config: SamplingConfig, logits: np.ndarray, history: list[int], n: int) -> np.ndarray:
    sampler = Sampler(config)
    return np.array([sampler(logits, history) for _ in range(n)])


def test_draws_follow_transformers_distribution():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 1.5, 12).astype(np.float32)
    history = [0, 3, 3, 40]
    config = SamplingConfig(do_sample=True, temperature=0.7, top_k=8, top_p=0.95, repetition_penalty=1.3, seed=7)
    processors = [
        RepetitionPenaltyLogitsProcessor(1.3),
        TemperatureLogitsWarper(0.7),
        TopKLogitsWarper(8),
        TopPLogitsWarper(0.95),
    ]
    target = softmax(reference(processors, logits, history))
    n = 20_000
    counts = np.bincount(draw(config, logits, history, n), minlength=logits.size)
    assert counts[target == 0].sum() == 0
    support = target > 0
    assert support.sum() >= 4
    # Each frequency within 5 standard errors; chi-square within 5 sigma of its mean.
    frequency = counts / n
    standard_error = np.sqrt(target * (1 - target) / n)
    assert np.all(np.abs(frequency - target)[support] <= 5 * standard_error[support])
    expected = n * target[support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    df = support.sum() - 1
    assert chi2 < df + 5 * math.sqrt(2 * df)


def test_top_k_and_top_p_never_leave_their_sets():
    rng = np.random.default_rng(2)
    logits = rng.normal(0, 2, 50).astype(np.float32)
    top5 = set(np.argsort(logits)[-5:].tolist())
    assert set(draw(SamplingConfig(do_sample=True, top_k=5, seed=0), logits, [], 3000).tolist()) <= top5
    nucleus = set(np.flatnonzero(np.isfinite(reference([TopPLogitsWarper(0.6)], logits, [0]))).tolist())
    assert 1 < len(nucleus) < 50
    seen = set(draw(SamplingConfig(do_sample=True, top_p=0.6, seed=0), logits, [], 3000).tolist())
    assert seen <= nucleus and len(seen) > 1


def test_low_temperature_concentrates():
    logits = np.array([1.0, 1.5, 0.2, 1.4], dtype=np.float32)
    hot = draw(SamplingConfig(do_sample=True, temperature=1.0, seed=0), logits, [], 2000)
    cold = draw(SamplingConfig(do_sample=True, temperature=1e-3, seed=0), logits, [], 2000)
    assert len(set(hot.tolist())) == 4
    assert set(cold.tolist()) == {1}


def test_seed_reproducible_and_seeds_differ():
    logits, history = random_case(3, vocab=200)
    config = SamplingConfig(do_sample=True, temperature=1.2, seed=123)
    a = draw(config, logits, history, 200)
    assert np.array_equal(a, draw(config, logits, history, 200))
    assert not np.array_equal(a, draw(SamplingConfig(do_sample=True, temperature=1.2, seed=124), logits, history, 200))
    assert len(draw(SamplingConfig(do_sample=True), logits, history, 5)) == 5  # seed None: fresh entropy


def test_sampler_never_picks_a_removed_token_and_rejects_dead_logits():
    logits = np.full(10, -np.inf, dtype=np.float32)
    logits[[2, 7]] = [0.0, 0.5]
    assert set(draw(SamplingConfig(do_sample=True, seed=0), logits, [], 500).tolist()) == {2, 7}
    with pytest.raises(ValueError, match="maximum"):
        Sampler(SamplingConfig(do_sample=True, seed=0))(np.full(4, -np.inf), [])
