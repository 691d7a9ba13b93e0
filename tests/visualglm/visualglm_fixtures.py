"""A tiny VisualGLM checkpoint in SAT's and in Hugging Face's key layout.

The key names and shapes come from SwissArmyTransformer's own models, configured as
VisualGLM's `model/blip2.py` and SAT's ChatGLMModel configure them, so the converter is
tested against the names SAT really writes rather than against its own tables.
"""
import json
import os

import numpy as np

from research.visualglm.configuration_visualglm import VisualGLMConfig, load_visualglm_config
from tests.sat_reference import _prepare_sat_import, sat_chatglm_model

TINY_CONFIG = "run_visualglm_tiny_image_to_text_generation.yaml"
SAT_IMAGE_PREFIX = "mixins.eva.model."
HF_IMAGE_PREFIX = "transformer.image_encoder."


def tiny_visualglm_config() -> VisualGLMConfig:
    return load_visualglm_config(TINY_CONFIG)[1]


def _sat_image_models(config: VisualGLMConfig):
    """SAT's EVA-ViT (class token, ln_vision in the `cls` mixin) and Q-Former, as in blip2.py."""
    _prepare_sat_import()
    from torch import nn
    from sat.model import BaseMixin, BaseModel, ViTModel

    class LNFinalMixin(BaseMixin):
        def __init__(self, hidden_size):
            super().__init__()
            self.ln_vision = nn.LayerNorm(hidden_size)

    vit_config, qformer_config = config.vision_config, config.qformer_config
    vit = ViTModel(ViTModel.get_args(
        num_layers=vit_config.num_hidden_layers, hidden_size=vit_config.hidden_size,
        num_attention_heads=vit_config.num_attention_heads, vocab_size=1,
        inner_hidden_size=vit_config.intermediate_size, layernorm_order="pre",
        use_final_layernorm=False, layernorm_epsilon=vit_config.layer_norm_eps,
        max_sequence_length=vit_config.num_positions, model_parallel_size=1,
        image_size=[vit_config.image_size] * 2, patch_size=vit_config.patch_size,
        in_channels=vit_config.num_channels, pre_len=1, post_len=0, num_classes=0))
    vit.del_mixin("cls")
    vit.add_mixin("cls", LNFinalMixin(vit_config.hidden_size))
    qformer = BaseModel(BaseModel.get_args(
        num_layers=qformer_config.num_hidden_layers, hidden_size=qformer_config.hidden_size,
        num_attention_heads=qformer_config.num_heads, vocab_size=qformer_config.query_length,
        inner_hidden_size=qformer_config.intermediate_size, layernorm_order="post",
        layernorm_epsilon=qformer_config.layer_norm_eps, max_sequence_length=0,
        model_parallel_size=1, cross_attn_hidden_size=qformer_config.encoder_width,
        is_decoder=[qformer_config.has_cross_attention(i)
                    for i in range(qformer_config.num_hidden_layers)]))
    qformer.transformer.position_embeddings = None  # VisualGLM's Q-Former has none
    return vit, qformer


def sat_visualglm_state_dict(config: VisualGLMConfig, seed=0, std=0.02):
    """{SAT key: float32 array} of a random VisualGLM with `config`'s shapes.

    Weights are normal(0, std) (a larger std makes the answers depend on image and
    prompt, which end-to-end tests need), biases zero, LayerNorm weights one; the rotary inv_freq
    buffer keeps SAT's own values.
    """
    vit, qformer = _sat_image_models(config)
    reference = {key: value.numpy() for key, value in
                 sat_chatglm_model(config.text_config).state_dict().items()}
    for prefix, model in (("vit.", vit), ("qformer.", qformer)):
        reference.update({SAT_IMAGE_PREFIX + prefix + key: value.numpy()
                          for key, value in model.state_dict().items()})
    text_hidden, query_hidden = config.text_config.hidden_size, config.qformer_config.hidden_size
    reference[SAT_IMAGE_PREFIX + "glm_proj.weight"] = np.empty((text_hidden, query_hidden))
    reference[SAT_IMAGE_PREFIX + "glm_proj.bias"] = np.empty((text_hidden,))

    rng = np.random.RandomState(seed)
    state_dict = {}
    for key, value in reference.items():
        if key.endswith("inv_freq"):
            state_dict[key] = value.astype(np.float32)
        elif key.endswith(("layernorm.weight", "ln_vision.weight")):
            state_dict[key] = np.ones(value.shape, np.float32)
        elif key.endswith(".bias"):
            state_dict[key] = np.zeros(value.shape, np.float32)
        else:
            state_dict[key] = rng.normal(0, std, value.shape).astype(np.float32)
    return state_dict


