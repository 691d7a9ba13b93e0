"""Conversion of MiniGPT-4's Vicuna (Hugging Face LlamaForCausalLM weights) into LlamaForCausalLM here.

Source keys are transformers' LLaMA names (`model.embed_tokens.weight`,
`model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `model.layers.N.mlp.{gate,up,down}_proj.weight`,
`model.layers.N.{input_layernorm,post_attention_layernorm}.weight`, `model.norm.weight`,
`lm_head.weight`), optionally under a prefix (MiniGPT-4's own state dict says `llama_model.`).
Targets are MindFormers' llama names (MindFormers 1.9 `LlamaForCausalLM.convert_name`):
`model.tok_embeddings.embedding_weight`, `attention.w{q,k,v,o}`, `feed_forward.w1` (gate),
`w2` (down), `w3` (up), `attention_norm`, `ffn_norm`, `model.norm_out`, `lm_head`. Tensors keep
torch's [out, in] layout; Hugging Face's q/k rows are already in rotate-half order (no permute).
The per-layer `self_attn.rotary_emb.inv_freq` buffers of older transformers are dropped: the
model recomputes them in float32.

The vocabulary size is the checkpoint's (Vicuna v0: 32001 rows, its tokenizer 32000 pieces): a
config that says otherwise is refused with the number to set. Meta's original LLaMA files
(`layers.N.attention.wq.weight`, q/k rows interleaved) are refused: transformers'
convert_llama_weights_to_hf.py makes them Hugging Face files first.
"""
import time

from research.common.convert import Row, check_table
from research.common.errors import UserInputError
from research.common.torch_checkpoint import (ConversionReport, Output, SourceFormat, check_outputs, find_shards,
                                              read_shapes, stream_convert, to_numpy)
from research.minigpt4.configuration_minigpt4 import LlamaConfig

SOURCE_FORMAT = SourceFormat(
    file_names=("model.safetensors.index.json", "pytorch_model.bin.index.json",
                "model.safetensors", "pytorch_model.bin"),
    expected="a Hugging Face LlamaForCausalLM (Vicuna) {name: tensor} state dict")
# Hugging Face name inside a layer -> MindFormers name inside a layer.
LAYER_NAMES = {
    "input_layernorm.weight": "attention_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}


def llama_rows(config: LlamaConfig, source_prefix=""):
    """The table: Hugging Face key (under `source_prefix`) -> MindFormers name, with the source shape."""
    hidden, ffn, vocab = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    q_width, kv_width = config.num_heads * config.head_dim, config.kv_heads * config.head_dim
    shapes = {"input_layernorm.weight": (hidden,), "self_attn.q_proj.weight": (q_width, hidden),
              "self_attn.k_proj.weight": (kv_width, hidden), "self_attn.v_proj.weight": (kv_width, hidden),
              "self_attn.o_proj.weight": (hidden, q_width), "post_attention_layernorm.weight": (hidden,),
              "mlp.gate_proj.weight": (ffn, hidden), "mlp.down_proj.weight": (hidden, ffn),
              "mlp.up_proj.weight": (ffn, hidden)}
    rows = [Row(source_prefix + "model.embed_tokens.weight", "model.tok_embeddings.embedding_weight", (vocab, hidden))]
    for i in range(config.num_layers):
        for name, target in LAYER_NAMES.items():
            rows.append(Row(f"{source_prefix}model.layers.{i}.{name}", f"model.layers.{i}.{target}", shapes[name]))
    rows += [Row(source_prefix + "model.norm.weight", "model.norm_out.weight", (hidden,)),
             Row(source_prefix + "lm_head.weight", "lm_head.weight", (vocab, hidden))]
    return rows


def ignored_keys(config: LlamaConfig, source_prefix=""):
    """Buffers a Hugging Face LLaMA state dict may hold and the conversion drops."""
    return [f"{source_prefix}model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(config.num_layers)]


def check_llama_source(shapes, config: LlamaConfig, what, source_prefix=""):
    """Refuse, with what to do instead, a checkpoint that is not Hugging Face LLaMA or whose
    vocabulary differs from `config.vocab_size`; the table checks everything else."""
    embedding = source_prefix + "model.embed_tokens.weight"
    if embedding not in shapes:
        if any(key.startswith(source_prefix + "layers.") and ".attention.wq." in key for key in shapes):
            raise UserInputError(
                f"{what} is in Meta's original LLaMA format (layers.N.attention.wq.weight): convert it to "
                f"Hugging Face's with transformers' convert_llama_weights_to_hf.py first")
        raise UserInputError(f"{what} is not a Hugging Face LLaMA checkpoint: {embedding} is missing "
                             f"(first keys: {', '.join(sorted(shapes)[:5])})")
    rows, width = shapes[embedding][0], shapes[embedding][-1]
    if rows != config.vocab_size and width == config.hidden_size:
        raise UserInputError(
            f"{what} has a vocabulary of {rows} tokens ({embedding} {tuple(shapes[embedding])}) but the "
            f"config says vocab_size {config.vocab_size}: set model_config.vocab_size: {rows} (Vicuna v0 "
            f"checkpoints have 32001)")


def convert_llama_state_dict(state_dict, config: LlamaConfig, source_prefix="", what="LLaMA state dict"):
    """{MindFormers name: numpy array} of a Hugging Face LLaMA state dict ({key: torch tensor or
    array}); unknown, missing and mis-shaped keys are refused in one error naming them."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    check_llama_source(shapes, config, what, source_prefix)
    rows = llama_rows(config, source_prefix)
    check_table(shapes, rows, ignored_keys(config, source_prefix), what=what)
    return {row.target: row.apply(to_numpy(state_dict[row.source])) for row in rows}


def convert_llama(source_path, mindspore_path, config: LlamaConfig, dtype="keep"):
    """Convert Hugging Face LLaMA/Vicuna files at `source_path` (a directory, an index json of
    `.bin`/`.safetensors` shards, or one shard) into the MindSpore checkpoint `mindspore_path`.

    Every key and shape is checked before anything is written; the output appears only when
    the whole conversion succeeded."""
    start = time.monotonic()
    check_outputs([mindspore_path], dtype)
    shards = find_shards(source_path, SOURCE_FORMAT, what="--torch_path")
    shapes, keys_by_shard = read_shapes(shards)
    check_llama_source(shapes, config, source_path)
    rows = llama_rows(config)
    check_table(shapes, rows, ignored_keys(config), what=f"LLaMA checkpoint {source_path}")
    written = stream_convert(shards, keys_by_shard, [Output("LLaMA", mindspore_path, rows)], dtype)
    return ConversionReport("Hugging Face LLaMA/Vicuna", len(shards), written, time.monotonic() - start)
