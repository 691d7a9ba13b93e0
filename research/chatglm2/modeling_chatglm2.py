"""ChatGLM2-6B in plain MindSpore.

Read top to bottom: RMSNorm, rotary tables, attention, MLP, block, the transformer, the LM.
What makes ChatGLM2 different from a GPT (DESIGN.md §5, HF THUDM/chatglm2-6b modeling_chatglm.py):
- pre-norm blocks with RMSNorm computed in float32 (`x * rsqrt(mean(x^2) + eps)`, then `weight *`),
  and a final RMSNorm;
- multi-query attention: a fused `query_key_value` (with bias) split contiguously as
  [Q heads*d | K groups*d | V groups*d]; query head h reads key/value group h // (heads/groups);
  only the groups are cached (research.common.kv_cache);
- RoPE on the first half of each head, on **interleaved pairs** (x[2i], x[2i+1]) rotated by
  theta_i = base^(-2i/(d/2)); the second half passes through. Tables in float32 (HF builds them
  in the model dtype, inexact in float16 beyond 2048 positions);
- SwiGLU: `dense_h_to_4h` -> silu(first half) * second half -> `dense_4h_to_h`, no biases;
- an untied `output_layer`; when generating, only the last position's logits are computed;
- with `pre_seq_len` (P-Tuning v2), a trainable prefix: per layer pre_seq_len keys and values of
  each KV group, without RoPE, that every query attends to before the tokens (upstream's
  `past_key_values` start); the tokens keep positions 0, 1, ...
Positions are [B,S] (0 over left padding, so a prompt starts at 0 whatever its padding); the
mask is causal and never attends to padding.

Parameter names are MindFormers 1.9's (`transformer.embedding.embedding_weight`, the rest as HF),
so convert_weight.py's output loads as is. Every shape is static: GRAPH mode compiles each
prompt bucket and the decode step once. Registered as `ResearchChatGLM2ForConditionalGeneration`.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import Normal, initializer
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.chatglm2.configuration_chatglm2 import LORA_DEFAULTS, REGISTRY_PREFIX, ChatGLM2Config
from research.common.kv_cache import (InGraphCausalLM, cache_slot_indices, expand_kv_groups,
                                      left_padded_positions_and_mask, write_cache)
from research.common.layers import (MASKED_SCORE, SkinnyDense, StepDropout, causal_positions_and_mask, ms_dtype,
                                    next_token_loss)


class RMSNorm(nn.Cell):
    """RMSNorm in float32 whatever the compute dtype; returns the input dtype."""

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(hidden_size, np.float32)), name="weight")
        self.eps = eps

    def construct(self, x):
        x32 = x.astype(ms.float32)
        variance = ops.mean(ops.square(x32), -1, keep_dims=True)
        return (self.weight * (x32 * ops.rsqrt(variance + self.eps))).astype(x.dtype)


def rotary_tables(num_positions, rotary_dim, base):
    """cos/sin [num_positions, rotary_dim / 2] in float32: column i for pair (2i, 2i+1)."""
    inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    angles = np.outer(np.arange(num_positions, dtype=np.float32), inv_freq).astype(np.float32)
    return np.cos(angles), np.sin(angles)


def apply_rotary(x, cos, sin, rotary_dim):
    """x [B,S,heads,d]; cos/sin [B,S,1,rotary_dim/2] float32. Pairs (x[2i], x[2i+1]) of the
    first rotary_dim dims become (x0 cos - x1 sin, x1 cos + x0 sin), in float32."""
    batch, length, heads, dim = x.shape
    rotated = x[..., :rotary_dim].astype(ms.float32).reshape(batch, length, heads, rotary_dim // 2, 2)
    x0, x1 = rotated[..., 0], rotated[..., 1]
    rotated = ops.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), axis=-1)
    rotated = rotated.reshape(batch, length, heads, rotary_dim).astype(x.dtype)
    if rotary_dim == dim:
        return rotated
    return ops.cat((rotated, x[..., rotary_dim:]), axis=-1)


class SelfAttention(nn.Cell):
    """Multi-query self-attention with RoPE and an optional KV cache of the groups only."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.kv_heads = config.kv_heads
        self.head_dim = config.kv_channels
        self.rotary_dim = config.rotary_dim
        param_dtype = ms_dtype(config.param_init_type)
        self.query_key_value = SkinnyDense(config.hidden_size, config.qkv_size, has_bias=True,
                                           dtype=param_dtype)
        self.dense = SkinnyDense(self.num_heads * self.head_dim, config.hidden_size, has_bias=False,
                                 dtype=param_dtype)
        self.scale = self.head_dim ** -0.5
        # q @ k^T without materialising k^T (a transpose of the whole cache per step)
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)
        self.attention_dropout = StepDropout(config.attention_dropout)

    def construct(self, hidden, cos, sin, attend, key_cache=None, value_cache=None, cache_slots=None,
                  prefix_key=None, prefix_value=None):
        """hidden [B,S,H]; cos/sin [B,S,1,rotary/2]; attend [B,1,S,P+T] bool.

        Without a cache T == S and the new keys/values [B,groups,S,d] are returned. With a cache
        of T slots the S new keys/values are first written at `cache_slots` (in place when the
        cache is a Parameter) and the queries attend over all T slots. A P-Tuning prefix
        (prefix_key/value [B,groups,P,d]) comes before them; the cache holds the tokens only.
        """
        batch, length, _ = hidden.shape
        qkv = self.query_key_value(hidden)
        q_size, kv_size = self.num_heads * self.head_dim, self.kv_heads * self.head_dim
        query = qkv[..., :q_size].reshape(batch, length, self.num_heads, self.head_dim)
        key = qkv[..., q_size:q_size + kv_size].reshape(batch, length, self.kv_heads, self.head_dim)
        value = qkv[..., q_size + kv_size:].reshape(batch, length, self.kv_heads, self.head_dim)
        query = apply_rotary(query, cos, sin, self.rotary_dim).transpose(0, 2, 1, 3)  # [B,heads,S,d]
        key = apply_rotary(key, cos, sin, self.rotary_dim).transpose(0, 2, 1, 3)  # [B,groups,S,d]
        value = value.transpose(0, 2, 1, 3)
        if key_cache is not None:
            key = write_cache(key_cache, key, cache_slots)
            value = write_cache(value_cache, value, cache_slots)

        repeats = self.num_heads // self.kv_heads
        scores = self.scores_matmul(query, expand_kv_groups(key, repeats)).astype(ms.float32) * self.scale
        if prefix_key is not None:
            prefix_scores = self.scores_matmul(query, expand_kv_groups(prefix_key, repeats)).astype(ms.float32)
            scores = ops.cat((prefix_scores * self.scale, scores), axis=-1)
        scores = ops.select(attend, scores, ops.full_like(scores, MASKED_SCORE))
        probs = self.attention_dropout(ops.softmax(scores, axis=-1)).astype(value.dtype)
        if prefix_key is None:
            context = ops.matmul(probs, expand_kv_groups(value, repeats))
        else:
            prefix_length = prefix_key.shape[2]
            context = (ops.matmul(probs[..., :prefix_length], expand_kv_groups(prefix_value, repeats))
                       + ops.matmul(probs[..., prefix_length:], expand_kv_groups(value, repeats)))
        context = context.transpose(0, 2, 1, 3)
        output = self.dense(context.reshape(batch, length, self.num_heads * self.head_dim))
        return output, key, value


