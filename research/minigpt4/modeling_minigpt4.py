"""MiniGPT-4 in plain MindSpore: the LLaMA / Vicuna decoder, then the image side and the model
joining them (`MiniGPT4`).

Read top to bottom: RMSNorm, rotary tables, attention, feed-forward, layer, model, LM, image
encoder, MiniGPT4.
What makes LLaMA different from a GPT (DESIGN.md §6, transformers' modeling_llama.py):
- pre-norm layers with RMSNorm (eps 1e-6) normalising in float32 (`x * rsqrt(mean(x^2) + eps)`,
  cast back, then `weight *`, as transformers orders it), and a final RMSNorm;
- RoPE over the whole head in the **rotate-half** layout: dim i pairs with dim i + d/2 (not
  ChatGLM2's interleaved (2i, 2i+1) pairs), theta_i = base^(-2i/d); tables in float32
  (transformers casts them to the model dtype);
- q/k/v/o projections without bias; grouped key/value heads (query head h reads key/value head
  h // (heads/kv_heads)); only the key/value heads are cached (research.common.kv_cache);
- SwiGLU: down(silu(gate(x)) * up(x)), no biases; no dropout anywhere;
- an untied `lm_head`; when generating, only the last position's logits are computed.
Positions are [B,S] (0 over left padding, so a prompt starts at 0 whatever its padding); the
mask [B,1,S,T] (1 = attend) is causal and never attends to padding. `inputs_embeds` replaces the
token embeddings (MiniGPT-4 splices image embeddings into them).

Parameter names are MindFormers' llama names (`model.tok_embeddings.embedding_weight`,
`model.layers.N.attention.wq`, `feed_forward.w1` = gate, `w2` = down, `w3` = up,
`attention_norm`, `ffn_norm`, `model.norm_out`, `lm_head`), so a MindFormers llama checkpoint
and convert_minigpt4.py's output load as they are. Every shape is static: GRAPH mode compiles
each prompt bucket and the decode step once.

The image side (upstream `encode_img`, notes/minigpt4.md §2.1): EVA-ViT-g with ln_vision
(research.common.vision), the Q-Former (research.common.qformer) and `llama_proj`; the Llama-2
variant drops the CLS token and puts 4 neighbouring patch vectors side by side instead of the
Q-Former. The image embeddings replace the placeholders at `<ImageHere>` in the LLaMA's input
embeddings (research.common.image_splice).

Registered in MindFormers' registry as `ResearchLlamaForCausalLM` (MindFormers has its own
LlamaForCausalLM) and `MiniGPT4`.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer

from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.config import REGISTRY_PREFIX
from research.common.errors import UserInputError
from research.common.generation import GenerationConfig, generate
from research.common.image_splice import splice_image_embeddings, splice_prompt_embeddings
from research.common.kv_cache import (InGraphCausalLM, cache_slot_indices, expand_kv_groups,
                                      left_padded_positions_and_mask, write_cache)
from research.common.layers import (MASKED_SCORE, SkinnyDense, causal_positions_and_mask, ms_dtype,
                                    next_token_loss)
from research.common.qformer import QFormer
from research.common.runtime import load_weights
from research.common.vision import EvaViT
from research.minigpt4.configuration_minigpt4 import LlamaConfig, MiniGPT4Config


class LlamaRMSNorm(nn.Cell):
    """RMSNorm normalising in float32 whatever the compute dtype; the float32 weight multiplies
    the normalised input after the cast back (transformers' LlamaRMSNorm order)."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(hidden_size, np.float32)), name="weight")
        self.eps = eps

    def construct(self, x):
        x32 = x.astype(ms.float32)
        variance = ops.mean(ops.square(x32), -1, keep_dims=True)
        normed = (x32 * ops.rsqrt(variance + self.eps)).astype(x.dtype)
        return self.weight.astype(x.dtype) * normed


def rotary_tables(num_positions, head_dim, base):
    """cos/sin [num_positions, head_dim / 2] in float32: column i rotates dims (i, i + d/2)."""
    inv_freq = (1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))).astype(np.float32)
    angles = np.outer(np.arange(num_positions, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def apply_rotary(x, cos, sin):
    """x [B,S,heads,d]; cos/sin [B,S,1,d/2] float32. Rotate-half: the halves (x1, x2) become
    (x1 cos - x2 sin, x2 cos + x1 sin), in float32 (= x*cos + rotate_half(x)*sin)."""
    half = x.shape[-1] // 2
    x32 = x.astype(ms.float32)
    x1, x2 = x32[..., :half], x32[..., half:]
    return ops.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), axis=-1).astype(x.dtype)


