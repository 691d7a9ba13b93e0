"""MiniGPT-4 against transformers' LlamaForCausalLM and BLIP-2 image side: the same weights, the same threads, one run.

    python benchmarks/minigpt4_perf.py [--preset medium|tiny] [--new_tokens N] [--threads T]

The language model. A transformers LlamaForCausalLM with seeded random weights (std 0.02,
RMSNorm weights 1 +- 0.2) is the reference: its state dict goes through
convert_minigpt4.convert_llama_state_dict into our LlamaForCausalLM (research/minigpt4,
GRAPH mode), loaded with research.common.checkpoint.load_params_into_net. Both decode
greedily with their KV cache and no eos (the transformers config has eos_token_id None, our
GenerationConfig none either), so both produce every requested token; the transformers side
uses sdpa attention.

Measured as benchmarks/measure.py's compare_decoding says, ours first, then transformers':
decode tokens/s at batch 1 and 8 (--new_tokens new tokens), the first-token latency of one long
prompt, the peak RSS while generating, the fraction of the decode floor (weight bytes per token
over the copy bandwidth) reached at batch 1, and whether the greedy tokens match but for
float32 near-ties ("tokens match: yes/no"; each parting printed with its logit gap).

The image side. MiniGPT-4 encodes an image with EVA-ViT (and `ln_vision`), the BLIP-2
Q-Former's 32 queries and a Linear projection to the LLaMA width. Ours is
research.common.vision.EvaViT, research.common.qformer.QFormer and an nn.Dense in one GRAPH
mode cell; the reference is transformers' Blip2VisionModel (its post_layernorm eps set to
LAVIS' ln_vision 1e-5), Blip2QFormerModel (query_embeds = the query tokens) and nn.Linear,
all with seeded random weights (std 0.02, LayerNorm weights 1 +- 0.2, EVA's key bias zero)
converted with rows_from_hf_blip2_vision, fuse_hf_blip2_qformer + rows_from_hf_blip2_qformer
and apply_table. Both encode the same batch of random images; the outputs must agree within
IMAGE_TOLERANCE ("image outputs match: yes/no", the max |diff| printed) so the times compare
the same work. Time per image: the median of a few whole-batch calls after one warm-up call,
divided by the batch.

Prints a table with the issue's goals (decode batch 1 >= 1.0x transformers, batch 8 >= 2x,
first token <= 1x, image encoding per image <= 1x) and writes it to compare_minigpt4.csv in
--output_dir; the exit status is 1 when the image outputs disagree.

Presets: medium (LLaMA hidden 2048, 8 layers, 16 heads of 128 and 16 key/value heads as
Vicuna has no grouped-query attention, SwiGLU 5504, vocab 32001, float32, seq_length 1024;
32-token prompts, 32 new tokens, a 512-token prompt for the first token; a scaled EVA of 224
pixels, patch 14, 6 layers of 384 with 6 heads and MLP 1536, a Q-Former of 2 layers of 768
with 12 heads and 32 queries, 4 images) and tiny (LlamaConfig.from_name("tiny"); 8-token
prompts, 8 new tokens, a 32-token prompt; a 56-pixel EVA of 2 layers of 48, a Q-Former of 2
layers of 32, 4 images), which runs in well under a minute.
"""
import dataclasses
import os
import sys
from typing import Callable

import numpy as np
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlamaForCausalLM

# This checkout's packages (research), whatever the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks.measure import (PAD, Preset, compare_decoding, goal_row, print_table, randomised, run_comparison,
                                seconds, write_table)
from mindspore import Tensor, nn

from research.common.checkpoint import load_params_into_net
from research.common.convert import apply_table
from research.common.qformer import QFormer, QFormerConfig, fuse_hf_blip2_qformer, rows_from_hf_blip2_qformer
from research.common.vision import EvaViT, ViTConfig, rows_from_hf_blip2_vision
from research.minigpt4.configuration_minigpt4 import LlamaConfig
from research.minigpt4.convert_minigpt4 import convert_llama_state_dict
from research.minigpt4.modeling_minigpt4 import LlamaForCausalLM

