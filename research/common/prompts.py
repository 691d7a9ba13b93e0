"""Chat prompt styles: how a model's chat turns become prompt text, which ids end its answers,
and how a decoded answer is cleaned up (after litgpt's prompts.py).

One small class per model family: VisualGLM-6B's and ChatGLM2-6B's are here; MiniGPT-4's
("###Human: <Img><ImageHere></Img> {q}###Assistant:", with "###" as a stop sequence) subclasses
the same base. Image placeholders that are not text of the prompt (VisualGLM's "<img></img>"
and its id layout) belong to the model's processor, not here.
"""
import abc
import re

from research.common.errors import UserInputError

_CJK = r"[\u4e00-\u9fff]"
_FULL_WIDTH = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


class PromptStyle(abc.ABC):
    """A model's chat format: prompt text from a query and its history, and answers back."""

    @abc.abstractmethod
    def build_prompt(self, query, history=()):
        """The prompt text: past (question, answer) turns, then `query`."""

    def stop_ids(self, tokenizer):
        """Id sequences that end an answer besides the tokenizer's eos (MiniGPT-4 stops at "###",
        which has two encodings); none by default."""
        del tokenizer
        return ()

    @abc.abstractmethod
    def postprocess(self, answer):
        """A decoded answer as the user should see it (upstream's process_response)."""

    @abc.abstractmethod
    def extract_answer(self, decoded_text):
        """The answer in a decoded prompt + answer, post-processed."""

    @staticmethod
    def checked_turns(query, history):
        """`history` as a list of (question, answer) string pairs after checking `query` is a
        string; anything else is a user error."""
        if not isinstance(query, str):
            raise UserInputError(f"the query must be a string, got {type(query).__name__}")
        if history is None:
            return []
        if isinstance(history, (str, bytes)) or not hasattr(history, "__iter__"):
            raise UserInputError(f"history must be a list of (question, answer) pairs, got {type(history).__name__}")
        turns = []
        for index, turn in enumerate(history):
            if (not isinstance(turn, (list, tuple)) or len(turn) != 2
                    or not all(isinstance(part, str) for part in turn)):
                raise UserInputError(f"history turn {index} must be a (question, answer) pair of strings, "
                                     f"got {turn!r}")
            turns.append((turn[0], turn[1]))
        return turns


def chatglm_postprocess(answer):
    """Upstream ChatGLM's process_response: strip, and "[[训练时间]]" -> "2023年"."""
    return answer.strip().replace("[[训练时间]]", "2023年")


class VisualGLMPrompt(PromptStyle):
    """VisualGLM-6B's chat() turns (upstream model/chat.py), Chinese or English.

    Chinese: "问：{q}\\n答：{a}\\n" per past turn, then "问：{q}\\n答："; English uses Q:/A:.
    Answers: strip, "[[训练时间]]" -> "2023年", half-width punctuation next to a Chinese
    character made full-width; the answer in a decoded prompt is the text after the last
    "答：" ("A:").
    """

    def __init__(self, english=False):
        self.question, self.answer = ("Q:", "A:") if english else ("问：", "答：")

    def build_prompt(self, query, history=()):
        turns = "".join(f"{self.question}{q}\n{self.answer}{a}\n" for q, a in self.checked_turns(query, history))
        return f"{turns}{self.question}{query}\n{self.answer}"

    def postprocess(self, answer):
        answer = chatglm_postprocess(answer)
        for half, full in _FULL_WIDTH:
            answer = re.sub(f"({_CJK}){half}", rf"\g<1>{full}", answer)
            answer = re.sub(f"{half}({_CJK})", rf"{full}\g<1>", answer)
        return answer

    def extract_answer(self, decoded_text):
        """Text without the separator (a decoded answer alone) comes back post-processed."""
        return self.postprocess(decoded_text).split(self.answer)[-1].strip()


class ChatGLM2Prompt(PromptStyle):
    """ChatGLM2-6B's build_prompt (HF tokenization_chatglm.py): "[Round i]\\n\\n问：{q}\\n\\n答：{a}\\n\\n"
    per past turn (i from 1), then "[Round n]\\n\\n问：{q}\\n\\n答："; answers as upstream's
    process_response (strip, "[[训练时间]]" -> "2023年")."""

    def build_prompt(self, query, history=()):
        turns = self.checked_turns(query, history)
        past = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(turns, 1))
        return f"{past}[Round {len(turns) + 1}]\n\n问：{query}\n\n答："

    def next_round(self, query, round_number):
        """The text that continues a conversation whose prompt and answers are already encoded
        (upstream stream_chat with past_key_values): "\\n\\n[Round n]\\n\\n问：{q}\\n\\n答："."""
        self.checked_turns(query, ())
        return f"\n\n[Round {round_number}]\n\n问：{query}\n\n答："

    def postprocess(self, answer):
        return chatglm_postprocess(answer)

    def extract_answer(self, decoded_text):
        return self.postprocess(decoded_text.split("答：")[-1])
