"""The sampling rules against their upstream references on the same logits and history:
"sat" against SwissArmyTransformer's BaseStrategy (VisualGLM's sampler), "hf" against
transformers' logits processors (ChatGLM2's and MiniGPT-4's)."""
import dataclasses
import itertools
from typing import Optional

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor,
                                                    SuppressTokensLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from research.common.errors import UserInputError
from research.common.sampling import (INVALID_SCORE_TOKEN, check_sampling_settings, choose_next_tokens,
                                      guard_invalid_scores, history_free_argmax, next_token_probabilities)
from tests.sat_reference import _prepare_sat_import

VOCAB, VALID = 2048, 2000  # ids >= VALID are banned when valid_vocab_size is set
SETTINGS = list(itertools.product([0.95, 0.7], [0, 1, 30], [0.7, 1.0], [1.0, 1.2], [None, VALID]))


@dataclasses.dataclass
class Settings:
    """The generation-config fields the rules read."""

    sampling_rule: str
    do_sample: bool = True
    top_k: int = 0
    top_p: float = 1.0
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    valid_vocab_size: Optional[int] = None


def history_case(seed, batch=3, prompt_length=8, generated_length=6):
    """Random logits [B,V] with prompt and generated ids (distinct per row) planted where the
    two rules disagree: a prompt-only id leads by 0.5 (HF's penalty drops it below the
    runner-up, SAT's leaves it), a generated id repeats (penalised once, not twice), one has a
    negative logit (SAT's division raises it, HF's multiplication lowers it), and a banned id
    has a large logit."""
    rng = np.random.RandomState(seed)
    # below 7 and without ties (upstream's sorts break ties in no documented order)
    logits = (7 * np.tanh(rng.randn(batch, VOCAB) / 3)).astype(np.float32)
    ids = np.stack([rng.permutation(VALID)[:prompt_length + generated_length + 1]
                    for _ in range(batch)])
    prompts, generated, runner_up = (ids[:, :prompt_length], ids[:, prompt_length:-1], ids[:, -1])
    generated[:, 1] = generated[:, 0]
    rows = np.arange(batch)
    logits[rows, prompts[:, 0]] = 8.5
    logits[rows, runner_up] = 8.0
    logits[rows, generated[:, 0]] = 7.5
    logits[rows, generated[:, 2]] = -6.0
    logits[:, VALID + 5] = 8.4
    return logits, prompts, generated


@pytest.fixture
def base_strategy(monkeypatch):
    """Returns run(settings, steps) -> the distribution SAT's BaseStrategy draws from at each
    step; `steps` is [(logits, tokens so far)], the first with the prompt only, as
    filling_sequence calls it (the first call fixes the prompt length)."""
    _prepare_sat_import()
    from sat.generation.sampling_strategies import base_strategy as module

    # forward() asks the model-parallel group's size after its draw; a test has no group
    monkeypatch.setattr(module, "get_model_parallel_world_size", lambda: 1)
    drawn = []

    def multinomial(probs, num_samples):
        drawn.append(probs.clone())
        return torch.argmax(probs, dim=-1, keepdim=True)

    monkeypatch.setattr(torch, "multinomial", multinomial)

    def run(settings, steps):
        valid = settings.valid_vocab_size
        invalid = [] if valid is None else [slice(valid, None)]
        strategy = module.BaseStrategy(
            invalid_slices=invalid, temperature=settings.temperature, top_k=settings.top_k,
            top_p=settings.top_p, repetition_penalty=settings.repetition_penalty, end_tokens=[])
        drawn.clear()
        for logits, tokens in steps:
            strategy.forward(torch.tensor(logits), torch.tensor(tokens), None)
        return [probs.numpy() for probs in drawn]

    return run


def transformers_probabilities(settings, logits, history, greedy=False):
    """The distribution `generate` samples from (greedy: the scores it takes the argmax of),
    with its processors in generate's order."""
    processors = []
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.valid_vocab_size is not None:
        banned = list(range(settings.valid_vocab_size, logits.shape[-1]))
        processors.append(SuppressTokensLogitsProcessor(banned))
    if not greedy:
        processors.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k > 0:
            processors.append(TopKLogitsWarper(settings.top_k))
        if settings.top_p < 1.0:
            processors.append(TopPLogitsWarper(settings.top_p))
    scores = torch.tensor(logits)
    for processor in processors:
        scores = processor(torch.tensor(history), scores)
    return scores.numpy() if greedy else torch.softmax(scores, dim=-1).numpy()