# Largest |ours - transformers'| of the image embeddings for the two to count as the same work.
IMAGE_TOLERANCE = 1e-4


def llama_medium():
    """Vicuna's architecture at hidden 2048: 8 layers, 16 heads of 128 with as many key/value
    heads (no grouped-query attention), a SwiGLU of 5504 (about 8/3 x 2048), Vicuna v0's
    vocabulary of 32001, float32."""
    return LlamaConfig(num_layers=8, vocab_size=32001, hidden_size=2048, num_heads=16, n_kv_heads=16,
                       intermediate_size=5504, seq_length=1024, max_decode_length=1024,
                       param_init_type="float32", compute_dtype="float32", use_past=True, do_sample=False)


def description(config: LlamaConfig):
    """What the preset line says of our language model."""
    return (f"LLaMA hidden {config.hidden_size}, {config.num_layers} layers, {config.num_heads} heads x "
            f"{config.head_dim}, {config.kv_heads} KV heads, ffn {config.ffn_hidden_size}, vocab {config.vocab_size}, "
            f"{config.compute_dtype}")


@dataclasses.dataclass(frozen=True)
class ImageSide:
    """EVA-ViT, Q-Former and the number of images encoded at once (float32 throughout)."""
    vit: ViTConfig
    qformer: QFormerConfig
    images: int
    repeats: int  # timed calls per side; the median counts


def _image_side(vit: ViTConfig, **qformer):
    """`vit` under a 2-layer Q-Former of 32 queries (`qformer`: its other settings); 4 images a
    call, 5 timed calls."""
    qformer = QFormerConfig(num_hidden_layers=2, encoder_width=vit.hidden_size, query_length=32, **qformer)
    return ImageSide(vit, qformer, images=4, repeats=5)


def medium_image_side():
    """A scaled EVA-ViT-g (224 px, patch 14: 257 tokens) and a 2-layer BLIP-2 Q-Former."""
    return _image_side(ViTConfig(image_size=224, patch_size=14, hidden_size=384, num_hidden_layers=6,
                                 num_attention_heads=6, intermediate_size=1536),
                       num_heads=12, hidden_size=768, intermediate_size=3072)


def tiny_image_side():
    return _image_side(ViTConfig(image_size=56, patch_size=14, hidden_size=48, num_hidden_layers=2,
                                 num_attention_heads=4, intermediate_size=96),
                       num_heads=4, hidden_size=32, intermediate_size=64)


@dataclasses.dataclass(frozen=True)
class MiniGPT4Preset(Preset):
    image_side: Callable[[], ImageSide]


PRESETS = {
    "medium": MiniGPT4Preset(llama_medium, prompt=32, long_prompt=512, new_tokens=32,
                             image_side=medium_image_side),
    "tiny": MiniGPT4Preset(lambda: LlamaConfig.from_name("tiny"), prompt=8, long_prompt=32, new_tokens=8,
                           image_side=tiny_image_side),
}


# ---- the two language models on the same weights ------------------------------------------------

def hf_llama_config(config: LlamaConfig):
    """transformers' LlamaConfig of ours (rotate-half RoPE over the whole head, no biases)."""
    return HFLlamaConfig(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                         intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                         num_attention_heads=config.num_heads, num_key_value_heads=config.kv_heads,
                         rms_norm_eps=config.rms_norm_eps, rope_theta=config.theta,
                         max_position_embeddings=config.seq_length, attention_bias=False, mlp_bias=False,
                         tie_word_embeddings=False, pad_token_id=PAD, eos_token_id=None, bos_token_id=None,
                         attn_implementation="sdpa")


def transformers_model(config: LlamaConfig, seed=0):
    """transformers' LlamaForCausalLM with seeded random weights (measure.randomised): std 0.02, RMSNorm
    weights 1 +- 0.2."""
    return randomised(HFLlamaForCausalLM(hf_llama_config(config)), seed)


