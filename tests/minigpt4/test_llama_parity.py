"""MiniGPT-4's Vicuna decoder against transformers' LlamaForCausalLM, through our converter.

The reference is a tiny LlamaForCausalLM (2 key/value heads for 4 query heads, eps 1e-6) with
every weight random, RMSNorm weights included. Its state dict converts with
convert_minigpt4.convert_llama_state_dict (and, from .bin shards on disk, convert_llama) into
MindFormers' llama names; our model then has to give its logits and its greedy tokens.
Also here: the 7B/13B parameter counts from an independent formula, the MindFormers name
table, and the converter's refusals.
"""
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from mindspore import Tensor
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

from research.common.checkpoint import load_params_into_net, read_checkpoint
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, generate
from research.minigpt4.configuration_minigpt4 import LlamaConfig
from research.minigpt4.convert_minigpt4 import convert_llama, convert_llama_state_dict, llama_rows
from research.common.kv_cache import left_padded_positions_and_mask
from research.minigpt4.modeling_minigpt4 import LlamaForCausalLM, parameter_shapes

LOGIT_TOLERANCE = 1e-4
NEW_TOKENS = 16
WEIGHT_SCALE = 0.15
PAD, EOS = 0, 2


@pytest.fixture(scope="module")
def config():
    return LlamaConfig.from_name("tiny")


def hf_config(config: LlamaConfig):
    return HFLlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                         num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
                         rms_norm_eps=config.rms_norm_eps, rope_theta=config.theta,
                         max_position_embeddings=config.seq_length, tie_word_embeddings=False,
                         pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS, attn_implementation="eager")


@pytest.fixture(scope="module")
def reference(config):
    """transformers' LlamaForCausalLM with every weight random: RMSNorm weights around 1, the rest
    N(0, WEIGHT_SCALE), drawn with a fixed torch seed."""
    torch.manual_seed(0)
    model = HFLlamaForCausalLM(hf_config(config)).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else WEIGHT_SCALE * noise)
    assert config.kv_heads < config.num_heads and model.config.rms_norm_eps == 1e-6
    return model


@pytest.fixture(scope="module")
def converted(reference, config):
    return convert_llama_state_dict(reference.state_dict(), config)


def load_model(params, config):
    model = LlamaForCausalLM(config)
    load_params_into_net(model, params)
    model.set_train(False)
    return model


@pytest.fixture(scope="module")
def model(converted, config):
    return load_model(converted, config)


def prompts(seed, lengths):
    rng = np.random.RandomState(seed)
    return [rng.randint(3, 320, size=n).tolist() for n in lengths]


def hf_logits(reference, ids, attention_mask=None, position_ids=None):
    kwargs = {}
    if attention_mask is not None:
        kwargs = dict(attention_mask=torch.tensor(attention_mask), position_ids=torch.tensor(position_ids))
    with torch.no_grad():
        return reference(input_ids=torch.tensor(ids, dtype=torch.long), **kwargs).logits.numpy()


def our_logits(model, ids, pad_lengths, inputs_embeds=None):
    ids = np.asarray(ids, np.int32)
    position_ids, mask = left_padded_positions_and_mask(ids, pad_lengths)
    logits, _, _ = model(Tensor(ids), Tensor(position_ids), Tensor(mask), inputs_embeds)
    return logits.asnumpy()


def hf_greedy(reference, ids, steps=NEW_TOKENS):
    """transformers' own greedy generate (eos 2 stops it, as it stops ours)."""
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=steps, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    return out[0, len(ids):].tolist()


def greedy_settings(use_past=True):
    return GenerationConfig(max_new_tokens=NEW_TOKENS, use_past=use_past, pad_token_id=PAD, eos_token_id=EOS)


# --- parity -----------------------------------------------------------------------------------

def test_logits_match_transformers_at_every_position(mode, model, reference):
    ids = prompts(0, [23, 23])
    expected = hf_logits(reference, ids)
    got = our_logits(model, ids, [0, 0])
    assert got.shape == expected.shape
    error = np.abs(got - expected).max()
    print(f"max |dlogit| = {error:.2e}")
    assert error <= LOGIT_TOLERANCE
    # not vacuous: logits vary strongly between positions and rows
    assert np.abs(expected[:, 1:] - expected[:, :-1]).max() > 0.5


def test_left_padded_logits_match_transformers(model, reference):
    """transformers with its attention mask and LLaMA's positions (0 from the first real token)."""
    rows = prompts(1, [12, 5])
    width = max(map(len, rows))
    pads = [width - len(r) for r in rows]
    ids = [[PAD] * p + r for p, r in zip(pads, rows)]
    position_ids, _ = left_padded_positions_and_mask(np.asarray(ids), pads)
    attention_mask = [[0] * p + [1] * len(r) for p, r in zip(pads, rows)]
    expected = hf_logits(reference, ids, attention_mask, position_ids.astype(np.int64))
    got = our_logits(model, ids, pads)
    for row, pad in enumerate(pads):  # padded query rows are never read
        assert np.abs(got[row, pad:] - expected[row, pad:]).max() <= LOGIT_TOLERANCE
        alone = hf_logits(reference, [rows[row]])[0]
        assert np.abs(got[row, pad:] - alone).max() <= LOGIT_TOLERANCE


