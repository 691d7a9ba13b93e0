"""Weight conversion for VisualGLM: SAT or Hugging Face names -> this project's parameters.

The GLM table below is explicit: every parameter of GLMForConditionalGeneration, the source
key it comes from (SAT or HF naming) and the shape that key must have. SAT checkpoints keep
the fused qkv rows contiguous ([Q | K | V]), as our model does; HF ChatGLM-6B / visualglm-6b
files interleave them per head and are permuted on the way in.
"""
from research.common.convert import Row, apply_table, per_head_qkv_to_contiguous
from research.visualglm.configuration_glm import GLMConfig

GLM_LAYOUTS = ("sat", "hf")


def glm_rows(config: GLMConfig, layout: str):
    """The GLM conversion table for `layout` ('sat' or 'hf')."""
    if layout not in GLM_LAYOUTS:
        raise ValueError(f"layout must be one of {GLM_LAYOUTS}, got {layout!r}")
    hidden, inner = config.hidden_size, config.num_heads * config.head_dim
    ffn, heads = config.inner_hidden_size, config.num_heads

    def qkv(value):
        return per_head_qkv_to_contiguous(value, heads) if layout == "hf" else value

    rows = [Row("transformer.word_embeddings.weight", "transformer.word_embeddings.embedding_table",
                (config.vocab_size, hidden))]
    for i in range(config.num_layers):
        src, dst = f"transformer.layers.{i}.", f"transformer.layers.{i}."
        rows += [
            Row(src + "input_layernorm.weight", dst + "input_layernorm.gamma", (hidden,)),
            Row(src + "input_layernorm.bias", dst + "input_layernorm.beta", (hidden,)),
            Row(src + "attention.query_key_value.weight", dst + "attention.query_key_value.weight",
                (3 * inner, hidden), qkv),
            Row(src + "attention.query_key_value.bias", dst + "attention.query_key_value.bias",
                (3 * inner,), qkv),
            Row(src + "attention.dense.weight", dst + "attention.dense.weight", (hidden, inner)),
            Row(src + "attention.dense.bias", dst + "attention.dense.bias", (hidden,)),
            Row(src + "post_attention_layernorm.weight", dst + "post_attention_layernorm.gamma", (hidden,)),
            Row(src + "post_attention_layernorm.bias", dst + "post_attention_layernorm.beta", (hidden,)),
            Row(src + "mlp.dense_h_to_4h.weight", dst + "mlp.dense_h_to_4h.weight", (ffn, hidden)),
            Row(src + "mlp.dense_h_to_4h.bias", dst + "mlp.dense_h_to_4h.bias", (ffn,)),
            Row(src + "mlp.dense_4h_to_h.weight", dst + "mlp.dense_4h_to_h.weight", (hidden, ffn)),
            Row(src + "mlp.dense_4h_to_h.bias", dst + "mlp.dense_4h_to_h.bias", (hidden,)),
        ]
    rows += [
        Row("transformer.final_layernorm.weight", "transformer.final_layernorm.gamma", (hidden,)),
        Row("transformer.final_layernorm.bias", "transformer.final_layernorm.beta", (hidden,)),
        Row("mixins.chatglm-final.lm_head.weight" if layout == "sat" else "lm_head.weight",
            "lm_head.weight", (config.vocab_size, hidden)),
    ]
    return rows


def glm_ignored_keys(config: GLMConfig, layout: str):
    """Rotary inverse-frequency buffers: the model recomputes them (HF keeps one per layer)."""
    if layout == "hf":
        return tuple(f"transformer.layers.{i}.attention.rotary_emb.inv_freq"
                     for i in range(config.num_layers))
    return ("mixins.chatglm-attn.rotary_emb.inv_freq",)


def convert_glm_state_dict(state_dict, config: GLMConfig, layout: str, strict=True):
    """{source key: array} of a GLM-6B checkpoint -> {our parameter name: array}."""
    return apply_table(state_dict, glm_rows(config, layout), glm_ignored_keys(config, layout),
                       what=f"GLM weights ({layout} layout)", strict=strict)
