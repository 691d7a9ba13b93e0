"""Answer questions about images with MiniGPT-4 (upstream `Chat.upload_img` / `ask` / `answer`, batched).

    python -m research.minigpt4.run_minigpt4 --config CONFIG --image_path IMAGE --prompt "Describe this image in detail."

Several images: repeat --image_path/--prompt or give comma-separated image paths; `--batch_size N`
answers N pairs in one batched forward pass, each row stopping on its own "###" or eos. Decoding
defaults are upstream's (do_sample True, top_p 0.9, temperature 1.0, max_new_tokens 300); the tiny
YAMLs decode greedily. `--raw_prompt True` takes each --prompt as a whole prompt with <ImageHere>.
A bare config name is looked up in configs/minigpt4/.
"""
import time

from research.common.runtime import cli_main
from research.minigpt4.inference import image_prompt_pairs, load_from_arguments, minigpt4_parser


@cli_main
def main(argv=None):
    args = minigpt4_parser(__doc__).parse_args(argv)
    pairs = image_prompt_pairs(args.image_path, args.prompt)
    chat = load_from_arguments(args, inputs=pairs)
    print(f"device: {chat.device}; {chat.describe_weights()}")
    settings = chat.generation_config(max_new_tokens=args.max_new_tokens)
    start = time.perf_counter()
    replies = chat.answer(pairs, batch_size=args.batch_size, raw=args.raw_prompt, settings=settings)
    seconds = time.perf_counter() - start
    for (image, question), reply in zip(pairs, replies):
        print(f"{image} | {question}\n  -> {reply.answer}")
    new_tokens = sum(len(reply.token_ids) for reply in replies)
    print(f"generated {new_tokens} tokens in {seconds:.2f} s ({new_tokens / seconds:.1f} tokens/s, "
          f"batch_size={args.batch_size}, use_past={chat.config.text_config.use_past})")
    return replies


if __name__ == "__main__":
    main()
