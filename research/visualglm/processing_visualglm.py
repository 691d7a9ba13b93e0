"""VisualGLM chat prompts and response clean-up, as upstream VisualGLM-6B's `chat()` does."""
import re

_CJK = r"[\u4e00-\u9fff]"
_FULL_WIDTH = ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？"))


def chat_prompt(query, history=(), english=False):
    """The text part of a turn: past (question, answer) pairs, then the new question.

    Chinese: "问：{q}\\n答：{a}\\n" per past turn, then "问：{q}\\n答："; English uses Q:/A:.
    """
    question, answer = ("Q:", "A:") if english else ("问：", "答：")
    turns = "".join(f"{question}{q}\n{answer}{a}\n" for q, a in history)
    return f"{turns}{question}{query}\n{answer}"


def postprocess_response(text):
    """Strip, and make half-width punctuation next to a Chinese character full-width."""
    text = text.strip()
    for half, full in _FULL_WIDTH:
        text = re.sub(f"({_CJK}){half}", rf"\g<1>{full}", text)
        text = re.sub(f"{half}({_CJK})", rf"{full}\g<1>", text)
    return text
