"""What the benchmarks share: the machine's copy bandwidth (for the decode floor), CSV output, and
the comparison of one of our decoders with a transformers causal LM on the same weights
(chatglm2_perf.py, minigpt4_perf.py): their command line, seeded random torch weights, the three
generation cases timed token by token, where the greedy tokens part, the peak RSS, and the table
of the issue's goals.

torch (a test extra) is imported only where a comparison uses it, so visualglm_perf.py's modes
without a torch reference run without it.
"""
import argparse
import csv
import dataclasses
import os
import time
from typing import Callable

import numpy as np

from research.common.atomic import atomic_write
from research.common.generation import GenerationConfig, generate

PAD = 0
FIRST_ORDINARY_ID = 3  # prompts avoid pad 0, bos 1 and eos 2
WEIGHT_SCALE = 0.02
# Two logits this close are a tie up to float32 rounding (the parity tests' tolerance): where
# greedy decoding meets one, either implementation may take either token.
NEAR_TIE = 1e-4
COLUMNS = ("case", "setting", "unit", "ours", "transformers", "ratio", "goal", "met")


def seconds(work):
    """Wall time of one call of `work()`."""
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def copy_bandwidth(gib=1, repeat=5):
    """GB/s of a large float32 copy, counting the bytes read and the bytes written."""
    source = np.ones(gib * 2 ** 28, np.float32)
    target = np.empty_like(source)
    best = min(seconds(lambda: np.copyto(target, source)) for _ in range(repeat))
    return 2 * source.nbytes / best / 1e9


