"""The shared generation loop: batching, stopping, sampling filters, streaming."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, ends_in_loop, generate
from research.common.sampling import apply_repetition_penalty, filter_top_k_top_p
from research.visualglm.modeling_glm import glm_positions_and_mask
from tests.visualglm.glm_fixtures import glm_from_state_dict, prompt, random_bodies, sat_state_dict, tiny_glm_config
from tests.sat_reference import sat_chatglm_model


@pytest.fixture(scope="module")
def config():
    return tiny_glm_config()


@pytest.fixture(scope="module")
def model(config):
    ms.set_context(mode=ms.GRAPH_MODE)
    return glm_from_state_dict(sat_state_dict(sat_chatglm_model(config, seed=7)), config)


def greedy(config, **kwargs):
    return GenerationConfig(pad_token_id=config.pad_token_id, **kwargs)


@pytest.mark.parametrize("use_past", [True, False])
def test_batch_of_three_equals_one_by_one(model, config, use_past):
    prompts = [prompt(b, config) for b in random_bodies(11, [3, 9, 14])]
    settings = greedy(config, max_new_tokens=12, use_past=use_past)
    batched = generate(model, prompts, settings)
    alone = [generate(model, [p], settings)[0] for p in prompts]
    assert batched == alone
    assert len({tuple(row) for row in batched}) == 3  # the rows really differ


def test_stops_at_eos_and_stop_ids(model, config):
    ids = prompt(random_bodies(12, [6])[0], config)
    free = generate(model, [ids], greedy(config, max_new_tokens=10))[0]
    stop_at = free[4]
    first = free.index(stop_at)
    stopped = generate(model, [ids], greedy(config, max_new_tokens=10, eos_token_id=stop_at))[0]
    assert stopped == free[:first + 1]
    by_stop_list = generate(model, [ids], greedy(config, max_new_tokens=10, stop_sequences=[[stop_at]]))[0]
    assert by_stop_list == stopped


def test_multi_token_stop_sequences_stop_each_row_on_its_own(model, config):
    """A row stops right after the first place its new tokens end with a stop sequence (a pair
    here, as MiniGPT-4's "##" "#"); the other rows keep going, as they would alone."""
    prompts = [prompt(b, config) for b in random_bodies(21, [5, 7])]
    free = generate(model, prompts, greedy(config, max_new_tokens=10))
    pair = tuple(free[0][3:5])
    settings = greedy(config, max_new_tokens=10, stop_sequences=[(999999,), pair])
    stopped = generate(model, prompts, settings)

    def cut(row):
        for end in range(2, len(row) + 1):
            if tuple(row[end - 2:end]) == pair:
                return row[:end]
        return row

    assert stopped[0] == cut(free[0]) and len(stopped[0]) <= 5
    assert stopped[1] == cut(free[1])
    assert stopped == [generate(model, [p], settings)[0] for p in prompts]


def test_length_limits(model, config):
    ids = prompt(random_bodies(13, [6])[0], config)
    assert len(generate(model, [ids], greedy(config, max_new_tokens=5))[0]) == 5
    assert len(generate(model, [ids], greedy(config, max_length=len(ids) + 3))[0]) == 3
    # without limits generation runs to the end of the static sequence
    assert len(generate(model, [ids], greedy(config))[0]) == config.seq_length - len(ids)


def test_streaming_callback_sees_every_token(model, config):
    prompts = [prompt(b, config) for b in random_bodies(14, [4, 8])]
    seen = []
    out = generate(model, prompts, greedy(config, max_new_tokens=6), on_tokens=seen.append)
    assert len(seen) == 6
    assert [[step[row] for step in seen] for row in range(2)] == out


def test_sampling_is_seeded_and_differs_from_greedy(model, config):
    ids = prompt(random_bodies(15, [6])[0], config)
    settings = dict(max_new_tokens=12, do_sample=True, top_k=50, top_p=0.95, temperature=1.5)
    first = generate(model, [ids], greedy(config, seed=1, **settings))[0]
    again = generate(model, [ids], greedy(config, seed=1, **settings))[0]
    other = generate(model, [ids], greedy(config, seed=2, **settings))[0]
    assert first == again
    assert first != other


def test_prompt_longer_than_seq_length_is_a_clear_error(model, config):
    too_long = prompt(list(range(10, 10 + config.seq_length)), config)
    with pytest.raises(UserInputError, match=f"{len(too_long)} tokens but seq_length is {config.seq_length}"):
        generate(model, [too_long], greedy(config, max_new_tokens=2))


def test_top_k_keeps_exactly_the_k_largest():
    logits = np.array([[0.1, 3.0, -1.0, 2.0, 0.5]], np.float32)
    kept = np.isfinite(filter_top_k_top_p(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = np.log(probs).astype(np.float32)
    # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the first two stay
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [[True, True, False, False]]
    # top_p below the largest probability still keeps one token
    assert np.isfinite(filter_top_k_top_p(logits, 0, 0.1)).sum() == 1


def test_repetition_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([[2.0, -2.0, 1.0]], np.float32)
    out = apply_repetition_penalty(logits.copy(), [np.array([0, 1, 1])], 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0]]


@pytest.mark.parametrize("field, value", [("temperature", 0.0), ("top_p", 1.5), ("top_k", -1),
                                          ("max_new_tokens", 0)])
def test_bad_generation_settings_are_rejected(model, config, field, value):
    with pytest.raises(UserInputError, match=field):
        generate(model, [prompt([20], config)], greedy(config, **{field: value}))


def test_in_place_cache_gives_the_full_forward_logits(model, config):
    """Prefill then one token at a time into the in-place cache: each step's logits equal the
    full (cache-free) forward's at that position, for a left-padded batch."""
    length = 24
    ids = np.full((2, length), config.pad_token_id, np.int32)
    bodies = random_bodies(21, [10, 7])
    for row, body in enumerate(bodies):
        ids[row, row * 3:12] = prompt(body, config)
        ids[row, 12:] = np.arange(30, 30 + length - 12) + row
    pads = [0, 3]
    positions, mask = glm_positions_and_mask(ids, pads, config)
    full = model(Tensor(ids), Tensor(positions), Tensor(mask))[0].asnumpy()
    assert model.start_cache(2, length) == 32
    decoder = model.cached_decoder
    assert model.start_cache(2, 20) == 32 and model.cached_decoder is decoder  # one cache per size
    positions, mask = glm_positions_and_mask(np.pad(ids, ((0, 0), (0, 8))), pads, config)
    got = [model.prefill(input_ids=ids[:, :12], position_ids=positions[..., :12],
                         attention_mask=mask[..., :12, :], logits_index=np.full((2,), 11, np.int32))]
    for step in range(12, length):
        got.append(model.decode(input_ids=ids[:, step:step + 1], position_ids=positions[..., step:step + 1],
                                attention_mask=mask[..., step:step + 1, :], cache_index=step))
    np.testing.assert_allclose(np.stack(got, axis=1), full[:, 11:], atol=1e-5, rtol=0)
    assert model.start_cache(2, 40) == config.seq_length  # capped at seq_length
    assert not any("cache" in p.name for p in model.get_parameters())  # not saved as weights


@pytest.mark.parametrize("tokens, max_block, expected", [
    ([4, 7, 7, 7], 1, True),
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 3, True),
    ([1, 2, 3, 1, 2, 3, 1, 2, 3], 2, False),  # a 3-token loop needs blocks of 3
    ([5, 1, 2, 1, 2], 2, False),  # twice is not a loop
    ([9, 9], 4, False),
])
def test_ends_in_loop(tokens, max_block, expected):
    assert ends_in_loop(tokens, max_block) is expected
