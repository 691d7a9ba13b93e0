"""P-Tuning v2 against transformers: GlmForCausalLM (ChatGLM2's architecture, see
test_chatglm2_parity.py) given the prefix as `past_key_values` (keys without RoPE, as upstream's
prefix) and the attention mask extended over it, with the tokens at positions 0..n-1, computes
what upstream's ChatGLM2 with a prefix computes; ours must give the same logits."""
import dataclasses

import numpy as np
import pytest
import torch
import mindspore as ms
from mindspore import Tensor
from transformers import DynamicCache

from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.convert_chatglm2 import read_upstream_prefix, write_upstream_prefix
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from research.common.kv_cache import left_padded_positions_and_mask
from research.common.checkpoint import load_params_into_net
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, generate
from tests.chatglm2.test_chatglm2_parity import LOGIT_TOLERANCE, chatglm2_state_dict, prompts, random_glm

PRE_SEQ_LEN = 6


@pytest.fixture(scope="module")
def config():
    return dataclasses.replace(ChatGLM2Config.from_name("tiny"), pre_seq_len=PRE_SEQ_LEN, prefix_dropout=0.0)


@pytest.fixture(scope="module")
def reference(config):
    return random_glm(config)


def prefix_table(config, seed=3):
    """An upstream prefix_encoder.embedding.weight [pre, layers*2*groups*d], random."""
    width = 2 * config.num_layers * config.kv_heads * config.kv_channels
    return np.random.RandomState(seed).normal(0, 0.5, (config.pre_seq_len, width)).astype(np.float32)


def as_past_key_values(table, config, batch):
    """Upstream get_prompt: view [pre, 2*layers, groups, d], then per layer (key, value) as
    [batch, groups, pre, d]."""
    prefix = torch.tensor(table).view(config.pre_seq_len, 2 * config.num_layers, config.kv_heads, config.kv_channels)
    prefix = prefix.permute(1, 2, 0, 3).unsqueeze(1).expand(-1, batch, -1, -1, -1)
    cache = DynamicCache()
    for layer in range(config.num_layers):
        cache.update(prefix[2 * layer].contiguous(), prefix[2 * layer + 1].contiguous(), layer)
    return cache


def hf_prefix_logits(reference, config, table, ids):
    batch, length = len(ids), len(ids[0])
    with torch.no_grad():
        out = reference(input_ids=torch.tensor(ids), past_key_values=as_past_key_values(table, config, batch),
                        attention_mask=torch.ones(batch, config.pre_seq_len + length, dtype=torch.long),
                        position_ids=torch.arange(length).expand(batch, -1))
    return out.logits.numpy()


@pytest.fixture(scope="module")
def model(reference, config):
    params = {name: value.numpy() for name, value in chatglm2_state_dict(reference, config).items()
              if not name.endswith("inv_freq")}
    params["transformer.embedding.embedding_weight"] = params.pop("transformer.embedding.word_embeddings.weight")
    params["transformer.prefix_encoder.embedding.weight"] = prefix_table(config)
    ms.set_context(mode=ms.GRAPH_MODE)
    model = ChatGLM2ForConditionalGeneration(config)
    load_params_into_net(model, params)
    model.set_train(False)
    return model


def test_prefix_logits_match_transformers_past_key_values(model, reference, config):
    ids = prompts(5, [11])
    expected = hf_prefix_logits(reference, config, prefix_table(config), ids)
    position_ids, mask = left_padded_positions_and_mask(np.asarray(ids, np.int32), [0])
    got = model(Tensor(np.asarray(ids, np.int32)), Tensor(position_ids), Tensor(mask))[0].asnumpy()
    error = np.abs(got - expected).max()
    print(f"max |dlogit| with a {config.pre_seq_len}-position prefix = {error:.2e}")
    assert error <= LOGIT_TOLERANCE
    without = hf_prefix_logits(reference, config, np.zeros_like(prefix_table(config)), ids)
    assert np.abs(expected - without).max() > 0.1  # the prefix really changes the logits


def test_generation_starts_from_the_prefix_with_and_without_the_cache(model, reference, config):
    ids = prompts(6, [7])[0]
    table = prefix_table(config)
    sequence = list(ids)
    for _ in range(8):  # transformers greedy, re-running the whole sequence after the prefix
        sequence.append(int(hf_prefix_logits(reference, config, table, [sequence])[0, -1].argmax()))
    expected = sequence[len(ids):]
    for use_past in (True, False):
        assert generate(model, [ids], GenerationConfig(max_new_tokens=8, use_past=use_past))[0] == expected


def write_upstream_checkpoint(directory, table, **extra):
    """upstream ptuning/'s output: checkpoint-N/pytorch_model.bin with the prefix only."""
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({"transformer.prefix_encoder.embedding.weight": torch.tensor(table), **extra},
               directory / "pytorch_model.bin")
    return str(directory)


def test_upstream_prefix_checkpoint_imports_and_exports_back(model, reference, config, tmp_path):
    table = prefix_table(config, seed=9)
    folder = write_upstream_checkpoint(tmp_path / "checkpoint-3000", table)
    prefix = read_upstream_prefix(folder, config)
    fresh = ChatGLM2ForConditionalGeneration(config)
    load_params_into_net(fresh, {**{p.name: p.asnumpy() for p in model.get_parameters()}, **prefix})
    fresh.set_train(False)
    ids = prompts(7, [9])
    position_ids, mask = left_padded_positions_and_mask(np.asarray(ids, np.int32), [0])
    got = fresh(Tensor(np.asarray(ids, np.int32)), Tensor(position_ids), Tensor(mask))[0].asnumpy()
    assert np.abs(got - hf_prefix_logits(reference, config, table, ids)).max() <= LOGIT_TOLERANCE
    exported = write_upstream_prefix({p.name: p.asnumpy() for p in fresh.get_parameters()}, str(tmp_path / "out.bin"))
    back = torch.load(exported, weights_only=True)
    assert list(back) == ["transformer.prefix_encoder.embedding.weight"]  # the prefix only, as upstream saves
    assert np.array_equal(back["transformer.prefix_encoder.embedding.weight"].numpy(), table)


def test_a_prefix_of_another_shape_is_refused_with_what_to_set(config, tmp_path):
    other = dataclasses.replace(config, pre_seq_len=PRE_SEQ_LEN + 2)
    folder = write_upstream_checkpoint(tmp_path / "a", prefix_table(other))
    with pytest.raises(UserInputError, match=f"pre_seq_len {PRE_SEQ_LEN + 2} but the config says pre_seq_len "
                                             f"{PRE_SEQ_LEN}: set model_config.pre_seq_len: {PRE_SEQ_LEN + 2}"):
        read_upstream_prefix(folder, config)
    width = prefix_table(config).shape[1]
    projected = write_upstream_checkpoint(tmp_path / "b", prefix_table(config), **{
        "transformer.prefix_encoder.trans.0.weight": torch.zeros(config.hidden_size, width)})
    with pytest.raises(UserInputError, match="prefix_projection True but the config says False"):
        read_upstream_prefix(projected, config)
    with pytest.raises(UserInputError, match="holds no checkpoint"):
        read_upstream_prefix(str(tmp_path), config)