class LlamaAttention(nn.Cell):
    """Self-attention with RoPE, grouped key/value heads and an optional KV cache of those heads."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.head_dim
        hidden, param_dtype = config.hidden_size, ms_dtype(config.param_init_type)
        self.wq = SkinnyDense(hidden, self.num_heads * self.head_dim, has_bias=False, dtype=param_dtype)
        self.wk = SkinnyDense(hidden, self.kv_heads * self.head_dim, has_bias=False, dtype=param_dtype)
        self.wv = SkinnyDense(hidden, self.kv_heads * self.head_dim, has_bias=False, dtype=param_dtype)
        self.wo = SkinnyDense(self.num_heads * self.head_dim, hidden, has_bias=False, dtype=param_dtype)
        self.scale = self.head_dim ** -0.5
        # q @ k^T without materialising k^T (a transpose of the whole cache per step)
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)

    def construct(self, hidden, cos, sin, attend, key_cache=None, value_cache=None, cache_slots=None):
        """hidden [B,S,H]; cos/sin [B,S,1,d/2]; attend [B,1,S,T] bool.

        Without a cache T == S and the new keys/values [B,kv_heads,S,d] are returned. With a
        cache of T slots the S new keys/values are first written at `cache_slots` (in place when
        the cache is a Parameter) and the queries attend over all T slots."""
        batch, length, _ = hidden.shape
        query = self.wq(hidden).reshape(batch, length, self.num_heads, self.head_dim)
        key = self.wk(hidden).reshape(batch, length, self.kv_heads, self.head_dim)
        value = self.wv(hidden).reshape(batch, length, self.kv_heads, self.head_dim)
        query = apply_rotary(query, cos, sin).transpose(0, 2, 1, 3)  # [B,heads,S,d]
        key = apply_rotary(key, cos, sin).transpose(0, 2, 1, 3)  # [B,kv_heads,S,d]
        value = value.transpose(0, 2, 1, 3)
        if key_cache is not None:
            key = write_cache(key_cache, key, cache_slots)
            value = write_cache(value_cache, value, cache_slots)

        repeats = self.num_heads // self.kv_heads
        scores = self.scores_matmul(query, expand_kv_groups(key, repeats)).astype(ms.float32) * self.scale
        scores = ops.select(attend, scores, ops.full_like(scores, MASKED_SCORE))
        probs = ops.softmax(scores, axis=-1).astype(value.dtype)
        context = ops.matmul(probs, expand_kv_groups(value, repeats)).transpose(0, 2, 1, 3)
        output = self.wo(context.reshape(batch, length, self.num_heads * self.head_dim))
        return output, key, value


class LlamaFeedForward(nn.Cell):
    """SwiGLU: w2(silu(w1(x)) * w3(x)); w1 = HF gate_proj, w3 = up_proj, w2 = down_proj."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        hidden, ffn, param_dtype = config.hidden_size, config.ffn_hidden_size, ms_dtype(config.param_init_type)
        self.w1 = SkinnyDense(hidden, ffn, has_bias=False, dtype=param_dtype)
        self.w3 = SkinnyDense(hidden, ffn, has_bias=False, dtype=param_dtype)
        self.w2 = SkinnyDense(ffn, hidden, has_bias=False, dtype=param_dtype)

    def construct(self, x):
        return self.w2(ops.silu(self.w1(x)) * self.w3(x))


class LlamaDecodeLayer(nn.Cell):
    """One pre-norm layer: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.attention_norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attention = LlamaAttention(config)
        self.ffn_norm = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.feed_forward = LlamaFeedForward(config)

    def construct(self, hidden, cos, sin, attend, key_cache=None, value_cache=None, cache_slots=None):
        attention_output, key, value = self.attention(
            self.attention_norm(hidden), cos, sin, attend, key_cache, value_cache, cache_slots)
        hidden = hidden + attention_output
        hidden = hidden + self.feed_forward(self.ffn_norm(hidden))
        return hidden, key, value


class LlamaEmbedding(nn.Cell):
    """Word embeddings only (no positions, no scaling); MindFormers' parameter name. Random
    weights are N(0, 1) as torch's nn.Embedding starts."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embedding_weight = Parameter(
            initializer(Normal(1.0), (config.vocab_size, config.hidden_size), ms_dtype(config.param_init_type)),
            name="embedding_weight")

    def construct(self, input_ids):
        return ops.gather(self.embedding_weight, input_ids, 0)


