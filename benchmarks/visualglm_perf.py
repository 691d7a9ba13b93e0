"""VisualGLM benchmarks: seed 002's modes, and a comparison with the upstream PyTorch model.

    python benchmarks/visualglm_perf.py --mode performance [--preset tiny|medium]
    python benchmarks/visualglm_perf.py --mode precision [--presets tiny medium]
    python benchmarks/visualglm_perf.py --mode predict [--config run_visualglm_tiny_demo.yaml]
    python benchmarks/visualglm_perf.py --mode compare

- performance: VisualGLM (image encoder + GLM, KV cache, greedy, eos ignored) for each batch
  size and input = output length n (`--lengths`, those with 2n <= the preset's seq_length);
  writes `{batch}_batch_performance_visualglm.csv` per batch into --output_dir. Columns as
  seed 002: TokensPerSecond = 1000 / TimePerTokens (tokens per second of one sequence),
  ResponseTime (whole request), FirstTokenTime (image encoding + prefill + first token),
  TimePerTokens (each later token); plus ThroughputTokensPerSecond (all rows), the image
  encoding time and the process's peak RSS so far (no device memory on a CPU).
- precision: per-token cosine similarity between our GLM's logits (the generation path with
  the KV cache) and SAT's ChatGLMModel (full forward over the same tokens) on the same
  random weights converted with convert_weight's table; seed 002 asks for >= 0.9999.
- predict: answers for examples/visualglm/example_inputs.jsonl, printed and written to
  predict_visualglm.jsonl.
- compare: the medium GLM (hidden 2048, 8 layers, vocab 130528, float32) against SAT's
  ChatGLMModel with its own KV cache, same weights and thread count: decode tokens/s at batch
  1 and 8, first token for a 512-token prompt, the machine's copy bandwidth and the decode
  floor (weight bytes read per token / bandwidth), and the issue's goals as ratios. Writes
  compare_visualglm.csv.
The "medium" preset keeps the YAML's vision tower and Q-Former and swaps in that GLM.
Random weights unless the YAML names checkpoints; numbers are about the runtime.
"""
import argparse
import dataclasses
import json
import os
import resource
import sys
import time

import numpy as np

# This checkout's packages (research, tests), whatever the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from benchmarks.measure import copy_bandwidth, seconds, write_csv
import mindspore as ms

from research.common.checkpoint import load_params_into_net
from research.common.config import REPO_ROOT
from research.common.generation import GenerationConfig, generate
from research.visualglm.configuration_visualglm import load_visualglm_config
from research.visualglm.convert_visualglm import convert_glm_state_dict
from research.visualglm.inference import load_visualglm
from research.visualglm.modeling_glm import GLMForConditionalGeneration, glm_positions_and_mask
from research.visualglm.modeling_visualglm import VisualGLMImageToTextGeneration

TINY_CONFIG = "run_visualglm_tiny_image_to_text_generation.yaml"
PRESETS = {
    "tiny": dict(seq_length=2048),  # the YAML's GLM, long enough for n = 1024
    "medium": dict(vocab_size=130528, hidden_size=2048, num_layers=8, num_heads=32,
                   inner_hidden_size=8192, seq_length=2048),
}
MIN_COSINE = 0.9999
GOALS = (  # (name, measured key, comparison, target); tokens/s vs SAT from issue #11
    ("decode tokens/s vs SAT, batch 1", "speedup_vs_sat_batch_1", ">=", 0.97),
    ("decode tokens/s vs SAT, batch 8", "speedup_vs_sat_batch_8", ">=", 1.8),
    ("greedy tokens identical to SAT's (1 = all cases)", "same_tokens", ">=", 1.0),
    ("first token (512-token prompt) / one forward", "first_token_vs_forward", "<=", 2.0),
)


class _Stop(Exception):
    """Ends a warm-up generation once its graphs are compiled."""


def glm_config(preset, config_name=TINY_CONFIG):
    _, config = load_visualglm_config(config_name)
    return dataclasses.replace(config.text_config, **PRESETS[preset])


def random_prompts(config, batch, length, seed=0):
    """GLM prompts of `length` ids ending in [gMASK] <sop>, clear of the special ids."""
    rng = np.random.RandomState(seed)
    special = (config.bos_token_id, config.eos_token_id, config.mask_token_id,
               config.gmask_token_id, config.pad_token_id)
    ordinary = np.setdiff1d(np.arange(10, config.vocab_size), special)
    return [rng.choice(ordinary, length - 2).tolist()
            + [config.gmask_token_id, config.bos_token_id] for _ in range(batch)]


def greedy(config, new_tokens):
    return GenerationConfig(max_new_tokens=new_tokens, pad_token_id=config.pad_token_id)


