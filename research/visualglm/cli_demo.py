"""Multi-turn chat about an image in the terminal, answers streamed as they are generated
(upstream VisualGLM-6B's `cli_demo.py`).

    python -m research.visualglm.cli_demo --config CONFIG [--image_path IMAGE]

Type a question and press enter. `clear` starts over with a new image, `stop` quits.
"""
import argparse
import sys

from research.common.errors import UserInputError
from research.common.image_processing import check_image
from research.common.runtime import StreamPrinter, ask_image, cli_main, read_line
from research.visualglm.inference import add_model_arguments, load_from_arguments


@cli_main
def main(argv=None, stdin=sys.stdin, stdout=sys.stdout):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image_path", default=None, help="first image (asked for otherwise)")
    args = parser.parse_args(argv)
    if args.image_path:
        check_image(args.image_path)  # a typo is reported before the model loads
    chat = load_from_arguments(args)
    settings = chat.generation_config(args.max_new_tokens)
    print(f"device: {chat.device}; {chat.describe_weights()}")
    print("VisualGLM: ask about the image; 'clear' for a new image, 'stop' to quit.")
    image, history = args.image_path, []
    while True:
        if image is None:
            image, history = ask_image(chat.processor.image_processor, stdin), []
            if image is None:
                return history
        query = read_line("用户：", stdin)
        if query is None or query == "stop":
            return history
        if query == "clear":
            image = None
            continue
        print("VisualGLM：", end="", flush=True)
        printer = StreamPrinter(chat.processor.tokenizer, stdout)
        try:
            reply = chat.answer([(image, query)], english=args.english, histories=[history],
                                settings=settings, on_tokens=printer)[0]
        except UserInputError as err:  # e.g. the conversation outgrew seq_length
            print(f"error: {err}; type 'clear' to start over")
            continue
        stdout.write("\n")
        history.append((query, reply.answer))


if __name__ == "__main__":
    main()
