"""Tokens/s of the exported MindIR graphs (run_visualglm_infer_lite.py) against the MindSpore
model (run_visualglm.py) on the same VisualGLM preset, weights and inputs.

    python benchmarks/visualglm_lite.py --config run_visualglm_tiny_image_to_text_generation.yaml \\
        --batch_sizes 1 2 --new_tokens 48

Builds the model from the YAML (its checkpoints, or random weights), exports its graphs into a
temporary folder, then times image encoder + prefill + decode of `--new_tokens` tokens per row
(eos ignored so every run decodes the same count) for both runners, with the KV cache (the
incremental graph) and without (the full graph per token). Prints a CSV row per case:
first_token_ms (image encoder + prefill + first token), decode tokens/s, end-to-end tokens/s,
and whether the runners chose the same tokens. Not a test; the runtime on a CPU is
`mindspore.load` + `nn.GraphCell` unless mindspore_lite is installed.
"""
import argparse
import csv
import os
import sys
import tempfile
import time

# This checkout's `research` package, whatever the environment has installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from research.common.config import REPO_ROOT
from research.common.convert import save_checkpoint_atomic
from research.visualglm.convert_visualglm import LITE_CHECKPOINT, LITE_PARAMETER
from research.visualglm.inference import load_visualglm
from research.visualglm.lite_visualglm import export_visualglm_graphs, load_lite_visualglm

EXAMPLE = os.path.join(REPO_ROOT, "examples", "visualglm", "shapes.png")
EXAMPLE_PAIRS = ((EXAMPLE, "描述这张图片。"), (EXAMPLE, "图片里有几个形状？"))


def timed(generate, settings, new_tokens, repeat):
    """(first-token seconds, seconds for new_tokens, outputs): best of `repeat` runs each."""
    settings.max_new_tokens = 1
    first = min(_seconds(generate, settings)[0] for _ in range(repeat))
    settings.max_new_tokens = new_tokens
    runs = [_seconds(generate, settings) for _ in range(repeat)]
    return first, min(seconds for seconds, _ in runs), runs[0][1]


def _seconds(generate, settings):
    start = time.perf_counter()
    outputs = generate(settings)
    return time.perf_counter() - start, outputs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="run_visualglm_tiny_image_to_text_generation.yaml")
    parser.add_argument("--seq_length", type=int, default=96, help="text tokens (GLM length + 32)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--new_tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs")
    args = parser.parse_args()
    chat = load_visualglm(args.config, seq_length=args.seq_length, use_past=True)
    config, model, processor = chat.config, chat.model, chat.processor
    print(f"# device {chat.device}; {chat.describe_weights()}; seq_length {args.seq_length} "
          f"(GLM {config.text_config.seq_length}); {args.new_tokens} new tokens per row, greedy",
          file=sys.stderr)
    writer = csv.writer(sys.stdout)
    writer.writerow(["runner", "batch", "use_past", "first_token_ms", "decode_tokens_per_s",
                     "end_to_end_tokens_per_s", "new_tokens", "same_tokens"])
    with tempfile.TemporaryDirectory() as folder:
        lite_checkpoint = os.path.join(folder, LITE_CHECKPOINT)
        save_checkpoint_atomic({LITE_PARAMETER: model.llm_model.transformer.word_embeddings
                                .embedding_table.asnumpy()}, lite_checkpoint)
        for batch in args.batch_sizes:
            graphs = export_visualglm_graphs(chat, folder, batch, use_past=True)
            pairs = [EXAMPLE_PAIRS[i % len(EXAMPLE_PAIRS)] for i in range(batch)]
            inputs = processor([p[0] for p in pairs], [p[1] for p in pairs])
            room = config.text_config.seq_length - max(len(ids) for ids in inputs["input_ids"])
            if room < args.new_tokens:
                print(f"# batch {batch}: only {room} new tokens fit after the prompt in "
                      f"GLM length {config.text_config.seq_length}; raise --seq_length", file=sys.stderr)
            lite_model = load_lite_visualglm(args.config, graphs["full"], inc_model_path=graphs["inc"],
                                             lite_checkpoint=lite_checkpoint)
            lite_settings = lite_model.generation_config()
            print(f"# batch {batch}: {lite_model.runtime_line}", file=sys.stderr)
            settings = chat.generation_config()
            for runner_settings in (settings, lite_settings):
                runner_settings.eos_token_id = None  # decode exactly new_tokens per row
            reference = None
            for use_past in (True, False):
                runners = (
                    ("mindspore_model", settings, lambda s: model.generate(
                        inputs["input_ids"], inputs["pre_image_lengths"], inputs["pixel_values"], s)),
                    ("mindir_graphs", lite_settings, lambda s: lite_model.generate(
                        inputs["input_ids"], inputs["pre_image_lengths"], inputs["pixel_values"], s)))
                for name, runner_settings, generate in runners:
                    runner_settings.use_past = use_past
                    runner_settings.max_new_tokens = 2
                    generate(runner_settings)  # compile / warm up
                    first, total, outputs = timed(generate, runner_settings, args.new_tokens, args.repeat)
                    reference = reference or outputs
                    tokens = sum(len(ids) for ids in outputs)
                    decode_rate = (tokens - batch) / max(total - first, 1e-9)
                    writer.writerow([name, batch, use_past, f"{first * 1000:.1f}", f"{decode_rate:.1f}",
                                     f"{tokens / total:.1f}", tokens // batch, outputs == reference])


if __name__ == "__main__":
    main()
