"""Conversion of MiniGPT-4's four upstream files into the four MindSpore checkpoints MiniGPT4 loads
(the CLI is convert_weight.py):

| upstream file | holds (LAVIS / MiniGPT-4 names) | output |
|---|---|---|
| eva_vit_g.pth | EVA-ViT-g (`cls_token`, `pos_embed`, `blocks.N.*`; bare or under `visual_encoder.`) | ViT |
| blip2_pretrained_flant5xxl.pth | `model` -> `ln_vision`, `query_tokens`, `Qformer.bert.*` (the text path and T5 parts are not used) | ln_vision + Q-Former |
| Vicuna (HF shards) | LlamaForCausalLM | LLaMA |
| pretrained_minigpt4.pth | `model` -> `llama_proj.{weight,bias}` | llama_proj |

The Llama-2 variant has no Q-Former and upstream never loads a BLIP-2 file for it (its ln_vision
keeps LayerNorm's initial weight 1, bias 0), so it takes three files. The ViT and Q-Former files
are read whole (LAVIS keeps q/v biases and q/k/v apart, fused here into our layout); the LLaMA
streams shard by shard. Every key and shape of every file is checked before anything is written,
and the outputs appear only when all are complete. The image-side outputs carry MiniGPT4's own
parameter names (`image_encoder.visual_encoder.*`, `image_encoder.qformer.*`,
`image_encoder.llama_proj.*`, as training checkpoints do); the LLaMA output is a plain MindFormers
llama checkpoint (`model.layers.N...`, `lm_head`).

The LLaMA part: Hugging Face LlamaForCausalLM weights into LlamaForCausalLM here.

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
import dataclasses
import os
import time

from research.common.atomic import atomic_write
from research.common.checkpoint import read_checkpoint
from research.common.convert import Row, apply_table, check_table
from research.common.errors import UserInputError
from research.common.qformer import fuse_hf_blip2_qformer, lavis_to_hf_qformer_names, rows_from_hf_blip2_qformer
from research.common.torch_checkpoint import (ConversionReport, ConvertedOutput, Output, SourceFormat, check_outputs,
                                              find_shards, read_shapes, stream_convert, to_numpy)
from research.common.vision import fuse_lavis_eva_vit, rows_from_lavis_eva_vit
from research.minigpt4.configuration_minigpt4 import MINIGPT4_PRESETS, LlamaConfig, MiniGPT4Config

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


# ---- the four MiniGPT-4 files ------------------------------------------------------------------

EVA_FORMAT = SourceFormat(file_names=("eva_vit_g.pth",), wrapper_keys=("model",),
                          expected="LAVIS' EVA-ViT-g state dict (eva_vit_g.pth: cls_token, pos_embed, blocks.N.*)")
BLIP2_FORMAT = SourceFormat(file_names=("blip2_pretrained_flant5xxl.pth",), wrapper_keys=("model",),
                            expected="a LAVIS BLIP-2 checkpoint ({'model': {ln_vision.*, query_tokens, Qformer.*}})")
MINIGPT4_FORMAT = SourceFormat(file_names=("pretrained_minigpt4.pth",), wrapper_keys=("model",),
                               expected="a MiniGPT-4 checkpoint ({'model': {llama_proj.weight, llama_proj.bias}})")


@dataclasses.dataclass(frozen=True)
class MiniGPT4Paths:
    """Upstream inputs and MindSpore outputs of a MiniGPT-4 conversion; a part whose input is
    None is skipped (its output must be None too)."""

    eva_vit: str = None
    blip2: str = None
    vicuna: str = None
    minigpt4: str = None
    vit_out: str = None
    qformer_out: str = None
    llama_out: str = None
    proj_out: str = None

    def parts(self):
        """(label, input, output, input flag, output flag) per part."""
        return [("ViT", self.eva_vit, self.vit_out, "--eva_vit_path", "--vit_mindspore_path"),
                ("ln_vision + Q-Former", self.blip2, self.qformer_out, "--q_former_model", "--qformer_mindspore_path"),
                ("LLaMA", self.vicuna, self.llama_out, "--llama_model", "--llama_mindspore_path"),
                ("llama_proj", self.minigpt4, self.proj_out, "--ckpt", "--proj_mindspore_path")]


def _load_whole(path, source_format, what):
    """{key: numpy array} of a single-file torch checkpoint (or safetensors)."""
    shards = find_shards(path, source_format, what=what)
    result = {}
    for shard in shards:
        with shard.tensors() as tensors:
            result.update({key: to_numpy(tensors[key]) for key in tensors})
    return result


def _refuse_foreign(keys, marker_keys, path, what):
    if not any(key in keys for key in marker_keys):
        raise UserInputError(f"{path} is not {what}: it has none of {', '.join(marker_keys)} "
                             f"(first keys: {', '.join(sorted(keys)[:5])})")


def convert_eva_vit(state_dict, config: MiniGPT4Config, path="eva_vit_g.pth"):
    """{MiniGPT4 parameter name: array} of LAVIS' EVA-ViT-g state dict (ln_vision excluded)."""
    prefix = "visual_encoder." if "visual_encoder.cls_token" in state_dict else ""
    _refuse_foreign(state_dict, (prefix + "cls_token", prefix + "pos_embed"), path, "LAVIS' EVA-ViT-g (eva_vit_g.pth)")
    fused = fuse_lavis_eva_vit(state_dict, config.vision_config, prefix)
    rows = rows_from_lavis_eva_vit(config.vision_config, prefix)
    arrays = apply_table(fused, rows, what=f"EVA-ViT-g checkpoint {path}", strict=False)
    return {"image_encoder.visual_encoder." + name: value for name, value in arrays.items()}


