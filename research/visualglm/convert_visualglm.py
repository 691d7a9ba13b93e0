"""VisualGLM-6B's conversion tables and the conversion itself (the CLI is convert_weight.py).

The source is a SAT checkpoint (`mp_rank_00_model_states.pt`, or its directory with a
`latest` file) or a Hugging Face visualglm-6b directory / index json (`.bin` or
`.safetensors` shards); which one it is follows from the key names. The outputs are the ViT
(+ ln_vision), the Q-Former (+ glm_proj), the GLM, and `glm_6b_for_lite.ckpt` beside the GLM
file with only the word embeddings (the Lite runner embeds the prompt with it).

Every source tensor goes through an explicit table: every parameter of our model, the key it
comes from and the shape that key must have. SAT checkpoints keep the GLM's fused qkv rows
contiguous ([Q | K | V]), as our model does; HF ChatGLM-6B / visualglm-6b files interleave
them per head and are permuted on the way in. Reading and streaming are
`research.common.torch_checkpoint`'s.
"""
import dataclasses
import os
import time

from research.common.convert import Row, apply_table, check_table, per_head_qkv_to_contiguous
from research.common.errors import UserInputError
from research.common.qformer import rows_from_sat_qformer
from research.common.torch_checkpoint import (ConversionReport, Output, SourceFormat, check_outputs,
                                              find_shards, read_shapes, stream_convert)
from research.common.vision import rows_from_sat_eva_vit
from research.visualglm.configuration_glm import GLMConfig
from research.visualglm.configuration_visualglm import VisualGLMConfig

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


LITE_CHECKPOINT = "glm_6b_for_lite.ckpt"
LITE_PARAMETER = "transformer.word_embeddings.embedding_table"
SAT_FILE = "mp_rank_00_model_states.pt"
SOURCE_FORMAT = SourceFormat(
    file_names=(SAT_FILE, "model.safetensors.index.json", "pytorch_model.bin.index.json",
                "model.safetensors", "pytorch_model.bin"),
    expected="a SAT checkpoint (tensors under 'module') or a Hugging Face {name: tensor} state dict",
    wrapper_keys=("module",), latest_file=SAT_FILE)

# Where each layout keeps the image model (EVA-ViT, Q-Former, glm_proj) and lm_head.
IMAGE_PREFIXES = {"sat": "mixins.eva.model.", "hf": "transformer.image_encoder."}
LM_HEAD_KEYS = {"sat": "mixins.chatglm-final.lm_head.weight", "hf": "lm_head.weight"}
LAYOUT_NAMES = {"sat": "SAT (SwissArmyTransformer) VisualGLM-6B",
                "hf": "Hugging Face THUDM/visualglm-6b"}
DEFAULT_QKV_LAYOUTS = {"sat": "contiguous", "hf": "per_head"}
QKV_LAYOUTS = ("auto", "contiguous", "per_head")
PART_NAMES = {"vit": "ViT + ln_vision", "qformer": "Q-Former + glm_proj", "glm": "GLM",
              "lite": "GLM embeddings (Lite)"}


def glm_rows_with_qkv(config: GLMConfig, layout: str, qkv_layout: str):
    """`glm_rows` with the key names of `layout` but the fused-qkv order `qkv_layout`.

    For checkpoints whose qkv order is not the one their key names suggest (`--qkv_layout`).
    """
    qkv_transforms = {row.target: row.transform
                      for row in glm_rows(config, "hf" if qkv_layout == "per_head" else "sat")}
    return [dataclasses.replace(row, transform=qkv_transforms[row.target])
            for row in glm_rows(config, layout)]