def no_generated(prompts):
    return [np.zeros(0, np.int64)] * len(prompts)


@pytest.mark.parametrize("temperature, top_k, top_p, penalty, valid", SETTINGS)
def test_sat_rule_matches_base_strategy(base_strategy, temperature, top_k, top_p, penalty, valid):
    first_logits = history_case(1)[0]
    logits, prompts, generated = history_case(0)
    settings = Settings("sat", top_k=top_k, top_p=top_p, temperature=temperature,
                        repetition_penalty=penalty, valid_vocab_size=valid)
    reference_first, reference = base_strategy(
        settings, [(first_logits, prompts), (logits, np.concatenate([prompts, generated], axis=1))])

    ours_first = next_token_probabilities(first_logits, prompts, no_generated(prompts), settings)
    ours = next_token_probabilities(logits, prompts, generated, settings)
    np.testing.assert_allclose(ours_first, reference_first, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    if valid is not None:
        assert not ours[:, valid:].any()
    if penalty != 1.0:  # the HF rule, on the same input, is not BaseStrategy's
        hf = dataclasses.replace(settings, sampling_rule="hf")
        hf = next_token_probabilities(logits, prompts, generated, hf)
        assert np.abs(hf - reference).max() > 0.05


@pytest.mark.parametrize("temperature, top_k, top_p, penalty, valid", SETTINGS)
def test_hf_rule_matches_transformers_processors(temperature, top_k, top_p, penalty, valid):
    logits, prompts, generated = history_case(2)
    settings = Settings("hf", top_k=top_k, top_p=top_p, temperature=temperature,
                        repetition_penalty=penalty, valid_vocab_size=valid)
    history = np.concatenate([prompts, generated], axis=1)
    reference = transformers_probabilities(settings, logits, history)

    ours = next_token_probabilities(logits, prompts, generated, settings)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)
    if penalty != 1.0:  # the SAT rule, on the same input, is not transformers'
        sat = dataclasses.replace(settings, sampling_rule="sat")
        sat = next_token_probabilities(logits, prompts, generated, sat)
        assert np.abs(sat - reference).max() > 0.05


def test_top_k_keeps_every_id_tied_with_the_kth(base_strategy):
    logits = np.array([[5.0, 3.0, 1.0, 3.0, 0.0, 3.0]], np.float32)
    prompts = np.array([[0]])
    sat = Settings("sat", top_k=2)
    (sat_reference,) = base_strategy(sat, [(logits, prompts)])
    hf = Settings("hf", top_k=2)
    hf_reference = transformers_probabilities(hf, logits, prompts)

    for settings, reference in [(sat, sat_reference), (hf, hf_reference)]:
        ours = next_token_probabilities(logits, prompts, no_generated(prompts), settings)
        assert np.flatnonzero(ours[0]).tolist() == [0, 1, 3, 5]
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_greedy_takes_the_argmax_of_each_rules_penalised_logits(base_strategy):
    # Row 0: prompt-only id 10 leads id 30 by 0.5; HF penalises prompt ids (8.5 / 1.2 < 8),
    # SAT only generated ones. Row 1: all negative; generated id 20 trails id 31 by 0.1; SAT
    # divides it whatever the sign (-1.1 / 1.2 > -1), HF multiplies it. Id 60 is banned.
    logits = np.full((2, 64), -3.0, np.float32)
    logits[0, [10, 30]] = [8.5, 8.0]
    logits[1, [31, 20]] = [-1.0, -1.1]
    logits[:, 60] = 9.0
    prompts = np.array([[10, 11, 12], [10, 11, 12]])
    generated = np.array([[20, 21], [20, 21]])
    history = np.concatenate([prompts, generated], axis=1)
    sat = Settings("sat", do_sample=False, temperature=0.95, repetition_penalty=1.2,
                   valid_vocab_size=60)
    hf = dataclasses.replace(sat, sampling_rule="hf")

    # upstream greedy: BaseStrategy with top_k 1; generate without warpers
    _, sat_reference = base_strategy(dataclasses.replace(sat, top_k=1),
                                     [(logits, prompts), (logits, history)])
    hf_reference = transformers_probabilities(hf, logits, history, greedy=True)

    rng = np.random.RandomState(0)
    assert choose_next_tokens(logits, prompts, generated, sat, rng).tolist() == [10, 20]
    assert np.argmax(sat_reference, axis=-1).tolist() == [10, 20]
    assert choose_next_tokens(logits, prompts, generated, hf, rng).tolist() == [30, 31]
    assert np.argmax(hf_reference, axis=-1).tolist() == [30, 31]


