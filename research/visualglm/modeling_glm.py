"""GLM-6B (ChatGLM-6B v1), the language model of VisualGLM, in plain MindSpore.

Read top to bottom: rotary tables, attention, block, the transformer, the LM head.
What makes GLM-6B different from a GPT (DESIGN.md §4):
- DeepNorm-style post-LN blocks: `a = LN(h); h = a*alpha + Attn(a); m = LN(h); out = m*alpha + MLP(m)`
  with alpha = sqrt(2 * num_layers).
- 2D rotary positions: the first half of each head rotates by `position_ids`, the second
  half by `block_position_ids` (rotate-half style, rotary dim = head_dim / 2).
- Attention scaling per layer: q / (sqrt(d) * (layer+1)), scores in float32 times (layer+1),
  masked with -10000, float32 softmax. Bidirectional over the prompt, causal after it.
- fused query_key_value laid out contiguously as [Q | K | V] (SAT's layout; the HF
  per-head layout is permuted by the weight converter).

The KV cache is research.common.kv_cache's: the in-place cache for generation, stacked caches
as graph inputs/outputs for the exported MindIR graphs; GLM-6B caches all its heads.
Every shape is static, so GRAPH mode compiles each prompt bucket and the decode step once.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.errors import UserInputError
from research.common.kv_cache import InGraphCausalLM, cache_slot_indices, write_cache
from research.common.layers import LayerNormFP32, SkinnyDense, ms_dtype
from research.visualglm.configuration_glm import GLMConfig

MASKED_SCORE = -10000.0


def rotary_tables(num_positions, rotary_dim, base):
    """cos/sin tables [num_positions, rotary_dim] computed in float32, as SAT does."""
    inv_freq = 1.0 / (base ** (np.arange(0, rotary_dim, 2, dtype=np.float32) / rotary_dim))
    freqs = np.outer(np.arange(num_positions, dtype=np.float32), inv_freq.astype(np.float32))
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float32)
    return np.cos(emb), np.sin(emb)


def rotate_half(x):
    x1, x2 = ops.chunk(x, 2, axis=-1)
    return ops.cat((-x2, x1), axis=-1)


class GLMAttention(nn.Cell):
    """Self-attention with 2D rotary positions, per-layer scaling and an optional KV cache."""

    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        inner = self.num_heads * self.head_dim
        param_dtype = ms_dtype(config.param_init_type)
        self.query_key_value = SkinnyDense(config.hidden_size, 3 * inner, dtype=param_dtype)
        self.dense = SkinnyDense(inner, config.hidden_size, dtype=param_dtype)
        self.coeff = float(layer_id + 1)
        self.norm_factor = math.sqrt(self.head_dim) * self.coeff
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.softmax_dtype = ms_dtype(config.softmax_compute_type)
        # q @ k^T without materialising k^T (a transpose of the whole cache per step)
        self.scores_matmul = ops.BatchMatMul(transpose_b=True)
        self.attention_dropout = nn.Dropout(p=config.attention_dropout_rate)

    def _split_heads(self, x):
        batch, length, _ = x.shape
        return x.reshape(batch, length, self.num_heads, self.head_dim)

    def construct(self, hidden, rope, attend, key_cache=None, value_cache=None, cache_slots=None):
        """hidden [B,S,H]; rope = (cos, sin, block_cos, block_sin) [B,S,1,d/2]; attend [B,1,S,T] bool.

        Without a cache T == S and the new keys/values are returned as the cache. With a cache
        of T slots the S new keys/values are first written at `cache_slots` (see
        cache_slot_indices; in place when the cache is a Parameter) and the queries attend over
        all T slots.
        """
        qkv = self.query_key_value(hidden)
        query, key, value = ops.chunk(qkv, 3, axis=-1)
        query, key, value = self._split_heads(query), self._split_heads(key), self._split_heads(value)
        cos, sin, block_cos, block_sin = rope
        q1, q2 = ops.chunk(query, 2, axis=-1)
        k1, k2 = ops.chunk(key, 2, axis=-1)
        query = ops.cat((q1 * cos + rotate_half(q1) * sin,
                         q2 * block_cos + rotate_half(q2) * block_sin), axis=-1)
        key = ops.cat((k1 * cos + rotate_half(k1) * sin,
                       k2 * block_cos + rotate_half(k2) * block_sin), axis=-1)
        query = query.transpose(0, 2, 1, 3)  # [B, heads, S, d]
        key = key.transpose(0, 2, 1, 3)
        value = value.transpose(0, 2, 1, 3)
        if key_cache is not None:
            key = write_cache(key_cache, key, cache_slots)
            value = write_cache(value_cache, value, cache_slots)

        scores = self.scores_matmul(query / self.norm_factor, key)
        scores = scores.astype(self.softmax_dtype) * self.coeff
        scores = ops.select(attend, scores, ops.full_like(scores, MASKED_SCORE))
        probs = self.attention_dropout(ops.softmax(scores, axis=-1)).astype(value.dtype)
        context = ops.matmul(probs, value).transpose(0, 2, 1, 3)
        batch, length = context.shape[0], context.shape[1]
        output = self.dense(context.reshape(batch, length, self.num_heads * self.head_dim))
        return output, key, value


class GLMMLP(nn.Cell):
    """dense_h_to_4h -> GELU (tanh approximation) -> dense_4h_to_h."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        param_dtype = ms_dtype(config.param_init_type)
        self.dense_h_to_4h = SkinnyDense(config.hidden_size, config.inner_hidden_size, dtype=param_dtype)
        self.dense_4h_to_h = SkinnyDense(config.inner_hidden_size, config.hidden_size, dtype=param_dtype)

    def construct(self, x):
        return self.dense_4h_to_h(ops.gelu(self.dense_h_to_4h(x), approximate="tanh"))