class LlamaModel(nn.Cell):
    """Embedding, layers and final RMSNorm (HF's `model`); returns the normalised hidden states
    and the new keys/values."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.tok_embeddings = LlamaEmbedding(config)
        self.layers = nn.CellList([LlamaDecodeLayer(config) for _ in range(config.num_layers)])
        self.norm_out = LlamaRMSNorm(config.hidden_size, config.rms_norm_eps)
        cos, sin = rotary_tables(config.seq_length, config.head_dim, config.theta)
        self.rotary_cos = Tensor(cos)
        self.rotary_sin = Tensor(sin)

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds=None,
                  key_cache=None, value_cache=None, cache_index=None):
        """position_ids [B,S]; attention_mask [B,1,S,T], 1 = attend."""
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        hidden = inputs_embeds.astype(self.compute_dtype)
        batch, length = position_ids.shape
        cos = ops.gather(self.rotary_cos, position_ids, 0).reshape(batch, length, 1, -1)
        sin = ops.gather(self.rotary_sin, position_ids, 0).reshape(batch, length, 1, -1)
        attend = attention_mask > 0
        cache_slots = None
        if key_cache is not None:
            cache_slots = cache_slot_indices(batch, self.config.kv_heads, length, cache_index)
        keys, values = (), ()
        for i, layer in enumerate(self.layers):
            if key_cache is None:
                hidden, key, value = layer(hidden, cos, sin, attend)
            else:
                hidden, key, value = layer(hidden, cos, sin, attend, key_cache[i], value_cache[i], cache_slots)
            keys += (key,)
            values += (value,)
        return self.norm_out(hidden), keys, values


@MindFormerRegister.register(MindFormerModuleType.MODELS, alias=REGISTRY_PREFIX + "LlamaForCausalLM")
class LlamaForCausalLM(InGraphCausalLM, nn.Cell):
    """LLaMA for generation (driven by research.common.generation through InGraphCausalLM).

    construct(input_ids, position_ids, attention_mask, inputs_embeds=None, key_cache=None,
    value_cache=None, cache_index=None, logits_index=None) -> (logits float32, keys, values)
    - full forward: no cache; logits [B,S,V], or [B,V] at `logits_index` [B];
    - with a cache (CachedDecoder's, or stacked tensors in exported graphs): the S tokens are
      written at slots cache_index..; keys/values are None for the in-place cache.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = SkinnyDense(config.hidden_size, config.vocab_size, has_bias=False,
                                   dtype=ms_dtype(config.param_init_type))
        if config.compute_dtype != "float32":
            for _, cell in self.cells_and_names():
                if isinstance(cell, nn.Dense):
                    cell.to_float(ms_dtype(config.compute_dtype))

    def kv_cache_layout(self):
        """(layers, cached heads, head dim, dtype): only the key/value heads are cached."""
        config = self.config
        return config.num_layers, config.kv_heads, config.head_dim, ms_dtype(config.compute_dtype)

    def embed_tokens(self, input_ids):
        """Token embeddings in the compute dtype (to splice image embeddings into)."""
        return self.model.tok_embeddings(input_ids).astype(self.model.compute_dtype)

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds=None,
                  key_cache=None, value_cache=None, cache_index=None, logits_index=None):
        hidden, keys, values = self.model(input_ids, position_ids, attention_mask, inputs_embeds,
                                          key_cache, value_cache, cache_index)
        if logits_index is not None:  # generation: the vocabulary projection of one row only
            batch = hidden.shape[0]
            index = ops.broadcast_to(logits_index.reshape(-1, 1, 1), (batch, 1, hidden.shape[2]))
            hidden = ops.gather_elements(hidden, 1, index).squeeze(1)
        logits = self.lm_head(hidden).astype(ms.float32)
        if isinstance(key_cache, tuple):  # CachedDecoder's Parameters, already written in place
            return logits, None, None
        return logits, ops.stack(keys), ops.stack(values)

    def generation_inputs(self, input_ids, pad_lengths):
        """Positions [B,L] and mask [B,1,L,L] of left-padded rows (see left_padded_positions_and_mask)."""
        return left_padded_positions_and_mask(input_ids, pad_lengths)