class MLP(nn.Cell):
    """SwiGLU: dense_h_to_4h -> silu(first half) * second half -> dense_4h_to_h."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        param_dtype = ms_dtype(config.param_init_type)
        self.dense_h_to_4h = SkinnyDense(config.hidden_size, 2 * config.ffn_hidden_size, has_bias=False,
                                         dtype=param_dtype)
        self.dense_4h_to_h = SkinnyDense(config.ffn_hidden_size, config.hidden_size, has_bias=False,
                                         dtype=param_dtype)

    def construct(self, x):
        gate, up = ops.chunk(self.dense_h_to_4h(x), 2, axis=-1)
        return self.dense_4h_to_h(ops.silu(gate) * up)


class GLMBlock(nn.Cell):
    """One pre-norm layer: x + Attn(RMSNorm(x)), then x + MLP(RMSNorm(x))."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)
        self.hidden_dropout = StepDropout(config.hidden_dropout)

    def construct(self, hidden, cos, sin, attend, key_cache=None, value_cache=None, cache_slots=None,
                  prefix_key=None, prefix_value=None):
        attention_output, key, value = self.self_attention(
            self.input_layernorm(hidden), cos, sin, attend, key_cache, value_cache, cache_slots,
            prefix_key, prefix_value)
        hidden = hidden + self.hidden_dropout(attention_output)
        hidden = hidden + self.hidden_dropout(self.mlp(self.post_attention_layernorm(hidden)))
        return hidden, key, value