class GLMBlock(nn.Cell):
    """One DeepNorm post-LN layer."""

    def __init__(self, config: GLMConfig, layer_id: int):
        super().__init__()
        eps = config.layernorm_epsilon
        self.input_layernorm = LayerNormFP32((config.hidden_size,), epsilon=eps)
        self.attention = GLMAttention(config, layer_id)
        self.post_attention_layernorm = LayerNormFP32((config.hidden_size,), epsilon=eps)
        self.mlp = GLMMLP(config)
        self.alpha = math.sqrt(2 * config.num_layers)
        # SAT's output dropout, after the attention's and the MLP's output projections
        self.hidden_dropout = nn.Dropout(p=config.hidden_dropout_rate)

    def construct(self, hidden, rope, attend, key_cache=None, value_cache=None, cache_slots=None):
        attention_input = self.input_layernorm(hidden)
        attention_output, key, value = self.attention(
            attention_input, rope, attend, key_cache, value_cache, cache_slots)
        hidden = attention_input * self.alpha + self.hidden_dropout(attention_output)
        mlp_input = self.post_attention_layernorm(hidden)
        return mlp_input * self.alpha + self.hidden_dropout(self.mlp(mlp_input)), key, value


class GLMModel(nn.Cell):
    """Embeddings, the layers and the final LayerNorm; returns hidden states and the KV cache."""

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.compute_dtype = ms_dtype(config.compute_dtype)
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, dtype=ms.int32)
        if config.param_init_type != "float32":
            self.word_embeddings.embedding_table.set_dtype(ms_dtype(config.param_init_type))
        self.embedding_dropout = nn.Dropout(p=config.embedding_dropout_prob)
        self.layers = nn.CellList([GLMBlock(config, i) for i in range(config.num_layers)])
        self.final_layernorm = LayerNormFP32((config.hidden_size,), epsilon=config.layernorm_epsilon)
        cos, sin = rotary_tables(config.seq_length + 1, config.head_dim // 2, config.rotary_base)
        self.rotary_cos = Tensor(cos)
        self.rotary_sin = Tensor(sin)
        for cell in self.cells_and_names():
            if isinstance(cell[1], nn.Dense) and config.compute_dtype != "float32":
                cell[1].to_float(self.compute_dtype)

    def _rope(self, positions):
        batch, length = positions.shape
        cos = ops.gather(self.rotary_cos, positions, 0).reshape(batch, length, 1, -1)
        sin = ops.gather(self.rotary_sin, positions, 0).reshape(batch, length, 1, -1)
        return cos.astype(self.compute_dtype), sin.astype(self.compute_dtype)

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds=None,
                  key_cache=None, value_cache=None, cache_index=None):
        """position_ids [B,2,S] (positions, block positions); attention_mask [B,1,S,T], 1 = attend."""
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        hidden = self.embedding_dropout(inputs_embeds.astype(self.compute_dtype))
        cos, sin = self._rope(position_ids[:, 0])
        block_cos, block_sin = self._rope(position_ids[:, 1])
        rope = (cos, sin, block_cos, block_sin)
        attend = attention_mask > 0
        keys, values = (), ()
        cache_slots = None
        if key_cache is not None:
            batch, length = hidden.shape[0], hidden.shape[1]
            cache_slots = cache_slot_indices(batch, self.config.num_heads, length, cache_index)
        for i, layer in enumerate(self.layers):
            if key_cache is None:
                hidden, key, value = layer(hidden, rope, attend)
            else:
                hidden, key, value = layer(hidden, rope, attend, key_cache[i], value_cache[i], cache_slots)
            keys += (key,)
            values += (value,)
        if isinstance(key_cache, tuple):  # CachedDecoder's Parameters, already written in place
            return self.final_layernorm(hidden), None, None
        return self.final_layernorm(hidden), ops.stack(keys), ops.stack(values)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class GLMForConditionalGeneration(InGraphCausalLM, nn.Cell):
    """GLM-6B with its LM head: logits and the KV cache for the generation loop (which drives
    it through InGraphCausalLM's prefill/decode/forward).

    construct(input_ids, position_ids, attention_mask, inputs_embeds=None, key_cache=None,
    value_cache=None, cache_index=None, logits_index=None) -> (logits, key_cache, value_cache)
    - prefill / full forward: no cache given; logits for every position, or only at
      `logits_index` [B] (the last prompt token) so the vocabulary projection runs once per row.
    - decode: one token per row, the cache and the slot `cache_index` to write it to.
    """

    def __init__(self, config: GLMConfig):
        super().__init__()
        self.config = config
        self.transformer = GLMModel(config)
        self.lm_head = nn.Dense(config.hidden_size, config.vocab_size, has_bias=False,
                                dtype=ms_dtype(config.param_init_type))
        if config.compute_dtype != "float32":
            self.lm_head.to_float(ms_dtype(config.compute_dtype))

    def kv_cache_layout(self):
        """(layers, cached heads, head dim, dtype): GLM-6B caches every attention head."""
        config = self.config
        return config.num_layers, config.num_heads, config.head_dim, ms_dtype(config.compute_dtype)

    def embed_tokens(self, input_ids):
        """Token embeddings in the compute dtype (VisualGLM splices image embeddings into these)."""
        return self.transformer.word_embeddings(input_ids).astype(self.transformer.compute_dtype)

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds=None,
                  key_cache=None, value_cache=None, cache_index=None, logits_index=None):
        hidden, keys, values = self.transformer(input_ids, position_ids, attention_mask,
                                                inputs_embeds, key_cache, value_cache, cache_index)
        if logits_index is not None:
            index = ops.broadcast_to(logits_index.reshape(-1, 1, 1), (hidden.shape[0], 1, hidden.shape[2]))
            hidden = ops.gather_elements(hidden, 1, index).squeeze(1)
        logits = self.lm_head(hidden).astype(ms.float32)
        return logits, keys, values

    def generation_inputs(self, input_ids, pad_lengths):
        """2D position ids [B,2,S] and attention mask [B,1,S,S] for the whole padded sequence.

        `input_ids` [B,S] holds each left-padded prompt (ending in [gMASK] <sop>) followed by
        room for generated tokens. Follows upstream: positions 0..c-1 over the context, the
        [gMASK] position from <sop> on; block positions 0 over the context, then 1, 2, ...;
        bidirectional attention within the context, causal after it, padding never attended.
        """
        return glm_positions_and_mask(input_ids, pad_lengths, self.config)