def contiguous_qkv_to_per_head(value, num_heads):
    """Inverse of `per_head_qkv_to_contiguous`: [3, heads, d] rows -> HF's [heads, 3, d]."""
    rest = value.shape[1:]
    head_dim = value.shape[0] // (3 * num_heads)
    value = value.reshape(3, num_heads, head_dim, *rest)
    return np.ascontiguousarray(np.swapaxes(value, 0, 1)).reshape(3 * num_heads * head_dim, *rest)


def hf_from_sat(state_dict, config: VisualGLMConfig):
    """The same weights under Hugging Face visualglm-6b's names and per-head qkv order."""
    text = config.text_config
    hf = {}
    for key, value in state_dict.items():
        if key.startswith(SAT_IMAGE_PREFIX):
            hf[HF_IMAGE_PREFIX + key[len(SAT_IMAGE_PREFIX):]] = value
        elif key == "mixins.chatglm-final.lm_head.weight":
            hf["lm_head.weight"] = value
        elif key == "mixins.chatglm-attn.rotary_emb.inv_freq":
            hf.update({f"transformer.layers.{i}.attention.rotary_emb.inv_freq": value
                       for i in range(text.num_layers)})
        elif ".attention.query_key_value." in key:
            hf[key] = contiguous_qkv_to_per_head(value, text.num_heads)
        else:
            hf[key] = value
    return hf


def write_sat_checkpoint(state_dict, directory, dtype=None):
    """SAT's layout: `<dir>/latest` naming iteration 1 and `<dir>/1/mp_rank_00_model_states.pt`.

    `dtype` (a torch dtype name such as "bfloat16") converts the tensors on the way out.
    """
    import torch

    path = os.path.join(directory, "1", "mp_rank_00_model_states.pt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    module = {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in state_dict.items()}
    if dtype is not None:
        module = {key: value.to(getattr(torch, dtype)) for key, value in module.items()}
    torch.save({"module": module, "iteration": 1, "np_rng_state": np.random.get_state()}, path)
    with open(os.path.join(directory, "latest"), "w", encoding="utf-8") as stream:
        stream.write("1")
    return path


def write_hf_checkpoint(state_dict_hf, directory, shards=2, safetensors=False):
    """A Hugging Face sharded checkpoint (index json + `shards` files); returns the index path."""
    os.makedirs(directory, exist_ok=True)
    keys = list(state_dict_hf)
    extension = "safetensors" if safetensors else "bin"
    stem = "model" if safetensors else "pytorch_model"
    weight_map = {}
    for index, part in enumerate(np.array_split(np.arange(len(keys)), shards)):
        name = f"{stem}-{index + 1:05d}-of-{shards:05d}.{extension}"
        tensors = {keys[i]: np.ascontiguousarray(state_dict_hf[keys[i]]) for i in part}
        if safetensors:
            from safetensors.numpy import save_file

            save_file(tensors, os.path.join(directory, name))
        else:
            import torch

            torch.save({key: torch.from_numpy(value) for key, value in tensors.items()},
                       os.path.join(directory, name))
        weight_map.update(dict.fromkeys(tensors, name))
    index_path = os.path.join(directory, f"{stem}.{extension}.index.json")
    total_size = sum(int(np.asarray(value).nbytes) for value in state_dict_hf.values())
    with open(index_path, "w", encoding="utf-8") as stream:
        json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, stream, indent=1)
    return index_path