class Embedding(nn.Cell):
    """Word embeddings only (no positions, no scaling); MindFormers 1.9's parameter name. Random
    weights are N(0, 1) as upstream's torch nn.Embedding starts (zeros would leave the first
    layer's attention without a gradient when training from scratch)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.embedding_weight = Parameter(
            initializer(Normal(1.0), (config.padded_vocab_size, config.hidden_size), ms_dtype(config.param_init_type)),
            name="embedding_weight")

    def construct(self, input_ids):
        return ops.gather(self.embedding_weight, input_ids, 0)


class PrefixEmbedding(nn.Cell):
    """The prefix table [pre_seq_len, layers*2*groups*d] (HF `prefix_encoder.embedding.weight`)."""

    def __init__(self, pre_seq_len, width):
        super().__init__()
        self.weight = Parameter(initializer(Normal(1.0), (pre_seq_len, width), ms.float32), name="weight")


class PrefixEncoder(nn.Cell):
    """P-Tuning v2's prefix (HF PrefixEncoder, upstream ptuning/): the table, optionally through
    Linear(width, hidden) -> Tanh -> Linear(hidden, width) (`prefix_projection`), in float32.
    Entry ((layer*2 + {0 key, 1 value})*groups + g)*d + i of a row is dim i of group g's key or
    value at that prefix position in that layer."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.shape = (config.pre_seq_len, 2 * config.num_layers, config.kv_heads, config.kv_channels)
        width = 2 * config.num_layers * config.kv_heads * config.kv_channels
        self.embedding = PrefixEmbedding(config.pre_seq_len, width)
        self.trans = None
        if config.prefix_projection:
            self.trans = nn.SequentialCell(nn.Dense(width, config.hidden_size), nn.Tanh(),
                                           nn.Dense(config.hidden_size, width))
        self.dropout = StepDropout(config.prefix_dropout)

    def construct(self, batch, dtype):
        """(keys, values), each [layers, B, groups, pre_seq_len, d] in `dtype`."""
        prefix = self.embedding.weight
        if self.trans is not None:
            prefix = self.trans(prefix)
        prefix = ops.broadcast_to(prefix.astype(dtype).reshape((1,) + self.shape), (batch,) + self.shape)
        prefix = self.dropout(prefix).transpose(2, 0, 3, 1, 4)  # [2*layers, B, groups, pre, d]
        return prefix[0::2], prefix[1::2]