@pytest.mark.parametrize("rule", ["hf", "sat"])
def test_sampled_tokens_follow_the_upstream_distribution(base_strategy, rule):
    logits, prompts, generated = history_case(3, batch=2)
    settings = Settings(rule, top_k=8, top_p=0.9, temperature=0.95, repetition_penalty=1.2,
                        valid_vocab_size=VALID)
    history = np.concatenate([prompts, generated], axis=1)
    if rule == "sat":
        reference = base_strategy(settings, [(logits, prompts), (logits, history)])[-1]
    else:
        reference = transformers_probabilities(settings, logits, history)
    rng = np.random.RandomState(0)
    draws = np.stack([choose_next_tokens(logits, prompts, generated, settings, rng)
                      for _ in range(4000)])
    for row in range(2):
        frequency = np.bincount(draws[:, row], minlength=VOCAB) / len(draws)
        assert not frequency[reference[row] == 0].any()
        np.testing.assert_allclose(frequency, reference[row], atol=0.03)


@pytest.mark.parametrize("rule", ["hf", "sat"])
def test_a_draw_is_the_one_a_dense_choice_over_the_vocabulary_makes(rule):
    """Drawing among the kept ids only must not change which token a seed gives."""
    logits, prompts, generated = history_case(4, batch=2)
    settings = Settings(rule, top_k=30, top_p=0.9, temperature=0.95, repetition_penalty=1.2)
    probs = next_token_probabilities(logits, prompts, generated, settings)
    for seed in range(100):
        dense_rng = np.random.RandomState(seed)
        dense = [dense_rng.choice(VOCAB, p=row) for row in probs]
        drawn = choose_next_tokens(logits, prompts, generated, settings, np.random.RandomState(seed))
        assert drawn.tolist() == dense


def test_settings_a_rule_would_ignore_are_refused():
    check_sampling_settings(Settings("hf", top_k=0, top_p=0.7))
    check_sampling_settings(Settings("sat", do_sample=False, top_k=0, top_p=0.7))
    check_sampling_settings(Settings("sat", top_k=30, top_p=0.7))
    # BaseStrategy applies top_p only under top_k > 0 (test_sat_rule_matches_base_strategy)
    with pytest.raises(UserInputError, match="top_p 0.7 with top_k 0 would be ignored"):
        check_sampling_settings(Settings("sat", top_k=0, top_p=0.7))
    with pytest.raises(UserInputError, match="sampling_rule must be one of hf, sat, got 'beam'"):
        check_sampling_settings(Settings("beam"))


def test_only_a_history_free_greedy_choice_becomes_an_argmax():
    assert history_free_argmax(Settings("hf", do_sample=True)) is None
    assert history_free_argmax(Settings("sat", do_sample=False, repetition_penalty=1.2)) is None
    hf = history_free_argmax(Settings("hf", do_sample=False, temperature=0.5, valid_vocab_size=100))
    assert (hf.below, hf.temperature) == (100, 1.0)  # HF's greedy does not divide
    sat = history_free_argmax(Settings("sat", do_sample=False, temperature=0.5))
    assert sat.temperature == 0.5 and sat.below >= 2 ** 31 - 1


def test_invalid_score_guard_replaces_only_the_bad_rows():
    logits = np.array([[0.5, np.inf, 1.0, 0.0, 0.0, 0.0, 2.0], [0.5, 3.0, 1.0, 0.0, 0.0, 0.0, 2.0]], np.float32)
    guarded = guard_invalid_scores(logits)
    assert guarded[0].tolist() == [0, 0, 0, 0, 0, 5e4, 0] and INVALID_SCORE_TOKEN == 5
    assert guarded[1].tolist() == logits[1].tolist()
