"""ChatGLM2 against transformers' GlmForCausalLM: the same weights, the same threads, one run.

    python benchmarks/chatglm2_perf.py [--preset medium|tiny] [--new_tokens N] [--threads T]

transformers' GLM (the GLM-4 family's code) is ChatGLM2's architecture under other names
(tests/chatglm2/test_chatglm2_parity.py explains the correspondence), so a GlmForCausalLM
with seeded random weights (std 0.02, RMSNorm weights 1 +- 0.2) is the reference: its state
dict, renamed to HF THUDM/chatglm2-6b's keys, goes through convert_chatglm2's table into our
ChatGLM2ForConditionalGeneration (GRAPH mode). Both decode greedily with their KV cache and
no eos (the GlmConfig has eos_token_id None), so both produce every requested token; the
transformers side uses its default attention (sdpa).

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
Prints a table with the issue's goals (decode batch 1 >= 1.0x transformers, batch 8 >= 2x,
first token <= 1x) and writes it to compare_chatglm2.csv in --output_dir.

Presets: medium (hidden 2048, 8 layers, 16 heads of 128, 2 KV groups, SwiGLU 5504, vocab
65024, float32, seq_length 1024; 32-token prompts, 32 new tokens, a 512-token prompt for the
first token) and tiny (ChatGLM2Config.from_name("tiny"); 8-token prompts, 8 new tokens, a
32-token prompt), which runs in well under a minute.
"""
import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

import numpy as np
import torch
from transformers import GlmConfig, GlmForCausalLM
from transformers.generation.streamers import BaseStreamer

# This checkout's packages (research), whatever the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks.measure import copy_bandwidth, write_csv
import mindspore as ms

from research.chatglm2.configuration_chatglm2 import ChatGLM2Config
from research.chatglm2.convert_chatglm2 import chatglm2_rows
from research.chatglm2.modeling_chatglm2 import ChatGLM2ForConditionalGeneration
from research.common.checkpoint import load_params_into_net
from research.common.convert import apply_table
from research.common.generation import GenerationConfig, generate

PAD = 0
FIRST_ORDINARY_ID = 3  # prompts avoid pad 0, bos 1 and eos 2
WEIGHT_SCALE = 0.02
# Two logits this close are a tie up to float32 rounding (the parity tests' tolerance): where
# greedy decoding meets one, either implementation may take either token.
NEAR_TIE = 1e-4
COLUMNS = ("case", "setting", "unit", "ours", "transformers", "ratio", "goal", "met")


def chatglm2_medium():
    """ChatGLM2-6B's architecture at hidden 2048: 8 layers, 16 heads of 128 with 2 KV groups,
    a SwiGLU of 5504 (about 8/3 x 2048), the 6B's vocabulary, float32."""
    return ChatGLM2Config(num_layers=8, padded_vocab_size=65024, hidden_size=2048, ffn_hidden_size=5504,
                          kv_channels=128, num_attention_heads=16, multi_query_group_num=2,
                          seq_length=1024, param_init_type="float32", compute_dtype="float32",
                          use_past=True, do_sample=False)


@dataclasses.dataclass(frozen=True)
class Preset:
    config: Callable[[], ChatGLM2Config]
    prompt: int  # tokens of each prompt of the decode cases
    long_prompt: int  # tokens of the first-token case
    new_tokens: int  # of the decode cases


