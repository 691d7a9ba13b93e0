"""VisualGLM's processor: upstream chat()'s prompt text and id layout around the shared image
processor, tokenizer and prompt style, and the YAML processor section."""
import os

import numpy as np
import pytest
from PIL import Image
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.common.errors import UserInputError
from research.common.image_processing import BlipImageProcessor
from research.common.prompts import VisualGLMPrompt
from research.visualglm.processing_visualglm import VisualGLMProcessor, build_processor
from research.visualglm.tokenization_chatglm import ChatGLMTokenizer
from tests.common.test_image_processing import gradient_rgb

GMASK, SOP, PAD = 5, 8, 3


@pytest.fixture(scope="module")
def tok(tiny_ice_text_model):
    return ChatGLMTokenizer(tiny_ice_text_model, max_length=128)


@pytest.fixture(scope="module")
def proc(tok):
    return VisualGLMProcessor(BlipImageProcessor(56), tok, image_length=32)


# ---- prompt text -----------------------------------------------------------------------------

def test_build_prompt_text(proc):
    assert proc.build_prompt("描述这张图片。") == "<img></img>问：描述这张图片。\n答："
    history = [("图里有什么？", "一只猫。")]
    assert proc.build_prompt("它在哪里？", history) == "<img></img>问：图里有什么？\n答：一只猫。\n问：它在哪里？\n答："
    assert proc.build_prompt("Where?", [("What?", "A cat.")], english=True) == \
        "<img></img>Q:What?\nA:A cat.\nQ:Where?\nA:"
    assert proc.build_prompt("你好", with_image=False) == VisualGLMPrompt().build_prompt("你好") == "问：你好\n答："


def test_bad_history_and_query(proc):
    with pytest.raises(UserInputError, match="history turn 0"):
        proc.build_prompt("q", [("only a question",)])
    with pytest.raises(UserInputError, match="history must be"):
        proc.build_prompt("q", "not a list")
    with pytest.raises(UserInputError, match="query must be a string"):
        proc.build_prompt(42)


# ---- prompt ids ------------------------------------------------------------------------------

def test_image_prompt_id_layout(proc, tok):
    ids, pre_image = proc.encode_prompt("描述这张图片。")
    head = tok.encode("<img>", add_special_tokens=False)
    tail = tok.encode("</img>问：描述这张图片。\n答：", add_special_tokens=False)
    assert ids == head + [PAD] * 32 + tail + [GMASK, SOP]
    assert pre_image == len(head) > 0
    assert ids[pre_image:pre_image + 32] == [PAD] * 32 and ids[pre_image - 1] != PAD
    assert ids[pre_image + 32] != PAD
    assert tok.decode(ids[:pre_image]) == "<img>"
    assert tok.decode(ids[pre_image + 32:]) == "</img>问：描述这张图片。\n答："


def test_image_length_sets_the_placeholder_count(tok):
    ids, pre_image = VisualGLMProcessor(BlipImageProcessor(56), tok, image_length=5).encode_prompt("q")
    assert ids[pre_image:pre_image + 6].count(PAD) == 5 and ids[pre_image + 5] != PAD
    with pytest.raises(UserInputError, match="image_length"):
        VisualGLMProcessor(BlipImageProcessor(56), tok, image_length=0)


def test_history_and_english_ids(proc, tok):
    history = [("图里有什么？", "一只猫。")]
    ids, pre_image = proc.encode_prompt("它在哪里？", history)
    assert tok.decode(ids[pre_image + 32:]) == "</img>问：图里有什么？\n答：一只猫。\n问：它在哪里？\n答："
    english, english_pre = proc.encode_prompt("Where?", [("What?", "A cat.")], english=True)
    assert english[-2:] == [GMASK, SOP] and english_pre == pre_image
    assert tok.decode(english[english_pre + 32:]) == "</img>Q:What?\nA:A cat.\nQ:Where?\nA:"


def test_no_image_prompt(proc, tok):
    ids, pre_image = proc.encode_prompt("你好", with_image=False)
    assert pre_image == 0
    assert ids == tok.encode("问：你好\n答：") and ids[-2:] == [GMASK, SOP]
    assert PAD not in ids
    out = proc(None, "你好")
    assert out["pixel_values"] is None and out["input_ids"] == [ids] and out["pre_image_lengths"] == [0]
    assert out["prompts"] == ["问：你好\n答："]


def test_too_long_prompt_says_how_long(proc):
    ids, _ = proc.encode_prompt("描述这张图片。")
    n = len(ids)
    assert proc.encode_prompt("描述这张图片。", max_length=n + 1)[0] == ids
    with pytest.raises(UserInputError, match=rf"has {n} tokens.*32 of them the image.*max_length {n}"):
        proc.encode_prompt("描述这张图片。", max_length=n)
    long_question = "很长的问题" * 60
    with pytest.raises(UserInputError, match=r"prompt 1 has \d+ tokens.*max_length 128"):
        proc(None, ["短", long_question], max_length=128)
    # Without max_length nothing is checked, not even the tokenizer's own max_length (128).
    assert len(proc(None, long_question)["input_ids"][0]) > 128
    with pytest.raises(UserInputError, match="max_length 50"):
        proc(gradient_rgb(), "描述这张图片。", max_length=50)


