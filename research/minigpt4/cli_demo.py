"""Chat about an image in the terminal, answers streamed as they are generated (upstream
MiniGPT-4's `demo.py`: upload an image, ask, the model answers, multi-turn, restart).

    python -m research.minigpt4.cli_demo --config CONFIG [--image_path IMAGE]

Give an image path, then type questions. `reset` forgets the conversation and asks for a new image,
`stop` quits. Every turn re-reads the whole conversation with the image, as upstream does; when it
outgrows the length, the oldest turns after the image turn are left out (with a note). Decoding
defaults are upstream's (do_sample, top_p 0.9, temperature 1.0, max_new_tokens 300).
"""
import argparse
import sys

from research.common.errors import UserInputError
from research.common.image_processing import check_image
from research.common.runtime import StreamPrinter, ask_image, cli_main, read_line
from research.minigpt4.conversation_minigpt4 import SEP
from research.minigpt4.inference import add_model_arguments, load_from_arguments

WELCOME = "MiniGPT-4: ask about the image; 'reset' for a new image and conversation, 'stop' to quit."


def answer_text(text):
    """What the terminal shows of a growing answer: the text before "###", without a trailing
    "#" that may be the start of it."""
    return text.split(SEP)[0].rstrip("#").lstrip()


@cli_main
def main(argv=None, stdin=sys.stdin, stdout=sys.stdout):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image_path", default=None, help="first image (asked for otherwise)")
    args = parser.parse_args(argv)
    if args.image_path:
        check_image(args.image_path)  # a typo is reported before the model loads
    chat = load_from_arguments(args)
    settings = chat.generation_config(max_new_tokens=args.max_new_tokens)
    print(f"device: {chat.device}; {chat.describe_weights()}")
    print(WELCOME)
    image, history = args.image_path, []
    while True:
        if image is None:
            image, history = ask_image(chat.processor.image_processor, stdin), []
            if image is None:
                return history
        query = read_line("Human: ", stdin)
        if query is None or query == "stop":
            return history
        if query == "reset":
            image = None
            continue
        if not query:
            continue
        stdout.write("MiniGPT-4: ")
        printer = StreamPrinter(chat.processor.tokenizer, stdout, answer_text)
        try:
            reply = chat.answer([(image, query)], histories=[history], settings=settings, on_tokens=printer)[0]
        except UserInputError as err:  # e.g. one question longer than the model's length
            print(f"error: {err}; type 'reset' to start over")
            continue
        stdout.write("\n")
        if reply.dropped_turns:
            print(f"note: left out the {reply.dropped_turns} oldest turn(s) after the image to fit the length",
                  file=sys.stderr)
        history = reply.history


if __name__ == "__main__":
    main()