def parameter_shapes(config: LlamaConfig):
    """{parameter name: shape} of LlamaForCausalLM(config), without allocating it."""
    hidden, ffn = config.hidden_size, config.ffn_hidden_size
    q_width, kv_width = config.num_heads * config.head_dim, config.kv_heads * config.head_dim
    shapes = {"model.tok_embeddings.embedding_weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes.update({
            layer + "attention_norm.weight": (hidden,),
            layer + "attention.wq.weight": (q_width, hidden),
            layer + "attention.wk.weight": (kv_width, hidden),
            layer + "attention.wv.weight": (kv_width, hidden),
            layer + "attention.wo.weight": (hidden, q_width),
            layer + "ffn_norm.weight": (hidden,),
            layer + "feed_forward.w1.weight": (ffn, hidden),
            layer + "feed_forward.w2.weight": (hidden, ffn),
            layer + "feed_forward.w3.weight": (ffn, hidden),
        })
    shapes["model.norm_out.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


class MiniGPT4ImageEncoder(nn.Cell):
    """pixel_values [B,3,S,S] float32 -> image embeddings [B, image_tokens, LLaMA hidden]."""

    def __init__(self, config: MiniGPT4Config):
        super().__init__()
        self.config = config
        self.visual_encoder = EvaViT(config.vision_config)  # ln_vision included
        self.has_qformer = config.has_qformer
        if config.has_qformer:
            self.qformer = QFormer(config.qformer_config)
        self.llama_proj = nn.Dense(config.projection_width, config.text_config.hidden_size,
                                   dtype=ms_dtype(config.dtype))
        if config.compute_dtype != "float32":
            self.llama_proj.to_float(ms_dtype(config.compute_dtype))

    def construct(self, pixel_values):
        image = self.visual_encoder(pixel_values)  # [B, 1 + patches, vision hidden]
        if self.has_qformer:
            features = self.qformer(image)
        else:  # Llama-2 variant: drop CLS, 4 neighbouring patches side by side
            patches = image[:, 1:, :]
            batch, count, width = patches.shape
            merged = MiniGPT4Config.MERGED_PATCHES
            features = patches.reshape(batch, count // merged, width * merged)
        return self.llama_proj(features.astype(self.llama_proj.weight.dtype))


def checkpoint_paths(config: MiniGPT4Config):
    """(what, path) of the four converted checkpoints a config names, in loading order."""
    return [("ViT checkpoint (vision_config.checkpoint_name_or_path)", config.vision_config.checkpoint_name_or_path),
            ("Q-Former checkpoint (qformer_config.checkpoint_name_or_path)",
             config.qformer_config.checkpoint_name_or_path if config.has_qformer else ""),
            ("LLaMA checkpoint (text_config.checkpoint_name_or_path)", config.text_config.checkpoint_name_or_path),
            ("llama_proj checkpoint (model_config.checkpoint_name_or_path)", config.checkpoint_name_or_path)]


# What each image-side checkpoint may lack (names are MiniGPT4's): the ViT file (eva_vit_g.pth) has
# no ln_vision, the Q-Former file (BLIP-2's) has ln_vision and the Q-Former only, the llama_proj
# file (pretrained_minigpt4.pth, or a training checkpoint) llama_proj only. None: the LLaMA, a
# plain llama checkpoint loaded under `llama_model.`.
_VIT_BLOCKS = tuple("image_encoder.visual_encoder." + name
                    for name in ("patch_embedding.", "cls_token", "position_embeddings", "layers."))
_CHECKPOINT_PARTS = [
    ("image_encoder.visual_encoder.ln_vision.", "image_encoder.qformer.", "image_encoder.llama_proj.", "llama_model."),
    _VIT_BLOCKS + ("image_encoder.llama_proj.", "llama_model."),
    None,
    ("image_encoder.visual_encoder.", "image_encoder.qformer.", "llama_model."),
]


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class MiniGPT4(nn.Cell):
    """MiniGPT-4 for image chat (upstream `minigpt4/models/mini_gpt4.py`).

    Parameters live under `image_encoder.` (`visual_encoder.*`, `qformer.*`, `llama_proj.*`) and
    `llama_model.` (LlamaForCausalLM's names); each converted checkpoint holds one part.
    """

    def __init__(self, config: MiniGPT4Config):
        super().__init__()
        self.config = config
        self.image_encoder = MiniGPT4ImageEncoder(config)
        self.llama_model = LlamaForCausalLM(config.text_config)

    def construct(self, input_ids, position_ids, attention_mask, pixel_values, image_mask):
        """Logits [B,S,V] for input_ids [B,S] whose `image_mask` positions hold the image."""
        image_embeds = self.image_encoder(pixel_values)
        embeds = splice_image_embeddings(self.llama_model.embed_tokens(input_ids), image_embeds, image_mask)
        logits, _, _ = self.llama_model(input_ids, position_ids, attention_mask, embeds)
        return logits

    def load_checkpoints(self):
        """Load the converted checkpoints the config names; returns the parts loaded."""
        loaded = []
        for (what, path), allow_missing in zip(checkpoint_paths(self.config), _CHECKPOINT_PARTS):
            if allow_missing is None:
                done = load_weights(self.llama_model, path, what, prefix="llama_model.")
            else:
                done = load_weights(self, path, what, allow_missing=allow_missing)
            if done:
                loaded.append(what.split(" (")[0])
        return loaded

    def image_embeddings(self, pixel_values):
        """Image embeddings [B, image_tokens, H] (numpy) for pixel_values [B,3,S,S]."""
        size = self.config.vision_config.image_size
        if pixel_values.ndim != 4 or pixel_values.shape[1:] != (3, size, size):
            raise UserInputError(f"pixel_values must be [batch, 3, {size}, {size}], got {list(pixel_values.shape)}")
        return self.image_encoder(Tensor(pixel_values, ms.float32)).asnumpy()

    def generate(self, prompts, pre_image_lengths, pixel_values, settings: GenerationConfig, on_tokens=None):
        """New token ids for each (image, prompt ids) row, all rows in one batch; the image's
        placeholders start at pre_image_lengths[row] in prompt `row`."""
        if len(prompts) != len(pixel_values) or len(prompts) != len(pre_image_lengths):
            raise UserInputError(f"{len(pixel_values)} images for {len(prompts)} prompts")
        embeds = splice_prompt_embeddings(
            prompts, pre_image_lengths, self.image_embeddings(pixel_values),
            lambda ids: self.llama_model.embed_tokens(Tensor(ids)).asnumpy(), settings.pad_token_id)
        return generate(self.llama_model, prompts, settings, prompt_embeds=embeds, on_tokens=on_tokens)


class MiniGPT4ForTraining(nn.Cell):
    """MiniGPT-4's training loss (upstream `MiniGPT4.forward`): right-padded rows of
    [bos] + prompt + image + text, next-token cross entropy where labels are not -100.
    auto_prefix=False keeps the model's parameter names."""

    def __init__(self, model: MiniGPT4):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, image, input_ids, labels, image_mask):
        position_ids, attention_mask = causal_positions_and_mask(*input_ids.shape)
        return next_token_loss(self.model(input_ids, position_ids, attention_mask, image, image_mask), labels)


def select_trainable(model: MiniGPT4):
    """Mark what training updates and return it: llama_proj, plus the ViT (with ln_vision), the
    Q-Former and the LLaMA where the config's freeze_vit / freeze_qformer / freeze_llama are
    False (upstream freezes all three)."""
    config = model.config
    parts = ("image_encoder.llama_proj.",)
    parts += () if config.freeze_vit else ("image_encoder.visual_encoder.",)
    parts += () if config.freeze_qformer else ("image_encoder.qformer.",)
    parts += () if config.freeze_llama else ("llama_model.",)
    trainable = []
    for param in model.get_parameters():
        param.requires_grad = param.name.startswith(parts)
        if param.requires_grad:
            trainable.append(param)
    return trainable


def split_checkpoint(params, config: MiniGPT4Config):
    """{part: {name: array}} of a whole-model checkpoint ({MiniGPT4 name: array}), laid out as the
    four files load_checkpoints reads: "vit" (without ln_vision), "qformer" (ln_vision and the
    Q-Former; the Llama-2 variant has none), "llama" (a plain llama checkpoint), "proj"."""
    parts = {"vit": {}, "qformer": {}, "llama": {}, "proj": {}}
    for name, value in params.items():
        if name.startswith("llama_model."):
            parts["llama"][name[len("llama_model."):]] = value
        elif name.startswith("image_encoder.llama_proj."):
            parts["proj"][name] = value
        elif name.startswith(("image_encoder.qformer.", "image_encoder.visual_encoder.ln_vision.")) \
                and config.has_qformer:
            parts["qformer"][name] = value
        elif name.startswith("image_encoder.visual_encoder."):
            parts["vit"][name] = value
        else:
            raise UserInputError(f"{name} is not a MiniGPT-4 parameter")
    return parts
