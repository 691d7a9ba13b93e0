"""The in-place KV cache every decoder here generates with (GLM-6B, ChatGLM2, Vicuna).

A decoder plugs in by giving its `construct` the signature
`(input_ids, position_ids, attention_mask, inputs_embeds=None, key_cache=None,
value_cache=None, cache_index=None, logits_index=None) -> (logits, keys, values)`, writing the
new keys/values of each layer with `write_cache` at the slots `cache_slot_indices` names, and
inheriting `InGraphCausalLM`, which implements generate()'s `CausalLM` interface on top.

The cache holds only the key/value heads the model computes: ChatGLM2's multi-query attention
has 2 groups for 32 query heads, so its cache is [B, 2, T, d] per layer, and the attention
widens the groups to the query heads after the write (`expand_kv_groups`).

Two forms share the write (`write_cache`):
- in place, for generation: `CachedDecoder` owns one Parameter [B, kv_heads, T, d] per layer
  and per key/value; the prompt and then each new token are scattered into it (ScatterNdUpdate
  writes S slots, nothing is copied), so a decode step reads the weights and the cache once;
- functional, for exported MindIR graphs: the caches [layers, B, kv_heads, T, d] are graph
  inputs and outputs.

Lengths are bucketed to powers of two (`bucket_length`, the one policy for prompt and cache
sizes), so GRAPH mode compiles a few shapes and reuses them for every request.
"""
import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops


def next_power_of_two(n):
    return 1 << max(0, int(n) - 1).bit_length()


def bucket_length(n, limit):
    """The static length used for n positions: the next power of two, at most `limit`."""
    return min(limit, next_power_of_two(n))


def cache_slot_indices(batch, kv_heads, length, cache_index):
    """Scatter indices [B,kv_heads,S,3] of slots cache_index..cache_index+S-1 (built once per forward)."""
    slots = ops.arange(length, dtype=ms.int32) + cache_index
    return ops.stack(ops.meshgrid(ops.arange(batch, dtype=ms.int32),
                                  ops.arange(kv_heads, dtype=ms.int32), slots, indexing="ij"), axis=-1)


def write_cache(cache, new, cache_slots):
    """Write new [B,kv_heads,S,d] into cache [B,kv_heads,T,d] at `cache_slots`.

    A Parameter cache is updated in place (only S slots are written); a tensor cache (the
    exported graphs) gets a new tensor. Returns the cache after the write."""
    if isinstance(cache, Parameter):
        return ops.scatter_nd_update(cache, cache_slots, new)
    return ops.tensor_scatter_update(cache, cache_slots, new)


def expand_kv_groups(x, repeats):
    """[B, groups, T, d] -> [B, groups*repeats, T, d], each group repeated for its `repeats`
    consecutive query heads (ChatGLM2's and LLaMA's grouped-query order)."""
    if repeats == 1:
        return x
    batch, groups, length, dim = x.shape
    x = ops.broadcast_to(x.reshape(batch, groups, 1, length, dim), (batch, groups, repeats, length, dim))
    return x.reshape(batch, groups * repeats, length, dim)


def argmax_ids(logits, below, temperature):
    """In-graph `research.common.sampling.Argmax`: ids [B] int32 of the argmax over ids <
    `below` of logits [B,V] / `temperature` (both graph constants)."""
    if below < logits.shape[-1]:
        logits = logits[:, :below]
    return ops.argmax(logits / temperature, -1).astype(ms.int32)


