"""The generation interface and the shared in-place KV cache with a decoder that is not the GLM:
a 2-layer toy with grouped KV heads (4 query heads share 2 cached groups, as ChatGLM2's 32
heads share 2) and [B,S] positions (ChatGLM2 / LLaMA style, not GLM's [B,2,S])."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from research.common.generation import CausalLM, GenerationConfig, generate
from research.common.kv_cache import (InGraphCausalLM, argmax_ids, cache_slot_indices, expand_kv_groups,
                                      write_cache)
from research.common.sampling import choose_next_tokens, history_free_argmax

VOCAB, HIDDEN, HEADS, GROUPS, HEAD_DIM, LAYERS, SEQ = 48, 32, 4, 2, 8, 2, 32


class ToyConfig:
    seq_length = SEQ


class ToyLayer(nn.Cell):
    def __init__(self):
        super().__init__()
        self.query = nn.Dense(HIDDEN, HEADS * HEAD_DIM)
        self.key_value = nn.Dense(HIDDEN, 2 * GROUPS * HEAD_DIM)
        self.output = nn.Dense(HEADS * HEAD_DIM, HIDDEN)

    def construct(self, hidden, attend, key_cache, value_cache, cache_slots):
        batch, length, _ = hidden.shape
        query = self.query(hidden).reshape(batch, length, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
        key, value = ops.chunk(self.key_value(hidden).reshape(batch, length, 2 * GROUPS, HEAD_DIM)
                               .transpose(0, 2, 1, 3), 2, axis=1)
        if key_cache is not None:
            key = write_cache(key_cache, key, cache_slots)
            value = write_cache(value_cache, value, cache_slots)
        scores = ops.matmul(query, expand_kv_groups(key, HEADS // GROUPS).transpose(0, 1, 3, 2))
        scores = ops.select(attend, scores / HEAD_DIM ** 0.5, ops.full_like(scores, -1e4))
        context = ops.matmul(ops.softmax(scores, axis=-1), expand_kv_groups(value, HEADS // GROUPS))
        hidden = hidden + self.output(context.transpose(0, 2, 1, 3).reshape(batch, length, -1))
        return ops.tanh(hidden)


class ToyDecoder(InGraphCausalLM, nn.Cell):
    def __init__(self):
        super().__init__()
        self.config = ToyConfig()
        self.embedding = nn.Embedding(VOCAB, HIDDEN)
        self.positions = nn.Embedding(SEQ, HIDDEN)
        self.layers = nn.CellList([ToyLayer() for _ in range(LAYERS)])
        self.head = nn.Dense(HIDDEN, VOCAB)

    def kv_cache_layout(self):
        return LAYERS, GROUPS, HEAD_DIM, ms.float32

    def embed_tokens(self, input_ids):
        return self.embedding(input_ids)

    def generation_inputs(self, input_ids, pad_lengths):
        batch, length = input_ids.shape
        positions = np.zeros((batch, length), np.int32)
        mask = np.tile(np.tril(np.ones((length, length), np.float32)), (batch, 1, 1, 1))
        for row, pad in enumerate(pad_lengths):
            positions[row, pad:] = np.arange(length - pad)  # 0 over the padding
            mask[row, 0, :, :pad] = 0
        return positions, mask

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds=None, key_cache=None,
                  value_cache=None, cache_index=None, logits_index=None):
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        hidden = inputs_embeds + self.positions(position_ids)
        attend = attention_mask > 0
        cache_slots = None
        if key_cache is not None:
            cache_slots = cache_slot_indices(hidden.shape[0], GROUPS, hidden.shape[1], cache_index)
        for i, layer in enumerate(self.layers):
            if key_cache is None:
                hidden = layer(hidden, attend, None, None, None)
            else:
                hidden = layer(hidden, attend, key_cache[i], value_cache[i], cache_slots)
        if logits_index is not None:
            index = ops.broadcast_to(logits_index.reshape(-1, 1, 1), (hidden.shape[0], 1, HIDDEN))
            hidden = ops.gather_elements(hidden, 1, index).squeeze(1)
        return self.head(hidden), None, None


@pytest.fixture(scope="module")
def toy():
    model = ToyDecoder()
    rng = np.random.RandomState(3)
    for param in model.get_parameters():  # large enough that the rows' answers differ
        param.set_data(Tensor(rng.normal(0, 0.5, param.shape).astype(np.float32)))
    model.set_train(False)
    return model


def test_toy_decoder_implements_the_generation_interface(toy):
    assert isinstance(toy, CausalLM)


def test_cached_and_uncached_generation_give_the_same_tokens(toy, mode):
    prompts = [[5, 9, 13, 2, 7, 30, 41], [11, 3], [40, 8, 22, 19]]
    settings = dict(max_new_tokens=12, pad_token_id=0, repetition_penalty=1.0)
    cached = generate(toy, prompts, GenerationConfig(use_past=True, **settings))
    uncached = generate(toy, prompts, GenerationConfig(use_past=False, **settings))
    assert cached == uncached
    assert all(len(row) == 12 for row in cached)
    assert len({tuple(row) for row in cached}) == 3  # the rows really differ
    assert [generate(toy, [p], GenerationConfig(use_past=True, **settings))[0] for p in prompts] == cached


def test_the_cache_holds_only_the_kv_groups(toy):
    length = toy.start_cache(3, 20)
    assert length == 32  # bucketed to a power of two, capped at seq_length
    caches = [p for p in toy.cached_decoder.get_parameters() if "cache" in p.name]
    assert len(caches) == 2 * LAYERS
    assert {tuple(p.shape) for p in caches} == {(3, GROUPS, length, HEAD_DIM)}
    assert not any("cache" in p.name for p in toy.get_parameters())


def test_expand_kv_groups_repeats_each_group_for_consecutive_heads():
    groups = Tensor(np.arange(2 * 3, dtype=np.float32).reshape(1, 2, 3, 1))
    out = expand_kv_groups(groups, 2).asnumpy()[0, :, :, 0]
    assert out.tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]


@pytest.mark.parametrize("rule", ["hf", "sat"])
def test_argmax_in_the_graph_is_the_rules_greedy_choice(toy, mode, rule):
    """prefill/decode with `argmax` return the ids that the rule's greedy choice takes from
    the logits the same calls return without it (the banned tail of the vocabulary too)."""
    ids = np.zeros((2, 8), np.int32)
    ids[0, :6], ids[1, 2:6] = [5, 9, 13, 2, 7, 30], [11, 3, 40, 8]
    positions, mask = toy.generation_inputs(ids, [0, 2])
    toy.start_cache(2, 8)
    prompt = dict(input_ids=ids[:, :6], position_ids=positions[..., :6], attention_mask=mask[..., :6, :],
                  logits_index=np.array([5, 5], np.int32))
    step = dict(input_ids=np.array([[3], [4]], np.int32), position_ids=positions[..., 6:7],
                attention_mask=mask[..., 6:7, :], cache_index=6)
    logits = toy.prefill(**prompt)
    banned = int(logits.argmax(-1).max())  # ban the best id of one row at least
    assert banned > 0
    config = GenerationConfig(sampling_rule=rule, temperature=0.7, valid_vocab_size=banned)
    argmax = history_free_argmax(config)
    history = [np.zeros(0, np.int32)] * 2
    expected = choose_next_tokens(logits, history, history, config, None)
    assert expected.tolist() != logits.argmax(-1).tolist()
    assert toy.prefill(**prompt, argmax=argmax).tolist() == expected.tolist()
    logits = toy.decode(**step)
    expected = choose_next_tokens(logits, history, history, config, None)
    assert toy.decode(**step, argmax=argmax).tolist() == expected.tolist()


class ArgmaxIds(nn.Cell):
    def __init__(self, below, temperature):
        super().__init__()
        self.below, self.temperature = below, temperature

    def construct(self, logits):
        return argmax_ids(logits, self.below, self.temperature)


def test_in_graph_argmax_divides_like_sat_before_choosing(mode):
    """SAT's greedy takes the argmax of logits / temperature: two logits an ulp apart can
    round to a tie, which goes to the lower id. The graph must divide, not skip it."""
    rng = np.random.RandomState(0)
    temperature = np.float32(3.0)
    for value in rng.uniform(1, 8, 10000).astype(np.float32):
        higher = np.nextafter(value, np.float32(np.inf))
        if value / temperature == higher / temperature:
            break
    else:
        raise AssertionError("no float32 pair rounding to a tie")
    logits = np.zeros((1, 10), np.float32)
    logits[0, 2], logits[0, 5] = value, higher
    config = GenerationConfig(sampling_rule="sat", temperature=float(temperature))
    history = [np.zeros(0, np.int32)]
    assert choose_next_tokens(logits, history, history, config, None).tolist() == [2]
    assert np.argmax(logits, -1).tolist() == [5]  # without the division
    argmax = history_free_argmax(config)
    assert ArgmaxIds(argmax.below, argmax.temperature)(Tensor(logits)).asnumpy().tolist() == [2]
    assert argmax.of(logits).tolist() == [2]
    assert ArgmaxIds(4, 1.0)(Tensor(logits)).asnumpy().tolist() == [2]  # ids >= 4 banned
