"""Answer prompts with the MindIR graphs of export_lite_model.py (MindFormers' glm2 "lite推理"):
the same answers as run_chatglm2.py --use_past True.

    python -m research.chatglm2.run_chatglm2_infer_lite --config CONFIG \\
        --full_model_path output/mindir_full_checkpoint_bs_1_512/rank_0_graph.mindir \\
        --inc_model_path output/mindir_inc_checkpoint_bs_1_512/rank_0_graph.mindir \\
        --seq_length 512 --device_id 0 --prompt "你好"

How it runs: the model behind research.chatglm2.inference.ChatGLM2Chat is the graphs
(research.common.lite.runtime.GraphCausalLM): the prompt's token embeddings are a numpy gather
from `glm2_6b_for_lite.ckpt` (by default the one the export wrote beside the full graph), the
full graph runs once over the padded prompt and the incremental graph once per new token with
the KV cache. Prompts, history, decoding (the YAML's fields and the flags), stops and
post-processing are run_chatglm2.py's code, so the flags mean what they mean there. Without
--inc_model_path (or with --use_past False) every new token re-runs the full graph: slower,
same tokens.

Runtime: MindSpore Lite when `mindspore_lite` imports (Ascend hosts), each file built with the
GE options of --ge_config (default research/common/lite/context.cfg); otherwise
`mindspore.load` + `nn.GraphCell` run the same files. The output says which one ran.

Batch size and seq_length are those the graphs were exported with, read from the files;
--batch_size / --seq_length are checked against them. Fewer prompts than the batch size run
with the last one repeated. --config supplies the tokenizer, special ids and decoding defaults
(its model must be the one exported).
"""
import time

from research.chatglm2.inference import (DEFAULT_PROMPT, chatglm2_parser, decoding_overrides, print_replies,
                                         read_history_file)
from research.chatglm2.lite_chatglm2 import DEFAULT_GE_CONFIG, GRAPH_NAMES, LITE_CHECKPOINT, load_lite_chatglm2
from research.common.errors import UserInputError
from research.common.lite.graphs import describe
from research.common.lite.runtime import RUNTIMES
from research.common.runtime import cli_main


def build_parser():
    parser = chatglm2_parser(__doc__)
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help=f"a query (default {DEFAULT_PROMPT}); repeat for several")
    parser.add_argument("--history_file", default=None,
                        help="JSON history: a list of [question, answer] pairs for every prompt, or one "
                             "such list per prompt")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="batch size the graphs were exported with (checked; default: theirs)")
    parser.add_argument("--full_model_path", default=None, help="full (prefill) graph .mindir")
    parser.add_argument("--inc_model_path", default=None,
                        help="incremental graph .mindir (without it the full graph re-runs per token)")
    parser.add_argument("--lite_checkpoint", default=None,
                        help=f"{LITE_CHECKPOINT} (default: the one beside the full graph)")
    parser.add_argument("--ge_config", default=None,
                        help=f"MindSpore Lite GE options (default {DEFAULT_GE_CONFIG})")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="auto: MindSpore Lite if it imports, else mindspore.load + GraphCell")
    return parser


def load_from_arguments(args, load=True):
    """load_lite_chatglm2 with the flags of build_parser."""
    if args.checkpoint:
        raise UserInputError(f"--checkpoint {args.checkpoint}: the weights are those the graphs were exported "
                             f"with (export_lite_model.py --checkpoint); leave it out here")
    return load_lite_chatglm2(
        args.config, args.full_model_path, inc_model_path=args.inc_model_path,
        lite_checkpoint=args.lite_checkpoint, ge_config=args.ge_config, runtime=args.runtime,
        device_id=args.device_id, seq_length=args.seq_length, batch_size=args.batch_size,
        use_past=args.use_past, load=load)


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    prompts = args.prompts or [DEFAULT_PROMPT]
    histories = read_history_file(args.history_file, len(prompts)) if args.history_file else None
    glm = load_from_arguments(args, load=False)
    settings = glm.generation_config(**decoding_overrides(args))
    settings.validate()
    for prompt, history in zip(prompts, histories or [None] * len(prompts)):
        glm.fit_prompt(prompt, history, settings)  # a prompt that cannot fit fails before the graphs load
    glm.load_graphs()
    print(f"device: {glm.device}; {glm.describe_weights()}")
    print(glm.runtime_line)
    print(f"graphs: batch_size {glm.batch_size}, seq_length {glm.config.seq_length}")
    for graph in glm.graphs.values():
        print(f"    {GRAPH_NAMES[graph.kind]}: {graph.path}\n        inputs: {describe(graph.inputs.values())}")
    if not glm.use_past:
        why = "--use_past False" if args.inc_model_path else "no --inc_model_path"
        print(f"{why}: the full graph re-runs for every new token (slower; the same tokens)")
    start = time.perf_counter()
    replies = glm.batch_chat(prompts, histories, batch_size=glm.batch_size, settings=settings)
    seconds = time.perf_counter() - start
    print_replies(glm, prompts, replies, seconds, glm.batch_size, settings.use_past,
                  "; the first batch includes compiling the graphs")
    return [reply.response for reply in replies]


if __name__ == "__main__":
    main()
