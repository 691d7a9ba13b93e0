"""Self-checks of upstream_files: the files hold the oracle's weights under LAVIS' names.

The LAVIS -> transformers renaming here is written apart from the fixture's (from the table in
../shared/notes/minigpt4.md §2.4), so a wrong name on either side fails the reload.
"""
import dataclasses
import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from research.common.qformer import QFormerConfig
from research.common.vision import ViTConfig
from research.minigpt4.configuration_minigpt4 import LlamaConfig
from tests.minigpt4.upstream_files import (blip2_oracle, llama2_variant_oracle, reference_greedy, reference_logits,
                                           write_llama2_variant_files, write_upstream_files)

VIT = ViTConfig(image_size=56, patch_size=14, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=96)
QFORMER = QFormerConfig(num_hidden_layers=2, num_heads=4, hidden_size=32, intermediate_size=64, encoder_width=48,
                        query_length=32)
LLAMA = dataclasses.replace(LlamaConfig.from_name("tiny"), seq_length=160)
IMAGE_TOKEN = 5
MERGED_IMAGE_TOKENS = (VIT.image_size // VIT.patch_size) ** 2 // 4
PREFIX_LENGTH = 4  # bos + 3 text tokens before the placeholders

# LAVIS -> transformers (transformers' convert_blip_2_original_to_pytorch.py create_rename_keys).
EVA_RENAMES = [("cls_token", "embeddings.class_embedding"), ("pos_embed", "embeddings.position_embedding"),
               ("patch_embed.proj.", "embeddings.patch_embedding."), ("blocks.", "encoder.layers."),
               (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."), (".attn.qkv.", ".self_attn.qkv."),
               (".attn.proj.", ".self_attn.projection.")]
QFORMER_RENAMES = [("Qformer.bert.embeddings.LayerNorm.", "qformer.layernorm."), ("Qformer.bert.", "qformer."),
                   ("attention.self.", "attention.attention.")]
# What MiniGPT-4 deletes from the BLIP-2 model or never builds (mini_gpt4.py L68-73).
NOT_IN_MINIGPT4 = re.compile(r"^(Qformer\.cls\.|Qformer\.bert\.embeddings\.(word_embeddings|position_embeddings|"
                             r"position_ids)|Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.|"
                             r"vision_proj\.|text_proj\.|itm_head\.|temp$|t5_proj\.)")


def load(path):
    return torch.load(path, weights_only=True)


def renamed(key, renames):
    for old, new in renames:
        key = key.replace(old, new)
    return key


def hf_vision_state(eva):
    """transformers' vision_model keys from LAVIS' EVA keys, q_bias | 0 | v_bias folded into qkv.bias."""
    state = {}
    for key, value in eva.items():
        if key.endswith(".attn.q_bias"):
            v_bias = eva[key.replace("q_bias", "v_bias")]
            state[renamed(key.replace("q_bias", "qkv.bias"), EVA_RENAMES)] = torch.cat(
                [value, torch.zeros_like(value), v_bias])
        elif not key.endswith(".attn.v_bias"):
            state[renamed(key, EVA_RENAMES)] = value
    return {"vision_model." + key: value for key, value in state.items()}


def vicuna_state(directory):
    """{HF LLaMA key: tensor} from the shards the index lists."""
    index_name = next(name for name in os.listdir(directory) if name.endswith(".index.json"))
    with open(os.path.join(directory, index_name), encoding="utf-8") as stream:
        weight_map = json.load(stream)["weight_map"]
    state = {}
    for shard in sorted(set(weight_map.values())):
        path = os.path.join(directory, shard)
        state.update(load_file(path) if shard.endswith(".safetensors") else load(path))
    return weight_map, state


def hf_state_from_files(files):
    """The oracle's state dict as a MiniGPT-4 converter would read it from the four files."""
    state = hf_vision_state(load(files.eva_vit))
    if files.blip2 is not None:
        for key, value in load(files.blip2)["model"].items():
            if key.startswith("ln_vision."):
                state["vision_model.post_layernorm." + key[len("ln_vision."):]] = value
            elif key == "query_tokens" or key.startswith("Qformer."):
                if not NOT_IN_MINIGPT4.match(key):
                    state[renamed(key, QFORMER_RENAMES) if key != "query_tokens" else key] = value
    projection = "language_projection." if files.blip2 is not None else "llama_proj."
    for key, value in load(files.minigpt4)["model"].items():
        state[key.replace("llama_proj.", projection)] = value
    state.update({"language_model." + key: value for key, value in vicuna_state(files.vicuna)[1].items()})
    return state


def prompts(rng, placeholders, batch=2):
    text = rng.randint(10, LLAMA.vocab_size, (batch, PREFIX_LENGTH - 1 + 6))
    return np.concatenate([np.full((batch, 1), LLAMA.bos_token_id), text[:, :PREFIX_LENGTH - 1],
                           np.full((batch, placeholders), IMAGE_TOKEN), text[:, PREFIX_LENGTH - 1:]], axis=1)


def images(rng, batch=2):
    return rng.randn(batch, 3, VIT.image_size, VIT.image_size).astype(np.float32)


@pytest.fixture(scope="module", params=["bin", "safetensors"])
def files(request, tmp_path_factory):
    return write_upstream_files(tmp_path_factory.mktemp(request.param), VIT, QFORMER, LLAMA, seed=0,
                                vicuna_format=request.param)


@pytest.fixture(scope="module")
def llama2_files(tmp_path_factory):
    return write_llama2_variant_files(tmp_path_factory.mktemp("llama2"), VIT, LLAMA, seed=0)


def expected_eva_keys():
    keys = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    for layer in range(VIT.num_hidden_layers):
        keys |= {f"blocks.{layer}.{name}" for name in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.q_bias", "attn.v_bias", "attn.proj.weight",
            "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
            "mlp.fc2.bias")}
    return keys


def expected_qformer_keys():
    keys = {"Qformer.bert.embeddings.LayerNorm.weight", "Qformer.bert.embeddings.LayerNorm.bias"}
    for layer in range(QFORMER.num_hidden_layers):
        blocks = ["attention", "crossattention"] if layer % 2 == 0 else ["attention"]
        for block in blocks:
            keys |= {f"Qformer.bert.encoder.layer.{layer}.{block}.{part}.{kind}" for kind in ("weight", "bias")
                     for part in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")}
        keys |= {f"Qformer.bert.encoder.layer.{layer}.{part}.{kind}" for kind in ("weight", "bias")
                 for part in ("intermediate_query.dense", "output_query.dense", "output_query.LayerNorm")}
    return keys


def test_files_load_with_weights_only_and_hold_lavis_keys(files):
    hidden, width = VIT.hidden_size, QFORMER.hidden_size
    eva = load(files.eva_vit)
    assert set(eva) == expected_eva_keys()
    assert eva["blocks.0.attn.qkv.weight"].shape == (3 * hidden, hidden)
    assert eva["pos_embed"].shape == (1, (VIT.image_size // VIT.patch_size) ** 2 + 1, hidden)

    blip2 = load(files.blip2)["model"]
    needed = expected_qformer_keys() | {"ln_vision.weight", "ln_vision.bias", "query_tokens"}
    assert needed <= set(blip2)
    assert all(NOT_IN_MINIGPT4.match(key) for key in set(blip2) - needed)
    assert {"Qformer.bert.embeddings.position_ids", "Qformer.bert.encoder.layer.1.output.LayerNorm.weight",
            "Qformer.cls.predictions.bias", "temp", "t5_proj.weight"} <= set(blip2)
    assert blip2["query_tokens"].shape == (1, QFORMER.query_length, width)
    assert blip2["Qformer.bert.encoder.layer.0.crossattention.self.key.weight"].shape == (width, hidden)

    minigpt4 = load(files.minigpt4)["model"]
    assert {key: tuple(value.shape) for key, value in minigpt4.items()} == {
        "llama_proj.weight": (LLAMA.hidden_size, width), "llama_proj.bias": (LLAMA.hidden_size,)}


def test_shard_index_lists_every_key(files):
    weight_map, state = vicuna_state(files.vicuna)
    assert set(weight_map) == set(state) == set(files.reference.language_model.state_dict())
    assert len(set(weight_map.values())) == 2
    assert not torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    with open(os.path.join(files.vicuna, "config.json"), encoding="utf-8") as stream:
        assert json.load(stream)["num_hidden_layers"] == LLAMA.num_layers


def test_files_rebuild_the_oracle(files):
    rebuilt = blip2_oracle(VIT, QFORMER, LLAMA)
    rebuilt.load_state_dict(hf_state_from_files(files), strict=True)
    rng = np.random.RandomState(0)
    pixel_values, input_ids = images(rng), prompts(rng, QFORMER.query_length)
    np.testing.assert_array_equal(reference_logits(rebuilt, pixel_values, input_ids, IMAGE_TOKEN),
                                  reference_logits(files, pixel_values, input_ids, IMAGE_TOKEN))


def test_ln_vision_eps_shows_in_the_logits(files):
    """The ViT stream reaching ln_vision is quiet enough that torch's 1e-5 and the blocks' 1e-6
    give different logits, so a converter that drops the eps fails against these files."""
    rebuilt = blip2_oracle(VIT, QFORMER, LLAMA)
    rebuilt.load_state_dict(hf_state_from_files(files), strict=True)
    rebuilt.vision_model.post_layernorm.eps = VIT.layer_norm_eps
    rng = np.random.RandomState(5)
    pixel_values, input_ids = images(rng), prompts(rng, QFORMER.query_length)
    difference = reference_logits(rebuilt, pixel_values, input_ids, IMAGE_TOKEN) - \
        reference_logits(files, pixel_values, input_ids, IMAGE_TOKEN)
    assert np.abs(difference).max() > 1e-3


def test_same_seed_same_files(files, tmp_path):
    again = write_upstream_files(tmp_path / "again", VIT, QFORMER, LLAMA, seed=0)
    other = write_upstream_files(tmp_path / "other", VIT, QFORMER, LLAMA, seed=1)
    first, second, third = (load(f.blip2)["model"]["query_tokens"] for f in (files, again, other))
    assert torch.equal(first, second) and not torch.equal(first, third)


@pytest.mark.parametrize("variant", ["vicuna", "llama2"])
def test_image_reaches_logits_from_the_placeholders_on(variant, files, llama2_files):
    chosen, placeholders = (files, QFORMER.query_length) if variant == "vicuna" else \
        (llama2_files, MERGED_IMAGE_TOKENS)
    rng = np.random.RandomState(1)
    input_ids = prompts(rng, placeholders)
    before = reference_logits(chosen, images(rng), input_ids, IMAGE_TOKEN)
    after = reference_logits(chosen, images(rng), input_ids, IMAGE_TOKEN)
    assert before.dtype == np.float32 and before.shape == (*input_ids.shape, LLAMA.vocab_size)
    np.testing.assert_array_equal(before[:, :PREFIX_LENGTH], after[:, :PREFIX_LENGTH])  # causal: text first
    assert np.abs(before[:, PREFIX_LENGTH:] - after[:, PREFIX_LENGTH:]).max(axis=-1).min() > 1e-3


def test_placeholder_count_is_checked(files):
    rng = np.random.RandomState(2)
    input_ids = prompts(rng, QFORMER.query_length - 1)
    with pytest.raises(ValueError, match="image placeholders"):
        reference_logits(files, images(rng), input_ids, IMAGE_TOKEN)


@pytest.mark.parametrize("variant", ["vicuna", "llama2"])
def test_greedy_is_the_argmax_of_the_logits(variant, files, llama2_files):
    chosen, placeholders = (files, QFORMER.query_length) if variant == "vicuna" else \
        (llama2_files, MERGED_IMAGE_TOKENS)
    rng = np.random.RandomState(3)
    pixel_values, input_ids = images(rng), prompts(rng, placeholders)
    generated = reference_greedy(chosen, pixel_values, input_ids, IMAGE_TOKEN, max_new_tokens=4)
    for row, new_ids in enumerate(generated):
        sequence = input_ids[row:row + 1]
        for token in new_ids:
            logits = reference_logits(chosen, pixel_values[row:row + 1], sequence, IMAGE_TOKEN)
            assert token == int(logits[0, -1].argmax())
            sequence = np.concatenate([sequence, [[token]]], axis=1)
        assert len(new_ids) == 4


def test_llama2_variant_files_rebuild_its_oracle(llama2_files):
    assert llama2_files.blip2 is None
    assert set(load(llama2_files.eva_vit)) == expected_eva_keys()
    minigpt4 = load(llama2_files.minigpt4)["model"]
    assert minigpt4["llama_proj.weight"].shape == (LLAMA.hidden_size, 4 * VIT.hidden_size)
    rebuilt = llama2_variant_oracle(VIT, LLAMA)  # fresh ln_vision: weight 1, bias 0, as upstream's
    missing, unexpected = rebuilt.load_state_dict(hf_state_from_files(llama2_files), strict=False)
    assert set(missing) == {"vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias"}
    assert not unexpected
    rng = np.random.RandomState(4)
    pixel_values, input_ids = images(rng), prompts(rng, MERGED_IMAGE_TOKENS)
    np.testing.assert_array_equal(reference_logits(rebuilt, pixel_values, input_ids, IMAGE_TOKEN),
                                  reference_logits(llama2_files, pixel_values, input_ids, IMAGE_TOKEN))
