"""ChatGLM2-6B's conversion table and the conversion itself (the CLI is convert_weight.py).

Sources:
- a Hugging Face THUDM/chatglm2-6b directory, index json or shard (`pytorch_model-*.bin` or
  `.safetensors`): keys `transformer.embedding.word_embeddings.weight`, ...;
- a MindFormers glm2 checkpoint (`.ckpt`): r1.0/r1.1 name the embedding
  `transformer.embedding.embedding_table`, r1.2 on `embedding_weight`.
The output is one MindSpore checkpoint with MindFormers 1.9's names: the HF names but
`transformer.embedding.embedding_weight`. Every other tensor keeps its name and torch's
[out, in] layout (the fused qkv rows stay [Q | K | V], dense_h_to_4h stays [gate | up]).
`transformer.rotary_pos_emb.inv_freq` (a buffer) is dropped: the model recomputes it.

P-Tuning v2 prefixes travel in upstream ptuning/'s format both ways (`read_upstream_prefix`,
`write_upstream_prefix`): a `pytorch_model.bin` holding only `transformer.prefix_encoder.*`, the
names the model here uses too.

Refused with a message before anything is written: int4/int8 HF checkpoints (`weight_scale`
keys, or `quantization_bit` in the directory's config.json), checkpoints of other models
(ChatGLM-6B / VisualGLM's GLM), and any unknown, missing or mis-shaped key.
"""
import json
import os
import time

import numpy as np

from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.modeling_chatglm2 import prefix_parameter_shapes
from research.common.atomic import atomic_write
from research.common.checkpoint import read_checkpoint
from research.common.convert import MODEL_PARAMETERS, CheckpointWriter, Row, check_names_and_shapes, check_table
from research.common.errors import UserInputError
from research.common.torch_checkpoint import (ConversionReport, Output, SourceFormat, WrittenCheckpoint,
                                              check_outputs, find_shards, read_shapes, stream_convert)

EMBEDDING_TARGET = "transformer.embedding.embedding_weight"
# Where each source names the word embeddings (checked in this order).
EMBEDDING_SOURCES = {
    "transformer.embedding.word_embeddings.weight": "Hugging Face THUDM/chatglm2-6b",
    "transformer.embedding.embedding_table": "MindFormers r1.0/r1.1 glm2",
    "transformer.embedding.embedding_weight": "MindFormers 1.9 glm2",
}
IGNORED_KEYS = ("transformer.rotary_pos_emb.inv_freq",)
SOURCE_FORMAT = SourceFormat(
    file_names=("model.safetensors.index.json", "pytorch_model.bin.index.json",
                "model.safetensors", "pytorch_model.bin"),
    expected="a Hugging Face chatglm2-6b {name: tensor} state dict")


PREFIX_NAMES = "transformer.prefix_encoder."
PREFIX_FORMAT = SourceFormat(file_names=("pytorch_model.bin",),
                             expected="upstream P-Tuning v2's pytorch_model.bin with transformer.prefix_encoder.* tensors")


def chatglm2_rows(config: ChatGLM2Config, embedding_source="transformer.embedding.word_embeddings.weight"):
    """The table: source key -> MindFormers 1.9 parameter name, with the source shape."""
    hidden, inner = config.hidden_size, config.num_attention_heads * config.kv_channels
    ffn = config.ffn_hidden_size
    rows = [Row(embedding_source, EMBEDDING_TARGET, (config.padded_vocab_size, hidden))]
    for i in range(config.num_layers):
        layer = f"transformer.encoder.layers.{i}."
        for name, shape in (("input_layernorm.weight", (hidden,)),
                            ("self_attention.query_key_value.weight", (config.qkv_size, hidden)),
                            ("self_attention.query_key_value.bias", (config.qkv_size,)),
                            ("self_attention.dense.weight", (hidden, inner)),
                            ("post_attention_layernorm.weight", (hidden,)),
                            ("mlp.dense_h_to_4h.weight", (2 * ffn, hidden)),
                            ("mlp.dense_4h_to_h.weight", (hidden, ffn))):
            rows.append(Row(layer + name, layer + name, shape))
    rows += [Row("transformer.encoder.final_layernorm.weight", "transformer.encoder.final_layernorm.weight",
                 (hidden,)),
             Row("transformer.output_layer.weight", "transformer.output_layer.weight",
                 (config.padded_vocab_size, hidden))]
    return rows


def refuse_foreign(shapes, path):
    """The embedding key of a ChatGLM2 checkpoint, or a UserInputError saying what it is instead."""
    quantized = sorted(key for key in shapes if key.endswith("weight_scale"))
    if quantized:
        raise UserInputError(
            f"{path} is a quantized (int4/int8) ChatGLM2 checkpoint ({len(quantized)} weight_scale "
            f"key(s), e.g. {quantized[0]}): not supported; convert the float16 THUDM/chatglm2-6b "
            f"weights instead")
    found = [key for key in EMBEDDING_SOURCES if key in shapes]
    if len(found) == 1 and any(key.startswith("transformer.encoder.layers.") for key in shapes):
        return found[0]
    if any(key.startswith(("transformer.layers.", "transformer.word_embeddings.")) for key in shapes):
        raise UserInputError(
            f"{path} is not a ChatGLM2 checkpoint: its keys (transformer.layers.*, "
            f"transformer.word_embeddings.*) are ChatGLM-6B's, the GLM of VisualGLM; convert it with "
            f"research/visualglm/convert_weight.py")
    raise UserInputError(
        f"{path} is not a ChatGLM2 checkpoint: expected transformer.encoder.layers.* and one of "
        f"{', '.join(EMBEDDING_SOURCES)} (first keys: {', '.join(sorted(shapes)[:5])})")