def timed_generate(run, settings):
    """(seconds to the first token, seconds of each later token, total seconds, outputs)."""
    stamps = []
    start = time.perf_counter()
    outputs = run(settings, lambda _tokens: stamps.append(time.perf_counter()))
    total = time.perf_counter() - start
    later = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return stamps[0] - start, later, total, outputs


def warm_up(run, settings):
    """Compile the graphs of these shapes: the prefill and two decode steps."""
    seen = []

    def stop_after_two(tokens):
        seen.append(tokens)
        if len(seen) == 3:
            raise _Stop
    try:
        run(settings, stop_after_two)
    except _Stop:
        pass


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- performance -------------------------------------------------------------------------------

def visualglm_model(config_name, preset):
    yaml_config, config = load_visualglm_config(config_name)
    config.text_config = dataclasses.replace(config.text_config, **PRESETS[preset])
    model = VisualGLMImageToTextGeneration(config)
    model.set_train(False)
    loaded = model.load_checkpoints()
    return config, model, loaded


def performance(args):
    args.preset = args.preset or "tiny"
    config, model, loaded = visualglm_model(args.config, args.preset)
    text = config.text_config
    size = config.vision_config.image_size
    print(f"preset {args.preset}: GLM hidden {text.hidden_size}, {text.num_layers} layers, vocab "
          f"{text.vocab_size}, seq_length {text.seq_length}; weights: {', '.join(loaded) or 'random'}")
    lengths = [n for n in args.lengths if 2 * n <= text.seq_length and n > config.image_length + 4]
    skipped = sorted(set(args.lengths) - set(lengths))
    if skipped:
        print(f"lengths {skipped} skipped: 2n must fit seq_length {text.seq_length} and n hold the "
              f"{config.image_length} image tokens")
    os.makedirs(args.output_dir, exist_ok=True)
    for batch in args.batch_sizes:
        pixels = np.random.RandomState(batch).rand(batch, 3, size, size).astype(np.float32)
        rows = []
        for n in lengths:
            # <img> at 1, the image's 32 slots after it, then text: n tokens in all.
            prompts = random_prompts(text, batch, n, seed=n)
            for prompt in prompts:
                prompt[1:1 + config.image_length] = [text.pad_token_id] * config.image_length

            def run(settings, on_tokens):
                return model.generate(prompts, [1] * batch, pixels, settings, on_tokens=on_tokens)

            settings = greedy(text, n)
            warm_up(run, settings)
            start = time.perf_counter()
            model.image_embeddings(pixels)
            image_ms = (time.perf_counter() - start) * 1000
            first, later, total, _ = timed_generate(run, settings)
            rows.append({
                "Batch": batch, "InputLength": n, "OutputLength": n,
                "TokensPerSecond": round(1 / later, 2),
                "ThroughputTokensPerSecond": round(batch / later, 2),
                "ResponseTime(ms)": round(total * 1000, 2),
                "FirstTokenTime(ms)": round(first * 1000, 2),
                "TimePerTokens(ms)": round(later * 1000, 2),
                "ImageEncodeTime(ms)": round(image_ms, 2),
                "PeakRSS(MB)": round(peak_rss_mb(), 1),
            })
            print(rows[-1], flush=True)
        path = os.path.join(args.output_dir, f"{batch}_batch_performance_visualglm.csv")
        write_csv(path, rows)
        print(f"wrote {path}")




# ---- precision and the SAT reference -----------------------------------------------------------

def sat_and_ours(config, seed=0):
    """SAT's ChatGLMModel with seeded random weights (std 0.02, as the 6B's initialisation)
    and our GLM holding the same weights."""
    from tests.sat_reference import sat_chatglm_model  # torch is only needed here

    sat = sat_chatglm_model(config, seed=seed, std=0.02)
    state_dict = {k: v.detach().numpy() for k, v in sat.state_dict().items()}
    ours = GLMForConditionalGeneration(config)
    ours.set_train(False)
    load_params_into_net(ours, convert_glm_state_dict(state_dict, config, "sat"))
    return sat, ours


class LogitsRecorder:
    """Our GLM behind generate()'s CausalLM interface, keeping the logits of every step."""

    def __init__(self, model):
        self.model, self.logits = model, []
        self.seq_length = model.seq_length
        self.generation_inputs, self.token_embeddings = model.generation_inputs, model.token_embeddings
        self.start_cache = model.start_cache

    def _recorded(self, logits, argmax):
        self.logits.append(logits)
        return logits if argmax is None else argmax.of(logits)

    def prefill(self, argmax=None, **inputs):
        return self._recorded(self.model.prefill(**inputs), argmax)

    def decode(self, argmax=None, **inputs):
        return self._recorded(self.model.decode(**inputs), argmax)

    def forward(self, **inputs):
        return self._recorded(self.model.forward(**inputs), None)