def test_batch_of_two_images_and_queries(proc, tmp_path):
    path = tmp_path / "a.png"
    gradient_rgb(70, 50).save(path)
    second = gradient_rgb(90, 30).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    out = proc([str(path), second], ["描述这张图片。", "Describe it."], english=False,
               histories=[[], [("图里有什么？", "一只猫。")]])
    assert out["pixel_values"].shape == (2, 3, 56, 56) and out["pixel_values"].dtype == np.float32
    np.testing.assert_array_equal(out["pixel_values"][1], BlipImageProcessor(56)(second)[0])
    assert out["input_ids"][0] == proc.encode_prompt("描述这张图片。")[0]
    assert out["input_ids"][1] == proc.encode_prompt("Describe it.", [("图里有什么？", "一只猫。")])[0]
    assert len(out["input_ids"][0]) != len(out["input_ids"][1])  # unpadded
    assert out["pre_image_lengths"] == [proc.encode_prompt("x")[1]] * 2
    assert out["prompts"][1] == "<img></img>问：图里有什么？\n答：一只猫。\n问：Describe it.\n答："


def test_single_image_single_query_and_history(proc):
    out = proc(gradient_rgb(), "它在哪里？", histories=[("图里有什么？", "一只猫。")], english=False)
    assert out["pixel_values"].shape == (1, 3, 56, 56)
    assert out["input_ids"] == [proc.encode_prompt("它在哪里？", [("图里有什么？", "一只猫。")])[0]]


def test_mismatched_batches_are_clear_errors(proc):
    with pytest.raises(UserInputError, match=r"2 image\(s\) and 1 query"):
        proc([gradient_rgb(), gradient_rgb()], "q")
    with pytest.raises(UserInputError, match=r"1 image\(s\) and 3 queries"):
        proc(gradient_rgb(), ["a", "b", "c"])
    with pytest.raises(UserInputError, match="one history per query"):
        proc(None, ["a", "b"], histories=[[]])
    with pytest.raises(UserInputError, match="queries must be"):
        proc(None, [])


# ---- from the YAML processor section ---------------------------------------------------------

def test_build_processor_from_yaml_node(tiny_ice_text_model):
    node = {"type": "VisualGLMProcessor",
            "image_processor": {"type": "VisualGLMImageProcessor", "image_size": 56},
            "tokenizer": {"type": "ChatGLMTokenizer", "max_length": 128, "vocab_file": tiny_ice_text_model}}
    seen = []

    def resolve(path, what):
        seen.append((path, what))
        return path

    processor = build_processor(node, image_length=32, resolve_path=resolve)
    assert seen == [(tiny_ice_text_model, "tokenizer vocab_file")]
    assert processor.image_processor.image_size == 56 and processor.image_length == 32
    assert processor.tokenizer.max_length == 128 and processor.tokenizer.gmask_token_id == GMASK
    assert build_processor(node, 7).image_length == 7
    with pytest.raises(UserInputError, match="unknown fields.*crop_size"):
        build_processor({**node, "image_processor": {"image_size": 56, "crop_size": 3}}, 32, resolve_path=resolve)
    with pytest.raises(UserInputError, match="vocab_file is not set"):
        build_processor({**node, "tokenizer": {"type": "ChatGLMTokenizer"}}, 32, resolve_path=resolve)
    with pytest.raises(UserInputError, match="unknown .* type 'NoSuchProcessor'"):
        build_processor({**node, "image_processor": {"type": "NoSuchProcessor"}}, 32, resolve_path=resolve)


def test_image_processor_is_the_shared_one_under_both_names():
    """The YAMLs' MindFormers name and the neutral name build the same BLIP/CLIP processor."""
    for name in ("VisualGLMImageProcessor", "BlipImageProcessor"):
        assert MindFormerRegister.get_cls(MindFormerModuleType.PROCESSOR, name) is BlipImageProcessor


def test_shipped_tiny_yaml_processor_section():
    from research.common.config import CONFIG_ROOT, load_config
    config = load_config(os.path.join(CONFIG_ROOT, "visualglm", "run_visualglm_tiny_image_to_text_generation.yaml"))
    processor = build_processor(config.processor, image_length=32)
    assert processor.image_processor.image_size == 56
    out = processor(gradient_rgb(), "描述这张图片。")
    assert out["pixel_values"].shape == (1, 3, 56, 56) and out["input_ids"][0][-2:] == [GMASK, SOP]
