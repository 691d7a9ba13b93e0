"""Prompt styles: VisualGLM's chat() text and answer clean-up, and the base's room for ChatGLM2's
"[Round i]" format."""
import pytest

from research.common.errors import UserInputError
from research.common.prompts import PromptStyle, VisualGLMPrompt


def test_visualglm_prompt_text():
    """upstream model/chat.py: "问：{q}\\n答：{a}\\n" per past turn, then "问：{q}\\n答："."""
    assert VisualGLMPrompt().build_prompt("你好") == "问：你好\n答："
    assert VisualGLMPrompt().build_prompt("它在哪里？", [("图里有什么？", "一只猫。")]) == \
        "问：图里有什么？\n答：一只猫。\n问：它在哪里？\n答："
    assert VisualGLMPrompt(english=True).build_prompt("Where?", [["What?", "A cat."]]) == \
        "Q:What?\nA:A cat.\nQ:Where?\nA:"
    assert VisualGLMPrompt().build_prompt("q", None) == VisualGLMPrompt().build_prompt("q")
    assert VisualGLMPrompt().stop_ids(tokenizer=None) == ()  # eos alone ends a VisualGLM answer


def test_postprocess_and_extract_answer():
    assert VisualGLMPrompt().postprocess(" 训练于[[训练时间]],好! ") == "训练于2023年，好！"
    assert VisualGLMPrompt().extract_answer("问：图里有什么？\n答：一只猫,在公园。") == "一只猫，在公园。"
    assert VisualGLMPrompt().extract_answer("问：q\n答：first\n问：q2\n答： second ") == "second"
    assert VisualGLMPrompt(english=True).extract_answer("Q:What?\nA: A cat.") == "A cat."
    assert VisualGLMPrompt().extract_answer("just an answer") == "just an answer"


@pytest.mark.parametrize("query,history,message", [
    (42, (), "query must be a string"),
    ("q", "not a list", "history must be"),
    ("q", 7, "history must be"),
    ("q", [("only a question",)], "history turn 0"),
    ("q", [("q", "a"), ("q", 3)], "history turn 1"),
])
def test_bad_history_and_query(query, history, message):
    with pytest.raises(UserInputError, match=message):
        VisualGLMPrompt().build_prompt(query, history)


class RoundPrompt(PromptStyle):
    """ChatGLM2-6B's tokenizer.build_prompt shape, written here only to show the base fits it."""

    def build_prompt(self, query, history=()):
        turns = self.checked_turns(query, history)
        text = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(turns, 1))
        return f"{text}[Round {len(turns) + 1}]\n\n问：{query}\n\n答："

    def postprocess(self, answer):
        return answer.strip()

    def extract_answer(self, decoded_text):
        return self.postprocess(decoded_text.split("答：")[-1])


def test_the_base_fits_a_round_style():
    assert RoundPrompt().build_prompt("你好", [("1+1?", "2")]) == \
        "[Round 1]\n\n问：1+1?\n\n答：2\n\n[Round 2]\n\n问：你好\n\n答："
    with pytest.raises(UserInputError, match="history turn 0"):
        RoundPrompt().build_prompt("q", [("q",)])
    assert RoundPrompt().stop_ids(tokenizer=None) == ()
    with pytest.raises(TypeError):
        PromptStyle()  # build_prompt, postprocess and extract_answer are each style's own
