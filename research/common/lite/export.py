"""MindIR graphs of a decoder that implements research.common.kv_cache's construct signature:
the prefill ("full") graph over the whole static length from input embeddings, and the one-token
decode ("inc") graph that takes the KV cache in and gives it back. The cache is the functional
form of the shared KV cache ([layers, B, kv_heads, length, head_dim] graph inputs/outputs).
"""
import os
import shutil

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn

# Input names, in order, of each graph: the `construct` arguments of the wrappers below, which
# the files keep and research.common.lite.graphs reads back.
PREFILL_INPUTS = ("input_embeds", "position_ids", "attention_mask", "logits_index")
DECODE_INPUTS = ("input_ids", "position_ids", "attention_mask", "key_cache", "value_cache", "cache_index")


class PrefillGraph(nn.Cell):
    """The decoder over the whole padded sequence from input embeddings -> (logits at
    logits_index [B,V], key_cache, value_cache)."""

    def __init__(self, decoder):
        super().__init__(auto_prefix=False)
        self.decoder = decoder

    def construct(self, input_embeds, position_ids, attention_mask, logits_index):
        return self.decoder(None, position_ids, attention_mask, inputs_embeds=input_embeds,
                            logits_index=logits_index)


class DecodeGraph(nn.Cell):
    """One new token per row against the KV cache, written at slot `cache_index`."""

    def __init__(self, decoder):
        super().__init__(auto_prefix=False)
        self.decoder = decoder

    def construct(self, input_ids, position_ids, attention_mask, key_cache, value_cache, cache_index):
        logits, key_cache, value_cache = self.decoder(
            input_ids, position_ids, attention_mask, key_cache=key_cache, value_cache=value_cache,
            cache_index=cache_index)
        return logits.reshape(logits.shape[0], -1), key_cache, value_cache


def decoder_example_inputs(decoder, batch_size, hidden_size, position_shape):
    """{"full": ..., "inc": ...}: zero tensors with the static shapes and dtypes of each graph's
    inputs; `position_shape(batch, length)` is the decoder's position-id shape."""
    length = decoder.seq_length
    num_layers, kv_heads, head_dim, dtype = decoder.kv_cache_layout()
    cache_shape = (num_layers, batch_size, kv_heads, length, head_dim)

    def zeros(shape, kind):
        return Tensor(np.zeros(shape, np.float32), kind)

    return {
        "full": (zeros((batch_size, length, hidden_size), dtype),
                 zeros(position_shape(batch_size, length), ms.int32),
                 zeros((batch_size, 1, length, length), ms.float32), zeros((batch_size,), ms.int32)),
        "inc": (zeros((batch_size, 1), ms.int32), zeros(position_shape(batch_size, 1), ms.int32),
                zeros((batch_size, 1, 1, length), ms.float32), zeros(cache_shape, dtype),
                zeros(cache_shape, dtype), Tensor(0, ms.int32)),
    }


def export_cell(cell, inputs, path):
    """Write `cell` as the MindIR file `path` (which must end in .mindir), replacing any earlier export."""
    cell.set_train(False)
    prefix = path[:-len(".mindir")]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    remove_previous_export(prefix)
    ms.export(cell, *inputs, file_name=prefix, file_format="MINDIR")
    if not os.path.exists(path) and os.path.exists(prefix + "_graph.mindir"):
        # Over 1 GB of weights MindSpore writes <prefix>_graph.mindir and the weights in
        # <prefix>_variables/ (found by a path relative to the graph's folder): keep the name asked for.
        os.replace(prefix + "_graph.mindir", path)
    return path


def remove_previous_export(prefix):
    """The files an earlier export wrote under this name, so that none of them goes stale."""
    for path in (prefix + ".mindir", prefix + "_graph.mindir"):
        if os.path.exists(path):
            os.remove(path)
    if os.path.isdir(prefix + "_variables"):
        shutil.rmtree(prefix + "_variables")


def describe_size(path):
    """'12.3 MiB', plus the external weights folder when MindSpore split them out."""
    size = f"{os.path.getsize(path) / 2**20:.1f} MiB"
    variables = path[:-len(".mindir")] + "_variables"
    if os.path.isdir(variables):
        total = sum(os.path.getsize(os.path.join(variables, name)) for name in os.listdir(variables))
        size += f", weights in {variables}/ {total / 2**30:.2f} GiB"
    return size