def test_inputs_embeds_replace_the_token_embeddings(model):
    """What MiniGPT-4 splices image embeddings into: given the token embeddings, the same logits."""
    ids = prompts(2, [10])
    embeds = model.embed_tokens(Tensor(np.asarray(ids, np.int32)))
    np.testing.assert_allclose(our_logits(model, ids, [0], embeds), our_logits(model, ids, [0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_past", [True, False])
def test_greedy_tokens_match_transformers_generate(mode, use_past, model, reference):
    ids = prompts(4, [8])[0]
    expected = hf_greedy(reference, ids)
    assert len(expected) == NEW_TOKENS and len(set(expected)) > 3  # no early eos, not one repeated token
    assert generate(model, [ids], greedy_settings(use_past))[0] == expected


@pytest.mark.parametrize("mode", ["graph"], indirect=True)
def test_left_padded_batch_equals_each_prompt_alone(mode, model, reference):
    """Three lengths left-padded to one prompt bucket (8; GRAPH mode): the batch gives each
    row's tokens alone, and those are transformers' greedy tokens. (Alone first: one row in
    the bucket of 8 has the shapes of the greedy test's, whose compiled graphs it reuses.)"""
    rows = prompts(3, [8, 5, 7])
    alone = [generate(model, [row], greedy_settings())[0] for row in rows]
    batch = generate(model, rows, greedy_settings())
    assert batch == alone
    assert len({tuple(r) for r in batch}) == 3
    assert batch == [hf_greedy(reference, row) for row in rows]


def test_cache_holds_only_the_key_value_heads(model, config):
    length = model.start_cache(2, 20)
    caches = [p for p in model.cached_decoder.get_parameters() if "cache" in p.name]
    assert len(caches) == 2 * config.num_layers
    assert {tuple(p.shape) for p in caches} == {(2, config.kv_heads, length, config.head_dim)}


def test_the_rotate_half_pairing_is_checked(converted, reference, config):
    """Reordering each q/k head's dims from rotate-half order to interleaved pairs leaves q.k
    unchanged but pairs other dims in RoPE: the logits move far beyond the tolerance, so the
    parity above really checks which dims RoPE rotates together."""
    head_dim = config.head_dim
    order = np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])
    params = dict(converted)
    for i in range(config.num_layers):
        for name, heads in (("wq", config.num_heads), ("wk", config.kv_heads)):
            key = f"model.layers.{i}.attention.{name}.weight"
            params[key] = params[key][np.concatenate([h * head_dim + order for h in range(heads)])]
    ids = prompts(0, [23])
    shuffled = load_model(params, config)
    assert np.abs(our_logits(shuffled, ids, [0]) - hf_logits(reference, ids)).max() > 100 * LOGIT_TOLERANCE


def test_float16_compute_stays_close_to_the_float32_reference(converted, reference, config):
    """compute_dtype float16 (the Ascend setting): matmuls in fp16, RMSNorm/RoPE/softmax in fp32."""
    import mindspore as ms

    half = load_model(converted, dataclasses.replace(config, compute_dtype="float16", param_init_type="float16"))
    layer = half.model.layers[0]
    assert layer.attention.wq.weight.dtype == ms.float16 and layer.attention_norm.weight.dtype == ms.float32
    ids = prompts(4, [10])
    expected = hf_logits(reference, ids)
    error = np.abs(our_logits(half, ids, [0]) - expected).max()
    assert 1e-5 < error < 0.05 * np.abs(expected).max()


# --- names, presets and parameter counts ----------------------------------------------------------

def test_parameter_names_are_mindformers_llama_names(config):
    """The model's parameters are parameter_shapes(config), and each HF key converts to the name
    MindFormers' own LlamaForCausalLM.convert_name gives it."""
    from mindformers.models.llama.llama import LlamaForCausalLM as MindFormersLlama

    model = LlamaForCausalLM(config)
    assert {p.name: tuple(p.shape) for p in model.get_parameters()} == parameter_shapes(config)
    rows = llama_rows(config)
    assert {row.target for row in rows} == set(parameter_shapes(config))
    assert all(MindFormersLlama.convert_name(row.source) == row.target for row in rows)


def llama_parameters(layers, hidden, ffn, vocab):
    """Untied embedding and lm_head, per layer 4 square attention matrices, 3 SwiGLU matrices
    and 2 RMSNorm weights, and the final RMSNorm."""
    return 2 * vocab * hidden + layers * (4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden) + hidden


@pytest.mark.parametrize("name, layers, hidden, ffn", [("7b", 32, 4096, 11008), ("13b", 40, 5120, 13824)])
def test_vicuna_presets_count_their_parameters_from_shapes(name, layers, hidden, ffn):
    config = LlamaConfig.from_name(name)
    assert (config.num_layers, config.hidden_size, config.ffn_hidden_size, config.vocab_size) == (
        layers, hidden, ffn, 32001)
    expected = llama_parameters(layers, hidden, ffn, vocab=32001)
    assert config.parameter_count() == expected
    print(f"{name}: {expected:,d} parameters")
    # MindFormers' rule (4h * 2/3 rounded up to multiple_of 256) gives the same SwiGLU width
    assert dataclasses.replace(config, intermediate_size=None).ffn_hidden_size == ffn


def test_7b_memory_estimate_in_float16():
    config = LlamaConfig.from_name("7b")
    config.use_past = True
    estimate = config.memory_estimate()
    assert estimate.parameters == 2 * llama_parameters(32, 4096, 11008, 32001)
    # 2048 slots (max_decode_length 2000 bucketed) of keys and values: 2 x 32 layers x 4096 float16
    assert estimate.kv_cache == 2048 * 2 * 32 * 4096 * 2


def test_mindformers_llama_model_config_reads():
    """MindFormers r1.0's BLIP-2 `text_config` (notes/minigpt4.md §6): no intermediate_size."""
    text_config = dict(type="LlamaConfig", seq_length=64, hidden_size=4096, num_layers=32, num_heads=32,
                       vocab_size=32000, multiple_of=256, rms_norm_eps=1.0e-6, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0, ignore_token_id=-100, use_past=False, checkpoint_name_or_path="llama_7b",
                       intermediate_size=None)
    config = LlamaConfig.from_dict(text_config)
    assert (config.ffn_hidden_size, config.kv_heads, config.head_dim) == (11008, 32, 128)


@pytest.mark.parametrize("field, value, message", [
    ("n_kv_heads", 3, "not divisible"),
    ("num_heads", 5, "not divisible by 5 heads"),
    ("qkv_has_bias", True, "expected Literal"),
    ("ignore_token_id", 0, "expected Literal"),
    ("extend_method", "NTK", "not implemented"),
    ("eos_token_id", 320, "outside the vocabulary"),
])
def test_bad_config_fields_are_refused(field, value, message):
    values = {**dataclasses.asdict(LlamaConfig.from_name("tiny")), field: value}
    with pytest.raises(UserInputError, match=message):
        LlamaConfig.from_dict(values)


# --- the converter's refusals and the file path ----------------------------------------------------

def test_unknown_missing_and_misshaped_keys_are_named(reference, config):
    state = dict(reference.state_dict())
    state["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(2)
    del state["model.layers.1.self_attn.o_proj.weight"]
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(config.hidden_size, config.hidden_size)
    with pytest.raises(UserInputError) as err:
        convert_llama_state_dict(state, config)
    message = str(err.value)
    assert "model.layers.0.mlp.extra_proj.weight" in message and "unknown key" in message
    assert "model.layers.1.self_attn.o_proj.weight" in message and "missing" in message
    assert "model.layers.0.self_attn.k_proj.weight: expected (32, 64), found (64, 64)" in message


def test_another_vocabulary_size_says_what_to_set(reference, config):
    state = dict(reference.state_dict())
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        state[key] = torch.zeros(config.vocab_size + 1, config.hidden_size)
    with pytest.raises(UserInputError, match=f"set model_config.vocab_size: {config.vocab_size + 1}"):
        convert_llama_state_dict(state, config)


def test_meta_format_llama_is_refused(config):
    state = {"tok_embeddings.weight": torch.zeros(config.vocab_size, config.hidden_size),
             "layers.0.attention.wq.weight": torch.zeros(config.hidden_size, config.hidden_size)}
    with pytest.raises(UserInputError, match="Meta's original LLaMA format"):
        convert_llama_state_dict(state, config)


def test_hf_shards_on_disk_convert_like_the_state_dict(reference, converted, config, tmp_path):
    """Two .bin shards + index json, with the per-layer inv_freq buffers older transformers saved."""
    state = {k: v.detach().clone() for k, v in reference.state_dict().items()}
    for i in range(config.num_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(config.head_dim // 2)
    keys = sorted(state)
    weight_map = {}
    for n, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:]), 1):
        name = f"pytorch_model-{n:05d}-of-00002.bin"
        torch.save({k: state[k] for k in part}, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    output = str(tmp_path / "out" / "vicuna_tiny.ckpt")
    report = convert_llama(str(tmp_path), output, config)
    assert report.outputs[0].num_parameters == config.parameter_count()
    params = read_checkpoint(output)
    assert sorted(params) == sorted(converted)
    for name, value in converted.items():
        np.testing.assert_array_equal(params[name], value)
    assert os.listdir(tmp_path / "out") == ["vicuna_tiny.ckpt"]
