"""ChatGLM2's tokenizer on a tiny tokenizer.model-style file built at test time: the layout of
HF THUDM/chatglm2-6b tokenization_chatglm.py (notes/chatglm2.md §2.4)."""
import filecmp
import os

import pytest
import sentencepiece as spm
from mindformers.tools.register import MindFormerModuleType, MindFormerRegister

from research.chatglm2.tokenization_chatglm2 import SPECIAL_TOKENS, ChatGLM2Tokenizer
from research.common.config import REPO_ROOT
from research.common.errors import UserInputError
from research.common.testing import train_tiny_chatglm2_model

SHIPPED = os.path.join(REPO_ROOT, "examples", "tiny", "chatglm2_tokenizer.model")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    return train_tiny_chatglm2_model(str(tmp_path_factory.mktemp("glm2tok") / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(model_file):
    return ChatGLM2Tokenizer(model_file)


@pytest.fixture(scope="module")
def sp(model_file):
    return spm.SentencePieceProcessor(model_file=model_file)


def test_shipped_tiny_model_is_the_builder_output(model_file):
    """examples/tiny/chatglm2_tokenizer.model is what `python -m research.common.testing --chatglm2` writes."""
    assert filecmp.cmp(SHIPPED, model_file, shallow=False)


def test_five_specials_follow_the_file_pieces(tok, sp):
    n = sp.get_piece_size()
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(n, n + 5))
    assert tok.vocab_size == n + 5
    assert (tok.gmask_token_id, tok.sop_token_id) == (n + 1, n + 3)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)  # <s>, </s>, <unk>
    assert [tok.convert_ids_to_tokens(i) for i in range(n, n + 5)] == list(SPECIAL_TOKENS)


def test_prompts_start_with_gmask_sop(tok, sp):
    ids = tok.encode("晚上睡不着应该怎么办")
    assert ids == [tok.gmask_token_id, tok.sop_token_id] + sp.encode("晚上睡不着应该怎么办")
    assert tok.build_inputs_with_special_tokens([7], [8]) == [tok.gmask_token_id, tok.sop_token_id, 7, 8, 2]


def test_build_prompt_is_upstreams_round_format(tok):
    assert tok.build_prompt("你好") == "[Round 1]\n\n问：你好\n\n答："
    assert tok.build_prompt("再见", [("你好", "你好！"), ("在吗", "在")]) == (
        "[Round 1]\n\n问：你好\n\n答：你好！\n\n[Round 2]\n\n问：在吗\n\n答：在\n\n[Round 3]\n\n问：再见\n\n答：")
    assert tok.encode_chat("再见", [("你好", "你好！")]) == tok.encode(tok.build_prompt("再见", [("你好", "你好！")]))


def test_decode_drops_specials_bos_eos_and_pad(tok):
    text = "图片里有一个红色的圆形。\n\nA red circle!"
    ids = tok.encode(text) + [tok.eos_token_id, tok.pad_token_id, tok.bos_token_id]
    assert tok.decode(ids) == text
    assert tok.decode(tok.encode(text), skip_special_tokens=False) == "[gMASK]sop" + text


def test_left_padding_with_position_ids(tok):
    batch = tok(["你好", "图片里有什么形状？"], padding=True, return_tensors="np")
    short, long = (len(tok.encode(t)) for t in ("你好", "图片里有什么形状？"))
    pad = long - short
    assert batch["input_ids"].shape == (2, long)
    assert batch["input_ids"][0, :pad].tolist() == [tok.pad_token_id] * pad
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * short
    assert batch["position_ids"][0].tolist() == [0] * pad + list(range(short))
    assert batch["position_ids"][1].tolist() == list(range(long))


def test_continuation_drops_the_leading_space_piece(tok, sp):
    text = "\n\n[Round 2]\n\n问：hi\n\n答："
    pieces = sp.encode(text, out_type=str)
    assert pieces[0] == "▁"  # what upstream's build_stream_inputs drops
    assert tok.encode_continuation(text) == sp.encode(text)[1:]


def test_mindformers_yaml_node_reads_and_is_registered(model_file):
    node = {"type": "ResearchChatGLM2Tokenizer", "vocab_file": model_file, "bos_token": "<sop>",
            "eos_token": "<eop>", "end_token": "</s>", "mask_token": "[MASK]", "gmask_token": "[gMASK]",
            "pad_token": "<pad>", "unk_token": "<unk>"}
    cls = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "ResearchChatGLM2Tokenizer")
    assert cls is ChatGLM2Tokenizer
    assert cls(**node).encode("你好") == ChatGLM2Tokenizer(model_file).encode("你好")
    own = MindFormerRegister.get_cls(MindFormerModuleType.TOKENIZER, "ChatGLM2Tokenizer")
    assert own.__module__.startswith("mindformers")  # MindFormers' own class is untouched
    with pytest.raises(UserInputError, match="eos_token: '</s>' cannot be chosen"):
        ChatGLM2Tokenizer(model_file, eos_token="</s>")
    with pytest.raises(UserInputError, match="unknown fields"):
        ChatGLM2Tokenizer(model_file, vocab_size=10)


def test_missing_and_foreign_files_are_refused(tmp_path, tiny_ice_text_model):
    with pytest.raises(UserInputError, match="does not exist"):
        ChatGLM2Tokenizer(str(tmp_path / "tokenizer.model"))
    with pytest.raises(UserInputError, match="ice_text.model"):
        ChatGLM2Tokenizer(tiny_ice_text_model)
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserInputError, match="not a valid sentencepiece model"):
        ChatGLM2Tokenizer(str(junk))