def our_model(config: LlamaConfig, reference: HFLlamaForCausalLM):
    """Our LlamaForCausalLM holding the reference's weights (convert_minigpt4's table)."""
    model = LlamaForCausalLM(config)
    model.set_train(False)
    load_params_into_net(model, convert_llama_state_dict(reference.state_dict(), config,
                                                         what="transformers LlamaForCausalLM"))
    return model


def models(config: LlamaConfig):
    """(our LlamaForCausalLM, its embedding table, transformers') holding the same seeded random weights."""
    reference = transformers_model(config)
    ours = our_model(config, reference)
    return ours, ours.model.tok_embeddings.embedding_weight, reference


# ---- the image side ------------------------------------------------------------------------------

class OurImageEncoder(nn.Cell):
    """pixels [B, C, H, W] -> [B, query_length, LLaMA hidden]: EvaViT (with ln_vision), QFormer,
    then MiniGPT-4's llama_proj."""

    def __init__(self, side: ImageSide, llm_hidden):
        super().__init__()
        self.visual_encoder = EvaViT(side.vit)
        self.qformer = QFormer(side.qformer)
        self.llama_proj = nn.Dense(side.qformer.hidden_size, llm_hidden, has_bias=True)

    def construct(self, pixel_values):
        return self.llama_proj(self.qformer(self.visual_encoder(pixel_values)))


class TransformersImageEncoder(torch.nn.Module):
    """The same with transformers' Blip2VisionModel and Blip2QFormerModel and a torch Linear."""

    def __init__(self, side: ImageSide, llm_hidden):
        super().__init__()
        vit, qformer = side.vit, side.qformer
        self.vision = Blip2VisionModel(Blip2VisionConfig(
            hidden_size=vit.hidden_size, intermediate_size=vit.intermediate_size,
            num_hidden_layers=vit.num_hidden_layers, num_attention_heads=vit.num_attention_heads,
            image_size=vit.image_size, patch_size=vit.patch_size, num_channels=vit.num_channels,
            layer_norm_eps=vit.layer_norm_eps, qkv_bias=True, hidden_act="gelu", attention_dropout=0.0))
        # LAVIS' and MiniGPT-4's ln_vision is nn.LayerNorm(hidden) with torch's default eps (1e-5);
        # transformers builds Blip2VisionModel's post_layernorm with the blocks' eps (1e-6).
        self.vision.post_layernorm.eps = vit.ln_vision_eps
        self.qformer = Blip2QFormerModel(Blip2QFormerConfig(
            hidden_size=qformer.hidden_size, num_hidden_layers=qformer.num_hidden_layers,
            num_attention_heads=qformer.num_heads, intermediate_size=qformer.intermediate_size,
            encoder_hidden_size=qformer.encoder_width, cross_attention_frequency=qformer.cross_attention_freq,
            layer_norm_eps=qformer.layer_norm_eps, hidden_act="gelu", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0))
        self.query_tokens = torch.nn.Parameter(torch.zeros(1, qformer.query_length, qformer.hidden_size))
        self.llama_proj = torch.nn.Linear(qformer.hidden_size, llm_hidden)

    def forward(self, pixel_values):
        features = self.vision(pixel_values=pixel_values).last_hidden_state
        queries = self.query_tokens.expand(features.shape[0], -1, -1)
        return self.llama_proj(self.qformer(query_embeds=queries, encoder_hidden_states=features).last_hidden_state)