def convert_blip2(state_dict, config: MiniGPT4Config, path="blip2_pretrained_flant5xxl.pth"):
    """{MiniGPT4 parameter name: array} of ln_vision and the Q-Former from a LAVIS BLIP-2 checkpoint;
    the rest of the file (text path, T5 projection, ITM head) is not used."""
    _refuse_foreign(state_dict, ("query_tokens",), path, "a BLIP-2 checkpoint (blip2_pretrained_flant5xxl.pth)")
    hf_named = fuse_hf_blip2_qformer(lavis_to_hf_qformer_names(state_dict), config.qformer_config, "qformer.")
    hidden = config.vision_config.hidden_size
    rows = [Row("ln_vision.weight", "image_encoder.visual_encoder.ln_vision.gamma", (hidden,)),
            Row("ln_vision.bias", "image_encoder.visual_encoder.ln_vision.beta", (hidden,))]
    rows += [dataclasses.replace(row, target="image_encoder.qformer." + row.target)
             for row in rows_from_hf_blip2_qformer(config.qformer_config, "qformer.")]
    return apply_table(hf_named, rows, what=f"BLIP-2 checkpoint {path}", strict=False)


def _variant_of(proj_shape):
    """Names of the MiniGPT-4 presets whose llama_proj.weight has `proj_shape` [out, in]."""
    names = []
    for name, factory in MINIGPT4_PRESETS.items():
        config = factory()
        if "tiny" not in name and (config.text_config.hidden_size, config.projection_width) == tuple(proj_shape):
            names.append(name)
    return names


def projection_rows(config: MiniGPT4Config):
    """MiniGPT-4's llama_proj under MiniGPT4's name (the name training checkpoints have too)."""
    hidden, width = config.text_config.hidden_size, config.projection_width
    return [Row("llama_proj.weight", "image_encoder.llama_proj.weight", (hidden, width)),
            Row("llama_proj.bias", "image_encoder.llama_proj.bias", (hidden,))]


def check_projection(shapes, config: MiniGPT4Config, path):
    """Refuse a MiniGPT-4 checkpoint without llama_proj, or one made for another variant (saying which)."""
    _refuse_foreign(shapes, ("llama_proj.weight",), path, "a MiniGPT-4 checkpoint (pretrained_minigpt4.pth)")
    found = tuple(shapes["llama_proj.weight"])
    expected = (config.text_config.hidden_size, config.projection_width)
    if found != expected:
        variants = _variant_of(found)
        meant = (f"it is for {' / '.join(variants)}" if variants
                 else "it fits none of the presets (minigpt4-7b, minigpt4-13b, minigpt4-llama2-7b)")
        raise UserInputError(f"{path}: llama_proj.weight is {list(found)} but the config expects {list(expected)} "
                             f"(LLaMA hidden {expected[0]} x {'Q-Former hidden' if config.has_qformer else '4 patches'} "
                             f"{expected[1]}): {meant}; choose the matching --config")