def cosine(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def precision(args):
    import torch

    failed = False
    print("preset,batch,new_tokens,tokens_compared,min_cosine,max_abs_logit_diff,result")
    for preset in args.presets:
        config = dataclasses.replace(glm_config(preset), seq_length=256)
        sat, ours = sat_and_ours(config)
        recorder = LogitsRecorder(ours)
        prompts = [p[:length] + p[-2:] for p, length in
                   zip(random_prompts(config, 2, 40, seed=3), (38, 21))]
        outputs = generate(recorder, prompts, greedy(config, args.new_tokens))
        width = max(len(p) for p in prompts)
        rows = [[config.pad_token_id] * (width - len(p)) + p + o for p, o in zip(prompts, outputs)]
        with torch.no_grad():  # SAT's own masks and 2D positions from the token ids
            reference = sat(input_ids=torch.tensor(rows, dtype=torch.long))[0].numpy()
        ours_logits = np.stack(recorder.logits, axis=1)  # [B, steps, V]
        cosines, diffs = [], []
        for row in range(len(rows)):
            for step in range(len(outputs[row])):
                expected = reference[row, width - 1 + step]
                got = ours_logits[row, step]
                cosines.append(cosine(got, expected))
                diffs.append(float(np.abs(got - expected).max()))
        worst = min(cosines)
        failed |= worst < MIN_COSINE
        print(f"{preset},{len(rows)},{args.new_tokens},{len(cosines)},{worst:.7f},{max(diffs):.3g},"
              f"{'PASS' if worst >= MIN_COSINE else 'FAIL'} (>= {MIN_COSINE})", flush=True)
        del sat, ours
    return 1 if failed else 0


# ---- predict -----------------------------------------------------------------------------------

def predict(args):
    examples = os.path.join(REPO_ROOT, "examples", "visualglm", "example_inputs.jsonl")
    with open(examples, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    pairs = [(os.path.join(REPO_ROOT, row["image"]), row["prompt"]) for row in rows]
    chat = load_visualglm(args.config, use_past=True, do_sample=False)
    print(chat.describe_weights())
    results = []
    for (image, prompt), row in zip(pairs, rows):
        reply = chat.answer([(image, prompt)], max_new_tokens=64)[0]
        results.append({**row, "answer": reply.answer})
        print(f"{row['image']} | {prompt} -> {reply.answer}", flush=True)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, "predict_visualglm.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in results)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


# ---- compare -----------------------------------------------------------------------------------





def weight_bytes_per_token(model):
    """Every weight is read once per decode step, except the embedding table (one row)."""
    total = sum(p.nbytes for p in model.get_parameters())
    return total - model.transformer.word_embeddings.embedding_table.nbytes


def sat_decode(sat, config, prompts, new_tokens):
    """Greedy decoding with SAT's KV cache (past_key_values), as its chat loop does; returns
    (first-token seconds, seconds per later token, new ids per row)."""
    import torch

    batch, length = len(prompts), len(prompts[0])
    ids = np.full((batch, length + new_tokens), config.pad_token_id, np.int32)
    ids[:, :length] = prompts
    positions, mask = glm_positions_and_mask(ids, [0] * batch, config)
    positions, mask = torch.tensor(positions, dtype=torch.long), torch.tensor(mask)
    stamps = []
    start = time.perf_counter()
    with torch.no_grad():
        past = None
        for step in range(length, length + new_tokens):
            if past is None:
                out = sat(input_ids=torch.tensor(ids[:, :step], dtype=torch.long),
                          position_ids=positions[..., :step], attention_mask=mask[..., :step, :step])
            else:
                out = sat(input_ids=torch.tensor(ids[:, :step], dtype=torch.long),
                          position_ids=positions[..., :step],
                          attention_mask=mask[..., step - 1:step, :step], past_key_values=past)
            past = [layer["past_key_values"] for layer in out[1:]]
            ids[:, step] = out[0][:, -1].argmax(-1).numpy()
            stamps.append(time.perf_counter())
    later = (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)
    return stamps[0] - start, later, ids[:, length:].tolist()


def our_decode(model, config, prompts, new_tokens):
    def run(settings, on_tokens):
        return generate(model, prompts, settings, on_tokens=on_tokens)
    settings = greedy(config, new_tokens)
    warm_up(run, settings)
    first, later, _, outputs = timed_generate(run, settings)
    return first, later, outputs


def one_forwardseconds(model, config, prompt, repeat=3):
    """Our plain forward (no cache, logits at the last position) over one prompt."""
    ids = np.asarray([prompt], np.int32)
    positions, mask = glm_positions_and_mask(ids, [0], config)
    inputs = dict(input_ids=ids, position_ids=positions, attention_mask=mask,
                  logits_index=np.array([len(prompt) - 1], np.int32))
    model.forward(**inputs)
    return min(seconds(lambda: model.forward(**inputs)) for _ in range(repeat))


def compare(args):
    config = dataclasses.replace(glm_config(args.preset or "medium"), seq_length=1024)
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth: {bandwidth:.1f} GB/s (read + write); threads: {args.threads}", flush=True)
    sat, ours = sat_and_ours(config)
    floor = weight_bytes_per_token(ours) / (bandwidth * 1e9)
    rows, measured = [], {}
    for batch in (1, 8):
        prompts = random_prompts(config, batch, 32, seed=batch)
        our_first, our_step, our_ids = our_decode(ours, config, prompts, args.new_tokens)
        sat_first, sat_step, sat_ids = sat_decode(sat, config, prompts, args.new_tokens)
        rows.append({"case": f"decode batch {batch} (prompt 32, {args.new_tokens} new)",
                     "ours_ms": our_step * 1000, "sat_ms": sat_step * 1000,
                     "ours_tokens_per_s": batch / our_step, "sat_tokens_per_s": batch / sat_step,
                     "same_tokens": our_ids == sat_ids})
        rows.append({"case": f"first token batch {batch} (prompt 32)", "ours_ms": our_first * 1000,
                     "sat_ms": sat_first * 1000})
        measured[f"speedup_vs_sat_batch_{batch}"] = sat_step / our_step
        measured["same_tokens"] = min(measured.get("same_tokens", 1.0), float(our_ids == sat_ids))
    prompt = random_prompts(config, 1, 512, seed=5)
    our_first, _, _ = our_decode(ours, config, prompt, 2)
    sat_first, _, _ = sat_decode(sat, config, prompt, 2)
    forward = one_forwardseconds(ours, config, prompt[0])
    rows.append({"case": "first token batch 1 (prompt 512)", "ours_ms": our_first * 1000,
                 "sat_ms": sat_first * 1000})
    rows.append({"case": "one forward, no cache (prompt 512)", "ours_ms": forward * 1000})
    rows.append({"case": "decode floor (weight bytes / bandwidth)", "ours_ms": floor * 1000})
    measured["first_token_vs_forward"] = our_first / forward

    print("case,ours_ms,sat_ms,ours_tokens_per_s,sat_tokens_per_s,same_tokens")
    for row in rows:
        print(",".join(_format(row.get(k)) for k in
                       ("case", "ours_ms", "sat_ms", "ours_tokens_per_s", "sat_tokens_per_s", "same_tokens")))
    print("goal,measured,target,met")
    for name, key, comparison, target in GOALS:
        value = measured[key]
        met = value >= target if comparison == ">=" else value <= target
        print(f"{name},{value:.2f},{comparison} {target},{'yes' if met else 'NO'}")
        rows.append({"case": f"goal: {name}", "ours_ms": value, "sat_ms": target, "same_tokens": met})
    os.makedirs(args.output_dir, exist_ok=True)
    write_csv(os.path.join(args.output_dir, "compare_visualglm.csv"),
              [{k: row.get(k, "") for k in ("case", "ours_ms", "sat_ms", "ours_tokens_per_s",
                                            "sat_tokens_per_s", "same_tokens")} for row in rows])


def _format(value):
    if value is None:
        return ""
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", required=True, choices=["performance", "precision", "predict", "compare"])
    parser.add_argument("--config", default=None,
                        help=f"VisualGLM YAML (performance: {TINY_CONFIG}; predict: run_visualglm_tiny_demo.yaml)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="performance mode (default tiny) and compare mode (default medium)")
    parser.add_argument("--presets", nargs="+", choices=sorted(PRESETS), default=["tiny", "medium"],
                        help="precision mode")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512, 1024],
                        help="input = output tokens (n > 36: the prompt holds 32 image tokens)")
    parser.add_argument("--new_tokens", type=int, default=16, help="precision and compare modes")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--output_dir", default=os.path.join("output", "benchmarks"))
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, runtime_num_threads=args.threads)
    if args.mode in ("precision", "compare"):
        import torch
        torch.set_num_threads(args.threads)
    if args.mode == "predict":
        args.config = args.config or "run_visualglm_tiny_demo.yaml"
        return predict(args)
    args.config = args.config or TINY_CONFIG
    return {"performance": performance, "precision": precision, "compare": compare}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
