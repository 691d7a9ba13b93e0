"""Parity of our GLM-6B against SwissArmyTransformer's ChatGLMModel (the upstream VisualGLM LM).

SAT's model is built with a tiny random config on CPU, its state dict is converted with our
SAT table and loaded; logits and greedy tokens must match SAT's own.
"""
import numpy as np
import pytest
import mindspore as ms
import torch
from mindspore import Tensor

from research.common.convert import per_head_qkv_to_contiguous
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, generate
from research.visualglm.convert_visualglm import convert_glm_state_dict
from research.visualglm.modeling_glm import glm_positions_and_mask
from tests.visualglm.glm_fixtures import (glm_from_state_dict, prompt, random_bodies, sat_state_dict,
                                tiny_glm_config)
from tests.sat_reference import sat_chatglm_model

LOGIT_TOLERANCE = 1e-4
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def config():
    return tiny_glm_config()


@pytest.fixture(scope="module")
def sat_model(config):
    return sat_chatglm_model(config, seed=1234)


@pytest.fixture(scope="module")
def state_dict(sat_model):
    return sat_state_dict(sat_model)


def sat_logits(sat_model, ids):
    with torch.no_grad():
        return sat_model(input_ids=torch.tensor(ids, dtype=torch.long))[0].numpy()


def our_logits(model, ids, pad_lengths, config):
    position_ids, mask = glm_positions_and_mask(np.asarray(ids, np.int32), pad_lengths, config)
    logits, _, _ = model(Tensor(np.asarray(ids, np.int32)), Tensor(position_ids), Tensor(mask))
    return logits.asnumpy()


def sat_greedy(sat_model, ids, steps):
    """Greedy decoding with SAT's full forward (its own masks and 2D positions) each step."""
    seq = list(ids)
    for _ in range(steps):
        seq.append(int(sat_logits(sat_model, [seq])[0, -1].argmax()))
    return seq[len(ids):]


def test_logits_match_sat(mode, config, sat_model, state_dict):
    model = glm_from_state_dict(state_dict, config)
    ids = [prompt(random_bodies(0, [11])[0], config)]
    expected = sat_logits(sat_model, ids)
    got = our_logits(model, ids, [0], config)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < LOGIT_TOLERANCE
    # the comparison is not vacuous: logits vary strongly between positions
    assert np.abs(expected[0, 1:] - expected[0, :-1]).max() > 0.5


def test_left_padded_batch_logits_match_sat(config, sat_model, state_dict):
    """SAT's own batch handling (pad ids on the left) against our positions and mask."""
    model = glm_from_state_dict(state_dict, config)
    bodies = random_bodies(1, [9, 5])
    rows = [prompt(b, config) for b in bodies]
    width = max(len(r) for r in rows)
    pads = [width - len(r) for r in rows]
    ids = [[config.pad_token_id] * p + r for p, r in zip(pads, rows)]
    expected = sat_logits(sat_model, ids)
    got = our_logits(model, ids, pads, config)
    for row, pad in enumerate(pads):  # padded query rows are never used
        assert np.abs(got[row, pad:] - expected[row, pad:]).max() < LOGIT_TOLERANCE


@pytest.mark.parametrize("use_past", [True, False])
def test_greedy_tokens_match_sat(mode, use_past, config, sat_model, state_dict):
    model = glm_from_state_dict(state_dict, config)
    ids = prompt(random_bodies(2, [8])[0], config)
    expected = sat_greedy(sat_model, ids, NEW_TOKENS)
    got = generate(model, [ids], GenerationConfig(max_new_tokens=NEW_TOKENS, use_past=use_past,
                                                  pad_token_id=config.pad_token_id))[0]
    assert got == expected
    assert len(set(expected)) > 3  # a varied sequence, not one repeated token


def hf_layout(state_dict, config):
    """The same weights under HF ChatGLM-6B names, with qkv rows interleaved per head."""
    heads, head_dim = config.num_heads, config.head_dim
    out = {}
    for key, value in state_dict.items():
        if key == "mixins.chatglm-final.lm_head.weight":
            key = "lm_head.weight"
        elif key == "mixins.chatglm-attn.rotary_emb.inv_freq":
            continue
        if "query_key_value" in key:  # [3, heads, d, ...] -> [heads, 3, d, ...]
            rest = value.shape[1:]
            value = value.reshape(3, heads, head_dim, *rest).swapaxes(0, 1).reshape(-1, *rest)
        out[key] = value
    for i in range(config.num_layers):
        out[f"transformer.layers.{i}.attention.rotary_emb.inv_freq"] = np.zeros(head_dim // 4)
    return out


def test_hf_layout_converts_to_the_same_model(config, sat_model, state_dict):
    ids = [prompt(random_bodies(3, [7])[0], config)]
    expected = sat_logits(sat_model, ids)
    hf = hf_layout(state_dict, config)
    got = our_logits(glm_from_state_dict(hf, config, layout="hf"), ids, [0], config)
    assert np.abs(got - expected).max() < LOGIT_TOLERANCE
    # reading the HF file as if it were SAT's contiguous layout gives a different model
    renamed = {("mixins.chatglm-final.lm_head.weight" if k == "lm_head.weight" else k): v
               for k, v in hf.items() if "inv_freq" not in k}
    wrong = our_logits(glm_from_state_dict(renamed, config, layout="sat"), ids, [0], config)
    assert np.abs(wrong - expected).max() > 0.1


def test_per_head_permutation_is_the_inverse_of_interleaving():
    contiguous = np.arange(3 * 4 * 2 * 5).reshape(3 * 4 * 2, 5)
    interleaved = contiguous.reshape(3, 4, 2, 5).swapaxes(0, 1).reshape(-1, 5)
    np.testing.assert_array_equal(per_head_qkv_to_contiguous(interleaved, 4), contiguous)


def test_conversion_lists_unknown_missing_and_misshaped_keys(config, state_dict):
    extra = dict(state_dict, **{"transformer.layers.9.mlp.extra.weight": np.zeros(2)})
    with pytest.raises(UserInputError, match="unknown key.*layers.9.mlp.extra"):
        convert_glm_state_dict(extra, config, "sat")
    missing = {k: v for k, v in state_dict.items() if "layers.1.attention.dense.bias" not in k}
    with pytest.raises(UserInputError, match="missing.*layers.1.attention.dense.bias"):
        convert_glm_state_dict(missing, config, "sat")
    bigger = tiny_glm_config(hidden_size=128)
    with pytest.raises(UserInputError, match="wrong shape.*word_embeddings"):
        convert_glm_state_dict(state_dict, bigger, "sat")


def test_float16_compute_stays_close_to_the_float32_reference(config, sat_model, state_dict):
    """compute_dtype float16 (the Ascend setting): matmuls in fp16, LayerNorm/softmax in fp32."""
    half = tiny_glm_config(compute_dtype="float16", param_init_type="float16")
    model = glm_from_state_dict(state_dict, half)
    assert model.transformer.layers[0].attention.query_key_value.weight.dtype == ms.float16
    assert model.transformer.layers[0].input_layernorm.gamma.dtype == ms.float32
    ids = [prompt(random_bodies(4, [10])[0], config)]
    expected = sat_logits(sat_model, ids)
    error = np.abs(our_logits(model, ids, [0], half) - expected).max()
    assert 1e-5 < error < 0.05 * np.abs(expected).max()
