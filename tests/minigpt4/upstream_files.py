"""The files a MiniGPT-4 user downloads, written from a tiny random transformers model.

MiniGPT-4 (Vision-CAIR/MiniGPT-4) is assembled from four files: LAVIS' `eva_vit_g.pth` (EVA-ViT-g),
LAVIS' `blip2_pretrained_flant5xxl.pth` (ln_vision, query tokens, Q-Former), a Hugging Face
Vicuna directory and MiniGPT-4's own `pretrained_minigpt4.pth` (llama_proj). This module writes
the four, with LAVIS' key names, from the weights of a transformers `Blip2ForConditionalGeneration`
with a LLaMA decoder, and keeps that model as the oracle: our converter reads the files, our
model must then give the oracle's logits and greedy tokens. The Llama-2 variant (no Q-Former)
gets the same treatment with a small torch module built from transformers' parts.

The LAVIS -> transformers names follow transformers' `convert_blip_2_original_to_pytorch.py`
(../shared/notes/minigpt4.md §2.4); this module writes the inverse.
"""
import contextlib
import dataclasses
import json
import os
from typing import Optional

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2QFormerConfig, Blip2VisionConfig,
                          Blip2VisionModel)
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm

NORM_GAIN_SCALE = 0.2  # norm weights are 1 + NORM_GAIN_SCALE * N(0, 1)
BIAS_SCALE = 0.1
WEIGHT_SCALE = 0.1  # matrices, embeddings, query tokens
# Scales every weight that writes into the ViT's residual stream (embeddings, attention and MLP
# outputs), so the stream reaching ln_vision is small enough for its eps (1e-5 upstream, not the
# blocks' 1e-6) to show in the logits.
VISION_STREAM_SCALE = 0.03
VISION_STREAM_WRITERS = ("embeddings.", "self_attn.projection.", "mlp.fc2.")
TOKENS_PER_MERGE = 4  # the Llama-2 variant concatenates 4 neighbouring patch tokens
# Sizes of the BLIP-2 file's text-path tensors, which MiniGPT-4 never loads (any small values do).
QFORMER_TEXT_VOCAB = 40
QFORMER_TEXT_POSITIONS = 16
BLIP2_EMBED_DIM = 16  # vision_proj / text_proj width (256 upstream)
T5_HIDDEN = 24  # t5_proj output width (4096 upstream)
# Vicuna weight format -> (shard file names, index file name), as save_pretrained names them.
SHARD_LAYOUT = {
    "bin": (("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"), "pytorch_model.bin.index.json"),
    "safetensors": (("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
                    "model.safetensors.index.json"),
}


@dataclasses.dataclass
class UpstreamFiles:
    eva_vit: str  # path of eva_vit_g.pth
    blip2: Optional[str]  # path of blip2_pretrained_flant5xxl.pth; None for the Llama-2 variant
    vicuna: str  # the Hugging Face LLaMA directory
    minigpt4: str  # path of pretrained_minigpt4.pth (pretrained_minigpt4_llama2_7b.pth)
    reference: object  # the torch oracle module (eval, float32)


@dataclasses.dataclass
class Llama2VariantConfig:
    """The two fields reference_logits reads, named as in transformers' Blip2Config so both
    references take the same path: placeholders per image and the placeholder id."""

    num_query_tokens: int
    image_token_id: Optional[int] = None


class Llama2VariantReference(nn.Module):
    """MiniGPT-4's Llama-2 variant (MG4@HEAD minigpt4.py encode_img, has_qformer False):
    EVA -> ln_vision -> drop CLS -> 4 neighbouring tokens concatenated -> llama_proj, written
    over the placeholders of the LLaMA input embeddings. forward/generate take the arguments
    of Blip2ForConditionalGeneration's."""

    def __init__(self, vision_config: Blip2VisionConfig, text_config: HFLlamaConfig):
        super().__init__()
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        self.config = Llama2VariantConfig(num_query_tokens=patches // TOKENS_PER_MERGE)
        self.vision_model = Blip2VisionModel(vision_config)
        self.llama_proj = nn.Linear(TOKENS_PER_MERGE * vision_config.hidden_size, text_config.hidden_size)
        self.language_model = HFLlamaForCausalLM(text_config)

    def get_image_features(self, pixel_values):
        patches = self.vision_model(pixel_values=pixel_values).last_hidden_state[:, 1:, :]
        batch, count, width = patches.shape
        return self.llama_proj(patches.reshape(batch, count // TOKENS_PER_MERGE, TOKENS_PER_MERGE * width))

    def _spliced_embeddings(self, pixel_values, input_ids):
        embeddings = self.language_model.get_input_embeddings()(input_ids)
        placeholders = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(embeddings)
        return embeddings.masked_scatter(placeholders, self.get_image_features(pixel_values))

    def forward(self, pixel_values, input_ids, attention_mask=None):
        return self.language_model(inputs_embeds=self._spliced_embeddings(pixel_values, input_ids),
                                   attention_mask=attention_mask)

    @torch.no_grad()
    def generate(self, pixel_values, input_ids, attention_mask=None, **generate_kwargs):
        return self.language_model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                            inputs_embeds=self._spliced_embeddings(pixel_values, input_ids),
                                            **generate_kwargs)


# --- transformers configs from ours --------------------------------------------------------------

def hf_vision_config(vision_config) -> Blip2VisionConfig:
    return Blip2VisionConfig(
        image_size=vision_config.image_size, patch_size=vision_config.patch_size,
        hidden_size=vision_config.hidden_size, num_hidden_layers=vision_config.num_hidden_layers,
        num_attention_heads=vision_config.num_attention_heads, intermediate_size=vision_config.intermediate_size,
        hidden_act=vision_config.hidden_act.lower(), layer_norm_eps=vision_config.layer_norm_eps, qkv_bias=True,
        attention_dropout=0.0, attn_implementation="eager")


def hf_qformer_config(qformer_config) -> Blip2QFormerConfig:
    return Blip2QFormerConfig(
        hidden_size=qformer_config.hidden_size, num_hidden_layers=qformer_config.num_hidden_layers,
        num_attention_heads=qformer_config.num_heads, intermediate_size=qformer_config.intermediate_size,
        hidden_act=qformer_config.hidden_act.lower(), layer_norm_eps=qformer_config.layer_norm_eps,
        cross_attention_frequency=qformer_config.cross_attention_freq,
        encoder_hidden_size=qformer_config.encoder_width, use_qformer_text_input=False,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_llama_config(text_config) -> HFLlamaConfig:
    return HFLlamaConfig(
        vocab_size=text_config.vocab_size, hidden_size=text_config.hidden_size,
        intermediate_size=text_config.ffn_hidden_size, num_hidden_layers=text_config.num_layers,
        num_attention_heads=text_config.num_heads, num_key_value_heads=text_config.kv_heads,
        rms_norm_eps=text_config.rms_norm_eps, rope_theta=text_config.theta,
        max_position_embeddings=text_config.seq_length, tie_word_embeddings=False,
        bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id, architectures=["LlamaForCausalLM"], attn_implementation="eager")


# --- the oracles ---------------------------------------------------------------------------------

def blip2_oracle(vision_config, qformer_config, text_config) -> Blip2ForConditionalGeneration:
    """transformers' MiniGPT-4 (Vicuna variant) of these sizes, weights as constructed; HF builds
    post_layernorm (LAVIS' ln_vision) with the blocks' eps, upstream's is nn.LayerNorm's 1e-5."""
    if qformer_config.encoder_width != vision_config.hidden_size:
        raise ValueError(f"Q-Former encoder_width {qformer_config.encoder_width} is not the ViT's "
                         f"hidden_size {vision_config.hidden_size}")
    config = Blip2Config.from_vision_qformer_text_configs(
        hf_vision_config(vision_config), hf_qformer_config(qformer_config), hf_llama_config(text_config),
        num_query_tokens=qformer_config.query_length)
    model = Blip2ForConditionalGeneration._from_config(config, attn_implementation="eager")
    model.vision_model.post_layernorm.eps = vision_config.ln_vision_eps
    return model.eval()


def llama2_variant_oracle(vision_config, text_config) -> Llama2VariantReference:
    """MiniGPT-4's Llama-2 variant of these sizes. Upstream never loads a BLIP-2 file here, so
    ln_vision stays a fresh nn.LayerNorm: weight 1, bias 0, eps 1e-5."""
    model = Llama2VariantReference(hf_vision_config(vision_config), hf_llama_config(text_config))
    model.vision_model.post_layernorm.eps = vision_config.ln_vision_eps
    return model.eval()


def _randomise(model, generator):
    """Every parameter random (norm gains around 1); EVA has no K bias, so the K third of each
    fused qkv bias is zero and the weights stay representable in LAVIS' q_bias/v_bias form."""
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=generator)
                if isinstance(module, (nn.LayerNorm, LlamaRMSNorm)) and name == "weight":
                    param.copy_(1.0 + NORM_GAIN_SCALE * noise)
                else:
                    param.copy_((BIAS_SCALE if name == "bias" else WEIGHT_SCALE) * noise)
                full_name = f"{module_name}.{name}"
                if full_name.startswith("vision_model.") and any(part in full_name for part in VISION_STREAM_WRITERS):
                    param.mul_(VISION_STREAM_SCALE)
                if full_name.endswith("self_attn.qkv.bias"):
                    width = param.shape[0] // 3
                    param[width:2 * width] = 0.0
    return model


# --- LAVIS / MiniGPT-4 / Hugging Face files ------------------------------------------------------

def _eva_vit_state_dict(vision_model: Blip2VisionModel, num_layers):
    """LAVIS' EVA VisionTransformer state dict (bare keys, no final norm) from HF's vision model."""
    hf = vision_model.state_dict()
    eva = {
        "cls_token": hf["embeddings.class_embedding"],
        "pos_embed": hf["embeddings.position_embedding"],
        "patch_embed.proj.weight": hf["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": hf["embeddings.patch_embedding.bias"],
    }
    for layer in range(num_layers):
        source, target = f"encoder.layers.{layer}.", f"blocks.{layer}."
        qkv_bias = hf[source + "self_attn.qkv.bias"]
        width = qkv_bias.shape[0] // 3
        for kind in ("weight", "bias"):
            eva[f"{target}norm1.{kind}"] = hf[f"{source}layer_norm1.{kind}"]
        eva[target + "attn.qkv.weight"] = hf[source + "self_attn.qkv.weight"]
        eva[target + "attn.q_bias"] = qkv_bias[:width]
        eva[target + "attn.v_bias"] = qkv_bias[2 * width:]
        for kind in ("weight", "bias"):
            eva[f"{target}attn.proj.{kind}"] = hf[f"{source}self_attn.projection.{kind}"]
            eva[f"{target}norm2.{kind}"] = hf[f"{source}layer_norm2.{kind}"]
            eva[f"{target}mlp.fc1.{kind}"] = hf[f"{source}mlp.fc1.{kind}"]
            eva[f"{target}mlp.fc2.{kind}"] = hf[f"{source}mlp.fc2.{kind}"]
    return eva


def _blip2_text_path(qformer_config, generator):
    """The BLIP-2 checkpoint's tensors that MiniGPT-4 deletes or never builds (text embeddings,
    text FFN, LM head, contrastive/ITM heads, T5 projection), random; a converter must skip them."""
    hidden, inner = qformer_config.hidden_size, qformer_config.intermediate_size

    def draw(*shape):
        return WEIGHT_SCALE * torch.randn(shape, generator=generator)

    extra = {
        "Qformer.bert.embeddings.position_ids": torch.arange(QFORMER_TEXT_POSITIONS).unsqueeze(0),
        "Qformer.bert.embeddings.word_embeddings.weight": draw(QFORMER_TEXT_VOCAB, hidden),
        "Qformer.bert.embeddings.position_embeddings.weight": draw(QFORMER_TEXT_POSITIONS, hidden),
    }
    for layer in range(qformer_config.num_hidden_layers):
        prefix = f"Qformer.bert.encoder.layer.{layer}."
        extra.update({
            prefix + "intermediate.dense.weight": draw(inner, hidden),
            prefix + "intermediate.dense.bias": draw(inner),
            prefix + "output.dense.weight": draw(hidden, inner),
            prefix + "output.dense.bias": draw(hidden),
            prefix + "output.LayerNorm.weight": 1.0 + draw(hidden),
            prefix + "output.LayerNorm.bias": draw(hidden),
        })
    extra.update({
        "Qformer.cls.predictions.bias": draw(QFORMER_TEXT_VOCAB),
        "Qformer.cls.predictions.transform.dense.weight": draw(hidden, hidden),
        "Qformer.cls.predictions.transform.dense.bias": draw(hidden),
        "Qformer.cls.predictions.transform.LayerNorm.weight": 1.0 + draw(hidden),
        "Qformer.cls.predictions.transform.LayerNorm.bias": draw(hidden),
        "Qformer.cls.predictions.decoder.weight": draw(QFORMER_TEXT_VOCAB, hidden),
        "vision_proj.weight": draw(BLIP2_EMBED_DIM, hidden),
        "vision_proj.bias": draw(BLIP2_EMBED_DIM),
        "text_proj.weight": draw(BLIP2_EMBED_DIM, hidden),
        "text_proj.bias": draw(BLIP2_EMBED_DIM),
        "itm_head.weight": draw(2, hidden),
        "itm_head.bias": draw(2),
        "temp": torch.tensor(0.07),
        "t5_proj.weight": draw(T5_HIDDEN, hidden),
        "t5_proj.bias": draw(T5_HIDDEN),
    })
    return extra


def _blip2_state_dict(model: Blip2ForConditionalGeneration, qformer_config, generator):
    """LAVIS' BLIP-2 state dict: ln_vision, query_tokens, the Q-Former under Qformer.bert., and
    the text-path tensors MiniGPT-4 ignores."""
    post_layernorm = model.vision_model.post_layernorm
    blip2 = {"ln_vision.weight": post_layernorm.weight, "ln_vision.bias": post_layernorm.bias,
             "query_tokens": model.query_tokens}
    for key, value in model.qformer.state_dict().items():
        if key.startswith("layernorm."):
            blip2["Qformer.bert.embeddings.LayerNorm." + key[len("layernorm."):]] = value
        else:  # attention.attention -> attention.self, crossattention.attention -> crossattention.self
            blip2["Qformer.bert." + key.replace("attention.attention.", "attention.self.")] = value
    blip2.update(_blip2_text_path(qformer_config, generator))
    return blip2


def _save_torch(state_dict, path):
    """torch.save of detached, contiguous copies: loadable with weights_only=True, no shared storage."""
    torch.save(_detached(state_dict), path)
    return str(path)


def _save_torch_model(state_dict, path):
    """LAVIS' checkpoint layout: the state dict under "model"."""
    torch.save({"model": _detached(state_dict)}, path)
    return str(path)


def _detached(state_dict):
    return {key: value.detach().clone().contiguous() for key, value in state_dict.items()}


def _write_llama_directory(directory, language_model: HFLlamaForCausalLM, vicuna_format):
    """A Hugging Face LLaMA directory: config.json and the weights in two shards with their index,
    as `save_pretrained` lays them out (.bin shards or .safetensors shards)."""
    if vicuna_format not in SHARD_LAYOUT:
        raise ValueError(f"vicuna_format must be one of {sorted(SHARD_LAYOUT)}, got {vicuna_format!r}")
    os.makedirs(directory, exist_ok=True)
    language_model.config.to_json_file(os.path.join(directory, "config.json"))
    weights = _detached(language_model.state_dict())
    keys = list(weights)
    sizes = [weights[key].numel() * weights[key].element_size() for key in keys]
    split = min(int(np.searchsorted(np.cumsum(sizes), sum(sizes) / 2)) + 1, len(keys) - 1)
    shard_names, index_name = SHARD_LAYOUT[vicuna_format]
    weight_map = {}
    for shard_name, shard_keys in zip(shard_names, (keys[:split], keys[split:])):
        shard = {key: weights[key] for key in shard_keys}
        path = os.path.join(directory, shard_name)
        if vicuna_format == "bin":
            torch.save(shard, path)
        else:
            save_file(shard, path, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_keys, shard_name))
    with open(os.path.join(directory, index_name), "w", encoding="utf-8") as stream:
        json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, stream, indent=2)
    return str(directory)


def _llama_proj_checkpoint(projection: nn.Linear, path):
    """MiniGPT-4's released checkpoint: {"model": llama_proj only} (MG4#245)."""
    torch.save({"model": _detached({"llama_proj.weight": projection.weight, "llama_proj.bias": projection.bias})},
               path)
    return str(path)


def write_upstream_files(directory, vision_config, qformer_config, text_config, seed=0,
                         vicuna_format="bin") -> UpstreamFiles:
    """MiniGPT-4 (Vicuna) as upstream's four files in `directory`, from a random transformers
    Blip2ForConditionalGeneration (every weight drawn from `seed`), which is returned as the oracle."""
    generator = torch.Generator().manual_seed(seed)
    model = _randomise(blip2_oracle(vision_config, qformer_config, text_config), generator)
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    blip2 = _blip2_state_dict(model, qformer_config, generator)
    return UpstreamFiles(
        eva_vit=_save_torch(_eva_vit_state_dict(model.vision_model, vision_config.num_hidden_layers),
                            os.path.join(directory, "eva_vit_g.pth")),
        blip2=_save_torch_model(blip2, os.path.join(directory, "blip2_pretrained_flant5xxl.pth")),
        vicuna=_write_llama_directory(os.path.join(directory, "vicuna"), model.language_model, vicuna_format),
        minigpt4=_llama_proj_checkpoint(model.language_projection, os.path.join(directory, "pretrained_minigpt4.pth")),
        reference=model)


def write_llama2_variant_files(directory, vision_config, text_config, seed=0) -> UpstreamFiles:
    """MiniGPT-4's Llama-2 variant as upstream's files (eva_vit_g.pth, the LLaMA directory,
    pretrained_minigpt4_llama2_7b.pth; no BLIP-2 file), from a random Llama2VariantReference
    whose ln_vision keeps weight 1, bias 0 as upstream's does."""
    generator = torch.Generator().manual_seed(seed)
    model = _randomise(llama2_variant_oracle(vision_config, text_config), generator)
    with torch.no_grad():
        model.vision_model.post_layernorm.weight.fill_(1.0)
        model.vision_model.post_layernorm.bias.zero_()
    directory = str(directory)
    os.makedirs(directory, exist_ok=True)
    return UpstreamFiles(
        eva_vit=_save_torch(_eva_vit_state_dict(model.vision_model, vision_config.num_hidden_layers),
                            os.path.join(directory, "eva_vit_g.pth")),
        blip2=None,
        vicuna=_write_llama_directory(os.path.join(directory, "Llama-2-7b-chat-hf"), model.language_model, "bin"),
        minigpt4=_llama_proj_checkpoint(model.llama_proj,
                                        os.path.join(directory, "pretrained_minigpt4_llama2_7b.pth")),
        reference=model)


# --- running the oracle --------------------------------------------------------------------------

def _reference(files_or_reference):
    return files_or_reference.reference if isinstance(files_or_reference, UpstreamFiles) else files_or_reference


@contextlib.contextmanager
def _image_token(reference, image_token_id):
    """The oracle splices at `input_ids == config.image_token_id` (Blip2Config maps it onto
    image_token_index); set it for one call."""
    previous = reference.config.image_token_id
    reference.config.image_token_id = int(image_token_id)
    try:
        yield
    finally:
        reference.config.image_token_id = previous


def _torch_inputs(reference, pixel_values, input_ids, image_token_id):
    """Tensors of the inputs, refusing rows whose placeholder count is not the image's token
    count (transformers' masked_scatter would silently take a prefix of the image)."""
    input_ids = np.asarray(input_ids)
    counts = (input_ids == image_token_id).sum(axis=1)
    expected = reference.config.num_query_tokens
    if not np.all(counts == expected):
        raise ValueError(f"every row needs exactly {expected} image placeholders {image_token_id}, "
                         f"got {counts.tolist()}")
    return (torch.from_numpy(np.asarray(pixel_values, np.float32)),
            torch.from_numpy(input_ids.astype(np.int64)))


def reference_logits(files_or_reference, pixel_values, input_ids, image_token_id) -> np.ndarray:
    """The oracle's logits [B,L,V] (float32) for images [B,3,S,S] and prompts [B,L] whose
    image_token_id placeholders are replaced by the image embeddings; no padding."""
    reference = _reference(files_or_reference)
    pixels, ids = _torch_inputs(reference, pixel_values, input_ids, image_token_id)
    with torch.no_grad(), _image_token(reference, image_token_id):
        logits = reference(pixel_values=pixels, input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return logits.float().numpy()


def reference_greedy(files_or_reference, pixel_values, input_ids, image_token_id, max_new_tokens) -> list:
    """transformers' greedy generate, one row at a time, exactly `max_new_tokens` new ids per row
    (no eos stopping: eos_token_id=None overrides the LLaMA's eos 2)."""
    reference = _reference(files_or_reference)
    pixels, ids = _torch_inputs(reference, pixel_values, input_ids, image_token_id)
    new_tokens = []
    with _image_token(reference, image_token_id):
        for row in range(ids.shape[0]):
            prompt = ids[row:row + 1]
            output = reference.generate(
                pixel_values=pixels[row:row + 1], input_ids=prompt, attention_mask=torch.ones_like(prompt),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=None,
                pad_token_id=reference.language_model.config.pad_token_id)
            expected_length = prompt.shape[1] + max_new_tokens
            if output.shape[1] != expected_length or not torch.equal(output[:, :prompt.shape[1]], prompt):
                raise RuntimeError(f"generate returned {output.shape[1]} ids, expected the {prompt.shape[1]}-token "
                                   f"prompt and {max_new_tokens} new tokens")
            new_tokens.append(output[0, prompt.shape[1]:].tolist())
    return new_tokens