def convert_minigpt4(paths: MiniGPT4Paths, config: MiniGPT4Config, dtype="keep"):
    """Convert the upstream files named in `paths` into their MindSpore checkpoints.

    All inputs are read and checked (names, shapes, the variant) before anything is written;
    the outputs appear only when every one of them is complete."""
    start = time.monotonic()
    parts = paths.parts()
    for label, source, output, in_flag, out_flag in parts:
        if (source is None) != (output is None):
            given, missing = (in_flag, out_flag) if source is not None else (out_flag, in_flag)
            raise UserInputError(f"{given} is given without {missing}: the {label} part needs both")
    if all(source is None for _, source, _, _, _ in parts):
        raise UserInputError("nothing to convert: give at least one upstream file (--eva_vit_path, "
                             "--q_former_model, --llama_model, --ckpt) with its output path")
    if paths.blip2 is not None and not config.has_qformer:
        raise UserInputError("the config is the Llama-2 variant (has_qformer: False), which has no Q-Former: "
                             "upstream never loads blip2_pretrained_flant5xxl.pth for it; drop --q_former_model")
    check_outputs([output for _, _, output, _, _ in parts if output is not None], dtype)

    converted, streamed, shards, keys_by_shard, files = [], [], [], {}, 0
    if paths.eva_vit is not None:
        arrays = convert_eva_vit(_load_whole(paths.eva_vit, EVA_FORMAT, "--eva_vit_path"), config, paths.eva_vit)
        converted.append(ConvertedOutput("ViT", paths.vit_out, arrays))
        files += 1
    if paths.blip2 is not None:
        arrays = convert_blip2(_load_whole(paths.blip2, BLIP2_FORMAT, "--q_former_model"), config, paths.blip2)
        converted.append(ConvertedOutput("ln_vision + Q-Former", paths.qformer_out, arrays))
        files += 1
    if paths.minigpt4 is not None:
        proj_shards = find_shards(paths.minigpt4, MINIGPT4_FORMAT, what="--ckpt")
        proj_shapes, proj_keys = read_shapes(proj_shards)
        check_projection(proj_shapes, config, paths.minigpt4)
        rows = projection_rows(config)
        check_table(proj_shapes, rows, what=f"MiniGPT-4 checkpoint {paths.minigpt4}", strict=False)
        shards += proj_shards
        keys_by_shard.update(proj_keys)
        streamed.append(Output("llama_proj", paths.proj_out, rows, frozenset(proj_keys)))
    if paths.vicuna is not None:
        llama_shards = find_shards(paths.vicuna, SOURCE_FORMAT, what="--llama_model")
        llama_shapes, llama_keys = read_shapes(llama_shards)
        text = config.text_config
        check_llama_source(llama_shapes, text, paths.vicuna)
        rows = llama_rows(text)
        check_table(llama_shapes, rows, ignored_keys(text), what=f"LLaMA checkpoint {paths.vicuna}")
        shards += llama_shards
        keys_by_shard.update(llama_keys)
        streamed.append(Output("LLaMA", paths.llama_out, rows, frozenset(llama_keys)))
    files += len(shards)
    written = stream_convert(shards, keys_by_shard, streamed, dtype, converted=converted)
    return ConversionReport("MiniGPT-4 upstream files", files, written, time.monotonic() - start)


def export_llama_proj(checkpoint_path, pth_path):
    """Write the llama_proj of a MindSpore checkpoint (a training checkpoint, or the converted
    file) in upstream's pretrained_minigpt4.pth layout, {"model": {"llama_proj.weight",
    "llama_proj.bias"}} as float32 torch tensors, for users going back to PyTorch. Atomic."""
    import torch  # conversion only

    params = read_checkpoint(checkpoint_path, "llama_proj checkpoint")
    names = {"image_encoder.llama_proj.weight": "llama_proj.weight", "image_encoder.llama_proj.bias": "llama_proj.bias"}
    missing = [name for name in names if name not in params]
    if missing:
        raise UserInputError(f"{checkpoint_path} has no {', '.join(missing)}: give a MiniGPT-4 training checkpoint "
                             f"(checkpoint_trainable/rank_0/...) or a converted llama_proj checkpoint")
    state = {upstream: torch.from_numpy(params[ours].astype("float32")) for ours, upstream in names.items()}
    os.makedirs(os.path.dirname(os.path.abspath(pth_path)), exist_ok=True)
    with atomic_write(pth_path) as stream:
        torch.save({"model": state}, stream)
    return {name: tuple(value.shape) for name, value in state.items()}
