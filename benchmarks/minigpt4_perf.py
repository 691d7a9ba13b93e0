"""MiniGPT-4 against transformers' LlamaForCausalLM and BLIP-2 image side: the same weights, the same threads, one run.

    python benchmarks/minigpt4_perf.py [--preset medium|tiny] [--new_tokens N] [--threads T]

The language model. A transformers LlamaForCausalLM with seeded random weights (std 0.02,
RMSNorm weights 1 +- 0.2) is the reference: its state dict goes through
convert_minigpt4.convert_llama_state_dict into our LlamaForCausalLM (research/minigpt4,
GRAPH mode), loaded with research.common.checkpoint.load_params_into_net. Both decode
greedily with their KV cache and no eos (the transformers config has eos_token_id None, our
GenerationConfig none either), so both produce every requested token; the transformers side
uses sdpa attention.

Measured, ours first, then transformers', each after a warm-up of the same shapes (ours
compiles its graphs there):
- decode tokens/s at batch 1 and 8 (short prompts, --new_tokens new tokens): batch / the mean
  time of a step after the first token;
- first-token latency of one long prompt (the whole generate() call for one new token);
- the peak RSS while each side generates, above the RSS before its runs (both models loaded);
- the decode floor at batch 1: the weight bytes read per token (all but the embedding table)
  over the machine's copy bandwidth, and the fraction of it each side reaches;
- whether the greedy tokens match in every case ("tokens match: yes/no"): identical, or
  parting only where transformers' logits of the two tokens are a float32 near-tie (random
  weights make one now and then; each parting is printed with its logit gap).

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
import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
from transformers import Blip2QFormerConfig, Blip2QFormerModel, Blip2VisionConfig, Blip2VisionModel
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM as HFLlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

# This checkout's packages (research), whatever the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks.measure import copy_bandwidth, seconds, write_csv
import mindspore as ms
from mindspore import Tensor, nn

from research.common.checkpoint import load_params_into_net
from research.common.convert import apply_table
from research.common.generation import GenerationConfig, generate
from research.common.qformer import QFormer, QFormerConfig, fuse_hf_blip2_qformer, rows_from_hf_blip2_qformer
from research.common.vision import EvaViT, ViTConfig, rows_from_hf_blip2_vision
from research.minigpt4.configuration_minigpt4 import LlamaConfig
from research.minigpt4.convert_minigpt4 import convert_llama_state_dict
from research.minigpt4.modeling_minigpt4 import LlamaForCausalLM

PAD = 0
FIRST_ORDINARY_ID = 3  # prompts avoid pad 0, bos 1 and eos 2
WEIGHT_SCALE = 0.02
# Two logits this close are a tie up to float32 rounding (the parity tests' tolerance): where
# greedy decoding meets one, either implementation may take either token.
NEAR_TIE = 1e-4
# Largest |ours - transformers'| of the image embeddings for the two to count as the same work.
IMAGE_TOLERANCE = 1e-4
# LAVIS' and MiniGPT-4's ln_vision is nn.LayerNorm(hidden) with torch's default eps; transformers
# builds Blip2VisionModel's post_layernorm with the blocks' eps (1e-6).
LN_VISION_EPS = 1e-5
COLUMNS = ("case", "setting", "unit", "ours", "transformers", "ratio", "goal", "met")


def llama_medium():
    """Vicuna's architecture at hidden 2048: 8 layers, 16 heads of 128 with as many key/value
    heads (no grouped-query attention), a SwiGLU of 5504 (about 8/3 x 2048), Vicuna v0's
    vocabulary of 32001, float32."""
    return LlamaConfig(num_layers=8, vocab_size=32001, hidden_size=2048, num_heads=16, n_kv_heads=16,
                       intermediate_size=5504, seq_length=1024, max_decode_length=1024,
                       param_init_type="float32", compute_dtype="float32", use_past=True, do_sample=False)


@dataclasses.dataclass(frozen=True)
class ImageSide:
    """EVA-ViT, Q-Former and the number of images encoded at once (float32 throughout)."""
    vit: ViTConfig
    qformer: QFormerConfig
    images: int
    repeats: int  # timed calls per side; the median counts


def medium_image_side():
    """A scaled EVA-ViT-g (224 px, patch 14: 257 tokens) and a 2-layer BLIP-2 Q-Former."""
    vit = ViTConfig(image_size=224, patch_size=14, hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                    intermediate_size=1536)
    qformer = QFormerConfig(num_hidden_layers=2, num_heads=12, hidden_size=768, intermediate_size=3072,
                            encoder_width=vit.hidden_size, query_length=32)
    return ImageSide(vit, qformer, images=4, repeats=5)


def tiny_image_side():
    vit = ViTConfig(image_size=56, patch_size=14, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=96)
    qformer = QFormerConfig(num_hidden_layers=2, num_heads=4, hidden_size=32, intermediate_size=64,
                            encoder_width=vit.hidden_size, query_length=32)
    return ImageSide(vit, qformer, images=4, repeats=5)


@dataclasses.dataclass(frozen=True)
class Preset:
    config: Callable[[], LlamaConfig]
    image_side: Callable[[], ImageSide]
    prompt: int  # tokens of each prompt of the decode cases
    long_prompt: int  # tokens of the first-token case
    new_tokens: int  # of the decode cases


PRESETS = {
    "medium": Preset(llama_medium, medium_image_side, prompt=32, long_prompt=512, new_tokens=32),
    "tiny": Preset(lambda: LlamaConfig.from_name("tiny"), tiny_image_side, prompt=8, long_prompt=32, new_tokens=8),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    prompt: int
    new_tokens: int


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


def _randomise(model, seed, norm_suffixes=("norm.weight",)):
    """Every parameter of a torch model N(0, WEIGHT_SCALE), norm weights 1 +- 0.2, drawn with
    a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = name.lower().endswith(norm_suffixes)
            param.copy_(1.0 + 0.2 * noise if is_norm else WEIGHT_SCALE * noise)
    return model.eval()


