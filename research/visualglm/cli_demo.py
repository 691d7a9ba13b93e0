"""Multi-turn chat about an image in the terminal, answers streamed as they are generated
(upstream VisualGLM-6B's `cli_demo.py`).

    python -m research.visualglm.cli_demo --config CONFIG [--image_path IMAGE]

Type a question and press enter. `clear` starts over with a new image, `stop` quits.
"""
import argparse
import sys

from research.common.errors import UserInputError
from research.common.runtime import cli_main
from research.visualglm.processing_visualglm import postprocess_response
from research.visualglm.run_visualglm import (add_model_arguments, build_visualglm,
                                              describe_weights, generation_settings)


class StreamPrinter:
    """Prints the decoded answer as it grows (decoding the whole answer each step, since a
    sentencepiece piece may only become printable together with the next one)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids, self.shown = [], ""

    def __call__(self, new_tokens):
        if new_tokens[0] is None:
            return
        self.ids.append(new_tokens[0])
        text = self.tokenizer.decode(self.ids)
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text


def read_line(prompt, stdin):
    print(prompt, end="", flush=True)
    line = stdin.readline()
    return None if line == "" else line.strip()


@cli_main
def main(argv=None, stdin=sys.stdin, stdout=sys.stdout):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    parser.add_argument("--image_path", default=None, help="first image (asked for otherwise)")
    args = parser.parse_args(argv)
    config, model, processor, loaded, device = build_visualglm(args)
    settings = generation_settings(config, processor.tokenizer, args.max_new_tokens)
    print(f"device: {device}; {describe_weights(loaded)}")
    print("VisualGLM: ask about the image; 'clear' for a new image, 'stop' to quit.")
    image, history = args.image_path, []
    while True:
        if image is None:
            image = read_line("image path: ", stdin)
            if image is None or image == "stop":
                return history
            history = []
            try:
                pixels = processor.image_processor(image)
            except UserInputError as err:
                print(f"error: {err}")
                image = None
                continue
        elif not history:
            pixels = processor.image_processor(image)
        query = read_line("用户：", stdin)
        if query is None or query == "stop":
            return history
        if query == "clear":
            image = None
            continue
        ids, pre_image = processor.encode_prompt(query, history, english=args.english)
        if len(ids) >= config.text_config.seq_length:
            print(f"error: the conversation has {len(ids)} tokens, more than seq_length "
                  f"{config.text_config.seq_length}; type 'clear' to start over")
            continue
        print("VisualGLM：", end="", flush=True)
        printer = StreamPrinter(processor.tokenizer, stdout)
        outputs = model.generate([ids], [pre_image], pixels, settings, on_tokens=printer)
        reply = postprocess_response(processor.tokenizer.decode(outputs[0]))
        stdout.write("\n")
        history.append((query, reply))


if __name__ == "__main__":
    main()
