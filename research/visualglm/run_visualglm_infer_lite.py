"""Answer questions about images with the MindIR graphs of export_lite_model.py (seed 001,
"lite推理").

    python -m research.visualglm.run_visualglm_infer_lite --config CONFIG \\
        --full_model_path output/mindir_full_checkpoint_bs_1_512/rank_0_graph.mindir \\
        --inc_model_path output/mindir_inc_checkpoint_bs_1_512/rank_0_graph.mindir \\
        --seq_length 512 --ge_config research/visualglm/context.cfg --device_id 0 \\
        --image_path IMAGE --prompt "描述这张图片。"

How it runs: the image encoder graph turns the images into 32 embeddings each; the prompt's
token embeddings are a numpy gather from `glm_6b_for_lite.ckpt`; the image embeddings replace
the 32 placeholders after `<img>`; the full graph runs once over the padded sequence and the
incremental graph once per new token with the KV cache, driven by the generation loop
run_visualglm.py uses (research.common.generation.generate: same limits, stops and sampling).
Without --inc_model_path (or with --use_past False) every new token re-runs the full graph:
slower, same tokens.

Runtime: MindSpore Lite when `mindspore_lite` imports (Ascend hosts), each file built with the
GE options of --ge_config (seed 001's context.cfg); otherwise `mindspore.load` + `nn.GraphCell`
run the same files. The output says which one ran.

Output: the list of "<img></img>问：...\n答：answer" strings run_visualglm.py prints, then the
generate time (prefill + decode; image encoder apart) and tokens/s; --generate_repeat_time N
answers N times (upstream's flag), the first run including the graphs' compilation.

Batch size and sequence length are those the graphs were exported with, read from the files;
--batch_size / --seq_length (text length; the GLM length is this + 32) are checked against
them. --config supplies the tokenizer, image processor, special ids and sampling defaults,
and the location of glm_6b_for_lite.ckpt: `text_config.checkpoint_name_or_path` itself when
it names that file (seed 001), else beside it (where convert_weight.py writes it);
--lite_checkpoint overrides both.
"""
import argparse
import time

from research.common.errors import UserInputError
from research.common.lite.graphs import describe
from research.common.lite.runtime import RUNTIMES
from research.common.runtime import cli_main, str2bool
from research.visualglm.convert_visualglm import LITE_CHECKPOINT
from research.visualglm.inference import DEFAULT_CONFIG, DEFAULT_IMAGE, DEFAULT_PROMPT, image_prompt_pairs
from research.visualglm.lite_visualglm import DEFAULT_GE_CONFIG, GRAPH_NAMES, load_lite_visualglm


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full_model_path", default=None, help="full (prefill) graph .mindir")
    parser.add_argument("--inc_model_path", default=None,
                        help="incremental graph .mindir (without it the full graph re-runs per token)")
    parser.add_argument("--image_encoder_path", default=None,
                        help="image encoder .mindir (default: mindir_image_encoder_bs_B/ beside the "
                             "full graph's folder)")
    parser.add_argument("--lite_checkpoint", default=None,
                        help=f"{LITE_CHECKPOINT} (default: beside the YAML's GLM checkpoint)")
    parser.add_argument("--config", "--config_path", dest="config", default=DEFAULT_CONFIG,
                        help="YAML path or a name in configs/visualglm/ (tokenizer, processor, ids, "
                             "sampling)")
    parser.add_argument("--ge_config", default=None,
                        help=f"MindSpore Lite GE options (default {DEFAULT_GE_CONFIG})")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="auto: MindSpore Lite if it imports, else mindspore.load + GraphCell")
    parser.add_argument("--device_id", type=int, default=0)
    parser.add_argument("--seq_length", type=int, default=None,
                        help="text tokens the graphs were exported with (checked; default: theirs)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="batch size the graphs were exported with (checked; default: theirs)")
    parser.add_argument("--use_past", type=str2bool, default=None,
                        help="False: ignore --inc_model_path and re-run the full graph per token")
    parser.add_argument("--image_path", action="append", default=None,
                        help=f"image file (default {DEFAULT_IMAGE}); repeat or comma-separate for several")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f"question (default {DEFAULT_PROMPT}); one per image")
    parser.add_argument("--do_sample", type=str2bool, default=None, help="sample (overrides YAML)")
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--max_new_tokens", type=int, default=None)
    parser.add_argument("--english", type=str2bool, default=False, help="Q:/A: prompt format")
    parser.add_argument("--generate_repeat_time", type=int, default=1,
                        help="answer everything this many times (the first run compiles the graphs)")
    return parser


def describe_speed(timings, seconds, tokens):
    generate = timings["prefill_s"] + timings["decode_s"]
    return (f"generate time {generate:.3f} s (prefill {timings['prefill_s']:.3f} s + decode "
            f"{timings['decode_s']:.3f} s; image encoder {timings['image_s']:.3f} s), {tokens} new tokens, "
            f"{tokens / max(generate, 1e-9):.1f} tokens/s; end to end {seconds:.2f} s "
            f"({tokens / max(seconds, 1e-9):.1f} tokens/s)")


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.generate_repeat_time <= 0:
        raise UserInputError(f"--generate_repeat_time must be positive, got {args.generate_repeat_time}")
    pairs = image_prompt_pairs(args.image_path, args.prompt)
    model = load_lite_visualglm(
        args.config, args.full_model_path, inc_model_path=args.inc_model_path,
        image_encoder_path=args.image_encoder_path, lite_checkpoint=args.lite_checkpoint,
        ge_config=args.ge_config, runtime=args.runtime, device_id=args.device_id,
        seq_length=args.seq_length, batch_size=args.batch_size, use_past=args.use_past,
        do_sample=args.do_sample, top_k=args.top_k, top_p=args.top_p)
    print(model.runtime_line)
    print(f"graphs: batch_size {model.batch_size}, seq_length {model.seq_length - model.config.image_length} "
          f"(GLM length {model.seq_length})")
    for graph in model.graphs.values():
        print(f"    {GRAPH_NAMES[graph.kind]}: {graph.path}\n        inputs: "
              f"{describe(graph.inputs.values())}")
    if not model.use_past:
        why = "--use_past False" if args.inc_model_path else "no --inc_model_path"
        print(f"{why}: the full graph re-runs for every new token (slower; the same tokens)")
    for repeat in range(args.generate_repeat_time):
        timings = {"image_s": 0.0, "prefill_s": 0.0, "decode_s": 0.0}
        start = time.perf_counter()
        replies = model.answer(pairs, english=args.english, max_new_tokens=args.max_new_tokens,
                               timings=timings)
        seconds = time.perf_counter() - start
        results = [reply.prompt + reply.answer for reply in replies]
        first = " (includes compiling the graphs)" if repeat == 0 else ""
        if repeat == args.generate_repeat_time - 1:
            print(results)
        tokens = sum(len(reply.token_ids) for reply in replies)
        print(f"run {repeat + 1}/{args.generate_repeat_time}{first}: {describe_speed(timings, seconds, tokens)}; "
              f"batch_size={model.batch_size}, use_past={model.use_past}")
    return results


if __name__ == "__main__":
    main()