def transformers_image_encoder(side: ImageSide, llm_hidden, seed=1):
    """Seeded random weights (measure.randomised): std 0.02, LayerNorm weights 1 +- 0.2, and EVA's key bias
    (the middle third of each qkv bias) zero as in every real checkpoint."""
    model = randomised(TransformersImageEncoder(side, llm_hidden), seed,
                       norm_suffixes=("norm.weight", "norm1.weight", "norm2.weight"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("qkv.bias"):
                width = param.shape[0] // 3
                param[width:2 * width] = 0.0
    return model


def our_image_encoder(side: ImageSide, llm_hidden, reference: TransformersImageEncoder):
    """Our image side holding the reference's weights (research.common's conversion tables)."""
    model = OurImageEncoder(side, llm_hidden)
    model.set_train(False)
    vision = {k: v.detach().numpy() for k, v in reference.vision.state_dict().items()}
    load_params_into_net(model, apply_table(vision, rows_from_hf_blip2_vision(side.vit), what="Blip2VisionModel"),
                         what="Blip2VisionModel", prefix="visual_encoder.")
    qformer = fuse_hf_blip2_qformer(reference.qformer.state_dict(), side.qformer)
    qformer["query_tokens"] = reference.query_tokens.detach().numpy()
    load_params_into_net(model, apply_table(qformer, rows_from_hf_blip2_qformer(side.qformer),
                                            what="Blip2QFormerModel"),
                         what="Blip2QFormerModel", prefix="qformer.")
    load_params_into_net(model, {"weight": reference.llama_proj.weight.detach().numpy(),
                                 "bias": reference.llama_proj.bias.detach().numpy()},
                         what="llama_proj", prefix="llama_proj.")
    return model


def compare_image_encoding(side: ImageSide, llm_hidden):
    """(our seconds per image, transformers', max |ours - theirs|, the std of transformers'
    embeddings: the scale the difference is held against) over one batch of images."""
    reference = transformers_image_encoder(side, llm_hidden)
    ours = our_image_encoder(side, llm_hidden, reference)
    size = side.vit.image_size
    pixels = np.random.default_rng(0).standard_normal((side.images, side.vit.num_channels, size, size))
    pixels = pixels.astype(np.float32)

    def run_ours():
        return ours(Tensor(pixels)).asnumpy()

    def run_theirs():
        with torch.no_grad():
            return reference(torch.from_numpy(pixels)).numpy()

    ours_out, their_out = run_ours(), run_theirs()  # the warm-up: ours compiles its graph here
    difference = float(np.abs(ours_out - their_out).max())
    our_time = float(np.median([seconds(run_ours) for _ in range(side.repeats)]))
    their_time = float(np.median([seconds(run_theirs) for _ in range(side.repeats)]))
    return our_time / side.images, their_time / side.images, difference, float(their_out.std())


# ---- the comparison -----------------------------------------------------------------------------

def compare(args):
    preset = PRESETS[args.preset]
    config = preset.config()
    rows, match = compare_decoding(args, preset, config, models, description(config))

    side = preset.image_side()
    vit, qformer = side.vit, side.qformer
    print(f"image side: EVA {vit.image_size} px / patch {vit.patch_size} ({vit.num_positions} tokens), "
          f"{vit.num_hidden_layers} layers of {vit.hidden_size}, {vit.num_attention_heads} heads, "
          f"MLP {vit.intermediate_size}; Q-Former {qformer.num_hidden_layers} layers of {qformer.hidden_size}, "
          f"{qformer.num_heads} heads, {qformer.query_length} queries; projection to {config.hidden_size}; "
          f"{side.images} images a call", flush=True)
    our_image, their_image, image_difference, image_scale = compare_image_encoding(side, config.hidden_size)
    image_match = image_difference <= IMAGE_TOLERANCE
    print(f"image embeddings (std {image_scale:.3g}), ours vs transformers': max |diff| {image_difference:.3g} "
          f"(the same work within {IMAGE_TOLERANCE:g}: {'yes' if image_match else 'NO'})", flush=True)

    image_row = goal_row("image encoding per image", f"batch {side.images}, {vit.image_size} px", "ms",
                         our_image * 1000, their_image * 1000, "<= 1.0")
    if not image_match:
        image_row["met"] = "NO"
    rows.append(image_row)
    print_table(rows)
    print(f"tokens match: {'yes' if match else 'no'}")
    print(f"image outputs match: {'yes' if image_match else 'no'}")
    write_table(rows, args.output_dir, "compare_minigpt4.csv")
    return 0 if image_match else 1


def main(argv=None):
    return run_comparison(compare, __doc__, PRESETS, argv)


if __name__ == "__main__":
    sys.exit(main())