class Encoder(nn.Cell):
    """The layers and the final RMSNorm (HF's `encoder`)."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.layers = nn.CellList([GLMBlock(config) for _ in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class ChatGLM2Model(nn.Cell):
    """Embedding, encoder and output layer (HF's `transformer`); returns logits and the KV cache."""

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.config = config
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.embedding = Embedding(config)
        self.encoder = Encoder(config)
        self.output_layer = SkinnyDense(config.hidden_size, config.padded_vocab_size, has_bias=False,
                                        dtype=ms_dtype(config.param_init_type))
        self.embedding_dropout = StepDropout(config.hidden_dropout)
        self.prefix_encoder = PrefixEncoder(config) if config.pre_seq_len else None
        cos, sin = rotary_tables(config.seq_length, config.rotary_dim, 10000.0 * config.rope_ratio)
        self.rotary_cos = Tensor(cos)
        self.rotary_sin = Tensor(sin)
        if config.compute_dtype != "float32":
            for _, cell in self.cells_and_names():
                if isinstance(cell, nn.Dense):
                    cell.to_float(self.compute_dtype)

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds=None,
                  key_cache=None, value_cache=None, cache_index=None, logits_index=None):
        """position_ids [B,S]; attention_mask [B,1,S,T], 1 = attend."""
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        hidden = self.embedding_dropout(inputs_embeds.astype(self.compute_dtype))
        batch, length = position_ids.shape
        cos = ops.gather(self.rotary_cos, position_ids, 0).reshape(batch, length, 1, -1)
        sin = ops.gather(self.rotary_sin, position_ids, 0).reshape(batch, length, 1, -1)
        attend = attention_mask > 0
        prefix_keys = prefix_values = None
        if self.prefix_encoder is not None:  # every query sees the whole prefix
            prefix_keys, prefix_values = self.prefix_encoder(batch, self.compute_dtype)
            attend = ops.cat((ops.ones((batch, 1, length, prefix_keys.shape[3]), ms.bool_), attend), axis=-1)
        cache_slots = None
        if key_cache is not None:
            cache_slots = cache_slot_indices(batch, self.config.kv_heads, length, cache_index)
        keys, values = (), ()
        for i, layer in enumerate(self.encoder.layers):
            prefix_key = None if prefix_keys is None else prefix_keys[i]
            prefix_value = None if prefix_values is None else prefix_values[i]
            if key_cache is None:
                hidden, key, value = layer(hidden, cos, sin, attend, None, None, None, prefix_key, prefix_value)
            else:
                hidden, key, value = layer(hidden, cos, sin, attend, key_cache[i], value_cache[i], cache_slots,
                                           prefix_key, prefix_value)
            keys += (key,)
            values += (value,)
        hidden = self.encoder.final_layernorm(hidden)
        if logits_index is not None:  # generation: the vocabulary projection of one row only
            index = ops.broadcast_to(logits_index.reshape(-1, 1, 1), (batch, 1, hidden.shape[2]))
            hidden = ops.gather_elements(hidden, 1, index).squeeze(1)
        logits = self.output_layer(hidden).astype(ms.float32)
        if isinstance(key_cache, tuple):  # CachedDecoder's Parameters, already written in place
            return logits, None, None
        return logits, ops.stack(keys), ops.stack(values)


@MindFormerRegister.register(MindFormerModuleType.MODELS,
                             alias=REGISTRY_PREFIX + "ChatGLM2ForConditionalGeneration")
class ChatGLM2ForConditionalGeneration(InGraphCausalLM, nn.Cell):
    """ChatGLM2 for generation (driven by research.common.generation through InGraphCausalLM).

    construct(input_ids, position_ids, attention_mask, inputs_embeds=None, key_cache=None,
    value_cache=None, cache_index=None, logits_index=None) -> (logits float32, keys, values)
    - full forward: no cache; logits [B,S,V], or [B,V] at `logits_index` [B];
    - with a cache (CachedDecoder's, or stacked tensors in exported graphs): the S tokens are
      written at slots cache_index..; keys/values are None for the in-place cache.
    """

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        self.config = config
        self.transformer = ChatGLM2Model(config)

    def kv_cache_layout(self):
        """(layers, cached heads, head dim, dtype): only the multi-query groups are cached."""
        config = self.config
        return config.num_layers, config.kv_heads, config.kv_channels, ms_dtype(config.compute_dtype)

    def embed_tokens(self, input_ids):
        """Token embeddings in the compute dtype."""
        return self.transformer.embedding(input_ids).astype(self.transformer.compute_dtype)

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds=None,
                  key_cache=None, value_cache=None, cache_index=None, logits_index=None):
        return self.transformer(input_ids, position_ids, attention_mask, inputs_embeds,
                                key_cache, value_cache, cache_index, logits_index)

    def generation_inputs(self, input_ids, pad_lengths):
        """Positions [B,L] and mask [B,1,L,L] of left-padded rows (see left_padded_positions_and_mask)."""
        return left_padded_positions_and_mask(input_ids, pad_lengths)


