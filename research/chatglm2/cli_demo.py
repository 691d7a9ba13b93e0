"""Multi-turn chat with ChatGLM2-6B in the terminal, answers streamed as they are generated
(upstream THUDM/ChatGLM2-6B's `cli_demo.py`).

    python -m research.chatglm2.cli_demo --config CONFIG

Type a message and press enter. `clear` forgets the conversation, `stop` quits, Ctrl-C while an
answer streams stops that answer (the part shown stays in the conversation). Each turn encodes
only its own round and continues on the KV cache of the previous ones, as upstream's
stream_chat does; when the conversation outgrows seq_length the oldest rounds are dropped
(with a note). Decoding defaults are upstream chat()'s (do_sample True, top_p 0.8,
temperature 0.8, max_length 8192 capped by seq_length); the flags override them.
"""
import sys
import warnings

from research.chatglm2.inference import HistoryTruncatedWarning, chatglm2_parser, decoding_overrides, load_from_arguments
from research.common.errors import UserInputError
from research.common.runtime import cli_main, read_line

WELCOME = "欢迎使用 ChatGLM2-6B 模型，输入内容即可进行对话，clear 清空对话历史，stop 终止程序"


def stream_answer(glm, query, history, past, settings, stdout):
    """Print one streamed answer; returns (history, past) after it. Ctrl-C ends the answer early,
    keeping what was shown (nothing, if it came before the first piece)."""
    shown = ""
    stdout.write("\nChatGLM：")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", HistoryTruncatedWarning)
        try:
            for response, history, past in glm.stream_chat(query, history, past=past, return_past=True, **settings):
                stdout.write(response[len(shown):] if response.startswith(shown) else "\n" + response)
                stdout.flush()
                shown = response
        except KeyboardInterrupt:  # history and past are those of the last piece shown
            stdout.write(" [stopped]")
    stdout.write("\n")
    for warning in caught:
        print(f"note: {warning.message}", file=sys.stderr)
    return history, past


@cli_main
def main(argv=None, stdin=sys.stdin, stdout=sys.stdout):
    args = chatglm2_parser(__doc__).parse_args(argv)
    glm = load_from_arguments(args)
    settings = decoding_overrides(args)
    print(f"device: {glm.device}; {glm.describe_weights()}")
    print(WELCOME)
    history, past = [], None
    while True:
        query = read_line("\n用户：", stdin)
        if query is None or query == "stop":
            return history
        if query == "clear":
            history, past = [], None
            print(WELCOME)
            continue
        if not query:
            continue
        try:
            history, past = stream_answer(glm, query, history, past, settings, stdout)
        except UserInputError as err:  # e.g. one message longer than seq_length
            print(f"error: {err}")


if __name__ == "__main__":
    main()