class CachedDecoder(nn.Cell):
    """A decoder writing into its own KV cache of `length` slots.

    construct(input_ids [B,S], position_ids [...,S], attention_mask [B,1,S,length],
    inputs_embeds, cache_index, logits_index, argmax_below, temperature) -> logits [B,V], or
    with `argmax_below` the ids [B] `argmax_ids` chooses: the S tokens go to slots
    cache_index.. (the prompt at 0, then one token per step)."""

    def __init__(self, model, batch_size, length):
        super().__init__(auto_prefix=False)  # the model's parameters keep their names
        self.model = model
        self.length = length
        num_layers, kv_heads, head_dim, dtype = model.kv_cache_layout()
        shape = (batch_size, kv_heads, length, head_dim)

        def caches(kind):
            return ParameterTuple(
                Parameter(Tensor(np.zeros(shape), dtype), name=f"{kind}_cache.{i}", requires_grad=False)
                for i in range(num_layers))

        self.key_cache = caches("key")
        self.value_cache = caches("value")

    def construct(self, input_ids, position_ids, attention_mask, inputs_embeds, cache_index, logits_index,
                  argmax_below=None, temperature=1.0):
        outputs = self.model(input_ids, position_ids, attention_mask, inputs_embeds,
                             self.key_cache, self.value_cache, cache_index, logits_index)
        # only the logits are read: unpacking the (None) cache outputs would leave isolated
        # side-effect nodes that MindSpore's auto-monad pass warns about
        logits = outputs[0].reshape(input_ids.shape[0], -1)
        if argmax_below is None:
            return logits
        return argmax_ids(logits, argmax_below, temperature)


class InGraphCausalLM:
    """generate()'s `CausalLM` interface (research.common.generation) for a decoder Cell.

    The Cell provides `config.seq_length`, the construct signature of this module's docstring,
    `kv_cache_layout() -> (num_layers, kv_heads, head_dim, dtype)`, `embed_tokens(Tensor)` and
    `generation_inputs`. The last cache is kept, so a run of requests of one size compiles once.
    """

    cached_decoder = None  # the CachedDecoder of the last start_cache (a plain attribute, not a child cell)

    @property
    def seq_length(self):
        return self.config.seq_length

    def token_embeddings(self, input_ids):
        return self.embed_tokens(Tensor(input_ids, ms.int32)).asnumpy()

    def start_cache(self, batch_size, min_length):
        length = bucket_length(min_length, self.seq_length)
        decoder = self.cached_decoder
        if decoder is None or decoder.length != length or decoder.key_cache[0].shape[0] != batch_size:
            object.__setattr__(self, "cached_decoder", None)  # free the previous cache before allocating
            object.__setattr__(self, "cached_decoder", CachedDecoder(self, batch_size, length))
        return length

    def prefill(self, *, input_ids, position_ids, attention_mask, logits_index, inputs_embeds=None,
                argmax=None, cache_index=0):
        return self.cached_decoder(*_tensors(input_ids, position_ids, attention_mask, inputs_embeds),
                                   Tensor(cache_index, ms.int32), Tensor(logits_index, ms.int32),
                                   *_argmax_constants(argmax)).asnumpy()

    def decode(self, *, input_ids, position_ids, attention_mask, cache_index, argmax=None):
        return self.cached_decoder(*_tensors(input_ids, position_ids, attention_mask, None),
                                   Tensor(cache_index, ms.int32), None, *_argmax_constants(argmax)).asnumpy()

    def forward(self, *, input_ids, position_ids, attention_mask, logits_index, inputs_embeds=None):
        logits, _, _ = self(*_tensors(input_ids, position_ids, attention_mask, inputs_embeds),
                            logits_index=Tensor(logits_index, ms.int32))
        return logits.asnumpy()


def _argmax_constants(argmax):
    """CachedDecoder's (argmax_below, temperature): graph constants, so greedy and sampling
    runs compile a graph each, once."""
    return (None, 1.0) if argmax is None else (argmax.below, argmax.temperature)


def _tensors(input_ids, position_ids, attention_mask, inputs_embeds):
    return (Tensor(input_ids, ms.int32), Tensor(position_ids, ms.int32),
            Tensor(attention_mask, ms.float32), None if inputs_embeds is None else Tensor(inputs_embeds))


def left_padded_positions_and_mask(input_ids, pad_lengths):
    """Positions [B,L] and causal mask [B,1,L,L] (1 = attend) of left-padded rows, as the HF models
    with a 1-D position per token (ChatGLM2, LLaMA) see them: positions 0 over the padding (never
    read) and 0, 1, ... from the first real token; no query attends to a padding column."""
    batch, length = input_ids.shape
    position_ids = np.zeros((batch, length), np.int32)
    mask = np.tile(np.tril(np.ones((length, length), np.float32)), (batch, 1, 1, 1))
    for row, pad in enumerate(pad_lengths):
        position_ids[row, pad:] = np.arange(length - pad)
        mask[row, 0, :, :pad] = 0.0
    return position_ids, mask