def refuse_quantized_config(torch_path):
    """A config.json beside the weights that says quantization_bit 4 or 8 is refused."""
    directory = torch_path if os.path.isdir(torch_path) else os.path.dirname(os.path.abspath(torch_path))
    config_file = os.path.join(directory, "config.json")
    if not os.path.isfile(config_file):
        return
    try:
        with open(config_file, encoding="utf-8") as stream:
            bits = json.load(stream).get("quantization_bit", 0)
    except (OSError, ValueError, AttributeError):
        return  # not ours to judge: the weights decide
    if bits:
        raise UserInputError(
            f"{config_file} says quantization_bit {bits}: a quantized (int{bits}) ChatGLM2 "
            f"checkpoint is not supported; convert the float16 THUDM/chatglm2-6b weights instead")


def convert_chatglm2(source_path, mindspore_path, config: ChatGLM2Config, dtype="keep"):
    """Convert `source_path` (HF shards or a MindFormers .ckpt) into `mindspore_path`.

    Every key and shape is checked before anything is written; the output appears only when
    the whole conversion succeeded.
    """
    start = time.monotonic()
    check_outputs([mindspore_path], dtype)
    if source_path.endswith(".ckpt"):
        return _convert_mindspore(source_path, mindspore_path, config, dtype, start)
    refuse_quantized_config(source_path)
    shards = find_shards(source_path, SOURCE_FORMAT, what="--torch_path")
    shapes, keys_by_shard = read_shapes(shards)
    embedding = refuse_foreign(shapes, source_path)
    rows = chatglm2_rows(config, embedding)
    check_table(shapes, rows, IGNORED_KEYS, what=f"ChatGLM2 checkpoint {source_path}")
    written = stream_convert(shards, keys_by_shard, [Output("ChatGLM2", mindspore_path, rows)], dtype)
    return ConversionReport(EMBEDDING_SOURCES[embedding], len(shards), written, time.monotonic() - start)


def _convert_mindspore(source_path, mindspore_path, config, dtype, start):
    """A MindFormers glm2 .ckpt (embedding_table or embedding_weight) -> MindFormers 1.9 names."""
    params = read_checkpoint(source_path, "--torch_path")
    embedding = refuse_foreign(params, source_path)
    rows = chatglm2_rows(config, embedding)
    check_table({key: np.shape(value) for key, value in params.items()}, rows, IGNORED_KEYS,
                what=f"ChatGLM2 checkpoint {source_path}")
    with CheckpointWriter(mindspore_path) as writer:
        for row in rows:
            value = row.apply(params[row.source])
            if dtype != "keep" and np.issubdtype(value.dtype, np.floating):
                value = value.astype(dtype)
            writer.write(row.target, value)
    written = (WrittenCheckpoint("ChatGLM2", mindspore_path, writer.num_tensors, writer.num_elements,
                                 tuple(sorted(writer.dtypes))),)
    return ConversionReport(EMBEDDING_SOURCES[embedding], 1, written, time.monotonic() - start)


def check_prefix(shapes, config: ChatGLM2Config, path):
    """A prefix checkpoint's {name: shape} must be the prefix of `config`: a clear error for
    another pre_seq_len or projection, the names and shapes otherwise."""
    table = shapes.get(PREFIX_NAMES + "embedding.weight")
    if table is None:
        raise UserInputError(f"{path} holds no {PREFIX_NAMES}embedding.weight: not a P-Tuning v2 checkpoint")
    if table[0] != config.pre_seq_len:
        raise UserInputError(f"{path} is a prefix of pre_seq_len {table[0]} but the config says "
                             f"pre_seq_len {config.pre_seq_len}: set model_config.pre_seq_len: {table[0]}")
    projection = any(name.startswith(PREFIX_NAMES + "trans.") for name in shapes)
    if projection != config.prefix_projection:
        raise UserInputError(f"{path} was trained with prefix_projection {projection} but the config says "
                             f"{config.prefix_projection}: set model_config.prefix_projection: {projection}")
    check_names_and_shapes(prefix_parameter_shapes(config), shapes, f"{path} does not fit this model's prefix "
                           f"(another model size?)", MODEL_PARAMETERS)


def read_upstream_prefix(path, config: ChatGLM2Config):
    """{name: float32 array} of the prefix in upstream ptuning/'s checkpoint (a checkpoint-N
    folder or its pytorch_model.bin), checked against `config`."""
    (shard,) = find_shards(path, PREFIX_FORMAT, what="P-Tuning checkpoint")
    with shard.tensors() as tensors:
        prefix = {name: value.float().numpy() for name, value in tensors.items() if name.startswith(PREFIX_NAMES)}
    check_prefix({name: value.shape for name, value in prefix.items()}, config, path)
    return prefix


def write_upstream_prefix(params, path):
    """Write the prefix entries of {name: array} as upstream ptuning/ saves them (pytorch_model.bin,
    float32 tensors), atomically."""
    import torch  # conversion only

    prefix = {name: torch.from_numpy(np.array(value, np.float32)) for name, value in sorted(params.items())
              if name.startswith(PREFIX_NAMES)}
    if not prefix:
        raise UserInputError(f"no {PREFIX_NAMES}* parameters to write to {path}")
    with atomic_write(path) as stream:
        torch.save(prefix, stream)
    return path