def write_csv(path, rows):
    """Rows (dicts with the same keys) as a CSV with a header, written atomically."""
    if not rows:
        return
    with atomic_write(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# ---- a decoder against transformers: presets, cases and weights ---------------------------------

@dataclasses.dataclass(frozen=True)
class Preset:
    config: Callable[[], object]  # our model's config
    prompt: int  # tokens of each prompt of the decode cases
    long_prompt: int  # tokens of the first-token case
    new_tokens: int  # of the decode cases


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    batch: int
    prompt: int
    new_tokens: int


def decode_cases(preset: Preset, new_tokens, seq_length):
    """Decode at batch 1 and 8 (`new_tokens`, or the preset's), and the first token of the long
    prompt; exits when a case does not fit in `seq_length`."""
    new_tokens = new_tokens or preset.new_tokens
    cases = (Case("decode batch 1", 1, preset.prompt, new_tokens),
             Case("decode batch 8", 8, preset.prompt, new_tokens),
             Case("first token batch 1", 1, preset.long_prompt, 1))
    for case in cases:
        if case.prompt + case.new_tokens > seq_length:
            raise SystemExit(f"{case.name}: a {case.prompt}-token prompt and {case.new_tokens} new tokens "
                             f"exceed the preset's seq_length {seq_length}")
    return cases


def randomised(model, seed, norm_suffixes=("norm.weight",)):
    """`model` (torch) in eval mode with every parameter N(0, WEIGHT_SCALE) but the norm
    weights (names ending in one of `norm_suffixes`, any case), 1 +- 0.2; drawn with a
    generator seeded with `seed`."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            is_norm = name.lower().endswith(norm_suffixes)
            param.copy_(1.0 + 0.2 * noise if is_norm else WEIGHT_SCALE * noise)
    return model.eval()


def weight_bytes_per_token(model, embedding):
    """Every weight is read once per decode step, except the embedding table (one row)."""
    return sum(p.nbytes for p in model.get_parameters()) - embedding.nbytes


def random_prompts(vocab_size, batch, length, seed):
    """`batch` rows of `length` ids drawn from the ordinary ids below `vocab_size`."""
    rng = np.random.RandomState(seed)
    return rng.randint(FIRST_ORDINARY_ID, vocab_size, size=(batch, length)).tolist()


# ---- generating and timing ----------------------------------------------------------------------

def our_generate(model, prompts, new_tokens, on_token):
    settings = GenerationConfig(max_new_tokens=new_tokens, pad_token_id=PAD)
    return generate(model, prompts, settings, on_tokens=on_token)


class _EachToken:
    """A transformers streamer (generate() calls its put and end) that calls `on_token` after
    each new token (generate() first puts the prompt)."""

    def __init__(self, on_token):
        self.on_token, self.prompt_seen = on_token, False

    def put(self, value):
        if self.prompt_seen:
            self.on_token(value.tolist())
        self.prompt_seen = True

    def end(self):
        """Nothing to flush."""


def transformers_generate(model, prompts, new_tokens, on_token):
    import torch

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


def parting_rows(reference, prompts, ours_ids, their_ids):
    """(row, new-token index, gap) of each row where our greedy tokens part from transformers':
    gap is transformers' logit of its token minus its logit of ours at that step (a forward of
    the common prefix), so a float32 near-tie shows as a gap of rounding size."""
    import torch

    partings = []
    for row, (mine, theirs) in enumerate(zip(ours_ids, their_ids)):
        if mine == theirs:
            continue
        step = next(i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b)
        with torch.no_grad():
            logits = reference(torch.tensor([prompts[row] + theirs[:step]])).logits[0, -1]
        partings.append((row, step, float(logits[theirs[step]] - logits[mine[step]])))
    return partings


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


def compare_decoding(args, preset: Preset, config, models, description):
    """Our decoder against transformers' holding the same weights, for run_comparison's `args`,
    the `preset` they chose and its `config` of our model: (the table's rows, whether the greedy
    tokens match in every case). `models(config)` builds (ours, its embedding table, the
    transformers reference); `description` (of `config`) goes into the first line printed.

    Measured on decode_cases' cases with random prompts, ours (our_generate) first, then
    transformers', each after a warm-up of the same shapes (ours compiles its graphs there):
    - decode tokens/s at batch 1 and 8 (short prompts): batch / the mean time of a step after
      the first token;
    - first-token latency of one long prompt (the whole generate() call for one new token);
    - the peak RSS while each side generates, above the RSS before its runs (both models loaded);
    - the decode floor at batch 1: the weight bytes read per token (all but the embedding table)
      over the machine's copy bandwidth, and the fraction of it each side reaches;
    - whether the greedy tokens match in every case: identical, or parting only where
      transformers' logits of the two tokens are a float32 near-tie (random weights make one now
      and then; each parting is printed with its logit gap).
    Prints the preset and the floor first, then each case as it is done."""
    cases = decode_cases(preset, args.new_tokens, config.seq_length)
    bandwidth = copy_bandwidth()
    ours, embedding, reference = models(config)
    print(f"preset {args.preset}: {description}; {args.threads} threads each", flush=True)
    weight_bytes = weight_bytes_per_token(ours, embedding)
    floor = weight_bytes / (bandwidth * 1e9)
    print(f"copy bandwidth {bandwidth:.1f} GB/s (read + write); decode floor at batch 1 "
          f"{floor * 1000:.3g} ms/token ({weight_bytes / 1e6:.3g} MB of weights per token); "
          f"RSS with both models loaded {_status_mb('VmRSS'):.0f} MB", flush=True)

    vocab_size = reference.config.vocab_size  # ours' too
    prompts = [random_prompts(vocab_size, case.batch, case.prompt, seed=n) for n, case in enumerate(cases)]

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
    decode, first = cases[0], cases[2]
    setting = f"prompt {decode.prompt}, {decode.new_tokens} new"
    match = matching == len(cases)
    rows = [
        goal_row("decode batch 1", setting, "tokens/s", 1 / our_step1, 1 / their_step1, ">= 1.0"),
        goal_row("decode batch 8", setting, "tokens/s", 8 / our_step8, 8 / their_step8, ">= 2.0"),
        goal_row("first token batch 1", f"prompt {first.prompt}", "ms", our_first * 1000,
                 their_first * 1000, "<= 1.0"),
        {"case": "decode batch 1 / floor", "unit": "fraction",
         "setting": f"floor {floor * 1000:.3g} ms/token at {bandwidth:.1f} GB/s",
         "ours": floor / our_step1, "transformers": floor / their_step1},
        {"case": "peak RSS while generating", "setting": "above the RSS before the runs", "unit": "MB",
         "ours": our_peak, "transformers": their_peak, "ratio": our_peak / their_peak if their_peak else None},
        {"case": "greedy tokens match", "setting": f"identical but for near-ties (logits within {NEAR_TIE:g})",
         "unit": "cases", "ours": f"{matching} of {len(cases)}", "goal": "all", "met": "yes" if match else "NO"},
    ]
    return rows, match


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


def write_table(rows, output_dir, name):
    """The table as the CSV `name` in `output_dir` (created if need be), then its path printed."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, name)
    write_csv(path, [{k: _format(row.get(k)) for k in COLUMNS} for row in rows])
    print(f"wrote {path}")


def run_comparison(compare, description, presets, argv=None):
    """A comparison's command line (--preset, --new_tokens, --threads, --output_dir) parsed,
    MindSpore (CPU, GRAPH mode) and torch set to --threads threads each; compare(args)'s exit
    status."""
    import mindspore as ms  # here, after research (imported above) has imported MindFormers quietly
    import torch

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(presets), default="medium")
    parser.add_argument("--new_tokens", type=int, default=None,
                        help=f"new tokens of the decode cases (default: the preset's, "
                             f"{presets['medium'].new_tokens} for medium)")
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