def visualglm_tables(config: VisualGLMConfig, layout: str, qkv_layout: str):
    """{output part: rows} for 'vit', 'qformer' (with glm_proj), 'glm' and 'lite'.

    Targets are the parameter names the checkpoints are loaded with: `visual_encoder.` +
    EvaViT's, `qformer.` + QFormer's and `glm_proj.*`, GLMForConditionalGeneration's.
    """
    image = IMAGE_PREFIXES[layout]

    def under(prefix, rows):
        return [dataclasses.replace(row, target=prefix + row.target) for row in rows]

    text_hidden, query_hidden = config.text_config.hidden_size, config.qformer_config.hidden_size
    glm = glm_rows_with_qkv(config.text_config, layout, qkv_layout)
    return {
        "vit": under("visual_encoder.", rows_from_sat_eva_vit(config.vision_config, image + "vit.")),
        "qformer": under("qformer.", rows_from_sat_qformer(config.qformer_config, image + "qformer."))
        + [Row(image + "glm_proj.weight", "glm_proj.weight", (text_hidden, query_hidden)),
           Row(image + "glm_proj.bias", "glm_proj.bias", (text_hidden,))],
        "glm": glm,
        "lite": [row for row in glm if row.target == LITE_PARAMETER],
    }


def detect_layout(keys):
    """'sat' or 'hf', from where the checkpoint keeps its image model and lm_head."""
    found = {layout for layout, prefix in IMAGE_PREFIXES.items()
             if any(key.startswith(prefix) for key in keys)}
    found |= {layout for layout, key in LM_HEAD_KEYS.items() if key in keys}
    if len(found) == 1:
        return found.pop()
    if found:
        markers = list(IMAGE_PREFIXES.values()) + list(LM_HEAD_KEYS.values())
        raise UserInputError(f"the checkpoint mixes SAT and Hugging Face key names ({', '.join(markers)})")
    raise UserInputError(
        f"not a VisualGLM checkpoint: no key starts with {' or '.join(IMAGE_PREFIXES.values())} and "
        f"there is no {' or '.join(LM_HEAD_KEYS.values())} (first keys: {', '.join(sorted(keys)[:5])})")


def convert_visualglm(torch_path, vit_path, qformer_path, glm_path, config: VisualGLMConfig,
                      qkv_layout="auto", dtype="keep"):
    """Convert `torch_path` into the ViT, Q-Former and GLM checkpoints (+ the Lite embeddings).

    Every key and shape is checked before anything is written; outputs appear only when the
    whole conversion succeeded. Prints the detected layout before the (long) writing pass.
    """
    if qkv_layout not in QKV_LAYOUTS:
        raise UserInputError(f"qkv_layout must be one of {QKV_LAYOUTS}, got {qkv_layout!r}")
    start = time.monotonic()
    paths = {"vit": vit_path, "qformer": qformer_path, "glm": glm_path,
             "lite": os.path.join(os.path.dirname(os.path.abspath(glm_path)), LITE_CHECKPOINT)}
    check_outputs(list(paths.values()), dtype, note=f" (the Lite file is {paths['lite']})")

    shards = find_shards(torch_path, SOURCE_FORMAT, what="--torch_path")
    shapes, keys_by_shard = read_shapes(shards)
    layout = detect_layout(shapes)
    qkv_layout = DEFAULT_QKV_LAYOUTS[layout] if qkv_layout == "auto" else qkv_layout
    print(f"detected layout: {LAYOUT_NAMES[layout]}; GLM qkv {qkv_layout}")
    tables = visualglm_tables(config, layout, qkv_layout)
    check_table(shapes, tables["vit"] + tables["qformer"] + tables["glm"],
                glm_ignored_keys(config.text_config, layout),
                what=f"{LAYOUT_NAMES[layout]} checkpoint {torch_path}")

    outputs = [Output(PART_NAMES[part], paths[part], rows) for part, rows in tables.items()]
    written = stream_convert(shards, keys_by_shard, outputs, dtype)
    return ConversionReport(f"{LAYOUT_NAMES[layout]} layout, GLM qkv {qkv_layout}", len(shards),
                            written, time.monotonic() - start)