def glm_positions_and_mask(input_ids, pad_lengths, config):
    """numpy version of GLMForConditionalGeneration.generation_inputs (see there)."""
    batch, length = input_ids.shape
    position_ids = np.zeros((batch, 2, length), np.int32)
    mask = np.zeros((batch, 1, length, length), np.float32)
    causal = np.tril(np.ones((length, length), np.float32))
    for row, pad in enumerate(pad_lengths):
        tokens = input_ids[row].tolist()
        context = _find(tokens, config.bos_token_id, pad, "<sop> (bos_token_id)")
        mask_token = config.gmask_token_id if config.gmask_token_id in tokens[pad:context] \
            else config.mask_token_id
        mask_position = _find(tokens[:context], mask_token, pad, "[gMASK] or [MASK]")
        position_ids[row, 0, pad:context] = np.arange(context - pad)
        position_ids[row, 0, context:] = mask_position - pad
        position_ids[row, 1, context:] = np.arange(1, length - context + 1)
        mask[row, 0] = causal
        mask[row, 0, :, :context] = 1.0
        mask[row, 0, :, :pad] = 0.0
        mask[row, 0, :pad, :] = 0.0
    return position_ids, mask


def _find(tokens, token_id, start, name):
    try:
        return tokens.index(token_id, start)
    except ValueError:
        raise UserInputError(
            f"the GLM prompt must contain {name} id {token_id} (GLM prompts end with "
            f"[gMASK] <sop>; got ids {tokens[start:start + 20]}...)") from None


def parameter_shapes(config: GLMConfig):
    """{parameter name: shape} of GLMForConditionalGeneration(config), without allocating it."""
    hidden, inner = config.hidden_size, config.num_heads * config.head_dim
    shapes = {"transformer.word_embeddings.embedding_table": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        layer = f"transformer.layers.{i}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shapes[f"{layer}{norm}.gamma"] = shapes[f"{layer}{norm}.beta"] = (hidden,)
        for name, (rows, cols) in (("attention.query_key_value", (3 * inner, hidden)),
                                   ("attention.dense", (hidden, inner)),
                                   ("mlp.dense_h_to_4h", (config.inner_hidden_size, hidden)),
                                   ("mlp.dense_4h_to_h", (hidden, config.inner_hidden_size))):
            shapes[f"{layer}{name}.weight"] = (rows, cols)
            shapes[f"{layer}{name}.bias"] = (rows,)
    shapes["transformer.final_layernorm.gamma"] = shapes["transformer.final_layernorm.beta"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes
