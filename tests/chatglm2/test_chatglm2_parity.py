"""Parity of our ChatGLM2 against transformers' GlmForCausalLM, converted through convert_weight.py.

transformers' GLM (the GLM-4 family's code) is ChatGLM2's architecture under other names: with
partial_rotary_factor 0.5 it rotates the first half of each head, and its apply_rotary_pos_emb
repeats each cos/sin column twice (repeat_interleave) and rotates (x[2i], x[2i+1]) pairs
(rotate_half on x[0::2], x[1::2]), with inv_freq = base^(-2i/(head_dim/2)): ChatGLM2's
interleaved RoPE exactly. num_key_value_heads plays multi_query_group_num (head h reads group
h // (heads/groups)), gate_up_proj is dense_h_to_4h ([silu half | up half]), q/k/v concatenated
row-wise are query_key_value, and o_proj has no bias as ChatGLM2's dense. So its state dict,
renamed to HF chatglm2's keys and written as .bin shards + index json, is a ChatGLM2 checkpoint
whose logits transformers computes independently.
"""
import json
import os

import numpy as np
import pytest
import torch
from mindspore import Tensor
from transformers import GlmConfig, GlmForCausalLM

from research.chatglm2 import convert_weight
from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from research.common.kv_cache import left_padded_positions_and_mask
from research.common.checkpoint import load_params_into_net, read_checkpoint
from research.common.generation import GenerationConfig, generate

LOGIT_TOLERANCE = 1e-4
NEW_TOKENS = 16
CONFIG = "run_glm2_tiny.yaml"
WEIGHT_SCALE = 0.15


@pytest.fixture(scope="module")
def config():
    return ChatGLM2Config.from_name("tiny")


def glm_config(config: ChatGLM2Config):
    return GlmConfig(vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.multi_query_group_num, head_dim=config.kv_channels,
                     partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False,
                     rms_norm_eps=config.layernorm_epsilon, rope_theta=10000.0,
                     max_position_embeddings=config.seq_length, pad_token_id=0, eos_token_id=2,
                     bos_token_id=1, attn_implementation="eager")


@pytest.fixture(scope="module")
def reference(config):
    return random_glm(config)


def random_glm(config, scale=WEIGHT_SCALE):
    """GlmForCausalLM with every weight random (RMSNorm weights and qkv biases included)."""
    torch.manual_seed(0)
    model = GlmForCausalLM(glm_config(config)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if name.endswith("layernorm.weight") or name == "model.norm.weight"
                        else scale * noise)
    return model


def chatglm2_state_dict(model, config):
    """GlmForCausalLM's weights under HF THUDM/chatglm2-6b's key names."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {"transformer.embedding.word_embeddings.weight": sd.pop("model.embed_tokens.weight")}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        attn = src + "self_attn."
        for kind in ("weight", "bias"):  # rows [Q heads*d | K groups*d | V groups*d]
            out[dst + f"self_attention.query_key_value.{kind}"] = torch.cat(
                [sd.pop(attn + f"{p}_proj.{kind}") for p in "qkv"], 0)
        out[dst + "self_attention.dense.weight"] = sd.pop(attn + "o_proj.weight")
        out[dst + "mlp.dense_h_to_4h.weight"] = sd.pop(src + "mlp.gate_up_proj.weight")
        out[dst + "mlp.dense_4h_to_h.weight"] = sd.pop(src + "mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            out[dst + norm + ".weight"] = sd.pop(src + norm + ".weight")
    out["transformer.encoder.final_layernorm.weight"] = sd.pop("model.norm.weight")
    out["transformer.output_layer.weight"] = sd.pop("lm_head.weight")
    rotary = config.rotary_dim
    out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)
    assert not sd, f"unmapped GlmForCausalLM weights: {sorted(sd)}"
    return out


def write_hf_shards(state_dict, directory):
    """Two pytorch_model-0000N-of-00002.bin shards + pytorch_model.bin.index.json."""
    keys = sorted(state_dict)
    halves = (keys[:len(keys) // 2], keys[len(keys) // 2:])
    weight_map = {}
    for n, part in enumerate(halves, 1):
        name = f"pytorch_model-{n:05d}-of-00002.bin"
        torch.save({k: state_dict[k].contiguous() for k in part}, os.path.join(directory, name))
        weight_map.update({k: name for k in part})
    index = os.path.join(directory, "pytorch_model.bin.index.json")
    with open(index, "w", encoding="utf-8") as stream:
        json.dump({"metadata": {}, "weight_map": weight_map}, stream)
    return index


@pytest.fixture(scope="module")
def hf_dir(reference, config, tmp_path_factory):
    directory = tmp_path_factory.mktemp("chatglm2-hf")
    write_hf_shards(chatglm2_state_dict(reference, config), str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):
    """Our checkpoint, converted by the CLI from the index json."""
    output = str(tmp_path_factory.mktemp("chatglm2-ms") / "glm2_tiny.ckpt")
    convert_weight.main(["--torch_path", os.path.join(hf_dir, "pytorch_model.bin.index.json"),
                         "--mindspore_path", output, "--config", CONFIG])
    return output


def load_model(converted, config):
    model = ChatGLM2ForConditionalGeneration(config)
    load_params_into_net(model, read_checkpoint(converted))
    model.set_train(False)
    return model


@pytest.fixture(scope="module")
def model(converted, config):
    return load_model(converted, config)


def hf_logits(reference, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs = dict(attention_mask=torch.tensor(attention_mask), position_ids=torch.tensor(position_ids))
        return reference(input_ids=torch.tensor(ids, dtype=torch.long), **kwargs).logits.numpy()


def our_logits(model, ids, pad_lengths):
    ids = np.asarray(ids, np.int32)
    position_ids, mask = left_padded_positions_and_mask(ids, pad_lengths)
    logits, _, _ = model(Tensor(ids), Tensor(position_ids), Tensor(mask))
    return logits.asnumpy()


def prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 320, size=n).tolist() for n in lengths]


def hf_greedy(reference, ids, steps):
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(hf_logits(reference, [seq])[0, -1].argmax()))
    return seq[len(ids):]


def test_converted_checkpoint_has_mindformers_names(converted, config):
    params = read_checkpoint(converted)
    assert "transformer.embedding.embedding_weight" in params
    assert "transformer.rotary_pos_emb.inv_freq" not in params
    assert params["transformer.encoder.layers.1.self_attention.query_key_value.weight"].shape == (
        config.qkv_size, config.hidden_size)


def test_logits_match_transformers(mode, model, reference):
    ids = prompts(0, [23])
    expected = hf_logits(reference, ids)
    got = our_logits(model, ids, [0])
    assert got.shape == expected.shape
    error = np.abs(got - expected).max()
    print(f"max |dlogit| = {error:.2e}")
    assert error <= LOGIT_TOLERANCE
    # not vacuous: logits vary strongly between positions and the rotary half matters
    assert np.abs(expected[0, 1:] - expected[0, :-1]).max() > 0.5


def test_left_padded_logits_match_transformers(model, reference):
    """HF with its own attention mask and ChatGLM2's positions (0 over the left padding)."""
    rows = prompts(1, [12, 5])
    width = max(map(len, rows))
    pads = [width - len(r) for r in rows]
    ids = [[0] * p + r for p, r in zip(pads, rows)]
    position_ids, _ = left_padded_positions_and_mask(np.asarray(ids), pads)
    attention_mask = [[0] * p + [1] * len(r) for p, r in zip(pads, rows)]
    expected = hf_logits(reference, ids, attention_mask, position_ids.astype(np.int64))
    got = our_logits(model, ids, pads)
    for row, pad in enumerate(pads):  # padded query rows are never read
        assert np.abs(got[row, pad:] - expected[row, pad:]).max() <= LOGIT_TOLERANCE
        alone = hf_logits(reference, [rows[row]])[0]
        assert np.abs(got[row, pad:] - alone).max() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("use_past", [True, False])
def test_greedy_tokens_match_transformers(mode, use_past, model, reference):
    ids = prompts(4, [9])[0]
    expected = hf_greedy(reference, ids, NEW_TOKENS)
    got = generate(model, [ids], GenerationConfig(max_new_tokens=NEW_TOKENS, use_past=use_past, pad_token_id=0))[0]
    assert got == expected
    assert len(set(expected)) > 3  # a varied sequence, not one repeated token


@pytest.mark.parametrize("mode", ["graph"], indirect=True)
def test_left_padded_batch_equals_each_prompt_alone(mode, model, reference):
    """Three lengths padded to one prompt bucket (8; GRAPH mode): the batch compiles
    once, each row alone once more, and every row also matches transformers' greedy tokens."""
    rows = prompts(3, [8, 5, 7])
    settings = dict(max_new_tokens=NEW_TOKENS, use_past=True, pad_token_id=0)
    batch = generate(model, rows, GenerationConfig(**settings))
    alone = [generate(model, [row], GenerationConfig(**settings))[0] for row in rows]
    assert batch == alone
    assert len({tuple(r) for r in batch}) == 3
    assert batch[1] == hf_greedy(reference, rows[1], NEW_TOKENS)


def test_cache_holds_only_the_kv_groups(model, config):
    length = model.start_cache(2, 20)
    caches = [p for p in model.cached_decoder.get_parameters() if "cache" in p.name]
    assert len(caches) == 2 * config.num_layers
    assert {tuple(p.shape) for p in caches} == {(2, config.multi_query_group_num, length, config.kv_channels)}


def test_float16_compute_stays_close_to_the_float32_reference(converted, reference, config):
    """compute_dtype float16 (the Ascend setting): matmuls in fp16, RMSNorm/RoPE/softmax in fp32."""
    import dataclasses

    import mindspore as ms

    half = dataclasses.replace(config, compute_dtype="float16", param_init_type="float16")
    model = load_model(converted, half)
    layer = model.transformer.encoder.layers[0]
    assert layer.self_attention.query_key_value.weight.dtype == ms.float16
    assert layer.input_layernorm.weight.dtype == ms.float32
    ids = prompts(4, [10])
    expected = hf_logits(reference, ids)
    error = np.abs(our_logits(model, ids, [0]) - expected).max()
    assert 1e-5 < error < 0.05 * np.abs(expected).max()


def test_the_rotary_pairing_is_checked(converted, reference, config):
    """Reordering each head's rotary dims from interleaved pairs to [evens | odds] (the
    rotate-half convention) in q and k changes the logits far beyond the tolerance: the parity
    above really checks which dims RoPE pairs up."""
    params = read_checkpoint(converted)
    rotary, head_dim = config.rotary_dim, config.kv_channels
    order = np.concatenate([np.arange(0, rotary, 2), np.arange(1, rotary, 2), np.arange(rotary, head_dim)])
    qk_heads = config.num_attention_heads + config.kv_heads  # Q heads then K groups; V untouched
    rows = np.concatenate([h * head_dim + order for h in range(qk_heads)]
                          + [np.arange(qk_heads * head_dim, config.qkv_size)])
    for i in range(config.num_layers):
        for kind in ("weight", "bias"):
            name = f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"
            params[name] = params[name][rows]
    model = ChatGLM2ForConditionalGeneration(config)
    load_params_into_net(model, params)
    ids = prompts(0, [23])
    assert np.abs(our_logits(model, ids, [0]) - hf_logits(reference, ids)).max() > 100 * LOGIT_TOLERANCE