class ChatGLM2ForTraining(nn.Cell):
    """The fine-tuning loss of right-padded rows (upstream ptuning/): positions 0..L-1, a causal
    mask (padding comes after the answer, so no real token sees it), next-token cross entropy
    over the answer (labels -100 elsewhere). auto_prefix=False keeps the model's parameter names."""

    def __init__(self, model: ChatGLM2ForConditionalGeneration):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, labels):
        position_ids, attention_mask = causal_positions_and_mask(*input_ids.shape)
        logits, _, _ = self.model(input_ids, position_ids, attention_mask)
        return next_token_loss(logits, labels)


def fine_tuning_method(config: ChatGLM2Config):
    """"ptuning2", "lora" or "full", from the config (pre_seq_len, pet_config)."""
    if config.pre_seq_len:
        return "ptuning2"
    return "lora" if config.pet_config else "full"


def add_lora(model: ChatGLM2ForConditionalGeneration, source=None):
    """Apply `pet_config` LoRA (LORA_DEFAULTS for the fields it leaves out) before the first
    forward pass; returns the adapted cell names."""
    from research.common.lora import LoRAConfig, apply_lora

    config = model.config
    lora = LoRAConfig.from_dict({**LORA_DEFAULTS, **config.pet_config}, "model.model_config.pet_config", source)
    return apply_lora(model, lora, LORA_DEFAULTS["target_modules"], ms_dtype(config.compute_dtype))


def select_trainable(model: ChatGLM2ForConditionalGeneration):
    """Mark what fine-tuning updates and return it: the prefix encoder (P-Tuning v2, as upstream
    freezes everything else), the LoRA matrices (LoRA), or every parameter (full fine-tuning)."""
    from research.common.lora import freeze_all_but_lora

    method = fine_tuning_method(model.config)
    if method == "lora":
        return freeze_all_but_lora(model)
    trainable = []
    for param in model.get_parameters():
        param.requires_grad = method == "full" or param.name.startswith("transformer.prefix_encoder.")
        if param.requires_grad:
            trainable.append(param)
    return trainable


def parameter_shapes(config: ChatGLM2Config):
    """{parameter name: shape} of ChatGLM2ForConditionalGeneration(config), without allocating it."""
    hidden, inner = config.hidden_size, config.num_attention_heads * config.kv_channels
    shapes = {"transformer.embedding.embedding_weight": (config.padded_vocab_size, hidden)}
    for i in range(config.num_layers):
        layer = f"transformer.encoder.layers.{i}."
        shapes.update({
            layer + "input_layernorm.weight": (hidden,),
            layer + "self_attention.query_key_value.weight": (config.qkv_size, hidden),
            layer + "self_attention.query_key_value.bias": (config.qkv_size,),
            layer + "self_attention.dense.weight": (hidden, inner),
            layer + "post_attention_layernorm.weight": (hidden,),
            layer + "mlp.dense_h_to_4h.weight": (2 * config.ffn_hidden_size, hidden),
            layer + "mlp.dense_4h_to_h.weight": (hidden, config.ffn_hidden_size),
        })
    shapes["transformer.encoder.final_layernorm.weight"] = (hidden,)
    shapes["transformer.output_layer.weight"] = (config.padded_vocab_size, hidden)
    return {**shapes, **prefix_parameter_shapes(config)}


def prefix_parameter_shapes(config: ChatGLM2Config):
    """{parameter name: shape} of the P-Tuning v2 prefix encoder (empty without pre_seq_len):
    HF's `transformer.prefix_encoder.*` names."""
    if not config.pre_seq_len:
        return {}
    width = 2 * config.num_layers * config.kv_heads * config.kv_channels
    shapes = {"transformer.prefix_encoder.embedding.weight": (config.pre_seq_len, width)}
    if config.prefix_projection:
        shapes.update({"transformer.prefix_encoder.trans.0.weight": (config.hidden_size, width),
                       "transformer.prefix_encoder.trans.0.bias": (config.hidden_size,),
                       "transformer.prefix_encoder.trans.2.weight": (width, config.hidden_size),
                       "transformer.prefix_encoder.trans.2.bias": (width,)})
    return shapes