PRESETS = {
    "medium": Preset(chatglm2_medium, prompt=32, long_prompt=512, new_tokens=32),
    "tiny": Preset(lambda: ChatGLM2Config.from_name("tiny"), prompt=8, long_prompt=32, new_tokens=8),
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    prompt: int
    new_tokens: int


# ---- the two models on the same weights -------------------------------------------------------

def glm_config(config: ChatGLM2Config):
    """GlmForCausalLM's config of a ChatGLM2 (RoPE on half of each head as interleaved pairs)."""
    return GlmConfig(vocab_size=config.padded_vocab_size, hidden_size=config.hidden_size,
                     intermediate_size=config.ffn_hidden_size, num_hidden_layers=config.num_layers,
                     num_attention_heads=config.num_attention_heads,
                     num_key_value_heads=config.multi_query_group_num, head_dim=config.kv_channels,
                     partial_rotary_factor=0.5, attention_bias=True, tie_word_embeddings=False,
                     rms_norm_eps=config.layernorm_epsilon, rope_theta=10000.0 * config.rope_ratio,
                     max_position_embeddings=config.seq_length, pad_token_id=PAD, eos_token_id=None,
                     bos_token_id=None, attn_implementation="sdpa")


def transformers_model(config: ChatGLM2Config, seed=0):
    """GlmForCausalLM with seeded random weights: std WEIGHT_SCALE, RMSNorm weights 1 +- 0.2."""
    model = GlmForCausalLM(glm_config(config)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            param.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else WEIGHT_SCALE * noise)
    return model


def chatglm2_weights(model: GlmForCausalLM, config: ChatGLM2Config):
    """Our parameters holding `model`'s weights: its names become HF THUDM/chatglm2-6b's
    (q, k, v rows concatenated into query_key_value), then convert_chatglm2's table applies."""
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    hf = {"transformer.embedding.word_embeddings.weight": weights.pop("model.embed_tokens.weight"),
          "transformer.encoder.final_layernorm.weight": weights.pop("model.norm.weight"),
          "transformer.output_layer.weight": weights.pop("lm_head.weight")}
    for i in range(config.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            hf[dst + f"self_attention.query_key_value.{kind}"] = np.concatenate(
                [weights.pop(f"{src}self_attn.{p}_proj.{kind}") for p in "qkv"])
        hf[dst + "self_attention.dense.weight"] = weights.pop(src + "self_attn.o_proj.weight")
        hf[dst + "mlp.dense_h_to_4h.weight"] = weights.pop(src + "mlp.gate_up_proj.weight")
        hf[dst + "mlp.dense_4h_to_h.weight"] = weights.pop(src + "mlp.down_proj.weight")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            hf[dst + norm + ".weight"] = weights.pop(src + norm + ".weight")
    if weights:
        raise ValueError(f"GlmForCausalLM weights without a ChatGLM2 name: {sorted(weights)}")
    return apply_table(hf, chatglm2_rows(config), what="GlmForCausalLM's weights")


def our_model(config: ChatGLM2Config, reference: GlmForCausalLM):
    """Our ChatGLM2 holding the reference's weights."""
    model = ChatGLM2ForConditionalGeneration(config)
    model.set_train(False)
    load_params_into_net(model, chatglm2_weights(reference, config))
    return model


def weight_bytes_per_token(model):
    """Every weight is read once per decode step, except the embedding table (one row)."""
    total = sum(p.nbytes for p in model.get_parameters())
    return total - model.transformer.embedding.embedding_weight.nbytes


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
    return rng.randint(FIRST_ORDINARY_ID, config.padded_vocab_size, size=(batch, length)).tolist()


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


# ---- memory and bandwidth -----------------------------------------------------------------------

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
    print(f"preset {args.preset}: hidden {config.hidden_size}, {config.num_layers} layers, "
          f"{config.num_attention_heads} heads x {config.kv_channels}, {config.kv_heads} KV groups, "
          f"ffn {config.ffn_hidden_size}, vocab {config.padded_vocab_size}, {config.compute_dtype}; "
          f"{args.threads} threads each", flush=True)
    print(f"copy bandwidth {bandwidth:.1f} GB/s (read + write); decode floor at batch 1 "
          f"{floor * 1000:.3g} ms/token ({weight_bytes_per_token(ours) / 1e6:.3g} MB of weights per token); "
          f"RSS with both models loaded {_status_mb('VmRSS'):.0f} MB", flush=True)

    prompts = [random_prompts(config, case.batch, case.prompt, seed=n) for n, case in enumerate(cases)]

    def run_all(run, side):
        results = []
        for case, rows in zip(cases, prompts):
            results.append(timed(run, rows, case.new_tokens))
            print(f"{side}: {case.name} done", flush=True)
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

    (_, our_step1, _), (_, our_step8, _), (our_first, _, _) = our_results
    (_, their_step1, _), (_, their_step8, _), (their_first, _, _) = their_results
    decode = f"prompt {preset.prompt}, {new_tokens} new"
    match = matching == len(cases)
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
    ]
    print_table(rows)
    print(f"tokens match: {'yes' if match else 'no'}")
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "compare_chatglm2.csv")
    write_csv(path, [{k: _format(row.get(k)) for k in COLUMNS} for row in rows])
    print(f"wrote {path}")
    return 0


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
