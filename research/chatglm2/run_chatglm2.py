"""Answer prompts with ChatGLM2-6B, one-shot or batched (MindFormers' glm2 inference, upstream's
model.chat).

    python -m research.chatglm2.run_chatglm2 --config run_glm2_tiny.yaml --prompt "你好"
    python -m research.chatglm2.run_chatglm2 --config CONFIG --prompt "你好" --prompt "晚上睡不着应该怎么办" \\
        --batch_size 2 --history_file history.json

Each prompt is one chat turn in upstream's "[Round n]\\n\\n问：...\\n\\n答：" format after its
history (--history_file: a JSON list of [question, answer] pairs for every prompt, or one such
list per prompt); old rounds that do not fit seq_length are dropped, with a note.
`--batch_size N` answers N prompts per forward pass (default: the YAML's model_config.batch_size).
Decoding follows the YAML's fields (max_decode_length, do_sample, top_k, top_p, ...), which the
flags override. A bare config name is looked up in configs/chatglm2/.
"""
import time

from research.chatglm2.inference import (DEFAULT_PROMPT, chatglm2_parser, decoding_overrides, load_from_arguments,
                                         print_replies, read_history_file)
from research.common.runtime import cli_main


@cli_main
def main(argv=None):
    parser = chatglm2_parser(__doc__)
    parser.add_argument("--prompt", action="append", dest="prompts",
                        help=f"a query (default {DEFAULT_PROMPT}); repeat for several")
    parser.add_argument("--history_file", default=None, help="JSON history (see above)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="prompts per forward pass (default: the YAML's model_config.batch_size)")
    args = parser.parse_args(argv)
    prompts = args.prompts or [DEFAULT_PROMPT]
    histories = read_history_file(args.history_file, len(prompts)) if args.history_file else None
    glm = load_from_arguments(args, batch_size=min(args.batch_size or 1, len(prompts)))
    batch_size = args.batch_size or glm.config.batch_size
    print(f"device: {glm.device}; {glm.describe_weights()}")
    settings = glm.generation_config(**decoding_overrides(args))
    start = time.perf_counter()
    replies = glm.batch_chat(prompts, histories, batch_size=batch_size, settings=settings)
    seconds = time.perf_counter() - start
    print_replies(glm, prompts, replies, seconds, batch_size, settings.use_past)
    return [reply.response for reply in replies]


if __name__ == "__main__":
    main()