def transformers_model(config: LlamaConfig, seed=0):
    """transformers' LlamaForCausalLM with seeded random weights: std WEIGHT_SCALE, RMSNorm weights 1 +- 0.2."""
    return _randomise(HFLlamaForCausalLM(hf_llama_config(config)), seed)


def our_model(config: LlamaConfig, reference: HFLlamaForCausalLM):
    """Our LlamaForCausalLM holding the reference's weights (convert_minigpt4's table)."""
    model = LlamaForCausalLM(config)
    model.set_train(False)
    load_params_into_net(model, convert_llama_state_dict(reference.state_dict(), config,
                                                         what="transformers LlamaForCausalLM"))
    return model


def weight_bytes_per_token(model):
    """Every weight is read once per decode step, except the embedding table (one row)."""
    total = sum(p.nbytes for p in model.get_parameters())
    return total - model.model.tok_embeddings.embedding_weight.nbytes


# ---- generating and timing ----------------------------------------------------------------------

def our_generate(model, prompts, new_tokens, on_token):
    settings = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=PAD)
    return generate(model, prompts, settings, on_tokens=on_token)


class _EachToken(BaseStreamer):
    """Calls `on_token` after each new token (generate() first puts the prompt)."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value):
        if self.prompt_seen:
            self.on_token(value.tolist())
        self.prompt_seen = True

    def end(self):
        """Nothing to flush."""


def transformers_generate(model, prompts, new_tokens, on_token):
    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             do_sample=False, use_cache=True, streamer=_EachToken(on_token))
    return out[:, ids.shape[1]:].tolist()


class _Stop(Exception):
    """Ends a warm-up generation after its third token."""


def timed(run, prompts, new_tokens):
    """(seconds to the first token, mean seconds of each later step, new ids per row) of
    run(prompts, new_tokens, on_token), after a warm-up of the same shapes that stops after
    three tokens (the prefill and two decode steps: what ours compiles)."""
    seen = []

    def stop_after_three(tokens):
        seen.append(tokens)
        if len(seen) == 3:
            raise _Stop
    try:
        run(prompts, new_tokens, stop_after_three)
    except _Stop:
        pass
    stamps = []
    start = time.perf_counter()
    ids = run(prompts, new_tokens, lambda _tokens: stamps.append(time.perf_counter()))
    step = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return stamps[0] - start, step, ids


def random_prompts(config, batch, length, seed):
    rng = np.random.RandomState(seed)
    return rng.randint(FIRST_ORDINARY_ID, config.vocab_size, size=(batch, length)).tolist()


def parting_rows(reference, prompts, ours_ids, their_ids):
    """(row, new-token index, gap) of each row where our greedy tokens part from transformers':
    gap is transformers' logit of its token minus its logit of ours at that step (a forward of
    the common prefix), so a float32 near-tie shows as a gap of rounding size."""
    partings = []
    for row, (mine, theirs) in enumerate(zip(ours_ids, their_ids)):
        if mine == theirs:
            continue
        step = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        with torch.no_grad():
            logits = reference(torch.tensor([prompts[row] + theirs[:step]])).logits[0, -1]
        partings.append((row, step, float(logits[theirs[step]] - logits[mine[step]])))
    return partings


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
    """Seeded random weights: std WEIGHT_SCALE, LayerNorm weights 1 +- 0.2, and EVA's key bias
    (the middle third of each qkv bias) zero as in every real checkpoint."""
    model = _randomise(TransformersImageEncoder(side, llm_hidden), seed,
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


# ---- memory -------------------------------------------------------------------------------------

def _status_mb(field):
    """VmRSS or VmHWM (peak RSS) of this process in MB, from /proc/self/status."""
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_rss_above_start(work):
    """(work()'s result, its peak RSS in MB above the RSS it started at). Writing 5 to
    /proc/self/clear_refs (Linux) resets the peak to the current RSS."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    start = _status_mb("VmRSS")
    result = work()
    return result, _status_mb("VmHWM") - start


# ---- the comparison -----------------------------------------------------------------------------

def goal_row(case, setting, unit, ours, theirs, goal):
    """A table row whose ratio ours / transformers is held against `goal` (">= x" or "<= x")."""
    ratio = ours / theirs
    comparison, target = goal.split()
    met = ratio >= float(target) if comparison == ">=" else ratio <= float(target)
    return {"case": case, "setting": setting, "unit": unit, "ours": ours, "transformers": theirs,
            "ratio": ratio, "goal": goal, "met": "yes" if met else "NO"}


def compare(args):
    preset = PRESETS[args.preset]
    config = preset.config()
    side = preset.image_side()
    new_tokens = args.new_tokens or preset.new_tokens
    cases = (Case("decode batch 1", 1, preset.prompt, new_tokens),
             Case("decode batch 8", 8, preset.prompt, new_tokens),
             Case("first token batch 1", 1, preset.long_prompt, 1))
    for case in cases:
        if case.prompt + case.new_tokens > config.seq_length:
            raise SystemExit(f"{case.name}: a {case.prompt}-token prompt and {case.new_tokens} new tokens "
                             f"exceed the preset's seq_length {config.seq_length}")
    bandwidth = copy_bandwidth()
    reference = transformers_model(config)
    ours = our_model(config, reference)
    floor = weight_bytes_per_token(ours) / (bandwidth * 1e9)
    print(f"preset {args.preset}: LLaMA hidden {config.hidden_size}, {config.num_layers} layers, "
          f"{config.num_heads} heads x {config.head_dim}, {config.kv_heads} KV heads, "
          f"ffn {config.ffn_hidden_size}, vocab {config.vocab_size}, {config.compute_dtype}; "
          f"{args.threads} threads each", flush=True)
    print(f"copy bandwidth {bandwidth:.1f} GB/s (read + write); decode floor at batch 1 "
          f"{floor * 1000:.3g} ms/token ({weight_bytes_per_token(ours) / 1e6:.3g} MB of weights per token); "
          f"RSS with both models loaded {_status_mb('VmRSS'):.0f} MB", flush=True)

    prompts = [random_prompts(config, case.batch, case.prompt, seed=n) for n, case in enumerate(cases)]

    def run_all(run, name):
        results = []
        for case, rows in zip(cases, prompts):
            results.append(timed(run, rows, case.new_tokens))
            print(f"{name}: {case.name} done", flush=True)
        return results

    our_results, our_peak = peak_rss_above_start(
        lambda: run_all(lambda *a: our_generate(ours, *a), "ours"))
    their_results, their_peak = peak_rss_above_start(
        lambda: run_all(lambda *a: transformers_generate(reference, *a), "transformers"))

    matching = 0
    for case, rows, (_, _, ours_ids), (_, _, their_ids) in zip(cases, prompts, our_results, their_results):
        partings = parting_rows(reference, rows, ours_ids, their_ids)
        matching += all(abs(gap) <= NEAR_TIE for _, _, gap in partings)
        for row, step, gap in partings:
            kind = "a near-tie" if abs(gap) <= NEAR_TIE else "NOT a near-tie"
            print(f"{case.name}, row {row}: our tokens part from transformers' at new token {step + 1}, "
                  f"{kind} (its logit of its token minus of ours: {gap:.2g}; ties are <= {NEAR_TIE:g})")
    del ours, reference

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

    (_, our_step1, _), (_, our_step8, _), (our_first, _, _) = our_results
    (_, their_step1, _), (_, their_step8, _), (their_first, _, _) = their_results
    decode = f"prompt {preset.prompt}, {new_tokens} new"
    match = matching == len(cases)
    image_row = goal_row("image encoding per image", f"batch {side.images}, {vit.image_size} px", "ms",
                         our_image * 1000, their_image * 1000, "<= 1.0")
    if not image_match:
        image_row["met"] = "NO"
    rows = [
        goal_row("decode batch 1", decode, "tokens/s", 1 / our_step1, 1 / their_step1, ">= 1.0"),
        goal_row("decode batch 8", decode, "tokens/s", 8 / our_step8, 8 / their_step8, ">= 2.0"),
        goal_row("first token batch 1", f"prompt {preset.long_prompt}", "ms", our_first * 1000,
                 their_first * 1000, "<= 1.0"),
        {"case": "decode batch 1 / floor", "unit": "fraction",
         "setting": f"floor {floor * 1000:.3g} ms/token at {bandwidth:.1f} GB/s",
         "ours": floor / our_step1, "transformers": floor / their_step1},
        {"case": "peak RSS while generating", "setting": "above the RSS before the runs", "unit": "MB",
         "ours": our_peak, "transformers": their_peak, "ratio": our_peak / their_peak if their_peak else None},
        {"case": "greedy tokens match", "setting": f"identical but for near-ties (logits within {NEAR_TIE:g})",
         "unit": "cases", "ours": f"{matching} of {len(cases)}", "goal": "all", "met": "yes" if match else "NO"},
        image_row,
    ]
    print_table(rows)
    print(f"tokens match: {'yes' if match else 'no'}")
    print(f"image outputs match: {'yes' if image_match else 'no'}")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "compare_minigpt4.csv")
    write_csv(path, [{k: _format(row.get(k)) for k in COLUMNS} for row in rows])
    print(f"wrote {path}")
    return 0 if image_match else 1


def _format(value):
    """Two decimals, or three significant digits below 1."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def print_table(rows):
    cells = [COLUMNS] + [tuple(_format(row.get(k)) for k in COLUMNS) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="medium")
    parser.add_argument("--new_tokens", type=int, default=None,
                        help="new tokens of the decode cases (default: the preset's, 32 for medium)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="MindSpore's runtime threads and torch's threads")
    parser.add_argument("--output_dir", default=os.path.join("output", "benchmarks"))
    args = parser.parse_args(argv)
    if args.new_tokens is not None and args.new_tokens < 2:
        parser.error("--new_tokens must be at least 2 (a decode step follows the first token)")
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.device_context.cpu.op_tuning.threads_num(args.threads)
    torch.set_num_threads(args.threads)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
