"""Answer questions about images with VisualGLM (MindFormers' `run_visualglm.py`).

    python -m research.visualglm.run_visualglm --config CONFIG --image_path IMAGE --prompt "描述这张图片。"

Several images: repeat --image_path/--prompt or give comma-separated lists as MindFormers'
script takes them; `--batch_size N` answers N pairs in one batched forward pass (default 1:
one by one). `--seq_length` is the text length as in MindFormers: the GLM's static length is
seq_length + the 32 image tokens. A bare config name is looked up in configs/visualglm/.
"""
import time

from research.common.runtime import cli_main
from research.visualglm.inference import pairs_and_model_from_arguments, visualglm_parser


@cli_main
def main(argv=None):
    args = visualglm_parser(__doc__).parse_args(argv)
    pairs, chat = pairs_and_model_from_arguments(args)
    print(f"device: {chat.device}; {chat.describe_weights()}")
    start = time.perf_counter()
    replies = chat.answer(pairs, batch_size=args.batch_size, english=args.english,
                          max_new_tokens=args.max_new_tokens)
    seconds = time.perf_counter() - start
    results = [reply.prompt + reply.answer for reply in replies]
    print(results)
    new_tokens = sum(len(reply.token_ids) for reply in replies)
    print(f"generated {new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, "
          f"batch_size={args.batch_size}, use_past={chat.config.text_config.use_past})")
    return results


if __name__ == "__main__":
    main()
